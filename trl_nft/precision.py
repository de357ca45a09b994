"""Choosing bf16 autocast or float32 for a CPU run, by what the CPU supports and a short measurement.

CPU bf16 autocast is fast only where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX): there oneDNN runs the
matmuls in bf16 (the shapes demo's denoiser forward was 1.9x faster than float32). Without it (an AVX2-only CPU) every
bf16 matmul is emulated: on an AVX2 AMD EPYC a batch-64 forward of the shapes denoiser took 1356 ms under bf16
autocast against 267 ms in float32 (issue 16). A config tuned on one machine therefore must not fix the precision for
every other one: `trl-nft demo --precision auto` (the default) measures both on the pipeline it is about to train and
takes the faster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


#: CPU flags (Linux `/proc/cpuinfo`) that give native bf16 matmuls.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: bf16 autocast must be at least this much faster than float32 to be chosen (below it, float32's precision wins).
MIN_SPEEDUP = 1.1


def cpu_bf16_flags() -> list[str] | None:
    """The native-bf16 flags of this CPU (a subset of `NATIVE_BF16_FLAGS`), or None where they cannot be read (a
    non-Linux system). oneDNN may still be told not to use them (`ONEDNN_MAX_CPU_ISA`); `measure_autocast` sees that."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    except OSError:
        return None
    return None


def measure_autocast(fn: Callable[[], Any], repeats: int = 2) -> tuple[float, float]:
    """Seconds of one `fn()` call in float32 and under CPU bf16 autocast: the fastest of `repeats` runs after one
    warm-up run each (the warm-up pays oneDNN's kernel selection)."""

    def best(bf16: bool) -> float:
        times = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for i in range(repeats + 1):
                start = time.perf_counter()
                fn()
                if i:
                    times.append(time.perf_counter() - start)
        return min(times)

    return best(False), best(True)


@dataclass
class PrecisionChoice:
    """The outcome of `choose_cpu_precision`: `bf16` says whether to train under bf16 autocast; `reason` says why, with
    the measured seconds, in one line for the run's log."""

    bf16: bool
    reason: str
    float32_seconds: float | None = None
    bf16_seconds: float | None = None


def choose_cpu_precision(fn: Callable[[], Any], repeats: int = 2) -> PrecisionChoice:
    """Time `fn` (a short piece of the real workload, e.g. a 2-step pipeline call on a few prompts) in float32 and under
    bf16 autocast, and choose bf16 when it is at least `MIN_SPEEDUP` times faster.

    Args:
        fn (`Callable[[], Any]`): the workload; called `2 (repeats + 1)` times.
        repeats (`int`, defaults to 2): timed runs per precision (the fastest counts).
    """
    fp32, bf16 = measure_autocast(fn, repeats)
    flags = cpu_bf16_flags()
    cpu = (
        "CPU flags: " + (", ".join(flags) if flags else "no native bf16") if flags is not None else "CPU flags unknown"
    )
    speedup = fp32 / bf16
    if speedup >= MIN_SPEEDUP:
        reason = f"bf16 autocast: {speedup:.2f}x faster than float32 here ({bf16:.3f} s vs {fp32:.3f} s; {cpu})"
    else:
        how = f"{1 / speedup:.2f}x slower" if speedup < 1 else f"only {speedup:.2f}x faster"
        reason = f"float32: bf16 autocast is {how} than float32 here ({bf16:.3f} s vs {fp32:.3f} s; {cpu})"
    return PrecisionChoice(speedup >= MIN_SPEEDUP, reason, fp32, bf16)
