"""DiffusionNFT against Flow-GRPO (SD3 base) and DDPO (UNet base) on the shapes world: same base, reward, rollouts
per iteration and wall-clock budget.

    python benchmarks/nft_vs_grpo.py --minutes 12 --out runs/nft_vs_grpo       # NFT demo, then Flow-GRPO (~25 min)
    python benchmarks/nft_vs_grpo.py --methods nft flow-grpo flow-grpo-fast      # also the CFG-free "fast" variant
    python benchmarks/nft_vs_grpo.py --summarise runs/nft_vs_grpo                # table + plots of finished runs
    python benchmarks/nft_vs_grpo.py --methods nft-unet ddpo --out runs/ddpo_vs_nft --minutes 20   # the UNet pair
    python benchmarks/nft_vs_grpo.py --summarise runs/ddpo_vs_nft --nft_run DIR  # DDPO against an NFT run made apart

Runs, one after another and each in its own process with the machine to itself: `trl-nft demo` (the shipped recipe,
trl_nft/configs/shapes_demo.yaml) and `benchmarks/flow_grpo.py` (Flow-GRPO, faithful to the official code; its
deviations are listed in docs/benchmarks.md ("NFT against Flow-GRPO")). Both sample 16 prompts x 16 images per iteration, are rewarded
by `shapes_reward`, start from the shipped base, run in the same precision (`--precision`, measured once by default)
and evaluate the same 432 held-out items every `--eval_every_minutes`.

The UNet pair: `trl-nft demo --model_name_or_path shapes-unet` (its recipe, trl_nft/configs/shapes_demo_unet.yaml)
and `benchmarks/ddpo.py` (TRL 0.23.1's DDPOTrainer, run by the separate environment's python, `.venv-ddpo/bin/python`
from `benchmarks/ddpo_env.sh`, or `--ddpo_python`), both in float32 (DDPO's recipe here runs `mixed_precision="no"`).

Prints a table (method, start / best / final held-out strict accuracy, iterations, seconds per iteration) and, for
each baseline run, the ratio "time for NFT to reach the baseline's best held-out accuracy / the baseline's time to
reach it" and its inverse (NFT's speed-up), twice: under each method's own evaluation protocol (NFT CFG-free, the
baseline with CFG, as the paper compares them) and with both CFG-free. Flow-GRPO is paired with the NFT run on the SD3
base (`<out>/nft`), DDPO with the one on the UNet base (`<out>/nft-unet`, or `--nft_run DIR`). Writes
`nft_vs_grpo.png` (held-out accuracy and training reward against wall-clock and against iterations) and
`summary.json` in the output directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("nft", "flow-grpo", "flow-grpo-fast", "nft-unet", "ddpo")
LABELS = {
    "nft": "DiffusionNFT (demo recipe)",
    "flow-grpo": "Flow-GRPO (CFG)",
    "flow-grpo-fast": "Flow-GRPO fast (CFG-free)",
    "nft-unet": "DiffusionNFT (UNet demo recipe)",
    "ddpo": "DDPO (TRL 0.23.1, CFG 5)",
}
# Each baseline, the NFT run it is measured against (same base), and its name in the comparison's sentences.
PEERS = {"flow-grpo": ("nft", "Flow-GRPO"), "flow-grpo-fast": ("nft", "Flow-GRPO"), "ddpo": ("nft-unet", "DDPO")}
# Baselines evaluated under their own CFG protocol, with a CFG-free evaluation beside it (`cfg_free/overall`).
GUIDED = ("flow-grpo", "ddpo")
# Runs of the UNet pair: float32 whatever --precision says (DDPO's recipe here is `mixed_precision="no"`).
FLOAT32_ONLY = ("nft-unet", "ddpo")
DDPO_PYTHON = os.path.join(os.path.dirname(HERE), ".venv-ddpo", "bin", "python")


def command(
    method: str,
    out: str,
    minutes: float,
    eval_every: float,
    bf16: bool,
    extra: list[str],
    ddpo_python: str = DDPO_PYTHON,
) -> list[str]:
    """The command line of one run (`ddpo_python`: the interpreter of the environment `benchmarks/ddpo_env.sh`
    makes, which has trl 0.23.1)."""
    timing = ["--output_dir", out, "--max_minutes", str(minutes), "--eval_every_minutes", str(eval_every)]
    if method == "ddpo":
        return [ddpo_python, os.path.join(HERE, "ddpo.py"), *timing, *extra]
    common = ["--output_dir", out, "--max_minutes", str(minutes), "--bf16", str(bf16).lower()]
    if method in ("nft", "nft-unet"):
        base = ["--model_name_or_path", "shapes-unet"] if method == "nft-unet" else []
        return [sys.executable, "-m", "trl_nft.cli", "demo", *base, *common, "--eval_every_minutes", str(eval_every),
                "--disable_tqdm", "true", *extra]  # fmt: skip
    fast = ["--fast", "true"] if method == "flow-grpo-fast" else []
    return [sys.executable, os.path.join(HERE, "flow_grpo.py"), *common, "--eval_every_minutes", str(eval_every),
            *fast, *extra]  # fmt: skip


def resolve_precision(precision: str) -> bool:
    """bf16 autocast or not, for both runs: fixed, or (`"auto"`) chosen once the way `trl-nft demo --precision auto`
    chooses (bf16 where a GPU supports it; on a CPU, the faster of float32 and bf16 autocast on a 2-step rollout)."""
    if precision != "auto":
        return precision == "bf16"
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    from trl_nft.precision import choose_cpu_precision
    from trl_nft.shapes.pretrain import MAX_SEQUENCE_LENGTH, load_base_pipeline
    from trl_nft.shapes.world import make_dataset

    pipe = load_base_pipeline("shapes-base")
    prompts = list(make_dataset("train")["prompt"][:8])
    choice = choose_cpu_precision(
        lambda: pipe(
            prompts,
            num_inference_steps=2,
            guidance_scale=1.0,
            output_type="pt",
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )  # fmt: skip
    )
    print(f"precision for both runs: {choice.reason}", flush=True)
    return choice.bf16


# --------------------------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------------------------


def steps_per_iteration(method: str, path: str) -> int:
    """Optimizer steps per rollout batch: flow_grpo.py's and ddpo.py's `optimizer_steps_per_iteration` (their
    config.json), the demo's `steps_per_generation` (its shipped recipe for the base)."""
    nft = method in ("nft", "nft-unet")
    config = os.path.join(path, "config.json")
    if not nft and os.path.isfile(config):
        with open(config) as f:
            return int(json.load(f).get("optimizer_steps_per_iteration", 2))
    if not nft:
        return 2
    import yaml

    from trl_nft.shapes.demo import DEMO_CONFIG, DEMO_CONFIG_UNET

    with open(DEMO_CONFIG_UNET if method == "nft-unet" else DEMO_CONFIG) as f:
        return int(yaml.safe_load(f).get("steps_per_generation", 1))


def read_run(path: str, per_iteration: int = 1) -> dict | None:
    """Held-out and training records of one run directory, with the iteration (rollout batch) count attached to each.

    The demo logs `reward` on the optimizer step that consumed a new rollout batch, as does flow_grpo.py, so the
    number of `reward` records up to a step is the number of iterations done by then (for both methods). Seconds per
    iteration: training time (evaluations excluded) over optimizer steps / `per_iteration`, so that a run stopped
    inside an iteration counts the fraction it did.
    """
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        return None
    with open(metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    rollouts = [r for r in records if r["type"] == "train" and "reward" in r]
    held = [r for r in records if r["type"] == "heldout"]
    if not held:
        return None
    for i, r in enumerate(rollouts):
        r["iteration"] = i + 1
    for r in held:
        r["iteration"] = sum(1 for x in rollouts if x["step"] <= r["step"])
        r.setdefault("cfg_free/overall", r["overall"] if r.get("guidance_scale", 1.0) == 1.0 else None)
    eval_seconds = sum(r.get("eval_seconds", 0.0) for r in held[:-1])
    last_minutes = max([r["minutes"] for r in records if r["type"] == "train"] or [held[-1]["minutes"]])
    iterations = len(rollouts)
    train_seconds = max(last_minutes * 60 - eval_seconds, 0.0)
    steps = max([r["step"] for r in records if r["type"] == "train"] or [0])
    return {
        "held": held,
        "rollouts": rollouts,
        "iterations": iterations,
        "optimizer_steps": steps,
        "seconds_per_iteration": train_seconds / (steps / per_iteration) if steps else math.nan,
        "minutes": held[-1]["minutes"],
    }


def first_reaching(held: list[dict], target: float, key: str = "overall") -> dict | None:
    """The first evaluation with accuracy >= target (None if never)."""
    for r in held:
        if r.get(key) is not None and r[key] >= target - 1e-12:
            return r
    return None


def compare(nft: dict, peer: dict, peer_key: str, name: str, peer_name: str = "Flow-GRPO") -> dict:
    """NFT's time to the peer's best accuracy (read with `peer_key`) against the peer's own time to it; `peer_name`
    names the peer in the returned `text`."""
    values = [r[peer_key] for r in peer["held"] if r.get(peer_key) is not None]
    # The first evaluation at the best value (float noise of the mean of tags must not make a tie look like progress).
    best = first_reaching(peer["held"], max(values) - 1e-9, peer_key)
    target, t_peer = best[peer_key], best["minutes"]
    reach = first_reaching(nft["held"], target)
    out = {"protocol": name, "target": target, "peer_minutes": t_peer, "peer_iteration": best["iteration"]}
    nft_best = max(r["overall"] for r in nft["held"])
    if reach is None:
        out.update(reached=False, text=(
            f"NFT never reached {peer_name}'s best {target:.3f} ({name}) within {nft['minutes']:.1f} min "
            f"(NFT's best {nft_best:.3f}); {peer_name} reached it at {t_peer:.1f} min"
            f"{' (its starting point)' if best is peer['held'][0] else ''}."))  # fmt: skip
        return out
    t_nft = reach["minutes"]
    out.update(reached=True, nft_minutes=t_nft, nft_iteration=reach["iteration"])
    if best is peer["held"][0] or t_peer <= 0:
        out.update(text=(
            f"{peer_name}'s best {target:.3f} ({name}) is its starting point (the base, no training), which NFT "
            f"reaches at {t_nft:.1f} min; no time ratio."))  # fmt: skip
        return out
    ratio = t_nft / t_peer
    out.update(ratio=ratio, speedup=1 / ratio if ratio > 0 else math.inf)
    out["text"] = (
        f"{peer_name}'s best {target:.3f} ({name}): {peer_name} {t_peer:.1f} min (iteration {best['iteration']}), "
        f"NFT {t_nft:.1f} min (iteration {reach['iteration']}): time ratio NFT / {peer_name} = {ratio:.2f}, "
        f"NFT speed-up {out['speedup']:.1f}x."
    )
    return out


def summarise(root: str, nft_run: str | None = None) -> str:
    """The table, the comparisons and the plot of the finished runs under `root` (`<root>/<method>/metrics.jsonl`);
    `nft_run`: a demo output directory on the UNet base to pair with DDPO instead of `<root>/nft-unet`."""
    paths = {m: os.path.join(root, m) for m in METHODS}
    if nft_run is not None:
        paths["nft-unet"] = nft_run
    runs = {m: read_run(path, steps_per_iteration(m, path)) for m, path in paths.items()}
    runs = {m: r for m, r in runs.items() if r is not None}
    if not runs:
        return f"No finished runs (metrics.jsonl with held-out records) under {root}/{{{','.join(METHODS)}}}."
    lines = [
        "| method | start acc | best acc (min, iter) | final acc | CFG-free start / best / final | iterations | "
        "optimizer steps | s/iteration |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, run in runs.items():
        held = run["held"]
        best = max(held, key=lambda r: r["overall"])
        free = [r["cfg_free/overall"] for r in held if r.get("cfg_free/overall") is not None]
        free_cell = f"{free[0]:.3f} / {max(free):.3f} / {free[-1]:.3f}" if free else "-"
        lines.append(
            f"| {LABELS[m]} | {held[0]['overall']:.3f} | {best['overall']:.3f} ({best['minutes']:.1f}, "
            f"{best['iteration']}) | {held[-1]['overall']:.3f} | {free_cell} | {run['iterations']} | "
            f"{run['optimizer_steps']} | {run['seconds_per_iteration']:.1f} |"
        )
    comparisons, notes = [], []
    for peer, (nft, peer_name) in PEERS.items():
        if nft not in runs or peer not in runs:
            continue
        if peer in GUIDED:
            own = f"own protocols: NFT CFG-free, {peer_name} CFG"
            comparisons.append({"peer": peer, "nft": nft, **compare(runs[nft], runs[peer], "overall", own, peer_name)})
            comparisons.append({"peer": peer, "nft": nft, **compare(runs[nft], runs[peer], "cfg_free/overall",
                                                                     "both CFG-free", peer_name)})  # fmt: skip
        else:
            comparisons.append({"peer": peer, "nft": nft, **compare(runs[nft], runs[peer], "overall",
                                                                     "both CFG-free", peer_name)})  # fmt: skip
        # Both runs start from the same base, evaluated CFG-free on the same items and seeds: their first scores
        # agree unless the runs used different bases or precisions, which would make the pairing meaningless.
        nft_start, peer_start = runs[nft]["held"][0]["overall"], runs[peer]["held"][0].get("cfg_free/overall")
        if peer_start is not None and abs(nft_start - peer_start) > 0.01:
            notes.append(
                f"- Warning: {LABELS[nft]} starts at {nft_start:.3f} CFG-free, {LABELS[peer]} at {peer_start:.3f}: "
                "not the same base, precision or held-out items?"
            )
    text = "\n".join(lines)
    if comparisons or notes:
        text += "\n\n" + "\n".join([*(f"- {LABELS[c['peer']]}: {c['text']}" for c in comparisons), *notes])
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump({"runs": {m: {k: v for k, v in r.items() if k not in ("held", "rollouts")} for m, r in runs.items()},
                   "comparisons": comparisons, "nft_run": nft_run}, f, indent=2)  # fmt: skip
    plot(runs, os.path.join(root, "nft_vs_grpo.png"))
    return text


def plot(runs: dict[str, dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "nft": "tab:red",
        "flow-grpo": "tab:blue",
        "flow-grpo-fast": "tab:green",
        "nft-unet": "tab:orange",
        "ddpo": "tab:purple",
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
    for col, x in enumerate(("minutes", "iteration")):
        ax = axes[0][col]
        for m, run in runs.items():
            held = run["held"]
            ax.plot([r[x] for r in held], [r["overall"] for r in held], "o-", color=colours[m], lw=2, ms=4,
                    label=LABELS[m] + (" (own protocol)" if m in GUIDED else ""))  # fmt: skip
            if m in GUIDED:
                free = [(r[x], r["cfg_free/overall"]) for r in held if r.get("cfg_free/overall") is not None]
                ax.plot(
                    *zip(*free, strict=True),
                    "s--",
                    color=colours[m],
                    lw=1.2,
                    ms=3,
                    alpha=0.7,
                    label=f"{PEERS[m][1]}, CFG-free eval",
                )
        ax.set_ylabel("held-out strict accuracy (432 items)")
        ax.grid(alpha=0.3)
        ax = axes[1][col]
        for m, run in runs.items():
            rows = run["rollouts"]
            ax.plot(
                [r[x] for r in rows],
                [r["reward"] for r in rows],
                "o-",
                ms=2,
                color=colours[m],
                lw=1.5,
                label=LABELS[m],
            )
        ax.set_ylabel("training reward (shapes_reward, rollout mean)")
        ax.set_xlabel("wall-clock minutes (evaluations included)" if x == "minutes" else "iterations (256 rollouts)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    axes[1][0].legend(fontsize=8, loc="lower right")
    names = " and ".join(dict.fromkeys(PEERS[m][1] for m in runs if m in PEERS)) or "its baselines"
    fig.suptitle(f"DiffusionNFT vs {names} on the shapes world (same base, reward, rollouts, wall-clock)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/nft_vs_grpo")
    parser.add_argument("--minutes", type=float, default=12.0, help="wall-clock budget of each run")
    parser.add_argument("--eval_every_minutes", type=float, default=1.5, help="held-out evaluation interval (both)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["nft", "flow-grpo"])
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="one precision for both runs; 'auto' measures it once as `trl-nft demo` does")  # fmt: skip
    parser.add_argument("--nft_args", nargs=argparse.REMAINDER, default=[],
                        help="extra flags for `trl-nft demo` (must come last)")  # fmt: skip
    parser.add_argument("--grpo_args", nargs="*", default=[], help="extra flags for flow_grpo.py (e.g. --seed 1)")
    parser.add_argument("--ddpo_args", nargs="*", default=[], help="extra flags for ddpo.py (e.g. --seed 1)")
    parser.add_argument("--ddpo_python", default=DDPO_PYTHON,
                        help="python of the trl 0.23.1 environment (benchmarks/ddpo_env.sh)")  # fmt: skip
    parser.add_argument("--summarise", metavar="DIR", help="only print the table and re-plot the finished runs in DIR")
    parser.add_argument("--nft_run", metavar="DIR",
                        help="an NFT run on the UNet base (`trl-nft demo --model_name_or_path shapes-unet` output) "
                             "to pair with DDPO instead of <out>/nft-unet")  # fmt: skip
    args = parser.parse_args(argv)
    if args.summarise:
        print(summarise(args.summarise, args.nft_run))
        return
    if "ddpo" in args.methods and not os.path.isfile(args.ddpo_python):
        parser.error(f"--ddpo_python {args.ddpo_python} does not exist: run `bash benchmarks/ddpo_env.sh` first.")
    bf16 = any(m not in FLOAT32_ONLY for m in args.methods) and resolve_precision(args.precision)
    extras = {"nft": args.nft_args, "nft-unet": args.nft_args, "ddpo": args.ddpo_args}
    for method in args.methods:
        cmd = command(method, os.path.join(args.out, method), args.minutes, args.eval_every_minutes,
                      bf16 and method not in FLOAT32_ONLY, extras.get(method, args.grpo_args), args.ddpo_python)  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    print(summarise(args.out, args.nft_run))


if __name__ == "__main__":
    main()
