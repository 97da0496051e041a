"""Hugging Face causal LMs (the optional ``hf`` extra) behind the TinyGPT interface."""

import pytest
import torch
import transformers
import yaml

from flowgraph.config import Config
from flowgraph.errors import ConfigError
from flowgraph.rl import hf
from flowgraph.rl.modules import PolicyInference
from flowgraph.rl.sampling import generate
from test_examples import EXAMPLES, QUIET, load_example

GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32}
SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def tiny_gpt2(seed=0, value=False):
    torch.manual_seed(seed)
    return hf.build({"hf_config": GPT2}, value=value, vocab_size=12, special_ids=SPECIAL)


def ragged_prompts():
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 4], [0, 3, 3, 5]])
    return ids, (ids != 0).long()


def test_cached_generation_gives_the_tokens_of_full_recomputation():
    model = tiny_gpt2().eval()
    ids, mask = ragged_prompts()
    cached = generate(model, ids, mask, max_new_tokens=10, temperature=0.0)
    full = generate(model, ids, mask, max_new_tokens=10, temperature=0.0, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences)
    assert cached.sequences.shape == (3, 14)


def test_left_padding_does_not_change_a_rows_logits():
    model = tiny_gpt2().eval()
    alone = model(torch.tensor([[9, 4, 7]]))
    padded = model(torch.tensor([[0, 0, 9, 4, 7]]), torch.tensor([[0, 0, 1, 1, 1]]))
    torch.testing.assert_close(padded[:, 2:], alone, atol=1e-5, rtol=1e-5)


def test_value_model_has_no_lm_head_and_starts_at_zero():
    model = tiny_gpt2(value=True)
    values = model(*ragged_prompts())
    assert values.shape == (3, 4) and not values.any()
    assert not any("lm_head" in name for name, _ in model.named_parameters())


def test_dropout_is_off_unless_kept():
    assert tiny_gpt2().lm.config.resid_pdrop == 0.0
    kept = hf.build({"hf_config": GPT2, "disable_dropout": False}, False, 12, SPECIAL)
    assert kept.lm.config.resid_pdrop == 0.1


def policy_module(args):
    policy = PolicyInference("policy")
    policy.config = Config(models={"policy": {"args": {"alphabet": "0123456789", **args}}})
    policy.setup()
    return policy


def test_policy_loads_a_local_checkpoint_directory(tmp_path):
    trained = policy_module({"hf_config": GPT2, "init_seed": 3}).model
    trained.lm.save_pretrained(tmp_path / "ckpt")
    loaded = policy_module({"hf_model": str(tmp_path / "ckpt"), "init_seed": 7}).model
    for (name, a), (_, b) in zip(
        trained.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_config_only_directory_builds_from_init_seed(tmp_path):
    trained = policy_module({"hf_config": GPT2, "init_seed": 3}).model
    trained.lm.config.save_pretrained(tmp_path)
    first = policy_module({"hf_model": str(tmp_path), "init_seed": 3}).model
    again = policy_module({"hf_model": str(tmp_path), "init_seed": 3}).model
    other = policy_module({"hf_model": str(tmp_path), "init_seed": 4}).model
    weight = "lm.transformer.h.0.attn.c_attn.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert torch.equal(first.state_dict()[weight], trained.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


@pytest.mark.parametrize(
    "args, message",
    [
        ({"hf_model": "/nonexistent/dir"}, r"models.policy.args.hf_model=.* has no config.json"),
        ({"hf_config": {"n_layer": 1}}, r"models.policy.args.hf_config needs a model_type"),
        ({"hf_config": {**GPT2, "vocab_size": 5}}, "vocabulary of 5 tokens, fewer than"),
    ],
)
def test_bad_hugging_face_arguments_name_the_fix(args, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        policy_module(args)


def save_char_tokenizer(directory):
    """A character-level fast tokenizer saved as save_pretrained() writes it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", *"0123456789"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    fast.save_pretrained(directory)


def test_a_checkpoint_directory_with_its_own_tokenizer(tmp_path):
    model = policy_module({"hf_config": GPT2}).model
    model.lm.save_pretrained(tmp_path)
    save_char_tokenizer(tmp_path)
    policy = PolicyInference("policy")
    policy.config = Config(
        runtime={"prompt_length": 4, "response_length": 5},
        models={"policy": {"args": {"hf_model": str(tmp_path), "hf_tokenizer": True}}},
    )
    policy.setup()
    assert isinstance(policy.tokenizer, hf.HFTokenizer) and policy.tokenizer.vocab_size == 13
    out = policy.forward_step({"prompt": ["3907", "12"]})
    assert out["sequences"][0, :4].tolist() == [6, 12, 3, 10]  # "3907" in its own ids
    assert out["sequences"][1, :4].tolist() == [0, 0, 4, 5]  # left-padded "12"
    assert all(set(answer) <= set("0123456789") for answer in out["answer"])
    assert policy.tokenizer.decode([4, 5, 2, 9]) == "12"  # stops at <eos>


def test_bad_tokenizer_arguments_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="hf_tokenizer: true reads the tokenizer of args.hf_model"):
        policy_module({"hf_config": GPT2, "hf_tokenizer": True})
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        policy_module({"hf_config": GPT2, "hf_tokenizer": str(tmp_path)})


def test_grpo_example_with_a_gpt2_policy_learns(tmp_path):
    grpo = load_example("grpo")
    config = str(EXAMPLES / "grpo_hf.yaml")
    records = grpo.main(["--config", config, *QUIET, "runtime.num_episode=25",
                        f"runtime.log_dir={tmp_path}"])  # fmt: skip
    rewards = [r.metrics["grpo_policy/reward"] for r in records if r.episode > 0]
    assert isinstance(grpo.policy.model.lm, transformers.GPT2LMHeadModel)
    assert rewards[0] < 0.1 and sum(rewards[-3:]) / 3 > 0.5, rewards


def test_ppo_example_runs_with_gpt2_policy_and_value(tmp_path):
    config = yaml.safe_load((EXAMPLES / "ppo.yaml").read_text())
    for model in config["models"].values():
        if "n_layer" in model["args"]:
            model["args"]["hf_config"] = {**GPT2, "n_embd": 16}
    (tmp_path / "ppo_hf.yaml").write_text(yaml.safe_dump(config))
    ppo = load_example("ppo")
    records = ppo.main(["--config", str(tmp_path / "ppo_hf.yaml"), *QUIET,
                        "runtime.num_episode=2", f"runtime.log_dir={tmp_path}"])  # fmt: skip
    assert all(torch.isfinite(torch.tensor(r.metrics["ppo_value/loss"])) for r in records[1:])
    assert isinstance(ppo.value.model, hf.HFValueModel)
    for trainer, inference in ((ppo.ppo_policy, ppo.policy), (ppo.ppo_value, ppo.value)):
        trained, synced = trainer.model.state_dict(), inference.model.state_dict()
        # the sync casts to the copy's dtype (bf16 under `auto` on bf16 hardware)
        assert all(torch.equal(trained[name].to(synced[name].dtype), synced[name])
                   for name in trained)  # fmt: skip
