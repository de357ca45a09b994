"""The `trl-nft` command line.

    trl-nft train --config run.yaml [--any_config_field value ...]

Flags override the YAML (TRL's `TrlParser`). Every `DiffusionNFTConfig` field is a flag, plus the script arguments
below (model, rewards, prompts).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from trl import ScriptArguments


@dataclass
class NFTScriptArguments(ScriptArguments):
    """Script arguments of `trl-nft train`: TRL's `ScriptArguments` (`dataset_name`, `dataset_config`,
    `dataset_train_split`, `dataset_test_split`, `dataset_streaming`) plus the model and the rewards. Everything else
    is a `DiffusionNFTConfig` field."""

    # Redeclared for its help only: here it also takes the prompt-file forms.
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: 'shapes' (the shapes world; its test split is the held-out prompts), a .txt file (one "
            "prompt per line), a .json/.jsonl/.csv/.parquet file, or a datasets name/path with a 'prompt' column."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Base pipeline: a local directory or Hub id loaded with DiffusionPipeline.from_pretrained, or "
            "'shapes-base' ('shapes-sd3') or 'shapes-unet' for the tiny pipelines shipped with trl_nft."
        },
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions (required): built-in names ('shapes', 'shapes_strict', 'brightness', 'redness') "
            "or dotted paths 'module:function', importable from the working directory."
        },
    )
    max_eval_prompts: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many prompts of the test split."}
    )


def load_prompts(name: str, split: str = "train", config: str | None = None, streaming: bool = False):
    """A `datasets.Dataset` with a `prompt` column from any of the forms `NFTScriptArguments.dataset_name` accepts.

    `split` picks the split of a `datasets` name; `'shapes'` has `train` and `test` (the held-out prompts); a file
    has only `train`.

    Raises:
        `ValueError`: an empty prompt file, a missing split, or `streaming` (the trainer needs a map-style dataset).
    """
    import datasets

    if streaming:
        raise ValueError(
            "dataset_streaming is not supported: the trainer repeats each prompt num_generations times with TRL's "
            "RepeatSampler, which needs a map-style dataset. Drop --dataset_streaming (prompt sets are small)."
        )
    if name == "shapes":
        from .shapes import make_dataset

        if split not in ("train", "test", "heldout"):
            raise ValueError(f"The 'shapes' prompts have splits 'train' and 'test' (held-out), not {split!r}.")
        return make_dataset("train" if split == "train" else "heldout")
    for ext, builder in (
        (".txt", None),
        (".jsonl", "json"),
        (".json", "json"),
        (".csv", "csv"),
        (".parquet", "parquet"),
    ):
        if name.endswith(ext):
            if split != "train":
                raise ValueError(
                    f"{name} is a single file, so it only has a 'train' split (asked for {split!r}). For evaluation "
                    "prompts use a dataset with a test split, or a datasets folder with train/test files."
                )
            if builder is None:
                with open(name) as f:
                    prompts = [line.strip() for line in f if line.strip()]
                if not prompts:
                    raise ValueError(f"{name} holds no prompts (expected one per line).")
                return datasets.Dataset.from_dict({"prompt": prompts})
            return datasets.load_dataset(builder, data_files=name, split="train")
    return datasets.load_dataset(name, config, split=split)


def load_model(name_or_path: str):
    from .families import load_pipeline

    if name_or_path in ("shapes-base", "shapes-sd3", "shapes-unet"):
        from .shapes.pretrain import load_base_pipeline

        return load_base_pipeline(name_or_path)
    return load_pipeline(name_or_path)


def _import_from_working_directory() -> None:
    """Dotted-path rewards (`my_rewards:saturation`) import from the working directory, as in TRL's scripts."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def train(script_args: NFTScriptArguments, training_args) -> str:
    """Train with `DiffusionNFTTrainer`, save the adapter and its card, and push when `push_to_hub` is set."""
    from .trainer import DiffusionNFTTrainer

    if not script_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (a path, a Hub id, or 'shapes-base').")
    if not script_args.dataset_name:
        raise ValueError(
            "dataset_name is required: 'shapes', a .txt file of prompts, or a dataset with a 'prompt' column."
        )
    if not script_args.reward_funcs:
        raise ValueError(
            "reward_funcs is required: name at least one reward, e.g. `--reward_funcs shapes` (built-ins: shapes, "
            "shapes_strict, brightness, redness) or a function in a module of the working directory, "
            "`--reward_funcs my_rewards:saturation`."
        )
    _import_from_working_directory()
    load = dict(config=script_args.dataset_config, streaming=script_args.dataset_streaming)
    train_dataset = load_prompts(script_args.dataset_name, script_args.dataset_train_split, **load)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_prompts(script_args.dataset_name, script_args.dataset_test_split, **load)
        if script_args.max_eval_prompts is not None:
            eval_dataset = eval_dataset.select(range(min(script_args.max_eval_prompts, len(eval_dataset))))
    name = script_args.model_name_or_path
    trainer = DiffusionNFTTrainer(
        # A path or Hub id goes to the trainer as such, so that `model_init_kwargs` (torch_dtype, revision, ...) apply.
        model=load_model(name) if name == "shapes-base" else name,
        reward_funcs=script_args.reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
    )
    trainer.base_model_id = script_args.model_name_or_path
    trainer.dataset_name = script_args.dataset_name
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "yes", "1"):
        resume = True  # the newest complete checkpoint in output_dir
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        info = trainer.push_to_hub()
        if info is not None:
            print(f"Pushed to {info.commit_url}")
    return training_args.output_dir


@dataclass
class EvalArguments:
    """`trl-nft eval`: GenEval-style held-out evaluation on the shapes world."""

    model_name_or_path: str = field(
        default="shapes-base",
        metadata={
            "help": "Pipeline to evaluate: 'shapes-base' / 'shapes-sd3' (the shipped SD3 base), 'shapes-unet' (the "
            "shipped SD1.x-family UNet base) or a local path."
        },
    )
    lora: str | None = field(default=None, metadata={"help": "Directory of a LoRA to load with load_lora_weights."})
    eval_num_inference_steps: int = field(default=10, metadata={"help": "Solver steps."})
    eval_guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale (1.0: CFG-free)."})
    heldout_per_tag: int = field(default=72, metadata={"help": "Items per tag family (fixed prompts, seeds)."})
    dataset_test_split: str = field(
        default="test",
        metadata={
            "help": "'test': the held-out prompts (the benchmark); 'train': the same number of items drawn from the "
            "training prompts, to tell what RL taught from what carried over to unseen compositions."
        },
    )
    output_json: str | None = field(default=None, metadata={"help": "Also write the table and per-item results here."})

    def __post_init__(self):
        if self.dataset_test_split not in ("test", "train"):
            raise ValueError(
                f"dataset_test_split must be 'test' (held-out prompts) or 'train' (got {self.dataset_test_split!r}); "
                "pass --dataset_test_split test or train."
            )


def evaluate(eval_args: EvalArguments) -> dict:
    from .shapes import format_table, heldout_items, train_items
    from .shapes.evaluate import evaluate_pipeline

    pipe = load_model(eval_args.model_name_or_path)
    if eval_args.lora:
        pipe.load_lora_weights(eval_args.lora)
    result = evaluate_pipeline(
        pipe,
        (train_items if eval_args.dataset_test_split == "train" else heldout_items)(
            n_per_tag=eval_args.heldout_per_tag
        ),
        num_inference_steps=eval_args.eval_num_inference_steps,
        guidance_scale=eval_args.eval_guidance_scale,
    )
    print(format_table(result["table"]))
    print(f"partial credit {result['partial']:.4f}   strict (items) {result['strict']:.4f}   n={result['n']}")
    if eval_args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(eval_args.output_json)), exist_ok=True)
        with open(eval_args.output_json, "w") as f:
            json.dump({"args": vars(eval_args), **result}, f, indent=2)
    return result


def push(argv: list[str]) -> int:
    """`trl-nft push RUN_DIR --repo_id USER/NAME [--private]`: publish a finished run (adapter, card, images)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="trl-nft push",
        description="Publish a finished run folder to the Hugging Face Hub: the adapter (or fine-tuned denoiser), the "
        "model card and its images. Uses the token of `hf auth login` or HF_TOKEN, and HF_ENDPOINT.",
    )
    parser.add_argument("run_dir", help="The run's output_dir (or a checkpoint-N folder).")
    parser.add_argument("--repo_id", "--repo-id", required=True, help="USER/NAME (or ORG/NAME) of the model repo.")
    parser.add_argument("--private", action="store_true", help="Create the repo private (no effect if it exists).")
    parser.add_argument("--revision", default=None, help="Branch to push to (default: main).")
    parser.add_argument("--commit_message", "--commit-message", default="Upload DiffusionNFT adapter")
    args = parser.parse_args(argv)
    from .hub import PushToHubError, push_run

    try:
        info = push_run(
            args.run_dir,
            args.repo_id,
            private=args.private or None,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    except (PushToHubError, FileNotFoundError) as err:
        print(f"trl-nft push: error: {err}", file=sys.stderr)
        return 1
    print(f"Pushed {args.run_dir} to {info.repo_url.repo_id}: {info.commit_url}")
    return 0


def print_env() -> int:
    """`trl-nft env`: versions and platform, to paste into bug reports (as `trl env`)."""
    import platform

    from .model_card import framework_versions

    lines = [f"- Platform: {platform.platform()}", f"- Python version: {platform.python_version()}"]
    lines += [f"- {name} version: {version}" for name, version in framework_versions()]
    try:
        import torch

        accelerator = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
    except Exception as err:  # a broken torch install is exactly what a bug report needs to show
        accelerator = f"unavailable ({err})"
    lines.append(f"- Accelerator: {accelerator}")
    for extra in ("tensorboard", "wandb", "trackio"):
        from importlib.util import find_spec

        lines.append(f"- {extra}: {'installed' if find_spec(extra) else 'not installed'}")
    print("\nCopy-paste the following information when reporting an issue:\n\n" + "\n".join(lines) + "\n")
    return 0


USAGE = """usage: trl-nft <command> [options]

commands:
  demo    The main job: NFT teaches the shipped tiny base to count, colour and place shapes (CPU, ~15 min)
  train   Train a pipeline with DiffusionNFT: trl-nft train --config run.yaml [--field value ...]
  eval    Held-out GenEval-style table of the shapes world: trl-nft eval [--lora DIR] [--output_json F]
  push    Publish a finished run to the Hub: trl-nft push RUN_DIR --repo_id USER/NAME [--private]
  env     Print versions for bug reports
  serve-reward  Serve a reward over HTTP for RemoteReward: trl-nft serve-reward SPEC [--port N] [--token T]

Run 'trl-nft <command> --help' for a command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("demo", "eval"):
        from .utils import require_shapes_extra

        try:
            require_shapes_extra(f"trl-nft {command}")
        except ImportError as err:
            print(f"trl-nft {command}: error: {err}", file=sys.stderr)
            return 1
    if command == "train":
        from trl import TrlParser

        from .config import DiffusionNFTConfig

        parser = TrlParser((NFTScriptArguments, DiffusionNFTConfig), prog="trl-nft train")
        script_args, training_args = parser.parse_args_and_config(rest)
        out = train(script_args, training_args)
        print(f"Adapter saved to {os.path.abspath(out)}")
        return 0
    if command == "eval":
        from trl import TrlParser

        (eval_args,) = TrlParser((EvalArguments,), prog="trl-nft eval").parse_args_and_config(rest)
        evaluate(eval_args)
        return 0
    if command == "serve-reward":
        from .rewards.server import main as serve_reward

        return serve_reward(rest)
    if command == "demo":
        from .shapes.demo import parse_demo_arguments, run_demo

        demo_args, training_args = parse_demo_arguments(rest)
        _import_from_working_directory()
        run_demo(demo_args, training_args)
        return 0
    if command == "push":
        return push(rest)
    if command == "env":
        return print_env()
    print(f"trl-nft: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
