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
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import Trainer, TrainerCallback, enable_full_determinism, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import core
from .config import DiffusionNFTConfig, import_from_string
from .families import get_adapter, load_pipeline, null_components
from .families.adapter import eval_mode
from .model_card import write_model_card
from .rewards import resolve_reward
from .rewards.calling import RewardCaller, check_reward_columns, unique_reward_names


NFT_STATE_NAME = "nft_state.safetensors"


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


class _AfterOptimizerStep(TrainerCallback):
    """Runs the trainer's per-optimizer-step bookkeeping (old-policy and EMA updates) right after `optimizer.step()`,
    before logging and checkpointing see the step."""

    def __init__(self, trainer: DiffusionNFTTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()


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
            `{"scores": [...], "<key>": [...]}` with extra per-image values to log. `async def` rewards run on a
            background event loop. Return values are checked by `trl_nft.rewards.calling` (see docs/rewards.md).
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

    _tag_names = ("trl_nft", "diffusion-nft", "diffusers", "text-to-image", "lora")
    _name = "DiffusionNFT"

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
            pipeline = load_pipeline(str(model))
        else:
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
        self._decay_schedule = core.make_decay_schedule(
            import_from_string(args.old_policy_decay)
            if args.old_policy_decay not in ("linear", "constant")
            else args.old_policy_decay,
            rate=args.old_policy_decay_rate,
            max_decay=args.old_policy_decay_max,
            delay=args.old_policy_decay_delay,
        )
        self._ema = [p.detach().clone() for p in self._trainable] if args.eval_ema_decay is not None else None

        _make_config_serialisable(denoiser)
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
        self._metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._step = 0
        self._buffered_inputs: list[dict[str, Any]] | None = None
        self._rollout_grid: torch.Tensor | None = None
        self._last_eval_images: tuple[torch.Tensor, list[str]] | None = None

    # ================================================================================================ setup helpers
    @staticmethod
    def _as_dataset(dataset, field_name: str):
        if dataset is None:
            return None
        import datasets

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
        # Two adapters on one denoiser (official): "default" is trained, "old" samples rollouts and anchors the loss.
        denoiser.add_adapter(peft_config, adapter_name="default")
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
        is set. Yields the pipeline; callers that sample outside `evaluate` (the shapes demo) use this too."""
        with self._policy("default") as denoiser, self._ema_weights(), eval_mode(denoiser):
            yield self.pipeline

    def _after_optimizer_step(self):
        step = self.state.global_step
        if self._ema is not None:
            decay = core.ema_warmup_decay(step, self.args.eval_ema_decay)
            core.soft_update_(self._ema, self._trainable, decay)
        if step % self.args.optimizer_steps_per_generation == 0:
            eta = float(self._decay_schedule(step))
            core.soft_update_(self._old, self._trainable, eta)
            self._metrics["train"]["old_decay"].append(eta)

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
            seed=self.args.seed,
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

    def _conditioning(self, prompts: list[str]) -> dict[str, Any]:
        """The denoiser's conditioning for `prompts`, captured from the pipeline (see `trl_nft.families`)."""
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
        with torch.no_grad(), self._policy("old"):
            for i in range(0, len(prompts), chunk):
                x0, chunk_images = self._sample_latents(
                    prompts[i : i + chunk],
                    num_inference_steps=self.args.num_inference_steps,
                    guidance_scale=self.args.guidance_scale,
                )
                latents.append(x0)
                images.append(chunk_images)
        self._rollout_grid = self.adapter.training_grid()
        x0 = torch.cat(latents)
        images = torch.cat(images)
        rewards_per_func = self._calculate_rewards(prompts, images, columns, mode="train")

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
        metrics["images_per_second"].append(len(all_prompts) / max(elapsed, 1e-9))
        metrics["x0_norm"].append(x0.flatten(1).norm(dim=1).mean().item())
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

    def _calculate_rewards(self, prompts, images, columns, mode: str) -> torch.Tensor:
        """`[N, F]` rewards, NaN where a function returned None; checked by `trl_nft.rewards.calling.RewardCaller`.
        Extra per-image values a reward returns are logged as `rewards/<name>/<key>` (mean of the finite ones)."""

        def log_metric(name: str, value: float):
            self._metrics[mode][name].append(float(value))

        out = self._reward_caller(prompts, images, **columns, trainer_state=self.state, log_metric=log_metric)
        for key, values in out.extras.items():
            finite = [v for v in values if math.isfinite(v)]
            self._metrics[mode][f"rewards/{key}"].append(sum(finite) / len(finite) if finite else math.nan)
        diversity = self._within_group_diversity(prompts, images)
        if not math.isnan(diversity):  # NaN: no prompt with two images here (e.g. evaluation with unique prompts)
            self._metrics[mode]["diversity/within_group"].append(diversity)
        return out.scores

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
    def _eval_monitors(self, prompts, images, columns, seeds: list[int], guidance_scale: float) -> None:
        """Per evaluation batch: held-out rewards, and the drift of the images from the reference model's."""
        if self._eval_reward_caller is not None:
            out = self._eval_reward_caller(
                prompts, images, **columns, trainer_state=self.state, log_metric=lambda name, value: None
            )
            self._monitor_values["heldout"].append(out.scores)
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

    # ================================================================================================ training
    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        args = self.args
        x0, r = inputs["x0"], inputs["r"]
        grid = self._rollout_grid
        num_t = min(args.num_train_timesteps, grid.numel())
        batch = x0.shape[0]
        # Every sample is trained at its own random subset of the rollout's solver times, each with fresh noise; the
        # (sample, t) terms of a micro-batch go through one forward/backward.
        t = core.sample_training_timesteps(grid, batch, num_t).reshape(-1).to(x0.device)
        x0_rep = x0.repeat(num_t, *([1] * (x0.dim() - 1)))
        r_rep = r.repeat(num_t)
        cond_rep = self.adapter.tile(self._conditioning(list(inputs["prompts"])), num_t)
        noise = torch.randn_like(x0_rep)
        tb = t.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - tb) * x0_rep + tb * noise

        with torch.no_grad(), self.compute_loss_context_manager():
            with self._policy("old") as old:
                v_old = self.adapter.velocity(x_t, t, cond_rep, model=old).float()
            v_ref = None
            if args.kl_weight > 0:
                with self._policy("ref") as ref:
                    v_ref = self.adapter.velocity(x_t, t, cond_rep, model=ref).float()
        with self.compute_loss_context_manager():
            v_theta = self.adapter.velocity(x_t, t, cond_rep, model=model).float()
            out = core.nft_loss(
                v_theta,
                v_old,
                x0_rep,
                noise,
                t,
                r_rep,
                beta=args.nft_beta,
                loss_type=args.loss_type,
                adv_clip_max=args.adv_clip_max,
                v_ref=v_ref,
                kl_weight=args.kl_weight,
            )
        loss = out.loss / self.current_gradient_accumulation_steps
        self.accelerator.backward(loss)
        metrics = self._metrics["train"]
        metrics["policy_loss"].append(out.policy_loss.item())
        metrics["kl"].append(out.kl.item())
        metrics["old_deviate"].append(out.old_deviate.item())
        self._step += 1
        return loss.detach()

    # ================================================================================================ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        metrics = {}
        for key, values in self._metrics[mode].items():
            valid = [v for v in values if not math.isnan(v)]
            metrics[key] = sum(valid) / len(valid) if valid else None
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs = {**logs, **metrics}
        super().log(logs, start_time)
        self._metrics[mode].clear()

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
        all_scores, all_images, all_prompts = [], [], []
        with self.evaluation_weights():
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
                all_scores.append(self._calculate_rewards(prompts, images, columns, mode="eval"))
                self._eval_monitors(prompts, images, columns, [self.args.eval_seed + j for j in idx], guidance)
                all_images.append(images.cpu())
                all_prompts.extend(prompts)
        rewards_per_func = self.accelerator.gather(torch.cat(all_scores).to(device)).cpu()
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
        self._last_eval_images = (torch.cat(all_images), all_prompts)
        self.log(metrics)
        self._log_eval_images()
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _log_eval_images(self):
        """Send a captioned grid of the first evaluation images to the trackers (as TRL's DDPO image hook did)."""
        n = self.args.num_eval_images_to_log
        if not n or self._last_eval_images is None or not self.is_world_process_zero():
            return
        from .utils import image_grid

        images, prompts = self._last_eval_images
        grid = image_grid(images[:n], prompts[:n])
        import numpy as np

        array = np.asarray(grid)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.add_image("eval/samples", array, self.state.global_step, dataformats="HWC")
                callback.tb_writer.flush()
            elif type(callback).__name__ == "WandbCallback" and getattr(
                getattr(callback, "_wandb", None), "run", None
            ):
                callback._wandb.log({"eval/samples": callback._wandb.Image(grid)}, commit=False)

    # ================================================================================================ saving
    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        denoiser = self.adapter.denoiser
        with self._ema_weights():
            if self.use_lora:
                from peft.utils import get_peft_model_state_dict

                lora_state = get_peft_model_state_dict(denoiser, adapter_name="default")
                metadata = denoiser.peft_config["default"].to_dict()
                self.adapter.save_lora_weights(output_dir, lora_state, metadata)
            else:
                denoiser.save_pretrained(os.path.join(output_dir, self.adapter.denoiser_name))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial):
        checkpoint_dir = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            # What the diffusers LoRA file does not hold: the old policy, the exact trained weights (the LoRA file holds
            # the EMA when one is kept) and the EMA itself.
            from safetensors.torch import save_file

            tensors = {f"trained.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self._trainable)}
            tensors.update({f"old.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self._old)})
            if self._ema is not None:
                tensors.update({f"ema.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self._ema)})
            save_file(tensors, os.path.join(checkpoint_dir, NFT_STATE_NAME))
            self.create_model_card(output_dir=checkpoint_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from safetensors.torch import load_file

        path = os.path.join(resume_from_checkpoint, NFT_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"{resume_from_checkpoint} is not a DiffusionNFT checkpoint: {NFT_STATE_NAME} is missing."
            )
        tensors = load_file(path)
        groups = [("trained", self._trainable), ("old", self._old)] + ([("ema", self._ema)] if self._ema else [])
        with torch.no_grad():
            for prefix, params in groups:
                for i, p in enumerate(params):
                    p.copy_(tensors[f"{prefix}.{i}"].to(p.device, p.dtype))

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **kwargs):
        """Write `README.md` (diffusers LoRA card: base model, rewards, recipe, `load_lora_weights` snippet)."""
        if not self.is_world_process_zero():
            return
        output_dir = kwargs.pop("output_dir", None) or self.args.output_dir
        write_model_card(
            output_dir,
            base_model=self.base_model_id,
            pipeline_class=type(self.pipeline).__name__,
            model_name=model_name or os.path.basename(os.path.normpath(self.args.output_dir)),
            hub_model_id=self.args.hub_model_id,
            reward_names=self.reward_func_names,
            reward_weights=self.reward_weights.tolist(),
            args=self.args,
            resolution=self.resolution,
            global_step=self.state.global_step,
            use_lora=self.use_lora,
            dataset_name=dataset_name,
            tags=list(self._tag_names) + list(tags or []),
            log_history=self.state.log_history,
            example_prompt=self._example_prompt(),
            load_kwargs=dict.fromkeys(null_components(self.base_model_id)),
            call_kwargs=self.adapter.call_kwargs(self.args.max_sequence_length, self.args.guidance_scale),
        )

    def _example_prompt(self) -> str:
        dataset = self.train_dataset
        if dataset is not None and len(dataset) > 0:
            return str(dataset[0]["prompt"])
        return "a photo of a cat"
