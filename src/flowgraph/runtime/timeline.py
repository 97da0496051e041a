"""The measured timeline of a run in Chrome trace format (``runtime.trace: true``).

Every rank records one slice per instruction it executes (``RUN policy.forward_step[mb3]``,
``GATHER mb0 %reward_out r0-r1->r0-r1``, ``TRAIN ppo_policy[step0]``, ``SYNC ...``), with
the phase and episode as arguments; at the end rank 0 writes them all to
``log_dir/trace.json``, one track (process) per rank. Open it in https://ui.perfetto.dev
or chrome://tracing; ``flowc report RUN_DIR`` draws it too.

Example::

    >>> timeline = Timeline(rank=0)
    >>> with timeline.slice("RUN policy.forward_step[mb0]", "RUN", episode=1):
    ...     pass
    >>> [e["name"] for e in timeline.events if e["ph"] == "X"]
    ['RUN policy.forward_step[mb0]']
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Timeline:
    """Slices of one rank; a disabled timeline records nothing and costs one branch."""

    def __init__(self, rank: int, enabled: bool = True) -> None:
        self.rank, self.enabled = rank, enabled
        self.events: list[dict[str, Any]] = []
        if enabled:
            self.events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0,
                                "args": {"name": f"rank {rank}"}})  # fmt: skip

    @contextmanager
    def slice(self, name: str, category: str, **args: Any) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.time_ns()
        try:
            yield
        finally:
            self.events.append({"ph": "X", "name": name, "cat": category, "pid": self.rank,
                                "tid": 0, "ts": start / 1000,
                                "dur": (time.time_ns() - start) / 1000, "args": args})  # fmt: skip


def write_trace(parts: Sequence[list[dict[str, Any]]], path: str | Path) -> Path:
    """Every rank's events in one Chrome trace file (JSON object format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    events = [event for part in parts for event in part]
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return path


def read_slices(path: str | Path) -> list[dict[str, Any]]:
    """The complete-event slices (``"ph": "X"``) of a trace file."""
    return [e for e in json.loads(Path(path).read_text())["traceEvents"] if e["ph"] == "X"]
