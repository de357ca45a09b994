"""Real-scale memory options (issue 13): cached prompt embeddings, text-encoder / VAE offload, VAE slicing / tiling.

Exactness is checked on real tiny pipelines of several families; placement on the devices this machine has (the
CUDA variant runs where a GPU is present)."""

import pytest
import torch
from conftest import PROMPTS, tiny_config
from tiny_families import FAMILIES, build_tiny_pipeline

from trl_nft import DiffusionNFTConfig, DiffusionNFTTrainer
from trl_nft.families import get_adapter
from trl_nft.families.adapter import IncompatibleRows


MICRO_BATCH = ["a red circle", "two blue squares above a green triangle", "a red circle", "a yellow square"]


def _fresh_sd3():
    from trl_nft.shapes import VOCABULARY
    from trl_nft.shapes.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0)


def _trainer(pipe, tmp_path, **overrides):
    dataset = [{"prompt": p} for p in PROMPTS]
    return DiffusionNFTTrainer(pipe, "brightness", args=tiny_config(tmp_path, **overrides), train_dataset=dataset)


def _rollout_rows(trainer, prompts=("a red circle", "a blue square")):
    return [{"prompt": p} for p in prompts for _ in range(trainer.num_generations)]


def _one_step(trainer, seed=0):
    """One rollout and one training micro-batch; returns the trainable gradients."""
    torch.manual_seed(seed)
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(trainer.model, _rollout_rows(trainer))
    return [p.grad.detach().clone() for p in trainer._trainable]


# ------------------------------------------------------------------------------------------------ cached embeddings
@pytest.mark.parametrize("name", ["sd3", "flux-dev", "sd15", "sdxl", "sana", "hidream", "zimage"])
def test_cached_conditioning_gives_the_captured_velocities(name):
    spec = FAMILIES[name]
    pipe = build_tiny_pipeline(name)
    extra = {k: v for k, v in spec.call_kwargs.items() if k not in ("max_sequence_length", "guidance_scale")}
    adapter = get_adapter(pipe, resolution=spec.size, pipeline_kwargs=extra)
    kwargs = dict(guidance_scale=1.0, height=spec.size, width=spec.size)
    kwargs["max_sequence_length"] = spec.call_kwargs.get("max_sequence_length")
    captured = adapter.conditioning(MICRO_BATCH, **kwargs)
    rows = {p: adapter.conditioning_row(adapter.conditioning([p, p], **kwargs)) for p in set(MICRO_BATCH)}
    cached = adapter.join_conditioning_rows([rows[p] for p in MICRO_BATCH])
    x0, _ = adapter.rollout(MICRO_BATCH, num_inference_steps=2, **kwargs)
    # Two training times per sample: the conditioning is tiled as in training_step.
    x_t = x0.repeat(2, *([1] * (x0.dim() - 1)))
    t = torch.linspace(0.1, 0.9, x_t.shape[0])
    with torch.no_grad():
        expected = adapter.velocity(x_t, t, adapter.tile(captured, 2))
        got = adapter.velocity(x_t, t, adapter.tile(cached, 2))
    # Text encoders run on batches of 2 instead of 4: equal up to float32 rounding (bitwise for most families).
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The check means something: the rows in another prompt order give other velocities.
    shuffled = adapter.join_conditioning_rows([rows[p] for p in reversed(MICRO_BATCH)])
    with torch.no_grad():
        assert not torch.allclose(adapter.velocity(x_t, t, adapter.tile(shuffled, 2)), expected, atol=1e-4)


def test_rows_a_pipeline_padded_differently_are_not_stacked():
    # Qwen-Image pads the prompts of a call to the longest one: rows of prompts of different lengths cannot form the
    # batch the pipeline would capture, so the trainer captures such a micro-batch through the pipeline.
    spec = FAMILIES["qwenimage"]
    adapter = get_adapter(build_tiny_pipeline("qwenimage"), resolution=spec.size)
    kwargs = dict(guidance_scale=1.0, height=spec.size, width=spec.size, max_sequence_length=16)
    short, long = "a red circle", "two blue squares above a green triangle"
    rows = {p: adapter.conditioning_row(adapter.conditioning([p, p], **kwargs)) for p in (short, long)}
    with pytest.raises(IncompatibleRows):
        adapter.join_conditioning_rows([rows[short], rows[long]])
    joined = adapter.join_conditioning_rows([rows[short], rows[short]])
    captured = adapter.conditioning([short, short], **kwargs)
    torch.testing.assert_close(joined["encoder_hidden_states"], captured["encoder_hidden_states"])


@pytest.mark.parametrize("family", ["sd3", "qwenimage"])
def test_cache_gives_the_uncached_gradients_and_skips_the_text_encoders(family, tmp_path):
    grads, encoder_calls = {}, {}
    for cache in (False, True):
        if family == "sd3":
            pipe = _fresh_sd3()
            overrides = {}
        else:
            pipe = build_tiny_pipeline(family)
            overrides = dict(resolution=FAMILIES[family].size, max_sequence_length=16, num_inference_steps=2)
        # Two passes over the rollout batch (one micro-batch): the second trains from the buffer, with no rollout.
        overrides.update(num_iterations=2, gradient_accumulation_steps=2, steps_per_generation=1)
        trainer = _trainer(pipe, tmp_path / str(cache), cache_prompt_embeddings=cache, **overrides)
        rows = _rollout_rows(trainer, ("a red circle", "two blue squares above a circle"))
        torch.manual_seed(0)
        trainer.current_gradient_accumulation_steps = 2
        trainer.training_step(trainer.model, rows)
        calls = []
        hooks = [
            module.register_forward_hook(lambda *a, calls=calls: calls.append(1))
            for name, module in pipe.components.items()
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
        ]
        trainer.training_step(trainer.model, rows)
        for hook in hooks:
            hook.remove()
        grads[cache] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainer._trainable]
        encoder_calls[cache] = len(calls)
    assert encoder_calls[False] > 0
    if family == "sd3":
        assert encoder_calls[True] == 0, "cached: training must not run the text encoders"
    else:
        # Qwen-Image pads per batch: a micro-batch of two prompt lengths is captured through the pipeline.
        assert encoder_calls[True] == encoder_calls[False]
    assert any(g.abs().sum() > 0 for g in grads[True])
    for cached, uncached in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-7)


def test_cache_is_per_rollout_batch(tmp_path):
    trainer = _trainer(_fresh_sd3(), tmp_path)
    trainer._prepare_inputs(_rollout_rows(trainer))
    assert set(trainer._prompt_cache) == {"a red circle", "a blue square"}
    trainer._step = 1  # next rollout batch
    trainer._prepare_inputs(_rollout_rows(trainer, ("a circle", "a yellow square")))
    assert set(trainer._prompt_cache) == {"a circle", "a yellow square"}


# ------------------------------------------------------------------------------------------------ offload
def _devices(trainer):
    pipe = trainer.pipeline
    return {
        name: next(module.parameters()).device.type
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


def _check_placement(trainer, offloaded_during_training: set[str]):
    device = trainer.accelerator.device.type
    everywhere = {name: device for name in _devices(trainer)}
    assert _devices(trainer) == everywhere  # after construction: the pipeline as given, on the accelerator
    grads = _one_step(trainer)
    expected = {name: ("cpu" if name in offloaded_during_training else device) for name in everywhere}
    assert _devices(trainer) == expected  # between rollout and training: offloaded ones in CPU memory
    with trainer.evaluation_weights():
        assert _devices(trainer) == everywhere  # sampling outside training (evaluation, the demo): whole again
    assert _devices(trainer) == expected
    trainer.train()
    assert _devices(trainer) == everywhere  # after training: the pipeline is whole again
    return grads


def test_offload_places_components_and_keeps_the_step(tmp_path):
    reference = _one_step(_trainer(_fresh_sd3(), tmp_path / "plain", max_steps=1))
    trainer = _trainer(_fresh_sd3(), tmp_path / "off", offload_text_encoders=True, offload_vae=True, max_steps=1)
    grads = _check_placement(trainer, {"text_encoder", "text_encoder_2", "vae"})
    for got, expected in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a real CPU <-> accelerator move")
def test_offload_moves_components_off_the_gpu(tmp_path):
    trainer = _trainer(_fresh_sd3(), tmp_path, offload_text_encoders=True, offload_vae=True, max_steps=1)
    assert trainer.accelerator.device.type == "cuda"
    _check_placement(trainer, {"text_encoder", "text_encoder_2", "vae"})


# ------------------------------------------------------------------------------------------------ VAE decoding
def test_vae_slicing_gives_the_same_images_and_tiling_is_enabled(tmp_path):
    plain = _trainer(_fresh_sd3(), tmp_path / "a")
    sliced = _trainer(_fresh_sd3(), tmp_path / "b", vae_slicing=True, vae_tiling=True)
    assert sliced.pipeline.vae.use_slicing and sliced.pipeline.vae.use_tiling
    assert not plain.pipeline.vae.use_slicing
    # Tiling only acts above the VAE's tile size (far above the tiny images here): slicing is what changes.
    sliced.pipeline.vae.disable_tiling()
    prompts = ["a red circle", "a blue square", "a circle"]
    images = []
    for trainer in (plain, sliced):
        generator = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        _, out = trainer._sample_latents(prompts, num_inference_steps=2, guidance_scale=1.0, generator=generator)
        images.append(out)
    torch.testing.assert_close(images[1], images[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field", ["vae_slicing", "vae_tiling"])
def test_a_vae_without_slicing_or_tiling_is_refused(field, tmp_path):
    from diffusers import AsymmetricAutoencoderKL

    pipe = build_tiny_pipeline("sd15")
    # A real VAE class that StableDiffusionPipeline accepts and that implements neither.
    pipe.vae = AsymmetricAutoencoderKL(
        down_block_out_channels=[8, 8],
        up_block_out_channels=[8, 8],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_down_block=1,
        layers_per_up_block=1,
        norm_num_groups=4,
        latent_channels=4,
    )
    args = tiny_config(tmp_path, resolution=16, **{field: True})
    with pytest.raises(ValueError, match=f"{field}=True.*AsymmetricAutoencoderKL.*Set {field}=False"):
        DiffusionNFTTrainer(pipe, "brightness", args=args, train_dataset=[{"prompt": p} for p in PROMPTS])


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(offload_text_encoders=True, cache_prompt_embeddings=False), "offload_text_encoders=True needs cache"),
        (dict(vae_slicing="yes"), "vae_slicing must be True or False"),
        (dict(cache_prompt_embeddings=None), "cache_prompt_embeddings must be True or False"),
    ],
)
def test_memory_fields_are_validated(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        DiffusionNFTConfig(output_dir=str(tmp_path), num_generations=2, report_to="none", **overrides)
