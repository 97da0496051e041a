"""End-to-end PPO on the demo task: flowgraph against a plain PyTorch script, and the
speed-up of 2 ranks under torchrun.

python benchmarks/bench_rl.py

- flowgraph: examples/ppo.py with examples/ppo.yaml; plain: benchmarks/plain_ppo.py,
  the same models, math and batch sizes in one loop. Both run EPISODES episodes without
  evaluation, alternating over ROUNDS rounds; samples/s from the wall time of each run.
- torchrun: the median episode time of `torchrun --nproc-per-node 2 examples/ppo.py`
  (rank 0's record: the slower rank per stage) against one process.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import plain_ppo
from common import load_example, report

ROOT = Path(__file__).parent.parent
EPISODES, ROUNDS = 15, 3
SETTINGS = [
    "runtime.log_episodes=false",
    "runtime.progress=false",
    "runtime.eval_episode_interval=0",
    "runtime.enable_eval_before_training=false",
]


def flowgraph_seconds(ppo) -> float:
    """Wall time of a run that, like the plain script, writes no metrics file or plot."""
    start = time.perf_counter()
    ppo.main([*SETTINGS, f"runtime.num_episode={EPISODES}", "runtime.log_dir="])
    return time.perf_counter() - start


def plain_seconds() -> float:
    start = time.perf_counter()
    plain_ppo.run(EPISODES)
    return time.perf_counter() - start


def median_episode(metrics: Path) -> float:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return statistics.median(r["seconds"] for r in records if r["episode"] > 0)


def main() -> list[dict]:
    import logging

    logging.getLogger("flowgraph").setLevel(logging.ERROR)  # the evaluator is off on purpose
    ppo = load_example("ppo")
    samples = EPISODES * plain_ppo.CONFIG["runtime"]["sample_per_episode"]
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(ROUNDS):
            ours.append(flowgraph_seconds(ppo))
            plain.append(plain_seconds())
        ppo.main([*SETTINGS, f"runtime.num_episode={EPISODES}", f"runtime.log_dir={tmp}"])
        one_process = median_episode(Path(tmp) / "metrics.jsonl")
        command = ["torchrun", "--standalone", "--nproc-per-node", "2",
                   str(ROOT / "examples" / "ppo.py"), *SETTINGS,
                   f"runtime.num_episode={EPISODES}", f"runtime.log_dir={tmp}/two"]  # fmt: skip
        torchrun = Path(sys.executable).parent / "torchrun"
        subprocess.run([str(torchrun), *command[1:]], check=True, capture_output=True)
        two_ranks = median_episode(Path(tmp) / "two" / "metrics.jsonl")
    rate, base = samples / statistics.median(ours), samples / statistics.median(plain)
    return [
        report("PPO demo: flowgraph samples/s (1 process)", rate, "sample/s"),
        report("PPO demo: plain PyTorch script samples/s", base, "sample/s"),
        report("PPO demo: flowgraph / plain", rate / base, "x", "target >= 0.95"),
        report("PPO demo: median episode, 1 process", one_process, "s"),
        report("PPO demo: median episode, torchrun 2 ranks", two_ranks, "s"),
        report("PPO demo: speed-up of 2 ranks", one_process / two_ranks, "x"),
    ]


if __name__ == "__main__":
    main()
