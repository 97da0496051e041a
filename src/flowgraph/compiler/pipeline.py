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
from dataclasses import dataclass, field, replace

from flowgraph.compiler import cost
from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.compiler.graph import Graph
from flowgraph.compiler.lower import lower
from flowgraph.compiler.placement import Layout, PlacementRequest, place, producers
from flowgraph.compiler.plan import (
    Instruction,
    PhaseSpec,
    PlacementEntry,
    Plan,
    RankStream,
    SyncSpec,
    format_seconds,
)
from flowgraph.compiler.profile import Profile
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
    profile: Profile | None = None  # measured costs (flowc profile) instead of the model

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

    @property
    def micro_batches(self) -> dict[str, int]:
        """Generation micro-batches per episode of the env and eval phases."""
        gen = self.config.runtime.generation_batch_size
        return {"env": math.ceil(self.config.runtime.sample_per_episode / gen),
                "eval": math.ceil(self.program.eval_samples / gen)}  # fmt: skip

    @property
    def bucket_bytes(self) -> int:
        """Bytes of one weight-sync bucket (``runtime.sync_bucket_mb``)."""
        return self.config.runtime.sync_bucket_mb * 2**20


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
    graphs = ctx.program.graphs
    env, evaluation = graphs.get("env"), graphs.get("eval")
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
        eval_models=frozenset(evaluation.models() if evaluation else ()),
        eval_microbatches=ctx.micro_batches["eval"],
        producers=producers(graphs),
        syncs=ctx.program.syncs,
    )

    def estimate(layout: Layout) -> float:
        return _episode_seconds(CompileContext(ctx.program, ctx.config, ctx.cluster, ctx.specs,
                                               layout, profile=ctx.profile))  # fmt: skip

    ctx.layout, ctx.notes = place(request, estimate)


def schedule_streams(ctx: CompileContext) -> None:
    work = ctx.work
    ctx.syncs = tuple(
        SyncSpec(src, dst, max(1, math.ceil(_sync_bytes(ctx, src, dst) / ctx.bucket_bytes)))
        for src, dst in ctx.program.syncs
    )
    mesh_size = {m: g.mesh.size for g in ctx.layout.groups for m in g.models}
    ctx.phases = lower(ctx.program.graphs, mesh_size)
    ctx.streams = schedule(
        ScheduleInput(
            phases=ctx.phases,
            layout=ctx.layout,
            syncs=ctx.syncs,
            env_microbatches=ctx.micro_batches["env"],
            eval_microbatches=ctx.micro_batches["eval"],
            train_steps=work.train_steps,
            offloaded=frozenset(m for m, s in ctx.specs.items() if s.offload),
            max_staleness=ctx.config.runtime.max_staleness,
        )
    )


def _sync_bytes(ctx: CompileContext, src: str, dst: str) -> float:
    """Bytes one sync writes: the source's parameters in the destination's dtype (the
    sender casts, so that is also what travels)."""
    return ctx.specs[src].params * ctx.specs[dst].value_bytes


def _bucket_sent(ctx: CompileContext, ins: Instruction) -> float:
    """Bytes of bucket ``ins.bucket`` of a weight sync (the last one holds the rest)."""
    total = _sync_bytes(ctx, ins.src, ins.dst)
    return min(ctx.bucket_bytes, total - ins.bucket * ctx.bucket_bytes)


def simulate_streams(ctx: CompileContext) -> None:
    durations = _durations(ctx) if ctx.profile is None else _profiled(ctx, _durations(ctx))
    ctx.simulation = simulate(ctx.streams, durations, ctx.layout.devices)
    if ctx.profile is not None and ctx.profile.overhead_s:  # measured time between instructions
        estimates = ctx.simulation.estimates
        ctx.simulation.estimates = replace(
            estimates, episode_s=estimates.episode_s + ctx.profile.overhead_s
        )


def check_profile(ctx: CompileContext) -> None:
    """A profile describes one kind of device: refuse it for another."""
    profile = ctx.profile
    if profile is None:
        return
    if profile.device != ctx.cluster.device:
        flag = "--cpu" if profile.device == "cpu" else "no --cpu"
        raise PlanError(
            f"the profile {profile.source or ''} was measured on {profile.device} devices but "
            f"the plan is for {ctx.cluster.device} devices: plan with {flag}, or profile the "
            "devices you will run on"
        )


def _profiled(ctx: CompileContext, analytical: Callable[[int, Instruction], float]):
    """Instruction durations from the profile where it measured them, else the model's."""
    profile, work = ctx.profile, ctx.work
    mesh = {m: g.mesh for g in ctx.layout.groups for m in g.models}
    waves = _Waves.of(ctx)
    generating = _generating(ctx)
    links = {kind: profile.link(kind) for kind in ("p2p", "gather", "broadcast", "allreduce")}

    def seconds(group: int, ins: Instruction) -> float:
        if ins.op == "RUN":
            n = mesh[ins.model].size
            node = ctx.phases[ins.phase].node(ins.node)
            call = profile.call(ins.model, node.method, ins.phase,
                                (ins.phase, ins.node) in generating)  # fmt: skip
            if call is not None:
                tokens = work.response_length if call.generate else work.tokens_per_sample
                if ins.phase == "train":
                    return call.seconds(work.train_global_batch_size / n, tokens)
                calls = waves.per_rank(ins, n)  # one call per micro-batch the rank owns
                return calls * call.seconds(waves.rows_per_call(ins.phase), tokens)
        if ins.op == "TRAIN":
            n = mesh[ins.model].size
            step = profile.trainer(ins.model)
            if step is not None:
                total = step.seconds(work.train_global_batch_size / n, work.tokens_per_sample)
                if n > 1 and links["allreduce"] is not None:
                    total += links["allreduce"].seconds(
                        cost.allreduce_bytes(ctx.specs[ins.model].params, n)
                    )
                return total
        if ins.op == "RECV" and links["p2p"] is not None:
            pairs = min(len(ins.src_ranks), len(ins.dst_ranks))
            return links["p2p"].seconds(waves.wave_bytes(ins, work) / pairs)
        if (
            ins.op == "GATHER"
            and links["gather"] is not None
            and len(set(ins.src_ranks) | set(ins.dst_ranks)) > 1
        ):
            return links["gather"].seconds(waves.wave_bytes(ins, work))
        if ins.op == "BCAST" and links["broadcast"] is not None:
            return links["broadcast"].seconds(_bucket_sent(ctx, ins))
        if ins.op == "SYNC" and profile.sync_bytes_per_s:
            return _sync_bytes(ctx, ins.src, ins.dst) / profile.sync_bytes_per_s
        return analytical(group, ins)

    return seconds


def compare_on_policy(ctx: CompileContext) -> None:
    """With ``max_staleness`` >= 1, note the estimated gain over on-policy training: the
    same layout with k = 0, and (under auto placement) the best on-policy layout."""
    k = ctx.config.runtime.max_staleness
    if not k:
        return
    runtime = ctx.config.runtime.model_copy(update={"max_staleness": 0})
    on_policy = ctx.config.model_copy(update={"runtime": runtime})
    same = CompileContext(ctx.program, on_policy, ctx.cluster, ctx.specs, ctx.layout,
                          profile=ctx.profile)  # fmt: skip
    schedule_streams(same)
    simulate_streams(same)
    async_s = ctx.simulation.estimates.episode_s
    lines = [f"max_staleness={k}: {format_seconds(async_s)} per episode; on-policy "
             f"(max_staleness=0) on this layout {_versus(same, async_s)}"]  # fmt: skip
    if any(note.startswith("auto placement compared") for note in ctx.notes):
        best = CompileContext(ctx.program, on_policy, ctx.cluster, ctx.specs,
                              profile=ctx.profile)  # fmt: skip
        place_models(best)
        schedule_streams(best)
        simulate_streams(best)
        lines.append(f"  best on-policy layout ({best.layout.name}) {_versus(best, async_s)}")
    ctx.notes = [*ctx.notes, *lines]


def _versus(ctx: CompileContext, async_s: float) -> str:
    seconds = ctx.simulation.estimates.episode_s
    gain = seconds / async_s if async_s else 1.0
    return f"{format_seconds(seconds)} (asynchronous {gain:.2f}x)"


@dataclass(frozen=True)
class _Waves:
    """What one wave of a phase holds: its micro-batches (the last wave may be partial),
    the busiest rank's share of them, and the rows of one micro-batch."""

    gen: int
    rows: int  # rows (answers) per prompt in the env
    width: dict[str, int]
    total: dict[str, int]

    @classmethod
    def of(cls, ctx: CompileContext) -> _Waves:
        return cls(ctx.work.generation_batch_size, ctx.work.rows_per_sample,
                   {phase: spec.width for phase, spec in ctx.phases.items()},
                   ctx.micro_batches)  # fmt: skip

    def micro_batches(self, ins: Instruction) -> int:
        wide = self.width.get(ins.phase, 1)
        if ins.wave is None or ins.phase not in self.total:
            return wide
        return max(0, min(wide, self.total[ins.phase] - ins.wave * wide))

    def per_rank(self, ins: Instruction, n: int) -> int:
        """Micro-batches of the wave on its busiest rank (one model call each)."""
        return min(self.width.get(ins.phase, 1) // n, self.micro_batches(ins))

    def rows_per_call(self, phase: str) -> int:
        return self.gen * (self.rows if phase == "env" else 1)

    def wave_bytes(self, ins: Instruction, work: cost.Workload) -> float:
        return cost.batch_bytes(self.micro_batches(ins) * self.rows_per_call(ins.phase), work)


def _generating(ctx: CompileContext) -> set[tuple[str, str]]:
    """(phase, node) of the env and eval calls that generate: those reading only the
    flow's input (the policy; a model reading another's output scores it)."""
    return {(phase, n.name) for phase in ("env", "eval") if phase in ctx.phases
            for n in ctx.phases[phase].nodes if generates(n, ctx.phases[phase].input)}  # fmt: skip


def generates(node, flow_input: str) -> bool:
    """A call generates when it reads only the flow's input (the policy's call)."""
    return bool(node.inputs) and all(name == flow_input for name in node.inputs)


def _durations(ctx: CompileContext) -> Callable[[int, Instruction], float]:
    work, cluster = ctx.work, ctx.cluster
    mesh = {m: g.mesh for g in ctx.layout.groups for m in g.models}
    waves = _Waves.of(ctx)
    generating = _generating(ctx)

    def seconds(_: int, ins: Instruction) -> float:
        if ins.op == "RUN":
            spec, n = ctx.specs[ins.model], mesh[ins.model].size
            generate = (ins.phase, ins.node) in generating
            if ins.phase == "train":
                return cost.run_seconds(spec, work.train_global_batch_size / n, generate, work,
                                        cluster)  # fmt: skip
            calls = waves.per_rank(ins, n)  # one call per micro-batch the rank owns
            rows = waves.rows_per_call(ins.phase)  # an env prompt has its answers' rows
            return calls * cost.run_seconds(spec, rows, generate, work, cluster)
        if ins.op == "TRAIN":
            return cost.train_step_seconds(
                ctx.specs[ins.model].params, mesh[ins.model].ranks, work, cluster
            )
        if ins.op in ("RECV", "GATHER"):
            pairs = min(len(ins.src_ranks), len(ins.dst_ranks)) if ins.op == "RECV" else 1
            nbytes = waves.wave_bytes(ins, work) / pairs
            return cost.transfer_seconds(nbytes, ins.src_ranks + ins.dst_ranks, cluster)
        if ins.op == "BCAST":
            return cost.transfer_seconds(_bucket_sent(ctx, ins), ins.src_ranks + ins.dst_ranks,
                                         cluster)  # fmt: skip
        if ins.op == "SYNC":
            return _sync_bytes(ctx, ins.src, ins.dst) / (cluster.memcpy_gbps * 1e9)
        if ins.op in ("FREE", "LOAD"):
            spec = ctx.specs[ins.model]
            m = cost.memory(spec, mesh[ins.model].size, work, cluster)
            return (m.weights + m.optimizer) / HOST_LINK_BYTES_PER_S
        return 0.0

    return seconds


PASSES: tuple[Callable[[CompileContext], None], ...] = (
    check_profile,
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


def compile_plan(
    program: Program, config: Config, cluster: ClusterSpec, profile: Profile | None = None
) -> Plan:
    """The plan for running ``program`` on ``cluster`` with ``config`` (estimated with the
    measured costs of ``profile`` when given)."""
    ctx = CompileContext(program, config, cluster, profile=profile)
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
        notes=_profile_notes(profile, cluster) + ctx.notes,
        max_staleness=config.runtime.max_staleness,
    )


def _profile_notes(profile: Profile | None, cluster: ClusterSpec) -> list[str]:
    if profile is None:
        return []
    warning = profile.mismatch(cluster.device, cluster.devices_per_node)
    return [profile.describe(), *([warning] if warning else [])]


def estimate_layout(
    program: Program,
    config: Config,
    cluster: ClusterSpec,
    layout: Layout,
    profile: Profile | None = None,
) -> float:
    """The estimated episode seconds of ``program`` on a given ``layout``."""
    ctx = CompileContext(program, config, cluster, layout=layout, profile=profile)
    size_models(ctx)
    return _episode_seconds(ctx)


def _episode_seconds(ctx: CompileContext) -> float:
    """Schedule and simulate ``ctx``'s (sized, placed) layout: its episode seconds."""
    schedule_streams(ctx)
    simulate_streams(ctx)
    return ctx.simulation.estimates.episode_s


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
