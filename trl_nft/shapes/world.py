"""A procedural compositional world: a mini GenEval of flat-coloured shapes on a white background.

Everything here is deterministic and version-stable on purpose: the train/held-out split and the held-out evaluation
items are derived from SHA-256 digests rather than `hash()` or a NumPy stream, so a number reported today can be
compared with one reported on another machine or Python version. The renderer draws *ground truth*: every image it
makes is one the judge (`trl_nft.shapes.judge`) must accept for the prompt it was drawn for.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Literal

import numpy as np


if TYPE_CHECKING:
    import datasets


# Pure, mutually distant colours, so nearest-palette classification survives VAE blur and colour noise.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 30),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
RELATION_PHRASES: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
COUNTS: tuple[int, ...] = tuple(NUMBER_WORDS)

IMAGE_SIZE = 32
# Geometry at IMAGE_SIZE; `render` scales it for larger canvases.
MIN_SHAPE, MAX_SHAPE = 8, 11
MIN_GAP = 2  # between bounding boxes, so same-coloured objects never touch, even after a little blur
BORDER = 1  # keeps objects off the edge so blur never clips them
MIN_RELATION_OFFSET = 7  # centres differ by > 6 px along a relation's axis: unambiguous even to a 2 px-margin judge

HELDOUT_FRACTION = 0.25
_SPLIT_SALT = "trl_nft.shapes.split.v1"

Split = Literal["all", "train", "heldout"]


@dataclass(frozen=True)
class ObjectSpec:
    """One named object group of a prompt: a shape, an optional colour (None = any) and how many of them."""

    shape: str
    colour: str | None = None
    count: int = 1

    def phrase(self) -> str:
        words = [NUMBER_WORDS[self.count] if self.count > 1 else "a"]
        if self.colour is not None:
            words.append(self.colour)
        words.append(self.shape + ("s" if self.count > 1 else ""))
        return " ".join(words)

    def matches(self, shape: str, colour: str) -> bool:
        """Whether one concrete object (shape, colour) is an instance of this group."""
        return shape == self.shape and (self.colour is None or colour == self.colour)


@dataclass(frozen=True)
class PromptSpec:
    """A prompt together with its structured meaning.

    `relation` (for `position` prompts) says where `objects[0]` lies relative to `objects[1]`:
    "left" reads "objects[0] is to the left of objects[1]". Image y grows downwards, so "above" means a smaller y.
    """

    tag: str
    prompt: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


def build_prompt(objects: tuple[ObjectSpec, ...], relation: str | None = None) -> str:
    """The canonical English prompt for a structure; `judge.parse_prompt` is its inverse."""
    if relation is not None:
        if len(objects) != 2:
            raise ValueError("A relation needs exactly two objects.")
        return f"{objects[0].phrase()} {RELATION_PHRASES[relation]} {objects[1].phrase()}"
    return " and ".join(obj.phrase() for obj in objects)


def make_spec(tag: str, objects: tuple[ObjectSpec, ...] | list[ObjectSpec], relation: str | None = None) -> PromptSpec:
    """Build a `PromptSpec` whose prompt string is derived from its structure, so the two can never disagree."""
    objects = tuple(objects)
    return PromptSpec(tag=tag, prompt=build_prompt(objects, relation), objects=objects, relation=relation)


_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def _family(tag: str) -> list[tuple[str, PromptSpec]]:
    """All prompts of one family, each with a group key.

    Prompts that describe the same scene ("A and B" / "B and A", "A left of B" / "B right of A") share a key and are
    always split together, so a held-out prompt is a genuinely unseen composition, not a paraphrase of a train one.
    """
    out: list[tuple[str, PromptSpec]] = []
    coloured = [ObjectSpec(s, c) for c in COLOUR_NAMES for s in SHAPES]
    if tag == "single_object":
        for shape in SHAPES:
            spec = make_spec(tag, (ObjectSpec(shape),))
            out.append((spec.prompt, spec))
    elif tag == "two_object":
        for a, b in itertools.permutations(SHAPES, 2):
            spec = make_spec(tag, (ObjectSpec(a), ObjectSpec(b)))
            out.append(("+".join(sorted((a, b))), spec))
    elif tag == "counting":
        for shape, count, colour in itertools.product(SHAPES, COUNTS, (None, *COLOUR_NAMES)):
            spec = make_spec(tag, (ObjectSpec(shape, colour, count),))
            out.append((spec.prompt, spec))
    elif tag == "colors":
        for obj in coloured:
            spec = make_spec(tag, (obj,))
            out.append((spec.prompt, spec))
    elif tag == "position":
        for a, b in itertools.permutations(coloured, 2):
            for rel in RELATIONS:
                spec = make_spec(tag, (a, b), rel)
                if rel in ("left", "above"):
                    key = f"{a.phrase()}|{rel}|{b.phrase()}"
                else:
                    key = f"{b.phrase()}|{_OPPOSITE[rel]}|{a.phrase()}"
                out.append((key, spec))
    elif tag == "color_attr":
        for a, b in itertools.permutations(coloured, 2):
            if a.shape != b.shape and a.colour != b.colour:
                spec = make_spec(tag, (a, b))
                out.append(("+".join(sorted((a.phrase(), b.phrase()))), spec))
    else:
        raise ValueError(f"Unknown tag {tag!r}; expected one of {TAGS}.")
    return out


def _digest(*parts: object) -> bytes:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()


@cache
def _split_table() -> dict[str, dict[str, tuple[PromptSpec, ...]]]:
    """{split: {tag: prompts}}, computed once; prompts keep their generation order inside each split."""
    table: dict[str, dict[str, tuple[PromptSpec, ...]]] = {"all": {}, "train": {}, "heldout": {}}
    for tag in TAGS:
        family = _family(tag)
        keys = sorted({key for key, _ in family}, key=lambda k: _digest(_SPLIT_SALT, tag, k))
        n_held = max(1, math.floor(HELDOUT_FRACTION * len(keys) + 0.5))
        held = set(keys[:n_held])
        table["all"][tag] = tuple(spec for _, spec in family)
        table["train"][tag] = tuple(spec for key, spec in family if key not in held)
        table["heldout"][tag] = tuple(spec for key, spec in family if key in held)
    return table


def prompts_by_tag(split: Split = "all") -> dict[str, list[PromptSpec]]:
    """The prompts of a split, grouped by tag family (in `TAGS` order)."""
    if split not in ("all", "train", "heldout"):
        raise ValueError(f"Unknown split {split!r}; expected 'all', 'train' or 'heldout'.")
    return {tag: list(specs) for tag, specs in _split_table()[split].items()}


def all_prompts() -> list[PromptSpec]:
    """Every prompt of the world, family by family in `TAGS` order."""
    return [spec for specs in _split_table()["all"].values() for spec in specs]


def train_prompts() -> list[PromptSpec]:
    """The training prompts: about 75% of each family, disjoint from `heldout_prompts()`."""
    return [spec for specs in _split_table()["train"].values() for spec in specs]


def heldout_prompts() -> list[PromptSpec]:
    """The held-out prompts: about 25% of each family (at least one), never seen in training."""
    return [spec for specs in _split_table()["heldout"].values() for spec in specs]


VOCABULARY: list[str] = sorted({word for spec in all_prompts() for word in spec.prompt.lower().split()})


def heldout_items(n_per_tag: int = 72, seed: int = 1234) -> list[tuple[PromptSpec, int]]:
    """A fixed, tag-balanced evaluation list of (held-out prompt, image seed) pairs.

    A family with fewer held-out prompts than `n_per_tag` is cycled; one with more is subsampled. Order and seeds come
    from SHA-256 digests of `seed`, so the list is identical everywhere.
    """
    return _items("heldout", n_per_tag, seed)


def train_items(n_per_tag: int = 72, seed: int = 1234) -> list[tuple[PromptSpec, int]]:
    """The same kind of fixed, tag-balanced list as `heldout_items`, drawn from the training prompts.

    Comparing a model on both lists separates what RL taught on the prompts it trained on from what carried over to
    unseen compositions (`trl-nft eval --split train`).
    """
    return _items("train", n_per_tag, seed)


def _items(split: Literal["train", "heldout"], n_per_tag: int, seed: int) -> list[tuple[PromptSpec, int]]:
    items: list[tuple[PromptSpec, int]] = []
    for tag, specs in _split_table()[split].items():
        ordered = sorted(specs, key=lambda s: _digest(f"{split}_items", seed, tag, s.prompt))
        for i in range(n_per_tag):
            image_seed = int.from_bytes(_digest(f"{split}_seed", seed, tag, i)[:4], "big")
            items.append((ordered[i % len(ordered)], image_seed))
    return items


def make_dataset(
    split: Literal["train", "heldout"] = "train", tag_weights: Mapping[str, float] | None = None
) -> datasets.Dataset:
    """A `datasets.Dataset` of distinct prompts of a split, with columns `prompt` and `tag`.

    Families differ in size by two orders of magnitude (3 single-object prompts, hundreds of position prompts), so
    `tag_weights` maps a tag to how many times each of its rows is repeated (rounded; 0 drops the family; tags not
    named keep weight 1). That re-weights families for a trainer that samples rows uniformly.
    """
    import datasets

    if split not in ("train", "heldout"):
        raise ValueError(f"Unknown split {split!r}; expected 'train' or 'heldout'.")
    tag_weights = dict(tag_weights or {})
    unknown = set(tag_weights) - set(TAGS)
    if unknown:
        raise ValueError(f"Unknown tags in tag_weights: {sorted(unknown)}; expected some of {TAGS}.")
    prompts: list[str] = []
    tags: list[str] = []
    for tag, specs in _split_table()[split].items():
        weight = tag_weights.get(tag, 1)
        if weight < 0:
            raise ValueError(f"tag_weights[{tag!r}] must be >= 0, got {weight}.")
        repeat = math.floor(weight + 0.5)
        for _ in range(repeat):
            for spec in specs:
                prompts.append(spec.prompt)
                tags.append(tag)
    return datasets.Dataset.from_dict({"prompt": prompts, "tag": tags})


# ----------------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------------


@cache
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean `side`×`side` raster of a shape filling its box (read-only; cached).

    Circles are tested at pixel centres against a centre at side/2: an integer or half-integer, which is what keeps
    small circles round (off-grid centres make an 8 px circle look square).
    Triangles are upright isosceles, apex at the top, tested at each row's lower edge so the apex row is not empty.
    """
    centres = np.arange(side) + 0.5
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    half = side / 2
    if shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "circle":
        mask = (xx - half) ** 2 + (yy - half) ** 2 <= half**2
    elif shape == "triangle":
        half_width = half * (yy + 0.5) / side
        mask = np.abs(xx - half) <= half_width
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")
    mask.setflags(write=False)
    return mask


def _separated(a: tuple[int, int, int], b: tuple[int, int, int], gap: int) -> bool:
    (ax, ay, aside), (bx, by, bside) = a, b
    return bx - (ax + aside) >= gap or ax - (bx + bside) >= gap or by - (ay + aside) >= gap or ay - (by + bside) >= gap


def _relation_ok(a: tuple[int, int, int], b: tuple[int, int, int], relation: str, offset: float) -> bool:
    acx, acy = a[0] + a[2] / 2, a[1] + a[2] / 2
    bcx, bcy = b[0] + b[2] / 2, b[1] + b[2] / 2
    if relation == "left":
        return bcx - acx >= offset
    if relation == "right":
        return acx - bcx >= offset
    if relation == "above":
        return bcy - acy >= offset
    if relation == "below":
        return acy - bcy >= offset
    raise ValueError(f"Unknown relation {relation!r}; expected one of {RELATIONS}.")


def _place(n: int, rng: np.random.Generator, size: int, relation: str | None) -> list[tuple[int, int, int]]:
    """Random non-overlapping boxes (x0, y0, side) with the configured gaps, by rejection sampling."""
    scale = size / IMAGE_SIZE
    lo, hi = round(MIN_SHAPE * scale), round(MAX_SHAPE * scale)
    gap, border, offset = round(MIN_GAP * scale), round(BORDER * scale), MIN_RELATION_OFFSET * scale
    for _ in range(10_000):
        sides = rng.integers(lo, hi + 1, size=n)
        boxes: list[tuple[int, int, int]] = []
        for side in sides:
            side = int(side)
            for _ in range(64):
                x0 = int(rng.integers(border, size - border - side + 1))
                y0 = int(rng.integers(border, size - border - side + 1))
                box = (x0, y0, side)
                if all(_separated(box, other, gap) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == n and (relation is None or _relation_ok(boxes[0], boxes[1], relation, offset)):
            return boxes
    raise RuntimeError(f"Could not place {n} objects on a {size}px canvas.")  # pragma: no cover


def render(spec: PromptSpec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a random ground-truth image for `spec`: a (size, size, 3) uint8 array.

    Free colours are drawn uniformly from the palette, each object independently. Geometry is calibrated for 32 px
    and scaled for larger canvases; smaller ones are refused because shapes would fall below what the judge resolves.
    """
    if size < IMAGE_SIZE:
        raise ValueError(f"size must be >= {IMAGE_SIZE}, got {size}.")
    instances: list[tuple[str, str]] = []
    for obj in spec.objects:
        for _ in range(obj.count):
            colour = obj.colour if obj.colour is not None else COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            instances.append((obj.shape, colour))
    boxes = _place(len(instances), rng, size, spec.relation)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[...] = BACKGROUND
    for (shape, colour), (x0, y0, side) in zip(instances, boxes, strict=True):
        region = image[y0 : y0 + side, x0 : x0 + side]
        region[shape_mask(shape, side)] = COLOURS[colour]
    return image


def sample_training_batch(n: int, rng: np.random.Generator, split: Split = "all") -> tuple[np.ndarray, list[str]]:
    """`n` ground-truth (image, prompt) pairs for pretraining: family uniform, then prompt uniform within it.

    Sampling families first keeps the three single-object prompts from drowning among hundreds of position ones.
    Returns images as a (n, 32, 32, 3) uint8 array and the prompt strings.
    """
    families = list(_split_table()[split].values()) if split in ("all", "train", "heldout") else None
    if families is None:
        raise ValueError(f"Unknown split {split!r}; expected 'all', 'train' or 'heldout'.")
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    prompts: list[str] = []
    for i in range(n):
        specs = families[int(rng.integers(len(families)))]
        spec = specs[int(rng.integers(len(specs)))]
        images[i] = render(spec, rng)
        prompts.append(spec.prompt)
    return images, prompts
