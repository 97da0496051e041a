"""Descriptions of the devices a plan is compiled for. Pure data: nothing is launched.

A ``ClusterSpec`` says how many devices there are and what each can do: memory, peak
compute, memory bandwidth, the fixed latency of one forward step, and the links between
devices. The GPU defaults describe an H100 SXM 80 GB (``GPUS["h100"]``); ``GPUS`` holds
datasheet figures for A100, H100 and H200, and ``ClusterSpec.gpu("a100", nodes, 8)``
builds a cluster of one of them. ``ClusterSpec.cpu`` describes gloo processes on the
project's 2-core machines.

Example::

    >>> cluster = ClusterSpec(nodes=2, devices_per_node=4)
    >>> cluster.world_size, str(Mesh(range(4, 8)))
    (8, 'r4-r7')
    >>> print(cluster)
    2 nodes x 4 gpu (8 devices), 80 GiB, 989 TFLOP/s, 3350 GB/s memory each,
    450 GB/s in a node, 50 GB/s between nodes
    >>> ClusterSpec.gpu("a100", nodes=16, devices_per_node=8).memory_gbps
    2039.0
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flowgraph.errors import PlanError

GiB = 1024**3
CPU_CORES = 2  # the project's machines
CPU_NODE_TFLOPS = 0.3  # effective peak of one such node (see ClusterSpec.cpu)
GB = 1e9

# Datasheet figures of common training GPUs (SXM parts), per device: memory, dense
# 16-bit tensor TFLOP/s (without sparsity), HBM bandwidth, and the links of an 8-GPU node
# (NVLink, one direction) and of the network between nodes (per GPU).
# - A100 SXM4 80 GB: 312 TFLOP/s bf16, 2,039 GB/s HBM2e, NVLink 3 600 GB/s both ways; the
#   network is HybridFlow's testbed (arXiv 2409.19256, section 8.1: 200 Gb/s between nodes).
# - H100 SXM5 80 GB: 989 TFLOP/s bf16, 3,350 GB/s HBM3, NVLink 4 900 GB/s both ways,
#   400 Gb/s per GPU between nodes (DGX H100).
# - H200 SXM 141 GB (131 GiB): the H100's compute with 4,800 GB/s HBM3e.
GPUS: dict[str, dict[str, float]] = {
    "a100": {"device_memory_gib": 80.0, "device_tflops": 312.0, "memory_gbps": 2039.0,
             "intra_node_gbps": 300.0, "inter_node_gbps": 25.0},
    "h100": {"device_memory_gib": 80.0, "device_tflops": 989.0, "memory_gbps": 3350.0,
             "intra_node_gbps": 450.0, "inter_node_gbps": 50.0},
    "h200": {"device_memory_gib": 131.0, "device_tflops": 989.0, "memory_gbps": 4800.0,
             "intra_node_gbps": 450.0, "inter_node_gbps": 50.0},
}  # fmt: skip


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes x devices per node, with the memory, speed and links the cost model uses.

    The defaults are ``GPUS["h100"]``: a DGX H100-class node of H100 SXM 80 GB GPUs
    (989 TFLOP/s dense bf16, 3,350 GB/s HBM3, 450 GB/s NVLink, 50 GB/s to other nodes).
    ``step_latency_us`` is the fixed cost of one forward step of a model (kernel launches,
    sampling, the framework's work per generated token): an optimized engine with CUDA
    graphs spends about 1.5 ms per decode step beyond its weight and KV-cache reads
    (docs/compiler.md, "Decoding"). ``ClusterSpec.cpu`` describes the gloo CPU case.
    """

    nodes: int
    devices_per_node: int
    device: str = "gpu"
    device_memory_gib: float = 80.0
    device_tflops: float = 989.0  # peak dense TFLOP/s at the compute precision (bf16)
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    memcpy_gbps: float = 1000.0
    memory_gbps: float = 3350.0  # peak device-memory (HBM) bandwidth
    step_latency_us: float = 1500.0  # fixed time of one forward step (a decode step)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.devices_per_node < 1:
            raise PlanError(
                f"a cluster needs at least 1 node and 1 device per node, got nodes={self.nodes}, "
                f"devices_per_node={self.devices_per_node}"
            )

    @classmethod
    def cpu(cls, world_size: int, nodes: int = 1) -> ClusterSpec:
        """``world_size`` CPU processes (gloo), as measured on the project's 2-core machines."""
        if world_size % nodes:
            raise PlanError(f"world size {world_size} does not split over {nodes} nodes")
        per_node = world_size // nodes
        return cls(
            nodes=nodes,
            devices_per_node=per_node,
            device="cpu",
            device_memory_gib=16.0,
            # Fitted to the GRPO bench's training step (about 125 GFLOP/s of 6 P per token in
            # one 2-thread process, at the model's 40 % of peak): the node's two cores are
            # shared by its processes (torchrun gives each one thread).
            device_tflops=CPU_NODE_TFLOPS / per_node,
            intra_node_gbps=4.0,
            inter_node_gbps=1.0,
            memcpy_gbps=15.0,
            # Measured with flowgraph.rl.sampling.generate of TinyGPT on one thread: a
            # decode step of the 2-layer width-64 PPO model takes 0.8 ms at batch 1 (the
            # floor), the 4-layer width-256 GRPO bench model 3.6 ms, its 14.8 MB of fp32
            # weights read at about 6 GB/s (9 GB/s at the cost model's 70 % efficiency).
            memory_gbps=9.0,
            step_latency_us=1000.0,
        )

    @classmethod
    def gpu(cls, kind: str, nodes: int, devices_per_node: int = 8) -> ClusterSpec:
        """``nodes`` x ``devices_per_node`` GPUs of one of ``GPUS`` (``a100``, ``h100``,
        ``h200``)."""
        if kind not in GPUS:
            raise PlanError(f"unknown GPU {kind!r}; known: {', '.join(GPUS)}")
        return cls(nodes=nodes, devices_per_node=devices_per_node, **GPUS[kind])

    @classmethod
    def from_world_size(cls, world_size: int, devices_per_node: int | None = None) -> ClusterSpec:
        """``world_size`` GPUs, 8 per node unless told otherwise (fewer fill one node)."""
        per_node = devices_per_node or min(world_size, 8)
        if world_size < 1 or world_size % per_node:
            raise PlanError(
                f"world size {world_size} is not a whole number of nodes of {per_node} devices; "
                "pass --nodes N --gpus-per-node G instead"
            )
        return cls(nodes=world_size // per_node, devices_per_node=per_node)

    @classmethod
    def from_torchrun_env(cls, environ: Mapping[str, str] | None = None) -> ClusterSpec:
        """The cluster ``torchrun`` launched this process into (``WORLD_SIZE``,
        ``LOCAL_WORLD_SIZE``); device kind from ``FLOWGRAPH_DEVICE`` (``cpu``/``gpu``)."""
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        local = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        if env.get("FLOWGRAPH_DEVICE", "cpu") == "cpu":
            return cls.cpu(world, nodes=max(1, world // local))
        return cls.from_world_size(world, local)

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def device_memory_bytes(self) -> float:
        return self.device_memory_gib * GiB

    def node_of(self, rank: int) -> int:
        return rank // self.devices_per_node

    def link_bytes_per_s(self, ranks: Iterable[int]) -> float:
        """Bandwidth of a transfer among ``ranks``: intra-node when they share one node."""
        nodes = {self.node_of(r) for r in ranks}
        return (self.intra_node_gbps if len(nodes) <= 1 else self.inter_node_gbps) * GB

    def __str__(self) -> str:
        plural = "s" if self.nodes > 1 else ""
        return (
            f"{self.nodes} node{plural} x {self.devices_per_node} {self.device} "
            f"({self.world_size} devices), {self.device_memory_gib:g} GiB, "
            f"{self.device_tflops:g} TFLOP/s, {self.memory_gbps:g} GB/s memory each, "
            f"{self.intra_node_gbps:g} GB/s in a node, {self.inter_node_gbps:g} GB/s between nodes"
        )


@dataclass(frozen=True)
class Mesh:
    """An ordered set of ranks that hosts a model; its size is the data-parallel degree."""

    ranks: tuple[int, ...]

    def __init__(self, ranks: Iterable[int]) -> None:
        object.__setattr__(self, "ranks", tuple(ranks))

    @property
    def size(self) -> int:
        return len(self.ranks)

    def __contains__(self, rank: int) -> bool:
        return rank in self.ranks

    def __str__(self) -> str:
        return format_ranks(self.ranks)


def format_ranks(ranks: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 6]`` -> ``'r0-r3,r6'``."""
    ordered = sorted(ranks)
    if not ordered:
        return "-"
    runs, start, prev = [], ordered[0], ordered[0]
    for r in ordered[1:]:
        if r != prev + 1:
            runs.append((start, prev))
            start = r
        prev = r
    runs.append((start, prev))
    return ",".join(f"r{a}" if a == b else f"r{a}-r{b}" for a, b in runs)
