"""`DiffusionNFTConfig`: every knob of a DiffusionNFT run, with the paper's / official code's defaults."""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.utils import (
    is_torch_cuda_available,
    is_torch_mps_available,
    is_torch_npu_available,
    is_torch_xla_available,
    is_torch_xpu_available,
    logging,
)


logger = logging.get_logger(__name__)


def _has_accelerator() -> bool:
    checks = (
        is_torch_cuda_available,
        is_torch_xla_available,
        is_torch_mps_available,
        is_torch_xpu_available,
        is_torch_npu_available,
    )
    return any(check() for check in checks)


LOSS_TYPES = ("adaptive", "velocity")
LOSS_TIME_WEIGHTINGS = ("none", "flow_equivalent")
SCALE_REWARDS = ("batch", "group", "none")
DECAY_SCHEDULES = ("linear", "constant")
REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")  # = trl_nft.core.REWARD_AGGREGATIONS
NON_FINITE_REWARDS = ("error", "missing")  # = trl_nft.rewards.calling.NON_FINITE_REWARDS


def import_from_string(path: str):
    """Import `package.module:attr` (or `package.module.attr`)."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not a dotted path of the form 'package.module:name'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Could not import module {module_name!r} from {path!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"Module {module_name!r} has no attribute {attr!r} (from {path!r}).") from err


@dataclass
class DiffusionNFTConfig(TrainingArguments):
    r"""
    Configuration for [`DiffusionNFTTrainer`].

    Extends `transformers.TrainingArguments` (so `output_dir`, `max_steps`, `learning_rate`, `report_to`,
    `save_steps`, `push_to_hub`, ... work as in any Trainer) with the DiffusionNFT fields below. Defaults follow the
    official SD3.5 recipe (`NVlabs/DiffusionNFT`, `config/nft.py`), scaled to your batch settings: with the defaults,
    one rollout batch of `per_device_train_batch_size x processes x gradient_accumulation_steps` images feeds exactly one
    optimizer step, as in the official code (there, 48 prompts x 24 images = 1152 images per step on 8 GPUs).

    Batch vocabulary: a *group* is the `num_generations` images of one prompt; a *rollout batch* is
    `generation_batch_size` images sampled at once; a *micro-batch* is `per_device_train_batch_size` images, each
    trained at `int(num_inference_steps * timestep_fraction)` times, `timesteps_per_forward` times per forward/backward
    (one, as the official code loops over them).
    """

    # ---------------------------------------------------------------- defaults changed from TrainingArguments
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate (official: 3e-4)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (official: 1e-4)."})
    lr_scheduler_type: str = field(
        default="constant", metadata={"help": "Learning-rate schedule (official: constant, no warm-up)."}
    )
    logging_steps: float = field(
        default=1, metadata={"help": "Log every N optimizer steps (RL steps are expensive, so every step)."}
    )
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images per device per micro-batch (each trained at several times, see `timestep_fraction`). "
            "Defaults to `num_generations`: one prompt group per micro-batch."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: every dataset column besides `prompt` is passed to the reward functions."},
    )

    # ---------------------------------------------------------------- rollouts (sampling the old policy)
    num_generations: int = field(
        default=24, metadata={"help": "Images per prompt, the group size K of the advantage estimate (official: 24)."}
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images sampled per rollout batch (all processes). Defaults to `per_device_train_batch_size x "
            "processes x steps_per_generation`. Must be a multiple of `num_generations`."
        },
    )
    steps_per_generation: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batches trained per rollout batch. Defaults to `gradient_accumulation_steps` (one optimizer "
            "step per rollout batch, official). Larger values take several optimizer steps per rollout batch (NFT is "
            "off-policy, so re-using rollouts is sound)."
        },
    )
    num_iterations: int = field(
        default=1, metadata={"help": "Passes over each rollout batch (official `train.num_inner_epochs`: 1)."}
    )
    num_inference_steps: int = field(
        default=10, metadata={"help": "Solver steps per rollout (official: 10 for single-reward runs)."}
    )
    guidance_scale: float = field(
        default=1.0,
        metadata={
            "help": "Guidance of rollouts, passed to the pipeline as its `guidance_scale`. 1.0 = CFG-free, as in the "
            "paper: NFT trains the unguided model, so CFG is not needed at inference either. For CFG families, > 1 "
            "samples rollouts with CFG while the loss still trains the conditional velocity (see docs/families.md, "
            "'Guidance'). For FLUX.1-dev / FLUX.2 it is the distilled guidance input of the denoiser (try 3.5), used "
            "in rollouts and training alike."
        },
    )
    guidance_decay_steps: int = field(
        default=0,
        metadata={
            "help": "Anneal the rollouts' guidance linearly from `guidance_scale` to 1 (CFG-free) over this many "
            "optimizer steps (each rollout batch uses the value at the step it is sampled); 0 keeps it constant. With "
            "`old_policy_guidance`: a warm start that distils the base's guidance into the CFG-free policy, after "
            "which training is the paper's CFG-free NFT (docs/families.md, 'Guidance'). CFG families only."
        },
    )
    old_policy_guidance: bool = field(
        default=False,
        metadata={
            "help": "With CFG rollouts (`guidance_scale` > 1, CFG families), give the loss the old policy's *guided* "
            "velocity v_old = v_u + w (v_c - v_u), the one the rollouts were sampled with (one more frozen forward "
            "per sample, with the empty prompt), instead of its conditional branch. The trained conditional model "
            "then learns the guided policy plus the reward's improvement: guidance distilled into the CFG-free model "
            "(docs/families.md, 'Guidance'). Not in the paper (CFG-free rollouts)."
        },
    )
    resolution: int | None = field(
        default=None,
        metadata={"help": "Image side in pixels. Defaults to the pipeline's own default size (SD3.5-M: 512 is used)."},
    )
    max_sequence_length: int = field(
        default=128,
        metadata={
            "help": "Text context length of the long text encoder (SD3: T5 tokens; official: 128). Passed to pipelines "
            "whose __call__ takes `max_sequence_length`."
        },
    )
    pipeline_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Extra keyword arguments for every pipeline call the trainer makes (rollouts, evaluation, "
            "conditioning capture), e.g. {'use_resolution_binning': false} for SANA. A JSON string on the command "
            "line. Not for arguments the trainer sets itself (prompt, guidance, size, steps, generator, output_type)."
        },
    )

    # ---------------------------------------------------------------- rewards -> r
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "Weight of each reward function; the raw reward is their weighted sum (official). Defaults to "
            "1.0 each."
        },
    )
    reward_aggregation: str = field(
        default="sum_then_normalize",
        metadata={
            "help": "How several rewards make one: 'sum_then_normalize' = weighted sum of the raw scores, then the "
            "advantage normalisation (official); 'normalize_then_sum' = each reward normalised within its group "
            "first, then the weighted sum, then the advantage normalisation (GDPO, arXiv 2601.05242), so a reward "
            "with a large spread cannot drown one with a small spread."
        },
    )
    non_finite_rewards: str = field(
        default="error",
        metadata={
            "help": "A NaN or infinite score from a reward function: 'error' raises, naming the function (default); "
            "'missing' treats it as None (no score for that image) and logs a warning."
        },
    )
    async_reward_computation: bool = field(
        default=True,
        metadata={
            "help": "Score each sampling chunk (per_device_train_batch_size images; per_device_eval_batch_size in "
            "evaluate()) on a worker thread while the next chunk is sampled, as the official code overlaps rewards "
            "with sampling (a thread pool). Rewards are called once per chunk either way, in order, so True and "
            "False give identical scores, metrics and errors. Set False for a reward that must run on the main thread "
            "or draws from torch's global random generator (see docs/rewards.md, 'Asynchronous scoring')."
        },
    )
    scale_rewards: str = field(
        default="batch",
        metadata={
            "help": "Divide group-centred rewards by the std of the whole rollout batch ('batch', official "
            "`global_std`), of each group ('group', GRPO's default), or not at all ('none')."
        },
    )
    adv_clip_max: float = field(
        default=5.0,
        metadata={
            "help": "Advantage clip c: A is clipped to [-c, c] and mapped to r = 1/2 + A/(2c), so Z_c = c * std "
            "(official: 5). Also scales the 'adaptive' loss, as in the official code."
        },
    )

    # ---------------------------------------------------------------- the NFT loss
    nft_beta: float = field(
        default=1.0,
        metadata={
            "help": "NFT guidance strength beta of the implicit policies v+ = (1-beta) v_old + beta v_theta, "
            "v- = (1+beta) v_old - beta v_theta (official `config.beta`: 1.0; 0.1 for OCR / multi-reward)."
        },
    )
    kl_weight: float = field(
        default=1e-4,
        metadata={
            "help": "Weight of the KL regulariser mean((v_theta - v_ref)^2) to the reference model (the denoiser with "
            "adapters disabled) (official `config.train.beta`: 1e-4). 0 skips the reference forward pass."
        },
    )
    kl_guidance_scale: float = field(
        default=1.0,
        metadata={
            "help": "Guidance of the KL term's reference velocity. 1.0 (official): the reference's conditional "
            "velocity. w > 1: its CFG velocity v_u + w (v_c - v_u) (one more reference forward, with the empty "
            "prompt; CFG families that declare `cfg_velocity`), which anchors the CFG-free policy to the *guided* base "
            "while NFT improves it: guidance distilled without guided rollouts (docs/families.md, 'Guidance'). Needs "
            "kl_weight > 0. Not in the paper."
        },
    )
    loss_type: str = field(
        default="adaptive",
        metadata={
            "help": "'adaptive': x0-space self-normalised regression of the official code (default); 'velocity': the "
            "paper's r||v+ - v||^2 + (1-r)||v- - v||^2."
        },
    )
    loss_time_weighting: str = field(
        default="none",
        metadata={
            "help": "Per-time weight of the loss. 'none': the official loss, unweighted. 'flow_equivalent': multiply "
            "each (sample, t) term by t / |d x0_hat / d output| so that a UNet gets the per-time gradient scale a "
            "velocity (flow) model gets: 1 - t for epsilon prediction, which otherwise puts ~200x more gradient on "
            "the noisiest time than on the cleanest. Identical to 'none' for flow-matching families. Not in the "
            "paper (flow models only); the shapes UNet recipe uses it (docs/families.md, 'The flow frame for every "
            "parameterisation')."
        },
    )
    timestep_fraction: float = field(
        default=0.99,
        metadata={
            "help": "Fraction of the rollout's solver times trained per sample: each sample trains at "
            "max(1, int(num_inference_steps * timestep_fraction)) times drawn from the rollout grid (official: 0.99, "
            "9 of 10)."
        },
    )

    timesteps_per_forward: int = field(
        default=1,
        metadata={
            "help": "Training times stacked into one denoiser forward/backward: the micro-batch's (sample, t) terms "
            "run as ceil(num_train_timesteps / timesteps_per_forward) forwards of per_device_train_batch_size x "
            "timesteps_per_forward rows, with gradients accumulated. Same loss and gradient for every value (up to "
            "float summation order); 1 loops over the times as the official code does and has the smallest peak "
            "memory; larger values may be faster where memory is to spare (on a CPU in float32, 4 x 64 rows cost "
            "the same as to 1.33x less than 1 x 256; under CPU bf16 autocast 1 x 256 was 1.31x faster: "
            "docs/benchmarks.md)."
        },
    )

    # ---------------------------------------------------------------- the old (sampling) policy
    old_policy_decay: str = field(
        default="linear",
        metadata={
            "help": "Schedule of eta in theta_old <- eta theta_old + (1-eta) theta, applied after each rollout batch: "
            "'linear' = min(rate * max(step - delay, 0), max) (paper: min(0.001 i, 0.5)), 'constant' = max, or a "
            "dotted path 'module:function' to a callable step -> eta."
        },
    )
    old_policy_decay_rate: float = field(default=0.001, metadata={"help": "Slope of the 'linear' schedule."})
    old_policy_decay_max: float = field(
        default=0.5, metadata={"help": "Cap of the 'linear' schedule, and the value of 'constant' (official: 0.5)."}
    )
    old_policy_decay_delay: int = field(
        default=0,
        metadata={"help": "Steps during which eta = 0 before the 'linear' ramp starts (official OCR recipe: 75)."},
    )

    # ---------------------------------------------------------------- LoRA (ignored when `peft_config` is given)
    use_lora: bool = field(
        default=True,
        metadata={"help": "Train LoRA adapters (official). False fine-tunes every denoiser weight."},
    )
    lora_r: int = field(default=32, metadata={"help": "LoRA rank (official: 32)."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (official: 64)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to adapt (peft `target_modules`). Defaults to the model family's targets (attention "
            "projections; SD3: the official DiffusionNFT list), see docs/families.md."
        },
    )

    # ---------------------------------------------------------------- evaluation
    eval_num_inference_steps: int = field(
        default=40, metadata={"help": "Solver steps for evaluation images (official eval: 40)."}
    )
    eval_guidance_scale: float | None = field(
        default=None,
        metadata={
            "help": "Guidance for evaluation. Defaults to `guidance_scale`; a different value evaluates another policy "
            "than the one rollouts sample (the trainer warns)."
        },
    )
    eval_seed: int = field(
        default=0,
        metadata={"help": "Evaluation row i is sampled with seed `eval_seed + i`: the same images each eval."},
    )
    eval_ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "If set, keep an EMA of the trained weights with decay min((1+s)/(10+s), eval_ema_decay) for "
            "evaluation and saving (official: 0.9). Off by default so that the saved adapter is the trained policy."
        },
    )
    eval_reference_drift: bool = field(
        default=False,
        metadata={
            "help": "At evaluation, also sample every prompt with the reference model (adapters disabled) from the same "
            "seeds and log `eval_drift/pixel_rmse`, the RMS pixel distance of trained and reference images (a "
            "reward-hacking monitor; doubles evaluation time). Needs LoRA or kl_weight > 0 (a reference model)."
        },
    )
    num_eval_images_to_log: int = field(
        default=16, metadata={"help": "Evaluation images sent to the trackers as a captioned grid (0: none)."}
    )
    num_rollout_images_to_log: int = field(
        default=8,
        metadata={
            "help": "Rollout images (the first prompts' groups, captioned with reward R, optimality probability r and "
            "prompt) sent to the trackers as `train/rollout_samples` at each logging step that follows a rollout "
            "(0: none)."
        },
    )

    # ---------------------------------------------------------------- memory (docs/memory.md)
    cache_prompt_embeddings: bool = field(
        default=True,
        metadata={
            "help": "Capture the denoiser's conditioning (text embeddings, pooled embeddings, masks, ...) once per "
            "unique prompt of a rollout batch, right after the rollout, and reuse it in every training micro-batch "
            "instead of running the text encoders again for each micro-batch. Exact: the text encoders are frozen. "
            "Where the prompts of a micro-batch cannot share one batch as cached (a pipeline that pads prompts to the "
            "longest of its batch, e.g. Qwen-Image), that micro-batch is captured through the pipeline as without "
            "the cache."
        },
    )
    offload_text_encoders: bool = field(
        default=False,
        metadata={
            "help": "Keep the pipeline's text encoders (`text_encoder*` components) in CPU memory while the "
            "denoiser trains, and move them to the accelerator for rollouts and evaluation. Needs "
            "cache_prompt_embeddings=True (training then needs no text encoder). No effect on a CPU-only run."
        },
    )
    offload_vae: bool = field(
        default=False,
        metadata={
            "help": "Keep the pipeline's VAE in CPU memory while the denoiser trains, and move it to the accelerator "
            "for rollouts and evaluation (which decode images for the rewards). No effect on a CPU-only run."
        },
    )
    vae_slicing: bool = field(
        default=False,
        metadata={
            "help": "Decode rollout and evaluation latents one image at a time (diffusers' `vae.enable_slicing()`): "
            "lower peak memory when the rewards' images are decoded, same images. The pipeline's VAE must support it."
        },
    )
    vae_tiling: bool = field(
        default=False,
        metadata={
            "help": "Decode latents in overlapping tiles (diffusers' `vae.enable_tiling()`): bounded decoder memory at "
            "large resolutions; the tiles are blended, so images differ slightly from a one-piece decode. The "
            "pipeline's VAE must support it."
        },
    )

    # ---------------------------------------------------------------- the model, robustness
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `DiffusionPipeline.from_pretrained` when the trainer's `model` is a path or "
            "Hub id, e.g. {'torch_dtype': 'bfloat16', 'revision': 'main', 'variant': 'fp16'} (as TRL's "
            "`model_init_kwargs`). `torch_dtype` may be a string ('bfloat16', 'float16', 'float32', 'auto'). Only "
            "valid with a string `model`."
        },
    )
    max_nonfinite_steps: int = field(
        default=3,
        metadata={
            "help": "A step whose loss or gradients are not finite (NaN/inf) is skipped with a warning (no weight, "
            "old-policy or EMA update); after this many consecutive skipped steps training stops with an error naming "
            "the last good checkpoint. 0 stops at the first one. Not in the official code, which does not guard."
        },
    )
    save_on_signal: bool = field(
        default=True,
        metadata={
            "help": "On SIGTERM or SIGINT (cluster pre-emption, Ctrl-C), finish the current optimizer step, write a "
            "checkpoint and exit (code 128 + signal number) with a message naming it; a second signal aborts at once. "
            "See docs/checkpoints.md."
        },
    )

    def __post_init__(self):
        if isinstance(self.pipeline_kwargs, str):
            self.pipeline_kwargs = json.loads(self.pipeline_kwargs)
        reserved = {
            "prompt", "guidance_scale", "height", "width", "num_inference_steps", "generator", "output_type",
            "callback_on_step_end", "max_sequence_length", "true_cfg_scale",
        }  # fmt: skip
        clash = sorted(reserved & set(self.pipeline_kwargs or {}))
        if clash:
            raise ValueError(
                f"pipeline_kwargs sets {clash}, which the trainer sets itself: use the config fields instead "
                "(guidance_scale, resolution, num_inference_steps, max_sequence_length, seed)."
            )
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (got {self.num_generations}): advantages compare the images of one "
                "prompt with each other. Set num_generations=2 or more."
            )
        if self.per_device_train_batch_size is None:
            self.per_device_train_batch_size = self.num_generations
        if self.bf16 and not self.use_cpu and not _has_accelerator():
            # Trainer allows bf16 without an accelerator only under `use_cpu`; CPU bf16 autocast is fast on
            # AVX512-BF16/AMX CPUs (the shapes demo uses it), so one config serves GPU and CPU-only machines alike.
            # A GPU without bf16 support still gets Trainer's own error.
            logger.info(
                "bf16=True on a machine with no accelerator: training on CPU with bf16 autocast (use_cpu=True)."
            )
            from .precision import cpu_bf16_flags

            if cpu_bf16_flags() == []:
                logger.warning(
                    "bf16=True on a CPU without native bf16 (no avx512_bf16/amx_bf16 flag): bf16 autocast is emulated "
                    "there and runs several times slower than float32 (5x for the shapes demo's denoiser on an AVX2 "
                    "EPYC). Set bf16=False, or time both with trl_nft.precision.choose_cpu_precision."
                )
            self.use_cpu = True
        if not self.use_cpu and not _has_accelerator() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # `accelerate launch --multi_gpu --num_processes N` on a machine without accelerators: accelerate forms the
            # gloo process group only for CPU states; without use_cpu every process would train alone.
            logger.info("Several processes and no accelerator: distributed CPU training over gloo (use_cpu=True).")
            self.use_cpu = True
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            # Trainer's default metric is the evaluation loss, which reward-based evaluation does not have.
            self.metric_for_best_model = "reward"
            if self.greater_is_better is None:
                self.greater_is_better = True
        if isinstance(self.model_init_kwargs, str):
            self.model_init_kwargs = json.loads(self.model_init_kwargs)
        super().__post_init__()
        self._check_nft_fields()
        self._check_inherited_fields()
        self._resolve_generation_batch()

    def _check_nft_fields(self):
        def need(cond: bool, message: str):
            if not cond:
                raise ValueError(message)

        need(self.nft_beta > 0, f"nft_beta must be > 0 (got {self.nft_beta}); the paper uses 1.0 or 0.1.")
        need(self.kl_weight >= 0, f"kl_weight must be >= 0 (got {self.kl_weight}); use 0 to disable the KL term.")
        need(self.loss_type in LOSS_TYPES, f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        need(
            self.loss_time_weighting in LOSS_TIME_WEIGHTINGS,
            f"loss_time_weighting must be one of {LOSS_TIME_WEIGHTINGS}, got {self.loss_time_weighting!r}.",
        )
        need(
            self.scale_rewards in SCALE_REWARDS,
            f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}.",
        )
        need(
            self.reward_aggregation in REWARD_AGGREGATIONS,
            f"reward_aggregation must be one of {REWARD_AGGREGATIONS}, got {self.reward_aggregation!r}.",
        )
        need(
            self.non_finite_rewards in NON_FINITE_REWARDS,
            f"non_finite_rewards must be one of {NON_FINITE_REWARDS}, got {self.non_finite_rewards!r}.",
        )
        need(self.adv_clip_max > 0, f"adv_clip_max must be > 0 (got {self.adv_clip_max}); the official value is 5.")
        need(
            0 < self.timestep_fraction <= 1,
            f"timestep_fraction must be in (0, 1] (got {self.timestep_fraction}); the official value is 0.99.",
        )
        need(
            self.timesteps_per_forward >= 1,
            f"timesteps_per_forward must be >= 1 (got {self.timesteps_per_forward}); 1 loops over the training times "
            "as the official code does.",
        )
        need(self.num_inference_steps >= 1, f"num_inference_steps must be >= 1 (got {self.num_inference_steps}).")
        need(
            self.eval_num_inference_steps >= 1,
            f"eval_num_inference_steps must be >= 1 (got {self.eval_num_inference_steps}).",
        )
        need(self.num_iterations >= 1, f"num_iterations must be >= 1 (got {self.num_iterations}).")
        need(self.guidance_scale >= 0, f"guidance_scale must be >= 0 (got {self.guidance_scale}); 1.0 is CFG-free.")
        need(
            self.guidance_decay_steps >= 0,
            f"guidance_decay_steps must be >= 0 (got {self.guidance_decay_steps}); 0 keeps guidance_scale constant.",
        )
        need(
            self.guidance_decay_steps == 0 or self.guidance_scale > 1,
            f"guidance_decay_steps={self.guidance_decay_steps} anneals guidance_scale to 1, but guidance_scale is "
            f"{self.guidance_scale}: set guidance_scale > 1 (e.g. 3) or guidance_decay_steps=0.",
        )
        need(
            self.kl_guidance_scale >= 1,
            f"kl_guidance_scale must be >= 1 (got {self.kl_guidance_scale}); 1.0 is the reference's conditional velocity.",
        )
        need(
            self.kl_guidance_scale == 1 or self.kl_weight > 0,
            f"kl_guidance_scale={self.kl_guidance_scale} guides the KL term's reference, but kl_weight is "
            f"{self.kl_weight}: set kl_weight > 0 (e.g. 0.3) or kl_guidance_scale=1.",
        )
        need(
            not self.old_policy_guidance or self.guidance_scale > 1,
            f"old_policy_guidance needs guided rollouts, but guidance_scale is {self.guidance_scale}: set "
            "guidance_scale > 1 (with guidance_decay_steps, see docs/families.md 'Guidance') or "
            "old_policy_guidance=False.",
        )
        need(
            self.resolution is None or self.resolution > 0,
            f"resolution must be a positive number of pixels or None (got {self.resolution}).",
        )
        need(self.max_sequence_length >= 1, f"max_sequence_length must be >= 1 (got {self.max_sequence_length}).")
        need(self.lora_r >= 1, f"lora_r must be >= 1 (got {self.lora_r}).")
        need(
            self.eval_ema_decay is None or 0 <= self.eval_ema_decay < 1,
            f"eval_ema_decay must be in [0, 1) or None (got {self.eval_ema_decay}).",
        )
        need(
            0 <= self.old_policy_decay_max <= 1,
            f"old_policy_decay_max must be in [0, 1] (got {self.old_policy_decay_max}).",
        )
        need(
            self.old_policy_decay_rate >= 0, f"old_policy_decay_rate must be >= 0 (got {self.old_policy_decay_rate})."
        )
        need(
            self.old_policy_decay_delay >= 0,
            f"old_policy_decay_delay must be >= 0 (got {self.old_policy_decay_delay}).",
        )
        if self.old_policy_decay not in DECAY_SCHEDULES:
            try:
                fn = import_from_string(self.old_policy_decay)
            except ValueError as err:
                raise ValueError(
                    f"old_policy_decay must be one of {DECAY_SCHEDULES} or a dotted path 'module:function' to a "
                    f"callable step -> eta; {err}"
                ) from err
            need(callable(fn), f"old_policy_decay {self.old_policy_decay!r} does not name a callable.")
        if self.reward_weights is not None:
            need(len(self.reward_weights) > 0, "reward_weights must not be empty; leave it None for weights of 1.0.")
        for name in ("cache_prompt_embeddings", "offload_text_encoders", "offload_vae", "vae_slicing", "vae_tiling"):
            need(isinstance(getattr(self, name), bool), f"{name} must be True or False (got {getattr(self, name)!r}).")
        need(
            self.cache_prompt_embeddings or not self.offload_text_encoders,
            "offload_text_encoders=True needs cache_prompt_embeddings=True: without the cache every training "
            "micro-batch runs the text encoders, which would move them between CPU and accelerator at every step. Set "
            "cache_prompt_embeddings=True or offload_text_encoders=False.",
        )

    def _check_inherited_fields(self):
        """Refuse the `TrainingArguments` options that DiffusionNFT's own sampler, evaluation, saving or model
        handling would silently ignore or break (each message names the field and the fix)."""

        def refuse(name: str, why: str, fix: str):
            raise ValueError(f"{name}={getattr(self, name)!r} is not supported by DiffusionNFTTrainer: {why} {fix}")

        if self.auto_find_batch_size:
            refuse(
                "auto_find_batch_size",
                "the batch sizes define the prompt groups (num_generations) and the rollout batch over which "
                "advantages are normalised, so they cannot be shrunk silently on an out-of-memory error.",
                "Set auto_find_batch_size=False and lower per_device_train_batch_size (raise steps_per_generation to "
                "keep generation_batch_size), or enable gradient_checkpointing=True.",
            )
        if self.train_sampling_strategy != "random":
            refuse(
                "train_sampling_strategy",
                "rollout batches are drawn by DiffusionNFT's own group sampler (each prompt repeated num_generations "
                "times, shuffled with `data_seed` or `seed`).",
                "Leave train_sampling_strategy='random'.",
            )
        if self.remove_unused_columns:
            refuse(
                "remove_unused_columns",
                "every dataset column besides 'prompt' is passed to the reward functions.",
                "Set remove_unused_columns=False (the default), or drop columns with dataset.remove_columns.",
            )
        if self.label_smoothing_factor != 0:
            refuse("label_smoothing_factor", "there are no labels in DiffusionNFT.", "Leave it at 0.")
        if self.label_names:
            refuse("label_names", "there are no labels in DiffusionNFT.", "Leave label_names=None.")
        if self.include_num_input_tokens_seen not in ("no", False, None):
            refuse(
                "include_num_input_tokens_seen",
                "inputs are prompts and latents, not token ids.",
                "Leave include_num_input_tokens_seen='no'.",
            )
        if self.neftune_noise_alpha is not None:
            refuse("neftune_noise_alpha", "NEFTune perturbs token embeddings of language models.", "Leave it None.")
        if self.use_liger_kernel:
            refuse("use_liger_kernel", "Liger kernels patch language models.", "Set use_liger_kernel=False.")
        if self.torch_compile:
            refuse(
                "torch_compile",
                "the trainer switches the denoiser between the trained, old and reference weights on every step, "
                "which a compiled module does not follow.",
                "Set torch_compile=False.",
            )
        if self.deepspeed or self.fsdp:
            name = "deepspeed" if self.deepspeed else "fsdp"
            refuse(
                name,
                "the old policy and the EMA are kept as unsharded copies of the trained parameters.",
                f"Unset {name} and use data parallelism (`accelerate launch --multi_gpu --num_processes N`).",
            )
        if self.parallelism_config is not None:
            refuse(
                "parallelism_config",
                "tensor / context / sequence parallelism would shard the denoiser whose weights the trainer copies "
                "into the old policy and the EMA.",
                "Leave parallelism_config=None and use data parallelism (`accelerate launch --multi_gpu`).",
            )
        if self.enable_jit_checkpoint:
            refuse(
                "enable_jit_checkpoint",
                "DiffusionNFTTrainer already writes a complete checkpoint on SIGTERM/SIGINT at the next optimizer step "
                "(see `save_on_signal`); Trainer's JIT checkpoint would save mid-step and without the rollout state.",
                "Set enable_jit_checkpoint=False (and keep save_on_signal=True).",
            )
        if self.bf16_full_eval or self.fp16_full_eval:
            name = "bf16_full_eval" if self.bf16_full_eval else "fp16_full_eval"
            refuse(
                name,
                "evaluation samples with the pipeline in the dtype it was given (under bf16/fp16 autocast when set).",
                f"Set {name}=False; load the pipeline with torch_dtype=torch.bfloat16 or set bf16=True instead.",
            )
        if self.prediction_loss_only or not self.eval_do_concat_batches or self.eval_accumulation_steps is not None:
            name = next(
                n
                for n, bad in (
                    ("prediction_loss_only", self.prediction_loss_only),
                    ("eval_do_concat_batches", not self.eval_do_concat_batches),
                    ("eval_accumulation_steps", self.eval_accumulation_steps is not None),
                )
                if bad
            )
            refuse(
                name,
                "evaluation scores sampled images with the reward functions, it has no loss or logits.",
                "Leave it at its default.",
            )
        if self.include_for_metrics or self.batch_eval_metrics:
            name = "include_for_metrics" if self.include_for_metrics else "batch_eval_metrics"
            refuse(
                name,
                "there is no compute_metrics: evaluation logs the rewards of the sampled images.",
                "Leave it at its default; log extra values from a reward function with `log_metric`.",
            )
        if self.metric_for_best_model is not None and self.metric_for_best_model.removeprefix("eval_") == "loss":
            refuse(
                "metric_for_best_model",
                "evaluation has no loss.",
                "Use metric_for_best_model='reward' (or 'rewards/<name>/mean') with greater_is_better=True.",
            )
        accelerator_config = self.accelerator_config
        if getattr(accelerator_config, "split_batches", False):
            raise ValueError(
                "accelerator_config.split_batches=True is not supported by DiffusionNFTTrainer: each process samples "
                "its own share of the rollout batch (per_device_train_batch_size x steps_per_generation prompts). "
                "Leave split_batches=False."
            )
        if getattr(accelerator_config, "dispatch_batches", None):
            raise ValueError(
                "accelerator_config.dispatch_batches=True is not supported by DiffusionNFTTrainer: each process loads "
                "its own prompts of the rollout batch. Leave dispatch_batches unset."
            )
        checkpointing_kwargs = dict(self.activation_checkpointing_kwargs or {})
        unsupported = sorted(set(checkpointing_kwargs) - {"use_reentrant"})
        if self.activation_checkpointing and unsupported:
            raise ValueError(
                f"gradient_checkpointing_kwargs {unsupported} are not supported for diffusers models, which checkpoint "
                "every transformer block (`enable_gradient_checkpointing()`); only 'use_reentrant' is. Remove them."
            )
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0 (got {self.max_nonfinite_steps}).")
        if self.model_init_kwargs is not None and not isinstance(self.model_init_kwargs, dict):
            raise ValueError(
                f"model_init_kwargs must be a dict (or a JSON object string), got {type(self.model_init_kwargs).__name__}."
            )

    def _resolve_generation_batch(self):
        num_processes = self.world_size
        global_micro = self.per_device_train_batch_size * num_processes
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                "Set either generation_batch_size or steps_per_generation, not both: one determines the other "
                "(generation_batch_size = per_device_train_batch_size x processes x steps_per_generation)."
            )
        if self.generation_batch_size is None:
            if self.steps_per_generation is None:
                self.steps_per_generation = self.gradient_accumulation_steps
            self.generation_batch_size = global_micro * self.steps_per_generation
        else:
            if self.generation_batch_size % global_micro != 0:
                raise ValueError(
                    f"generation_batch_size ({self.generation_batch_size}) must be a multiple of "
                    f"per_device_train_batch_size x processes ({global_micro})."
                )
            self.steps_per_generation = self.generation_batch_size // global_micro
        if self.generation_batch_size % self.num_generations != 0:
            raise ValueError(
                f"The rollout batch of {self.generation_batch_size} images (generation_batch_size = "
                f"per_device_train_batch_size {self.per_device_train_batch_size} x {num_processes} processes x "
                f"steps_per_generation {self.steps_per_generation}) must be a multiple of num_generations "
                f"({self.num_generations}), so that every prompt gets a full group. Change per_device_train_batch_size "
                "or generation_batch_size, or leave per_device_train_batch_size unset (it then equals num_generations)."
            )
        if (self.steps_per_generation * self.num_iterations) % self.gradient_accumulation_steps != 0:
            raise ValueError(
                f"steps_per_generation x num_iterations ({self.steps_per_generation} x {self.num_iterations}) must be a "
                f"multiple of gradient_accumulation_steps ({self.gradient_accumulation_steps}), so that optimizer steps "
                "and rollout batches line up (the old policy is updated after the last step on each rollout batch)."
            )

    @property
    def num_train_timesteps(self) -> int:
        """Times trained per sample: `max(1, int(num_inference_steps * timestep_fraction))` (official)."""
        return max(1, int(self.num_inference_steps * self.timestep_fraction))

    @property
    def optimizer_steps_per_generation(self) -> int:
        """Optimizer steps taken on each rollout batch; the old policy is updated after the last of them."""
        return self.steps_per_generation * self.num_iterations // self.gradient_accumulation_steps
