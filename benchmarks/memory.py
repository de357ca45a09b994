"""Peak memory of one DiffusionNFT step against plain LoRA flow-matching fine-tuning of the same model.

    python benchmarks/memory.py                                    # shapes-sd3 and shapes-unet, every configuration
    python benchmarks/memory.py --models shapes-sd3 flux --batch 16 --gradient-checkpointing off
    python benchmarks/memory.py --out runs/memory                  # table (memory.md), JSON and plot (memory.png)

Every configuration runs in its own fresh process. One *step* is one training micro-batch, forward and backward (the
optimizer step, the same for both, is left out), measured after a warm-up step so that both sides already hold their
gradients:

* **baseline**: the LoRA training step of a diffusers LoRA script: the same denoiser with one LoRA adapter of the same
  config (the trainer's defaults: r 32, alpha 64, the family's targets), text embeddings precomputed, the standard
  flow-matching loss ||v_theta(x_t, t) - (noise - x0)||^2 at one time per sample, on
  `batch x timesteps_per_forward` samples: the number of denoiser rows of one NFT forward (the NFT step trains every
  sample at `num_train_timesteps` times, `timesteps_per_forward` of them per forward);
* **nft**: `DiffusionNFTTrainer.training_step` on a buffered rollout batch (old-policy and reference forwards under
  `no_grad`, the trained forward and backward), with each memory option on or off.

The rollout (sampling the old policy and decoding images for the rewards) is measured separately: it is not a gradient
step, and VAE slicing acts there.

Memory: on CUDA, `torch.cuda.max_memory_allocated()` minus the memory allocated before the step. Without CUDA, the
process's peak resident memory (Linux VmHWM, reset through `/proc/self/clear_refs` just before the step) minus its
resident memory before the step, with glibc's mmap threshold fixed at 64 KiB (so that freed tensors leave the
resident set). On CPU the offload options cannot show (the "accelerator" is the CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = ("shapes-sd3", "shapes-unet", "flux")
DEFAULT_MODELS = ("shapes-sd3", "shapes-unet")
PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "three red triangles"]

# name -> (kind, DiffusionNFTConfig overrides); each runs with gradient checkpointing off and on.
CONFIGS: dict[str, tuple[str, dict]] = {
    "baseline (LoRA flow matching)": ("baseline", {}),
    "nft, defaults (cache on)": ("nft", {}),
    "nft, cache off": ("nft", {"cache_prompt_embeddings": False}),
    "nft, offload text encoders + VAE": ("nft", {"offload_text_encoders": True, "offload_vae": True}),
    "nft, vae_slicing": ("nft", {"vae_slicing": True}),
}


# ------------------------------------------------------------------------------------------------ measuring
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


#: glibc keeps freed blocks for reuse (and raises its mmap threshold as it goes), so that resident memory would follow
#: the allocator's history rather than the tensors alive: with a fixed threshold every tensor above 64 KiB is its own
#: mapping, returned when freed, and runs repeat to within 1 MiB. Set in the environment of the measuring process.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def start_peak() -> int:
    """Reset the peak-memory counter; returns what the process holds now (bytes), for `peak_since`."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    return before


def peak_since(before: int) -> float:
    """Peak memory (MiB) added above `before` (a `start_peak()` value) since that call."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return (_status("VmHWM") - before) / 2**20


def measure(fn) -> float:
    """Peak memory (MiB) that `fn()` adds to what the process holds before it."""
    before = start_peak()
    fn()
    return peak_since(before)


# ------------------------------------------------------------------------------------------------ one configuration
def _pipeline(model: str):
    if model == "flux":
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from tiny_families import build_tiny_pipeline

        return build_tiny_pipeline("flux-dev"), 16, 8
    from trl_nft.shapes.pretrain import MAX_SEQUENCE_LENGTH, load_base_pipeline

    return load_base_pipeline(model), None, MAX_SEQUENCE_LENGTH


def _config(args, output_dir: str, resolution, max_sequence_length: int, gradient_checkpointing: bool, **overrides):
    from trl_nft import DiffusionNFTConfig

    steps = args.num_train_timesteps + 1
    return DiffusionNFTConfig(
        output_dir=output_dir,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.batch,
        num_inference_steps=steps,
        # num_train_timesteps = int(steps * fraction) times per sample
        timestep_fraction=args.num_train_timesteps / steps + 1e-6,
        # Three passes over one rollout batch: step 1 warms up, step 2 is measured, neither samples again.
        num_iterations=3,
        resolution=resolution,
        max_sequence_length=max_sequence_length,
        gradient_checkpointing=gradient_checkpointing,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **overrides,
    )


def run_one(model: str, name: str, gradient_checkpointing: bool, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from trl_nft import DiffusionNFTTrainer

    kind, overrides = CONFIGS[name]
    pipe, resolution, max_len = _pipeline(model)
    rows = [{"prompt": p} for p in PROMPTS[: args.batch // args.num_generations] for _ in range(args.num_generations)]
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(args, tmp, resolution, max_len, gradient_checkpointing, **overrides)
        trainer = DiffusionNFTTrainer(pipe, lambda images, **kw: images.mean((1, 2, 3)).tolist(), args=config,
                                      train_dataset=rows)  # fmt: skip
        num_t = config.num_train_timesteps
        result = {"model": model, "config": name, "gradient_checkpointing": gradient_checkpointing, "num_t": num_t}
        model_ = trainer.model
        model_.train()
        trainer.current_gradient_accumulation_steps = 1
        if kind == "nft":
            result["rollout_mib"] = measure(lambda: trainer._prepare_inputs(rows))
            trainer._step = 1  # the buffered rollout batch is used next, no new rollout
            trainer.training_step(model_, rows)
            result["step_mib"] = measure(lambda: trainer.training_step(model_, rows))
            return result
        # The baseline: the trainer only built the pipeline, its LoRA and gradient checkpointing alike; the step is a
        # plain LoRA fine-tuning step on the "default" adapter (the "old" copy is a few MiB of LoRA weights).
        adapter = trainer.adapter
        prompts = [r["prompt"] for r in rows]
        x0, _ = trainer._sample_latents(prompts, num_inference_steps=config.num_inference_steps, guidance_scale=1.0)
        rows_per_sample = min(config.timesteps_per_forward, num_t)
        cond = adapter.tile(trainer._capture_conditioning(prompts), rows_per_sample)  # precomputed text embeddings
        x0 = x0.repeat(rows_per_sample, *([1] * (x0.dim() - 1)))

        def step():
            t = torch.rand(x0.shape[0])
            noise = torch.randn_like(x0)
            tb = t.view(-1, *([1] * (x0.dim() - 1)))
            x_t = (1 - tb) * x0 + tb * noise
            v = adapter.velocity(x_t, t, cond, model=model_).float()
            loss = torch.nn.functional.mse_loss(v, noise - x0)
            loss.backward()

        step()
        result["step_mib"] = measure(step)
        return result


# ------------------------------------------------------------------------------------------------ driver
def _machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch.cuda.max_memory_allocated)"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU only: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} (process VmHWM - VmRSS)"


def table(results: list[dict]) -> str:
    base = {
        (r["model"], r["gradient_checkpointing"]): r["step_mib"] for r in results if r["config"].startswith("base")
    }
    lines = [
        "| model | gradient checkpointing | configuration | step peak (MiB) | ratio to baseline | rollout peak (MiB) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        ratio = r["step_mib"] / base[(r["model"], r["gradient_checkpointing"])]
        rollout = f"{r['rollout_mib']:.1f}" if "rollout_mib" in r else "-"
        gc_flag = "on" if r["gradient_checkpointing"] else "off"
        lines.append(f"| {r['model']} | {gc_flag} | {r['config']} | {r['step_mib']:.1f} | {ratio:.2f}x | {rollout} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["gradient_checkpointing"]) for r in results}, key=str)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4.2), squeeze=False)
    for ax, (model, gc_on) in zip(axes[0], groups, strict=True):
        rs = [r for r in results if (r["model"], r["gradient_checkpointing"]) == (model, gc_on)]
        base = next(r["step_mib"] for r in rs if r["config"].startswith("base"))
        ax.barh([r["config"] for r in rs], [r["step_mib"] for r in rs], color="tab:blue")
        ax.axvline(base * 1.1, color="tab:red", linestyle="--", label="1.1x baseline")
        ax.set_title(f"{model}, gradient checkpointing {'on' if gc_on else 'off'}", fontsize=9)
        ax.set_xlabel("peak memory of one step (MiB)")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=32, help="per_device_train_batch_size (images per micro-batch)")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--num-train-timesteps", type=int, default=1, help="times trained per sample in one step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--out", default=None, help="folder for memory.json, memory.md and memory.png")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "CONFIG", "GC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        model, name, gc_on = args.worker
        print("RESULT " + json.dumps(run_one(model, name, gc_on == "on", args)), flush=True)
        return

    gc_settings = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    results = []
    start = time.perf_counter()
    passthrough = ["--batch", str(args.batch), "--num-generations", str(args.num_generations),
                   "--num-train-timesteps", str(args.num_train_timesteps), "--threads", str(args.threads)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(MALLOC_ENV)
    for model in args.models:
        for gc_on in gc_settings:
            for name in CONFIGS:
                cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--worker", model, name]
                cmd.append("on" if gc_on else "off")
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{model} / {name} failed:\n{out.stderr[-3000:]}")
                results.append(json.loads(line[len("RESULT ") :]))
                r = results[-1]
                print(
                    f"{model:12s} gc={'on ' if gc_on else 'off'} {name:36s} step {r['step_mib']:8.1f} MiB", flush=True
                )
    report = f"Machine: {_machine()}. batch {args.batch}, num_generations {args.num_generations}, "
    report += (
        f"{args.num_train_timesteps} time(s) per sample, {time.perf_counter() - start:.0f} s.\n\n{table(results)}"
    )
    print("\n" + report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "memory.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "memory.md"), "w") as f:
            f.write(report + "\n")
        plot(results, os.path.join(args.out, "memory.png"))
        print(f"wrote {args.out}/memory.json, memory.md, memory.png")


if __name__ == "__main__":
    main()
