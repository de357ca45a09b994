"""The shapes demo's training pace with one process and with N data-parallel processes, on the same machine, in one run.

    python benchmarks/processes.py [--model_name_or_path shapes-base] [--processes 1 2] [--rounds 2] [--steps 24]

Each run is `trl-nft demo` as a user starts it, for `--steps` optimizer steps with the held-out evaluations moved out of
the way (`--eval_every_minutes 1000 --heldout_per_tag 1`): one process is `python -m trl_nft.cli demo`, N processes
`accelerate launch --multi_gpu --num_processes N -m trl_nft.cli demo` (gloo on a CPU, one torch thread per process;
the demo splits its 64-sample optimizer step over the processes, docs/cli.md). The pace is the wall time from the end
of the first rollout batch's last optimizer step (a warm-up: the first rollout, allocations) to the end of the last
step, per optimizer step, read from the run's own `metrics.jsonl`. Rounds alternate the process counts, so that a
machine whose pace drifts shows it as a spread between rounds rather than as a ratio. All runs use one precision:
bf16 autocast on a CPU with native bf16 (avx512_bf16/amx_bf16), float32 otherwise, or `--precision`.

Prints the table and writes `processes.json` and `processes.png` (seconds per optimizer step per run) under `--out`.

    python benchmarks/processes.py --curves runs/demo-1proc runs/demo-2proc [--out DIR]

compares whole demo runs instead (each made apart, e.g. `trl-nft demo` and `accelerate launch ... demo`): their
held-out strict accuracy against wall-clock and against optimizer steps, as a table and `demo_curves.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_command(processes: int, out: str, model: str, precision: str, steps: int) -> list[str]:
    demo = [
        "-m",
        "trl_nft.cli",
        "demo",
        "--model_name_or_path",
        model,
        "--output_dir",
        out,
        "--precision",
        precision,
        "--max_steps",
        str(steps),
        "--max_minutes",
        "1000",
        "--eval_every_minutes",
        "1000",
        "--heldout_per_tag",
        "1",
        "--num_sample_images",
        "2",
        "--disable_tqdm",
        "true",
    ]
    if processes == 1:
        return [sys.executable, *demo]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        f"--num_processes={processes}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={_free_port()}",
    ]
    return [*launch, *demo]


def seconds_per_step(metrics_path: str, warmup_steps: int) -> tuple[float, int]:
    """Wall seconds per optimizer step after the first `warmup_steps` steps, and the number of steps measured."""
    minutes = {}
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if record["type"] == "train" and "loss" in record:
                minutes[record["step"]] = record["minutes"]
    last = max(minutes)
    if last <= warmup_steps:
        raise ValueError(f"{metrics_path}: {last} steps, not more than the {warmup_steps} warm-up steps")
    return (minutes[last] - minutes[warmup_steps]) * 60 / (last - warmup_steps), last - warmup_steps


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['processes']}p r{r['round']}" for r in result["runs"]]
    ax.bar(
        labels,
        [r["seconds_per_step"] for r in result["runs"]],
        color=["C0" if r["processes"] == 1 else "C1" for r in result["runs"]],
    )
    ax.set_ylabel("s per optimizer step (64 samples)")
    ax.set_title(f"{result['model']}: processes x rounds ({result['precision']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def heldout(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == "heldout"]


def compare_curves(runs: list[str], out: str) -> dict:
    """Print each demo run's held-out curve and its pace, and plot them against minutes and against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {run: heldout(run) for run in runs}
    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, held in curves.items():
        name = os.path.basename(os.path.normpath(run))
        last = held[-1]
        print(
            f"\n{name}: {last['step']} optimizer steps in {last['minutes']:.1f} min "
            f"({last['step'] / last['minutes']:.1f} per minute), best {max(r['overall'] for r in held):.3f}"
        )
        print("| minutes | " + " | ".join(f"{r['minutes']:.1f}" for r in held) + " |")
        print("|---" * (len(held) + 1) + "|")
        print("| step | " + " | ".join(str(r["step"]) for r in held) + " |")
        print("| held-out strict accuracy | " + " | ".join(f"{r['overall']:.3f}" for r in held) + " |")
        by_time.plot([r["minutes"] for r in held], [r["overall"] for r in held], marker="o", label=name)
        by_step.plot([r["step"] for r in held], [r["overall"] for r in held], marker="o", label=name)
    by_time.set_xlabel("wall-clock minutes")
    by_step.set_xlabel("optimizer steps")
    for ax in (by_time, by_step):
        ax.set_ylabel("held-out strict accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    fig.savefig(os.path.join(out, "demo_curves.png"), dpi=120)
    return curves


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default="shapes-base")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24, help="Optimizer steps per run (the first 4 are a warm-up).")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="Default: bf16 where native.")
    parser.add_argument("--out", default="runs/processes")
    parser.add_argument("--curves", nargs="+", metavar="RUN", help="Only compare finished demo runs' held-out curves.")
    args = parser.parse_args(argv)
    if args.curves:
        return compare_curves(args.curves, args.out)

    from trl_nft.precision import cpu_bf16_flags

    precision = args.precision or ("bf16" if cpu_bf16_flags() else "fp32")
    os.makedirs(args.out, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    warmup = 4  # the recipe's first rollout batch feeds 4 optimizer steps
    runs = []
    for round_ in range(args.rounds):
        order = args.processes if round_ % 2 == 0 else list(reversed(args.processes))
        for n in order:
            out = os.path.join(args.out, f"round{round_}-{n}p")
            command = demo_command(n, out, args.model_name_or_path, precision, args.steps)
            start = time.perf_counter()
            with open(out + ".log", "w") as log:
                rc = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            if rc:
                raise SystemExit(f"{' '.join(command)} failed (exit {rc}); see {out}.log")
            seconds, measured = seconds_per_step(os.path.join(out, "metrics.jsonl"), warmup)
            runs.append({"round": round_, "processes": n, "seconds_per_step": seconds, "steps_measured": measured})
            print(
                f"round {round_}, {n} process(es): {seconds:.2f} s/step ({time.perf_counter() - start:.0f} s in all)",
                flush=True,
            )

    summary = {}
    for n in args.processes:
        values = [r["seconds_per_step"] for r in runs if r["processes"] == n]
        summary[n] = {"mean": statistics.mean(values), "runs": values}
    one = summary.get(1, {}).get("mean")
    print(
        f"\n{args.model_name_or_path}, {precision}, {args.steps - warmup} measured steps per run, {args.rounds} rounds\n"
    )
    print("| processes | s per optimizer step (per round) | mean | optimizer steps per minute | speed-up over 1 |")
    print("|---|---|---|---|---|")
    for n, s in summary.items():
        speedup = f"{one / s['mean']:.2f}x" if one else "-"
        rounds = ", ".join(f"{v:.2f}" for v in s["runs"])
        print(f"| {n} | {rounds} | {s['mean']:.2f} | {60 / s['mean']:.1f} | {speedup} |")
    result = {"model": args.model_name_or_path, "precision": precision, "runs": runs, "summary": summary}
    with open(os.path.join(args.out, "processes.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(args.out, "processes.png"))
    return result


if __name__ == "__main__":
    main()
