"""How the cost of an NFT iteration grows with group size, resolution, rollout steps and training times per sample.

    python benchmarks/cost_growth.py [--out runs/cost_growth] [--repeats 2]

Each point is one iteration (a rollout batch of 4 prompts x K images, its rewards, and one optimizer step on it) of
`DiffusionNFTTrainer` on a randomly initialised SD3 pipeline of the shapes demo's size (`TinySD3Spec.preset("shapes")`:
4 layers, 4 heads of 32; the position-embedding table sized for the resolution), timed after a warm-up iteration, in
float32, each point in a fresh process. One factor varies at a time around the base point (K=8, 32 px, 8 rollout
steps, 4 training times); the others stay at it. Peak memory is the growth of the process's resident set over the
iteration above its resident set when the iteration starts (Linux VmHWM, reset through /proc/self/clear_refs; glibc
told to return freed blocks, as benchmarks/memory.py does); on a CUDA device, `torch.cuda.max_memory_allocated`.

For each factor the script fits `cost = a x^p` (least squares in log-log over the sweep) and prints p, the measured
growth exponent: time should grow about linearly (p near 1, less where a fixed cost remains) in K (images per
iteration), in rollout steps (the rollout part) and in training times (the training part), and about linearly in
pixels (p near 2 in the side) until attention's quadratic term in tokens dominates.
Writes `cost_growth.png` and `cost_growth.json` under `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from memory import MALLOC_ENV, peak_since, start_peak  # benchmarks/memory.py: one way to measure peaks


BASE = {"num_generations": 8, "resolution": 32, "num_inference_steps": 8, "num_train_timesteps": 4}
SWEEPS = {
    "num_generations": [4, 8, 16, 32],
    "resolution": [16, 32, 64, 128],
    "num_inference_steps": [4, 8, 16, 32],
    "num_train_timesteps": [1, 2, 4, 8],
}
LABELS = {
    "num_generations": "group size K (images per prompt)",
    "resolution": "resolution (pixels per side)",
    "num_inference_steps": "rollout steps",
    "num_train_timesteps": "training times per sample",
}
PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow square"]


def measure(point: dict, repeats: int) -> dict:
    from transformers import TrainerCallback

    from trl_nft import DiffusionNFTConfig, DiffusionNFTTrainer
    from trl_nft.shapes import VOCABULARY
    from trl_nft.shapes.tiny import TinySD3Spec, build_tiny_sd3_pipeline

    steps = point["num_inference_steps"]
    # The demo-sized preset with its latent side (= image side / 2) and position-embedding table sized for the resolution.
    spec = dataclasses.replace(TinySD3Spec.preset("shapes"), sample_size=point["resolution"] // 2)
    pipe = build_tiny_sd3_pipeline(VOCABULARY, spec, seed=0)
    batch = len(PROMPTS) * point["num_generations"]
    args = DiffusionNFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=repeats + 1,
        num_generations=point["num_generations"],
        per_device_train_batch_size=batch,
        num_inference_steps=steps,
        eval_num_inference_steps=steps,
        # int(steps * fraction) training times per sample, for the wanted count
        timestep_fraction=min(1.0, (point["num_train_timesteps"] + 0.5) / steps),
        max_sequence_length=2,
        resolution=point["resolution"],
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    assert args.num_train_timesteps == min(point["num_train_timesteps"], steps), args.num_train_timesteps
    marks = {"seconds": [], "peak": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kwargs):
            marks["start"] = time.perf_counter()
            marks["base"] = start_peak()

        def on_step_end(self, a, state, control, **kwargs):
            if state.global_step > 1:  # the first iteration is a warm-up
                marks["seconds"].append(time.perf_counter() - marks["start"])
                marks["peak"].append(peak_since(marks["base"]))

    trainer = DiffusionNFTTrainer(pipe, "brightness", args=args, train_dataset=[{"prompt": p} for p in PROMPTS])
    trainer.add_callback(Timer())
    trainer.train()
    return {"seconds": min(marks["seconds"]), "peak_mib": max(marks["peak"])}


def fit_exponent(xs, ys) -> float:
    """p of the least-squares fit of log y = log a + p log x."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/cost_growth")
    parser.add_argument("--repeats", type=int, default=2, help="Timed iterations per point (the fastest counts).")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: measure one point, print its JSON
    args = parser.parse_args(argv)
    if args.point:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        print(json.dumps(measure(json.loads(args.point), args.repeats)))
        return {}
    os.makedirs(args.out, exist_ok=True)
    results = {}
    print("| factor | value | s/iteration | peak MiB |\n|---|---|---|---|")
    env = dict(os.environ, **MALLOC_ENV)
    for factor, values in SWEEPS.items():
        rows = []
        for value in values:
            point = {**BASE, factor: value}
            # A fresh process per point: the peak of one point must not hide in the high-water mark of another.
            out = subprocess.run(
                [sys.executable, __file__, "--point", json.dumps(point), "--repeats", str(args.repeats)],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            m = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"value": value, **m})
            print(f"| {factor} | {value} | {m['seconds']:.3f} | {m['peak_mib']:.1f} |", flush=True)
        xs = [r["value"] for r in rows]
        results[factor] = {
            "rows": rows,
            "time_exponent": fit_exponent(xs, [r["seconds"] for r in rows]),
            "memory_exponent": fit_exponent(xs, [max(r["peak_mib"], 1e-3) for r in rows]),
        }
    print("\n| factor | time ~ x^p | peak memory ~ x^p |\n|---|---|---|")
    for factor, r in results.items():
        print(f"| {factor} | p = {r['time_exponent']:.2f} | p = {r['memory_exponent']:.2f} |")
    with open(os.path.join(args.out, "cost_growth.json"), "w") as f:
        json.dump({"base": BASE, "results": results}, f, indent=2)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    for col, (factor, r) in enumerate(results.items()):
        xs = [row["value"] for row in r["rows"]]
        for row_i, (key, unit, exp) in enumerate(
            (("seconds", "s / iteration", r["time_exponent"]), ("peak_mib", "peak MiB", r["memory_exponent"]))
        ):
            ax = axes[row_i, col]
            ax.loglog(xs, [row[key] for row in r["rows"]], "o-")
            ax.set_xlabel(LABELS[factor])
            ax.set_ylabel(unit)
            ax.set_title(f"~ x^{exp:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "cost_growth.png"), dpi=110)
    print(f"\nWrote {args.out}/cost_growth.json and cost_growth.png")
    return results


if __name__ == "__main__":
    main()
