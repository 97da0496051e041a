"""DPO pieces: the log-probability of whole responses, and the preference loss.

A preference pair is a prompt with a chosen and a rejected response. DPO (Rafailov et al.,
2023) needs no reward model and no sampling: it trains the policy so that its log-ratio to
a frozen reference grows more on the chosen response than on the rejected one. With the
sequence log-probs ``pi_c, pi_r`` (policy) and ``ref_c, ref_r`` (reference) and
``h = (pi_c - ref_c) - (pi_r - ref_r)``, the losses per pair are

- ``sigmoid`` (DPO): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, where
  ``eps`` is the label smoothing of conservative DPO (the share of pairs assumed flipped);
- ``ipo`` (IPO, Azar et al., 2023): ``(h - 1 / (2 beta))^2``, on log-probs averaged over
  each response's tokens (``sequence_logprobs(..., average=True)``), as TRL does.

``beta * (pi - ref)`` is a response's implicit reward: the statistics report its mean on
the chosen and rejected responses, their margin and how often the chosen one wins.

Example::

    >>> import torch
    >>> zero = torch.zeros(2)
    >>> loss, stats = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]),
    ...                        zero, zero, beta=0.5)
    >>> round(loss.item(), 4)  # (log(1 + e^-1) + log(1 + e^0.5)) / 2
    0.6437
    >>> stats
    {'reward_chosen': -0.75, 'reward_rejected': -1.0, 'margin': 0.25, 'accuracy': 0.5}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logprobs(
    logprobs: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Each response's log-probability: the sum of its token log-probs ``[..., R]`` where
    ``mask`` is 1 (``average=True``: their mean, IPO's length normalisation).

    >>> sequence_logprobs(torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    tensor([-3.])
    """
    total = (logprobs * mask).sum(-1)
    return total / mask.sum(-1).clamp_min(1) if average else total


def check_settings(beta: float, label_smoothing: float, loss_type: str) -> tuple[str, str] | None:
    """``(setting, why)`` when ``dpo_loss`` cannot use these settings, else None.

    >>> check_settings(0.1, 0.0, "ipo") is None
    True
    >>> check_settings(0.1, 0.2, "ipo")
    ('label_smoothing', "label_smoothing applies to the sigmoid loss only, not to 'ipo'")
    """
    if loss_type not in LOSS_TYPES:
        return (
            "loss_type",
            f"loss_type {loss_type!r} is unknown; use one of {', '.join(LOSS_TYPES)}",
        )
    if not beta > 0:
        return (
            "beta",
            f"beta must be above 0 (the strength of the pull to the reference), got {beta}",
        )
    if not 0 <= label_smoothing < 0.5:
        return "label_smoothing", (
            f"label_smoothing is the share of pairs assumed mislabelled, in [0, 0.5), got "
            f"{label_smoothing}"
        )
    if label_smoothing and loss_type != "sigmoid":
        return "label_smoothing", (
            f"label_smoothing applies to the sigmoid loss only, not to {loss_type!r}"
        )
    return None


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean DPO (or IPO) loss over pairs ``[B]`` of sequence log-probs (see the module
    docstring) and its statistics: ``reward_chosen``, ``reward_rejected`` (mean implicit
    rewards), ``margin`` (their mean difference) and ``accuracy`` (the share of pairs whose
    chosen response has the larger reward; 0 while the policy equals the reference)."""
    problem = check_settings(beta, label_smoothing, loss_type)
    if problem:
        raise ValueError(f"dpo_loss: {problem[1]}")
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h)
        losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    with torch.no_grad():
        chosen = beta * (policy_chosen - ref_chosen)
        rejected = beta * (policy_rejected - ref_rejected)
        stats = {
            "reward_chosen": chosen.mean().item(),
            "reward_rejected": rejected.mean().item(),
            "margin": (chosen - rejected).mean().item(),
            "accuracy": (chosen > rejected).float().mean().item(),
        }
    return losses.mean(), stats
