"""The DiffusionNFT algorithm as pure functions, with no model inside.

Read this file next to the paper (Zheng et al., 2025, arXiv 2509.16117, Alg. 1) and the official code
(`NVlabs/DiffusionNFT`, `scripts/train_nft_sd3.py`). Everything here works on plain tensors so that it can be unit-tested
without a diffusion model.

Conventions (the trainer's internal "flow frame"; adapters map other parameterisations into it):

* `t` in [0, 1], 0 is data and 1 is noise: `x_t = (1 - t) * x0 + t * noise`;
* the velocity target is `v = noise - x0`, and an x0-prediction is `x0_hat = x_t - t * v_hat`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


# --------------------------------------------------------------------------------------------------------------------
# Rewards -> advantages -> optimality probability r
# --------------------------------------------------------------------------------------------------------------------


REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def combine_rewards(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | None = None,
    aggregation: str = "sum_then_normalize",
    eps: float = 1e-4,
) -> torch.Tensor:
    """One reward per sample from several reward functions, ignoring missing (NaN) scores.

    * `"sum_then_normalize"` (official `multi_score`): the weighted *sum* of the raw scores; `compute_advantages`
      then normalises the sum. A missing score counts as 0 in the sum.
    * `"normalize_then_sum"` (GDPO, Liu et al. 2026, arXiv 2601.05242): each function's scores are first normalised
      within each group, `(R_k - mean_group(R_k)) / (std_group(R_k) + eps)` over that function's non-missing scores of
      the group, and the weighted sum of these is the reward. A reward with a large spread then cannot drown one with
      a small spread. A missing score contributes 0.

    Args:
        rewards_per_func: `[N, F]` raw rewards, NaN where a function returned `None`.
        weights: `[F]` weights.
        group_ids: `[N]` group of each sample (`group_ids_from_keys`); needed for `"normalize_then_sum"`.
        aggregation: one of `REWARD_AGGREGATIONS`.

    Returns:
        `[N]` combined reward. A row with no score at all is NaN, so that it can be given a neutral r later.

    Raises:
        ValueError: an unknown `aggregation`, or `"normalize_then_sum"` without `group_ids`.
    """
    if aggregation not in REWARD_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {REWARD_AGGREGATIONS}, got {aggregation!r}.")
    weights = torch.as_tensor(weights, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    all_missing = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "normalize_then_sum":
        if group_ids is None:
            raise ValueError("aggregation='normalize_then_sum' normalises within groups: pass group_ids.")
        rewards_per_func = normalize_per_group(rewards_per_func, group_ids, eps=eps)
    weighted = rewards_per_func * weights.unsqueeze(0)
    combined = torch.nansum(weighted, dim=1)
    return torch.where(all_missing, torch.full_like(combined, float("nan")), combined)


def normalize_per_group(values: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """`(x - mean_group(x)) / (std_group(x) + eps)` for each column of `values` `[N, F]` (or `[N]`), over the
    non-missing (non-NaN) entries of each group; NaN entries stay NaN. Population std, as in `compute_advantages`."""
    squeeze = values.dim() == 1
    x = (values.unsqueeze(1) if squeeze else values).to(torch.float64)
    out = torch.full_like(x, float("nan"))
    for g in torch.unique(group_ids):
        rows = group_ids == g
        block = x[rows]
        valid = ~torch.isnan(block)
        count = valid.sum(dim=0)
        mean = torch.nansum(block, dim=0) / count.clamp(min=1)
        centred = torch.where(valid, block - mean, torch.zeros_like(block))
        std = (centred.pow(2).sum(dim=0) / count.clamp(min=1)).sqrt()
        out[rows] = torch.where(valid, centred / (std + eps), block)
    out = out.to(values.dtype)
    return out.squeeze(1) if squeeze else out


def frac_zero_std_per_column(values: torch.Tensor, group_ids: torch.Tensor) -> list[float]:
    """For each column of `values` `[N, F]`: the fraction of groups in which that column carries no signal, i.e. its
    non-missing scores are all equal, or there are fewer than two of them (a dead, all-`None` reward counts as no
    signal, never as healthy)."""
    groups = torch.unique(group_ids)
    fractions = []
    for j in range(values.shape[1]):
        dead = 0
        for g in groups:
            col = values[group_ids == g, j]
            col = col[~torch.isnan(col)]
            dead += int(col.numel() < 2 or bool(col.max() == col.min()))
        fractions.append(dead / max(len(groups), 1))
    return fractions


def within_group_diversity(features: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Mean pairwise RMS distance between the members of each group, averaged over groups of two or more.

    A reward-hacking monitor: when a policy collapses onto one image per prompt, this falls towards 0 while the
    reward may still rise.

    Args:
        features: `[N, D]` per-sample features (e.g. downsampled pixels in [0, 1]).
        group_ids: `[N]` group of each sample.

    Returns:
        The mean over groups of `mean_{i<j} ||f_i - f_j||_2 / sqrt(D)`; NaN when no group has two members.
    """
    features = features.float().flatten(1)
    values = []
    for g in torch.unique(group_ids):
        members = features[group_ids == g]
        k = members.shape[0]
        if k < 2:
            continue
        distances = torch.cdist(members, members)
        values.append(distances.sum().item() / (k * (k - 1)) / features.shape[1] ** 0.5)
    return sum(values) / len(values) if values else float("nan")


def group_ids_from_keys(keys: Sequence[object]) -> torch.Tensor:
    """Integer group id per sample; samples sharing a key (the prompt string, as in the official code) share a group."""
    index: dict[object, int] = {}
    return torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long)


@dataclass
class AdvantageStats:
    """What `compute_advantages` measured, for logging."""

    frac_zero_std: float
    """Fraction of groups that carry no signal (r = 0.5 everywhere): rewards all equal, or fewer than two scored."""
    std: float
    """The std used for scaling (global, or the mean of per-group stds)."""


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    scale_rewards: str = "batch",
    adv_clip_max: float = 5.0,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, AdvantageStats]:
    """Per-prompt advantages, `A = clip((R - mean_group(R)) / (std + eps), -c, c)`.

    The official code subtracts the mean of each prompt's group and divides by the std over *all* samples of the
    rollout batch (`sample.global_std=True`), which is `scale_rewards="batch"`. `"group"` divides by each group's own
    std (GRPO's default) and `"none"` does not scale. Groups with zero spread are kept, not filtered: they get A = 0.
    Samples with a NaN reward (no reward function scored them) get A = 0.

    Returns:
        `(advantages [N], stats)`.
    """
    if scale_rewards not in ("batch", "group", "none"):
        raise ValueError(f"scale_rewards must be 'batch', 'group' or 'none', got {scale_rewards!r}.")
    rewards = rewards.to(torch.float64)
    valid = ~torch.isnan(rewards)
    num_groups = int(group_ids.max().item()) + 1 if group_ids.numel() else 0
    advantages = torch.zeros_like(rewards)
    group_std = torch.zeros(num_groups, dtype=torch.float64)
    zero_std_groups = 0
    for g in range(num_groups):
        members = (group_ids == g) & valid
        if members.sum() < 2:
            # No score, or one: nothing to compare within the group, so no signal (a dead reward is not healthy).
            zero_std_groups += 1
            continue
        values = rewards[members]
        advantages[members] = values - values.mean()
        group_std[g] = values.std(unbiased=False)
        zero_std_groups += int(bool((values.max() - values.min()) == 0))
    if scale_rewards == "batch":
        std = rewards[valid].std(unbiased=False) if valid.sum() > 1 else torch.tensor(0.0, dtype=torch.float64)
        advantages = advantages / (std + eps)
        used_std = float(std)
    elif scale_rewards == "group":
        advantages = advantages / (group_std[group_ids] + eps)
        used_std = float(group_std.mean()) if num_groups else 0.0
    else:
        used_std = 1.0
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages))
    stats = AdvantageStats(frac_zero_std=zero_std_groups / max(num_groups, 1), std=used_std)
    return advantages.to(torch.float32), stats


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float = 5.0) -> torch.Tensor:
    """Map advantages to the optimality probability `r = clip(1/2 + A / (2 c), 0, 1)` (Paper Alg. 1 l.4-5).

    With `c = adv_clip_max` this is the paper's `r = 1/2 + 1/2 clip((R - E[R|c]) / Z_c, -1, 1)` with
    `Z_c = c * std` (official code: `0.5 + A / (2 * 5)`).
    """
    return (0.5 + advantages / (2.0 * adv_clip_max)).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------------
# The NFT loss
# --------------------------------------------------------------------------------------------------------------------


def _mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def _bcast(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_sample.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit positive and negative policies (Paper Thm 3.2, Eq. 5).

    `v+ = (1 - beta) v_old + beta v_theta` and `v- = (1 + beta) v_old - beta v_theta`.
    """
    v_pos = (1.0 - beta) * v_old + beta * v_theta
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    return v_pos, v_neg


@dataclass
class NFTLossOutput:
    loss: torch.Tensor
    """Scalar loss to back-propagate (policy loss + KL term)."""
    policy_loss: torch.Tensor
    """Scalar NFT policy loss (detached)."""
    kl: torch.Tensor
    """Scalar `mean((v_theta - v_ref)^2)` (detached); 0 when no reference was given."""
    old_deviate: torch.Tensor
    """Scalar `mean((v_theta - v_old)^2)` (detached): how far the trained policy has moved from the sampling one."""


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    beta: float = 1.0,
    loss_type: str = "adaptive",
    adv_clip_max: float = 5.0,
    v_ref: torch.Tensor | None = None,
    kl_weight: float = 0.0,
    weights: torch.Tensor | None = None,
) -> NFTLossOutput:
    """DiffusionNFT loss for one batch of `(sample, t)` terms, in the flow frame.

    Args:
        v_theta: `[B, ...]` velocity of the trained policy (with grad).
        v_old: `[B, ...]` velocity of the old (sampling) policy (no grad).
        x0: `[B, ...]` clean latents produced by the rollout.
        noise: `[B, ...]` fresh Gaussian noise used to build `x_t`.
        t: `[B]` times in [0, 1].
        r: `[B]` optimality probabilities in [0, 1].
        beta: NFT guidance strength β (official `config.beta`).
        loss_type: `"adaptive"` = the official code's x0-space self-normalised loss (default), scaled by
            `adv_clip_max / beta` as in the code; `"velocity"` = the paper's `r||v+ - v||^2 + (1 - r)||v- - v||^2`.
        adv_clip_max: the advantage clip `c`; only scales the `"adaptive"` loss, exactly as the official code does.
        v_ref: `[B, ...]` velocity of the reference (base) model, or None to skip the KL term.
        kl_weight: weight of `mean((v_theta - v_ref)^2)` (official `config.train.beta`).
        weights: `[B]` per-term multipliers of the policy loss (stop-gradient), or None for 1 (official). The trainer
            passes `time_weights` under `loss_time_weighting="flow_equivalent"`.
    """
    if loss_type not in ("adaptive", "velocity"):
        raise ValueError(f"loss_type must be 'adaptive' or 'velocity', got {loss_type!r}.")
    x_t = (1.0 - _bcast(t, x0)) * x0 + _bcast(t, x0) * noise
    v_target = noise - x0
    v_pos, v_neg = implicit_policies(v_theta, v_old, beta)
    r = r.to(v_theta.dtype)
    if loss_type == "adaptive":
        tb = _bcast(t, x0)
        x0_pos = x_t - tb * v_pos
        x0_neg = x_t - tb * v_neg
        # The weights are stop-gradient and computed in float64, as in the official code (TR L940-960).
        with torch.no_grad():
            w_pos = _mean_per_sample((x0_pos.double() - x0.double()).abs()).clamp(min=1e-5)
            w_neg = _mean_per_sample((x0_neg.double() - x0.double()).abs()).clamp(min=1e-5)
        loss_pos = _mean_per_sample((x0_pos - x0) ** 2) / w_pos.to(v_theta.dtype)
        loss_neg = _mean_per_sample((x0_neg - x0) ** 2) / w_neg.to(v_theta.dtype)
        per_sample = (r * loss_pos + (1.0 - r) * loss_neg) / beta * adv_clip_max
    else:
        loss_pos = _mean_per_sample((v_pos - v_target) ** 2)
        loss_neg = _mean_per_sample((v_neg - v_target) ** 2)
        per_sample = r * loss_pos + (1.0 - r) * loss_neg
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.dtype)
    policy_loss = per_sample.mean()
    loss = policy_loss
    if v_ref is not None and kl_weight > 0:
        kl = ((v_theta - v_ref) ** 2).mean()
        loss = loss + kl_weight * kl
        kl_value = kl.detach()
    else:
        kl_value = torch.zeros((), device=v_theta.device)
    old_deviate = ((v_theta.detach() - v_old) ** 2).mean()
    return NFTLossOutput(loss=loss, policy_loss=policy_loss.detach(), kl=kl_value, old_deviate=old_deviate)


def time_weights(t: torch.Tensor, output_gain: torch.Tensor) -> torch.Tensor:
    """Per-term loss weights `t / output_gain(t)` (`[B]`, float32) that give every denoiser parameterisation the
    per-time gradient scale a velocity-predicting flow model gets from the official loss.

    The loss is computed on `x0_hat`, whose error is the denoiser-output error times `output_gain = |dx0_hat/d output|`:
    `t` for a velocity model (the official code's setting, where these weights are all 1), but `t / (1 - t)` for an
    epsilon-prediction UNet, so that SD1.x's noisiest training time would otherwise get about 200x the gradient of its
    cleanest (against about 20x, the ratio of the times themselves, for a flow model). For epsilon prediction the
    weight is `1 - t`. Not in the paper or the official code (flow models only); `docs/families.md` ("The flow frame
    for every parameterisation").
    """
    return (t.double() / output_gain.double().clamp_min(1e-12)).float()


def sample_training_timesteps(
    grid: torch.Tensor, batch_size: int, num_timesteps: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample random subsets of the rollout time grid, `[num_timesteps, batch_size]`.

    The official code draws, for each sample, a random permutation of the *same discrete* times the sampler visited
    and trains on the first `int(num_steps * timestep_fraction)` of them (no continuous t distribution).
    """
    if not 1 <= num_timesteps <= grid.numel():
        raise ValueError(f"num_timesteps must be in [1, {grid.numel()}], got {num_timesteps}.")
    perms = torch.stack([torch.randperm(grid.numel(), generator=generator) for _ in range(batch_size)])
    return grid[perms[:, :num_timesteps]].T.contiguous()


# --------------------------------------------------------------------------------------------------------------------
# The old (sampling) policy
# --------------------------------------------------------------------------------------------------------------------


def linear_decay(step: int, rate: float = 0.001, max_decay: float = 0.5, delay: int = 0) -> float:
    """`eta = min(rate * max(step - delay, 0), max_decay)`; 0 before `delay`.

    Defaults are the paper's `eta_i = min(0.001 i, 0.5)` (official `decay_type=1`); the official OCR recipe
    (`decay_type=2`) is `delay=75, rate=0.0075, max_decay=0.999`.
    """
    return min(rate * max(step - delay, 0), max_decay)


def constant_decay(step: int, value: float) -> float:
    """`eta = value` at every step (`value=0`: the old policy is the current one, fully on-policy)."""
    return value


def make_decay_schedule(
    kind: str | Callable[[int], float], rate: float = 0.001, max_decay: float = 0.5, delay: int = 0
) -> Callable[[int], float]:
    """Build `eta(step)` from a config: `"linear"`, `"constant"` (eta = `max_decay`) or a callable `step -> eta`."""
    if callable(kind):
        return kind
    if kind == "linear":
        return lambda step: linear_decay(step, rate=rate, max_decay=max_decay, delay=delay)
    if kind == "constant":
        return lambda step: constant_decay(step, max_decay)
    raise ValueError(f"Unknown old-policy decay schedule {kind!r}: use 'linear', 'constant' or a callable.")


@torch.no_grad()
def soft_update_(old: Sequence[torch.Tensor], new: Sequence[torch.Tensor], decay: float) -> None:
    """In place `old <- decay * old + (1 - decay) * new` (official `theta_old <- eta theta_old + (1 - eta) theta`)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}.")
    for o, n in zip(old, new, strict=True):
        o.mul_(decay).add_(n.detach().to(o.dtype), alpha=1.0 - decay)


def ema_warmup_decay(step: int, max_decay: float = 0.9) -> float:
    """Decay of the evaluation EMA, `min((1 + s) / (10 + s), max_decay)` (FlowGRPO's `EMAModuleWrapper`)."""
    return min((1.0 + step) / (10.0 + step), max_decay)
