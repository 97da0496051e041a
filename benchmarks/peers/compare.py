"""flowgraph against Hugging Face TRL's GRPOTrainer on the standard GRPO setting
(examples/grpo_bench.yaml; the TRL side is benchmarks/peers/trl_grpo.py, run in its own
virtual environment benchmarks/peers/.venv, which ``make bench-peers`` creates).

    .venv/bin/python benchmarks/peers/compare.py [--rounds 3] [--steps 12]
    .venv/bin/python benchmarks/peers/compare.py --variant 'NAME=key=value key=value'
    .venv/bin/python benchmarks/peers/compare.py --sides trl-fp32 flowgraph   # a subset

Every run is a fresh process, and the sides alternate: each round runs TRL fp32
(``--no-bf16``), TRL with its default bf16, then every flowgraph variant of ``VARIANTS``
(``examples/grpo.py --config examples/grpo_bench.yaml`` plus the variant's overrides), in
the reverse order on odd rounds. A run's figure is the median of the wall seconds of
steps 2..STEPS (step 1 holds the one-time warm-up of both); the table gives the median
over rounds, steps/s relative to TRL fp32 and TRL bf16 (above 1: faster than it), and the
mean over rounds of the mean reward of the last step. The table is printed as text, then
as markdown for benchmarks/RESULTS.md. Time it on an otherwise idle machine: each line of
progress shows the load average before the run (another torch process on the same cores
slows both sides several times over, unevenly).

TRL's default bf16 is autocast to bfloat16 on the CPU too; on a CPU without native bf16
matrix instructions (AVX512-BF16/AMX) its matmuls are emulated and tens of times slower
than fp32, so the bf16 runs take most of the time (``--sides`` leaves them out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PEERS = ROOT / "benchmarks" / "peers"
PEER_PYTHON = PEERS / ".venv" / "bin" / "python"
FLOWGRAPH_PYTHON = ROOT / ".venv" / "bin" / "python"
TRL_SIDES = {"trl-fp32": ["--no-bf16"], "trl-bf16": ["--bf16"]}
TRL_LABELS = {"trl-fp32": "TRL GRPOTrainer fp32", "trl-bf16": "TRL GRPOTrainer bf16 (default)"}

# flowgraph variants: label -> key=value overrides after examples/grpo_bench.yaml (a list
# that starts with "--torchrun" runs under torchrun with 2 ranks; then "--config", FILE
# runs FILE instead). Add one per setting to compare
# (precision, threads, layouts ...). "flowgraph" is the yaml as it is (the built-in
# TinyGPT); "flowgraph-hf" the same setting with the GPT2LMHeadModel that TRL trains (the
# same config and seed, so the same initial weights).
VARIANTS: dict[str, list[str]] = {
    "flowgraph": [],
    "flowgraph-hf": ["--config", "examples/grpo_bench_hf.yaml"],
    # two ranks of one thread each (the fastest layout on 2 cores); 16 prompts per
    # generation call so that both ranks generate
    "flowgraph-torchrun": ["--torchrun", "runtime.generation_batch_size=16"],
}
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


def prompt_digits() -> int:
    """Digits per prompt of the dataset examples/grpo.py trains on (its first prompt)."""
    path = ROOT / "examples" / "grpo.py"
    spec = importlib.util.spec_from_file_location("example_grpo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first = module.engine.samples[0]
    text = first["prompt"] if isinstance(first, dict) else first
    if not (isinstance(text, str) and text.isdigit()):
        raise ValueError(f"examples/grpo.py's first prompt {first!r} is not a digit string")
    return len(text)


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repository root with its output in ``log``; its wall seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        result = subprocess.run(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE}
        )
    if result.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode}); its output ends:\n{tail}"
        )
    return time.perf_counter() - start


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trl_run(side: str, steps: int, digits: int, tmp: Path) -> dict:
    out = tmp / f"{side}.jsonl"
    cmd = [
        str(PEER_PYTHON),
        str(PEERS / "trl_grpo.py"),
        "--steps",
        str(steps),
        "--out",
        str(out),
        "--prompt-digits",
        str(digits),
        *TRL_SIDES[side],
    ]
    wall = run(cmd, tmp / f"{side}.log")
    records = read_jsonl(out)
    return {
        "seconds": [r["seconds"] for r in records],
        "reward": [r["reward"] for r in records],
        "wall": wall,
    }


def flowgraph_run(label: str, overrides: list[str], steps: int, tmp: Path) -> dict:
    log_dir = tmp / f"{label}-logs"
    python = str(FLOWGRAPH_PYTHON if FLOWGRAPH_PYTHON.exists() else sys.executable)
    config = "examples/grpo_bench.yaml"
    launcher = []
    if overrides[:1] == ["--torchrun"]:
        launcher, overrides = TORCHRUN, overrides[1:]
    if overrides[:1] == ["--config"]:
        config, overrides = overrides[1], overrides[2:]
    cmd = [
        python,
        *launcher,
        "examples/grpo.py",
        "--config",
        config,
        f"runtime.num_episode={steps}",
        "runtime.eval_episode_interval=0",
        "runtime.log_episodes=false",
        "runtime.progress=false",
        f"runtime.log_dir={log_dir}",
        *overrides,
    ]
    wall = run(cmd, tmp / f"{label}.log")
    records = [r for r in read_jsonl(log_dir / "metrics.jsonl") if r.get("episode", 0) > 0]

    def reward(r: dict) -> float:
        metrics = r["metrics"]
        if "grpo_policy/reward" in metrics:
            return metrics["grpo_policy/reward"]
        return next(v for k, v in metrics.items() if k.endswith("/reward"))

    return {
        "seconds": [r["seconds"] for r in records],
        "reward": [reward(r) for r in records],
        "wall": wall,
    }


def peer_versions() -> str:
    code = (
        "import trl, transformers, accelerate, torch; print(f'trl {trl.__version__}, "
        "transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
        "torch {torch.__version__}')"
    )
    result = subprocess.run(
        [str(PEER_PYTHON), "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
    )
    return result.stdout.strip() or "unknown"


def ratio(reference: float | None, seconds: float) -> str:
    return f"{reference / seconds:.2f}x" if reference else "-"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all sides (default 3)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps a run (default 12)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="one more flowgraph side: NAME='key=value key=value' (repeatable)",
    )
    parser.add_argument(
        "--sides",
        nargs="+",
        default=None,
        help="run only these sides (trl-fp32, trl-bf16, variant labels)",
    )
    parser.add_argument(
        "--prompt-digits",
        type=int,
        default=None,
        help="digits per prompt for TRL (default: examples/grpo.py's dataset)",
    )
    parser.add_argument("--json", default=None, help="also write every run's figures here")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is the warm-up and left out)")

    variants = dict(VARIANTS)
    for spec in args.variant:
        name, sep, overrides = spec.partition("=")
        if not sep or not name:
            parser.error(f"--variant {spec!r}: expected NAME=key=value ...")
        variants[name] = overrides.split()
    sides = [*TRL_SIDES, *variants]
    if args.sides:
        unknown = [s for s in args.sides if s not in sides]
        if unknown:
            parser.error(f"unknown sides {unknown}; known: {', '.join(sides)}")
        sides = [s for s in sides if s in args.sides]
    if any(s in TRL_SIDES for s in sides) and not PEER_PYTHON.exists():
        sys.exit(f"{PEER_PYTHON} is missing: run `make bench-peers` (it creates the peer venv)")

    digits = args.prompt_digits or prompt_digits()
    versions = peer_versions() if any(s in TRL_SIDES for s in sides) else "-"
    print(
        f"GRPO peer comparison: {args.rounds} rounds x {args.steps} steps, prompts of "
        f"{digits} digits; TRL side: {versions}",
        flush=True,
    )

    runs: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp_name:
        tmp = Path(tmp_name)
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for side in order:
                load = os.getloadavg()[0]  # another busy process skews every figure
                where = tmp / f"round{r}"
                where.mkdir(exist_ok=True)
                if side in TRL_SIDES:
                    result = trl_run(side, args.steps, digits, where)
                else:
                    result = flowgraph_run(side, variants[side], args.steps, where)
                if len(result["seconds"]) != args.steps:
                    raise RuntimeError(
                        f"{side}: {len(result['seconds'])} steps recorded, expected {args.steps}"
                    )
                result["median"] = statistics.median(result["seconds"][1:])
                runs[side].append(result)
                print(
                    f"round {r + 1}/{args.rounds} {side:<12} {result['median']:.3f} s/step "
                    f"(steps 2-{args.steps}), final reward {result['reward'][-1]:.4f}, "
                    f"run {result['wall']:.0f} s, load average before it {load:.1f}",
                    flush=True,
                )

    summary = {}
    for side in sides:
        medians = [x["median"] for x in runs[side]]
        summary[side] = {
            "label": TRL_LABELS.get(side, f"{side} ({' '.join(variants.get(side, [])) or 'yaml'})"),
            "seconds": statistics.median(medians),
            "rounds": medians,
            "reward": statistics.mean(x["reward"][-1] for x in runs[side]),
        }
    fp32 = summary.get("trl-fp32", {}).get("seconds")
    bf16 = summary.get("trl-bf16", {}).get("seconds")
    header = [
        "side",
        "s/step",
        "rounds (s/step)",
        "steps/s vs TRL fp32",
        "steps/s vs TRL bf16",
        f"reward at step {args.steps}",
    ]
    rows = [
        [
            s["label"],
            f"{s['seconds']:.3f}",
            " ".join(f"{x:.3f}" for x in s["rounds"]),
            ratio(fp32, s["seconds"]),
            ratio(bf16, s["seconds"]),
            f"{s['reward']:.4f}",
        ]
        for s in summary.values()
    ]

    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print()
    print(
        f"GRPO setting (examples/grpo_bench.yaml), {args.steps} steps, median s/step of steps "
        f"2-{args.steps}, median of {args.rounds} rounds"
        + (f"; {versions}:" if versions != "-" else ":")
    )
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "steps": args.steps,
                    "rounds": args.rounds,
                    "prompt_digits": digits,
                    "versions": versions,
                    "runs": runs,
                    "summary": summary,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
