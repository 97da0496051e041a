"""The seed's code blocks (../shared/seed-custom-flow.md), verbatim apart from the import
and the toy module definitions, run in one process and have the right effects."""

import torch

import flowgraph
from flowgraph import BaseModule, Engine, Environment, Evaluator, Trainer
from seed_models import (
    PolicyInference,
    PolicyReference,
    PolicyTrainer,
    RewardInference,
    ValueInference,
    ValueTrainer,
    prompts,
)

train_prompts = prompts(24, seed=0)
val_prompts = prompts(10, seed=1)

RUNTIME = {
    "num_episode": 3,
    "sample_per_episode": 12,
    "generation_batch_size": 4,
    "train_micro_batch_size": 2,
    "train_global_batch_size": 6,
    "eval_episode_interval": 2,
    "log_episodes": False,
}


# -- seed block: "Inherit Engine to implement a custom training Engine" -------------------
# fmt: off
class CustomEngine(Engine):
    def __init__(self,
                 reference: BaseModule,
                 policy_trainer: BaseModule):
        def env_flow(batch):
            ref_out = reference.forward_step(batch)
            return ref_out
        def trainer_flow(batch):
            policy_trainer.train_step(batch)
        env = Environment(env_flow)
        trainer = Trainer(trainer_flow)
        super().__init__(env, trainer)
# fmt: on


def params(module):
    return [p.detach().clone() for p in module.model.parameters()]


def test_custom_engine_user_calling_process():
    flowgraph.init({"runtime": RUNTIME})
    # fmt: off
    reference = PolicyReference("reference")
    ppo_policy = PolicyTrainer("policy_trainer")
    engine = CustomEngine(reference, ppo_policy) \
             .set_dataset(train_prompts)
    engine.learn()
    # fmt: on
    # 3 episodes x 12 samples in micro-batches of 4; 2 global steps of 3 micro-batches of 2.
    assert reference.calls == [("forward_step", 4)] * 9
    assert ppo_policy.calls == [("train_step", [2, 2, 2])] * 6
    assert reference.setup_count == ppo_policy.setup_count == 1


def test_custom_engine_with_evaluator_runs_eval_at_configured_episodes():
    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 5}})
    # fmt: off
    reference = PolicyReference("reference")
    ppo_policy = PolicyTrainer("policy_trainer")
    def eval_flow(batch):
        r0 = reference.eval_step(batch)
        return r0
    evaluator = Evaluator(eval_flow).set_dataset(val_prompts)
    engine = CustomEngine(reference, ppo_policy) \
             .set_evaluator(evaluator) \
             .set_dataset(train_prompts)
    records = engine.learn()
    # fmt: on
    evaluated = [r.episode for r in records if "eval/num_samples" in r.metrics]
    assert evaluated == [2, 4]
    # 10 validation samples in micro-batches of 4, twice.
    assert [c for c in reference.calls if c[0] == "eval_step"] == [
        ("eval_step", n) for n in [4, 4, 2] * 2
    ]
    assert records[1].metrics["eval/num_samples"] == 10


def test_engine_directly_rlhf_flow():
    flowgraph.init({"runtime": {**RUNTIME, "enable_eval_before_training": True}})
    # fmt: off
    policy = PolicyInference("policy")
    value = ValueInference("value")
    reference = PolicyReference("reference")
    reward = RewardInference("reward")
    ppo_policy = PolicyTrainer("ppo_policy")
    ppo_value = ValueTrainer("ppo_value")
    def env_flow(batch):
        policy_out = policy.forward_step(batch)
        ref_out = reference.forward_step(policy_out)
        value_out = value.forward_step(policy_out)
        reward_out = reward.forward_step(policy_out, ref_out, value_out)
        return reward_out
    def trainer_flow(batch):
        ppo_policy.train_step(batch)
        ppo_value.train_step(batch)
    def eval_flow(batch):
        r0 = policy.eval_step(batch)
        r1 = reward.eval_step(r0)
        return r1
    env = Environment(env_flow)
    trainer = Trainer(trainer_flow)
    evaluator = Evaluator(eval_flow).set_dataset(val_prompts)
    engine = Engine(env, trainer, evaluator) \
             .set_parameter_sync(ppo_policy, policy) \
             .set_parameter_sync(ppo_value, value) \
             .set_dataset(train_prompts)
    # fmt: on
    records = engine.learn()

    # Training changed the trainers, and the inference copies equal them after the sync.
    for trainer_module, inference in ((ppo_policy, policy), (ppo_value, value)):
        for p_train, p_infer in zip(params(trainer_module), params(inference), strict=True):
            assert torch.equal(p_train, p_infer)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        initial = torch.nn.Linear(4, 4)
    assert not torch.equal(ppo_policy.model.weight, initial.weight)
    # The reference is never synced: it keeps its initial weights.
    assert torch.equal(reference.model.weight, initial.weight)

    env_calls = [("forward_step", 4)] * 9
    # In order: eval before training, episodes 1 and 2, eval after episode 2 (with the
    # weights synced after its training), episode 3.
    episode, evaluation = [("forward_step", 4)] * 3, [("eval_step", n) for n in [4, 4, 2]]
    assert policy.calls == evaluation + episode * 2 + evaluation + episode
    assert reference.calls == env_calls
    assert value.calls == env_calls
    assert [c for c in reward.calls if c[0] == "forward_step"] == env_calls
    assert ppo_policy.calls == ppo_value.calls == [("train_step", [2, 2, 2])] * 6
    # Eval before training and after episode 2: 10 samples as 4 + 4 + 2, through policy and reward.
    eval_calls = [("eval_step", n) for n in [4, 4, 2]] * 2
    assert [c for c in policy.calls if c[0] == "eval_step"] == eval_calls
    assert [c for c in reward.calls if c[0] == "eval_step"] == eval_calls
    assert [r.episode for r in records] == [0, 1, 2, 3]
    assert [r.episode for r in records if "eval/reward" in r.metrics] == [0, 2]
    assert all("ppo_policy/loss" in r.metrics for r in records[1:])
    assert {"env/policy", "env/reference", "env/value", "env/reward", "train", "sync"} <= set(
        records[1].stages
    )
