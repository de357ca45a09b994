"""Checkpoint files of `DiffusionNFTTrainer` beyond what `transformers.Trainer` writes (see docs/checkpoints.md).

A checkpoint directory `checkpoint-N` holds, besides Trainer's `optimizer.pt`, `scheduler.pt`, `rng_state*.pth` and
`trainer_state.json` and the diffusers LoRA file:

- `nft_state.safetensors`: the trained weights, the old (sampling) policy and the evaluation EMA, keyed by the trained
  parameter's name: `trained/<name>`, `old/<name>`, `ema/<name>`;
- `rollout_buffer.safetensors`: the rollout batch being trained on (`buffer/<micro-batch>/<column>`), so that a run
  resumes *inside* a rollout batch exactly;
- `nft_state.json`, written last: the format version, the trainer's rollout counters, the LoRA config and batch layout
  (checked on resume), the non-tensor columns of the rollout buffer, and `files`, the size of every file of the
  checkpoint. A directory without it, or whose files do not have these sizes, is incomplete.

Checkpoints are written into a hidden staging directory `.tmp-checkpoint-N`, flushed to disk and renamed into place,
so a crash while saving leaves the previous checkpoint the newest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
from typing import Any

import torch


FORMAT = "trl_nft.checkpoint"
VERSION = 1
STATE_TENSORS = "nft_state.safetensors"
STATE_JSON = "nft_state.json"
BUFFER_TENSORS = "rollout_buffer.safetensors"
STAGING_PREFIX = ".tmp-"
# Written by transformers' JIT checkpointing while a save is under way.
INCOMPLETE_SENTINEL = "checkpoint-is-incomplete.txt"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# LoRA settings whose change makes a checkpoint's adapter weights meaningless for the current model.
LORA_FIELDS = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")
# Fields that fix which prompts and images make up each step; resuming with other values cannot continue the run.
LAYOUT_FIELDS = (
    "num_generations",
    "per_device_train_batch_size",
    "steps_per_generation",
    "generation_batch_size",
    "num_iterations",
    "gradient_accumulation_steps",
    "world_size",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file or field and the fix."""


# ------------------------------------------------------------------------------------------------ json helpers
def _jsonable(value):
    if isinstance(value, set | frozenset | tuple):
        return sorted(value, key=str) if isinstance(value, set | frozenset) else list(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def lora_summary(peft_config) -> dict[str, Any]:
    """The resume-relevant fields of a `peft.LoraConfig`, JSON-able (target modules sorted)."""
    config = peft_config.to_dict() if hasattr(peft_config, "to_dict") else dict(peft_config)
    summary = {k: _jsonable(config.get(k)) for k in LORA_FIELDS}
    if isinstance(summary["target_modules"], list):
        summary["target_modules"] = sorted(summary["target_modules"])
    return summary


def batch_layout(args) -> dict[str, int]:
    return {k: int(getattr(args, k)) for k in LAYOUT_FIELDS}


# ------------------------------------------------------------------------------------------------ the rollout buffer
def pack_buffer(buffer: list[dict[str, Any]] | None) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Split the buffered micro-batches into tensors (for safetensors) and JSON-able columns (lists of str, ...)."""
    if buffer is None:
        return {}, None
    tensors, other = {}, []
    for i, micro in enumerate(buffer):
        rest = {}
        for key, value in micro.items():
            if isinstance(value, torch.Tensor):
                tensors[f"buffer/{i}/{key}"] = value.detach().cpu().contiguous()
            else:
                try:
                    json.dumps(value)
                except TypeError as err:
                    raise TypeError(
                        f"Cannot checkpoint rollout-buffer column {key!r} ({type(value).__name__}): columns must be "
                        "tensors or JSON-able values (lists of str / numbers)."
                    ) from err
                rest[key] = value
        other.append(rest)
    return tensors, {"num_micro_batches": len(buffer), "columns": other}


def unpack_buffer(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None, device
) -> list[dict[str, Any]] | None:
    if meta is None:
        return None
    buffer = [dict(columns) for columns in meta["columns"]]
    for name, value in tensors.items():
        _, i, key = name.split("/", 2)
        buffer[int(i)][key] = value.to(device)
    return buffer


# ------------------------------------------------------------------------------------------------ reading
def load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for truncated / corrupt headers
        reason = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"{path} is corrupt or truncated ({type(err).__name__}: {reason}). Resume from an earlier checkpoint, or "
            "delete this checkpoint directory so that resume_from_checkpoint=True picks the previous one."
        ) from err


def read_state(checkpoint: str) -> dict[str, Any]:
    """`nft_state.json` of a complete checkpoint; `CheckpointError` naming the file and the fix otherwise."""
    problem = incomplete_reason(checkpoint)
    if problem is not None:
        raise CheckpointError(
            f"{checkpoint} is not a complete DiffusionNFT checkpoint: {problem}. Resume from an earlier checkpoint "
            "(resume_from_checkpoint=True picks the newest complete one), or delete this directory."
        )
    with open(os.path.join(checkpoint, STATE_JSON)) as f:
        return json.load(f)


def incomplete_reason(checkpoint: str) -> str | None:
    """Why `checkpoint` is not a complete checkpoint written by this trainer, or None if it is."""
    state_file = os.path.join(checkpoint, STATE_JSON)
    if not os.path.isdir(checkpoint):
        return "the directory does not exist"
    if os.path.exists(os.path.join(checkpoint, INCOMPLETE_SENTINEL)):
        return f"it holds {INCOMPLETE_SENTINEL} (a save was interrupted)"
    if not os.path.isfile(state_file):
        return f"{STATE_JSON} is missing (it is written last, so the save did not finish)"
    try:
        with open(state_file) as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        return f"{state_file} is unreadable ({err})"
    if state.get("format") != FORMAT:
        return f"{state_file} is not a {FORMAT} file"
    for name, size in state.get("files", {}).items():
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} is truncated or altered ({os.path.getsize(path)} bytes, {size} when saved)"
    return None


def newest_complete_checkpoint(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete `checkpoint-N` in `output_dir`, and the newer incomplete ones skipped (path, reason)."""
    if not os.path.isdir(output_dir):
        return None, []
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(output_dir)
        if (m := _CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    skipped = []
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        reason = incomplete_reason(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def check_compatible(checkpoint: str, saved: dict[str, Any], current: dict[str, Any], what: str, hint: str):
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"{checkpoint} was saved with {what} {key}={saved.get(key)!r}, but this run has {key}="
                f"{current.get(key)!r}. {hint}"
            )


# ------------------------------------------------------------------------------------------------ writing
def _fsync_tree(path: str):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) cannot fsync a directory
        pass
    finally:
        os.close(fd)


def staging_dir(final: str) -> str:
    parent, name = os.path.split(final)
    return os.path.join(parent, STAGING_PREFIX + name)


def finalize(staging: str, final: str, state: dict[str, Any]):
    """Write `nft_state.json` with the size of every file, flush everything to disk, and rename into place."""
    files = {}
    for root, _, names in os.walk(staging):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, staging)] = os.path.getsize(path)
    files.pop(STATE_JSON, None)
    state = {"format": FORMAT, "version": VERSION, **state, "files": dict(sorted(files.items()))}
    with open(os.path.join(staging, STATE_JSON), "w") as f:
        json.dump(state, f, indent=2)
    _fsync_tree(staging)
    if os.path.exists(final):
        # Re-saving a step (e.g. the final save after a resume at that step): swap, then drop the old copy.
        trash = staging_dir(final) + ".old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_dir(os.path.dirname(final) or ".")


# ------------------------------------------------------------------------------------------------ signals
class SignalGuard:
    """Turns the first SIGTERM / SIGINT into a request to checkpoint and stop at the next optimizer step; a second
    one aborts at once (`KeyboardInterrupt`). Installed only in the main thread; previous handlers are restored."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            self.restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without saving a checkpoint")
        self.received = signum
        from transformers.utils import logging

        logging.get_logger("trl_nft").warning(
            f"{signal.Signals(signum).name} received: finishing the current step, then saving a checkpoint and "
            "stopping. Send it again to abort at once without saving."
        )
