"""GATHER of an episode's output: the tensor path (``all_gather_batches``: sizes, then one
raw-bytes buffer per rank) against pickled ``all_gather_object``, the path before the
runtime redesign, between two gloo processes (target: the tensor path >= 1.5x faster
for a 16 MB episode).

    python benchmarks/bench_gather.py

Each rank holds half of an episode's micro-batches (token ids, log-probs, masks, a list
of strings), as after the env phase; both sides end with every micro-batch on both
ranks. Sides alternate within each round; medians over the rounds.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_transfer import make_batch  # noqa: E402
from common import finish_worker, report, spawn_two  # noqa: E402

from flowgraph.runtime.transport import all_gather_batches, all_gather_objects  # noqa: E402

EPISODE_MB = (16, 64)  # 16 micro-batches of 1 MB or 4 MB
MICRO_BATCHES = 16
ROUNDS = 15


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    group = dist.new_group([0, 1])
    results = {}
    for megabytes in EPISODE_MB:
        mine = {k: make_batch(max(1, megabytes // MICRO_BATCHES))
                for k in range(rank, MICRO_BATCHES, 2)}  # fmt: skip
        sides = {
            "pickled": lambda mine=mine: _merge(all_gather_objects(mine, group)),
            "tensor": lambda mine=mine: all_gather_batches(mine, group),
        }
        times: dict[str, list[float]] = {name: [] for name in sides}
        for round_ in range(ROUNDS + 1):
            order = list(sides) if round_ % 2 else list(reversed(sides))
            for name in order:
                dist.barrier()
                start = time.perf_counter()
                gathered = sides[name]()
                times[name].append(time.perf_counter() - start)
                assert sorted(gathered) == list(range(MICRO_BATCHES))
        results[megabytes] = {name: statistics.median(t[1:]) for name, t in times.items()}
    finish_worker(rank, out, results)


def _merge(parts: list[dict]) -> dict:
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def main() -> list[dict]:
    results = spawn_two(_worker)
    rows = []
    for megabytes, r in results.items():
        rows.append(report(f"gather {megabytes} MB episode: pickled", r["pickled"] * 1e3, "ms"))
        rows.append(report(f"gather {megabytes} MB episode: tensor path", r["tensor"] * 1e3, "ms"))
        rows.append(report(f"gather {megabytes} MB episode: speed-up", r["pickled"] / r["tensor"],
                           "x", ">= 1.5x" if str(megabytes) == "16" else ""))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
