"""Trace + build of the seed's 6-model RLHF graph (target: median under 5 ms).

python benchmarks/bench_trace.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import median_seconds, report  # noqa: E402
from seed_rlhf import build_engine, make_modules  # noqa: E402


def main() -> list[dict]:
    def trace_and_build():
        build_engine(make_modules())

    seconds = median_seconds(trace_and_build, repeats=15, inner=50)
    return [
        report("trace+build seed RLHF engine (6 models, 3 flows)", seconds * 1e3, "ms", "< 5 ms")
    ]


if __name__ == "__main__":
    main()
