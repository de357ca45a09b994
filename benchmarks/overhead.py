"""What an NFT iteration of the shapes demo costs against the bare compute it contains, part by part.

    python benchmarks/overhead.py [--iterations 2] [--out runs/overhead] [--precision auto|bf16|fp32]

One iteration is the demo recipe's rollout batch (16 prompts x 16 images = 256, sampled in 4 pipeline calls of 64
images, 10 steps), its rewards, and its 4 optimizer steps of 64 samples x 4 training times. The trainer's iteration is
split into rollout (the pipeline's `__call__`, decode excluded), decode (the VAE inside it), reward (what the
iteration waits for the scores: with `async_reward_computation` the rewards run on a worker thread while the next chunk
is sampled, so only the last chunk's scoring shows), conditioning (the text encoders, once per unique prompt with
`cache_prompt_embeddings`), the training forwards, the backwards, the optimizer and the rest (bookkeeping: advantages,
buffering, logging, callbacks). The bare compute is the same work with no trainer around it:
the pipeline's own `__call__` on the same prompts, the reward function on the images, and a hand-written loop of the
same forward/backward passes on the denoiser (one forward/backward per training time, the official code's and
Flow-Factory's structure) with AdamW on the same LoRA parameters. Also measured: the training step with all 4
training times stacked into one forward (`timesteps_per_forward=4`, trl_nft's step before issue 16) against one per
time (`timesteps_per_forward=1`, now the default), and the CPU cores each part keeps busy (process CPU seconds per
wall second).

Prints the tables and writes `overhead.png` and `overhead.json` under `--out`. The first iteration is a warm-up and is
not counted. Ratios are the figure to read: absolute seconds drift on a shared machine.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import tempfile
import time

import torch


PARTS = ("rollout", "decode", "reward", "conditioning", "forward", "backward", "optimizer", "bookkeeping")


class Clock:
    """Wall and process-CPU seconds per named part, summed over the measured iterations."""

    def __init__(self):
        self.wall = collections.defaultdict(float)
        self.cpu = collections.defaultdict(float)
        self._open: set[str] = set()

    @contextlib.contextmanager
    def part(self, name: str):
        if name in self._open:  # a timed method calling another one of the same part counts once
            yield
            return
        self._open.add(name)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._open.discard(name)
            self.wall[name] += time.perf_counter() - wall
            self.cpu[name] += time.process_time() - cpu

    def wrap(self, obj, method: str, name: str):
        original = getattr(obj, method)

        def timed(*args, **kwargs):
            with self.part(name):
                return original(*args, **kwargs)

        setattr(obj, method, timed)


def demo_trainer(out: str, precision: str, extra: list[str]):
    from trl_nft import DiffusionNFTTrainer
    from trl_nft.shapes.demo import parse_demo_arguments
    from trl_nft.shapes.pretrain import load_base_pipeline
    from trl_nft.shapes.world import make_dataset

    argv = ["--output_dir", out, "--precision", precision, "--disable_tqdm", "true", *extra]
    demo_args, args = parse_demo_arguments(argv)
    pipe = load_base_pipeline(demo_args.model_name_or_path)
    trainer = DiffusionNFTTrainer(pipe, demo_args.reward_funcs, args=args, train_dataset=make_dataset("train"))
    return trainer, demo_args


def time_trainer(trainer, iterations: int) -> tuple[Clock, float]:
    """Seconds per iteration of `trainer.train()` split into `PARTS`, after one warm-up iteration."""
    from transformers import TrainerCallback

    clock = Clock()
    per_iteration = trainer.args.steps_per_generation * trainer.num_iterations
    trainer.args.max_steps = per_iteration * (iterations + 1)
    clock.wrap(trainer, "_sample_latents", "rollout")
    clock.wrap(trainer.pipeline.vae, "decode", "decode")
    # With `async_reward_computation` the rewards run on a worker thread during sampling: what the iteration pays is
    # handing the chunks over and waiting for the last scores.
    clock.wrap(trainer, "_submit_rewards", "reward")
    clock.wrap(trainer, "_collect_rewards", "reward")
    clock.wrap(trainer, "_conditioning", "conditioning")
    clock.wrap(trainer, "_cache_prompts", "conditioning")
    clock.wrap(trainer, "_frozen_velocities", "forward")  # the old (and reference) policy's forwards
    clock.wrap(trainer, "_nft_chunk", "forward")  # the trained policy's forward and the loss
    clock.wrap(trainer.accelerator, "backward", "backward")
    marks = {}

    class Marks(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == per_iteration:  # the warm-up iteration ends here
                clock.wall.clear()
                clock.cpu.clear()
                marks["start"] = (time.perf_counter(), time.process_time())

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            marks["opt"] = (time.perf_counter(), time.process_time())

        def on_optimizer_step(self, args, state, control, **kwargs):
            wall, cpu = marks.pop("opt")
            if "start" in marks:
                clock.wall["optimizer"] += time.perf_counter() - wall
                clock.cpu["optimizer"] += time.process_time() - cpu

        def on_train_end(self, args, state, control, **kwargs):
            marks["end"] = (time.perf_counter(), time.process_time())

    trainer.add_callback(Marks())
    trainer.train()
    total_wall = marks["end"][0] - marks["start"][0]
    total_cpu = marks["end"][1] - marks["start"][1]
    clock.wall["rollout"] -= clock.wall["decode"]
    clock.cpu["rollout"] -= clock.cpu["decode"]
    clock.wall["bookkeeping"] = total_wall - sum(clock.wall[p] for p in PARTS if p != "bookkeeping")
    clock.cpu["bookkeeping"] = total_cpu - sum(clock.cpu[p] for p in PARTS if p != "bookkeeping")
    for d in (clock.wall, clock.cpu):
        for k in list(d):
            d[k] /= iterations
    return clock, total_wall / iterations


def time_bare(trainer, iterations: int, bf16: bool) -> Clock:
    """The same work as one iteration with no trainer: pipeline calls, reward calls, and a plain loop of the
    denoiser's forward/backward passes with AdamW."""
    from trl_nft.shapes.judge import shapes_reward
    from trl_nft.shapes.world import make_dataset

    args = trainer.args
    pipe = trainer.pipeline
    denoiser = pipe.transformer
    clock = Clock()
    batch = args.per_device_train_batch_size
    n_prompts = args.generation_batch_size // args.num_generations
    prompts = [p for p in make_dataset("train")["prompt"][:n_prompts] for _ in range(args.num_generations)]
    num_t = args.num_train_timesteps
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=args.max_sequence_length
        )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    for it in range(iterations + 1):
        if it == 1:
            clock.wall.clear()
            clock.cpu.clear()
        images, latents = [], []
        with torch.no_grad(), autocast:
            denoiser.set_adapter("old")
            for i in range(0, len(prompts), batch):
                with clock.part("pipeline"):
                    out = pipe(
                        prompts[i : i + batch],
                        num_inference_steps=args.num_inference_steps,
                        guidance_scale=1.0,
                        output_type="latent",
                        max_sequence_length=args.max_sequence_length,
                    ).images
                with clock.part("decode"):
                    scaled = out / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
                    images.append((pipe.vae.decode(scaled, return_dict=False)[0] / 2 + 0.5).clamp(0, 1).float())
                latents.append(out.float())
            denoiser.set_adapter("default")
        images = torch.cat(images)
        x0_all = torch.cat(latents)
        with clock.part("reward"):
            rewards = torch.tensor(shapes_reward(prompts, images))
        r_all = (rewards - rewards.mean()).clamp(-1, 1) / 2 + 0.5
        grid = torch.linspace(1, 0, args.num_inference_steps + 1)[:-1]
        for i in range(0, len(prompts), batch):
            x0, r = x0_all[i : i + batch], r_all[i : i + batch]
            cond = {"encoder_hidden_states": embeds[i : i + batch], "pooled_projections": pooled[i : i + batch]}
            for _ in range(num_t):
                t = grid[torch.randint(len(grid), (x0.shape[0],))]
                noise = torch.randn_like(x0)
                tb = t.view(-1, 1, 1, 1)
                x_t = (1 - tb) * x0 + tb * noise
                with clock.part("forward"), autocast:
                    with torch.no_grad():
                        denoiser.set_adapter("old")
                        v_old = denoiser(hidden_states=x_t, timestep=t * 1000, **cond, return_dict=False)[0].float()
                        denoiser.set_adapter("default")
                    v = denoiser(hidden_states=x_t, timestep=t * 1000, **cond, return_dict=False)[0].float()
                    beta = args.nft_beta
                    x0_pos = x_t - tb * ((1 - beta) * v_old + beta * v)
                    x0_neg = x_t - tb * ((1 + beta) * v_old - beta * v)
                    w_pos = (x0_pos - x0).abs().mean((1, 2, 3)).detach().clamp(min=1e-5)
                    w_neg = (x0_neg - x0).abs().mean((1, 2, 3)).detach().clamp(min=1e-5)
                    per_sample = r * ((x0_pos - x0) ** 2).mean((1, 2, 3)) / w_pos
                    per_sample = per_sample + (1 - r) * ((x0_neg - x0) ** 2).mean((1, 2, 3)) / w_neg
                    loss = per_sample.mean() / num_t
                with clock.part("backward"):
                    loss.backward()
            with clock.part("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    for d in (clock.wall, clock.cpu):
        for k in list(d):
            d[k] /= iterations
    return clock


def step_cost(trainer_factory, per_forward: int, steps: int = 3) -> float:
    """Seconds of one trainer optimizer step (forward + backward + optimizer, rollout excluded) with
    `timesteps_per_forward=per_forward`, the mean of `steps` steps after a warm-up step."""
    trainer = trainer_factory(["--timesteps_per_forward", str(per_forward)])
    clock, _ = time_trainer(trainer, 1)
    trained = clock.wall["forward"] + clock.wall["backward"] + clock.wall["optimizer"]
    return trained / trainer.args.steps_per_generation


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = plt.cm.tab10.colors
    for x, parts in enumerate((result["trainer"], result["bare"])):
        bottom = 0.0
        for i, name in enumerate(PARTS):
            value = parts.get(name, 0.0)
            ax.bar(x, value, bottom=bottom, color=colours[i], label=name if x == 0 else None)
            bottom += value
    ax.set_xticks([0, 1], ["trl_nft iteration", "bare compute"])
    ax.set_ylabel("seconds per iteration (256 images, 4 optimizer steps)")
    ax.set_title(f"overhead {result['ratio']:.2f}x over bare compute ({result['precision']})")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2, help="Measured iterations (after one warm-up).")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--out", default="runs/overhead")
    parser.add_argument("--skip_step_cost", action="store_true", help="Skip the timesteps_per_forward comparison.")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp()

    # One forward per training time, as the bare loop below (the demo stacks them under CPU bf16: see step_cost).
    trainer, demo_args = demo_trainer(tmp, args.precision, ["--timesteps_per_forward", "1"])
    factory_reason = demo_args.precision_reason
    bf16 = trainer.args.bf16

    def factory(extra=()):
        # The later trainers reuse the first one's precision: measured once, the same for every row.
        return demo_trainer(tmp, "bf16" if bf16 else "fp32", list(extra))[0]

    clock, total = time_trainer(trainer, args.iterations)
    bare = time_bare(trainer, args.iterations, bf16)
    bare_parts = {
        "rollout": bare.wall["pipeline"],
        "decode": bare.wall["decode"],
        "reward": bare.wall["reward"],
        "forward": bare.wall["forward"],
        "backward": bare.wall["backward"],
        "optimizer": bare.wall["optimizer"],
    }
    bare_total = sum(bare_parts.values())
    result = {
        "precision": "bf16" if bf16 else "float32",
        "precision_reason": factory_reason,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "trainer": {p: clock.wall[p] for p in PARTS},
        "trainer_cores": {p: clock.cpu[p] / clock.wall[p] if clock.wall[p] > 0 else 0.0 for p in PARTS},
        "bare": bare_parts,
        "bare_cores": {p: bare.cpu[p if p != "rollout" else "pipeline"] / v for p, v in bare_parts.items()},
        "iteration_seconds": total,
        "bare_seconds": bare_total,
        "ratio": total / bare_total,
    }
    print(f"\nPrecision: {factory_reason}; torch threads {result['threads']} of {result['cpus']} CPUs")
    print("\n| part | trl_nft s/iter | cores busy | bare s/iter | cores busy | ratio |\n|---|---|---|---|---|---|")
    for p in PARTS:
        t, b = result["trainer"][p], bare_parts.get(p)
        ratio = f"{t / b:.2f}" if b else "-"
        bare_s = f"{b:.2f}" if b is not None else "-"
        bare_c = f"{result['bare_cores'][p]:.2f}" if b is not None else "-"
        print(f"| {p} | {t:.2f} | {result['trainer_cores'][p]:.2f} | {bare_s} | {bare_c} | {ratio} |")
    print(f"| **iteration** | {total:.2f} | | {bare_total:.2f} | | **{result['ratio']:.2f}** |")
    if not args.skip_step_cost:
        costs = {k: step_cost(factory, k) for k in (1, 4)}
        result["step_seconds"] = {f"timesteps_per_forward={k}": v for k, v in costs.items()}
        result["step_seconds"]["bare loop"] = (
            bare_parts["forward"] + bare_parts["backward"] + bare_parts["optimizer"]
        ) / (trainer.args.steps_per_generation)
        print("\n| training step (64 samples x 4 times) | s/step |\n|---|---|")
        for k, v in result["step_seconds"].items():
            print(f"| {k} | {v:.2f} |")
        print(f"stacked / per-time: {costs[4] / costs[1]:.2f}x")
    with open(os.path.join(args.out, "overhead.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(args.out, "overhead.png"))
    print(f"\nWrote {args.out}/overhead.json and overhead.png")
    return result


if __name__ == "__main__":
    main()
