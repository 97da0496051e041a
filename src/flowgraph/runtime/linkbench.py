"""Link measurements for ``flowc profile``: what a batch, a gather, a weight bucket and
a gradient all-reduce cost between this job's ranks, through the runtime's own paths.

Run by every rank at the end of a profiled run (``FLOWGRAPH_PROFILE`` names the output
directory), while the process group is still up; rank 0 writes ``links.json`` there:
``{kind: [[bytes, seconds], ...]}`` with the median of a few repetitions per size; the
bytes are what the compiler charges: a broadcast's or a batch's size, all the batches a
gather collects, each rank's ring traffic of an all-reduce (``2 B (n-1) / n``).

Example (under torchrun, every rank)::

    points = measure_links(comm)        # {"p2p": [[16384, 0.0004], ...], ...}
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from flowgraph.runtime.comm import Communicator

SIZES = (16 * 2**10, 2**20, 8 * 2**20)  # bytes
REPEATS = 5


def measure_links(comm: Communicator) -> dict[str, list[list[float]]]:
    """Median seconds per size for each kind of transfer (every rank must call this)."""
    if comm.world_size < 2:
        return {}
    device = getattr(comm, "device", torch.device("cpu"))
    everyone = tuple(range(comm.world_size))
    comm.new_groups([everyone])
    results: dict[str, list[list[float]]] = {}
    for nbytes in SIZES:
        payload = torch.ones(nbytes, dtype=torch.uint8, device=device)
        floats = torch.ones(nbytes // 4, dtype=torch.float32, device=device)

        def p2p(payload=payload) -> None:
            if comm.rank == 0:
                comm.send({"x": payload}, 1)
                comm.wait_sends()
            elif comm.rank == 1:
                comm.recv(0)

        def gather(payload=payload) -> None:
            comm.gather({comm.rank: {"x": payload}}, everyone)

        def broadcast(floats=floats) -> None:
            dist.broadcast(floats, src=0)

        def allreduce(floats=floats) -> None:
            dist.all_reduce(floats)

        for kind, op in (("p2p", p2p), ("gather", gather), ("broadcast", broadcast),
                         ("allreduce", allreduce)):  # fmt: skip
            moved = {
                "gather": nbytes * comm.world_size,  # what the gathered batches hold
                "allreduce": 2 * nbytes * (comm.world_size - 1) / comm.world_size,
            }  # ring
            results.setdefault(kind, []).append([float(moved.get(kind, nbytes)),
                                                 _median_seconds(comm, op)])  # fmt: skip
    return results


def _median_seconds(comm: Communicator, op: Callable[[], None]) -> float:
    """The median over repetitions of the slowest rank's time (each starts together)."""
    times = []
    for _ in range(REPEATS + 1):
        comm.barrier()
        start = time.perf_counter()
        op()
        _synchronize()
        elapsed = time.perf_counter() - start
        times.append(max(comm.all_gather_objects(elapsed)))
    return statistics.median(times[1:])  # the first repetition warms the path up


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


PROFILE_ENV = "FLOWGRAPH_PROFILE"  # set by flowc profile for the runs it launches


def record_for_profile(plan, comm: Communicator) -> None:
    """When ``flowc profile`` launched this run: measure the links and write them and the
    plan that ran to ``$FLOWGRAPH_PROFILE`` (rank 0)."""
    directory = os.environ.get(PROFILE_ENV)
    if not directory:
        return
    links = measure_links(comm)
    if comm.rank == 0:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "links.json").write_text(json.dumps(links))
        (out / "plan.json").write_text(plan.to_json())
        (out / "threads.json").write_text(json.dumps(torch.get_num_threads()))
