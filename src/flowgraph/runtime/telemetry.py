"""Timers and episode records: what the episode log line and metrics.jsonl show.

Example::

    >>> timer = StageTimer()
    >>> with timer.stage("env/policy"):
    ...     pass
    >>> sorted(timer.seconds)
    ['env/policy']
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from flowgraph.config import RuntimeConfig
from flowgraph.runtime import contracts

logger = logging.getLogger("flowgraph")


class StageTimer:
    """Wall-clock seconds summed per stage name (``env``, ``env/policy``, ``train``, ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


class MetricAverager:
    """Means of the numeric metrics that ``train_step`` calls return, per model."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, model: str, metrics: Mapping[str, Any] | None) -> None:
        for key, value in (metrics or {}).items():
            number = contracts.number(value)
            if number is not None:
                self._sums[f"{model}/{key}"] += number
                self._counts[f"{model}/{key}"] += 1

    def means(self) -> dict[str, float]:
        return {k: self._sums[k] / self._counts[k] for k in self._sums}


@dataclass
class EpisodeRecord:
    """What one episode did: stage times in seconds, metrics, sample counts.

    ``str(record)`` is the episode's log line::

        episode 2/3 | 32 samples 410.2/s | env 0.061s (policy 0.031s, reward 0.010s) |
        train 0.012s | sync 0.001s | ppo_policy/loss -0.1234
    """

    episode: int
    num_episode: int
    samples: int
    stages: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0  # the iteration's wall-clock seconds (stages may overlap across ranks)

    @property
    def seconds(self) -> float:
        """The episode's seconds: its wall-clock time (and its checkpoint) when measured,
        else the sum of its stages."""
        if self.wall:
            return self.wall + self.stages.get("checkpoint", 0.0)
        return sum(v for k, v in self.stages.items() if "/" not in k)

    def __str__(self) -> str:
        if self.episode == 0:
            parts = ["before training"]
        else:
            rate = self.samples / self.seconds if self.seconds > 0 else 0.0
            parts = [
                f"episode {self.episode}/{self.num_episode}",
                f"{self.samples} samples {rate:.0f}/s",
            ]
        for stage in ("env", "train", "sync", "eval", "checkpoint"):
            if stage not in self.stages:
                continue
            detail = ", ".join(
                f"{k.split('/', 1)[1]} {v:.3f}s"
                for k, v in self.stages.items()
                if k.startswith(stage + "/")
            )
            text = f"{stage} {self.stages[stage]:.3f}s"
            parts.append(f"{text} ({detail})" if detail else text)
        parts.extend(f"{k} {v:.4g}" for k, v in sorted(self.metrics.items()))
        return " | ".join(parts)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], num_episode: int) -> EpisodeRecord:
        """The record that ``to_json`` wrote (as a checkpoint keeps it)."""
        return cls(data["episode"], num_episode, data["samples"], dict(data["stages"]),
                   dict(data["metrics"]), data.get("wall", 0.0))  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "episode": self.episode,
            "samples": self.samples,
            "seconds": self.seconds,
            "wall": self.wall,
            "stages": self.stages,
            "metrics": self.metrics,
        }


class MetricsLog:
    """One JSON object per episode in ``log_dir/metrics.jsonl`` (when a dir is set), which
    each run starts afresh."""

    def __init__(self, log_dir: str | None) -> None:
        self.path = Path(log_dir) / "metrics.jsonl" if log_dir else None
        self.restart()

    def restart(self) -> None:
        """An empty file (a new run starts a new one)."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, record: EpisodeRecord) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record.to_json(), sort_keys=True) + "\n")


class TensorBoard:
    """Episode metrics and stage times as TensorBoard scalars in ``log_dir/tensorboard``
    (when the ``tensorboard`` package is installed and ``runtime.tensorboard`` is on)."""

    def __init__(self, log_dir: str | None) -> None:
        self.directory = Path(log_dir) / "tensorboard" if log_dir else None
        self.writer = None
        self.purge_step: int | None = None

    def resume_after(self, episode: int) -> None:
        """Events of earlier runs for episodes after ``episode`` are hidden: all of them for
        a fresh run (0), an interrupted attempt's after its checkpoint for a resumed one."""
        self.purge_step = episode + 1 if episode else 0

    def _open(self):
        if self.writer is None and self.directory is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("flowgraph: tensorboard is not installed; metrics go to JSONL only")
                self.directory = None
                return None
            self.writer = SummaryWriter(str(self.directory), purge_step=self.purge_step)
        return self.writer

    def write(self, record: EpisodeRecord) -> None:
        writer = self._open()
        if writer is None:
            return
        for key, value in record.metrics.items():
            writer.add_scalar(key, value, record.episode)
        for key, seconds in record.stages.items():
            writer.add_scalar(f"time/{key}", seconds, record.episode)
        if record.episode > 0 and record.seconds > 0:
            writer.add_scalar("time/samples_per_second", record.samples / record.seconds,
                              record.episode)  # fmt: skip

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Reporter:
    """Where finished episodes go on rank 0: ``metrics.jsonl``, TensorBoard (when
    installed), the episode line, a progress bar (``runtime.progress``), and at the end a
    plot ``metrics.png`` of the reward, KL and loss curves beside the JSONL file (when
    matplotlib is installed)."""

    def __init__(self, runtime: RuntimeConfig, log: Any, enabled: bool = True) -> None:
        self.metrics_log = MetricsLog(runtime.log_dir if enabled else None)
        self.board = TensorBoard(runtime.log_dir if enabled and runtime.tensorboard else None)
        self.log = log if enabled and runtime.log_episodes else None
        self.bar = tqdm(
            total=runtime.num_episode,
            unit="episode",
            desc="learn",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (enabled and runtime.progress),
        )

    def restore(self, history: list[EpisodeRecord]) -> None:
        """Start from a resumed run's records: metrics.jsonl holds exactly them again
        (dropping episodes the interrupted run did after its last checkpoint)."""
        self.metrics_log.restart()
        for record in history:
            self.metrics_log.write(record)
        self.board.resume_after(max((r.episode for r in history), default=0))
        self.bar.update(sum(1 for r in history if r.episode > 0))

    def report(self, record: EpisodeRecord) -> None:
        self.metrics_log.write(record)
        self.board.write(record)
        if self.log is not None:
            with tqdm.external_write_mode(file=sys.stderr):
                self.log(str(record))
        if record.episode > 0:
            self.bar.update(1)
            if record.seconds > 0:
                self.bar.set_postfix_str(f"{record.samples / record.seconds:.0f} samples/s")

    def close(self) -> None:
        self.bar.close()
        self.board.close()
        path = self.metrics_log.path
        if path is None or not path.exists():
            return
        try:
            from flowgraph.plot import plot_metrics

            plot_metrics(path, path.with_suffix(".png"))
        except ImportError:
            logger.info("flowgraph: matplotlib is not installed; no plot of %s", path)
