"""The main job: DiffusionNFT teaches the shipped tiny base model to count, colour and place shapes, on a CPU.

    trl-nft demo [--output_dir shapes-demo] [--max_minutes 15] [--any DiffusionNFTConfig field]

Writes to `output_dir`: the adapter (diffusers LoRA format) with its model card, `metrics.jsonl` (training logs and
held-out evaluations), `heldout_table.json` (per-tag accuracy before and after), `reward_curve.png` and
`samples.png` (the same held-out prompts and seeds before and after training, captioned).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback
from transformers.utils import logging

from .world import TAGS, heldout_items, prompts_by_tag


logger = logging.get_logger(__name__)

#: Training seconds per optimizer step of 64 samples of the shipped recipe on this project's 2-core CPU machine, alone
#: (run `ap`, docs/shapes_world.md: 225 steps in 15.2 minutes, of which about 100 s held-out evaluations).
REFERENCE_SECONDS_PER_STEP = 3.6
#: The demo warns when a step takes this many times the reference (a busy machine: the budget buys few steps).
SLOW_FACTOR = 3.0
#: Optimizer steps measured before the pace is judged.
PACE_STEPS = 5

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "shapes_demo.yaml")
# The recipe for the SD1.x-family UNet base (`--model_name_or_path shapes-unet`): the same NFT settings, UNet LoRA targets.
DEMO_CONFIG_UNET = os.path.join(os.path.dirname(DEMO_CONFIG), "shapes_demo_unet.yaml")


def demo_config_for(argv: list[str]) -> str:
    """The shipped recipe for the base named on the command line (`--model_name_or_path`): `DEMO_CONFIG_UNET` for
    `shapes-unet` or a directory holding a `StableDiffusionPipeline` (a UNet base regenerated or continued by
    `trl_nft.shapes.pretrain --family sd`), `DEMO_CONFIG` otherwise."""
    for i, arg in enumerate(argv):
        name, sep, value = arg.partition("=")
        if name in ("--model_name_or_path", "--model-name-or-path"):
            value = value if sep else (argv[i + 1] if i + 1 < len(argv) else "")
            if value in ("shapes-unet", "unet"):
                return DEMO_CONFIG_UNET
            index = os.path.join(value, "model_index.json")
            if os.path.isfile(index):
                with open(index) as f:
                    if json.load(f).get("_class_name") == "StableDiffusionPipeline":
                        return DEMO_CONFIG_UNET
    return DEMO_CONFIG


@dataclass
class DemoArguments:
    """Options of the shapes demo (the training recipe itself is `DiffusionNFTConfig`, see the shipped YAML)."""

    model_name_or_path: str = field(
        default="shapes-base",
        metadata={
            "help": "Pipeline to fine-tune: 'shapes-base' / 'shapes-sd3' (the SD3 base shipped in the package), "
            "'shapes-unet' (the shipped SD1.x-family UNet base, with its own recipe "
            "trl_nft/configs/shapes_demo_unet.yaml) or a local path.",
            "aliases": ["--model_name_or_path"],
        },
    )
    max_minutes: float = field(
        default=15.0, metadata={"help": "Stop training after this many minutes of wall-clock (evaluations included)."}
    )
    eval_every_minutes: float = field(
        default=1.0, metadata={"help": "Held-out evaluation interval, in minutes of wall-clock."}
    )
    heldout_per_tag: int = field(
        default=72, metadata={"help": "Held-out items per tag family (72 x 6 = 432 items, fixed prompts and seeds)."}
    )
    tag_weights: str = field(
        default="balanced",
        metadata={
            "help": "Training prompt mix: 'balanced' (each tag family equally often), 'uniform' (each distinct prompt "
            "equally often), or 'tag=N,tag=N' repeat counts per family (0 drops a family)."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["shapes"],
        metadata={
            "help": "Rewards: 'shapes' (partial credit) and/or 'shapes_strict' (all constraints met), or dotted paths "
            "'module:function'; weigh them with `reward_weights`."
        },
    )
    num_sample_images: int = field(default=24, metadata={"help": "Held-out items shown in samples.png."})
    precision: str = field(
        default="auto",
        metadata={
            "help": "'auto': on a CPU, time a 2-step rollout of the base in float32 and under bf16 autocast and train "
            "in the faster (bf16 autocast is fast only with AVX512-BF16/AMX; on an AVX2-only CPU it is several times "
            "slower); on a GPU, bf16 where supported. 'bf16' or 'fp32' to fix it. An explicit --bf16/--fp16 wins. With "
            "bf16 on a CPU the demo also stacks a sample's training times into one forward (timesteps_per_forward, "
            "unless set), which is faster there; float32 keeps one forward per time, at least as fast in float32.",
            "choices": ["auto", "bf16", "fp32"],
        },
    )
    # Filled by `parse_demo_arguments`: the precision trained in and why (logged, and written to heldout_table.json).
    precision_reason: str = field(default="", init=False)
    # The base pipeline `--precision auto` loaded to time the two precisions, handed to `run_demo` so that the base is
    # loaded once (None when no measurement ran).
    base_pipeline: Any = field(default=None, init=False, repr=False)


def parse_demo_arguments(argv: list[str]):
    """`(DemoArguments, DiffusionNFTConfig)` from the command line over the shipped recipe (`demo_config_for`), with
    the precision resolved (`DemoArguments.precision`). The choice and its reason are logged and kept in
    `demo_args.precision_reason`."""
    import yaml
    from trl import TrlParser

    from ..config import DiffusionNFTConfig

    def parse(args):
        parser = TrlParser((DemoArguments, DiffusionNFTConfig), prog="trl-nft demo")
        with open(demo_config_for(args)) as f:
            parser.set_defaults_with_config(**yaml.safe_load(f))
        return parser.parse_args_and_config(args)

    def given(*flags):
        return any(a.split("=")[0] in flags for a in argv)

    demo_args, training_args = parse(argv)
    measured_pipe = None
    if given("--bf16", "--fp16"):
        bf16 = training_args.bf16
        chosen = "bf16" if bf16 else "fp16" if training_args.fp16 else "float32"
        reason = f"{chosen} (set on the command line)"
    elif demo_args.precision != "auto":
        reason = f"{demo_args.precision} (--precision {demo_args.precision})"
        bf16 = demo_args.precision == "bf16"
    elif torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        reason = f"{'bf16' if bf16 else 'float32'} (GPU {'with' if bf16 else 'without'} bf16 support)"
    else:
        from ..precision import choose_cpu_precision
        from .evaluate import _call_kwargs
        from .pretrain import load_base_pipeline
        from .world import make_dataset

        pipe = load_base_pipeline(demo_args.model_name_or_path)
        prompts = list(make_dataset("train")["prompt"][:8])
        kwargs = _call_kwargs(pipe, training_args.max_sequence_length)
        choice = choose_cpu_precision(
            lambda: pipe(prompts, num_inference_steps=2, guidance_scale=1.0, output_type="pt", **kwargs)
        )
        bf16, reason = choice.bf16, choice.reason
        measured_pipe = pipe
        if training_args.world_size > 1:
            # Every process timed the two precisions (sharing the cores as they will in training); all train in process
            # 0's choice, since processes in other precisions would not be one data-parallel run.
            from accelerate.utils import broadcast_object_list

            bf16, reason = broadcast_object_list([bf16, reason], from_process=0)
            reason += f" (process 0 of {training_args.world_size})"
    extra = [] if bf16 == training_args.bf16 else ["--bf16", str(bf16).lower()]
    if bf16 and not torch.cuda.is_available() and not given("--timesteps_per_forward"):
        # Under CPU bf16 autocast one stacked forward of all training times was 1.31x faster per step than one forward
        # per time; in float32 the two cost the same here and the per-time loop (the library default) was 1.33x faster
        # on an AVX2 EPYC (docs/benchmarks.md).
        extra += ["--timesteps_per_forward", str(training_args.num_train_timesteps)]
        reason += f"; {training_args.num_train_timesteps} training times per forward"
    world = training_args.world_size
    if world > 1 and not given("--per_device_train_batch_size"):
        # The recipe's batch is per optimizer step of the whole run (64 samples, 256 rollouts per iteration): N
        # processes split it, so that `accelerate launch --num_processes N` runs the same recipe on more cores.
        per_device = training_args.per_device_train_batch_size
        if per_device % world:
            raise ValueError(
                f"per_device_train_batch_size {per_device} of the demo recipe does not split over {world} processes: "
                "set --per_device_train_batch_size to the batch each process should train on."
            )
        extra += ["--per_device_train_batch_size", str(per_device // world)]
        reason += f"; {world} processes of {per_device // world} samples per optimizer step each"
    if extra:
        demo_args, training_args = parse([*argv, *extra])
    demo_args.precision_reason = reason
    demo_args.base_pipeline = measured_pipe
    logger.warning(f"trl-nft demo: training precision {reason}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if world == 1 and not torch.cuda.is_available() and cores > 1:
        # One process keeps about 1.5 of 2 cores busy (the tiny model's per-operator overhead runs on one core); one
        # process per core was 1.47x (SD3 base) and 1.65x (UNet base) faster on 2 cores (docs/benchmarks.md).
        logger.warning(
            f"trl-nft demo: one process on {cores} CPU cores. On 2 cores, two processes of one thread trained "
            "1.5-1.65x faster: `accelerate launch --multi_gpu --num_processes 2 -m trl_nft.cli demo ...` (docs/cli.md)."
        )
    return demo_args, training_args


def parse_tag_weights(spec: str) -> dict[str, int] | None:
    """Repeat counts per tag family for `make_dataset` (None: every distinct prompt once)."""
    if spec == "uniform":
        return None
    if spec == "balanced":
        sizes = {tag: len(specs) for tag, specs in prompts_by_tag("train").items()}
        largest = max(sizes.values())
        return {tag: max(1, round(largest / n)) for tag, n in sizes.items()}
    weights = {}
    for part in spec.split(","):
        tag, sep, count = part.partition("=")
        if not sep or tag.strip() not in TAGS or not count.strip().isdigit():
            raise ValueError(f"tag_weights {spec!r}: expected 'balanced', 'uniform' or 'tag=N,...' with tags {TAGS}.")
        weights[tag.strip()] = int(count)
    return weights


class HeldoutEvalCallback(TrainerCallback):
    """Evaluates the trained policy on the fixed held-out items every `every_seconds` of wall-clock, records the
    GenEval-style table in `metrics.jsonl`, logs `eval_heldout/*` to the trackers with an image grid, and stops
    training after `max_seconds`.

    Under several processes (`accelerate launch --multi_gpu --num_processes N`) each process samples and judges every
    N-th item and the records are gathered back into item order (each image depends only on its item's seed, so the
    result is the one-process result); process 0 reads the clock and broadcasts when to evaluate and when to stop,
    so that every process takes the same branch, and it alone writes `metrics.jsonl`."""

    def __init__(self, trainer, items, output_dir: str, *, every_seconds: float, max_seconds: float, steps: int = 10):
        self.trainer = trainer
        self.items = items
        self.every_seconds = every_seconds
        self.max_seconds = max_seconds
        self.steps = steps
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        self.is_main = trainer.is_world_process_zero()
        if self.is_main:
            os.makedirs(output_dir, exist_ok=True)
            open(self.metrics_path, "w").close()
        self.start = time.perf_counter()
        self.last_eval = -math.inf
        self.history: list[dict[str, Any]] = []
        self.first_images: torch.Tensor | None = None
        self.first_result: dict[str, Any] | None = None
        self.last_images: torch.Tensor | None = None
        self.last_result: dict[str, Any] | None = None
        self.eval_seconds = 0.0
        self.phase = "starting"

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _write(self, record: dict[str, Any]):
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _sample_and_judge(self) -> tuple[dict[str, Any], torch.Tensor]:
        """The evaluation of all items and their images `[N, 3, H, W]`, split over the processes."""
        from accelerate.utils import gather_object

        from .evaluate import evaluate_pipeline, summarise

        accelerator = self.trainer.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        with self.trainer.evaluation_weights() as pipeline:
            local = evaluate_pipeline(
                pipeline, self.items[rank::world], num_inference_steps=self.steps, batch_size=144, return_images=True
            )
        if world == 1:
            return local, local.pop("images")
        parts = gather_object([(local["per_item"], local["images"])])  # one (records, images) pair per process
        # Item i was process (i % world)'s (i // world)-th.
        order = [(i % world, i // world) for i in range(len(self.items))]
        per_item = [parts[p][0][j] for p, j in order]
        images = torch.stack([parts[p][1][j] for p, j in order])
        return summarise(per_item), images

    def _decide(self, decision: str | None) -> str | None:
        """Process 0's decision (its clock), the same on every process."""
        if self.trainer.accelerator.num_processes == 1:
            return decision
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([decision], from_process=0)[0]

    def evaluate(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.phase = "held-out eval"
        result, images = self._sample_and_judge()
        self.eval_seconds += time.perf_counter() - t0
        self.phase = "training"
        if self.first_images is None:
            self.first_images, self.first_result = images, result
        self.last_images, self.last_result = images, result
        record = {
            "type": "heldout",
            "step": step,
            "minutes": self.elapsed() / 60,
            "eval_seconds": time.perf_counter() - t0,
            "overall": result["table"]["overall"],
            "strict": result["strict"],
            "partial": result["partial"],
            **{f"tag/{k}": v for k, v in result["table"].items() if k != "overall"},
        }
        self.history.append(record)
        self._write(record)
        self.last_eval = self.elapsed()
        logs = {"eval_heldout/overall": record["overall"], "eval_heldout/partial": record["partial"]}
        logs.update({f"eval_heldout/{k}": v for k, v in result["table"].items() if k != "overall"})
        n = self.trainer.args.num_eval_images_to_log
        captions = [f"{'OK' if r['strict'] else 'x'} {r['prompt']}" for r in result["per_item"][:n]]
        with self.trainer.evaluation_weights():  # eval mode: these logs close an evaluation, not a training window
            self.trainer.log(logs)
        if n:
            self.trainer.log_images("eval/samples", images[:n], captions)
        return record

    def check_pace(self, step: int) -> float | None:
        """Warn once, after `PACE_STEPS` optimizer steps, when training runs far below the reference pace. Returns the
        measured seconds per step (evaluations excluded), or None before the check."""
        if step != PACE_STEPS:
            return None
        args = self.trainer.args
        samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        expected = REFERENCE_SECONDS_PER_STEP * samples / 64
        measured = (self.elapsed() - self.eval_seconds) / step
        if measured > SLOW_FACTOR * expected and self.is_main:
            budget = max(self.max_seconds - self.elapsed(), 0.0)
            logger.warning(
                f"The demo runs at {measured:.1f} s per optimizer step, {measured / expected:.1f}x slower than the "
                f"reference machine (2 free CPU cores: {expected:.1f} s per step of {samples} samples). The remaining "
                f"{budget / 60:.1f} minutes will buy about {int(budget / measured)} more steps instead of "
                f"{int(budget / expected)}, so expect a smaller held-out gain. Free the CPU (other jobs, "
                "OMP_NUM_THREADS) or raise --max_minutes."
            )
        return measured

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.evaluate(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and not any(k.startswith("eval_") for k in logs):
            self._write({"type": "train", "step": state.global_step, "minutes": self.elapsed() / 60, **logs})

    def on_step_end(self, args, state, control, **kwargs):
        self.check_pace(state.global_step)
        decision = None
        if self.elapsed() >= self.max_seconds:
            decision = "stop"
        elif self.elapsed() - self.last_eval >= self.every_seconds:
            decision = "evaluate"
        decision = self._decide(decision)
        if decision == "stop":
            control.should_training_stop = True
        elif decision == "evaluate":
            self.evaluate(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.history or self.history[-1]["step"] != state.global_step:
            self.evaluate(state.global_step)


class WallClockProgressCallback(TrainerCallback):
    """The demo's progress bar: minutes of its wall-clock budget (its step count is open-ended, so Trainer's step bar
    would show a meaningless total), with the step, the latest rollout reward and the latest held-out accuracy."""

    def __init__(self, clock: HeldoutEvalCallback, refresh_seconds: float = 2.0):
        self.clock = clock
        self.bar = None
        self.reward: float | None = None
        self.refresh_seconds = refresh_seconds
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._postfix: dict[str, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        # Registered before the evaluation callback, so the bar exists (and ticks) while the base is evaluated.
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=round(self.clock.max_seconds / 60, 2),
                unit="min",
                desc="NFT on shapes",
                ncols=110,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} min {postfix}",
            )
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def _tick(self):
        # Minutes pass during rollouts and evaluations too, which can each take a while: move the bar on a timer.
        while not self._stop.wait(self.refresh_seconds):
            bar = self.bar
            if bar is None:
                return
            bar.n = min(self.clock.elapsed() / 60, bar.total)
            bar.set_postfix({**self._postfix, "phase": self.clock.phase}, refresh=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.reward = logs["reward"]

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        self.bar.n = min(self.clock.elapsed() / 60, self.bar.total)
        postfix = {"step": state.global_step, "heldout": f"{self.clock.history[-1]['overall']:.3f}"}
        if self.reward is not None:
            postfix["reward"] = f"{self.reward:.3f}"
        self._postfix = postfix
        self.bar.set_postfix({**postfix, "phase": self.clock.phase}, refresh=True)

    def close(self):
        """Stop the bar (after the final evaluation, which runs in the evaluation callback's `on_train_end`)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def plot_curves(metrics_path: str, out_path: str) -> None:
    """`reward_curve.png`: training reward and held-out accuracy against optimizer step and wall-clock minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r["type"] == "train" and "reward" in r]
    held = [r for r in records if r["type"] == "heldout"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
    for col, x in enumerate(("step", "minutes")):
        ax = axes[0][col]
        smoothed = len(train) >= 5
        raw_label = None if smoothed else "train reward"
        ax.plot(
            [r[x] for r in train], [r["reward"] for r in train], color="tab:blue", alpha=0.35, lw=1, label=raw_label
        )
        if smoothed:
            k = max(1, len(train) // 20)
            smooth = [
                sum(r["reward"] for r in train[max(0, i - k) : i + 1]) / len(train[max(0, i - k) : i + 1])
                for i in range(len(train))
            ]
            ax.plot([r[x] for r in train], smooth, color="tab:blue", lw=2, label="train reward (smoothed)")
        ax.set_ylabel("rollout reward")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        ax = axes[1][col]
        ax.plot(
            [r[x] for r in held],
            [r["overall"] for r in held],
            "o-",
            color="tab:red",
            lw=2,
            label="held-out overall (strict, mean of tags)",
        )
        ax.plot(
            [r[x] for r in held],
            [r["partial"] for r in held],
            "s--",
            color="tab:orange",
            lw=1.5,
            label="held-out partial credit",
        )
        for tag in TAGS:
            ax.plot([r[x] for r in held], [r[f"tag/{tag}"] for r in held], lw=0.8, alpha=0.6, label=tag)
        ax.set_xlabel("optimizer step" if x == "step" else "wall-clock minutes (2 CPU cores)")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[1][1].legend(loc="upper left", fontsize=7, ncol=2)
    fig.suptitle("DiffusionNFT on the shapes world")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def samples_figure(before: torch.Tensor, after: torch.Tensor, items, before_ok, after_ok, out_path: str, n: int = 24):
    """`samples.png`: the same held-out prompts and seeds, base (top) vs trained (bottom), with the judge's verdict."""
    from PIL import Image, ImageDraw, ImageFont

    from ..utils import image_grid

    # Spread the shown items over the tag families.
    by_tag: dict[str, list[int]] = {}
    for i, (spec, _) in enumerate(items):
        by_tag.setdefault(spec.tag, []).append(i)
    chosen: list[int] = []
    while len(chosen) < min(n, len(items)):
        for idx in by_tag.values():
            if idx and len(chosen) < n:
                chosen.append(idx.pop(0))
    captions_b = [f"{'OK' if before_ok[i] else 'x'} {items[i][0].prompt}" for i in chosen]
    captions_a = [f"{'OK' if after_ok[i] else 'x'} {items[i][0].prompt}" for i in chosen]
    grid_b = image_grid(before[chosen], captions_b, columns=8, cell=112)
    grid_a = image_grid(after[chosen], captions_a, columns=8, cell=112)
    header = 22
    canvas = Image.new("RGB", (grid_b.width, 2 * (grid_b.height + header)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((4, 4), "before: shipped base, CFG-free, 10 steps (OK = judged correct)", fill="black", font=font)
    canvas.paste(grid_b, (0, header))
    draw.text(
        (4, grid_b.height + header + 4), "after: DiffusionNFT LoRA, same prompts and seeds", fill="black", font=font
    )
    canvas.paste(grid_a, (0, grid_b.height + 2 * header))
    canvas.save(out_path)


def run_demo(demo_args: DemoArguments, training_args) -> dict[str, Any]:
    from ..trainer import DiffusionNFTTrainer
    from .judge import format_table
    from .pretrain import load_base_pipeline
    from .world import make_dataset

    out = training_args.output_dir
    items = heldout_items(n_per_tag=demo_args.heldout_per_tag)
    pipe = demo_args.base_pipeline
    demo_args.base_pipeline = None  # the trainer owns it from here
    trainer = DiffusionNFTTrainer(
        pipe if pipe is not None else load_base_pipeline(demo_args.model_name_or_path),
        demo_args.reward_funcs,
        args=training_args,
        train_dataset=make_dataset("train", tag_weights=parse_tag_weights(demo_args.tag_weights)),
    )
    trainer.base_model_id = demo_args.model_name_or_path
    callback = HeldoutEvalCallback(
        trainer,
        items,
        out,
        every_seconds=demo_args.eval_every_minutes * 60,
        max_seconds=demo_args.max_minutes * 60,
        steps=training_args.eval_num_inference_steps,
    )
    progress = None
    if not training_args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        progress = WallClockProgressCallback(callback)
        trainer.add_callback(progress)
    trainer.add_callback(callback)
    try:
        trainer.train()
    finally:
        if progress is not None:
            progress.close()
    trainer.save_model(out)
    if not trainer.is_world_process_zero():
        return {}

    first, last = callback.history[0], callback.history[-1]
    best = max(callback.history, key=lambda r: r["overall"])
    before_table = {k.split("/", 1)[1]: v for k, v in first.items() if k.startswith("tag/")}
    after_table = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("tag/")}
    before_table["overall"], after_table["overall"] = first["overall"], last["overall"]
    summary = {
        "before": before_table,
        "after": after_table,
        "gain": last["overall"] - first["overall"],
        "best": {"step": best["step"], "minutes": best["minutes"], "overall": best["overall"]},
        "steps": trainer.state.global_step,
        "minutes": callback.elapsed() / 60,
        "heldout_items": len(items),
        "precision": demo_args.precision_reason,
    }
    with open(os.path.join(out, "heldout_table.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_curves(callback.metrics_path, os.path.join(out, "reward_curve.png"))
    before_ok = [r["strict"] for r in callback.first_result["per_item"]]
    after_ok = [r["strict"] for r in callback.last_result["per_item"]]
    samples_figure(
        callback.first_images,
        callback.last_images,
        items,
        before_ok,
        after_ok,
        os.path.join(out, "samples.png"),
        n=demo_args.num_sample_images,
    )
    trainer.create_model_card(dataset_name=None)
    with open(os.path.join(out, "README.md"), "a") as f:
        f.write(
            f"\n## Held-out evaluation (shapes world, strict, {training_args.eval_num_inference_steps}-step CFG-free)\n\n"
            f"{len(items)} fixed (prompt, seed) items; overall = mean of the six per-tag accuracies (GenEval's rule).\n\n"
            "| tag | base | trained |\n|---|---|---|\n"
            + "".join(f"| {t} | {before_table[t]:.3f} | {after_table[t]:.3f} |\n" for t in (*TAGS, "overall"))
        )
    print("\nHeld-out accuracy before:\n" + format_table(before_table))
    print("\nHeld-out accuracy after:\n" + format_table(after_table))
    print(
        f"\nGain: {summary['gain']:+.3f} in {summary['minutes']:.1f} min ({summary['steps']} steps). Outputs in {out}"
    )
    return summary
