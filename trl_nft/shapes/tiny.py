"""Tiny, real `StableDiffusion3Pipeline`s and `StableDiffusionPipeline`s (SD1.x family) built from configs, with no
download.

Used by the test-suite and as the architectures of the shipped shapes-world bases (`build_tiny_sd3_pipeline`:
`trl_nft/shapes/base`; `build_tiny_sd_pipeline`: `trl_nft/shapes/base_unet`). For SD3, every part is a real diffusers
or transformers class (VAE, two CLIP text encoders with word-level tokenizers, SD3 transformer, flow-matching
scheduler), so `save_pretrained` / `DiffusionPipeline.from_pretrained` / `load_lora_weights` work on it as on
SD3.5. There is no T5: with `text_encoder_3=None` the pipeline feeds zeros for its part of the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


PAD, BOS, UNK, EOS = "<pad>", "<bos>", "<unk>", "<eos>"


@dataclass(frozen=True)
class TinySD3Spec:
    """Sizes of a tiny SD3 pipeline. `preset("test")` is the fastest; `preset("shapes")` is the demo base."""

    sample_size: int = 16  # latent side; image side = sample_size * 2 (one VAE down-block)
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 32
    text_hidden: int = 32
    text_layers: int = 2
    text_max_length: int = 16
    vae_channels: tuple[int, ...] = (32, 64)

    @classmethod
    def preset(cls, name: str) -> TinySD3Spec:
        if name == "test":
            return cls(sample_size=8, num_layers=2, num_heads=2, head_dim=16, vae_channels=(8, 16))
        if name == "shapes":
            return cls(sample_size=16, num_layers=4, num_heads=4, head_dim=32, vae_channels=(32, 64))
        raise ValueError(f"Unknown tiny pipeline preset {name!r}: use 'test' or 'shapes'.")


def build_word_tokenizer(vocabulary: Sequence[str], model_max_length: int):
    """A closed-vocabulary, whitespace word-level tokenizer, wrapped so that it saves and loads like any tokenizer.

    A CLIP BPE tokenizer built from whole words and no merges maps every multi-letter word to unknown, so a
    `tokenizers` WordLevel model is used instead. Ids: pad 0, bos 1, unk 2, eos 3, then the words. The eos id is not 2
    because CLIP's pooled output then falls back to `argmax(input_ids)`, which would pick a word, not eos.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w.lower() for w in vocabulary} - {PAD, BOS, UNK, EOS})
    vocab = {PAD: 0, BOS: 1, UNK: 2, EOS: 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=model_max_length,
    )


def _clip_text_config(tokenizer, spec, **extra):
    """The small CLIP text-encoder config both tiny builders use, sized by `spec` and tied to the word tokenizer."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=2,
        max_position_embeddings=spec.text_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        hidden_act="gelu",
        **extra,
    )


def build_tiny_sd3_pipeline(
    vocabulary: Sequence[str], spec: TinySD3Spec | str = "test", seed: int = 0, shift: float = 2.0
):
    """Build a randomly initialised tiny `StableDiffusion3Pipeline` (CPU, float32).

    Args:
        vocabulary: the words prompts may use (others map to `<unk>`).
        spec: a `TinySD3Spec` or a preset name.
        seed: seeds the weight initialisation, so two calls give identical pipelines.
        shift: the flow-matching scheduler's time shift.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    if isinstance(spec, str):
        spec = TinySD3Spec.preset(spec)
    tokenizer = build_word_tokenizer(vocabulary, spec.text_max_length)
    text_config = _clip_text_config(tokenizer, spec, projection_dim=spec.text_hidden)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    # Random CLIP embeddings are tiny (std 0.02) so every prompt looks alike; wider ones keep prompts apart even
    # for frozen, untrained text encoders.
    for enc in (text_encoder, text_encoder_2):
        torch.nn.init.normal_(enc.text_model.embeddings.token_embedding.weight, std=1.0)
        torch.nn.init.normal_(enc.text_model.embeddings.position_embedding.weight, std=0.5)
    inner = spec.num_heads * spec.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=spec.sample_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=spec.num_layers,
        attention_head_dim=spec.head_dim,
        num_attention_heads=spec.num_heads,
        joint_attention_dim=2 * spec.text_hidden,
        caption_projection_dim=inner,
        pooled_projection_dim=2 * spec.text_hidden,
        pos_embed_max_size=spec.sample_size,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(spec.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(spec.vae_channels),
        block_out_channels=list(spec.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(8, spec.vae_channels[0]),
        sample_size=spec.sample_size * 2 ** (len(spec.vae_channels) - 1),
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_word_tokenizer(vocabulary, spec.text_max_length),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class TinySDSpec:
    """Sizes of a tiny SD1.x-family pipeline (`StableDiffusionPipeline`, a `UNet2DConditionModel`).

    `preset("test")` is the fastest; `preset("shapes")` is the UNet base shipped in `trl_nft/shapes/base_unet`.
    """

    sample_size: int = 16  # latent side; image side = sample_size * 2 (one VAE down-block)
    block_out_channels: tuple[int, ...] = (32, 64, 96)
    layers_per_block: int = 1
    attention_head_dim: int = 32  # per-head width; heads = block width / attention_head_dim
    norm_num_groups: int = 32
    text_hidden: int = 32
    text_layers: int = 2
    text_max_length: int = 16
    vae_channels: tuple[int, ...] = (32, 64)

    @classmethod
    def preset(cls, name: str) -> TinySDSpec:
        if name == "test":
            return cls(
                sample_size=8,
                block_out_channels=(16, 32),
                attention_head_dim=8,
                norm_num_groups=8,
                text_hidden=16,
                vae_channels=(8, 16),
            )
        if name == "shapes":
            return cls()
        raise ValueError(f"Unknown tiny pipeline preset {name!r}: use 'test' or 'shapes'.")


def _tiny_vae(vae_channels: Sequence[int], sample_size: int, scaling_factor: float = 1.0, shift_factor=0.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
        block_out_channels=list(vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(8, vae_channels[0]),
        sample_size=sample_size * 2 ** (len(vae_channels) - 1),
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def sd_scheduler_config() -> dict:
    """The SD1.x noise schedule (`scaled_linear` betas 0.00085-0.012 over 1000 steps, epsilon prediction) with the
    sampling settings of the SD1.5 DDIM scheduler (`set_alpha_to_one=False`, `steps_offset=1`, leading spacing)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_tiny_sd_pipeline(vocabulary: Sequence[str], spec: TinySDSpec | str = "test", seed: int = 0):
    """Build a randomly initialised tiny `StableDiffusionPipeline` (CPU, float32), the SD1.x family.

    Parts: a `UNet2DConditionModel` with cross-attention down/up blocks, one `CLIPTextModel` with the word-level
    tokenizer of `build_word_tokenizer`, an `AutoencoderKL` (×2 downsampling, 4 latent channels) and a
    `DDIMScheduler` with SD1.x settings (`sd_scheduler_config`); no safety checker or feature extractor.

    Args:
        vocabulary: the words prompts may use (others map to `<unk>`).
        spec: a `TinySDSpec` or a preset name (`"test"` or `"shapes"`).
        seed: seeds the weight initialisation, so two calls give identical pipelines.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    if isinstance(spec, str):
        spec = TinySDSpec.preset(spec)
    tokenizer = build_word_tokenizer(vocabulary, spec.text_max_length)
    text_config = _clip_text_config(tokenizer, spec)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    # As for the SD3 builder: wider random embeddings keep prompts apart before any training.
    embeddings = text_encoder.get_input_embeddings().weight, text_encoder.embeddings.position_embedding.weight
    torch.nn.init.normal_(embeddings[0], std=1.0)
    torch.nn.init.normal_(embeddings[1], std=0.5)
    n_blocks = len(spec.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=spec.sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D"] * n_blocks,
        up_block_types=["CrossAttnUpBlock2D"] * n_blocks,
        block_out_channels=list(spec.block_out_channels),
        layers_per_block=spec.layers_per_block,
        attention_head_dim=[c // spec.attention_head_dim for c in spec.block_out_channels],
        norm_num_groups=spec.norm_num_groups,
        cross_attention_dim=spec.text_hidden,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(spec.vae_channels, spec.sample_size),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**sd_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
