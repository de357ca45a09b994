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

import yaml


@dataclass
class NFTScriptArguments:
    """What to train, on which prompts, with which rewards (the rest is `DiffusionNFTConfig`)."""

    model_name_or_path: str = field(
        default=None,
        metadata={
            "help": "Base pipeline: a local directory or Hub id loaded with DiffusionPipeline.from_pretrained, or "
            "'shapes-base' for the tiny pipeline shipped with trl_nft."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["brightness"],
        metadata={
            "help": "Reward functions: built-in names (e.g. 'shapes', 'brightness') or dotted paths 'module:fn'."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: 'shapes' (the shapes world's train prompts), a .txt file (one prompt per line), a "
            ".json/.jsonl/.csv/.parquet file, or a datasets name/path. Needs a 'prompt' column."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Prompts for evaluation (same forms as dataset_name; 'shapes' = held-out)."}
    )
    eval_dataset_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    max_eval_prompts: int | None = field(default=None, metadata={"help": "Use at most this many eval prompts."})
    dataset_name_for_card: str | None = field(
        default=None, metadata={"help": "Dataset id to record in the model card."}
    )


def load_prompts(name: str, split: str, config: str | None = None, heldout: bool = False):
    """A `datasets.Dataset` with a `prompt` column from any of the forms `NFTScriptArguments.dataset_name` accepts."""
    import datasets

    if name == "shapes":
        from .shapes import make_dataset

        return make_dataset("heldout" if heldout else "train")
    if name.endswith(".txt"):
        with open(name) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"{name} holds no prompts (expected one per line).")
        return datasets.Dataset.from_dict({"prompt": prompts})
    for ext, builder in ((".jsonl", "json"), (".json", "json"), (".csv", "csv"), (".parquet", "parquet")):
        if name.endswith(ext):
            return datasets.load_dataset(builder, data_files=name, split="train")
    return datasets.load_dataset(name, config, split=split)


def load_model(name_or_path: str):
    from .families import load_pipeline

    if name_or_path == "shapes-base":
        from .shapes.pretrain import load_base_pipeline

        return load_base_pipeline(name_or_path)
    return load_pipeline(name_or_path)


def train(script_args: NFTScriptArguments, training_args) -> str:
    from .trainer import DiffusionNFTTrainer

    if not script_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (a path, a Hub id, or 'shapes-base').")
    if not script_args.dataset_name:
        raise ValueError(
            "dataset_name is required: 'shapes', a .txt file of prompts, or a dataset with a 'prompt' column."
        )
    train_dataset = load_prompts(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    eval_dataset = None
    if script_args.eval_dataset_name:
        eval_dataset = load_prompts(
            script_args.eval_dataset_name, script_args.eval_dataset_split, script_args.dataset_config, heldout=True
        )
        if script_args.max_eval_prompts is not None:
            eval_dataset = eval_dataset.select(range(min(script_args.max_eval_prompts, len(eval_dataset))))
    trainer = DiffusionNFTTrainer(
        model=load_model(script_args.model_name_or_path),
        reward_funcs=script_args.reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
    )
    trainer.base_model_id = script_args.model_name_or_path
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=script_args.dataset_name_for_card)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name_for_card)
    return training_args.output_dir


@dataclass
class EvalArguments:
    """`trl-nft eval`: GenEval-style held-out evaluation on the shapes world."""

    model_name_or_path: str = field(
        default="shapes-base", metadata={"help": "Pipeline to evaluate: 'shapes-base' (shipped) or a local path."}
    )
    lora: str | None = field(default=None, metadata={"help": "Directory of a LoRA to load with load_lora_weights."})
    num_inference_steps: int = field(default=10, metadata={"help": "Solver steps."})
    guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale (1.0: CFG-free)."})
    heldout_per_tag: int = field(default=72, metadata={"help": "Items per tag family (fixed prompts, seeds)."})
    split: str = field(
        default="heldout",
        metadata={
            "help": "'heldout': the unseen prompts (the benchmark); 'train': the same number of items drawn from the "
            "training prompts, to tell what RL taught from what carried over to unseen compositions."
        },
    )
    output_json: str | None = field(default=None, metadata={"help": "Also write the table and per-item results here."})

    def __post_init__(self):
        if self.split not in ("heldout", "train"):
            raise ValueError(
                f"split must be 'heldout' or 'train' (got {self.split!r}); pass --split heldout or train."
            )


def evaluate(eval_args: EvalArguments) -> dict:
    from .shapes import format_table, heldout_items, train_items
    from .shapes.evaluate import evaluate_pipeline

    pipe = load_model(eval_args.model_name_or_path)
    if eval_args.lora:
        pipe.load_lora_weights(eval_args.lora)
    result = evaluate_pipeline(
        pipe,
        (train_items if eval_args.split == "train" else heldout_items)(n_per_tag=eval_args.heldout_per_tag),
        num_inference_steps=eval_args.num_inference_steps,
        guidance_scale=eval_args.guidance_scale,
    )
    print(format_table(result["table"]))
    print(f"partial credit {result['partial']:.4f}   strict (items) {result['strict']:.4f}   n={result['n']}")
    if eval_args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(eval_args.output_json)), exist_ok=True)
        with open(eval_args.output_json, "w") as f:
            json.dump({"args": vars(eval_args), **result}, f, indent=2)
    return result


USAGE = """usage: trl-nft <command> [options]

commands:
  demo    The main job: NFT teaches the shipped tiny base to count, colour and place shapes (CPU, ~15 min)
  train   Train a pipeline with DiffusionNFT: trl-nft train --config run.yaml [--field value ...]
  eval    Held-out GenEval-style table of the shapes world: trl-nft eval [--lora DIR] [--output_json F]
  serve-reward  Serve a reward over HTTP for RemoteReward: trl-nft serve-reward SPEC [--port N] [--token T]

Run 'trl-nft <command> --help' for a command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
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
        from trl import TrlParser

        from .config import DiffusionNFTConfig
        from .shapes.demo import DEMO_CONFIG, DemoArguments, run_demo

        parser = TrlParser((DemoArguments, DiffusionNFTConfig), prog="trl-nft demo")
        with open(DEMO_CONFIG) as f:
            parser.set_defaults_with_config(**yaml.safe_load(f))
        demo_args, training_args = parser.parse_args_and_config(rest)
        run_demo(demo_args, training_args)
        return 0
    print(f"trl-nft: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
