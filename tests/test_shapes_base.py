"""The shipped shapes base, `trl-nft eval`, learning on the shapes world, and the demo end to end."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from trl_nft.shapes.demo import DEMO_CONFIG


# The demo's LoRA targets (every linear layer), read from the shipped recipe so the test follows it.
with open(DEMO_CONFIG) as _f:
    DEMO_LORA_TARGETS = yaml.safe_load(_f)["lora_target_modules"]


def _cli():
    exe = shutil.which("trl-nft", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "trl_nft.cli"]


@pytest.fixture
def base_pipe():
    from trl_nft.shapes.pretrain import load_base_pipeline

    return load_base_pipeline()


def test_base_loads_offline_with_plain_diffusers_and_samples():
    from diffusers import DiffusionPipeline

    from trl_nft.shapes.pretrain import BASE_DIR, MAX_SEQUENCE_LENGTH

    pipe = DiffusionPipeline.from_pretrained(BASE_DIR, text_encoder_3=None, tokenizer_3=None)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(BASE_DIR) for f in fs)
    assert size < 20 * 2**20  # a few MB, shipped in the package
    images = pipe(
        ["a red circle", "two blue squares"],
        num_inference_steps=10,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    ).images
    assert images.shape == (2, 3, 32, 32)
    # A pretrained base draws shapes on a white background, not noise.
    assert images.mean() > 0.6 and (images.min(dim=1).values < 0.5).any()


def test_eval_is_stable_and_the_base_is_imperfect(base_pipe):
    from trl_nft.shapes import TAGS, heldout_items
    from trl_nft.shapes.evaluate import evaluate_pipeline

    items = heldout_items(n_per_tag=8)
    first = evaluate_pipeline(base_pipe, items)
    second = evaluate_pipeline(base_pipe, items)
    assert first["table"] == second["table"] and first["partial"] == second["partial"]
    assert set(first["table"]) == {*TAGS, "overall"}
    assert 0.0 < first["table"]["overall"] < 0.8
    assert 0.3 < first["partial"] < 0.95


def test_eval_cli_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "eval.json"
    args = [*_cli(), "eval", "--heldout_per_tag", "3", "--output_json", str(out)]
    runs = [subprocess.run(args, capture_output=True, text=True, timeout=600, check=False) for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "overall" in proc.stdout and "position" in proc.stdout
    assert runs[0].stdout == runs[1].stdout  # same numbers on every run
    data = json.loads(out.read_text())
    assert data["n"] == 18 and len(data["per_item"]) == 18 and "overall" in data["table"]
    assert data["args"]["dataset_test_split"] == "test"


def test_eval_cli_train_split_and_bad_split(tmp_path):
    from trl_nft.cli import EvalArguments
    from trl_nft.shapes import train_prompts

    out = tmp_path / "train.json"
    args = [*_cli(), "eval", "--dataset_test_split", "train", "--heldout_per_tag", "2", "--output_json", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    train = {s.prompt for s in train_prompts()}
    assert all(item["prompt"] in train for item in json.loads(out.read_text())["per_item"])
    with pytest.raises(ValueError, match="dataset_test_split must be 'test' .* or 'train'"):
        EvalArguments(dataset_test_split="heldout")


def test_simple_reward_rises_with_a_fixed_seed(base_pipe, tmp_path):
    """A short seeded NFT run on an SD3 pipeline raises a simple reward (mean redness) by a clear margin."""
    from trl_nft import DiffusionNFTConfig, DiffusionNFTTrainer
    from trl_nft.shapes import make_dataset

    args = DiffusionNFTConfig(
        output_dir=str(tmp_path),
        max_steps=24,
        num_generations=8,
        per_device_train_batch_size=16,
        steps_per_generation=4,
        num_inference_steps=6,
        eval_num_inference_steps=6,
        max_sequence_length=1,
        timestep_fraction=0.5,
        learning_rate=1e-3,
        lora_r=8,
        lora_alpha=16,
        kl_weight=0.0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    dataset = make_dataset("train")
    trainer = DiffusionNFTTrainer(
        base_pipe, "redness", args=args, train_dataset=dataset, eval_dataset=dataset.select(range(0, 480, 10))
    )
    before = trainer.evaluate()["eval_reward"]
    trainer.train()
    after = trainer.evaluate()["eval_reward"]
    assert after > before + 0.02, (before, after)


def test_nft_on_the_shapes_world_raises_the_partial_credit_reward(base_pipe, tmp_path):
    from datasets import Dataset

    from trl_nft import DiffusionNFTConfig, DiffusionNFTTrainer

    prompts = [
        "three red squares",
        "a blue circle to the left of a yellow triangle",
        "two green circles",
        "a red triangle and a blue square",
    ]
    args = DiffusionNFTConfig(
        output_dir=str(tmp_path),
        max_steps=40,
        num_generations=16,
        per_device_train_batch_size=16,
        steps_per_generation=4,
        num_inference_steps=6,
        eval_num_inference_steps=10,
        max_sequence_length=1,
        timestep_fraction=0.5,
        learning_rate=1e-3,
        lora_r=32,
        lora_alpha=32,
        kl_weight=0.0,
        lora_target_modules=DEMO_LORA_TARGETS,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        per_device_eval_batch_size=64,
    )
    evals = Dataset.from_dict({"prompt": [p for p in prompts for _ in range(16)]})
    trainer = DiffusionNFTTrainer(
        base_pipe, "shapes", args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), eval_dataset=evals
    )
    before = trainer.evaluate()["eval_reward"]
    trainer.train()
    after = trainer.evaluate()["eval_reward"]
    assert after > before + 0.05, (before, after)


def test_demo_end_to_end_writes_every_artifact(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            *_cli(),
            "demo",
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--heldout_per_tag",
            "2",
            "--eval_every_minutes",
            "100",
            "--num_sample_images",
            "6",
            "--disable_tqdm",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (
        "pytorch_lora_weights.safetensors",
        "README.md",
        "metrics.jsonl",
        "reward_curve.png",
        "samples.png",
        "heldout_table.json",
    ):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in records if r["type"] == "heldout"]
    assert [r["step"] for r in held] == [0, 2]
    train = [r for r in records if r["type"] == "train" and "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    # One rollout phase feeds `steps_per_generation` optimizer steps, so only its first step logs rewards (as in GRPO).
    assert "reward" in train[0] and "reward" not in train[1]
    summary = json.loads((out / "heldout_table.json").read_text())
    assert summary["heldout_items"] == 12 and summary["steps"] == 2
    card = (out / "README.md").read_text()
    assert "Held-out evaluation" in card and "load_lora_weights" in card
    # The card's snippet runs as written (from the directory that holds the adapter) and samples as trained.
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'load_base_pipeline("shapes-base")' in snippet and "max_sequence_length=1" in snippet, snippet
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(snippet, namespace)
    assert namespace["image"].size == (32, 32)
    assert "Gain:" in proc.stdout


def test_missing_base_names_the_path_and_the_fix(tmp_path):
    from trl_nft.shapes.pretrain import load_base_pipeline

    with pytest.raises(FileNotFoundError, match="python -m trl_nft.shapes.pretrain --output_dir"):
        load_base_pipeline(str(tmp_path / "nowhere"))


def test_pretrain_script_is_deterministic_and_loads_offline(tmp_path):
    """The script that regenerates the shipped base, at a few steps: same flags, same weights, loadable pipeline."""
    from safetensors.torch import load_file

    from trl_nft.shapes.pretrain import load_base_pipeline, main

    flags = [
        "--vae-steps",
        "2",
        "--vae_batch_size",
        "8",
        "--normalisation-images",
        "16",
        "--pool-size",
        "32",
        "--transformer-steps",
        "3",
        "--batch-size",
        "8",
        "--warmup-steps",
        "1",
        "--num-threads",
        "1",
    ]
    for run in ("a", "b"):
        main([*flags, "--output_dir", str(tmp_path / run)])
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        (weights_a,) = (tmp_path / "a" / part).glob("*.safetensors")
        a, b = load_file(weights_a), load_file(tmp_path / "b" / part / weights_a.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    recorded = json.loads((tmp_path / "a" / "pretrain_config.json").read_text())
    assert recorded["transformer_steps"] == 3 and recorded["output_dir"] is None
    # The shipped recipe trains the text encoders with the transformer; "false" must really turn that off.
    assert recorded["train_text_encoders"] is True and recorded["bf16"] is True
    main([*flags, "--output_dir", str(tmp_path / "frozen"), "--train_text_encoders", "false", "--bf16", "false"])
    frozen_recorded = json.loads((tmp_path / "frozen" / "pretrain_config.json").read_text())
    assert frozen_recorded["train_text_encoders"] is False and frozen_recorded["bf16"] is False
    for part in ("text_encoder", "text_encoder_2"):
        trained = load_file(tmp_path / "a" / part / "model.safetensors")
        frozen = load_file(tmp_path / "frozen" / part / "model.safetensors")
        assert any(not torch.equal(trained[k], frozen[k]) for k in trained), part
    pipe = load_base_pipeline(str(tmp_path / "a"))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    # A second stage continues from the first one's weights: same VAE, further-trained transformer.
    main([*flags, "--output_dir", str(tmp_path / "c"), "--init-from", str(tmp_path / "a"), "--lr-decay-steps", "3"])
    continued = json.loads((tmp_path / "c" / "pretrain_config.json").read_text())
    assert continued["init_from"] == str(tmp_path / "a") and continued["init_from_config"] == recorded
    for part, same in (("vae", True), ("transformer", False)):
        (weights_a,) = (tmp_path / "a" / part).glob("*.safetensors")
        a, c = load_file(weights_a), load_file(tmp_path / "c" / part / weights_a.name)
        assert all(torch.equal(a[k], c[k]) for k in a) == same, part
    # Its configs are the first stage's, byte for byte: no load-time path or flag is saved into the base.
    configs = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.json"))
    for name in (n for n in configs if n.name != "pretrain_config.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "c" / name).read_text(), name


def test_pretrain_learning_rate_schedule():
    from trl_nft.shapes.pretrain import PretrainConfig, learning_rate_factor

    constant = PretrainConfig(transformer_steps=10, warmup_steps=2)
    assert [learning_rate_factor(s, constant) for s in range(10)] == [0.5] + [1.0] * 9
    decayed = PretrainConfig(transformer_steps=10, warmup_steps=2, lr_decay_steps=4)
    assert [learning_rate_factor(s, decayed) for s in range(10)] == [0.5] + [1.0] * 6 + [0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="lr_decay_steps=11 must lie in"):
        PretrainConfig(transformer_steps=10, lr_decay_steps=11)
