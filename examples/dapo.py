"""DAPO on the counting task: GRPO without the KL term, with a decoupled clip, a
token-level loss, an overlong penalty and dynamic sampling.

- `DAPOTrainer`: the ratio is clipped to [1 - clip, 1 + clip_high] = [0.8, 1.28]
  ("clip-higher"), and the loss is the mean over every token of the optimizer step, so a
  long answer counts by its tokens; beta 0, so the env flow needs no reference model.
- The reward model (`overlong_buffer`): an answer longer than response_length minus the
  buffer loses up to 1 (at response_length); here that means stopping after the 8 digits
  that are scored (`score_length`) instead of running on.
- Dynamic sampling (`filter_groups`): the reward model drops every group whose answers
  all scored the same (their advantages are all 0). The env draws more prompts
  (`sample_per_episode`) than the optimizer steps need, and training takes whole
  `train_global_batch_size` batches from the kept rows. `dapo_policy/kept_fraction`
  tells how much was kept.

    python examples/dapo.py                                     # examples/dapo.yaml
    python examples/dapo.py runtime.num_episode=5               # key=value overrides
    torchrun --standalone --nproc-per-node 2 examples/dapo.py   # 2 processes (SPMD)
    flowc compile examples/dapo.py --world-size 2
"""

import os
import sys

from flowgraph import Engine, Environment, Evaluator, Trainer
from flowgraph.config import init_from_argv
from flowgraph.rl.modules import DAPOTrainer, PolicyInference, RewardInference
from flowgraph.rl.tasks import digit_prompts

policy = PolicyInference("policy")
reward = RewardInference("reward")  # args: overlong_buffer, filter_groups
dapo_policy = DAPOTrainer("dapo_policy")


def env_flow(batch):
    policy_out = policy.forward_step(batch)
    reward_out = reward.forward_step(policy_out)  # the kept groups only
    return reward_out


def trainer_flow(batch):
    dapo_policy.train_step(batch)


def eval_flow(batch):
    r0 = policy.eval_step(batch)
    r1 = reward.eval_step(r0)  # the plain score: no penalty, nothing dropped
    return r1


env = Environment(env_flow)
trainer = Trainer(trainer_flow)
evaluator = Evaluator(eval_flow).set_dataset(digit_prompts(64, seed=1))
engine = (
    Engine(env, trainer, evaluator)
    .set_parameter_sync(dapo_policy, policy)
    .set_dataset(digit_prompts(8192, seed=0))
)


def main(argv):
    """Configure from dapo.yaml (or --config FILE) plus key=value overrides, then learn."""
    init_from_argv(argv, os.path.join(os.path.dirname(__file__), "dapo.yaml"))
    return engine.learn()


if __name__ == "__main__":
    main(sys.argv[1:])
