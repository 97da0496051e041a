"""What a run saves at a checkpoint and restores when it resumes.

``RunCheckpoints.restore`` is called twice at the start of ``learn()``: for the trainable
models before the first parameter sync (so that the inference copies start from the
resumed trainers), and for the saved inference models after it (so that a copy the sync
did not recompute gets its own saved weights back).

Example::

    checkpoints = RunCheckpoints(job, plan, comm)
    start, history = checkpoints.restore(trainable=True)   # (0, []) on a fresh run
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from flowgraph.compiler.plan import Plan
from flowgraph.errors import CheckpointError
from flowgraph.module import BaseModule, DeepSpeedModule
from flowgraph.runtime.checkpoint import (
    Checkpoint,
    CheckpointStore,
    check_compatible,
    foreign_meta,
    save_object,
)
from flowgraph.runtime.comm import Communicator
from flowgraph.runtime.job import Job
from flowgraph.runtime.rng import rng_state, set_rng_state
from flowgraph.runtime.telemetry import EpisodeRecord

log = logging.getLogger("flowgraph")
IN_FLIGHT = "in_flight.pt"  # env outputs of the generated, untrained episodes
RUN_META = {"fingerprint": str, "models": list, "config": dict, "history": list}


def flow_fingerprint(plan: Plan) -> str:
    """A hash of what the flows call and which models train and sync (not source lines:
    editing a comment above a flow does not invalidate checkpoints)."""
    parts = []
    for name, spec in plan.phases.items():
        calls = ";".join(node.call_text() for node in spec.nodes)
        parts.append(f"{name}:{spec.input}:{calls}:return {spec.returned}")
    roles = sorted((p.model, p.role) for p in plan.placement)
    parts.append("models:" + ",".join(f"{n}={int(role == 'trainer')}" for n, role in roles))
    parts.append("syncs:" + ",".join(f"{s.src}->{s.dst}" for s in plan.syncs))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def config_changes(
    saved: dict, current: dict, prefix: str = "", ignore: tuple[str, ...] = ("runtime.num_episode",)
) -> list[str]:
    """``key: old -> new`` for every setting that differs, those of ``ignore`` aside (by
    default ``runtime.num_episode``: raising it is how a finished run is extended)."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_changes(old, new, name + ".", ignore)
        elif old != new and name not in ignore:
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


def _per_rank(module: BaseModule) -> bool:
    """Whether the module's checkpoint is DeepSpeed's own, one part per rank."""
    return isinstance(module, DeepSpeedModule) and module.engine is not None


class RunCheckpoints:
    """Checkpointing of one rank of a run: which models it writes and loads, when."""

    def __init__(self, job: Job, plan: Plan, comm: Communicator) -> None:
        self.job, self.comm = job, comm
        self.rank, self.world_size = comm.rank, comm.world_size
        self.mesh = {p.model: p.ranks for p in plan.placement}
        self.trains = "train" in plan.phases
        runtime = job.config.runtime
        self.interval = runtime.save_episode_interval
        self.store, self.plan_hash = None, None
        if runtime.checkpoint_dir:
            self.plan_hash = plan.layout_hash()
            self.store = CheckpointStore(
                runtime.checkpoint_dir, runtime.max_checkpoints, self.rank, self.world_size,
                comm.barrier, runtime.checkpoint_checksums,
            )  # fmt: skip
        # The ranks the env output is gathered on hold all of it: the first one writes what
        # is in flight, and all of them read it back.
        gathers = [i for s in plan.streams for i in s.instructions
                   if i.op == "GATHER" and i.phase == "env"]  # fmt: skip
        self.gathering = sorted({r for i in gathers for r in i.dst_ranks})
        self.in_flight_writer = self.gathering[0] if self.gathering else 0
        self.fingerprint = flow_fingerprint(plan)
        self.precisions = job.precisions(comm.device.type)
        self.resumed: Checkpoint | None = None
        self.states: dict[str, object] = {}
        if self.store is not None and runtime.resume:
            self.resumed, self.states = self._choose()

    def hosted(self, name: str) -> bool:
        return self.rank in self.mesh[name]

    # -- saving ------------------------------------------------------------------------
    def due(self, episode: int) -> bool:
        return bool(self.store and self.interval and episode % self.interval == 0)

    def saved_models(self, synced: Collection[str]) -> list[str]:
        """Trainable models, and inference models that this episode's sync (into the
        models ``synced``) did not just recompute from a trainer."""
        return [n for n, m in self.job.modules.items() if m.trainable or n not in synced]

    def position(self, episode: int) -> dict[str, int]:
        """Where the run stands after ``episode``: samples drawn and optimizer steps taken
        (the data order is a function of seed and episode, so this is all a loader needs)."""
        runtime = self.job.config.runtime
        steps = runtime.num_training_epoch * runtime.rows_per_episode // runtime.global_batch_size
        return {"episode": episode, "seed": runtime.seed,
                "samples": episode * runtime.sample_per_episode,
                "optimizer_steps": episode * steps if self.trains else 0}  # fmt: skip

    def save(
        self,
        record: EpisodeRecord,
        history: list[EpisodeRecord],
        synced: Collection[str],
        in_flight: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> Path:
        """Checkpoint after ``record``'s episode (``history``: the records before it;
        ``synced``: the models its sync wrote into; ``in_flight``: the env outputs (and the
        rows' columns) of the
        episodes generated but not yet trained, by episode, as this rank holds them);
        the time it takes goes into the record's ``checkpoint`` stage."""
        start = time.perf_counter()
        episode = record.episode
        names = self.saved_models(synced)
        in_flight = dict(in_flight or {})

        def write_files(directory: Path) -> None:
            for name in names:
                module = self.job.modules[name]
                if not self.hosted(name):
                    continue
                if _per_rank(module):
                    module.engine.save_checkpoint(str(directory / f"deepspeed_{name}"),
                                                  tag="state", save_latest=False)  # fmt: skip
                elif self.rank == self.mesh[name][0]:
                    save_object(module.checkpoint_state(), directory / f"model_{name}.pt")
            save_object(rng_state(), directory / f"rng_rank{self.rank}.pt")
            if in_flight and self.rank == self.in_flight_writer:
                save_object(in_flight, directory / IN_FLIGHT)

        meta = {
            "fingerprint": self.fingerprint,
            "plan_hash": self.plan_hash,
            "models": names,
            "precision": self.precisions,
            "data": self.position(episode),
            "config": self.job.config.model_dump(mode="json"),
            "history": [r.to_json() for r in [*history, record]],
            "in_flight": sorted(in_flight),
        }
        path = self.store.save(episode, write_files, meta)
        record.stages["checkpoint"] = time.perf_counter() - start
        return path

    # -- resuming ----------------------------------------------------------------------
    def _choose(self) -> tuple[Checkpoint | None, dict[str, object]]:
        """The newest checkpoint whose files every rank could read, and this rank's part of
        it (model states by name, ``rng`` for its RNG states)."""
        per_rank = [n for n, m in self.job.modules.items() if _per_rank(m)]
        for checkpoint in self.store.candidates():
            foreign = foreign_meta(checkpoint.path, checkpoint.meta, RUN_META)
            if foreign:
                self.store.warn_skipped(checkpoint.path, foreign)
                continue
            check_compatible(checkpoint, self.fingerprint, self.world_size, per_rank,
                             self.plan_hash)  # fmt: skip
            try:
                states, problem = self._read(checkpoint), None
            except Exception as err:  # noqa: BLE001 - any unreadable file disqualifies it
                states, problem = {}, f"rank {self.rank}: {type(err).__name__}: {err}"
                log.warning("flowgraph: %s cannot be read on %s", checkpoint, problem)
            if all(self.comm.all_gather_objects(problem is None)):
                return checkpoint, states
            self.store.warn_skipped(checkpoint.path, problem or "another rank could not read it")
        return None, {}

    def _read(self, checkpoint: Checkpoint) -> dict[str, object]:
        states: dict[str, object] = {}
        for name in checkpoint.meta["models"]:
            module = self.job.modules[name]
            if self.hosted(name) and not _per_rank(module):
                states[name] = checkpoint.load(f"model_{name}.pt")
        if IN_FLIGHT in checkpoint.meta["files"] and self.rank in self.gathering:
            try:  # unreadable: those episodes are generated again, the checkpoint still serves
                states["in_flight"] = checkpoint.load(IN_FLIGHT)
            except Exception as err:  # noqa: BLE001
                states["in_flight_problem"] = f"{type(err).__name__}: {err}"
        own = f"rng_rank{self.rank}.pt"
        if own in checkpoint.meta["files"]:
            states["rng"] = checkpoint.load(own)
        return states

    @staticmethod
    def _load(name: str, module: BaseModule, state: object, checkpoint: Checkpoint) -> None:
        try:
            module.load_checkpoint_state(state)
        except (RuntimeError, KeyError, ValueError) as err:
            detail = " ".join(str(err).split())[:400]
            raise CheckpointError(
                f"{checkpoint} holds a model {name} that does not fit this run's "
                f"{name} ({type(err).__name__}: {detail}): "
                f"its shape or parameters changed since. Restore models.{name}'s settings, "
                "or start afresh with runtime.resume=false or another runtime.checkpoint_dir"
            ) from err

    def restore_in_flight(self) -> dict[int, dict]:
        """The generated but untrained episodes of the resumed checkpoint, by episode:
        ``{"outputs": ..., "columns": ...}`` on the ranks that train on them, ``{}`` on the
        others (every rank learns which episodes not to generate again). Nothing, on every
        rank, when the checkpoint was written with another ``runtime.max_staleness`` or a
        rank cannot read them (those episodes are generated afresh, with a warning)."""
        checkpoint = self.resumed
        if checkpoint is None or not checkpoint.meta.get("in_flight"):
            return {}
        mine = self.states.pop("in_flight_problem", None)
        problems = [p for p in self.comm.all_gather_objects(mine) if p]
        saved_k = checkpoint.meta["config"]["runtime"].get("max_staleness", 0)
        if problems or saved_k != self.job.config.runtime.max_staleness:
            if problems and self.rank == 0:
                log.warning("flowgraph: %s of %s cannot be read (%s); the episodes it held are "
                            "generated again", IN_FLIGHT, checkpoint.path, problems[0])  # fmt: skip
            return {}
        episodes = [int(e) for e in checkpoint.meta["in_flight"]]
        saved = self.states.pop("in_flight", {})
        return {e: saved.get(e, {}) for e in episodes}

    def restore(self, trainable: bool) -> tuple[int, list[EpisodeRecord]]:
        """Load the resumed checkpoint's trainable (or inference) models hosted here;
        returns the episode to continue after and the episode records so far."""
        checkpoint = self.resumed
        if checkpoint is None:
            return 0, []
        if trainable and self.rank == 0:
            self.job.log(f"flowgraph: resuming from {checkpoint}")
            now = self.job.config.model_dump(mode="json")
            saved_precisions = checkpoint.meta.get("precision", {})
            changes = config_changes(checkpoint.meta["config"], now) + [
                f"models.{name} computes in {saved_precisions[name]} -> {precision}"
                for name, precision in self.precisions.items()
                if saved_precisions.get(name, precision) != precision
            ]
            changed = ", ".join(changes)
            if changed:
                log.warning(
                    "flowgraph: resuming with settings that differ from the checkpoint's "
                    "(they apply from now on): %s",
                    changed,
                )
        for name in checkpoint.meta["models"]:
            module = self.job.modules[name]
            if module.trainable != trainable or not self.hosted(name):
                continue
            if _per_rank(module):
                directory = str(checkpoint.path / f"deepspeed_{name}")
                module.engine.load_checkpoint(directory, tag="state")
            else:
                self._load(name, module, self.states.pop(name), checkpoint)
        if trainable and "rng" in self.states:
            set_rng_state(self.states.pop("rng"))
        history = [EpisodeRecord.from_json(r, self.job.config.runtime.num_episode)
                   for r in checkpoint.meta["history"]]  # fmt: skip
        return checkpoint.episode, history
