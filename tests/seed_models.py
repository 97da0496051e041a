"""Toy modules with the seed's class names; every call is recorded.

Each network is a seeded ``Linear(4, 4)``: inference copies and their trainers share the
architecture, so parameter sync works; trainers take one AdamW step per ``train_step``
(optimizer state that a checkpoint must carry).

They draw random numbers where real models do, from torch's global generator, which the
framework reseeds before every model call from the run's seed and *what* runs
(``flowgraph.runtime.rng``); they never seed it themselves. So results are deterministic
and the same on any placement, and a runtime that seeded by *where* (the rank) would give
other numbers on other layouts:

* ``forward_step`` (the env phase, "sampling") adds Gaussian noise to its output and
  drops out some of it; ``eval_step`` is greedy (no noise), like the real modules';
* ``train_step`` applies a dropout mask over the input features, drawn once per global
  step and shared by its micro-batches. Not a fresh mask per micro-batch: the runtime
  reseeds once per step, so a data-parallel rank's first micro-batch (micro-batch 2 of 4
  on rank 1) would draw what micro-batch 0 draws in one process.
"""

import os
import time

import torch

from flowgraph import TorchModule
from flowgraph.data import batch_size

DIM = 4
NOISE = 0.1  # std of the noise forward_step adds to its output
DROPOUT = 0.25  # of forward_step's outputs, and of the input features in train_step


def prompts(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(DIM, generator=generator)} for _ in range(count)]


class Recorded(TorchModule):
    """Records ``(method, batch size or list of micro-batch sizes)`` for every call."""

    output_key = "y"
    init_seed = 0

    def __init__(self, name):
        super().__init__(name)
        self.calls = []
        self.setup_count = 0

    def setup(self):
        self.setup_count += 1
        with torch.random.fork_rng():
            torch.manual_seed(self.model_config.args.get("init_seed", self.init_seed))
            self.model = torch.nn.Linear(DIM, DIM)

    def forward_step(self, data):
        self.calls.append(("forward_step", batch_size(data)))
        with torch.no_grad():
            y = self.model(data["x"])
            y = y + NOISE * torch.randn_like(y)
            y = torch.nn.functional.dropout(y, p=DROPOUT, training=True)
            return {**data, self.output_key: y}

    def eval_step(self, data):
        self.calls.append(("eval_step", batch_size(data)))
        with torch.no_grad():
            return {**data, self.output_key: self.model(data["x"])}


class PolicyInference(Recorded):
    output_key = "policy_y"


class PolicyReference(Recorded):
    output_key = "ref_y"


class ValueInference(Recorded):
    output_key = "value_y"
    init_seed = 1


class RewardInference(Recorded):
    """``models.reward.args.fail_rank: R`` makes rank R raise in forward_step (``fail:
    hang``: hang there; ``fail: setup``: raise in setup), for the failure tests."""

    def setup(self):
        args = self.model_config.args
        if args.get("fail") == "setup" and str(args.get("fail_rank")) == os.environ.get("RANK"):
            raise OSError("injected failure: checkpoint /ckpt/reward.pt not found")
        super().setup()

    output_key = "reward_y"
    init_seed = 2

    def forward_step(self, data):
        args = self.model_config.args
        if "fail_rank" in args and str(args["fail_rank"]) == os.environ.get("RANK", "0"):
            if args.get("fail") == "hang":
                time.sleep(3600)
            raise RuntimeError("injected failure in the reward model")
        out = super().forward_step(data)
        # The policy's output counts, so the trainers' targets depend on the weights that
        # generated the episode (what max_staleness changes).
        policy_y = out.get("policy_y", torch.zeros_like(out["reward_y"]))
        return {**out, "reward": out["reward_y"].sum(-1) + 0.5 * policy_y.sum(-1)}

    def eval_step(self, data):
        out = super().eval_step(data)
        return {**out, "reward": out["reward_y"].sum(-1)}


class Trained(Recorded):
    """One AdamW step per train_step towards the batch's rewards (zero when it has none),
    through a dropout mask over the input features drawn once per step."""

    def setup(self):
        super().setup()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.02)

    def train_step(self, micro_batches):
        self.calls.append(("train_step", [batch_size(mb) for mb in micro_batches]))
        self.optimizer.zero_grad()
        keep = torch.nn.functional.dropout(torch.ones(DIM), p=DROPOUT, training=True)
        total = sum(batch_size(mb) for mb in micro_batches)
        loss_sum = 0.0
        for mb in micro_batches:
            target = mb.get("reward", torch.zeros(batch_size(mb)))
            loss = ((self.model(mb["x"] * keep).sum(-1) - target) ** 2).sum() / total
            loss.backward()
            loss_sum += loss.item()
        self.optimizer.step()
        return {"loss": loss_sum}  # the mean over this step's samples


class PolicyTrainer(Trained):
    pass


class ValueTrainer(Trained):
    init_seed = 1
