"""Helpers to launch multi-process jobs from tests (gloo on loopback, bounded in time)."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


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
        command = [
            *TORCHRUN,
            *torchrun_args,
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(nproc),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}",
            *args,
        ]
    # A session of its own, so that a hung job is killed with all its workers.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**job_env(), **(env or {})},
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"job did not end within {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def run_two_nodes(
    out_dir: Path, config: dict, timeout: float = 180
) -> list[subprocess.CompletedProcess]:
    """Two torchrun invocations (``--nnodes 2``, one process each) on loopback, as two nodes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.json"
    config_path.write_text(json.dumps(config))
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                str(TESTS / "spmd_job.py"),
                str(out_dir),
                str(config_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=job_env(),
            start_new_session=True,
        )
        for rank in (0, 1)
    ]
    results = []
    for process in nodes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in nodes:
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError("the two-node job did not end in time") from None
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


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
