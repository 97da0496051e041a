"""Layouts whose point-to-point order once relied on message tags, and random ones, under
torchrun: the same weights and metrics as one process.

The transport sends every message with tag 0, so gloo matches messages exactly as NCCL
does (in order, per rank pair); a plan whose receives did not follow its sends would
deliver a wrong batch here (the toy models' reward would read another wave's outputs)
or hang until ``runtime.timeout_s``.
"""

import random

import pytest
import torch

from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.config import load_config
from spmd import hosted_parameters, records, run_job

pytestmark = pytest.mark.slow

RUNTIME = {"num_episode": 2, "sample_per_episode": 16, "generation_batch_size": 4,
           "train_micro_batch_size": 2, "train_global_batch_size": 8,
           "eval_episode_interval": 2, "log_episodes": False, "timeout_s": 30,
           "check_merges": True}  # fmt: skip
MODELS = ["policy", "reference", "value", "reward", "ppo_policy", "ppo_value"]


def layout(groups, sizes):
    models = {m: {"num_gpu": sizes[m]} for m in MODELS}
    return {"runtime": {**RUNTIME, "colocation": groups}, "models": models}


def random_layout(seed):
    """Models dealt into random groups; inference meshes of 1 or 2 ranks (they divide the
    episode's 4 micro-batches), trainer meshes of 1 or 2 (they divide its steps)."""
    rng = random.Random(seed)
    order = MODELS[:]
    rng.shuffle(order)
    groups, start = [], 0
    while start < len(order):
        size = rng.choice([1, 2, 3])
        groups.append(order[start : start + size])
        start += size
    sizes = {}
    for group in groups:
        n = rng.choice([1, 2])
        sizes.update(dict.fromkeys(group, n))
    return layout([g for g in groups if len(g) > 1], sizes)


LAYOUTS = {
    # issue 13: with tags ignored, r3 got policy_out wave 1 where ref_out wave 0 was due
    "4-tagless": layout([["policy", "reference"], ["ppo_policy", "ppo_value"]],
                        dict.fromkeys(MODELS, 1)),
    # the README's 8-GPU split layout
    "8-split": layout([["policy", "reference"], ["ppo_policy", "ppo_value"]],
                      {"policy": 2, "reference": 2, "value": 1, "reward": 1, "ppo_policy": 4,
                       "ppo_value": 4}),
    "random-1": random_layout(1),
    "random-2": random_layout(2),
}  # fmt: skip


def world_size(config):
    groups = config["runtime"]["colocation"]
    grouped = {m for g in groups for m in g}
    sizes = config["models"]
    return sum(sizes[g[0]]["num_gpu"] for g in groups) + sum(
        sizes[m]["num_gpu"] for m in MODELS if m not in grouped
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process")
    result = run_job(out, {"runtime": RUNTIME}, nproc=1)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_gives_the_numbers_of_one_process(single, tmp_path, name):
    import spmd_job  # the job's Engine: the layout must compile to the plan it runs

    config = LAYOUTS[name]
    nproc = world_size(config)
    plan = spmd_job.engine.compile(ClusterSpec.cpu(nproc), load_config(config))
    assert any(i.op == "RECV" for s in plan.streams for i in s.instructions), "no transfers"
    result = run_job(tmp_path, config, nproc=nproc, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = hosted_parameters(single), hosted_parameters(tmp_path)
    assert set(got) == set(MODELS)
    for model in MODELS:
        for pname, tensor in expected[model].items():
            torch.testing.assert_close(got[model][pname], tensor, rtol=1e-5, atol=1e-6,
                                       msg=f"{model}.{pname}")  # fmt: skip
    for a, b in zip(records(single), records(tmp_path), strict=True):
        assert a["episode"] == b["episode"] and set(a["metrics"]) == set(b["metrics"])
        for key, value in a["metrics"].items():
            assert b["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# -- uneven data-parallel shares (issue 18) ------------------------------------------------
# 12 samples in micro-batches of 4: 3 micro-batches, which 2 inference ranks cannot split
# evenly; the last wave is partial and its second rank owns nothing. Trainers keep even
# shares (8 rows a step over 1 or 2 ranks of 2-row micro-batches).
UNEVEN_RUNTIME = {**RUNTIME, "sample_per_episode": 12}


def uneven(groups, sizes):
    config = layout(groups, sizes)
    config["runtime"] = {**UNEVEN_RUNTIME, "colocation": groups}
    return config


UNEVEN = {
    # everything on 2 ranks: r0 owns micro-batches 0 and 2, r1 only 1
    "2-colocated": (uneven([MODELS], dict.fromkeys(MODELS, 2)), 2),
    # policy+reference on r0-r1 send a partial last wave to r2; r3 has nothing to do
    "3-split-1-idle": (uneven([["policy", "reference"],
                               ["value", "reward", "ppo_policy", "ppo_value"]],
                              {"policy": 2, "reference": 2, "value": 1, "reward": 1,
                               "ppo_policy": 1, "ppo_value": 1}), 4),
}  # fmt: skip


@pytest.fixture(scope="module")
def single_uneven(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process-uneven")
    result = run_job(out, {"runtime": UNEVEN_RUNTIME}, nproc=1)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("name", list(UNEVEN))
def test_uneven_inference_shares_give_the_numbers_of_one_process(single_uneven, tmp_path, name):
    import spmd_job

    config, nproc = UNEVEN[name]
    plan = spmd_job.engine.compile(ClusterSpec.cpu(nproc), load_config(config))
    assert plan.waves["env"] == 2 and plan.phases["env"].width == 2  # 3 micro-batches, 2 waves
    used = {r for p in plan.placement for r in p.ranks}
    assert len(used) == world_size(config) and nproc - len(used) == (1 if "idle" in name else 0)
    result = run_job(tmp_path, config, nproc=nproc, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = hosted_parameters(single_uneven), hosted_parameters(tmp_path)
    assert set(got) == set(MODELS)
    for model in MODELS:
        for pname, tensor in expected[model].items():
            torch.testing.assert_close(got[model][pname], tensor, rtol=1e-5, atol=1e-6,
                                       msg=f"{model}.{pname}")  # fmt: skip
    for a, b in zip(records(single_uneven), records(tmp_path), strict=True):
        assert a["episode"] == b["episode"] and set(a["metrics"]) == set(b["metrics"])
        for key, value in a["metrics"].items():
            assert b["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
