"""Measured costs: `flowc profile` writes them, `flowc compile --profile` estimates with
them, and the estimate matches a separate run of the same setting on this machine."""

import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flowgraph.cli import main
from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.compiler.profile import CallCost, Link, Profile, TrainCost, fit_line
from flowgraph.config import load_config
from flowgraph.errors import PlanError, ProfileError
from flowgraph.loader import load_script
from flowgraph.profiling import _halved
from spmd import job_env, run_command, torchrun

ROOT = Path(__file__).parent.parent
GRPO = str(ROOT / "examples" / "grpo.py")
BENCH = str(ROOT / "examples" / "grpo_bench.yaml")
# The GRPO bench model at a size a test can run a few times: 16 prompts x 4 answers.
SMALL = [
    "runtime.sample_per_episode=16",
    "runtime.generation_batch_size=8",
    "runtime.train_micro_batch_size=16",
    "runtime.train_global_batch_size=64",
    "runtime.response_length=16",
]
SPLIT = [
    "runtime.colocation=[[policy,reference,reward],[grpo_policy]]",
    *(f"models.{m}.num_gpu=1" for m in ("policy", "reference", "reward", "grpo_policy")),
]
TOLERANCE = 0.45  # RESULTS.md holds the +-25 % measurements of quiet runs; CI machines are noisy


def test_fit_line_goes_through_the_medians_and_refuses_a_negative_fixed_cost():
    (a, b), worst = fit_line([(8, 1.0 + 0.5 * 8), (16, 1.0 + 0.5 * 16), (4, 3.0)])
    assert a == pytest.approx(1.0) and b == pytest.approx(0.5)
    assert worst == pytest.approx(0.0)
    slow_call = [(8, 5.0), (8, 5.0), (8, 50.0), (16, 9.0), (16, 9.0), (16, 9.1)]
    (a, b), _ = fit_line(slow_call)  # one call 10x slower does not move the line
    assert a == pytest.approx(1.0) and b == pytest.approx(0.5)
    (a, b), _ = fit_line([(10, 1.0), (20, 3.0)])  # the line would cross below zero
    assert a == 0.0 and b == pytest.approx((10 + 60) / 500)
    (a, b), _ = fit_line([(16, 2.0), (16, 4.0), (16, 3.5)])  # one batch size: proportional
    assert (a, b) == (0.0, pytest.approx(3.5 / 16))


def test_costs_scale_with_samples_and_tokens():
    call = CallCost("policy", "forward_step", "env", True, fixed=0.2, per_sample=0.01, tokens=32)
    assert call.seconds(16, 32) == pytest.approx(0.36)
    assert call.seconds(16, 64) == pytest.approx(0.72)
    step = TrainCost("trainer", fixed=0.1, per_sample=0.002, tokens=40)
    assert step.seconds(100, 20) == pytest.approx(0.15)
    link = Link.fit([(1000, 0.002), (3000, 0.004)])
    assert link.latency_s == pytest.approx(0.001) and link.bytes_per_s == pytest.approx(1e6)


def test_a_profile_round_trips_and_bad_files_are_named(tmp_path):
    profile = Profile(
        "cpu",
        2,
        1,
        [CallCost("p", "forward_step", "env", True, 0.1, 0.01, 8)],
        [TrainCost("t", 0.2, 0.02, 8)],
        {"p2p": Link(0.001, 1e9)},
        1e10,
        0.05,
    )
    path = profile.save(tmp_path / "p.json")
    again = Profile.load(path)
    assert again.calls == profile.calls and again.links == profile.links
    assert again.overhead_s == 0.05 and again.source == str(path)
    with pytest.raises(PlanError, match="no such file; write one with flowc profile"):
        Profile.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(PlanError, match="bad.json is not a profile"):
        Profile.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"version": 0}))
    with pytest.raises(PlanError, match="not a version 1 profile"):
        Profile.load(tmp_path / "old.json")
    data = json.loads(path.read_text())
    del data["calls"][0]["fixed"]
    (tmp_path / "damaged.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="damaged.json is damaged"):
        Profile.load(tmp_path / "damaged.json")


def test_the_second_run_halves_the_batch_sizes_or_says_why_it_cannot():
    runtime = load_config(BENCH, SMALL).runtime
    assert _halved(runtime, nproc=2) == [
        "runtime.generation_batch_size=4",
        "runtime.train_micro_batch_size=8",
        "runtime.train_global_batch_size=32",
    ]
    ones = load_config(
        None,
        [
            "runtime.generation_batch_size=1",
            "runtime.train_micro_batch_size=1",
            "runtime.train_global_batch_size=1",
        ],
    ).runtime
    with pytest.raises(ProfileError, match="at two batch sizes.*at least 2"):
        _halved(ones, nproc=1)


def fake_profile(device="cpu", **costs) -> Profile:
    """A profile where every call of the GRPO example costs what ``costs`` says."""
    calls = [
        CallCost(m, "forward_step", "env", m == "policy", costs.get(m, 0.1), 0.0, 16)
        for m in ("policy", "reference", "reward")
    ]
    return Profile(
        device,
        1,
        2,
        calls,
        [TrainCost("grpo_policy", costs.get("train", 1.0), 0.0, 24)],
        {},
        None,
        costs.get("overhead", 0.0),
    )


def test_compile_estimates_with_the_profile_and_names_it(tmp_path, capsys):
    path = fake_profile(policy=0.5, reference=0.1, reward=0.0, train=1.0, overhead=0.25).save(
        tmp_path / "p.json"
    )
    code = main(
        [
            "compile",
            GRPO,
            "--cpu",
            "--world-size",
            "1",
            "--config",
            BENCH,
            *SMALL,
            "--profile",
            str(path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"estimates from the profile {path} (cpu, 1 process x 2 threads" in out
    # 2 micro-batches x (0.5 + 0.1 x 24/16 + 0) + 1 step x 1.0 + 0.25 overhead: generation
    # measured at 16 answer tokens, scoring at 16 tokens and run at 8 + 16
    engine, chosen = load_script(GRPO, BENCH, SMALL)
    config = load_config(chosen.config, [*SMALL, f"runtime.profile={path}"])
    plan = engine.compile(ClusterSpec.cpu(1), config)
    assert plan.estimates.episode_s == pytest.approx(2 * (0.5 + 0.15) + 1.0 + 0.25, rel=1e-3)
    slower = fake_profile(policy=1.0, reference=0.1, reward=0.0, train=1.0, overhead=0.25).save(
        tmp_path / "q.json"
    )
    config = load_config(chosen.config, [*SMALL, f"runtime.profile={slower}"])
    assert engine.compile(ClusterSpec.cpu(1), config).estimates.episode_s == pytest.approx(
        2 * (1.0 + 0.15) + 1.0 + 0.25, rel=1e-3
    )


def test_a_profile_of_other_devices_is_refused(tmp_path, capsys):
    path = fake_profile(device="cpu").save(tmp_path / "p.json")
    code = main(["compile", GRPO, "--world-size", "8", "--profile", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "was measured on cpu devices but the plan is for gpu devices: plan with --cpu" in err


def test_profile_needs_two_episodes(capsys):
    assert main(["profile", GRPO, "--episodes", "1", "--out", "x.json"]) == 2
    assert "at least 2 are needed" in capsys.readouterr().err


def measured_median(log_dir: Path) -> float:
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["seconds"] for r in records if r["episode"] > 1)


def estimate(profile: Path, world: int, overrides: list[str]) -> float:
    engine, chosen = load_script(GRPO, BENCH, overrides)
    config = load_config(chosen.config, [*overrides, f"runtime.profile={profile}"])
    return engine.compile(ClusterSpec.cpu(world), config).estimates.episode_s


def run_grpo(log_dir: Path, nproc: int, overrides: list[str], episodes: int = 5) -> float:
    args = [
        GRPO,
        "--config",
        BENCH,
        *overrides,
        f"runtime.num_episode={episodes}",
        "runtime.eval_episode_interval=0",
        "runtime.enable_eval_before_training=false",
        f"runtime.log_dir={log_dir}",
        "runtime.progress=false",
    ]
    command = [sys.executable, *args] if nproc == 1 else torchrun(nproc, *args)
    done = run_command(command, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return measured_median(log_dir)


def flowc_profile(out: Path, nproc: int, overrides: list[str]) -> dict:
    command = [
        sys.executable,
        "-m",
        "flowgraph.cli",
        "profile",
        GRPO,
        "--config",
        BENCH,
        "--episodes",
        "3",
        "--nproc-per-node",
        str(nproc),
        "--out",
        str(out),
        *overrides,
    ]
    # the environment run_grpo's measured runs get (spmd.job_env: one thread per process), so
    # that the profile describes the same device
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=job_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the profile's estimate of that run" in done.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_the_profiled_estimate_matches_a_run_in_one_process(tmp_path):
    data = flowc_profile(tmp_path / "p.json", 1, SMALL)
    assert data["world_size"] == 1 and {c["model"] for c in data["calls"]} == {
        "policy",
        "reference",
        "reward",
    }
    assert [t["model"] for t in data["train"]] == ["grpo_policy"]
    measured = run_grpo(tmp_path / "run", 1, SMALL)
    estimated = estimate(tmp_path / "p.json", 1, SMALL)
    assert abs(estimated / measured - 1) < TOLERANCE, (estimated, measured)


@pytest.mark.slow
def test_a_two_rank_profile_predicts_the_split_layout(tmp_path):
    """Profiled colocated on 2 ranks; the split layout (inference on r0, the trainer on r1)
    runs other per-call batches and transfers, which the profile must predict."""
    data = flowc_profile(tmp_path / "p.json", 2, SMALL)
    assert data["world_size"] == 2 and set(data["links"]) == {
        "p2p",
        "gather",
        "broadcast",
        "allreduce",
    }
    measured = run_grpo(tmp_path / "split", 2, [*SMALL, *SPLIT])
    estimated = estimate(tmp_path / "p.json", 2, [*SMALL, *SPLIT])
    assert abs(estimated / measured - 1) < TOLERANCE, (estimated, measured)


def test_a_failing_profiled_run_is_one_error_quoting_its_last_lines(tmp_path, capsys):
    script = tmp_path / "broken.py"
    script.write_text(
        textwrap.dedent("""
        import torch
        from flowgraph import BaseModule, Engine, Environment

        class Broken(BaseModule):
            def forward_step(self, data):
                raise RuntimeError("the model is broken on purpose")

        broken = Broken("broken")
        def flow(batch):
            return broken.forward_step(batch)
        engine = Engine(Environment(flow)).set_dataset(
            [{"prompt_ids": torch.tensor([1, 2])} for _ in range(8)])
    """)
    )
    code = main(
        [
            "profile",
            str(script),
            "--episodes",
            "2",
            "--out",
            str(tmp_path / "p.json"),
            "runtime.sample_per_episode=4",
            "runtime.generation_batch_size=2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"the profiled run of {script} failed (exit 1); run it as `python {script}`" in err
    assert "the model is broken on purpose" in err
    assert not (tmp_path / "p.json").exists()


def test_a_rank_owning_several_micro_batches_pays_one_call_each(tmp_path):
    """policy alone on r0, reference and reward on r1-r2: waves are 2 micro-batches wide,
    so r0 makes two generate calls per wave (the runtime calls the model per micro-batch)."""
    path = fake_profile(policy=0.5, reference=0.1, reward=0.0).save(tmp_path / "p.json")
    layout = ["runtime.colocation=[[reference,reward]]", "models.policy.num_gpu=1",
              "models.reference.num_gpu=2", "models.reward.num_gpu=2",
              "models.grpo_policy.num_gpu=1"]  # fmt: skip
    engine, chosen = load_script(GRPO, BENCH, SMALL)
    config = load_config(chosen.config, [*SMALL, *layout, f"runtime.profile={path}"])
    plan = engine.compile(ClusterSpec.cpu(4), config)
    r0 = next(i for i, s in enumerate(plan.streams) if 0 in s.ranks)
    timed = zip(plan.streams[r0].instructions, plan.times[r0], strict=True)
    runs = [(a, b) for ins, (a, b) in timed
            if ins.op == "RUN" and ins.model == "policy" and ins.phase == "env"]  # fmt: skip
    assert plan.waves["env"] == 1 and len(runs) == 1
    assert runs[0][1] - runs[0][0] == pytest.approx(2 * 0.5)


def test_a_profile_of_other_thread_counts_is_flagged(tmp_path, capsys):
    path = fake_profile().save(tmp_path / "p.json")  # one process, 2 threads
    main(["compile", GRPO, "--cpu", "--world-size", "2", "--config", BENCH, *SMALL,
          "--profile", str(path)])  # fmt: skip
    out = capsys.readouterr().out
    assert "warning: the profile was measured with 2 thread(s) per process, this plan's " \
           "processes get 1: profile under torchrun --nproc-per-node N" in out  # fmt: skip
    main(["compile", GRPO, "--cpu", "--world-size", "1", "--config", BENCH, *SMALL,
          "--profile", str(path)])  # fmt: skip
    assert "warning: the profile" not in capsys.readouterr().out
