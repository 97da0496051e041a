"""The data of placement: the request it answers and the layouts it builds.

A ``Layout`` is disjoint groups of models (``Group``), each on its own ``Mesh`` of ranks;
a ``PlacementRequest`` is what both placement (which builds and picks layouts) and
feasibility (which judges them) read. Import them from ``flowgraph.compiler.placement``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from flowgraph.compiler.cluster import ClusterSpec, Mesh
from flowgraph.compiler.cost import ModelSpec, Workload


@dataclass(frozen=True)
class Group:
    """Models that share one set of ranks."""

    models: tuple[str, ...]
    mesh: Mesh


@dataclass(frozen=True)
class Layout:
    """One candidate placement: a name for reports, and its groups."""

    name: str
    groups: tuple[Group, ...]

    def mesh_of(self, model: str) -> Mesh:
        return next(g.mesh for g in self.groups if model in g.models)

    @property
    def devices(self) -> int:
        """Devices the layout uses (its groups are disjoint)."""
        return sum(g.mesh.size for g in self.groups)


@dataclass(frozen=True)
class PlacementRequest:
    """What placement needs: models in first-use order, the user's constraints, sizes."""

    models: tuple[str, ...]
    specs: dict[str, ModelSpec]
    num_gpu: dict[str, int | str]
    colocation: list[list[str]] | str
    inference_models: frozenset[str]  # models the env flow calls for inference
    work: Workload
    cluster: ClusterSpec
    eval_models: frozenset[str] = frozenset()  # models the eval flow calls
    eval_microbatches: int = 0
    # model -> the model whose output it reads first (env flow first), None: the flow input
    producers: Mapping[str, str | None] = field(default_factory=dict)
    # parameter syncs (trainer, inference copy), as Program.syncs
    syncs: tuple[tuple[str, str], ...] = ()

    @property
    def env_microbatches(self) -> int:
        return math.ceil(self.work.sample_per_episode / self.work.generation_batch_size)

    @property
    def step_microbatches(self) -> int:
        """Micro-batches of one global step (0 when they do not divide it)."""
        w = self.work
        if w.train_global_batch_size % w.train_micro_batch_size:
            return 0
        return w.train_global_batch_size // w.train_micro_batch_size
