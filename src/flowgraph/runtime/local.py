"""The episode loop in one process: every model lives here (world size 1).

Per episode: draw ``sample_per_episode`` samples, stream micro-batches of
``generation_batch_size`` through the env graph, train on the resulting
``StreamDataset`` for ``num_training_epoch`` passes of global steps, sync parameters
into the inference copies whose ``sync_frequency`` divides the episode number, evaluate
when ``eval_episode_interval`` divides it, then log one line. Models with ``offload: true``
are in device memory only during the phases that use them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowgraph.compiler.graph import Graph
from flowgraph.config import Config
from flowgraph.data import Batch, Dataset, batch_size
from flowgraph.module import BaseModule
from flowgraph.runtime.backends import prepare
from flowgraph.runtime.episode import env_micro_batches, eval_micro_batches, training_steps
from flowgraph.runtime.graph_runner import GraphRunner
from flowgraph.runtime.offload import Offload
from flowgraph.runtime.resume import RunCheckpoints
from flowgraph.runtime.rng import reseed
from flowgraph.runtime.sync import SyncPlan
from flowgraph.runtime.telemetry import EpisodeRecord, MetricAverager, Reporter, StageTimer
from flowgraph.runtime.timeline import Timeline, write_trace


@dataclass
class EvalJob:
    """An eval graph, its dataset and the function that turns outputs into metrics."""

    graph: Graph
    dataset: Dataset
    post_process: Callable[[list[Batch]], Mapping[str, Any]]


@dataclass
class Job:
    """What a runner needs for ``learn()``: config, modules, data, graphs, syncs (the
    one-process runner and the per-rank SPMD runner both take one)."""

    config: Config
    modules: Mapping[str, BaseModule]
    dataset: Dataset
    env: Graph | None
    trainer: Graph | None
    eval: EvalJob | None
    syncs: Sequence[tuple[BaseModule, BaseModule]]
    log: Callable[[str], None] = print


class LocalRunner:
    """Runs a ``Job`` episode by episode; ``run()`` returns the episode records."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.runtime = job.config.runtime
        self.env = GraphRunner(job.env, job.modules, "env") if job.env else None
        self.trainer = GraphRunner(job.trainer, job.modules, "train") if job.trainer else None
        self.evaluator = GraphRunner(job.eval.graph, job.modules, "eval") if job.eval else None
        self.reporter = Reporter(self.runtime, job.log)
        self.timeline = Timeline(0, self.runtime.trace)
        for runner in (self.env, self.trainer, self.evaluator):
            if runner is not None:
                runner.timeline = self.timeline
        self.sync_plans: list[SyncPlan] = []
        self.history: list[EpisodeRecord] = []
        self.offloads = {
            name: Offload(module)
            for name, module in job.modules.items()
            if job.config.model(name).offload
        }

    def run(self) -> list[EpisodeRecord]:
        for module in self.job.modules.values():
            reseed(self.runtime.seed, "setup", module.name)
            module.setup()
            if module.trainable:
                prepare(module, None, 1, self.runtime)
        checkpoints = RunCheckpoints(self.job, 0, 1, {name: (0,) for name in self.job.modules})
        start, self.history = checkpoints.restore(trainable=True)
        bucket_bytes = self.runtime.sync_bucket_mb * 2**20
        self.sync_plans = [SyncPlan.build(s, d, bucket_bytes) for s, d in self.job.syncs]
        for plan in self.sync_plans:
            plan.apply()  # inference copies start from the trainer's weights
        checkpoints.restore(trainable=False)
        self.reporter.restore(self.history)
        if start == 0 and self.evaluator and self.runtime.enable_eval_before_training:
            record = self._new_record(0)
            self._evaluate(record)
            self._finish(record)
        for episode in range(start + 1, self.runtime.num_episode + 1):
            record = self.run_episode(episode)
            if checkpoints.due(episode):
                checkpoints.save(record, self.history)
            self._finish(record)
        for offload in self.offloads.values():
            offload.load()
        if self.runtime.trace:
            write_trace([self.timeline.events], Path(self.runtime.log_dir) / "trace.json")
        self.reporter.close()
        return self.history

    def run_episode(self, episode: int) -> EpisodeRecord:
        record = self._new_record(episode)
        timer = StageTimer()
        inputs = env_micro_batches(self.job.dataset, self.runtime, episode)
        record.samples = sum(batch_size(mb) for mb in inputs)
        env_models = self.job.env.models() if self.job.env else ()
        with timer.stage("env"), self._resident(env_models, timer, "env"):
            outputs = self._run_env(inputs, episode, timer)
        if self.trainer is not None:
            with timer.stage("train"), self._resident(self.job.trainer.models(), timer, "train"):
                self._train(outputs, episode, timer, record)
        due = [p for p in self.sync_plans if episode % self._sync_frequency(p) == 0]
        if due:
            synced = [name for p in due for name in (p.src, p.dst)]
            with timer.stage("sync"), self._resident(synced, timer, "sync"):
                for plan in due:
                    with self.timeline.slice(f"SYNC {plan.src}->{plan.dst}", "SYNC",
                                             phase="sync", episode=episode):  # fmt: skip
                        plan.apply()
                    if self.runtime.validate_sync:
                        plan.validate()
        record.stages.update(timer.seconds)
        interval = self.runtime.eval_episode_interval
        if self.evaluator and interval and episode % interval == 0:
            self._evaluate(record)
        return record

    def _run_env(self, inputs: list[Batch], episode: int, timer: StageTimer) -> list[Batch]:
        if self.env is None:
            return inputs
        outputs = [
            self.env.run_inference(mb, timer, (self.runtime.seed, episode, k))
            for k, mb in enumerate(inputs)
        ]
        return [out for out in outputs if out is not None]

    def _train(
        self, outputs: list[Batch], episode: int, timer: StageTimer, record: EpisodeRecord
    ) -> None:
        metrics = MetricAverager()
        for step, micro in enumerate(training_steps(outputs, self.runtime, episode)):
            self.trainer.run_train(micro, timer, metrics, (self.runtime.seed, episode, step))
        record.metrics.update(metrics.means())

    def _evaluate(self, record: EpisodeRecord) -> None:
        job = self.job.eval
        timer = StageTimer()
        with timer.stage("eval"), self._resident(job.graph.models(), timer, "eval"):
            results = [
                self.evaluator.run_inference(mb, timer, (self.runtime.seed, record.episode, k))
                for k, mb in enumerate(eval_micro_batches(job.dataset, self.runtime))
            ]
            metrics = job.post_process([r for r in results if r is not None])
        record.stages.update(timer.seconds)
        record.metrics.update({f"eval/{k}": v for k, v in (metrics or {}).items()})

    @contextmanager
    def _resident(self, models: Iterable[str], timer: StageTimer, phase: str) -> Iterator[None]:
        """Offloaded ``models`` in device memory for the block, freed after it."""
        offloads = [self.offloads[m] for m in dict.fromkeys(models) if m in self.offloads]
        if not offloads:
            yield
            return
        with timer.stage(f"{phase}/offload"):
            for offload in offloads:
                offload.load()
        yield
        with timer.stage(f"{phase}/offload"):
            for offload in offloads:
                offload.free()

    def _sync_frequency(self, plan: SyncPlan) -> int:
        return self.job.config.model(plan.dst).sync_frequency

    def _new_record(self, episode: int) -> EpisodeRecord:
        return EpisodeRecord(episode, self.runtime.num_episode, samples=0)

    def _finish(self, record: EpisodeRecord) -> None:
        self.history.append(record)
        self.reporter.report(record)
