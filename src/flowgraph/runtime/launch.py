"""The torchrun environment: process groups per rank set, failure reports, clean exit.

``torchrun --nproc-per-node N train.py`` starts N copies of the script; each reads
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` and joins one process group:
``gloo`` on CPUs, ``nccl`` on GPUs (one device per rank, ``cuda:LOCAL_RANK``). World size 1
needs neither torchrun nor a process group.

Example::

    ctx = DistContext.from_env()            # None when WORLD_SIZE is 1 or unset
    ctx.init(timeout_s=60)
    groups = ctx.new_groups([(0, 1), (2, 3)])
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

ERROR_KEY = "flowgraph/failed"


def world_size_from_env(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    return int(env.get("WORLD_SIZE", "1"))


@dataclass
class DistContext:
    """This process's place in the job, and the process groups it created."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    groups: dict[tuple[int, ...], object] = field(default_factory=dict)
    timeout: datetime.timedelta = datetime.timedelta(seconds=60)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistContext | None:
        env = os.environ if environ is None else environ
        world = world_size_from_env(env)
        if world <= 1:
            return None
        local_rank = int(env.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and env.get("FLOWGRAPH_DEVICE", "") != "cpu"
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return cls(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=local_rank,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
            device=device,
        )

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

    def new_groups(self, rank_sets: Iterable[tuple[int, ...]]) -> None:
        """One process group per distinct rank set of two or more ranks. Every rank calls
        this with the same sets in the same order (``dist.new_group`` is collective)."""
        for ranks in sorted(set(rank_sets)):
            if len(ranks) > 1 and ranks not in self.groups:
                self.groups[ranks] = dist.new_group(list(ranks), timeout=self.timeout)

    def group(self, ranks: tuple[int, ...]):
        return self.groups[tuple(sorted(ranks))]

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
