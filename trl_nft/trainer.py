"""`DiffusionNFTTrainer`: DiffusionNFT as a `transformers.Trainer`.

One optimizer step, seen from the Trainer's loop (mirrors TRL's `GRPOTrainer`):

1. the dataloader yields a *rollout batch* of prompts, each repeated `num_generations` times (`RepeatSampler`);
2. `_prepare_inputs` samples the **old** policy with the pipeline's own `__call__` and scheduler (CFG-free by
   default, no trajectories kept; `trl_nft.families`), keeps the clean latents and the decoded images, scores the
   images, turns rewards into optimality probabilities r (`trl_nft.core`), shuffles the batch and buffers it in
   `steps_per_generation` micro-batches;
3. `training_step` trains a micro-batch on the forward process: the denoiser's conditioning is captured from the
   pipeline for the micro-batch's prompts, and for each sample, times drawn from the rollout grid, fresh noise, three
   forwards (old, trained, reference) in the flow frame and the NFT loss;
4. after the last optimizer step on a rollout batch the old policy is soft-updated with the decay schedule.

Logging, progress bars, callbacks, checkpoints and `push_to_hub` come from `transformers.Trainer`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from accelerate.utils import gather_object
from transformers import Trainer, TrainerCallback, enable_full_determinism, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, SaveStrategy, rotate_checkpoints
from transformers.utils import logging

from . import _checkpoint, core
from .config import DiffusionNFTConfig, import_from_string
from .families import FAMILIES, get_adapter, load_pipeline, null_components
from .families.adapter import IncompatibleRows, eval_mode
from .model_card import write_model_card
from .rewards import resolve_reward
from .rewards.calling import RewardCaller, check_reward_columns, unique_reward_names


NFT_STATE_NAME = _checkpoint.STATE_TENSORS
logger = logging.get_logger(__name__)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


#: Evaluation images saved next to the card as its gallery (at most this many).
CARD_IMAGES = 8
#: Tracker keys of the image grids `log_images` sends.
EVAL_IMAGES_KEY = "eval/samples"
ROLLOUT_IMAGES_KEY = "train/rollout_samples"


def _identity(batch):
    return batch


def _make_config_serialisable(model: torch.nn.Module) -> None:
    """Give a diffusers model's config the `to_json_string()` / `to_dict()` that Trainer integrations call on
    `model.config` (TensorBoard, W&B); diffusers' `FrozenDict` lacks them. The config stays a `FrozenDict`."""
    from diffusers.configuration_utils import FrozenDict

    class TrainerFriendlyConfig(FrozenDict):
        def to_dict(self) -> dict:
            return dict(self)

        def to_json_string(self) -> str:
            return json.dumps(dict(self), indent=2, sort_keys=True, default=str)

    config = getattr(model, "_internal_dict", None)
    if isinstance(config, FrozenDict) and not hasattr(config, "to_json_string"):
        model._internal_dict = TrainerFriendlyConfig(config)


class _Chunk(NamedTuple):
    """`k` training times of every sample of a micro-batch, stacked time-major into `[k B, ...]` rows."""

    k: int
    x0: torch.Tensor  # clean samples, repeated k times
    t: torch.Tensor  # [k B] flow times
    noise: torch.Tensor
    x_t: torch.Tensor  # (1 - t) x0 + t noise


class _AfterOptimizerStep(TrainerCallback):
    """Runs the trainer's per-optimizer-step bookkeeping (old-policy and EMA updates) right after `optimizer.step()`,
    before logging and checkpointing see the step."""

    def __init__(self, trainer: DiffusionNFTTrainer):
        self.trainer = trainer
        self.step_start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()
        if self.step_start is not None:
            # As GRPO's `step_time`: one optimizer step, its rollout (when it has one) included.
            self.trainer._metrics["train"]["step_time"].append(time.perf_counter() - self.step_start)


class _NonFiniteGuard(TrainerCallback):
    """Skips an optimizer step whose gradients (hence loss) are not finite, and undoes one that made a weight
    non-finite; stops after `max_nonfinite_steps` consecutive such steps (see `DiffusionNFTConfig`)."""

    def __init__(self, trainer: DiffusionNFTTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_gradients_before_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_weights_after_step()


class _StopOnSignal(TrainerCallback):
    """Turns a SIGTERM/SIGINT received by any process into a checkpoint and a stop after the current optimizer step."""

    def __init__(self, trainer: DiffusionNFTTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        guard = self.trainer._signal_guard
        received = guard.received if guard is not None else None
        if self.trainer.accelerator.num_processes > 1:
            # Every process must stop at the same step, whichever of them got the signal.
            flags = self.trainer.accelerator.gather(
                torch.tensor([received or 0], device=self.trainer.accelerator.device)
            )
            received = int(flags.max().item()) or None
        if received:
            self.trainer._stop_signal = received
            control.should_save = True
            control.should_training_stop = True


class DiffusionNFTTrainer(Trainer):
    """
    Trainer for DiffusionNFT (Zheng et al., 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward
    Process", arXiv 2509.16117).

    Args:
        model (`str` or `DiffusionPipeline`):
            A diffusers text-to-image pipeline of a supported family (docs/families.md: SD3, FLUX.1/.2, SANA,
            SD1.x/2.x, SDXL, Lumina 2, CogView4, Qwen-Image, Z-Image, Chroma, AuraFlow, HiDream, Krea 2), or a local
            path / Hub id loaded with `DiffusionPipeline.from_pretrained`. Raises `UnsupportedPipelineError` for
            another class.
        reward_funcs (callable, `str`, or a list of them):
            Each is called as `f(prompts=list[str], images=Tensor[B, 3, H, W] in [0, 1], **other_columns,
            trainer_state=..., log_metric=...)` and returns one float (or `None`) per image, or a mapping
            `{"scores": [...], "<key>": [...]}` with extra per-image values to log. Called once per sampling chunk
            (`per_device_train_batch_size` images), under `torch.no_grad()`, on a worker thread while the next chunk is
            sampled (`async_reward_computation`). `async def` rewards run on a background event loop. Return values
            are checked by `trl_nft.rewards.calling` (see docs/rewards.md).
            Strings name a built-in reward (see `trl_nft.rewards.BUILTIN_REWARDS`) or a dotted path `module:function`.
        args ([`DiffusionNFTConfig`], *optional*):
            Configuration. Defaults to `DiffusionNFTConfig(f"{model_name}-NFT")`.
        train_dataset (`datasets.Dataset` or list of dicts):
            Needs a `prompt` column; every other column is passed to the reward functions.
        eval_dataset (`datasets.Dataset` or list of dicts, *optional*):
            Prompts for `evaluate()`, one image per row with seed `eval_seed + row`.
        callbacks (list of `TrainerCallback`, *optional*):
            Extra callbacks.
        optimizers (`tuple`, *optional*, defaults to `(None, None)`):
            An optimizer and scheduler to use instead of AdamW and `lr_scheduler_type`.
        peft_config (`peft.LoraConfig`, *optional*):
            LoRA configuration. Defaults to the family's official targets with `lora_r` / `lora_alpha` and gaussian
            init (official: r=32, alpha=64).
        eval_reward_funcs (callable, `str`, or a list of them, *optional*):
            Held-out rewards, scored at evaluation only and never trained on (a reward-hacking monitor): logged as
            `eval_heldout/<name>/mean|std`. Same forms as `reward_funcs`.
    """

    _tag_names = ["trl", "trl_nft", "diffusion-nft", "diffusers", "text-to-image"]
    _name = "DiffusionNFT"
    _paper = {
        "title": "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
        "id": "2509.16117",
    }

    def __init__(
        self,
        model,
        reward_funcs: Callable | str | Sequence[Callable | str],
        args: DiffusionNFTConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        peft_config=None,
        eval_reward_funcs: Callable | str | Sequence[Callable | str] | None = None,
    ):
        # ---------------------------------------------------------------- pipeline and its family adapter
        if isinstance(model, str | os.PathLike):
            self.base_model_id = str(model)
            pipeline = load_pipeline(str(model), **self._model_init_kwargs(args))
        else:
            if args is not None and args.model_init_kwargs:
                raise ValueError(
                    "model_init_kwargs is set but `model` is an already loaded pipeline, so there is nothing to load: "
                    "pass the model's path or Hub id as `model`, or load the pipeline yourself with these arguments "
                    "and leave model_init_kwargs=None."
                )
            pipeline = model
            self.base_model_id = getattr(pipeline.config, "_name_or_path", None) or None
        if args is None:
            name = (self.base_model_id or type(pipeline).__name__).rstrip("/").split("/")[-1]
            args = DiffusionNFTConfig(output_dir=f"{name}-NFT")
        if not isinstance(args, DiffusionNFTConfig):
            raise TypeError(f"args must be a DiffusionNFTConfig, got {type(args).__name__}.")
        self.pipeline = pipeline
        self.adapter = get_adapter(pipeline, resolution=args.resolution, pipeline_kwargs=args.pipeline_kwargs)
        pipeline.set_progress_bar_config(disable=True)
        self._setup_vae_decoding(pipeline, args)

        # ---------------------------------------------------------------- rewards
        if not isinstance(reward_funcs, list | tuple):
            reward_funcs = [reward_funcs]
        if not reward_funcs:
            raise ValueError("reward_funcs is empty: pass at least one reward function.")
        self.reward_funcs = [resolve_reward(f) for f in reward_funcs]
        self.reward_func_names = unique_reward_names(self.reward_funcs)
        self._reward_caller = RewardCaller(self.reward_funcs, self.reward_func_names, args.non_finite_rewards)
        self._setup_eval_monitors(eval_reward_funcs, args)
        if args.reward_weights is None:
            self.reward_weights = torch.ones(len(self.reward_funcs))
        elif len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(args.reward_weights)} entries but there are {len(self.reward_funcs)} reward "
                "functions: give one weight per function."
            )
        else:
            self.reward_weights = torch.tensor(args.reward_weights, dtype=torch.float32)

        # ---------------------------------------------------------------- data and sizes
        train_dataset = self._as_dataset(train_dataset, "train_dataset")
        eval_dataset = self._as_dataset(eval_dataset, "eval_dataset")
        if train_dataset is None:
            raise ValueError("train_dataset is required: a datasets.Dataset or list of dicts with a 'prompt' column.")
        self.resolution = self.adapter.resolution
        multiple = self.adapter.resolution_multiple
        if self.resolution % multiple != 0:
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of {multiple} (the VAE scale factor x patch size of "
                f"this {type(pipeline).__name__}). Use e.g. resolution={max(multiple, self.resolution // multiple * multiple)}."
            )
        if args.eval_guidance_scale is not None and args.eval_guidance_scale != args.guidance_scale:
            warnings.warn(
                f"Rollouts use guidance_scale={args.guidance_scale} but evaluation uses eval_guidance_scale="
                f"{args.eval_guidance_scale}: evaluation then samples another policy than the one trained on (see "
                "docs/families.md, 'Guidance'). Leave eval_guidance_scale unset to evaluate what rollouts sample.",
                stacklevel=2,
            )
        family = self.adapter.family
        if (args.old_policy_guidance or args.guidance_decay_steps > 0) and family.guidance != "cfg":
            raise ValueError(
                f"old_policy_guidance and guidance_decay_steps are for classifier-free guidance, but "
                f"{type(pipeline).__name__}'s guidance_scale is a guidance input of its denoiser (family "
                f"{family.name!r}): set old_policy_guidance=False and guidance_decay_steps=0."
            )
        guided = [n for n, on in (("old_policy_guidance", args.old_policy_guidance),
                                  ("kl_guidance_scale", args.kl_guidance_scale > 1)) if on]  # fmt: skip
        if guided and (family.guidance != "cfg" or not family.cfg_velocity):
            checked = sorted(f.name for f in FAMILIES if f.cfg_velocity)
            raise ValueError(
                f"{' and '.join(guided)}: the {family.name!r} family's CFG is not checked to be v_u + w (v_c - v_u) "
                f"in one call with its negative prompt as a prompt (families checked: {', '.join(checked)}). Set "
                "them off, or declare cfg_velocity=True in a family that passes "
                "trl_nft.families.check.check_family(adapter, prompts, guidance_scale=3)."
            )
        self._guided_old_policy = args.old_policy_guidance
        self.num_generations = args.num_generations
        self.num_iterations = args.num_iterations

        # ---------------------------------------------------------------- policies: trained, old, reference
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
        denoiser = self.adapter.denoiser
        # Trainer seeds in its own __init__, after the adapters below exist: seed first, or the LoRA initialisation
        # (and so the whole run) differs from process to process despite `seed`.
        if args.full_determinism:
            enable_full_determinism(args.seed)
        else:
            set_seed(args.seed)
        self.use_lora = args.use_lora or peft_config is not None
        if self.use_lora:
            self._setup_lora(denoiser, args, peft_config)
        else:
            denoiser.requires_grad_(True)
            self._trainable = [p for p in denoiser.parameters()]
            self._old_model = copy.deepcopy(denoiser).requires_grad_(False).eval()
            self._old = list(self._old_model.parameters())
            self._ref_model = copy.deepcopy(denoiser).requires_grad_(False).eval() if args.kl_weight > 0 else None
            self._trainable_names = [name for name, _ in denoiser.named_parameters()]
        self._decay_schedule = core.make_decay_schedule(
            import_from_string(args.old_policy_decay)
            if args.old_policy_decay not in ("linear", "constant")
            else args.old_policy_decay,
            rate=args.old_policy_decay_rate,
            max_decay=args.old_policy_decay_max,
            delay=args.old_policy_decay_delay,
        )
        self._keep_trained_weights_in_float32(denoiser)
        self._ema = [p.detach().clone() for p in self._trainable] if args.eval_ema_decay is not None else None
        if args.activation_checkpointing:
            self._setup_gradient_checkpointing(denoiser, args)

        _make_config_serialisable(denoiser)
        #: Messages of pushes during training that failed (reported, then cleared, by the final `push_to_hub`).
        self.failed_pushes: list[str] = []
        super().__init__(
            model=denoiser,
            args=args,
            data_collator=_identity,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # The loss is averaged inside training_step; the Trainer must not expect `num_items_in_batch` kwargs.
        self.model_accepts_loss_kwargs = False
        device = self.accelerator.device
        pipeline.to(device)
        for extra in (getattr(self, "_old_model", None), getattr(self, "_ref_model", None)):
            if extra is not None:
                extra.to(device)
        self.add_callback(_AfterOptimizerStep(self))
        self.add_callback(_NonFiniteGuard(self))
        self.add_callback(_StopOnSignal(self))
        if self.accelerator.num_processes > 1:
            # Trainer seeded every process alike; rollouts must differ between processes (or a prompt whose group
            # spans two processes gets duplicate images), reproducibly: seed + process index, as TRL's GRPOTrainer.
            from accelerate.utils import set_seed as accelerate_set_seed

            accelerate_set_seed(args.seed, device_specific=True)
        self._signal_guard: _checkpoint.SignalGuard | None = None
        self._stop_signal: int | None = None
        self._nonfinite_streak = 0
        self._skip_updates = False
        self._weights_before_step: list[torch.Tensor] | None = None
        self._metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._step = 0
        self._buffered_inputs: list[dict[str, Any]] | None = None
        self._rollout_grid: torch.Tensor | None = None
        self._last_eval_images: tuple[torch.Tensor, list[str]] | None = None
        self._pending_rollout_images: tuple[torch.Tensor, list[str]] | None = None
        #: `cache_prompt_embeddings`: prompt -> its row of the captured conditioning, for the current rollout batch.
        self._prompt_cache: dict[str, dict[str, Any]] = {}

    # ================================================================================================ setup helpers
    @staticmethod
    def _as_dataset(dataset, field_name: str):
        if dataset is None:
            return None
        import datasets

        if isinstance(dataset, datasets.IterableDataset | torch.utils.data.IterableDataset):
            raise ValueError(
                f"{field_name} is an IterableDataset (streaming), which DiffusionNFT cannot use: each rollout batch "
                "draws prompts at random and repeats each num_generations times, which needs a dataset with a length "
                "and random access (and with streaming, Trainer's dispatching would split the groups). Load it "
                "without streaming=True, or materialise the part you need, e.g. "
                "datasets.Dataset.from_list(list(dataset.take(10_000)))."
            )
        if isinstance(dataset, list):
            if not dataset or not isinstance(dataset[0], dict):
                raise ValueError(f"{field_name} must be a datasets.Dataset or a non-empty list of dicts.")
            dataset = datasets.Dataset.from_list(dataset)
        if isinstance(dataset, datasets.Dataset) and "prompt" not in dataset.column_names:
            raise ValueError(
                f"{field_name} has no 'prompt' column (columns: {dataset.column_names}). Rename the column that holds "
                "the text prompts to 'prompt', e.g. dataset.rename_column('text', 'prompt')."
            )
        if getattr(dataset, "column_names", None):
            check_reward_columns(dataset.column_names, field_name)
        return dataset

    def _setup_lora(self, denoiser, args: DiffusionNFTConfig, peft_config):
        from peft import LoraConfig

        if peft_config is None:
            peft_config = LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=list(args.lora_target_modules or self.adapter.default_lora_target_modules),
            )
        existing = sorted(getattr(denoiser, "peft_config", None) or {})
        if existing:
            # The trainer activates only its own adapters, so one the user loaded would silently stop applying.
            raise ValueError(
                f"The pipeline's {self.adapter.denoiser_name} already carries LoRA adapters {existing}. To train on top "
                "of them, fuse them into the base weights first: pipe.fuse_lora(); pipe.unload_lora_weights(). To "
                "continue a DiffusionNFT run, use train(resume_from_checkpoint=...)."
            )
        # Two adapters on one denoiser (official): "default" is trained, "old" samples rollouts and anchors the loss.
        denoiser.add_adapter(peft_config, adapter_name="default")
        with warnings.catch_warnings():
            # peft warns that a second adapter makes "multiple adapters in the model": that is the design here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            denoiser.add_adapter(copy.deepcopy(peft_config), adapter_name="old")
        named = dict(denoiser.named_parameters())
        default_names = [n for n in named if ".default." in n and "lora_" in n]
        if not default_names:
            raise ValueError(
                "The LoRA config matched no module of the denoiser; check lora_target_modules / peft_config."
            )
        self._trainable = [named[n] for n in default_names]
        self._old = [named[n.replace(".default.", ".old.")] for n in default_names]
        core.soft_update_(self._old, self._trainable, 0.0)
        denoiser.set_adapter("default")
        self._lora_param_names = default_names
        self._trainable_names = default_names

    @staticmethod
    def _model_init_kwargs(args: DiffusionNFTConfig | None) -> dict[str, Any]:
        kwargs = dict((args.model_init_kwargs if args is not None else None) or {})
        dtype = kwargs.get("torch_dtype")
        if isinstance(dtype, str) and dtype != "auto":
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(
                    f"model_init_kwargs['torch_dtype']={dtype!r} is not a torch dtype; use e.g. 'bfloat16', "
                    "'float16', 'float32' or 'auto'."
                )
            kwargs["torch_dtype"] = getattr(torch, dtype)
        return kwargs

    def _keep_trained_weights_in_float32(self, denoiser):
        """Trained weights (and the old policy's copy) in float32 whatever the pipeline's dtype, so that small updates
        are not rounded away; frozen weights stay as the user loaded them (diffusers' `cast_training_params`)."""
        frozen = {p.dtype for p in denoiser.parameters() if not p.requires_grad}
        trained = {p.dtype for p in self._trainable}
        if not self.use_lora and trained != {torch.float32}:
            raise ValueError(
                f"use_lora=False would fine-tune the denoiser's own {sorted(map(str, trained))} weights, whose small "
                "updates are rounded away in half precision. Load the pipeline in float32 (torch_dtype=torch.float32) "
                "and set bf16=True for mixed-precision compute, or train LoRA adapters (use_lora=True)."
            )
        if trained != {torch.float32}:
            from diffusers.training_utils import cast_training_params

            cast_training_params(denoiser, dtype=torch.float32)
        with torch.no_grad():
            for p in self._old:
                if p.dtype != torch.float32:
                    p.data = p.data.float()
        half = frozen & {torch.bfloat16, torch.float16}
        # A half-precision pipeline without Trainer mixed precision: compute in the pipeline's dtype (autocast) so that
        # float32 inputs and adapters meet half-precision weights the way they do under bf16=True.
        self._frozen_half_dtype = next(iter(half)) if len(half) == 1 else None

    def _setup_gradient_checkpointing(self, denoiser, args: DiffusionNFTConfig):
        """`gradient_checkpointing=True` for diffusers models, which spell it `enable_gradient_checkpointing()`
        (transformers' Trainer calls `activation_checkpointing_enable`)."""
        if not getattr(denoiser, "_supports_gradient_checkpointing", False):
            raise ValueError(
                f"gradient_checkpointing=True, but {type(denoiser).__name__} does not support gradient checkpointing. "
                "Set gradient_checkpointing=False."
            )
        if (args.activation_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "gradient_checkpointing_kwargs={'use_reentrant': True} gives LoRA weights no gradient when the "
                "denoiser's inputs need none (they never do here). Leave use_reentrant unset (non-reentrant)."
            )

        def activation_checkpointing_enable(*args, **kwargs):
            denoiser.enable_gradient_checkpointing()

        denoiser.enable_gradient_checkpointing()
        # Trainer.train() calls this on the model; a plain attribute keeps the diffusers class untouched.
        denoiser.activation_checkpointing_enable = activation_checkpointing_enable

    @staticmethod
    def _setup_vae_decoding(pipeline, args: DiffusionNFTConfig):
        """`vae_slicing` / `vae_tiling`: diffusers' own sliced / tiled decoding of the pipeline's VAE."""
        vae = getattr(pipeline, "vae", None)
        for name, flag, method in (("vae_slicing", "use_slicing", "enable_slicing"), ("vae_tiling", "use_tiling", "enable_tiling")):  # fmt: skip
            if not getattr(args, name):
                continue
            # diffusers' AutoencoderMixin.enable_* checks the same attribute (and raises NotImplementedError).
            if vae is None or not hasattr(vae, flag) or not callable(getattr(vae, method, None)):
                raise ValueError(
                    f"{name}=True, but this {type(pipeline).__name__}'s VAE "
                    f"({type(vae).__name__ if vae is not None else 'none'}) does not support {method}(). Set "
                    f"{name}=False{'' if name == 'vae_tiling' else ', or lower per_device_train_batch_size (rollouts decode that many images at once)'}."
                )
            getattr(vae, method)()

    # ================================================================================================ offload
    def _offloadable(self, text_encoders: bool = True, vae: bool = True) -> list[torch.nn.Module]:
        """The components `offload_text_encoders` / `offload_vae` keep in CPU memory while the denoiser trains."""
        modules = []
        for name, component in self.pipeline.components.items():
            if not isinstance(component, torch.nn.Module) or name == self.adapter.denoiser_name:
                continue
            if (text_encoders and self.args.offload_text_encoders and name.startswith("text_encoder")) or (
                vae and self.args.offload_vae and name == "vae"
            ):
                modules.append(component)
        return modules

    def _place_offloadable(self, device, text_encoders: bool = True, vae: bool = True) -> None:
        # A plain `.to()` once per rollout batch each way. Not diffusers' `enable_model_cpu_offload` (it moves the
        # denoiser too and hooks every forward) nor group offloading (it moves the weights at every call: once per
        # rollout chunk instead of once per rollout batch).
        for module in self._offloadable(text_encoders, vae):
            module.to(device)

    @contextlib.contextmanager
    def _onloaded(self, text_encoders: bool = True, vae: bool = True):
        """Offloaded components on the accelerator for a pipeline call, then back where they were."""
        modules = self._offloadable(text_encoders, vae)
        before = [next(m.parameters()).device for m in modules]
        for module in modules:
            module.to(self.accelerator.device)
        try:
            yield
        finally:
            for module, device in zip(modules, before, strict=True):
                module.to(device)

    # ================================================================================================ policies
    @contextlib.contextmanager
    def _policy(self, which: str):
        """Make the pipeline's denoiser compute with the `"old"`, `"ref"` or `"default"` (trained) weights."""
        denoiser = self.adapter.denoiser
        if self.use_lora:
            if which == "ref":
                denoiser.disable_adapters()
            elif which == "old":
                denoiser.set_adapter("old")
            try:
                yield denoiser
            finally:
                if which == "ref":
                    denoiser.enable_adapters()
                # set_adapter also hands requires_grad to the active adapter: give it back to the trained one.
                denoiser.set_adapter("default")
        else:
            module = {"old": self._old_model, "ref": self._ref_model, "default": denoiser}[which]
            setattr(self.pipeline, self.adapter.denoiser_name, module)
            try:
                yield module
            finally:
                setattr(self.pipeline, self.adapter.denoiser_name, denoiser)

    @contextlib.contextmanager
    def _ema_weights(self):
        """Swap the evaluation EMA into the trained weights (no-op when `eval_ema_decay` is None)."""
        if self._ema is None:
            yield
            return
        backup = [p.detach().clone() for p in self._trainable]
        with torch.no_grad():
            for p, e in zip(self._trainable, self._ema, strict=True):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self._trainable, backup, strict=True):
                    p.copy_(b)

    @contextlib.contextmanager
    def evaluation_weights(self):
        """The weights that evaluations and saved adapters use: the trained policy, or its EMA when `eval_ema_decay`
        is set, in eval mode (so `log()` inside it logs an evaluation). Yields the pipeline; callers that sample
        outside `evaluate` (the shapes demo) use this too."""
        with self._policy("default") as denoiser, self._ema_weights(), eval_mode(denoiser), self._onloaded():
            yield self.pipeline

    def _after_optimizer_step(self):
        if self._skip_updates:
            # A skipped (non-finite) step changes nothing: no old-policy or EMA update either.
            self._skip_updates = False
            return
        self._nonfinite_streak = 0
        self._weights_before_step = None
        step = self.state.global_step
        if self._ema is not None:
            decay = core.ema_warmup_decay(step, self.args.eval_ema_decay)
            core.soft_update_(self._ema, self._trainable, decay)
        if step % self.args.optimizer_steps_per_generation == 0:
            eta = float(self._decay_schedule(step))
            core.soft_update_(self._old, self._trainable, eta)
            self._metrics["train"]["old_policy/decay"].append(eta)

    # ================================================================================================ data
    def get_train_dataloader(self):
        # As GRPOTrainer: one dataloader batch is a whole rollout batch (per process), generated once and then
        # sliced into `steps_per_generation` micro-batches by `_prepare_inputs`.
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        from trl.trainer.utils import RepeatSampler

        dataset = dataset if dataset is not None else self.train_dataset
        num_prompts = self.args.generation_batch_size // self.num_generations
        if len(dataset) < num_prompts:
            raise ValueError(
                f"train_dataset has {len(dataset)} prompts but each rollout batch needs {num_prompts} distinct ones "
                f"(generation_batch_size {self.args.generation_batch_size} / num_generations {self.num_generations}). "
                "Add prompts or lower generation_batch_size."
            )
        return RepeatSampler(
            data_source=dataset,
            mini_repeat_count=self.num_generations,
            batch_size=num_prompts,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=True,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )

    def _prepare_inputs(self, generation_batch):
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score(generation_batch)
            perm = torch.randperm(batch["x0"].shape[0])
            # Tensors and per-sample lists (the prompts) are shuffled and split alike.
            batch = {k: v[perm.to(v.device)] if torch.is_tensor(v) else [v[i] for i in perm] for k, v in batch.items()}
            n = self.args.steps_per_generation
            size = math.ceil(batch["x0"].shape[0] / n)
            self._buffered_inputs = [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(n)]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # ================================================================================================ rollouts
    def _sample_latents(self, prompts: list[str], *, num_inference_steps: int, guidance_scale: float, generator=None):
        """Clean latents `[B, ...]` and decoded images `[B, 3, H, W]` in [0, 1] from the pipeline's own sampler."""
        with self.accelerator.autocast():
            x0, images = self.adapter.rollout(
                prompts,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=self.resolution,
                width=self.resolution,
                max_sequence_length=self.args.max_sequence_length,
                generator=generator,
            )
        return x0.float(), images

    def _rollout_guidance_scale(self) -> float:
        """The guidance of the current rollout batch: `guidance_scale`, annealed linearly to 1 over
        `guidance_decay_steps` optimizer steps, at the step the batch was sampled (so a resumed run matches)."""
        args = self.args
        if args.guidance_decay_steps <= 0:
            return args.guidance_scale
        every = args.steps_per_generation * self.num_iterations
        step = (self._step - self._step % every) // args.gradient_accumulation_steps
        return 1.0 + (args.guidance_scale - 1.0) * max(0.0, 1.0 - step / args.guidance_decay_steps)

    def _conditioning(self, prompts: list[str]) -> dict[str, Any]:
        """The denoiser's conditioning for `prompts`: from the per-prompt cache (`cache_prompt_embeddings`), else
        captured from the pipeline (see `trl_nft.families`)."""
        if not self.args.cache_prompt_embeddings:
            return self._capture_conditioning(prompts)
        self._cache_prompts(prompts)
        try:
            return self.adapter.join_conditioning_rows([self._prompt_cache[p] for p in prompts])
        except IncompatibleRows:
            # E.g. prompts that a pipeline padding to the longest prompt of its batch encoded at different lengths:
            # capture this micro-batch as it would be without the cache.
            with self._onloaded(vae=False):
                return self._capture_conditioning(prompts)

    def _cache_prompts(self, prompts: list[str]) -> None:
        """Capture and cache the conditioning of each prompt not cached yet (once per unique prompt)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if not missing:
            return
        with self._onloaded(vae=False):
            for prompt in missing:
                # Alone, as the pipeline pads it alone; twice, so that `tile()`'s per-sample rule sees a batch of 2.
                cond = self._capture_conditioning([prompt, prompt])
                self._prompt_cache[prompt] = self.adapter.conditioning_row(cond)

    def _capture_conditioning(self, prompts: list[str]) -> dict[str, Any]:
        with self.accelerator.autocast():
            return self.adapter.conditioning(
                prompts,
                guidance_scale=self.args.guidance_scale,
                height=self.resolution,
                width=self.resolution,
                max_sequence_length=self.args.max_sequence_length,
            )

    def _generate_and_score(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        prompts = [row["prompt"] for row in rows]
        columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"}
        chunk = self.args.per_device_train_batch_size
        latents, images = [], []
        self._place_offloadable(self.accelerator.device)
        self._prompt_cache.clear()
        # Each chunk is scored as soon as it is sampled, by the official code's scoring unit (one sampling batch): on
        # the reward worker while the next chunk is sampled (async_reward_computation), or inline.
        with self._reward_caller.schedule(self.args.async_reward_computation) as scoring:
            with torch.no_grad(), self._policy("old"):
                for i in range(0, len(prompts), chunk):
                    x0, chunk_images = self._sample_latents(
                        prompts[i : i + chunk],
                        num_inference_steps=self.args.num_inference_steps,
                        guidance_scale=self._rollout_guidance_scale(),
                    )
                    latents.append(x0)
                    images.append(chunk_images)
                    chunk_columns = {k: v[i : i + chunk] for k, v in columns.items()}
                    self._submit_rewards(scoring, prompts[i : i + chunk], chunk_images, chunk_columns, mode="train")
                    if scoring.failed:
                        break  # a reward raised: `results` raises it below, on every process together
            # (Before the conditioning capture below, which runs the pipeline too.)
            self._rollout_grid = self.adapter.training_grid()
            # The prompts' conditioning is cached while the last chunk is still being scored.
            if self.args.cache_prompt_embeddings and not scoring.failed:
                self._cache_prompts(prompts)
            self._place_offloadable("cpu")
            with self._fail_together("a reward function"):
                rewards_per_func = self._collect_rewards(scoring, mode="train")
        x0 = torch.cat(latents)
        images = torch.cat(images)
        self._log_diversity(prompts, images, mode="train")

        # Advantages are normalised over the whole rollout batch of all processes (official: all-gather).
        all_rewards = self.accelerator.gather(rewards_per_func.to(self.accelerator.device)).cpu()
        all_prompts = gather_object(prompts)
        group_ids = core.group_ids_from_keys(all_prompts)
        rewards = core.combine_rewards(all_rewards, self.reward_weights)
        advantages, stats = core.compute_advantages(
            self._aggregate_rewards(all_rewards, group_ids),
            group_ids,
            scale_rewards=self.args.scale_rewards,
            adv_clip_max=self.args.adv_clip_max,
        )
        r = core.optimality_probability(advantages, self.args.adv_clip_max)
        n = len(prompts)
        own = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        elapsed = time.perf_counter() - start

        metrics = self._metrics["train"]
        self._log_reward_metrics(metrics, all_rewards, rewards, group_ids)
        metrics["frac_reward_zero_std"].append(stats.frac_zero_std)
        metrics["samples/images_per_second"].append(len(all_prompts) / max(elapsed, 1e-9))
        metrics["samples/x0_norm"].append(x0.flatten(1).norm(dim=1).mean().item())
        if self.args.guidance_decay_steps > 0:
            metrics["guidance_scale"].append(self._rollout_guidance_scale())
        n_log = min(self.args.num_rollout_images_to_log, n)
        if n_log and self.is_world_process_zero():
            own_rewards, own_r = rewards[own], r[own]
            self._pending_rollout_images = (
                images[:n_log].cpu(),
                [f"R={own_rewards[i]:.3f} r={own_r[i]:.2f} {prompts[i]}" for i in range(n_log)],
            )
        return {"x0": x0, "r": r[own].to(x0.device), "prompts": prompts}

    def _aggregate_rewards(self, rewards_per_func: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """`[N]` reward the advantages are computed from, per `reward_aggregation` (see `core.combine_rewards`)."""
        return core.combine_rewards(
            rewards_per_func, self.reward_weights, group_ids=group_ids, aggregation=self.args.reward_aggregation
        )

    def _log_reward_metrics(self, metrics, rewards_per_func: torch.Tensor, rewards: torch.Tensor, group_ids=None):
        """Per reward: mean/std over its own scores (a `None` is left out of that reward's statistics, not counted as
        0), the fraction of missing scores and, with `group_ids`, the fraction of groups where it carries no signal.
        `reward`/`reward_std`: the weighted sum of the raw scores, whatever `reward_aggregation` is."""
        zero_std = core.frac_zero_std_per_column(rewards_per_func, group_ids) if group_ids is not None else None
        for i, name in enumerate(self.reward_func_names):
            col = rewards_per_func[:, i]
            missing = torch.isnan(col)
            col = col[~missing]
            metrics[f"rewards/{name}/mean"].append(col.mean().item() if col.numel() else math.nan)
            metrics[f"rewards/{name}/std"].append(col.std(unbiased=False).item() if col.numel() else math.nan)
            metrics[f"rewards/{name}/frac_missing"].append(missing.float().mean().item())
            if zero_std is not None:
                metrics[f"rewards/{name}/frac_zero_std"].append(zero_std[i])
        valid = rewards[~torch.isnan(rewards)]
        metrics["reward"].append(valid.mean().item() if valid.numel() else math.nan)
        metrics["reward_std"].append(valid.std(unbiased=False).item() if valid.numel() else math.nan)

    def _submit_rewards(self, scoring, prompts, images, columns, mode: str) -> None:
        """Hand one sampled chunk to `scoring` (a `trl_nft.rewards.calling.RewardSchedule`); `log_metric` values of
        the reward functions land in the `mode` metrics when `_collect_rewards` collects the chunk."""

        def log_metric(name: str, value: float):
            self._metrics[mode][name].append(float(value))

        scoring.submit(prompts, images, **columns, trainer_state=self.state, log_metric=log_metric)

    def _collect_rewards(self, scoring, mode: str) -> torch.Tensor:
        """`[N, F]` rewards of every chunk submitted to `scoring`, in order, NaN where a function returned None;
        checked by `trl_nft.rewards.calling.RewardCaller`. Extra per-image values a reward returns are logged as
        `rewards/<name>/<key>` (per chunk, the mean of the finite ones), and the seconds spent scoring and waiting
        for the scores as `reward_time` and `reward_wait_time`."""
        outputs = scoring.results()
        for out in outputs:
            for key, values in out.extras.items():
                finite = [v for v in values if math.isfinite(v)]
                self._metrics[mode][f"rewards/{key}"].append(sum(finite) / len(finite) if finite else math.nan)
        self._metrics[mode]["reward_time"].append(scoring.reward_time)
        self._metrics[mode]["reward_wait_time"].append(scoring.wait_time)
        return torch.cat([out.scores for out in outputs]) if outputs else torch.empty(0, len(scoring.caller.funcs))

    def _log_diversity(self, prompts: list[str], images: torch.Tensor, mode: str) -> None:
        diversity = self._within_group_diversity(prompts, images)
        if not math.isnan(diversity):  # NaN: no prompt with two images here (e.g. evaluation with unique prompts)
            self._metrics[mode]["diversity/within_group"].append(diversity)

    # ================================================================================================ reward monitors
    def _setup_eval_monitors(self, eval_reward_funcs, args: DiffusionNFTConfig) -> None:
        if eval_reward_funcs is not None and not isinstance(eval_reward_funcs, list | tuple):
            eval_reward_funcs = [eval_reward_funcs]
        self.eval_reward_funcs = [resolve_reward(f) for f in eval_reward_funcs or []]
        self.eval_reward_func_names = unique_reward_names(self.eval_reward_funcs)
        self._eval_reward_caller = (
            RewardCaller(self.eval_reward_funcs, self.eval_reward_func_names, args.non_finite_rewards)
            if self.eval_reward_funcs
            else None
        )
        if args.eval_reference_drift and not (args.use_lora or args.kl_weight > 0):
            raise ValueError(
                "eval_reference_drift=True compares with the reference model, which full fine-tuning keeps only when "
                "kl_weight > 0. Set kl_weight > 0, use LoRA, or set eval_reference_drift=False."
            )
        self._monitor_values: defaultdict[str, list[torch.Tensor]] = defaultdict(list)

    @staticmethod
    def _within_group_diversity(prompts: list[str], images: torch.Tensor) -> float:
        """`core.within_group_diversity` of images of one prompt, on pixels downsampled to at most 64 px; NaN when
        no prompt has two images."""
        size = min(64, images.shape[-1], images.shape[-2])
        small = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="area")
        return core.within_group_diversity(small.flatten(1).cpu(), core.group_ids_from_keys(prompts))

    @torch.no_grad()
    def _eval_monitors(self, prompts, images, columns, seeds: list[int], guidance_scale: float, heldout) -> None:
        """Per evaluation batch: held-out rewards (submitted to the `heldout` schedule, collected after the last
        batch), and the drift of the images from the reference model's."""
        if heldout is not None:
            heldout.submit(prompts, images, **columns, trainer_state=self.state)  # their log_metric values are dropped
        if self.args.eval_reference_drift:
            device = self.accelerator.device
            with self._policy("ref"):
                _, reference = self._sample_latents(
                    prompts,
                    num_inference_steps=self.args.eval_num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=[torch.Generator(device).manual_seed(s) for s in seeds],
                )
            rmse = (images.float() - reference.float()).flatten(1).pow(2).mean(dim=1).sqrt()
            self._monitor_values["drift"].append(rmse.cpu())

    def _eval_monitor_metrics(self, prefix: str) -> dict[str, float | None]:
        """Gather the evaluation monitors of all processes into metrics (and reset them)."""
        metrics: dict[str, float | None] = {}
        device = self.accelerator.device
        if self._eval_reward_caller is not None:
            local = torch.cat(self._monitor_values["heldout"]) if self._monitor_values["heldout"] else None
            if local is None:
                local = torch.empty(0, len(self.eval_reward_funcs))
            scores = self.accelerator.gather(local.to(device)).cpu()
            for i, name in enumerate(self.eval_reward_func_names):
                col = scores[:, i][~torch.isnan(scores[:, i])]
                metrics[f"{prefix}_heldout/{name}/mean"] = col.mean().item() if col.numel() else None
                metrics[f"{prefix}_heldout/{name}/std"] = col.std(unbiased=False).item() if col.numel() else None
        if self.args.eval_reference_drift:
            local = torch.cat(self._monitor_values["drift"]) if self._monitor_values["drift"] else torch.empty(0)
            rmse = self.accelerator.gather(local.to(device)).cpu()
            metrics[f"{prefix}_drift/pixel_rmse"] = rmse.mean().item() if rmse.numel() else None
        self._monitor_values.clear()
        return metrics

    @contextlib.contextmanager
    def _fail_together(self, what: str):
        """Run a block that may raise on some processes only (user reward code): every process learns of a failure and
        raises, instead of the others waiting forever in the next collective."""
        error = None
        try:
            yield
        except Exception as err:  # re-raised below, after the other processes heard of it
            error = err
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.gather(torch.tensor([error is not None], device=self.accelerator.device))
            failed = [rank for rank, flag in enumerate(flags.tolist()) if flag]
            if failed and error is None:
                raise RuntimeError(
                    f"{what} raised on process(es) {failed} (see the traceback there); this process stops too."
                )
        if error is not None:
            raise error

    # ================================================================================================ training
    def compute_loss_context_manager(self):
        context = super().compute_loss_context_manager()
        if self._frozen_half_dtype is None or self.accelerator.mixed_precision != "no":
            return context
        stack = contextlib.ExitStack()
        stack.enter_context(context)
        stack.enter_context(torch.autocast(self.accelerator.device.type, dtype=self._frozen_half_dtype))
        return stack

    def _check_gradients_before_step(self):
        """Called before `optimizer.step()`: skip the step if a gradient is not finite."""
        if self.args.fp16:
            return  # the fp16 GradScaler already skips steps with inf/NaN gradients and adjusts its scale
        grads = [p.grad for p in self._trainable if p.grad is not None]
        finite = bool(torch.nn.utils.get_total_norm(grads).isfinite()) if grads else True
        if finite:
            if self.use_lora:
                # LoRA weights are small: keep a copy to undo a step that overflows them (checked after the step).
                self._weights_before_step = [p.detach().clone() for p in self._trainable]
            return
        for p in self._trainable:
            p.grad = None  # optimizers skip parameters without a gradient: no weight or moment update
        self._record_nonfinite_step("the loss or a gradient is not finite")

    def _check_weights_after_step(self):
        if self._skip_updates:
            return
        finite = bool(torch.nn.utils.get_total_norm([p.detach() for p in self._trainable]).isfinite())
        if finite:
            return
        if self._weights_before_step is None:
            raise RuntimeError(
                f"The optimizer step {self.state.global_step + 1} made trained weights non-finite (learning rate too "
                f"high?). {self._last_good_checkpoint_message()}"
            )
        with torch.no_grad():
            for p, before in zip(self._trainable, self._weights_before_step, strict=True):
                p.copy_(before)
        self._record_nonfinite_step("the optimizer step made a weight non-finite (undone)")

    def _record_nonfinite_step(self, what: str):
        self._skip_updates = True
        self._nonfinite_streak += 1
        step = self.state.global_step + 1
        limit = self.args.max_nonfinite_steps
        if self._nonfinite_streak > limit:
            raise RuntimeError(
                f"Step {step}: {what}, the {self._nonfinite_streak}th step in a row (max_nonfinite_steps={limit}); "
                f"stopping. Lower learning_rate or check the rewards. {self._last_good_checkpoint_message()}"
            )
        logger.warning(
            f"Step {step}: {what}; skipping the step (no weight, old-policy or EMA update) "
            f"({self._nonfinite_streak} in a row, at most max_nonfinite_steps={limit})."
        )

    def _last_good_checkpoint_message(self) -> str:
        path, _ = _checkpoint.newest_complete_checkpoint(self._get_output_dir(trial=None))
        if path is None:
            return "No checkpoint was saved before this point."
        return f"The last good checkpoint is {path}: resume from it with train(resume_from_checkpoint={path!r})."

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        args = self.args
        x0, r = inputs["x0"], inputs["r"]
        grid = self._rollout_grid
        num_t = min(args.num_train_timesteps, grid.numel())
        batch = x0.shape[0]
        # Every sample is trained at its own random subset of the rollout's solver times, each with fresh noise (row j
        # of `t` and of `noise` is the j-th training time of every sample).
        t = core.sample_training_timesteps(grid, batch, num_t).to(x0.device)
        # (The capture runs the pipeline up to its first denoiser call, which draws its initial latents: before the
        # noise, so that the random stream is the same for every `timesteps_per_forward`.)
        cond = self._conditioning(list(inputs["prompts"]))
        noise = torch.randn((num_t * batch, *x0.shape[1:]), dtype=x0.dtype, device=x0.device).view(num_t, *x0.shape)
        # The loss is a mean over independent (sample, t) terms, so `timesteps_per_forward` rows at a time with the
        # gradients of each chunk weighted by its share give the same gradient as one stacked forward, at the peak
        # memory of one chunk.
        per_forward = min(args.timesteps_per_forward, num_t)
        chunks = []
        for lo in range(0, num_t, per_forward):
            hi = min(lo + per_forward, num_t)
            chunks.append(self._noised(x0, t[lo:hi].reshape(-1), noise[lo:hi].flatten(0, 1)))
        tiled = {chunk.k: self.adapter.tile(cond, chunk.k) for chunk in chunks}
        frozen = self._frozen_velocities(chunks, tiled)
        total, stats = 0.0, torch.zeros(3)
        for i, chunk in enumerate(chunks):
            share = chunk.k / num_t
            # Gradients are all-reduced once per micro-batch, on its last chunk (the Trainer's own no_sync covers the
            # earlier micro-batches of an accumulation).
            sync = contextlib.nullcontext() if i == len(chunks) - 1 else self.accelerator.no_sync(model)
            with sync:
                out = self._nft_chunk(model, chunk, r, tiled[chunk.k], *frozen[i])
                loss = out.loss * share / self.current_gradient_accumulation_steps
                self.accelerator.backward(loss)
            total += loss.detach()
            stats += share * torch.stack([out.policy_loss, out.kl, out.old_deviate]).detach().float().cpu()
        metrics = self._metrics["train"]
        metrics["policy_loss"].append(stats[0].item())
        metrics["kl"].append(stats[1].item())
        metrics["old_policy/deviation"].append(stats[2].item())
        self._step += 1
        return total

    @staticmethod
    def _noised(x0, t, noise) -> _Chunk:
        """`k` training times of every sample of the micro-batch: `t`/`noise` are `[k B]`/`[k B, ...]` (time-major,
        matching `x0.repeat(k, ...)`); `x_t = (1 - t) x0 + t noise` (the forward process, flow frame)."""
        k = t.shape[0] // x0.shape[0]
        x0_rep = x0.repeat(k, *([1] * (x0.dim() - 1)))
        tb = t.view(-1, *([1] * (x0.dim() - 1)))
        return _Chunk(k=k, x0=x0_rep, t=t, noise=noise, x_t=(1 - tb) * x0_rep + tb * noise)

    @torch.no_grad()
    def _frozen_velocities(self, chunks: list[_Chunk], tiled: dict[int, dict]) -> list[tuple]:
        """`(v_old, v_ref)` of every chunk (`v_ref` None without KL). All chunks go through one policy before the next,
        as the official code and Flow-Factory order them: switching peft adapters walks every LoRA layer, so one switch
        per micro-batch instead of one per chunk (the predictions are the same)."""
        with self.compute_loss_context_manager():
            with self._policy("old") as old:
                v_old = [self.adapter.velocity(c.x_t, c.t, tiled[c.k], model=old).float() for c in chunks]
                w = self._rollout_guidance_scale()
                if self._guided_old_policy and w > 1:  # the velocity the rollouts were sampled with
                    v_old = self._guided(chunks, v_old, w, old)
            v_ref = [None] * len(chunks)
            if self.args.kl_weight > 0:
                with self._policy("ref") as ref:
                    v_ref = [self.adapter.velocity(c.x_t, c.t, tiled[c.k], model=ref).float() for c in chunks]
                    if self.args.kl_guidance_scale > 1:  # the guided base as the KL anchor
                        v_ref = self._guided(chunks, v_ref, self.args.kl_guidance_scale, ref)
        return list(zip(v_old, v_ref, strict=True))

    def _guided(self, chunks: list[_Chunk], v_cond: list[torch.Tensor], w: float, model) -> list[torch.Tensor]:
        """`model`'s CFG velocity `v_u + w (v_c - v_u)` for every chunk, from its conditional `v_cond` and one forward on
        the family's negative prompt (`old_policy_guidance`, `kl_guidance_scale`)."""
        negative = self.adapter.negative_prompt(w)
        uncond = self._conditioning([negative] * (chunks[0].x_t.shape[0] // chunks[0].k))
        return [
            self.adapter.cfg_velocity(c.x_t, c.t, None, self.adapter.tile(uncond, c.k), w, model, v)
            for c, v in zip(chunks, v_cond, strict=True)
        ]

    def _nft_chunk(self, model, chunk: _Chunk, r, cond, v_old, v_ref) -> core.NFTLossOutput:
        """The NFT loss of a chunk's `k` training times of every sample, with the trained policy's forward; `cond` is
        the conditioning tiled `k` times, `v_old`/`v_ref` the frozen policies' predictions (`_frozen_velocities`)."""
        args = self.args
        weights = None
        if args.loss_time_weighting == "flow_equivalent":
            weights = core.time_weights(chunk.t, self.adapter.frame.output_gain(chunk.t)).to(chunk.x0.device)
        with self.compute_loss_context_manager():
            v_theta = self.adapter.velocity(chunk.x_t, chunk.t, cond, model=model).float()
            return core.nft_loss(
                v_theta,
                v_old,
                chunk.x0,
                chunk.noise,
                chunk.t,
                r.repeat(chunk.k),
                beta=args.nft_beta,
                loss_type=args.loss_type,
                adv_clip_max=args.adv_clip_max,
                v_ref=v_ref,
                kl_weight=args.kl_weight,
                weights=weights,
            )

    # ================================================================================================ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # As TRL: the model's mode says whose buffered metrics these logs close (evaluate() runs in eval mode).
        mode = "train" if self.model.training else "eval"
        metrics = {}
        for key, values in self._metrics[mode].items():
            valid = [v for v in values if not math.isnan(v)]
            metrics[key] = sum(valid) / len(valid) if valid else None
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs = {**logs, **metrics}
        super().log(logs, start_time)
        self._metrics[mode].clear()
        if mode == "train" and self._pending_rollout_images is not None:
            images, captions = self._pending_rollout_images
            self._pending_rollout_images = None
            self.log_images(ROLLOUT_IMAGES_KEY, images, captions)

    # ================================================================================================ evaluation
    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Sample every `eval_dataset` prompt once with a fixed seed per row and score it with the reward functions.

        Uses the trained policy (the EMA if `eval_ema_decay` is set), `eval_num_inference_steps` solver steps and
        `eval_guidance_scale`. Logs `eval_reward`, `eval_reward_std` and `eval_rewards/<name>/mean|std`.
        """
        dataset = self._as_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (passed here or to the trainer).")
        start = time.perf_counter()
        rows = [dataset[i] for i in range(len(dataset))]
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        indices = list(range(rank, len(rows), world))
        guidance = (
            self.args.eval_guidance_scale if self.args.eval_guidance_scale is not None else self.args.guidance_scale
        )
        device = self.accelerator.device
        bs = self.args.per_device_eval_batch_size
        all_images, all_prompts = [], []
        asynchronous = self.args.async_reward_computation
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._fail_together("evaluation"))
            stack.enter_context(self.evaluation_weights())
            # As in rollouts: each batch is scored (on the reward workers) while the next one is sampled.
            scoring = stack.enter_context(self._reward_caller.schedule(asynchronous))
            heldout = None
            if self._eval_reward_caller is not None:
                heldout = stack.enter_context(self._eval_reward_caller.schedule(asynchronous))
            for i in range(0, len(indices), bs):
                idx = indices[i : i + bs]
                prompts = [rows[j]["prompt"] for j in idx]
                columns = {k: [rows[j][k] for j in idx] for k in rows[0] if k != "prompt"}
                generators = [torch.Generator(device).manual_seed(self.args.eval_seed + j) for j in idx]
                _, images = self._sample_latents(
                    prompts,
                    num_inference_steps=self.args.eval_num_inference_steps,
                    guidance_scale=guidance,
                    generator=generators,
                )
                self._submit_rewards(scoring, prompts, images, columns, mode="eval")
                self._log_diversity(prompts, images, mode="eval")
                self._eval_monitors(
                    prompts, images, columns, [self.args.eval_seed + j for j in idx], guidance, heldout
                )
                all_images.append(images.cpu())
                all_prompts.extend(prompts)
                if scoring.failed or (heldout is not None and heldout.failed):
                    break
            local = self._collect_rewards(scoring, mode="eval")
            if heldout is not None:
                self._monitor_values["heldout"].extend(out.scores for out in heldout.results())
        # Processes hold different numbers of rows when the prompts do not divide evenly: gather objects, not tensors.
        num_funcs = len(self.reward_funcs)
        gathered = gather_object(local.tolist())
        rewards_per_func = torch.tensor(gathered, dtype=torch.float32).reshape(-1, num_funcs)
        rewards = core.combine_rewards(rewards_per_func, self.reward_weights)
        metrics_lists: defaultdict[str, list[float]] = defaultdict(list)
        self._log_reward_metrics(metrics_lists, rewards_per_func, rewards)
        metrics = {f"{metric_key_prefix}_{k}": v[0] for k, v in metrics_lists.items()}
        for key, values in self._metrics["eval"].items():
            valid = [v for v in values if not math.isnan(v)]
            metrics[f"{metric_key_prefix}_{key}"] = sum(valid) / len(valid) if valid else None
        self._metrics["eval"].clear()
        metrics.update(self._eval_monitor_metrics(metric_key_prefix))
        metrics[f"{metric_key_prefix}_runtime"] = time.perf_counter() - start
        self._last_eval_images = (torch.cat(all_images), all_prompts) if all_images else None
        with eval_mode(self.model):
            self.log(metrics)
        n = self.args.num_eval_images_to_log
        if n and all_images:
            self.log_images(EVAL_IMAGES_KEY, torch.cat(all_images)[:n], all_prompts[:n])
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def log_images(self, key: str, images, captions: list[str]) -> None:
        """Send a captioned grid of `images` to every tracker in `report_to` (TensorBoard, W&B, trackio) at the
        current step, then call `on_log_images(args, state, control, key=, images=, captions=, grid=)` on every
        callback that defines it (the hook for other sinks). Images logged under `eval/samples` also become the
        model card's gallery. Main process only.

        Args:
            key (`str`): the tracker's name for the image, e.g. `eval/samples` or `train/rollout_samples`.
            images (`torch.Tensor` of shape `[B, 3, H, W]` in [0, 1], or a list of PIL images).
            captions (`list[str]`): one caption per image (prompt, reward, ...).
        """
        if not self.is_world_process_zero() or len(images) == 0:
            return
        from .tracking import log_image_to_trackers
        from .utils import image_grid

        if key == EVAL_IMAGES_KEY and isinstance(images, torch.Tensor):
            self._last_eval_images = (images, list(captions))
        grid = image_grid(images, list(captions))
        log_image_to_trackers(self.callback_handler.callbacks, key, grid, self.state.global_step)
        for callback in self.callback_handler.callbacks:
            hook = getattr(callback, "on_log_images", None)
            if hook is not None:
                hook(self.args, self.state, self.control, key=key, images=images, captions=list(captions), grid=grid)

    # ================================================================================================ saving
    def _save(self, output_dir: str | None = None, state_dict=None):
        """Write the adapter in the diffusers format (or the fine-tuned denoiser's folder), `training_args.bin`, and
        the model card with the last evaluation images beside it. `save_model()`, checkpoints and pushes all come
        through here."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        denoiser = self.adapter.denoiser
        with self._ema_weights():
            bad = [n for n, p in zip(self._trainable_names, self._trainable, strict=True) if not p.isfinite().all()]
            if bad:
                raise RuntimeError(
                    f"Refusing to write a non-finite adapter to {output_dir}: {len(bad)} weights hold NaN/inf (first: "
                    f"{bad[0]}). {self._last_good_checkpoint_message()}"
                )
            if self.use_lora:
                from peft.utils import get_peft_model_state_dict

                lora_state = get_peft_model_state_dict(denoiser, adapter_name="default")
                metadata = denoiser.peft_config["default"].to_dict()
                self.adapter.save_lora_weights(output_dir, lora_state, metadata)
            else:
                denoiser.save_pretrained(os.path.join(output_dir, self.adapter.denoiser_name))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        self.create_model_card(output_dir=output_dir)

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint plus the NFT state, written atomically: into `.tmp-checkpoint-N`, flushed, renamed."""
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging = _checkpoint.staging_dir(final)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier save
            os.makedirs(staging)
        self.accelerator.wait_for_everyone()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(staging, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        self._save_rollout_buffer(staging)  # per process: each holds its own share of the rollout batch
        if self.args.should_save:
            self._save_nft_state(staging)
            if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and (
                self.state.best_global_step
            ):
                best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
                if self.state.best_global_step == self.state.global_step or os.path.isdir(best):
                    self.state.best_model_checkpoint = best
            from transformers.trainer_callback import ExportableState

            for cb in [
                cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)
            ]:
                name, cb_state = cb.__class__.__name__, cb.state()
                if isinstance(self.state.stateful_callbacks[name], list):
                    self.state.stateful_callbacks[name].append(cb_state)
                else:
                    self.state.stateful_callbacks[name] = cb_state
            self.state.save_to_json(os.path.join(staging, "trainer_state.json"))
            self.create_model_card(output_dir=staging)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _checkpoint.finalize(staging, final, self._checkpoint_description())
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _save_nft_state(self, output_dir: str):
        # What the diffusers LoRA file does not hold: the exact trained weights (the LoRA file holds the EMA when one is
        # kept), the old policy and the EMA, keyed by the trained parameter's name.
        from safetensors.torch import save_file

        tensors = {}
        for group, params in (("trained", self._trainable), ("old", self._old), ("ema", self._ema or [])):
            for name, p in zip(self._trainable_names, params, strict=False):
                tensors[f"{group}/{name}"] = p.detach().cpu().contiguous()
        save_file(tensors, os.path.join(output_dir, _checkpoint.STATE_TENSORS))

    def _save_rollout_buffer(self, output_dir: str):
        from safetensors.torch import save_file

        tensors, meta = _checkpoint.pack_buffer(self._buffered_inputs)
        rank = self.accelerator.process_index
        if tensors:
            save_file(tensors, os.path.join(output_dir, f"rollout_buffer_{rank}.safetensors"))
        with open(os.path.join(output_dir, f"rollout_buffer_{rank}.json"), "w") as f:
            json.dump(meta, f)

    def _checkpoint_description(self) -> dict[str, Any]:
        grid = self._rollout_grid
        return {
            "global_step": self.state.global_step,
            "micro_step": self._step,
            "rollout_grid": grid.tolist() if grid is not None else None,
            "use_lora": self.use_lora,
            "lora": _checkpoint.lora_summary(self.adapter.denoiser.peft_config["default"]) if self.use_lora else None,
            "batch_layout": _checkpoint.batch_layout(self.args),
            "has_ema": self._ema is not None,
        }

    # ================================================================================================ resuming
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`, plus: `resume_from_checkpoint=True` takes the newest *complete* checkpoint (skipping, with
        a warning, one whose save was interrupted), and SIGTERM/SIGINT save a checkpoint and exit
        (`save_on_signal`, see docs/checkpoints.md)."""
        if resume_from_checkpoint is True:
            output_dir = self.args.output_dir
            resume_from_checkpoint, skipped = _checkpoint.newest_complete_checkpoint(output_dir)
            for path, reason in skipped:
                logger.warning(f"Skipping incomplete checkpoint {path}: {reason}.")
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True, but {output_dir} holds no complete checkpoint"
                    + (f" ({len(skipped)} incomplete ones skipped)" if skipped else "")
                    + ". Start without resume_from_checkpoint, or pass the path of a checkpoint."
                )
            logger.info(f"Resuming from {resume_from_checkpoint}.")
        self._stop_signal = None
        self._signal_guard = _checkpoint.SignalGuard() if self.args.save_on_signal else None
        try:
            with self._signal_guard or contextlib.nullcontext():
                output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        finally:
            self._place_offloadable(self.accelerator.device)  # the pipeline is whole again after training
        if self._stop_signal is not None:
            import signal

            name = signal.Signals(self._stop_signal).name
            path = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            logger.warning(
                f"{name}: stopped after step {self.state.global_step} and saved checkpoint {path}. Resume with "
                f"trainer.train(resume_from_checkpoint={path!r}) (or resume_from_checkpoint=True)."
            )
            raise SystemExit(128 + self._stop_signal)
        return output

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        checkpoint = resume_from_checkpoint
        state = _checkpoint.read_state(checkpoint)
        fix = (
            "Resume with the same value, or start a new run from this checkpoint's adapter "
            "(pipe.load_lora_weights(checkpoint)) without resume_from_checkpoint."
        )
        _checkpoint.check_compatible(
            checkpoint, state["batch_layout"], _checkpoint.batch_layout(self.args), "the batch layout", fix
        )
        _checkpoint.check_compatible(
            checkpoint, {"use_lora": state["use_lora"]}, {"use_lora": self.use_lora}, "the setting", fix
        )
        if self.use_lora:
            current = _checkpoint.lora_summary(self.adapter.denoiser.peft_config["default"])
            _checkpoint.check_compatible(
                checkpoint, state["lora"], current, "the LoRA config (peft_config / lora_*)", fix
            )
        tensors = _checkpoint.load_tensors(os.path.join(checkpoint, _checkpoint.STATE_TENSORS))
        self._copy_named(checkpoint, tensors, "trained", self._trainable)
        self._copy_named(checkpoint, tensors, "old", self._old)
        if self._ema is not None:
            if state["has_ema"]:
                self._copy_named(checkpoint, tensors, "ema", self._ema)
            else:
                logger.warning(
                    f"{checkpoint} was saved without an evaluation EMA (eval_ema_decay was None) but this run keeps "
                    f"one (eval_ema_decay={self.args.eval_ema_decay}): it starts from the trained weights."
                )
                with torch.no_grad():
                    for e, p in zip(self._ema, self._trainable, strict=True):
                        e.copy_(p)
        self._step = int(state["micro_step"])
        grid = state["rollout_grid"]
        self._rollout_grid = torch.tensor(grid, dtype=torch.float32) if grid is not None else None
        self._buffered_inputs = self._load_rollout_buffer(checkpoint)

    def _load_rollout_buffer(self, checkpoint: str):
        rank = self.accelerator.process_index
        meta_file = os.path.join(checkpoint, f"rollout_buffer_{rank}.json")
        if not os.path.isfile(meta_file):
            raise _checkpoint.CheckpointError(
                f"{meta_file} is missing: {checkpoint} was saved by fewer processes than this run has."
            )
        with open(meta_file) as f:
            meta = json.load(f)
        tensor_file = os.path.join(checkpoint, f"rollout_buffer_{rank}.safetensors")
        tensors = _checkpoint.load_tensors(tensor_file) if os.path.isfile(tensor_file) else {}
        return _checkpoint.unpack_buffer(tensors, meta, self.accelerator.device)

    def _copy_named(self, checkpoint: str, tensors: dict[str, torch.Tensor], group: str, params: list[torch.Tensor]):
        prefix = f"{group}/"
        saved = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing = [n for n in self._trainable_names if n not in saved]
        unexpected = sorted(set(saved) - set(self._trainable_names))
        if missing or unexpected:
            raise _checkpoint.CheckpointError(
                f"{os.path.join(checkpoint, _checkpoint.STATE_TENSORS)} does not match this model's trained "
                f"parameters ({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. "
                f"{unexpected[:2]}): it was saved for another model or LoRA target modules. Resume with the same "
                "model and lora_target_modules / peft_config."
            )
        with torch.no_grad():
            for name, p in zip(self._trainable_names, params, strict=True):
                value = saved[name]
                if value.shape != p.shape:
                    raise _checkpoint.CheckpointError(
                        f"{checkpoint}: {group} weight {name} has shape {tuple(value.shape)} in the checkpoint but "
                        f"{tuple(p.shape)} here. Resume with the same model and LoRA rank."
                    )
                p.copy_(value.to(p.device, p.dtype))

    def _load_best_model(self):
        checkpoint = self.state.best_model_checkpoint
        logger.info(f"Loading the best weights from {checkpoint} (score: {self.state.best_metric}).")
        tensors = _checkpoint.load_tensors(os.path.join(checkpoint, _checkpoint.STATE_TENSORS))
        self._copy_named(checkpoint, tensors, "trained", self._trainable)
        if self._ema is not None and any(k.startswith("ema/") for k in tensors):
            self._copy_named(checkpoint, tensors, "ema", self._ema)

    def _load_optimizer_and_scheduler(self, checkpoint):
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except Exception as err:
            raise _checkpoint.CheckpointError(
                f"Could not load the optimizer / scheduler state of {checkpoint} (optimizer.pt, scheduler.pt): "
                f"{_first_line(err)}. The files are corrupt: resume from an earlier checkpoint, or delete "
                "this one so that resume_from_checkpoint=True picks the previous one."
            ) from err

    def _load_rng_state(self, checkpoint):
        try:
            super()._load_rng_state(checkpoint)
        except Exception as err:
            raise _checkpoint.CheckpointError(
                f"Could not load the random state of {checkpoint} (rng_state*.pth): {_first_line(err)}. The "
                "files are corrupt: resume from an earlier checkpoint, or delete this one."
            ) from err

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        output_dir: str | None = None,
        **kwargs,
    ):
        """Write `README.md` in `output_dir` (defaults to `args.output_dir`): a diffusers LoRA card with `base_model`,
        licence, tags, a gallery of the last evaluation images (saved to `images/`), rewards, guidance, steps, the last
        evaluation table, framework versions, the paper's citation and a snippet that loads the adapter from the
        Hub repo (`hub_model_id`, or the repo `push_to_hub` created). `save_model()` calls this."""
        if not self.is_world_process_zero():
            return
        output_dir = output_dir or self.args.output_dir
        repo_id = self.hub_model_id or self.args.hub_model_id
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        samples = []
        if self._last_eval_images is not None and self.args.num_eval_images_to_log:
            from .utils import to_pil

            images, captions = self._last_eval_images
            n = min(CARD_IMAGES, self.args.num_eval_images_to_log, len(images))
            samples = list(zip(to_pil(images[:n]), captions[:n], strict=True))
        if model_name is None:
            model_name = (repo_id or os.path.basename(os.path.normpath(self.args.output_dir))).split("/")[-1]
        denoiser = self.adapter.denoiser
        write_model_card(
            output_dir,
            base_model=self.base_model_id,
            pipeline_class=type(self.pipeline).__name__,
            model_name=model_name,
            repo_id=repo_id,
            reward_names=self.reward_func_names,
            reward_weights=self.reward_weights.tolist(),
            args=self.args,
            resolution=self.resolution,
            global_step=self.state.global_step,
            use_lora=self.use_lora,
            denoiser_name=self.adapter.denoiser_name,
            denoiser_class=type(getattr(denoiser, "base_model", denoiser)).__name__,
            dataset_name=dataset_name if dataset_name is not None else getattr(self, "dataset_name", None),
            tags=list(self._tag_names) + tags,
            log_history=self.state.log_history,
            example_prompt=self._example_prompt(),
            load_kwargs=dict.fromkeys(null_components(self.base_model_id)),
            call_kwargs=self.adapter.call_kwargs(
                self.args.max_sequence_length,
                self.args.eval_guidance_scale
                if self.args.eval_guidance_scale is not None
                else self.args.guidance_scale,
            ),
            eval_samples=samples,
        )

    # ================================================================================================ Hub
    @property
    def _hub_api(self):
        from huggingface_hub import HfApi

        # One HfApi per trainer: its single-worker executor runs the pushes during training one after another.
        if getattr(self, "_hub_api_instance", None) is None:
            self._hub_api_instance = HfApi(library_name="trl_nft")
        return self._hub_api_instance

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create (or reuse) the Hub repo `hub_model_id` (defaults to the output folder's name in the token's
        namespace) and record its full id in `self.hub_model_id`.

        Raises:
            `trl_nft.hub.PushToHubError`: the Hub refused the token or could not be reached (names the endpoint).
        """
        from .hub import create_repo

        if not self.is_world_process_zero():
            return
        repo_name = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        self.hub_model_id = create_repo(
            self._hub_api,
            repo_name,
            private=private if private is not None else self.args.hub_private_repo,
            token=token if token is not None else self.args.hub_token,
        )
        self.push_in_progress = None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push during training (each save, `push_to_hub=True`): the adapter, card and images of the checkpoint are
        copied to `output_dir` and uploaded in the background; `hub_strategy="checkpoint"` also uploads the whole
        checkpoint to `last-checkpoint/` (resumable). A failed upload is a logged warning; training goes on."""
        from transformers.utils.hub import PushInProgress

        from .hub import publish_patterns

        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        import fnmatch
        import shutil

        output_dir = self.args.output_dir
        patterns = publish_patterns(self.adapter.denoiser_name)
        if os.path.isdir(os.path.join(output_dir, "images")):
            shutil.rmtree(os.path.join(output_dir, "images"))
        for root, _, files in os.walk(checkpoint_folder):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), checkpoint_folder).replace(os.sep, "/")
                if any(fnmatch.fnmatch(rel, p) for p in patterns):
                    os.makedirs(os.path.dirname(os.path.join(output_dir, rel)), exist_ok=True)
                    shutil.copy2(os.path.join(root, name), os.path.join(output_dir, rel))
        message = f"Training in progress, step {self.state.global_step}"
        common = dict(repo_id=self.hub_model_id, token=self.args.hub_token, revision=self.args.hub_revision)
        jobs = [
            self._hub_api.upload_folder(
                folder_path=output_dir,
                allow_patterns=patterns,
                commit_message=message,
                run_as_future=True,
                **common,
            )
        ]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            jobs.append(
                self._hub_api.upload_folder(
                    folder_path=checkpoint_folder,
                    path_in_repo="last-checkpoint"
                    if self.args.hub_strategy == HubStrategy.CHECKPOINT
                    else os.path.basename(checkpoint_folder),
                    commit_message=message + ", checkpoint",
                    run_as_future=True,
                    **common,
                )
            )
        for job in jobs:
            job.add_done_callback(self._report_push)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def _report_push(self, job) -> None:
        from .hub import describe_error

        err = job.exception()
        if err is None:
            return
        message = describe_error(
            err, api=self._hub_api, repo_id=self.hub_model_id, folder=self.args.output_dir, action="Pushing to"
        )
        self.failed_pushes.append(message)
        logger.warning(f"{message}\nTraining continues; the next save or the final push_to_hub() uploads again.")

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save the adapter and card and upload them (with the card's images) to `hub_model_id`, creating the repo if
        needed. Checkpoint folders, `training_args.bin` and logs are not uploaded. Network errors and 5xx answers are
        retried (`trl_nft.hub.PUSH_RETRY_WAITS`); pushes that failed during training are reported.

        Args:
            commit_message (`str`, defaults to `"End of training"`): the commit's message.
            blocking (`bool`, defaults to `True`): `False` returns a `Future` (no retries).
            token (`str`, *optional*): defaults to `args.hub_token`, then the logged-in token.
            revision (`str`, *optional*): branch to push to; defaults to `args.hub_revision`.
            private (`bool`, *optional*): visibility of a repo created here; defaults to `args.hub_private_repo`.
            kwargs: passed to `create_model_card` (`model_name`, `dataset_name`, `tags`).

        Returns:
            `huggingface_hub.CommitInfo` (or a `Future` when `blocking=False`).

        Raises:
            `trl_nft.hub.PushToHubError`: naming the endpoint and repo; local files are never removed.
        """
        from .hub import publish_patterns, upload_run

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        self._finish_current_push()
        revision = revision if revision is not None else self.args.hub_revision
        if not blocking:
            return self._hub_api.upload_folder(
                repo_id=self.hub_model_id,
                folder_path=self.args.output_dir,
                allow_patterns=publish_patterns(self.adapter.denoiser_name),
                commit_message=commit_message,
                token=token,
                revision=revision,
                run_as_future=True,
            )
        info = upload_run(
            self._hub_api,
            self.args.output_dir,
            self.hub_model_id,
            commit_message=commit_message,
            denoiser_name=self.adapter.denoiser_name,
            token=token,
            revision=revision,
        )
        failed = self.failed_pushes
        if failed:
            logger.warning(
                f"{len(failed)} push(es) during training failed; this final push uploaded the current adapter and card: "
                f"{info.commit_url}"
            )
            failed.clear()
        else:
            logger.info(f"Pushed to {info.commit_url}")
        return info

    def _example_prompt(self) -> str:
        dataset = self.train_dataset
        if dataset is not None and len(dataset) > 0:
            return str(dataset[0]["prompt"])
        return "a photo of a cat"
