"""GRPO pieces: group-relative advantages and the clipped loss with a KL term.

A group is the ``num_generations`` consecutive rows sampled for one prompt. No value model:
a response's advantage is its reward against the others of its group.

Example::

    >>> import torch
    >>> group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), num_generations=2)
    tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
"""

from __future__ import annotations

import torch

from flowgraph.rl.ppo import TIS_CAP, kl_penalty, masked_mean, off_policy_correction


def check_groups(rewards: torch.Tensor, num_generations: int) -> None:
    """Rewards ``[B]`` must form whole groups of ``num_generations`` consecutive rows."""
    if rewards.numel() % num_generations:
        raise ValueError(
            f"{rewards.numel()} rewards do not form groups of num_generations="
            f"{num_generations}; keep each prompt's samples together in one micro-batch"
        )


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """``(r - mean of its group) / (std of its group + eps)`` for rewards ``[B]`` whose
    consecutive ``num_generations`` rows are one prompt's samples (``scale=False``: no
    division, as Dr. GRPO recommends)."""
    check_groups(rewards, num_generations)
    if not rewards.numel():  # a generation call whose every group dynamic sampling dropped
        return rewards.clone()
    groups = rewards.view(-1, num_generations)
    centred = groups - groups.mean(1, keepdim=True)
    if scale:
        centred = centred / (groups.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    beta: float = 0.04,
    staleness: torch.Tensor | None = None,
    tis_cap: float = TIS_CAP,
    clip_high: float | None = None,
    loss_agg: str = "sequence",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per token: clipped surrogate with the row's advantage ``[B]`` plus ``beta`` times the
    k3 estimate of KL(policy || reference); averaged over each row's tokens, then rows
    (``loss_agg="sequence"``), or over all the tokens at once (``"token"``, DAPO's
    token-level loss: long answers weigh more). The ratio is clipped to
    ``[1 - clip, 1 + clip_high]`` (``clip_high`` None: ``clip``; DAPO's "clip-higher"
    raises it, e.g. 0.28, so unlikely tokens can gain more).
    Without a reference (``ref_logprobs`` None, which needs ``beta`` 0) there is no KL term.
    Rows with a ``staleness`` above 0 get the truncated importance weights of
    ``flowgraph.rl.ppo.off_policy_correction`` (``old_logprobs``: the behaviour policy).

    >>> lp, old = torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.25, 0.4]]))
    >>> mask, adv = torch.ones(1, 2), torch.tensor([1.0])
    >>> grpo_loss(lp, old, None, adv, mask, clip=0.2, beta=0.0)[0]  # ratios 2, 1.25 -> 1.2
    tensor(-1.2000)
    >>> grpo_loss(lp, old, None, adv, mask, clip=0.2, beta=0.0, clip_high=0.28)[0]
    tensor(-1.2650)
    """
    if ref_logprobs is None and beta:
        raise ValueError(
            f"GRPO with beta={beta} needs ref_logprobs: call reference.forward_step in the "
            "env flow, or set beta: 0 in the trainer's args to train without a reference"
        )
    proximal, weights, off_policy = off_policy_correction(
        logprobs, old_logprobs, staleness, mask, tis_cap
    )
    high = clip if clip_high is None else clip_high
    ratio = (logprobs - proximal).exp()
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + high) * adv) * weights
    if ref_logprobs is None:
        kl = torch.zeros_like(logprobs)
        per_token = -surrogate
    else:
        kl = kl_penalty(logprobs, ref_logprobs, "k3")
        per_token = -surrogate + beta * kl
    if loss_agg == "sequence":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif loss_agg == "token":
        loss = masked_mean(per_token, mask)
    else:
        raise ValueError(f"loss_agg must be 'sequence' or 'token', got {loss_agg!r}")
    with torch.no_grad():
        change = ratio - 1
        stats = {
            "kl": masked_mean(kl, mask).item(),
            "clip_frac": masked_mean(((change > high) | (change < -clip)).float(), mask).item(),
            **off_policy,
        }
    return loss, stats
