"""The seed's `CustomEngine` subclass: an env with one model, a trainer with one model.

Here the "reference" is a teacher that writes the correct answer of the counting task
for every prompt, and "policy_trainer" learns it by supervised fine-tuning (distillation):
the short warm-up some RL recipes run before PPO. At the end the script scores the
student's greedy answers on new prompts.

    python examples/custom_engine.py
    torchrun --standalone --nproc-per-node 2 examples/custom_engine.py
"""

import os
import sys

import torch

from flowgraph import BaseModule, Engine, Environment, Trainer
from flowgraph.config import init_from_argv
from flowgraph.rl.modules import GPTModule, SFTTrainer
from flowgraph.rl.sampling import generate, left_pad
from flowgraph.rl.tasks import count_up, digit_prompts
from flowgraph.rl.tokenizer import DIGITS


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


class CountingTeacher(GPTModule):
    """Answers every prompt correctly: the digits counting up from its last digit."""

    def setup(self):
        pass  # a rule, no network

    def forward_step(self, data):
        runtime = self.runtime_config
        answers = [
            "".join(DIGITS[(int(p[-1]) + 1 + i) % 10] for i in range(runtime.response_length))
            for p in data["prompt"]
        ]
        ids, mask = self.tokenizer.batch(data["prompt"], side="left")
        ids, mask = left_pad(ids, mask, self.tokenizer.pad_id, runtime.prompt_length)
        answer_ids, answer_mask = self.tokenizer.batch(answers)
        return {
            **data,
            "sequences": torch.cat([ids, answer_ids], 1),
            "attention_mask": torch.cat([mask, answer_mask], 1),
            "response_mask": answer_mask.float(),
        }


reference = CountingTeacher("reference")
ppo_policy = SFTTrainer("policy_trainer")
train_prompts = digit_prompts(4096, seed=0)
engine = CustomEngine(reference, ppo_policy) \
         .set_dataset(train_prompts)  # fmt: skip


def student_score(student, prompts):
    """Mean count_up reward of the student's greedy answers to ``prompts``."""
    runtime = student.runtime_config
    ids, mask = student.tokenizer.batch(prompts, side="left")
    network = getattr(student.model, "module", student.model)  # DDP keeps it in .module
    out = generate(
        network,
        ids,
        mask,
        runtime.response_length,
        temperature=0.0,
        stop_tokens=[student.tokenizer.eos_id],
        prompt_width=runtime.prompt_length,
    )
    answers = [student.tokenizer.decode(row) for row in out.responses]
    return sum(
        count_up(p, a, runtime.response_length) for p, a in zip(prompts, answers, strict=True)
    ) / len(prompts)


def main(argv):
    """Configure from custom_engine.yaml plus key=value overrides, learn, score the student."""
    init_from_argv(argv, os.path.join(os.path.dirname(__file__), "custom_engine.yaml"))
    records = engine.learn()
    if ppo_policy.model is not None and int(os.environ.get("RANK", "0")) == 0:
        score = student_score(ppo_policy, digit_prompts(64, seed=1))
        print(f"student's greedy count_up reward on 64 new prompts: {score:.3f}")
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
