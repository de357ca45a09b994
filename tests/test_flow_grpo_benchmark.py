"""The Flow-GRPO baseline of benchmarks/flow_grpo.py: its math against direct formulas, and one real iteration on the
tiny SD3 pipeline (seconds on 2 CPU cores)."""

import math
import os
import sys

import pytest
import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import flow_grpo  # noqa: E402


def test_sde_std_is_a_sqrt_t_over_one_minus_t():
    t = torch.tensor([1.0, 0.9, 0.5, 0.1])
    sigma = flow_grpo.sde_std(t, noise_level=0.7, sigma_max=0.95)
    expected = [0.7 * math.sqrt(1.0 / (1 - 0.95)), 0.7 * math.sqrt(0.9 / 0.1), 0.7, 0.7 * math.sqrt(0.1 / 0.9)]
    torch.testing.assert_close(sigma, torch.tensor(expected))


def test_sde_step_log_prob_is_the_gaussian_log_density_averaged_over_dims():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t, t_next = torch.tensor([0.8, 0.6, 0.3]), torch.tensor([0.6, 0.3, 0.1])
    prev, log_prob, mean, std = flow_grpo.sde_step_with_logprob(
        v, x, t, t_next, noise_level=0.7, sigma_max=0.95, generator=g
    )
    tt, dt = t.view(-1, 1, 1, 1), (t_next - t).view(-1, 1, 1, 1)
    sigma_t = 0.7 * torch.sqrt(tt / (1 - tt))
    # Paper Eq. 2: drift v + sigma_t^2 / (2t) (x + (1 - t) v), diffusion sigma_t sqrt(-dt).
    expected_mean = x + (v + sigma_t**2 / (2 * tt) * (x + (1 - tt) * v)) * dt
    torch.testing.assert_close(mean, expected_mean)
    scale = (sigma_t * torch.sqrt(-dt)).expand_as(x)
    density = torch.distributions.Normal(expected_mean, scale).log_prob(prev)
    torch.testing.assert_close(log_prob, density.mean(dim=(1, 2, 3)))
    # Scoring a given next sample reproduces the same log-density (training recomputes it this way).
    _, again, _, _ = flow_grpo.sde_step_with_logprob(
        v, x, t, t_next, noise_level=0.7, sigma_max=0.95, prev_sample=prev
    )
    torch.testing.assert_close(again, log_prob)


def test_clipped_loss_is_ppo_with_its_clip():
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    old = torch.zeros(4)
    new = torch.tensor([1e-3, 1e-3, -1e-3, -1e-5]).requires_grad_()  # ratios 1.001, 1.001, 0.999, 0.99999
    loss, stats = flow_grpo.clipped_policy_loss(new, old, adv, clip_range=1e-4)
    r = torch.exp(new.detach())
    # clipped (the worse of the two), unclipped (worse), unclipped (worse), inside the clip
    expected = torch.tensor([-1 * (1 + 1e-4), 1 * r[1].item(), -2 * r[2].item(), 2 * r[3].item()]).mean()
    torch.testing.assert_close(loss, expected)
    assert stats["clipfrac"].item() == pytest.approx(0.75)
    loss.backward()
    # Clipped terms have no gradient; the others -A r / N.
    torch.testing.assert_close(new.grad, torch.tensor([0.0, 1 * r[1] / 4, -2 * r[2] / 4, 2 * r[3] / 4]))


def test_kl_and_advantages_follow_the_official_formulas():
    mean, ref = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    std = torch.tensor([0.5, 1.0]).view(2, 1, 1, 1)
    kl = flow_grpo.kl_to_reference(mean, ref, std)
    assert kl.item() == pytest.approx((1 / (2 * 0.25) + 1 / 2) / 2)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    adv, zero_std = flow_grpo.group_advantages(rewards, ["a", "a", "b", "b"], adv_clip_max=5.0)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (rewards.std(unbiased=False) + 1e-4))
    assert zero_std == 0.5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny pipeline's ops are too small to split: on a shared 2-core machine two intra-op threads wait on each
    # other (the iteration test: 18 s with two threads while other jobs ran, 0.2 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_grpo():
    from trl_nft.shapes import VOCABULARY
    from trl_nft.shapes.tiny import build_tiny_sd3_pipeline

    config = flow_grpo.FlowGRPOConfig(
        num_inference_steps=3,
        num_generations=2,
        num_prompts_per_iteration=2,
        lora_r=4,
        lora_alpha=8,
        max_sequence_length=2,
        train_batch_size=2,
    )
    pipe = build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0)
    # A dense reward (image brightness) so that no group has zero spread.
    return flow_grpo.FlowGRPO(pipe, config, reward_fn=lambda prompts, images: images.mean(dim=(1, 2, 3)).tolist())


def test_sampler_without_noise_is_the_pipelines_cfg_euler_sampler(tiny_grpo):
    """With noise_level 0 the SDE mean is the Euler step: the sampler's CFG trajectory, conditioning, time grid and
    decoding reproduce the pipeline's own `__call__` from the same initial latents."""
    tr = tiny_grpo
    prompts = ["a red circle", "two green triangles"]
    cond = tr.conditioning(prompts)
    x = torch.randn((2, *tr.latent_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for j in range(tr.config.num_inference_steps):
            t, t_next = tr.grid[j].expand(2), tr.grid[j + 1].expand(2)
            v = tr.guided_velocity(x, t, cond, cfg=True)
            _, _, x, _ = flow_grpo.sde_step_with_logprob(
                v, x, t, t_next, noise_level=0.0, sigma_max=tr.sigma_max, prev_sample=torch.zeros_like(x)
            )
        images = tr.decode(x)
        expected = tr.pipeline(
            prompt=prompts,
            num_inference_steps=tr.config.num_inference_steps,
            guidance_scale=tr.config.guidance_scale,
            height=tr.resolution,
            width=tr.resolution,
            latents=torch.randn((2, *tr.latent_shape), generator=torch.Generator().manual_seed(1)),
            max_sequence_length=2,
            output_type="pt",
        ).images
    torch.testing.assert_close(images, expected.float(), atol=2e-4, rtol=0)


def test_one_iteration_changes_only_the_lora_and_stores_rollout_log_probs(tiny_grpo):
    tr = tiny_grpo
    denoiser = tr.adapter.denoiser
    before = {n: p.detach().clone() for n, p in tr.pipeline.transformer.named_parameters()}
    frozen = {
        name: {n: p.detach().clone() for n, p in module.named_parameters()}
        for name, module in tr.pipeline.components.items()
        if isinstance(module, torch.nn.Module) and name != "transformer"
    }
    records = tr.train_iteration(["a red circle"] * 2 + ["a blue square"] * 2)
    assert [r["step"] for r in records] == [1, 2] and records[0]["iteration"] == 1
    assert records[0]["trained_samples"] == 4 and 0 <= records[0]["reward"] <= 1
    # On-policy first step: ratios are 1 (the stored log-probs are the policy's own), so nothing is clipped.
    assert records[0]["clipfrac"] == 0.0 and records[0]["ratio"] == pytest.approx(1.0, abs=1e-5)
    changed = {n for n, p in denoiser.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    for name, params in frozen.items():
        for n, p in getattr(tr.pipeline, name).named_parameters():
            assert torch.equal(p, params[n]), f"{name}.{n} changed"


def test_config_fast_variant_and_errors():
    fast = flow_grpo.FlowGRPOConfig(fast=True)
    assert (fast.guidance_scale, fast.train_cfg, fast.sde_type, fast.kl_beta) == (1.0, False, "cps", 0.0)
    assert fast.num_train_steps == 3 and fast.sde_window_range == [0, 5] and not fast.use_cfg
    assert flow_grpo.FlowGRPOConfig().num_train_steps == 9
    with pytest.raises(ValueError, match="sde_type"):
        flow_grpo.FlowGRPOConfig(sde_type="ode")
    with pytest.raises(ValueError, match="num_generations"):
        flow_grpo.FlowGRPOConfig(num_generations=1)


def _write_run(path, evals, rewards, steps_per_iteration):
    """metrics.jsonl as the demo and flow_grpo.py write it: held-out records `(minutes, step, overall)` and one
    rollout-reward record per iteration on its first optimizer step."""
    import json

    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for i, reward in enumerate(rewards):
            step = i * steps_per_iteration + 1
            f.write(json.dumps({"type": "train", "step": step, "minutes": step / 10, "reward": reward}) + "\n")
        for minutes, step, overall in evals:
            f.write(json.dumps({"type": "heldout", "step": step, "minutes": minutes, "overall": overall}) + "\n")


def test_comparison_reports_the_time_ratio_or_that_nft_never_got_there(tmp_path):
    import nft_vs_grpo

    _write_run(str(tmp_path / "nft"), [(0, 0, 0.30), (2, 8, 0.45), (4, 16, 0.55)], [0.6, 0.7, 0.75, 0.8], 4)
    _write_run(str(tmp_path / "flow-grpo"), [(0, 0, 0.30), (3, 2, 0.40), (6, 4, 0.45)], [0.6, 0.65], 2)
    text = nft_vs_grpo.summarise(str(tmp_path))
    assert "time ratio NFT / Flow-GRPO = 0.33, NFT speed-up 3.0x" in text  # 0.45 at 2 min against 6 min
    assert os.path.isfile(tmp_path / "nft_vs_grpo.png")
    nft = nft_vs_grpo.read_run(str(tmp_path / "nft"), per_iteration=4)
    assert nft["iterations"] == 4 and [r["iteration"] for r in nft["held"]] == [0, 2, 4]
    # 13 steps (last reward record at step 13) = 3.25 iterations in 1.3 min, no evaluation time before the last one
    assert nft["seconds_per_iteration"] == pytest.approx(1.3 * 60 / (13 / 4))
    peer = {"held": [{"minutes": 0, "iteration": 0, "overall": 0.3}, {"minutes": 6, "iteration": 4, "overall": 0.6}]}
    never = nft_vs_grpo.compare(nft, peer, "overall", "test")
    assert not never["reached"] and "NFT never reached Flow-GRPO's best 0.600" in never["text"]
