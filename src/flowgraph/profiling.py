"""``flowc profile``: measure what the cost model needs by running a few traced episodes.

``flowc profile train.py --out profile.json`` runs the script's Engine twice for a few
episodes (in one process, or under ``torchrun --nproc-per-node N`` with ``--nproc-per-node
N``): once with the configured batch sizes, once with them halved, each with
``runtime.trace: true``. From the two timelines it fits, per model and method, seconds per
call as ``fixed + per_sample x samples`` (at the run's tokens per sample; scaled to others),
the same per optimizer step for each trainer (its gradient all-reduce taken out), the
links between the ranks (measured after the episodes by ``runtime/linkbench.py``), the
weight-copy bandwidth and the framework's time per episode outside instructions. Then
``flowc compile ... --profile profile.json`` (or ``runtime.profile: profile.json``)
estimates with those numbers.

Example::

    profile = profile_script("examples/grpo.py", None, ["runtime.num_episode=3"],
                             out="grpo.profile.json", nproc=2)
    print(profile.measured["median_s"], profile.measured["estimate_s"])
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from flowgraph.compiler import cost
from flowgraph.compiler.cluster import Mesh, format_ranks
from flowgraph.compiler.pipeline import estimate_layout, generates
from flowgraph.compiler.placement import Group, Layout
from flowgraph.compiler.plan import Plan
from flowgraph.compiler.profile import CallCost, Link, Profile, TrainCost, fit_line
from flowgraph.config import Config, init, load_config
from flowgraph.engine import Engine
from flowgraph.errors import FlowgraphError, ProfileError
from flowgraph.loader import load_script
from flowgraph.precision import dtype_bytes
from flowgraph.runtime.interpreter import owned
from flowgraph.runtime.linkbench import PROFILE_ENV
from flowgraph.runtime.timeline import read_slices

WARMUP_EPISODES = 1  # the first episode's calls pay for first-use work: not measured
TIMEOUT_S = 1800


def profile_script(
    target: str,
    config: str | None,
    overrides: list[str],
    out: str | Path,
    nproc: int = 1,
    episodes: int = 5,
) -> Profile:
    """Profile ``target`` (``FILE[:OBJECT]``) and write the profile to ``out``."""
    if episodes < WARMUP_EPISODES + 1:
        raise ProfileError(f"--episodes {episodes}: at least {WARMUP_EPISODES + 1} are needed "
                           "(the first one warms up and is not measured)")  # fmt: skip
    engine, chosen = load_script(target, config, overrides)  # errors here, before any launch
    base = load_config(chosen.config, overrides).runtime
    variants = {"base": [], "half": _halved(base, nproc)}
    with tempfile.TemporaryDirectory(prefix="flowc-profile-") as tmp:
        runs = {}
        for name, extra in variants.items():
            directory = Path(tmp) / name
            _launch(target, config, [*overrides, *extra, *_run_settings(directory, episodes)],
                    directory, nproc)  # fmt: skip
            runs[name] = ProfiledRun.read(directory)
        profile = fit_profile(list(runs.values()))
    profile.measured = runs["base"].measured()
    profile.measured["estimate_s"] = _estimate_same_plan(engine, runs["base"], profile)
    profile.save(out)
    profile.source = str(out)
    return profile


def _run_settings(directory: Path, episodes: int) -> list[str]:
    """Overrides every profiled run gets: few traced episodes, nothing kept or resumed."""
    return [
        f"runtime.num_episode={episodes}",
        "runtime.trace=true",
        f"runtime.log_dir={directory / 'log'}",
        "runtime.checkpoint_dir=null",
        "runtime.save_episode_interval=0",
        "runtime.eval_episode_interval=0",
        "runtime.enable_eval_before_training=false",
        "runtime.progress=false",
        "runtime.tensorboard=false",
        "runtime.profile=null",
        "runtime.max_staleness=0",  # slices then belong to the iteration they are labelled with
    ]


def _halved(runtime, nproc: int) -> list[str]:
    """Overrides halving the per-call batch sizes where they stay valid, so each method is
    measured at two batch sizes."""
    changes = []
    if runtime.generation_batch_size >= 2:
        changes.append(f"runtime.generation_batch_size={runtime.generation_batch_size // 2}")
    micro, total = runtime.train_micro_batch_size, runtime.global_batch_size
    if micro >= 2 and (total // 2) % (micro // 2 * nproc) == 0 and total % 2 == 0:
        changes.append(f"runtime.train_micro_batch_size={micro // 2}")
        changes.append(f"runtime.train_global_batch_size={total // 2}")
    if not changes:
        raise ProfileError(
            "flowc profile measures every call at two batch sizes, but generation_batch_size "
            f"({runtime.generation_batch_size}) and train_micro_batch_size ({micro}) are 1: "
            "profile with batch sizes of at least 2"
        )
    return changes


def _launch(target: str, config: str | None, overrides: list[str], directory: Path,
            nproc: int) -> None:  # fmt: skip
    child = ["-m", "flowgraph.profiling", target, *(["--config", config] if config else []),
             *overrides]  # fmt: skip
    if nproc > 1:
        child = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                 *child]  # fmt: skip
    env = {**os.environ, PROFILE_ENV: str(directory)}
    try:
        done = subprocess.run([sys.executable, *child], env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ProfileError(
            f"the profiled run of {target} did not finish in {TIMEOUT_S} s; profile fewer "
            "episodes (--episodes 2) or smaller batches (key=value overrides)"
        ) from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ProfileError(
            f"the profiled run of {target} failed (exit {done.returncode}); run it as "
            f"`python {target.split(':')[0]}` to see why. Its last lines:\n{tail}"
        )


def child_main(argv: list[str] | None = None) -> int:
    """One profiled run (``python -m flowgraph.profiling FILE ...``, launched by
    ``profile_script``): learn, then write the records and config next to the trace."""
    parser = argparse.ArgumentParser(prog="python -m flowgraph.profiling")
    parser.add_argument("target")
    parser.add_argument("--config")
    args, overrides = parser.parse_known_args(argv)
    engine, chosen = load_script(args.target, args.config, overrides)
    config = init(chosen.config, overrides)
    records = engine.learn()
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(os.environ[PROFILE_ENV])
        walls = {r.episode: r.seconds for r in records if r.episode > 0}
        (out / "records.json").write_text(json.dumps(walls))
        (out / "config.json").write_text(config.model_dump_json())
    return 0


@dataclass
class ProfiledRun:
    """One profiled run's files: its plan, config, timeline, links and episode times."""

    plan: Plan
    config: Config
    slices: list[dict]
    links: dict[str, list[list[float]]]
    walls: dict[int, float]
    threads: int

    @classmethod
    def read(cls, directory: Path) -> ProfiledRun:
        try:
            plan = Plan.from_json((directory / "plan.json").read_text())
            config = Config.model_validate_json((directory / "config.json").read_text())
            slices = read_slices(directory / "log" / "trace.json")
            links = json.loads((directory / "links.json").read_text())
            walls = {int(k): v for k, v in json.loads((directory / "records.json").read_text())
                     .items()}  # fmt: skip
            threads = json.loads((directory / "threads.json").read_text())
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ProfileError(f"the profiled run left no complete record ({err})") from None
        if not any(int(e) > WARMUP_EPISODES for e in walls):
            raise ProfileError("the profiled run recorded no episode after the warm-up; "
                               "profile more episodes (--episodes)")  # fmt: skip
        return cls(plan, config, slices, links, walls, threads)

    @property
    def measured_episodes(self) -> list[int]:
        return sorted(e for e in self.walls if e > WARMUP_EPISODES)

    def measured(self) -> dict:
        walls = [self.walls[e] for e in self.measured_episodes]
        layout = ", ".join(f"{p.model} {format_ranks(p.ranks)}" for p in self.plan.placement)
        return {"episodes_s": walls, "median_s": statistics.median(walls), "layout": layout,
                "world_size": self.plan.cluster.world_size}  # fmt: skip

    def instruction_slices(self):
        """(instruction, rank, episode, seconds) of every measured slice."""
        by_name = {}
        for stream in self.plan.streams:
            for ins in stream.instructions:
                for rank in stream.ranks:
                    by_name[(rank, ins.phase, str(ins))] = ins
        measured = set(self.measured_episodes)
        for s in self.slices:
            episode = s["args"].get("episode")
            ins = by_name.get((s["pid"], s["args"].get("phase"), s["name"]))
            if ins is not None and episode in measured:
                yield ins, s["pid"], episode, s["dur"] / 1e6


def fit_profile(runs: list[ProfiledRun]) -> Profile:
    """Fit the costs of ``runs`` (the same script at different batch sizes)."""
    first = runs[0]
    links = {kind: Link.fit(points) for kind, points in first.links.items()}
    calls: dict[tuple, list] = defaultdict(list)
    steps: dict[str, list] = defaultdict(list)
    syncs: list[float] = []
    overhead: list[float] = []
    for run in runs:
        r = run.config.runtime
        mesh = {p.model: p.ranks for p in run.plan.placement}
        params = {p.model: p.params for p in run.plan.placement}
        dtype = {p.model: p.precision for p in run.plan.placement}
        total = -(-r.sample_per_episode // r.generation_batch_size)
        busy: dict[tuple[int, int], float] = defaultdict(float)
        for ins, rank, episode, seconds in run.instruction_slices():
            busy[(episode, rank)] += seconds
            if ins.op == "RUN" and ins.phase in ("env", "train"):  # eval is off here
                spec = run.plan.phases[ins.phase]
                node = spec.node(ins.node)
                if ins.phase == "train":
                    samples = r.global_batch_size / len(mesh[ins.model])
                else:  # one call per owned micro-batch, of its rows (answers included)
                    mine = owned(ins.wave, spec.width, mesh[ins.model], rank, total)
                    if not mine:
                        continue
                    samples = r.generation_batch_size * r.num_inference_per_prompt
                    seconds /= len(mine)
                generate = ins.phase == "env" and generates(node, spec.input)
                tokens = r.response_length if generate else r.prompt_length + r.response_length
                calls[(ins.model, node.method, ins.phase, generate, tokens)].append(
                    (samples, seconds)
                )
            elif ins.op == "TRAIN":
                n = len(mesh[ins.model])
                if n > 1 and "allreduce" in links:
                    seconds -= links["allreduce"].seconds(
                        cost.allreduce_bytes(params[ins.model], n)
                    )
                steps[ins.model].append((r.global_batch_size / n, max(seconds, 0.0),
                                         r.prompt_length + r.response_length))  # fmt: skip
            elif ins.op == "SYNC":
                syncs.append(params[ins.src] * dtype_bytes(dtype[ins.dst]) / max(seconds, 1e-9))
        for episode in run.measured_episodes:
            ranks = [b for (e, _), b in busy.items() if e == episode]
            if ranks:
                overhead.append(max(0.0, run.walls[episode] - max(ranks)))
    profile = Profile(
        device=first.plan.cluster.device,
        world_size=first.plan.cluster.world_size,
        threads=first.threads,
        links=links,
        sync_bytes_per_s=statistics.median(syncs) if syncs else None,
        overhead_s=statistics.median(overhead) if overhead else 0.0,
    )
    for (model, method, phase, generate, tokens), points in sorted(calls.items()):
        (fixed, per_sample), _ = fit_line(points)
        profile.calls.append(CallCost(model, method, phase, generate, fixed, per_sample, tokens))
    for model, points in sorted(steps.items()):
        (fixed, per_sample), _ = fit_line([(s, t) for s, t, _ in points])
        profile.train.append(TrainCost(model, fixed, per_sample, points[0][2]))
    return profile


def _estimate_same_plan(engine: Engine, run: ProfiledRun, profile: Profile) -> float:
    """The profile's estimate of the plan the base run ran (its layout, its config)."""
    layout = Layout("profiled", tuple(Group(tuple(s.models), Mesh(s.ranks))
                                      for s in run.plan.streams))  # fmt: skip
    program = engine.program(run.config)
    return estimate_layout(program, run.config, run.plan.cluster, layout, profile)


if __name__ == "__main__":
    try:
        sys.exit(child_main())
    except FlowgraphError as err:
        print(f"flowgraph: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)
