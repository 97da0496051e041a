"""The plan: per-rank-group instruction streams, placement and estimates, as plain data.

Every rank of a group runs the same stream (data parallelism: each rank handles its share
of every micro-batch wave), so a 16,384-device plan has one stream per group, not per
rank. Instructions have a compact text form that parses back::

    >>> ins = Instruction.parse("SEND mb3 %policy_out r0-r3->r4-r7", phase="env")
    >>> str(ins), ins.mb, ins.src_ranks
    ('SEND mb3 %policy_out r0-r3->r4-r7', 3, (0, 1, 2, 3))

Opcodes (``op``):

- ``RUN model.method[mbN]``: the model's step on this rank's share of wave N;
- ``SEND mbN %node A->B`` / ``RECV mbN %node A->B``: wave N of a node's output from rank
  group A to rank group B (a pair; every rank of both groups takes part);
- ``GATHER mbN %node A->B``: eval outputs collected on rank 0's group;
- ``TRAIN model[stepN]``: one optimizer step (all data-parallel ranks of the model);
- ``SYNC src->dst``: in-place weight copy between models on the same ranks;
- ``BCAST src->dst bucketN A->B``: one bucket of weights broadcast across groups;
- ``FREE model`` / ``LOAD model``: offload a model's device memory / bring it back.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from flowgraph.compiler.cluster import ClusterSpec, format_ranks
from flowgraph.compiler.cost import format_bytes, format_count
from flowgraph.errors import PlanError

OPS = ("RUN", "SEND", "RECV", "GATHER", "TRAIN", "SYNC", "BCAST", "FREE", "LOAD")
COMMUNICATION = ("SEND", "RECV", "GATHER", "BCAST")
PHASES = ("env", "train", "sync", "eval")


def parse_ranks(text: str) -> tuple[int, ...]:
    """``'r0-r3,r6'`` -> ``(0, 1, 2, 3, 6)``."""
    ranks: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"r(\d+)(?:-r(\d+))?", part)
        if not match:
            raise PlanError(f"cannot parse rank range {text!r}; expected e.g. r0-r3,r6")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        ranks.extend(range(first, last + 1))
    return tuple(ranks)


@dataclass(frozen=True)
class Instruction:
    """One step of a rank group's stream. ``str()`` and ``parse()`` round-trip."""

    op: str
    phase: str
    target: str = ""  # "policy.forward_step", "%policy_out", "ppo_policy->policy", "policy"
    mb: int | None = None
    step: int | None = None
    bucket: int | None = None
    src_ranks: tuple[int, ...] = ()
    dst_ranks: tuple[int, ...] = ()

    def __str__(self) -> str:
        route = f"{format_ranks(self.src_ranks)}->{format_ranks(self.dst_ranks)}"
        if self.op == "RUN":
            return f"RUN {self.target}[mb{self.mb}]"
        if self.op in ("SEND", "RECV", "GATHER"):
            return f"{self.op} mb{self.mb} {self.target} {route}"
        if self.op == "TRAIN":
            return f"TRAIN {self.target}[step{self.step}]"
        if self.op == "BCAST":
            return f"BCAST {self.target} bucket{self.bucket} {route}"
        return f"{self.op} {self.target}"

    @property
    def model(self) -> str:
        """The model a RUN/TRAIN/FREE/LOAD acts on."""
        return self.target.split(".")[0].split("->")[0]

    @property
    def is_communication(self) -> bool:
        return self.op in COMMUNICATION

    def key(self) -> tuple:
        """Matching key: a SEND meets the RECV with the same key, a collective meets itself."""
        op = "P2P" if self.op in ("SEND", "RECV") else self.op
        return (op, self.phase, self.target, self.mb, self.bucket, self.src_ranks, self.dst_ranks)

    @classmethod
    def parse(cls, text: str, phase: str) -> Instruction:
        op, _, rest = text.strip().partition(" ")
        if op not in OPS:
            raise PlanError(f"unknown instruction {text!r}; opcodes are {', '.join(OPS)}")
        try:
            return cls._parse(op, rest, phase)
        except (AttributeError, ValueError, IndexError):
            raise PlanError(f"cannot parse instruction {text!r}") from None

    @classmethod
    def _parse(cls, op: str, rest: str, phase: str) -> Instruction:
        if op == "RUN":
            target, mb = re.fullmatch(r"(\S+)\[mb(\d+)\]", rest).groups()
            return cls(op, phase, target, mb=int(mb))
        if op == "TRAIN":
            target, step = re.fullmatch(r"(\S+)\[step(\d+)\]", rest).groups()
            return cls(op, phase, target, step=int(step))
        if op in ("SEND", "RECV", "GATHER"):
            mb, target, route = re.fullmatch(r"mb(\d+) (\S+) (\S+)", rest).groups()
            return cls(op, phase, target, mb=int(mb), **_route(route))
        if op == "BCAST":
            target, bucket, route = re.fullmatch(r"(\S+) bucket(\d+) (\S+)", rest).groups()
            return cls(op, phase, target, bucket=int(bucket), **_route(route))
        if not rest or " " in rest:
            raise ValueError(rest)
        return cls(op, phase, rest)


def _route(text: str) -> dict[str, tuple[int, ...]]:
    """``'r0-r3->r4'`` -> ``{"src_ranks": (0, 1, 2, 3), "dst_ranks": (4,)}``."""
    src, dst = text.split("->")
    return {"src_ranks": parse_ranks(src), "dst_ranks": parse_ranks(dst)}


@dataclass
class RankStream:
    """The instructions every rank of ``ranks`` runs, in order, for one episode."""

    ranks: tuple[int, ...]
    models: list[str]
    instructions: list[Instruction] = field(default_factory=list)

    @property
    def name(self) -> str:
        return format_ranks(self.ranks)

    def __str__(self) -> str:
        lines = [f"stream {self.name} ({', '.join(self.models)}):"]
        lines += [f"  {ins.phase:<5} {ins}" for ins in self.instructions]
        return "\n".join(lines)


@dataclass
class PlacementEntry:
    """Where one model lives and what it costs per device."""

    model: str
    ranks: tuple[int, ...]
    role: str  # "inference" | "trainer"
    params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def memory(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass
class Estimates:
    """What the simulator predicts for one episode."""

    episode_s: float
    phase_s: dict[str, float]
    busy_s: dict[str, float]  # per rank group name, outside eval
    bubble: float  # idle fraction of all devices' time over the episode (eval excluded)


@dataclass
class Plan:
    """Everything every rank needs to run an episode, and what ``flowc`` shows."""

    cluster: ClusterSpec
    placement: list[PlacementEntry]
    streams: list[RankStream]
    steps: list[list[int]]  # logical step of each instruction, per stream
    times: list[list[list[float]]]  # estimated [start, end] seconds of each instruction
    estimates: Estimates
    waves: dict[str, int]  # micro-batch waves per episode: {"env": 4, "eval": 2}
    notes: list[str] = field(default_factory=list)

    # -- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for entry in data["placement"]:
            entry["ranks"] = format_ranks(entry["ranks"])
        data["streams"] = [
            {
                "ranks": s.name,
                "models": s.models,
                "instructions": [f"{i.phase} {i}" for i in s.instructions],
            }
            for s in self.streams
        ]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        streams = []
        for s in data["streams"]:
            instructions = []
            for line in s["instructions"]:
                phase, _, body = line.partition(" ")
                instructions.append(Instruction.parse(body, phase))
            streams.append(RankStream(parse_ranks(s["ranks"]), s["models"], instructions))
        return cls(
            cluster=ClusterSpec(**data["cluster"]),
            placement=[
                PlacementEntry(**{**p, "ranks": parse_ranks(p["ranks"])}) for p in data["placement"]
            ],
            streams=streams,
            steps=data["steps"],
            times=data["times"],
            estimates=Estimates(**data["estimates"]),
            waves=data["waves"],
            notes=data["notes"],
        )

    def hash(self) -> str:
        """A digest every rank compares with rank 0's before running."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def stream_of(self, rank: int) -> RankStream:
        """The stream ``rank`` runs."""
        for stream in self.streams:
            if rank in stream.ranks:
                return stream
        raise PlanError(f"rank {rank} runs nothing in this plan (idle rank)")

    # -- text -------------------------------------------------------------------------
    def placement_table(self) -> str:
        budget = self.cluster.device_memory_bytes
        per_rank_group: dict[tuple[int, ...], float] = {}
        for p in self.placement:
            per_rank_group[p.ranks] = per_rank_group.get(p.ranks, 0.0) + p.memory
        header = [
            "model",
            "ranks",
            "role",
            "params",
            "weights",
            "grads",
            "optim",
            "activ",
            "model total",
            "device total / budget",
        ]
        rows = [header]
        for p in self.placement:
            device_total = per_rank_group[p.ranks]
            flag = "  OVER" if device_total > budget else ""
            rows.append(
                [
                    p.model,
                    format_ranks(p.ranks),
                    p.role,
                    format_count(p.params),
                    format_bytes(p.weights),
                    _dash(p.gradients),
                    _dash(p.optimizer),
                    format_bytes(p.activations),
                    format_bytes(p.memory),
                    f"{format_bytes(device_total)} / {format_bytes(budget)}{flag}",
                ]
            )
        return format_table(rows)

    def grid(self) -> str:
        """The Step x Rank grid: one column per rank group, one row per logical step."""
        by_step: dict[int, dict[int, list[str]]] = {}
        phases: dict[int, list[str]] = {}
        for col, (stream, steps) in enumerate(zip(self.streams, self.steps, strict=True)):
            for ins, step in zip(stream.instructions, steps, strict=True):
                by_step.setdefault(step, {}).setdefault(col, []).append(str(ins))
                phases.setdefault(step, [])
                if ins.phase not in phases[step]:
                    phases[step].append(ins.phase)
        rows = [["step", "phase"] + [s.name for s in self.streams]]
        for step in sorted(by_step):
            cells = by_step[step]
            rows.append(
                [str(step), "+".join(sorted(phases[step], key=PHASES.index))]
                + ["; ".join(cells.get(c, [])) for c in range(len(self.streams))]
            )
        return format_table(rows)

    def estimates_text(self) -> str:
        e = self.estimates
        phases = ", ".join(
            f"{p} {format_seconds(e.phase_s[p])}" for p in PHASES if e.phase_s.get(p, 0) > 0
        )
        busy = ", ".join(
            f"{name} {busy / e.episode_s:.0%}" if e.episode_s else f"{name} -"
            for name, busy in e.busy_s.items()
        )
        lines = [
            f"episode {format_seconds(e.episode_s)} without eval (phase spans: {phases})",
            f"busy per rank group: {busy}",
            f"bubble: {e.bubble:.0%} of all devices' time idle",
        ]
        return "\n".join(lines + self.notes)

    def __str__(self) -> str:
        waves = ", ".join(f"{k} {v}" for k, v in self.waves.items())
        return "\n\n".join(
            [
                f"placement on {self.cluster}:\n{self.placement_table()}",
                f"schedule (waves per episode: {waves}):\n{self.grid()}",
                f"estimates:\n{self.estimates_text()}",
            ]
        )


def format_seconds(seconds: float) -> str:
    """Seconds in a readable unit: 0.0123 -> '12.3 ms'."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _dash(nbytes: float) -> str:
    return format_bytes(nbytes) if nbytes else "-"


def format_table(rows: list[list[str]], gap: str = "  ") -> str:
    """Rows of cells as left-aligned columns separated by ``gap`` (the first row a header).

    >>> print(format_table([["model", "ranks"], ["policy", "r0-r1"]]))
    model   ranks
    policy  r0-r1
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        gap.join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
