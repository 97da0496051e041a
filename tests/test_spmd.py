"""The SPMD runtime under torchrun (gloo on loopback): same numbers as one process, and
every rank did its share of the work, no more."""

import json
import time

import pytest
import torch

from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.config import load_config
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


LAYOUTS = {"2-colocated": (2, COLOCATED_2), "2-offload": (2, OFFLOAD_2), "4-split": (4, SPLIT_4)}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("world1")
    result = run_job(out, {"runtime": RUNTIME}, nproc=1)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory):
    """``layout_run(name)``: the output directory of the job of ``LAYOUTS[name]``, run
    once per module and shared by the tests that read it."""
    done = {}

    def run(name):
        if name not in done:
            nproc, config = LAYOUTS[name]
            out = tmp_path_factory.mktemp(name)
            result = run_job(out, config, nproc=nproc)
            assert result.returncode == 0, result.stderr[-3000:]
            done[name] = out
        return done[name]

    return run


def assert_same_as_one_process(single, out):
    """The job in ``out`` ended with the weights and metrics of the 1-process job."""
    expected, got = hosted_parameters(single), hosted_parameters(out)
    assert set(got) == set(MODELS)
    for model in MODELS:
        for name, tensor in expected[model].items():
            torch.testing.assert_close(got[model][name], tensor, rtol=1e-5, atol=1e-6,
                                       msg=f"{model}.{name}")  # fmt: skip
    # The weights moved, and the inference copies equal their trainers after the last sync.
    assert not torch.equal(got["ppo_policy"]["weight"], got["reference"]["weight"])
    torch.testing.assert_close(got["policy"]["weight"], got["ppo_policy"]["weight"])
    one, many = records(single), records(out)
    assert [r["episode"] for r in many] == [r["episode"] for r in one] == [0, 1, 2, 3]
    for a, b in zip(one, many, strict=True):
        assert set(a["metrics"]) == set(b["metrics"])
        for key, value in a["metrics"].items():
            assert b["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    return many


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_same_weights_and_metrics_as_one_process(single, layout_run, layout):
    nproc, config = LAYOUTS[layout]
    many = assert_same_as_one_process(single, layout_run(layout))
    offloading = any(m.get("offload") for m in config["models"].values())
    assert all(("env/offload" in r["stages"]) is offloading for r in many[1:])


def calls_per_rank(out, nproc):
    return [json.loads((out / f"calls_rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("layout", ["2-colocated", "4-split"])
def test_each_rank_hosts_what_the_plan_places_and_does_its_share(layout_run, layout):
    import spmd_job  # the job's Engine, to compile its plan here

    nproc, config = LAYOUTS[layout]
    ran = calls_per_rank(layout_run(layout), nproc)
    plan = spmd_job.engine.compile(ClusterSpec.cpu(nproc), load_config(config))
    placement = {p.model: tuple(p.ranks) for p in plan.placement}
    assert set(placement) == set(MODELS)
    runtime = RUNTIME
    samples = runtime["num_episode"] * runtime["sample_per_episode"]
    evals = 2 * 12  # before training and after episode 2, 12 validation prompts each
    global_steps = samples // runtime["train_global_batch_size"]
    step_micro = runtime["train_global_batch_size"] // runtime["train_micro_batch_size"]

    def sizes(model, rank, method):
        return [size for m, size in ran[rank][model]["calls"] if m == method]

    for model, ranks in placement.items():
        setups = [ran[r][model]["setup_count"] for r in range(nproc)]
        assert setups == [int(r in ranks) for r in range(nproc)], f"{model}: setup() per rank"
        for rank in set(range(nproc)) - set(ranks):
            assert ran[rank][model]["calls"] == [], f"{model} ran on rank {rank}, not its host"
        if model.startswith("ppo_"):
            # Every global step: each data-parallel rank trains on 1/N of its micro-batches.
            share = [runtime["train_micro_batch_size"]] * (step_micro // len(ranks))
            for rank in ranks:
                assert sizes(model, rank, "train_step") == [share] * global_steps, (model, rank)
        else:
            # Each data-parallel rank generated its 1/N of the episode's samples, no more.
            done = {rank: sum(sizes(model, rank, "forward_step")) for rank in ranks}
            assert done == dict.fromkeys(ranks, samples // len(ranks)), model
        if model in ("policy", "reward"):
            evaluated = sum(sum(sizes(model, rank, "eval_step")) for rank in ranks)
            assert evaluated == evals, f"{model} evaluated {evaluated} samples, not {evals}"


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
        "flowgraph: rank 1 failed at `RUN %reward_out reward.forward_step[w0]` (phase env, "
        "episode 1)" in err
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


def test_two_nodes_on_loopback_give_the_numbers_of_one_process(single, tmp_path):
    results = run_two_nodes(tmp_path, SPLIT_2_NODES)
    for node, result in enumerate(results):
        assert result.returncode == 0, f"node {node}:\n{result.stderr[-3000:]}"
    # Inference on rank 0, trainers on rank 1 (the other node): the policy received the
    # trained weights over the network, and every number is the one process's.
    assert_same_as_one_process(single, tmp_path)


def test_ranks_with_different_configs_are_stopped_before_running(tmp_path):
    result = run_job(tmp_path, COLOCATED_2, nproc=2,
                     env={"FLOWGRAPH_TEST_RANK1_OVERRIDE": "runtime.seed=99"})  # fmt: skip
    assert result.returncode != 0
    assert "rank(s) [1] compiled a different plan or config than rank 0" in result.stderr
    assert "rank 1 against rank 0: runtime.seed: 1234 -> 99" in result.stderr  # the key named
    assert not list(tmp_path.glob("rank*.pt"))  # nothing ran


def test_ranks_with_different_data_are_stopped_before_running(tmp_path):
    result = run_job(tmp_path, COLOCATED_2, nproc=2, env={"FLOWGRAPH_TEST_RANK1_DATA": "1"})
    assert result.returncode != 0
    assert "rank 1 holds other data than rank 0 (Dataset(48 samples from a list)" in result.stderr
    assert not list(tmp_path.glob("rank*.pt"))
