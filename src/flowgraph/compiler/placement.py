"""Placement pass: every model gets a ``Mesh`` (its ranks).

Rank groups are the unit of placement: the models of one group share its ranks and run
stage by stage; disjoint groups run concurrently and pipeline micro-batch waves.

- Explicit: every model has an integer ``num_gpu`` and ``runtime.colocation`` is a list.
  Each colocation group gets ``num_gpu`` ranks shared by its members; every other model
  gets ranks of its own; groups are laid out in order of first use in the flows.
- Automatic (any ``num_gpu: auto``, or ``colocation: auto``): candidate layouts are
  compared with the cost model and the fastest one that fits memory and divides the
  batches wins. Candidates keep the user's colocation groups together and the user's
  integer ``num_gpu`` values exact. Families: everything on all devices; trainers apart
  from inference models (several splits); every group on its own share, proportional to
  its compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from flowgraph.compiler.cluster import ClusterSpec, Mesh
from flowgraph.compiler.cost import ModelSpec, Workload, format_bytes, memory
from flowgraph.compiler.plan import format_seconds
from flowgraph.errors import LayoutError, PlanError, did_you_mean

SHOWN_REJECTIONS = 4  # rejected layouts listed in the plan's notes


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


@dataclass(frozen=True)
class PlacementRequest:
    """What placement needs: models in first-use order, the user's constraints, sizes."""

    models: tuple[str, ...]
    specs: dict[str, ModelSpec]
    num_gpu: dict[str, int | str]
    colocation: list[list[str]] | str
    inference_models: frozenset[str]  # models whose mesh must divide the env micro-batches
    work: Workload
    cluster: ClusterSpec


def units(request: PlacementRequest) -> list[tuple[str, ...]]:
    """The user's colocation groups plus every other model alone, in first-use order."""
    groups = [] if request.colocation == "auto" else request.colocation
    owner: dict[str, int] = {}
    for i, group in enumerate(groups):
        for name in group:
            if name not in request.specs:
                raise PlanError(
                    f"runtime.colocation names {name!r}, which no flow calls; "
                    f"{did_you_mean(name, request.models)}models: {', '.join(request.models)}"
                )
            if name in owner:
                raise PlanError(
                    f"runtime.colocation puts {name!r} in two groups ({groups[owner[name]]} and "
                    f"{group}); a model lives in one group: merge the groups"
                )
            owner[name] = i
    result: list[tuple[str, ...]] = []
    placed: set[int] = set()
    for name in request.models:
        if name not in owner:
            result.append((name,))
        elif owner[name] not in placed:
            placed.add(owner[name])
            result.append(tuple(m for m in request.models if owner.get(m) == owner[name]))
    return result


def is_explicit(request: PlacementRequest) -> bool:
    return request.colocation != "auto" and all(
        isinstance(request.num_gpu[m], int) for m in request.models
    )


def explicit_layout(request: PlacementRequest, unit_list: list[tuple[str, ...]]) -> Layout:
    groups, next_rank = [], 0
    for unit in unit_list:
        sizes = {request.num_gpu[m] for m in unit}
        if len(sizes) > 1:
            detail = ", ".join(f"{m}: {request.num_gpu[m]}" for m in unit)
            raise PlanError(
                f"colocated models share one mesh, but num_gpu differs ({detail}); give them "
                "the same num_gpu"
            )
        size = sizes.pop()
        groups.append(Group(unit, Mesh(range(next_rank, next_rank + size))))
        next_rank += size
    world = request.cluster.world_size
    if next_rank > world:
        detail = ", ".join(f"{'+'.join(g.models)} {g.mesh.size}" for g in groups)
        raise PlanError(
            f"the models need {next_rank} devices ({detail}) but the cluster has {world}: lower "
            "num_gpu, or share devices with runtime.colocation=[[policy, reference], ...], or "
            "set colocation: auto"
        )
    return Layout("explicit", tuple(groups))


def check_layout(layout: Layout, request: PlacementRequest) -> None:
    """Raise ``LayoutError`` when a layout does not fit memory, does not divide the batches,
    or puts a ZeRO-3 trainer on a mesh that is not every rank."""
    work = request.work
    env_microbatches = math.ceil(work.sample_per_episode / work.generation_batch_size)
    for group in layout.groups:
        n = group.mesh.size
        usage = {m: memory(request.specs[m], n, work, request.cluster).total for m in group.models}
        offloaded = [usage[m] for m in group.models if request.specs[m].offload]
        resident = sum(usage[m] for m in group.models if not request.specs[m].offload)
        total = resident + (max(offloaded) if offloaded else 0.0)
        budget = request.cluster.device_memory_bytes
        if total > budget:
            detail = ", ".join(f"{m} {format_bytes(v)}" for m, v in usage.items())
            raise LayoutError(
                f"{group.mesh} needs {format_bytes(total)} per device ({detail}) but has "
                f"{format_bytes(budget)}",
                "give these models more devices (num_gpu), shard trainers with backend: "
                "deepspeed and zero_stage: 3, set offload: true on colocated models, or place "
                "them apart",
            )
        for m in group.models:
            spec = request.specs[m]
            world = request.cluster.world_size
            if spec.zero_stage == 3 and n != world:
                raise LayoutError(
                    f"models.{m}: zero_stage 3 on ranks {list(group.mesh.ranks)} of {world}: "
                    "DeepSpeed partitions ZeRO-3 models with a barrier over all ranks, so the "
                    "trainer's mesh must cover every rank",
                    f"colocate it with the other models (runtime.colocation, num_gpu: {world}) "
                    "or use zero_stage 1 or 2",
                )
            if spec.trainable and n > 1:  # each data-parallel rank gets equal micro-batches
                per_step = work.train_micro_batch_size * n
                if work.train_global_batch_size % per_step:
                    raise LayoutError(
                        f"{m} trains on {n} devices, so train_global_batch_size "
                        f"({work.train_global_batch_size}) must be a multiple of "
                        f"train_micro_batch_size x {n} = {per_step}",
                        f"change the batch sizes or models.{m}.num_gpu",
                    )
            elif m in request.inference_models and env_microbatches % n:
                raise LayoutError(
                    f"{m} runs on {n} devices but an episode has {env_microbatches} micro-batches "
                    f"(sample_per_episode {work.sample_per_episode} / generation_batch_size "
                    f"{work.generation_batch_size}), which do not split evenly over {n}",
                    f"make the micro-batch count a multiple of {n} or change models.{m}.num_gpu",
                )


def candidate_layouts(request: PlacementRequest, unit_list: list[tuple[str, ...]]) -> list[Layout]:
    """The layouts automatic placement compares (before constraints are applied)."""
    world = request.cluster.world_size
    all_models = tuple(m for unit in unit_list for m in unit)
    layouts = [Layout(f"colocate all on {world}", (Group(all_models, Mesh(range(world))),))]
    trainer_units = [u for u in unit_list if any(request.specs[m].trainable for m in u)]
    other_units = [u for u in unit_list if u not in trainer_units]
    if trainer_units and other_units and world > 1:
        infer = tuple(m for u in other_units for m in u)
        train = tuple(m for u in trainer_units for m in u)
        for a in _split_points(world):
            layouts.append(
                Layout(
                    f"inference {a} + trainers {world - a}",
                    (Group(infer, Mesh(range(a))), Group(train, Mesh(range(a, world)))),
                )
            )
    if 1 < len(unit_list) <= world:
        proportional = _proportional(request, unit_list)
        if proportional is not None:
            layouts.append(proportional)
    return layouts


def _split_points(world: int) -> list[int]:
    points = {world * k // 8 for k in range(1, 8)} | {2**j for j in range(world.bit_length())}
    return sorted(p for p in points if 0 < p < world)


def _proportional(request: PlacementRequest, unit_list: list[tuple[str, ...]]) -> Layout | None:
    """Each unit alone, with devices in proportion to its compute (fixed num_gpu kept);
    ``None`` when the units cannot each get a device."""
    world = request.cluster.world_size
    fixed = {
        i: request.num_gpu[u[0]]
        for i, u in enumerate(unit_list)
        if isinstance(request.num_gpu[u[0]], int)
    }
    free = world - sum(fixed.values())
    loads = {i: _compute_load(request, u) for i, u in enumerate(unit_list) if i not in fixed}
    total = sum(loads.values()) or 1.0
    sizes = dict(fixed)
    for i, load in loads.items():
        sizes[i] = max(1, _power_of_two_floor(free * load / total))
    # Rounding every unit up to one device may overshoot: halve the largest until it fits.
    while sum(sizes.values()) > world:
        shrinkable = [i for i in loads if sizes[i] > 1]
        if not shrinkable:
            return None
        largest = max(shrinkable, key=lambda k: (sizes[k], -k))
        sizes[largest] //= 2
    # Hand leftover devices to the heaviest units, doubling while they fit.
    for i in sorted(loads, key=lambda k: (-loads[k], k)):
        while sum(sizes.values()) + sizes[i] <= world:
            sizes[i] *= 2
    groups, start = [], 0
    for i, unit in enumerate(unit_list):
        groups.append(Group(unit, Mesh(range(start, start + sizes[i]))))
        start += sizes[i]
    return Layout("each group apart, by compute", tuple(groups))


def _power_of_two_floor(x: float) -> int:
    return 1 if x < 2 else 2 ** int(math.log2(x))


def _compute_load(request: PlacementRequest, unit: tuple[str, ...]) -> float:
    load = 0.0
    for m in unit:
        spec = request.specs[m]
        factor = 6 * request.work.num_training_epoch if spec.trainable else 2
        load += factor * max(spec.params, 1)
    return load


def respects_constraints(layout: Layout, request: PlacementRequest) -> bool:
    if layout.groups and sum(g.mesh.size for g in layout.groups) > request.cluster.world_size:
        return False
    return all(
        not isinstance(request.num_gpu[m], int) or layout.mesh_of(m).size == request.num_gpu[m]
        for m in request.models
    )


def place(
    request: PlacementRequest, estimate: Callable[[Layout], float]
) -> tuple[Layout, list[str]]:
    """The layout to run, and report lines on how it was chosen."""
    unit_list = units(request)
    if request.cluster.world_size == 1:  # one process: everything on its one device
        layout = Layout("one device", (Group(request.models, Mesh(range(1))),))
        check_layout(layout, request)
        wanted = [f"{m}: num_gpu {n}" for m, n in request.num_gpu.items()
                  if isinstance(n, int) and n > 1]  # fmt: skip
        if not wanted:
            return layout, []
        return layout, [f"world size 1: every model on r0 ({', '.join(wanted)} apply under "
                        "torchrun with more ranks)"]  # fmt: skip
    if is_explicit(request):
        layout = explicit_layout(request, unit_list)
        check_layout(layout, request)
        return layout, []
    report, best, best_time, rejected, fixes = [], None, math.inf, [], []
    for layout in candidate_layouts(request, unit_list):
        if not respects_constraints(layout, request):
            continue
        try:
            check_layout(layout, request)
        except LayoutError as err:
            rejected.append(f"{layout.name}: {err.reason}")
            fixes.append(err.fix)
            continue
        seconds = estimate(layout)
        report.append(f"  {layout.name}: {format_seconds(seconds)}")
        if seconds < best_time:
            best, best_time = layout, seconds
    if best is None:
        if not rejected:
            raise PlanError(
                "no candidate layout keeps the num_gpu and colocation settings: give every "
                "model an integer num_gpu (explicit placement) or leave more of them on auto"
            )
        reasons = "\n  ".join(rejected)
        todo = "; or ".join(dict.fromkeys(fixes))
        raise PlanError(f"no placement fits the cluster:\n  {reasons}\nTo fix: {todo}")
    lines = ["auto placement compared (estimated episode time):", *report]
    lines += [f"  {reason} (rejected)" for reason in rejected[:SHOWN_REJECTIONS]]
    if len(rejected) > SHOWN_REJECTIONS:
        lines.append(f"  ... and {len(rejected) - SHOWN_REJECTIONS} more layouts rejected")
    lines.append(f"  chosen: {best.name}")
    return best, lines
