"""Check a family declaration against the pipeline's own sampler: the one test a new family needs.

A first-order deterministic solver is the Euler method in the flow frame (flow-matching Euler directly; DDIM with
`eta = 0` for variance-preserving UNets, see `trl_nft.families.frames`). So if a family's frame, argument names and
packing are right, one Euler step taken with the trainer's `velocity()` from the sample the pipeline fed its denoiser
at step k must land on the sample it fed at step k + 1.
"""

from __future__ import annotations

import torch

from .adapter import PipelineAdapter
from .frames import VPFrame


@torch.no_grad()
def check_family(
    adapter: PipelineAdapter,
    prompts: list[str],
    *,
    num_inference_steps: int = 3,
    max_sequence_length: int | None = None,
    guidance_scale: float = 1.0,
) -> float:
    """Largest relative error between the pipeline's Euler/DDIM steps and Euler steps with `adapter.velocity`.

    The pipeline's scheduler is swapped for `FlowMatchEulerDiscreteScheduler` (flow families) or `DDIMScheduler`
    (VP families) built from its config, then restored. A correct family gives ~1e-6 in float32; a wrong sign, time
    scale or packing gives O(1).

    Args:
        adapter (`PipelineAdapter`): the adapter under test (`trl_nft.families.get_adapter(pipe)`).
        prompts (`list[str]`): a few prompts.
        num_inference_steps (`int`, defaults to 3): solver steps (at least 2).
        max_sequence_length (`int`, *optional*): passed where the pipeline accepts it.
        guidance_scale (`float`, defaults to 1.0): above 1 (CFG families), the pipeline samples with CFG and the
            Euler steps use `adapter.cfg_velocity` with the family's negative prompt: the check of
            `old_policy_guidance`. Needs a pipeline that calls its denoiser once per step on the batch of both
            branches (diffusers' convention).

    Raises:
        ValueError: with `guidance_scale > 1`, for a pipeline that calls its denoiser more than once per step.
    """
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    pipe, family = adapter.pipeline, adapter.family
    original = pipe.scheduler
    vp = isinstance(adapter.frame, VPFrame)
    pipe.scheduler = (DDIMScheduler if vp else FlowMatchEulerDiscreteScheduler).from_config(original.config)
    calls: list[tuple[torch.Tensor, float]] = []

    def record(module, args, kwargs):
        bound = adapter._bind(args, kwargs)
        sample = bound[family.sample_arg]
        if family.unpack_sample is not None:
            sample = family.unpack_sample(sample)
        sample = sample[-len(prompts) :]  # with CFG: the conditional half of [uncond, cond] (both halves are equal)
        ts = torch.as_tensor(bound[family.timestep_arg]).reshape(-1)[:1].double()
        calls.append((sample.detach().float().clone(), float(adapter.frame.flow_time(ts)[0])))

    handle = adapter.denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(
            prompt=list(prompts),
            num_inference_steps=num_inference_steps,
            height=adapter.resolution,
            width=adapter.resolution,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **adapter.call_kwargs(max_sequence_length, guidance_scale),
        )
    finally:
        handle.remove()
    if len(calls) != num_inference_steps:
        pipe.scheduler = original
        raise ValueError(
            f"{type(pipe).__name__} called its {adapter.denoiser_name} {len(calls)} times in {num_inference_steps} "
            f"steps at guidance_scale={guidance_scale}: check_family checks pipelines that call it once per step."
        )
    size = {"height": adapter.resolution, "width": adapter.resolution, "max_sequence_length": max_sequence_length}
    try:
        cond = adapter.conditioning(prompts, guidance_scale=guidance_scale, **size)
        if guidance_scale > 1 and family.guidance == "cfg":
            negative = [adapter.negative_prompt(guidance_scale)] * len(prompts)
            uncond = adapter.conditioning(negative, guidance_scale=guidance_scale, **size)
    finally:
        pipe.scheduler = original
    worst = 0.0
    for (x_model, t), (next_model, t_next) in zip(calls, calls[1:], strict=False):
        tt, tn = torch.full((x_model.shape[0],), t), torch.full((x_model.shape[0],), t_next)
        x = adapter.frame.flow_sample(x_model, tt).float()
        if guidance_scale > 1 and family.guidance == "cfg":
            v = adapter.cfg_velocity(x, tt, cond, uncond, guidance_scale)
        else:
            v = adapter.velocity(x, tt, cond)
        predicted = x + (t_next - t) * v
        actual = adapter.frame.flow_sample(next_model, tn).float()
        worst = max(worst, float((predicted - actual).norm() / actual.norm().clamp_min(1e-12)))
    return worst
