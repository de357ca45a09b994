"""Two real processes (`accelerate launch --multi_gpu --num_processes 2`: gloo on CPU, NCCL on GPUs) on the tiny
pipeline: the advantages each process trains on are the one-process advantages of the gathered rollout batch, the
processes sample different noise, `evaluate()` splits prompts unevenly, a reward raising on one process stops all, and
a run resumes exactly from inside a rollout batch."""

import json
import os
import socket
import subprocess
import sys

import torch
from conftest import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_and_fail_together(tmp_path, tiny_pipe):
    from trl_nft import DiffusionNFTTrainer, core

    script = os.path.join(os.path.dirname(__file__), "two_process_run.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(script)), env.get("PYTHONPATH", "")])
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={_free_port()}",
        script,
        str(tmp_path),
    ]
    # A hang (one process waiting in a collective for another that died) fails here instead of blocking the suite.
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    # Advantages: each process trains on its slice of the advantages of the whole (gathered) rollout batch.
    prompts = ranks[0]["prompts"] + ranks[1]["prompts"]
    rewards = torch.tensor(ranks[0]["rewards"] + ranks[1]["rewards"]).unsqueeze(1)
    assert len(prompts) == 4 and len(set(prompts)) == 1  # one prompt's group of 4 spans both processes
    advantages, _ = core.compute_advantages(
        core.combine_rewards(rewards, torch.ones(1)), core.group_ids_from_keys(prompts), scale_rewards="batch"
    )
    expected = core.optimality_probability(advantages, 5.0)
    torch.testing.assert_close(torch.tensor(ranks[0]["r"] + ranks[1]["r"]), expected, rtol=0, atol=1e-6)
    # Every process samples its own noise: the 4 images of the group are distinct.
    digests = ranks[0]["x0_digests"] + ranks[1]["x0_digests"]
    assert len(set(digests)) == 4

    # evaluate() on 3 prompts over 2 processes (2 + 1 rows) equals a one-process evaluation of the same rows.
    args = tiny_config(tmp_path / "one", per_device_train_batch_size=4, per_device_eval_batch_size=2)
    one = DiffusionNFTTrainer(
        tiny_pipe,
        "brightness",
        args=args,
        train_dataset=[{"prompt": "a red circle"}],
        eval_dataset=[{"prompt": p} for p in ("a red circle", "a blue square", "two green triangles")],
    )
    single = one.evaluate()
    for rank in ranks:
        assert abs(rank["eval"]["eval_reward"] - single["eval_reward"]) < 1e-5
        assert abs(rank["eval"]["eval_reward_std"] - single["eval_reward_std"]) < 1e-5

    # Resuming inside a rollout batch (steps_per_generation=2, checkpoint after step 1) is exact on every process.
    assert [r["resumed_from_inside_a_rollout_batch"] for r in ranks] == [1, 1]
    assert [r["resume_bitwise_equal"] for r in ranks] == [True, True]

    # SIGTERM to process 0 only: both processes stop after the same step, with one complete checkpoint, and exit 143.
    assert [r["signal_exit"] for r in ranks] == [143, 143]
    assert [r["signal_step"] for r in ranks] == [2, 2]
    assert ranks[0]["signal_checkpoints"] == ["checkpoint-2"]

    # A reward raising on process 1 only: process 1 raises it, process 0 raises naming process 1; nobody hangs.
    assert "injected on process 1" in ranks[1]["failure"]
    assert "raised on process(es) [1]" in ranks[0]["failure"]


def test_demo_on_two_processes_splits_the_batch_and_the_heldout_items(tmp_path):
    """`accelerate launch --num_processes 2 -m trl_nft.cli demo`: the recipe's batch is split over the processes, the
    held-out evaluation is split over them and gathered back (equal to a one-process evaluation of the same weights),
    and process 0 alone writes the records and the summary."""
    from trl_nft.shapes.evaluate import evaluate_pipeline
    from trl_nft.shapes.pretrain import load_base_pipeline
    from trl_nft.shapes.world import heldout_items

    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={_free_port()}",
        "-m",
        "trl_nft.cli",
        "demo",
        "--output_dir",
        str(out),
        "--precision",
        "fp32",
        "--max_steps",
        "2",
        "--steps_per_generation",
        "1",
        "--heldout_per_tag",
        "3",
        "--eval_every_minutes",
        "100",
        "--num_sample_images",
        "4",
        "--disable_tqdm",
        "true",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "heldout_table.json").read_text())
    assert "2 processes of 32 samples per optimizer step each" in summary["precision"], summary["precision"]
    assert summary["steps"] == 2 and summary["heldout_items"] == 18
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in records if r["type"] == "heldout"]
    assert [r["step"] for r in held] == [0, 2]  # written once, by process 0
    assert [r["step"] for r in records if r["type"] == "train" and "loss" in r] == [1, 2]
    # The base's evaluation, split over two processes and gathered, is the one-process evaluation (to one item's
    # flip: other batch sizes and thread counts round differently, and the judge thresholds pixels).
    single = evaluate_pipeline(load_base_pipeline("shapes-base"), heldout_items(n_per_tag=3))
    assert abs(held[0]["overall"] - single["table"]["overall"]) <= 1 / 18 + 1e-9, (held[0], single["table"])
    assert abs(held[0]["partial"] - single["partial"]) < 0.02
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "samples.png").is_file()
