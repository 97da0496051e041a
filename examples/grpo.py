"""GRPO on the counting task: no value model, advantages relative to each prompt's group.

Every prompt is answered `num_generations` times; an answer's advantage is its reward
against the others of its group, and the loss keeps the policy near the reference with a
KL term. `examples/grpo_bench.yaml` is the standard comparison configuration.

    python examples/grpo.py                                     # examples/grpo.yaml
    python examples/grpo.py --config examples/grpo_bench.yaml   # the benchmark setting
    torchrun --standalone --nproc-per-node 2 examples/grpo.py   # 2 processes (SPMD)
    flowc compile examples/grpo.py --world-size 8
"""

import os
import sys

from flowgraph import Engine, Environment, Evaluator, Trainer
from flowgraph.config import init_from_argv
from flowgraph.rl.modules import GRPOTrainer, PolicyInference, PolicyReference, RewardInference
from flowgraph.rl.tasks import digit_prompts

policy = PolicyInference("policy")
reference = PolicyReference("reference")
reward = RewardInference("reward")
grpo_policy = GRPOTrainer("grpo_policy")


def env_flow(batch):
    policy_out = policy.forward_step(batch)
    ref_out = reference.forward_step(policy_out)
    reward_out = reward.forward_step(policy_out, ref_out)
    return reward_out


def trainer_flow(batch):
    grpo_policy.train_step(batch)


def eval_flow(batch):
    r0 = policy.eval_step(batch)
    r1 = reward.eval_step(r0)
    return r1


env = Environment(env_flow)
trainer = Trainer(trainer_flow)
evaluator = Evaluator(eval_flow).set_dataset(digit_prompts(64, seed=1))
engine = (
    Engine(env, trainer, evaluator)
    .set_parameter_sync(grpo_policy, policy)
    .set_dataset(digit_prompts(8192, seed=0))
)


def main(argv):
    """Configure from grpo.yaml (or --config FILE) plus key=value overrides, then learn."""
    init_from_argv(argv, os.path.join(os.path.dirname(__file__), "grpo.yaml"))
    return engine.learn()


if __name__ == "__main__":
    main(sys.argv[1:])
