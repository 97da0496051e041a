"""docs/data.md end to end: a JSONL file of questions with solutions and a local Hugging
Face model directory (with a chat template) train with the GRPO example under a YAML of
the user's, a verifiable reward reads the file's solution column, and the checkpoint
exports to a directory that transformers loads with the trained weights."""

import json

import torch
import transformers
import yaml

from flowgraph.cli import main as flowc
from flowgraph.export import char_tokenizer_fast
from flowgraph.rl.rewards import math_reward
from flowgraph.rl.tokenizer import CharTokenizer
from test_examples import load_example

SEEN = []  # the rows my_reward scored


def my_reward(row):
    """A user's reward (``reward: test_bring_your_own:my_reward``): the math reward of the
    row, which carries the file's columns."""
    SEEN.append(row)
    return math_reward(row)


ALPHABET = "0123456789+="
CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"  # noqa: E501


def my_model(directory):
    """A user's model directory: a GPT-2 with its tokenizer and chat template."""
    torch.manual_seed(0)
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = transformers.GPT2Config(
        vocab_size=15, n_positions=16, n_embd=32, n_layer=1, n_head=2, **special
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer = char_tokenizer_fast(CharTokenizer(ALPHABET), max_length=16)
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(directory)


def write_questions(path, count, seed):
    generator = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, 5, (count, 2), generator=generator).tolist()
    path.write_text("".join(json.dumps({"question": f"{a}+{b}", "solution": str(a + b)}) + "\n"
                            for a, b in pairs))  # fmt: skip
    return path


def test_a_jsonl_file_and_a_local_model_train_and_export(tmp_path):
    model_dir = tmp_path / "my-model"
    my_model(model_dir)
    policy = {"hf_model": str(model_dir), "hf_tokenizer": True, "chat_template": True,
              "prompt_key": "question"}  # fmt: skip
    config = {
        "runtime": {
            "data_path": str(write_questions(tmp_path / "questions.jsonl", 256, seed=0)),
            "eval_data_path": str(write_questions(tmp_path / "eval.jsonl", 16, seed=1)),
            "num_episode": 2, "sample_per_episode": 8, "num_inference_per_prompt": 4,
            "generation_batch_size": 8, "train_micro_batch_size": 16,
            "train_global_batch_size": 32, "prompt_length": 4, "response_length": 2,
            "eval_episode_interval": 1, "save_episode_interval": 2,
            "checkpoint_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "run"),
            "log_episodes": False, "progress": False,
        },
        "models": {
            "policy": {"args": policy},
            "reference": {"args": policy},
            "grpo_policy": {"args": {**policy, "lr": 1e-3, "beta": 0.04}},
            "reward": {"args": {"reward": "test_bring_your_own:my_reward",
                                "prompt_key": "question"}},
        },
    }  # fmt: skip
    yaml_path = tmp_path / "my_grpo.yaml"
    yaml_path.write_text(yaml.safe_dump(config))
    records = load_example("grpo").main(["--config", str(yaml_path)])
    assert [r.episode for r in records] == [1, 2]
    # The reward saw each question with its own solution and the policy's answer.
    assert len(SEEN) == 2 * 32 + 2 * 16  # 2 episodes of 8 x 4 answers, 2 evals of 16
    assert all(row["solution"] == str(sum(map(int, row["question"].split("+")))) for row in SEEN)
    assert {"question", "solution", "answer", "prompt"} <= set(SEEN[0])
    assert "eval/score" in records[-1].metrics

    out = tmp_path / "exported"
    assert (
        flowc(["export", str(tmp_path / "ckpt"), "--model", "grpo_policy", "--out", str(out)]) == 0
    )  # noqa: E501
    trained = transformers.AutoModelForCausalLM.from_pretrained(out)
    initial = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode("1+2=")])
    assert tokenizer.decode(ids[0]) == "1+2="
    assert not torch.allclose(trained(ids).logits, initial(ids).logits)  # the trained weights
