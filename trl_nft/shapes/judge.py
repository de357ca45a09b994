"""A programmatic GenEval-style judge for the shapes world: detector, prompt parser, scores, reward and table.

The judge reads the prompt string alone (no dataset metadata), so it can serve as an RL reward on any batch of
prompts. Images at RL time come out of a small VAE, hence the tolerant detector: colours snap to the nearest palette
entry only when close, blurred rims fall to background, and shapes are read from each blob's 50% contour against
white with coarse features (fill, centroid height, corner patches). It reads ground truth at 100% and keeps doing
so under Gaussian blur up to sigma ~1 px plus colour noise.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

from .world import (
    BACKGROUND,
    COLOUR_NAMES,
    COLOURS,
    NUMBER_WORDS,
    RELATION_PHRASES,
    SHAPES,
    TAGS,
    ObjectSpec,
    PromptSpec,
    make_spec,
)


# Detector calibration (32 px images).
COLOUR_THRESHOLD = 110.0  # RGB distance to the nearest palette entry; farther pixels are background
MIN_AREA = 8  # smaller blobs are VAE speckle, not objects
SHAPE_ALPHA = 0.5  # shapes are read from the 50% contour between white and the object's colour
SHAPE_RESIDUAL = 60.0  # RGB distance off the white-to-colour line beyond which a pixel is not a blend of the two
RELATION_MARGIN = 2.0  # px by which centres must differ along a relation's axis

_PALETTE = np.array([BACKGROUND, *(COLOURS[c] for c in COLOUR_NAMES)], dtype=np.float32)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_WHITE = np.array(BACKGROUND, dtype=np.float32)
_TOWARDS = _PALETTE[1:] - _WHITE  # (n_colours, 3): direction from white to each colour


@dataclass(frozen=True)
class Detection:
    """One detected object. `cx`, `cy` are centroid coordinates in pixels (x right, y down; pixel centres at +0.5)."""

    colour: str
    shape: str
    cx: float
    cy: float
    area: int
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 (exclusive)


@dataclass(frozen=True)
class JudgeResult:
    """`partial`: fraction of checks met (the dense reward); `strict`: all met (GenEval's accuracy)."""

    partial: float
    strict: bool
    checks: dict[str, bool] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# Prompt parsing
# ----------------------------------------------------------------------------------------------------------------------

_WORD_TO_NUMBER = {word: n for n, word in NUMBER_WORDS.items()}
_PLURALS = {shape + "s": shape for shape in SHAPES}
_RELATION_WORDS = {tuple(phrase.split()): rel for rel, phrase in RELATION_PHRASES.items()}


def _parse_object(words: Sequence[str], prompt: str) -> ObjectSpec:
    if len(words) not in (2, 3):
        raise ValueError(f"Cannot parse prompt {prompt!r}: bad object phrase {' '.join(words)!r}.")
    head, noun = words[0], words[-1]
    colour = words[1] if len(words) == 3 else None
    if colour is not None and colour not in COLOURS:
        raise ValueError(f"Cannot parse prompt {prompt!r}: unknown colour {colour!r}.")
    if head == "a" and noun in SHAPES:
        return ObjectSpec(noun, colour, 1)
    if head in _WORD_TO_NUMBER and noun in _PLURALS:
        return ObjectSpec(_PLURALS[noun], colour, _WORD_TO_NUMBER[head])
    raise ValueError(f"Cannot parse prompt {prompt!r}: bad object phrase {' '.join(words)!r}.")


def _overlapping(a: ObjectSpec, b: ObjectSpec) -> bool:
    """Whether one concrete object could match both groups, which would make the scene ambiguous to count."""
    return a.shape == b.shape and (a.colour is None or b.colour is None or a.colour == b.colour)


@lru_cache(maxsize=4096)
def parse_prompt(prompt: str) -> PromptSpec:
    """Recover a prompt's structure and tag family from its text (case and extra whitespace are ignored).

    Accepts the world's grammar, slightly widened (e.g. position prompts without colours), as long as the named
    objects cannot be confused with one another. Raises `ValueError` naming the prompt otherwise.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"Cannot parse prompt {prompt!r}: not a string.")
    words = prompt.lower().strip().rstrip(".").split()
    relation: str | None = None
    parts: list[list[str]] = [words]
    for phrase_words, rel in _RELATION_WORDS.items():
        n = len(phrase_words)
        hits = [i for i in range(len(words) - n + 1) if tuple(words[i : i + n]) == phrase_words]
        if hits:
            if relation is not None or len(hits) > 1:
                raise ValueError(f"Cannot parse prompt {prompt!r}: more than one relation.")
            relation, i = rel, hits[0]
            parts = [words[:i], words[i + n :]]
    if relation is None and "and" in words:
        i = words.index("and")
        parts = [words[:i], words[i + 1 :]]
    if any("and" in part for part in parts) or len(parts) > 2:
        raise ValueError(f"Cannot parse prompt {prompt!r}: at most two object phrases are supported.")
    objects = tuple(_parse_object(part, prompt) for part in parts)

    if len(objects) == 1:
        obj = objects[0]
        tag = "counting" if obj.count > 1 else ("colors" if obj.colour is not None else "single_object")
    else:
        a, b = objects
        if a.count != 1 or b.count != 1:
            raise ValueError(f"Cannot parse prompt {prompt!r}: counts are only supported alone.")
        if _overlapping(a, b):
            raise ValueError(f"Cannot parse prompt {prompt!r}: the two objects are indistinguishable.")
        if relation is not None:
            tag = "position"
        elif a.colour is None and b.colour is None:
            tag = "two_object"
        elif a.colour is not None and b.colour is not None:
            tag = "color_attr"
        else:
            raise ValueError(f"Cannot parse prompt {prompt!r}: colour either both objects or neither.")
    return make_spec(tag, objects, relation)


# ----------------------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------------------


def _as_uint8_hwc(image: Any) -> np.ndarray:
    """Accept uint8 HWC arrays (the contract) and, leniently, float [0,1] HWC arrays or PIL images."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"Expected an HxWx3 image, got shape {array.shape}.")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return array


def classify_shape(mask: np.ndarray) -> str:
    """Name the shape of one blob cropped to its bounding box.

    Triangles (upright) put their mass low and fill their bottom corners only; squares fill their 2x2 corner patches
    (on average, so one noisy corner does not demote a square) and nearly the whole box; the rest are circles.
    """
    h = mask.shape[0]
    fill = float(mask.mean())
    cy_rel = (float(np.nonzero(mask)[0].mean()) + 0.5) / h
    c = 2
    top = (float(mask[:c, :c].mean()) + float(mask[:c, -c:].mean())) / 2
    bottom = (float(mask[-c:, :c].mean()) + float(mask[-c:, -c:].mean())) / 2
    if (cy_rel > 0.56 and fill < 0.8) or bottom - top > 0.5:
        return "triangle"
    if (top + bottom) / 2 > 0.6 and fill > 0.88:
        return "square"
    return "circle"


def quantise(image: Any) -> np.ndarray:
    """Per-pixel palette index: 0 = background, k = `COLOUR_NAMES[k-1]`. Pixels far from every entry are background."""
    return _quantise(_as_uint8_hwc(image).astype(np.float32))


def _quantise(array: np.ndarray) -> np.ndarray:
    dist2 = ((array[:, :, None, :] - _PALETTE[None, None, :, :]) ** 2).sum(-1)
    index = dist2.argmin(-1)
    index[dist2.min(-1) > COLOUR_THRESHOLD**2] = 0
    return index


def _blend_alpha(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How far each pixel lies along the white-to-colour line of every colour, and how far off that line.

    A blurred edge blends the object's colour with white; its 50% point sits on the true edge whatever the blur, so
    shapes read from `alpha >= 0.5` keep their corners where the thresholded palette mask has already eaten them.
    Returns (alpha, residual), each (H, W, n_colours).
    """
    offset = array[:, :, None, :] - _WHITE
    alpha = (offset * _TOWARDS).sum(-1) / (_TOWARDS**2).sum(-1)
    residual = np.linalg.norm(offset - alpha[..., None] * _TOWARDS, axis=-1)
    return alpha, residual


def _shape_support(core: np.ndarray, k: int, index: np.ndarray, alpha: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """The blob's 50%-contour mask, cropped to its bounding box, grown from the thresholded `core` mask."""
    ys, xs = np.nonzero(core)
    h, w = index.shape
    y0, y1 = max(int(ys.min()) - 2, 0), min(int(ys.max()) + 3, h)
    x0, x1 = max(int(xs.min()) - 2, 0), min(int(xs.max()) + 3, w)
    window = (slice(y0, y1), slice(x0, x1))
    own = (index[window] == 0) | (index[window] == k)  # never take pixels of another colour's object
    support = (alpha[window][..., k - 1] >= SHAPE_ALPHA) & (residual[window][..., k - 1] <= SHAPE_RESIDUAL) & own
    support |= core[window]
    labels, _ = ndimage.label(support, structure=_EIGHT_CONNECTED)
    keep = np.unique(labels[core[window]])
    support = np.isin(labels, keep[keep > 0])
    ys, xs = np.nonzero(support)
    return support[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def detect(image: Any) -> list[Detection]:
    """Find the flat-coloured objects in an HxWx3 uint8 image.

    Objects are 8-connected blobs of one palette colour (nearest entry within `COLOUR_THRESHOLD`, white included) of
    at least `MIN_AREA` pixels; their shape is read from the blur-tolerant 50% contour (see `_blend_alpha`).
    """
    array = _as_uint8_hwc(image).astype(np.float32)
    index = _quantise(array)
    alpha, residual = _blend_alpha(array)
    detections: list[Detection] = []
    for k, colour in enumerate(COLOUR_NAMES, start=1):
        labels, n = ndimage.label(index == k, structure=_EIGHT_CONNECTED)
        if n == 0:
            continue
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            core = labels == label
            area = int(core[box].sum())
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(core[box])
            y0, x0 = box[0].start, box[1].start
            detections.append(
                Detection(
                    colour=colour,
                    shape=classify_shape(_shape_support(core, k, index, alpha, residual)),
                    cx=float(xs.mean()) + x0 + 0.5,
                    cy=float(ys.mean()) + y0 + 0.5,
                    area=area,
                    bbox=(x0, y0, box[1].stop, box[0].stop),
                )
            )
    return detections


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


def _matches(obj: ObjectSpec, det: Detection) -> bool:
    return obj.matches(det.shape, det.colour)


def _relation_holds(a: Detection, b: Detection, relation: str, margin: float = RELATION_MARGIN) -> bool:
    if relation == "left":
        return a.cx + margin < b.cx
    if relation == "right":
        return a.cx > b.cx + margin
    if relation == "above":
        return a.cy + margin < b.cy
    if relation == "below":
        return a.cy > b.cy + margin
    raise ValueError(f"Unknown relation {relation!r}.")


def check_detections(spec: PromptSpec, detections: Sequence[Detection]) -> dict[str, bool]:
    """The prompt's constraints evaluated on detections.

    Per named object: `shape` (that shape is there, any colour; only when a colour is named, so a wrong colour still
    earns partial credit), `object` (there with the named colour: the colour binding), `count` (exactly that many,
    counting prompts only). Then `relation` for position prompts, and always `no_extra`: nothing but the named objects
    in the named numbers (GenEval-strict exact-scene reading).
    """
    checks: dict[str, bool] = {}
    matched = [[d for d in detections if _matches(obj, d)] for obj in spec.objects]
    for i, (obj, found) in enumerate(zip(spec.objects, matched, strict=True)):
        suffix = "" if len(spec.objects) == 1 else f"_{i + 1}"
        if obj.colour is not None:
            checks[f"shape{suffix}"] = any(d.shape == obj.shape for d in detections)
        checks[f"object{suffix}"] = len(found) >= 1
        if obj.count > 1:
            checks[f"count{suffix}"] = len(found) == obj.count
    if spec.relation is not None:
        checks["relation"] = any(
            _relation_holds(a, b, spec.relation) for a, b in itertools.product(matched[0], matched[1])
        )
    accounted = all(any(_matches(obj, d) for obj in spec.objects) for d in detections)
    checks["no_extra"] = accounted and all(
        len(found) <= obj.count for obj, found in zip(spec.objects, matched, strict=True)
    )
    return checks


def score(spec_or_prompt: PromptSpec | str, image: Any) -> JudgeResult:
    """Judge one HxWx3 uint8 image against a prompt (string or `PromptSpec`)."""
    spec = parse_prompt(spec_or_prompt) if isinstance(spec_or_prompt, str) else spec_or_prompt
    checks = check_detections(spec, detect(image))
    met = sum(checks.values())
    return JudgeResult(partial=met / len(checks), strict=met == len(checks), checks=checks)


def _batch_to_uint8(images: Any) -> list[np.ndarray]:
    """Torch [B,3,H,W] float in [0,1] (the contract) or a sequence of HWC arrays / PIL images, to uint8 HWC arrays."""
    if hasattr(images, "detach"):  # a torch.Tensor, without importing torch at module import
        tensor = images.detach().float().clamp(0, 1).mul(255).round().to("cpu")
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ValueError(f"Expected images of shape [B, 3, H, W], got {tuple(tensor.shape)}.")
        array = tensor.permute(0, 2, 3, 1).numpy().astype(np.uint8)
        return list(array)
    return [_as_uint8_hwc(image) for image in images]


def _score_batch(prompts: Sequence[str], images: Any) -> list[JudgeResult]:
    arrays = _batch_to_uint8(images)
    if len(arrays) != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts for {len(arrays)} images.")
    return [score(prompt, image) for prompt, image in zip(prompts, arrays, strict=True)]


def shapes_reward(prompts: Sequence[str], images: Any, **kwargs: Any) -> list[float]:
    """RL reward: the judge's partial score of each image against its prompt, in [0, 1].

    Extra keyword arguments (other dataset columns, `trainer_state`, ...) are accepted and ignored, so the function
    plugs into trainers that pass everything they have.
    """
    return [float(result.partial) for result in _score_batch(prompts, images)]


shapes_reward.__name__ = "shapes_reward"


def shapes_strict_reward(prompts: Sequence[str], images: Any, **kwargs: Any) -> list[float]:
    """RL reward: 1.0 when an image meets every constraint of its prompt (GenEval's strict rule), else 0.0.

    Sparse on its own; meant as a second reward beside `shapes_reward`, to favour fully correct images over ones that
    meet most constraints.
    """
    return [float(result.strict) for result in _score_batch(prompts, images)]


# ----------------------------------------------------------------------------------------------------------------------
# GenEval-style summary
# ----------------------------------------------------------------------------------------------------------------------


def geneval_table(results: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """Strict accuracy per tag and `overall` = mean of the per-tag accuracies (GenEval's rule, not per-item).

    Tags appear in `TAGS` order, then any unknown tags alphabetically; tags with no results are omitted.
    """
    totals: dict[str, list[int]] = {}
    for tag, strict in results:
        hits = totals.setdefault(tag, [0, 0])
        hits[0] += int(bool(strict))
        hits[1] += 1
    order = [t for t in TAGS if t in totals] + sorted(t for t in totals if t not in TAGS)
    table = {tag: totals[tag][0] / totals[tag][1] for tag in order}
    table["overall"] = float(np.mean(list(table.values()))) if table else float("nan")
    return table


def format_table(table: Mapping[str, float]) -> str:
    """An aligned two-column text table of a `geneval_table` result, `overall` last after a rule."""
    rows = [(tag, acc) for tag, acc in table.items() if tag != "overall"]
    width = max([len("overall"), len("tag"), *(len(tag) for tag, _ in rows)])
    lines = [f"{'tag':<{width}}  accuracy", f"{'-' * width}  --------"]
    lines += [f"{tag:<{width}}  {acc:8.4f}" for tag, acc in rows]
    if "overall" in table:
        lines += [f"{'-' * width}  --------", f"{'overall':<{width}}  {table['overall']:8.4f}"]
    return "\n".join(lines)
