"""Checkpoint save and load: flowgraph's atomic checkpoint against raw ``torch.save`` /
``torch.load`` of the same state dicts.

python benchmarks/bench_checkpoint.py [--skip-large]

- demo: the PPO example's models after setup (trainers with AdamW state after one step).
- 500M: one trainer of 500M fp32 parameters (a stack of 4096x4096 linear layers) with its
  AdamW state (weights + two moments: 6 GB on disk).
flowgraph writes each model's state to a temporary directory, fsyncs every file, writes
meta.json, renames the directory and replaces ``latest``; it loads by checking every
file's size and ``torch.load(weights_only=True)``. The raw side is ``torch.save`` of the
same dicts into a new directory (then the previous one deleted, so that both sides keep
two checkpoints on disk for a moment) and ``torch.load(weights_only=True)``; it is timed
with fsync (the same durability) and without (the usual script). Each load follows its
own save; medians of 15 rounds (3 for 500M), the side that goes first alternating. The
disk of these machines writes at 0.4-1.2 GB/s, varying from minute to minute.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import load_example, report

from flowgraph.runtime.checkpoint import CheckpointStore, save_object


def demo_states() -> dict[str, dict]:
    ppo = load_example("ppo")
    from flowgraph.config import init_from_argv

    init_from_argv(["runtime.log_dir="], str(Path(ppo.__file__).with_suffix(".yaml")))
    states = {}
    for module in ppo.engine.modules.values():
        module.trainable = module.name.startswith("ppo_")
        module.setup()
        if module.optimizer is not None:  # one step, so that Adam's moments exist
            sum(p.sum() for p in module.model.parameters()).backward()
            module.optimizer.step()
        states[module.name] = module.checkpoint_state()
    return states


def large_state(parameters: int = 500_000_000) -> dict[str, dict]:
    width = 4096
    layers = round(parameters / (width * width))
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    return {"trainer": {"model": model.state_dict(), "optimizer": optimizer.state_dict()}}


def flowgraph_save(states: dict, root: Path, episode: int) -> None:
    store = CheckpointStore(root, keep=1)

    def write_files(directory: Path) -> None:
        for name, state in states.items():
            save_object(state, directory / f"model_{name}.pt")

    store.save(episode, write_files, {"fingerprint": "bench"})


def flowgraph_load(root: Path) -> dict:
    checkpoint = CheckpointStore(root, keep=1).newest_valid()
    return {file: checkpoint.load(file) for file in checkpoint.meta["files"]}


def raw_save(states: dict, root: Path, episode: int, fsync: bool) -> Path:
    """``torch.save`` of every state into a new directory, then the previous one deleted:
    the disk holds two checkpoints for a while, as it does for flowgraph."""
    directory = root / f"{episode:06d}-{int(fsync)}"
    directory.mkdir(parents=True)
    for name, state in states.items():
        path = directory / f"{name}.pt"
        torch.save(state, path)
        if fsync:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for old in root.iterdir():
        if old != directory:
            shutil.rmtree(old)
    return directory


def raw_load(root: Path) -> dict:
    return {p.stem: torch.load(p, weights_only=True) for p in sorted(root.glob("*.pt"))}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(label: str, states: dict, repeats: int) -> list[dict]:
    size = sum(t.numel() * t.element_size() for s in states.values() for t in _tensors(s))
    times: dict[str, list[float]] = {k: [] for k in ("ours", "raw", "raw_fsync", "ours_load",
                                                     "raw_load")}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, raw_dir = Path(tmp) / "flowgraph", Path(tmp) / "raw"

        def ours() -> None:
            times["ours"].append(timed(lambda: flowgraph_save(states, ours_dir, episode)))
            times["ours_load"].append(timed(lambda: flowgraph_load(ours_dir)))

        def raw() -> None:
            times["raw_fsync"].append(timed(lambda: raw_save(states, raw_dir, episode, True)))
            times["raw_load"].append(timed(lambda: raw_load(next(raw_dir.iterdir()))))
            times["raw"].append(timed(lambda: raw_save(states, raw_dir, episode, False)))

        # Each load right after its own save (both from the page cache); sides alternate.
        for episode in range(1, repeats + 1):
            for side in (ours, raw) if episode % 2 else (raw, ours):
                side()
        on_disk = sum(p.stat().st_size for p in ours_dir.rglob("*") if p.is_file())
    median = {k: statistics.median(v) for k, v in times.items()}
    return [
        report(f"checkpoint {label}: state", size / 2**20, "MiB"),
        report(f"checkpoint {label}: bytes on disk (flowgraph)", on_disk / 2**20, "MiB"),
        report(f"checkpoint {label}: flowgraph save", median["ours"], "s"),
        report(f"checkpoint {label}: raw torch.save", median["raw"], "s"),
        report(f"checkpoint {label}: raw torch.save + fsync", median["raw_fsync"], "s"),
        report(
            f"checkpoint {label}: save / raw+fsync",
            median["ours"] / median["raw_fsync"],
            "x",
            "target <= 1.2",
        ),  # fmt: skip
        report(f"checkpoint {label}: save / raw", median["ours"] / median["raw"], "x"),
        report(f"checkpoint {label}: flowgraph load", median["ours_load"], "s"),
        report(f"checkpoint {label}: raw torch.load", median["raw_load"], "s"),
        report(
            f"checkpoint {label}: load / raw",
            median["ours_load"] / median["raw_load"],
            "x",
            "target <= 1.2",
        ),  # fmt: skip
    ]


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, list | tuple):
        for value in state:
            yield from _tensors(value)


def main(large: bool = True) -> list[dict]:
    results = compare("demo models", demo_states(), repeats=15)
    if large:
        results += compare("500M trainer", large_state(), repeats=3)
    return results


if __name__ == "__main__":
    main(large="--skip-large" not in sys.argv)
