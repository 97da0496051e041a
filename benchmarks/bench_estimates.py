"""The compiler's estimates against measured episodes on this machine (issue 18).

For each case the setting is profiled once (``flowc profile``), then measured in separate
runs, alternating the cases round by round; the estimate is ``flowc compile --profile``'s
(and, for contrast, the analytical model's without a profile):

- ``grpo 1 process``: examples/grpo.py with examples/grpo_bench.yaml, one process;
- ``grpo 2 ranks colocated``: torchrun 2 ranks, every model on both (generation batch 16);
- ``grpo 2 ranks split``: policy, reference and reward on rank 0, the trainer on rank 1,
  estimated with the colocated 2-rank profile (the layout it was not measured in);
- ``ppo 1 process``: examples/ppo.py with its examples/ppo.yaml.

Measured = the median over rounds of each run's median episode time (episodes 2..E).

python benchmarks/bench_estimates.py [--rounds 3] [--episodes 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report

ROOT = Path(__file__).parent.parent
GRPO, PPO = str(ROOT / "examples" / "grpo.py"), str(ROOT / "examples" / "ppo.py")
BENCH = str(ROOT / "examples" / "grpo_bench.yaml")
TWO_RANKS = ["runtime.generation_batch_size=16"]  # 2 micro-batches: one per rank
ONE_RANK_EACH = [f"models.{m}.num_gpu=1" for m in ("policy", "reference", "reward", "grpo_policy")]
SPLIT = ["runtime.colocation=[[policy,reference,reward],[grpo_policy]]", *ONE_RANK_EACH]
COLOCATED = [
    "runtime.colocation=[[policy,reference,reward,grpo_policy]]",
    *(f"models.{m}.num_gpu=2" for m in ("policy", "reference", "reward", "grpo_policy")),
]
QUIET = [
    "runtime.eval_episode_interval=0",
    "runtime.enable_eval_before_training=false",
    "runtime.progress=false",
    "runtime.log_episodes=false",
    "runtime.tensorboard=false",
]

# name: (script, config or None, world size, overrides, profile key)
CASES = {
    "grpo 1 process": (GRPO, BENCH, 1, [], "grpo-1"),
    "grpo 2 ranks colocated": (GRPO, BENCH, 2, [*TWO_RANKS, *COLOCATED], "grpo-2"),
    "grpo 2 ranks split": (GRPO, BENCH, 2, [*TWO_RANKS, *SPLIT], "grpo-2"),
    "ppo 1 process": (PPO, None, 1, [], "ppo-1"),
}
PROFILES = {  # key: (script, config, nproc, overrides)
    "grpo-1": (GRPO, BENCH, 1, []),
    "grpo-2": (GRPO, BENCH, 2, TWO_RANKS),
    "ppo-1": (PPO, None, 1, []),
}


def _config(config: str | None) -> list[str]:
    return ["--config", config] if config else []


def flowc(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flowgraph.cli", *args], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"flowc {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def estimate(script, config, world, overrides, profile: Path | None) -> float:
    args = [
        "compile",
        script,
        "--cpu",
        "--world-size",
        str(world),
        *_config(config),
        *overrides,
        "--json",
    ]
    if profile is not None:
        args += ["--profile", str(profile)]
    return json.loads(flowc(*args))["estimates"]["episode_s"]


def measure(script, config, world, overrides, episodes: int, log_dir: Path) -> float:
    args = [
        script,
        *_config(config),
        *overrides,
        *QUIET,
        f"runtime.num_episode={episodes}",
        f"runtime.log_dir={log_dir}",
        "runtime.checkpoint_dir=null",
        "runtime.save_episode_interval=0",
    ]
    if world == 1:
        command = [sys.executable, *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world}",
            *args,
        ]
    subprocess.run(command, check=True, capture_output=True, timeout=900)
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return statistics.median(
        json.loads(x)["seconds"] for x in lines if json.loads(x)["episode"] > 1
    )


def main(rounds: int = 3, episodes: int = 6) -> list[dict]:
    start = time.perf_counter()
    results, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        profiles = {}
        for key, (script, config, nproc, overrides) in PROFILES.items():
            profiles[key] = Path(tmp) / f"{key}.json"
            flowc(
                "profile",
                script,
                *_config(config),
                "--nproc-per-node",
                str(nproc),
                "--episodes",
                str(episodes),
                "--out",
                str(profiles[key]),
                *overrides,
            )
        measured: dict[str, list[float]] = {name: [] for name in CASES}
        for r in range(rounds):
            order = list(CASES) if r % 2 == 0 else list(reversed(CASES))
            for name in order:
                script, config, world, overrides, _ = CASES[name]
                log_dir = Path(tmp) / f"{name.replace(' ', '_')}_{r}"
                measured[name].append(measure(script, config, world, overrides, episodes, log_dir))
        for name, (script, config, world, overrides, key) in CASES.items():
            est = estimate(script, config, world, overrides, profiles[key])
            analytical = estimate(script, config, world, overrides, None)
            real = statistics.median(measured[name])
            rows.append((name, est, real, analytical))
            results.append(report(f"estimate/measured {name}", est / real, "x", "target 0.75-1.25"))
    print(f"\n{'case':<24} {'estimate':>9} {'measured':>9} {'ratio':>6} {'no profile':>11}")
    for name, est, real, analytical in rows:
        print(f"{name:<24} {est:>8.3f}s {real:>8.3f}s {est / real:>6.2f} {analytical:>10.3f}s")
    print(f"({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=6)
    args = parser.parse_args()
    main(args.rounds, args.episodes)
