"""Build the tiny shapes-world base model shipped in `trl_nft/shapes/base`.

    python -m trl_nft.shapes.pretrain --output-dir trl_nft/shapes/base

The base plays the part SD3.5 plays for DiffusionNFT: a real `StableDiffusion3Pipeline` that draws recognisable
shapes but, sampled without classifier-free guidance, often gets counts, colours and positions wrong, leaving an RL
stage room to improve it. Three stages, all on CPU and fully seeded (same machine, torch version and thread count give
the same weights):

1. the VAE learns to reconstruct rendered ground-truth images; latent normalisation is then measured on it;
2. a pool of ground-truth latents is encoded once (VAE encoding, not the transformer, would otherwise dominate a
   step);
3. the transformer, and by default the two small CLIP text encoders with it (`--train_text_encoders`), are
   pretrained by rectified flow with caption dropout, so the empty prompt is a meaningful unconditional branch for
   CFG; the EMA weights are saved. With frozen text encoders the prompt embeddings are encoded once instead.

The learning rate is constant after warm-up (unless `--lr-decay-steps` cools it down at the end) and no random stream
depends on the total step count, so the checkpoint a constant-rate run saves at step N is exactly what a run with
`--transformer-steps N` produces. `--init-from DIR` continues an existing base as a second stage.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .world import all_prompts, sample_training_batch


logger = logging.getLogger(__name__)

# Length of the (all-zero, as there is no T5) T5 part of the text context. The base was trained with it, so the
# trainer, evaluator and demo must sample with the same value.
MAX_SEQUENCE_LENGTH = 1
BASE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base")
# The second shipped base: a `StableDiffusionPipeline` (SD1.x family, UNet, epsilon prediction), `--family sd`.
UNET_BASE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base_unet")
# Names of the shipped bases (`load_base_pipeline`, `trl-nft eval/demo --model_name_or_path`).
BASE_NAMES = {"shapes-base": BASE_DIR, "shapes-sd3": BASE_DIR, "shapes-unet": UNET_BASE_DIR}


@dataclass
class PretrainConfig:
    """Everything that determines the base's weights (with the machine, torch version and `num_threads`)."""

    output_dir: str = BASE_DIR
    # "sd3": the `StableDiffusion3Pipeline` base (rectified flow). "sd": the SD1.x-family `StableDiffusionPipeline`
    # base (`UNet2DConditionModel`, epsilon-prediction DDPM loss), whose VAE and text encoder start from
    # `sd_init_from`'s (see `pretrain_unet_components`).
    family: str = "sd3"
    # For `family="sd"`: the SD3 base whose trained VAE is copied (frozen) and whose first CLIP text encoder
    # initialises the UNet base's text encoder.
    sd_init_from: str = "shapes-base"
    seed: int = 0
    num_threads: int = 2
    # VAE
    vae_steps: int = 400
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-3
    vae_batch_size: int = 64
    normalisation_images: int = 4096
    # Transformer
    pool_size: int = 20480
    split: str = "all"
    transformer_steps: int = 10000
    # Continue from an existing base (a directory, or "shapes-base") instead of starting from random weights: its VAE
    # and latent normalisation are kept, and the transformer (with the text encoders, if trained) continues from its
    # EMA weights with a fresh optimizer for `transformer_steps` more steps.
    init_from: str | None = None
    learning_rate: float = 6e-4
    # Decay the learning rate linearly to zero over the last `lr_decay_steps` steps; 0 keeps it constant after warm-up.
    lr_decay_steps: int = 0
    weight_decay: float = 0.01
    warmup_steps: int = 200
    max_grad_norm: float = 1.0
    batch_size: int = 64
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    # Train the two CLIP text encoders with the transformer (same optimizer, EMA and learning rate) rather than keep
    # them frozen at their random initialisation. Random word features leave binding ("a red circle and a blue
    # square") to the 4-layer transformer alone: with frozen encoders the base's CFG-3 accuracy was 0.34 and the demo
    # gained +0.25; with trained ones 0.50 and +0.26 from a higher start (docs/shapes_world.md).
    train_text_encoders: bool = True
    # bf16 autocast for the transformer stage (CPU or GPU); weights and optimizer state stay float32.
    bf16: bool = True
    # Intermediate EMA checkpoints (full pipelines), for choosing the step count; 0 disables them.
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    log_every: int = 50

    def __post_init__(self):
        if self.family not in ("sd3", "sd"):
            raise ValueError(f"family={self.family!r} is not one of 'sd3' (SD3 transformer base), 'sd' (SD1.x UNet).")
        if self.family == "sd" and self.output_dir == BASE_DIR:
            self.output_dir = UNET_BASE_DIR
        if not 0 <= self.lr_decay_steps <= self.transformer_steps:
            raise ValueError(
                f"lr_decay_steps={self.lr_decay_steps} must lie in [0, transformer_steps={self.transformer_steps}]: "
                "0 keeps the learning rate constant, N decays it to zero over the last N steps."
            )


def _to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae, config: PretrainConfig, rng: np.random.Generator, generator: torch.Generator) -> float:
    """Fit the VAE to rendered images (MSE + a small per-dimension KL); returns the final reconstruction MSE.

    The KL term is weak on purpose: it only keeps the latent scale tame, as the transformer cares about sharp
    reconstructions far more than about a Gaussian-looking posterior.
    """
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    recent: list[float] = []
    for step in range(1, config.vae_steps + 1):
        images, _ = sample_training_batch(config.vae_batch_size, rng, "all")
        x = _to_model_range(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + config.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [mse.item()])[-20:]
        if step % config.log_every == 0 or step == config.vae_steps:
            logger.info("vae step %d/%d  mse %.5f  kl/dim %.3f", step, config.vae_steps, np.mean(recent), kl.item())
    vae.eval()
    return float(np.mean(recent))


@torch.no_grad()
def _encode_images(vae, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Posterior means (raw, unnormalised) of uint8 images; the mean keeps the pool independent of sampling noise."""
    chunks = [
        vae.encode(_to_model_range(images[i : i + batch_size])).latent_dist.mean
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def fit_latent_normalisation(vae, n_images: int, rng: np.random.Generator) -> tuple[float, float]:
    """Measure the latents' global mean and std and store them as `shift_factor` and `scaling_factor = 1/std`.

    Diffusers pipelines map latents through `(z - shift) * scale` on encoding and back on decoding, so after this the
    transformer sees roughly unit-variance latents, which the rectified-flow noise level assumes.
    """
    images, _ = sample_training_batch(n_images, rng, "all")
    latents = _encode_images(vae, images)
    mean, std = latents.mean().item(), latents.std().item()
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
    return mean, std


def _encode_prompts(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own text conditioning (token embeddings, pooled embeddings), differentiable."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=False,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    return embeds, pooled


@torch.no_grad()
def encode_latent_pool(vae, n: int, rng: np.random.Generator, split: str = "all") -> tuple[torch.Tensor, list[str]]:
    """`n` normalised ground-truth latents with their prompts, rendered and encoded once and re-used across epochs."""
    images, prompts = sample_training_batch(n, rng, split)
    latents = (_encode_images(vae, images) - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    return latents, prompts


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


def _with_components(pipe, **components):
    """The same pipeline with some components replaced (sharing every other one)."""
    extra = {}
    if "requires_safety_checker" in pipe.config:
        extra["requires_safety_checker"] = pipe.config.requires_safety_checker
    return type(pipe)(**{**pipe.components, **components}, **extra)


def learning_rate_factor(step: int, config: PretrainConfig) -> float:
    """Multiplier of `learning_rate` for optimizer step `step` (0-based): linear warm-up, then constant, then (with
    `lr_decay_steps`) a linear decay that reaches zero after the last step."""
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    return warmup * min(1.0, max(0.0, (config.transformer_steps - step) / max(1, config.lr_decay_steps)))


def _optimizer_step(step, loss, model, optimizer, scheduler, ema, pipe, config, recent, start, name) -> list[float]:
    """One optimizer and EMA step of a denoiser stage, with its progress log and EMA checkpoint; returns the window of
    recent losses. Shared by the SD3 transformer and the UNet stages."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    _ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
    recent = (recent + [loss.item()])[-50:]
    if step % config.log_every == 0 or step == config.transformer_steps:
        elapsed = time.perf_counter() - start
        logger.info(
            "%s step %d/%d  loss %.4f  grad %.2f  lr %.2e  %.2f s/step",
            name,
            step,
            config.transformer_steps,
            np.mean(recent),
            grad_norm.item(),
            scheduler.get_last_lr()[0],
            elapsed / step,
        )
    if config.checkpoint_every and config.checkpoint_dir and step % config.checkpoint_every == 0:
        path = os.path.join(config.checkpoint_dir, f"step-{step}")
        _with_components(pipe, **ema).save_pretrained(path)
        logger.info("saved EMA checkpoint %s", path)
    return recent


def train_transformer(
    pipe,
    latents: torch.Tensor,
    prompt_ids: torch.Tensor,
    prompts: list[str],
    empty_id: int,
    config: PretrainConfig,
    generator: torch.Generator,
) -> dict[str, torch.nn.Module]:
    """Rectified-flow pretraining; returns the EMA copies of the trained components, by pipeline component name.

    `x_t = (1 - t) x0 + t eps` with the velocity target `eps - x0` (what the flow-matching Euler sampler integrates),
    t logit-normal(0, 1) as in SD3, fed as `t * 1000` like the pipeline's timesteps. A `caption_dropout` fraction of
    the batch is conditioned on the empty prompt (`prompts[empty_id]`), which is the pipeline's negative prompt, so
    CFG works on the base. With `train_text_encoders` the two CLIP encoders learn with the transformer; otherwise
    every prompt is encoded once up front.
    """
    trainable = {"transformer": pipe.transformer}
    if config.train_text_encoders:
        trainable |= {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
        table = None
    else:
        with torch.no_grad():
            table = _encode_prompts(pipe, prompts)
    model = torch.nn.ModuleDict(trainable).requires_grad_(True).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.999)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, config))
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(1, config.transformer_steps + 1):
        idx = torch.randint(len(latents), (config.batch_size,), generator=generator)
        x0 = latents[idx]
        ids = prompt_ids[idx].clone()
        ids[torch.rand(config.batch_size, generator=generator) < config.caption_dropout] = empty_id
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(config.batch_size, generator=generator))
        t_ = t.view(-1, 1, 1, 1)
        x_t = (1 - t_) * x0 + t_ * noise
        if table is None:
            unique, inverse = torch.unique(ids, return_inverse=True)
            embeds, pooled = _encode_prompts(pipe, [prompts[i] for i in unique.tolist()])
            embeds, pooled = embeds[inverse], pooled[inverse]
        else:
            embeds, pooled = table[0][ids], table[1][ids]
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            pred = model["transformer"](
                hidden_states=x_t,
                timestep=t * 1000,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        recent = _optimizer_step(
            step, loss, model, optimizer, scheduler, ema, pipe, config, recent, start, "transformer"
        )
    model.requires_grad_(False).eval()
    return dict(ema)


@torch.no_grad()
def fit_unshifted_scaling(vae, n_images: int, rng: np.random.Generator) -> tuple[float, float]:
    """Set `scaling_factor = 1 / rms(latents)` and drop `shift_factor`, for SD1.x-family pipelines.

    `StableDiffusionPipeline` maps latents through `z * scaling_factor` only (no shift), so the scale is fitted to the
    latents' root mean square rather than their standard deviation: the scaled latents then have unit second moment,
    which the epsilon-prediction noise schedule assumes (SD1.x's 0.18215 was measured the same way, on raw latents).
    Returns the raw latents' (mean, rms).
    """
    images, _ = sample_training_batch(n_images, rng, "all")
    latents = _encode_images(vae, images)
    mean, rms = latents.mean().item(), latents.pow(2).mean().sqrt().item()
    vae.register_to_config(scaling_factor=1.0 / rms, shift_factor=None)
    return mean, rms


def init_sd_from_sd3(pipe, sd3_pipe) -> None:
    """Start an SD1.x-family shapes pipeline from a trained SD3 shapes base, in place: its VAE is copied (weights and
    config; latent scale re-fitted by `fit_unshifted_scaling` afterwards) and its first `CLIPTextModelWithProjection`
    initialises the `CLIPTextModel` (same tokenizer and sizes; the projection, which `StableDiffusionPipeline` does not
    use, is dropped).

    Raises:
        ValueError: if the two text encoders or VAEs differ in size.
    """
    text_state = {
        k.removeprefix("text_model."): v
        for k, v in sd3_pipe.text_encoder.state_dict().items()
        if not k.startswith("text_projection")
    }
    try:
        pipe.text_encoder.load_state_dict(text_state)
        pipe.vae.load_state_dict(sd3_pipe.vae.state_dict())
    except RuntimeError as err:
        raise ValueError(f"sd_init_from's text encoder or VAE does not match the UNet base's sizes: {err}") from err
    if pipe.tokenizer.get_vocab() != sd3_pipe.tokenizer.get_vocab():
        raise ValueError("sd_init_from's tokenizer has another vocabulary than the UNet base's.")


def train_unet(
    pipe,
    latents: torch.Tensor,
    prompt_ids: torch.Tensor,
    prompts: list[str],
    empty_id: int,
    config: PretrainConfig,
    generator: torch.Generator,
) -> dict[str, torch.nn.Module]:
    """Epsilon-prediction DDPM pretraining of a `StableDiffusionPipeline`'s UNet (and, with `train_text_encoders`,
    its CLIP text encoder); returns the EMA copies by pipeline component name.

    As SD1.x was trained: t uniform over the 1000 training steps of a `DDPMScheduler` with the pipeline scheduler's
    `scaled_linear` betas (0.00085-0.012), `x_t = add_noise(x0, eps, t)`, loss `||eps_theta(x_t, t, c) - eps||^2`.
    Caption dropout, optimizer, warm-up, EMA, logging and checkpoints are those of `train_transformer`.
    """
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if noise_scheduler.config.prediction_type != "epsilon":
        raise ValueError("train_unet trains epsilon prediction; the pipeline's scheduler predicts something else.")

    def encode(texts: list[str]) -> torch.Tensor:
        return pipe.encode_prompt(texts, "cpu", 1, do_classifier_free_guidance=False)[0]

    trainable = {"unet": pipe.unet}
    if config.train_text_encoders:
        trainable["text_encoder"] = pipe.text_encoder
        table = None
    else:
        with torch.no_grad():
            table = encode(prompts)
    model = torch.nn.ModuleDict(trainable).requires_grad_(True).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.999)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, config))
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(1, config.transformer_steps + 1):
        idx = torch.randint(len(latents), (config.batch_size,), generator=generator)
        x0 = latents[idx]
        ids = prompt_ids[idx].clone()
        ids[torch.rand(config.batch_size, generator=generator) < config.caption_dropout] = empty_id
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(num_train_timesteps, (config.batch_size,), generator=generator)
        x_t = noise_scheduler.add_noise(x0, noise, t)
        if table is None:
            unique, inverse = torch.unique(ids, return_inverse=True)
            embeds = encode([prompts[i] for i in unique.tolist()])[inverse]
        else:
            embeds = table[ids]
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            pred = model["unet"](x_t, t, encoder_hidden_states=embeds, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise)
        recent = _optimizer_step(step, loss, model, optimizer, scheduler, ema, pipe, config, recent, start, "unet")
    model.requires_grad_(False).eval()
    return dict(ema)


def pretrain(config: PretrainConfig):
    """Build, train and return the base pipeline (not saved; see `main`)."""
    from .tiny import build_tiny_sd3_pipeline
    from .world import VOCABULARY

    torch.set_num_threads(config.num_threads)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    if config.init_from is not None:
        pipe = _forget_load_records(load_base_pipeline(config.init_from))
        logger.info("continuing from %s; its VAE is kept", resolve_base_path(config.init_from))
    elif config.family == "sd":
        from .tiny import build_tiny_sd_pipeline

        pipe = build_tiny_sd_pipeline(VOCABULARY, "shapes", seed=config.seed)
        init_sd_from_sd3(pipe, load_base_pipeline(config.sd_init_from))
        mean, rms = fit_unshifted_scaling(pipe.vae, config.normalisation_images, rng)
        logger.info(
            "VAE and text encoder from %s; raw latent mean %.4f rms %.4f -> scaling_factor %.4f",
            resolve_base_path(config.sd_init_from),
            mean,
            rms,
            pipe.vae.config.scaling_factor,
        )
    else:
        pipe = build_tiny_sd3_pipeline(VOCABULARY, "shapes", seed=config.seed)
        t0 = time.perf_counter()
        pipe.vae.requires_grad_(True)
        mse = train_vae(pipe.vae, config, rng, generator)
        pipe.vae.requires_grad_(False)
        mean, std = fit_latent_normalisation(pipe.vae, config.normalisation_images, rng)
        logger.info(
            "vae done in %.0f s: recon mse %.5f, latent mean %.4f std %.4f", time.perf_counter() - t0, mse, mean, std
        )

    t0 = time.perf_counter()
    prompts = [spec.prompt for spec in all_prompts()]
    index = {p: i for i, p in enumerate(prompts)}
    latents, pool_prompts = encode_latent_pool(pipe.vae, config.pool_size, rng, config.split)
    prompt_ids = torch.tensor([index[p] for p in pool_prompts])
    logger.info("encoded %d latents in %.0f s", len(latents), time.perf_counter() - t0)

    train = train_unet if config.family == "sd" else train_transformer
    ema = train(pipe, latents, prompt_ids, [*prompts, ""], len(prompts), config, generator)
    pipe = _with_components(pipe, **ema)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_base_path(path: str) -> str:
    """`"shapes-base"` (alias `"shapes-sd3"`) names the shipped SD3 base, `"shapes-unet"` (alias `"unet"`) the shipped
    SD1.x-family UNet base; anything else is a directory."""
    if path == "unet":
        path = "shapes-unet"
    return BASE_NAMES.get(path, path)


def load_base_pipeline(path: str = "shapes-base", **kwargs):
    """A shapes base pipeline: `"shapes-base"` / `"shapes-sd3"` (the `StableDiffusion3Pipeline` shipped in
    `trl_nft/shapes/base`), `"shapes-unet"` / `"unet"` (the `StableDiffusionPipeline` shipped in
    `trl_nft/shapes/base_unet`) or a directory written by this script. Sample the SD3 base with
    `max_sequence_length=MAX_SEQUENCE_LENGTH` (`StableDiffusionPipeline` takes no such argument)."""
    from ..families import load_pipeline

    path = resolve_base_path(path)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"No shapes base model in {path}; build it with `python -m trl_nft.shapes.pretrain --output_dir {path}` "
            "(add `--family sd` for a UNet base)."
        )
    return load_pipeline(path, **kwargs)


def _parse_args(argv: list[str] | None) -> PretrainConfig:
    from transformers.hf_argparser import string_to_bool

    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    for name, value in asdict(defaults).items():
        kind = string_to_bool if isinstance(value, bool) else type(value) if value is not None else str
        # Both spellings, like the TrlParser-based `trl-nft` commands.
        flags = dict.fromkeys(("--" + name.replace("_", "-"), "--" + name))
        parser.add_argument(*flags, dest=name, type=kind, default=value, help=f"default: {value}")
    return PretrainConfig(**vars(parser.parse_args(argv)))


# What loading adds to a tokenizer's saved config beyond what building it wrote: load-time flags and defaults.
_TOKENIZER_LOAD_KEYS = (
    "name_or_path",
    "is_local",
    "local_files_only",
    "pad_token_type_id",
    "padding_side",
    "max_length",
    "pad_to_multiple_of",
)


def _forget_load_records(pipe):
    """Drop what loading recorded (`_name_or_path`, this machine's path, in each diffusers config; load flags in the
    tokenizer's), so that a base continued with `--init-from` saves the same files a base built from scratch does."""
    from diffusers.configuration_utils import FrozenDict

    for component in (pipe, *pipe.components.values()):
        internal = getattr(component, "_internal_dict", None)
        if internal is not None and "_name_or_path" in internal:
            component._internal_dict = FrozenDict({k: v for k, v in internal.items() if k != "_name_or_path"})
        init_kwargs = getattr(component, "init_kwargs", None)
        if isinstance(init_kwargs, dict):
            for key in _TOKENIZER_LOAD_KEYS:
                init_kwargs.pop(key, None)
    return pipe


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = _parse_args(argv)
    start = time.perf_counter()
    pipe = pretrain(config)
    os.makedirs(config.output_dir, exist_ok=True)
    pipe.save_pretrained(config.output_dir)
    minutes = (time.perf_counter() - start) / 60
    record = {**asdict(config), "output_dir": None, "checkpoint_dir": None, "wall_minutes": round(minutes, 1)}
    if config.init_from is not None:
        # The stage this one continued, so that the file alone says how to regenerate the result.
        previous = os.path.join(resolve_base_path(config.init_from), "pretrain_config.json")
        if os.path.isfile(previous):
            with open(previous) as f:
                record["init_from_config"] = json.load(f)
    with open(os.path.join(config.output_dir, "pretrain_config.json"), "w") as f:
        json.dump(record, f, indent=2)
    logger.info("saved the base to %s (%.1f min in all)", config.output_dir, minutes)


if __name__ == "__main__":
    main()
