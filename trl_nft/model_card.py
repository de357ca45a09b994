"""The model card written next to a trained adapter (`README.md`, diffusers LoRA conventions)."""

from __future__ import annotations

import os

from huggingface_hub import ModelCard, ModelCardData


CITATION = """@inproceedings{zheng2026diffusionnft,
  title     = {DiffusionNFT: Online Diffusion Reinforcement with Forward Process},
  author    = {Zheng, Kaiwen and Chen, Huayu and Ye, Haotian and Wang, Haoxiang and Zhang, Qinsheng and Jiang, Kai and
               Su, Hang and Ermon, Stefano and Zhu, Jun and Liu, Ming-Yu},
  booktitle = {International Conference on Learning Representations},
  year      = {2026},
  url       = {https://arxiv.org/abs/2509.16117}
}"""

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ kind }} of [{{ base_model_display }}]({{ base_model_link }}) trained with **DiffusionNFT** (online RL on the forward
process, [arXiv 2509.16117](https://arxiv.org/abs/2509.16117)) using [trl_nft](https://github.com/trl-nft/trl_nft).

## Use it

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{{ base_model_code }}"{{ load_kwargs }})
{{ load_line }}
image = pipe({{ example_prompt }}, guidance_scale={{ guidance }}, num_inference_steps={{ eval_steps }}{{ call_kwargs }}).images[0]
```

DiffusionNFT trains the model without classifier-free guidance, so sample it with `guidance_scale={{ guidance }}`.

## Training

| | |
|---|---|
| pipeline | `{{ pipeline_class }}` |
| rewards (weight) | {{ rewards }} |
| optimizer steps | {{ global_step }} |
| images per prompt (K) | {{ args.num_generations }} |
| rollout batch | {{ args.generation_batch_size }} images, {{ args.num_inference_steps }} solver steps, guidance {{ args.guidance_scale }} |
| resolution | {{ resolution }} |
| NFT beta / KL weight | {{ args.nft_beta }} / {{ args.kl_weight }} |
| loss | `{{ args.loss_type }}` |
| old-policy decay | `{{ args.old_policy_decay }}` (rate {{ args.old_policy_decay_rate }}, max {{ args.old_policy_decay_max }}, delay {{ args.old_policy_decay_delay }}) |
| learning rate | {{ args.learning_rate }} |
{% if lora %}| LoRA | r={{ lora.r }}, alpha={{ lora.alpha }} |
{% endif %}
{% if last_metrics %}
### Last logged metrics

| metric | value |
|---|---|
{% for k, v in last_metrics %}| {{ k }} | {{ v }} |
{% endfor %}
{% endif %}

## Citation

```bibtex
{{ citation }}
```
"""


def write_model_card(
    output_dir: str,
    *,
    base_model: str | None,
    pipeline_class: str,
    model_name: str,
    hub_model_id: str | None,
    reward_names: list[str],
    reward_weights: list[float],
    args,
    resolution: int,
    global_step: int,
    use_lora: bool,
    dataset_name: str | None = None,
    tags: list[str] | None = None,
    log_history: list[dict] | None = None,
    example_prompt: str = "a photo of a cat",
    load_kwargs: dict | None = None,
    call_kwargs: dict | None = None,
) -> str:
    """Render and save the card; returns its path."""
    hub_base = base_model if base_model and not os.path.isdir(base_model) else None
    card_data = ModelCardData(
        base_model=hub_base,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=None,
        tags=sorted(set(tags or [])),
        datasets=[dataset_name] if dataset_name else None,
    )
    repo = hub_model_id or model_name
    last = {}
    for entry in log_history or []:
        last.update({k: v for k, v in entry.items() if isinstance(v, int | float)})
    keys = [k for k in ("reward", "eval_reward", "kl", "old_deviate", "loss") if k in last]
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=model_name,
        kind="LoRA adapter" if use_lora else "Fine-tuned denoiser",
        base_model_display=base_model or "the base pipeline",
        base_model_link=f"https://huggingface.co/{hub_base}" if hub_base else "#use-it",
        base_model_code=base_model or "<base model>",
        load_kwargs="".join(f", {k}={v!r}" for k, v in (load_kwargs or {}).items()),
        example_prompt=repr(example_prompt),
        call_kwargs="".join(f", {k}={v!r}" for k, v in (call_kwargs or {}).items()),
        load_line=f'pipe.load_lora_weights("{repo}")' if use_lora else "# load the fine-tuned denoiser from this repo",
        guidance=args.eval_guidance_scale if args.eval_guidance_scale is not None else args.guidance_scale,
        eval_steps=args.eval_num_inference_steps,
        pipeline_class=pipeline_class,
        rewards=", ".join(f"`{n}` ({w:g})" for n, w in zip(reward_names, reward_weights, strict=True)),
        global_step=global_step,
        args=args,
        resolution=resolution,
        lora={"r": args.lora_r, "alpha": args.lora_alpha} if use_lora else None,
        last_metrics=[(k, f"{last[k]:.4g}") for k in keys],
        citation=CITATION,
    )
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path
