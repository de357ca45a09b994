"""The reward boundary (`trl_nft.rewards.calling`): names, columns, return values, async rewards; no pipeline."""

import asyncio
import functools
import logging
import math

import numpy as np
import pytest
import torch

from trl_nft.rewards import resolve_reward
from trl_nft.rewards.calling import RewardCaller, check_reward_columns, parse_reward_output, unique_reward_names


PROMPTS = ["a", "b", "c", "d"]
IMAGES = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _call(funcs, non_finite="error", **columns):
    caller = RewardCaller(funcs, unique_reward_names(funcs), non_finite)
    try:
        return caller(PROMPTS, IMAGES, **columns, trainer_state=None, log_metric=lambda *a: None)
    finally:
        caller.close()


def score(prompts, images, offset=0.0, **kwargs):
    return [offset + i for i in range(len(prompts))]


class Judge:
    def __call__(self, prompts, images, **kwargs):
        return [1.0] * len(prompts)


def test_names_unwrap_partials_and_suffix_duplicates():
    funcs = [
        functools.partial(score, offset=1.0),
        functools.partial(score, offset=2.0),
        Judge(),
        Judge(),
        "brightness",
    ]
    assert unique_reward_names([resolve_reward(f) for f in funcs]) == [
        "score_1",
        "score_2",
        "Judge_1",
        "Judge_2",
        "brightness",
    ]

    # a suffix never lands on a name that is already taken
    def score_1(prompts, images, **kwargs):
        return [0.0] * len(prompts)

    assert unique_reward_names([score, score, score_1]) == ["score_2", "score_3", "score_1"]


def test_partials_of_one_function_are_scored_and_kept_apart():
    out = _call([functools.partial(score, offset=0.0), functools.partial(score, offset=10.0)])
    assert out.scores[:, 0].tolist() == [0, 1, 2, 3] and out.scores[:, 1].tolist() == [10, 11, 12, 13]


@pytest.mark.parametrize("column", ["prompts", "images", "trainer_state", "log_metric"])
def test_columns_that_shadow_the_call_keywords_are_refused(column):
    with pytest.raises(ValueError, match=rf"train_dataset has column\(s\) \['{column}'\].*rename_column"):
        check_reward_columns(["prompt", column, "tag"], "train_dataset")
    check_reward_columns(["prompt", "tag", "text"], "train_dataset")


def test_return_forms_none_tensor_numpy_and_mapping_with_extras():
    def as_tensor(prompts, images, **kwargs):
        return images.mean(dim=(1, 2, 3))

    def as_numpy(prompts, images, **kwargs):
        return np.arange(len(prompts), dtype=np.float64)

    def with_none(prompts, images, **kwargs):
        return [None, 1.0, None, 2]

    def with_extras(prompts, images, **kwargs):
        return {"scores": [0.5] * 4, "distance": [1, 2, None, 4]}

    out = _call([as_tensor, as_numpy, with_none, with_extras])
    torch.testing.assert_close(out.scores[:, 0], IMAGES.mean(dim=(1, 2, 3)))
    assert out.scores[:, 1].tolist() == [0, 1, 2, 3]
    assert math.isnan(out.scores[0, 2]) and out.scores[1, 2] == 1.0 and math.isnan(out.scores[2, 2])
    assert out.scores[:, 3].tolist() == [0.5] * 4
    assert out.extras["with_extras/distance"][:2] == [1.0, 2.0] and math.isnan(out.extras["with_extras/distance"][2])


@pytest.mark.parametrize(
    "result, error, match",
    [
        ([1.0, 2.0], ValueError, r"'f' returned 2 scores for 4 images"),
        (3.0, ValueError, r"'f' returned a float as scores for 4 images"),
        ("abcd", ValueError, r"'f' returned a str as scores"),
        ([1.0, "x", 2.0, 3.0], TypeError, r"'f' returned str 'x' as a score"),
        ([True, 1.0, 2.0, 3.0], TypeError, r"returned bool True"),
        ({"score": [1, 2, 3, 4]}, ValueError, r"no 'scores'"),
        ({"scores": [1, 2, 3, 4], "extra": [1]}, ValueError, r"returned 1 values of 'extra' for 4 images"),
    ],
)
def test_malformed_return_values_name_the_function(result, error, match):
    with pytest.raises(error, match=match):
        parse_reward_output(result, "f", 4)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), 1e300])
def test_non_finite_scores_are_an_error_naming_the_function(bad):
    def shaky(prompts, images, **kwargs):
        return [0.0, 1.0, bad, 2.0]

    with pytest.raises(
        ValueError,
        match=r"'shaky' returned 1 non-finite score\(s\) for 4 images \(image 2: .*non_finite_rewards='missing'",
    ):
        _call([shaky])


def test_non_finite_scores_can_be_treated_as_missing_with_a_warning(caplog):
    def shaky(prompts, images, **kwargs):
        return [0.0, float("-inf"), float("nan"), 2.0]

    with caplog.at_level(logging.WARNING):
        out = _call([shaky, score], non_finite="missing")
    assert out.scores[0, 0] == 0.0 and out.scores[3, 0] == 2.0
    assert math.isnan(out.scores[1, 0]) and math.isnan(out.scores[2, 0])
    assert "'shaky' returned 2 non-finite score(s)" in caplog.text


def test_rows_that_no_reward_scores_are_warned_about(caplog):
    def none_first(prompts, images, **kwargs):
        return [None, 1.0, 1.0, 1.0]

    def none_first_two(prompts, images, **kwargs):
        return [None, None, 1.0, 1.0]

    with caplog.at_level(logging.WARNING):
        _call([none_first, none_first_two])
    assert "No reward function scored 1 of 4 images" in caplog.text and "'a'" in caplog.text


def test_async_rewards_run_concurrently_even_inside_a_running_event_loop():
    calls = []

    async def slow_a(prompts, images, **kwargs):
        calls.append("a-start")
        await asyncio.sleep(0.05)
        calls.append("a-end")
        return [1.0] * len(prompts)

    async def slow_b(prompts, images, tag, **kwargs):
        calls.append("b-start")
        await asyncio.sleep(0.05)
        calls.append("b-end")
        return [float(len(t)) for t in tag]

    async def notebook_cell():
        # a blocking call from inside a running loop, as `trainer.train()` in a Jupyter cell
        return _call([slow_a, slow_b, score], tag=["x", "yy", "zzz", ""])

    out = asyncio.run(notebook_cell())
    assert out.scores[:, 1].tolist() == [1, 2, 3, 0] and out.scores[:, 0].tolist() == [1] * 4
    assert calls.index("b-start") < calls.index("a-end")  # both awaited together, not one after the other


def test_async_reward_errors_propagate():
    async def broken(prompts, images, **kwargs):
        raise RuntimeError("judge unavailable")

    with pytest.raises(RuntimeError, match="judge unavailable"):
        _call([broken])
