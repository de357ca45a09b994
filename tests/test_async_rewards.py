"""Asynchronous reward scoring (`async_reward_computation`): each sampling chunk is scored on a worker thread while the
next one is sampled, with the same results as scoring inline (issue 15). Performance: benchmarks/async_rewards.py."""

import asyncio
import math
import threading
import traceback

import pytest
import torch
from conftest import PROMPTS, tiny_config

from trl_nft.rewards.calling import RewardCaller


CHUNK = 4  # per_device_train_batch_size: a rollout batch of 12 images is sampled in 3 chunks
TIMING = {"reward_time", "reward_wait_time", "step_time", "samples/images_per_second"}


def _config(tmp_path, **overrides):
    kwargs = dict(per_device_train_batch_size=CHUNK, per_device_eval_batch_size=2, steps_per_generation=3, max_steps=3)
    kwargs.update(overrides)
    return tiny_config(tmp_path, **kwargs)


def _without_timing(logs: dict) -> dict:
    return {
        k: v
        for k, v in logs.items()
        if k.split("eval_")[-1] not in TIMING and not k.endswith(("_runtime", "per_second"))
    }


def _run(pipe, tmp_path, asynchronous: bool):
    """Train one rollout batch (3 chunks, 3 optimizer steps) and evaluate, recording what the rewards saw."""
    from trl_nft import DiffusionNFTTrainer

    calls = []

    def bright(prompts, images, trainer_state, log_metric, **kwargs):
        # reductions over many elements: their result depends on the thread count, which the worker must share
        values = images.mean(dim=(1, 2, 3))
        calls.append((threading.current_thread().name, list(prompts), torch.is_grad_enabled()))
        log_metric("bright/chunk_max", values.max().item())
        return {"scores": values, "red": images[:, 0].mean(dim=(1, 2)).tolist()}

    async def contrast(prompts, images, tag, **kwargs):
        await asyncio.sleep(0)
        std = images.flatten(1).std(dim=1).tolist()
        return [None if i == 1 else s for i, s in enumerate(std)]  # a missing score in every chunk

    def heldout(prompts, images, **kwargs):
        return images[:, 2].mean(dim=(1, 2)).tolist()

    dataset = [{"prompt": p, "tag": f"t{i}"} for i, p in enumerate(PROMPTS)]
    trainer = DiffusionNFTTrainer(
        pipe,
        [bright, contrast],
        args=_config(tmp_path / str(asynchronous), async_reward_computation=asynchronous, reward_weights=[1.0, 2.0]),
        train_dataset=dataset,
        eval_dataset=dataset[:5],
        eval_reward_funcs=[heldout],
    )
    rollouts = []
    generate = trainer._generate_and_score

    def recording(rows):
        batch = generate(rows)
        rollouts.append({k: v.clone() if torch.is_tensor(v) else list(v) for k, v in batch.items()})
        return batch

    trainer._generate_and_score = recording
    trainer.train()
    metrics = trainer.evaluate()
    weights = [p.detach().clone() for p in trainer._trainable]
    return trainer, calls, rollouts, metrics, weights


def test_async_scoring_gives_bitwise_the_same_run_as_inline_scoring(tmp_path):
    from trl_nft.shapes import VOCABULARY
    from trl_nft.shapes.tiny import build_tiny_sd3_pipeline

    runs = {a: _run(build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0), tmp_path, a) for a in (False, True)}
    (sync, sync_calls, sync_rollouts, sync_eval, sync_weights) = runs[False]
    (asyn, async_calls, async_rollouts, async_eval, async_weights) = runs[True]

    # the same calls, one per chunk, in order, with the same inputs and grad mode; only the thread differs
    assert [c[1:] for c in sync_calls] == [c[1:] for c in async_calls]
    assert [len(c[1]) for c in sync_calls[:3]] == [CHUNK] * 3  # 3 training chunks, then 3 evaluation batches (2+2+1)
    assert [len(c[1]) for c in sync_calls[3:]] == [2, 2, 1]
    assert not any(grad for _, _, grad in sync_calls)  # rewards run under no_grad on either path
    assert {c[0] for c in sync_calls} == {threading.main_thread().name}
    assert all(c[0].startswith("trl_nft-reward") for c in async_calls)

    # identical rollouts (latents, optimality probabilities, order), logged metrics, evaluation and adapters
    assert len(sync_rollouts) == len(async_rollouts) == 1
    for key in ("x0", "r"):
        assert torch.equal(sync_rollouts[0][key], async_rollouts[0][key])
    assert sync_rollouts[0]["prompts"] == async_rollouts[0]["prompts"]
    sync_logs = [_without_timing(x) for x in sync.state.log_history]
    async_logs = [_without_timing(x) for x in asyn.state.log_history]
    assert sync_logs == async_logs
    assert "rewards/bright/red" in sync_logs[0] and "bright/chunk_max" in sync_logs[0]
    assert sync_logs[0]["rewards/contrast/frac_missing"] == pytest.approx(3 / 12)
    assert _without_timing(sync_eval) == _without_timing(async_eval)
    assert "eval_heldout/heldout/mean" in sync_eval and "eval_rewards/bright/red" in sync_eval
    assert all(torch.equal(a, b) for a, b in zip(sync_weights, async_weights, strict=True))

    # the time spent scoring and waiting is logged; inline, all scoring is waited for
    first = sync.state.log_history[0]
    assert first["reward_time"] > 0 and first["reward_wait_time"] >= first["reward_time"]
    assert asyn.state.log_history[0]["reward_time"] > 0


def _bad_then_good(kind):
    calls = []

    def shaky(prompts, images, **kwargs):
        calls.append(len(prompts))
        if kind == "nan":
            return [float("nan")] + [0.5] * (len(prompts) - 1)
        raise RuntimeError("judge exploded")

    return shaky, calls


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize(
    "kind, error, match",
    [
        ("nan", ValueError, r"Reward function 'shaky' returned 1 non-finite score\(s\) for 4 images"),
        ("raise", RuntimeError, r"judge exploded"),
    ],
)
def test_a_reward_raising_on_the_worker_surfaces_in_the_main_thread_named_and_before_any_update(
    tiny_pipe, tmp_path, asynchronous, kind, error, match
):
    from trl_nft import DiffusionNFTTrainer

    shaky, calls = _bad_then_good(kind)
    trainer = DiffusionNFTTrainer(
        tiny_pipe,
        [shaky],
        args=_config(tmp_path, async_reward_computation=asynchronous),
        train_dataset=[{"prompt": p} for p in PROMPTS],
    )
    before = [p.detach().clone() for p in trainer._trainable]
    with pytest.raises(error, match=match) as info:
        trainer.train()
    err = info.value
    if kind == "raise":
        # the reward's own exception, with a note and a traceback that name the function, whichever thread ran it
        assert str(err) == "judge exploded" and err.__notes__ == ["Raised by the reward function 'shaky'."]
        assert "shaky" in [frame.name for frame in traceback.extract_tb(err.__traceback__)]
    assert calls == [CHUNK]  # no chunk is scored after the one that failed, on either path
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer._trainable, strict=True))


def test_chunk_i_is_scored_while_chunk_i_plus_1_is_sampled(tiny_pipe, tmp_path):
    """The reward of chunk i and the sampling of chunk i+1 wait for each other to start: inline scoring could never
    satisfy both (each wait would time out); with the worker both start and the recorded events interleave."""
    from trl_nft import DiffusionNFTTrainer

    events, timed_out = [], []
    sampling_started = [threading.Event() for _ in range(3)]
    scoring_started = [threading.Event() for _ in range(3)]
    lock = threading.Lock()

    def record(event):
        with lock:
            events.append(event)

    def wait(flag: threading.Event, what: str):
        if not flag.wait(timeout=30):
            timed_out.append(what)

    def slow_judge(prompts, images, **kwargs):
        i = sum(e[0] == "score-start" for e in events)
        record(("score-start", i, threading.current_thread().name))
        scoring_started[i].set()
        if i + 1 < 3:
            wait(sampling_started[i + 1], f"sampling of chunk {i + 1}")
        record(("score-end", i, threading.current_thread().name))
        return images.mean(dim=(1, 2, 3)).tolist()

    class Recording(DiffusionNFTTrainer):
        def _sample_latents(self, prompts, **kwargs):
            i = sum(e[0] == "sample-start" for e in events)
            record(("sample-start", i, threading.current_thread().name))
            sampling_started[i].set()
            if i > 0:
                wait(scoring_started[i - 1], f"scoring of chunk {i - 1}")
            out = super()._sample_latents(prompts, **kwargs)
            record(("sample-end", i, threading.current_thread().name))
            return out

    trainer = Recording(
        tiny_pipe, slow_judge, args=_config(tmp_path, max_steps=1), train_dataset=[{"prompt": p} for p in PROMPTS]
    )
    trainer.train()
    assert not timed_out
    order = [e[:2] for e in events]
    for i in range(2):
        # chunk i is scored from before chunk i+1's sampling ends until after it starts: they overlap
        assert order.index(("score-start", i)) < order.index(("sample-end", i + 1))
        assert order.index(("sample-start", i + 1)) < order.index(("score-end", i))
        assert order.index(("sample-end", i)) < order.index(("score-start", i))  # scored once sampled
    assert {name for kind, _, name in events if kind.startswith("sample")} == {threading.main_thread().name}
    assert {name for kind, _, name in events if kind.startswith("score")} == {"trl_nft-reward_0"}
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_schedule_replays_metrics_in_order_and_stops_after_the_first_failure():
    """`RewardSchedule` without a pipeline: inline and worker give the same outputs, `log_metric` calls (made in the
    submitting thread) and first error; chunks after a failure are never scored."""
    seen = []

    def judge(prompts, images, log_metric, **kwargs):
        seen.append(prompts[0])
        log_metric("first", float(prompts[0]))
        if prompts[0] == "2":
            raise KeyError("chunk 2")
        return [float(p) for p in prompts]

    images = torch.rand(2, 3, 4, 4)
    caller = RewardCaller([judge], ["judge"])
    try:
        outcomes = {}
        for asynchronous in (False, True):
            seen.clear()
            logged = []

            def log(name, value, logged=logged):
                logged.append((name, value))

            with caller.schedule(asynchronous) as scoring:
                for start in range(0, 2):
                    scoring.submit([str(start)] * 2, images, log_metric=log)
                outputs = scoring.results()
                assert scoring.reward_time > 0 and scoring.wait_time >= 0
                for start in range(0, 5):
                    scoring.submit([str(start)] * 2, images, log_metric=log)
                with pytest.raises(KeyError, match="chunk 2") as info:
                    scoring.results()
                assert scoring.failed is False  # emptied by results()
            outcomes[asynchronous] = ([o.scores.tolist() for o in outputs], logged, list(seen), info.value.__notes__)
        assert outcomes[False] == outcomes[True]
        scores, logged, seen_calls, notes = outcomes[True]
        assert scores == [[[0.0], [0.0]], [[1.0], [1.0]]]
        assert logged == [("first", 0.0), ("first", 1.0), ("first", 0.0), ("first", 1.0)]  # chunks 0, 1 of each
        assert seen_calls == ["0", "1", "0", "1", "2"]  # chunks 3 and 4 never scored
        assert notes == ["Raised by the reward function 'judge'."]
    finally:
        caller.close()
