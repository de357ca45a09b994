"""Tiny, real diffusers text-to-image pipelines of every family trl_nft targets, built from configs with no download.

`build_tiny_pipeline(family, scheduler=None, seed=0)` returns a real pipeline (CPU, float32, randomly initialised,
progress bar off) whose denoiser, VAE, text encoder(s) and tokenizer(s) are the classes the released checkpoints use,
at the sizes of diffusers' own `get_dummy_components` (tests/pipelines/<family>/) or smaller. Text encoders are
built from configs; tokenizers are closed-vocabulary `PreTrainedTokenizerFast`s over a `tokenizers` WordLevel model,
with a chat template where the pipeline calls `apply_chat_template`. Everything is sized so that building a family
and sampling two 2-step images takes well under a second or two on one CPU core.

`FAMILIES[family]` is a `FamilySpec`: the pipeline class, schedulers known to work with it (keys of `SCHEDULERS`),
the default image side, the call kwargs a quick sample needs and the denoiser's attention Linear suffixes for peft's
`target_modules`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAD, BOS, UNK, EOS = "<pad>", "<bos>", "<unk>", "<eos>"
# Chat-template markers of the text encoders' real tokenizers, kept atomic like their special tokens.
CHAT_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<start_of_turn>",
    "<end_of_turn>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
)
# Words of the prompts used in tests (shapes world) plus chat roles; every other word maps to <unk>.
WORDS = (
    "a an and above below left right of the to one two three four red green blue yellow circle circles square "
    "squares triangle triangles system user assistant model describe image"
).split()
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "<bos>{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{% else %}[INST]{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}"
    "{% endfor %}{% endif %}{% if m['role'] == 'system' %}[/SYSTEM_PROMPT]{% else %}[/INST]{% endif %}{% endfor %}"
)


def build_tokenizer(
    model_max_length: int = 77,
    add_bos: bool = False,
    add_eos: bool = False,
    chat_template: str | None = None,
    padding_side: str = "right",
):
    """A word-level tokenizer that splits words, single punctuation marks and newlines like a BPE would.

    Ids: pad 0, bos 1, unk 2, eos 3 (not 2, so CLIP pools at eos, not at `argmax(input_ids)`), chat markers, words.
    The split matches Qwen's token count on the Qwen-Image / Krea 2 system prefix (34 tokens), so the pipelines'
    hard-coded `prompt_template_encode_start_idx` drops exactly the template.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    punctuation = list(".,:;!?'\"()-_|<>/[]{}\n")
    vocab = {PAD: 0, BOS: 1, UNK: 2, EOS: 3}
    for token in (*CHAT_TOKENS, *punctuation, *WORDS):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="removed", invert=True)
    tok.add_special_tokens([PAD, BOS, UNK, EOS, *CHAT_TOKENS])
    single = " ".join(([BOS] if add_bos else []) + ["$A"] + ([EOS] if add_eos else []))
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(BOS, 1), (EOS, 3)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=model_max_length,
        padding_side=padding_side,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Schedulers: each builds from the pipeline's current scheduler config, so shift / dynamic-shifting settings carry over.


def _flow_shift(config) -> float:
    return float(config.get("shift", 1.0) or 1.0)


def _flow_euler(config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)


def _flow_heun(config):
    from diffusers import FlowMatchHeunDiscreteScheduler

    return FlowMatchHeunDiscreteScheduler.from_config(config)


def _flow_lcm(config):
    from diffusers import FlowMatchLCMScheduler

    return FlowMatchLCMScheduler.from_config(config)


def _flow_dpm(config):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(
        config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=_flow_shift(config),
    )


def _flow_unipc(config):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(
        config, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=_flow_shift(config)
    )


def _ddim(config):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config)


def _dpm(config):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)


def _euler(config):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(config)


def _unipc(config):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(config)


def _lcm(config):
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(config)


def _scm(config):
    from diffusers import SCMScheduler

    return SCMScheduler.from_config(config)


SCHEDULERS: Mapping[str, Callable[[Any], Any]] = MappingProxyType(
    {
        "flow-euler": _flow_euler,
        "flow-heun": _flow_heun,
        "flow-dpm++": _flow_dpm,
        "flow-unipc": _flow_unipc,
        "flow-lcm": _flow_lcm,
        "ddim": _ddim,
        "dpm++": _dpm,
        "euler": _euler,
        "unipc": _unipc,
        "lcm": _lcm,
        "scm": _scm,
    }
)
"""Scheduler name -> `fn(scheduler_config) -> scheduler`, each `SchedulerClass.from_config(config, **overrides)`."""


def set_scheduler(pipe, name: str):
    """Replace `pipe.scheduler` by `SCHEDULERS[name]` built from the current scheduler's config; returns `pipe`."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}: use one of {sorted(SCHEDULERS)}.")
    pipe.scheduler = SCHEDULERS[name](pipe.scheduler.config)
    return pipe


# ---------------------------------------------------------------------------------------------------------------------
# Shared components.


def _clip(tokenizer, hidden: int = 32, layers: int = 2, with_projection: bool = False, max_positions: int = 77):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        projection_dim=hidden,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _clip_tokenizer(max_length: int = 77):
    return build_tokenizer(max_length, add_bos=True, add_eos=True)


def _t5(tokenizer, d_model: int = 32, layers: int = 1, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs = dict(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=d_model * 2,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        dropout_rate=0.0,
    )
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kwargs)).eval()
    model = T5EncoderModel(T5Config(**kwargs)).eval()
    return model


def _t5_tokenizer(max_length: int = 512):
    return build_tokenizer(max_length, add_eos=True)


def _vae_kl(latent_channels: int = 4, blocks: int = 2, channels: int = 8, **kwargs):
    from diffusers import AutoencoderKL

    block_out = [channels * (2**i) if i else channels for i in range(blocks)]
    block_out = [min(c, 16) for c in block_out]
    defaults = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=block_out,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(4, channels),
        sample_size=32,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    defaults.update(kwargs)
    return AutoencoderKL(**defaults).eval()


def _qwen_vae():
    from diffusers import AutoencoderKLQwenImage

    z_dim = 4
    return AutoencoderKLQwenImage(
        base_dim=z_dim * 2,
        z_dim=z_dim,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    ).eval()


def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def _dc_vae():
    from diffusers import AutoencoderDC

    return AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()


def _gemma2(tokenizer, hidden: int = 8, layers: int = 1):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tokenizer),
        head_dim=8,
        hidden_size=hidden,
        intermediate_size=16,
        num_attention_heads=2,
        num_hidden_layers=layers,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        sliding_window=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
    )
    return Gemma2Model(config).eval()


def _qwen3(tokenizer, hidden: int = 16, layers: int = 2, causal_lm: bool = False):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()


def _unet(cross_attention_dim: int = 32, **kwargs):
    from diffusers import UNet2DConditionModel

    defaults = dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        norm_num_groups=4,
    )
    defaults.update(kwargs)
    return UNet2DConditionModel(**defaults).eval()


def _flux_scheduler(**kwargs):
    """FLUX.1 / FLUX.2 / Chroma's released scheduler config: resolution-dependent (dynamic) shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    config.update(kwargs)
    return FlowMatchEulerDiscreteScheduler(**config)


def _ddpm_scheduler_config(**kwargs):
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    config.update(kwargs)
    return config


# ---------------------------------------------------------------------------------------------------------------------
# Family builders: each returns the pipeline (default scheduler), weights seeded by the caller.


def _build_sd3():
    from trl_nft.shapes import VOCABULARY
    from trl_nft.shapes.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(VOCABULARY, "test", seed=torch.initial_seed())


def _build_flux(guidance_embeds: bool):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    return FluxPipeline(
        scheduler=_flux_scheduler(),
        vae=_vae_kl(latent_channels=1, blocks=1, channels=4, norm_num_groups=1),
        text_encoder=_clip(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=_t5(tokenizer_2),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )


MISTRAL_LAYERS = (
    30  # Flux2Pipeline stacks hidden states 10, 20 and 30 of its text encoder (`text_encoder_out_layers`).
)
QWEN3_KLEIN_LAYERS = 27  # Flux2KleinPipeline stacks hidden states 9, 18 and 27.


def _build_flux2():
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = build_tokenizer(512, chat_template=MISTRAL_CHAT_TEMPLATE)
    hidden = 8
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 16,
            "max_position_embeddings": 512,
            "num_attention_heads": 2,
            "num_hidden_layers": MISTRAL_LAYERS,
            "num_key_value_heads": 1,
            "head_dim": 4,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "image_size": 30,
            "patch_size": 6,
            "num_channels": 3,
        },
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        image_seq_length=4,
        vision_feature_layer=-1,
        image_token_index=len(tokenizer) - 1,
    )
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * hidden,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
    ).eval()
    return Flux2Pipeline(
        scheduler=_flux_scheduler(),
        vae=_flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _build_flux2_klein():
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    tokenizer = build_tokenizer(512, chat_template=QWEN_CHAT_TEMPLATE)
    hidden = 8
    text_encoder = _qwen3(tokenizer, hidden=hidden, layers=QWEN3_KLEIN_LAYERS, causal_lm=True)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * hidden,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    ).eval()
    return Flux2KleinPipeline(
        scheduler=_flux_scheduler(),
        vae=_flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _sana_transformer(**kwargs):
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=32,
        **kwargs,
    ).eval()


def _build_sana():
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    tokenizer = build_tokenizer(512, add_bos=True, padding_side="right")
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=_gemma2(tokenizer),
        vae=_dc_vae(),
        transformer=_sana_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def _build_sana_sprint():
    from diffusers import SanaSprintPipeline, SCMScheduler

    tokenizer = build_tokenizer(512, add_bos=True, padding_side="right")
    return SanaSprintPipeline(
        tokenizer=tokenizer,
        text_encoder=_gemma2(tokenizer),
        vae=_dc_vae(),
        transformer=_sana_transformer(qk_norm="rms_norm_across_heads", guidance_embeds=True),
        scheduler=SCMScheduler(),
    )


def _build_sd(prediction_type: str):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = _clip_tokenizer()
    # SD 1.x (epsilon) and SD 2.x (v-prediction) share the scaled-linear DDPM schedule; only the prediction differs.
    scheduler = DDIMScheduler.from_config(_ddpm_scheduler_config(prediction_type=prediction_type))
    return StableDiffusionPipeline(
        vae=_vae_kl(blocks=2, channels=8),
        text_encoder=_clip(tokenizer),
        tokenizer=tokenizer,
        unet=_unet(32),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _build_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    hidden = 16
    unet = _unet(
        2 * hidden,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=hidden + 6 * 8,
        use_linear_projection=True,
    )
    return StableDiffusionXLPipeline(
        vae=_vae_kl(blocks=2, channels=8),
        text_encoder=_clip(tokenizer, hidden=hidden),
        text_encoder_2=_clip(tokenizer_2, hidden=hidden, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(_ddpm_scheduler_config()),
        image_encoder=None,
        feature_extractor=None,
    )


def _build_lcm():
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    tokenizer = _clip_tokenizer()
    return LatentConsistencyModelPipeline(
        vae=_vae_kl(blocks=2, channels=8),
        text_encoder=_clip(tokenizer),
        tokenizer=tokenizer,
        unet=_unet(32, time_cond_proj_dim=32),
        scheduler=LCMScheduler.from_config(_ddpm_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _build_lumina2():
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    tokenizer = build_tokenizer(512, add_bos=True)
    transformer = Lumina2Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=1,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2],
        cap_feat_dim=8,
    ).eval()
    # Lumina2Pipeline hard-codes a VAE scale factor of 8: four VAE blocks.
    vae = _vae_kl(latent_channels=4, blocks=4, channels=4, norm_num_groups=2, block_out_channels=[4, 4, 4, 4])
    return Lumina2Pipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0),
        text_encoder=_gemma2(tokenizer, layers=2),
        tokenizer=tokenizer,
    )


def _build_cogview4():
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmForCausalLM

    tokenizer = build_tokenizer(1024, padding_side="left")
    text_encoder = GlmForCausalLM(
        GlmConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=4,
        out_channels=4,
        text_embed_dim=16,
        time_embed_dim=8,
        condition_dim=4,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )
    return CogView4Pipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae_kl(blocks=2, channels=8),
        transformer=transformer,
        scheduler=scheduler,
    )


def _build_qwenimage():
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer(1024)
    hidden = 16
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=hidden,
        vocab_size=len(tokenizer),
        vision_start_token_id=len(tokenizer) + 1,
        vision_end_token_id=len(tokenizer) + 2,
        vision_token_id=len(tokenizer) + 3,
        image_token_id=len(tokenizer) + 4,
        video_token_id=len(tokenizer) + 5,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=hidden,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()
    return QwenImagePipeline(
        transformer=transformer,
        vae=_qwen_vae(),
        scheduler=_flux_scheduler(max_image_seq_len=8192, max_shift=0.9, shift=1.0, shift_terminal=0.02),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


def _build_zimage():
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tokenizer = build_tokenizer(512, chat_template=QWEN_CHAT_TEMPLATE)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    ).eval()
    # `x_pad_token` / `cap_pad_token` are `torch.empty` (NaN-prone): fix them, as diffusers' tests do.
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae_kl(blocks=2, channels=8, latent_channels=4),
        text_encoder=_qwen3(tokenizer, hidden=16, layers=2),
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _build_chroma():
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    tokenizer = _t5_tokenizer()
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=[4, 4, 8],
        approximator_hidden_dim=32,
        approximator_layers=1,
        approximator_num_channels=16,
    ).eval()
    return ChromaPipeline(
        scheduler=_flux_scheduler(),
        vae=_vae_kl(latent_channels=1, blocks=1, channels=4, norm_num_groups=1),
        text_encoder=_t5(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def _build_auraflow():
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer = _t5_tokenizer()
    transformer = AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        out_channels=4,
        pos_embed_max_size=64,
    ).eval()
    # AuraFlow's norms are modulated by near-zero-initialised Linear layers, which at this size make the image
    # independent of the prompt and of any LoRA: widen their initial weights so conditioning reaches the output.
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and ("norm" in name or "time_step_proj" in name):
                torch.nn.init.normal_(module.weight, std=0.5)
    return AuraFlowPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5(tokenizer, umt5=True),
        vae=_vae_kl(blocks=2, channels=8),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73),
    )


def _build_hidream():
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    clip_tok, clip_tok_2, t5_tok = _clip_tokenizer(128), _clip_tokenizer(128), _t5_tokenizer()
    llama_tok = build_tokenizer(512, add_bos=True)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(llama_tok),
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=llama_tok.pad_token_id,
            bos_token_id=llama_tok.bos_token_id,
            eos_token_id=llama_tok.eos_token_id,
        )
    ).eval()
    llama.generation_config.pad_token_id = llama_tok.pad_token_id
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[32, 16],
        text_emb_dim=64,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(32, 32),
        llama_layers=(0, 1),
    ).eval()
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae_kl(blocks=2, channels=8, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip(clip_tok, with_projection=True, max_positions=128),
        tokenizer=clip_tok,
        text_encoder_2=_clip(clip_tok_2, with_projection=True, max_positions=128),
        tokenizer_2=clip_tok_2,
        text_encoder_3=_t5(t5_tok),
        tokenizer_3=t5_tok,
        text_encoder_4=llama,
        tokenizer_4=llama_tok,
        transformer=transformer,
    )
    # HiDream rescales every request to the area of `default_sample_size * vae_scale_factor` squared (128 -> 256 px
    # here); 8 latents keep it at 16 px. An instance attribute: `from_pretrained` restores 128.
    pipe.default_sample_size = 8  # 16 px
    return pipe


def _build_krea2():
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLModel

    tokenizer = build_tokenizer(1024)
    transformer = Krea2Transformer2DModel(
        in_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        timestep_embed_dim=8,
        text_hidden_dim=16,
        num_text_layers=3,
        text_num_attention_heads=2,
        text_num_key_value_heads=1,
        text_intermediate_size=16,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
        axes_dims_rope=(4, 2, 2),
        rope_theta=1000.0,
    ).eval()
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vocab_size=len(tokenizer),
        vision_start_token_id=len(tokenizer) + 1,
        vision_end_token_id=len(tokenizer) + 2,
        image_token_id=len(tokenizer) + 3,
        video_token_id=len(tokenizer) + 4,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=6400
    )
    return Krea2Pipeline(
        transformer=transformer,
        vae=_qwen_vae(),
        scheduler=scheduler,
        text_encoder=Qwen3VLModel(config).eval(),
        tokenizer=tokenizer,
        text_encoder_select_layers=(0, 1, 2),
    )


def _build_ernie_image():
    from diffusers import ErnieImagePipeline, ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import Mistral3Config, Mistral3Model

    tokenizer = build_tokenizer(512, add_bos=True)
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "max_position_embeddings": 512,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "image_size": 30,
            "patch_size": 6,
        },
        image_token_index=len(tokenizer) - 1,
    )
    transformer = ErnieImageTransformer2DModel(
        hidden_size=32,
        num_attention_heads=2,
        num_layers=1,
        ffn_hidden_size=32,
        in_channels=4,
        out_channels=4,
        text_in_dim=16,
        rope_axes_dim=(4, 6, 6),
    ).eval()
    # The shared adaLN modulation and the final projection are zero-initialised (DiT style): the output would be 0,
    # independent of prompt and LoRA, and no gradient would reach a LoRA. Random small weights make both matter.
    with torch.no_grad():
        for module in (transformer.adaLN_modulation[1], transformer.final_linear):
            torch.nn.init.normal_(module.weight, std=0.2)
            torch.nn.init.normal_(module.bias, std=0.2)
    # No prompt-enhancer (`pe`) model: the pipeline then uses the prompt as given.
    return ErnieImagePipeline(
        transformer=transformer,
        vae=_flux2_vae(),
        text_encoder=Mistral3Model(config).eval(),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


# ---------------------------------------------------------------------------------------------------------------------


ATTN = ("to_q", "to_k", "to_v", "to_out.0")
ATTN_ADDED = (*ATTN, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class FamilySpec:
    """One family of the matrix.

    Args:
        pipeline_class (`str`): the diffusers pipeline class name.
        denoiser_class (`str`): the class of `pipe.transformer` / `pipe.unet`.
        schedulers (`tuple[str, ...]`): keys of `SCHEDULERS` known to sample with it; the first is its default.
        size (`int`): the default (smallest working) image side in pixels.
        call_kwargs (`Mapping[str, Any]`): `__call__` kwargs a quick CFG-free sample needs besides height/width; they
            override `guidance_scale=1.0` (Z-Image and Krea 2 are CFG-free at `guidance_scale=0`).
        lora_targets (`tuple[str, ...]`): attention Linear name suffixes of the denoiser, for peft `target_modules`.
        builder (`Callable[[], DiffusionPipeline]`): builds the pipeline (weights seeded by the caller).
        notes (`str`): the denoiser call convention where it is unusual.
    """

    pipeline_class: str
    denoiser_class: str
    schedulers: tuple[str, ...]
    size: int
    lora_targets: tuple[str, ...]
    builder: Callable[[], Any]
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""

    @property
    def denoiser_attr(self) -> str:
        return "unet" if self.denoiser_class == "UNet2DConditionModel" else "transformer"


FAMILIES: dict[str, FamilySpec] = {
    "sd3": FamilySpec(
        "StableDiffusion3Pipeline",
        "SD3Transformer2DModel",
        ("flow-euler", "flow-heun", "flow-dpm++", "flow-unipc"),
        16,
        ATTN_ADDED,
        _build_sd3,
        {"max_sequence_length": 8},
    ),
    "flux-dev": FamilySpec(
        "FluxPipeline",
        "FluxTransformer2DModel",
        ("flow-euler", "flow-dpm++", "flow-unipc"),
        16,
        ATTN_ADDED,
        lambda: _build_flux(guidance_embeds=True),
        {"max_sequence_length": 8},
        "guidance_scale feeds the guidance embedding (distilled guidance, not CFG)",
    ),
    "flux-schnell": FamilySpec(
        "FluxPipeline",
        "FluxTransformer2DModel",
        ("flow-euler", "flow-dpm++", "flow-unipc"),
        16,
        ATTN_ADDED,
        lambda: _build_flux(guidance_embeds=False),
        {"max_sequence_length": 8},
        "packed 2x2 latents (B, HW/4, 4C) with img_ids/txt_ids; transformer timestep = t / 1000",
    ),
    "flux2": FamilySpec(
        "Flux2Pipeline",
        "Flux2Transformer2DModel",
        ("flow-euler", "flow-dpm++", "flow-unipc"),
        16,
        (*ATTN_ADDED, "to_qkv_mlp_proj"),
        _build_flux2,
        {"max_sequence_length": 40},
        "packed latents with 4-axis ids; timestep = t / 1000; text = 3 stacked Mistral3 hidden layers",
    ),
    "flux2-klein": FamilySpec(
        "Flux2KleinPipeline",
        "Flux2Transformer2DModel",
        ("flow-euler", "flow-dpm++", "flow-unipc"),
        16,
        (*ATTN_ADDED, "to_qkv_mlp_proj"),
        _build_flux2_klein,
        {"max_sequence_length": 16},
        "as flux2, Qwen3 text layers 9/18/27; no guidance embedding",
    ),
    "sana": FamilySpec(
        "SanaPipeline",
        "SanaTransformer2DModel",
        ("flow-dpm++", "flow-euler", "flow-unipc"),
        32,
        ATTN,
        _build_sana,
        {"max_sequence_length": 8, "use_resolution_binning": False},
        "transformer timestep = t * timestep_scale; Gemma2 prompt with the complex human instruction prefix",
    ),
    "sd15": FamilySpec(
        "StableDiffusionPipeline",
        "UNet2DConditionModel",
        ("ddim", "dpm++", "euler", "unipc"),
        16,
        ATTN,
        lambda: _build_sd("epsilon"),
        {},
        "epsilon prediction; integer DDPM timesteps",
    ),
    "sd2": FamilySpec(
        "StableDiffusionPipeline",
        "UNet2DConditionModel",
        ("ddim", "euler", "dpm++", "unipc"),
        16,
        ATTN,
        lambda: _build_sd("v_prediction"),
        {},
        "v-prediction (scheduler prediction_type)",
    ),
    "sdxl": FamilySpec(
        "StableDiffusionXLPipeline",
        "UNet2DConditionModel",
        ("euler", "ddim", "dpm++", "unipc"),
        16,
        ATTN,
        _build_sdxl,
        {},
        "added_cond_kwargs: text_embeds (pooled) + time_ids (original/crop/target size)",
    ),
    "lumina2": FamilySpec(
        "Lumina2Pipeline",
        "Lumina2Transformer2DModel",
        ("flow-euler", "flow-unipc"),
        32,
        ("to_q", "to_k", "to_v", "to_out.0"),
        _build_lumina2,
        {"max_sequence_length": 48},
        "the transformer's time is 1 - t (t=0 noise); the pipeline negates its output (velocity sign flip)",
    ),
    "cogview4": FamilySpec(
        "CogView4Pipeline",
        "CogView4Transformer2DModel",
        ("flow-euler", "flow-lcm"),
        32,
        ATTN,
        _build_cogview4,
        {"max_sequence_length": 16},
        "custom sigmas + dynamic (linear) shift; extra conditions original_size/target_size/crop_coords",
    ),
    "qwenimage": FamilySpec(
        "QwenImagePipeline",
        "QwenImageTransformer2DModel",
        ("flow-euler", "flow-unipc"),
        32,
        ATTN_ADDED,
        _build_qwenimage,
        {"max_sequence_length": 16, "true_cfg_scale": 1.0},
        "5-D (frame) latents, packed 2x2; transformer timestep = t/1000",
    ),
    "zimage": FamilySpec(
        "ZImagePipeline",
        "ZImageTransformer2DModel",
        ("flow-euler", "flow-lcm"),
        16,
        ("to_q", "to_k", "to_v", "to_out.0"),
        _build_zimage,
        {"max_sequence_length": 16, "guidance_scale": 0.0},
        "CFG-free is guidance_scale=0 (pred = pos + s * (pos - neg)); denoiser takes lists of per-image (C, 1, H, W) latents and of unpadded caption features, timestep "
        "(1000 - t) / 1000, output negated; the pipeline rewrites the caller's prompt list in place (pass a copy)",
    ),
    "chroma": FamilySpec(
        "ChromaPipeline",
        "ChromaTransformer2DModel",
        ("flow-euler", "flow-unipc"),
        16,
        ATTN_ADDED,
        _build_chroma,
        {"max_sequence_length": 8},
        "packed latents like FLUX; timestep = t / 1000; T5 attention mask passed to the transformer",
    ),
    "auraflow": FamilySpec(
        "AuraFlowPipeline",
        "AuraFlowTransformer2DModel",
        ("flow-euler", "flow-unipc", "flow-dpm++"),
        32,
        ATTN_ADDED,
        _build_auraflow,
        {"max_sequence_length": 8},
        "timestep = t / 1000; modulation layers widened at init (see _build_auraflow)",
    ),
    "hidream": FamilySpec(
        "HiDreamImagePipeline",
        "HiDreamImageTransformer2DModel",
        ("flow-euler", "flow-unipc"),
        16,
        ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t"),
        _build_hidream,
        {"max_sequence_length": 8},
        "kwarg `timesteps` (plural), output negated; four text encoders (2 CLIP, T5, Llama layers)",
    ),
    "lcm": FamilySpec(
        "LatentConsistencyModelPipeline",
        "UNet2DConditionModel",
        ("lcm",),
        16,
        ATTN,
        _build_lcm,
        {},
        "consistency model: guidance_scale is an embedding (time_cond_proj_dim); only its LCMScheduler applies",
    ),
    "sana-sprint": FamilySpec(
        "SanaSprintPipeline",
        "SanaTransformer2DModel",
        ("scm",),
        32,
        ATTN,
        _build_sana_sprint,
        {"max_sequence_length": 8, "use_resolution_binning": False},
        "sCM (TrigFlow) few-step model: only its SCMScheduler applies; guidance is an embedding",
    ),
    "krea2": FamilySpec(
        "Krea2Pipeline",
        "Krea2Transformer2DModel",
        ("flow-euler", "flow-unipc"),
        32,
        ("to_q", "to_k", "to_v", "to_out.0"),
        _build_krea2,
        {"max_sequence_length": 8, "guidance_scale": 0.0},
        "CFG-free is guidance_scale=0 (pred = pos + s * (pos - neg)); timestep = t / num_train_timesteps; Qwen3-VL text layers stacked (text_encoder_select_layers)",
    ),
}
"""The families of issue 12 (and Krea 2): the pipelines the trainer supports or refuses by name."""

EXTRA_FAMILIES: dict[str, FamilySpec] = {
    "ernie-image": FamilySpec(
        "ErnieImagePipeline",
        "ErnieImageTransformer2DModel",
        ("flow-euler", "flow-lcm"),
        16,
        ATTN,
        _build_ernie_image,
        {"use_pe": False},
        "Flux2 VAE latents patchified 2x2 into channels; per-prompt unpadded Mistral3 hidden states (list); "
        "passes custom sigmas (Heun / UniPC / DPM-Solver refuse them)",
    ),
}
"""Other text-to-image pipelines of diffusers 0.42.1 with a LoRA loader, built tiny; not (yet) trainer families."""


def _widen_text_embeddings(pipe):
    # Random text-encoder embeddings (std 0.02) make every prompt look alike, so the image barely depends on it;
    # std 1 keeps prompts apart even though the text encoders stay untrained.
    from transformers import PreTrainedModel

    for component in pipe.components.values():
        if isinstance(component, PreTrainedModel):
            torch.nn.init.normal_(component.get_input_embeddings().weight, std=1.0)


def build_tiny_pipeline(family: str, scheduler: str | None = None, seed: int = 0):
    """Build a randomly initialised tiny pipeline of `family` (CPU, float32, progress bar off).

    Args:
        family (`str`): a key of `FAMILIES` or `EXTRA_FAMILIES`.
        scheduler (`str`, *optional*): a key of `SCHEDULERS`; defaults to the family's first scheduler.
        seed (`int`, defaults to 0): seeds the weight initialisation, so two calls give identical pipelines.

    Raises:
        ValueError: for an unknown family or scheduler.
    """
    spec = FAMILIES.get(family) or EXTRA_FAMILIES.get(family)
    if spec is None:
        raise ValueError(f"Unknown family {family!r}: use one of {sorted(FAMILIES) + sorted(EXTRA_FAMILIES)}.")
    torch.manual_seed(seed)
    pipe = spec.builder()
    if family != "sd3":  # the SD3 builder (trl_nft.shapes.tiny) widens its own
        _widen_text_embeddings(pipe)
    set_scheduler(pipe, scheduler or spec.schedulers[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe
