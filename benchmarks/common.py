"""Timing helpers shared by the benchmarks: medians of repeated runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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


def report(name: str, value: float, unit: str, target: str = "") -> dict:
    line = f"{name:<58} {value:>12.4f} {unit:<8} {target}"
    print(line, flush=True)
    return {"name": name, "value": value, "unit": unit, "target": target}
