"""The narrow interface between the trainer and one diffusers model family.

The trainer knows nothing about SD3, UNets or flow matching: everything model-specific (prompt encoding, the rollout
call, the forward-noising process, the denoiser call and its output parameterisation, LoRA targets and the LoRA save
call) lives behind one small adapter per family. Adapters express the denoiser in the trainer's *flow frame*
(`x_t = (1 - t) x0 + t noise`, velocity `noise - x0`, see `trl_nft.core`); a family with another parameterisation
(epsilon / v-prediction UNets) converts its prediction into that frame.
"""

from __future__ import annotations

from typing import Any

import torch


class PipelineAdapter:
    """Base class of the per-family adapters. Subclasses implement every method that raises here."""

    #: Pipeline class names this adapter serves.
    pipeline_classes: tuple[str, ...] = ()
    #: Name of the trained component in the pipeline and in its `save_lora_weights` (`transformer`, `unet`).
    denoiser_name: str = "transformer"
    #: Default LoRA target modules (the official recipe of the family).
    default_lora_target_modules: tuple[str, ...] = ()

    def __init__(self, pipeline):
        self.pipeline = pipeline

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    # ---------------------------------------------------------------- sizes
    @property
    def resolution_multiple(self) -> int:
        """Image sides must be a multiple of this (VAE factor x patch size)."""
        raise NotImplementedError

    @property
    def default_resolution(self) -> int:
        raise NotImplementedError

    # ---------------------------------------------------------------- text
    def encode_prompts(self, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """Prompt conditioning as a dict of batch-first tensors (cacheable, indexable per sample)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- sampling
    def rollout(
        self,
        cond: dict[str, torch.Tensor],
        *,
        num_inference_steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        max_sequence_length: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Sample clean latents with the pipeline's own scheduler (a black-box solver) and the active adapter."""
        raise NotImplementedError

    def training_grid(self) -> torch.Tensor:
        """Flow-frame times `t in (0, 1]` that the last rollout's solver visited, in sampling order."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images `[B, 3, H, W]` in [0, 1]."""
        raise NotImplementedError

    # ---------------------------------------------------------------- training
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], model=None) -> torch.Tensor:
        """The denoiser's prediction at flow-frame `(x_t, t)`, as a flow-frame velocity.

        `model` is the (possibly accelerate-wrapped) denoiser to call; defaults to the pipeline's.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- LoRA I/O
    def call_kwargs(self, max_sequence_length: int) -> dict[str, Any]:
        """Extra `pipe(...)` arguments that sample as the trainer does (shown in the model card's snippet)."""
        return {}

    def save_lora_weights(self, save_directory: str, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]):
        """Write `pytorch_lora_weights.safetensors` in the diffusers format, loadable by `load_lora_weights`."""
        type(self.pipeline).save_lora_weights(
            save_directory,
            **{
                f"{self.denoiser_name}_lora_layers": state_dict,
                f"{self.denoiser_name}_lora_adapter_metadata": metadata,
            },
        )
