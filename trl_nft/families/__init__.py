"""Model families: one declaration per family of diffusers pipelines, one generic adapter for all of them.

See `docs/families.md` for the supported-pipelines table and `docs/adding_a_family.md` to add one.
"""

from __future__ import annotations

import json
import os

import torch

from .adapter import (
    ATTENTION_TARGETS,
    DOCS_ADDING_A_FAMILY,
    ModelFamily,
    PipelineAdapter,
    UnsupportedPipelineError,
)
from .frames import FlowFrame, VPFrame


def _train_steps(pipe) -> float:
    return float(pipe.scheduler.config.get("num_train_timesteps", 1000))


def _vp(pipe, resolution):
    return VPFrame.from_scheduler_config(pipe.scheduler.config)


def _cogview4_frame(pipe, resolution):
    # CogView4 feeds the unshifted time to its transformer while the sampler follows sigmas shifted by mu(resolution).
    config = pipe.scheduler.config
    latent = resolution // pipe.vae_scale_factor
    seq_len = latent * latent // pipe.transformer.config.patch_size**2
    mu = (seq_len / config.get("base_image_seq_len", 256)) ** 0.5 * config.get("max_shift", 0.75) + config.get(
        "base_shift", 0.25
    )
    shift_type = config.get("time_shift_type", "exponential")
    return FlowFrame(scale=_train_steps(pipe), shift_mu=mu, shift_type=shift_type)


def _zimage_pack(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.unsqueeze(2).unbind(0))


def _zimage_unpack(x: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(x)).squeeze(2)


def _zimage_output(out, sample) -> torch.Tensor:
    return torch.stack([o.float() for o in out]).squeeze(2)


def _drop_extra_tokens(out: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    # FLUX.2 appends reference-image tokens to the sequence; the prediction for the image is the first part.
    return out[:, : sample.shape[1]]


def _hidream_output(out: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    # In training mode HiDream returns `[B, C, patches, p * p]` (unless its config sets force_inference_output).
    if out.shape == sample.shape:
        return out
    b, c, h, w = sample.shape
    p = int(round((out.shape[-1]) ** 0.5))
    out = out.reshape(b, c, h // p, w // p, p, p).permute(0, 1, 2, 4, 3, 5)
    return out.reshape(b, c, h, w)


def _packed_2x2(pipe) -> int:
    return pipe.vae_scale_factor * 2


_FLUX_SD3_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out")  # fmt: skip

_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

_DISTILLED = (
    "{name} is a few-step consistency-distilled sampler: its denoiser predicts clean images at a handful of fixed "
    "times (consistency parameterisation), not a velocity or noise field at any time t, so NFT's forward-process "
    "loss would retrain it into an ordinary diffusion model and lose the few-step property. Train its teacher "
    "({teacher}) with DiffusionNFT and distil again, or load a LoRA trained on the teacher."
)

FAMILIES: list[ModelFamily] = [
    ModelFamily(
        "sd3",
        ("StableDiffusion3Pipeline",),
        frame=lambda pipe, res: FlowFrame(scale=_train_steps(pipe)),
        lora_target_modules=_FLUX_SD3_TARGETS,  # official DiffusionNFT SD3 targets
        cfg_velocity=True,
    ),
    ModelFamily(
        "flux",
        ("FluxPipeline",),
        frame=lambda pipe, res: FlowFrame(scale=1.0),
        guidance="embedded",
        lora_target_modules=ATTENTION_TARGETS,
        static_args=("img_ids", "txt_ids"),
        resolution_multiple=_packed_2x2,
        notes="FLUX.1-dev: guidance_scale is a distilled guidance input (try 3.5); FLUX.1-schnell ignores it.",
    ),
    ModelFamily(
        "flux2",
        ("Flux2Pipeline",),
        frame=lambda pipe, res: FlowFrame(scale=1.0),
        guidance="embedded",
        unpack_output=_drop_extra_tokens,
        resolution_multiple=_packed_2x2,
    ),
    ModelFamily(
        "flux2-klein",
        ("Flux2KleinPipeline",),
        frame=lambda pipe, res: FlowFrame(scale=1.0),
        unpack_output=_drop_extra_tokens,
        resolution_multiple=_packed_2x2,
    ),
    ModelFamily(
        "sana",
        ("SanaPipeline", "SanaPAGPipeline"),
        frame=lambda pipe, res: FlowFrame(scale=_train_steps(pipe) * pipe.transformer.config.get("timestep_scale", 1)),
    ),
    ModelFamily(
        "sd",
        ("StableDiffusionPipeline",),
        frame=_vp,
        denoiser="unet",
        sample_arg="sample",
        lora_target_modules=_UNET_TARGETS,
        cfg_velocity=True,
    ),  # fmt: skip
    ModelFamily(
        "sdxl",
        ("StableDiffusionXLPipeline",),
        frame=_vp,
        denoiser="unet",
        sample_arg="sample",
        lora_target_modules=_UNET_TARGETS,
    ),  # fmt: skip
    ModelFamily(
        "lumina2",
        ("Lumina2Pipeline", "Lumina2Text2ImgPipeline"),
        # Lumina 2's t = 0 is noise and it predicts x0 - eps.
        frame=lambda pipe, res: FlowFrame(scale=-1.0, offset=1.0, sign=-1.0),
    ),
    ModelFamily("cogview4", ("CogView4Pipeline",), frame=_cogview4_frame),
    ModelFamily(
        "qwenimage",
        ("QwenImagePipeline",),
        frame=lambda pipe, res: FlowFrame(scale=1.0),
        # Qwen-Image's CFG is `true_cfg_scale` and needs a negative prompt; its `guidance_scale` is an unused embedding.
        guidance_kwargs=lambda w: {"true_cfg_scale": w, **({"negative_prompt": " "} if w > 1 else {})},
        resolution_multiple=_packed_2x2,
    ),
    ModelFamily(
        "zimage",
        ("ZImagePipeline",),
        frame=lambda pipe, res: FlowFrame(scale=-1.0, offset=1.0, sign=-1.0),
        # Z-Image combines pos + g (pos - neg): its g is the standard scale minus one.
        guidance_kwargs=lambda w: {"guidance_scale": w - 1.0},
        sample_arg="x",
        timestep_arg="t",
        pack_sample=_zimage_pack,
        unpack_sample=_zimage_unpack,
        unpack_output=_zimage_output,
        resolution_multiple=lambda pipe: pipe.vae_scale_factor * 2,
        cfg_velocity=True,
    ),
    ModelFamily(
        "chroma",
        ("ChromaPipeline",),
        frame=lambda pipe, res: FlowFrame(scale=1.0),
        static_args=("img_ids", "txt_ids"),
        resolution_multiple=_packed_2x2,
    ),
    ModelFamily(
        "krea2",
        ("Krea2Pipeline",),
        frame=lambda pipe, res: FlowFrame(scale=1.0),
        # Krea 2 combines cond + g (cond - uncond): its g is the standard scale minus one.
        guidance_kwargs=lambda w: {"guidance_scale": w - 1.0},
        static_args=("position_ids",),
    ),
    ModelFamily(
        "ernie-image",
        ("ErnieImagePipeline",),
        frame=lambda pipe, res: FlowFrame(scale=_train_steps(pipe)),
        resolution_multiple=_packed_2x2,
        cfg_velocity=True,
    ),
    ModelFamily("auraflow", ("AuraFlowPipeline",), frame=lambda pipe, res: FlowFrame(scale=1.0), cfg_velocity=True),
    ModelFamily(
        "hidream",
        ("HiDreamImagePipeline",),
        frame=lambda pipe, res: FlowFrame(scale=_train_steps(pipe), sign=-1.0),
        timestep_arg="timesteps",
        # Its Llama hidden states are stacked layers first: [layers, B, L, D].
        batch_dims=(("encoder_hidden_states_llama3", 1),),
        unpack_output=_hidream_output,
        lora_target_modules=("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t"),
        cfg_velocity=True,
    ),
    ModelFamily(
        "lcm",
        ("LatentConsistencyModelPipeline",),
        unsupported=_DISTILLED.format(name="LatentConsistencyModelPipeline", teacher="StableDiffusionPipeline"),
    ),
    ModelFamily(
        "sana-sprint",
        ("SanaSprintPipeline",),
        unsupported=_DISTILLED.format(name="SanaSprintPipeline", teacher="SanaPipeline"),
    ),
]


def register_family(family: ModelFamily) -> None:
    """Add (or replace, by pipeline class) a family declaration; see `docs/adding_a_family.md`."""
    classes = set(family.pipeline_classes)
    FAMILIES[:] = [f for f in FAMILIES if not classes & set(f.pipeline_classes)] + [family]


def get_family(pipeline) -> ModelFamily:
    """The declaration serving `pipeline`'s class (or a parent class).

    Raises:
        UnsupportedPipelineError: for a pipeline class no family serves, or one NFT does not apply to.
    """
    names = [cls.__name__ for cls in type(pipeline).__mro__]
    for name in names:
        for family in FAMILIES:
            if name in family.pipeline_classes:
                if family.unsupported:
                    raise UnsupportedPipelineError(family.unsupported)
                return family
    supported = sorted(c for f in FAMILIES if not f.unsupported for c in f.pipeline_classes)
    raise UnsupportedPipelineError(
        f"No DiffusionNFT model family for pipeline class {names[0]!r}. Supported pipelines: {', '.join(supported)}. "
        f"A family is a short declaration: see 'Adding a model family' ({DOCS_ADDING_A_FAMILY}) and "
        "trl_nft.families.register_family."
    )


def get_adapter(pipeline, resolution: int | None = None, pipeline_kwargs=None) -> PipelineAdapter:
    """The generic adapter for `pipeline`, configured by its family's declaration."""
    return PipelineAdapter(pipeline, get_family(pipeline), resolution=resolution, pipeline_kwargs=pipeline_kwargs)


def null_components(name_or_path: str | None) -> list[str]:
    """Components a local pipeline was saved without (`[null, null]` in its `model_index.json`)."""
    index_file = os.path.join(name_or_path or "", "model_index.json")
    if not os.path.isfile(index_file):
        return []
    with open(index_file) as f:
        index = json.load(f)
    return [key for key, value in index.items() if isinstance(value, list) and value == [None, None]]


def load_pipeline(name_or_path: str, **kwargs):
    """`DiffusionPipeline.from_pretrained`, also for local pipelines saved without some required components.

    A pipeline saved with, e.g., `text_encoder_3=None` records `[null, null]` in `model_index.json`, which
    `from_pretrained` refuses for non-optional components unless they are passed as `None`; this does that.
    """
    from diffusers import DiffusionPipeline

    for key in null_components(name_or_path):
        kwargs.setdefault(key, None)
    pipe = DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = [
    "ATTENTION_TARGETS",
    "FAMILIES",
    "FlowFrame",
    "ModelFamily",
    "PipelineAdapter",
    "UnsupportedPipelineError",
    "VPFrame",
    "get_adapter",
    "get_family",
    "load_pipeline",
    "null_components",
    "register_family",
]
