"""The plan: per-phase node tables, per-rank-group instruction streams, placement and
estimates, as plain data. The runtime reads nothing else.

Every rank of a group runs the same stream (data parallelism: each rank handles its share
of every micro-batch wave), so a 16,384-device plan has one stream per group, not per
rank. ``Plan.phases`` holds, per phase, the table of the nodes its instructions name
(model, method, inputs, the user's source line) and which node the phase returns.
Instructions have a compact text form that parses back::

    >>> ins = Instruction.parse("SEND %policy_out[w3] r0-r3->r4-r7", phase="env")
    >>> str(ins), ins.node, ins.wave, ins.src_ranks
    ('SEND %policy_out[w3] r0-r3->r4-r7', 'policy_out', 3, (0, 1, 2, 3))

Opcodes (``op``):

- ``RUN %node model.method[wN]``: the node's model call on this rank's share of wave N
  (``[stepN]`` for a non-training call of a trainer flow: global step N);
- ``SEND %node[wN] A->B`` / ``RECV %node[wN] A->B``: wave N of a node's output from rank
  group A to rank group B (a pair; every rank of both groups takes part);
- ``GATHER %node[wN] A->B``: the phase's returned output collected on every rank of B
  (the env's output on each trainer group, eval outputs on rank 0's group);
- ``TRAIN %node model[stepN]``: one optimizer step (all data-parallel ranks of the model);
- ``SYNC src->dst``: in-place weight copy between models on the same ranks;
- ``BCAST src->dst bucketN A->B``: one bucket of weights broadcast across groups;
- ``FREE model`` / ``LOAD model``: offload a model's device memory / bring it back.
"""

from __future__ import annotations

import functools
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
TRAIN_METHOD = "train_step"


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
class NodeSpec:
    """One model call of a phase: ``%name = model.method(*inputs)``, recorded at ``source``.

    >>> print(NodeSpec("ref_out", "reference", "forward_step", ("policy_out",), "ppo.py:41"))
    %ref_out = call_model[reference.forward_step](%policy_out)  # ppo.py:41
    """

    name: str
    model: str
    method: str
    inputs: tuple[str, ...]
    source: str = ""

    @property
    def target(self) -> str:
        return f"{self.model}.{self.method}"

    @property
    def trains(self) -> bool:
        return self.method == TRAIN_METHOD

    def call_text(self) -> str:
        args = ", ".join(f"%{i}" for i in self.inputs)
        return f"%{self.name} = call_model[{self.target}]({args})"

    def __str__(self) -> str:
        return f"{self.call_text()}  # {self.source}" if self.source else self.call_text()


@dataclass
class PhaseSpec:
    """The nodes one phase runs (``env``, ``train`` or ``eval``), in flow order.

    ``input`` names the flow's batch argument, ``returned`` the node whose value the phase
    returns (``None``: nothing), ``width`` the micro-batches per wave (the least common
    multiple of the phase's mesh sizes; 1 for ``train``, whose iterations are global steps).
    """

    flow: str
    input: str
    nodes: list[NodeSpec]
    returned: str | None
    width: int = 1

    def node(self, name: str) -> NodeSpec:
        node = self._by_name.get(name)
        if node is None:
            raise PlanError(f"flow {self.flow} has no node %{name}")
        return node

    @functools.cached_property
    def _by_name(self) -> dict[str, NodeSpec]:  # not a field: JSON and equality ignore it
        return {node.name: node for node in self.nodes}

    def models(self) -> list[str]:
        """Model names in order of first call."""
        return list(dict.fromkeys(n.model for n in self.nodes))

    def producer(self, name: str) -> str:
        """Who made value ``name``, for messages: the flow input or a node and its line."""
        if name == self.input:
            return f"the flow input %{name}"
        node = self.node(name)
        return f"{node.target} ({node.source})"

    def __str__(self) -> str:
        lines = [f"flow {self.flow}({self.input}):"]
        lines += [f"  {node}" for node in self.nodes]
        lines.append(f"  return %{self.returned}" if self.returned else "  return")
        return "\n".join(lines)


@dataclass(frozen=True)
class SyncSpec:
    """One ``set_parameter_sync(src, dst)``: ``buckets`` broadcasts when not colocated."""

    src: str
    dst: str
    buckets: int = 1


@dataclass(frozen=True)
class Instruction:
    """One step of a rank group's stream. ``str()`` and ``parse()`` round-trip."""

    op: str
    phase: str
    node: str = ""  # RUN/TRAIN/SEND/RECV/GATHER: the node whose value is made or moved
    model: str = ""  # RUN/TRAIN/FREE/LOAD
    method: str = ""  # RUN/TRAIN
    wave: int | None = None
    step: int | None = None
    bucket: int | None = None
    src_ranks: tuple[int, ...] = ()
    dst_ranks: tuple[int, ...] = ()
    src: str = ""  # SYNC/BCAST: the trained model
    dst: str = ""  # SYNC/BCAST: the inference copy

    def __str__(self) -> str:
        route = f"{format_ranks(self.src_ranks)}->{format_ranks(self.dst_ranks)}"
        if self.op == "RUN":
            return f"RUN %{self.node} {self.model}.{self.method}[{self.at}]"
        if self.op in ("SEND", "RECV", "GATHER"):
            return f"{self.op} %{self.node}[{self.at}] {route}"
        if self.op == "TRAIN":
            return f"TRAIN %{self.node} {self.model}[{self.at}]"
        if self.op == "SYNC":
            return f"SYNC {self.src}->{self.dst}"
        if self.op == "BCAST":
            return f"BCAST {self.src}->{self.dst} bucket{self.bucket} {route}"
        return f"{self.op} {self.model}"

    @property
    def at(self) -> str:
        """``wN`` (a wave of micro-batches) or ``stepN`` (a global step of training)."""
        return f"w{self.wave}" if self.wave is not None else f"step{self.step}"

    @property
    def index(self) -> int:
        """The wave or the global step this instruction works on."""
        return self.wave if self.wave is not None else self.step

    @property
    def models(self) -> tuple[str, ...]:
        """The models this instruction acts on (none for transfers)."""
        if self.op in ("SYNC", "BCAST"):
            return (self.src, self.dst)
        return (self.model,) if self.model else ()

    @property
    def is_communication(self) -> bool:
        return self.op in COMMUNICATION

    def key(self) -> tuple:
        """Matching key: a SEND meets the RECV with the same key, a collective meets itself."""
        op = "P2P" if self.op in ("SEND", "RECV") else self.op
        return (op, self.phase, self.node, self.wave, self.step, self.bucket, self.src,
                self.dst, self.src_ranks, self.dst_ranks)  # fmt: skip

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
            pattern = r"%(\S+) ([^\s.]+)\.(\S+)\[(\S+)\]"
            node, model, method, at = re.fullmatch(pattern, rest).groups()
            return cls(op, phase, node, model, method, **_at(at))
        if op == "TRAIN":
            node, model, at = re.fullmatch(r"%(\S+) (\S+)\[(\S+)\]", rest).groups()
            return cls(op, phase, node, model, TRAIN_METHOD, **_at(at))
        if op in ("SEND", "RECV", "GATHER"):
            node, at, route = re.fullmatch(r"%(\S+)\[(\S+)\] (\S+)", rest).groups()
            return cls(op, phase, node, **_at(at), **_route(route))
        if op == "SYNC":
            src, dst = re.fullmatch(r"(\S+?)->(\S+)", rest).groups()
            return cls(op, phase, src=src, dst=dst)
        if op == "BCAST":
            src, dst, bucket, route = re.fullmatch(
                r"(\S+?)->(\S+) bucket(\d+) (\S+)", rest
            ).groups()
            return cls(op, phase, bucket=int(bucket), src=src, dst=dst, **_route(route))
        if not rest or " " in rest:
            raise ValueError(rest)
        return cls(op, phase, model=rest)


def _at(text: str) -> dict[str, int]:
    """``'w3'`` -> ``{"wave": 3}``, ``'step2'`` -> ``{"step": 2}``."""
    match = re.fullmatch(r"w(\d+)|step(\d+)", text)
    wave, step = match.groups()
    return {"wave": int(wave)} if wave is not None else {"step": int(step)}


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
    precision: str = "fp32"  # compute dtype (a trainer's weights stay fp32)

    @property
    def memory(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass
class Estimates:
    """What the simulator predicts for one episode."""

    episode_s: float
    phase_s: dict[str, float]
    busy_s: dict[str, float]  # per rank group name, outside eval
    bubble: float  # idle fraction of the used devices' time over the episode (eval excluded)


@dataclass
class Plan:
    """Everything every rank needs to run an episode, and what ``flowc`` shows."""

    cluster: ClusterSpec
    placement: list[PlacementEntry]
    phases: dict[str, PhaseSpec]  # the node tables: {"env": ..., "train": ..., "eval": ...}
    syncs: list[SyncSpec]
    streams: list[RankStream]
    steps: list[list[int]]  # logical step of each instruction, per stream
    times: list[list[list[float]]]  # estimated [start, end] seconds of each instruction
    estimates: Estimates
    waves: dict[str, int]  # micro-batch waves per episode: {"env": 4, "eval": 2}
    notes: list[str] = field(default_factory=list)
    max_staleness: int = 0  # k >= 1: a stream is one iteration, train(e) then env(e+k)

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
        phases = {
            name: PhaseSpec(**{**spec, "nodes": [
                NodeSpec(**{**n, "inputs": tuple(n["inputs"])}) for n in spec["nodes"]
            ]})
            for name, spec in data["phases"].items()
        }  # fmt: skip
        return cls(
            cluster=ClusterSpec(**data["cluster"]),
            placement=[
                PlacementEntry(**{**p, "ranks": parse_ranks(p["ranks"])}) for p in data["placement"]
            ],
            phases=phases,
            syncs=[SyncSpec(**sync) for sync in data["syncs"]],
            streams=streams,
            steps=data["steps"],
            times=data["times"],
            estimates=Estimates(**data["estimates"]),
            waves=data["waves"],
            notes=data["notes"],
            max_staleness=data.get("max_staleness", 0),
        )

    def hash(self) -> str:
        """A digest every rank compares with rank 0's before running."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def layout_hash(self) -> str:
        """A digest of where models live and what every rank runs (not the flows' source
        lines): DeepSpeed's per-rank checkpoint state is only valid for the same one."""
        data = self.to_dict()
        layout = {"placement": data["placement"], "streams": data["streams"]}
        return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]

    def mesh(self, model: str) -> tuple[int, ...]:
        """The ranks ``model`` lives on."""
        for entry in self.placement:
            if entry.model == model:
                return entry.ranks
        raise PlanError(f"model {model!r} is not placed in this plan")

    def hosted(self, rank: int) -> list[str]:
        """The models ``rank`` hosts, in placement order."""
        return [p.model for p in self.placement if rank in p.ranks]

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
            "dtype",
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
                    p.precision,
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
            f"bubble: {e.bubble:.0%} of the used devices' time idle",
        ]
        return "\n".join(lines + self.notes)

    def __str__(self) -> str:
        waves = ", ".join(f"{k} {v}" for k, v in self.waves.items())
        order = ""
        if self.max_staleness:
            k = self.max_staleness
            order = (f"; one iteration: train episode e | env episode e+{k} with the weights "
                     "synced after e-1 | sync after e")  # fmt: skip
        return "\n\n".join(
            [
                f"placement on {self.cluster}:\n{self.placement_table()}",
                f"schedule (waves per episode: {waves}{order}):\n{self.grid()}",
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
