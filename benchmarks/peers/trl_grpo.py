"""Hugging Face TRL's ``GRPOTrainer`` on flowgraph's standard GRPO setting
(examples/grpo_bench.yaml), for benchmarks/peers/compare.py. Runs in its own virtual
environment (benchmarks/peers/.venv, made by ``make bench-peers``), not flowgraph's.

    benchmarks/peers/.venv/bin/python benchmarks/peers/trl_grpo.py --steps 12 --out X.jsonl
    benchmarks/peers/.venv/bin/python benchmarks/peers/trl_grpo.py --no-bf16 --out X.jsonl

The setting, rebuilt without downloading anything (HF_HUB_OFFLINE=1 is set before
transformers is imported): a randomly initialised ``GPT2LMHeadModel`` (4 layers, width 256,
4 heads, vocabulary 1024, 40 positions, dropout off, seed 0: the config of
examples/grpo_bench_hf.yaml, whose initial weights these equal) and a character-level
tokenizer with flowgraph's ids (``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, the digits 3-12;
ids 13-1023 are filler characters that are not digits, so any sampled id decodes).
Prompts: ``digit_prompts`` of src/flowgraph/rl/tasks.py (8192 prompts of
``--prompt-digits`` random digits, seed 0, no BOS); the default 4 is what examples/grpo.py
trains on (``digit_prompts(8192, seed=0)``, 4 digits by default, left-padded to
runtime.prompt_length=8 there), although the yaml's comment says 8 digits; compare.py
reads the count from the example's dataset. Reward: ``digit_fraction`` over the answer
text with ``length`` = 32 (flowgraph's RewardInference passes runtime.response_length),
i.e. the digits in the answer / 32.

GRPOConfig fields set, and why (everything else is TRL's default):

- per_device_train_batch_size=32, gradient_accumulation_steps=4 (so steps_per_generation
  = 4 and generation_batch_size = 128): TRL counts completions, not prompts; one optimizer
  step per 128 completions = 32 prompts x num_generations=4, generated in one round per
  step, trained in micro-batches of 32 like train_micro_batch_size.
- num_generations=4, max_completion_length=32, temperature=1.0: the setting.
- learning_rate=1e-3, lr_scheduler_type="constant" (TRL/Trainer default: linear decay to
  0 over max_steps, flowgraph keeps the rate), weight_decay=0.0 and max_grad_norm=1.0
  (the defaults, written out), epsilon=0.2 (default), beta=0.04 (TRL's default is 0.0,
  which would skip the reference model).
- loss_type="grpo": flowgraph's loss averages each answer's tokens, then the answers
  (TRL's default "dapo" divides by all tokens of the step); it changes no timing.
- bf16: ``--bf16`` (TRL's default, autocast to bfloat16 also on a CPU) or ``--no-bf16``.
- use_cpu=True: the setting runs on the CPU, as flowgraph's modules do; and without it
  transformers refuses TRL's default bf16=True on a machine without a GPU ("Your setup
  doesn't support bf16/gpu. You need to assign use_cpu ...").
- max_steps, logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no",
  disable_tqdm, output_dir in a temporary directory, seed=``--seed``.

Left at TRL's defaults on purpose: gradient_checkpointing=True (TRL's default; recomputes
the forward in backward), disable_dropout=False (dropout is 0 in the model config anyway),
scale_rewards="group", num_iterations=1 (so TRL takes the old log-probs from the training
forward itself instead of a separate pass), torch's default thread count.

Timing: ``seconds`` of step k is the wall time from the previous step's ``on_step_end``
(step 1: from ``on_train_begin``) to this step's ``on_step_end``: the whole step as
Trainer runs it, i.e. fetching the prompts, generation, reference and reward, the 4
forward/backward micro-steps, clipping and the optimizer, plus the previous step's
logging. (``on_step_begin`` comes after the prompts are fetched and ``on_step_end`` before
the step's logging, so timing between those would leave a little out; that span is kept
as ``step_seconds``.) The mean reward is TRL's logged ``reward`` of that step.

Output (``--out``): JSON lines, one per optimizer step:
``{"step", "seconds", "step_seconds", "reward", "kl", "completion_length", "loss"}``.
"""

# The offline settings must come before transformers is imported:
# ruff: noqa: E402
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded
os.environ["HF_DATASETS_OFFLINE"] = "1"  # nothing is downloaded
os.environ["TRANSFORMERS_OFFLINE"] = "1"  # nothing is downloaded
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
import trl
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

DIGITS = "0123456789"
SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2, as flowgraph's CharTokenizer
VOCAB_SIZE = 1024
RESPONSE_LENGTH = 32
FILLER_START = 0x4E00  # ids past the digits: CJK characters, one character per token


def digit_prompts(count: int, seed: int, digits: int = 4) -> list[str]:
    """``count`` prompts of ``digits`` random digits, the same for the same ``seed``
    (src/flowgraph/rl/tasks.py)."""
    rng = random.Random(seed)
    return ["".join(rng.choice(DIGITS) for _ in range(digits)) for _ in range(count)]


def digit_fraction(prompt: str, answer: str, length: int = 0) -> float:
    """Fraction of the answer's characters (or of ``length`` when given) that are digits
    (src/flowgraph/rl/tasks.py)."""
    length = length or max(1, len(answer))
    return sum(ch in DIGITS for ch in answer[:length]) / length


def digit_reward(prompts, completions, **_) -> list[float]:
    """TRL reward function: ``digit_fraction`` of each completion's text, over
    runtime.response_length characters as flowgraph's RewardInference scores it."""
    return [
        digit_fraction(p, c, RESPONSE_LENGTH) for p, c in zip(prompts, completions, strict=True)
    ]


digit_reward.__name__ = "digit_fraction"  # TRL logs rewards/<name>/mean


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: flowgraph's specials and digits first, then non-digit
    filler characters up to ``VOCAB_SIZE`` ids, so every id the model samples decodes."""
    alphabet = DIGITS + "".join(
        chr(FILLER_START + i) for i in range(VOCAB_SIZE - len(SPECIALS) - len(DIGITS))
    )
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({ch: i + len(SPECIALS) for i, ch in enumerate(alphabet)})
    core = Tokenizer(models.WordLevel(vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join without spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    tok.padding_side = "left"
    assert len(tok) == VOCAB_SIZE, len(tok)
    assert tok.encode("42") == [7, 5] and tok.decode([7, 5]) == "42"
    return tok


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_layer=4,
        n_head=4,
        n_embd=256,
        n_positions=40,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


class StepTimer(TrainerCallback):
    """One record per optimizer step: wall seconds since the previous step's end (step 1:
    since the start of training) and the step's logged metrics."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.records: list[dict] = []
        self.last = self.begin = 0.0
        self.pending: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self._flush()
        self.pending = {
            "step": state.global_step,
            "seconds": now - self.last,
            "step_seconds": now - self.begin,
        }
        self.last = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending is None or not logs or "reward" not in logs:
            return
        for key, name in (
            ("reward", "reward"),
            ("kl", "kl"),
            ("loss", "loss"),
            ("completions/mean_length", "completion_length"),
        ):
            if key in logs:
                self.pending[name] = float(logs[key])
        self._flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()

    def _flush(self) -> None:
        if self.pending is None:
            return
        self.records.append(self.pending)
        with open(self.path, "a") as f:
            f.write(json.dumps(self.pending) + "\n")
        print(f"[trl_grpo] {json.dumps(self.pending)}", flush=True)
        self.pending = None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps (default 12)")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast, TRL's default (--no-bf16: fp32)",
    )
    parser.add_argument("--out", default="trl_grpo.jsonl", help="JSON lines, one per step")
    parser.add_argument(
        "--prompt-digits",
        type=int,
        default=4,
        help="digits per prompt (examples/grpo.py: digit_prompts' default 4)",
    )
    parser.add_argument("--seed", type=int, default=1, help="Trainer seed (runtime.seed)")
    parser.add_argument("--init-seed", type=int, default=0, help="seed of the initial weights")
    args = parser.parse_args(argv)

    print(
        f"[trl_grpo] trl {trl.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, bf16={args.bf16}",
        flush=True,
    )
    open(args.out, "w").close()
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({"prompt": digit_prompts(8192, 0, args.prompt_digits)})
    with tempfile.TemporaryDirectory(prefix="trl_grpo_") as tmp:
        # TRL builds the reference model from the policy's config._name_or_path, so the
        # policy goes through a local directory: policy and reference load the same weights.
        model_dir = os.path.join(tmp, "model")
        build_model(tokenizer, args.init_seed).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        config = GRPOConfig(
            output_dir=os.path.join(tmp, "out"),
            max_steps=args.steps,
            per_device_train_batch_size=32,
            gradient_accumulation_steps=4,
            num_generations=4,
            max_completion_length=RESPONSE_LENGTH,
            temperature=1.0,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            epsilon=0.2,
            beta=0.04,
            loss_type="grpo",
            bf16=args.bf16,
            use_cpu=True,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            seed=args.seed,
        )
        timer = StepTimer(args.out)
        trainer = GRPOTrainer(
            model=model_dir,
            reward_funcs=digit_reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
    if len(timer.records) != args.steps:
        print(
            f"[trl_grpo] expected {args.steps} steps, recorded {len(timer.records)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
