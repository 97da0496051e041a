"""The seed's RLHF flow, exactly as written, on the toy bandit models.

Run it (`make demo` runs the first line):

    python examples/rlhf_toy.py                                  # defaults below
    python examples/rlhf_toy.py runtime.num_episode=5            # key=value overrides
    python examples/rlhf_toy.py --config examples/rlhf_toy.yaml  # a YAML config
    torchrun --standalone --nproc-per-node 2 examples/rlhf_toy.py  # 2 processes (SPMD)
    flowc trace examples/rlhf_toy.py                             # the traced graphs
    flowc compile examples/rlhf_toy.py --world-size 8            # the plan on 8 GPUs
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from toy_modules import (  # noqa: E402
    PolicyInference,
    PolicyReference,
    PolicyTrainer,
    RewardInference,
    ValueInference,
    ValueTrainer,
    make_prompts,
)

from flowgraph import Engine, Environment, Evaluator, Trainer  # noqa: E402
from flowgraph.config import init_from_argv  # noqa: E402

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


train_prompts = make_prompts(512, seed=0)
val_prompts = make_prompts(64, seed=1)

# fmt: off
env = Environment(env_flow)
trainer = Trainer(trainer_flow)
evaluator = Evaluator(eval_flow).set_dataset(val_prompts)
engine = Engine(env, trainer, evaluator) \
         .set_parameter_sync(ppo_policy, policy) \
         .set_parameter_sync(ppo_value, value) \
         .set_dataset(train_prompts)
# fmt: on


def main(argv):
    """Configure from rlhf_toy.yaml (or --config FILE) plus key=value overrides, then learn."""
    init_from_argv(argv, os.path.join(os.path.dirname(__file__), "rlhf_toy.yaml"))
    return engine.learn()


if __name__ == "__main__":
    main(sys.argv[1:])
