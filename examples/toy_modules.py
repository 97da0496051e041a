"""Toy RLHF models on a continuous bandit, small enough to learn in seconds on a CPU.

Each prompt is a vector ``x``; the policy answers with a number ``action`` drawn from a
Gaussian around ``policy(x)``; the reward is ``-(action - target(x))**2`` for a hidden
linear ``target``, minus a KL penalty to the frozen reference. The policy trainer does
REINFORCE with the value model as baseline; the value trainer regresses the returns.
Every class is a plain ``TorchModule``: this is what users write for their own models.
"""

from __future__ import annotations

import torch

from flowgraph import TorchModule

DIM = 4
SIGMA = 0.5
TARGET = torch.tensor([1.0, -2.0, 0.5, 3.0])


def make_prompts(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` prompts ``{"x": tensor[DIM]}`` drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(DIM, generator=generator)} for _ in range(count)]


def linear_head(init_seed: int) -> torch.nn.Linear:
    """The network of every toy model; equal seeds give equal initial weights."""
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        return torch.nn.Linear(DIM, 1)


def gaussian_logprob(mean: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Normal(mean, SIGMA).log_prob(action)


class PolicyInference(TorchModule):
    """Samples an action around the policy's mean; eval answers with the mean itself."""

    def setup(self):
        self.model = linear_head(self.model_config.args.get("init_seed", 0))

    @torch.no_grad()
    def forward_step(self, data):
        mean = self.model(data["x"]).squeeze(-1)
        action = mean + SIGMA * torch.randn_like(mean)
        return {**data, "action": action, "logprob": gaussian_logprob(mean, action)}

    @torch.no_grad()
    def eval_step(self, data):
        return {**data, "action": self.model(data["x"]).squeeze(-1)}


class PolicyReference(TorchModule):
    """The frozen initial policy: log-probabilities of the sampled actions."""

    def setup(self):
        self.model = linear_head(self.model_config.args.get("init_seed", 0))

    @torch.no_grad()
    def forward_step(self, data):
        mean = self.model(data["x"]).squeeze(-1)
        return {**data, "ref_logprob": gaussian_logprob(mean, data["action"])}


class ValueInference(TorchModule):
    """Predicts the reward of a prompt (the baseline)."""

    def setup(self):
        self.model = linear_head(self.model_config.args.get("init_seed", 1))

    @torch.no_grad()
    def forward_step(self, data):
        return {**data, "value": self.model(data["x"]).squeeze(-1)}


class RewardInference(TorchModule):
    """Rule-based reward: closeness to the hidden target, minus a KL penalty."""

    def setup(self):
        self.kl_coef = self.model_config.args.get("kl_coef", 0.01)

    def score(self, data):
        return -((data["action"] - data["x"] @ TARGET) ** 2)

    def forward_step(self, data):
        reward = self.score(data)
        kl = data["logprob"] - data["ref_logprob"]
        returns = reward - self.kl_coef * kl
        return {
            **data,
            "reward": reward,
            "kl": kl,
            "returns": returns,
            "advantage": returns - data["value"],
        }

    def eval_step(self, data):
        return {**data, "reward": self.score(data)}


class PolicyTrainer(TorchModule):
    """REINFORCE with a learned baseline (advantages from the environment)."""

    def setup(self):
        self.model = linear_head(self.model_config.args.get("init_seed", 0))
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=self.model_config.args.get("lr", 0.05)
        )

    def train_step(self, micro_batches):
        self.optimizer.zero_grad()
        total = sum(len(mb["x"]) for mb in micro_batches)
        advantages = torch.cat([mb["advantage"] for mb in micro_batches])
        scale = advantages.std().clamp_min(1e-6)  # whitening keeps the step size sane
        loss_sum = 0.0
        for mb in micro_batches:
            mean = self.model(mb["x"]).squeeze(-1)
            logprob = gaussian_logprob(mean, mb["action"])
            loss = -(mb["advantage"] / scale * logprob).sum() / total
            loss.backward()
            loss_sum += loss.item()
        self.optimizer.step()
        reward = torch.cat([mb["reward"] for mb in micro_batches]).mean().item()
        return {"loss": loss_sum, "reward": reward}


class ValueTrainer(TorchModule):
    """Regresses the value model onto the returns."""

    def setup(self):
        self.model = linear_head(self.model_config.args.get("init_seed", 1))
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=self.model_config.args.get("lr", 0.05)
        )

    def train_step(self, micro_batches):
        self.optimizer.zero_grad()
        total = sum(len(mb["x"]) for mb in micro_batches)
        loss_sum = 0.0
        for mb in micro_batches:
            value = self.model(mb["x"]).squeeze(-1)
            loss = ((value - mb["returns"]) ** 2).sum() / total
            loss.backward()
            loss_sum += loss.item()
        self.optimizer.step()
        return {"loss": loss_sum}
