"""DiffusionNFTTrainer on a real (tiny, randomly initialised) StableDiffusion3Pipeline."""

import asyncio
import math
import os

import pytest
import torch
from conftest import PROMPTS, tiny_config


def _trainer(pipe, tmp_path, rewards="brightness", dataset=None, **overrides):
    from trl_nft import DiffusionNFTTrainer

    dataset = dataset if dataset is not None else [{"prompt": p} for p in PROMPTS]
    return DiffusionNFTTrainer(pipe, rewards, args=tiny_config(tmp_path, **overrides), train_dataset=dataset)


def _snapshot(pipe):
    return {
        f"{name}.{k}": v.detach().clone()
        for name, comp in pipe.components.items()
        if isinstance(comp, torch.nn.Module)
        for k, v in comp.state_dict().items()
    }


def test_minimal_config_runs(tiny_pipe, tmp_path):
    """`DiffusionNFTConfig(output_dir, max_steps, num_generations)` alone gives a working run."""
    from trl_nft import DiffusionNFTConfig, DiffusionNFTTrainer

    args = DiffusionNFTConfig(output_dir=str(tmp_path), max_steps=1, num_generations=3, report_to="none")
    assert args.per_device_train_batch_size == 3 and args.generation_batch_size == 3
    trainer = DiffusionNFTTrainer(tiny_pipe, "brightness", args=args, train_dataset=[{"prompt": p} for p in PROMPTS])
    trainer.train()
    assert trainer.state.global_step == 1
    logged = trainer.state.log_history[0]
    for key in (
        "loss",
        "reward",
        "reward_std",
        "rewards/brightness/mean",
        "rewards/brightness/std",
        "kl",
        "frac_reward_zero_std",
        "old_policy/deviation",
        "old_policy/decay",
        "samples/x0_norm",
        "samples/images_per_second",
        "step_time",
    ):
        assert key in logged and logged[key] is not None and math.isfinite(logged[key]), key
    assert logged["old_policy/decay"] == pytest.approx(0.001)  # paper: eta_1 = min(0.001 * 1, 0.5)
    assert logged["step_time"] > 0


def test_training_changes_only_the_lora_adapters(tiny_pipe, tmp_path):
    trainer = _trainer(tiny_pipe, tmp_path, max_steps=3, learning_rate=1e-2)
    before = _snapshot(tiny_pipe)
    trainer.train()
    after = _snapshot(tiny_pipe)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    assert all("lora_" in k for k in changed), sorted(k for k in changed if "lora_" not in k)[:5]
    assert any(".default." in k for k in changed)
    assert any(".old." in k for k in changed)  # soft-updated towards the trained adapter
    default = {k for k in after if ".default." in k and "lora_B" in k}
    # The last SD3 block discards its text-stream output, so its text-query projection gets no gradient.
    no_grad = {"transformer.transformer_blocks.1.attn.add_q_proj.lora_B.default.weight"}
    assert default and default - changed == no_grad
    # the old policy trails the trained one: eta > 0, so old != default
    for k in default - no_grad:
        assert not torch.equal(after[k], after[k.replace(".default.", ".old.")])


def test_timesteps_per_forward_changes_cost_not_what_is_computed(tmp_path):
    """One forward per training time (official), uneven chunks (2 + 1) and all times stacked in one forward give the
    same adapter after two SGD steps (up to float summation order; Adam would magnify rounding in near-zero
    gradients) and the same logged loss."""
    from trl_nft.shapes import VOCABULARY
    from trl_nft.shapes.tiny import build_tiny_sd3_pipeline

    results = {}
    for per_forward in (1, 2, 3):  # tiny_config trains int(4 * 0.99) = 3 times per sample
        pipe = build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0)
        trainer = _trainer(
            pipe, tmp_path / str(per_forward), timesteps_per_forward=per_forward, learning_rate=1.0, optim="sgd"
        )
        trainer.train()
        weights = {k: v for k, v in _snapshot(pipe).items() if ".default." in k}
        results[per_forward] = (weights, [log["policy_loss"] for log in trainer.state.log_history[:2]])
    weights_1, losses_1 = results[1]
    for per_forward in (2, 3):
        weights, losses = results[per_forward]
        assert losses == pytest.approx(losses_1, rel=1e-4)
        for k, v in weights.items():
            torch.testing.assert_close(v, weights_1[k], rtol=1e-4, atol=1e-6, msg=f"{per_forward}: {k}")
    # ...and they trained: LoRA B matrices start at zero.
    assert any(v.abs().max() > 0 for k, v in weights_1.items() if "lora_B" in k)


def test_frozen_policies_switch_adapters_once_per_micro_batch(tiny_pipe, tmp_path):
    """The old (and, with KL, the reference) policy's predictions of all training times come before the trained
    forwards, with one adapter switch each per micro-batch: peft's `set_adapter` walks every LoRA layer, and a switch
    per training time cost the official loop's order about 40 ms per optimizer step on the shapes base."""
    trainer = _trainer(tiny_pipe, tmp_path, timesteps_per_forward=1, kl_weight=0.1, max_steps=2)
    denoiser = trainer.adapter.denoiser
    calls, in_step = [], []  # adapter switches made inside training_step (rollouts switch to the old policy too)
    for name in ("set_adapter", "disable_adapters"):
        original = getattr(denoiser, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            if in_step and in_step[-1]:
                calls.append((_name, *args))
            return _original(*args, **kwargs)

        setattr(denoiser, name, counted)
    training_step = trainer.training_step

    def marked(*args, **kwargs):
        in_step.append(True)
        try:
            return training_step(*args, **kwargs)
        finally:
            in_step.pop()

    prepare_inputs = trainer._prepare_inputs

    def unmarked(*args, **kwargs):  # where training_step generates a new rollout batch (under the old policy)
        in_step.append(False)
        try:
            return prepare_inputs(*args, **kwargs)
        finally:
            in_step.pop()

    trainer.training_step, trainer._prepare_inputs = marked, unmarked
    trainer.train()
    micro_batches = trainer.state.global_step * trainer.args.gradient_accumulation_steps
    assert trainer.args.timesteps_per_forward == 1 and trainer.args.num_train_timesteps > 1
    assert calls.count(("set_adapter", "old")) == micro_batches
    assert calls.count(("disable_adapters",)) == micro_batches


@pytest.mark.parametrize("scheduler_name", ["euler", "heun", "dpmpp_flow"])
def test_any_scheduler_is_a_black_box_solver(tiny_pipe, tmp_path, scheduler_name):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    config = tiny_pipe.scheduler.config
    tiny_pipe.scheduler = {
        "euler": lambda: FlowMatchEulerDiscreteScheduler.from_config(config),
        "heun": lambda: FlowMatchHeunDiscreteScheduler.from_config(config),
        "dpmpp_flow": lambda: DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++",
            solver_order=2,
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            flow_shift=2.0,
        ),
    }[scheduler_name]()
    trainer = _trainer(tiny_pipe, tmp_path, max_steps=2, learning_rate=1e-2)
    before = _snapshot(tiny_pipe)
    trainer.train()
    grid = trainer._rollout_grid
    assert grid.numel() == 4 and (grid > 0).all() and (grid <= 1).all() and (grid[:-1] > grid[1:]).all()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    after = _snapshot(tiny_pipe)
    assert any(not torch.equal(before[k], after[k]) for k in before if ".default." in k)


def test_saved_lora_reproduces_the_trained_policy(tiny_pipe, tmp_path):
    from trl_nft.shapes import VOCABULARY
    from trl_nft.shapes.tiny import build_tiny_sd3_pipeline

    trainer = _trainer(tiny_pipe, tmp_path, max_steps=3, learning_rate=3e-2)  # alpha 8 != r 4: the scale must survive
    trainer.train()
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    def sample(pipe):
        g = torch.Generator().manual_seed(123)
        return pipe(
            ["a red circle", "two blue squares"],
            num_inference_steps=4,
            guidance_scale=1.0,
            generator=g,
            output_type="pt",
            max_sequence_length=2,
        ).images

    trained = sample(trainer.pipeline)  # the trained ("default") adapter is the active one after training
    fresh = build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0)
    base = sample(fresh)
    fresh.load_lora_weights(str(out))
    loaded = sample(fresh)
    assert not torch.equal(base, trained), "the adapter must change the images for this check to mean anything"
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-6)


def test_rewards_multiple_async_none_and_other_columns(tiny_pipe, tmp_path):
    seen = {}

    def tagged(prompts, images, tag, trainer_state, log_metric, **kwargs):
        seen["tag"], seen["step"] = tag, trainer_state.global_step
        log_metric("custom/metric", 0.25)
        return [None if i == 0 else 1.0 for i in range(len(prompts))]

    async def async_bright(prompts, images, **kwargs):
        await asyncio.sleep(0)
        return images.mean(dim=(1, 2, 3))

    dataset = [{"prompt": p, "tag": f"tag-{i}"} for i, p in enumerate(PROMPTS)]
    trainer = _trainer(
        tiny_pipe, tmp_path, rewards=[tagged, async_bright], dataset=dataset, max_steps=1, reward_weights=[2.0, 1.0]
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["rewards/tagged/mean"] == 1.0
    assert 0 < logs["rewards/async_bright/mean"] < 1
    assert logs["custom/metric"] == 0.25
    # a missing score counts as 0 in the weighted sum (one of the 8 images has none)
    assert logs["reward"] == pytest.approx(2.0 * 7 / 8 + logs["rewards/async_bright/mean"], rel=1e-5)
    assert seen["tag"][0].startswith("tag-") and len(seen["tag"]) == 8 and seen["step"] == 0


def test_evaluate_is_deterministic_and_logs_rewards(tiny_pipe, tmp_path):
    from trl_nft import DiffusionNFTTrainer

    trainer = DiffusionNFTTrainer(
        tiny_pipe,
        "brightness",
        args=tiny_config(tmp_path),
        train_dataset=[{"prompt": p} for p in PROMPTS],
        eval_dataset=[{"prompt": p} for p in PROMPTS],
    )
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_reward"] == second["eval_reward"]
    assert "eval_rewards/brightness/mean" in first and "eval_reward_std" in first


def test_lora_initialisation_follows_the_seed(tmp_path):
    """The adapters are created before Trainer seeds; the trainer must seed first so runs repeat across processes."""
    from trl_nft.shapes import VOCABULARY
    from trl_nft.shapes.tiny import build_tiny_sd3_pipeline

    def lora_init(seed, rng_noise):
        pipe = build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0)
        torch.manual_seed(rng_noise)  # whatever the caller did with the global RNG before
        trainer = _trainer(pipe, tmp_path, max_steps=1, seed=seed)
        return [p.detach().clone() for p in trainer._trainable]

    first, second, other = lora_init(0, 1), lora_init(0, 2), lora_init(1, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_eval_ema_weights_are_what_evaluation_and_saving_use(tiny_pipe, tmp_path):
    from safetensors.torch import load_file

    trainer = _trainer(tiny_pipe, tmp_path, max_steps=3, learning_rate=1e-2, eval_ema_decay=0.9)
    trainer.train()
    trained = [p.detach().clone() for p in trainer._trainable]
    assert not all(torch.equal(p, e) for p, e in zip(trained, trainer._ema, strict=True))
    with trainer.evaluation_weights():
        assert all(torch.equal(p, e) for p, e in zip(trainer._trainable, trainer._ema, strict=True))
    assert all(torch.equal(p, t) for p, t in zip(trainer._trainable, trained, strict=True))  # swapped back
    trainer.save_model(str(tmp_path / "adapter"))
    saved = load_file(tmp_path / "adapter" / "pytorch_lora_weights.safetensors")
    saved_norm = sum(float(v.double().pow(2).sum()) for v in saved.values())
    assert saved_norm == pytest.approx(sum(float(e.double().pow(2).sum()) for e in trainer._ema), rel=1e-6)
    assert saved_norm != pytest.approx(sum(float(t.double().pow(2).sum()) for t in trained), rel=1e-6)


def test_full_finetuning_path(tiny_pipe, tmp_path):
    trainer = _trainer(tiny_pipe, tmp_path, max_steps=2, use_lora=False, learning_rate=1e-3)
    before = _snapshot(tiny_pipe)
    trainer.train()
    after = _snapshot(tiny_pipe)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("transformer.") for k in changed)
    trainer.save_model(str(tmp_path / "full"))
    assert (tmp_path / "full" / "transformer" / "config.json").is_file()


def test_checkpoint_holds_adapter_old_policy_and_card_and_resumes(tiny_pipe, tmp_path):
    trainer = _trainer(tiny_pipe, tmp_path, max_steps=2, save_strategy="steps", save_steps=1, learning_rate=1e-2)
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-1"
    for name in ("pytorch_lora_weights.safetensors", "nft_state.safetensors", "README.md", "optimizer.pt"):
        assert (ckpt / name).is_file(), name
    card = (ckpt / "README.md").read_text()
    assert "library_name: diffusers" in card and "pipeline_tag: text-to-image" in card
    assert "load_lora_weights" in card and "DiffusionNFT" in card
    final_old = [p.detach().clone() for p in trainer._old]

    from trl_nft.shapes import VOCABULARY
    from trl_nft.shapes.tiny import build_tiny_sd3_pipeline

    resumed = _trainer(
        build_tiny_sd3_pipeline(VOCABULARY, "test", seed=0),
        tmp_path,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        learning_rate=1e-2,
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 2
    for a, b in zip(final_old, resumed._old, strict=True):
        assert a.shape == b.shape


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_fail_before_training(tiny_pipe, tmp_path):
    from trl_nft import DiffusionNFTConfig, DiffusionNFTTrainer

    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        DiffusionNFTConfig(output_dir=str(tmp_path), num_generations=1)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        DiffusionNFTConfig(output_dir=str(tmp_path), num_generations=3, per_device_train_batch_size=8)
    with pytest.raises(ValueError, match="nft_beta"):
        DiffusionNFTConfig(output_dir=str(tmp_path), num_generations=2, nft_beta=0)
    with pytest.raises(ValueError, match="old_policy_decay"):
        DiffusionNFTConfig(output_dir=str(tmp_path), num_generations=2, old_policy_decay="cosine")
    with pytest.raises(ValueError, match="loss_type"):
        DiffusionNFTConfig(output_dir=str(tmp_path), num_generations=2, loss_type="l2")

    with pytest.raises(ValueError, match="no 'prompt' column"):
        DiffusionNFTTrainer(tiny_pipe, "brightness", args=tiny_config(tmp_path), train_dataset=[{"text": "a"}])
    with pytest.raises(ValueError, match="resolution 18 is not a multiple of 4"):
        DiffusionNFTTrainer(
            tiny_pipe,
            "brightness",
            args=tiny_config(tmp_path, resolution=18),
            train_dataset=[{"prompt": p} for p in PROMPTS],
        )
    with pytest.raises(ValueError, match="reward_weights has 2 entries"):
        _trainer(tiny_pipe, tmp_path, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="Unknown reward 'nope'"):
        _trainer(tiny_pipe, tmp_path, rewards="nope")


def test_reward_of_wrong_length_fails_before_any_update(tiny_pipe, tmp_path):
    trainer = _trainer(tiny_pipe, tmp_path, rewards=lambda prompts, images, **kw: [1.0, 2.0])
    before = _snapshot(tiny_pipe)
    with pytest.raises(ValueError, match=r"returned 2 scores for 8 images"):
        trainer.train()
    assert trainer.state.global_step == 0
    after = _snapshot(tiny_pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_string_model_is_loaded_with_from_pretrained(tiny_pipe, tmp_path):
    from trl_nft import DiffusionNFTTrainer

    path = tmp_path / "pipe"
    tiny_pipe.save_pretrained(str(path))
    trainer = DiffusionNFTTrainer(
        str(path),
        "brightness",
        args=tiny_config(tmp_path, max_steps=1),
        train_dataset=[{"prompt": p} for p in PROMPTS],
    )
    assert type(trainer.pipeline).__name__ == "StableDiffusion3Pipeline"
    assert trainer.base_model_id == str(path)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_rollout_and_eval_images_reach_tensorboard_and_the_public_hook(tiny_pipe, tmp_path, monkeypatch):
    import warnings

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import TrainerCallback

    from trl_nft import DiffusionNFTTrainer

    class Gallery(TrainerCallback):
        def __init__(self):
            self.calls = []

        def on_log_images(self, args, state, control, key, images, captions, grid, **kwargs):
            self.calls.append((key, state.global_step, len(images), captions, grid.size))

    gallery = Gallery()
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = tiny_config(
        tmp_path,
        max_steps=1,
        report_to=["tensorboard"],
        eval_strategy="steps",
        eval_steps=1,
        num_eval_images_to_log=4,
        num_rollout_images_to_log=4,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = DiffusionNFTTrainer(
            tiny_pipe,
            "brightness",
            args=args,
            train_dataset=[{"prompt": p} for p in PROMPTS],
            eval_dataset=[{"prompt": p} for p in PROMPTS],
            callbacks=[gallery],
        )
    assert not [w for w in caught if "multiple adapters" in str(w.message)]  # the second adapter is by design
    trainer.train()  # eval_strategy="steps" runs evaluate() after step 1, as in any Trainer
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"eval/samples", "train/rollout_samples"} <= set(events.Tags()["images"])
    image = events.Images("eval/samples")[-1]
    assert image.step == 1 and image.width >= 4 * 32 and image.height >= 32
    assert events.Images("train/rollout_samples")[-1].step == 1
    scalars = events.Tags()["scalars"]
    assert {"eval/reward", "train/reward", "train/old_policy/deviation", "train/step_time"} <= set(scalars)
    keys = [call[0] for call in gallery.calls]
    assert keys == ["train/rollout_samples", "eval/samples"]
    rollout = gallery.calls[0]
    assert rollout[2] == 4 and all(c.startswith("R=") and " r=" in c for c in rollout[3])
    assert gallery.calls[1][3] == PROMPTS[:4]


def test_log_mode_follows_the_model_mode(tiny_pipe, tmp_path):
    """An evaluation under another prefix is still logged as an evaluation and leaves the training window alone."""
    trainer = _trainer(tiny_pipe, tmp_path, max_steps=1)
    trainer.eval_dataset = trainer._as_dataset([{"prompt": p} for p in PROMPTS[:2]], "eval_dataset")
    trainer.model.train()
    trainer._metrics["train"]["reward"].append(0.5)
    metrics = trainer.evaluate(metric_key_prefix="test")
    assert "test_reward" in metrics and trainer.model.training
    assert trainer._metrics["train"]["reward"] == [0.5]
    assert "reward" not in trainer.state.log_history[-1]


def test_bf16_on_a_cpu_only_machine_means_cpu_autocast(tmp_path):
    """One config (the shapes demo's) must work on GPU and CPU-only machines; Trainer alone rejects bf16 without use_cpu."""
    from trl_nft import DiffusionNFTConfig
    from trl_nft.config import _has_accelerator

    args = DiffusionNFTConfig(output_dir=str(tmp_path), bf16=True, report_to="none")
    assert args.bf16 and args.use_cpu == (not _has_accelerator())


def test_non_finite_reward_fails_before_any_update_or_is_missing_by_choice(tiny_pipe, tmp_path, caplog):
    """Issue 13-A: one -inf of eight used to turn every LoRA tensor into NaN."""

    def spiky(prompts, images, **kwargs):
        return [float("-inf") if i == 3 else float(images[i].mean()) for i in range(len(prompts))]

    trainer = _trainer(tiny_pipe, tmp_path, rewards=spiky, max_steps=1)
    before = _snapshot(tiny_pipe)
    with pytest.raises(ValueError, match=r"'spiky' returned 1 non-finite score\(s\) for 8 images \(image 3: -inf\)"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in _snapshot(tiny_pipe).items())


def test_non_finite_rewards_missing_trains_on_the_rest(tiny_pipe, tmp_path, caplog):
    def spiky(prompts, images, **kwargs):
        return [float("-inf") if i == 3 else float(images[i].mean()) for i in range(len(prompts))]

    def dead(prompts, images, **kwargs):
        return [float("nan")] * len(prompts)

    trainer = _trainer(tiny_pipe, tmp_path, rewards=[spiky, dead], max_steps=1, non_finite_rewards="missing")
    import logging

    with caplog.at_level(logging.WARNING):
        trainer.train()
    logs = trainer.state.log_history[0]
    assert "treated as missing" in caplog.text
    assert all(torch.isfinite(p).all() for p in trainer._trainable)
    assert math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"])
    assert logs["rewards/spiky/frac_missing"] == 1 / 8 and logs["rewards/dead/frac_missing"] == 1.0
    # the dead reward is reported as carrying no signal, not as healthy
    assert logs["rewards/dead/frac_zero_std"] == 1.0 and logs["rewards/spiky/frac_zero_std"] == 0.0
    assert logs["rewards/dead/mean"] is None


def test_all_rewards_missing_is_warned_and_counted_as_zero_std(tiny_pipe, tmp_path, caplog):
    import logging

    def nothing(prompts, images, **kwargs):
        return [None] * len(prompts)

    trainer = _trainer(tiny_pipe, tmp_path, rewards=nothing, max_steps=1)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "No reward function scored 8 of 8 images" in caplog.text
    assert trainer.state.log_history[0]["frac_reward_zero_std"] == 1.0


def test_partials_and_instances_of_one_reward_are_logged_apart(tiny_pipe, tmp_path):
    import functools

    def scaled(prompts, images, scale, **kwargs):
        return (scale * images.mean(dim=(1, 2, 3))).tolist()

    trainer = _trainer(
        tiny_pipe, tmp_path, rewards=[functools.partial(scaled, scale=1.0), functools.partial(scaled, scale=3.0)]
    )
    assert trainer.reward_func_names == ["scaled_1", "scaled_2"]
    trainer.args.max_steps = 1
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["rewards/scaled_2/mean"] == pytest.approx(3 * logs["rewards/scaled_1/mean"], rel=1e-5)


def test_dataset_columns_that_shadow_reward_arguments_are_refused(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset has column\(s\) \['images'\]"):
        _trainer(tiny_pipe, tmp_path, dataset=[{"prompt": p, "images": "x"} for p in PROMPTS])
    from trl_nft import DiffusionNFTTrainer

    with pytest.raises(ValueError, match=r"eval_dataset has column\(s\) \['trainer_state'\]"):
        DiffusionNFTTrainer(
            tiny_pipe,
            "brightness",
            args=tiny_config(tmp_path),
            train_dataset=[{"prompt": p} for p in PROMPTS],
            eval_dataset=[{"prompt": p, "trainer_state": 1} for p in PROMPTS],
        )


def test_async_reward_trains_inside_a_running_event_loop_with_gdpo_and_extras(tiny_pipe, tmp_path):
    """Issue 13-E: `trainer.train()` in a notebook cell (a running loop) used to fail after the rollout."""

    async def async_bright(prompts, images, **kwargs):
        await asyncio.sleep(0)
        values = images.mean(dim=(1, 2, 3))
        return {"scores": values, "doubled": (2 * values).tolist()}

    def tiny_spread(prompts, images, **kwargs):
        return (1e-3 * images[:, 0].mean(dim=(1, 2))).tolist()

    trainer = _trainer(
        tiny_pipe, tmp_path, rewards=[async_bright, tiny_spread], max_steps=1, reward_aggregation="normalize_then_sum"
    )

    async def notebook_cell():
        trainer.train()

    asyncio.run(notebook_cell())
    logs = trainer.state.log_history[0]
    assert logs["rewards/async_bright/doubled"] == pytest.approx(2 * logs["rewards/async_bright/mean"], rel=1e-5)
    # `reward` stays the weighted sum of raw scores for monitoring, whatever the aggregation for advantages
    expected = logs["rewards/async_bright/mean"] + logs["rewards/tiny_spread/mean"]
    assert logs["reward"] == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(logs["loss"])


def test_remote_reward_in_a_real_training_step_and_state_intact_after_failure(tiny_pipe, tmp_path):
    import threading

    from trl_nft.rewards import RemoteReward, RemoteRewardError, brightness
    from trl_nft.rewards.server import RewardServer

    server = RewardServer(brightness, "127.0.0.1", 0, token="t0k")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = RemoteReward(server.url, token="t0k", name="remote_brightness", batch_size=3)
        trainer = _trainer(tiny_pipe, tmp_path, rewards=[remote, "redness"], max_steps=1)
        trainer.train()
        logs = trainer.state.log_history[0]
        assert server.num_scored == 8 and 0 < logs["rewards/remote_brightness/mean"] < 1
        assert math.isfinite(logs["loss"]) and "rewards/redness/mean" in logs
    finally:
        server.shutdown()
        server.server_close()
    # the server is gone: the next rollout's scoring fails with the URL named, before any update
    remote.max_retries, remote.backoff = 1, 0.0
    before = {i: p.detach().clone() for i, p in enumerate(trainer._trainable)}
    trainer.args.max_steps = 2
    with pytest.raises(RemoteRewardError, match=rf"Reward server {server.url}/score did not answer after 2 attempts"):
        trainer.train()
    assert trainer.state.global_step == 0  # the failed rollout took no optimizer step
    assert all(torch.equal(before[i], p) for i, p in enumerate(trainer._trainable))


def test_reward_hacking_monitors_heldout_rewards_diversity_and_reference_drift(tiny_pipe, tmp_path):
    from trl_nft import DiffusionNFTTrainer
    from trl_nft.rewards import brightness

    eval_rows = [{"prompt": p} for p in PROMPTS[:2] for _ in range(2)]  # each prompt twice, two seeds
    trainer = DiffusionNFTTrainer(
        tiny_pipe,
        "brightness",
        args=tiny_config(tmp_path, max_steps=1, eval_reference_drift=True, learning_rate=1e-2),
        train_dataset=[{"prompt": p} for p in PROMPTS],
        eval_dataset=eval_rows,
        eval_reward_funcs=[brightness, "redness"],
    )
    assert trainer.eval_reward_func_names == ["brightness", "redness"]
    before = trainer.evaluate()
    # a held-out reward scores the very images the trained rewards score
    assert before["eval_heldout/brightness/mean"] == pytest.approx(before["eval_rewards/brightness/mean"], rel=1e-6)
    assert "eval_heldout/redness/mean" in before and "eval_rewards/redness/mean" not in before
    assert before["eval_drift/pixel_rmse"] == 0.0  # LoRA starts as the identity (lora_B = 0)
    assert before["eval_diversity/within_group"] > 0
    trainer.train()
    assert trainer.state.log_history[0]["diversity/within_group"] > 0
    after = trainer.evaluate()
    assert after["eval_drift/pixel_rmse"] > 0


def test_cpu_precision_is_chosen_by_measurement(tmp_path):
    """`choose_cpu_precision` times a real workload both ways and picks the faster (bf16 only when >= 1.1x faster)."""
    from trl_nft.precision import MIN_SPEEDUP, choose_cpu_precision, cpu_bf16_flags

    layer = torch.nn.Linear(256, 256)
    x = torch.randn(512, 256)
    choice = choose_cpu_precision(lambda: layer(x), repeats=2)
    assert choice.float32_seconds > 0 and choice.bf16_seconds > 0
    assert choice.bf16 == (choice.float32_seconds / choice.bf16_seconds >= MIN_SPEEDUP)
    assert choice.reason.startswith("bf16 autocast" if choice.bf16 else "float32")
    assert cpu_bf16_flags() is None or set(cpu_bf16_flags()) <= {"avx512_bf16", "amx_bf16"}


def test_flow_equivalent_time_weighting_is_a_no_op_for_flow_models_and_reweights_a_unet(tmp_path):
    """`loss_time_weighting="flow_equivalent"` multiplies each term by `t / output_gain(t)`: 1 for SD3's velocity, so
    the same adapter as the official loss; `1 - t` for SD1.x's epsilon, so a different adapter and a smaller loss."""
    from trl_nft.shapes import VOCABULARY
    from trl_nft.shapes.tiny import build_tiny_sd3_pipeline, build_tiny_sd_pipeline

    for build, same in ((build_tiny_sd3_pipeline, True), (build_tiny_sd_pipeline, False)):
        results = {}
        for weighting in ("none", "flow_equivalent"):
            pipe = build(VOCABULARY, "test", seed=0)
            out = tmp_path / f"{build.__name__}-{weighting}"
            trainer = _trainer(pipe, out, loss_time_weighting=weighting, learning_rate=1.0, optim="sgd", max_steps=1)
            trainer.train()
            weights = {k: v for k, v in _snapshot(pipe).items() if ".default." in k and "lora_B" in k}
            results[weighting] = (weights, trainer.state.log_history[0]["policy_loss"])
        (w_none, loss_none), (w_flow, loss_flow) = results["none"], results["flow_equivalent"]
        assert any(v.abs().max() > 0 for v in w_none.values())
        if same:
            assert loss_flow == pytest.approx(loss_none, rel=1e-5)
            for k, v in w_none.items():
                torch.testing.assert_close(w_flow[k], v, rtol=1e-5, atol=1e-7)
        else:
            assert loss_flow < loss_none  # every weight 1 - t < 1
            assert any(not torch.allclose(w_flow[k], v) for k, v in w_none.items())
