"""The seed's RLHF flows (tests/rlhf_flows.py) over the toy modules of seed_models.py, run by
the multi-process tests.

    python tests/spmd_job.py OUT_DIR CONFIG_JSON
    torchrun --standalone --nproc-per-node 4 tests/spmd_job.py OUT_DIR CONFIG_JSON

Every rank saves the parameters of the models it hosts to OUT_DIR/rank<R>.pt and what
its modules ran to OUT_DIR/calls_rank<R>.json (per model: ``setup_count``, how often its
``setup()`` ran on this rank, and ``calls``, the ``[method, batch size or list of
micro-batch sizes]`` of every call); rank 0 also saves the episode records to
OUT_DIR/records.json.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import flowgraph  # noqa: E402
from flowgraph import Engine, Environment, Evaluator, Trainer  # noqa: E402
from rlhf_flows import (  # noqa: E402
    env_flow,
    eval_flow,
    policy,
    ppo_policy,
    ppo_value,
    reference,
    reward,
    trainer_flow,
    value,
)
from seed_models import prompts  # noqa: E402

MODULES = [policy, value, reference, reward, ppo_policy, ppo_value]

engine = (
    Engine(Environment(env_flow), Trainer(trainer_flow),
           Evaluator(eval_flow).set_dataset(prompts(12, seed=1)))
    .set_parameter_sync(ppo_policy, policy)
    .set_parameter_sync(ppo_value, value)
    .set_dataset(prompts(48, seed=0))
)  # fmt: skip


def main(out_dir: str, config_path: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    # The mismatch test gives rank 1 an override the others do not get.
    odd = os.environ.get("FLOWGRAPH_TEST_RANK1_OVERRIDE")
    overrides = [odd] if odd and rank == 1 else []
    if os.environ.get("FLOWGRAPH_TEST_RANK1_DATA") and rank == 1:  # other prompts on rank 1
        engine.set_dataset(prompts(48, seed=1))
    flowgraph.init(json.loads(Path(config_path).read_text()), overrides)
    records = engine.learn()
    out = Path(out_dir)
    hosted = {m.name: {k: v.detach().cpu() for k, v in m.sync_parameters()}
              for m in MODULES if m.model is not None}  # fmt: skip
    torch.save(hosted, out / f"rank{rank}.pt")
    ran = {m.name: {"setup_count": m.setup_count, "calls": m.calls} for m in MODULES}
    (out / f"calls_rank{rank}.json").write_text(json.dumps(ran))
    if rank == 0:
        (out / "records.json").write_text(json.dumps([r.to_json() for r in records]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
