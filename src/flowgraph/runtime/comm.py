"""How ranks talk: the one interface the episode loop and the interpreter use.

- ``LocalComm``: world size 1, no process group. Collectives return this rank's part,
  a plan for one rank has no transfers, and a failure is raised as it is.
- ``DistComm``: a torchrun job. ``gloo`` on CPUs, ``nccl`` on GPUs (one device per rank,
  ``cuda:LOCAL_RANK``); one process group per rank set the plan needs; batches move
  through ``transport``; a failure is reported to every rank and ends the process.

Example::

    comm = DistComm.from_env() or LocalComm()   # DistComm when WORLD_SIZE > 1
    comm.init(timeout_s=60)
    print(comm.cluster())
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import traceback
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.data import Batch
from flowgraph.devices import rank_device
from flowgraph.errors import FlowgraphError, PlanError
from flowgraph.runtime.transport import Outbox, all_gather_batches, all_gather_objects, recv_batch

ERROR_KEY = "flowgraph/failed"


class Communicator:
    """What a rank needs from the others. Subclasses: ``LocalComm``, ``DistComm``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def init(self, timeout_s: float) -> None:
        """Join the job (nothing to do alone)."""

    def cluster(self) -> ClusterSpec:
        """The devices this job runs on, for the compiler."""
        raise NotImplementedError

    def new_groups(self, rank_sets: Iterable[tuple[int, ...]]) -> None:
        """Create a process group for every rank set of two or more ranks."""

    def group(self, ranks: tuple[int, ...]) -> object | None:
        """The process group of ``ranks`` (``None`` for a single rank)."""
        return None

    def barrier(self) -> None:
        """Wait for every rank."""

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (small, picklable values)."""
        return [obj]

    def send(self, batch: Batch, dst: int) -> None:
        """Start sending ``batch`` to rank ``dst`` (completed by ``wait_sends``)."""
        raise PlanError("a plan for one rank has no SEND; its streams were not compiled for 1")

    def recv(self, src: int) -> Batch:
        """The next batch rank ``src`` sent to this rank."""
        raise PlanError("a plan for one rank has no RECV; its streams were not compiled for 1")

    def wait_sends(self) -> None:
        """Complete the sends started so far."""

    def gather(self, mine: Mapping[int, Batch], members: tuple[int, ...]) -> dict[int, Batch]:
        """Every member's batches (keyed by micro-batch index), on every member."""
        return dict(mine)

    def stop(self, where: str, err: Exception, silent: str | None = None) -> NoReturn:
        """This rank cannot go on: ``where`` says what it was doing (a note on ``err``,
        which keeps its type and traceback; flowgraph's own errors already say it)."""
        if not isinstance(err, FlowgraphError):
            err.add_note(f"flowgraph: {where}")
        raise err

    def shutdown(self) -> None:
        """Leave the job."""


class LocalComm(Communicator):
    """World size 1: everything is local, on this process's device (``flowgraph.devices``)."""

    def __init__(self) -> None:
        self.device = rank_device(0)

    def cluster(self) -> ClusterSpec:
        if self.device.type == "cuda":
            return ClusterSpec.from_world_size(1, 1)
        return ClusterSpec.cpu(1)

    def gather(self, mine: Mapping[int, Batch], members: tuple[int, ...]) -> dict[int, Batch]:
        if members != (0,):
            raise PlanError(f"a plan for one rank gathers from ranks {list(members)}")
        return dict(mine)


class DistComm(Communicator):
    """This process's place in a torchrun job, its process groups and transfers."""

    def __init__(
        self, rank: int, world_size: int, local_rank: int, local_world_size: int,
        device: torch.device,
    ) -> None:  # fmt: skip
        self.rank, self.world_size, self.device = rank, world_size, device
        self.local_rank, self.local_world_size = local_rank, local_world_size
        self.groups: dict[tuple[int, ...], object] = {}
        self.timeout = datetime.timedelta(seconds=60)
        self.outbox = Outbox(device)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistComm | None:
        """From torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``;
        ``None`` when ``WORLD_SIZE`` is 1 or unset."""
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        local_rank = int(env.get("LOCAL_RANK", "0"))
        device = rank_device(local_rank)
        return cls(int(env["RANK"]), world, local_rank,
                   int(env.get("LOCAL_WORLD_SIZE", str(world))), device)  # fmt: skip

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)

    def init(self, timeout_s: float) -> None:
        """Join the default process group (the rendezvous torchrun set up); every wait on
        another rank gives up after ``timeout_s``."""
        self.timeout = datetime.timedelta(seconds=timeout_s)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            store = _attempt_store(self.rank, self.world_size, self.timeout)
            if store is None:
                dist.init_process_group(self.backend, timeout=self.timeout)
            else:
                dist.init_process_group(self.backend, timeout=self.timeout, store=store,
                                        rank=self.rank, world_size=self.world_size)  # fmt: skip
        install_clean_exit()

    def cluster(self) -> ClusterSpec:
        if self.device.type == "cpu":
            return ClusterSpec.cpu(self.world_size, nodes=self.nodes)
        return ClusterSpec.from_world_size(self.world_size, self.local_world_size)

    def new_groups(self, rank_sets: Iterable[tuple[int, ...]]) -> None:
        """Every rank calls this with the same sets in the same order (``dist.new_group``
        is collective)."""
        for ranks in sorted(set(rank_sets)):
            if len(ranks) > 1 and ranks not in self.groups:
                self.groups[ranks] = dist.new_group(list(ranks), timeout=self.timeout)

    def group(self, ranks: tuple[int, ...]) -> object | None:
        ranks = tuple(sorted(ranks))
        return self.groups[ranks] if len(ranks) > 1 else None

    def barrier(self) -> None:
        dist.barrier()

    def all_gather_objects(self, obj: Any) -> list[Any]:
        return all_gather_objects(obj, dist.group.WORLD)

    def send(self, batch: Batch, dst: int) -> None:
        self.outbox.send(batch, dst)

    def recv(self, src: int) -> Batch:
        return recv_batch(src, device=self.device)

    def wait_sends(self) -> None:
        self.outbox.wait()

    def gather(self, mine: Mapping[int, Batch], members: tuple[int, ...]) -> dict[int, Batch]:
        group = self.group(members)
        if group is None:
            return dict(mine)
        return all_gather_batches(mine, group, self.device)

    def report_failure(self, message: str) -> None:
        """Tell the other ranks (through the rendezvous store) and stderr why we stop."""
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set(ERROR_KEY, f"{self.rank}\n{message}")
        except Exception:  # the store lives on rank 0, which may be gone already
            pass
        print(message, file=sys.stderr, flush=True)

    def failure_elsewhere(self) -> str | None:
        """The failure another rank reported, if any."""
        try:
            store = dist.distributed_c10d._get_default_store()
            if store.check([ERROR_KEY]):
                return store.get(ERROR_KEY).decode()
        except Exception:
            return None
        return None

    def stop(self, where: str, err: Exception, silent: str | None = None) -> NoReturn:
        """Report why this rank stops (or which other rank's failure stopped it), publish
        it to the other ranks, and end the process; torchrun then stops the others."""
        elsewhere = self.failure_elsewhere()
        if elsewhere is not None and not elsewhere.startswith(f"{self.rank}\n"):
            other, _, text = elsewhere.partition("\n")
            message = f"flowgraph: rank {self.rank} stops because rank {other} failed:\n{text}"
        elif silent is not None:
            message = f"flowgraph: {where}\n  {silent}"
        else:
            message = f"flowgraph: {where}\n{format_exception(err)}"
        self.report_failure(message)
        sys.stdout.flush()
        os._exit(1)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        self.groups.clear()


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta):
    """Under torchrun, the rendezvous store seen through a prefix of this restart attempt.

    After ``torchrun --max-restarts`` restarts the workers, ``init_process_group`` on the
    plain store finds the previous attempt's gloo addresses and times out connecting to
    dead processes (torch 2.13); a prefix per attempt keeps the attempts apart.
    """
    env = os.environ
    if "TORCHELASTIC_RESTART_COUNT" not in env or "MASTER_ADDR" not in env:
        return None
    hosted_by_agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size,
                         is_master=rank == 0 and not hosted_by_agent, timeout=timeout)  # fmt: skip
    return dist.PrefixStore(f"flowgraph/attempt_{env['TORCHELASTIC_RESTART_COUNT']}", base)


_uncaught = False


def install_clean_exit() -> None:
    """End the process with ``os._exit`` after flushing, so gloo's teardown at interpreter
    exit cannot abort a finished run (seen in about 5-10 % of 2-process runs on CPU).

    The exit code is 1 when an exception went uncaught, else 0. Other ``atexit`` handlers
    registered after this one still run (handlers run last-registered first).
    """
    global _uncaught
    if getattr(install_clean_exit, "installed", False):
        return
    install_clean_exit.installed = True  # type: ignore[attr-defined]
    previous = sys.excepthook

    def note_uncaught(kind, value, tb):
        global _uncaught
        _uncaught = True
        previous(kind, value, tb)

    sys.excepthook = note_uncaught

    def finish() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        os._exit(1 if _uncaught else 0)

    atexit.register(finish)


def format_exception(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip()
