"""DAPO pieces (Yu et al. 2025, "DAPO: an open-source LLM reinforcement learning system at
scale") beyond GRPO's: the overlong penalty, dynamic sampling's group filter and the
token-level loss weights. The decoupled clip (``clip_high`` above ``clip``) is an option
of ``flowgraph.rl.grpo.grpo_loss``.

- Overlong penalty (soft punishment): a response of at most ``max_length - buffer``
  tokens costs nothing; from there the penalty falls linearly to ``-factor`` at
  ``max_length`` (``runtime.response_length``). The length counts the stop token.
- Dynamic sampling: a group whose answers all scored the same (all right, all wrong) has
  zero advantage everywhere and teaches nothing; the reward step drops it (on the task's
  score, before the overlong penalty, as DAPO filters on accuracy), and the env
  over-samples prompts so that the kept rows still fill the optimizer steps
  (``examples/dapo.yaml``).
- Token-level loss: every token of the global step weighs the same, however long its
  response and whichever micro-batch or data-parallel rank holds it.

Example::

    >>> import torch
    >>> overlong_penalty(torch.tensor([5, 6, 7, 8]), max_length=8, buffer=2)
    tensor([ 0.0000,  0.0000, -0.5000, -1.0000])
    >>> varied_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), group_size=2)
    tensor([False, False,  True,  True])
    >>> token_weights([torch.ones(2, 3), torch.tensor([[1.0, 0.0, 0.0]])])
    [0.8571428571428571, 0.14285714285714285]
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flowgraph.rl.ppo import _all_reduce_sum


def overlong_penalty(
    lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment of responses of ``lengths`` tokens ``[B]``: 0 up to
    ``max_length - buffer``, then ``-factor * (length - (max_length - buffer)) / buffer``
    down to ``-factor`` at ``max_length`` (and no lower). ``buffer`` 0: no penalty."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    excess = (lengths.float() - (max_length - buffer)).clamp(0, buffer)
    return 0.0 - factor * excess / buffer  # 0 - x, not -x: no penalty is 0.0, never -0.0


def varied_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool ``[B]``: the rows whose group of ``group_size`` consecutive ``scores`` holds
    at least two different values (dynamic sampling keeps these). A group of one row is
    kept: there is nothing to compare it with."""
    if scores.numel() % group_size:
        raise ValueError(
            f"{scores.numel()} scores do not form groups of num_inference_per_prompt="
            f"{group_size}; keep each prompt's answers together in one generation call"
        )
    groups = scores.view(-1, group_size)
    varied = (groups.amax(1) > groups.amin(1)) | (group_size == 1)
    return varied.repeat_interleave(group_size)


def token_weights(masks: list[torch.Tensor], group: object | None = None) -> list[float]:
    """Gradient-accumulation weights of micro-batches whose losses are token means: each
    micro-batch's share of the real tokens (``masks``: their response masks) of the whole
    global step, summed over the data-parallel ``group`` too. Data parallelism averages
    gradients over the ranks, so a rank's weights are multiplied by their number; the
    step's gradient is then that of the mean over all its tokens."""
    sums = torch.stack([mask.sum().double() for mask in masks])  # on the masks' device
    total = float(_all_reduce_sum(sums.sum(), group))
    counts = sums.tolist()
    ranks = 1 if group is None else dist.get_world_size(group)
    return [count * ranks / max(total, 1.0) for count in counts]
