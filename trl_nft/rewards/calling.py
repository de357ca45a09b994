"""The reward boundary: everything that goes into and comes out of a reward function is checked here, in one place.

* names: one unique, readable name per reward (`unique_reward_names`);
* inputs: dataset columns that would shadow the call's own keywords are refused at construction
  (`check_reward_columns`);
* outputs: one finite float (or `None`) per image, or a mapping `{"scores": [...], "<extra>": [...]}` whose extra
  per-image values are logged; non-finite scores are an error naming the function, or, with
  `non_finite_rewards="missing"`, treated as missing with a warning; a row that no reward scored is warned about;
* `async def` rewards (and any callable returning an awaitable) run concurrently on a background event loop, so they
  also work where an event loop is already running (a notebook cell), as TRL's `GRPOTrainer` does;
* overlap with sampling (`RewardCaller.schedule`): the chunks of a batch are scored in order, inline or on one worker
  thread while the caller samples the next chunk (`DiffusionNFTConfig.async_reward_computation`), through the same
  `RewardCaller.__call__`, so both give the same scores, metrics and errors.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import inspect
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers.utils import logging
from trl.trainer.utils import get_callable_name, shutdown_event_loop_in_daemon, start_event_loop_in_daemon


logger = logging.get_logger(__name__)

#: Keywords of the reward call itself; a dataset column with one of these names would shadow it.
RESERVED_REWARD_KWARGS = ("prompts", "images", "trainer_state", "log_metric")
#: Accepted values of `DiffusionNFTConfig.non_finite_rewards`.
NON_FINITE_REWARDS = ("error", "missing")
#: Key of the scores in a reward's mapping return value; every other key is an extra per-image value to log.
SCORES_KEY = "scores"


def reward_name(func: Callable) -> str:
    """The display name of one reward: a `name` attribute if it has one (built-in reward models, `RemoteReward`),
    else TRL's `get_callable_name` (functions by `__name__`, `functools.partial` unwrapped to the wrapped function,
    callable instances by class name)."""
    name = getattr(func, "name", None)
    if isinstance(name, str) and name:
        return name
    return get_callable_name(func)


def unique_reward_names(funcs: Sequence[Callable]) -> list[str]:
    """One name per reward, unique within the list: every member of a set of equal names gets a suffix `_1`, `_2`, ...
    in list order (two `functools.partial` of one function, two instances of one class), so that each is logged as
    its own `rewards/<name>/mean` and no two rewards' statistics are averaged together."""
    names = [reward_name(f) for f in funcs]
    counts = {n: names.count(n) for n in names}
    seen: dict[str, int] = {}
    taken = {n for n in names if counts[n] == 1}
    out = []
    for n in names:
        if counts[n] == 1:
            out.append(n)
            continue
        k = seen.get(n, 0)
        while True:
            k += 1
            candidate = f"{n}_{k}"
            if candidate not in taken:
                break
        seen[n] = k
        taken.add(candidate)
        out.append(candidate)
    return out


def check_reward_columns(column_names: Sequence[str], field_name: str) -> None:
    """Refuse dataset columns that collide with the reward call's own keywords.

    Raises:
        ValueError: naming the column and the fix, e.g. a column `images` (which would replace the generated images).
    """
    clashes = [c for c in column_names if c in RESERVED_REWARD_KWARGS]
    if clashes:
        raise ValueError(
            f"{field_name} has column(s) {clashes} with the name of an argument that every reward function receives "
            f"({', '.join(RESERVED_REWARD_KWARGS)}); the column would replace it. Rename the column, e.g. "
            f"dataset.rename_column({clashes[0]!r}, '{clashes[0]}_column')."
        )


@dataclass
class RewardOutput:
    """What one call of all reward functions on a batch returned, after checking."""

    scores: torch.Tensor
    """`[N, F]` float32 scores, NaN where a function gave no score (`None`)."""
    extras: dict[str, list[float]] = field(default_factory=dict)
    """`"<reward name>/<key>"` -> `N` extra per-image values (NaN where missing), from mapping return values."""


def _as_float(value, name: str, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Reward function {name!r} returned {type(value).__name__} {value!r} as {what}; each must be a float "
            "(or None for no score)."
        )
    return float(value)


def _as_list(values, name: str, n: int, what: str) -> list:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().flatten().tolist()
    elif hasattr(values, "tolist") and not isinstance(values, str | bytes):  # numpy arrays
        values = values.tolist()
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) != n:
        is_list = isinstance(values, Sequence) and not isinstance(values, str | bytes)
        got = f"{len(values)} {what}" if is_list else f"a {type(values).__name__} as {what}"
        raise ValueError(
            f"Reward function {name!r} returned {got} for {n} images; it must return a list with one float (or None) "
            "per image."
        )
    return list(values)


def parse_reward_output(result, name: str, n: int) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """Check one reward's return value: `n` scores (`None` where missing) and its extra per-image values.

    Accepts a list / tuple / tensor / numpy array of `n` floats or `None`, or a mapping with key `"scores"` holding
    those and any other keys holding `n` extra values each (logged as `rewards/<name>/<key>`).

    Raises:
        ValueError: wrong length or a mapping without `"scores"`; TypeError: a value that is not a number.
    """
    extras: dict[str, list[float]] = {}
    if isinstance(result, Mapping):
        if SCORES_KEY not in result:
            raise ValueError(
                f"Reward function {name!r} returned a mapping with keys {sorted(result)} but no {SCORES_KEY!r}: a "
                f"mapping must hold the scores under {SCORES_KEY!r} (other keys are extra values to log)."
            )
        for key, values in result.items():
            if key != SCORES_KEY:
                extras[str(key)] = [
                    _as_float(v, name, f"extra value {key!r}") for v in _as_list(values, name, n, f"values of {key!r}")
                ]
        result = result[SCORES_KEY]
    scores = [_as_float(v, name, "a score") for v in _as_list(result, name, n, "scores")]
    return scores, extras


def _name_reward(err: BaseException, name: str) -> None:
    # A note, not a new message: the reward's own exception (type and text) reaches the caller unchanged, and the
    # traceback names the function that raised it, whichever thread it ran on.
    err.add_note(f"Raised by the reward function {name!r}.")


async def _awaited_naming(awaitable, name: str):
    try:
        return await awaitable
    except Exception as err:
        _name_reward(err, name)
        raise


class RewardCaller:
    """Calls every reward function on a batch and checks what comes back (see the module docstring).

    Args:
        funcs (`list[Callable]`): the reward functions.
        names (`list[str]`): their unique names (`unique_reward_names`).
        non_finite (`str`, defaults to `"error"`): `"error"` raises on a NaN or infinite score; `"missing"` treats
            it as `None` and warns.
    """

    def __init__(self, funcs: Sequence[Callable], names: Sequence[str], non_finite: str = "error"):
        if non_finite not in NON_FINITE_REWARDS:
            raise ValueError(f"non_finite_rewards must be one of {NON_FINITE_REWARDS}, got {non_finite!r}.")
        self.funcs, self.names, self.non_finite = list(funcs), list(names), non_finite
        self._loop = self._thread = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    # ------------------------------------------------------------------ async
    def _run_coroutines(self, awaitables: list) -> list:
        # A daemon thread with its own loop (TRL's `start_event_loop_in_daemon`): `asyncio.run` would fail inside a
        # running loop (notebooks), and the loop is reused across calls so that clients bound to it keep working.
        if self._loop is None:
            self._thread, self._loop, ready = start_event_loop_in_daemon(name="trl_nft-reward-loop")
            ready.wait()
            atexit.register(shutdown_event_loop_in_daemon, self._thread, self._loop)

        async def gather():
            return await asyncio.gather(*awaitables)

        return asyncio.run_coroutine_threadsafe(gather(), self._loop).result()

    def close(self) -> None:
        """Stop the background event loop and the scoring worker thread, if they were started."""
        if self._loop is not None:
            shutdown_event_loop_in_daemon(self._thread, self._loop)
            self._loop = self._thread = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------ overlap
    def schedule(self, asynchronous: bool) -> RewardSchedule:
        """A `RewardSchedule` that scores the chunks of one batch with this caller, in order: on this caller's worker
        thread while the submitting thread goes on (`asynchronous=True`), or inline. Use it as a context manager, so
        that nothing is still scored when the block is left on an error."""
        return RewardSchedule(self, asynchronous)

    def _worker(self) -> concurrent.futures.ThreadPoolExecutor:
        # One worker: a reward is never called concurrently with itself (reward models are rarely thread-safe), and
        # the chunks are scored in submission order.
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="trl_nft-reward")
        return self._executor

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        # Kernels of the default stream run one after another: a reward model's forward on it would wait for the
        # sampler's, so the worker uses a stream of its own.
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    # ------------------------------------------------------------------ call
    def __call__(self, prompts: list[str], images: torch.Tensor, **kwargs) -> RewardOutput:
        """Score a batch: `prompts` (N), `images` `[N, 3, H, W]` in [0, 1], `kwargs` the dataset columns (lists of N)
        plus `trainer_state` and `log_metric`."""
        n = len(prompts)
        results = []
        for f, name in zip(self.funcs, self.names, strict=True):
            try:
                results.append(f(prompts=prompts, images=images, **kwargs))
            except Exception as err:
                for res in results:
                    if inspect.iscoroutine(res):
                        res.close()  # never awaited now: close it instead of leaving a "never awaited" warning
                _name_reward(err, name)
                raise
        pending = [i for i, res in enumerate(results) if inspect.isawaitable(res)]
        if pending:
            awaitables = [_awaited_naming(results[i], self.names[i]) for i in pending]
            for i, res in zip(pending, self._run_coroutines(awaitables), strict=True):
                results[i] = res
        scores = torch.full((n, len(self.funcs)), math.nan)
        extras: dict[str, list[float]] = {}
        for j, (name, res) in enumerate(zip(self.names, results, strict=True)):
            values, extra = parse_reward_output(res, name, n)
            missing = torch.tensor([v is None for v in values], dtype=torch.bool)
            column = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
            bad = (~torch.isfinite(column) & ~missing).nonzero().flatten().tolist()  # float32 overflow counts too
            if bad:
                shown = ", ".join(f"image {i}: {values[i]}" for i in bad[:4]) + (" ..." if len(bad) > 4 else "")
                if self.non_finite == "error":
                    raise ValueError(
                        f"Reward function {name!r} returned {len(bad)} non-finite score(s) for {n} images ({shown}). "
                        "A non-finite reward would turn every trained weight into NaN. Return None for an image that "
                        "cannot be scored, or set non_finite_rewards='missing' to treat such scores as None."
                    )
                logger.warning(
                    f"Reward function {name!r} returned {len(bad)} non-finite score(s) for {n} images ({shown}); "
                    "they are treated as missing (non_finite_rewards='missing')."
                )
                column[bad] = math.nan
            scores[:, j] = column
            for key, vals in extra.items():
                extras[f"{name}/{key}"] = [math.nan if v is None else v for v in vals]
        dead = torch.isnan(scores).all(dim=1)
        if dead.any():
            first = int(dead.nonzero()[0, 0])
            logger.warning(
                f"No reward function scored {int(dead.sum())} of {n} images (every one returned None), e.g. the image "
                f"of prompt {prompts[first]!r}: these images get r = 1/2 (no training signal). Make sure at least one "
                "reward scores every image."
            )
        return RewardOutput(scores=scores, extras=extras)


class RewardSchedule:
    """Scores the chunks of one batch in submission order with a `RewardCaller`, inline or overlapped.

    With `asynchronous=True`, `submit` hands the chunk to the caller's worker thread and returns at once, so that the
    caller samples the next chunk while this one is scored (torch operations release the GIL, so a reward model's
    forward pass runs alongside the sampler's). With `asynchronous=False`, `submit` scores the chunk before returning.
    Either way every chunk goes through `RewardCaller.__call__` with the same arguments, and `results` returns the
    same outputs, replays the same `log_metric` calls and raises the same first error, so the two are
    interchangeable. On a worker the reward sees the submitting thread's grad mode and CUDA device, and (for CUDA
    images) runs on a side stream that waits for the work that produced the images.

    Attributes:
        reward_time (`float`): seconds spent in `RewardCaller.__call__`, summed over the chunks scored.
        wait_time (`float`): seconds the submitting thread spent scoring inline or waiting in `results`: the scoring
            time that sampling did not hide.
    """

    def __init__(self, caller: RewardCaller, asynchronous: bool):
        self.caller, self.asynchronous = caller, asynchronous
        self._jobs: list[tuple[concurrent.futures.Future, list[tuple[str, float]], Callable | None]] = []
        self._stop = False  # set by the first chunk that raised: later chunks are not scored (as inline)
        self.reward_time = 0.0
        self.wait_time = 0.0

    def __enter__(self) -> RewardSchedule:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def submit(self, prompts: list[str], images: torch.Tensor, *, log_metric: Callable | None = None, **kwargs):
        """Score one chunk: `prompts` (N), `images` `[N, 3, H, W]` in [0, 1], `kwargs` the dataset columns (lists of
        N) and `trainer_state`. The reward functions' `log_metric(name, value)` calls are recorded and made on
        `log_metric` by `results`, in the submitting thread."""
        logged: list[tuple[str, float]] = []
        kwargs["log_metric"] = lambda name, value: logged.append((name, value))
        if self.asynchronous:
            grad = torch.is_grad_enabled()
            event = None
            if images.is_cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(images.device))
            future = self.caller._worker().submit(self._score, prompts, images, kwargs, grad, event)
        else:
            start = time.perf_counter()
            future = concurrent.futures.Future()
            try:
                future.set_result(self._score(prompts, images, kwargs))
            except Exception as err:  # raised by `results`, in order, as from the worker
                future.set_exception(err)
            self.wait_time += time.perf_counter() - start
        self._jobs.append((future, logged, log_metric))

    def _score(self, prompts, images, kwargs, grad: bool | None = None, event=None) -> RewardOutput | None:
        if self._stop:
            return None
        start = time.perf_counter()
        try:
            if event is None:
                with torch.set_grad_enabled(grad) if grad is not None else contextlib.nullcontext():
                    return self.caller(prompts, images, **kwargs)
            stream = self.caller._side_stream(images.device)
            with torch.set_grad_enabled(grad), torch.cuda.device(images.device), torch.cuda.stream(stream):
                stream.wait_event(event)
                try:
                    return self.caller(prompts, images, **kwargs)
                finally:
                    # The images' memory may be reused once the submitting thread drops them: finish with them first.
                    stream.synchronize()
        except BaseException:
            self._stop = True
            raise
        finally:
            self.reward_time += time.perf_counter() - start

    @property
    def failed(self) -> bool:
        """Whether a chunk's scoring has already raised (`results` raises it): there is no point sampling on."""
        return any(f.done() and not f.cancelled() and f.exception() is not None for f, _, _ in self._jobs)

    def results(self) -> list[RewardOutput]:
        """Wait for every submitted chunk, in order, make each chunk's recorded `log_metric` calls, and return their
        outputs. Raises the first failing chunk's exception (the reward's own, with its message) and scores nothing
        after it. The schedule is empty afterwards."""
        outputs = []
        start = time.perf_counter()
        try:
            for future, logged, log_metric in self._jobs:
                out = future.result()
                if log_metric is not None:
                    for name, value in logged:
                        log_metric(name, value)
                outputs.append(out)
        finally:
            self.wait_time += time.perf_counter() - start
            self.cancel()
        return outputs

    def cancel(self) -> None:
        """Drop the chunks not scored yet and wait for the one being scored, if any."""
        self._stop = True
        futures = [f for f, _, _ in self._jobs]
        for f in futures:
            f.cancel()
        concurrent.futures.wait(futures)
        self._jobs.clear()
        self._stop = False
