"""The compiler's driver: traced graphs + config + cluster -> ``Plan``.

The compiler consumes plain facts: the traced graphs and one ``ModelFacts`` per model
(parameters, backend, ZeRO stage, trainable, offload), computed by the Engine; it never
touches a live module. Passes share one signature, ``pass(ctx: CompileContext) -> None``,
and run in order: ``size_models`` (cost-model specs), ``place_models`` (meshes),
``schedule_streams`` (lowering to node tables, then instructions), ``simulate_streams``
(matching, deadlock freedom, estimates). The pass manager lints the graphs once before
the passes (which never change them) and prefixes any ``PlanError`` with the pass that
raised it. Compiling is pure: no GPU,
no process group.

Example::

    plan = compile_plan(engine.program(config), config, ClusterSpec.from_world_size(8))
    print(plan)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from flowgraph.compiler import cost
from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.compiler.graph import Graph
from flowgraph.compiler.lower import lower
from flowgraph.compiler.placement import Layout, PlacementRequest, place
from flowgraph.compiler.plan import (
    Instruction,
    PhaseSpec,
    PlacementEntry,
    Plan,
    RankStream,
    SyncSpec,
    format_seconds,
)
from flowgraph.compiler.schedule import ScheduleInput, schedule
from flowgraph.compiler.simulate import Simulation, simulate
from flowgraph.config import Config
from flowgraph.errors import PlanError
from flowgraph.precision import resolve

HOST_LINK_BYTES_PER_S = 25e9  # device <-> host memory, for offload


@dataclass(frozen=True)
class ModelFacts:
    """What the compiler knows of one model (the Engine computes it from the module and
    its config section)."""

    name: str
    params: int
    backend: str = "torch"  # "torch" | "deepspeed"
    zero_stage: int = 0
    trainable: bool = False
    offload: bool = False
    precision: str = "fp32"  # as configured: fp32 | bf16 | fp16 | auto


@dataclass(frozen=True)
class Program:
    """What the compiler needs from an Engine: graphs by role, model facts, syncs."""

    graphs: Mapping[str, Graph]
    models: Mapping[str, ModelFacts]
    syncs: tuple[tuple[str, str], ...]
    eval_samples: int = 0

    @property
    def trainable(self) -> frozenset[str]:
        return frozenset(name for name, facts in self.models.items() if facts.trainable)


@dataclass
class CompileContext:
    """Inputs, plus what each pass adds for the next one."""

    program: Program
    config: Config
    cluster: ClusterSpec
    specs: dict[str, cost.ModelSpec] = field(default_factory=dict)
    layout: Layout | None = None
    phases: dict[str, PhaseSpec] = field(default_factory=dict)
    syncs: tuple[SyncSpec, ...] = ()
    streams: list[RankStream] = field(default_factory=list)
    simulation: Simulation | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def work(self) -> cost.Workload:
        r = self.config.runtime
        return cost.Workload(
            sample_per_episode=r.sample_per_episode,
            rows_per_sample=r.num_inference_per_prompt,
            generation_batch_size=r.generation_batch_size,
            train_micro_batch_size=r.train_micro_batch_size,
            train_global_batch_size=r.global_batch_size,
            num_training_epoch=r.num_training_epoch,
            prompt_length=r.prompt_length,
            response_length=r.response_length,
        )

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.program.models)


def size_models(ctx: CompileContext) -> None:
    for name, facts in ctx.program.models.items():
        ctx.specs[name] = cost.ModelSpec(
            name=name,
            params=facts.params,
            trainable=facts.trainable,
            zero_stage=facts.zero_stage if facts.backend == "deepspeed" else 0,
            offload=facts.offload,
            precision=resolve(facts.precision, ctx.cluster.device),
        )


def place_models(ctx: CompileContext) -> None:
    env = ctx.program.graphs.get("env")
    inference = frozenset(
        m for m in (env.models() if env else []) if m not in ctx.program.trainable
    )
    request = PlacementRequest(
        models=ctx.models,
        specs=ctx.specs,
        num_gpu={m: ctx.config.model(m).num_gpu for m in ctx.models},
        colocation=ctx.config.runtime.colocation,
        inference_models=inference,
        work=ctx.work,
        cluster=ctx.cluster,
    )

    def estimate(layout: Layout) -> float:
        trial = CompileContext(ctx.program, ctx.config, ctx.cluster, ctx.specs, layout)
        schedule_streams(trial)
        simulate_streams(trial)
        return trial.simulation.estimates.episode_s

    ctx.layout, ctx.notes = place(request, estimate)


def schedule_streams(ctx: CompileContext) -> None:
    work = ctx.work
    bucket_bytes = ctx.config.runtime.sync_bucket_mb * 2**20
    ctx.syncs = tuple(
        SyncSpec(src, dst, max(1, math.ceil(_sync_bytes(ctx, src, dst) / bucket_bytes)))
        for src, dst in ctx.program.syncs
    )
    mesh_size = {m: g.mesh.size for g in ctx.layout.groups for m in g.models}
    ctx.phases = lower(ctx.program.graphs, mesh_size)
    gen = work.generation_batch_size
    ctx.streams = schedule(
        ScheduleInput(
            phases=ctx.phases,
            layout=ctx.layout,
            syncs=ctx.syncs,
            env_microbatches=math.ceil(work.sample_per_episode / gen),
            eval_microbatches=math.ceil(ctx.program.eval_samples / gen),
            train_steps=work.train_steps,
            offloaded=frozenset(m for m, s in ctx.specs.items() if s.offload),
            max_staleness=ctx.config.runtime.max_staleness,
        )
    )


def _sync_bytes(ctx: CompileContext, src: str, dst: str) -> float:
    """Bytes one sync writes: the source's parameters in the destination's dtype (the
    sender casts, so that is also what travels)."""
    return ctx.specs[src].params * ctx.specs[dst].value_bytes


def simulate_streams(ctx: CompileContext) -> None:
    ctx.simulation = simulate(ctx.streams, _durations(ctx), ctx.cluster.world_size)


def compare_on_policy(ctx: CompileContext) -> None:
    """With ``max_staleness`` >= 1, note the estimated gain over on-policy training: the
    same layout with k = 0, and (under auto placement) the best on-policy layout."""
    k = ctx.config.runtime.max_staleness
    if not k:
        return
    runtime = ctx.config.runtime.model_copy(update={"max_staleness": 0})
    on_policy = ctx.config.model_copy(update={"runtime": runtime})
    same = CompileContext(ctx.program, on_policy, ctx.cluster, ctx.specs, ctx.layout)
    schedule_streams(same)
    simulate_streams(same)
    async_s = ctx.simulation.estimates.episode_s
    lines = [f"max_staleness={k}: {format_seconds(async_s)} per episode; on-policy "
             f"(max_staleness=0) on this layout {_versus(same, async_s)}"]  # fmt: skip
    if any(note.startswith("auto placement compared") for note in ctx.notes):
        best = CompileContext(ctx.program, on_policy, ctx.cluster, ctx.specs)
        place_models(best)
        schedule_streams(best)
        simulate_streams(best)
        lines.append(f"  best on-policy layout ({best.layout.name}) {_versus(best, async_s)}")
    ctx.notes = [*ctx.notes, *lines]


def _versus(ctx: CompileContext, async_s: float) -> str:
    seconds = ctx.simulation.estimates.episode_s
    gain = seconds / async_s if async_s else 1.0
    return f"{format_seconds(seconds)} (asynchronous {gain:.2f}x)"


def _durations(ctx: CompileContext) -> Callable[[int, Instruction], float]:
    work, cluster = ctx.work, ctx.cluster
    bucket_bytes = ctx.config.runtime.sync_bucket_mb * 2**20
    mesh = {m: g.mesh for g in ctx.layout.groups for m in g.models}
    width = {phase: spec.width for phase, spec in ctx.phases.items()}
    env = ctx.phases.get("env")
    generating = {n.name for n in env.nodes if env.input in n.inputs} if env else set()

    def seconds(_: int, ins: Instruction) -> float:
        wave_samples = width.get(ins.phase, 1) * work.generation_batch_size
        if ins.op == "RUN":
            model = ins.model
            n = mesh[model].size
            if ins.phase == "train":
                samples = work.train_global_batch_size / n
            else:
                samples = wave_samples / n
            generate = ins.phase == "env" and ins.node in generating
            return cost.inference_seconds(
                ctx.specs[model].params, samples, 1, generate, work, cluster
            )
        if ins.op == "TRAIN":
            return cost.train_step_seconds(
                ctx.specs[ins.model].params, mesh[ins.model].ranks, work, cluster
            )
        if ins.op in ("RECV", "GATHER"):
            pairs = min(len(ins.src_ranks), len(ins.dst_ranks)) if ins.op == "RECV" else 1
            nbytes = cost.batch_bytes(wave_samples, work) / pairs
            return cost.transfer_seconds(nbytes, ins.src_ranks + ins.dst_ranks, cluster)
        if ins.op == "BCAST":
            total = _sync_bytes(ctx, ins.src, ins.dst)
            nbytes = min(bucket_bytes, total - ins.bucket * bucket_bytes)
            return cost.transfer_seconds(nbytes, ins.src_ranks + ins.dst_ranks, cluster)
        if ins.op == "SYNC":
            return _sync_bytes(ctx, ins.src, ins.dst) / (cluster.memcpy_gbps * 1e9)
        if ins.op in ("FREE", "LOAD"):
            spec = ctx.specs[ins.model]
            m = cost.memory(spec, mesh[ins.model].size, work, cluster)
            return (m.weights + m.optimizer) / HOST_LINK_BYTES_PER_S
        return 0.0

    return seconds


PASSES: tuple[Callable[[CompileContext], None], ...] = (
    size_models,
    place_models,
    schedule_streams,
    simulate_streams,
    compare_on_policy,
)


def run_passes(ctx: CompileContext, passes=PASSES) -> None:
    """Lint the graphs, then run ``passes`` in order; name the failing pass. (Passes write
    into the context, never into the graphs, so one lint before them suffices.)"""
    for graph in ctx.program.graphs.values():
        graph.lint(known_models=set(ctx.program.models))
    for compiler_pass in passes:
        try:
            compiler_pass(ctx)
        except PlanError as err:
            raise PlanError(f"[{compiler_pass.__name__}] {err}") from None


def compile_plan(program: Program, config: Config, cluster: ClusterSpec) -> Plan:
    """The plan for running ``program`` on ``cluster`` with ``config``."""
    ctx = CompileContext(program, config, cluster)
    run_passes(ctx)
    return Plan(
        cluster=cluster,
        placement=_placement_entries(ctx),
        phases=ctx.phases,
        syncs=list(ctx.syncs),
        streams=ctx.streams,
        steps=ctx.simulation.steps,
        times=[
            [[a, b] for a, b in zip(starts, ends, strict=True)]
            for starts, ends in zip(ctx.simulation.start, ctx.simulation.end, strict=True)
        ],
        estimates=ctx.simulation.estimates,
        waves=_waves(ctx),
        notes=ctx.notes,
        max_staleness=config.runtime.max_staleness,
    )


def _placement_entries(ctx: CompileContext) -> list[PlacementEntry]:
    entries = []
    for group in ctx.layout.groups:
        for name in group.models:
            spec = ctx.specs[name]
            m = cost.memory(spec, group.mesh.size, ctx.work, ctx.cluster)
            entries.append(
                PlacementEntry(
                    model=name,
                    ranks=group.mesh.ranks,
                    role="trainer" if spec.trainable else "inference",
                    params=spec.params,
                    weights=m.weights,
                    gradients=m.gradients,
                    optimizer=m.optimizer,
                    activations=m.activations,
                    precision=spec.precision,
                )
            )
    return entries


def _waves(ctx: CompileContext) -> dict[str, int]:
    counts: dict[str, int] = {}
    for stream in ctx.streams:
        for ins in stream.instructions:
            if ins.wave is not None:
                counts[ins.phase] = max(counts.get(ins.phase, 0), ins.wave + 1)
            if ins.step is not None:
                counts["train steps"] = max(counts.get("train steps", 0), ins.step + 1)
    return counts
