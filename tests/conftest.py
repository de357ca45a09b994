import os


# Offline by construction: nothing in the suite may reach the Hub. Set before huggingface_hub is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


torch.set_num_threads(min(2, os.cpu_count() or 1))

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a circle", "a yellow square", "three red circles"]


@pytest.fixture
def tiny_pipe():
    """A fresh, randomly initialised tiny StableDiffusion3Pipeline (built from configs, no download)."""
    from trl_nft.shapes import VOCABULARY
    from trl_nft.shapes.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0)


@pytest.fixture
def prompts_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS, "tag": ["t"] * len(PROMPTS)})


def tiny_config(tmp_path, **overrides):
    """A DiffusionNFTConfig sized for the tiny test pipeline (seconds per run on 2 CPU cores)."""
    from trl_nft import DiffusionNFTConfig

    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        num_generations=4,
        per_device_train_batch_size=8,
        num_inference_steps=4,
        eval_num_inference_steps=4,
        max_sequence_length=2,
        lora_r=4,
        lora_alpha=8,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return DiffusionNFTConfig(**kwargs)
