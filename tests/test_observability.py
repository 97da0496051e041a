"""Seeing a run: the Chrome trace, TensorBoard scalars and ``flowc report``."""

import json
from collections import Counter
from pathlib import Path

import pytest

from flowgraph.cli import main as flowc
from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.config import load_config
from flowgraph.runtime.timeline import read_slices
from spmd import run_job
from test_examples import QUIET, load_example


def executed(trace: Path) -> dict[int, Counter]:
    """Per rank, how often each instruction text appears (coalesced GATHERs count each)."""
    found: dict[int, Counter] = {}
    for piece in read_slices(trace):
        assert piece["dur"] >= 0 and piece["ts"] > 0
        names = piece["args"].get("instructions", [piece["name"]])
        found.setdefault(piece["pid"], Counter()).update(names)
    return found


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("traced")
    ppo = load_example("ppo")
    ppo.main([*QUIET, "runtime.num_episode=3", "runtime.eval_episode_interval=2",
              "runtime.trace=true", f"runtime.log_dir={log_dir}"])  # fmt: skip
    return log_dir


def test_one_process_trace_has_a_slice_for_every_model_call(ppo_run):
    trace = json.loads((ppo_run / "trace.json").read_text())  # valid JSON, Chrome's layout
    assert {e["ph"] for e in trace["traceEvents"]} == {"M", "X"}
    calls = executed(ppo_run / "trace.json")[0]
    runtime = load_config(str(Path(__file__).parent.parent / "examples" / "ppo.yaml")).runtime
    env_mbs = runtime.sample_per_episode // runtime.generation_batch_size
    steps = runtime.num_training_epoch * runtime.sample_per_episode // runtime.global_batch_size
    waves = ["RUN %policy_out policy.forward_step", "RUN %ref_out reference.forward_step",
             "RUN %value_out value.forward_step"]  # fmt: skip
    for k in range(env_mbs):
        for run in waves:
            assert calls[f"{run}[w{k}]"] == 3, run
    for k in range(steps):
        assert (calls[f"TRAIN %ppo_policy_train_step ppo_policy[step{k}]"]
                == calls[f"TRAIN %ppo_value_train_step ppo_value[step{k}]"] == 3)  # fmt: skip
    # the initial sync (inference copies start from the trainers), then one per episode
    assert calls["SYNC ppo_policy->policy"] == calls["SYNC ppo_value->value"] == 4
    assert calls["RUN %r0 policy.eval_step[w0]"] == 2  # before training and after episode 2
    # a 1-rank plan: no transfers (a GATHER of one rank is the identity)
    assert {name.split()[0] for name in calls} == {"RUN", "TRAIN", "SYNC", "GATHER"}


def test_tensorboard_gets_every_metric_and_stage(ppo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(ppo_run / "tensorboard"))
    board.Reload()
    tags = board.Tags()["scalars"]
    assert {"ppo_policy/reward", "eval/score", "time/env/policy", "time/samples_per_second"} <= set(
        tags
    )
    assert [e.step for e in board.Scalars("ppo_policy/reward")] == [1, 2, 3]


def test_a_rerun_in_the_same_log_dir_hides_the_old_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for episodes in (3, 2):  # two runs of the script (an Engine learns once)
        load_example("ppo").main([*QUIET, f"runtime.num_episode={episodes}",
                                  f"runtime.log_dir={tmp_path}"])  # fmt: skip
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("ppo_policy/reward")] == [1, 2]


def test_flowc_report_prints_the_summary_and_draws_curves_and_timeline(ppo_run, tmp_path, capsys):
    assert flowc(["report", str(ppo_run), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"run {ppo_run}: 3 episodes (+ eval before training), 128 samples per episode" in out
    assert "  train/ppo_policy" in out and "ppo_policy/reward" in out
    for picture in ("metrics.png", "timeline.png"):
        assert (tmp_path / picture).stat().st_size > 10_000
        assert f"wrote {tmp_path / picture}" in out


def test_flowc_report_of_a_directory_without_metrics_names_the_fix(tmp_path, capsys):
    assert flowc(["report", str(tmp_path)]) == 2
    assert (
        "reads the metrics.jsonl that a run writes into runtime.log_dir" in capsys.readouterr().err
    )


def test_trace_needs_a_log_dir():
    with pytest.raises(Exception, match="set runtime.log_dir"):
        load_config({"runtime": {"trace": True}})


@pytest.mark.slow
def test_torchrun_trace_has_one_track_per_rank_and_every_instruction(tmp_path):
    import spmd_job

    runtime = {"num_episode": 2, "sample_per_episode": 16, "generation_batch_size": 4,
               "train_micro_batch_size": 2, "train_global_batch_size": 8,
               "eval_episode_interval": 2, "enable_eval_before_training": True,
               "log_episodes": False, "progress": False, "trace": True,
               "log_dir": str(tmp_path / "log")}  # fmt: skip
    models = {m: {"num_gpu": 1} for m in ("policy", "reference", "value", "reward")}
    models |= {m: {"num_gpu": 1} for m in ("ppo_policy", "ppo_value")}
    config = {"runtime": {**runtime, "colocation": [["policy", "reference", "value", "reward"],
                                                   ["ppo_policy", "ppo_value"]]},
              "models": models}  # fmt: skip
    result = run_job(tmp_path, config, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    found = executed(tmp_path / "log" / "trace.json")
    assert sorted(found) == [0, 1]
    plan = spmd_job.engine.compile(ClusterSpec.cpu(2), load_config(config))
    # env and train run every episode; sync once at the start and after each episode;
    # eval before training and after episode 2
    runs = {"env": 2, "train": 2, "sync": 3, "eval": 2}
    for stream in plan.streams:
        expected = Counter()
        for ins in stream.instructions:
            expected[str(ins)] += runs[ins.phase]
        for rank in stream.ranks:
            assert found[rank] == expected, rank
