"""Matmul speed per dtype on this machine: fp32 against bf16 (and what ``auto`` picks).

python benchmarks/bench_matmul.py

Shapes of the GRPO bench: a decode step's ``F.linear`` (64 x 256 x 768), a training
micro-batch's (4096 x 256 x 1024), and a square 1024^3 ``a @ b``; 2 threads by default.
On a CPU without bf16 instructions (AVX2 only) bf16 is emulated and several times slower
than fp32, which is why ``precision: auto`` stays fp32 there (``flowgraph.precision``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import median_seconds, report

from flowgraph.precision import auto_precision

SHAPES = {"linear 64x256x768": (64, 256, 768), "linear 4096x256x1024": (4096, 256, 1024),
          "a @ b 1024^3": (1024, 1024, 1024)}  # fmt: skip


def main() -> list[dict]:
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}; "
          f"precision auto -> {auto_precision('cpu')}")  # fmt: skip
    results = []
    for name, (m, k, n) in SHAPES.items():
        speed = {}
        for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            if name.startswith("linear"):
                seconds = median_seconds(lambda a=a, w=w: F.linear(a, w), repeats=5)
            else:
                b = w.t().contiguous()
                seconds = median_seconds(lambda a=a, b=b: a @ b, repeats=3)
            speed[label] = 2 * m * k * n / seconds / 1e9
            results.append(report(f"{name} {label}", speed[label], "GFLOP/s"))
        results.append(report(f"{name} bf16 / fp32", speed["bf16"] / speed["fp32"], "x"))
    return results


if __name__ == "__main__":
    main()
