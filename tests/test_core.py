"""The DiffusionNFT math, checked against hand computations, with no model."""

import math

import pytest
import torch

from trl_nft import core


def test_combine_rewards_is_weighted_sum_ignoring_missing():
    rewards = torch.tensor([[1.0, 2.0], [float("nan"), 3.0], [float("nan"), float("nan")]])
    out = core.combine_rewards(rewards, [0.5, 2.0])
    assert out[0].item() == pytest.approx(0.5 * 1 + 2 * 2)
    assert out[1].item() == pytest.approx(6.0)
    assert math.isnan(out[2].item())


def test_normalize_then_sum_normalises_each_reward_within_its_group():
    nan = float("nan")
    # reward 0 spreads by 100 in group 0, reward 1 by 0.01: each counts equally after per-group normalisation
    rewards = torch.tensor([[0.0, 0.00], [100.0, 0.01], [5.0, 1.0], [5.0, nan], [nan, nan], [7.0, 3.0]])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    out = core.combine_rewards(rewards, [1.0, 2.0], group_ids=groups, aggregation="normalize_then_sum")
    eps = 1e-4
    z0 = 50.0 / (50.0 + eps)  # (x - mean) / (std + eps) with population std 50 for reward 0 in group 0
    z1 = 0.005 / (0.005 + eps)
    assert out[0].item() == pytest.approx(-z0 - 2 * z1, rel=1e-5)
    assert out[1].item() == pytest.approx(z0 + 2 * z1, rel=1e-5)
    # group 1: reward 0 has no spread (0 after centring); reward 1 has one score (0), the None contributes 0
    assert out[2].item() == pytest.approx(0.0, abs=1e-6) and out[3].item() == pytest.approx(0.0, abs=1e-6)
    # a row with no score stays NaN; a lone score in a group normalises to 0
    assert math.isnan(out[4].item()) and out[5].item() == pytest.approx(0.0, abs=1e-6)
    # the official order is a weighted sum of the raw scores, whatever the groups
    torch.testing.assert_close(
        core.combine_rewards(rewards, [1.0, 2.0], group_ids=groups),
        core.combine_rewards(rewards, [1.0, 2.0]),
        equal_nan=True,
    )
    with pytest.raises(ValueError, match="group_ids"):
        core.combine_rewards(rewards, [1.0, 2.0], aggregation="normalize_then_sum")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        core.combine_rewards(rewards, [1.0, 2.0], group_ids=groups, aggregation="mean")


def test_dead_reward_is_never_reported_as_healthy():
    nan = float("nan")
    groups = torch.tensor([0, 0, 1, 1])
    # every score of group 1 is missing: that group carries no signal and must count as zero-std
    _, stats = core.compute_advantages(torch.tensor([0.0, 1.0, nan, nan]), groups)
    assert stats.frac_zero_std == 0.5
    _, stats = core.compute_advantages(torch.full((4,), nan), groups)
    assert stats.frac_zero_std == 1.0
    per_reward = torch.tensor([[0.0, nan, 1.0], [1.0, nan, 1.0], [2.0, nan, 3.0], [5.0, 4.0, 3.0]])
    assert core.frac_zero_std_per_column(per_reward, groups) == [0.0, 1.0, 1.0]


def test_within_group_diversity_known_answers():
    features = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [0.5, 0.5], [3.0, 3.0]])
    groups = torch.tensor([0, 0, 1, 1, 2])
    # group 0: one pair at RMS distance 1; group 1: identical images (collapse); group 2: alone, skipped
    assert core.within_group_diversity(features, groups) == pytest.approx(0.5)
    three = torch.tensor([[0.0], [1.0], [3.0]])  # pairwise 1, 3, 2 -> mean 2
    assert core.within_group_diversity(three, torch.zeros(3, dtype=torch.long)) == pytest.approx(2.0)
    assert math.isnan(core.within_group_diversity(features[:2], torch.tensor([0, 1])))


def test_advantages_group_mean_global_std_and_clip():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0])
    groups = core.group_ids_from_keys(["a", "a", "b", "b"])
    adv, stats = core.compute_advantages(rewards, groups, scale_rewards="batch", adv_clip_max=5.0)
    std = rewards.std(unbiased=False).item()  # global std over the whole batch, not per group
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (std + 1e-4)
    torch.testing.assert_close(adv, expected)
    assert stats.frac_zero_std == 0.5  # group "b" has no spread and is kept (r = 0.5), not filtered

    big = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0])
    adv, _ = core.compute_advantages(big, torch.zeros(8, dtype=torch.long), adv_clip_max=2.0)
    assert adv.max().item() == pytest.approx(2.0)
    assert adv.min().item() > -2.0


def test_advantages_group_scaling_and_nan():
    rewards = torch.tensor([0.0, 2.0, 0.0, 20.0, float("nan")])
    groups = torch.tensor([0, 0, 1, 1, 1])
    adv, _ = core.compute_advantages(rewards, groups, scale_rewards="group", adv_clip_max=100.0)
    torch.testing.assert_close(adv[:4], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-3, rtol=0)
    assert adv[4].item() == 0.0
    with pytest.raises(ValueError, match="scale_rewards"):
        core.compute_advantages(rewards, groups, scale_rewards="bogus")


def test_group_ids_follow_keys():
    assert core.group_ids_from_keys(["x", "y", "x", "z"]).tolist() == [0, 1, 0, 2]


def test_optimality_probability():
    adv = torch.tensor([-5.0, -2.5, 0.0, 2.5, 5.0, 7.0])
    r = core.optimality_probability(adv, adv_clip_max=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def test_implicit_policies():
    v_theta, v_old = torch.tensor([2.0]), torch.tensor([1.0])
    pos, neg = core.implicit_policies(v_theta, v_old, beta=0.5)
    assert pos.item() == pytest.approx(0.5 * 1 + 0.5 * 2)
    assert neg.item() == pytest.approx(1.5 * 1 - 0.5 * 2)


def _case(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 2, 3, 3)
    return (
        torch.randn(shape, generator=g),
        torch.randn(shape, generator=g),
        torch.randn(shape, generator=g),
        torch.randn(shape, generator=g),
        torch.rand(b, generator=g) * 0.9 + 0.05,
    )


def test_velocity_loss_matches_hand_computation():
    v_theta, v_old, x0, noise, t = _case()
    r = torch.tensor([0.0, 0.3, 1.0])
    out = core.nft_loss(v_theta, v_old, x0, noise, t, r, beta=0.7, loss_type="velocity")
    v = noise - x0
    pos = 0.3 * v_old + 0.7 * v_theta
    neg = 1.7 * v_old - 0.7 * v_theta
    lp = ((pos - v) ** 2).flatten(1).mean(1)
    ln = ((neg - v) ** 2).flatten(1).mean(1)
    expected = (r * lp + (1 - r) * ln).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_adaptive_loss_matches_hand_computation():
    v_theta, v_old, x0, noise, t = _case(1)
    r = torch.tensor([0.2, 0.5, 0.9])
    beta = 1.0
    out = core.nft_loss(v_theta, v_old, x0, noise, t, r, beta=beta, loss_type="adaptive", adv_clip_max=5.0)
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise
    terms = []
    for i in range(3):
        pos = (1 - beta) * v_old[i] + beta * v_theta[i]
        neg = (1 + beta) * v_old[i] - beta * v_theta[i]
        e_pos = x_t[i] - t[i] * pos - x0[i]
        e_neg = x_t[i] - t[i] * neg - x0[i]
        lp = (e_pos**2).mean() / e_pos.abs().mean()
        ln = (e_neg**2).mean() / e_neg.abs().mean()
        terms.append((r[i] * lp + (1 - r[i]) * ln) / beta * 5.0)
    assert out.loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


@pytest.mark.parametrize("loss_type", ["adaptive", "velocity"])
def test_gradient_at_old_policy_is_advantage_weighted_flow_matching(loss_type):
    """At v_theta = v_old the gradient is proportional to (2r - 1)(v_old - v), per sample, and 0 at r = 1/2."""
    _, v_old, x0, noise, t = (x.double() for x in _case(2, b=4))  # float64: the check is exact up to rounding
    r = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    v_theta = v_old.clone().requires_grad_(True)
    out = core.nft_loss(v_theta, v_old, x0, noise, t, r, beta=0.3, loss_type=loss_type)
    out.loss.backward()
    grad = v_theta.grad
    direction = v_old - (noise - x0)
    for i in range(4):
        coef = 2 * r[i].item() - 1
        if coef == 0:
            assert grad[i].abs().max().item() < 1e-12
            continue
        ratio = grad[i] / (coef * direction[i])
        # One positive scalar per sample: the gradient is parallel to (2r-1)(v_old - v).
        assert (ratio > 0).all()
        torch.testing.assert_close(ratio, torch.full_like(ratio, ratio.flatten()[0].item()), rtol=1e-9, atol=0)


def test_loss_value_at_old_policy_does_not_depend_on_r():
    v_theta, v_old, x0, noise, t = _case(3)
    a = core.nft_loss(v_old, v_old, x0, noise, t, torch.tensor([0.0, 0.1, 0.2]))
    b = core.nft_loss(v_old, v_old, x0, noise, t, torch.tensor([1.0, 0.9, 0.6]))
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)


def test_kl_term_and_old_deviate():
    v_theta, v_old, x0, noise, t = _case(4)
    r = torch.full((3,), 0.5)
    v_ref = torch.zeros_like(v_theta)
    base = core.nft_loss(v_theta, v_old, x0, noise, t, r)
    with_kl = core.nft_loss(v_theta, v_old, x0, noise, t, r, v_ref=v_ref, kl_weight=0.1)
    kl = (v_theta**2).mean()
    assert with_kl.kl.item() == pytest.approx(kl.item(), rel=1e-6)
    assert with_kl.loss.item() == pytest.approx(base.loss.item() + 0.1 * kl.item(), rel=1e-6)
    assert base.old_deviate.item() == pytest.approx(((v_theta - v_old) ** 2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        core.nft_loss(v_theta, v_old, x0, noise, t, r, loss_type="l1")


def test_training_timesteps_are_per_sample_subsets_of_the_grid():
    grid = torch.tensor([1.0, 0.9, 0.7, 0.4, 0.1])
    ts = core.sample_training_timesteps(
        grid, batch_size=6, num_timesteps=4, generator=torch.Generator().manual_seed(0)
    )
    assert ts.shape == (4, 6)
    for column in ts.T:
        assert len(set(column.tolist())) == 4  # without replacement
        assert set(column.tolist()) <= set(grid.tolist())
    with pytest.raises(ValueError):
        core.sample_training_timesteps(grid, 2, 6)


def test_decay_schedules():
    assert core.linear_decay(0) == 0.0
    assert core.linear_decay(100) == pytest.approx(0.1)
    assert core.linear_decay(10_000) == 0.5
    # official OCR schedule (decay_type 2)
    assert core.linear_decay(74, rate=0.0075, max_decay=0.999, delay=75) == 0.0
    assert core.linear_decay(175, rate=0.0075, max_decay=0.999, delay=75) == pytest.approx(0.75)
    assert core.linear_decay(10_000, rate=0.0075, max_decay=0.999, delay=75) == 0.999
    assert core.make_decay_schedule("constant", max_decay=0.3)(12) == 0.3
    assert core.make_decay_schedule(lambda s: 0.25)(3) == 0.25
    assert core.make_decay_schedule("linear")(200) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="decay"):
        core.make_decay_schedule("cosine")
    assert core.ema_warmup_decay(0) == pytest.approx(0.1)
    assert core.ema_warmup_decay(1000) == 0.9


def test_soft_update():
    old, new = [torch.tensor([1.0, 1.0])], [torch.tensor([3.0, 5.0])]
    core.soft_update_(old, new, 0.25)
    torch.testing.assert_close(old[0], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 1 + 0.75 * 5]))
    core.soft_update_(old, new, 0.0)
    torch.testing.assert_close(old[0], new[0])
    with pytest.raises(ValueError):
        core.soft_update_(old, new, 1.5)


def test_time_weights_are_one_for_flow_models_and_one_minus_t_for_epsilon():
    t = torch.tensor([0.04, 0.5, 0.894])
    torch.testing.assert_close(core.time_weights(t, t), torch.ones(3))
    torch.testing.assert_close(core.time_weights(t, t / (1 - t)), 1 - t)


def test_loss_weights_scale_each_term():
    torch.manual_seed(0)
    b = 4
    v_theta, v_old, x0, noise = (torch.randn(b, 2, 3, 3) for _ in range(4))
    t, r = torch.rand(b), torch.rand(b)
    per_term = [
        core.nft_loss(
            v_theta[i : i + 1], v_old[i : i + 1], x0[i : i + 1], noise[i : i + 1], t[i : i + 1], r[i : i + 1]
        ).loss
        for i in range(b)
    ]
    w = torch.tensor([0.0, 1.0, 2.0, 0.5])
    weighted = core.nft_loss(v_theta, v_old, x0, noise, t, r, weights=w).loss
    torch.testing.assert_close(weighted, (torch.stack(per_term) * w).mean())
