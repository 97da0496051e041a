"""The SPMD executor: every rank interprets its own instruction stream of the plan.

Ownership: in a phase whose waves are ``L`` micro-batches wide, data-parallel rank ``d``
of a mesh of ``n`` ranks owns micro-batches ``w*L + d*L/n ... w*L + (d+1)*L/n - 1`` of
wave ``w``. It computes them (``RUN``), sends each to the rank of the consuming mesh
that owns it (``SEND``/``RECV``), and contributes them to ``GATHER``s. Trainer ranks hold
the whole episode's output, cut it into the same global steps as a single process, and
each trains on its contiguous share of every step's micro-batches; DDP averages the
gradients, so the result equals the single-process run.

A failure on any rank is reported with the rank, the instruction, the model and the
user's source line, published to the other ranks, and ends the process; torchrun then
stops the rest. A rank that waits longer than ``runtime.timeout_s`` reports which
instruction it was waiting at and for whom.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from flowgraph.compiler.graph import TRAIN_METHOD, Graph, Node
from flowgraph.compiler.plan import Instruction, Plan
from flowgraph.data import Batch, batch_size
from flowgraph.runtime.backends import prepare
from flowgraph.runtime.episode import env_micro_batches, eval_micro_batches, training_steps
from flowgraph.runtime.graph_runner import GraphRunner
from flowgraph.runtime.launch import DistContext, format_exception
from flowgraph.runtime.local import Job
from flowgraph.runtime.offload import Offload
from flowgraph.runtime.resume import RunCheckpoints
from flowgraph.runtime.rng import reseed
from flowgraph.runtime.sync import CrossSync, SyncPlan
from flowgraph.runtime.telemetry import EpisodeRecord, MetricAverager, Reporter, StageTimer
from flowgraph.runtime.timeline import Timeline, write_trace
from flowgraph.runtime.transport import Outbox, all_gather_objects, recv_batch


def owned(wave: int, width: int, ranks: tuple[int, ...], rank: int, total: int) -> list[int]:
    """Micro-batches of ``wave`` that ``rank`` owns in a mesh of ``ranks``."""
    share = width // len(ranks)
    first = wave * width + ranks.index(rank) * share
    return [k for k in range(first, first + share) if k < total]


def owner(k: int, width: int, ranks: tuple[int, ...]) -> int:
    """The rank of mesh ``ranks`` that owns micro-batch ``k``."""
    return ranks[(k % width) // (width // len(ranks))]


@dataclass
class _Phase:
    graph: Graph
    runner: GraphRunner
    width: int
    total: int = 0


class SpmdRunner:
    """Runs a ``Job`` on this rank of a torchrun job, following ``plan``."""

    def __init__(self, job: Job, plan: Plan, ctx: DistContext) -> None:
        self.job, self.plan, self.ctx = job, plan, ctx
        self.runtime = job.config.runtime
        self.rank = ctx.rank
        self.stream = next((s for s in plan.streams if self.rank in s.ranks), None)
        self.mesh = {p.model: p.ranks for p in plan.placement}
        self.hosted = [m for m, ranks in self.mesh.items() if self.rank in ranks]
        self.phases: dict[str, _Phase] = {}
        for phase, graph in (
            ("env", job.env),
            ("train", job.trainer),
            ("eval", job.eval and job.eval.graph),
        ):
            if graph is not None:
                sizes = [len(self.mesh[m]) for m in graph.models()] or [1]
                self.phases[phase] = _Phase(
                    graph, GraphRunner(graph, job.modules, phase), math.lcm(*sizes)
                )
        self.tags = _transfer_tags(plan)
        self.runs = _coalesce_gathers(self.stream.instructions if self.stream else [])
        self.outbox = Outbox(ctx.device)
        self.reporter = Reporter(self.runtime, job.log, enabled=self.rank == 0)
        self.history: list[EpisodeRecord] = []
        self.episode = 0
        self.local_syncs: dict[tuple[str, str], SyncPlan] = {}
        self.cross_syncs: dict[tuple[str, str], CrossSync] = {}
        self.offloads: dict[str, Offload] = {}
        self.timer = StageTimer()
        self.timeline = Timeline(self.rank, self.runtime.trace)

    # -- set-up --------------------------------------------------------------------------
    def setup(self) -> None:
        self.ctx.new_groups(self._rank_sets())
        for name in self.hosted:
            try:
                self._setup_model(name)
            except Exception as err:
                self._stop(f"rank {self.rank} failed while setting up model {name}", err)
        try:
            self._setup_syncs()
        except Exception as err:
            self._stop(f"rank {self.rank} failed while preparing parameter syncs", err)

    def _setup_model(self, name: str) -> None:
        module = self.job.modules[name]
        reseed(self.runtime.seed, "setup", name)
        module.setup()
        if module.trainable:
            ranks = self.mesh[name]
            group = self.ctx.group(ranks) if len(ranks) > 1 else None
            prepare(module, group, len(ranks), self.runtime)
        if self.job.config.model(name).offload:
            self.offloads[name] = Offload(module)

    def _setup_syncs(self) -> None:
        for src, dst in self.job.syncs:
            key = (src.name, dst.name)
            if self.mesh[src.name] == self.mesh[dst.name]:
                if self.rank in self.mesh[src.name]:
                    self.local_syncs[key] = SyncPlan.build(src, dst, self._bucket_bytes)
            elif self.rank in self.mesh[src.name] or self.rank in self.mesh[dst.name]:
                self.cross_syncs[key] = CrossSync(
                    src,
                    dst,
                    self._bucket_count(key),
                    self.rank,
                    self.mesh[src.name],
                    self.mesh[dst.name],
                )

    def _rank_sets(self) -> list[tuple[int, ...]]:
        sets = [s.ranks for s in self.plan.streams]
        for stream in self.plan.streams:
            for ins in stream.instructions:
                if ins.op in ("GATHER", "BCAST"):
                    sets.append(tuple(sorted(set(ins.src_ranks) | set(ins.dst_ranks))))
                if ins.op == "BCAST":  # each bucket goes from one source rank to the destination
                    sets += [tuple(sorted({r, *ins.dst_ranks})) for r in ins.src_ranks]
        return sets

    @property
    def _bucket_bytes(self) -> int:
        return self.runtime.sync_bucket_mb * 2**20

    def _bucket_count(self, key: tuple[str, str]) -> int:
        target = f"{key[0]}->{key[1]}"
        buckets = {
            ins.bucket
            for s in self.plan.streams
            for ins in s.instructions
            if ins.op == "BCAST" and ins.target == target
        }
        return max(1, len(buckets))

    # -- the run -------------------------------------------------------------------------
    def run(self) -> list[EpisodeRecord]:
        self.setup()
        self.checkpoints = RunCheckpoints(
            self.job, self.rank, self.ctx.world_size, self.mesh, barrier=dist.barrier,
            agree=lambda ok: all(all_gather_objects(ok, dist.group.WORLD)),
            plan_hash=self.plan.hash(),
        )  # fmt: skip
        start, history = self.checkpoints.restore(trainable=True)
        self._run_phase("sync", episode=0, every_pair=True)  # inference starts from trainers
        self.checkpoints.restore(trainable=False)
        if self.rank == 0:
            self.history = history
            self.reporter.restore(history)
        if start == 0 and "eval" in self.phases and self.runtime.enable_eval_before_training:
            self._finish(self._episode(0, phases=("eval",)))
        for episode in range(start + 1, self.runtime.num_episode + 1):
            self._finish(self._episode(episode))
        self._teardown()
        if self.runtime.trace:
            parts = all_gather_objects(self.timeline.events, dist.group.WORLD)
            if self.rank == 0:
                write_trace(parts, Path(self.runtime.log_dir) / "trace.json")
        self.reporter.close()
        return self.history

    def _episode(self, episode: int, phases: tuple[str, ...] = ("env", "train", "sync", "eval")):
        timer, metrics = StageTimer(), MetricAverager()
        self.values: dict[tuple[str, int], Any] = {}
        self.episode, self.timer, self.metrics = episode, timer, metrics
        self.counters: dict[tuple, int] = defaultdict(int)
        self.train_steps: list[list[Batch]] | None = None
        if "env" in phases:
            self.inputs = env_micro_batches(self.job.dataset, self.runtime, episode)
            if "env" in self.phases:
                self.phases["env"].total = len(self.inputs)
        interval = self.runtime.eval_episode_interval
        eval_due = "eval" in self.phases and (
            episode == 0 or (interval and episode % interval == 0)
        )
        if eval_due:
            self.eval_inputs = eval_micro_batches(self.job.eval.dataset, self.runtime)
            self.phases["eval"].total = len(self.eval_inputs)
        for phase in phases:
            if phase == "eval" and not eval_due:
                continue
            with timer.stage(phase):
                self._run_phase(phase, episode)
        self.outbox.wait()
        record = EpisodeRecord(episode, self.runtime.num_episode, samples=0)
        if "env" in phases:
            record.samples = sum(batch_size(mb) for mb in self.inputs)
        record.stages.update(timer.seconds)
        record.metrics.update(metrics.means())
        if eval_due and self.rank == 0:
            results = self._phase_outputs("eval")
            metrics = self.job.eval.post_process(results) or {}
            record.metrics.update({f"eval/{k}": v for k, v in metrics.items()})
        return record

    def _phase_outputs(self, phase: str) -> list[Batch]:
        """The returned node's value for every micro-batch of the phase, in order (on a rank
        that gathered them)."""
        returned = self.phases[phase].graph.returned
        if returned is None:
            return []
        return [self.values[(returned.name, k)] for k in range(self.phases[phase].total)]

    def _run_phase(self, phase: str, episode: int, every_pair: bool = False) -> None:
        for run in self.runs:
            ins = run[0]
            if ins.phase != phase:
                continue
            if phase == "sync" and not (every_pair or self._sync_due(ins, episode)):
                continue
            try:
                with self._slice(run, episode):
                    if len(run) > 1:
                        self._gather_waves(run)
                    else:
                        self._execute(ins)
            except Exception as err:
                self._fail(ins, err)

    def _slice(self, run: list[Instruction], episode: int):
        """The timeline slice of one instruction (or of a coalesced run of GATHERs, which
        lists them all); nothing is formatted when the timeline is off."""
        if not self.timeline.enabled:
            return contextlib.nullcontext()
        names = [str(ins) for ins in run]
        more = {"instructions": names} if len(run) > 1 else {}
        ins = run[0]
        return self.timeline.slice(names[0], ins.op, phase=ins.phase, episode=episode, **more)

    def _sync_due(self, ins: Instruction, episode: int) -> bool:
        """A SYNC/BCAST runs when its destination's ``sync_frequency`` divides the episode;
        a LOAD/FREE of the sync phase when any sync of its model does."""
        if ins.op in ("LOAD", "FREE"):
            pairs = [(s.name, d.name) for s, d in self.job.syncs if ins.model in (s.name, d.name)]
        else:
            pairs = [tuple(ins.target.split("->"))]
        return any(episode % self.job.config.model(dst).sync_frequency == 0 for _, dst in pairs)

    # -- instructions --------------------------------------------------------------------
    def _execute(self, ins: Instruction) -> None:
        handler = getattr(self, f"_op_{ins.op.lower()}")
        handler(ins)

    def _node(self, ins: Instruction, method_target: str, index_key: object) -> Node:
        """The graph node an instruction refers to (the n-th call of the same target)."""
        graph = self.phases[ins.phase].graph
        candidates = [n for n in graph.calls() if n.target == method_target]
        key = (ins.phase, method_target, index_key)
        n = self.counters[key]
        self.counters[key] += 1
        return candidates[n % len(candidates)]

    def _input(self, phase: str, k: int) -> Batch:
        return self.inputs[k] if phase == "env" else self.eval_inputs[k]

    def _op_run(self, ins: Instruction) -> None:
        node = self._node(ins, ins.target, ins.mb)
        phase = self.phases[ins.phase]
        if ins.phase == "train":
            self._train_node(node, ins.mb)
            return
        step = phase.runner.step_for(node.name)
        ranks = self.mesh[node.model]
        for k in owned(ins.mb, phase.width, ranks, self.rank, phase.total):
            values = {name: self._value(ins.phase, name, k) for name in node.inputs}
            self.values[(node.name, k)] = phase.runner.run_node(
                step, values, self.timer, (self.runtime.seed, self.episode, k)
            )

    def _value(self, phase: str, name: str, k: int) -> Batch:
        if name == self.phases[phase].graph.input_node.name:
            return self._input(phase, k)
        return self.values[(name, k)]

    def _op_send(self, ins: Instruction) -> None:
        phase = self.phases[ins.phase]
        name = ins.target.removeprefix("%")
        for k in owned(ins.mb, phase.width, ins.src_ranks, self.rank, phase.total):
            dst = owner(k, phase.width, ins.dst_ranks)
            self.outbox.send(self.values[(name, k)], dst, self.tags[ins.key()])

    def _op_recv(self, ins: Instruction) -> None:
        phase = self.phases[ins.phase]
        name = ins.target.removeprefix("%")
        for k in owned(ins.mb, phase.width, ins.dst_ranks, self.rank, phase.total):
            src = owner(k, phase.width, ins.src_ranks)
            self.values[(name, k)] = recv_batch(src, self.tags[ins.key()], self.ctx.device)

    def _op_gather(self, ins: Instruction) -> None:
        self._gather_waves([ins])

    def _gather_waves(self, run: list[Instruction]) -> None:
        """One collective for a run of GATHERs of consecutive waves (same node and groups
        in every member's stream, so all members coalesce alike)."""
        ins = run[0]
        phase = self.phases[ins.phase]
        name = ins.target.removeprefix("%")
        mine = {}
        if self.rank in ins.src_ranks:
            for wave in (i.mb for i in run):
                for k in owned(wave, phase.width, ins.src_ranks, self.rank, phase.total):
                    mine[k] = self.values[(name, k)]
        members = tuple(sorted(set(ins.src_ranks) | set(ins.dst_ranks)))
        group = self.ctx.group(members) if len(members) > 1 else None
        if self.rank in ins.dst_ranks:
            for part in all_gather_objects(mine, group):
                for k, value in part.items():
                    self.values[(name, k)] = value
        else:
            all_gather_objects(mine, group)

    def _op_train(self, ins: Instruction) -> None:
        self._train_node(self._node(ins, f"{ins.target}.{TRAIN_METHOD}", ins.step), ins.step)

    def _train_node(self, node: Node, step_index: int) -> None:
        phase = self.phases["train"]
        if self.train_steps is None:
            outputs = self._phase_outputs("env") if "env" in self.phases else self.inputs
            self.train_steps = training_steps(outputs, self.runtime, self.episode)
        micro = self.train_steps[step_index]
        ranks = self.mesh[node.model]
        share = len(micro) // len(ranks)
        start = ranks.index(self.rank) * share
        values = {phase.graph.input_node.name: micro[start : start + share]}
        for other in phase.graph.calls():
            if (other.name, step_index) in self.values:
                values[other.name] = self.values[(other.name, step_index)]
        step = phase.runner.step_for(node.name)
        result = phase.runner.run_train_node(
            step, values, self.timer, self.metrics, (self.runtime.seed, self.episode, step_index)
        )
        self.values[(node.name, step_index)] = result

    def _op_sync(self, ins: Instruction) -> None:
        src, dst = ins.target.split("->")
        plan = self.local_syncs[(src, dst)]
        plan.apply()
        if self.runtime.validate_sync:
            plan.validate()

    def _op_bcast(self, ins: Instruction) -> None:
        src, dst = ins.target.split("->")
        members = tuple(sorted(set(ins.src_ranks) | set(ins.dst_ranks)))
        sync = self.cross_syncs[(src, dst)]
        root_and_destination = (sync.root(ins.bucket), *ins.dst_ranks)
        sync.broadcast(ins.bucket, self.ctx.group(root_and_destination))
        if self.runtime.validate_sync and ins.bucket == len(sync.buckets) - 1:
            sync.validate(self.ctx.group(members))

    def _op_free(self, ins: Instruction) -> None:
        with self.timer.stage(f"{ins.phase}/offload"):
            self.offloads[ins.model].free()

    def _op_load(self, ins: Instruction) -> None:
        with self.timer.stage(f"{ins.phase}/offload"):
            self.offloads[ins.model].load()

    # -- records and failures ------------------------------------------------------------
    def _finish(self, record: EpisodeRecord) -> None:
        """Merge the ranks' stage times (slowest rank) and metrics (mean) into rank 0's
        record, checkpoint when due (every rank), then report it (rank 0)."""
        parts = all_gather_objects(
            (record.stages, record.metrics), None if self.ctx.world_size == 1 else dist.group.WORLD
        )
        stages: dict[str, float] = {}
        sums: dict[str, list[float]] = defaultdict(list)
        for rank_stages, rank_metrics in parts:
            for key, seconds in rank_stages.items():
                stages[key] = max(stages.get(key, 0.0), seconds)
            for key, value in rank_metrics.items():
                if not key.startswith("eval/"):
                    sums[key].append(value)
        record.stages = stages
        record.metrics.update({k: sum(v) / len(v) for k, v in sums.items()})
        if record.episode > 0 and self.checkpoints.due(record.episode):
            self.checkpoints.save(record, self.history)
        if self.rank == 0:
            self.history.append(record)
            self.reporter.report(record)

    def _teardown(self) -> None:
        for offload in self.offloads.values():
            offload.load()  # the user's modules are whole again after learn()
        for name in self.hosted:
            module = self.job.modules[name]
            network = getattr(module, "model", None)
            if (
                network is not None
                and hasattr(network, "module")
                and hasattr(network, "process_group")
            ):
                module.model = network.module  # unwrap DDP before its group goes away
        dist.barrier()

    def _fail(self, ins: Instruction, err: Exception) -> None:
        where = f"rank {self.rank} failed at `{ins}` (phase {ins.phase}, episode {self.episode})"
        model = _instruction_model(ins, self.phases)
        if model is not None:
            where += f"\n  model {model.model}: {model}  # {model.source}"
        if ins.is_communication and _is_communication_failure(err):
            peers = sorted((set(ins.src_ranks) | set(ins.dst_ranks)) - {self.rank})
            silent = (
                f"no answer from rank(s) {peers} within runtime.timeout_s="
                f"{self.runtime.timeout_s:g} s ({type(err).__name__}: {err})"
            )
            self._stop(where, err, silent)
        self._stop(where, err)

    def _stop(self, where: str, err: Exception, silent: str | None = None) -> None:
        """Report why this rank stops (or which other rank's failure stopped it), publish it
        to the other ranks, and end the process; torchrun then stops the others."""
        elsewhere = self.ctx.failure_elsewhere()
        if elsewhere is not None and not elsewhere.startswith(f"{self.rank}\n"):
            other, _, text = elsewhere.partition("\n")
            message = f"flowgraph: rank {self.rank} stops because rank {other} failed:\n{text}"
        elif silent is not None:
            message = f"flowgraph: {where}\n  {silent}"
        else:
            message = f"flowgraph: {where}\n{format_exception(err)}"
        self.ctx.report_failure(message)
        sys.stdout.flush()
        os._exit(1)


def _is_communication_failure(err: Exception) -> bool:
    """A timeout or a lost peer, as gloo and NCCL report them (not a bug in our code)."""
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        marker in text for marker in ("Timed out", "timed out", "Connection", "closed by peer")
    )


def _instruction_model(ins: Instruction, phases: Mapping[str, _Phase]) -> Node | None:
    if ins.op not in ("RUN", "TRAIN") or ins.phase not in phases:
        return None
    target = ins.target if ins.op == "RUN" else f"{ins.target}.{TRAIN_METHOD}"
    return next((n for n in phases[ins.phase].graph.calls() if n.target == target), None)


def _coalesce_gathers(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The stream as runs: consecutive GATHERs of one node between the same groups form
    one run (executed as one collective); every other instruction is a run of its own."""
    runs: list[list[Instruction]] = []
    for ins in instructions:
        last = runs[-1][0] if runs else None
        same = (
            last is not None
            and ins.op == last.op == "GATHER"
            and (ins.phase, ins.target, ins.src_ranks, ins.dst_ranks)
            == (last.phase, last.target, last.src_ranks, last.dst_ranks)
        )
        if same:
            runs[-1].append(ins)
        else:
            runs.append([ins])
    return runs


def _transfer_tags(plan: Plan) -> dict[tuple, int]:
    """A tag per point-to-point transfer, the same on every rank (the plan is)."""
    tags: dict[tuple, int] = {}
    for stream in plan.streams:
        for ins in stream.instructions:
            if ins.op == "SEND":
                tags.setdefault(ins.key(), len(tags) + 1)
    return tags
