"""The seed's RLHF wiring over identity models (each returns its input unchanged),
for measuring what the framework itself costs."""

from __future__ import annotations

import torch

from flowgraph import BaseModule, Engine, Environment, Evaluator, Trainer


class Identity(BaseModule):
    """Returns its input: all the time an episode takes is framework time."""

    def forward_step(self, data):
        return data

    def train_step(self, micro_batches):
        return None


def make_modules() -> dict[str, Identity]:
    names = ["policy", "value", "reference", "reward", "ppo_policy", "ppo_value"]
    return {name: Identity(name) for name in names}


def build_engine(m: dict[str, Identity]) -> Engine:
    """Trace and wire the seed's three flows (what `Engine(...)` costs a user)."""

    def env_flow(batch):
        policy_out = m["policy"].forward_step(batch)
        ref_out = m["reference"].forward_step(policy_out)
        value_out = m["value"].forward_step(policy_out)
        reward_out = m["reward"].forward_step(policy_out, ref_out, value_out)
        return reward_out

    def trainer_flow(batch):
        m["ppo_policy"].train_step(batch)
        m["ppo_value"].train_step(batch)

    def eval_flow(batch):
        r0 = m["policy"].eval_step(batch)
        r1 = m["reward"].eval_step(r0)
        return r1

    return Engine(Environment(env_flow), Trainer(trainer_flow), Evaluator(eval_flow))


def prompts(count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"prompt_ids": torch.randint(0, 100, (16,), generator=generator), "id": i}
        for i in range(count)
    ]
