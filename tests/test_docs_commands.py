"""Every command-line example of README.md and docs/*.md runs as written.

The commands of each page run in order in one scratch folder holding a copy of `examples/` (so `cd examples` and
`--lora shapes-demo` after the demo work as they do for a reader). Training commands get the smoke flags that
docs/cli.md documents ("Smoke-testing a command"), so they finish in seconds on the shipped tiny base; `push` talks to
the loopback Hub server. The console script's subprocess path is covered by tests/test_cli.py.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from hub_server import LoopbackHub


ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

SMOKE_TRAIN = (
    "--model_name_or_path shapes-base --resolution 32 --max_sequence_length 1 --max_steps 1 --num_generations 2 "
    "--per_device_train_batch_size 4 --gradient_accumulation_steps 1 --steps_per_generation 1 --num_inference_steps 2 "
    "--eval_num_inference_steps 2 --bf16 false --report_to none --save_strategy no"
).split()
SMOKE = {
    "train": SMOKE_TRAIN,
    "demo": [*SMOKE_TRAIN, "--heldout_per_tag", "1", "--num_sample_images", "2", "--disable_tqdm", "true"],
    "eval": ["--heldout_per_tag", "1", "--eval_num_inference_steps", "2"],
}


def doc_blocks(page: str) -> list[list[str]]:
    """The `cd`, `trl-nft` and `accelerate launch` commands of each bash block of a page (parts after `&&` too)."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / page).read_text(), re.S):
        commands = []
        for line in block.splitlines():
            for part in line.split("#")[0].split("&&"):
                part = part.strip()
                # `serve-reward` runs a server until stopped: tests/test_reward_server.py serves it on loopback.
                if part.startswith("trl-nft serve-reward"):
                    continue
                # `accelerate launch train.py` examples launch the reader's own script, not trl_nft's.
                if part.startswith("accelerate launch ") and "trl_nft.cli" not in part:
                    continue
                if part.startswith(("trl-nft ", "cd ", "accelerate launch ")) or part == "trl-nft":
                    commands.append(part)
        blocks.append(commands)
    return blocks


def test_docs_list_the_smoke_flags_the_test_uses():
    cli_doc = " ".join((ROOT / "docs" / "cli.md").read_text().split())
    assert " ".join(SMOKE_TRAIN) in cli_doc


def test_every_cli_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    from trl_nft.cli import main

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    bin_dir = os.path.dirname(sys.executable)
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    monkeypatch.setattr(sys, "path", list(sys.path))  # `train` adds the working directory, as TRL's scripts do
    done = set()  # pages repeat some commands (README and shapes_world.md): each distinct one runs once
    with LoopbackHub() as hub:
        # `trl-nft` commands run in this process through the console script's `main` (one interpreter start instead
        # of ten); `accelerate launch` runs as a real launcher subprocess.
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        for page in PAGES:
            for block in doc_blocks(page):
                cwd = tmp_path  # each block starts where the reader's shell does: the folder of the docs' commands
                for command in block:
                    argv = shlex.split(command)
                    if argv[0] == "cd":
                        cwd = (cwd / argv[1]).resolve()
                        continue
                    if (cwd, command) in done:
                        continue
                    monkeypatch.chdir(cwd)
                    if argv[0] == "accelerate":
                        sub = argv[argv.index("trl_nft.cli") + 1]
                        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
                        proc = subprocess.run(
                            [os.path.join(bin_dir, "accelerate"), *argv[1:], *SMOKE[sub]],
                            env={**env, "ACCELERATE_USE_CPU": "true"},
                            capture_output=True,
                            text=True,
                            timeout=600,
                        )
                        assert proc.returncode == 0, f"{page}: `{command}` failed:\n{proc.stderr[-3000:]}"
                    else:
                        sub = argv[1] if len(argv) > 1 else ""
                        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", sub != "push")
                        assert main([*argv[1:], *SMOKE.get(sub, [])]) == 0, f"{page}: `{command}` failed"
                    done.add((cwd, command))
        assert [c["repo_id"] for c in hub.state.commits] == ["USER/sd35-nft-saturation"]
    assert "- trl_nft version:" in capsys.readouterr().out  # `trl-nft env`
    subcommands = {shlex.split(c)[1] if c.startswith("trl-nft") else "accelerate" for _, c in done}
    assert subcommands >= {"train", "demo", "eval", "push", "env", "accelerate"}, subcommands


def test_api_reference_is_up_to_date():
    import runpy

    build_api = runpy.run_path(str(ROOT / "docs" / "build_api.py"))
    assert build_api["main"](["--check"]) == 0, "run `python docs/build_api.py`"


def test_trainer_page_quick_start_runs(tmp_path, monkeypatch):
    code = re.search(
        r"## Quick start\n\n```python\n(.*?)```", (ROOT / "docs" / "diffusion_nft_trainer.md").read_text(), re.S
    )
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code.group(1), "diffusion_nft_trainer.md", "exec"), scope)
    assert scope["trainer"].state.global_step == 2
    assert (tmp_path / "shapes-red" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "shapes-red" / "README.md").is_file()
