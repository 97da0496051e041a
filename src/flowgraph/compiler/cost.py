"""The cost model: memory per device and time per stage, from parameter counts.

Sizes come from ``models.<name>.params`` (``7B``, ``350M``, ``125000``) or, when absent,
from running the module's ``setup()`` under ``torch.device("meta")`` and counting the
parameters of ``self.model`` (no memory is used). The estimates are deliberately simple
and documented, so a user can check them by hand:

- bytes per value from ``models.<name>.precision`` (``flowgraph.precision``): 4 for
  fp32, 2 for bf16/fp16;
- inference weights: ``params x bytes`` of its precision;
- a trainer keeps fp32 weights (4 bytes, plus their 2-byte casts under bf16 autocast),
  fp32 gradients (4) and Adam's two fp32 moments (8); ZeRO stage 1 shards the optimizer
  states over the mesh, stage 2 also the gradients, stage 3 also the weights;
- activations: a transformer shape is inferred from the size (``P = 12 L h^2`` with
  ``h = 128 L``); inference keeps a KV cache of ``2 L h`` values per token, training
  ``17 h L`` values per token (Korthikanti et al.'s 34 bytes in 16-bit, no
  recomputation), each of the compute precision's bytes;
- gradient all-reduce moves fp32 gradients; a weight sync moves the destination's dtype;
- time: ``2 P`` FLOPs per token forward, ``6 P`` training, at a fraction of the device's
  peak (generation 10 %, scoring 40 %, training 40 %); gradient all-reduce and weight
  sync from bytes over the link bandwidth.

Example::

    >>> parse_params("7B"), parse_params("350M"), parse_params(1000)
    (7000000000, 350000000, 1000)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.errors import PlanError
from flowgraph.precision import dtype_bytes

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
GENERATION_EFFICIENCY = 0.10
FORWARD_EFFICIENCY = 0.40
TRAIN_EFFICIENCY = 0.40
FP32_BYTES = 4
ADAM_BYTES = 8  # two fp32 moments per parameter


def parse_params(value: str | int, model: str = "?") -> int:
    """``"7B"`` -> 7_000_000_000; ints pass through."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*", str(value).upper())
    if not match:
        raise PlanError(
            f"models.{model}.params={value!r} is not a parameter count; write e.g. 7B, 350M "
            "or 125000"
        )
    return int(float(match.group(1)) * _SUFFIX[match.group(2)])


def format_count(n: float) -> str:
    """7e9 -> '7.0B'."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(int(n))


def format_bytes(n: float) -> str:
    for suffix, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class ModelSpec:
    """What the cost model needs to know about one model."""

    name: str
    params: int
    trainable: bool
    zero_stage: int = 0
    offload: bool = False
    precision: str = "fp32"  # resolved: fp32 | bf16 | fp16

    @property
    def value_bytes(self) -> int:
        """Bytes of one weight (inference) or activation value in this precision."""
        return dtype_bytes(self.precision)


@dataclass(frozen=True)
class Memory:
    """Bytes per device of one model on a mesh."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class Workload:
    """Per-episode sizes from the runtime config."""

    sample_per_episode: int
    generation_batch_size: int
    train_micro_batch_size: int
    train_global_batch_size: int
    num_training_epoch: int
    prompt_length: int
    response_length: int
    rows_per_sample: int = 1

    @property
    def tokens_per_sample(self) -> int:
        return self.prompt_length + self.response_length

    @property
    def train_steps(self) -> int:
        rows = self.sample_per_episode * self.rows_per_sample
        return self.num_training_epoch * (rows // self.train_global_batch_size)


def transformer_shape(params: int) -> tuple[int, int]:
    """(layers, hidden) of a GPT-like model of ``params`` parameters (h = 128 L)."""
    if params <= 0:
        return 0, 0
    layers = max(1, round((params / (12 * 128**2)) ** (1 / 3)))
    hidden = max(1, round(math.sqrt(params / (12 * layers))))
    return layers, hidden


def memory(spec: ModelSpec, mesh_size: int, work: Workload, cluster: ClusterSpec) -> Memory:
    """Bytes per device for ``spec`` on a mesh of ``mesh_size`` devices."""
    b = spec.value_bytes
    p = spec.params
    layers, hidden = transformer_shape(p)
    if not spec.trainable:
        tokens = work.generation_batch_size * work.tokens_per_sample
        return Memory(p * b, 0.0, 0.0, 2 * layers * hidden * b * tokens)
    stage = spec.zero_stage
    casts = b if b < FP32_BYTES else 0  # autocast's low-precision copy during the step
    weights = p * (FP32_BYTES + casts) / (mesh_size if stage >= 3 else 1)
    grads = p * FP32_BYTES / (mesh_size if stage >= 2 else 1)
    optim = p * ADAM_BYTES / (mesh_size if stage >= 1 else 1)
    tokens = work.train_micro_batch_size * work.tokens_per_sample
    activations = 17 * hidden * layers * tokens * b
    return Memory(weights, grads, optim, activations)


def flops_seconds(flops: float, devices: int, efficiency: float, cluster: ClusterSpec) -> float:
    return flops / (devices * cluster.device_tflops * 1e12 * efficiency)


def inference_seconds(
    params: int, samples: int, devices: int, generate: bool, work: Workload, cluster: ClusterSpec
) -> float:
    """Seconds for ``samples`` samples through one model spread over ``devices``."""
    efficiency = GENERATION_EFFICIENCY if generate else FORWARD_EFFICIENCY
    return flops_seconds(
        2 * params * samples * work.tokens_per_sample, devices, efficiency, cluster
    )


def train_step_seconds(
    params: int, mesh: list[int] | tuple[int, ...], work: Workload, cluster: ClusterSpec
) -> float:
    """One optimizer step over a global batch, plus the gradient all-reduce."""
    n = len(mesh)
    compute = flops_seconds(
        6 * params * work.train_global_batch_size * work.tokens_per_sample,
        n,
        TRAIN_EFFICIENCY,
        cluster,
    )
    allreduce = 0.0
    if n > 1:
        allreduce = 2 * params * FP32_BYTES * (n - 1) / n
        allreduce /= cluster.link_bytes_per_s(mesh)
    return compute + allreduce


def transfer_seconds(
    nbytes: float, ranks: list[int] | tuple[int, ...], cluster: ClusterSpec
) -> float:
    return nbytes / cluster.link_bytes_per_s(ranks)


def batch_bytes(samples: int, work: Workload) -> float:
    """Bytes of a batch moved between meshes: token ids plus a few per-token floats."""
    return samples * work.tokens_per_sample * 4 * 4
