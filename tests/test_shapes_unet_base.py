"""The tiny SD1.x-family pipeline (`build_tiny_sd_pipeline`), its pretraining (`pretrain --family sd`) and the shipped
UNet base `shapes-unet`: offline loading, sampling, `trl-nft eval`."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch


def _cli():
    exe = shutil.which("trl-nft", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "trl_nft.cli"]


def test_tiny_sd_pipeline_round_trips_offline(tmp_path):
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from trl_nft.shapes.tiny import build_tiny_sd_pipeline
    from trl_nft.shapes.world import VOCABULARY

    pipe = build_tiny_sd_pipeline(VOCABULARY, "test", seed=0)
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert (
        pipe.scheduler.config.prediction_type == "epsilon" and pipe.scheduler.config.beta_schedule == "scaled_linear"
    )
    assert pipe.safety_checker is None and pipe.config.requires_safety_checker is False
    # Same seed, same weights.
    again = build_tiny_sd_pipeline(VOCABULARY, "test", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), again.unet.parameters(), strict=True))
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is StableDiffusionPipeline and loaded.config.requires_safety_checker is False
    assert loaded.tokenizer("two red circles").input_ids == pipe.tokenizer("two red circles").input_ids
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, output_type="pt")
    a = pipe(["two red circles"], generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded(["two red circles"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 3, 16, 16)  # 8x8 latents, x2 VAE
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="Unknown tiny pipeline preset 'big'"):
        build_tiny_sd_pipeline(VOCABULARY, "big")


def test_unet_base_loads_offline_with_plain_diffusers_and_samples():
    from diffusers import DiffusionPipeline

    from trl_nft.shapes.pretrain import UNET_BASE_DIR, load_base_pipeline, resolve_base_path

    assert resolve_base_path("shapes-unet") == resolve_base_path("unet") == UNET_BASE_DIR
    pipe = DiffusionPipeline.from_pretrained(UNET_BASE_DIR)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert pipe.vae.config.shift_factor is None  # StableDiffusionPipeline applies the scaling factor only
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(UNET_BASE_DIR) for f in fs)
    assert size < 20 * 2**20  # a few MB, shipped in the package
    images = pipe(
        ["a red circle", "two blue squares"],
        num_inference_steps=10,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 32, 32)
    # A pretrained base draws shapes on a white background, not noise.
    assert images.mean() > 0.6 and (images.min(dim=1).values < 0.5).any()
    assert type(load_base_pipeline("shapes-unet")).__name__ == "StableDiffusionPipeline"


def test_eval_cli_on_the_unet_base(tmp_path):
    from trl_nft.cli import load_model

    out = tmp_path / "eval.json"
    args = [
        *_cli(),
        "eval",
        "--model_name_or_path",
        "shapes-unet",
        "--heldout_per_tag",
        "2",
        "--output_json",
        str(out),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "overall" in proc.stdout
    data = json.loads(out.read_text())
    assert data["n"] == 12 and data["args"]["model_name_or_path"] == "shapes-unet"
    assert type(load_model("shapes-sd3")).__name__ == "StableDiffusion3Pipeline"


def test_pretrain_family_sd_is_deterministic_and_starts_from_the_sd3_base(tmp_path):
    from safetensors.torch import load_file

    from trl_nft.shapes.pretrain import BASE_DIR, PretrainConfig, load_base_pipeline, main

    flags = [
        "--family",
        "sd",
        "--normalisation-images",
        "16",
        "--pool-size",
        "32",
        "--transformer-steps",
        "2",
        "--batch-size",
        "4",
        "--warmup-steps",
        "1",
        "--num-threads",
        "1",
    ]
    for run in ("a", "b"):
        main([*flags, "--output_dir", str(tmp_path / run)])
    for part in ("unet", "vae", "text_encoder"):
        (weights_a,) = (tmp_path / "a" / part).glob("*.safetensors")
        a, b = load_file(weights_a), load_file(tmp_path / "b" / part / weights_a.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    recorded = json.loads((tmp_path / "a" / "pretrain_config.json").read_text())
    assert recorded["family"] == "sd" and recorded["transformer_steps"] == 2
    pipe = load_base_pipeline(str(tmp_path / "a"))
    sd3 = load_base_pipeline("shapes-base")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    # The SD3 base's VAE is copied as it is; only the latent scale is re-fitted, without a shift.
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.parameters(), sd3.vae.parameters(), strict=True))
    assert pipe.vae.config.shift_factor is None and 1.0 < pipe.vae.config.scaling_factor < 2.0
    # The text encoder starts from the SD3 base's first one and trains (2 steps move it a little).
    sd3_text = {k.removeprefix("text_model."): v for k, v in sd3.text_encoder.state_dict().items()}
    moved = [not torch.equal(v, sd3_text[k]) for k, v in pipe.text_encoder.state_dict().items()]
    assert any(moved)
    token = pipe.text_encoder.get_input_embeddings().weight
    assert (token - sd3_text["embeddings.token_embedding.weight"]).abs().max() < 0.05
    assert os.path.isfile(os.path.join(BASE_DIR, "model_index.json"))
    with pytest.raises(ValueError, match="family='sdxl' is not one of"):
        PretrainConfig(family="sdxl")


def test_demo_picks_the_unet_recipe_by_base_name():
    import yaml

    from trl_nft.shapes.demo import DEMO_CONFIG, DEMO_CONFIG_UNET, demo_config_for

    assert demo_config_for(["--model_name_or_path", "shapes-unet"]) == DEMO_CONFIG_UNET
    assert demo_config_for(["--model_name_or_path=shapes-unet", "--max_minutes", "1"]) == DEMO_CONFIG_UNET
    assert demo_config_for(["--model_name_or_path", "shapes-base"]) == demo_config_for([]) == DEMO_CONFIG
    # A directory is read: a UNet base regenerated or continued by `pretrain --family sd` gets the UNet recipe.
    from trl_nft.shapes.pretrain import resolve_base_path

    assert demo_config_for(["--model_name_or_path", resolve_base_path("shapes-unet")]) == DEMO_CONFIG_UNET
    assert demo_config_for(["--model_name_or_path", resolve_base_path("shapes-base")]) == DEMO_CONFIG
    with open(DEMO_CONFIG_UNET) as f:
        recipe = yaml.safe_load(f)
    assert recipe["model_name_or_path"] == "shapes-unet" and "conv1" in recipe["lora_target_modules"]
    from trl_nft.shapes.demo import parse_demo_arguments

    argv = ["--model_name_or_path", "shapes-unet", "--output_dir", "unused", "--precision", "fp32"]
    _, training_args = parse_demo_arguments(argv)
    # The UNet recipe anchors the CFG-free policy to the base's CFG-3 velocity (docs/shapes_world.md).
    assert training_args.kl_guidance_scale == 3.0 and training_args.kl_weight == 2.0
    assert training_args.guidance_scale == 1.0 and training_args.max_steps == 120
