"""DPO on the counting task, offline: training reads a preference file (one JSON line per
prompt, with a `chosen` answer that counts up correctly and a `rejected` one that goes
wrong) and samples nothing. The env flow only adds the frozen reference's log-probs to
every pair; the trainer raises the policy's preference for the chosen answers.

Every `eval_episode_interval` episodes the trained weights go to `policy`, an inference
copy used only by the eval flow, whose greedy answers to held-out prompts `reward`
scores with `count_up`. The script writes the task's preference files into the log
directory; `runtime.data_path` / `runtime.eval_data_path` train and evaluate on yours
(rows with `prompt`, `chosen` and `rejected` text; the eval's reward is the counting
task's rule, so give your data an eval flow of its own).

    python examples/dpo.py
    python examples/dpo.py runtime.data_path=prefs.jsonl runtime.eval_data_path=held_out.jsonl
    torchrun --standalone --nproc-per-node 2 examples/dpo.py
    flowc compile examples/dpo.py --world-size 4 --config examples/dpo.yaml
"""

import os
import sys
from pathlib import Path

from flowgraph import Engine, Environment, Evaluator, Trainer
from flowgraph.config import init_from_argv
from flowgraph.rl.modules import PolicyInference, RewardInference
from flowgraph.rl.preference import DPOReference, DPOTrainer
from flowgraph.rl.tasks import count_up_preferences, write_jsonl

reference = DPOReference("reference")
dpo_policy = DPOTrainer("dpo_policy")
policy = PolicyInference("policy")
reward = RewardInference("reward")


def env_flow(batch):
    ref_out = reference.forward_step(batch)
    return ref_out


def trainer_flow(batch):
    dpo_policy.train_step(batch)


def eval_flow(batch):
    answers = policy.eval_step(batch)
    scored = reward.eval_step(answers)
    return scored


env = Environment(env_flow)
trainer = Trainer(trainer_flow)
evaluator = Evaluator(eval_flow)
engine = Engine(env, trainer, evaluator).set_parameter_sync(dpo_policy, policy)


def preference_file(folder: Path, split: str, count: int, seed: int, length: int) -> Path:
    """A file of ``count`` preference pairs of the counting task with answers of
    ``length`` characters in ``folder``, written when missing (its name says what it
    holds, so a run with other settings writes its own)."""
    path = folder / f"preferences-{split}-{count}x{length}-seed{seed}.jsonl"
    if not path.exists():
        write_jsonl(count_up_preferences(count, seed=seed, length=length), path)
    return path


def main(argv):
    """Configure from dpo.yaml (or --config FILE) plus key=value overrides, write the
    preference files unless the configuration names its own, then learn."""
    runtime = init_from_argv(argv, os.path.join(os.path.dirname(__file__), "dpo.yaml")).runtime
    folder = Path(runtime.log_dir or "runs/dpo")
    length = runtime.response_length
    if not runtime.data_path:
        engine.set_dataset(preference_file(folder, "train", 2048, 0, length))
    if not runtime.eval_data_path:
        evaluator.set_dataset(preference_file(folder, "eval", 64, 1, length))
    return engine.learn()


if __name__ == "__main__":
    main(sys.argv[1:])
