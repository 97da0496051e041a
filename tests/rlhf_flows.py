"""The seed's RLHF flows at module level, for golden text of the traced graphs.
Keep line numbers stable: the golden files quote them."""

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
