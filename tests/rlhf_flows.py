"""The seed's RLHF flows at module level, for golden text of the traced graphs.
Keep line numbers stable: the golden files quote them (add new code at the end)."""

from seed_models import (
    PolicyInference,
    PolicyReference,
    PolicyTrainer,
    RewardInference,
    ValueInference,
    ValueTrainer,
)

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


def plain_python_flow(batch):
    """Docstrings, prints, helpers and len() of plain values just run while tracing."""
    names = ["policy", "reward"]
    print(f"tracing with {len(names)} models, batch is {batch}")
    out = policy.forward_step(batch)
    for _ in range(len(names) - 1):
        out = reward.forward_step(out)
    policy.forward_step(out)  # result unused: still recorded
    return out


def wire(m, evaluator=None):
    """The seed's RLHF Engine over a dict of fresh modules ``m`` (keyed by the seed's
    names), for tests that need several independent copies."""
    from flowgraph import Engine, Environment, Trainer  # here: keep the lines above stable

    def env_flow(batch):
        policy_out = m["policy"].forward_step(batch)
        ref_out = m["reference"].forward_step(policy_out)
        value_out = m["value"].forward_step(policy_out)
        return m["reward"].forward_step(policy_out, ref_out, value_out)

    def trainer_flow(batch):
        m["ppo_policy"].train_step(batch)
        m["ppo_value"].train_step(batch)

    return (
        Engine(Environment(env_flow), Trainer(trainer_flow), evaluator)
        .set_parameter_sync(m["ppo_policy"], m["policy"])
        .set_parameter_sync(m["ppo_value"], m["value"])
    )
