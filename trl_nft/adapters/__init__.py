"""Per-family pipeline adapters and pipeline loading."""

from __future__ import annotations

import json
import os

from .base import PipelineAdapter
from .sd3 import SD3Adapter


ADAPTERS: tuple[type[PipelineAdapter], ...] = (SD3Adapter,)


def get_adapter(pipeline) -> PipelineAdapter:
    """The adapter for `pipeline`'s family, chosen by pipeline class name."""
    name = type(pipeline).__name__
    for adapter_cls in ADAPTERS:
        if name in adapter_cls.pipeline_classes:
            return adapter_cls(pipeline)
    supported = sorted(c for a in ADAPTERS for c in a.pipeline_classes)
    raise ValueError(f"No DiffusionNFT adapter for pipeline class {name!r}. Supported pipelines: {supported}.")


def null_components(name_or_path: str | None) -> list[str]:
    """Components a local pipeline was saved without (`[null, null]` in its `model_index.json`)."""
    index_file = os.path.join(name_or_path or "", "model_index.json")
    if not os.path.isfile(index_file):
        return []
    with open(index_file) as f:
        index = json.load(f)
    return [key for key, value in index.items() if isinstance(value, list) and value == [None, None]]


def load_pipeline(name_or_path: str, **kwargs):
    """`DiffusionPipeline.from_pretrained`, also for local pipelines saved without some required components.

    A pipeline saved with, e.g., `text_encoder_3=None` records `[null, null]` in `model_index.json`, which
    `from_pretrained` refuses for non-optional components unless they are passed as `None`; this does that.
    """
    from diffusers import DiffusionPipeline

    for key in null_components(name_or_path):
        kwargs.setdefault(key, None)
    pipe = DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["ADAPTERS", "PipelineAdapter", "SD3Adapter", "get_adapter", "load_pipeline", "null_components"]
