"""The runtime against an eager reference loop written apart from it (tests/reference.py):
one process and the reference give the same metrics and weights, episode by episode."""

import pytest
import torch

import flowgraph
import reference
import rlhf_flows
from flowgraph import Evaluator
from flowgraph.config import current_config
from seed_models import prompts

NAMES = ["policy", "reference", "value", "reward", "ppo_policy", "ppo_value"]
RUNTIME = {"num_episode": 3, "sample_per_episode": 16, "generation_batch_size": 4,
           "train_micro_batch_size": 2, "train_global_batch_size": 8,
           "num_training_epoch": 2, "eval_episode_interval": 2,
           "enable_eval_before_training": True, "log_episodes": False, "seed": 7}  # fmt: skip


def fresh():
    return {name: type(getattr(rlhf_flows, name))(name) for name in NAMES}


def engine_over(m):
    def eval_flow(batch):
        r0 = m["policy"].eval_step(batch)
        r1 = m["reward"].eval_step(r0)
        return r1

    evaluator = Evaluator(eval_flow).set_dataset(prompts(12, seed=1))
    return rlhf_flows.wire(m, evaluator).set_dataset(prompts(40, seed=0)), evaluator


@pytest.mark.parametrize(
    "models, staleness",
    [
        ({}, 0),
        ({"policy": {"sync_frequency": 2}}, 0),
        ({}, 1),
        ({"value": {"sync_frequency": 2}}, 2),
    ],
    ids=["every", "2", "stale-1", "stale-2-every-2"],
)
def test_one_process_equals_the_eager_reference(models, staleness):
    flowgraph.init({"runtime": {**RUNTIME, "max_staleness": staleness}, "models": models})
    ours = fresh()
    engine, evaluator = engine_over(ours)
    records = engine.learn()
    theirs = fresh()
    expected = reference.run(theirs, current_config(), prompts(40, seed=0), prompts(12, seed=1),
                             evaluator.post_process)  # fmt: skip
    assert [r.episode for r in records] == [0, 1, 2, 3]
    assert len(expected) == len(records)
    for want, record in zip(expected, records, strict=True):
        assert set(record.metrics) == set(want), record.episode
        for key, value in want.items():
            assert record.metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    for name in NAMES:
        for (pname, a), (_, b) in zip(ours[name].sync_parameters(), theirs[name].sync_parameters(),
                                      strict=True):  # fmt: skip
            assert torch.equal(a, b), f"{name}.{pname}"
    assert not torch.equal(ours["ppo_policy"].model.weight, ours["reference"].model.weight)
