"""Tests for the shapes world (prompts, renderer) and its judge. All fast: the whole file runs in a few seconds."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from trl_nft.rewards import resolve_reward
from trl_nft.shapes import (
    TAGS,
    VOCABULARY,
    all_prompts,
    detect,
    format_table,
    geneval_table,
    heldout_items,
    heldout_prompts,
    make_dataset,
    parse_prompt,
    prompts_by_tag,
    render,
    sample_training_batch,
    score,
    shapes_reward,
    shapes_strict_reward,
    train_items,
    train_prompts,
    world,
)


def _fingerprint(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Prompt sets
# ----------------------------------------------------------------------------------------------------------------------


def test_prompt_sets_deterministic():
    first = (all_prompts(), train_prompts(), heldout_prompts())
    world._split_table.cache_clear()
    second = (all_prompts(), train_prompts(), heldout_prompts())
    assert first == second
    # Pinned, so an accidental change of the split (or a platform-dependent one) is caught.
    assert _fingerprint([s.prompt for s in heldout_prompts()]) == (
        "93a1be2222a3a5b4e8435a13fe097cc985e40c60c08ea5d4ec25b49cdd8d20ca"
    )


def test_split_disjoint_and_sized_per_family():
    everything, train, held = prompts_by_tag("all"), prompts_by_tag("train"), prompts_by_tag("heldout")
    assert list(everything) == list(TAGS)
    for tag in TAGS:
        train_set = {s.prompt for s in train[tag]}
        held_set = {s.prompt for s in held[tag]}
        assert train_set and held_set, tag
        assert not train_set & held_set, tag
        assert train_set | held_set == {s.prompt for s in everything[tag]}, tag
        assert all(s.tag == tag for s in everything[tag])
        if len(everything[tag]) >= 12:
            assert 0.2 <= len(held_set) / len(everything[tag]) <= 0.3, tag
    assert len(heldout_prompts()) >= 150
    assert len({s.prompt for s in all_prompts()}) == len(all_prompts())


def test_split_keeps_paraphrases_together():
    """A held-out scene must not be seen in training under another word order."""
    train = {s.prompt for s in train_prompts()}
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    for spec in heldout_prompts():
        if spec.tag in ("two_object", "color_attr"):
            mirror = world.make_spec(spec.tag, spec.objects[::-1])
        elif spec.tag == "position":
            mirror = world.make_spec(spec.tag, spec.objects[::-1], opposite[spec.relation])
        else:
            continue
        assert mirror.prompt not in train, spec.prompt


def test_heldout_items_balanced_and_stable():
    items = heldout_items()
    assert items == heldout_items()
    assert Counter(spec.tag for spec, _ in items) == {tag: 72 for tag in TAGS}
    held = {s.prompt for s in heldout_prompts()}
    assert all(spec.prompt in held and isinstance(seed, int) for spec, seed in items)
    assert len({seed for _, seed in items}) == len(items)
    assert _fingerprint([f"{s.prompt}|{seed}" for s, seed in items]) == (
        "ebaaa24425e016e0be37b720f510cac4c7a305253da3c4c02e9832ccf1bda2e5"
    )
    assert heldout_items(seed=1) != items
    assert Counter(spec.tag for spec, _ in heldout_items(n_per_tag=5)) == {tag: 5 for tag in TAGS}


def test_train_items_come_from_training_prompts_only():
    items = train_items()
    assert items == train_items()
    assert Counter(spec.tag for spec, _ in items) == {tag: 72 for tag in TAGS}
    train = {s.prompt for s in train_prompts()}
    assert all(spec.prompt in train for spec, _ in items)
    assert not {s.prompt for s, _ in items} & {s.prompt for s in heldout_prompts()}
    assert {seed for _, seed in items}.isdisjoint({seed for _, seed in heldout_items()})


def test_vocabulary_and_parse_roundtrip():
    vocab = set(VOCABULARY)
    assert VOCABULARY == sorted(vocab)
    for spec in all_prompts():
        assert set(spec.prompt.lower().split()) <= vocab, spec.prompt
        assert parse_prompt(spec.prompt) == spec
    assert parse_prompt("  A Red Circle ") == parse_prompt("a red circle")


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "a purple circle",
        "a circle to the left of",
        "two circle",
        "a circles",
        "a circle and a circle",
        "a circle and a red square",
        "a red circle above a red circle below a blue square",
        "five squares",
    ],
)
def test_parse_prompt_rejects(prompt):
    with pytest.raises(ValueError, match="Cannot parse prompt"):
        parse_prompt(prompt)


def test_make_dataset():
    train = make_dataset("train")
    assert train.column_names == ["prompt", "tag"]
    assert train["prompt"] == [s.prompt for s in train_prompts()]
    weighted = make_dataset("train", tag_weights={"single_object": 10, "position": 0})
    counts = Counter(weighted["tag"])
    assert counts["single_object"] == 10 * len(prompts_by_tag("train")["single_object"])
    assert "position" not in counts
    assert counts["counting"] == len(prompts_by_tag("train")["counting"])
    held = make_dataset("heldout")
    assert set(held["prompt"]) == {s.prompt for s in heldout_prompts()}
    with pytest.raises(ValueError):
        make_dataset("train", tag_weights={"nope": 1})


def test_sample_training_batch():
    images, prompts = sample_training_batch(24, np.random.default_rng(0), split="train")
    assert images.shape == (24, 32, 32, 3) and images.dtype == np.uint8
    train = {s.prompt for s in train_prompts()}
    assert len(prompts) == 24 and all(p in train for p in prompts)
    again, prompts_again = sample_training_batch(24, np.random.default_rng(0), split="train")
    assert prompts == prompts_again and np.array_equal(images, again)
    assert all(score(p, img).strict for p, img in zip(prompts, images, strict=True))


def test_import_is_light():
    code = "import sys, trl_nft.shapes; print('torch' in sys.modules, 'datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ----------------------------------------------------------------------------------------------------------------------
# Judge
# ----------------------------------------------------------------------------------------------------------------------


def _renders_per_tag(n_per_tag: int, seed: int):
    rng = np.random.default_rng(seed)
    for specs in prompts_by_tag("all").values():
        for _ in range(n_per_tag):
            spec = specs[int(rng.integers(len(specs)))]
            yield spec, render(spec, rng)


def test_render_basics():
    rng = np.random.default_rng(0)
    image = render(parse_prompt("four squares"), rng)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert (image[0] == 255).all() and (image[:, 0] == 255).all()  # the border stays background
    detections = detect(image)
    assert len(detections) == 4 and all(d.shape == "square" for d in detections)


def test_judge_accepts_ground_truth():
    results = [(spec.tag, score(spec.prompt, image).strict) for spec, image in _renders_per_tag(200, seed=0)]
    assert len(results) == 1200
    table = geneval_table(results)
    accuracy = sum(ok for _, ok in results) / len(results)
    assert accuracy >= 0.99, format_table(table)
    assert min(table[tag] for tag in TAGS) >= 0.98, format_table(table)


def test_judge_tolerates_blur_and_noise():
    """VAE decodes are soft and slightly off-colour; the judge must still read ground truth through that."""
    rng = np.random.default_rng(1)
    ok = []
    for spec, image in _renders_per_tag(40, seed=1):
        soft = ndimage.gaussian_filter(image.astype(np.float32), sigma=(0.8, 0.8, 0)) + rng.normal(0, 8, image.shape)
        ok.append(score(spec, np.clip(np.rint(soft), 0, 255).astype(np.uint8)).strict)
    assert np.mean(ok) >= 0.97


HARD_NEGATIVES = {
    "wrong count": [
        ("three red squares", "two red squares"),
        ("two circles", "three circles"),
        ("four triangles", "three triangles"),
    ],
    "wrong colour": [
        ("a blue triangle", "a red triangle"),
        ("two green circles", "two yellow circles"),
        ("a red circle and a blue square", "a blue circle and a red square"),
    ],
    "swapped positions": [
        ("a red circle to the left of a blue square", "a red circle to the right of a blue square"),
        ("a green triangle above a yellow circle", "a green triangle below a yellow circle"),
    ],
    "extra object": [
        ("a red circle", "a red circle and a blue square"),
        ("a circle", "two circles"),
        ("a circle and a square", "a circle and a square and a triangle"),
    ],
    "missing object": [
        ("a circle and a square", "a circle"),
        ("a red circle and a blue square", "a red circle"),
        ("a red circle to the left of a blue square", "a blue square"),
    ],
}


def _render_prompt(prompt: str, rng: np.random.Generator) -> np.ndarray:
    """Render any prompt, including three-object ones outside the parser's grammar."""
    if prompt.count(" and ") > 1:
        objects = tuple(parse_prompt(part).objects[0] for part in prompt.split(" and "))
        return render(world.make_spec("extra", objects), rng)
    return render(parse_prompt(prompt), rng)


@pytest.mark.parametrize("kind", list(HARD_NEGATIVES))
def test_judge_rejects_hard_negatives(kind):
    rng = np.random.default_rng(7)
    for prompt, shown in HARD_NEGATIVES[kind]:
        for _ in range(15):
            image = _render_prompt(shown, rng)
            result = score(prompt, image)
            assert result.strict is False, (kind, prompt, shown, result.checks)
            assert result.partial < 1, (kind, prompt, shown, result.checks)
            assert score(shown, image).strict if shown.count(" and ") <= 1 else True


def test_checks_name_the_failure():
    rng = np.random.default_rng(3)
    swapped = score(
        "a red circle to the left of a blue square",
        render(parse_prompt("a red circle to the right of a blue square"), rng),
    )
    assert swapped.checks == {
        "shape_1": True,
        "object_1": True,
        "shape_2": True,
        "object_2": True,
        "relation": False,
        "no_extra": True,
    }
    assert swapped.partial == pytest.approx(5 / 6)
    count = score("three squares", render(parse_prompt("two squares"), rng))
    assert count.checks == {"object": True, "count": False, "no_extra": True}


def test_shapes_reward_on_tensor_batch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    prompts = ["a red circle", "two squares", "a circle and a triangle", "a blue square above a green circle"]
    shown = ["a red circle", "three squares", "a circle and a triangle", "a green circle above a blue square"]
    images = np.stack([render(parse_prompt(p), rng) for p in shown])
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    rewards = shapes_reward(prompts, batch, tag=["colors"] * 4, trainer_state=object())
    assert len(rewards) == 4 and all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in rewards)
    assert rewards[0] == 1.0 and rewards[2] == 1.0
    assert rewards[1] < 1.0 and rewards[3] < 1.0
    assert shapes_reward.__name__ == "shapes_reward"
    strict = shapes_strict_reward(prompts, batch, tag=["colors"] * 4)
    assert strict == [1.0, 0.0, 1.0, 0.0]
    assert resolve_reward("shapes_strict") is shapes_strict_reward


def test_geneval_table_is_mean_of_tags():
    results = [("counting", True), ("counting", False), ("counting", False), ("counting", True), ("colors", True)]
    table = geneval_table(results)
    assert table == {"counting": 0.5, "colors": 1.0, "overall": 0.75}  # per-item mean would be 0.6
    assert list(table) == ["counting", "colors", "overall"]  # TAGS order, overall last
    text = format_table(table)
    lines = text.splitlines()
    assert lines[0].startswith("tag") and lines[-1].startswith("overall") and "0.7500" in lines[-1]
    assert len({len(line) for line in lines}) == 1  # aligned
