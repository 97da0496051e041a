"""GRPO without a reference model: beta 0, so no KL term and no reference forward pass.

The env flow is examples/grpo.py's without ``reference.forward_step``: one model fewer to
place, set up and run per episode (DAPO and Dr. GRPO train this way). The trainer refuses
a beta above 0 without the reference's log-probs, naming the fix.

    python examples/grpo_no_reference.py
    flowc compile examples/grpo_no_reference.py --config examples/grpo_no_reference.yaml
"""

import os
import sys

from flowgraph import Engine, Environment, Evaluator, Trainer
from flowgraph.config import init_from_argv
from flowgraph.rl.modules import GRPOTrainer, PolicyInference, RewardInference
from flowgraph.rl.tasks import digit_prompts

policy = PolicyInference("policy")
reward = RewardInference("reward")
grpo_policy = GRPOTrainer("grpo_policy")


def env_flow(batch):
    policy_out = policy.forward_step(batch)
    return reward.forward_step(policy_out)


def trainer_flow(batch):
    grpo_policy.train_step(batch)


def eval_flow(batch):
    return reward.eval_step(policy.eval_step(batch))


engine = (
    Engine(Environment(env_flow), Trainer(trainer_flow),
           Evaluator(eval_flow).set_dataset(digit_prompts(64, seed=1)))
    .set_parameter_sync(grpo_policy, policy)
    .set_dataset(digit_prompts(8192, seed=0))
)  # fmt: skip


def main(argv):
    """Configure from grpo_no_reference.yaml (or --config FILE) plus overrides, then learn."""
    init_from_argv(argv, os.path.join(os.path.dirname(__file__), "grpo_no_reference.yaml"))
    return engine.learn()


if __name__ == "__main__":
    main(sys.argv[1:])
