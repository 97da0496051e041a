"""A trainer and its inference copy on a tiny regression task, for the backend tests.

    torchrun --standalone --nproc-per-node N tests/ds_job.py OUT_DIR CONFIG_JSON

``models.trainer.args.kind`` picks the trainer class: ``torch`` (a TorchModule, DDP) or
``deepspeed`` (a DeepSpeedModule; ZeRO stage from ``models.trainer.zero_stage``). Rank 0
writes the episode records; every rank hosting a model writes its full parameters.
"""

import json
import os
import sys
from pathlib import Path

import torch

import flowgraph
from flowgraph import DeepSpeedModule, Engine, Environment, TorchModule, Trainer


def net():
    with torch.random.fork_rng():
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


class Inference(TorchModule):
    def setup(self):
        self.model = net()

    @torch.no_grad()
    def forward_step(self, data):
        return {**data, "pred": self.model(data["x"]).squeeze(-1)}


def loss_of(model, mb):
    return ((model(mb["x"]).squeeze(-1) - mb["y"]) ** 2).mean()


class DdpTrainer(TorchModule):
    def setup(self):
        self.model = net()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)

    def train_step(self, micro_batches):
        self.optimizer.zero_grad()
        total = 0.0
        for mb in micro_batches:
            loss = loss_of(self.model, mb) / len(micro_batches)
            loss.backward()
            total += loss.item()
        self.optimizer.step()
        return {"loss": total}


class DeepSpeedTrainer(DeepSpeedModule):
    def setup(self):
        self.model = net()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)

    def train_step(self, micro_batches):
        total = 0.0
        for mb in micro_batches:
            loss = loss_of(self.engine, mb)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item() / len(micro_batches)
        return {"loss": total}


def samples():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=g)
    xs = torch.randn(64, 8, generator=g)
    return [{"x": x, "y": (x @ w).tanh()} for x in xs]


def full_parameters(module):
    params = dict(module.sync_parameters())
    if any(hasattr(p, "ds_shape") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in params.items()}
    return {k: v.detach().clone() for k, v in params.items()}


def main(out_dir, config_path):
    config = json.loads(Path(config_path).read_text())
    kind = config["models"]["trainer"]["args"]["kind"]
    trainer = (DeepSpeedTrainer if kind == "deepspeed" else DdpTrainer)("trainer")
    inference = Inference("inference")
    engine = (
        Engine(
            Environment(lambda b: inference.forward_step(b)),
            Trainer(lambda b: trainer.train_step(b)),
        )
        .set_parameter_sync(trainer, inference)
        .set_dataset(samples())
    )
    flowgraph.init(config)
    records = engine.learn()
    rank = int(os.environ.get("RANK", "0"))
    hosted = {m.name: full_parameters(m) for m in (trainer, inference) if m.model is not None}
    torch.save(hosted, Path(out_dir) / f"rank{rank}.pt")
    if rank == 0:
        (Path(out_dir) / "records.json").write_text(json.dumps([r.to_json() for r in records]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
