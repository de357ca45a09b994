"""The trainer keeps `transformers.Trainer`'s contract (issue 13): inherited options, checkpoints and resume, the user's
pipeline dtype, non-finite steps. All on the real tiny StableDiffusion3Pipeline."""

import json
import logging
import os
import shutil
import signal

import pytest
import torch
from conftest import PROMPTS, tiny_config
from transformers import TrainerCallback


def _trainer(pipe, tmp_path, rewards="brightness", dataset=None, **overrides):
    from trl_nft import DiffusionNFTTrainer

    dataset = dataset if dataset is not None else [{"prompt": p} for p in PROMPTS]
    return DiffusionNFTTrainer(pipe, rewards, args=tiny_config(tmp_path, **overrides), train_dataset=dataset)


def _fresh_pipe():
    from trl_nft.shapes import VOCABULARY
    from trl_nft.shapes.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0)


def _weights(trainer):
    return [p.detach().clone() for p in trainer._trainable + trainer._old]


def _assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    differing = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if not torch.equal(x, y)]
    assert not differing, f"{len(differing)} of {len(a)} tensors differ"


# ------------------------------------------------------------------------------------------------ B: inherited options
@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("auto_find_batch_size", True, "auto_find_batch_size=True is not supported.*per_device_train_batch_size"),
        ("torch_compile", True, "torch_compile=True is not supported"),
        ("remove_unused_columns", True, "remove_unused_columns=True.*Set remove_unused_columns=False"),
        ("metric_for_best_model", "loss", "metric_for_best_model='loss'.*metric_for_best_model='reward'"),
        ("enable_jit_checkpoint", True, "enable_jit_checkpoint=True.*save_on_signal"),
        ("accelerator_config", {"split_batches": True}, "split_batches=True"),
        ("label_smoothing_factor", 0.1, "label_smoothing_factor"),
        ("bf16_full_eval", True, "bf16_full_eval=True.*torch_dtype=torch.bfloat16"),
        ("include_num_input_tokens_seen", "all", "include_num_input_tokens_seen"),
        ("gradient_checkpointing_kwargs", {"every_n_layers": 2}, "every_n_layers"),
    ],
)
def test_unsupported_training_arguments_are_refused_with_field_and_fix(tmp_path, field, value, match):
    from trl_nft import DiffusionNFTConfig

    extra = {"gradient_checkpointing": True} if field == "gradient_checkpointing_kwargs" else {}
    if field == "bf16_full_eval":
        extra = {"use_cpu": True}  # else Trainer's own "no bf16 on this machine" error comes first
    with pytest.raises(ValueError, match=match):
        DiffusionNFTConfig(output_dir=str(tmp_path), num_generations=2, report_to="none", **{field: value}, **extra)


def test_streaming_dataset_is_refused_at_construction(tiny_pipe, tmp_path):
    import datasets

    streaming = datasets.IterableDataset.from_generator(lambda: ({"prompt": p} for p in PROMPTS))
    with pytest.raises(ValueError, match=r"train_dataset is an IterableDataset \(streaming\).*Dataset.from_list"):
        _trainer(tiny_pipe, tmp_path, dataset=streaming)


def test_gradient_checkpointing_trains_like_without(tmp_path):
    runs = {}
    for checkpointing in (False, True):
        trainer = _trainer(
            _fresh_pipe(), tmp_path, max_steps=2, learning_rate=1e-2, gradient_checkpointing=checkpointing
        )
        trainer.train()
        assert trainer.adapter.denoiser.gradient_checkpointing is checkpointing
        runs[checkpointing] = _weights(trainer)
    for a, b in zip(runs[False], runs[True], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert any(not torch.equal(w, torch.zeros_like(w)) for w in runs[True])


def test_load_best_model_at_end_loads_the_best_checkpoint(tiny_pipe, tmp_path):
    from safetensors.torch import load_file

    from trl_nft import DiffusionNFTTrainer

    args = tiny_config(
        tmp_path,
        max_steps=2,
        learning_rate=3e-2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        eval_num_inference_steps=2,
        num_eval_images_to_log=0,
    )
    assert args.metric_for_best_model == "reward" and args.greater_is_better
    trainer = DiffusionNFTTrainer(
        tiny_pipe,
        "brightness",
        args=args,
        train_dataset=[{"prompt": p} for p in PROMPTS],
        eval_dataset=[{"prompt": p} for p in PROMPTS[:2]],
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.basename(best) in ("checkpoint-1", "checkpoint-2")
    saved = load_file(os.path.join(best, "nft_state.safetensors"))
    for name, p in zip(trainer._trainable_names, trainer._trainable, strict=True):
        assert torch.equal(p.detach().cpu(), saved[f"trained/{name}"])


# ------------------------------------------------------------------------------------------------ C: checkpoints
@pytest.mark.parametrize("layout", [{"steps_per_generation": 2}, {"num_iterations": 2}])
def test_resume_inside_a_rollout_batch_is_bitwise_exact(tmp_path, layout):
    """Checkpoint 1 lies inside the first rollout batch, checkpoint 2 on a rollout-batch boundary."""
    common = dict(max_steps=3, save_strategy="steps", save_steps=1, learning_rate=1e-2, per_device_train_batch_size=4)
    common.update(layout)
    full = _trainer(_fresh_pipe(), tmp_path, **common)
    full.train()
    reference = _weights(full)
    ckpt = tmp_path / "out" / "checkpoint-1"
    state = json.loads((ckpt / "nft_state.json").read_text())
    assert state["micro_step"] == 1 and state["batch_layout"]["per_device_train_batch_size"] == 4
    assert (ckpt / "rollout_buffer_0.safetensors").is_file()
    for step in (1, 2) if "steps_per_generation" in layout else (1,):
        resumed = _trainer(_fresh_pipe(), tmp_path, **common)
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / f"checkpoint-{step}"))
        assert resumed.state.global_step == 3
        _assert_bitwise_equal(_weights(resumed), reference)


def test_checkpoint_state_is_keyed_by_parameter_name_and_describes_itself(tiny_pipe, tmp_path):
    from safetensors.torch import load_file

    trainer = _trainer(tiny_pipe, tmp_path, max_steps=1, save_strategy="steps", save_steps=1, eval_ema_decay=0.9)
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-1"
    tensors = load_file(ckpt / "nft_state.safetensors")
    name = "transformer_blocks.0.attn.to_q.lora_A.default.weight"
    assert {f"trained/{name}", f"old/{name}", f"ema/{name}"} <= set(tensors)
    state = json.loads((ckpt / "nft_state.json").read_text())
    assert (
        state["lora"]["r"] == 4 and state["lora"]["lora_alpha"] == 8 and "attn.to_q" in state["lora"]["target_modules"]
    )
    assert state["batch_layout"]["num_generations"] == 4 and state["has_ema"]
    assert state["files"]["nft_state.safetensors"] == os.path.getsize(ckpt / "nft_state.safetensors")
    assert not list((tmp_path / "out").glob(".tmp-*")), "the staging directory must be renamed away"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"lora_r": 8}, r"LoRA config.* r=4, but this run has r=8"),
        ({"num_iterations": 2}, r"batch layout num_iterations=1, but this run has num_iterations=2"),
    ],
)
def test_resume_with_another_lora_config_or_batch_layout_names_the_field(tmp_path, override, match):
    from trl_nft._checkpoint import CheckpointError

    _trainer(_fresh_pipe(), tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
    resumed = _trainer(_fresh_pipe(), tmp_path, max_steps=2, **override)
    with pytest.raises(CheckpointError, match=match):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))


def test_a_crash_while_saving_leaves_the_previous_checkpoint_the_one_resume_uses(tmp_path, monkeypatch, caplog):
    from trl_nft import DiffusionNFTTrainer

    common = dict(max_steps=2, save_strategy="steps", save_steps=1, learning_rate=1e-2)
    trainer = _trainer(_fresh_pipe(), tmp_path, **common)
    original = DiffusionNFTTrainer._save_rng_state

    def crash_at_step_2(self, output_dir):
        if self.state.global_step == 2:
            raise OSError("disk full (injected)")
        return original(self, output_dir)

    monkeypatch.setattr(DiffusionNFTTrainer, "_save_rng_state", crash_at_step_2)
    with pytest.raises(OSError, match="injected"):
        trainer.train()
    monkeypatch.undo()
    out = tmp_path / "out"
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()
    # A half-written newest checkpoint as an older writer (or kill -9 on a non-atomic filesystem) leaves it.
    shutil.copytree(out / "checkpoint-1", out / "checkpoint-5")
    with open(out / "checkpoint-5" / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    resumed = _trainer(_fresh_pipe(), tmp_path, **common)
    with caplog.at_level(logging.INFO):
        resumed.train(resume_from_checkpoint=True)
    assert "Skipping incomplete checkpoint" in caplog.text and "checkpoint-5" in caplog.text
    assert f"Resuming from {out / 'checkpoint-1'}." in caplog.text
    assert resumed.state.global_step == 2


_KILL_TARGET = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import PROMPTS, tiny_config
from trl_nft import DiffusionNFTTrainer
from trl_nft.shapes import VOCABULARY
from trl_nft.shapes.tiny import build_tiny_sd3_pipeline
from pathlib import Path

args = tiny_config(Path({tmp!r}), max_steps=1000, save_strategy="steps", save_steps=1, learning_rate=1e-2)
trainer = DiffusionNFTTrainer(build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0), "brightness", args=args,
                              train_dataset=[{{"prompt": p}} for p in PROMPTS])
trainer.train()
"""


def test_kill_9_while_saving_leaves_a_checkpoint_that_resume_uses(tmp_path):
    """A real SIGKILL of a training process while it writes a checkpoint: the half-written one stays in its staging
    directory, and `resume_from_checkpoint=True` resumes from the newest complete checkpoint."""
    import subprocess
    import sys
    import time

    from trl_nft._checkpoint import STAGING_PREFIX, incomplete_reason

    out = tmp_path / "out"
    script = _KILL_TARGET.format(tests=os.path.dirname(__file__), tmp=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        # Kill as soon as a save of step >= 2 is in flight (its staging directory exists): checkpoint-1 is complete.
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and any(
                p.name.startswith(STAGING_PREFIX) and not p.name.endswith("-1") for p in out.iterdir()
            ):
                break
            time.sleep(0.002)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    complete = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if incomplete_reason(str(p)) is None)
    assert complete, "no complete checkpoint before the kill"
    newest = max(complete)
    resumed = _trainer(
        _fresh_pipe(), tmp_path, max_steps=newest + 1, save_strategy="steps", save_steps=1, learning_rate=1e-2
    )
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == newest + 1
    assert incomplete_reason(str(out / f"checkpoint-{newest + 1}")) is None


def test_corrupt_checkpoint_files_are_named_with_the_fix(tmp_path):
    from trl_nft._checkpoint import CheckpointError

    _trainer(_fresh_pipe(), tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
    ckpt = tmp_path / "out" / "checkpoint-1"
    for name, match in (
        ("nft_state.safetensors", r"nft_state.safetensors is corrupt or truncated.*earlier checkpoint"),
        ("optimizer.pt", r"optimizer.pt.*corrupt: resume from an earlier checkpoint"),
    ):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(ckpt, broken)
        size = os.path.getsize(broken / name)
        (broken / name).write_bytes(b"\x07" * size)  # same size: only reading it can tell
        with pytest.raises(CheckpointError, match=match):
            _trainer(_fresh_pipe(), tmp_path, max_steps=2).train(resume_from_checkpoint=str(broken))
    truncated = tmp_path / "truncated"
    shutil.copytree(ckpt, truncated)
    with open(truncated / "nft_state.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"truncated/nft_state.safetensors is truncated or altered"):
        _trainer(_fresh_pipe(), tmp_path, max_steps=2).train(resume_from_checkpoint=str(truncated))


def test_resume_with_an_ema_the_checkpoint_lacks_starts_it_from_the_trained_weights(tmp_path, caplog):
    _trainer(_fresh_pipe(), tmp_path, max_steps=1, save_strategy="steps", save_steps=1, learning_rate=1e-2).train()
    resumed = _trainer(_fresh_pipe(), tmp_path, max_steps=1, eval_ema_decay=0.9)
    with caplog.at_level(logging.WARNING):
        resumed._load_from_checkpoint(str(tmp_path / "out" / "checkpoint-1"))
    assert "saved without an evaluation EMA" in caplog.text
    _assert_bitwise_equal(resumed._ema, resumed._trainable)


class _SendSignal(TrainerCallback):
    def __init__(self, at_step, signals):
        self.at_step, self.signals = at_step, signals

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at_step:
            for sig in self.signals:
                os.kill(os.getpid(), sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_at_the_next_step_and_exits_naming_it(tiny_pipe, tmp_path, caplog, sig):
    trainer = _trainer(tiny_pipe, tmp_path, max_steps=3)  # save_strategy="no": the signal saves anyway
    trainer.add_callback(_SendSignal(2, [sig]))
    before = signal.getsignal(sig)
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as exit_info:
        trainer.train()
    assert exit_info.value.code == 128 + sig
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert f"saved checkpoint {ckpt}" in caplog.text
    from trl_nft._checkpoint import incomplete_reason

    assert incomplete_reason(str(ckpt)) is None and trainer.state.global_step == 2
    assert signal.getsignal(sig) is before  # handlers restored


def test_a_second_signal_aborts_at_once(tiny_pipe, tmp_path):
    trainer = _trainer(tiny_pipe, tmp_path, max_steps=3)
    trainer.add_callback(_SendSignal(2, [signal.SIGTERM, signal.SIGTERM]))
    with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
        trainer.train()
    assert not (tmp_path / "out" / "checkpoint-2").exists()


# ------------------------------------------------------------------------------------------------ D: the user's pipeline
@pytest.mark.parametrize("bf16", [False, True])
def test_a_bfloat16_pipeline_trains_float32_adapters(tmp_path, bf16):
    pipe = _fresh_pipe().to(torch.bfloat16)
    trainer = _trainer(pipe, tmp_path, max_steps=2, learning_rate=1e-3, bf16=bf16)
    denoiser = trainer.adapter.denoiser
    lora = {n: p for n, p in denoiser.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())  # both adapters, "default" and "old"
    assert all(p.dtype == torch.bfloat16 for n, p in denoiser.named_parameters() if "lora_" not in n)
    assert pipe.vae.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    lora_a = {n: p.detach().clone() for n, p in lora.items() if "lora_A.default" in n}
    trainer.train()
    assert all(p.isfinite().all() for p in lora.values())
    # lora_B starts at zero, so lora_A first gets gradients at step 2: an Adam update of ~lr=1e-3, which bfloat16 weights
    # of magnitude ~0.25 (resolution ~2e-3) would round away.
    unchanged = [n for n, before in lora_a.items() if torch.equal(before, lora[n])]
    assert not unchanged, unchanged
    moved = max((lora[n] - before).abs().max().item() for n, before in lora_a.items())
    assert 1e-4 < moved < 1e-2


def test_model_init_kwargs_load_the_pipeline_as_asked(tiny_pipe, tmp_path):
    from trl_nft import DiffusionNFTTrainer

    path = tmp_path / "pipe"
    tiny_pipe.save_pretrained(str(path))
    args = tiny_config(tmp_path, max_steps=1, model_init_kwargs={"torch_dtype": "bfloat16"})
    trainer = DiffusionNFTTrainer(str(path), "brightness", args=args, train_dataset=[{"prompt": p} for p in PROMPTS])
    assert trainer.pipeline.transformer.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer._trainable + trainer._old)
    trainer.train()
    with pytest.raises(ValueError, match="model_init_kwargs is set but `model` is an already loaded pipeline"):
        DiffusionNFTTrainer(tiny_pipe, "brightness", args=args, train_dataset=[{"prompt": p} for p in PROMPTS])
    bad = tiny_config(tmp_path, model_init_kwargs={"torch_dtype": "bfloat17"})
    with pytest.raises(ValueError, match="'bfloat17' is not a torch dtype"):
        DiffusionNFTTrainer(str(path), "brightness", args=bad, train_dataset=[{"prompt": p} for p in PROMPTS])


def test_a_pipeline_with_lora_already_loaded_is_refused_with_the_fix(tmp_path):
    from peft import LoraConfig

    pipe = _fresh_pipe()
    pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=["attn.to_q"]), adapter_name="style")
    with pytest.raises(ValueError, match=r"already carries LoRA adapters \['style'\].*pipe.fuse_lora\(\)"):
        _trainer(pipe, tmp_path)


def test_full_finetuning_of_a_half_precision_denoiser_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"use_lora=False would fine-tune.*torch_dtype=torch.float32"):
        _trainer(_fresh_pipe().to(torch.bfloat16), tmp_path, use_lora=False)


# ------------------------------------------------------------------------------------------------ G: non-finite steps
class _Record(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.weights = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = _weights(self.trainer)


def test_a_non_finite_step_is_skipped_and_training_goes_on(tiny_pipe, tmp_path, caplog):
    trainer = _trainer(tiny_pipe, tmp_path, max_steps=3, learning_rate=1e-2)
    record = _Record(trainer)
    trainer.add_callback(record)
    layer = trainer.adapter.denoiser.transformer_blocks[0].attn.to_q

    def nan_at_step_2(module, inputs, output):
        if trainer.state.global_step == 1 and torch.is_grad_enabled():
            return output * float("nan")
        return output

    layer.register_forward_hook(nan_at_step_2)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "Step 2: the loss or a gradient is not finite; skipping the step" in caplog.text
    _assert_bitwise_equal(record.weights[2], record.weights[1])  # no weight, old-policy update
    assert not all(torch.equal(a, b) for a, b in zip(record.weights[3], record.weights[2], strict=True))
    assert all(w.isfinite().all() for w in record.weights[3])


def test_repeated_non_finite_steps_stop_naming_the_last_good_checkpoint(tiny_pipe, tmp_path):
    from safetensors.torch import load_file

    trainer = _trainer(
        tiny_pipe,
        tmp_path,
        max_steps=8,
        learning_rate=1e12,
        max_grad_norm=0.0,
        save_strategy="steps",
        save_steps=1,
        max_nonfinite_steps=1,
        # The blown-up policy's images are NaN: score them as missing so that the non-finite *step* guard is reached
        # (by default the reward boundary stops the run first, naming the reward).
        non_finite_rewards="missing",
    )
    with pytest.raises(
        RuntimeError, match=r"max_nonfinite_steps=1\); stopping.*The last good checkpoint is .*checkpoint-"
    ):
        trainer.train()
    assert all(p.isfinite().all() for p in trainer._trainable)
    for ckpt in (tmp_path / "out").glob("checkpoint-*"):
        for tensor in load_file(ckpt / "pytorch_lora_weights.safetensors").values():
            assert tensor.isfinite().all(), ckpt
