"""Checkpoints: atomic save every ``save_episode_interval`` episodes, automatic resume.

Layout of ``runtime.checkpoint_dir``::

    episode_000004/            one finished checkpoint
      meta.json                episode, world size, flow fingerprint, config, file sizes,
                               the episode records so far (metrics.jsonl is rebuilt from them)
      model_<name>.pt          weights and optimizer state of a model (written by the first
                               rank of its mesh), or deepspeed_<name>/ (DeepSpeed's own
                               per-rank format)
      rng_rank<r>.pt           Python, NumPy, torch and CUDA RNG states of rank r
      in_flight.pt             with runtime.max_staleness >= 1: the env outputs of the
                               episodes generated but not yet trained (by the first
                               trainer rank; every trainer rank holds all of them)
    latest                     the name of the newest finished checkpoint

A checkpoint is written into ``episode_000004.tmp/``: every file fsynced, then
``meta.json`` (listing every file and its size), then the directory renamed, then
``latest`` replaced. A process killed at any moment leaves either the previous checkpoint
or the new one, never half of one. On resume the newest checkpoint whose files are all
present with their recorded sizes, and that every rank can read, is loaded; a truncated,
missing or unreadable file makes it skipped with a warning in favour of the one before.
With ``runtime.checkpoint_checksums`` every file's CRC32 is recorded and checked too
(bit flips inside tensor data otherwise load silently). Files load with
``torch.load(weights_only=True)``.

What is kept: every trainable model, and every inference model that the parameter sync
at that episode does not recompute (a reference, a reward model, a copy whose
``sync_frequency`` was not due). Data order and sampling are functions of (seed, episode)
(``flowgraph.runtime.rng``), so the episode counter is the data position, and a resumed
run repeats exactly what the uninterrupted run would have done.

Example::

    >>> store = CheckpointStore("/tmp/ckpt-doctest", keep=2)
    >>> store.directory.name
    'ckpt-doctest'
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowgraph.data import schema_problem
from flowgraph.errors import CheckpointError

log = logging.getLogger("flowgraph")
FORMAT = 1
PREFIX = "episode_"
STORE_META = {"episode": int, "world_size": int, "files": dict}  # what the store writes


@dataclass
class Checkpoint:
    """A finished checkpoint on disk and what its ``meta.json`` says."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def episode(self) -> int:
        return int(self.meta["episode"])

    def __str__(self) -> str:
        return (
            f"checkpoint {self.path} (episode {self.episode}, "
            f"{self.meta['world_size']} rank(s), {len(self.meta['files'])} files)"
        )

    def load(self, name: str) -> Any:
        """The object saved as ``name`` (e.g. ``model_policy.pt``), tensors on the CPU;
        checked against its CRC32 first when the checkpoint recorded one."""
        expected = self.meta.get("crc32", {}).get(name)
        if expected is not None and crc32(self.path / name) != expected:
            raise CheckpointError(f"{self.path / name} fails its CRC32 check (corrupted)")
        return torch.load(self.path / name, map_location="cpu", weights_only=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative name -> size in bytes)."""
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "meta.json"
    }


def crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            value = zlib.crc32(chunk, value)
    return value


def save_object(obj: Any, path: Path) -> None:
    """``torch.save`` then fsync: the bytes are on disk when this returns."""
    torch.save(obj, path)
    _fsync_file(path)


class CheckpointStore:
    """Writes and finds checkpoints in ``directory``; one per rank of a run.

    ``barrier`` synchronises the ranks (a no-op in one process); rank 0 creates the
    temporary directory, publishes it and prunes old checkpoints beyond ``keep``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = lambda: None,
        checksums: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.keep, self.rank, self.world_size, self.barrier = keep, rank, world_size, barrier
        self.checksums = checksums

    # -- saving ------------------------------------------------------------------------
    def save(
        self,
        episode: int,
        write_files: Callable[[Path], None],
        meta: dict[str, Any],
    ) -> Path:
        """Checkpoint ``episode``: every rank's ``write_files(tmp_dir)`` writes its files,
        then rank 0 publishes them with ``meta`` (plus episode, world size and file sizes)."""
        final = self.directory / f"{PREFIX}{episode:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
            tmp.mkdir()
        self.barrier()
        if not tmp.is_dir():
            raise CheckpointError(
                f"rank {self.rank} cannot see {tmp}, which rank 0 created: "
                f"runtime.checkpoint_dir={str(self.directory)!r} is not on storage shared "
                "by all ranks; put it on a file system every node mounts (NFS, Lustre, ...)"
            )
        write_files(tmp)
        self.barrier()
        if self.rank == 0:
            files = _files(tmp)
            meta = {**meta, "format": FORMAT, "episode": episode,
                    "world_size": self.world_size, "files": files}  # fmt: skip
            if self.checksums:
                meta["crc32"] = {name: crc32(tmp / name) for name in files}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            _fsync_file(tmp / "meta.json")
            _fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._point_latest(final.name)
            self._prune()
        self.barrier()
        return final

    def _point_latest(self, name: str) -> None:
        pointer = self.directory / "latest.tmp"
        pointer.write_text(name + "\n")
        _fsync_file(pointer)
        os.replace(pointer, self.directory / "latest")
        _fsync_dir(self.directory)

    def _prune(self) -> None:
        for old in self._finished()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)

    # -- finding -----------------------------------------------------------------------
    def _finished(self) -> list[Path]:
        """Checkpoint directories, newest episode first (unfinished ``.tmp`` ones left out)."""
        if not self.directory.is_dir():
            return []
        found = [
            p
            for p in self.directory.iterdir()
            if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
        ]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)

    def candidates(self) -> Iterator[Checkpoint]:
        """Complete checkpoints, newest first; damaged ones are skipped with a warning."""
        for path in self._finished():
            problem = _damage(path)
            if problem is None:
                yield Checkpoint(path, json.loads((path / "meta.json").read_text()))
            else:
                self.warn_skipped(path, problem)

    def newest_valid(self) -> Checkpoint | None:
        return next(self.candidates(), None)

    def warn_skipped(self, path: Path, problem: str) -> None:
        if self.rank == 0:
            log.warning("flowgraph: skipping damaged checkpoint %s: %s", path, problem)


def _damage(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be used, or ``None``."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        return f"meta.json unreadable ({type(err).__name__}: {err})"
    if not isinstance(meta, dict):
        return f"{path / 'meta.json'} holds a JSON {type(meta).__name__}, not flowgraph's metadata"
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')!r}, this flowgraph reads {FORMAT}"
    foreign = foreign_meta(path, meta, STORE_META)
    if foreign:
        return foreign
    for name, size in meta["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written (truncated)"
    return None


def foreign_meta(path: Path, meta: dict[str, Any], schema: dict[str, type]) -> str | None:
    """Why ``meta`` (``path``'s meta.json) is not the metadata ``schema`` describes (keys
    and the types of their values), or ``None``."""
    problem = schema_problem(meta, schema)
    return f"{path / 'meta.json'}: {problem}, not flowgraph's metadata" if problem else None


def check_compatible(
    checkpoint: Checkpoint,
    fingerprint: str,
    world_size: int,
    per_rank_models: Iterable[str],
    plan_hash: str | None = None,
) -> None:
    """Refuse a checkpoint of another flow, or of another world size or placement when
    some of its state is split per rank (DeepSpeed); replicated state resumes anywhere."""
    if checkpoint.meta["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{checkpoint} was written by different flows or models than this run "
            f"(fingerprint {checkpoint.meta['fingerprint']}, now {fingerprint}): resuming "
            "would load weights into the wrong models. Restore the flows, or start afresh "
            "with runtime.resume=false or another runtime.checkpoint_dir"
        )
    written = checkpoint.meta["world_size"]
    split = sorted(per_rank_models)
    if written != world_size and split:
        raise CheckpointError(
            f"{checkpoint} was written by {written} rank(s) and this run has {world_size}; "
            f"the DeepSpeed state of {', '.join(split)} is split per rank and cannot be "
            f"re-sharded. Relaunch with {written} rank(s) (torchrun --nproc-per-node "
            f"{written}), or start afresh with runtime.resume=false or another "
            "runtime.checkpoint_dir"
        )
    written_plan = checkpoint.meta.get("plan_hash")
    if split and plan_hash and written_plan and written_plan != plan_hash:
        raise CheckpointError(
            f"{checkpoint} was written under another placement (plan {written_plan}, now "
            f"{plan_hash}); the DeepSpeed state of {', '.join(split)} is split per rank and "
            "needs the same meshes. Restore the placement settings (models.<name>.num_gpu, "
            "runtime.colocation), or start afresh with runtime.resume=false"
        )
    if written != world_size:
        log.warning(
            "flowgraph: resuming %s on %d rank(s): every model's state is replicated, so it "
            "is re-sharded as it loads",
            checkpoint,
            world_size,
        )
