"""REINFORCE++ on the counting task: PPO's per-token rewards and clipped surrogate, but no
value model: the advantage of a token is its discounted return, normalised over the
whole global batch.

The reward model puts the KL penalty to the reference on every token and the score on
the last one and sums them into returns (`advantage: reinforce_pp`; `gamma` 1);
`PolicyTrainer` whitens those over the optimizer step, on every data-parallel rank with
the moments of them all: REINFORCE++'s global normalisation. The variant
`reinforce_pp_baseline` subtracts each prompt's mean score first.

    python examples/reinforce_pp.py                                     # reinforce_pp.yaml
    python examples/reinforce_pp.py models.reward.args.advantage=reinforce_pp_baseline
    torchrun --standalone --nproc-per-node 2 examples/reinforce_pp.py   # 2 processes
    flowc compile examples/reinforce_pp.py --world-size 2
"""

import os
import sys

from flowgraph import Engine, Environment, Evaluator, Trainer
from flowgraph.config import init_from_argv
from flowgraph.rl.modules import PolicyInference, PolicyReference, PolicyTrainer, RewardInference
from flowgraph.rl.tasks import digit_prompts

policy = PolicyInference("policy")
reference = PolicyReference("reference")
reward = RewardInference("reward")  # args.advantage: reinforce_pp
reinforce_policy = PolicyTrainer("reinforce_policy")


def env_flow(batch):
    policy_out = policy.forward_step(batch)
    ref_out = reference.forward_step(policy_out)
    reward_out = reward.forward_step(policy_out, ref_out)
    return reward_out


def trainer_flow(batch):
    reinforce_policy.train_step(batch)


def eval_flow(batch):
    r0 = policy.eval_step(batch)
    r1 = reward.eval_step(r0)
    return r1


env = Environment(env_flow)
trainer = Trainer(trainer_flow)
evaluator = Evaluator(eval_flow).set_dataset(digit_prompts(64, seed=1))
engine = (
    Engine(env, trainer, evaluator)
    .set_parameter_sync(reinforce_policy, policy)
    .set_dataset(digit_prompts(8192, seed=0))
)


def main(argv):
    """Configure from reinforce_pp.yaml (or --config FILE) plus overrides, then learn."""
    init_from_argv(argv, os.path.join(os.path.dirname(__file__), "reinforce_pp.yaml"))
    return engine.learn()


if __name__ == "__main__":
    main(sys.argv[1:])
