"""The tiny family factory (`tests/tiny_families.py`): every family samples with each of its schedulers."""

import pytest
import torch
from tiny_families import EXTRA_FAMILIES, FAMILIES, SCHEDULERS, build_tiny_pipeline


PROMPTS = ("a red circle", "two blue squares")
ALL = {**FAMILIES, **EXTRA_FAMILIES}
CASES = [(family, scheduler) for family, spec in ALL.items() for scheduler in spec.schedulers]


def _sample(pipe, spec, prompts, seed=0, **kwargs):
    final = {}

    def keep_latents(pipe, step, timestep, callback_kwargs):
        final["latents"] = callback_kwargs["latents"]
        return callback_kwargs

    call_kwargs = {"guidance_scale": 1.0, **spec.call_kwargs, **kwargs}
    images = pipe(
        prompt=list(prompts),  # ZImagePipeline rewrites the caller's prompt list in place (chat template)
        num_inference_steps=2,
        height=spec.size,
        width=spec.size,
        output_type="pt",
        generator=torch.Generator().manual_seed(seed),
        callback_on_step_end=keep_latents,
        callback_on_step_end_tensor_inputs=["latents"],
        **call_kwargs,
    ).images
    return images, final.get("latents")


def test_families_are_declared_consistently():
    assert not set(FAMILIES) & set(EXTRA_FAMILIES)
    for family, spec in ALL.items():
        assert spec.schedulers and set(spec.schedulers) <= set(SCHEDULERS), family
        assert spec.lora_targets, family
    multi = [f for f, spec in FAMILIES.items() if len(spec.schedulers) >= 2]
    assert len(multi) >= 16  # only the distilled few-step families (lcm, sana-sprint) have one scheduler


@pytest.mark.parametrize(("family", "scheduler"), CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_family_samples(family, scheduler):
    spec = ALL[family]
    pipe = build_tiny_pipeline(family, scheduler)
    assert type(pipe).__name__ == spec.pipeline_class
    assert type(getattr(pipe, spec.denoiser_attr)).__name__ == spec.denoiser_class
    expected = type(SCHEDULERS[scheduler](pipe.scheduler.config))
    assert type(pipe.scheduler) is expected
    batches = []

    def record_batch(module, args, kwargs):
        x = args[0] if args else next(kwargs[k] for k in ("hidden_states", "sample", "x") if k in kwargs)
        batches.append(len(x))

    getattr(pipe, spec.denoiser_attr).register_forward_pre_hook(record_batch, with_kwargs=True)
    images, latents = _sample(pipe, spec, PROMPTS)
    assert batches and set(batches) == {2}, batches  # CFG-free: one denoiser row per image
    assert images.shape == (2, 3, spec.size, spec.size)
    assert torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    assert images.std() > 0
    assert latents is not None and latents.shape[0] == 2 and torch.isfinite(latents).all()


@pytest.mark.parametrize("family", list(ALL))
def test_family_prompt_and_lora_reach_the_image(family):
    """Each LoRA target names a Linear of the denoiser, and both the prompt and a (random) LoRA change the image."""
    from peft import LoraConfig

    spec = ALL[family]
    pipe = build_tiny_pipeline(family)
    denoiser = getattr(pipe, spec.denoiser_attr)
    linears = [name for name, module in denoiser.named_modules() if isinstance(module, torch.nn.Linear)]
    for target in spec.lora_targets:
        assert any(name == target or name.endswith("." + target) for name in linears), (family, target)
    base, _ = _sample(pipe, spec, PROMPTS[:1])
    other_prompt, _ = _sample(pipe, spec, PROMPTS[1:])
    assert not torch.equal(base, other_prompt)
    torch.manual_seed(1)
    denoiser.add_adapter(
        LoraConfig(r=2, lora_alpha=2, target_modules=list(spec.lora_targets), init_lora_weights=False)
    )
    with_lora, _ = _sample(pipe, spec, PROMPTS[:1])
    assert (with_lora - base).abs().max() > 1e-4


def test_build_is_deterministic_per_seed():
    a, b, c = (build_tiny_pipeline("flux-dev", seed=s).transformer.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_family_or_scheduler_is_refused():
    with pytest.raises(ValueError, match="Unknown family"):
        build_tiny_pipeline("sd4")
    with pytest.raises(ValueError, match="Unknown scheduler"):
        build_tiny_pipeline("sd15", "heun-9000")
