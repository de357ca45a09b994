"""Guided rollouts: `old_policy_guidance` (the loss's old policy is the CFG velocity the rollouts were sampled with) and
`guidance_decay_steps` (guidance annealed to CFG-free), on real tiny diffusers pipelines."""

import pytest
import torch
from datasets import Dataset
from test_families import FAMILIES, PROMPTS, REFUSED, _config, _extra, _max_len
from tiny_families import build_tiny_pipeline

from trl_nft import DiffusionNFTConfig, DiffusionNFTTrainer
from trl_nft.families import get_adapter, get_family
from trl_nft.families.check import check_family
from trl_nft.trainer import _Chunk


CFG_FAMILIES = ["sd3", "sd15", "sd2", "zimage", "auraflow", "hidream", "ernie-image"]


def test_the_declared_cfg_families_are_the_checked_ones():
    declared = [n for n in FAMILIES if n not in REFUSED and get_family(build_tiny_pipeline(n)).cfg_velocity]
    assert sorted(declared) == sorted(CFG_FAMILIES)


@pytest.mark.parametrize("name", CFG_FAMILIES)
def test_cfg_velocity_reproduces_the_pipelines_own_guided_steps(name):
    pipe = build_tiny_pipeline(name)
    adapter = get_adapter(pipe, resolution=FAMILIES[name].size, pipeline_kwargs=_extra(name))
    assert check_family(adapter, PROMPTS[:2], max_sequence_length=_max_len(name), guidance_scale=3.0) < 1e-4


def test_sdxl_zeroes_its_empty_negative_prompt_so_it_is_not_declared():
    """SDXL's `force_zeros_for_empty_prompt` makes its unconditional branch zeros, not the encoded empty prompt: the
    check sees it, which is why the family does not declare `cfg_velocity`."""
    pipe = build_tiny_pipeline("sdxl")
    adapter = get_adapter(pipe, resolution=FAMILIES["sdxl"].size)
    assert not adapter.family.cfg_velocity
    assert check_family(adapter, PROMPTS[:2], max_sequence_length=_max_len("sdxl"), guidance_scale=3.0) > 1e-2


@pytest.mark.parametrize("which", ["old", "ref"])
def test_the_guided_frozen_policies_are_the_pipelines_cfg_velocity(tmp_path, which):
    """One Euler (DDIM) step with the trainer's guided `v_old` (`old_policy_guidance`) or `v_ref` (`kl_guidance_scale`)
    from the sample the pipeline's CFG call fed its UNet lands on the sample it fed at the next step; the conditional
    branch alone does not."""
    from diffusers import DDIMScheduler

    pipe = build_tiny_pipeline("sd15")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    w = 3.0
    trainer = DiffusionNFTTrainer(
        pipe,
        reward_funcs=lambda prompts, images, **kw: [0.0] * len(prompts),
        args=_config(
            tmp_path,
            "sd15",
            **(
                {"guidance_scale": w, "old_policy_guidance": True}
                if which == "old"
                else {"kl_weight": 0.3, "kl_guidance_scale": w}
            ),
        ),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    adapter, prompts = trainer.adapter, PROMPTS[:2]
    calls = []

    def record(module, args, kwargs):
        bound = adapter._bind(args, kwargs)
        x = bound["sample"][-len(prompts) :].detach().float().clone()  # the conditional half of [uncond, cond]
        t = adapter.frame.flow_time(torch.as_tensor(bound["timestep"]).reshape(-1)[:1].double())
        calls.append((x, float(t[0])))

    handle = adapter.denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad(), trainer._policy("old"):
            pipe(prompt=prompts, num_inference_steps=3, guidance_scale=w, output_type="latent",
                 generator=torch.Generator().manual_seed(0), height=adapter.resolution, width=adapter.resolution)  # fmt: skip
    finally:
        handle.remove()
    assert len(calls) == 3
    cond = trainer._conditioning(prompts)
    errors = {"guided": [], "conditional": []}
    for (x_model, t), (x_next_model, t_next) in zip(calls, calls[1:], strict=False):
        tt = torch.full((len(prompts),), t)
        x = adapter.frame.flow_sample(x_model, tt).float()
        x_next = adapter.frame.flow_sample(x_next_model, torch.full_like(tt, t_next)).float()
        chunk = _Chunk(k=1, x0=x, t=tt, noise=x, x_t=x)
        ((v_old, v_ref),) = trainer._frozen_velocities([chunk], {1: adapter.tile(cond, 1)})
        v_guided = v_old if which == "old" else v_ref
        v_cond = adapter.velocity(x, tt, adapter.tile(cond, 1)).detach()
        for key, v in (("guided", v_guided), ("conditional", v_cond)):
            errors[key].append(float(((x + (t_next - t) * v) - x_next).norm() / x_next.norm()))
    assert max(errors["guided"]) < 1e-4, errors
    assert min(errors["conditional"]) > 1e-3, errors


def test_guidance_decays_to_cfg_free_over_guidance_decay_steps(tmp_path):
    pipe = build_tiny_pipeline("sd15")
    args = _config(
        tmp_path, "sd15", max_steps=4, guidance_scale=3.0, guidance_decay_steps=2, old_policy_guidance=True,
        logging_steps=1,
    )  # fmt: skip
    trainer = DiffusionNFTTrainer(
        pipe, reward_funcs=lambda prompts, images, **kw: images.flatten(1).std(dim=1).tolist(), args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )  # fmt: skip
    seen = []
    rollout = trainer.adapter.rollout

    def spy(prompts, **kwargs):
        seen.append(kwargs["guidance_scale"])
        return rollout(prompts, **kwargs)

    trainer.adapter.rollout = spy
    trainer.train()
    # One rollout batch per optimizer step here; step i (from 0) samples with 1 + (3 - 1) * max(0, 1 - i / 2).
    assert seen == [3.0, 2.0, 1.0, 1.0]
    logged = [h["guidance_scale"] for h in trainer.state.log_history if "guidance_scale" in h]
    assert logged == [3.0, 2.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"old_policy_guidance": True}, "old_policy_guidance"),
        ({"guidance_decay_steps": 10}, "guidance_decay_steps"),
        ({"guidance_scale": 3.0, "guidance_decay_steps": -1}, "guidance_decay_steps"),
        ({"kl_guidance_scale": 3.0, "kl_weight": 0.0}, "kl_guidance_scale"),
        ({"kl_guidance_scale": 0.5}, "kl_guidance_scale"),
    ],
)
def test_guidance_options_without_guidance_are_refused_at_construction(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        DiffusionNFTConfig(output_dir=str(tmp_path), **overrides)


@pytest.mark.parametrize(
    "name,overrides,expected",
    [
        ("sdxl", {"guidance_scale": 3.0, "old_policy_guidance": True}, "old_policy_guidance.*cfg_velocity=True"),
        ("sdxl", {"kl_weight": 0.3, "kl_guidance_scale": 3.0}, "kl_guidance_scale.*cfg_velocity=True"),
        ("flux-dev", {"guidance_scale": 3.0, "old_policy_guidance": True}, "guidance input"),
    ],
)
def test_guided_frozen_policies_are_refused_where_the_family_does_not_declare_them(
    tmp_path, name, overrides, expected
):
    pipe = build_tiny_pipeline(name)
    with pytest.raises(ValueError, match=expected):
        DiffusionNFTTrainer(
            pipe,
            reward_funcs=lambda prompts, images, **kw: [0.0] * len(prompts),
            args=_config(tmp_path, name, **overrides),
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        )
