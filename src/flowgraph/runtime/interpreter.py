"""The interpreter: this rank runs its stream of the plan, one phase at a time.

Ownership: in a phase whose waves are ``L`` micro-batches wide (``PhaseSpec.width``),
data-parallel rank ``d`` of a mesh of ``n`` ranks owns micro-batches
``w*L + d*L/n ... w*L + (d+1)*L/n - 1`` of wave ``w``. It computes them (``RUN``), sends
each to the rank of the consuming mesh that owns it (``SEND``/``RECV``), and contributes
them to ``GATHER``s. Trainer ranks hold the whole episode's output, cut it into the same
global steps as a single process, and each trains on its contiguous share of every step's
micro-batches; DDP averages the gradients, so the result equals the single-process run.

Values live for one phase and are dropped after their last use in this rank's stream, as
torch.fx's interpreter does; the returned values that a ``GATHER`` collects are kept in
the episode for the trainers (env) or for ``post_process`` (eval).

A failure is reported with the rank, the instruction, the model and the user's source
line (``Communicator.stop``: raised in one process, published to every rank under
torchrun). A rank that waits longer than ``runtime.timeout_s`` says which instruction it
was waiting at and for whom.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flowgraph.compiler.plan import Instruction, PhaseSpec, Plan
from flowgraph.data import Batch, batch_size
from flowgraph.precision import compute_context
from flowgraph.runtime.comm import Communicator
from flowgraph.runtime.episode import training_steps, with_columns
from flowgraph.runtime.job import Job
from flowgraph.runtime.kernels import Kernels
from flowgraph.runtime.offload import Offload
from flowgraph.runtime.sync import CrossSync, SyncPlan
from flowgraph.runtime.telemetry import MetricAverager, StageTimer
from flowgraph.runtime.timeline import Timeline


@functools.lru_cache(maxsize=65536)
def owned(wave: int, width: int, ranks: tuple[int, ...], rank: int, total: int) -> range:
    """Micro-batches of ``wave`` that ``rank`` owns in a mesh of ``ranks``."""
    share = width // len(ranks)
    first = wave * width + ranks.index(rank) * share
    return range(first, min(first + share, total))


def owner(k: int, width: int, ranks: tuple[int, ...]) -> int:
    """The rank of mesh ``ranks`` that owns micro-batch ``k``."""
    return ranks[(k % width) // (width // len(ranks))]


@dataclass
class Hosted:
    """What this rank set up for the plan's SYNC, BCAST, FREE and LOAD instructions."""

    local_syncs: dict[tuple[str, str], SyncPlan] = field(default_factory=dict)
    cross_syncs: dict[tuple[str, str], CrossSync] = field(default_factory=dict)
    offloads: dict[str, Offload] = field(default_factory=dict)
    precisions: dict[str, str] = field(default_factory=dict)  # resolved, per hosted model
    device_type: str = "cpu"

    def computing(self, model: str) -> contextlib.AbstractContextManager:
        """The autocast context that ``model``'s step methods run in (its precision)."""
        return compute_context(self.precisions.get(model, "fp32"), self.device_type)


@dataclass
class Episode:
    """One episode's data on this rank, as the phases fill it in."""

    number: int
    inputs: dict[str, list[Batch]]  # micro-batches of the env and eval phases
    syncs: frozenset[tuple[str, str]] = frozenset()  # the (src, dst) pairs due
    outputs: dict[str, dict[int, Batch]] = field(default_factory=dict)  # gathered returns
    timer: StageTimer = field(default_factory=StageTimer)
    metrics: MetricAverager = field(default_factory=MetricAverager)
    steps: list[list[Batch]] | None = None  # the train phase's global steps, when cut
    columns: dict[str, int] = field(default_factory=dict)  # per-row facts added for training

    def returned(self, phase: str) -> list[Batch]:
        """The returned value of every micro-batch of ``phase``, in order (where gathered)."""
        gathered = self.outputs.get(phase, {})
        return [gathered[k] for k in sorted(gathered)]


class Interpreter:
    """Runs one rank's stream of ``plan``; ``run_phase`` executes one phase of it."""

    def __init__(
        self, plan: Plan, job: Job, comm: Communicator, hosted: Hosted, timeline: Timeline
    ) -> None:
        self.plan, self.job, self.comm, self.hosted = plan, job, comm, hosted
        self.runtime = job.config.runtime
        self.rank, self.timeline = comm.rank, timeline
        self.mesh = {p.model: p.ranks for p in plan.placement}
        stream = next((s for s in plan.streams if self.rank in s.ranks), None)
        runs = _coalesce_gathers(stream.instructions if stream else [])
        self.runs = {phase: [r for r in runs if r[0].phase == phase] for phase in _phases(runs)}
        self.drops = {phase: _last_uses(self.runs[phase], plan.phases.get(phase))
                      for phase in self.runs}  # fmt: skip
        check = self.runtime.check_merges
        self.kernels = {
            phase: Kernels(
                spec, job.modules, phase, check, hosted.computing, self.runtime.on_nonfinite
            )
            for phase, spec in plan.phases.items()
        }
        self.values: dict[tuple[str, int], Any] = {}
        self.total = 0  # micro-batches of the env or eval phase running
        self.handlers = {id(run[0]): self._handler(run) for run in runs}

    # -- phases ----------------------------------------------------------------------
    def run_phase(self, phase: str, episode: Episode) -> None:
        """Run this rank's instructions of ``phase`` (for ``sync``: those of the due pairs)."""
        self.values = {}
        self.episode = episode
        if phase in episode.inputs:
            self.total = len(episode.inputs[phase])
        drops = self.drops[phase] if phase in self.drops else {}
        traced = self.timeline.enabled
        for index, run in enumerate(self.runs.get(phase, [])):
            if phase == "sync" and not self._sync_due(run[0], episode):
                continue
            try:
                if traced:
                    with self._slice(run, episode.number):
                        self._execute(run)
                else:
                    self._execute(run)
            except Exception as err:
                self._fail(run[0], err)
            for key in drops.get(index, ()):
                self.values.pop(key, None)
        if phase != "sync":
            self.comm.wait_sends()
        self.values = {}

    def _execute(self, run: list[Instruction]) -> None:
        """One instruction (or one coalesced run of GATHERs)."""
        self.handlers[id(run[0])]()

    def _handler(self, run: list[Instruction]) -> Callable[[], None]:
        """What executing ``run`` does, resolved once at start-up."""
        ins = run[0]
        if ins.op == "GATHER":
            return functools.partial(self._gather, run)
        if ins.op == "RUN" and ins.phase != "train":
            return self._prepared_run(ins)
        if ins.op == "RUN":  # a non-training call of a trainer flow
            return functools.partial(self._train, ins)
        return functools.partial(getattr(self, f"_op_{ins.op.lower()}"), ins)

    def _prepared_run(self, ins: Instruction) -> Callable[[], None]:
        """A RUN of the env or eval phase with everything resolved once (the hot path:
        one call per model call)."""
        spec = self.plan.phases[ins.phase]
        node = spec.node(ins.node)
        run, name, inputs, flow = self.kernels[ins.phase].run, node.name, node.inputs, spec.input
        wave, width, ranks, rank, seed = ins.wave, spec.width, self.mesh[node.model], self.rank, \
            self.runtime.seed  # fmt: skip

        def execute() -> None:
            values, episode = self.values, self.episode
            flow_input = episode.inputs[ins.phase]
            for k in owned(wave, width, ranks, rank, self.total):
                args = {n: flow_input[k] if n == flow else values[(n, k)] for n in inputs}
                values[(name, k)] = run(name, args, episode.timer, (seed, episode.number, k))

        return execute

    def _sync_due(self, ins: Instruction, episode: Episode) -> bool:
        """A SYNC/BCAST runs when its pair is due; a LOAD/FREE when a due pair uses its model."""
        if ins.op in ("LOAD", "FREE"):
            return any(ins.model in pair for pair in episode.syncs)
        return (ins.src, ins.dst) in episode.syncs

    def _slice(self, run: list[Instruction], episode: int):
        """The timeline slice of one instruction (or of a coalesced run of GATHERs, which
        lists them all)."""
        names = [str(ins) for ins in run]
        more = {"instructions": names} if len(run) > 1 else {}
        ins = run[0]
        return self.timeline.slice(names[0], ins.op, phase=ins.phase, episode=episode, **more)

    # -- values ------------------------------------------------------------------------
    def _spec(self, phase: str) -> PhaseSpec:
        return self.plan.phases[phase]

    def _total(self, phase: str) -> int:
        """Micro-batches (env, eval) or global steps (train) of the phase running."""
        return len(self._steps()) if phase == "train" else self.total

    def _steps(self) -> list[list[Batch]]:
        """The episode's global steps: the env's gathered output (or, with no env, the
        sampled micro-batches) shuffled and cut as in one process."""
        if self.episode.steps is None:
            data = self.episode.returned("env") if "env" in self.plan.phases else None
            if data is None:
                data = self.episode.inputs["env"]
            data = [with_columns(mb, self.episode.columns) for mb in data]
            self.episode.steps = training_steps(data, self.runtime, self.episode.number)
            self._warn_if_filtered(data, len(self.episode.steps))
        return self.episode.steps

    def _warn_if_filtered(self, data: list[Batch], steps: int) -> None:
        """An env flow that drops rows (a filter, e.g. DAPO's dynamic sampling, or online
        DPO's pairing) trains on the full global batches left: say so when none is."""
        if steps == 0:
            rows = sum(batch_size(mb) for mb in data)
            warnings.warn(
                f"episode {self.episode.number}: the env flow returned {rows} rows, fewer than "
                f"one global batch (train_global_batch_size={self.runtime.global_batch_size}):"
                " no optimizer step this episode; raise sample_per_episode to over-sample "
                "when a filter drops rows, or lower train_global_batch_size",
                stacklevel=2,
            )

    # -- instructions ------------------------------------------------------------------
    def _op_train(self, ins: Instruction) -> None:
        self._train(ins)

    def _train(self, ins: Instruction) -> None:
        """One node of the trainer flow at one global step, on this rank's share of it."""
        if ins.step >= len(self._steps()):  # rows filtered out: this step has no batch
            return
        spec = self._spec("train")
        node = spec.node(ins.node)
        micro = self._steps()[ins.step]
        ranks = self.mesh[node.model]
        share = len(micro) // len(ranks)
        start = ranks.index(self.rank) * share
        values = {spec.input: micro[start : start + share]}
        for name in node.inputs:
            if name != spec.input:
                values[name] = self.values[(name, ins.step)]
        self.values[(node.name, ins.step)] = self.kernels["train"].run_train(
            node.name, values, self.episode.timer, self.episode.metrics,
            (self.runtime.seed, self.episode.number, ins.step),
        )  # fmt: skip

    def _op_send(self, ins: Instruction) -> None:
        spec = self._spec(ins.phase)
        for k in owned(ins.wave, spec.width, ins.src_ranks, self.rank, self._total(ins.phase)):
            self.comm.send(self.values[(ins.node, k)], owner(k, spec.width, ins.dst_ranks))

    def _op_recv(self, ins: Instruction) -> None:
        spec = self._spec(ins.phase)
        for k in owned(ins.wave, spec.width, ins.dst_ranks, self.rank, self._total(ins.phase)):
            self.values[(ins.node, k)] = self.comm.recv(owner(k, spec.width, ins.src_ranks))

    def _gather(self, run: list[Instruction]) -> None:
        """One collective for a run of GATHERs of consecutive waves (same node and groups
        in every member's stream, so all members coalesce alike)."""
        ins = run[0]
        spec, total = self._spec(ins.phase), self._total(ins.phase)
        mine = {}
        if self.rank in ins.src_ranks:
            for wave in (i.wave for i in run):
                for k in owned(wave, spec.width, ins.src_ranks, self.rank, total):
                    mine[k] = self.values[(ins.node, k)]
        members = tuple(sorted(set(ins.src_ranks) | set(ins.dst_ranks)))
        gathered = self.comm.gather(mine, members)
        if self.rank in ins.dst_ranks:
            self.episode.outputs.setdefault(ins.phase, {}).update(gathered)

    def _op_sync(self, ins: Instruction) -> None:
        plan = self.hosted.local_syncs[(ins.src, ins.dst)]
        plan.apply()
        if self.runtime.validate_sync:
            plan.validate()

    def _op_bcast(self, ins: Instruction) -> None:
        sync = self.hosted.cross_syncs[(ins.src, ins.dst)]
        root_and_destination = (sync.root(ins.bucket), *ins.dst_ranks)
        sync.broadcast(ins.bucket, self.comm.group(root_and_destination))
        if self.runtime.validate_sync and ins.bucket == len(sync.buckets) - 1:
            sync.validate(self.comm.group((*ins.src_ranks, *ins.dst_ranks)))

    def _op_free(self, ins: Instruction) -> None:
        with self.episode.timer.stage(f"{ins.phase}/offload"):
            self.hosted.offloads[ins.model].free()

    def _op_load(self, ins: Instruction) -> None:
        with self.episode.timer.stage(f"{ins.phase}/offload"):
            self.hosted.offloads[ins.model].load()

    # -- failures ----------------------------------------------------------------------
    def _fail(self, ins: Instruction, err: Exception) -> None:
        episode = self.episode.number
        where = f"rank {self.rank} failed at `{ins}` (phase {ins.phase}, episode {episode})"
        if ins.op in ("RUN", "TRAIN"):
            where += f"\n  model {ins.model}: {self._spec(ins.phase).node(ins.node)}"
        silent = None
        if ins.is_communication and _is_communication_failure(err):
            peers = sorted((set(ins.src_ranks) | set(ins.dst_ranks)) - {self.rank})
            silent = (
                f"no answer from rank(s) {peers} within runtime.timeout_s="
                f"{self.runtime.timeout_s:g} s ({type(err).__name__}: {err})"
            )
        self.comm.stop(where, err, silent)


def _is_communication_failure(err: Exception) -> bool:
    """A timeout or a lost peer, as gloo and NCCL report them (not a bug in our code)."""
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        marker in text for marker in ("Timed out", "timed out", "Connection", "closed by peer")
    )


def _phases(runs: list[list[Instruction]]) -> list[str]:
    return list(dict.fromkeys(run[0].phase for run in runs))


def _coalesce_gathers(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The stream as runs: consecutive GATHERs of one node between the same groups form
    one run (executed as one collective); every other instruction is a run of its own."""
    runs: list[list[Instruction]] = []
    for ins in instructions:
        last = runs[-1][0] if runs else None
        same = (
            last is not None
            and ins.op == last.op == "GATHER"
            and (ins.phase, ins.node, ins.src_ranks, ins.dst_ranks)
            == (last.phase, last.node, last.src_ranks, last.dst_ranks)
        )
        if same:
            runs[-1].append(ins)
        else:
            runs.append([ins])
    return runs


def _last_uses(
    runs: list[list[Instruction]], spec: PhaseSpec | None
) -> Mapping[int, list[tuple[str, int]]]:
    """For each run of a phase, the values it is the last to touch on this rank (made by
    RUN, TRAIN or RECV, read by RUN or TRAIN, moved by SEND or GATHER), as the keys
    ``(node, micro-batch or step)`` the interpreter drops after it."""
    if spec is None:
        return {}
    last: dict[tuple[str, int], int] = {}
    for index, run in enumerate(runs):
        for ins in run:
            if ins.op in ("RUN", "TRAIN"):
                last[(ins.node, ins.index)] = index
                for name in spec.node(ins.node).inputs:
                    if name != spec.input:
                        last[(name, ins.index)] = index
            elif ins.op in ("SEND", "RECV", "GATHER"):
                last[(ins.node, ins.index)] = index
    drops: dict[int, list[tuple[str, int]]] = {}
    for (name, at), index in last.items():
        keys = range(at * spec.width, (at + 1) * spec.width)
        drops.setdefault(index, []).extend((name, k) for k in keys)
    return drops
