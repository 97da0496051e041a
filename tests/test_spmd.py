"""The SPMD runtime under torchrun (gloo on loopback): same numbers as one process."""

import time

import pytest
import torch

from spmd import hosted_parameters, records, run_job, run_two_nodes

pytestmark = pytest.mark.slow

RUNTIME = {
    "num_episode": 3,
    "sample_per_episode": 16,
    "generation_batch_size": 4,
    "train_micro_batch_size": 2,
    "train_global_batch_size": 8,
    "eval_episode_interval": 2,
    "enable_eval_before_training": True,
    "log_episodes": False,
}
MODELS = ["policy", "reference", "value", "reward", "ppo_policy", "ppo_value"]


def explicit(groups, sizes):
    models = {m: {"num_gpu": sizes[m]} for m in MODELS}
    return {"runtime": {**RUNTIME, "colocation": groups}, "models": models}


COLOCATED_2 = explicit([MODELS], dict.fromkeys(MODELS, 2))
OFFLOAD_2 = explicit([MODELS], dict.fromkeys(MODELS, 2))
for _model in ("policy", "ppo_policy", "value", "ppo_value"):
    OFFLOAD_2["models"][_model]["offload"] = True
SPLIT_4 = explicit(
    [["policy", "reference"], ["value", "reward", "ppo_policy", "ppo_value"]],
    dict.fromkeys(MODELS, 2),
)
SPLIT_4["runtime"]["validate_sync"] = True  # checksums after every sync, both kinds
SPLIT_2_NODES = explicit(
    [["policy", "reference", "value", "reward"], ["ppo_policy", "ppo_value"]],
    dict.fromkeys(MODELS, 1),
)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("world1")
    result = run_job(out, {"runtime": RUNTIME}, nproc=1)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize(("nproc", "config"), [(2, COLOCATED_2), (2, OFFLOAD_2), (4, SPLIT_4)],
                         ids=["2-colocated", "2-offload", "4-split"])  # fmt: skip
def test_same_weights_and_metrics_as_one_process(single, tmp_path, nproc, config):
    result = run_job(tmp_path, config, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = hosted_parameters(single), hosted_parameters(tmp_path)
    assert set(got) == set(MODELS)
    for model in MODELS:
        for name, tensor in expected[model].items():
            torch.testing.assert_close(got[model][name], tensor, rtol=1e-5, atol=1e-6,
                                       msg=f"{model}.{name}")  # fmt: skip
    # The weights moved, and the inference copies equal their trainers after the last sync.
    assert not torch.equal(got["ppo_policy"]["weight"], got["reference"]["weight"])
    torch.testing.assert_close(got["policy"]["weight"], got["ppo_policy"]["weight"])
    one, many = records(single), records(tmp_path)
    assert [r["episode"] for r in many] == [r["episode"] for r in one] == [0, 1, 2, 3]
    for a, b in zip(one, many, strict=True):
        assert set(a["metrics"]) == set(b["metrics"])
        for key, value in a["metrics"].items():
            assert b["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    offloading = any(m.get("offload") for m in config["models"].values())
    assert all(("env/offload" in r["stages"]) is offloading for r in many[1:])


def with_failure(**args):
    config = {**COLOCATED_2, "runtime": {**COLOCATED_2["runtime"], "timeout_s": 8}}
    config["models"] = {**config["models"], "reward": {"num_gpu": 2, "args": args}}
    return config


def test_exception_on_one_rank_stops_the_job_with_rank_model_instruction_and_line(tmp_path):
    start = time.monotonic()
    result = run_job(tmp_path, with_failure(fail_rank=1), nproc=2, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s"
    err = result.stderr
    assert (
        "flowgraph: rank 1 failed at `RUN reward.forward_step[mb0]` (phase env, episode 1)" in err
    )
    assert "model reward: %reward_out = call_model[reward.forward_step]" in err
    assert "rlhf_flows.py:25" in err  # the user's flow line
    assert "RuntimeError: injected failure in the reward model" in err


def test_a_failing_setup_names_the_rank_and_model(tmp_path):
    config = with_failure(fail_rank=1, fail="setup")
    config["models"]["reward"]["params"] = "1K"  # sized from config: setup runs only for real
    result = run_job(tmp_path, config, nproc=2, timeout=120)
    assert result.returncode != 0
    assert "flowgraph: rank 1 failed while setting up model reward" in result.stderr
    assert "OSError: injected failure: checkpoint /ckpt/reward.pt not found" in result.stderr


def test_a_rank_that_stops_answering_is_reported_after_the_timeout(tmp_path):
    start = time.monotonic()
    result = run_job(tmp_path, with_failure(fail_rank=1, fail="hang"), nproc=2, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert 8 <= elapsed < 60, f"took {elapsed:.0f} s"
    assert "flowgraph: rank 0 failed at" in result.stderr
    assert "no answer from rank(s) [1] within runtime.timeout_s=8 s" in result.stderr


def test_two_nodes_on_loopback_run_an_episode(tmp_path):
    config = {**SPLIT_2_NODES, "runtime": {**SPLIT_2_NODES["runtime"], "num_episode": 1}}
    results = run_two_nodes(tmp_path, config)
    for node, result in enumerate(results):
        assert result.returncode == 0, f"node {node}:\n{result.stderr[-3000:]}"
    got = hosted_parameters(tmp_path)
    assert set(got) == set(MODELS)
    assert [r["episode"] for r in records(tmp_path)] == [0, 1]
    # Inference on node 0, trainers on node 1: the policy received the trained weights.
    torch.testing.assert_close(got["policy"]["weight"], got["ppo_policy"]["weight"])


def test_ranks_with_different_configs_are_stopped_before_running(tmp_path):
    result = run_job(tmp_path, COLOCATED_2, nproc=2,
                     env={"FLOWGRAPH_TEST_RANK1_OVERRIDE": "runtime.seed=99"})  # fmt: skip
    assert result.returncode != 0
    assert "rank(s) [1] compiled a different plan or config than rank 0" in result.stderr
    assert not list(tmp_path.glob("rank*.pt"))  # nothing ran
