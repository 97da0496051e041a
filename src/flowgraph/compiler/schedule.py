"""Schedule pass: one instruction stream per rank group for one episode.

Phases run in order: ``env`` (the env flow over micro-batch waves), ``train`` (the
trainer flow once per global step), ``sync`` (trainer -> inference weights), ``eval``
(the eval flow; the runtime runs it only on evaluation episodes).

A *wave* is ``L`` consecutive micro-batches, ``L`` the least common multiple of the mesh
sizes involved, so every rank of every mesh handles ``L / mesh size`` micro-batches per
wave and all ranks of a group share one stream. The micro-batch count need not be a
multiple of ``L``: the last wave is then partial, and the ranks whose share lies past the
end own nothing in it (they run its instructions on no data). Groups with one model
step through waves one by one (disjoint groups pipeline: policy works on wave 1 while
reward scores wave 0); groups of colocated models run stage by stage (all waves of one
model, then the next), which keeps device memory for one model at a time. A node's output
is sent (asynchronously) once to every other group that consumes it, right after it is
produced. At the end of the
env phase the env's output is gathered on every rank of each trainer group (trainers
shuffle the whole episode's data into global steps); eval outputs are gathered on rank
0's group.

Receives follow the sender's order: for every ordered pair of groups, the receiver takes
the pair's messages in exactly the order the sender sends them, receiving (and keeping) an
earlier message before the one it needs next when the orders would differ. NCCL ignores
point-to-point tags and matches messages between two ranks in order, so a plan is correct
on NCCL only this way; sends are asynchronous, so receiving early never waits longer.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass

from flowgraph.compiler.placement import Layout
from flowgraph.compiler.plan import Instruction, NodeSpec, PhaseSpec, RankStream, SyncSpec
from flowgraph.errors import LayoutError, PlanError


@dataclass(frozen=True)
class ScheduleInput:
    """The lowered phases, the layout, syncs and micro-batch counts."""

    phases: dict[str, PhaseSpec]
    layout: Layout
    syncs: tuple[SyncSpec, ...]
    env_microbatches: int
    eval_microbatches: int
    train_steps: int
    offloaded: frozenset[str] = frozenset()
    max_staleness: int = 0


class _Builder:
    """Appends instructions to the streams of one layout."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.streams = [RankStream(g.mesh.ranks, list(g.models)) for g in layout.groups]
        self.group_of = {m: i for i, g in enumerate(layout.groups) for m in g.models}

    def emit(self, group: int, ins: Instruction) -> None:
        self.streams[group].instructions.append(ins)

    def transfer(
        self, op: str, phase: str, node: str, index: int, src: int, dst: int
    ) -> Instruction:
        return Instruction(
            op,
            phase,
            node,
            **_index(phase, index),
            src_ranks=self.streams[src].ranks,
            dst_ranks=self.streams[dst].ranks,
        )


def _index(phase: str, index: int) -> dict[str, int]:
    """Waves in env/eval, global steps in train."""
    return {"step": index} if phase == "train" else {"wave": index}


def waves_for(meshes: list[int], microbatches: int) -> int:
    """Number of waves of ``lcm(meshes)`` micro-batches (the last one may be partial)."""
    if not meshes:
        return 0
    return max(1, math.ceil(microbatches / math.lcm(*meshes)))


def _work_order(b: _Builder, spec: PhaseSpec, iterations: int) -> list[list[tuple[NodeSpec, int]]]:
    """Per group, the (node, iteration) pairs it computes, in order."""
    orders = []
    for group in range(len(b.streams)):
        own = [n for n in spec.nodes if b.group_of[n.model] == group]
        if len({n.model for n in own}) > 1:  # colocated: stage by stage
            orders.append([(n, i) for n in own for i in range(iterations)])
        else:  # alone: wave by wave, so disjoint groups pipeline
            orders.append([(n, i) for i in range(iterations) for n in own])
    return orders


def _graph_phase(b: _Builder, spec: PhaseSpec, phase: str, iterations: int) -> None:
    """Schedule one phase over ``iterations`` (waves, or global steps for train).

    Every group computes its nodes and sends each output (asynchronously) to every other
    group that consumes it; before a node needs a remote input, the group receives from
    that sender, in the sender's order, up to and including the input.
    """
    consumers: dict[str, set[int]] = {n.name: set() for n in spec.nodes}
    for node in spec.nodes:
        for producer in node.inputs:
            if producer != spec.input:
                consumers[producer].add(b.group_of[node.model])
    orders = _work_order(b, spec, iterations)
    outgoing: dict[tuple[int, int], deque[tuple[str, int]]] = defaultdict(deque)
    for group, order in enumerate(orders):
        for node, i in order:
            for dst in sorted(consumers[node.name] - {group}):
                outgoing[(group, dst)].append((node.name, i))
    for group, order in enumerate(orders):
        received: set[tuple[str, int]] = set()
        for node, i in order:
            for producer in node.inputs:
                if producer == spec.input:
                    continue
                src = b.group_of[spec.node(producer).model]
                if phase == "train" and src != group:
                    raise _split_trainer_flow(spec, spec.node(producer), node, b)
                queue = outgoing[(src, group)]
                while src != group and (producer, i) not in received:
                    name, j = queue.popleft()
                    b.emit(group, b.transfer("RECV", phase, name, j, src, group))
                    received.add((name, j))
            op = "TRAIN" if node.trains else "RUN"
            b.emit(group, Instruction(op, phase, node.name, node.model, node.method,
                                      **_index(phase, i)))  # fmt: skip
            for dst in sorted(consumers[node.name] - {group}):
                b.emit(group, b.transfer("SEND", phase, node.name, i, group, dst))


def _split_trainer_flow(spec: PhaseSpec, producer: NodeSpec, consumer: NodeSpec,
                        b: _Builder) -> LayoutError:  # fmt: skip
    """The runtime moves no batches between groups inside a global step: the models the
    trainer flow chains must share ranks."""
    where = b.streams[b.group_of[producer.model]].name
    there = b.streams[b.group_of[consumer.model]].name
    return LayoutError(
        f"the trainer flow passes %{producer.name} from {producer.model} ({where}) to "
        f"{consumer.model} ({there}) within a global step "
        f"({consumer.source or consumer.call_text()})",
        f"put the models the trainer flow chains on the same ranks: runtime.colocation="
        f"[[{producer.model}, {consumer.model}], ...]",
    )


def _gather(b: _Builder, spec: PhaseSpec, phase: str, waves: int, dst: int) -> None:
    """Collect the phase's returned output on every rank of group ``dst``: one collective
    per wave, after both groups' own work in the phase (an all-gather when ``dst`` is the
    producing group itself)."""
    if spec.returned is None:
        return
    src = b.group_of[spec.node(spec.returned).model]
    for wave in range(waves):
        ins = b.transfer("GATHER", phase, spec.returned, wave, src, dst)
        b.emit(src, ins)
        if dst != src:
            b.emit(dst, ins)


def schedule(inp: ScheduleInput) -> list[RankStream]:
    """Per-group instruction streams for one episode (streams are in layout order).

    With ``max_staleness`` k >= 1 a stream is one iteration of the asynchronous loop:
    ``train`` (episode e) comes before ``env`` (episode e+k, generated with the weights of
    the sync after e-1), so on disjoint devices the two overlap and meet at the env's
    ``GATHER``; then ``sync`` (after e) and ``eval``."""
    b = _Builder(inp.layout)
    env, trainer, evaluation = (inp.phases.get(k) for k in ("env", "train", "eval"))
    mesh_size = {m: g.mesh.size for g in inp.layout.groups for m in g.models}
    if inp.max_staleness:
        _check_stale_env(env, trainer, inp.max_staleness)
        if trainer is not None:
            _graph_phase(b, trainer, "train", inp.train_steps)
    if env is not None and env.nodes:
        env_waves = waves_for([mesh_size[m] for m in env.models()], inp.env_microbatches)
        _graph_phase(b, env, "env", env_waves)
        if trainer is not None:  # every trainer rank holds the whole episode's data
            for group in sorted({b.group_of[m] for m in trainer.models()}):
                _gather(b, env, "env", env_waves, group)
    if trainer is not None and not inp.max_staleness:
        _graph_phase(b, trainer, "train", inp.train_steps)
    for pair in inp.syncs:
        src, dst = b.group_of[pair.src], b.group_of[pair.dst]
        if src == dst:
            b.emit(src, Instruction("SYNC", "sync", src=pair.src, dst=pair.dst))
            continue
        for bucket in range(pair.buckets):
            ins = Instruction(
                "BCAST",
                "sync",
                bucket=bucket,
                src_ranks=b.streams[src].ranks,
                dst_ranks=b.streams[dst].ranks,
                src=pair.src,
                dst=pair.dst,
            )
            b.emit(src, ins)
            b.emit(dst, ins)
    if evaluation is not None and evaluation.nodes:
        eval_waves = waves_for([mesh_size[m] for m in evaluation.models()], inp.eval_microbatches)
        _graph_phase(b, evaluation, "eval", eval_waves)
        rank0 = next(i for i, s in enumerate(b.streams) if 0 in s.ranks)
        _gather(b, evaluation, "eval", eval_waves, rank0)
    for stream in b.streams:
        _insert_offload(stream, inp.offloaded)
    return b.streams


def _check_stale_env(env: PhaseSpec | None, trainer: PhaseSpec | None, k: int) -> None:
    """With stale rollouts the env flow may only call inference models: a trained model
    called there would generate with weights newer than the episode's version."""
    if env is None or trainer is None:
        return
    trained = {n.model for n in trainer.nodes if n.trains}
    for node in env.nodes:
        if node.model in trained:
            raise PlanError(
                f"runtime.max_staleness={k} generates with weights synced {k} episode(s) "
                f"ago, but the env flow calls the trained model {node.model!r} "
                f"({node.source or node.call_text()}): call an inference copy there and "
                f"keep it up to date with set_parameter_sync({node.model}, <copy>), or set "
                "runtime.max_staleness=0"
            )


def _insert_offload(stream: RankStream, offloaded: frozenset[str]) -> None:
    """LOAD an offloaded model before its first instruction in each phase, FREE it after
    its last one, when it shares its ranks with other models."""
    if len(stream.models) < 2 or not offloaded.intersection(stream.models):
        return
    result: list[Instruction] = []
    by_phase: dict[str, list[Instruction]] = {}
    for ins in stream.instructions:
        by_phase.setdefault(ins.phase, []).append(ins)
    for phase, instructions in by_phase.items():
        touched = [m for m in stream.models if m in offloaded]
        first, last = {}, {}
        for i, ins in enumerate(instructions):
            for m in ins.models:
                if m in touched:
                    first.setdefault(m, i)
                    last[m] = i
        for i, ins in enumerate(instructions):
            result += [Instruction("LOAD", phase, model=m) for m in touched if first.get(m) == i]
            result.append(ins)
            result += [Instruction("FREE", phase, model=m) for m in touched if last.get(m) == i]
    stream.instructions = result
