"""The seed's RLHF flow over the deterministic toy modules, run by the multi-process tests.

    python tests/spmd_job.py OUT_DIR CONFIG_JSON
    torchrun --standalone --nproc-per-node 4 tests/spmd_job.py OUT_DIR CONFIG_JSON

Every rank saves the parameters of the models it hosts to OUT_DIR/rank<R>.pt; rank 0
also saves the episode records to OUT_DIR/records.json.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import flowgraph  # noqa: E402
from flowgraph import Engine, Environment, Evaluator, Trainer  # noqa: E402
from seed_models import (  # noqa: E402
    PolicyInference,
    PolicyReference,
    PolicyTrainer,
    RewardInference,
    ValueInference,
    ValueTrainer,
    prompts,
)

policy = PolicyInference("policy")
value = ValueInference("value")
reference = PolicyReference("reference")
reward = RewardInference("reward")
ppo_policy = PolicyTrainer("ppo_policy")
ppo_value = ValueTrainer("ppo_value")
MODULES = [policy, value, reference, reward, ppo_policy, ppo_value]


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


engine = (
    Engine(Environment(env_flow), Trainer(trainer_flow),
           Evaluator(eval_flow).set_dataset(prompts(12, seed=1)))
    .set_parameter_sync(ppo_policy, policy)
    .set_parameter_sync(ppo_value, value)
    .set_dataset(prompts(48, seed=0))
)  # fmt: skip


def main(out_dir: str, config_path: str) -> None:
    flowgraph.init(json.loads(Path(config_path).read_text()))
    records = engine.learn()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(out_dir)
    hosted = {m.name: {k: v.detach().cpu() for k, v in m.sync_parameters()}
              for m in MODULES if m.model is not None}  # fmt: skip
    torch.save(hosted, out / f"rank{rank}.pt")
    if rank == 0:
        (out / "records.json").write_text(json.dumps([r.to_json() for r in records]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
