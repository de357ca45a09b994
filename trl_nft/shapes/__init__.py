"""The shapes world: a procedural mini GenEval (prompts, ground-truth renderer) and its programmatic judge.

Importing this package needs only numpy and scipy; `datasets` is imported when `make_dataset` is called, and torch
is never imported here (the tiny pipeline lives in `trl_nft.shapes.tiny`).
"""

from .judge import (
    Detection,
    JudgeResult,
    check_detections,
    classify_shape,
    detect,
    format_table,
    geneval_table,
    parse_prompt,
    score,
    shapes_reward,
    shapes_strict_reward,
)
from .world import (
    COLOUR_NAMES,
    COLOURS,
    RELATIONS,
    SHAPES,
    TAGS,
    VOCABULARY,
    ObjectSpec,
    PromptSpec,
    all_prompts,
    build_prompt,
    heldout_items,
    heldout_prompts,
    make_dataset,
    make_spec,
    prompts_by_tag,
    render,
    sample_training_batch,
    shape_mask,
    train_prompts,
)


__all__ = [
    "COLOURS",
    "COLOUR_NAMES",
    "RELATIONS",
    "SHAPES",
    "TAGS",
    "VOCABULARY",
    "Detection",
    "JudgeResult",
    "ObjectSpec",
    "PromptSpec",
    "all_prompts",
    "build_prompt",
    "check_detections",
    "classify_shape",
    "detect",
    "format_table",
    "geneval_table",
    "heldout_items",
    "heldout_prompts",
    "make_dataset",
    "make_spec",
    "parse_prompt",
    "prompts_by_tag",
    "render",
    "sample_training_batch",
    "score",
    "shape_mask",
    "shapes_reward",
    "shapes_strict_reward",
    "train_prompts",
]
