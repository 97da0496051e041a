"""Cross-mesh batch transfer: flowgraph's Outbox/recv_batch against raw dist.send/recv of
the same tensors, between two gloo processes (target >= 0.9x).

    python benchmarks/bench_transfer.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import finish_worker, report, spawn_two  # noqa: E402

from flowgraph.runtime.transport import Outbox, recv_batch  # noqa: E402

SIZES_MB = (1, 16, 64)
REPEATS = 15


def make_batch(megabytes: int) -> dict:
    """A generation-like batch: token ids, log-probs and masks, plus a list of strings."""
    rows = max(1, megabytes * 2**20 // (1024 * (8 + 4 + 1)))
    return {
        "tokens": torch.randint(0, 50_000, (rows, 1024)),
        "logprobs": torch.randn(rows, 1024),
        "mask": torch.ones(rows, 1024, dtype=torch.bool),
        "text": ["sample"] * rows,
    }


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    for megabytes in SIZES_MB:
        batch = make_batch(megabytes)
        tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        raw_times, flowgraph_times = [], []
        for _ in range(REPEATS + 1):
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                for t in tensors:
                    dist.send(t, 1)
            else:
                for t in tensors:
                    dist.recv(torch.empty_like(t), 0)
            raw_times.append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                outbox = Outbox()
                outbox.send(batch, 1, tag=3)
                outbox.wait()
            else:
                recv_batch(0, tag=3)
            flowgraph_times.append(time.perf_counter() - start)
        results[megabytes] = {
            "bytes": nbytes,
            "raw_s": statistics.median(raw_times[1:]),
            "flowgraph_s": statistics.median(flowgraph_times[1:]),
        }
    finish_worker(rank, out, results)


def main() -> list[dict]:
    results = spawn_two(_worker)
    rows = []
    for megabytes, r in results.items():
        raw = r["bytes"] / r["raw_s"] / 1e9
        ours = r["bytes"] / r["flowgraph_s"] / 1e9
        rows.append(report(f"transfer {megabytes} MB batch: raw send/recv", raw, "GB/s"))
        rows.append(report(f"transfer {megabytes} MB batch: flowgraph", ours, "GB/s"))
        rows.append(report(f"transfer {megabytes} MB batch: ratio", ours / raw, "x", ">= 0.9x"))
    return rows


if __name__ == "__main__":
    main()
