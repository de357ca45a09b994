"""benchmarks/processes.py: the pace read from a demo run's records, the commands it launches, the curve comparison."""

import json
import os
import sys

import pytest


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import processes  # noqa: E402


def _write_run(path, minutes_per_step, heldout):
    path.mkdir()
    records = [{"type": "heldout", "step": s, "minutes": m, "overall": o} for s, m, o in heldout]
    records += [{"type": "train", "step": s, "minutes": s * minutes_per_step, "loss": 1.0} for s in range(1, 13)]
    records.append({"type": "train", "step": 12, "minutes": 99.0, "train_runtime": 1.0})  # Trainer's closing log
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_pace_is_read_after_the_warm_up_steps(tmp_path):
    _write_run(tmp_path / "run", 0.1, [(0, 0.0, 0.3), (12, 1.3, 0.4)])
    seconds, measured = processes.seconds_per_step(str(tmp_path / "run" / "metrics.jsonl"), warmup_steps=4)
    assert seconds == pytest.approx(6.0) and measured == 8
    with pytest.raises(ValueError, match="warm-up"):
        processes.seconds_per_step(str(tmp_path / "run" / "metrics.jsonl"), warmup_steps=12)


def test_commands_launch_the_demo_in_one_or_several_processes():
    one = processes.demo_command(1, "out", "shapes-unet", "bf16", 16)
    two = processes.demo_command(2, "out", "shapes-unet", "bf16", 16)
    assert one[:4] == [sys.executable, "-m", "trl_nft.cli", "demo"]
    assert two[1:3] == ["-m", "accelerate.commands.launch"] and "--num_processes=2" in two
    assert two[two.index("trl_nft.cli") - 1 :] == one[1:]  # the same demo flags after the launcher's


def test_curves_compare_finished_runs(tmp_path, capsys):
    _write_run(tmp_path / "a", 0.1, [(0, 0.1, 0.32), (10, 1.1, 0.40)])
    _write_run(tmp_path / "b", 0.07, [(0, 0.1, 0.32), (15, 1.1, 0.45)])
    curves = processes.main(["--curves", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")])
    assert [r["overall"] for r in curves[str(tmp_path / "b")]] == [0.32, 0.45]
    out = capsys.readouterr().out
    assert "b: 15 optimizer steps in 1.1 min" in out and "best 0.450" in out
    assert (tmp_path / "out" / "demo_curves.png").stat().st_size > 0
