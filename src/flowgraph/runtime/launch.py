"""Launching a run: one process, or this rank of a torchrun job, then the episode loop.

``python train.py`` runs a 1-rank plan in this process (``LocalComm``: no process group).
``torchrun --nproc-per-node N train.py`` starts N copies of the script; each joins the
job (``DistComm``: gloo on CPUs, NCCL on GPUs), compiles the plan for the cluster it
finds, checks that every rank compiled the same plan with the same config, and runs its
own stream. Both go through the same ``EpisodeLoop``.

Example::

    records = run(job, lambda cluster: compile_plan(program, config, cluster))
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.compiler.plan import Plan
from flowgraph.config import Config
from flowgraph.errors import PlanError
from flowgraph.runtime.comm import Communicator, DistComm, LocalComm
from flowgraph.runtime.job import Job
from flowgraph.runtime.loop import EpisodeLoop
from flowgraph.runtime.resume import config_changes
from flowgraph.runtime.telemetry import EpisodeRecord


def run(job: Job, compile_for: Callable[[ClusterSpec], Plan]) -> list[EpisodeRecord]:
    """Run ``job`` with the plan ``compile_for`` makes for this job's cluster; returns
    the episode records (on rank 0; other ranks get an empty list)."""
    comm = DistComm.from_env() or LocalComm()
    comm.init(job.config.runtime.timeout_s)
    plan = compile_for(comm.cluster())
    check_same_plan(comm, plan, job.config)
    check_same_data(comm, job)
    return EpisodeLoop(plan, job, comm).run()


def check_same_data(comm: Communicator, job: Job) -> None:
    """Every rank must hold the same training and evaluation data (a path that names
    another file on another node, a script that builds its list differently per rank)."""
    if comm.world_size == 1:
        return
    datasets = [d for d in (job.dataset, job.eval_dataset) if d is not None]
    mine = [(str(d), d.fingerprint()) for d in datasets]
    parts = comm.all_gather_objects(mine)
    for rank, theirs in enumerate(parts):
        for (name, digest), (other, other_digest) in zip(parts[0], theirs, strict=True):
            if digest != other_digest:
                raise PlanError(
                    f"rank {rank} holds other data than rank 0 ({other} against {name}): "
                    "every rank must read the same dataset; use an absolute path to a file "
                    "that is the same on every node"
                )


def check_same_plan(comm: Communicator, plan: Plan, config: Config) -> None:
    """Every rank must have compiled the same plan from the same config (the same script
    with the same overrides); otherwise stop before anything runs."""
    if comm.world_size == 1:
        return
    settings = config.model_dump(mode="json")
    fingerprint = hashlib.sha256(f"{plan.hash()}{config}".encode()).hexdigest()[:16]
    parts = comm.all_gather_objects((fingerprint, settings))
    fingerprints = [f for f, _ in parts]
    if len(set(fingerprints)) > 1:
        differing = [r for r, f in enumerate(fingerprints) if f != fingerprints[0]]
        details = []
        for rank in differing:
            changes = config_changes(parts[0][1], parts[rank][1], ignore=())
            what = ", ".join(changes) if changes else "the same config, another plan (flows)"
            details.append(f"rank {rank} against rank 0: {what}")
        raise PlanError(
            f"rank(s) {differing} compiled a different plan or config than rank 0: every "
            "rank must run the same script with the same config and overrides; "
            + "; ".join(details)
            + f" (fingerprints: {', '.join(f'rank {r} {f}' for r, f in enumerate(fingerprints))})"
        )
