"""Mixed precision: ``models.<name>.precision`` (``fp32``, ``bf16``, ``fp16`` or ``auto``).

- An **inference model** (not trained) is cast to the dtype after ``setup()``: weights,
  buffers and therefore its KV cache are bf16 (or fp16), and its step methods run under
  ``torch.autocast`` so that float32 inputs meet low-precision weights without errors.
- A **trainer** keeps float32 weights, gradients and optimizer states (the master copy)
  and computes its step methods under ``torch.autocast`` in the low dtype. fp16 training
  needs loss scaling, which a ``train_step`` written by the user does not do, so a
  trainer may be ``bf16`` or ``fp32`` only.
- A **parameter sync** casts once, in place, into the destination's dtype (across ranks
  the sender casts, so half the bytes travel); ``validate_sync`` compares the destination
  with the cast of the source.
- ``auto`` is bf16 where the hardware computes it natively: a CUDA device that supports
  bf16 (``torch.cuda.is_bf16_supported()``), or a CPU whose flags (``/proc/cpuinfo``)
  include ``avx512_bf16`` or ``amx_bf16``; elsewhere fp32, because emulated bf16 matmuls
  are many times slower than fp32 ones on such CPUs (AVX2 only: about 10x).

Log-probabilities and losses of the ready RL modules are computed in float32 whatever
the precision (``flowgraph.rl.sampling.token_logprobs``).

Example::

    >>> resolve("bf16", "cpu")
    'bf16'
    >>> DTYPES["bf16"]
    torch.bfloat16
    >>> with compute_context("fp32", "cpu"):
    ...     pass
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16``)."""
    try:
        flags = next(
            (line for line in Path(cpuinfo).read_text().splitlines() if line.startswith("flags")),
            "",
        ).split()
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def auto_precision(device_type: str) -> str:
    """What ``precision: auto`` means on ``device_type`` (``cpu``, ``cuda``, or ``gpu``
    for a planned machine)."""
    if device_type == "gpu":
        return "bf16"  # planning for GPUs: every current data-centre GPU computes bf16
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def resolve(precision: str, device_type: str) -> str:
    """The precision a model runs in: ``precision`` itself, or ``auto``'s choice."""
    return auto_precision(device_type) if precision == "auto" else precision


def dtype_bytes(precision: str) -> int:
    """Bytes of one value in ``precision`` (``fp32``: 4, ``bf16``/``fp16``: 2)."""
    return DTYPES[precision].itemsize


@contextlib.contextmanager
def compute_context(precision: str, device_type: str) -> Iterator[None]:
    """``torch.autocast`` in ``precision`` on ``device_type``; nothing for fp32.

    Without autocast's weight cache: a ``train_step`` that steps its optimizer and then
    runs another forward must see the updated weights, not casts made before the step."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type, dtype=DTYPES[precision], cache_enabled=False):
        yield


def cast_inference_model(network: torch.nn.Module, precision: str) -> None:
    """Cast the floating-point weights and buffers of an inference model in place."""
    if precision != "fp32":
        network.to(DTYPES[precision])


def hosted_dtype(tensor_dtype: torch.dtype, precision: str, trainable: bool) -> torch.dtype:
    """The dtype a model's floating-point tensor has once set up: an inference model's
    tensors are cast to its precision, a trainer's stay as ``setup()`` made them."""
    if trainable or precision == "fp32" or not tensor_dtype.is_floating_point:
        return tensor_dtype
    return DTYPES[precision]
