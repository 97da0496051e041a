"""RLOO, REINFORCE++ and DAPO against values worked out by hand; the ready modules' options
that select them (advantage estimators, overlong penalty, dynamic sampling, token-level
loss); the prompt key and the chat template."""

import os

import pytest
import torch
import torch.distributed as dist

from flowgraph.config import Config
from flowgraph.errors import ConfigError, DataError
from flowgraph.rl.advantages import (
    discounted_returns,
    estimate,
    leave_one_out_advantages,
    reinforce_pp_returns,
)
from flowgraph.rl.dapo import overlong_penalty, token_weights, varied_groups
from flowgraph.rl.grpo import group_advantages, grpo_loss
from flowgraph.rl.modules import (
    DAPOTrainer,
    GRPOTrainer,
    PolicyInference,
    PolicyTrainer,
    RewardInference,
)
from flowgraph.rl.ppo import gae, kl_penalty, masked_mean, token_rewards
from spmd import init_gloo, spawn

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 has one padding position


# -- RLOO ---------------------------------------------------------------------------------
def test_leave_one_out_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])
    # group 0: 1 - (0 + .5)/2 = .75; 0 - (1 + .5)/2 = -.75; .5 - (1 + 0)/2 = 0
    # group 1: every answer equals the others' mean
    adv = leave_one_out_advantages(rewards, 3)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.75, 0.0, 0.0, 0.0, 0.0]))
    # k/(k-1) times GRPO's unscaled advantage (r - group mean), as the docstring says
    torch.testing.assert_close(adv, 1.5 * group_advantages(rewards, 3, scale=False))


def test_leave_one_out_needs_whole_groups_of_two_or_more():
    with pytest.raises(ValueError, match="do not form groups of num_generations=4"):
        leave_one_out_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="raise runtime.num_inference_per_prompt"):
        leave_one_out_advantages(torch.zeros(3), 1)


def test_rloo_shapes_the_reward_with_the_summed_kl_first():
    score = torch.tensor([1.0, 0.0, 0.0, 0.0])
    kl = torch.tensor([[0.5, 0.5, 9.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    # shaped rewards with kl_coef .1 (row 0's padded 9 ignored): .9, 0 | -.2, 0
    out = estimate("rloo", score, kl, mask, 2, kl_coef=0.1)
    torch.testing.assert_close(out["advantages"], torch.tensor([0.9, -0.9, -0.2, 0.2]))
    assert set(out) == {"advantages"}


# -- REINFORCE++ --------------------------------------------------------------------------
def test_discounted_returns_by_hand_with_a_padded_row():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    # row 0: G2 = 3, G1 = 2 + .5*3 = 3.5, G0 = 1 + .5*3.5 = 2.75
    # row 1 ends at t=1 (the 99 is padding): G1 = 5, G0 = 4 + .5*5 = 6.5
    got = discounted_returns(rewards, MASK, gamma=0.5)
    torch.testing.assert_close(got, torch.tensor([[2.75, 3.5, 3.0], [6.5, 5.0, 0.0]]))


def test_reinforce_pp_returns_put_kl_on_every_token_and_the_score_on_the_last():
    score = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 7.0]])
    # token rewards, kl_coef .1: row 0 [-.01, -.02, -.03 + 1], row 1 [-.05, -.05 + 0, pad]
    got = reinforce_pp_returns(score, kl, MASK, kl_coef=0.1, gamma=1.0)
    torch.testing.assert_close(got, torch.tensor([[0.94, 0.95, 0.97], [-0.1, -0.05, 0.0]]))
    # The baseline variant: scores minus the group mean (1, 0 -> .5, -.5) first.
    base = reinforce_pp_returns(score, kl, MASK, kl_coef=0.1, gamma=1.0, num_generations=2)
    torch.testing.assert_close(base, torch.tensor([[0.44, 0.45, 0.47], [-0.6, -0.55, 0.0]]))
    # gamma discounts the score back from the last token: row 0, t=0: -.01 + .5*(-.02) +
    # .25*.97 = .2225
    assert reinforce_pp_returns(score, kl, MASK, 0.1, gamma=0.5)[0, 0].item() == pytest.approx(
        0.2225
    )


def test_the_default_estimators_are_exactly_gae_and_grpo():
    torch.manual_seed(0)
    score, kl, values = torch.rand(4), torch.rand(4, 3) * 0.1, torch.rand(4, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = estimate("gae", score, kl, mask, 2, values, kl_coef=0.05, gamma=0.9, lam=0.8)
    want = gae(token_rewards(score, kl, mask, 0.05), values, mask, 0.9, 0.8)
    assert torch.equal(out["advantages"], want[0]) and torch.equal(out["returns"], want[1])
    grpo = estimate("grpo", score, kl, mask, 2, scale=False)["advantages"]
    assert torch.equal(grpo, group_advantages(score, 2, scale=False))
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        estimate("ppo", score, kl, mask, 2)


# -- DAPO ---------------------------------------------------------------------------------
def test_overlong_penalty_by_hand():
    lengths = torch.tensor([3, 4, 5, 6, 8])
    # max 8, buffer 4: free up to 4 tokens, then -1/4 per token down to -1 at 8
    got = overlong_penalty(lengths, max_length=8, buffer=4)
    assert got.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(lengths, 8, 4, factor=0.5).tolist() == [0.0, 0.0, -0.125, -0.25, -0.5]
    assert overlong_penalty(lengths, 8, 0).tolist() == [0.0] * 5  # buffer 0: off


def test_varied_groups_keep_only_groups_with_different_scores():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5])
    keep = varied_groups(scores, 3)
    assert keep.tolist() == [False] * 3 + [True] * 3 + [False] * 3
    assert varied_groups(torch.tensor([1.0, 1.0]), 1).tolist() == [True, True]
    with pytest.raises(ValueError, match="do not form groups of num_inference_per_prompt=2"):
        varied_groups(torch.zeros(3), 2)


def test_token_weights_make_accumulated_token_means_the_step_s_token_mean():
    masks = [torch.ones(2, 3), torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])]  # 6 + 3
    assert token_weights(masks) == pytest.approx([6 / 9, 3 / 9])
    torch.manual_seed(0)
    losses = [torch.rand(2, 3), torch.rand(2, 3)]
    weights = token_weights(masks)
    accumulated = sum(w * masked_mean(x, m) for w, x, m in zip(weights, losses, masks, strict=True))
    whole = masked_mean(torch.cat(losses), torch.cat(masks))
    assert accumulated.item() == pytest.approx(whole.item())
    # The rows' shares (GRPO's accumulation) weigh the short micro-batch's tokens more.
    by_rows = sum(0.5 * masked_mean(x, m) for x, m in zip(losses, masks, strict=True))
    assert by_rows.item() != pytest.approx(whole.item())


def _token_weights_on_two_ranks(rank, port, out):
    init_gloo(rank, 2, port)
    masks = [[torch.ones(1, 4)], [torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.ones(1, 4)]][rank]
    torch.save(token_weights(masks, dist.group.WORLD), f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.slow
def test_token_weights_count_the_tokens_of_every_data_parallel_rank(tmp_path):
    spawn(_token_weights_on_two_ranks, args=(str(tmp_path / "w"),), nprocs=2, timeout=120)
    # 4 + (1 + 4) = 9 tokens in the step; DDP averages the 2 ranks' gradients, so each
    # weight is 2 x its share: the mean over ranks of the weighted sums is the token mean.
    assert torch.load(tmp_path / "w.0") == pytest.approx([2 * 4 / 9])
    assert torch.load(tmp_path / "w.1") == pytest.approx([2 * 1 / 9, 2 * 4 / 9])


def test_decoupled_clip_and_token_level_loss_by_hand():
    log = torch.log
    logprobs = log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    old = log(torch.tensor([[0.25, 0.4, 0.5], [0.5, 0.5, 0.9]]))  # ratios 2, 1.25, 1 | 1, 1, .56
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    # symmetric 0.2: row 0 min(r, clip(r)) = 1.2, 1.2, 1 -> mean -1.1333; row 1: -(-1) = 1
    loss, info = grpo_loss(logprobs, old, None, adv, mask, clip=0.2, beta=0.0)
    assert loss.item() == pytest.approx((-(1.2 + 1.2 + 1.0) / 3 + 1.0) / 2)
    assert info["clip_frac"] == pytest.approx(2 / 4)
    # clip-higher 0.28: 1.28, 1.25 (inside now), 1 -> row 0 mean -1.1767
    loss, info = grpo_loss(logprobs, old, None, adv, mask, clip=0.2, beta=0.0, clip_high=0.28)
    assert loss.item() == pytest.approx((-(1.28 + 1.25 + 1.0) / 3 + 1.0) / 2)
    assert info["clip_frac"] == pytest.approx(1 / 4)
    # token level: all 4 tokens at once, the 3-token row weighs 3 times the 1-token one
    loss, _ = grpo_loss(logprobs, old, None, adv, mask, 0.2, 0.0, clip_high=0.28, loss_agg="token")
    assert loss.item() == pytest.approx((-(1.28 + 1.25 + 1.0) + 1.0) / 4)
    with pytest.raises(ValueError, match="loss_agg must be 'sequence' or 'token'"):
        grpo_loss(logprobs, old, None, adv, mask, beta=0.0, loss_agg="row")


def test_the_default_clip_is_bit_identical_to_a_symmetric_clip_high():
    torch.manual_seed(0)
    logprobs, old = torch.randn(4, 5) * 0.3, torch.randn(4, 5) * 0.3
    adv, mask = torch.randn(4), (torch.rand(4, 5) > 0.3).float()
    default = grpo_loss(logprobs, old, None, adv, mask, clip=0.2, beta=0.0)
    explicit = grpo_loss(logprobs, old, None, adv, mask, clip=0.2, beta=0.0, clip_high=0.2)
    assert torch.equal(default[0], explicit[0]) and default[1] == explicit[1]


# -- the ready modules --------------------------------------------------------------------
def module(cls, name, args=None, runtime=None, trainable=False):
    """A ready module configured with ``args`` (and ``runtime`` settings), set up."""
    made = cls(name)
    made.config = Config(
        runtime={"prompt_length": 4, "response_length": 4, **(runtime or {})},
        models={name: {"args": args or {}}},
    )
    made.trainable = trainable
    made.setup()
    return made


def rollout(prompts, answers, lengths, response_length=4):
    """The batch a policy hands the reward: prompts, answers, a response mask of
    ``lengths`` real tokens (the stop token counted) and zero log-probs."""
    mask = (torch.arange(response_length)[None] < torch.tensor(lengths)[:, None]).float()
    return {"prompt": prompts, "answer": answers, "response_mask": mask,
            "old_logprobs": torch.zeros_like(mask)}  # fmt: skip


def test_reward_defaults_keep_gae_with_a_critic_and_grpo_without():
    reward = module(RewardInference, "reward", {"kl_coef": 0.1, "lam": 0.9},
                    {"num_inference_per_prompt": 2})  # fmt: skip
    data = rollout(["1", "1", "5", "5"], ["23", "2", "6789", "67"], [3, 2, 4, 3])
    torch.manual_seed(0)
    ref = {"ref_logprobs": torch.rand(4, 4) * -0.1}
    values = {"old_values": torch.rand(4, 4)}
    out = reward.forward_step(data, ref, values)
    score = torch.tensor([0.5, 0.25, 1.0, 0.5])  # count_up over 4 characters
    kl = kl_penalty(data["old_logprobs"], ref["ref_logprobs"]) * data["response_mask"]
    rewards = token_rewards(score, kl, data["response_mask"], 0.1)
    adv, ret = gae(rewards, values["old_values"], data["response_mask"], 1.0, 0.9)
    assert torch.equal(out["advantages"], adv) and torch.equal(out["returns"], ret)
    out = reward.forward_step(data, ref)
    assert torch.equal(out["advantages"], group_advantages(score, 2)) and "returns" not in out


OVER_SAMPLED = {"num_inference_per_prompt": 2, "train_global_batch_size": 8}  # of 32 rows


def test_reward_overlong_penalty_and_dynamic_sampling():
    args = {"overlong_buffer": 2, "filter_groups": True}
    reward = module(RewardInference, "reward", args, OVER_SAMPLED)
    data = rollout(
        ["1", "1", "5", "5", "7", "7"],
        ["2", "2x", "6789", "6", "89", ""],
        [2, 3, 4, 2, 3, 1],  # tokens, the stop token counted ("6789" ran out of room)
    )
    out = reward.forward_step(data)
    # task scores .25, .25 | 1, .25 | .5, 0: the first group ties and is dropped (though
    # its penalties differ: the filter is DAPO's, on the task's score); 6 rows for 4 kept.
    assert out["prompt"] == ["5", "5", "7", "7"] and out["answer"] == ["6789", "6", "89", ""]
    assert out["sampled_per_kept"].tolist() == [1.5] * 4
    # penalties, free up to 4 - 2 = 2 tokens: -1, 0 | -.5, 0; the last group's scores tie
    # after the penalty, so its advantages are 0
    assert out["overlong_penalty"].tolist() == [-1.0, 0.0, -0.5, 0.0]
    assert out["score"].tolist() == [0.0, 0.25, 0.0, 0.0]
    torch.testing.assert_close(out["advantages"], torch.tensor([-0.7071, 0.7071, 0.0, 0.0]),
                               atol=1e-4, rtol=0)  # fmt: skip
    assert {len(v) for v in out.values()} == {4}
    assert reward.eval_step(data)["score"].tolist() == [0.25, 0.25, 1.0, 0.25, 0.5, 0.0]


def test_a_generation_call_whose_groups_all_tie_returns_no_rows():
    reward = module(RewardInference, "reward", {"filter_groups": True}, OVER_SAMPLED)
    out = reward.forward_step(rollout(["1", "1"], ["2", "2"], [2, 2]))
    assert {len(v) for v in out.values()} == {0} and "advantages" in out


@pytest.mark.parametrize(
    "args, message",
    [
        ({"advantage": "rlo"}, r"args.advantage: unknown estimator 'rlo'; did you mean 'rloo'"),
        ({"advantage": "rloo"}, r"args.advantage: rloo compares .*_per_prompt is 1; set it to 2"),
        ({"filter_groups": True}, r"args.filter_groups: true compares the answers"),
        ({"overlong_buffer": 9}, r"overlong_buffer: 9 is not between 0 .*_length=4"),
        ({"overlong_buffer": -1}, r"overlong_buffer: -1 is not between"),
        ({"filter_groups": "yes"}, r"filter_groups: expected true or false"),
    ],
)
def test_bad_algorithm_arguments_name_the_fix(args, message):
    with pytest.raises(ConfigError, match=message):
        module(RewardInference, "reward", args)


def test_gae_without_a_value_model_names_the_fix():
    reward = module(RewardInference, "reward", {"advantage": "gae"})
    with pytest.raises(ConfigError, match=r"advantage: gae needs a critic's old_values: call"):
        reward.forward_step(rollout(["1"], ["2"], [2]))


def trainer_batch(rows=4, per_token=False, lengths=(4, 1, 3, 2)):
    torch.manual_seed(0)
    mask = (torch.arange(4)[None] < torch.tensor(lengths[:rows])[:, None]).float()
    sequences = torch.randint(3, 13, (rows, 8))
    return {
        "sequences": sequences,
        "attention_mask": torch.ones(rows, 8, dtype=torch.long),
        "response_mask": mask,
        "old_logprobs": -torch.rand(rows, 4) * mask,
        "advantages": torch.randn(rows, 4) if per_token else torch.randn(rows),
        "score": torch.rand(rows),
        "kl": torch.zeros(rows),
    }


def test_trainers_refuse_advantages_of_the_other_shape():
    tiny = {"n_layer": 1, "n_embd": 16}
    grpo = module(GRPOTrainer, "grpo_policy", {**tiny, "beta": 0.0}, trainable=True)
    with pytest.raises(ConfigError, match=r"one advantage per row, but the batch holds per-tok"):
        grpo.train_step([trainer_batch(per_token=True)])
    ppo = module(PolicyTrainer, "ppo_policy", tiny, trainable=True)
    with pytest.raises(ConfigError, match=r"trains per-token advantages .* train those with GRPO"):
        ppo.train_step([trainer_batch()])


def test_bad_loss_agg_names_the_choices():
    with pytest.raises(ConfigError, match=r"loss_agg: 'row' is neither 'sequence'"):
        module(DAPOTrainer, "dapo_policy", {"loss_agg": "row"}, trainable=True)


def gradients(trainer, micro_batches):
    """The gradients of one ``train_step`` over ``micro_batches`` (the step not taken)."""
    captured = {}

    def capture():
        captured.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        trainer.optimizer.zero_grad(set_to_none=True)
        return 0.0

    trainer.step_optimizer = capture
    metrics = trainer.train_step(micro_batches)
    return captured, metrics


def split_rows(batch, *parts):
    return [{k: v[p] for k, v in batch.items()} for p in parts]


def test_dapo_token_level_loss_is_the_same_however_the_step_is_split():
    dapo = module(DAPOTrainer, "dapo_policy", {"n_layer": 1, "n_embd": 16}, trainable=True)
    batch = trainer_batch()
    whole, metrics = gradients(dapo, [batch])
    # micro-batches of 5 and 5 tokens, then of 4 and 6: each weighs its share of tokens
    for parts in ([0, 1], [2, 3]), ([0], [1, 2, 3]):
        split, _ = gradients(dapo, split_rows(batch, *parts))
        for name, grad in whole.items():
            torch.testing.assert_close(split[name], grad, msg=name)
    assert metrics["reward"] == pytest.approx(batch["score"].mean().item())
    # Not a no-op: the mean over rows of their token means is another loss.
    args = {"n_layer": 1, "n_embd": 16, "loss_agg": "sequence"}
    by_rows, _ = gradients(module(DAPOTrainer, "dapo_policy", args, trainable=True), [batch])
    assert any(not torch.allclose(by_rows[name], grad) for name, grad in whole.items())


def test_dapo_trainer_reports_kept_groups_and_the_overlong_penalty():
    dapo = module(DAPOTrainer, "dapo_policy", {"n_layer": 1, "n_embd": 16}, trainable=True)
    batch = {**trainer_batch(), "sampled_per_kept": torch.tensor([2.0, 2.0, 4.0, 4.0]),
             "overlong_penalty": torch.tensor([0.0, -0.5, 0.0, -0.5])}  # fmt: skip
    _, metrics = gradients(dapo, [batch])
    assert metrics["kept_fraction"] == pytest.approx(1 / 3)  # 4 rows kept of 12 generated
    assert metrics["overlong_penalty"] == pytest.approx(-0.25)


# -- prompt key and chat template ---------------------------------------------------------
def test_the_prompt_key_names_the_prompt_column_for_policy_and_reward():
    args = {"prompt_key": "question", "alphabet": "0123456789"}
    policy = module(PolicyInference, "policy", args)
    out = policy.forward_step({"question": ["12", "345"]})
    assert out["sequences"].shape == (2, 8) and out["question"] == ["12", "345"]
    reward = module(RewardInference, "reward", {"prompt_key": "question"})
    data = {"question": ["12", "3"], "prompt": ["0", "0"], "answer": ["3456", "4"]}
    assert reward.eval_step(data)["score"].tolist() == [1.0, 0.25]  # of the questions
    with pytest.raises(DataError, match=r"no prompt key 'question' .* its keys: 'prompt'"):
        policy.forward_step({"prompt": ["12"]})


def test_a_chat_template_needs_a_hugging_face_tokenizer():
    with pytest.raises(ConfigError, match=r"chat_template: true needs a Hugging Face tokenizer"):
        module(PolicyInference, "policy", {"chat_template": True})


CHAT = "{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}9{% endif %}"  # noqa: E501


def save_tokenizer(directory, chat_template=None):
    """A character-level fast tokenizer that puts ``<bos>`` before every text it encodes
    with special tokens, with a chat template (``<bos>`` + the user's text + ``9``)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", *"0123456789"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                        special_tokens=[("<bos>", 1)])  # fmt: skip
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return str(directory)


GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 16}


def test_the_chat_template_wraps_every_prompt_once(tmp_path):
    path = save_tokenizer(tmp_path, CHAT)
    args = {"hf_config": GPT2, "hf_tokenizer": path, "chat_template": True}
    policy = module(PolicyInference, "policy", args, {"prompt_length": 5})
    out = policy.forward_step({"prompt": ["12", "7"]})
    # "<bos>12" + "9" (the generation prompt), with no second <bos> from encoding;
    # "<bos>7" + "9" left-padded
    assert out["sequences"][:, :5].tolist() == [[0, 1, 4, 5, 12], [0, 0, 1, 10, 12]]
    assert out["prompt"] == ["12", "7"]  # the reward still sees the user's text
    plain = module(PolicyInference, "policy", {**args, "chat_template": False},
                   {"prompt_length": 5})  # fmt: skip
    assert plain.forward_step({"prompt": ["12"]})["sequences"][0, :5].tolist() == [0, 0, 1, 4, 5]


def test_a_tokenizer_without_a_chat_template_names_the_fix(tmp_path):
    path = save_tokenizer(tmp_path)
    args = {"hf_config": GPT2, "hf_tokenizer": path, "chat_template": True}
    with pytest.raises(ConfigError, match=r"has no chat template; save one with it"):
        module(PolicyInference, "policy", args)
