"""Run every benchmark and write their results to benchmarks/out/results.json.

python benchmarks/run_all.py       # or: make bench
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import bench_async  # noqa: E402
import bench_checkpoint  # noqa: E402
import bench_compile  # noqa: E402
import bench_data  # noqa: E402
import bench_estimates  # noqa: E402
import bench_gather  # noqa: E402
import bench_generation  # noqa: E402
import bench_grpo  # noqa: E402
import bench_matmul  # noqa: E402
import bench_overhead  # noqa: E402
import bench_placement  # noqa: E402
import bench_rl  # noqa: E402
import bench_runtime  # noqa: E402
import bench_sync  # noqa: E402
import bench_trace  # noqa: E402
import bench_transfer  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"{os.cpu_count()} cpus, {torch.get_num_threads()} torch threads")  # fmt: skip
    results = (
        bench_trace.main()
        + bench_overhead.main()
        + bench_compile.main()
        + bench_placement.main()
        + bench_transfer.main()
        + bench_gather.main()
        + bench_runtime.main()
        + bench_sync.main()
        + bench_matmul.main()
        + bench_generation.main()
        + bench_rl.main()
        + bench_grpo.main()
        + bench_checkpoint.main()
        + bench_async.main()
        + bench_data.main()
        + bench_estimates.main()
    )
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
