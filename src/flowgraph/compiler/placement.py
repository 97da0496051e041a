"""Placement pass: every model gets a ``Mesh`` (its ranks).

Rank groups are the unit of placement: the models of one group share its ranks and run
stage by stage; disjoint groups run concurrently and pipeline micro-batch waves.

- Explicit: every model has an integer ``num_gpu`` and ``runtime.colocation`` is a list.
  Each colocation group gets ``num_gpu`` ranks shared by its members; every other model
  gets ranks of its own; groups are laid out in order of first use in the flows. Ranks
  left over are idle (the notes say so).
- Automatic (any ``num_gpu: auto``, or ``colocation: auto``): candidate layouts are
  compared with the cost model and the fastest one that fits memory and the batches wins
  (estimates within ``TIE`` of the fastest count as a tie, won by the layout with fewer
  devices). Candidates keep the user's colocation groups together and the user's integer
  ``num_gpu`` values exact; a model without parameters (a rule reward) joins the group of
  the model whose output it reads instead of taking devices. Every group is sized by what
  its models can use, so a layout may leave devices idle: an inference model at most the
  env's micro-batches (``ceil(sample_per_episode / generation_batch_size)``; a mesh need
  not divide them, the last wave is partial), a trainer a mesh that splits a global step
  evenly (``train_global_batch_size % (train_micro_batch_size * n) == 0``), a model only
  the eval flow calls at most the eval's micro-batches. Families: everything on one
  group; trainers apart from inference models (several splits); with two trainers or
  more, the actor/critic split (HybridFlow's "split"): one group per trainer with the
  inference copies synced from it and the models that read their output first, at equal
  shares and at shares by load; every group on its own share, by load. A group's load is
  the cost model's single-device time for its episode's work (decoding included).
- An infeasible request is one error of at most three lines: the binding constraint and
  the smallest change that fixes it.

What a model can use, whether a layout fits, and the explanations (infeasible requests,
idle devices) are ``feasibility.py``'s; the data classes are ``layout.py``'s, re-exported
here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from flowgraph.compiler import cost
from flowgraph.compiler.cluster import Mesh, format_ranks
from flowgraph.compiler.feasibility import (
    check_layout,
    first_problem,
    fixed_size,
    idle_note,
    infeasible_message,
    largest_size,
    model_cap,
    unit_cap,
)
from flowgraph.compiler.layout import Group, Layout, PlacementRequest
from flowgraph.compiler.plan import format_seconds
from flowgraph.errors import LayoutError, PlanError, did_you_mean

__all__ = [
    "SHOWN_REJECTIONS",
    "TIE",
    "Group",
    "Layout",
    "PlacementRequest",
    "candidate_layouts",
    "check_layout",
    "explicit_layout",
    "fold_parameterless",
    "is_explicit",
    "largest_size",
    "model_cap",
    "place",
    "producers",
    "respects_constraints",
    "unit_cap",
    "units",
]

SHOWN_REJECTIONS = 4  # rejected layouts listed in the plan's notes
TIE = 0.01  # estimates this close (relative) to the fastest tie; fewer devices win a tie


def producers(graphs: Mapping[str, object]) -> dict[str, str | None]:
    """For every model, the model whose output its first call reads first (the env flow
    first, then the others in order); ``None`` when that call reads only the flow's input."""
    result: dict[str, str | None] = {}
    for role in sorted(graphs, key=lambda r: r != "env"):
        graph = graphs[role]
        for node in graph.calls():
            if node.model in result:
                continue
            made = (graph.node(i) for i in node.inputs)
            result[node.model] = next(
                (n.model for n in made if n.op == "call_model" and n.model != node.model), None
            )
    return result


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


def fold_parameterless(
    request: PlacementRequest, unit_list: list[tuple[str, ...]]
) -> list[tuple[str, ...]]:
    """Units after every model without parameters (alone, ``num_gpu: auto``) joined the
    unit of the model whose output it reads (a model reading only the flow's input joins
    the first unit): it costs no memory, and apart it would only add transfers."""
    position = {m: i for i, m in enumerate(request.models)}

    def movable(unit: tuple[str, ...]) -> bool:
        m = unit[0]
        return (
            len(unit) == 1
            and request.specs[m].params == 0
            and not isinstance(request.num_gpu[m], int)
        )

    kept = [u for u in unit_list if not movable(u)]
    if not kept:  # nothing has parameters: one unit of everything
        return [tuple(sorted((m for u in unit_list for m in u), key=position.__getitem__))]
    home = {m: i for i, u in enumerate(kept) for m in u}
    moving = [u[0] for u in unit_list if movable(u)]
    members = [list(u) for u in kept]
    for m in moving:
        seen, host = {m}, request.producers.get(m)
        while host is not None and host not in home and host not in seen:
            seen.add(host)  # the producer has no parameters either: follow it
            host = request.producers.get(host)
        members[home.get(host, 0)].append(m)
    return [tuple(sorted(u, key=position.__getitem__)) for u in members]


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


# -- candidates --------------------------------------------------------------------------
def _size(unit: tuple[str, ...], limit: int, request: PlacementRequest) -> int | None:
    """The user's num_gpu for ``unit`` if set, else the largest acceptable size <= limit."""
    fixed = fixed_size(unit, request)
    if fixed is not None:
        return fixed
    return largest_size(unit, min(limit, unit_cap(unit, request)), request)


def candidate_layouts(request: PlacementRequest, unit_list: list[tuple[str, ...]]) -> list[Layout]:
    """The layouts automatic placement compares (before memory is checked), each group
    sized by what its models can use."""
    world = request.cluster.world_size
    all_models = _merged(request, unit_list)
    n = _size(all_models, world, request)
    if n is None:  # a ZeRO-3 trainer whose steps do not split over every rank: say so
        n = world
    layouts = [Layout(f"colocate all on {n}", (Group(all_models, Mesh(range(n))),))]
    trainer_units = [u for u in unit_list if any(request.specs[m].trainable for m in u)]
    other_units = [u for u in unit_list if u not in trainer_units]
    if trainer_units and other_units and world > 1:
        infer, train = _merged(request, other_units), _merged(request, trainer_units)
        infer_cap = fixed_size(infer, request) or min(unit_cap(infer, request), world - 1)
        for point in _split_points(world, infer_cap):
            b = _size(train, world - point, request)
            if b is None or b >= world:
                continue
            a = fixed_size(infer, request) or min(infer_cap, world - b)  # inference takes the rest
            if a < 1:
                continue
            layouts.append(
                Layout(
                    f"inference {a} + trainers {b}",
                    (Group(infer, Mesh(range(a))), Group(train, Mesh(range(a, a + b)))),
                )
            )
    layouts += _actor_critic(request, unit_list)
    if 1 < len(unit_list) <= world:
        apart = _apart(request, unit_list)
        if apart is not None:
            layouts.append(apart)
    unique: dict[tuple, Layout] = {}
    for layout in layouts:
        key = tuple((g.models, g.mesh.size) for g in layout.groups)
        unique.setdefault(key, layout)
    return list(unique.values())


def _split_points(world: int, limit: int) -> list[int]:
    """Inference mesh sizes to try: eighths of the cluster and powers of two, up to what
    the inference models can use."""
    points = {world * k // 8 for k in range(1, 8)} | {2**j for j in range(world.bit_length())}
    tried = {min(p, limit) for p in points if 0 < p < world}
    return sorted(tried | {limit} if 0 < limit < world - 1 else tried)


def _apart(request: PlacementRequest, unit_list: list[tuple[str, ...]]) -> Layout | None:
    """Each unit alone, with devices in proportion to its compute up to what it can use
    (fixed num_gpu kept); ``None`` when the units cannot each get a device."""
    world = request.cluster.world_size
    fixed = {i: f for i, u in enumerate(unit_list) if (f := fixed_size(u, request)) is not None}
    free = world - sum(fixed.values())
    loads = {i: _compute_load(request, u) for i, u in enumerate(unit_list) if i not in fixed}
    caps = {i: unit_cap(unit_list[i], request) for i in loads}
    total = sum(loads.values()) or 1.0
    sizes = dict(fixed)
    for i, load in loads.items():
        wanted = min(caps[i], _power_of_two_floor(free * load / total))
        size = largest_size(unit_list[i], wanted, request)
        if size is None:
            return None  # a ZeRO-3 trainer cannot have a share of the cluster
        sizes[i] = size
    # Rounding every unit up to one device may overshoot: halve the largest until it fits.
    while sum(sizes.values()) > world:
        shrinkable = [i for i in loads if sizes[i] > 1]
        if not shrinkable:
            return None
        largest = max(shrinkable, key=lambda k: (sizes[k], -k))
        sizes[largest] = largest_size(unit_list[largest], sizes[largest] // 2, request) or 1
    # Hand leftover devices to the heaviest units, doubling while they fit and can use them.
    for i in sorted(loads, key=lambda k: (-loads[k], k)):
        while True:
            grown = largest_size(unit_list[i], min(caps[i], 2 * sizes[i]), request)
            if grown is None or grown <= sizes[i] or sum(sizes.values()) - sizes[i] + grown > world:
                break
            sizes[i] = grown
    groups, start = [], 0
    for i, unit in enumerate(unit_list):
        groups.append(Group(unit, Mesh(range(start, start + sizes[i]))))
        start += sizes[i]
    return Layout("each group apart, by compute", tuple(groups))


def _power_of_two_floor(x: float) -> int:
    return 1 if x < 2 else 2 ** int(math.log2(x))


def _actor_critic(request: PlacementRequest, unit_list: list[tuple[str, ...]]) -> list[Layout]:
    """HybridFlow's split, generalised: one group per trainer, on ranks of its own, halves
    of the cluster (equal shares for more trainers) and shares by estimated load; none with
    fewer than two trainers, or when a share cannot be built."""
    groups = _trainer_groups(request, unit_list)
    if groups is None:
        return []
    loads = [sum(_compute_load(request, u) for u in parts) for parts in groups]
    merged = [_merged(request, parts) for parts in groups]
    layouts = []
    for weights in ([1.0] * len(groups), loads):
        sizes = _shares(request, merged, weights)
        if sizes is None:
            continue
        placed, start = [], 0
        for models, size in zip(merged, sizes, strict=True):
            placed.append(Group(models, Mesh(range(start, start + size))))
            start += size
        name = f"actor/critic split {' + '.join(str(n) for n in sizes)}"
        layouts.append(Layout(name, tuple(placed)))
    return layouts


def _merged(request: PlacementRequest, parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The models of ``parts`` in first-use order."""
    position = {m: i for i, m in enumerate(request.models)}
    return tuple(sorted((m for u in parts for m in u), key=position.__getitem__))


def _trainer_groups(
    request: PlacementRequest, unit_list: list[tuple[str, ...]]
) -> list[list[tuple[str, ...]]] | None:
    """The units gathered into one group per trainer: the trainer, the inference copies
    synced from it (``request.syncs``), and every other unit joins the group of the model
    whose output it reads first (``request.producers``, followed through other such units;
    the first group when it reads only the flow's input); such a unit with the user's
    ``num_gpu`` keeps ranks of its own instead, as in ``_apart``. Units holding models of
    two groups (a user's colocation) merge them. ``None`` when fewer than two trainer
    groups remain."""
    trainers = [m for m in request.models if request.specs[m].trainable]
    if len(trainers) < 2:
        return None
    parent = {t: t for t in trainers}

    def find(t: str) -> str:
        while parent[t] != t:
            t = parent[t]
        return t

    owner = {t: t for t in trainers}
    for src, dst in request.syncs:
        if src in owner and dst in request.specs and dst not in owner:
            owner[dst] = owner[src]
    for unit in unit_list:  # a colocation group holding two trainers' models: one group
        keys = sorted({find(owner[m]) for m in unit if m in owner}, key=trainers.index)
        for k in keys[1:]:
            parent[k] = keys[0]
    unit_of = {m: i for i, u in enumerate(unit_list) for m in u}

    def key_of(i: int) -> str | None:
        return next((find(owner[m]) for m in unit_list[i] if m in owner), None)

    keys = [key_of(i) for i in range(len(unit_list))]
    trainer_keys = {k for k in keys if k is not None}
    for i, unit in enumerate(unit_list):
        if keys[i] is not None:
            continue
        if fixed_size(unit, request) is not None:  # the user's num_gpu: its own ranks
            keys[i] = f"unit {i}"
            continue
        for m in unit:  # follow the producers of its models until one is in a group
            seen, host = set(unit), request.producers.get(m)
            while host is not None and host in unit_of and key_of(unit_of[host]) is None:
                if host in seen:
                    host = None
                    break
                seen.add(host)
                host = request.producers.get(host)
            if host is not None and host in unit_of:
                keys[i] = key_of(unit_of[host])
                break
    order: list[str] = []  # groups in first-use order of their units
    for k in keys:
        if k is not None and k not in order:
            order.append(k)
    if len(trainer_keys) < 2:
        return None
    first = next(k for k in order if k in trainer_keys)
    grouped: list[list[tuple[str, ...]]] = [[] for _ in order]
    for i, unit in enumerate(unit_list):
        grouped[order.index(keys[i] if keys[i] is not None else first)].append(unit)
    return grouped


def _shares(
    request: PlacementRequest, groups: list[tuple[str, ...]], weights: list[float]
) -> list[int] | None:
    """Mesh sizes for ``groups`` side by side: the user's num_gpu where set, the others the
    largest size each accepts within its share of the free devices (``weights``), then
    leftover devices to the heaviest groups while they can use them; ``None`` if a group
    cannot have a share (a ZeRO-3 trainer) or the groups do not fit."""
    world = request.cluster.world_size
    fixed = {i: f for i, g in enumerate(groups) if (f := fixed_size(g, request)) is not None}
    free = world - sum(fixed.values())
    open_ = [i for i in range(len(groups)) if i not in fixed]
    total = sum(weights[i] for i in open_) or 1.0
    sizes = dict(fixed)
    for i in open_:
        share = max(1, int(free * weights[i] / total))
        size = largest_size(groups[i], min(share, unit_cap(groups[i], request)), request)
        if size is None:
            return None
        sizes[i] = size
    if sum(sizes.values()) > world:
        return None
    for i in sorted(open_, key=lambda k: (-weights[k], k)):
        spare = world - sum(sizes.values())
        limit = min(unit_cap(groups[i], request), sizes[i] + spare)
        sizes[i] = max(sizes[i], largest_size(groups[i], limit, request) or 0)
    return [sizes[i] for i in range(len(groups))]


def _compute_load(request: PlacementRequest, unit: tuple[str, ...]) -> float:
    """Seconds one device would spend on ``unit``'s work in an episode, by the cost model:
    a trainer its optimizer steps (``cost.train_step_seconds`` on one device, times the
    episode's steps); an inference model of the env flow its micro-batches
    (``cost.run_seconds`` of one micro-batch, generating when its first call reads only the
    flow's input, i.e. it is the first model called on the batch, scoring otherwise); a
    model only the eval flow calls the eval's micro-batches; a frozen model of the trainer
    flow a global batch scored per step."""
    work, cluster = request.work, request.cluster
    steps = max(1, work.train_steps)
    load = 0.0
    for m in unit:
        spec = request.specs[m]
        generate = request.producers.get(m) is None
        if spec.trainable:
            load += steps * cost.train_step_seconds(spec.params, (0,), work, cluster)
        elif m in request.inference_models or m in request.eval_models:
            rows = work.generation_batch_size * (
                work.rows_per_sample if m in request.inference_models else 1
            )
            calls = (request.env_microbatches if m in request.inference_models
                     else max(1, request.eval_microbatches))  # fmt: skip
            load += calls * cost.run_seconds(spec, rows, generate, work, cluster)
        else:
            samples = work.train_global_batch_size
            load += steps * cost.run_seconds(spec, samples, False, work, cluster)
    return load


def respects_constraints(layout: Layout, request: PlacementRequest) -> bool:
    if layout.groups and layout.devices > request.cluster.world_size:
        return False
    return all(
        not isinstance(request.num_gpu[m], int) or layout.mesh_of(m).size == request.num_gpu[m]
        for m in request.models
    )


# -- the pass ----------------------------------------------------------------------------
def place(
    request: PlacementRequest, estimate: Callable[[Layout], float]
) -> tuple[Layout, list[str]]:
    """The layout to run, and report lines on how it was chosen."""
    unit_list = units(request)
    world = request.cluster.world_size
    if world == 1:  # one process: everything on its one device
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
        idle = world - layout.devices
        if not idle:
            return layout, []
        spare = format_ranks(range(layout.devices, world))
        return layout, [f"{idle:,} of {world:,} devices idle ({spare}): the num_gpu settings "
                        f"use {layout.devices:,}"]  # fmt: skip
    unit_list = fold_parameterless(request, unit_list)
    timed: list[tuple[float, Layout]] = []
    rejected: list[tuple[Layout, LayoutError, float]] = []
    for layout in candidate_layouts(request, unit_list):
        if not respects_constraints(layout, request):
            continue
        problem = first_problem(layout, request)
        if problem is not None:
            rejected.append((layout, *problem))
            continue
        try:
            timed.append((estimate(layout), layout))
        except LayoutError as err:  # found by scheduling (the trainer flow split over groups)
            rejected.append((layout, err, 0.0))
    if not timed:
        if not rejected:
            raise PlanError(
                "no candidate layout keeps the num_gpu and colocation settings: give every "
                "model an integer num_gpu (explicit placement) or leave more of them on auto"
            )
        raise PlanError(infeasible_message(request, unit_list, rejected))
    fastest = min(seconds for seconds, _ in timed)
    best = min((layout for seconds, layout in timed if seconds <= fastest * (1 + TIE)),
               key=lambda layout: layout.devices)  # fmt: skip
    lines = ["auto placement compared (estimated episode time):"]
    lines += [f"  {layout.name}: {format_seconds(seconds)}" for seconds, layout in timed]
    lines += [f"  {layout.name}: {err.reason} (rejected)"
              for layout, err, _ in rejected[:SHOWN_REJECTIONS]]  # fmt: skip
    if len(rejected) > SHOWN_REJECTIONS:
        lines.append(f"  ... and {len(rejected) - SHOWN_REJECTIONS} more layouts rejected")
    lines.append(f"  chosen: {best.name}")
    return best, lines + idle_note(request, best)
