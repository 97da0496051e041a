"""Single-process learn(): the episode loop's semantics, one behaviour per test."""

import json
import logging

import pytest
import torch

import flowgraph
import rlhf_flows
from flowgraph import Engine, Environment, Evaluator, Trainer
from flowgraph.data import collate
from seed_models import PolicyInference, PolicyTrainer, ValueTrainer, prompts

RUNTIME = {
    "num_episode": 2,
    "sample_per_episode": 8,
    "generation_batch_size": 4,
    "train_micro_batch_size": 2,
    "train_global_batch_size": 4,
    "log_episodes": False,
}


def rlhf_engine(make_evaluator=None):
    """A fresh copy of the seed's RLHF wiring with new module objects;
    ``make_evaluator(modules)`` may build an Evaluator over them."""
    names = ["policy", "reference", "value", "reward", "ppo_policy", "ppo_value"]
    m = {name: type(getattr(rlhf_flows, name))(name) for name in names}
    engine = rlhf_flows.wire(m, make_evaluator and make_evaluator(m))
    return engine.set_dataset(prompts(16, seed=0)), m


def weights(module):
    return [p.detach().clone() for p in module.model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("episodes", "synced"), [(1, False), (2, True), (3, False)])
def test_sync_frequency(episodes, synced):
    flowgraph.init(
        {
            "runtime": {**RUNTIME, "num_episode": episodes},
            "models": {"policy": {"sync_frequency": 2}},
        }
    )
    engine, m = rlhf_engine()
    engine.learn()
    assert same(weights(m["ppo_policy"]), weights(m["policy"])) is synced
    assert same(weights(m["ppo_value"]), weights(m["value"]))  # frequency 1: always synced


def test_model_generation_batch_size_chunks_its_calls():
    flowgraph.init({"runtime": RUNTIME, "models": {"reward": {"generation_batch_size": 3}}})
    engine, m = rlhf_engine()
    engine.learn()
    assert m["policy"].calls == [("forward_step", 4)] * 4
    assert m["reward"].calls == [("forward_step", 3), ("forward_step", 1)] * 4


def test_num_training_epoch_repeats_the_passes():
    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 1, "num_training_epoch": 3}})
    engine, m = rlhf_engine()
    engine.learn()
    assert m["ppo_policy"].calls == [("train_step", [2, 2])] * 6  # 3 epochs x 2 steps


def test_same_seed_same_weights_and_other_seed_differs():
    def final_weights(seed):
        flowgraph.init({"runtime": {**RUNTIME, "seed": seed}})
        engine, m = rlhf_engine()
        engine.learn()
        return weights(m["ppo_policy"])

    assert same(final_weights(5), final_weights(5))
    assert not same(final_weights(5), final_weights(6))


def test_trainable_flags():
    flowgraph.init({"runtime": RUNTIME, "models": {"reward": {"trainable": True}}})
    engine, m = rlhf_engine()
    engine.learn()
    assert {n for n, mod in m.items() if mod.trainable} == {"ppo_policy", "ppo_value", "reward"}


def test_trainer_only_engine_trains_on_the_dataset_itself():
    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 1}})
    sft = PolicyTrainer("sft")
    Engine(trainer=Trainer(lambda batch: sft.train_step(batch))).set_dataset(
        prompts(8, seed=0)
    ).learn()
    assert sft.calls == [("train_step", [2, 2])] * 2


def test_environment_only_engine_runs_inference():
    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 1}})
    policy = PolicyInference("policy")
    records = (
        Engine(Environment(lambda b: policy.forward_step(b)))
        .set_dataset(prompts(8, seed=0))
        .learn()
    )
    assert policy.calls == [("forward_step", 4)] * 2
    assert "train" not in records[0].stages


def test_episode_line_and_metrics_file(tmp_path, capsys):
    flowgraph.init({"runtime": {**RUNTIME, "log_episodes": True, "log_dir": str(tmp_path)}})
    engine, _ = rlhf_engine()
    engine.learn()
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["episode 1/2", "episode 2/2"]
    assert "env " in lines[0] and "(policy " in lines[0] and "reward " in lines[0]
    assert "train " in lines[0] and "sync " in lines[0] and "ppo_value/loss" in lines[0]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in records] == [1, 2]
    assert records[0]["samples"] == 8
    assert set(records[0]["stages"]) >= {"env", "env/policy", "train", "train/ppo_policy", "sync"}
    assert "ppo_policy/loss" in records[0]["metrics"]


def test_train_metrics_are_means_over_steps():
    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 1}})
    losses = []

    class Counting(ValueTrainer):
        def train_step(self, micro_batches):
            super().train_step(micro_batches)
            losses.append(float(len(losses)))
            return {"step": torch.tensor(losses[-1])}  # a one-element tensor: converted

    counting = Counting("counting")
    records = (
        Engine(trainer=Trainer(lambda b: counting.train_step(b)))
        .set_dataset(prompts(8, seed=0))
        .learn()
    )
    assert records[0].metrics == {"counting/step": 0.5}  # mean of steps 0 and 1


def test_evaluator_post_process_override_and_argument():
    flowgraph.init({"runtime": {**RUNTIME, "eval_episode_interval": 1}})
    seen = []

    class MyEvaluator(Evaluator):
        def post_process(self, results):
            seen.append([len(r["x"]) for r in results])
            return {"batches": len(results)}

    engine, _ = rlhf_engine(
        lambda m: MyEvaluator(lambda b: m["reward"].eval_step(b)).set_dataset(prompts(6, seed=1))
    )
    records = engine.learn()
    assert seen == [[4, 2], [4, 2]]
    assert [r.metrics["eval/batches"] for r in records] == [2, 2]

    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 1, "eval_episode_interval": 1}})
    engine, _ = rlhf_engine(
        lambda m: Evaluator(
            lambda b: m["reward"].eval_step(b), post_process=lambda rs: {"n": len(rs)}
        ).set_dataset(prompts(6, seed=1))
    )
    assert engine.learn()[0].metrics["eval/n"] == 2


def eval_reward(m):
    return Evaluator(lambda b: m["reward"].eval_step(b)).set_dataset(prompts(6, seed=1))


def test_default_post_process_means_per_sample_floats():
    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 1, "eval_episode_interval": 1}})
    engine, m = rlhf_engine(eval_reward)
    metrics = engine.learn()[0].metrics
    reward = m["reward"]
    expected = reward.eval_step(collate(prompts(6, seed=1)))
    assert metrics["eval/num_samples"] == 6
    assert metrics["eval/reward"] == pytest.approx(float(expected["reward"].mean()))
    assert "eval/x" not in metrics  # 2-D values are not per-sample scalars


def test_evaluator_that_never_runs_is_reported(caplog):
    flowgraph.init({"runtime": RUNTIME})
    engine, m = rlhf_engine(eval_reward)
    engine.learn()
    assert "runtime.eval_episode_interval is 0, so it never runs" in caplog.text
    assert [c for c in m["reward"].calls if c[0] == "eval_step"] == []


def test_modules_read_their_config_section():
    # sync_frequency 100: the only sync of ppo_policy -> policy is the one before episode 1.
    models = {"ppo_policy": {"args": {"init_seed": 9}}, "policy": {"sync_frequency": 100}}
    flowgraph.init({"runtime": RUNTIME, "models": models})
    engine, m = rlhf_engine()
    engine.learn()
    assert m["ppo_policy"].model_config.args == {"init_seed": 9}
    assert m["ppo_policy"].runtime_config.sample_per_episode == 8
    with torch.random.fork_rng():
        torch.manual_seed(9)
        seeded = torch.nn.Linear(4, 4)
    # The policy (built with seed 0) holds ppo_policy's seed-9 initial weights: the
    # trainer read its section, and the initial sync copied them before any training.
    assert same(weights(m["policy"]), [seeded.weight, seeded.bias])
    assert not same(weights(m["ppo_policy"]), [seeded.weight, seeded.bias])  # it trained
    assert not same(weights(m["reference"]), [seeded.weight, seeded.bias])  # never synced


def test_two_engines_with_the_same_module_names_in_one_process():
    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 1}})
    first, m1 = rlhf_engine()
    second, m2 = rlhf_engine()
    first.learn()
    second.learn()
    assert same(weights(m1["ppo_policy"]), weights(m2["ppo_policy"]))


def test_deepspeed_backend_needs_a_deepspeed_module():
    flowgraph.init({"runtime": RUNTIME, "models": {"ppo_policy": {"backend": "deepspeed"}}})
    engine, _ = rlhf_engine()
    with pytest.raises(flowgraph.ConfigError, match="models.ppo_policy.backend: deepspeed needs a "
                       "DeepSpeedModule, but PolicyTrainer is a Trained"):  # fmt: skip
        engine.learn()


def test_default_settings_log_no_warning(caplog, recwarn):
    flowgraph.init(flowgraph.Config())
    engine, m = rlhf_engine()
    with caplog.at_level(logging.WARNING):
        records = engine.learn()
    assert [r.episode for r in records] == [1] and m["ppo_policy"].calls  # it did run
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    ours = [w for w in recwarn if "flowgraph" in w.filename]
    assert [str(w.message) for w in ours] == []
