"""DDPO (Black et al. 2023, arXiv 2305.13301) on the shapes world's UNet base: TRL 0.23.1's `DDPOTrainer` as it ships.

    bash benchmarks/ddpo_env.sh                                    # once: .venv-ddpo with trl==0.23.1
    .venv-ddpo/bin/python benchmarks/ddpo.py --output_dir runs/ddpo_vs_nft/ddpo --max_minutes 20
    python benchmarks/nft_vs_grpo.py --summarise runs/ddpo_vs_nft --nft_run runs/unet-demo   # NFT (UNet) vs DDPO

A benchmark, not part of trl_nft's API. TRL removed `DDPOTrainer` in 0.24 (trl_nft needs trl 1.16), so it runs in a
separate environment, `.venv-ddpo`, made by `benchmarks/ddpo_env.sh`; trl_nft itself is only used there for the shapes
world (prompts, judge, held-out evaluation), never its trainer. `DDPOTrainer`, `DDPOConfig` and
`DefaultDDPOStableDiffusionPipeline` are used unchanged: this script only supplies the prompt and reward functions,
drives `DDPOTrainer.step` epoch by epoch under a wall-clock budget, and records what DDPO logs.

One epoch (DDPO's unit; the demo's "iteration"): `samples_per_epoch` (256) prompts drawn independently from the demo's
balanced training mix (DDPO has no groups), sampled by DDIM with eta 1 and CFG 5 (10 steps), rewarded by the
shapes world's partial credit, advantages from per-prompt running statistics (buffer 32, min count 16: the batch's
mean and std until a prompt has 16 rewards), then PPO-clipped policy-gradient training on every step of every
trajectory with CFG recomputed, 2 AdamW steps per epoch (lr 3e-4), LoRA r4 on the UNet's attention projections
(`DefaultDDPOStableDiffusionPipeline`'s), all in float32 (`mixed_precision="no"`).

Held-out evaluation every `eval_every_minutes` on the demo's 432 items (10 DDIM steps, eta 0), under DDPO's own
protocol (CFG `guidance_scale`, as it samples and trains) and CFG-free, written to `metrics.jsonl` in the demo's format
exactly as benchmarks/flow_grpo.py writes it, so `benchmarks/nft_vs_grpo.py --summarise` reads it. Deviations from the
DDPO recipe are listed in docs/benchmarks.md ("NFT against DDPO (UNet base)").
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flow_grpo import _Run, write_summary  # noqa: E402


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DDPOBenchmarkConfig:
    """DDPO's recipe on the shapes UNet base. Defaults: `DDPOConfig`'s and the official ddpo-pytorch recipe for its
    prompt-image alignment task, except where docs/benchmarks.md ("NFT against DDPO (UNet base)") says otherwise."""

    model_name_or_path: str = field(
        default="shapes-unet", metadata={"help": "'shapes-unet' (the shipped UNet base) or a local pipeline path."}
    )
    output_dir: str = field(default="runs/ddpo", metadata={"help": "Where metrics.jsonl, the LoRA and summary go."})
    max_minutes: float = field(
        default=12.0, metadata={"help": "Stop after the first epoch that ends past this many minutes of wall-clock."}
    )
    max_epochs: int | None = field(default=None, metadata={"help": "Also stop after this many epochs (tests)."})
    eval_every_minutes: float = field(
        default=1.5, metadata={"help": "Held-out evaluation interval in minutes (the demo's shipped 1.5)."}
    )
    heldout_per_tag: int = field(default=72, metadata={"help": "Held-out items per tag (the demo's 72 x 6 = 432)."})
    eval_num_inference_steps: int = field(default=10, metadata={"help": "DDIM (eta 0) steps of held-out evaluation."})
    seed: int = field(default=0, metadata={"help": "Seed of the LoRA init, prompt draws and sampling noise."})
    # sampling
    samples_per_epoch: int = field(
        default=256, metadata={"help": "Images per epoch (official 256: 8 per GPU x 4 batches x 8 GPUs)."}
    )
    sample_batch_size: int = field(default=64, metadata={"help": "Images per sampling call (x2 rows with CFG)."})
    num_inference_steps: int = field(default=10, metadata={"help": "DDIM sampling steps (DDPOConfig 50)."})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta of rollouts (official 1.0)."})
    guidance_scale: float = field(
        default=5.0, metadata={"help": "CFG of rollouts, training and own-protocol evaluation (official 5)."}
    )
    # training
    train_batch_size: int = field(
        default=32, metadata={"help": "Samples per training micro-batch (x2 rows with CFG); sets no dynamics."}
    )
    optimizer_steps_per_iteration: int = field(
        default=2,
        metadata={"help": "AdamW steps per epoch (official alignment/aesthetic recipes: 2; compressibility: 4)."},
    )
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate (official 3e-4)."})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip range (official 1e-4)."})
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantage clip (official 5)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip (official 1.0)."})
    timestep_fraction: float = field(default=1.0, metadata={"help": "Fraction of steps trained (official 1.0)."})
    train_cfg: bool = field(default=True, metadata={"help": "CFG in training as in sampling (official True)."})
    per_prompt_stat_tracking: bool = field(default=True, metadata={"help": "Per-prompt advantages (official)."})
    per_prompt_stat_tracking_buffer_size: int = field(
        default=32, metadata={"help": "Rewards kept per prompt (official alignment/aesthetic 32)."}
    )
    per_prompt_stat_tracking_min_count: int = field(
        default=16, metadata={"help": "Rewards a prompt needs before its own statistics are used (official 16)."}
    )

    def __post_init__(self):
        rows = self.train_batch_size * self.optimizer_steps_per_iteration
        if self.samples_per_epoch % self.sample_batch_size or self.sample_batch_size % self.train_batch_size:
            raise ValueError(
                f"samples_per_epoch ({self.samples_per_epoch}) must be a multiple of sample_batch_size "
                f"({self.sample_batch_size}), itself a multiple of train_batch_size ({self.train_batch_size})."
            )
        if self.samples_per_epoch % rows:
            raise ValueError(
                f"samples_per_epoch ({self.samples_per_epoch}) must split into optimizer_steps_per_iteration "
                f"({self.optimizer_steps_per_iteration}) steps of whole micro-batches of {self.train_batch_size}."
            )
        if int(self.num_inference_steps * self.timestep_fraction) < 1:
            raise ValueError(f"timestep_fraction {self.timestep_fraction} trains no step.")

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (DDPO accumulates them, each over every trained step)."""
        return self.samples_per_epoch // (self.train_batch_size * self.optimizer_steps_per_iteration)

    def ddpo_config_kwargs(self) -> dict[str, Any]:
        """The `DDPOConfig` fields this recipe sets (the rest keep DDPOConfig's defaults: AdamW betas (0.9, 0.999),
        weight decay 1e-4, eps 1e-8, one inner epoch, empty negative prompt)."""
        return {
            "seed": self.seed,
            "mixed_precision": "no",
            "sample_num_steps": self.num_inference_steps,
            "sample_eta": self.eta,
            "sample_guidance_scale": self.guidance_scale,
            "sample_batch_size": self.sample_batch_size,
            "sample_num_batches_per_epoch": self.samples_per_epoch // self.sample_batch_size,
            "train_batch_size": self.train_batch_size,
            "train_gradient_accumulation_steps": self.gradient_accumulation_steps,
            "train_learning_rate": self.learning_rate,
            "train_max_grad_norm": self.max_grad_norm,
            "train_cfg": self.train_cfg,
            "train_adv_clip_max": self.adv_clip_max,
            "train_clip_range": self.clip_range,
            "train_timestep_fraction": self.timestep_fraction,
            "per_prompt_stat_tracking": self.per_prompt_stat_tracking,
            "per_prompt_stat_tracking_buffer_size": self.per_prompt_stat_tracking_buffer_size,
            "per_prompt_stat_tracking_min_count": self.per_prompt_stat_tracking_min_count,
            # Checkpoints cost time inside the budget and the benchmark needs only the final LoRA.
            "save_freq": 10**9,
        }


# --------------------------------------------------------------------------------------------------------------------
# What DDPOTrainer is given: prompts and rewards
# --------------------------------------------------------------------------------------------------------------------


class PromptSampler:
    """DDPO's `prompt_function`: each call returns one `(prompt, metadata)` drawn uniformly from `prompts` (the demo's
    balanced rows, so tag families are balanced), seeded. Keeps the prompts drawn since the last `reset()`."""

    def __init__(self, prompts: Sequence[str], seed: int = 0):
        if not prompts:
            raise ValueError("PromptSampler needs at least one prompt.")
        self.prompts = list(prompts)
        self.rng = random.Random(seed)
        self.drawn: list[str] = []

    def __call__(self) -> tuple[str, dict[str, Any]]:
        prompt = self.rng.choice(self.prompts)
        self.drawn.append(prompt)
        return prompt, {}

    def reset(self) -> None:
        self.drawn = []


class DDPOReward:
    """DDPO's `reward_function(images, prompts, metadata) -> (rewards, reward_metadata)` around a trl_nft-style reward
    `reward_fn(prompts=, images=) -> list[float]` (default: the shapes world's partial credit, `shapes_reward`).

    `images` is what DDPO's pipeline returns with `output_type="pt"`: float `[B, 3, H, W]` in [0, 1]. Returns
    `rewards` as a float32 tensor `[B]` and empty metadata. Adds the seconds spent to `seconds` (which the benchmark
    reads and resets every epoch).

    Raises:
        ValueError: when `reward_fn` returns a number of rewards other than the number of prompts.
    """

    def __init__(self, reward_fn: Callable | None = None):
        if reward_fn is None:
            from trl_nft.shapes.judge import shapes_reward

            reward_fn = shapes_reward
        self.reward_fn = reward_fn
        self.seconds = 0.0

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Any]):
        t0 = time.perf_counter()
        prompts = list(prompts)
        rewards = torch.tensor([float(r) for r in self.reward_fn(prompts=prompts, images=images)], dtype=torch.float32)
        if len(rewards) != len(prompts):
            raise ValueError(f"reward_fn returned {len(rewards)} rewards for {len(prompts)} prompts.")
        self.seconds += time.perf_counter() - t0
        return rewards, {}


# --------------------------------------------------------------------------------------------------------------------
# What DDPOTrainer logs, as the demo's metrics.jsonl records
# --------------------------------------------------------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    """A Python number from a 0-d tensor or numpy scalar (DDPO logs both); anything else unchanged."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def epoch_records(logs: Sequence[tuple[int | None, dict[str, Any]]], learning_rate: float) -> list[dict[str, Any]]:
    """The demo-format `"train"` records of one DDPO epoch from what `DDPOTrainer.step` passed to
    `accelerator.log(values, step)`, in order.

    DDPO logs the rollout (`reward` array, `reward_mean`, `reward_std`, `epoch`) at `step` = the optimizer steps done
    before the epoch, then one record per optimizer step (`loss`, `approx_kl`, `clipfrac`, `epoch`, `inner_epoch`) at
    `step` = the steps done before it. The demo's records carry the step count after the step (`step` 1 for the first
    optimizer step), and the rollout's mean `reward` / `reward_std` on the first step of the batch that consumed it, as
    `benchmarks/nft_vs_grpo.py` reads them. Returns one record per optimizer step (none: the rollout alone).
    """
    rollout: dict[str, Any] = {}
    rollout_step = 0
    records: list[dict[str, Any]] = []
    for step, values in logs:
        if "reward_mean" in values:
            rollout = {"reward": _scalar(values["reward_mean"]), "reward_std": _scalar(values["reward_std"])}
            rollout["epoch"] = _scalar(values.get("epoch"))
            rollout_step = step or 0
        elif "loss" in values:
            record = {"step": (step or 0) + 1, "learning_rate": learning_rate}
            record.update({k: _scalar(v) for k, v in values.items()})
            records.append(record)
    if not rollout:
        return records
    if not records:
        return [{"step": rollout_step, **rollout}]
    records[0].update(rollout)
    return records


# --------------------------------------------------------------------------------------------------------------------
# DDPOTrainer on the shapes world (needs trl 0.23.1: imported here only)
# --------------------------------------------------------------------------------------------------------------------


def _recording_tracker():
    """An accelerate tracker that keeps what DDPOTrainer logs (DDPOConfig.log_with accepts a tracker instance)."""
    from accelerate.tracking import GeneralTracker

    class RecordingTracker(GeneralTracker):
        name = "recording"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.logs: list[tuple[int | None, dict[str, Any]]] = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values: dict) -> None:
            pass

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            self.logs.append((step, dict(values)))

    return RecordingTracker()


class ShapesDDPO:
    """TRL 0.23.1's `DDPOTrainer` on a shapes-world UNet base, with the interface `flow_grpo._Run` drives
    (`evaluate`, `global_step`, `iteration`) plus `train_epoch()`.

    Args:
        config (`DDPOBenchmarkConfig`): the recipe.
        prompts (`Sequence[str]`): the training rows prompts are drawn from.
        reward_fn (`Callable`, *optional*): `reward_fn(prompts=, images=) -> list[float]`; default `shapes_reward`.

    Raises:
        ImportError: without trl 0.23.x (`DDPOTrainer` is gone from trl >= 0.24): run `benchmarks/ddpo_env.sh`.
    """

    def __init__(self, config: DDPOBenchmarkConfig, prompts: Sequence[str], reward_fn: Callable | None = None):
        try:
            from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline
        except ImportError as error:
            raise ImportError(
                "benchmarks/ddpo.py needs TRL 0.23.1's DDPOTrainer (removed in trl 0.24); create its environment with "
                "`bash benchmarks/ddpo_env.sh` and run this script with `.venv-ddpo/bin/python`."
            ) from error
        from accelerate import PartialState

        from trl_nft.shapes.pretrain import resolve_base_path

        self.config = config
        PartialState()  # accelerate's logger (used by the pipeline's constructor) needs a state first
        # The base ships no LoRA; DDPO's pipeline says so before attaching a fresh one (expected, not a problem).
        logging.getLogger("trl.models.modeling_sd_base").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=r".*_encode_prompt\(\)` is deprecated.*")
        self.pipeline = DefaultDDPOStableDiffusionPipeline(resolve_base_path(config.model_name_or_path), use_lora=True)
        self.prompt_fn = PromptSampler(prompts, seed=config.seed)
        self.reward_fn = DDPOReward(reward_fn)
        self.tracker = _recording_tracker()
        ddpo_config = DDPOConfig(log_with=self.tracker, **config.ddpo_config_kwargs())
        self.trainer = DDPOTrainer(ddpo_config, self.reward_fn, self.prompt_fn, self.pipeline)
        self.pipeline.set_progress_bar_config(disable=True)
        self.trainable = list(self.trainer.trainable_layers)
        self.initial = [p.detach().clone() for p in self.trainable]
        self.rollout_seconds = 0.0
        generate = self.trainer._generate_samples

        def timed_generate(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                self.rollout_seconds += time.perf_counter() - t0

        self.trainer._generate_samples = timed_generate
        self.global_step = 0
        self.iteration = 0

    @property
    def sd_pipeline(self):
        """The `StableDiffusionPipeline` DDPO trains (its UNet carries the LoRA)."""
        return self.pipeline.sd_pipeline

    def lora_delta_norm(self) -> float:
        """L2 norm of the change of every trainable (LoRA) parameter since the start."""
        pairs = zip(self.trainable, self.initial, strict=True)
        return math.sqrt(sum(float((p.detach() - p0).pow(2).sum()) for p, p0 in pairs))

    def per_prompt_stats_fraction(self, prompts: Sequence[str]) -> float | None:
        """Fraction of `prompts` whose DDPO advantage came from their own running statistics (buffer of at least
        `min_count` rewards) rather than the batch's mean and std."""
        tracker = getattr(self.trainer, "stat_tracker", None)
        if tracker is None or not prompts:
            return None
        counts = [len(tracker.stats.get(p, ())) for p in prompts]
        return sum(c >= tracker.min_count for c in counts) / len(counts)

    def train_epoch(self) -> list[dict[str, Any]]:
        """One DDPO epoch (`DDPOTrainer.step`): sample, reward, train. Returns its demo-format `"train"` records, the
        first carrying the rollout statistics and timings."""
        self.tracker.logs.clear()
        self.prompt_fn.reset()
        self.reward_fn.seconds, self.rollout_seconds = 0.0, 0.0
        t0 = time.perf_counter()
        self.global_step = self.trainer.step(self.iteration, self.global_step)
        epoch_seconds = time.perf_counter() - t0
        self.iteration += 1
        records = epoch_records(self.tracker.logs, self.config.learning_rate)
        if not records:
            records = [{"step": self.global_step}]
        records[0].update(
            {
                "time/epoch_s": epoch_seconds,
                "time/rollout_s": self.rollout_seconds,
                "time/reward_s": self.reward_fn.seconds,
                "time/train_s": epoch_seconds - self.rollout_seconds - self.reward_fn.seconds,
                "lora/delta_norm": self.lora_delta_norm(),
                "per_prompt_stats_fraction": self.per_prompt_stats_fraction(self.prompt_fn.drawn),
            }
        )
        for r in records:
            r["iteration"] = self.iteration
        return records

    def evaluate(self, items, guidance_scale: float) -> dict[str, Any]:
        """The demo's held-out evaluation (the pipeline's own DDIM sampler, eta 0, fixed seeds) of the current LoRA."""
        from trl_nft.families.adapter import eval_mode
        from trl_nft.shapes.evaluate import evaluate_pipeline

        with eval_mode(self.sd_pipeline.unet):
            return evaluate_pipeline(
                self.sd_pipeline,
                items,
                num_inference_steps=self.config.eval_num_inference_steps,
                guidance_scale=guidance_scale,
                batch_size=144,
            )

    def save_lora(self, output_dir: str) -> None:
        """The trained LoRA in diffusers format (`StableDiffusionPipeline.load_lora_weights(output_dir)`)."""
        from peft.utils import get_peft_model_state_dict
        from trl.models.sd_utils import convert_state_dict_to_diffusers

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.sd_pipeline.unet))
        self.sd_pipeline.save_lora_weights(save_directory=output_dir, unet_lora_layers=state)


# --------------------------------------------------------------------------------------------------------------------
# The run: wall-clock budget, held-out evaluations, metrics.jsonl in the demo's format
# --------------------------------------------------------------------------------------------------------------------


class _DDPORun(_Run):
    """flow_grpo's bookkeeping (clock without the CFG-free extra evaluation, `metrics.jsonl`, both evaluations),
    with DDPO's epochs as iterations."""

    name = "ddpo"

    def loop(self, dataset=None) -> None:
        cfg, tr = self.config, self.trainer
        max_seconds = cfg.max_minutes * 60
        self.start = time.perf_counter()
        self.evaluate()

        def more() -> bool:
            return self.elapsed() < max_seconds and (cfg.max_epochs is None or tr.iteration < cfg.max_epochs)

        while more():
            records = tr.train_epoch()
            for record in records:
                self.write({"type": "train", "minutes": self.elapsed() / 60, **record})
            first = records[0]
            print(
                f"[ddpo] epoch {tr.iteration} (step {tr.global_step}) @ {self.elapsed() / 60:.1f} min: "
                f"reward {first.get('reward', math.nan):.3f}, loss {first.get('loss', math.nan):.2e}, "
                f"epoch {first['time/epoch_s']:.0f} s (rollout {first['time/rollout_s']:.0f} s, reward "
                f"{first['time/reward_s']:.1f} s), LoRA change {first['lora/delta_norm']:.3g}",
                flush=True,
            )
            if more() and self.elapsed() - self.last_eval >= cfg.eval_every_minutes * 60:
                self.evaluate()
        if not self.history or self.history[-1]["step"] != tr.global_step:
            self.evaluate()


def run(config: DDPOBenchmarkConfig) -> dict[str, Any]:
    """Train DDPO on the shapes world for `config.max_minutes`; writes `metrics.jsonl`, `summary.json`, the LoRA and
    `config.json` to `config.output_dir` and returns the summary."""
    from trl_nft.shapes.demo import parse_tag_weights
    from trl_nft.shapes.world import heldout_items, make_dataset

    dataset = make_dataset("train", tag_weights=parse_tag_weights("balanced"))  # the demo's prompt mix
    trainer = ShapesDDPO(config, list(dataset["prompt"]))
    items = heldout_items(n_per_tag=config.heldout_per_tag)
    run_ = _DDPORun(trainer, config, items)
    import trl

    with open(os.path.join(config.output_dir, "config.json"), "w") as f:
        json.dump({**asdict(config), "trl_version": trl.__version__, "lora_r": 4, "lora_alpha": 4,
                   "lora_target_modules": ["to_k", "to_q", "to_v", "to_out.0"],
                   "gradient_accumulation_steps": config.gradient_accumulation_steps,
                   "trainable_parameters": sum(p.numel() for p in trainer.trainable)}, f, indent=2)  # fmt: skip
    run_.loop()
    trainer.save_lora(config.output_dir)
    return write_summary(run_, "ddpo")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(DDPOBenchmarkConfig).parse_args_into_dataclasses(args=argv)
    return run(config)


if __name__ == "__main__":
    main(sys.argv[1:])
