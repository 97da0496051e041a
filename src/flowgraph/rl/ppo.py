"""PPO pieces over per-token tensors ``[B, T]`` with a 0/1 ``mask`` of real response tokens.

Every function ignores masked-out positions (padding after a stop token), so a batch of
ragged responses gives the numbers of the unpadded ones.

Example::

    >>> import torch
    >>> mask = torch.tensor([[1.0, 1.0, 0.0]])
    >>> masked_mean(torch.tensor([[1.0, 3.0, 100.0]]), mask)
    tensor(2.)
    >>> adv, ret = gae(torch.tensor([[0.0, 1.0, 9.0]]), torch.zeros(1, 3), mask, 1.0, 1.0)
    >>> adv
    tensor([[1., 1., 0.]])
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (over ``dim``, or all)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1)


def _all_reduce_sum(values: torch.Tensor, group: object | None) -> torch.Tensor:
    """``values`` summed over the ranks of ``group`` (unchanged without one, or with one
    rank)."""
    if group is None or dist.get_world_size(group) == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, group=group)
    return values


def global_masked_moments(
    x: torch.Tensor, mask: torch.Tensor, group: object | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of ``x`` over the masked positions of every rank of
    ``group`` together, as if their rows were one batch (``group=None``: this rank's).

    Two all-reduces of two numbers each: the masked sum with the count, then the masked
    sum of squared deviations from the global mean. The same formula as one process's
    ``masked_mean``, so one process gets exactly its former numbers.

    Example (``group=None``: one process holding every row)::

        >>> x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 6.0, 0.0]])
        >>> mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
        >>> global_masked_moments(x, mask)  # mean of 1, 2, 3, 6; variance of them
        (tensor(3.), tensor(3.5000))
    """
    x_sum = masked_sum(x, mask)
    total, count = _all_reduce_sum(torch.stack([x_sum, mask.sum().to(x_sum.dtype)]), group)
    count = count.clamp_min(1)
    mean = total / count
    var = _all_reduce_sum(masked_sum((x - mean) ** 2, mask), group) / count
    return mean, var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, group: object | None = None
) -> torch.Tensor:
    """``x`` scaled to unit variance over the masked positions (and centred unless
    ``shift_mean`` is False); masked-out positions become 0.

    With a process ``group`` (a trainer's data-parallel ranks, each holding its share of
    a global step) the moments are those of the whole step (``global_masked_moments``),
    so the result does not depend on how the rows are split over ranks."""
    mean, var = global_masked_moments(x, mask, group)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: ``(advantages, returns)``, each ``[B, T]``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    where the episode of a row ends at its last masked position (``V`` and ``A`` after it
    are 0). Returns are ``A + V``.
    """
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        next_value = torch.where(m > 0, values[:, t], next_value * 0)
        next_advantage = torch.where(m > 0, advantage, next_advantage * 0)
    return advantages, (advantages + values) * mask


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of sampled tokens:
    ``k1`` = log-ratio, ``abs`` = its absolute value, ``k2`` = half its square,
    ``k3`` = ``exp(-r) - 1 + r`` (unbiased and never negative)."""
    ratio = logprobs - ref_logprobs
    if kind == "k1":
        return ratio
    if kind == "abs":
        return ratio.abs()
    if kind == "k2":
        return 0.5 * ratio**2
    if kind == "k3":
        return torch.exp(-ratio) - 1 + ratio
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, abs, k2 or k3")


def token_rewards(
    score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """RLHF rewards ``[B, T]``: ``-kl_coef * kl`` on every token, plus the sequence's
    ``score`` ``[B]`` on its last real token."""
    rewards = -kl_coef * kl * mask
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)
    return rewards + last * score[:, None]


TIS_CAP = 2.0  # default cap of the truncated importance weight of stale samples


def off_policy_correction(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    staleness: torch.Tensor | None,
    mask: torch.Tensor,
    cap: float = TIS_CAP,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``(proximal log-probs, per-token weights, stats)`` for a clipped surrogate whose
    rows were generated by the behaviour policy ``staleness`` ``[B]`` episodes older than
    the one training (``runtime.max_staleness``, or a ``sync_frequency`` above 1).

    Fresh rows (staleness 0) keep PPO as it is: the proximal policy is the behaviour one,
    weight 1. Stale rows take the current policy as proximal (its detached log-probs, as
    TRL's and verl's truncated importance sampling do) and are weighted by the importance
    ratio ``pi / pi_behaviour`` truncated at ``cap``, so a sample that a much older policy
    drew cannot dominate the step. ``stats``: ``staleness`` (mean over rows) and
    ``tis_clipped`` (fraction of tokens whose weight hit the cap).

    >>> lp = torch.log(torch.tensor([[0.5, 0.3]]))
    >>> behaviour = torch.log(torch.tensor([[0.2, 0.3]]))
    >>> stale, mask = torch.tensor([1]), torch.ones(1, 2)
    >>> _, weights, stats = off_policy_correction(lp, behaviour, stale, mask)
    >>> weights, stats["tis_clipped"]
    (tensor([[2., 1.]]), 0.5)
    """
    ones = torch.ones_like(logprobs)
    if staleness is None or not bool((staleness > 0).any()):
        stale_rows = 0.0 if staleness is None else staleness.float().mean().item()
        return behaviour_logprobs, ones, {"staleness": stale_rows, "tis_clipped": 0.0}
    stale = (staleness > 0)[:, None].to(logprobs.device)
    current = logprobs.detach()
    ratio = (current - behaviour_logprobs).exp()
    weights = torch.where(stale, ratio.clamp(max=cap), ones)
    proximal = torch.where(stale, current, behaviour_logprobs)
    capped = (stale & (ratio > cap)).float()
    stats = {"staleness": staleness.float().mean().item(),
             "tis_clipped": masked_mean(capped, mask).item()}  # fmt: skip
    return proximal, weights, stats


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    staleness: torch.Tensor | None = None,
    tis_cap: float = TIS_CAP,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate ``-min(ratio * A, clip(ratio, 1-e, 1+e) * A)``, averaged over
    the masked tokens, and its statistics (``clip_frac``, ``approx_kl``, and those of
    ``off_policy_correction`` for rows with a ``staleness`` above 0, whose ``old_logprobs``
    are the behaviour policy's)."""
    proximal, weights, off_policy = off_policy_correction(
        logprobs, old_logprobs, staleness, mask, tis_cap
    )
    log_ratio = logprobs - proximal
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = masked_mean(-torch.min(unclipped, clipped) * weights, mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((unclipped > clipped).float(), mask).item(),
            "approx_kl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask).item(),
            **off_policy,
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_clipped - R)^2)`` over masked tokens,
    where ``V_clipped`` stays within ``clip`` of the values seen at generation time."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the token distributions ``logits`` ``[B, T, V]`` over the mask."""
    logp = logits.float().log_softmax(-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)
