"""The demo's wall-clock progress bar, its pace warning (no training: the clock is driven directly) and its precision
choice."""

import time
from types import SimpleNamespace

from transformers.testing_utils import CaptureLogger


def _clock(tmp_path, **args):
    from trl_nft.shapes.demo import HeldoutEvalCallback

    trainer_args = SimpleNamespace(per_device_train_batch_size=64, gradient_accumulation_steps=1, world_size=1, **args)
    return HeldoutEvalCallback(
        SimpleNamespace(args=trainer_args, is_world_process_zero=lambda: True),
        [],
        str(tmp_path),
        every_seconds=60,
        max_seconds=15 * 60,
    )


def test_progress_bar_moves_while_no_step_ends(tmp_path):
    from trl_nft.shapes.demo import WallClockProgressCallback

    clock = _clock(tmp_path)
    clock.start = time.perf_counter() - 90  # 1.5 minutes into the run, inside a long evaluation
    clock.phase = "held-out eval"
    progress = WallClockProgressCallback(clock, refresh_seconds=0.05)
    progress.on_train_begin(None, SimpleNamespace(is_world_process_zero=True), None)
    try:
        deadline = time.time() + 10
        while progress.bar.n < 1.5 and time.time() < deadline:
            time.sleep(0.05)
        assert progress.bar.n >= 1.5
        assert "held-out eval" in str(progress.bar)
    finally:
        progress.close()
    assert not progress._ticker.is_alive()


def test_pace_warning_when_steps_are_far_slower_than_the_reference(tmp_path):
    from trl_nft.shapes import demo

    logger = demo.logger
    slow = _clock(tmp_path)
    slow.start = time.perf_counter() - (demo.PACE_STEPS * 20 + 30)  # 20 s a step (reference 3.6 s) + 30 s of evals
    slow.eval_seconds = 30
    with CaptureLogger(logger) as captured:
        assert slow.check_pace(demo.PACE_STEPS - 1) is None
        measured = slow.check_pace(demo.PACE_STEPS)
    assert 19 < measured < 21
    assert "slower than the reference machine" in captured.out and "--max_minutes" in captured.out

    fast = _clock(tmp_path)
    fast.start = time.perf_counter() - demo.PACE_STEPS * 4
    with CaptureLogger(logger) as captured:
        fast.check_pace(demo.PACE_STEPS)
    assert captured.out == ""


def test_demo_precision_auto_measures_and_says_what_it_chose(tmp_path):
    """The demo's recipe fixes no precision: `--precision auto` times a 2-step rollout of the base both ways and trains
    in the faster; `--precision` and an explicit `--bf16` override it, and the choice is reported."""
    from trl_nft.shapes.demo import parse_demo_arguments

    out = ["--output_dir", str(tmp_path)]
    demo_args, args = parse_demo_arguments([*out, "--precision", "fp32"])
    assert not args.bf16 and demo_args.precision_reason == "fp32 (--precision fp32)"
    assert args.timesteps_per_forward == 1  # float32: one forward per training time
    demo_args, args = parse_demo_arguments([*out, "--precision", "bf16"])
    assert args.bf16 and args.use_cpu
    assert args.timesteps_per_forward == args.num_train_timesteps  # CPU bf16: all times in one forward
    _, args = parse_demo_arguments([*out, "--precision", "bf16", "--timesteps_per_forward", "2"])
    assert args.timesteps_per_forward == 2
    demo_args, args = parse_demo_arguments([*out, "--precision", "bf16", "--bf16", "false"])
    assert not args.bf16 and "command line" in demo_args.precision_reason
    demo_args, args = parse_demo_arguments(out)
    reason = demo_args.precision_reason
    assert reason.startswith("bf16 autocast" if args.bf16 else "float32"), reason
    assert " s vs " in reason and "CPU flags" in reason
    # The base the measurement loaded goes on to `run_demo` (loaded once); a fixed precision loads none here.
    from diffusers import DiffusionPipeline

    assert isinstance(demo_args.base_pipeline, DiffusionPipeline)
    assert parse_demo_arguments([*out, "--precision", "fp32"])[0].base_pipeline is None
