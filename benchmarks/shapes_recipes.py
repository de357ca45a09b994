"""Compare DiffusionNFT recipes on the shapes world: held-out accuracy against wall-clock, one run after another.

    python benchmarks/shapes_recipes.py --minutes 15 --out runs/recipes            # every recipe below
    python benchmarks/shapes_recipes.py --only demo beta0.3 --minutes 8
    python benchmarks/shapes_recipes.py --only demo --seeds 0 1 2 3               # seed repeats: demo_seed0, ...
    python benchmarks/shapes_recipes.py --summarise runs/recipes                  # table + plot of finished runs

Each recipe is `trl-nft demo` with flag overrides of the shipped config (trl_nft/configs/shapes_demo.yaml), run in its
own process with the machine to itself. Prints a table (held-out overall strict accuracy at fixed minutes, best, final,
gain) and writes `recipes.png`; runs named `<recipe>_seed<N>` are also summarised per recipe (mean, min and max over
seeds), since one 15-minute run of a recipe varies by about ±0.03 from seed to seed. Absolute minutes drift on a shared
machine; compare runs made in one session.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys


_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# a slower old (sampling) policy as a trust region for small beta: eta = min(0.003 step, 0.9)
_OLD_POLICY_0_9 = ["--old_policy_decay_rate", "0.003", "--old_policy_decay_max", "0.9"]
# The demo recipe before runs ap-aw: the paper's beta=1 and old-policy schedule min(0.001 step, 0.5), optimizer batches
# of 32. Every recipe measured against it (benchmarks/shapes_recipes_report.md, runs a-ao) starts from these flags, so that its
# numbers do not move when the shipped config does; a recipe's own flags come after and override them.
_BETA1_DEMO = [
    "--nft_beta",
    "1.0",
    "--old_policy_decay_rate",
    "0.001",
    "--old_policy_decay_max",
    "0.5",
    "--per_device_train_batch_size",
    "32",
]

_OVER_BETA1_DEMO: dict[str, list[str]] = {
    # the demo recipe of runs a-ao: LoRA r64 on every linear layer, lr 2e-4, bf16 autocast, beta=1
    "demo_beta1": [],
    # the first demo recipe: the official attention-only targets at r16, lr 3e-4, float32
    "lora16_attention": [
        "--lora_r",
        "16",
        "--lora_alpha",
        "32",
        "--lora_target_modules",
        *_ATTENTION,
        "--learning_rate",
        "3e-4",
        "--bf16",
        "false",
    ],
    "full_ft_1e-4": ["--use_lora", "false", "--learning_rate", "1e-4"],
    "full_ft_3e-5": ["--use_lora", "false", "--learning_rate", "3e-5"],
    # the official recipe, scaled down: one optimizer step per rollout batch, all times, KL on
    "official_1step": [
        "--steps_per_generation",
        "1",
        "--per_device_train_batch_size",
        "128",
        "--timestep_fraction",
        "0.99",
        "--kl_weight",
        "1e-4",
    ],
    "num_iterations2": ["--num_iterations", "2"],
    "plus_strict_reward": ["--reward_funcs", "shapes", "shapes_strict", "--reward_weights", "1.0", "1.0"],
    "lr_linear_decay": ["--lr_scheduler_type", "linear", "--max_steps", "800"],
    "tag_mix": ["--tag_weights", "single_object=99,two_object=198,counting=24,colors=22,position=2,color_attr=14"],
    "inner8": ["--steps_per_generation", "8", "--per_device_train_batch_size", "16"],
    # smaller NFT guidance strength: faster, then diverges after ~300 steps on the shipped base (benchmarks/shapes_recipes_report.md)
    "beta0.1": ["--nft_beta", "0.1"],
    "beta0.3": ["--nft_beta", "0.3"],
    "beta0.1_lr_decay": ["--nft_beta", "0.1", "--lr_scheduler_type", "linear", "--max_steps", "420"],
    # the official OCR old-policy schedule (eta = 0 for 75 steps, then 0.0075 per step up to 0.999): the old policy
    # freezes by step ~210 and the run stalls at 0.56-0.59
    "beta0.1_ocr_decay": [
        "--nft_beta",
        "0.1",
        "--old_policy_decay_delay",
        "75",
        "--old_policy_decay_rate",
        "0.0075",
        "--old_policy_decay_max",
        "0.999",
    ],
    # the trust region keeps beta=0.3 and beta=0.1 from diverging (benchmarks/shapes_recipes_report.md, runs ah-au)
    "beta0.3_old_policy_0.9": ["--nft_beta", "0.3", *_OLD_POLICY_0_9],
    "beta0.1_old_policy_0.9": ["--nft_beta", "0.1", *_OLD_POLICY_0_9],
    # with all ten rollout times trained (the batch-64 variant of the trust region is the shipped demo)
    "beta0.3_old_policy_0.9_all_times": ["--nft_beta", "0.3", *_OLD_POLICY_0_9, "--timestep_fraction", "0.99"],
    # CFG 3 in the rollouts (the paper samples CFG-free): slower per step
    "cfg3_rollouts": ["--guidance_scale", "3"],
}

RECIPES: dict[str, list[str]] = {
    # the shipped demo recipe (trl_nft/configs/shapes_demo.yaml): beta 0.3, eta = min(0.003 step, 0.9), batches of 64
    "demo": [],
    **{name: [*_BETA1_DEMO, *flags] for name, flags in _OVER_BETA1_DEMO.items()},
}


def read_runs(root: str) -> dict[str, list[dict]]:
    """The held-out evaluation records of each run under `root` (runs with none are left out)."""
    runs = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "metrics.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                held = [r for r in map(json.loads, filter(str.strip, f)) if r["type"] == "heldout"]
            if held:
                runs[name] = held
    return runs


def at_mark(held: list[dict], mark: float, x: str = "minutes") -> float | None:
    """Accuracy of the last evaluation made by `mark` minutes or steps (None if the run was shorter)."""
    done = [r for r in held if r[x] <= mark + 1e-9]
    slack = 0.75 if x == "minutes" else 40
    if not done or held[-1][x] < mark - slack:
        return None
    return done[-1]["overall"]


def summarise(root: str, x: str = "minutes") -> str:
    """Markdown table of finished runs; `x="step"` compares runs made side by side (sharing the CPU) by step."""
    runs = read_runs(root)
    marks, unit = ((2, 5, 10, 15), "min") if x == "minutes" else ((100, 200, 300, 400, 500), "steps")
    header = (
        f"| recipe | base | {' | '.join(f'@{m} {unit}' for m in marks)} | best (min) | final (min, steps) | gain |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, held in runs.items():
        base, last = held[0]["overall"], held[-1]
        best = max(held, key=lambda r: r["overall"])
        cells = [at_mark(held, m, x) for m in marks]
        lines.append(
            f"| {name} | {base:.3f} | "
            + " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
            + f" | {best['overall']:.3f} ({best['minutes']:.1f}) | {last['overall']:.3f} ({last['minutes']:.1f}, "
            f"{last['step']}) | {last['overall'] - base:+.3f} |"
        )
    plot(runs, os.path.join(root, "recipes.png"), x)
    seeds = seed_summary(runs)
    return "\n".join(lines) + ("\n\n" + seeds if seeds else "")


def seed_summary(runs: dict[str, list[dict]]) -> str:
    """Per recipe, the final held-out accuracy and gain over its `<recipe>_seed<N>` runs (empty if none)."""
    finals: dict[str, list[tuple[float, float]]] = {}
    for name, held in runs.items():
        match = re.fullmatch(r"(.+)_seed(\d+)", name)
        if match:
            finals.setdefault(match.group(1), []).append(
                (held[-1]["overall"], held[-1]["overall"] - held[0]["overall"])
            )
    if not finals:
        return ""
    lines = ["| recipe | seeds | final, mean (min–max) | gain, mean (min–max) |", "|---|---|---|---|"]
    for recipe, values in finals.items():
        final, gain = [v[0] for v in values], [v[1] for v in values]
        lines.append(
            f"| {recipe} | {len(values)} | {statistics.mean(final):.3f} ({min(final):.3f}–{max(final):.3f}) | "
            f"{statistics.mean(gain):+.3f} ({min(gain):+.3f}–{max(gain):+.3f}) |"
        )
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], out: str, x: str = "minutes") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, held in runs.items():
        ax.plot([r[x] for r in held], [r["overall"] for r in held], "o-", ms=3, label=name)
    ax.set_xlabel("wall-clock minutes (2 CPU cores, evaluations included)" if x == "minutes" else "optimizer step")
    ax.set_ylabel("held-out overall strict accuracy (432 items)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/recipes")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--only", nargs="*", default=None, help="recipe names to run")
    parser.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=None,
        help="run each recipe once per seed, as <recipe>_seed<N> (default: one run, the config's seed)",
    )
    parser.add_argument("--summarise", metavar="DIR", help="only print the table of finished runs in DIR")
    parser.add_argument(
        "--x",
        choices=("minutes", "step"),
        default="minutes",
        help="compare at wall-clock minutes, or at optimizer steps (runs that shared the machine)",
    )
    args = parser.parse_args()
    if args.summarise:
        print(summarise(args.summarise, args.x))
        return
    names = args.only or list(RECIPES)
    unknown = [name for name in names if name not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipe(s) {unknown}; known: {sorted(RECIPES)}")
    runs = (
        [(name, name, []) for name in names]
        if args.seeds is None
        else [(name, f"{name}_seed{seed}", ["--seed", str(seed)]) for name in names for seed in args.seeds]
    )
    for name, run_name, seed_flags in runs:
        cmd = [
            sys.executable,
            "-m",
            "trl_nft.cli",
            "demo",
            "--output_dir",
            os.path.join(args.out, run_name),
            "--max_minutes",
            str(args.minutes),
            "--disable_tqdm",
            "true",
            *RECIPES[name],
            *seed_flags,
        ]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    print(summarise(args.out))


if __name__ == "__main__":
    main()
