"""Measured costs (``flowc profile``) that replace the analytical cost model's guesses.

A profile describes one kind of device (a CPU process with its threads, a GPU) and what
one call of each model's method costs on it, fitted from a traced run at two batch sizes:

- ``calls``: ``seconds = fixed + per_sample x samples`` for one call of one method on one
  device (one micro-batch; ``samples`` counts its rows, answers included), measured at
  ``tokens`` tokens per sample (the answer's length for generation,
  prompt + answer for scoring) and scaled linearly to other lengths;
- ``train``: the same for one optimizer step of a trainer on one data-parallel rank
  (``samples`` = its share of the global batch), without the gradient all-reduce, which
  ``links.allreduce`` adds on meshes of more than one rank;
- ``links``: ``seconds = latency + bytes / bytes_per_s`` for a point-to-point batch, a
  gather, a broadcast bucket and an all-reduce, measured between the profiled ranks;
  ``sync_bytes_per_s`` for in-place weight copies;
- ``overhead_s``: the framework's time per episode outside the plan's instructions
  (drawing samples, metrics, records), measured, added to every estimate.

Example::

    >>> cost = CallCost("policy", "forward_step", "env", True, 0.5, 0.01, tokens=8)
    >>> round(cost.seconds(samples=16, tokens=16), 3)   # twice the tokens: twice the time
    1.32
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flowgraph.compiler.cluster import CPU_CORES
from flowgraph.errors import PlanError

VERSION = 1


@dataclass(frozen=True)
class CallCost:
    """One method of one model in one phase: seconds per call on one device."""

    model: str
    method: str
    phase: str
    generate: bool
    fixed: float
    per_sample: float
    tokens: int  # tokens per sample it was measured at

    def seconds(self, samples: float, tokens: int) -> float:
        return _linear(self.fixed, self.per_sample, self.tokens, samples, tokens)


@dataclass(frozen=True)
class TrainCost:
    """One optimizer step of a trainer on one rank, gradient all-reduce excluded."""

    model: str
    fixed: float
    per_sample: float
    tokens: int

    def seconds(self, samples: float, tokens: int) -> float:
        return _linear(self.fixed, self.per_sample, self.tokens, samples, tokens)


@dataclass(frozen=True)
class Link:
    """``latency + bytes / bytes_per_s``."""

    latency_s: float
    bytes_per_s: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s

    @classmethod
    def fit(cls, points: list[tuple[float, float]]) -> Link:
        """From (bytes, seconds) points: a least-squares line (at least two sizes)."""
        (b, c), _ = fit_line(points)
        return cls(max(b, 0.0), 1.0 / c if c > 0 else float("inf"))


@dataclass
class Profile:
    """Everything ``flowc profile`` measured; ``Profile.load(path)`` reads one back."""

    device: str  # "cpu" | "gpu"
    world_size: int
    threads: int
    calls: list[CallCost] = field(default_factory=list)
    train: list[TrainCost] = field(default_factory=list)
    links: dict[str, Link] = field(default_factory=dict)  # p2p, gather, broadcast, allreduce
    sync_bytes_per_s: float | None = None
    overhead_s: float = 0.0
    measured: dict[str, Any] = field(default_factory=dict)  # the profiled run's episodes
    source: str = ""  # the file it was read from

    def call(self, model: str, method: str, phase: str, generate: bool) -> CallCost | None:
        """The cost of ``model.method`` generating (or scoring) in ``phase``, or measured
        doing the same in another phase."""
        same = [c for c in self.calls
                if (c.model, c.method, c.generate) == (model, method, generate)]  # fmt: skip
        return next((c for c in same if c.phase == phase), same[0] if same else None)

    def trainer(self, model: str) -> TrainCost | None:
        return next((t for t in self.train if t.model == model), None)

    def link(self, kind: str) -> Link | None:
        return self.links.get(kind)

    def devices(self) -> str:
        """``cpu, 2 ranks x 1 thread``: what the profile measured on."""
        ranks = "1 process" if self.world_size == 1 else f"{self.world_size} ranks"
        return f"{self.device}, {ranks} x {self.threads} thread{'s' if self.threads > 1 else ''}"

    def describe(self) -> str:
        where = f" {self.source}" if self.source else ""
        return (f"estimates from the profile{where} ({self.devices()}; {len(self.calls)} "
                f"calls and {len(self.train)} trainers measured)")  # fmt: skip

    def mismatch(self, device: str, devices_per_node: int) -> str | None:
        """Why this profile may not describe a plan's devices (another thread count per
        process than a CPU plan's: torchrun gives each of several processes one thread,
        a lone process gets every core), or ``None``."""
        if device != "cpu" or self.device != "cpu":
            return None
        expected = 1 if devices_per_node > 1 else CPU_CORES
        if expected == self.threads:
            return None
        how = "under torchrun --nproc-per-node N" if expected == 1 else "in one process"
        return (
            f"warning: the profile was measured with {self.threads} thread(s) per "
            f"process, this plan's processes get {expected}: profile {how} "
            "(flowc profile --nproc-per-node) for estimates of these devices"
        )

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("source")
        return json.dumps({"version": VERSION, **data}, indent=1)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        fix = "write one with flowc profile FILE --out PROFILE.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"profile {path}: no such file; {fix}") from None
        except (OSError, ValueError) as err:
            raise PlanError(f"profile {path} is not a profile ({err}); {fix}") from None
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise PlanError(f"profile {path} is not a version {VERSION} profile; {fix}")
        try:
            return cls(
                device=data["device"],
                world_size=int(data["world_size"]),
                threads=int(data["threads"]),
                calls=[CallCost(**c) for c in data["calls"]],
                train=[TrainCost(**t) for t in data["train"]],
                links={k: Link(**v) for k, v in data["links"].items()},
                sync_bytes_per_s=data.get("sync_bytes_per_s"),
                overhead_s=float(data.get("overhead_s", 0.0)),
                measured=data.get("measured", {}),
                source=str(path),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"profile {path} is damaged ({type(err).__name__}: {err}); {fix}") \
                from None  # fmt: skip


def _linear(fixed: float, per_sample: float, measured_tokens: int, samples: float,
            tokens: int) -> float:  # fmt: skip
    """``fixed + per_sample x samples``, scaled from the measured tokens to ``tokens``."""
    scale = tokens / measured_tokens if measured_tokens else 1.0
    return max(0.0, fixed + per_sample * samples) * scale


def fit_line(points: list[tuple[float, float]]) -> tuple[tuple[float, float], float]:
    """``y = a + b x`` through the median ``y`` of each distinct ``x`` (least squares over
    those medians, so one slow call does not tilt the line): ((a, b), the largest relative
    residual of a median). One distinct x: the line through the origin and its median."""
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    medians = [(x, statistics.median(ys)) for x, ys in sorted(by_x.items())]
    xs = [x for x, _ in medians]
    n = len(medians)
    mean_x, mean_y = sum(xs) / n, sum(y for _, y in medians) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        b = mean_y / mean_x if mean_x else 0.0
        a = 0.0 if mean_x else mean_y
    else:
        b = sum((x - mean_x) * (y - mean_y) for x, y in medians) / var
        a = mean_y - b * mean_x
        if a < 0:  # a negative fixed cost is noise: keep the line through the origin
            a, b = 0.0, sum(x * y for x, y in medians) / sum(x * x for x in xs)
    worst = max((abs(a + b * x - y) / y for x, y in medians if y > 0), default=0.0)
    return (a, b), worst
