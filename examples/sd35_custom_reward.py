# /// script
# dependencies = ["trl_nft", "torch>=2.4"]
# ///
"""DiffusionNFT on Stable Diffusion 3.5 Medium with a custom reward (GPU recommended).

    python examples/sd35_custom_reward.py --model stabilityai/stable-diffusion-3.5-medium --output_dir sd35-nft

Offline, the same script runs end to end on the tiny test pipeline in a few seconds:

    python examples/sd35_custom_reward.py --tiny --max_steps 3 --output_dir /tmp/tiny-nft
"""

import argparse

import torch
from datasets import Dataset

from trl_nft import DiffusionNFTConfig, DiffusionNFTTrainer


def saturation(prompts, images, **kwargs):
    """Reward colourful images: mean per-pixel (max - min) over RGB, in [0, 1]."""
    return (images.amax(dim=1) - images.amin(dim=1)).mean(dim=(1, 2)).tolist()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="stabilityai/stable-diffusion-3.5-medium")
    parser.add_argument("--tiny", action="store_true", help="use the offline tiny test pipeline instead")
    parser.add_argument("--output_dir", default="sd35-nft")
    parser.add_argument("--max_steps", type=int, default=200)
    cli = parser.parse_args()

    prompts = ["a photo of a cat", "a harbour at dawn", "a bowl of fruit", "a city street in the rain"]
    dataset = Dataset.from_dict({"prompt": prompts})
    if cli.tiny:
        from trl_nft.shapes import VOCABULARY
        from trl_nft.shapes.tiny import build_tiny_sd3_pipeline

        pipe = build_tiny_sd3_pipeline(VOCABULARY, "test")
        extra = dict(max_sequence_length=2, num_inference_steps=4, lora_r=4, lora_alpha=8)
    else:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(cli.model)
        extra = dict(bf16=torch.cuda.is_available(), resolution=512)

    args = DiffusionNFTConfig(
        output_dir=cli.output_dir,
        max_steps=cli.max_steps,
        num_generations=4 if cli.tiny else 8,
        report_to="none",
        save_strategy="no",
        **extra,
    )
    trainer = DiffusionNFTTrainer(pipe, reward_funcs=saturation, args=args, train_dataset=dataset)
    trainer.train()
    trainer.save_model(cli.output_dir)
    print(f"LoRA saved to {cli.output_dir}: pipe.load_lora_weights({cli.output_dir!r})")


if __name__ == "__main__":
    main()
