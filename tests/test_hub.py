"""Model cards and pushes to the Hub, against a Hub-compatible HTTP server on 127.0.0.1 (tests/hub_server.py).

Nothing leaves the machine: `huggingface_hub`'s endpoint is pointed at the loopback server for these tests only.
"""

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import PROMPTS, tiny_config
from hub_server import LoopbackHub
from huggingface_hub import ModelCard


PUBLISHED = {"README.md", "pytorch_lora_weights.safetensors"} | {f"images/sample_{i}.png" for i in range(4)}


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as constants

    import trl_nft.hub

    with LoopbackHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
        monkeypatch.setattr(trl_nft.hub, "PUSH_RETRY_WAITS", (0.05,))
        yield server


def _trainer(pipe, tmp_path, **overrides):
    from datasets import Dataset

    from trl_nft import DiffusionNFTTrainer

    dataset = Dataset.from_dict({"prompt": PROMPTS})
    overrides.setdefault("num_eval_images_to_log", 4)
    return DiffusionNFTTrainer(
        pipe,
        "brightness",
        args=tiny_config(tmp_path, **overrides),
        train_dataset=dataset,
        eval_dataset=dataset.select(range(4)),
    )


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _local_files(folder) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(root, f), folder): os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(folder)
        for f in files
    }


def test_pushes_during_and_after_training_carry_adapter_card_and_checkpoint(tiny_pipe, tmp_path, hub):
    trainer = _trainer(
        tiny_pipe,
        tmp_path,
        push_to_hub=True,
        hub_model_id="test-user/nft-tiny",
        hub_strategy="checkpoint",
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
    )
    trainer.train()
    info = trainer.push_to_hub()
    commits = hub.state.commits
    assert [c["message"] for c in commits] == [
        "Training in progress, step 1",
        "Training in progress, step 1, checkpoint",
        "Training in progress, step 2",
        "Training in progress, step 2, checkpoint",
        "End of training",
    ]
    for commit in commits[0::2]:
        assert set(commit["files"]) == PUBLISHED  # adapter + card + gallery, never a checkpoint folder
    for commit in commits[1:4:2]:
        files = {f.removeprefix("last-checkpoint/") for f in commit["files"]}
        assert all(f.startswith("last-checkpoint/") for f in commit["files"])
        assert {"nft_state.safetensors", "optimizer.pt", "trainer_state.json", *PUBLISHED} <= files
    out = tmp_path / "out"
    final = commits[-1]["files"]
    assert final["pytorch_lora_weights.safetensors"] == (out / "pytorch_lora_weights.safetensors").read_bytes()
    assert info.commit_url.startswith(hub.endpoint + "/test-user/nft-tiny/commit/")

    card = ModelCard(final["README.md"].decode())
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"diffusion-nft", "lora", "trl", "StableDiffusion3Pipeline", "template:sd-lora"} <= set(data["tags"])
    assert [w["output"]["url"] for w in data["widget"]] == [f"images/sample_{i}.png" for i in range(4)]
    assert [w["text"] for w in data["widget"]] == PROMPTS[:4]
    assert "base_model" not in data  # a pipeline built in memory has no Hub origin
    text = card.text
    assert "<Gallery />" in text
    assert 'repo_id = "test-user/nft-tiny"' in text and "pipe.load_lora_weights(repo_id)" in text
    assert "| optimizer steps | 2 |" in text and "`brightness` (1)" in text
    assert "CFG-free" in text and "eval_reward" in text
    assert "- diffusers: " in text and "arxiv.org/abs/2509.16117" in text
    assert str(tmp_path) not in card.content


def test_failed_pushes_warn_training_continues_and_the_final_push_reports(tiny_pipe, tmp_path, hub):
    from huggingface_hub import HfApi

    from trl_nft.hub import PushToHubError

    trainer = _trainer(
        tiny_pipe, tmp_path, push_to_hub=True, hub_model_id="nft-tiny", save_strategy="steps", save_steps=1
    )
    assert trainer.hub_model_id == "test-user/nft-tiny"  # the namespace comes from the Hub, as for a real token
    hub.state.status = 401
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(trainer.failed_pushes) == 2
    assert hub.endpoint in trainer.failed_pushes[0] and "hf auth login" in trainer.failed_pushes[0]

    hub.state.status = None
    trainer.push_to_hub()
    assert [c["message"] for c in hub.state.commits] == ["End of training"]
    assert trainer.failed_pushes == []

    out = tmp_path / "out"
    before = _local_files(out)
    hub.state.status = 401
    with pytest.raises(PushToHubError, match=re.escape(hub.endpoint + "/test-user/nft-tiny")) as err:
        trainer.push_to_hub()
    assert "hf auth login" in str(err.value) and str(out) in str(err.value)
    assert _local_files(out).keys() == before.keys()

    dead = _dead_endpoint()
    trainer._hub_api_instance = HfApi(endpoint=dead)
    with pytest.raises(PushToHubError, match=re.escape(dead)) as err:
        trainer.push_to_hub()
    assert "attempt 2 of 2" in str(err.value) and "trl-nft push" in str(err.value)
    assert _local_files(out).keys() == before.keys()


def _cli():
    exe = shutil.which("trl-nft", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "trl_nft.cli"]


def test_trl_nft_push_publishes_a_run_folder(tiny_pipe, tmp_path, hub):
    trainer = _trainer(tiny_pipe, tmp_path, max_steps=1)
    trainer.train()
    trainer.evaluate()
    run = tmp_path / "run"
    trainer.save_model(str(run))
    assert (run / "README.md").is_file() and (run / "images" / "sample_0.png").is_file()
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_loopback_test_token"}
    proc = subprocess.run(
        [*_cli(), "push", str(run), "--repo_id", "alice/shapes-nft", "--private"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hub.state.repos["alice/shapes-nft"]["visibility"] == "private"
    (commit,) = hub.state.commits
    assert set(commit["files"]) == PUBLISHED  # not training_args.bin
    assert 'repo_id = "alice/shapes-nft"' in commit["files"]["README.md"].decode()
    assert "alice/shapes-nft" in proc.stdout

    before = _local_files(run)
    dead = _dead_endpoint()
    proc = subprocess.run(
        [*_cli(), "push", str(run), "--repo_id", "alice/shapes-nft"],
        capture_output=True,
        text=True,
        env={**env, "HF_ENDPOINT": dead},
        timeout=300,
    )
    assert proc.returncode == 1
    assert dead in proc.stderr and "Traceback" not in proc.stderr
    assert _local_files(run) == before


def test_card_on_the_shipped_base_names_no_path_and_its_snippet_runs(tmp_path):
    from trl_nft.shapes.pretrain import BASE_DIR, load_base_pipeline

    trainer = _trainer(load_base_pipeline(), tmp_path, max_steps=1, resolution=32, max_sequence_length=1)
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    card = ModelCard.load(str(tmp_path / "out" / "README.md"))
    assert "base_model" not in card.data.to_dict() and card.data.license == "apache-2.0"
    assert os.path.realpath(BASE_DIR) not in card.content and BASE_DIR not in card.content
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    assert 'load_base_pipeline("shapes-base")' in snippet
    scope = {}
    exec(compile(snippet, "card-snippet", "exec"), scope)  # as written: a user pastes it
    assert scope["image"].size == (32, 32)


def test_base_model_is_a_hub_id_or_recorded_origin_never_a_path(tmp_path):
    from trl_nft.model_card import resolve_base_model

    hub_id = resolve_base_model("stabilityai/stable-diffusion-3.5-medium")
    assert hub_id.hub_id == "stabilityai/stable-diffusion-3.5-medium"
    assert hub_id.license["license_name"] == "stabilityai-ai-community"
    snapshot = tmp_path / "hub" / "models--stabilityai--stable-diffusion-3.5-large" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    cached = resolve_base_model(str(snapshot))
    assert cached.hub_id == "stabilityai/stable-diffusion-3.5-large" and str(tmp_path) not in cached.load_lines[0]
    local = tmp_path / "my-base"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: mit\n---\n# my base\n")
    info = resolve_base_model(str(local))
    assert info.hub_id is None and info.license == {"license": "mit"}
    assert all(str(tmp_path) not in line for line in info.load_lines)
