"""The episode loop, once, for one process and for every rank of a torchrun job.

A run: set up the models this rank hosts (``setup()``, then DDP/DeepSpeed for trainers,
offload bookkeeping, sync plans), resume from the newest checkpoint, sync every pair once
so that inference copies start from the trainers, evaluate before training when asked,
then per episode: ``env`` (draw ``sample_per_episode`` samples, stream them through the
env flow), ``train`` (the episode's output in global steps, ``num_training_epoch`` passes),
``sync`` (the pairs whose destination's ``sync_frequency`` divides the episode number),
``eval`` (when ``eval_episode_interval`` divides it), one record (stage times of the
slowest rank, its wall time, metrics averaged over ranks), a checkpoint when due, a log
line.

With ``runtime.max_staleness`` k >= 1 the iteration of episode e trains e, then generates
episode e + k (with the weights of the sync after e - 1), then syncs: on every rank in
this order, so where inference and trainers live apart the two overlap, and the weights
behind each episode follow from the order alone (docs/async.md). Up to k generated
episodes wait in ``in_flight`` (and in checkpoints) for their training.

Example::

    records = EpisodeLoop(plan, job, LocalComm()).run()
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowgraph.compiler.plan import Plan
from flowgraph.data import Batch, batch_size
from flowgraph.precision import cast_inference_model
from flowgraph.runtime import contracts
from flowgraph.runtime.backends import prepare
from flowgraph.runtime.comm import Communicator
from flowgraph.runtime.episode import env_micro_batches, eval_micro_batches, weight_version
from flowgraph.runtime.interpreter import Episode, Hosted, Interpreter
from flowgraph.runtime.job import Job
from flowgraph.runtime.linkbench import record_for_profile
from flowgraph.runtime.offload import Offload
from flowgraph.runtime.resume import RunCheckpoints
from flowgraph.runtime.rng import reseed
from flowgraph.runtime.sync import CrossSync, SyncPlan
from flowgraph.runtime.telemetry import EpisodeRecord, MetricAverager, Reporter, StageTimer
from flowgraph.runtime.timeline import Timeline, write_trace

log = logging.getLogger("flowgraph")


@dataclass
class Iteration:
    """What one turn of the loop measures: stage times, training metrics, wall time."""

    timer: StageTimer = field(default_factory=StageTimer)
    metrics: MetricAverager = field(default_factory=MetricAverager)
    started: float = field(default_factory=time.perf_counter)

    def record(self, episode: int, num_episode: int) -> EpisodeRecord:
        record = EpisodeRecord(episode, num_episode, samples=0,
                               wall=time.perf_counter() - self.started)  # fmt: skip
        record.stages.update(self.timer.seconds)
        record.metrics.update(self.metrics.means())
        return record


class EpisodeLoop:
    """Runs ``job`` on this rank following ``plan``; ``run()`` returns the episode records
    (on rank 0; other ranks return an empty list)."""

    def __init__(self, plan: Plan, job: Job, comm: Communicator) -> None:
        self.plan, self.job, self.comm = plan, job, comm
        self.runtime = job.config.runtime
        self.rank = comm.rank
        self.mesh = {p.model: p.ranks for p in plan.placement}
        self.staleness = self.runtime.max_staleness if "env" in plan.phases else 0
        env_models = plan.phases["env"].models() if "env" in plan.phases else []
        self.generators = [s.dst for s in plan.syncs if s.dst in env_models]
        self.held = dict.fromkeys(self.generators, 0)  # the episode each env copy holds
        self.in_flight: dict[int, Episode] = {}  # generated, not yet trained (<= k + 1)
        self.hosted = Hosted(device_type=comm.device.type)
        self.precisions = job.precisions(comm.device.type)
        self.timeline = Timeline(self.rank, self.runtime.trace)
        self.reporter = Reporter(self.runtime, job.log, enabled=self.rank == 0)
        self.history: list[EpisodeRecord] = []

    # -- the rules, once -----------------------------------------------------------------
    def due_syncs(self, episode: int) -> frozenset[tuple[str, str]]:
        """The sync pairs of ``episode``: all of them before the first (episode 0), else
        those whose destination's ``sync_frequency`` divides the episode number."""
        return frozenset(
            (s.src, s.dst)
            for s in self.plan.syncs
            if episode == 0 or episode % self.job.config.model(s.dst).sync_frequency == 0
        )

    def eval_due(self, episode: int) -> bool:
        """Evaluate after episodes whose number ``eval_episode_interval`` divides (and at
        episode 0, the evaluation before training)."""
        interval = self.runtime.eval_episode_interval
        return "eval" in self.plan.phases and (
            episode == 0 or bool(interval and episode % interval == 0)
        )

    def rollout_columns(self, episode: int) -> dict[str, int]:
        """What the training rows of ``episode``, generated now, carry: ``weight_version``,
        the trained weights its env flow's copies hold (the oldest of them), and
        ``staleness``, how many episodes older those are than the trainer learning from
        them (none when no copy the env flow calls receives syncs)."""
        if not self.generators:
            return {}
        version = min(self.held[dst] for dst in self.generators)
        frequencies = [self.job.config.model(dst).sync_frequency for dst in self.generators]
        expected = weight_version(episode, self.staleness, frequencies)
        if version != expected and self.rank == 0:
            log.warning(
                "flowgraph: episode %d is generated with the weights of episode %d, not %d as "
                "runtime.max_staleness=%d prescribes: the checkpoint this run resumed from did "
                "not hold the episodes generated ahead (another max_staleness, or a finished "
                "run extended)", episode, version, expected, self.staleness,
            )  # fmt: skip
        return {"weight_version": version, "staleness": episode - 1 - version}

    def _synced(self, pairs: frozenset[tuple[str, str]], episode: int) -> None:
        """The copies that received ``episode``'s trained weights."""
        self.held.update({dst: episode for _, dst in pairs if dst in self.held})

    # -- the run -------------------------------------------------------------------------
    def run(self) -> list[EpisodeRecord]:
        self.setup()
        self.checkpoints = RunCheckpoints(self.job, self.plan, self.comm)
        start, history = self.checkpoints.restore(trainable=True)
        self.interpreter.run_phase("sync", self._new_episode(0, ()))  # inference from trainers
        self.checkpoints.restore(trainable=False)
        for dst in self.held:  # the initial sync, or the copy's own saved weights
            frequency = self.job.config.model(dst).sync_frequency
            self.held[dst] = max((u for u in range(start, 0, -1) if u % frequency == 0), default=0)
        self.in_flight = self._restored_rollouts(self.checkpoints.restore_in_flight())
        if self.rank == 0:
            self.history = history
            self.reporter.restore(history)
        if start == 0 and "eval" in self.plan.phases and self.runtime.enable_eval_before_training:
            self._finish(self._evaluation(0))
        for episode in range(start + 1, self.runtime.num_episode + 1):
            self._finish(self._iteration(episode))
        self._teardown()
        record_for_profile(self.plan, self.comm)
        if self.runtime.trace:
            parts = self.comm.all_gather_objects(self.timeline.events)
            if self.rank == 0:
                write_trace(parts, Path(self.runtime.log_dir) / "trace.json")
        self.reporter.close()
        return self.history

    def _new_episode(self, episode: int, phases: tuple[str, ...]) -> Episode:
        inputs = {}
        if "env" in phases or "train" in phases:  # with no env flow, trainers take the samples
            inputs["env"] = env_micro_batches(self.job.dataset, self.runtime, episode)
        if "eval" in phases:
            inputs["eval"] = eval_micro_batches(self.job.eval_dataset, self.runtime)
        return Episode(episode, inputs, self.due_syncs(episode))

    def _rollout(self, episode: int, iteration: Iteration) -> Episode:
        """The env phase of ``episode`` (timed in ``iteration``, the one it runs in)."""
        data = self._new_episode(episode, ("env",))
        data.timer = iteration.timer
        data.columns = self.rollout_columns(episode)
        if "env" in self.plan.phases:
            with iteration.timer.stage("env"):
                self.interpreter.run_phase("env", data)
        return data

    def _iteration(self, episode: int) -> EpisodeRecord:
        """Train ``episode``, generate episode ``episode + k`` (before training when k is
        0: on-policy), sync, evaluate when due. With k >= 1 the first iteration also
        generates the episodes up to ``episode + k - 1`` that no checkpoint held."""
        iteration = Iteration()
        last = self.runtime.num_episode
        k = self.staleness
        for ahead in range(episode, min(episode + k, last + 1)):
            if ahead not in self.in_flight:
                self.in_flight[ahead] = self._rollout(ahead, iteration)
        if not k:
            self.in_flight[episode] = self._rollout(episode, iteration)
        data = self.in_flight.pop(episode)
        data.timer, data.metrics = iteration.timer, iteration.metrics
        if "train" in self.plan.phases:
            with iteration.timer.stage("train"):
                self.interpreter.run_phase("train", data)
        if k and episode + k <= last:
            self.in_flight[episode + k] = self._rollout(episode + k, iteration)
        if data.syncs:
            with iteration.timer.stage("sync"):
                self.interpreter.run_phase("sync", data)
            self._synced(data.syncs, episode)
        evaluated = self._evaluate(episode, iteration) if self.eval_due(episode) else {}
        record = iteration.record(episode, self.runtime.num_episode)
        record.samples = sum(batch_size(mb) for mb in data.inputs["env"])
        record.metrics.update({f"rollout/{key}": n for key, n in data.columns.items()})
        record.metrics.update(evaluated)
        return record

    def _evaluation(self, episode: int) -> EpisodeRecord:
        """The record of an evaluation on its own (before training)."""
        iteration = Iteration()
        evaluated = self._evaluate(episode, iteration)
        record = iteration.record(episode, self.runtime.num_episode)
        record.metrics.update(evaluated)
        return record

    def _evaluate(self, episode: int, iteration: Iteration) -> dict[str, float]:
        """Run the eval phase; ``post_process``'s metrics as ``eval/<key>`` (rank 0)."""
        data = self._new_episode(episode, ("eval",))
        data.timer = iteration.timer
        with iteration.timer.stage("eval"):
            self.interpreter.run_phase("eval", data)
        if self.rank != 0:
            return {}
        try:
            result = self.job.post_process(data.returned("eval"))
            evaluated = contracts.metrics("the Evaluator's post_process", result)
        except Exception as err:
            self.comm.stop(f"rank 0 failed in the Evaluator's post_process of the evaluation "
                           f"after episode {episode}", err)  # fmt: skip
        return {f"eval/{k}": v for k, v in evaluated.items()}

    def _restored_rollouts(self, saved: dict[int, dict]) -> dict[int, Episode]:
        """The generated but untrained episodes a checkpoint held, as episodes again (the
        prompts are a function of the episode; the outputs and columns were saved), their
        tensors on this rank's device."""
        restored = {}
        for episode, entry in saved.items():
            data = self._new_episode(episode, ("env",))
            data.outputs["env"] = {k: _on(self.comm.device, batch)
                                   for k, batch in entry.get("outputs", {}).items()}  # fmt: skip
            data.columns = dict(entry.get("columns", {}))
            restored[episode] = data
        return restored

    def _finish(self, record: EpisodeRecord) -> None:
        """Merge the ranks' stage times (slowest rank) and metrics (mean) into rank 0's
        record, checkpoint when due (every rank), then report it (rank 0)."""
        parts = self.comm.all_gather_objects((record.stages, record.metrics, record.wall))
        stages: dict[str, float] = {}
        sums: dict[str, list[float]] = defaultdict(list)
        for rank_stages, rank_metrics, _ in parts:
            for key, seconds in rank_stages.items():
                stages[key] = max(stages.get(key, 0.0), seconds)
            for key, value in rank_metrics.items():
                if not key.startswith("eval/"):
                    sums[key].append(value)
        record.stages = stages
        record.wall = max(wall for _, _, wall in parts)
        record.metrics.update({k: sum(v) / len(v) for k, v in sums.items()})
        if record.episode > 0 and self.checkpoints.due(record.episode):
            synced = {dst for _, dst in self.due_syncs(record.episode)}
            in_flight = {e: {"outputs": d.outputs.get("env", {}), "columns": d.columns}
                         for e, d in self.in_flight.items()}  # fmt: skip
            self.checkpoints.save(record, self.history, synced, in_flight)
        if self.rank == 0:
            self.history.append(record)
            self.reporter.report(record)

    # -- set-up and teardown -------------------------------------------------------------
    def setup(self) -> None:
        """Set up the models this rank hosts and what the plan's instructions need."""
        self.comm.new_groups(self._rank_sets())
        self.job.on_setup()
        trainers = {p.model for p in self.plan.placement if p.role == "trainer"}
        for name, module in self.job.modules.items():
            module.config = self.job.config
            module.trainable = name in trainers
        for name in self.plan.hosted(self.rank):
            try:
                self._setup_model(name)
            except Exception as err:
                self.comm.stop(f"rank {self.rank} failed while setting up model {name}", err)
        try:
            self._setup_syncs()
        except Exception as err:
            self.comm.stop(f"rank {self.rank} failed while preparing parameter syncs", err)
        self.interpreter = Interpreter(self.plan, self.job, self.comm, self.hosted,
                                       self.timeline)  # fmt: skip

    def _setup_model(self, name: str) -> None:
        module = self.job.modules[name]
        reseed(self.runtime.seed, "setup", name)
        module.setup()
        self.hosted.precisions[name] = self.precisions[name]
        network = getattr(module, "model", None)
        if not module.trainable and isinstance(network, torch.nn.Module):
            cast_inference_model(network, self.precisions[name])
        if module.trainable:
            ranks = self.mesh[name]
            prepare(module, self.comm.group(ranks), len(ranks), self.runtime)
        if self.job.config.model(name).offload:
            self.hosted.offloads[name] = Offload(module)

    def _setup_syncs(self) -> None:
        bucket_bytes = self.runtime.sync_bucket_mb * 2**20
        for sync in self.plan.syncs:
            src, dst = self.job.modules[sync.src], self.job.modules[sync.dst]
            src_ranks, dst_ranks = self.mesh[sync.src], self.mesh[sync.dst]
            key = (sync.src, sync.dst)
            if src_ranks == dst_ranks:
                if self.rank in src_ranks:
                    self.hosted.local_syncs[key] = SyncPlan.build(src, dst, bucket_bytes)
            elif self.rank in src_ranks or self.rank in dst_ranks:
                self.hosted.cross_syncs[key] = CrossSync(src, dst, sync.buckets, self.rank,
                                                         src_ranks, dst_ranks,
                                                         self.precisions[sync.dst])  # fmt: skip

    def _rank_sets(self) -> list[tuple[int, ...]]:
        """Every process group the plan's instructions use (the same list on every rank)."""
        sets = [s.ranks for s in self.plan.streams]
        for stream in self.plan.streams:
            for ins in stream.instructions:
                if ins.op in ("GATHER", "BCAST"):
                    sets.append(tuple(sorted(set(ins.src_ranks) | set(ins.dst_ranks))))
                if ins.op == "BCAST":  # each bucket goes from one source rank to the destination
                    sets += [tuple(sorted({r, *ins.dst_ranks})) for r in ins.src_ranks]
        return sets

    def _teardown(self) -> None:
        for offload in self.hosted.offloads.values():
            offload.load()  # the user's modules are whole again after learn()
        for name in self.plan.hosted(self.rank):
            module = self.job.modules[name]
            network = getattr(module, "model", None)
            if (
                network is not None
                and hasattr(network, "module")
                and hasattr(network, "process_group")
            ):
                module.model = network.module  # unwrap DDP before its group goes away
        self.comm.barrier()


def _on(device: torch.device, batch: Batch) -> Batch:
    """``batch`` with its tensors on ``device`` (checkpoints load onto the CPU)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
