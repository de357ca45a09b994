"""The DDPO baseline of benchmarks/ddpo.py: what runs without trl 0.23.1 (reward and prompt adapters, DDPO's logs as
the demo's metrics.jsonl, the summariser pairing DDPO with an NFT run given by path), and, when the separate
environment of benchmarks/ddpo_env.sh exists, one real tiny DDPO epoch in it."""

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import ddpo  # noqa: E402
import nft_vs_grpo  # noqa: E402


def _ground_truth(prompt: str, seed: int = 0) -> torch.Tensor:
    """A rendered correct image for `prompt`, as DDPO's pipeline hands images over: float [3, H, W] in [0, 1]."""
    from trl_nft.shapes.judge import parse_prompt
    from trl_nft.shapes.world import render

    array = render(parse_prompt(prompt), np.random.default_rng(seed))
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


def test_reward_adapter_is_shapes_reward_in_ddpos_calling_convention():
    from trl_nft.shapes.judge import shapes_reward

    prompts = ("a red circle", "two blue squares", "a green triangle")
    images = torch.stack([_ground_truth("a red circle"), _ground_truth("two blue squares"), _ground_truth("a circle")])
    reward = ddpo.DDPOReward()
    rewards, metadata = reward(images, prompts, ({}, {}, {}))  # DDPO passes tuples of prompts and metadata
    assert rewards.dtype == torch.float32 and rewards.shape == (3,) and metadata == {}
    torch.testing.assert_close(rewards, torch.tensor(shapes_reward(prompts=list(prompts), images=images)))
    # Correct images get full partial credit; a circle for "a green triangle" gets less.
    assert rewards[0] == 1.0 and rewards[1] == 1.0 and rewards[2] < 1.0
    assert reward.seconds > 0
    with pytest.raises(ValueError, match="2 rewards for 3 prompts"):
        ddpo.DDPOReward(lambda prompts, images: [0.0, 1.0])(images, prompts, ())


def test_prompt_sampler_draws_rows_uniformly_and_reproducibly():
    # Uniform over rows, so a prompt repeated in the rows is drawn that much more often: this is how the demo's
    # balanced mix (make_dataset with parse_tag_weights("balanced") repeats rare families' rows) reaches DDPO.
    rows = ["a red circle"] * 3 + ["two blue squares"]
    first, second = ddpo.PromptSampler(rows, seed=3), ddpo.PromptSampler(rows, seed=3)
    drawn = [first() for _ in range(400)]
    assert drawn == [second() for _ in range(400)] and all(meta == {} for _, meta in drawn)
    assert first.drawn == [p for p, _ in drawn]
    assert 260 <= Counter(first.drawn)["a red circle"] <= 340  # 300 expected, sd about 9
    other = ddpo.PromptSampler(rows, seed=4)
    assert [other()[0] for _ in range(40)] != first.drawn[:40]
    first.reset()
    assert first.drawn == []
    with pytest.raises(ValueError, match="at least one prompt"):
        ddpo.PromptSampler([])


def _ddpo_logs(step: int, rewards: list[float], losses: list[float]) -> list:
    """What DDPOTrainer.step passes to accelerator.log in one epoch: the rollout, then one record per optimizer step
    (tensors with grad, numpy scalars and a numpy array, as it logs them)."""
    r = np.asarray(rewards, dtype=np.float32)
    logs = [(step, {"reward": r, "epoch": 0, "reward_mean": r.mean(), "reward_std": r.std()})]
    for i, loss in enumerate(losses):
        value = torch.tensor(loss, requires_grad=True) * 1.0
        logs.append((step + i, {"approx_kl": value * 0, "clipfrac": torch.tensor(0.5), "loss": value, "epoch": 0,
                                "inner_epoch": 0}))  # fmt: skip
    return logs


def test_ddpo_logs_become_the_demo_metrics_records():
    records = ddpo.epoch_records(_ddpo_logs(4, [0.2, 0.6], [0.1, -0.3]), learning_rate=3e-4)
    # Steps are counted after the step, as the demo does; the rollout rides on the first step of its epoch.
    assert [r["step"] for r in records] == [5, 6]
    assert records[0]["reward"] == pytest.approx(0.4) and records[0]["reward_std"] == pytest.approx(0.2)
    assert "reward" not in records[1]
    assert records[1]["loss"] == pytest.approx(-0.3) and records[1]["clipfrac"] == 0.5
    assert all(r["learning_rate"] == 3e-4 for r in records)
    json.dumps(records)  # plain Python numbers only
    assert ddpo.epoch_records(_ddpo_logs(0, [0.5], []), 3e-4) == [{"step": 0, "reward": 0.5, "reward_std": 0.0,
                                                                   "epoch": 0}]  # fmt: skip


def _write(path, records):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _ddpo_run(path, evals):
    """A ddpo.py run: 2 optimizer steps per epoch, held-out records with CFG 5 and CFG-free scores."""
    records = []
    for epoch in range(max(e[1] for e in evals)):  # one epoch every 2 minutes
        for r in ddpo.epoch_records(_ddpo_logs(2 * epoch, [0.5 + 0.01 * epoch], [0.1, 0.2]), 3e-4):
            records.append({"type": "train", "minutes": 2.0 * (epoch + 1), **r, "iteration": epoch + 1})
    for minutes, epochs, own, free in evals:
        records.append({"type": "heldout", "step": 2 * epochs, "iteration": epochs, "minutes": minutes,
                        "guidance_scale": 5.0, "overall": own, "cfg_free/overall": free})  # fmt: skip
    _write(path, sorted(records, key=lambda r: r["minutes"]))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"optimizer_steps_per_iteration": 2}, f)


def _nft_run(path, evals, start=0.234):
    records = [{"type": "train", "step": s, "minutes": s / 4, **({"reward": 0.6} if s % 4 == 1 else {})}
               for s in range(1, 41)]  # fmt: skip
    records += [{"type": "heldout", "step": 0, "minutes": 0.5, "overall": start}]
    records += [{"type": "heldout", "step": s, "minutes": m, "overall": acc} for m, s, acc in evals]
    _write(path, sorted(records, key=lambda r: r["minutes"]))


def test_summariser_pairs_ddpo_with_an_nft_run_given_by_path(tmp_path):
    root, nft = tmp_path / "pair", tmp_path / "elsewhere" / "unet_A"
    _ddpo_run(str(root / "ddpo"), [(0.5, 0, 0.31, 0.234), (4.0, 2, 0.33, 0.25), (8.0, 4, 0.36, 0.27)])
    _nft_run(str(nft), [(3.0, 12, 0.26), (6.0, 24, 0.34), (10.0, 40, 0.37)])
    text = nft_vs_grpo.summarise(str(root), nft_run=str(nft))
    # Own protocols: DDPO's best 0.36 (CFG 5) at 8 min, NFT (CFG-free) gets there at 10 min.
    assert "DDPO's best 0.360 (own protocols: NFT CFG-free, DDPO CFG): DDPO 8.0 min" in text
    assert "NFT 10.0 min (iteration 10): time ratio NFT / DDPO = 1.25" in text
    # Both CFG-free: DDPO's best 0.27 at 8 min, NFT passes it at 6 min.
    assert "DDPO's best 0.270 (both CFG-free): DDPO 8.0 min (iteration 4), NFT 6.0 min" in text
    assert "time ratio NFT / DDPO = 0.75, NFT speed-up 1.3x" in text
    assert "| DDPO (TRL 0.23.1, CFG 5) | 0.310 | 0.360 (8.0, 4) | 0.360 | 0.234 / 0.270 / 0.270 | 4 | 8 |" in text
    assert "| DiffusionNFT (UNet demo recipe) | 0.234 |" in text and "Warning" not in text
    summary = json.loads((root / "summary.json").read_text())
    assert summary["nft_run"] == str(nft)
    assert [(c["peer"], c["nft"], c["ratio"]) for c in summary["comparisons"]] == [
        ("ddpo", "nft-unet", pytest.approx(10 / 8)),
        ("ddpo", "nft-unet", pytest.approx(6 / 8)),
    ]
    assert (root / "nft_vs_grpo.png").is_file()
    # The UNet recipe's 4 optimizer steps per rollout batch; ddpo.py's from its config.json.
    assert nft_vs_grpo.steps_per_iteration("nft-unet", str(nft)) == 4
    assert nft_vs_grpo.steps_per_iteration("ddpo", str(root / "ddpo")) == 2
    # A pairing whose starts disagree (another base or precision) is flagged.
    _nft_run(str(nft), [(3.0, 12, 0.40)], start=0.324)
    assert "Warning: DiffusionNFT (UNet demo recipe) starts at 0.324 CFG-free" in nft_vs_grpo.summarise(
        str(root), nft_run=str(nft)
    )


def test_ddpo_command_uses_the_separate_environment():
    cmd = nft_vs_grpo.command("ddpo", "runs/x/ddpo", 20, 1.5, True, ["--seed", "1"], ddpo_python="/v/bin/python")
    assert cmd[0] == "/v/bin/python" and cmd[1].endswith(os.path.join("benchmarks", "ddpo.py"))
    assert cmd[2:] == [
        "--output_dir",
        "runs/x/ddpo",
        "--max_minutes",
        "20",
        "--eval_every_minutes",
        "1.5",
        "--seed",
        "1",
    ]
    unet = nft_vs_grpo.command("nft-unet", "runs/x/nft-unet", 20, 1.5, False, [])
    assert unet[1:5] == ["-m", "trl_nft.cli", "demo", "--model_name_or_path"] and unet[5] == "shapes-unet"
    assert unet[unet.index("--bf16") + 1] == "false"


def test_recipe_fields_and_their_checks():
    config = ddpo.DDPOBenchmarkConfig()
    fields = config.ddpo_config_kwargs()
    # 256 samples = 4 sampling batches of 64; 2 optimizer steps of 4 micro-batches of 32.
    assert fields["sample_num_batches_per_epoch"] * fields["sample_batch_size"] == 256
    assert fields["train_gradient_accumulation_steps"] == 4 and fields["train_batch_size"] == 32
    assert fields["mixed_precision"] == "no" and fields["sample_guidance_scale"] == 5.0 and config.use_cfg
    assert fields["sample_eta"] == 1.0 and fields["sample_num_steps"] == 10 and fields["train_learning_rate"] == 3e-4
    with pytest.raises(ValueError, match="multiple of sample_batch_size"):
        ddpo.DDPOBenchmarkConfig(sample_batch_size=48)
    with pytest.raises(ValueError, match="optimizer_steps_per_iteration"):
        ddpo.DDPOBenchmarkConfig(optimizer_steps_per_iteration=3)


DDPO_PYTHON = os.path.join(ROOT, ".venv-ddpo", "bin", "python")


@pytest.mark.skipif(not os.path.isfile(DDPO_PYTHON), reason="no DDPO environment (bash benchmarks/ddpo_env.sh)")
def test_one_real_ddpo_epoch_in_its_environment(tmp_path):
    """TRL 0.23.1's DDPOTrainer on the shipped UNet base, cut to 8 samples of 2 steps and 6 held-out items."""
    out = tmp_path / "ddpo"
    args = ["--output_dir", str(out), "--max_epochs", "1", "--samples_per_epoch", "8", "--sample_batch_size", "8",
            "--train_batch_size", "4", "--num_inference_steps", "2", "--eval_num_inference_steps", "2",
            "--heldout_per_tag", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([DDPO_PYTHON, os.path.join(ROOT, "benchmarks", "ddpo.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in records if r["type"] == "heldout"]
    train = [r for r in records if r["type"] == "train"]
    assert len(held) == 2 and held[0]["guidance_scale"] == 5.0
    assert {"overall", "cfg_free/overall", "tag/counting", "cfg_free/tag/counting"} <= set(held[0])
    # 8 samples in 2 optimizer steps of one micro-batch of 4; the rollout reward on the first.
    assert [r["step"] for r in train] == [1, 2] and 0 <= train[0]["reward"] <= 1 and "reward" not in train[1]
    assert all(np.isfinite(r["loss"]) for r in train)
    # On-policy first step: ratio 1, so DDPO's approx_kl is ~0; the LoRA moved.
    assert train[0]["approx_kl"] < 1e-6 and train[0]["lora/delta_norm"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["trl_version"] == "0.23.1" and config["optimizer_steps_per_iteration"] == 2
    from safetensors.torch import load_file

    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("unet.") and "lora" in k for k in lora)
    assert nft_vs_grpo.read_run(str(out), 2)["iterations"] == 1
