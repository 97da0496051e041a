"""Helpers shared by the benchmarks: medians of repeated runs, a report line, and two
spawned gloo processes."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def median_seconds(fn: Callable[[], object], repeats: int, inner: int = 1) -> float:
    """Median over ``repeats`` runs of the mean time of ``inner`` calls of ``fn``."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def load_example(name: str):
    """``examples/<name>.py`` as a module (its engine built, nothing run)."""
    path = Path(__file__).parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(name: str, value: float, unit: str, target: str = "") -> dict:
    line = f"{name:<58} {value:>12.4f} {unit:<8} {target}"
    print(line, flush=True)
    return {"name": name, "value": value, "unit": unit, "target": target}


def spawn_two(worker: Callable[[int, int, str], None]) -> dict:
    """Run ``worker(rank, port, out_path)`` in two processes; return the JSON that rank 1
    wrote to ``out_path`` (the workers set up gloo on ``port`` themselves)."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(worker, args=(port, out), nprocs=2, join=True)
        with open(out) as f:
            return json.load(f)


def finish_worker(rank: int, out: str, results: dict) -> None:
    """End a ``spawn_two`` worker: rank 1 writes ``results``; both leave the group and exit
    without gloo's teardown (see shared/machine-notes.md)."""
    if rank == 1:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
