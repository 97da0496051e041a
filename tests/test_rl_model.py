"""TinyGPT, sampling and the tokenizer."""

import pytest
import torch

from flowgraph.rl.gpt import GPTConfig, KVCache, TinyGPT
from flowgraph.rl.sampling import generate, response_logits, sample_next, token_logprobs
from flowgraph.rl.tokenizer import CharTokenizer

TOK = CharTokenizer("0123456789abc")


def model(seed=0, vocab=TOK.vocab_size):
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, max_seq_len=40))


def test_padding_does_not_change_a_prompts_logits():
    gpt = model()
    alone = gpt(torch.tensor([TOK.encode("123")]))[0]
    ids, mask = TOK.batch(["123", "98765"], side="left")
    padded = gpt(ids, mask)[0, -3:]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_kv_cache_gives_the_tokens_of_full_recomputation_for_ragged_prompts(side):
    gpt = model()
    ids, mask = TOK.batch(["1", "2345", "678", "90ab1c2"], side=side)
    cached = generate(gpt, ids, mask, max_new_tokens=12, temperature=0.0, use_cache=True)
    full = generate(gpt, ids, mask, max_new_tokens=12, temperature=0.0, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences)
    # every prompt's greedy answer equals the answer to that prompt alone (no padding)
    for row, text in enumerate(["1", "2345", "678", "90ab1c2"]):
        one = torch.tensor([TOK.encode(text)])
        alone = generate(gpt, one, torch.ones_like(one), 12, temperature=0.0)
        assert torch.equal(alone.responses[0], cached.responses[row])


def test_left_and_right_padded_prompts_give_the_same_answers():
    gpt = model(1)
    left = generate(gpt, *TOK.batch(["12", "3456"], side="left"), 6, temperature=0.0)
    right = generate(gpt, *TOK.batch(["12", "3456"], side="right"), 6, temperature=0.0)
    assert torch.equal(left.sequences, right.sequences)
    assert left.prompt_length == 4


def test_rows_stop_at_their_stop_token_and_are_padded_after_it():
    gpt = model()
    ids, mask = TOK.batch(["1", "22", "333"])
    probe = generate(gpt, ids, mask, max_new_tokens=8, temperature=0.0)
    stop = int(probe.responses[0, 2])  # make row 0's third greedy token the stop token
    out = generate(gpt, ids, mask, 8, temperature=0.0, stop_tokens=[stop], pad_id=TOK.pad_id)
    for row in range(3):
        response, keep = out.responses[row], out.response_mask[row].bool()
        hits = (probe.responses[row] == stop).nonzero()
        length = int(hits[0]) + 1 if len(hits) else 8
        assert int(keep.sum()) == length  # up to and including the stop token
        assert torch.equal(response[:length], probe.responses[row, :length])
        assert (response[length:] == TOK.pad_id).all()
        assert torch.equal(out.attention_mask[row, out.prompt_length :].bool(), keep)
    assert out.responses.shape == (3, 8)  # full width even when all rows stopped early


def test_sampling_is_reproducible_and_top_k_top_p_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top1 = sample_next(logits, temperature=1.0, top_k=1, generator=g)
    assert (top1 == 0).all()
    top2 = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    # p(0) = 0.72..., so top_p=0.5 keeps only token 0; top_p=0.9 keeps tokens 0 and 1
    assert (sample_next(logits, 1.0, top_p=0.5, generator=g) == 0).all()
    assert set(sample_next(logits, 1.0, top_p=0.9, generator=g).tolist()) == {0, 1}
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_sampled_frequencies_follow_the_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().repeat(40_000, 1)  # log(0) = -inf: never sampled
    tokens = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert frequencies[4] == 0
    # 40,000 draws: the standard error of a frequency is below 0.0025
    torch.testing.assert_close(frequencies, probs, atol=0.01, rtol=0)


def test_token_logprobs_are_those_of_the_response_tokens():
    gpt = model()
    ids, mask = TOK.batch(["12", "345"])
    out = generate(gpt, ids, mask, 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    logits = gpt(out.sequences, out.attention_mask)
    logp = token_logprobs(logits, out.sequences, out.prompt_length)
    t = out.prompt_length + 2  # the third response token, predicted at position t - 1
    expected = logits[1, t - 1].log_softmax(-1)[out.sequences[1, t]]
    assert logp.shape == (2, 5)
    assert logp[1, 2].item() == pytest.approx(expected.item(), abs=1e-6)


def test_too_long_a_sequence_names_the_setting():
    gpt = model()
    with pytest.raises(ValueError, match="sequence of 41 tokens exceeds max_seq_len=40"):
        gpt(torch.zeros(1, 41, dtype=torch.long))


def test_tokenizer_round_trip_and_errors():
    assert TOK.decode(TOK.encode("1a2b")) == "1a2b"
    assert TOK.decode([TOK.pad_id, *TOK.encode("12"), TOK.eos_id, *TOK.encode("3")]) == "12"
    assert TOK.decode([999]) == "?"
    assert TOK.is_digit(torch.tensor(TOK.encode("1a9"))).tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"characters \['Z', '_'\] of 'Z_1' are not in"):
        TOK.encode("Z_1")
    with pytest.raises(ValueError, match="repeats a character"):
        CharTokenizer("aa")


def test_the_sampling_log_probs_are_those_of_a_full_forward_pass():
    """``Generation.logprobs`` replaces the policy's second forward pass (old_logprobs): they
    must be what the trainer's forward gives for the same tokens (the reference too)."""
    gpt = model()
    ids, mask = TOK.batch(["12", "345", "6"])
    out = generate(gpt, ids, mask, 6, temperature=0.7, top_k=5, stop_tokens=[TOK.eos_id],
                   pad_id=TOK.pad_id, generator=torch.Generator().manual_seed(0))  # fmt: skip
    full = token_logprobs(gpt(out.sequences, out.attention_mask), out.sequences, out.prompt_length)
    sliced = response_logits(gpt, out.sequences, out.attention_mask, out.prompt_length)
    torch.testing.assert_close(out.logprobs, full * out.response_mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        token_logprobs(sliced, out.sequences, out.prompt_length), full, atol=1e-5, rtol=0
    )


def test_finished_rows_leave_the_batch_and_the_answers_do_not_change():
    """Rows that stop early are dropped from the batch and its KV cache (``KVCache.keep``);
    every row's tokens and log-probs equal those of full recomputation, which never drops."""
    torch.manual_seed(1)
    gpt = TinyGPT(GPTConfig(vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_embd=16,
                            max_seq_len=40))  # fmt: skip
    ids, mask = TOK.batch([str(i % 10) + str(i * 7 % 10) * (1 + i % 3) for i in range(24)])
    kept = []
    original_keep = KVCache.keep

    def spy(cache, rows):
        kept.append(len(rows))
        original_keep(cache, rows)

    stops = [3, 6, 9, 12]  # with this model, rows stop after 1 to 11 tokens
    settings = dict(max_new_tokens=16, temperature=0.0, stop_tokens=stops, pad_id=TOK.pad_id)
    KVCache.keep = spy
    try:
        cached = generate(gpt, ids, mask, **settings)
    finally:
        KVCache.keep = original_keep
    full = generate(gpt, ids, mask, use_cache=False, **settings)
    assert len(kept) >= 3 and kept == sorted(kept, reverse=True)  # compacted again and again
    assert torch.equal(cached.sequences, full.sequences)
    assert torch.equal(cached.response_mask, full.response_mask)
    torch.testing.assert_close(cached.logprobs, full.logprobs, atol=1e-5, rtol=0)
    lengths = cached.response_mask.sum(1)
    assert lengths.min() < lengths.max()  # rows did stop at different steps
