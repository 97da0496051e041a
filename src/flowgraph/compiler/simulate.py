"""Simulate pass: a dry run of every group's stream, before anything is launched.

Semantics (what the runtime implements): ``SEND`` is asynchronous (it completes locally;
the batch waits at the receiver), ``RECV`` blocks until its ``SEND`` was issued,
``BCAST`` and ``GATHER`` are collectives that every member group must reach; everything
else is local. The run proves that every send has its receive, that every pair of groups
receives in the order it sends (NCCL matches messages in order and ignores tags), every
collective is entered by all its members in the same order, and nothing waits forever;
it returns the estimated time of every instruction and a logical step number for the
Step x Rank grid.

A plan that would hang is rejected with the instructions involved::

    PlanError: deadlock: r0-r3 waits at `RECV mb0 %b r4-r7->r0-r3`, whose sender r4-r7
    waits at `RECV mb0 %a r0-r3->r4-r7`
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flowgraph.compiler.cluster import format_ranks
from flowgraph.compiler.plan import Estimates, Instruction, RankStream
from flowgraph.errors import PlanError


@dataclass
class Simulation:
    steps: list[list[int]]
    start: list[list[float]]
    end: list[list[float]]
    estimates: Estimates


def _stream_index(streams: Sequence[RankStream]) -> dict[int, int]:
    return {rank: i for i, s in enumerate(streams) for rank in s.ranks}


def _members(ins: Instruction, owner: dict[int, int]) -> tuple[int, ...]:
    groups = {owner.get(ins.src_ranks[0], -1), owner.get(ins.dst_ranks[0], -1)}
    return tuple(sorted(groups))


def check_matching(streams: Sequence[RankStream]) -> None:
    """Every SEND has one RECV, every collective appears once in each member's stream."""
    owner = _stream_index(streams)
    sends: Counter = Counter()
    recvs: Counter = Counter()
    where: dict[tuple, tuple[int, Instruction]] = {}
    collectives: dict[tuple, set[int]] = {}
    for i, stream in enumerate(streams):
        for ins in stream.instructions:
            if not ins.is_communication:
                continue
            members = _members(ins, owner)
            if -1 in members:
                raise PlanError(f"`{ins}` in {stream.name} names ranks that run no stream")
            if ins.op in ("SEND", "RECV"):
                side = ins.src_ranks if ins.op == "SEND" else ins.dst_ranks
                if owner[side[0]] != i:
                    raise PlanError(f"`{ins}` is in {stream.name}, not in {format_ranks(side)}")
                (sends if ins.op == "SEND" else recvs)[ins.key()] += 1
                where.setdefault(ins.key(), (i, ins))
            else:
                seen = collectives.setdefault(ins.key(), set())
                if i in seen:
                    raise PlanError(f"`{ins}` appears twice in {stream.name}")
                seen.add(i)
                where.setdefault(ins.key(), (i, ins))
    for key in sends.keys() | recvs.keys():
        if sends[key] != 1 or recvs[key] != 1:
            i, ins = where[key]
            raise PlanError(
                f"`{ins}` ({streams[i].name}) has {sends[key]} SEND and {recvs[key]} RECV; "
                "every transfer needs exactly one of each"
            )
    for key, seen in collectives.items():
        i, ins = where[key]
        missing = set(_members(ins, owner)) - seen
        if missing:
            names = ", ".join(streams[m].name for m in sorted(missing))
            raise PlanError(f"collective `{ins}` ({streams[i].name}) is never entered by {names}")


def check_pair_order(streams: Sequence[RankStream]) -> None:
    """For every ordered pair of groups, the receiver's RECVs come in the order of the
    sender's SENDs. NCCL ignores point-to-point tags and matches the messages between two
    ranks in the order they were posted, so any other order delivers the wrong batch."""
    owner = _stream_index(streams)
    sent: dict[tuple[int, int], list[Instruction]] = {}
    received: dict[tuple[int, int], list[Instruction]] = {}
    for stream in streams:
        for ins in stream.instructions:
            if ins.op in ("SEND", "RECV"):
                pair = (owner[ins.src_ranks[0]], owner[ins.dst_ranks[0]])
                (sent if ins.op == "SEND" else received).setdefault(pair, []).append(ins)
    for pair, sends in sent.items():
        for position, (send, recv) in enumerate(zip(sends, received.get(pair, []), strict=False)):
            if send.key() != recv.key():
                src, dst = (streams[i].name for i in pair)
                raise PlanError(
                    f"{src} sends to {dst} in another order than {dst} receives: message "
                    f"{position} is `{send}` but {dst} expects `{recv}` there; NCCL matches "
                    "messages between two ranks in order (it ignores tags), so the receives "
                    "must follow the sends"
                )


def simulate(
    streams: Sequence[RankStream], duration: Callable[[int, Instruction], float], world: int
) -> Simulation:
    """Run all streams; ``duration(stream_index, ins)`` gives each instruction's seconds."""
    check_matching(streams)
    check_pair_order(streams)
    owner = _stream_index(streams)
    n = len(streams)
    pc = [0] * n
    clock = [0.0] * n
    last_step = [0] * n
    steps = [[0] * len(s.instructions) for s in streams]
    start = [[0.0] * len(s.instructions) for s in streams]
    end = [[0.0] * len(s.instructions) for s in streams]
    sent: dict[tuple, tuple[float, int]] = {}  # key -> (time issued, step)
    waiting: dict[tuple, set[int]] = {}
    busy = [0.0] * n

    def finish(i: int, t0: float, seconds: float, step: int) -> None:
        k = pc[i]
        steps[i][k], start[i][k], end[i][k] = step, t0, t0 + seconds
        clock[i], last_step[i] = t0 + seconds, step
        if streams[i].instructions[k].phase != "eval":  # eval runs only on some episodes
            busy[i] += seconds
        pc[i] += 1

    progress = True
    while progress:
        progress = False
        for i, stream in enumerate(streams):
            while pc[i] < len(stream.instructions):
                ins = stream.instructions[pc[i]]
                if ins.op == "SEND":
                    sent[ins.key()] = (clock[i], last_step[i] + 1)
                    finish(i, clock[i], 0.0, last_step[i] + 1)
                elif ins.op == "RECV":
                    if ins.key() not in sent:
                        break
                    issued, send_step = sent[ins.key()]
                    t0 = max(clock[i], issued)
                    finish(i, t0, duration(i, ins), max(last_step[i] + 1, send_step))
                elif ins.is_communication:
                    members = _members(ins, owner)
                    group = waiting.setdefault(ins.key(), set())
                    group.add(i)
                    if set(members) - group:
                        break
                    t0 = max(clock[m] for m in members)
                    step = max(last_step[m] for m in members) + 1
                    seconds = duration(i, ins)
                    for m in members:
                        finish(m, t0, seconds, step)
                    del waiting[ins.key()]
                else:
                    finish(i, clock[i], duration(i, ins), last_step[i] + 1)
                progress = True
    stuck = [i for i in range(n) if pc[i] < len(streams[i].instructions)]
    if stuck:
        raise PlanError(_deadlock_message(streams, stuck, pc, owner))
    return Simulation(steps, start, end, _estimates(streams, start, end, busy, world))


def _deadlock_message(
    streams: Sequence[RankStream], stuck: list[int], pc: list[int], owner: dict[int, int]
) -> str:
    i = stuck[0]
    ins = streams[i].instructions[pc[i]]
    if ins.op == "RECV":
        other = owner[ins.src_ranks[0]]
        role = "sender"
    else:
        other = next((m for m in _members(ins, owner) if m != i), i)
        role = "partner"
    blocked = (
        streams[other].instructions[pc[other]]
        if pc[other] < len(streams[other].instructions)
        else None
    )
    tail = f"waits at `{blocked}`" if blocked is not None else "has finished its stream"
    return (
        f"deadlock: {streams[i].name} waits at `{ins}`, whose {role} {streams[other].name} {tail}; "
        "reorder the streams so that both reach matching instructions"
    )


def _estimates(
    streams: Sequence[RankStream],
    start: list[list[float]],
    end: list[list[float]],
    busy: list[float],
    world: int,
) -> Estimates:
    spans: dict[str, list[float]] = {}
    episode = 0.0
    for s, stream in enumerate(streams):
        for k, ins in enumerate(stream.instructions):
            span = spans.setdefault(ins.phase, [float("inf"), 0.0])
            span[0] = min(span[0], start[s][k])
            span[1] = max(span[1], end[s][k])
            if ins.phase != "eval":
                episode = max(episode, end[s][k])
    phase_s = {p: max(0.0, hi - lo) for p, (lo, hi) in spans.items()}
    used = sum(b * len(stream.ranks) for b, stream in zip(busy, streams, strict=True))
    bubble = 1.0 - used / (episode * world) if episode > 0 else 0.0
    return Estimates(
        episode_s=episode,
        phase_s=phase_s,
        busy_s={stream.name: b for stream, b in zip(streams, busy, strict=True)},
        bubble=max(0.0, bubble),
    )
