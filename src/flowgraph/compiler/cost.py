"""The cost model: memory per device and time per stage, from parameter counts.

Sizes come from ``models.<name>.params`` (``7B``, ``350M``, ``125000``) or, when absent,
from running the module's ``setup()`` under ``torch.device("meta")`` and counting the
parameters of ``self.model`` (no memory is used). The estimates are deliberately simple
and documented, so a user can check them by hand (docs/compiler.md, "Cost model"):

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
- generation (``generate_seconds``): a prefill of the prompts, then one decode step per
  further answer token; every step of a batch reads all the weights and the batch's KV
  cache once, so a step takes the longer of its FLOPs (``2 P`` per sequence at
  ``DECODE_EFFICIENCY`` of the peak) and its bytes (weights + KV cache at
  ``MEMORY_EFFICIENCY`` of the memory bandwidth), plus the device's fixed
  ``step_latency_us``: small batches are bound by bandwidth, large ones by compute;
- scoring and prefill (a forward pass, ``forward_seconds``): ``2 P`` FLOPs per token at
  ``FORWARD_EFFICIENCY``, at least one read of the weights, plus one step latency;
- training: ``6 P`` FLOPs per token at ``TRAIN_EFFICIENCY`` of the peak, plus three step
  latencies per micro-batch (forward and backward) and one for the optimizer; gradient
  all-reduce and weight sync from bytes over the link bandwidth.

Example::

    >>> parse_params("7B"), parse_params("350M"), parse_params(1000)
    (7000000000, 350000000, 1000)
    >>> from flowgraph.compiler.cluster import ClusterSpec
    >>> h100 = ClusterSpec.gpu("h100", nodes=1)
    >>> step = decode_step_seconds(7e9, batch=1, context=128, value_bytes=2, cluster=h100)
    >>> round(1 / step)    # tokens/s of one 7B bf16 sequence: weight reads + latency
    133
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.errors import PlanError
from flowgraph.precision import dtype_bytes

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
# Shares of a device's peak that the estimates assume (docs/compiler.md, "Decoding", checks
# them against published decoding throughputs):
FORWARD_EFFICIENCY = 0.50  # FLOP/s of a forward pass over many tokens: prefill, scoring
DECODE_EFFICIENCY = 0.35  # FLOP/s of a decode step, whose matmuls have one row a sequence
MEMORY_EFFICIENCY = 0.70  # memory bandwidth a decode step sustains (gpt-fast: 69 % on A100)
TRAIN_EFFICIENCY = 0.40  # FLOP/s of forward + backward
TRAIN_STEP_LATENCIES = 3  # step latencies of one micro-batch's forward + backward
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
    if not spec.trainable:  # the KV cache of one generation call: every answer of its prompts
        rows = work.generation_batch_size * work.rows_per_sample
        return Memory(p * b, 0.0, 0.0, kv_bytes_per_token(p, b) * rows * work.tokens_per_sample)
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


def bytes_seconds(nbytes: float, cluster: ClusterSpec) -> float:
    """Seconds to read ``nbytes`` from one device's memory at ``MEMORY_EFFICIENCY``."""
    return nbytes / (cluster.memory_gbps * 1e9 * MEMORY_EFFICIENCY)


def kv_bytes_per_token(params: float, value_bytes: float) -> float:
    """KV-cache bytes of one token of one sequence: a key and a value of width ``h`` in
    each of ``L`` layers (``2 L h`` values, no grouped-query sharing)."""
    layers, hidden = transformer_shape(int(params))
    return 2 * layers * hidden * value_bytes


def forward_seconds(
    params: float, sequences: float, tokens: int, value_bytes: float, cluster: ClusterSpec
) -> float:
    """One forward pass of ``sequences`` x ``tokens`` tokens on one device (scoring, or a
    prefill): ``2 P`` FLOPs a token, never faster than one read of the weights, plus one
    step latency."""
    if params <= 0 or sequences <= 0:
        return 0.0
    compute = flops_seconds(2 * params * sequences * tokens, 1, FORWARD_EFFICIENCY, cluster)
    return max(compute, bytes_seconds(params * value_bytes, cluster)) + _latency(cluster)


def decode_step_seconds(
    params: float, batch: float, context: float, value_bytes: float, cluster: ClusterSpec
) -> float:
    """One decode step of ``batch`` sequences whose KV cache holds ``context`` tokens each:
    the longer of ``2 P`` FLOPs a sequence and the bytes read (all the weights once, the
    whole batch's KV cache), plus the step latency."""
    compute, memory, per_token = _decode_terms(params, batch, value_bytes, cluster)
    return max(compute, memory + per_token * context) + _latency(cluster)


def generate_seconds(
    params: float,
    sequences: float,
    prompt_length: int,
    response_length: int,
    value_bytes: float,
    cluster: ClusterSpec,
) -> float:
    """Answers of ``response_length`` tokens for ``sequences`` prompts of ``prompt_length``
    tokens, one batch on one device: a prefill of the prompts (which yields the first answer
    token), then ``response_length - 1`` decode steps whose KV cache grows by one token a
    step (summed in closed form)."""
    if params <= 0 or sequences <= 0 or response_length <= 0:
        return 0.0
    prefill = forward_seconds(params, sequences, prompt_length, value_bytes, cluster)
    steps = response_length - 1
    compute, memory, per_token = _decode_terms(params, sequences, value_bytes, cluster)
    # Step i (1..steps) reads a cache of prompt_length + i tokens: memory0 + per_token * i.
    memory0 = memory + per_token * prompt_length
    if per_token > 0:
        bound = math.floor((compute - memory0) / per_token)  # last compute-bound step
    else:
        bound = steps if memory0 <= compute else 0
    bound = min(max(bound, 0), steps)
    tail = steps - bound
    summed = per_token * (steps * (steps + 1) - bound * (bound + 1)) / 2
    decode = bound * compute + tail * memory0 + summed + steps * _latency(cluster)
    return prefill + decode


def _decode_terms(
    params: float, batch: float, value_bytes: float, cluster: ClusterSpec
) -> tuple[float, float, float]:
    """(compute seconds, weight-read seconds, seconds per cached token) of a decode step."""
    compute = flops_seconds(2 * params * batch, 1, DECODE_EFFICIENCY, cluster)
    weights = bytes_seconds(params * value_bytes, cluster)
    per_token = bytes_seconds(batch * kv_bytes_per_token(params, value_bytes), cluster)
    return compute, weights, per_token


def _latency(cluster: ClusterSpec) -> float:
    return cluster.step_latency_us * 1e-6


def run_seconds(
    spec: ModelSpec, samples: float, generate: bool, work: Workload, cluster: ClusterSpec
) -> float:
    """Seconds of one ``RUN`` on one device: ``samples`` sequences through ``spec`` in one
    batch, generating ``response_length`` tokens after prompts of ``prompt_length`` when
    ``generate``, else scoring ``prompt_length + response_length`` tokens each."""
    if generate:
        return generate_seconds(
            spec.params, samples, work.prompt_length, work.response_length,
            spec.value_bytes, cluster,
        )  # fmt: skip
    return forward_seconds(spec.params, samples, work.tokens_per_sample, spec.value_bytes, cluster)


def train_step_seconds(
    params: int, mesh: list[int] | tuple[int, ...], work: Workload, cluster: ClusterSpec
) -> float:
    """One optimizer step over a global batch, plus the gradient all-reduce: ``6 P`` FLOPs a
    token at ``TRAIN_EFFICIENCY``, and at least ``TRAIN_STEP_LATENCIES`` step latencies per
    micro-batch of a rank (its forward and its backward, which launches twice the kernels)
    plus one for the optimizer step."""
    n = len(mesh)
    compute = flops_seconds(
        6 * params * work.train_global_batch_size * work.tokens_per_sample,
        n,
        TRAIN_EFFICIENCY,
        cluster,
    )
    micro_batches = math.ceil(work.train_global_batch_size / (work.train_micro_batch_size * n))
    latency = (TRAIN_STEP_LATENCIES * micro_batches + 1) * _latency(cluster) if params else 0.0
    allreduce = 0.0
    if n > 1:
        allreduce = allreduce_bytes(params, n) / cluster.link_bytes_per_s(mesh)
    return compute + latency + allreduce


def allreduce_bytes(params: int, n: int) -> float:
    """Bytes each rank moves in a ring all-reduce of fp32 gradients over ``n`` ranks."""
    return 2 * params * FP32_BYTES * (n - 1) / n


def transfer_seconds(
    nbytes: float, ranks: list[int] | tuple[int, ...], cluster: ClusterSpec
) -> float:
    return nbytes / cluster.link_bytes_per_s(ranks)


def batch_bytes(samples: int, work: Workload) -> float:
    """Bytes of a batch moved between meshes: token ids plus a few per-token floats."""
    return samples * work.tokens_per_sample * 4 * 4
