"""Descriptions of the devices a plan is compiled for. Pure data: nothing is launched.

Example::

    >>> cluster = ClusterSpec(nodes=2, devices_per_node=4)
    >>> cluster.world_size, str(Mesh(range(4, 8)))
    (8, 'r4-r7')
    >>> print(cluster)
    2 nodes x 4 gpu (8 devices), 80 GiB each, 300 GB/s in a node, 25 GB/s between nodes
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flowgraph.errors import PlanError

GiB = 1024**3
GB = 1e9


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes x devices per node, with the memory, speed and links the cost model uses.

    Defaults describe a node of 80 GiB GPUs with NVLink-class links inside a node and a
    200 Gb/s network between nodes; ``ClusterSpec.cpu`` describes the gloo CPU case.
    """

    nodes: int
    devices_per_node: int
    device: str = "gpu"
    device_memory_gib: float = 80.0
    device_tflops: float = 400.0
    intra_node_gbps: float = 300.0
    inter_node_gbps: float = 25.0
    memcpy_gbps: float = 1000.0

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
        return cls(
            nodes=nodes,
            devices_per_node=world_size // nodes,
            device="cpu",
            device_memory_gib=16.0,
            device_tflops=0.05,
            intra_node_gbps=4.0,
            inter_node_gbps=1.0,
            memcpy_gbps=15.0,
        )

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
            f"({self.world_size} devices), {self.device_memory_gib:g} GiB each, "
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
