"""Runtime overhead under torchrun: flowgraph against a hand-written torch.distributed
script doing the same work on the same placement, 2 ranks (target <= 1.05x per episode).

    python benchmarks/bench_runtime.py

Per-episode time is (T(12 episodes) - T(2 episodes)) / 10, which removes set-up and
compilation. The two sides are launched alternately, 5 rounds, and the median of the
per-round ratios is reported (alternating keeps slow phases of a noisy machine from
landing on one side only).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LONG, SHORT, ROUNDS = 12, 2, 5


def launch(kind: str, episodes: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", "2", os.path.join(HERE, "spmd_workload.py"), kind,
                   str(episodes), out]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, timeout=600)
        with open(out) as f:
            return json.load(f)["seconds"]


def per_episode(kind: str) -> float:
    return (launch(kind, LONG) - launch(kind, SHORT)) / (LONG - SHORT)


def main() -> list[dict]:
    rounds = [(per_episode("flowgraph"), per_episode("baseline")) for _ in range(ROUNDS)]
    ours = statistics.median(r[0] for r in rounds)
    baseline = statistics.median(r[1] for r in rounds)
    ratio = statistics.median(r[0] / r[1] for r in rounds)
    return [
        report("episode under torchrun, 2 ranks: flowgraph", ours * 1e3, "ms"),
        report("episode under torchrun, 2 ranks: hand-written", baseline * 1e3, "ms"),
        report("ratio flowgraph / hand-written (median of rounds)", ratio, "x", "<= 1.05x"),
    ]


if __name__ == "__main__":
    main()
