"""The standard GRPO comparison: examples/grpo.py with examples/grpo_bench.yaml (the
built-in TinyGPT) and examples/grpo_bench_hf.yaml (a Hugging Face GPT2LMHeadModel of the
same shape), then a sweep of threads per process and processes per machine.

python benchmarks/bench_grpo.py [EPISODES]   # or --sweep: the layouts only

One optimizer step per episode. Reports seconds per step (median of steps 2-10),
prompts/s, generated tokens/s, the per-stage breakdown, the step and seconds at which
the mean reward first passes 0.9, and the distance to the machine's limit: per stage, the
GFLOP/s achieved against the measured peak of a large ``a @ b`` in the same dtype and
thread count (``matmul_peak``). A stage's FLOPs count the matmuls of the policy shape:
``2 x N`` per token forward and ``6 x N`` per token trained, with ``N`` the weights of the
blocks and the LM head (``matmul_weights``); attention scores and element-wise work are
left out, so the figure is a lower bound of the work done.

The sweep runs 10 steps of the TinyGPT setting as a fresh process per layout: 1 process
with 2 threads, 1 process with 1 thread, torchrun with 2 ranks of 1 thread.
grpo_bench.yaml generates all 32 prompts (128 answers) in one call, as TRL does: a matmul
of 128 rows runs about a third faster per row than one of 64 on these CPUs. The torchrun
layout generates 16 prompts per call instead, so that the episode makes two micro-batches
and both ranks generate (with one, only one rank could).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import load_example, report

from flowgraph.config import current_config
from flowgraph.precision import DTYPES, resolve

ROOT = Path(__file__).parent.parent
QUIET = ["runtime.log_episodes=false", "runtime.progress=false"]


def setting(config: str, episodes: int) -> list[dict]:
    grpo = load_example("grpo")
    label = f"GRPO bench ({config})"
    with tempfile.TemporaryDirectory() as log_dir:
        config_file = str(ROOT / "examples" / f"{config}.yaml")
        settings = [f"runtime.num_episode={episodes}", f"runtime.log_dir={log_dir}"]
        records = grpo.main(["--config", config_file, *QUIET, *settings])
    steps = [r for r in records if r.episode > 0]
    config = current_config()
    group = config.runtime.num_inference_per_prompt
    window = steps[1:10]

    def tokens_per_second(r) -> float:
        answers = r.samples * group * r.metrics["grpo_policy/response_length"]
        return answers / r.stages["env/policy"]

    results = [
        report(f"{label}: seconds per step (median of steps 2-10)",
               statistics.median(r.seconds for r in window), "s"),
        report(f"{label}: prompts/s", statistics.median(r.samples / r.seconds for r in window),
               "prompt/s"),
        report(f"{label}: generated tokens/s (policy stage)",
               statistics.median(tokens_per_second(r) for r in window), "tok/s"),
    ]  # fmt: skip
    for stage in ("env/policy", "env/reference", "env/reward", "train", "sync"):
        share = statistics.median(r.stages.get(stage, 0.0) / r.seconds for r in window)
        results.append(report(f"{label}: share of the step in {stage}", share * 100, "%"))
    results += distance_to_peak(label, window, config)
    elapsed, passed = 0.0, None
    for r in steps:
        elapsed += r.seconds
        if r.metrics["grpo_policy/reward"] > 0.9:
            passed = (r.episode, elapsed)
            break
    if passed:
        results.append(report(f"{label}: steps until mean reward > 0.9", passed[0], "steps"))
        results.append(report(f"{label}: seconds until mean reward > 0.9", passed[1], "s"))
    else:
        final = steps[-1].metrics["grpo_policy/reward"]
        results.append(report(f"{label}: reward after {episodes} steps (not > 0.9)", final, ""))
    return results


def matmul_weights(args: dict) -> int:
    """Weights that every token's forward multiplies: 12 d^2 per block, d x V for the head
    (the shape from the TinyGPT args or an inline ``hf_config``)."""
    args = args.get("hf_config", args)
    d, layers, vocab = int(args["n_embd"]), int(args["n_layer"]), int(args["vocab_size"])
    return 12 * d * d * layers + d * vocab


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a ``size`` x ``size`` matmul in ``dtype`` here (median of ``repeats``)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def distance_to_peak(label: str, window: list, config) -> list[dict]:
    """Per stage: achieved GFLOP/s, and its share of the matmul peak of its dtype."""
    runtime = config.runtime
    rows = runtime.sample_per_episode * runtime.num_inference_per_prompt
    n = matmul_weights(config.model("policy").args)
    tokens = rows * (runtime.prompt_length + runtime.response_length)
    flops = {  # per step; generation counts prompt and generated tokens, one pass each
        "env/policy": 2 * n * tokens,
        "env/reference": 2 * n * tokens,
        "train": 6 * n * tokens * runtime.num_training_epoch,
    }
    model_of = {"env/policy": "policy", "env/reference": "reference", "train": "grpo_policy"}
    peaks: dict[str, float] = {}
    results = []
    for stage, work in flops.items():
        seconds = statistics.median(r.stages.get(stage, 0.0) for r in window)
        if not seconds:
            continue
        precision = resolve(config.model(model_of[stage]).precision, "cpu")
        if precision not in peaks:
            peaks[precision] = matmul_peak(DTYPES[precision])
        achieved = work / seconds / 1e9
        results.append(report(f"{label}: {stage} GFLOP/s ({precision})", achieved, "GFLOP/s"))
        results.append(report(f"{label}: {stage} share of the {precision} matmul peak "
                              f"({peaks[precision]:.0f} GFLOP/s)",
                              100 * achieved / peaks[precision], "%"))  # fmt: skip
    return results


LAYOUTS = {
    "1 process x 2 threads": ([], "2", []),
    "1 process x 1 thread": ([], "1", []),
    "torchrun 2 ranks x 1 thread": (["-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node", "2"], "1",
                                    ["runtime.generation_batch_size=16"]),
}  # fmt: skip


def sweep(steps: int = 10) -> list[dict]:
    """Median seconds per step (steps 2..steps) of each layout, each a fresh process."""
    results = []
    for name, (launcher, threads, overrides) in LAYOUTS.items():
        with tempfile.TemporaryDirectory() as log_dir:
            command = [sys.executable, *launcher, str(ROOT / "examples" / "grpo.py"),
                       "--config", str(ROOT / "examples" / "grpo_bench.yaml"), *QUIET,
                       "runtime.eval_episode_interval=0",
                       f"runtime.num_episode={steps}", *overrides,
                       f"runtime.log_dir={log_dir}"]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            subprocess.run(command, check=True, capture_output=True, env=env)
            lines = (Path(log_dir) / "metrics.jsonl").read_text().splitlines()
            seconds = [json.loads(line)["seconds"] for line in lines]
        results.append(report(f"GRPO bench sweep: s/step, {name}",
                              statistics.median(seconds[1:]), "s"))  # fmt: skip
    return results


def main(episodes: int = 40) -> list[dict]:
    return setting("grpo_bench", episodes) + setting("grpo_bench_hf", episodes) + sweep()


if __name__ == "__main__":
    if sys.argv[1:] == ["--sweep"]:
        sweep()
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
