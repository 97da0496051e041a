"""Asynchronous rollout (``runtime.max_staleness``): what it gains, measured and estimated.

    python benchmarks/bench_async.py                  # both parts (about 12 minutes)
    python benchmarks/bench_async.py --estimates      # the compiler's estimates only
    python benchmarks/bench_async.py --rounds 3 --steps 10

Measured (torchrun, 2 ranks of one thread each, the GRPO bench setting
``examples/grpo_bench.yaml`` with all 128 answers in one generation call):

- ``split k=0`` / ``split k=1``: policy, reference and reward on rank 0, the trainer on
  rank 1, on-policy against max_staleness 1 (target: k=1 at least 1.4x steps/s);
- ``colocated k=0``: every model on both ranks, data-parallel (the best synchronous
  layout on 2 cores, what ``benchmarks/peers`` runs as flowgraph-torchrun);
- ``auto k=1``: max_staleness 1 with the layout automatic placement picks (named);

fresh processes, variants alternating (reversed on odd rounds); a run's figure is the
median wall time of episodes 2..STEPS (episode 1 holds the warm-up, and with k=1 the
first episode's generation too). Then one 40-episode k=1 split run: the first episode
whose mean reward passes 0.9.

Estimated (no run): ``flowc compile``'s plan of the seed's RLHF flow with a 7B policy,
reference and policy trainer and 1B value, reward and value trainer (bf16, ZeRO-2
trainers) on 64 GPUs, k=0 against k=1, with 1,024-token responses and with a long tail
(static batches decode until their longest answer ends: 4,096 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import report  # noqa: E402
from seed_rlhf import build_engine, make_modules  # noqa: E402

from flowgraph import DeepSpeedModule  # noqa: E402
from flowgraph.compiler.cluster import ClusterSpec  # noqa: E402
from flowgraph.compiler.plan import format_seconds  # noqa: E402
from flowgraph.config import load_config  # noqa: E402

ONE_RANK_EACH = [f"models.{m}.num_gpu=1" for m in ("policy", "reference", "reward", "grpo_policy")]
SPLIT = ["runtime.colocation=[[policy,reference,reward],[grpo_policy]]", *ONE_RANK_EACH]
COLOCATED = ["runtime.colocation=[[policy,reference,reward,grpo_policy]]",
             "runtime.generation_batch_size=16"]  # fmt: skip
VARIANTS = {
    "split k=0": [*SPLIT, "runtime.max_staleness=0"],
    "split k=1": [*SPLIT, "runtime.max_staleness=1"],
    "colocated k=0": [*COLOCATED, "runtime.max_staleness=0"],
    "auto k=1": ["runtime.max_staleness=1"],
}
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable


def run_grpo(overrides: list[str], episodes: int, log_dir: Path) -> list[dict]:
    """One torchrun run of examples/grpo.py on the bench setting; its episode records."""
    cmd = [PYTHON, *TORCHRUN, "examples/grpo.py", "--config", "examples/grpo_bench.yaml",
           f"runtime.num_episode={episodes}", "runtime.eval_episode_interval=0",
           "runtime.log_episodes=false", "runtime.progress=false", f"runtime.log_dir={log_dir}",
           *overrides]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    with open(log_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def auto_layout(overrides: list[str]) -> str:
    """The layout automatic placement picks for the bench setting on 2 CPU ranks."""
    from flowgraph.loader import load_engine

    engine = load_engine(str(ROOT / "examples" / "grpo.py"))
    config = load_config(str(ROOT / "examples" / "grpo_bench.yaml"), overrides)
    plan = engine.compile(ClusterSpec.cpu(2), config)
    chosen = [n for n in plan.notes if n.strip().startswith("chosen:")]
    return chosen[0].split(":", 1)[1].strip() if chosen else "explicit"


def measured(rounds: int, steps: int) -> list[dict]:
    print(f"auto k=1 places: {auto_layout(VARIANTS['auto k=1'])}")
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            names = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in names:
                load = os.getloadavg()[0]
                records = run_grpo(VARIANTS[name], steps, Path(tmp) / f"{r}-{name}")
                median = statistics.median(rec["seconds"] for rec in records[1:])
                seconds[name].append(median)
                print(f"round {r + 1} {name}: {median:.3f} s/episode (load {load:.2f})")
    rows = []
    fastest_sync = statistics.median(seconds["colocated k=0"])
    split_sync = statistics.median(seconds["split k=0"])
    for name, values in seconds.items():
        median = statistics.median(values)
        rows.append({"variant": name, "s_per_episode": median, "vs_split_k0": split_sync / median,
                     "vs_colocated_k0": fastest_sync / median})  # fmt: skip
    print(f"{'variant':<15} {'s/episode':>10} {'vs split k=0':>13} {'vs colocated k=0':>17}")
    for row in rows:
        print(f"{row['variant']:<15} {row['s_per_episode']:>10.3f} {row['vs_split_k0']:>12.2f}x "
              f"{row['vs_colocated_k0']:>16.2f}x")  # fmt: skip
    return rows


def reward_passes(episodes: int = 40, threshold: float = 0.9) -> int | None:
    with tempfile.TemporaryDirectory() as tmp:
        records = run_grpo(VARIANTS["split k=1"], episodes, Path(tmp))
    rewards = [r["metrics"]["grpo_policy/reward"] for r in records if r["episode"] > 0]
    first = next((i + 1 for i, value in enumerate(rewards) if value > threshold), None)
    print(f"split k=1: reward {rewards[0]:.3f} at episode 1, {rewards[-1]:.3f} at {episodes}; "
          f"first above {threshold}: episode {first}")  # fmt: skip
    return first


class _Trainer(DeepSpeedModule):
    """A trainer of the seed's flow for the compiler only (ZeRO needs a DeepSpeedModule)."""

    def train_step(self, micro_batches):
        return None


def estimates() -> list[dict]:
    modules = make_modules()
    modules["ppo_policy"], modules["ppo_value"] = _Trainer("ppo_policy"), _Trainer("ppo_value")
    engine = build_engine(modules)
    sizes = {"policy": "7B", "reference": "7B", "value": "1B", "reward": "1B",
             "ppo_policy": "7B", "ppo_value": "1B"}  # fmt: skip
    rows = []
    for label, response, micro, generation in (("1,024 tokens", 1024, 4, 16),
                                               ("long tail to 4,096", 4096, 1, 8)):  # fmt: skip
        for k in (0, 1):
            models = {name: {"params": p, "precision": "bf16"} for name, p in sizes.items()}
            for trainer in ("ppo_policy", "ppo_value"):
                models[trainer].update(backend="deepspeed", zero_stage=2)
            config = load_config({"runtime": {
                "sample_per_episode": 1024, "generation_batch_size": generation,
                "train_micro_batch_size": micro, "train_global_batch_size": 256,
                "prompt_length": 512, "response_length": response, "max_staleness": k,
            }, "models": models})  # fmt: skip
            plan = engine.compile(ClusterSpec(nodes=8, devices_per_node=8), config)
            chosen = next((n.split(":", 1)[1].strip() for n in plan.notes
                           if n.strip().startswith("chosen:")), "explicit")  # fmt: skip
            e = plan.estimates
            rows.append({"responses": label, "k": k, "layout": chosen, "episode_s": e.episode_s,
                         "env_s": e.phase_s.get("env", 0.0),
                         "train_s": e.phase_s.get("train", 0.0)})  # fmt: skip
    print(f"{'responses':<20} {'k':>2} {'layout':<28} {'episode':>9} {'env':>9} {'train':>9}")
    for row in rows:
        print(f"{row['responses']:<20} {row['k']:>2} {row['layout']:<28} "
              f"{format_seconds(row['episode_s']):>9} {format_seconds(row['env_s']):>9} "
              f"{format_seconds(row['train_s']):>9}")  # fmt: skip
    return rows


def main(rounds: int = 3, steps: int = 10, measure: bool = True) -> list[dict]:
    """Both parts; the result lines ``make bench`` collects."""
    start = time.perf_counter()
    results = []
    for row in estimates():
        name = f"async estimate 7B/64 GPUs {row['responses']} k={row['k']}"
        results.append(report(name, row["episode_s"], "s"))
    if measure:
        rows = {row["variant"]: row for row in measured(rounds, steps)}
        results += [
            report("async split k=1 vs split k=0", rows["split k=1"]["vs_split_k0"], "x",
                   "target >= 1.4"),
            report("async auto k=1 vs colocated k=0", rows["auto k=1"]["vs_colocated_k0"], "x",
                   "target >= 1.0"),
        ]  # fmt: skip
        first = reward_passes()
        results.append(report("async k=1 first episode with reward > 0.9", first or -1, "episode",
                              "target <= 40"))  # fmt: skip
    print(f"({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--estimates", action="store_true", help="the estimates only")
    args = parser.parse_args()
    main(args.rounds, args.steps, measure=not args.estimates)
