"""Reward functions: the calling convention, a few built-ins, and name/dotted-path resolution.

A reward function is any callable

    f(prompts: list[str], images: Tensor[B, 3, H, W] in [0, 1], **columns, trainer_state=..., log_metric=...)
        -> list[float | None]

returning one score per image (`None`: no score for that image), or a mapping `{"scores": [...], "<key>": [...]}`
whose other keys are extra per-image values to log. `columns` holds every other dataset column, as lists aligned with
the images. `async def` functions are awaited concurrently on a background event loop. Every return value is checked
by `trl_nft.rewards.calling` (length, type, finiteness).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import import_from_string
from .calling import reward_name, unique_reward_names
from .models import (
    AestheticReward,
    CLIPScoreReward,
    HPSv2Reward,
    OCRReward,
    PickScoreReward,
    RewardModel,
    jpeg_compressibility,
    jpeg_incompressibility,
)


def brightness(prompts, images: torch.Tensor, **kwargs) -> list[float]:
    """Mean pixel value in [0, 1]: a trivially learnable reward for smoke tests and examples."""
    return images.float().flatten(1).mean(dim=1).tolist()


def redness(prompts, images: torch.Tensor, **kwargs) -> list[float]:
    """Mean of `R - (G + B) / 2`, in [-1, 1]: rewards red images."""
    images = images.float()
    return (images[:, 0] - (images[:, 1] + images[:, 2]) / 2).flatten(1).mean(dim=1).tolist()


def _shapes_reward():
    from ..utils import require_shapes_extra

    require_shapes_extra("The 'shapes' reward")
    from ..shapes.judge import shapes_reward

    return shapes_reward


def _shapes_strict_reward():
    from ..utils import require_shapes_extra

    require_shapes_extra("The 'shapes_strict' reward")
    from ..shapes.judge import shapes_strict_reward

    return shapes_strict_reward


#: Built-in rewards by name. Values are callables, zero-argument factories (for rewards with heavy imports) or reward
#: model classes (instantiated by `resolve_reward`, with its keyword arguments; weights load on first call).
BUILTIN_REWARDS: dict[str, Callable] = {
    "brightness": brightness,
    "redness": redness,
    "shapes": _shapes_reward,
    "shapes_strict": _shapes_strict_reward,
    "pickscore": PickScoreReward,
    "clipscore": CLIPScoreReward,
    "hpsv2": HPSv2Reward,
    "aesthetic": AestheticReward,
    "ocr": OCRReward,
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
}
_FACTORIES = {"shapes", "shapes_strict"}


def resolve_reward(spec: str | Callable, **kwargs) -> Callable:
    """A reward callable from a callable, a built-in name (see `BUILTIN_REWARDS`) or a dotted path `module:func`.

    `kwargs` go to a built-in reward model's class (e.g. `resolve_reward("pickscore", model="path/to/PickScore")`)
    or to a dotted path that names a class; they are refused for plain functions.
    """
    if callable(spec) and not isinstance(spec, type):
        if kwargs:
            raise ValueError(f"Reward arguments {sorted(kwargs)} given with an already built reward {spec!r}.")
        return spec
    if isinstance(spec, type):
        return spec(**kwargs)
    if not isinstance(spec, str):
        raise TypeError(f"A reward function must be a callable or a string, got {type(spec).__name__}.")
    if spec in BUILTIN_REWARDS:
        entry = BUILTIN_REWARDS[spec]
        if spec in _FACTORIES:
            entry = entry()
        if isinstance(entry, type):
            return entry(**kwargs)
        if kwargs:
            raise ValueError(f"The built-in reward {spec!r} takes no arguments, got {sorted(kwargs)}.")
        return entry
    if ":" in spec or "." in spec:
        func = import_from_string(spec)
        if isinstance(func, type):
            return func(**kwargs)
        if not callable(func):
            raise TypeError(f"Reward {spec!r} is not callable.")
        if kwargs:
            raise ValueError(f"Reward {spec!r} is a function; it takes no construction arguments {sorted(kwargs)}.")
        return func
    raise ValueError(
        f"Unknown reward {spec!r}. Use a built-in name ({sorted(BUILTIN_REWARDS)}), a dotted path "
        "'my_module:my_reward', or pass a callable."
    )


def __getattr__(name: str):
    # The HTTP client is imported on first use: importing trl_nft.rewards stays cheap.
    if name in ("RemoteReward", "RemoteRewardError"):
        from . import remote

        return getattr(remote, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUILTIN_REWARDS",
    "AestheticReward",
    "CLIPScoreReward",
    "HPSv2Reward",
    "OCRReward",
    "PickScoreReward",
    "RewardModel",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "RemoteReward",
    "RemoteRewardError",
    "brightness",
    "redness",
    "resolve_reward",
    "reward_name",
    "unique_reward_names",
]
