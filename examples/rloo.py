"""RLOO (REINFORCE Leave-One-Out) on the counting task: no value model; each answer's
baseline is the mean reward of the other answers to its prompt.

The reward is KL-shaped per answer, as TRL's RLOOTrainer does it (the score minus
`kl_coef` times the answer's summed KL to the reference), and its leave-one-out
advantage `r_i - mean_{j != i} r_j` is trained with GRPO's clipped surrogate, without a
KL term in the loss (beta 0: the KL is in the reward already).

    python examples/rloo.py                                     # examples/rloo.yaml
    python examples/rloo.py runtime.num_episode=5               # key=value overrides
    torchrun --standalone --nproc-per-node 2 examples/rloo.py   # 2 processes (SPMD)
    flowc compile examples/rloo.py --world-size 2
"""

import os
import sys

from flowgraph import Engine, Environment, Evaluator, Trainer
from flowgraph.config import init_from_argv
from flowgraph.rl.modules import GRPOTrainer, PolicyInference, PolicyReference, RewardInference
from flowgraph.rl.tasks import digit_prompts

policy = PolicyInference("policy")
reference = PolicyReference("reference")
reward = RewardInference("reward")  # args.advantage: rloo
rloo_policy = GRPOTrainer("rloo_policy")


def env_flow(batch):
    policy_out = policy.forward_step(batch)
    ref_out = reference.forward_step(policy_out)
    reward_out = reward.forward_step(policy_out, ref_out)
    return reward_out


def trainer_flow(batch):
    rloo_policy.train_step(batch)


def eval_flow(batch):
    r0 = policy.eval_step(batch)
    r1 = reward.eval_step(r0)
    return r1


env = Environment(env_flow)
trainer = Trainer(trainer_flow)
evaluator = Evaluator(eval_flow).set_dataset(digit_prompts(64, seed=1))
engine = (
    Engine(env, trainer, evaluator)
    .set_parameter_sync(rloo_policy, policy)
    .set_dataset(digit_prompts(8192, seed=0))
)


def main(argv):
    """Configure from rloo.yaml (or --config FILE) plus key=value overrides, then learn."""
    init_from_argv(argv, os.path.join(os.path.dirname(__file__), "rloo.yaml"))
    return engine.learn()


if __name__ == "__main__":
    main(sys.argv[1:])
