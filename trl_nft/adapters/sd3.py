"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`, `SD3Transformer2DModel`, rectified flow)."""

from __future__ import annotations

import torch

from .base import PipelineAdapter


class SD3Adapter(PipelineAdapter):
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"
    # Official DiffusionNFT targets (attention projections of both streams, no MLP).
    default_lora_target_modules = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )

    def __init__(self, pipeline):
        super().__init__(pipeline)
        self._negative: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def resolution_multiple(self) -> int:
        return self.pipeline.vae_scale_factor * self.denoiser.config.patch_size

    @property
    def default_resolution(self) -> int:
        return self.pipeline.default_sample_size * self.pipeline.vae_scale_factor

    @torch.no_grad()
    def encode_prompts(self, prompts, max_sequence_length):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.denoiser.device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _negative_cond(self, batch_size: int, max_sequence_length: int) -> dict[str, torch.Tensor]:
        # The empty prompt, encoded once: SD3's unconditional branch.
        if max_sequence_length not in self._negative:
            self._negative[max_sequence_length] = self.encode_prompts([""], max_sequence_length)
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in self._negative[max_sequence_length].items()}

    @torch.no_grad()
    def rollout(
        self, cond, *, num_inference_steps, guidance_scale, height, width, max_sequence_length, generator=None
    ):
        batch_size = cond["prompt_embeds"].shape[0]
        kwargs = {}
        if guidance_scale > 1:
            neg = self._negative_cond(batch_size, max_sequence_length)
            kwargs = {
                "negative_prompt_embeds": neg["prompt_embeds"],
                "negative_pooled_prompt_embeds": neg["pooled_prompt_embeds"],
            }
        out = self.pipeline(
            prompt_embeds=cond["prompt_embeds"],
            pooled_prompt_embeds=cond["pooled_prompt_embeds"],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=generator,
            output_type="latent",
            max_sequence_length=max_sequence_length,
            **kwargs,
        )
        return out.images

    def call_kwargs(self, max_sequence_length):
        return {"max_sequence_length": max_sequence_length}

    def training_grid(self):
        # Flow schedulers keep the flow sigmas (= t) of the last `set_timesteps`, with a terminal 0 and, for
        # second-order solvers, repeated entries.
        sigmas = self.pipeline.scheduler.sigmas.detach().float().cpu()
        grid: list[float] = []
        for s in sigmas.tolist():
            if s > 0 and (not grid or abs(grid[-1] - s) > 1e-8):
                grid.append(s)
        return torch.tensor(grid)

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def velocity(self, x_t, t, cond, model=None):
        model = model if model is not None else self.denoiser
        # SD3 predicts the flow velocity directly and takes timesteps on the scheduler's 0..1000 scale (float, not
        # the long cast of the official sampler).
        timestep = t.to(x_t.dtype) * self.pipeline.scheduler.config.num_train_timesteps
        return model(
            hidden_states=x_t,
            timestep=timestep,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
