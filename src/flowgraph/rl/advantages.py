"""Advantage estimators without a critic besides GRPO's: RLOO and REINFORCE++.

A group is the ``num_generations`` consecutive rows sampled for one prompt (as in
``flowgraph.rl.grpo``); per-token tensors are ``[B, T]`` with a 0/1 ``mask`` of the real
response tokens.

- RLOO (REINFORCE Leave-One-Out, Ahmadian et al. 2024): a row's advantage is its reward
  minus the mean reward of the *other* rows of its group; one advantage per row, trained
  with a clipped surrogate (``GRPOTrainer``). As TRL's ``RLOOTrainer`` does, the reward may
  be KL-shaped first: ``score - kl_coef * (summed per-token KL to the reference)``.
- REINFORCE++ (Hu 2025): the PPO per-token reward (the KL penalty on every token, the score
  on the last) summed into discounted returns, no critic, and the returns normalised over
  the whole global batch. ``PolicyTrainer`` already whitens advantages over the global
  step across data-parallel ranks, so the estimator here stops at the returns.
  ``reinforce_pp_baseline`` subtracts the group's mean score first (verl's
  ``reinforce_plus_plus_baseline``, OpenRLHF's ``reinforce_baseline``).

``estimate`` picks one of ``ESTIMATORS`` (``models.reward.args.advantage``).

Example::

    >>> import torch
    >>> leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 0.5]), 3)
    tensor([ 1.0000, -0.5000, -0.5000,  0.0000,  0.0000,  0.0000])
    >>> mask = torch.tensor([[1.0, 1.0, 0.0]])
    >>> discounted_returns(torch.tensor([[1.0, 2.0, 9.0]]), mask, gamma=0.5)
    tensor([[2., 2., 0.]])
"""

from __future__ import annotations

import torch

from flowgraph.rl.grpo import check_groups, group_advantages
from flowgraph.rl.ppo import gae, token_rewards

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


def _groups(rewards: torch.Tensor, num_generations: int, what: str) -> torch.Tensor:
    check_groups(rewards, num_generations)
    if num_generations < 2:
        raise ValueError(
            f"{what} needs at least 2 answers per prompt to compare them, got "
            f"num_generations={num_generations}; raise runtime.num_inference_per_prompt"
        )
    return rewards.view(-1, num_generations)


def leave_one_out_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """RLOO: ``r_i - mean_{j != i} r_j`` within each group of ``num_generations``
    consecutive rewards ``[B]``; ``[B]`` advantages. Equal to ``k/(k-1)`` times the reward
    minus the group mean, so it is GRPO's ``scale=False`` advantage rescaled."""
    groups = _groups(rewards, num_generations, "RLOO")
    others = (groups.sum(1, keepdim=True) - groups) / (num_generations - 1)
    return (groups - others).reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` over each row's masked tokens ``[B, T]`` (0 after a
    row's last real token; rewards there are ignored): REINFORCE's return-to-go."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def reinforce_pp_returns(
    score: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    gamma: float = 1.0,
    num_generations: int | None = None,
) -> torch.Tensor:
    """REINFORCE++'s un-normalised advantages ``[B, T]``: the discounted returns of the
    per-token rewards ``-kl_coef * kl`` plus ``score`` ``[B]`` on the last real token.
    With ``num_generations`` (the baseline variant) each score first loses its group's
    mean. Normalise them over the global batch (``PolicyTrainer`` does).

    >>> kl, mask = torch.tensor([[0.5, 0.5]]), torch.ones(1, 2)
    >>> reinforce_pp_returns(torch.tensor([1.0]), kl, mask, kl_coef=0.1)  # -.05, -.05 + 1
    tensor([[0.9000, 0.9500]])
    """
    if num_generations is not None:
        groups = _groups(score, num_generations, "reinforce_pp_baseline")
        score = (groups - groups.mean(1, keepdim=True)).reshape(-1)
    return discounted_returns(token_rewards(score, kl, mask, kl_coef), mask, gamma)


def estimate(
    estimator: str,
    score: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    num_generations: int,
    values: torch.Tensor | None = None,
    kl_coef: float = 0.05,
    gamma: float = 1.0,
    lam: float = 0.95,
    scale: bool = True,
) -> dict[str, torch.Tensor]:
    """The batch keys one estimator adds: ``advantages`` (``[B, T]`` for gae and
    REINFORCE++, trained by ``PolicyTrainer``; ``[B]`` for grpo and rloo, trained by
    ``GRPOTrainer``) and, for gae, the critic's ``returns``.

    ``score`` ``[B]`` is the sequence reward; ``kl`` ``[B, T]`` the per-token KL penalty to
    the reference (zeros without one); ``values`` the critic's (gae only).

    >>> score, mask = torch.tensor([1.0, 0.0]), torch.ones(2, 2)
    >>> kl = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    >>> estimate("rloo", score, kl, mask, 2, kl_coef=0.5)["advantages"]  # 1 - 0.5*1 vs 0
    tensor([ 0.5000, -0.5000])
    """
    if estimator == "gae":
        if values is None:
            raise ValueError(
                "advantage: gae needs old_values: call a value model's forward_step in the "
                "env flow, or pick a critic-free estimator (grpo, rloo, reinforce_pp)"
            )
        rewards = token_rewards(score, kl, mask, kl_coef)
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        return {"advantages": advantages, "returns": returns}
    if estimator == "grpo":
        return {"advantages": group_advantages(score, num_generations, scale)}
    if estimator == "rloo":
        shaped = score - kl_coef * (kl * mask).sum(1)
        return {"advantages": leave_one_out_advantages(shaped, num_generations)}
    if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        groups = num_generations if estimator == "reinforce_pp_baseline" else None
        return {"advantages": reinforce_pp_returns(score, kl, mask, kl_coef, gamma, groups)}
    raise ValueError(f"unknown advantage estimator {estimator!r}; use one of {ESTIMATORS}")
