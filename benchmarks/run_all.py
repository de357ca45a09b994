"""Regenerate every benchmark of docs/benchmarks.md, one after another, each with the machine to itself.

    python benchmarks/run_all.py [--out runs/benchmarks] [--only overhead cost_growth ...] [--grpo_minutes 12]

Runs, in this order (about 40 minutes on 2 CPU cores, most of it the NFT-vs-Flow-GRPO pair):

| name | script | what it measures |
|---|---|---|
| overhead | benchmarks/overhead.py | an NFT iteration against the bare compute it contains, part by part |
| cost_growth | benchmarks/cost_growth.py | time and peak memory against K, resolution, rollout steps, training times |
| memory | benchmarks/memory.py | peak memory of one NFT step with each memory option, against LoRA flow matching |
| async_rewards | benchmarks/async_rewards.py | time per iteration with and without rewards overlapped with sampling |
| nft_vs_grpo | benchmarks/nft_vs_grpo.py | NFT and Flow-GRPO on the shapes world, same budget: accuracy against time |

Not run by default (`--only processes`, about 6 minutes): `benchmarks/processes.py` on the UNet base, the demo's pace
with one and with two data-parallel processes.

Each writes its tables (stdout, kept in `<out>/<name>.log`), plots and JSON under `<out>/<name>/`. A script that is
missing is reported and skipped; a failing one does not stop the others.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ("overhead", "cost_growth", "memory", "async_rewards", "nft_vs_grpo")
OPTIONAL = ("processes",)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/benchmarks")
    parser.add_argument("--only", nargs="*", choices=[*BENCHMARKS, *OPTIONAL], help="Run only these.")
    parser.add_argument("--grpo_minutes", type=float, default=12, help="Wall-clock budget of each method in the pair.")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    extra = {
        "nft_vs_grpo": ["--minutes", str(args.grpo_minutes)],
        "processes": ["--model_name_or_path", "shapes-unet", "--rounds", "1", "--steps", "16"],
    }
    failed = []
    for name in args.only or BENCHMARKS:
        script = os.path.join(HERE, f"{name}.py")
        if not os.path.exists(script):
            print(f"[{name}] {script} is missing: skipped")
            failed.append(name)
            continue
        out = os.path.join(args.out, name)
        cmd = [sys.executable, script, "--out", out, *extra.get(name, [])]
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        with open(os.path.join(args.out, f"{name}.log"), "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        minutes = (time.perf_counter() - start) / 60
        print(f"[{name}] {'done' if rc == 0 else f'FAILED (exit {rc})'} in {minutes:.1f} min, log {log.name}")
        if rc:
            failed.append(name)
    print("all done" if not failed else f"failed or missing: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
