"""The one generic path from any diffusers text-to-image pipeline to the trainer.

A model family is a declaration (`ModelFamily`): which component is the denoiser, the names of its sample and
timestep arguments, its frame (`trl_nft.families.frames`), what guidance means for it, and its default LoRA targets.
Everything else is done the same way for every family by `PipelineAdapter`:

* **Rollouts** run the pipeline's own `__call__` (any scheduler the pipeline accepts is a black-box solver) with
  `output_type="pt"`: the pipeline decodes the images itself, and `callback_on_step_end` hands over the final latents
  in the denoiser's own space (packed for FLUX, Qwen-Image; VP-scaled for UNets). A forward pre-hook on the denoiser
  records the timestep of every call, which gives the rollout's time grid, the times training draws from.
* **Conditioning** is captured, not re-implemented: the pipeline is called on the prompts and stopped by a forward
  pre-hook at its first denoiser call, whose keyword arguments (text embeddings, pooled embeddings, masks, position
  ids, FLUX's guidance embedding, SDXL's added time ids, ...) are kept. Training replays them with new `(x_t, t)`.
* **Training forwards** call the denoiser with those arguments, the flow-frame sample mapped into the model's input and
  the flow time mapped into its timestep, and map the output back into a flow velocity.
* **LoRA** is saved with the pipeline class's own `save_lora_weights`, so that `load_lora_weights` reads it back.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .frames import FlowFrame, VPFrame


#: Attention projections of diffusers' attention blocks (both streams of MM-DiT models): peft matches module-name
#: suffixes and ignores the absent ones.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

DOCS_ADDING_A_FAMILY = "https://github.com/trl-nft/trl_nft/blob/main/docs/adding_a_family.md"


class UnsupportedPipelineError(ValueError):
    """A pipeline the trainer cannot serve (raised at construction)."""


class _Captured(Exception):
    """Raised by the capture hook to stop a pipeline call at its first denoiser call."""


@dataclass(frozen=True)
class ModelFamily:
    """What a family of diffusers pipelines does differently; the rest is generic (`PipelineAdapter`).

    Args:
        name (`str`): short name (`"flux"`, `"sd"`), shown in cards and errors.
        pipeline_classes (`tuple[str, ...]`): pipeline class names served.
        frame (`Callable[[pipeline, int], FlowFrame | VPFrame]`): the denoiser's parameterisation, derived from
            the pipeline's configs and the image side in pixels (see `trl_nft.families.frames`).
        denoiser (`str`, defaults to `"transformer"`): the trained component (`"unet"` for UNets).
        sample_arg (`str`, defaults to `"hidden_states"`): the denoiser argument holding the noisy sample.
        timestep_arg (`str`, defaults to `"timestep"`): the denoiser argument holding the time.
        guidance (`str`, defaults to `"cfg"`): what the pipeline's `guidance_scale` is. `"cfg"`: classifier-free
            guidance (two branches combined in the sampler; training captures the conditional branch only).
            `"embedded"`: a distilled guidance value fed to the denoiser as an input (FLUX.1-dev, FLUX.2); rollouts
            and training both use it, so the trained policy is the one conditioned on that value.
        guidance_kwargs (`Callable[[float], dict]`, *optional*): the pipeline arguments for the trainer's guidance
            scale `w` (standard convention: 1 is no guidance) where the pipeline spells it otherwise (Qwen-Image's
            `true_cfg_scale` with a negative prompt; Z-Image's `guidance_scale = w - 1`). Defaults to
            `{"guidance_scale": w}`.
        cfg_velocity (`bool`, defaults to `False`): the pipeline's CFG is `v_u + w (v_c - v_u)` over one denoiser
            call per step, with `negative_prompt(w)` (default: the empty prompt) encoded like a prompt as the
            unconditional branch, so `PipelineAdapter.cfg_velocity` reproduces its guided steps
            (`check_family(..., guidance_scale=3)`); needed by `old_policy_guidance`.
        lora_target_modules (`tuple[str, ...]`): default LoRA targets (module-name suffixes, peft's convention).
        static_args (`tuple[str, ...]`): captured arguments that are not per-sample although their first dimension
            may equal the batch size (FLUX's position ids).
        batch_dims (`tuple[tuple[str, int], ...]`): captured arguments whose batch dimension is not the first, as
            `(name, dim)` pairs (HiDream's `encoder_hidden_states_llama3` is `[layers, B, L, D]`).
        pack_sample / unpack_sample (`Callable`, *optional*): where the denoiser takes something other than one
            `[B, ...]` tensor (Z-Image takes lists of `[C, 1, H, W]`).
        unpack_output (`Callable[[output, sample], Tensor]`, *optional*): the prediction as a tensor shaped like the
            sample (Z-Image returns a list; FLUX.2 returns extra tokens past the image's).
        resolution_multiple (`Callable[[pipeline], int]`, *optional*): image sides must be multiples of this;
            defaults to the VAE scale factor times the denoiser's patch size.
        unsupported (`str`, *optional*): set for pipelines NFT does not apply to; the message says why and what to do.
    """

    name: str
    pipeline_classes: tuple[str, ...]
    frame: Callable[[Any, int], FlowFrame | VPFrame] | None = None
    denoiser: str = "transformer"
    sample_arg: str = "hidden_states"
    timestep_arg: str = "timestep"
    guidance: str = "cfg"
    guidance_kwargs: Callable[[float], dict[str, Any]] | None = None
    cfg_velocity: bool = False
    lora_target_modules: tuple[str, ...] = ATTENTION_TARGETS
    static_args: tuple[str, ...] = ()
    batch_dims: tuple[tuple[str, int], ...] = ()
    pack_sample: Callable[[torch.Tensor], Any] | None = None
    unpack_sample: Callable[[Any], torch.Tensor] | None = None
    unpack_output: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    resolution_multiple: Callable[[Any], int] | None = None
    unsupported: str | None = None
    notes: str = field(default="", compare=False)


def _tile(
    value: Any,
    batch_size: int,
    repeats: int,
    static: tuple[str, ...],
    key: str = "",
    dims: dict[str, int] | None = None,
) -> Any:
    """Repeat every per-sample entry of captured arguments `repeats` times along the batch (whole-batch tiling)."""
    if key in static:
        return value
    if isinstance(value, dict):
        return {k: _tile(v, batch_size, repeats, static, k, dims) for k, v in value.items()}
    dim = (dims or {}).get(key, 0)
    if isinstance(value, torch.Tensor) and value.dim() > dim and value.shape[dim] == batch_size:
        return value.repeat(*[repeats if i == dim else 1 for i in range(value.dim())])
    if isinstance(value, list | tuple) and len(value) == batch_size:
        return type(value)(list(value) * repeats)
    return value


class _Row:
    """One sample's slice of a per-sample captured argument (a batch of one along its batch dimension)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class IncompatibleRows(ValueError):
    """Cached rows that cannot be stacked into the batch the pipeline would capture (e.g. prompts padded to
    different lengths by a pipeline that pads to the longest prompt of its batch)."""


def _first_row(value: Any, batch_size: int, static: tuple[str, ...], key: str, dims: dict[str, int]) -> Any:
    """The first sample's part of a captured argument: `_Row` leaves for per-sample entries (by `_tile`'s rule),
    everything else (per-batch entries: position ids, attention-processor kwargs) kept as captured."""
    if key in static:
        return value
    if isinstance(value, dict):
        return {k: _first_row(v, batch_size, static, k, dims) for k, v in value.items()}
    dim = dims.get(key, 0)
    if isinstance(value, torch.Tensor) and value.dim() > dim and value.shape[dim] == batch_size:
        return _Row(value.narrow(dim, 0, 1).clone())
    if isinstance(value, list | tuple) and len(value) == batch_size:
        return _Row(type(value)(value[:1]))
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b.to(a.device)))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _join_rows(rows: list[Any], key: str, dims: dict[str, int]) -> Any:
    first = rows[0]
    if isinstance(first, _Row):
        if not all(isinstance(r, _Row) for r in rows):
            raise IncompatibleRows(key)
        values = [r.value for r in rows]
        if isinstance(first.value, torch.Tensor):
            if any(not isinstance(v, torch.Tensor) or v.shape != first.value.shape for v in values):
                raise IncompatibleRows(key)
            return torch.cat(values, dim=dims.get(key, 0))
        return type(first.value)(x for v in values for x in v)
    if isinstance(first, dict):
        if not all(isinstance(r, dict) and r.keys() == first.keys() for r in rows):
            raise IncompatibleRows(key)
        return {k: _join_rows([r[k] for r in rows], k, dims) for k in first}
    # A per-batch entry: the same for every prompt, or the prompts cannot share one batch.
    if not all(_same(first, r) for r in rows[1:]):
        raise IncompatibleRows(key)
    return first


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, list):
        return [_cast_floats(v, dtype) for v in value]
    return value


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    # Sampling runs the denoiser as at inference (no dropout; some models, e.g. HiDream, change their output layout in
    # training mode), whatever mode the Trainer left it in.
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class PipelineAdapter:
    """Runs one pipeline for the trainer according to its `ModelFamily`.

    Args:
        pipeline (`DiffusionPipeline`): the user's pipeline, used as given (device, dtype, scheduler).
        family (`ModelFamily`): its declaration.
        resolution (`int`, *optional*): image side in pixels; defaults to the pipeline's default size.
        pipeline_kwargs (`dict`, *optional*): extra arguments for every pipeline call (e.g. SANA's
            `use_resolution_binning`).
    """

    def __init__(self, pipeline, family: ModelFamily, resolution: int | None = None, pipeline_kwargs=None):
        self.pipeline = pipeline
        self.family = family
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        self.resolution = resolution or self.default_resolution
        self.frame = family.frame(pipeline, self.resolution)
        self._call_params = inspect.signature(type(pipeline).__call__).parameters
        unknown = [k for k in self.pipeline_kwargs if not self._accepts(k)]
        if unknown:
            raise ValueError(
                f"pipeline_kwargs {unknown} are not arguments of {type(pipeline).__name__}.__call__; check their "
                "spelling in the pipeline's documentation."
            )
        forward = self.denoiser.forward
        self._forward_signature = inspect.signature(forward)
        self._visited: list[float] = []

    # ---------------------------------------------------------------- components and sizes
    @property
    def denoiser_name(self) -> str:
        return self.family.denoiser

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.family.denoiser)

    @property
    def default_lora_target_modules(self) -> tuple[str, ...]:
        return self.family.lora_target_modules

    @property
    def resolution_multiple(self) -> int:
        if self.family.resolution_multiple is not None:
            return int(self.family.resolution_multiple(self.pipeline))
        patch = getattr(self.denoiser.config, "patch_size", None) or 1
        return int(getattr(self.pipeline, "vae_scale_factor", 8)) * int(patch)

    @property
    def default_resolution(self) -> int:
        pipe = self.pipeline
        sample_size = getattr(pipe, "default_sample_size", None) or getattr(self.denoiser.config, "sample_size", 64)
        if isinstance(sample_size, list | tuple):
            sample_size = sample_size[0]
        return int(sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    # ---------------------------------------------------------------- pipeline calls
    def _accepts(self, name: str) -> bool:
        return name in self._call_params or any(p.kind is p.VAR_KEYWORD for p in self._call_params.values())

    def call_kwargs(self, max_sequence_length: int | None = None, guidance_scale: float = 1.0) -> dict[str, Any]:
        """Pipeline arguments that sample as the trainer does (also shown in the model card's snippet)."""
        if self.family.guidance_kwargs is not None:
            kwargs = dict(self.family.guidance_kwargs(guidance_scale))
        else:
            kwargs = {"guidance_scale": guidance_scale}
        if max_sequence_length is not None and self._accepts("max_sequence_length"):
            kwargs["max_sequence_length"] = max_sequence_length
        kwargs = {k: v for k, v in kwargs.items() if self._accepts(k)}
        return {**kwargs, **self.pipeline_kwargs}

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = self._forward_signature.bind_partial(*args, **kwargs).arguments
        out: dict[str, Any] = {}
        for name, value in bound.items():
            if self._forward_signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            else:
                out[name] = value
        return out

    @torch.no_grad()
    def rollout(
        self,
        prompts: list[str],
        *,
        num_inference_steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        max_sequence_length: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample with the pipeline's own `__call__` and active weights.

        Returns:
            `(x0, images)`: clean latents in the denoiser's space (`[B, ...]`, float32) and the pipeline's decoded
            images `[B, 3, H, W]` in [0, 1] (float32). The visited times are kept for `training_grid()`.
        """
        visited: list[float] = []
        final: dict[str, torch.Tensor] = {}
        timestep_arg = self.family.timestep_arg

        def record(module, args, kwargs):
            value = self._bind(args, kwargs).get(timestep_arg)
            value = torch.as_tensor(value).reshape(-1)[:1].float()
            visited.append(float(value))

        def on_step_end(pipe, step, timestep, callback_kwargs):
            final["latents"] = callback_kwargs["latents"]
            return {}

        handle = self.denoiser.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with eval_mode(self.denoiser):
                out = self.pipeline(
                    prompt=list(prompts),
                    num_inference_steps=num_inference_steps,
                    height=height,
                    width=width,
                    generator=generator,
                    output_type="pt",
                    callback_on_step_end=on_step_end,
                    **self.call_kwargs(max_sequence_length, guidance_scale),
                )
        finally:
            handle.remove()
        if "latents" not in final:
            raise RuntimeError(
                f"{type(self.pipeline).__name__} never called callback_on_step_end: no latents to train."
            )
        self._visited = visited
        images = out.images if isinstance(out.images, torch.Tensor) else torch.as_tensor(out.images)
        if images.dim() == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.permute(0, 3, 1, 2)
        return final["latents"].float(), images.float().clamp(0, 1)

    def training_grid(self) -> torch.Tensor:
        """Flow-frame times in (0, 1] that the last rollout's solver visited, in sampling order (duplicates of
        second-order solvers and of separate CFG calls removed)."""
        grid: list[float] = []
        for ts in self._visited:
            t = float(self.frame.flow_time(torch.tensor([ts]))[0])
            if t > 0 and all(abs(t - g) > 1e-7 for g in grid):
                grid.append(t)
        if not grid:
            raise RuntimeError("The last rollout visited no time t > 0: nothing to train on.")
        return torch.tensor(grid)

    @torch.no_grad()
    def conditioning(
        self,
        prompts: list[str],
        *,
        guidance_scale: float,
        height: int,
        width: int,
        max_sequence_length: int | None = None,
    ) -> dict[str, Any]:
        """The denoiser's keyword arguments for `prompts` at the first step of a CFG-free call, minus sample and time.

        For `"embedded"` guidance the call uses `guidance_scale` (it is an input of the trained policy); for CFG it
        is called without guidance (the conditional branch).
        """
        captured: dict[str, Any] = {}

        def capture(module, args, kwargs):
            captured.update(self._bind(args, kwargs))
            raise _Captured

        scale = guidance_scale if self.family.guidance == "embedded" else 1.0
        handle = self.denoiser.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.pipeline(
                prompt=list(prompts),
                num_inference_steps=2,
                height=height,
                width=width,
                # A private generator: capturing must not move the global random stream.
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
                **self.call_kwargs(max_sequence_length, scale),
            )
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"{type(self.pipeline).__name__} returned without calling its {self.denoiser_name}.")
        sample = captured.pop(self.family.sample_arg)
        captured.pop(self.family.timestep_arg, None)
        captured.pop("return_dict", None)
        batch = len(sample) if isinstance(sample, list | tuple) else sample.shape[0]
        if batch != len(prompts):
            raise RuntimeError(
                f"{type(self.pipeline).__name__} called its {self.denoiser_name} on {batch} samples for {len(prompts)} "
                "prompts in a CFG-free call; declare how its batch is laid out in its ModelFamily."
            )
        captured["_batch_size"] = len(prompts)
        return captured

    def tile(self, cond: dict[str, Any], repeats: int) -> dict[str, Any]:
        """Repeat the per-sample conditioning `repeats` times (matching `x.repeat(repeats, ...)` of the samples)."""
        batch = cond["_batch_size"]
        dims = dict(self.family.batch_dims)
        out = {
            k: _tile(v, batch, repeats, self.family.static_args, k, dims)
            for k, v in cond.items()
            if k != "_batch_size"
        }
        out["_batch_size"] = batch * repeats
        return out

    def conditioning_row(self, cond: dict[str, Any]) -> dict[str, Any]:
        """The first sample's part of `conditioning()` output, for a per-prompt cache (`join_conditioning_rows`).

        Which entries are per-sample follows `tile()`: tensors whose batch dimension (the first, or the family's
        `batch_dims`) has the batch size and lists of that length, except the family's `static_args`. Capture with
        at least two samples (the same prompt twice) so that a per-batch entry is not taken for a per-sample one.
        """
        batch = cond["_batch_size"]
        dims = dict(self.family.batch_dims)
        static = self.family.static_args
        return {k: _first_row(v, batch, static, k, dims) for k, v in cond.items() if k != "_batch_size"}

    def join_conditioning_rows(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack per-prompt rows (`conditioning_row`) into the conditioning of a batch of those prompts.

        Raises:
            IncompatibleRows: when the rows cannot form one batch as the pipeline would capture it: per-sample
                tensors of different shapes (a pipeline that pads prompts to the longest one of its batch) or
                per-batch entries that differ between prompts. Capture the batch with `conditioning()` instead.
        """
        if not rows:
            raise ValueError("join_conditioning_rows needs at least one row.")
        dims = dict(self.family.batch_dims)
        if any(r.keys() != rows[0].keys() for r in rows):
            raise IncompatibleRows("captured arguments")
        out = {k: _join_rows([r[k] for r in rows], k, dims) for k in rows[0]}
        out["_batch_size"] = len(rows)
        return out

    # ---------------------------------------------------------------- training forward
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], model=None) -> torch.Tensor:
        """The denoiser's prediction at flow-frame `(x_t, t)` as a flow-frame velocity (float32, shape of `x_t`).

        Args:
            x_t (`torch.Tensor` of shape `[B, ...]`): flow-frame samples in the denoiser's latent space.
            t (`torch.Tensor` of shape `[B]`): flow times in (0, 1].
            cond (`dict`): `conditioning()` output, tiled to `B`.
            model (`torch.nn.Module`, *optional*): the (possibly accelerate-wrapped) denoiser to call.
        """
        model = model if model is not None else self.denoiser
        dtype = self.denoiser.dtype
        kwargs = {k: v for k, v in cond.items() if k != "_batch_size"}
        sample = self.frame.model_input(x_t, t).to(dtype)
        if self.family.pack_sample is not None:
            sample = self.family.pack_sample(sample)
        kwargs[self.family.sample_arg] = sample
        kwargs[self.family.timestep_arg] = self.frame.model_timestep(t.float()).to(x_t.device)
        kwargs["return_dict"] = False
        out = model(**kwargs)[0]
        if self.family.unpack_output is not None:
            out = self.family.unpack_output(out, sample)
        return self.frame.velocity(out, x_t, t)

    def negative_prompt(self, guidance_scale: float) -> str:
        """The prompt of the pipeline's unconditional branch when it samples with CFG `guidance_scale`: the family's
        or `pipeline_kwargs`' `negative_prompt`, else the empty prompt (diffusers' default)."""
        negative = self.call_kwargs(None, guidance_scale).get("negative_prompt")
        return negative if isinstance(negative, str) else ""

    def cfg_velocity(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, Any] | None,
        uncond: dict[str, Any],
        guidance_scale: float,
        model=None,
        v_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The classifier-free-guided velocity `v_u + w (v_c - v_u)` the pipeline samples with at `guidance_scale`
        `w` (float32, shape of `x_t`). CFG is linear in the prediction and the flow frame is affine in it, so
        combining flow velocities equals combining the model's outputs.

        Args:
            x_t, t, model: as `velocity()`.
            cond (`dict`): `conditioning()` of the prompts, tiled to `B` (unused when `v_cond` is given).
            uncond (`dict`): `conditioning()` of `negative_prompt(guidance_scale)` for every sample, tiled to `B`.
            guidance_scale (`float`): `w` in the standard convention (1 = the conditional prediction).
            v_cond (`torch.Tensor`, *optional*): `velocity(x_t, t, cond, model)` when already computed.
        """
        if v_cond is None:
            v_cond = self.velocity(x_t, t, cond, model)
        v_uncond = self.velocity(x_t, t, uncond, model).float()
        return v_uncond + guidance_scale * (v_cond.float() - v_uncond)

    # ---------------------------------------------------------------- LoRA I/O
    def save_lora_weights(self, save_directory: str, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]):
        """Write `pytorch_lora_weights.safetensors` with the pipeline class's own `save_lora_weights` (diffusers
        format, with the adapter metadata so that `lora_alpha != r` survives the reload)."""
        type(self.pipeline).save_lora_weights(
            save_directory,
            **{
                f"{self.denoiser_name}_lora_layers": state_dict,
                f"{self.denoiser_name}_lora_adapter_metadata": metadata,
            },
        )
