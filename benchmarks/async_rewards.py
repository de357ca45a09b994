"""Time per iteration with and without overlapping reward scoring with sampling (`async_reward_computation`).

    python benchmarks/async_rewards.py [--chunks 3] [--chunk-size 4] [--iterations 3] [--cost 1.0]
                                       [--out runs/async_rewards]

Trains the shipped tiny shapes model (`shapes-base`) with DiffusionNFT, one rollout batch of `--chunks` x
`--chunk-size` images per iteration, under three rewards:

* `shapes`: the shapes-world judge alone (cheap: a few ms per image);
* `shapes+sleep`: the judge plus a fixed wait per chunk, standing in for a reward model served elsewhere
  (`RemoteReward`) or on a GPU: the trainer's CPU is idle while it waits;
* `shapes+cpu`: the judge plus torch matrix products per chunk, a reward model's forward pass on the same CPU as the
  sampler: the two compete for the cores.

The extra cost per chunk is `--cost` times the time one chunk takes to sample, measured first (so 1.0 = scoring a
chunk costs as much as sampling it). Each reward trains `1 + 2 x --iterations` iterations in one run; the first is a
warm-up and the rest alternate inline scoring and overlapped scoring, so that both modes see the same machine load.
Prints a table of medians: seconds per iteration (rollout and optimizer step) and per rollout, each with its ratio to
inline scoring, and the seconds spent scoring and waiting for scores per iteration; writes a bar plot
(`<out>/async_rewards.png`, shown in the docs as docs/images/async_rewards.png) and the figures
(`<out>/async_rewards.json`). Documented in docs/rewards.md ("Asynchronous scoring").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402


class _Iterations(TrainerCallback):
    """Switches `async_reward_computation` at the start of each iteration (a rollout batch and its optimizer steps)
    and records when each iteration starts; iteration 0 (a warm-up) scores inline, then inline and overlapped
    alternate."""

    def __init__(self, steps_per_iteration: int):
        self.steps_per_iteration = steps_per_iteration
        self.starts: list[float] = []
        self.modes: list[bool] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.steps_per_iteration == 0:
            self.starts.append(time.perf_counter())
            k = len(self.modes)
            args.async_reward_computation = k > 0 and k % 2 == 0
            self.modes.append(args.async_reward_computation)

    def on_train_end(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())


def _matmul_seconds(reps: int) -> float:
    a = torch.rand(256, 256, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in range(reps):
        a = torch.tanh(a @ a)
    return time.perf_counter() - start


def _cpu_reps_for(seconds: float) -> int:
    """Matrix products of 256 x 256 that take about `seconds` on this machine, on their own."""
    reps = 8
    while _matmul_seconds(reps) < 0.2:
        reps *= 2
    return max(1, round(reps * seconds / _matmul_seconds(reps)))


def make_rewards(extra_seconds: float) -> dict:
    from trl_nft.shapes import shapes_reward

    cpu_reps = _cpu_reps_for(extra_seconds)

    def shapes_sleep(prompts, images, **kwargs):
        time.sleep(extra_seconds)  # the trainer waits on a server or a GPU
        return shapes_reward(prompts, images)

    def shapes_cpu(prompts, images, **kwargs):
        a = torch.rand(256, 256, generator=torch.Generator().manual_seed(0))
        for _ in range(cpu_reps):
            a = torch.tanh(a @ a)
        return shapes_reward(prompts, images)

    return {"shapes": shapes_reward, "shapes+sleep": shapes_sleep, "shapes+cpu": shapes_cpu}


def run(name: str, reward, args, dataset) -> dict:
    from trl_nft import DiffusionNFTConfig, DiffusionNFTTrainer
    from trl_nft.shapes.pretrain import MAX_SEQUENCE_LENGTH, load_base_pipeline

    pipe = load_base_pipeline("shapes-base")  # a fresh one per run: the trainer adds its LoRA adapters to it
    iterations = 1 + 2 * args.iterations
    with tempfile.TemporaryDirectory() as out:
        # One rollout batch of `chunks` prompt groups, sampled one group per chunk, feeds one optimizer step
        # (official layout: gradient_accumulation_steps micro-batches per rollout batch).
        config = DiffusionNFTConfig(
            output_dir=out,
            max_steps=iterations,
            num_generations=args.chunk_size,
            per_device_train_batch_size=args.chunk_size,
            gradient_accumulation_steps=args.chunks,
            num_inference_steps=args.num_inference_steps,
            timestep_fraction=0.2,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            kl_weight=0.0,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=1,
            seed=0,
        )
        trainer = DiffusionNFTTrainer(pipe, reward, args=config, train_dataset=dataset)
        trainer.remove_callback(PrinterCallback)
        timer = _Iterations(steps_per_iteration=1)
        trainer.add_callback(timer)
        trainer.train()
    durations = [b - a for a, b in zip(timer.starts, timer.starts[1:], strict=False)]
    logs = [x for x in trainer.state.log_history if "reward_time" in x]
    images = args.chunks * args.chunk_size
    result = {"reward": name, "durations": durations, "modes": timer.modes}
    for asynchronous in (False, True):
        picked = [i for i, m in enumerate(timer.modes) if m == asynchronous and i > 0]
        result[asynchronous] = {
            "s_per_iteration": statistics.median(durations[i] for i in picked),
            "rollout": statistics.median(images / logs[i]["samples/images_per_second"] for i in picked),
            "reward_time": statistics.median(logs[i]["reward_time"] for i in picked),
            "reward_wait_time": statistics.median(logs[i]["reward_wait_time"] for i in picked),
        }
    return result


def chunk_sampling_seconds(pipe, prompts, num_inference_steps: int) -> float:
    from trl_nft.shapes.pretrain import MAX_SEQUENCE_LENGTH

    kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=1.0, max_sequence_length=MAX_SEQUENCE_LENGTH)
    pipe(prompts, output_type="pt", **kwargs)  # warm-up
    start = time.perf_counter()
    pipe(prompts, output_type="pt", **kwargs)
    return time.perf_counter() - start


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    names = [r["reward"] for r in results]
    x = range(len(names))
    for ax, key, ylabel in ((axes[0], "s_per_iteration", "s / iteration"), (axes[1], "rollout", "s / rollout")):
        for offset, asynchronous, label in ((-0.2, False, "inline"), (0.2, True, "overlapped (async)")):
            values = [r[asynchronous][key] for r in results]
            bars = ax.bar([i + offset for i in x], values, width=0.4, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(list(x), names)
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=3, help="sampling chunks (prompt groups) per rollout batch")
    parser.add_argument("--chunk-size", type=int, default=4, help="images per chunk (= num_generations)")
    parser.add_argument("--iterations", type=int, default=3, help="measured iterations per mode and reward")
    parser.add_argument("--num-inference-steps", type=int, default=10)
    parser.add_argument("--cost", type=float, default=1.0, help="extra reward cost per chunk / chunk sampling time")
    parser.add_argument("--rewards", default="shapes,shapes+sleep,shapes+cpu")
    parser.add_argument("--out", default=os.path.join("runs", "async_rewards"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    from datasets import Dataset

    from trl_nft.shapes import train_prompts
    from trl_nft.shapes.pretrain import load_base_pipeline

    pipe = load_base_pipeline("shapes-base")
    pipe.set_progress_bar_config(disable=True)
    prompts = [spec.prompt for spec in train_prompts()]
    dataset = Dataset.from_dict({"prompt": prompts})
    sample_seconds = chunk_sampling_seconds(pipe, prompts[: args.chunk_size], args.num_inference_steps)
    extra = args.cost * sample_seconds
    rewards = make_rewards(extra)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"
    print(
        f"shapes-base, {args.chunks} chunks x {args.chunk_size} images x {args.num_inference_steps} steps per "
        f"iteration; sampling one chunk takes {sample_seconds:.2f} s, so the slow rewards add {extra:.2f} s per chunk "
        f"({machine})"
    )
    results = []
    for name in args.rewards.split(","):
        start = time.perf_counter()
        results.append(run(name, rewards[name], args, dataset))
        each = ", ".join(
            f"{d:.1f} ({'warm-up' if i == 0 else 'overlapped' if m else 'inline'})"
            for i, (d, m) in enumerate(zip(results[-1]["durations"], results[-1]["modes"], strict=True))
        )
        print(f"  {name}: {time.perf_counter() - start:.0f} s in all; s per iteration: {each}")

    header = (
        f"{'reward':<14} {'mode':<11} {'s/iteration':>11} {'ratio':>6} {'rollout s':>9} {'ratio':>6} "
        f"{'scoring s':>9} {'waiting s':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        base, base_rollout = r[False]["s_per_iteration"], r[False]["rollout"]
        for asynchronous, mode in ((False, "inline"), (True, "overlapped")):
            m = r[asynchronous]
            print(
                f"{r['reward']:<14} {mode:<11} {m['s_per_iteration']:>11.2f} {m['s_per_iteration'] / base:>6.2f} "
                f"{m['rollout']:>9.2f} {m['rollout'] / base_rollout:>6.2f} {m['reward_time']:>9.2f} "
                f"{m['reward_wait_time']:>9.2f}"
            )
    title = (
        f"shapes-base, {args.chunks} chunks of {args.chunk_size} images per iteration; slow rewards +{extra:.1f} s/chunk"
        f"\n{machine}"
    )
    plot(results, os.path.join(args.out, "async_rewards.png"), title)
    with open(os.path.join(args.out, "async_rewards.json"), "w") as f:
        summary = {"machine": machine, "chunk_sampling_seconds": sample_seconds, "extra_seconds": extra, **vars(args)}
        json.dump({"setup": summary, "results": [_jsonable(r) for r in results]}, f, indent=2)
    print(f"plot and figures: {args.out}/async_rewards.png, async_rewards.json")
    return results


def _jsonable(result: dict) -> dict:
    return {str({False: "inline", True: "overlapped"}.get(k, k)): v for k, v in result.items()}


if __name__ == "__main__":
    main()
