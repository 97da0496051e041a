"""End-to-end PPO and GRPO on the demo task: flowgraph against plain PyTorch scripts, and
the speed-up of 2 ranks under torchrun.

python benchmarks/bench_rl.py [ppo|grpo ...]

- flowgraph: examples/ppo.py (ppo.yaml) and examples/grpo.py (grpo.yaml); plain:
  benchmarks/plain_ppo.py and plain_grpo.py, the same models, math and batch sizes in one
  loop. Each side first runs one untimed episode (imports, first-call allocations), then
  both run EPISODES episodes without evaluation, alternating over ROUNDS rounds with the
  side that goes first swapped every round; samples/s from the median wall time. The
  wall time covers everything `main()` does: config, tracing, model setup, the episodes.
- torchrun: the median episode time of `torchrun --nproc-per-node 2 examples/X.py`
  (rank 0's record: the slower rank per stage) against one process.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import plain_grpo
import plain_ppo
from common import load_example, report

ROOT = Path(__file__).parent.parent
EPISODES, ROUNDS = 15, 5
SETTINGS = [
    "runtime.log_episodes=false",
    "runtime.progress=false",
    "runtime.eval_episode_interval=0",
    "runtime.enable_eval_before_training=false",
]
PLAIN = {"ppo": plain_ppo, "grpo": plain_grpo}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_episode(metrics: Path) -> float:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return statistics.median(r["seconds"] for r in records if r["episode"] > 0)


def compare(name: str) -> list[dict]:
    plain = PLAIN[name]
    # An Engine learns once: every run of ours gets a freshly loaded example, loaded before
    # the timing starts.
    loaded = [load_example(name) for _ in range(ROUNDS + 2)]
    # Like the plain script, no metrics file or plot ("runtime.log_dir=").
    ours = lambda n: loaded.pop().main([*SETTINGS, f"runtime.num_episode={n}", "runtime.log_dir="])  # noqa: E731
    ours(1), plain.run(1)
    flowgraph_times, plain_times = [], []
    for round_ in range(ROUNDS):
        sides = [
            (flowgraph_times, lambda: ours(EPISODES)),
            (plain_times, lambda: plain.run(EPISODES)),
        ]
        for times, fn in sides if round_ % 2 == 0 else sides[::-1]:
            times.append(timed(fn))
    with tempfile.TemporaryDirectory() as tmp:
        loaded.pop().main([*SETTINGS, f"runtime.num_episode={EPISODES}", f"runtime.log_dir={tmp}"])
        one_process = median_episode(Path(tmp) / "metrics.jsonl")
        torchrun = Path(sys.executable).parent / "torchrun"
        command = [str(torchrun), "--standalone", "--nproc-per-node", "2",
                   str(ROOT / "examples" / f"{name}.py"), *SETTINGS,
                   f"runtime.num_episode={EPISODES}", f"runtime.log_dir={tmp}/two"]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        two_ranks = median_episode(Path(tmp) / "two" / "metrics.jsonl")
    samples = EPISODES * plain.CONFIG["runtime"]["sample_per_episode"]
    rate = samples / statistics.median(flowgraph_times)
    base = samples / statistics.median(plain_times)
    title = name.upper()
    return [
        report(f"{title} demo: flowgraph samples/s (1 process)", rate, "sample/s"),
        report(f"{title} demo: plain PyTorch script samples/s", base, "sample/s"),
        report(f"{title} demo: flowgraph / plain", rate / base, "x", "target >= 0.95"),
        report(f"{title} demo: median episode, 1 process", one_process, "s"),
        report(f"{title} demo: median episode, torchrun 2 ranks", two_ranks, "s"),
        report(f"{title} demo: speed-up of 2 ranks", one_process / two_ranks, "x"),
    ]


def main(names=("ppo", "grpo")) -> list[dict]:
    logging.getLogger("flowgraph").setLevel(logging.ERROR)  # the evaluator is off on purpose
    return [line for name in names for line in compare(name)]


if __name__ == "__main__":
    main(sys.argv[1:] or ("ppo", "grpo"))
