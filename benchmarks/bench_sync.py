"""Parameter sync bandwidth (issue 5).

    python benchmarks/bench_sync.py

- Across meshes (two gloo processes, source on rank 0, destination on rank 1): a 50M- and
  a 500M-parameter fp32 model synced with ``CrossSync`` (256 MB buckets), against one raw
  ``dist.broadcast`` of a flat tensor of the same bytes (target >= 0.9x); and a bucket-size
  sweep for the 500M model.
- Colocated (one process): ``SyncPlan.apply`` against one ``Tensor.copy_`` of the same
  bytes (target <= 1.2x), and the growth of the process's peak memory during the sync.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import finish_worker, report, spawn_two  # noqa: E402

from flowgraph import TorchModule  # noqa: E402
from flowgraph.runtime.sync import CrossSync, SyncPlan  # noqa: E402

MODELS = {"50M": 50_000_000, "500M": 500_000_000}
SWEEP_MB = (32, 64, 256, 1024)
REPEATS = 3


class Blocks(TorchModule):
    """``params`` parameters as 4096-wide square layers (the last one cut to fit)."""

    def __init__(self, name: str, params: int) -> None:
        super().__init__(name)
        self.params = params

    def setup(self) -> None:
        width, layers, left = 4096, [], self.params
        while left > 0:
            rows = min(width, max(1, left // width))
            layers.append(torch.nn.Linear(width, rows, bias=False))
            left -= rows * width
        self.model = torch.nn.Sequential(*layers)


def _timed(fn) -> float:
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    group = dist.new_group([0, 1])
    results = {}
    for label, params in MODELS.items():
        src, dst = Blocks("trainer", params), Blocks("inference", params)
        (src if rank == 0 else dst).setup()
        for bucket_mb in SWEEP_MB if label == "500M" else (256,):
            buckets = max(1, -(-params * 4 // (bucket_mb * 2**20)))
            sync = CrossSync(src, dst, buckets, rank, (0,), (1,))
            seconds = _timed(lambda s=sync, b=buckets: [s.broadcast(i, group) for i in range(b)])
            results[f"{label} {bucket_mb}MB"] = seconds
        flat = torch.empty(params * 4, dtype=torch.uint8)
        results[f"{label} raw"] = _timed(lambda f=flat: dist.broadcast(f, src=0, group=group))
        del src, dst, flat
    finish_worker(rank, out, results)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def colocated(params: int) -> tuple[float, float, float]:
    src, dst = Blocks("trainer", params), Blocks("inference", params)
    src.setup()
    dst.setup()
    plan = SyncPlan.build(src, dst)
    flat_src = torch.randn(params)
    flat_dst = torch.empty(params)
    before = _peak_rss_bytes()
    sync_s = statistics.median(_seconds(plan.apply) for _ in range(REPEATS))
    grown = _peak_rss_bytes() - before
    copy_s = statistics.median(_seconds(lambda: flat_dst.copy_(flat_src)) for _ in range(REPEATS))
    return sync_s, copy_s, grown


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> list[dict]:
    r = spawn_two(_worker)
    rows = []
    for label, params in MODELS.items():
        nbytes = params * 4
        ours, raw = nbytes / r[f"{label} 256MB"] / 1e9, nbytes / r[f"{label} raw"] / 1e9
        rows.append(report(f"sync across meshes, {label} params: flowgraph", ours, "GB/s"))
        rows.append(report(f"sync across meshes, {label} params: raw broadcast", raw, "GB/s"))
        rows.append(
            report(f"sync across meshes, {label} params: ratio", ours / raw, "x", ">= 0.9x")
        )
    for bucket_mb in SWEEP_MB:
        gbps = MODELS["500M"] * 4 / r[f"500M {bucket_mb}MB"] / 1e9
        rows.append(report(f"  bucket sweep 500M, {bucket_mb} MB buckets", gbps, "GB/s"))
    sync_s, copy_s, grown = colocated(MODELS["500M"])
    rows.append(report("colocated sync 500M: SyncPlan.apply", sync_s * 1e3, "ms"))
    rows.append(report("colocated sync 500M: one copy_ of the bytes", copy_s * 1e3, "ms"))
    rows.append(report("colocated sync 500M: ratio", sync_s / copy_s, "x", "<= 1.2x"))
    rows.append(report("colocated sync 500M: peak memory growth", grown / 2**20, "MiB", "~0"))
    return rows


if __name__ == "__main__":
    main()
