"""PPO/GRPO functions against values worked out by hand, padding included."""

import math
import os

import pytest
import torch
import torch.distributed as dist

from flowgraph.rl.grpo import group_advantages, grpo_loss
from flowgraph.rl.ppo import (
    entropy,
    gae,
    global_masked_moments,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from spmd import init_gloo, spawn

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 has one padding position
# [[1, 2, 3], [4, 5, pad]] whitened: mean 3, population variance (4+1+0+1+4)/5 = 2
WHITENED = [[-2 / math.sqrt(2), -1 / math.sqrt(2), 0.0], [1 / math.sqrt(2), 2 / math.sqrt(2), 0.0]]


def test_masked_mean_and_whiten_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 1000.0]])
    assert masked_mean(x, MASK).item() == pytest.approx(3.0)  # (1+2+3+4+5)/5
    assert masked_mean(x, MASK, dim=1).tolist() == pytest.approx([2.0, 4.5])
    w = masked_whiten(x, MASK)
    torch.testing.assert_close(w, torch.tensor(WHITENED), atol=1e-5, rtol=0)


def test_global_moments_without_a_group_are_this_batch_s():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 1000.0]])
    mean, var = global_masked_moments(x, MASK)
    assert (mean.item(), var.item()) == pytest.approx((3.0, 2.0))
    # Row 0 alone, as one data-parallel shard would whiten it without its group:
    # mean 2, variance 2/3, so its values differ from the whole batch's.
    alone = masked_whiten(x[:1], MASK[:1])
    torch.testing.assert_close(alone, torch.tensor([[-(1.5**0.5), 0.0, 1.5**0.5]]))
    assert not torch.allclose(alone, torch.tensor(WHITENED[:1]), atol=0.1)


def _whiten_one_row_per_rank(rank, port, out):
    init_gloo(rank, 2, port)
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 1000.0]])[rank : rank + 1]
    mask = MASK[rank : rank + 1]
    mean, var = global_masked_moments(x, mask, dist.group.WORLD)
    whitened = masked_whiten(x, mask, group=dist.group.WORLD)
    torch.save({"moments": (mean.item(), var.item()), "whitened": whitened}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.slow
def test_whitening_over_a_group_uses_the_moments_of_every_rank(tmp_path):
    spawn(_whiten_one_row_per_rank, args=(str(tmp_path / "w"),), nprocs=2, timeout=120)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"w.{rank}", weights_only=True)
        # (1+2+3+4+5)/5 and (4+1+0+1+4)/5: the whole batch's, though each rank has a row.
        assert got["moments"] == pytest.approx((3.0, 2.0))
        torch.testing.assert_close(got["whitened"], torch.tensor(WHITENED[rank : rank + 1]))


def test_gae_by_hand_with_a_padded_row():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 7.0]])
    adv, ret = gae(rewards, values, MASK, gamma=0.9, lam=0.5)
    # row 0: d2 = 1 - .5 = .5; d1 = 0 + .9*.5 - .5 = -.05; d0 = -.05
    #        A2 = .5; A1 = -.05 + .45*.5 = .175; A0 = -.05 + .45*.175 = .02875
    # row 1 ends at t=1 (t=2 is padding: its reward 9 and value 7 are ignored):
    #        d1 = 2 - 1 = 1; A1 = 1; d0 = 0 + .9*1 - 1 = -.1; A0 = -.1 + .45*1 = .35
    torch.testing.assert_close(adv, torch.tensor([[0.02875, 0.175, 0.5], [0.35, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.52875, 0.675, 1.0], [1.35, 2.0, 0.0]]))


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "abs"), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.125, 0.5]))
    k3 = torch.tensor([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), k3)
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'; use k1, abs, k2 or k3"):
        kl_penalty(logp, ref, "k9")


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    rewards = token_rewards(torch.tensor([1.0, 2.0]), kl, MASK, kl_coef=0.5)
    expected = [[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 + 2.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor(expected))


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: min(1.5, 1.2) = 1.2; token 1: min(-0.5, -0.8) = -0.8; token 2 is padding
    assert loss.item() == pytest.approx(-(1.2 - 0.8) / 2)
    assert stats["clip_frac"] == pytest.approx(1.0)
    assert stats["approx_kl"] == pytest.approx((math.log(1.5) ** 2 + math.log(0.5) ** 2) / 4)


def test_stale_rows_are_weighted_by_the_truncated_importance_ratio():
    behaviour = torch.log(torch.tensor([[0.2, 0.4], [0.2, 0.4]]))  # the older policy drew them
    logp = torch.log(torch.tensor([[0.5, 0.3], [0.5, 0.3]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    mask = torch.ones(2, 2)
    staleness = torch.tensor([0, 2])  # row 0 fresh, row 1 two episodes old
    loss, stats = policy_loss(logp, behaviour, adv, mask, clip=0.2, staleness=staleness,
                              tis_cap=2.0)  # fmt: skip
    # fresh row: PPO against the behaviour policy, ratios 2.5 and 0.75:
    #   min(2.5, 1.2) = 1.2 and min(0.75, 0.8) = 0.75;
    # stale row: ratio to the current policy 1, weights min(2.5, 2) = 2 and 0.75.
    assert loss.item() == pytest.approx(-(1.2 + 0.75 + 2.0 + 0.75) / 4)
    loss.backward()
    # d/dlogp: fresh token 0 is clipped (no gradient), token 1 gives -0.75/4; the stale
    # tokens give -weight/4 (the weight is a constant).
    expected = torch.tensor([[0.0, -0.75 / 4], [-2.0 / 4, -0.75 / 4]])
    torch.testing.assert_close(logp.grad, expected)
    assert stats["staleness"] == pytest.approx(1.0)
    assert stats["tis_clipped"] == pytest.approx(1 / 4)  # one token of four hit the cap
    fresh, _ = policy_loss(logp, behaviour, adv, mask, clip=0.2, staleness=torch.zeros(2))
    plain, _ = policy_loss(logp, behaviour, adv, mask, clip=0.2)
    assert fresh.item() == plain.item() == pytest.approx(-(1.2 + 0.75) / 2)


def test_grpo_weights_stale_rows_too():
    behaviour = torch.log(torch.tensor([[0.1]]))
    logp = torch.log(torch.tensor([[0.5]]))
    loss, stats = grpo_loss(logp, behaviour, None, torch.tensor([-1.0]), torch.ones(1, 1),
                            beta=0.0, staleness=torch.tensor([1]), tis_cap=3.0)  # fmt: skip
    assert loss.item() == pytest.approx(3.0)  # ratio 1, weight min(5, 3), advantage -1
    assert stats["tis_clipped"] == 1.0


def test_value_loss_takes_the_worse_of_clipped_and_unclipped():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    loss = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: (1-2)^2 = 1 vs clipped 0.2: (0.2-2)^2 = 3.24; token 1: 1 vs 1
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)


def test_entropy_of_uniform_and_certain_distributions():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    assert entropy(logits, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.log(4))
    assert entropy(logits, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.3, 0.3, 0.3])  # the second group all equal
    adv = group_advantages(rewards, 3)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased std of [1, 0, 0]
    expected = [(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std, 0.0, 0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    unscaled = group_advantages(rewards, 3, scale=False)
    torch.testing.assert_close(unscaled[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    with pytest.raises(ValueError, match="6 rewards do not form groups of num_generations=4"):
        group_advantages(rewards, 4)


def test_grpo_loss_averages_tokens_per_row_then_rows():
    logp = torch.zeros(2, 2)
    ref = torch.log(torch.tensor([[1.0, 2.0], [1.0, 1.0]]))  # token (0,1): log-ratio -ln 2
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = grpo_loss(logp, logp, ref, adv, mask, clip=0.2, beta=0.1)
    k3 = math.exp(math.log(2)) - 1 - math.log(2)  # exp(-r) - 1 + r
    row0 = (-1.0 + (-1.0 + 0.1 * k3)) / 2
    row1 = 2.0
    assert loss.item() == pytest.approx((row0 + row1) / 2)
    assert stats["kl"] == pytest.approx(k3 / 3)
