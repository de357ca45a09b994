"""Run by tests/test_multiprocess.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

Each process writes `<out>/rank<i>.json`: the prompts, rewards and optimality probabilities r of its share of one rollout
batch, digests of its rollout latents, the metrics of an `evaluate()` on 3 prompts (uneven over 2 processes), and the
error a reward raising on process 1 only produced here, whether resuming inside a rollout batch was exact, and how a
run ended whose process 0 got a SIGTERM.
"""

import hashlib
import json
import os
import signal
import sys


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main(out_dir: str):
    from transformers import TrainerCallback

    from trl_nft import DiffusionNFTConfig, DiffusionNFTTrainer
    from trl_nft.shapes import VOCABULARY
    from trl_nft.shapes.tiny import build_tiny_sd3_pipeline

    torch.set_num_threads(1)
    record = {"rewards": [], "prompts": [], "in_rollout": False}

    def brightness(prompts, images, **kwargs):
        values = images.mean(dim=(1, 2, 3)).tolist()
        if record.get("in_rollout"):
            record["prompts"].extend(prompts)
            record["rewards"].extend(values)
        return values

    class Recording(DiffusionNFTTrainer):
        def _generate_and_score(self, rows):
            record["in_rollout"] = "r" not in record
            batch = super()._generate_and_score(rows)
            record["in_rollout"] = False
            if "r" not in record:
                record["r"] = batch["r"].tolist()
                record["x0_digests"] = [hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in batch["x0"].cpu()]
            return batch

    def config(**overrides):
        kwargs = dict(
            output_dir=os.path.join(out_dir, "run"),
            max_steps=1,
            num_generations=4,
            per_device_train_batch_size=2,  # 2 processes x 2: one prompt's group spans both processes
            per_device_eval_batch_size=2,
            num_inference_steps=4,
            eval_num_inference_steps=4,
            max_sequence_length=2,
            lora_r=4,
            lora_alpha=8,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            num_eval_images_to_log=0,
            seed=0,
        )
        kwargs.update(overrides)
        return DiffusionNFTConfig(**kwargs)

    prompts = ["a red circle", "a blue square", "two green triangles", "a circle"]
    trainer = Recording(
        build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0),
        brightness,
        args=config(),
        train_dataset=[{"prompt": p} for p in prompts],
        eval_dataset=[{"prompt": p} for p in prompts[:3]],
    )
    rank = trainer.accelerator.process_index
    record.update(rank=rank, world_size=trainer.accelerator.num_processes)
    record["eval"] = trainer.evaluate()
    trainer.train()

    def fails_on_rank_1(prompts, images, **kwargs):
        if rank == 1:
            raise RuntimeError("reward server unreachable (injected on process 1)")
        return [0.5] * len(prompts)

    failing = DiffusionNFTTrainer(
        build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0),
        fails_on_rank_1,
        args=config(output_dir=os.path.join(out_dir, "failing")),
        train_dataset=[{"prompt": p} for p in prompts],
    )
    try:
        failing.train()
        record["failure"] = None
    except Exception as err:  # recorded for the test; the point is that every process gets here instead of hanging
        record["failure"] = f"{type(err).__name__}: {err}"

    # Resume inside a rollout batch: each process restores its own share of the buffered rollout batch.
    def weights(t):
        return [p.detach().clone() for p in t._trainable + t._old]

    layout = dict(max_steps=2, save_strategy="steps", save_steps=1, steps_per_generation=2, learning_rate=1e-2)
    resume_dir = os.path.join(out_dir, "resume")
    full = DiffusionNFTTrainer(
        build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0),
        brightness,
        args=config(output_dir=resume_dir, **layout),
        train_dataset=[{"prompt": p} for p in prompts],
    )
    full.train()
    resumed = DiffusionNFTTrainer(
        build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0),
        brightness,
        args=config(output_dir=resume_dir, **layout),
        train_dataset=[{"prompt": p} for p in prompts],
    )
    resumed.train(resume_from_checkpoint=os.path.join(resume_dir, "checkpoint-1"))
    record["resume_bitwise_equal"] = all(
        torch.equal(a, b) for a, b in zip(weights(full), weights(resumed), strict=True)
    )
    record["resumed_from_inside_a_rollout_batch"] = json.load(
        open(os.path.join(resume_dir, "checkpoint-1", "nft_state.json"))
    )["micro_step"]

    # SIGTERM reaching process 0 only: both processes checkpoint after the same step and exit with 128 + 15.
    class SigtermOnRank0(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if rank == 0 and state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    signal_dir = os.path.join(out_dir, "signal")
    stopped = DiffusionNFTTrainer(
        build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0),
        brightness,
        args=config(output_dir=signal_dir, max_steps=4),
        train_dataset=[{"prompt": p} for p in prompts],
        callbacks=[SigtermOnRank0()],
    )
    try:
        stopped.train()
        record["signal_exit"] = None
    except SystemExit as exit_info:
        record["signal_exit"] = exit_info.code
    record["signal_step"] = stopped.state.global_step
    record["signal_checkpoints"] = sorted(n for n in os.listdir(signal_dir) if n.startswith("checkpoint-"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1])
