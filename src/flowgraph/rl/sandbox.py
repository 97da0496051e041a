"""Runs a model's Python answer against tests in a separate, limited process.

``run_python(code, tests)`` starts ``sys.executable -I`` on this very file in a fresh
temporary directory; the child limits itself, runs ``code``, then each test, and reports
which tests passed. Whatever the code does (loops, floods its output, exhausts memory,
exits, crashes, forks), the caller gets a ``SandboxResult`` within about ``timeout``
seconds and never an exception.

    >>> run_python("def add(a, b):\\n    return a + b", ["assert add(1, 2) == 3"]).score
    1.0
    >>> run_python("while True: pass", ["assert True"], timeout=0.5).status
    'timeout'

What the child gets:

- A fresh interpreter (``-I``: no ``PYTHON*`` variables, no user site, the current
  directory not on ``sys.path``), so no torch, thread or process-group state of the
  caller; stdin is empty, the environment minimal (``CUDA_VISIBLE_DEVICES`` empty, one
  thread for OpenMP/MKL), the working directory a new temporary one, removed afterwards.
- Limits: ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_CPU`` (about ``timeout``),
  ``RLIMIT_FSIZE`` (16 MiB per file), ``RLIMIT_NOFILE``, no core dumps; a wall-clock
  ``timeout`` after which its whole process group is killed; stdout and stderr read up to
  ``output_limit`` bytes, the group killed as soon as it writes more.
- No network: ``socket.socket`` and its relatives raise ``PermissionError``; where the OS
  allows it (root or ``CAP_SYS_ADMIN``) the child also moves into a new, empty network
  namespace, which blocks connections made below Python (``ctypes``) too
  (``SandboxResult.network_namespace`` says whether it did; False too when the child left
  no report).
- No new processes: ``os.fork``, ``os.system``, ``subprocess``, ``os.exec*``,
  ``os.posix_spawn`` raise ``PermissionError``, and ``os.kill`` may only signal the child
  itself. This is what bounds a fork bomb: ``RLIMIT_NPROC`` counts every process of the
  user on the machine (and root ignores it), so it cannot bound one child.
- Success needs proof: the child writes a random token, known only to it and the caller,
  after the tests ran. An exit code of 0 alone (``os._exit(0)``, ``sys.exit()`` before the
  tests) is a ``crashed`` or ``error`` result, never a pass.

This guards a training run against accidents of generated code; it is not a security
boundary. Code that means harm can undo the Python-level blocks (``ctypes`` system
calls), read the token from the harness's frames, return objects whose ``__eq__`` is
always true, write outside its directory, or, run as root, raise its own limits; a
process that calls ``setsid`` escapes the group kill (it still dies at its CPU limit if
it computes). Run untrusted code as an unprivileged user in a container (gVisor, nsjail,
Firecracker) for that. POSIX only (``resource``, process groups).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

OUTPUT_LIMIT = 1 << 20  # bytes of stdout+stderr kept; more kills the child
FILE_LIMIT = 16 << 20  # bytes per file the child writes
_POLL = 0.02  # seconds between checks for the child's exit
STATUSES = ("ok", "error", "timeout", "output_limit", "crashed")


@dataclass(frozen=True)
class SandboxResult:
    """How one run went.

    ``status`` is one of:

    - ``ok``: the code ran and every test was tried; ``passed`` says which passed.
    - ``error``: the code itself raised (``SyntaxError``, ``MemoryError``, ``SystemExit``,
      ...) before the tests; ``error`` names it.
    - ``timeout``: still running after ``timeout`` seconds.
    - ``output_limit``: wrote more than ``output_limit`` bytes.
    - ``crashed``: ended without the token-signed report (``os._exit``, a signal such as
      ``SIGSEGV`` or the CPU limit, a non-zero exit); ``returncode`` says how.

    ``score`` is the fraction of tests passed for ``ok``, else 0.0.

    >>> SandboxResult("ok", (True, False), None, 0, "", 0.1, False).score
    0.5
    """

    status: str
    passed: tuple[bool, ...]
    error: str | None
    returncode: int | None
    output: str  # the first output_limit bytes of stdout and stderr, interleaved
    seconds: float
    network_namespace: bool

    @property
    def score(self) -> float:
        if self.status != "ok" or not self.passed:
            return 0.0
        return sum(self.passed) / len(self.passed)


def run_python(
    code: str,
    tests: list[str],
    timeout: float = 5.0,
    memory_mb: int = 512,
    output_limit: int = OUTPUT_LIMIT,
) -> SandboxResult:
    """Runs ``code``, then each of ``tests`` (Python source, e.g. ``"assert f(1) == 2"``)
    in the namespace the code left, in a limited child process (see the module docstring).

    A test passes when it runs without raising. Bad limits are a ``ConfigError``; nothing
    the code does raises here.

    >>> r = run_python("import os\\nos._exit(0)", ["assert True"])
    >>> r.status, r.score
    ('crashed', 0.0)
    """
    from flowgraph.errors import ConfigError  # here: the child must not import flowgraph

    if not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
        raise ConfigError(f"sandbox timeout: a positive number of seconds, got {timeout!r}")
    if not isinstance(memory_mb, int) or memory_mb < 64:
        raise ConfigError(
            f"sandbox memory_mb: a whole number of MiB, at least 64 (the interpreter's own "
            f"needs), got {memory_mb!r}"
        )
    if not isinstance(output_limit, int) or output_limit < 1:
        raise ConfigError(f"sandbox output_limit: at least 1 byte, got {output_limit!r}")
    token = secrets.token_hex(16)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flowgraph-sandbox-", ignore_cleanup_errors=True) as wd:
        with open(os.path.join(wd, "payload.json"), "w") as f:
            json.dump({"code": code, "tests": list(tests), "token": token}, f)
        proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), wd, repr(timeout), str(memory_mb)],
            cwd=wd,
            env=_child_env(wd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed as a whole
        )
        try:
            status, output = _collect(proc, start + timeout, output_limit)
        finally:
            _kill_group(proc)
        report = _read_report(os.path.join(wd, "result.json"), token)
    seconds = time.monotonic() - start
    text = output[:output_limit].decode("utf-8", "replace")
    if status is None:
        if report is None or proc.returncode != 0:
            status = "crashed"
        else:
            status = "error" if report["error"] else "ok"
    ok = status == "ok"
    return SandboxResult(
        status=status,
        passed=tuple(bool(p) for p in report["passed"]) if ok else (),
        error=report["error"] if status == "error" else None,
        returncode=proc.returncode,
        output=text,
        seconds=seconds,
        network_namespace=bool(report and report.get("netns")),
    )


def _child_env(workdir: str) -> dict[str, str]:
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "CUDA_VISIBLE_DEVICES": "", **threads}  # fmt: skip


def _exited(pid: int) -> bool:
    """Whether the child has ended, without reaping it: until it is reaped its pid (the
    process group's id) cannot be reused, so killing the group cannot hit a stranger."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _collect(proc: subprocess.Popen, deadline: float, limit: int) -> tuple[str | None, bytes]:
    """Reads the child's output until it exits (status None), the deadline passes
    (``timeout``) or the output exceeds ``limit`` (``output_limit``)."""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    chunks, size, open_ = [], 0, True
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", b"".join(chunks)
            ready = open_ and selector.select(min(remaining, _POLL))
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:  # EOF: the child (or whoever held the pipe) closed it
                    selector.unregister(fd)
                    open_ = False
                    continue
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    return "output_limit", b"".join(chunks)
            elif _exited(proc.pid):
                return None, b"".join(chunks)
            elif not open_:
                time.sleep(min(remaining, _POLL))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    proc.stdout.close()


def _read_report(path: str, token: str) -> dict | None:
    """The child's report, if it carries the token (else the tests did not run)."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("token") != token:
        return None
    return report


# -- the child: everything below runs in the sandboxed process ----------------------------
def _limit_self(timeout: float, memory_mb: int) -> None:
    import resource

    cpu = math.ceil(timeout) + 1  # the wall-clock timeout normally comes first
    limits = {
        resource.RLIMIT_AS: memory_mb << 20,
        resource.RLIMIT_CPU: cpu,
        resource.RLIMIT_FSIZE: FILE_LIMIT,
        resource.RLIMIT_NOFILE: 256,
        resource.RLIMIT_CORE: 0,
    }
    for kind, value in limits.items():
        soft, hard = resource.getrlimit(kind)
        hard_value = value + 1 if kind == resource.RLIMIT_CPU else value
        if hard != resource.RLIM_INFINITY:
            value, hard_value = min(value, hard), min(hard_value, hard)
        resource.setrlimit(kind, (value, hard_value))


def _leave_network() -> bool:
    """Moves into a new network namespace (only a loopback that is down) if allowed."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(0x40000000) == 0  # CLONE_NEWNET
    except (OSError, AttributeError):
        return False


def _blocked(what: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"flowgraph sandbox: {what} is not allowed in a code answer")

    return refuse


def _guard() -> None:
    """The Python-level blocks of network access and process creation."""
    import _posixsubprocess
    import _socket
    import socket

    network = _blocked("network access")
    for module, names in (
        (socket, ("socket", "create_connection", "create_server", "socketpair", "fromfd")),
        (_socket, ("socket", "socketpair")),
    ):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, network)
    processes = _blocked("starting processes")
    for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp", "execv", "execve"):
        if hasattr(os, name):
            setattr(os, name, processes)
    _posixsubprocess.fork_exec = processes  # multiprocessing
    subprocess._fork_exec = processes  # subprocess, os.popen (bound at its import)
    kill, me = os.kill, os.getpid()

    def own_kill(pid, sig):
        if pid != me:  # as root, os.kill(-1, ...) would signal every process of the machine
            raise PermissionError("flowgraph sandbox: a code answer may signal only itself")
        kill(pid, sig)

    os.kill, os.killpg = own_kill, _blocked("signalling a process group")


def _child_main(workdir: str, timeout: str, memory_mb: str) -> None:
    import builtins

    _limit_self(float(timeout), int(memory_mb))
    netns = _leave_network()
    payload_path = os.path.join(workdir, "payload.json")
    with open(payload_path) as f:
        payload = json.load(f)
    os.unlink(payload_path)
    # Opened and bound before the code runs: it may close streams or replace functions.
    result_fd = os.open(os.path.join(workdir, "result.json"), os.O_WRONLY | os.O_CREAT, 0o600)
    write, exit_, dumps, run, compile_ = os.write, os._exit, json.dumps, exec, compile
    stdout, stderr = sys.stdout, sys.stderr
    _guard()
    report = {"token": payload.pop("token"), "netns": netns, "passed": [], "error": None}
    namespace = {"__name__": "solution", "__builtins__": builtins}  # not __main__: no demo
    try:
        run(compile_(payload["code"], "<answer>", "exec"), namespace)
    except BaseException as err:  # SystemExit and MemoryError are failures too
        report["error"] = f"{type(err).__name__}: {err}"[:1000]
    else:
        for i, test in enumerate(payload["tests"]):
            try:
                run(compile_(test, f"<test {i}>", "exec"), namespace)
            except BaseException:
                report["passed"].append(False)
            else:
                report["passed"].append(True)
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except BaseException:  # a stream the code closed or replaced
            pass
    write(result_fd, dumps(report).encode())
    exit_(0)  # no atexit handlers or lingering threads of the code


if __name__ == "__main__":
    _child_main(*sys.argv[1:4])
