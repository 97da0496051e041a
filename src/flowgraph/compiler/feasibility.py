"""Feasibility: whether a layout can run, how many devices a model can use, and why not.

Placement (``placement.py``) builds candidate layouts; this module judges them:

- Capacity: the most devices a model can use (``model_cap``: an inference model the env's
  micro-batches, a trainer the micro-batches of a global step, a ZeRO-3 trainer every rank)
  and the largest mesh size a group accepts (``largest_size``: a trainer's mesh splits a
  global step evenly).
- Checks: ``check_layout`` raises ``LayoutError`` for the first constraint a layout breaks
  (ZeRO-3 on fewer than every rank, a global step that does not split, memory per device);
  ``first_problem`` returns it with how far over the memory budget the layout is.
- Explanations: ``infeasible_message`` (when no candidate fits: the binding constraint and
  the smallest change that fixes it, in at most three lines) and ``idle_note`` (why the
  chosen layout leaves devices idle, and which settings would use them).

Example: a policy and its trainer, 16 samples per episode in micro-batches of 8, global
steps of 16 in micro-batches of 1, on 8 devices:

>>> from flowgraph.compiler.cluster import ClusterSpec, Mesh
>>> from flowgraph.compiler.cost import ModelSpec, Workload
>>> from flowgraph.compiler.layout import Group, Layout, PlacementRequest
>>> request = PlacementRequest(
...     models=("policy", "ppo"),
...     specs={"policy": ModelSpec("policy", 10**9, trainable=False),
...            "ppo": ModelSpec("ppo", 10**9, trainable=True)},
...     num_gpu={"policy": "auto", "ppo": "auto"}, colocation="auto",
...     inference_models=frozenset({"policy"}),
...     work=Workload(16, 8, 1, 16, 1, prompt_length=128, response_length=128),
...     cluster=ClusterSpec(nodes=1, devices_per_node=8))
>>> model_cap("policy", request), model_cap("ppo", request)
(2, 8)
>>> largest_size(("ppo",), 6, request)  # 16 micro-batches split evenly over 4, not 5 or 6
4
>>> check_layout(Layout("odd", (Group(("ppo",), Mesh(range(3))),)), request)
Traceback (most recent call last):
...
flowgraph.errors.LayoutError: ppo trains on 3 devices, so train_global_batch_size (16) must be \
a multiple of train_micro_batch_size x 3 = 3: change the batch sizes or models.ppo.num_gpu
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import TYPE_CHECKING

from flowgraph.compiler.cost import ModelSpec, format_bytes, memory
from flowgraph.errors import LayoutError

if TYPE_CHECKING:
    from flowgraph.compiler.layout import Layout, PlacementRequest


# -- what a group of models can use ---------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _divisors(n: int) -> tuple[int, ...]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return tuple(sorted({*small, *(n // d for d in small)}))


def fixed_size(unit: tuple[str, ...], request: PlacementRequest) -> int | None:
    """The user's integer num_gpu for ``unit`` (its models share one), else ``None``."""
    sizes = {request.num_gpu[m] for m in unit if isinstance(request.num_gpu[m], int)}
    return sizes.pop() if len(sizes) == 1 else None


def model_cap(model: str, request: PlacementRequest) -> int:
    """The most devices ``model`` can use: beyond it, its extra ranks would have nothing to
    do in any wave or step."""
    spec, world = request.specs[model], request.cluster.world_size
    if spec.zero_stage == 3:
        return world  # ZeRO-3 partitions over all ranks
    if spec.trainable:
        return min(world, max(1, request.step_microbatches))
    if model in request.inference_models:
        return min(world, request.env_microbatches)
    if model in request.eval_models:
        return min(world, max(1, request.eval_microbatches))
    return min(world, max(1, request.step_microbatches))  # a frozen model of the trainer flow


def unit_cap(unit: tuple[str, ...], request: PlacementRequest) -> int:
    return max(model_cap(m, request) for m in unit)


def largest_size(unit: tuple[str, ...], limit: int, request: PlacementRequest) -> int | None:
    """The largest mesh size <= ``limit`` that every model of ``unit`` accepts: a trainer
    one that splits a global step evenly, a ZeRO-3 trainer every rank; ``None`` if none."""
    world = request.cluster.world_size
    specs = [request.specs[m] for m in unit]
    trains = any(s.trainable for s in specs)
    steps = request.step_microbatches
    if any(s.zero_stage == 3 for s in specs):
        ok = world <= limit and (not trains or world == 1 or (steps and steps % world == 0))
        return world if ok else None
    if limit < 1:
        return None
    if not trains:
        return limit
    if not steps:
        return 1
    return max(d for d in _divisors(steps) if d <= limit)


# -- constraints -------------------------------------------------------------------------
def _group_memory(models: tuple[str, ...], n: int, request: PlacementRequest, offload=None):
    """(bytes per device, per-model usage) of ``models`` sharing ``n`` devices."""
    usage = {m: memory(request.specs[m], n, request.work, request.cluster).total for m in models}
    offloaded = [m for m in models if (request.specs[m].offload if offload is None else offload)]
    resident = sum(v for m, v in usage.items() if m not in offloaded)
    return resident + max((usage[m] for m in offloaded), default=0.0), usage


def check_layout(layout: Layout, request: PlacementRequest) -> None:
    """Raise ``LayoutError`` when a layout does not fit memory, when a trainer's mesh does
    not split its global steps evenly, or when a ZeRO-3 trainer's mesh is not every rank.
    (Inference meshes need not divide the env's micro-batches: the last wave is partial.)"""
    problem = first_problem(layout, request)
    if problem is not None:
        raise problem[0]


def first_problem(layout: Layout, request: PlacementRequest) -> tuple[LayoutError, float] | None:
    """The first constraint ``layout`` breaks, with how far over the memory budget it is
    (0 for the others), or ``None``. Batch and ZeRO-3 constraints come first: no memory
    setting lifts them."""
    work, world = request.work, request.cluster.world_size
    for group in layout.groups:
        n = group.mesh.size
        for m in group.models:
            spec = request.specs[m]
            if spec.zero_stage == 3 and n != world:
                ranks = list(group.mesh.ranks) if n <= 8 else str(group.mesh)
                return LayoutError(
                    f"models.{m}: zero_stage 3 on ranks {ranks} of {world}: "
                    "DeepSpeed partitions ZeRO-3 models with a barrier over all ranks, so the "
                    "trainer's mesh must cover every rank",
                    f"colocate it with the other models (runtime.colocation, num_gpu: {world}) "
                    "or use zero_stage 1 or 2",
                ), 0.0
            per_step = work.train_micro_batch_size * n
            if spec.trainable and n > 1 and work.train_global_batch_size % per_step:
                return _batch_error(m, n, request), 0.0
    budget = request.cluster.device_memory_bytes
    for group in layout.groups:
        n = group.mesh.size
        total, usage = _group_memory(group.models, n, request)
        if total > budget:
            shown = [f"{m} {format_bytes(v)}" for m, v in usage.items()]
            if len(shown) > 6:  # a long chain of models: the first few say enough
                shown = [*shown[:5], f"and {len(shown) - 5} more"]
            detail = ", ".join(shown)
            return LayoutError(
                f"{group.mesh} needs {format_bytes(total)} per device ({detail}) but has "
                f"{format_bytes(budget)}",
                _group_memory_fix(group.models, n, request),
            ), total / budget
    return None


def _batch_error(m: str, n: int, request: PlacementRequest) -> LayoutError:
    work = request.work
    global_bs, micro = work.train_global_batch_size, work.train_micro_batch_size
    if request.specs[m].zero_stage == 3:
        return LayoutError(
            f"{m} trains with zero_stage 3, so on all {n:,} devices, but a global step has "
            f"{global_bs / micro:g} micro-batches (train_global_batch_size {global_bs} / "
            f"train_micro_batch_size {micro}), which do not split evenly over {n:,}",
            f"use zero_stage 1 or 2 (placement may then leave devices idle), or make "
            f"train_global_batch_size a multiple of train_micro_batch_size x {n:,} = "
            f"{micro * n:,}",
        )
    return LayoutError(
        f"{m} trains on {n} devices, so train_global_batch_size ({global_bs}) must be a "
        f"multiple of train_micro_batch_size x {n} = {micro * n}",
        f"change the batch sizes or models.{m}.num_gpu",
    )


def _group_memory_fix(models: tuple[str, ...], n: int, request: PlacementRequest) -> str:
    """The smallest change that lets ``models`` fit on ``n`` devices, as far as it can tell."""
    budget = request.cluster.device_memory_bytes
    if len(models) == 1:
        return _render(_model_memory_fix(models[0], n, request), models)
    total, _ = _group_memory(models, n, request, offload=True)
    if total <= budget and not all(request.specs[m].offload for m in models):
        return (f"set offload: true on {', '.join(models)} (then {format_bytes(total)} per "
                "device), or place them apart")  # fmt: skip
    return "place these models apart, or give them more memory (see each model's total)"


def _model_memory_fix(m: str, n: int, request: PlacementRequest) -> str:
    """What lets ``m`` fit on ``n`` devices, as a template for ``_render`` (``{key}`` is
    the model's config section, ``{who}`` names the models it is for), so that models with
    the same fix share one clause."""
    spec, work, cluster = request.specs[m], request.work, request.cluster
    budget, world = cluster.device_memory_bytes, cluster.world_size
    usage = memory(spec, n, work, cluster)
    if spec.trainable:
        for stage in range(spec.zero_stage + 1, 4):
            mesh = world if stage == 3 else n
            sharded = replace(spec, zero_stage=stage)
            need = memory(sharded, mesh, work, cluster).total
            if stage == 3 and largest_size((m,), world, _with_spec(request, sharded)) is None:
                if need <= budget:  # its global step does not split over every rank yet
                    per_step = work.train_micro_batch_size * world
                    return (f"set {{key}}.backend: deepspeed and zero_stage: 3{{who}} (then "
                            f"{format_bytes(need)} per device) and make train_global_batch_size "
                            f"a multiple of train_micro_batch_size x {world:,} = {per_step:,} "
                            "(ZeRO-3 trains on every rank)")  # fmt: skip
                continue
            if need <= budget:
                return (f"set {{key}}.backend: deepspeed and zero_stage: {stage}{{who}} (then "
                        f"{format_bytes(need)} per device on {mesh:,} devices)")  # fmt: skip
        if usage.activations > budget / 4 and work.train_micro_batch_size > 1:
            return (f"lower runtime.train_micro_batch_size{{who}} (activations take "
                    f"{format_bytes(usage.activations)}), or use devices with more memory "
                    "(flowc compile --device-memory GIB)")  # fmt: skip
    else:
        if spec.precision == "fp32":
            need = memory(replace(spec, precision="bf16"), n, work, cluster).total
            if need <= budget:
                return f"set {{key}}.precision: bf16{{who}} (then {format_bytes(need)} per device)"
        per_sample = usage.activations / work.generation_batch_size
        if usage.weights < budget and per_sample > 0:
            fitting = int((budget - usage.weights) // per_sample)
            if 1 <= fitting < work.generation_batch_size:
                return (f"lower runtime.generation_batch_size to {fitting}{{who}} (the KV cache "
                        f"takes {format_bytes(usage.activations)} at "
                        f"{work.generation_batch_size})")  # fmt: skip
    sharding = "trainers beyond ZeRO-3" if spec.trainable else "inference models"
    return (f"use devices with at least {format_bytes(usage.total)} (flowc compile "
            f"--device-memory GIB){{who}}: flowgraph does not shard {sharding}")  # fmt: skip


def _render(template: str, models: list[str] | tuple[str, ...]) -> str:
    if len(models) == 1:
        return template.format(key=f"models.{models[0]}", who="")
    return template.format(key="models.<name>", who=f" for {', '.join(models)}")


def _with_spec(request: PlacementRequest, spec: ModelSpec) -> PlacementRequest:
    return replace(request, specs={**request.specs, spec.name: spec})


# -- why a request is infeasible, why devices are idle ----------------------------------
def infeasible_message(
    request: PlacementRequest,
    unit_list: list[tuple[str, ...]],
    rejected: list[tuple[Layout, LayoutError, float]],
) -> str:
    """At most three lines: the constraint that binds and the smallest change that fixes it."""
    budget = request.cluster.device_memory_bytes
    world = request.cluster.world_size
    failing = []  # groups that do not fit even on the largest mesh they can have
    for unit in unit_list:
        n = fixed_size(unit, request) or largest_size(unit, world, request)
        if n is not None and _group_memory(unit, n, request)[0] > budget:
            failing.append((unit, n))
    if failing:
        unit, n = failing[0]
        total = _group_memory(unit, n, request)[0]
        who = " + ".join(unit)
        if not any(request.specs[m].trainable for m in unit) and fixed_size(unit, request) is None:
            where = "on any mesh (inference models are not sharded)"
        else:
            where = f"on its largest possible mesh ({n:,} device{'s' if n > 1 else ''})"
        others = [" + ".join(u) for u, _ in failing[1:]]
        also = f" (so do {', '.join(others)})" if others else ""
        fixes: dict[str, list[str]] = {}
        for u, size in failing:
            if len(u) == 1:
                fixes.setdefault(_model_memory_fix(u[0], size, request), []).append(u[0])
            else:
                fixes.setdefault(_group_memory_fix(u, size, request).replace("{", "{{"), [])
        fix = "; ".join(_render(t, ms or ["-"]) for t, ms in fixes.items())
        return (
            f"no placement fits the cluster: {who} needs {format_bytes(total)} per device "
            f"{where} but devices have {format_bytes(budget)}{also}\nTo fix: {fix}"
        )
    hard = [err for _, err, excess in rejected if not excess]
    if hard:  # the same batch or ZeRO-3 constraint in most layouts: the settings force it
        counts: dict[str, int] = {}
        for err in hard:
            counts[err.reason] = counts.get(err.reason, 0) + 1
        err = next(e for e in hard if counts[e.reason] == max(counts.values()))
        return f"no placement fits the cluster: {err.reason}\nTo fix: {err.fix}"
    layout, err, _ = min(rejected, key=lambda r: r[2])  # all over memory: the closest one
    return f"no placement fits the cluster ({layout.name}): {err.reason}\nTo fix: {err.fix}"


def idle_note(request: PlacementRequest, layout: Layout) -> list[str]:
    """Why devices are idle, naming the numbers that bind and the settings to change."""
    world, work = request.cluster.world_size, request.work
    idle = world - layout.devices
    if idle <= 0:
        return []
    limits: dict[str, tuple[str, str]] = {}  # kind -> (the limit, the setting that lifts it)
    for group in layout.groups:
        size, models = group.mesh.size, group.models
        fixed = fixed_size(models, request)
        if fixed is not None:
            limits["num_gpu"] = ("the num_gpu settings", "raise models.<name>.num_gpu")
            continue
        grown = largest_size(models, min(unit_cap(models, request), size + idle), request)
        if grown is not None and grown > size:  # this group could have used more
            return [f"{idle:,} of {world:,} devices idle: the chosen layout uses "
                    f"{layout.devices:,} (layouts with more devices were estimated slower, or "
                    "no faster)"]  # fmt: skip
        if any(m in request.inference_models for m in models) and (
            request.env_microbatches <= size
        ):
            limits["env"] = (
                f"the env has {_count(request.env_microbatches, 'micro-batch')}: "
                f"sample_per_episode {work.sample_per_episode:,} / generation_batch_size "
                f"{work.generation_batch_size}",
                "raise sample_per_episode (or lower generation_batch_size)",
            )
        if any(request.specs[m].trainable for m in models):
            limits["train"] = (
                f"a trainer's mesh must divide the "
                f"{_count(max(1, request.step_microbatches), 'micro-batch')} of a global step: "
                f"train_global_batch_size {work.train_global_batch_size:,} / "
                f"train_micro_batch_size {work.train_micro_batch_size}",
                "raise train_global_batch_size (or lower train_micro_batch_size)",
            )
        elif any(m in request.eval_models for m in models) and not limits.get("env"):
            limits["eval"] = (
                f"the eval has {_count(request.eval_microbatches, 'micro-batch')}",
                "give the evaluator more samples",
            )
    who = (f"{work.sample_per_episode:,} samples per episode keep" if "env" in limits
           else "the batch sizes keep" if limits.keys() - {"num_gpu"} else "")  # fmt: skip
    what = f"{idle:,} of {world:,} devices idle"
    head = f"{who} {what}" if who else what[0].upper() + what[1:]
    reasons = "; ".join(limit for limit, _ in limits.values())
    settings = ", and ".join(setting for _, setting in limits.values())
    return [f"{head} ({reasons})", f"  to use more devices: {settings}"]


def _count(n: int, noun: str) -> str:
    """``1 micro-batch``, ``2 micro-batches``."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}{'es' if noun.endswith('h') else 's'}"
