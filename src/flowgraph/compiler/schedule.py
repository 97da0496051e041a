"""Schedule pass: one instruction stream per rank group for one episode.

Phases run in order: ``env`` (the env graph over micro-batch waves), ``train`` (the
trainer graph once per global step), ``sync`` (trainer -> inference weights), ``eval``
(the eval graph; the runtime runs it only on evaluation episodes).

A *wave* is ``L`` consecutive micro-batches, ``L`` the least common multiple of the mesh
sizes involved, so every rank of every mesh handles ``L / mesh size`` micro-batches per
wave and all ranks of a group share one stream. Groups with one model step through waves
one by one (disjoint groups pipeline: policy works on wave 1 while reward scores wave 0);
groups of colocated models run stage by stage (all waves of one model, then the next),
which keeps device memory for one model at a time. A node's output is sent (asynchronously)
once to every other group that consumes it, right after it is produced, and received
right before its first use. At the end of the env phase the env's output is gathered on
every rank of each trainer group (trainers shuffle the whole episode's data into global
steps); eval outputs are gathered on rank 0's group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flowgraph.compiler.graph import TRAIN_METHOD, Graph
from flowgraph.compiler.placement import Layout
from flowgraph.compiler.plan import Instruction, RankStream
from flowgraph.errors import PlanError


@dataclass(frozen=True)
class SyncPair:
    src: str
    dst: str
    buckets: int


@dataclass(frozen=True)
class ScheduleInput:
    """The traced graphs by role, the layout, syncs and micro-batch counts."""

    graphs: dict[str, Graph]
    layout: Layout
    syncs: tuple[SyncPair, ...]
    env_microbatches: int
    eval_microbatches: int
    train_steps: int
    offloaded: frozenset[str] = frozenset()


class _Builder:
    """Appends instructions to the streams of one layout."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.streams = [RankStream(g.mesh.ranks, list(g.models)) for g in layout.groups]
        self.group_of = {m: i for i, g in enumerate(layout.groups) for m in g.models}

    def emit(self, group: int, ins: Instruction) -> None:
        self.streams[group].instructions.append(ins)

    def transfer(
        self, op: str, phase: str, node: str, wave: int, src: int, dst: int
    ) -> Instruction:
        return Instruction(
            op,
            phase,
            f"%{node}",
            mb=wave,
            src_ranks=self.streams[src].ranks,
            dst_ranks=self.streams[dst].ranks,
        )


def waves_for(meshes: list[int], microbatches: int, phase: str, exact: bool) -> int:
    """Number of waves of ``lcm(meshes)`` micro-batches; ``exact`` demands no remainder."""
    if not meshes:
        return 0
    width = math.lcm(*meshes)
    if exact and microbatches % width:
        raise PlanError(
            f"the {phase} phase has {microbatches} micro-batches per episode, which do not split "
            f"into equal waves over meshes of sizes {sorted(set(meshes))} (lcm {width}): use mesh "
            "sizes that divide one another (e.g. powers of two) or change the batch sizes"
        )
    return max(1, math.ceil(microbatches / width))


def _graph_phase(b: _Builder, graph: Graph, phase: str, waves: int) -> None:
    """Schedule one graph over ``waves`` iterations (waves, or global steps for train).

    Every group's stream is built on its own: RECV right before the first use of a remote
    input, RUN/TRAIN, then an (asynchronous) SEND to every other group that consumes the
    output.
    """
    calls = graph.calls()
    input_name = graph.input_node.name
    consumers: dict[str, set[int]] = {n.name: set() for n in calls}
    for node in calls:
        for producer in node.inputs:
            if producer != input_name:
                consumers[producer].add(b.group_of[node.model])
    for group in range(len(b.streams)):
        own = [n for n in calls if b.group_of[n.model] == group]
        if len({n.model for n in own}) > 1:  # colocated: stage by stage
            order = [(n, w) for n in own for w in range(waves)]
        else:  # alone: wave by wave, so disjoint groups pipeline
            order = [(n, w) for w in range(waves) for n in own]
        received: set[tuple[str, int]] = set()
        for node, wave in order:
            for producer in node.inputs:
                src = None if producer == input_name else b.group_of[graph.node(producer).model]
                if src is not None and src != group and (producer, wave) not in received:
                    received.add((producer, wave))
                    b.emit(group, b.transfer("RECV", phase, producer, wave, src, group))
            if node.method == TRAIN_METHOD:
                b.emit(group, Instruction("TRAIN", phase, node.model, step=wave))
            else:
                b.emit(group, Instruction("RUN", phase, node.target, mb=wave))
            for dst in sorted(consumers[node.name] - {group}):
                b.emit(group, b.transfer("SEND", phase, node.name, wave, group, dst))


def _gather(b: _Builder, graph: Graph, phase: str, waves: int, dst: int) -> None:
    """Collect the graph's returned output on every rank of group ``dst``: one collective
    per wave, after both groups' own work in the phase (an all-gather when ``dst`` is the
    producing group itself)."""
    if graph.returned is None:
        return
    src = b.group_of[graph.returned.model]
    for wave in range(waves):
        ins = b.transfer("GATHER", phase, graph.returned.name, wave, src, dst)
        b.emit(src, ins)
        if dst != src:
            b.emit(dst, ins)


def schedule(inp: ScheduleInput) -> list[RankStream]:
    """Per-group instruction streams for one episode (streams are in layout order)."""
    b = _Builder(inp.layout)
    env, trainer, evaluation = (inp.graphs.get(k) for k in ("env", "trainer", "eval"))
    mesh_size = {m: g.mesh.size for g in inp.layout.groups for m in g.models}
    if env is not None:
        env_waves = waves_for(
            [mesh_size[m] for m in env.models()], inp.env_microbatches, "env", exact=True
        )
        _graph_phase(b, env, "env", env_waves)
        if trainer is not None:  # every trainer rank holds the whole episode's data
            for group in sorted({b.group_of[m] for m in trainer.models()}):
                _gather(b, env, "env", env_waves, group)
    if trainer is not None:
        _graph_phase(b, trainer, "train", inp.train_steps)
    for pair in inp.syncs:
        src, dst = b.group_of[pair.src], b.group_of[pair.dst]
        if src == dst:
            b.emit(src, Instruction("SYNC", "sync", f"{pair.src}->{pair.dst}"))
            continue
        for bucket in range(pair.buckets):
            ins = Instruction(
                "BCAST",
                "sync",
                f"{pair.src}->{pair.dst}",
                bucket=bucket,
                src_ranks=b.streams[src].ranks,
                dst_ranks=b.streams[dst].ranks,
            )
            b.emit(src, ins)
            b.emit(dst, ins)
    if evaluation is not None and evaluation.calls():
        eval_waves = waves_for(
            [mesh_size[m] for m in evaluation.models()], inp.eval_microbatches, "eval", exact=False
        )
        _graph_phase(b, evaluation, "eval", eval_waves)
        rank0 = next(i for i, s in enumerate(b.streams) if 0 in s.ranks)
        _gather(b, evaluation, "eval", eval_waves, rank0)
    for stream in b.streams:
        _insert_offload(stream, inp.offloaded)
    return b.streams


def _insert_offload(stream: RankStream, offloaded: frozenset[str]) -> None:
    """LOAD an offloaded model before its first instruction in each phase, FREE it after
    its last one, when it shares its ranks with other models."""
    if len(stream.models) < 2:
        return
    result: list[Instruction] = []
    by_phase: dict[str, list[Instruction]] = {}
    for ins in stream.instructions:
        by_phase.setdefault(ins.phase, []).append(ins)
    for phase, instructions in by_phase.items():
        touched = [m for m in stream.models if m in offloaded]
        first, last = {}, {}
        for i, ins in enumerate(instructions):
            for m in _models_of(ins):
                if m in touched:
                    first.setdefault(m, i)
                    last[m] = i
        for i, ins in enumerate(instructions):
            result += [Instruction("LOAD", phase, m) for m in touched if first.get(m) == i]
            result.append(ins)
            result += [Instruction("FREE", phase, m) for m in touched if last.get(m) == i]
    stream.instructions = result


def _models_of(ins: Instruction) -> list[str]:
    if ins.op in ("RUN", "TRAIN"):
        return [ins.model]
    if ins.op in ("SYNC", "BCAST"):
        return ins.target.split("->")
    return []
