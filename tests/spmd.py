"""Helpers to launch multi-process jobs from tests (gloo on loopback, bounded in time).

Every launch has a deadline and kills all it started when the deadline passes or the
test is interrupted (pytest-timeout raises in the test, see pyproject.toml):

* subprocesses (``run_command``, ``run_job``, ``run_two_nodes``) start in a session of
  their own and are killed as a process group, workers included;
* ``spawn`` starts ``mp.start_processes`` workers and kills them on expiry.

Ports cannot race, because no port is picked and released before it is bound:

* single-node torchrun jobs use ``--standalone``: torchrun's ``run()`` sets the rendezvous
  endpoint to ``localhost:0``, so its C10d TCPStore binds a free port itself, and the
  workers' ``MASTER_PORT`` is the port of the store server the rendezvous created, also
  bound on port 0 (torch/distributed/run.py, elastic/rendezvous/dynamic_rendezvous.py);
* the two-node job and ``spawn`` bind a ``TCPStore`` on port 0 in the test process and
  hand its (bound, listening) port to the processes, which join it as clients: the nodes
  rendezvous through it (``--rdzv-backend c10d --rdzv-conf is_host=false``, the README's
  multi-node command), the spawned workers build their process group on it
  (``init_gloo``).
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TESTS = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def job_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def host_store() -> dist.TCPStore:
    """A TCPStore served from this process on a port the OS picked (``.port``); keep a
    reference for as long as the processes that use it run."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start(command: Sequence[str], env: dict | None = None) -> subprocess.Popen:
    """``command`` in a session of its own (its process group is killed with it)."""
    return subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**job_env(), **(env or {})},
        start_new_session=True,
    )


def run_command(
    command: Sequence[str], timeout: float = 180, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``command`` (a script, torchrun, ...) to its end, at most ``timeout`` seconds;
    on expiry, or when the test is interrupted, its whole process group is killed."""
    process = start(command, env)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        out, err = process.communicate()
        raise AssertionError(
            f"{' '.join(map(str, command))[:300]}\ndid not end within {timeout} s:\n{err[-3000:]}"
        ) from None
    finally:
        if process.returncode is None:  # interrupted (pytest-timeout, Ctrl-C): no orphans
            _kill_group(process)
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def torchrun(nproc: int, *args: str, torchrun_args: Sequence[str] = ()) -> list[str]:
    """A single-node torchrun command line; ``--standalone`` binds its own free port."""
    return [*TORCHRUN, *torchrun_args, "--standalone", "--nproc-per-node", str(nproc), *args]


def run_job(
    out_dir: Path,
    config: dict,
    nproc: int,
    script: Path = TESTS / "spmd_job.py",
    timeout: float = 180,
    env: dict | None = None,
    torchrun_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run ``script OUT_DIR CONFIG`` in one process (nproc=1) or under torchrun (with
    ``torchrun_args`` such as ``("--max-restarts", "1")``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.json"
    config_path.write_text(json.dumps(config))
    args = [str(script), str(out_dir), str(config_path)]
    if nproc == 1:
        command = [sys.executable, *args]
    else:
        command = torchrun(nproc, *args, torchrun_args=torchrun_args)
    return run_command(command, timeout=timeout, env=env)


def run_two_nodes(
    out_dir: Path, config: dict, timeout: float = 180
) -> list[subprocess.CompletedProcess]:
    """Two torchrun invocations (``--nnodes 2``, one process each) on loopback, as two
    nodes, rendezvousing through a store this process hosts (so no port can race). The
    rendezvous assigns the node ranks; each worker writes files named by its own RANK."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.json"
    config_path.write_text(json.dumps(config))
    store = host_store()
    run_id = uuid.uuid4().hex
    command = [
        *TORCHRUN,
        "--nnodes", "2",
        "--nproc-per-node", "1",
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{store.port}",
        "--rdzv-id", run_id,
        "--rdzv-conf", "is_host=false",
        str(TESTS / "spmd_job.py"), str(out_dir), str(config_path),
    ]  # fmt: skip
    nodes = [start(command) for _ in range(2)]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for process in nodes:
            try:
                remaining = max(0.1, deadline - time.monotonic())
                out, err = process.communicate(timeout=remaining)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the two-node job did not end within {timeout} s") from None
            results.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    finally:
        for process in nodes:
            if process.returncode is None:
                _kill_group(process)
                process.wait()
        del store
    return results


def init_gloo(rank: int, world_size: int, port: int, timeout_s: float = 60) -> None:
    """In a ``spawn`` worker: the gloo process group, over the store at ``port``."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=timeout_s))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )  # fmt: skip


def spawn(fn: Callable, args: tuple, nprocs: int, timeout: float = 120) -> None:
    """``fn(rank, port, *args)`` in ``nprocs`` spawned processes, like ``mp.spawn`` but
    bounded: the workers are killed and the test fails when they have not all ended within
    ``timeout`` seconds. ``port`` is a store's, for ``init_gloo(rank, nprocs, port)``."""
    store = host_store()
    context = mp.start_processes(
        fn, args=(store.port, *args), nprocs=nprocs, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        # join() returns when one more process ended (False while some still run) and
        # raises, naming the rank, when one failed.
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                running = [r for r, p in enumerate(context.processes) if p.is_alive()]
                raise AssertionError(
                    f"spawned processes {running} of {nprocs} did not end within {timeout} s"
                )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
        del store


def hosted_parameters(out_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every model's parameters, from whichever rank hosted it (all copies must agree)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for path in sorted(out_dir.glob("rank*.pt")):
        for model, params in torch.load(path, weights_only=True).items():
            if model in found:
                for name, tensor in params.items():
                    assert torch.equal(found[model][name], tensor), f"{model}.{name} differs"
            else:
                found[model] = params
    return found


def records(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "records.json").read_text())
