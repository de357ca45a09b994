"""`trl-nft train` end to end, in a subprocess, as a user runs it."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import PROMPTS


def _cli():
    exe = shutil.which("trl-nft", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "trl_nft.cli"]


def test_train_from_yaml_with_flag_override(tiny_pipe, tmp_path):
    pipe_dir = tmp_path / "base"
    tiny_pipe.save_pretrained(str(pipe_dir))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "my_rewards.py").write_text(
        "def darkness(prompts, images, **kwargs):\n    return (1 - images.mean(dim=(1, 2, 3))).tolist()\n"
    )
    config = {
        "model_name_or_path": str(pipe_dir),
        "dataset_name": str(tmp_path / "prompts.txt"),
        "reward_funcs": ["brightness", "my_rewards:darkness"],
        "reward_weights": [1.0, 0.5],
        "output_dir": str(tmp_path / "run"),
        "max_steps": 5,  # overridden on the command line
        "num_generations": 4,
        "per_device_train_batch_size": 8,
        "num_inference_steps": 4,
        "max_sequence_length": 2,
        "lora_r": 4,
        "lora_alpha": 8,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    # my_rewards.py imports because it sits in the working directory (as in TRL's scripts), not through PYTHONPATH.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*_cli(), "train", "--config", str(tmp_path / "run.yaml"), "--max_steps", "2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "`darkness` (0.5)" in card
    assert (out / "training_args.bin").is_file()
    assert "'train_runtime'" in proc.stdout + proc.stderr and "'epoch'" in proc.stdout + proc.stderr
    assert "Adapter saved to" in proc.stdout


def test_cli_usage_and_unknown_command():
    proc = subprocess.run([*_cli(), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "trl-nft train" in proc.stdout
    proc = subprocess.run([*_cli(), "fly"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown command 'fly'" in proc.stderr


def test_train_requires_a_reward_and_env_prints_versions(tmp_path):
    from trl_nft.cli import NFTScriptArguments, train
    from trl_nft.config import DiffusionNFTConfig

    (tmp_path / "prompts.txt").write_text("a red circle\n")
    script_args = NFTScriptArguments(model_name_or_path="shapes-base", dataset_name=str(tmp_path / "prompts.txt"))
    with pytest.raises(ValueError, match="reward_funcs is required.*--reward_funcs shapes"):
        train(script_args, DiffusionNFTConfig(output_dir=str(tmp_path / "out"), report_to="none"))
    proc = subprocess.run([*_cli(), "env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for name in ("trl_nft", "trl", "transformers", "diffusers", "peft", "torch", "huggingface_hub"):
        assert f"- {name} version: " in proc.stdout, name


def test_prompt_sources_follow_trl_script_arguments(tmp_path):
    from trl_nft.cli import load_prompts

    assert len(load_prompts("shapes", "test")) > 0 and load_prompts("shapes", "test")[0]["prompt"]
    (tmp_path / "p.txt").write_text("a\nb\n")
    assert load_prompts(str(tmp_path / "p.txt"))["prompt"] == ["a", "b"]
    with pytest.raises(ValueError, match="only has a 'train' split"):
        load_prompts(str(tmp_path / "p.txt"), "test")
    with pytest.raises(ValueError, match="dataset_streaming is not supported"):
        load_prompts("shapes", streaming=True)
