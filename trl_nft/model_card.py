"""The model card written next to a trained adapter (`README.md`), in the shape diffusers LoRA repos use on the Hub.

The YAML header is a `huggingface_hub.ModelCardData`: `library_name: diffusers`, `pipeline_tag: text-to-image`,
`base_model` (a Hub id, never a local path), the base's licence where known, tags (`diffusion-nft`, `lora`, `trl`, the
pipeline class, diffusers' `template:sd-lora`) and `widget` entries pointing at evaluation images saved in `images/`,
which the Hub shows as the card's `<Gallery />`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


CITATION = """@inproceedings{zheng2026diffusionnft,
  title     = {DiffusionNFT: Online Diffusion Reinforcement with Forward Process},
  author    = {Zheng, Kaiwen and Chen, Huayu and Ye, Haotian and Wang, Haoxiang and Zhang, Qinsheng and Jiang, Kai and
               Su, Hang and Ermon, Stefano and Zhu, Jun and Liu, Ming-Yu},
  booktitle = {International Conference on Learning Representations},
  year      = {2026},
  url       = {https://arxiv.org/abs/2509.16117}
}"""

TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), "templates", "model_card.md")
#: Where evaluation images are saved next to the card (the `widget` entries and the `<Gallery />` point here).
IMAGES_DIR = "images"
#: Packages whose versions the card records (and `trl-nft env` prints).
FRAMEWORKS = (
    "trl_nft",
    "trl",
    "transformers",
    "diffusers",
    "peft",
    "accelerate",
    "torch",
    "huggingface_hub",
    "datasets",
)

_SD35_LICENSE = {"license": "other", "license_name": "stabilityai-ai-community"}
#: Licences of well-known bases, for when their README is not in the local Hub cache.
KNOWN_LICENSES: dict[str, dict[str, str]] = {
    repo: {**_SD35_LICENSE, "license_link": f"https://huggingface.co/{repo}/blob/main/LICENSE.md"}
    for repo in (
        "stabilityai/stable-diffusion-3.5-medium",
        "stabilityai/stable-diffusion-3.5-large",
        "stabilityai/stable-diffusion-3.5-large-turbo",
        "stabilityai/stable-diffusion-3-medium-diffusers",
    )
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]")
_DIFFUSERS_IMPORT = "from diffusers import DiffusionPipeline"
_REPO_ID_LINE = re.compile(r'^repo_id = ".*"$', re.MULTILINE)


def framework_versions() -> list[tuple[str, str]]:
    """`(package, version)` for `FRAMEWORKS` (missing packages read `not installed`)."""
    out = []
    for name in FRAMEWORKS:
        try:
            out.append((name, version(name)))
        except PackageNotFoundError:
            out.append((name, "not installed"))
    return out


@dataclass
class BaseModelInfo:
    """What the card says about the base pipeline."""

    hub_id: str | None
    display: str
    #: The snippet's import line and the lines that build `pipe`.
    import_line: str
    load_lines: list[str]
    license: dict[str, str] = field(default_factory=dict)


def _license_from_readme(path: str | None) -> dict[str, str]:
    if not path or not os.path.isfile(path):
        return {}
    try:
        data = ModelCard.load(path).data
    except Exception:
        return {}
    return {k: getattr(data, k) for k in ("license", "license_name", "license_link") if getattr(data, k, None)}


def _shipped_shapes_base(name_or_path: str) -> str | None:
    """The `load_base_pipeline` name of a base shipped inside trl_nft (`shapes-base`, ...), or None."""
    if name_or_path.startswith("shapes-") and not os.path.isdir(name_or_path):
        return name_or_path
    shapes_dir = os.path.realpath(os.path.join(os.path.dirname(__file__), "shapes"))
    real = os.path.realpath(name_or_path)
    if os.path.isdir(real) and os.path.commonpath([real, shapes_dir]) == shapes_dir:
        return "shapes-base" if os.path.basename(real) == "base" else f"shapes-{os.path.basename(real)}"
    return None


def resolve_base_model(name_or_path: str | None, load_kwargs: dict[str, Any] | None = None) -> BaseModelInfo:
    """How the card names and loads the base pipeline.

    A Hub id is used as is. A local folder is never written into the card: the shipped shapes bases load with
    `trl_nft.shapes.pretrain.load_base_pipeline`; a folder in the Hub cache (`models--org--name/snapshots/...`) is
    recorded as `org/name`; any other folder has no Hub origin, so `base_model` is left out.
    """
    load_args = "".join(f", {k}={v!r}" for k, v in (load_kwargs or {}).items())
    if not name_or_path:
        return BaseModelInfo(
            None, "the base pipeline", _DIFFUSERS_IMPORT, ['pipe = DiffusionPipeline.from_pretrained("<base model>")']
        )
    shapes_name = _shipped_shapes_base(name_or_path)
    if shapes_name is not None:
        return BaseModelInfo(
            None,
            f"`{shapes_name}`, the tiny pipeline shipped with trl_nft",
            "from trl_nft.shapes.pretrain import load_base_pipeline",
            [f'pipe = load_base_pipeline("{shapes_name}")'],
            {"license": "apache-2.0"},
        )
    hub_id = None
    readme = None
    if os.path.isdir(name_or_path):
        match = _HF_CACHE_SNAPSHOT.search(os.path.realpath(name_or_path).replace("\\", "/") + "/")
        if match:
            hub_id = f"{match.group(1)}/{match.group(2)}"
        readme = os.path.join(name_or_path, "README.md")
    elif _REPO_ID.match(name_or_path):
        hub_id = name_or_path
    if hub_id is None:
        return BaseModelInfo(
            None,
            "a local base pipeline",
            _DIFFUSERS_IMPORT,
            [
                "# The base pipeline this adapter was trained on (a local folder, not on the Hub):",
                f'pipe = DiffusionPipeline.from_pretrained("<path to the base pipeline>"{load_args})',
            ],
            _license_from_readme(readme),
        )
    license_info = _license_from_readme(readme)
    if not license_info:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub_id, "README.md")
        license_info = _license_from_readme(cached if isinstance(cached, str) else None)
    license_info = license_info or KNOWN_LICENSES.get(hub_id, {})
    return BaseModelInfo(
        hub_id,
        f"[{hub_id}](https://huggingface.co/{hub_id})",
        _DIFFUSERS_IMPORT,
        [f'pipe = DiffusionPipeline.from_pretrained("{hub_id}"{load_args})'],
        license_info,
    )


def _guidance(scale: float) -> str:
    return "CFG-free (`guidance_scale=1.0`)" if scale == 1.0 else f"classifier-free guidance `{scale:g}`"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_SKIP_EVAL = ("_runtime", "_samples_per_second", "_steps_per_second")


def _last_tables(log_history: list[dict] | None):
    """The last evaluation entry (its `eval_*` metrics) and the last training entry with a reward."""
    eval_entry = train_entry = None
    for entry in log_history or []:
        if any(k.startswith("eval_") and not k.endswith(_SKIP_EVAL) for k in entry):
            eval_entry = entry
        elif "reward" in entry:
            train_entry = entry
    eval_table = [
        (k, _fmt(v))
        for k, v in (eval_entry or {}).items()
        if k.startswith("eval_") and not k.endswith(_SKIP_EVAL) and isinstance(v, int | float)
    ]
    train_keys = ("reward", "reward_std", "policy_loss", "kl", "old_policy/deviation", "old_policy/decay", "loss")
    train_table = [
        (k, _fmt(train_entry[k])) for k in train_keys if train_entry and isinstance(train_entry.get(k), int | float)
    ]
    return eval_table, (eval_entry or {}).get("step"), train_table, (train_entry or {}).get("step")


def save_eval_images(output_dir: str, samples: list[tuple[Any, str]]) -> list[dict[str, Any]]:
    """Save `(PIL image, caption)` pairs as `images/sample_{i}.png`; returns the card's `widget` entries."""
    widget = []
    if samples:
        os.makedirs(os.path.join(output_dir, IMAGES_DIR), exist_ok=True)
    for i, (image, caption) in enumerate(samples):
        rel = f"{IMAGES_DIR}/sample_{i}.png"
        image.save(os.path.join(output_dir, rel))
        widget.append({"text": caption or " ", "output": {"url": rel}})
    return widget


def write_model_card(
    output_dir: str,
    *,
    base_model: str | None,
    pipeline_class: str,
    model_name: str,
    repo_id: str | None,
    reward_names: list[str],
    reward_weights: list[float],
    args,
    resolution: int,
    global_step: int,
    use_lora: bool,
    denoiser_name: str = "transformer",
    denoiser_class: str | None = None,
    dataset_name: str | None = None,
    tags: list[str] | None = None,
    log_history: list[dict] | None = None,
    example_prompt: str = "a photo of a cat",
    load_kwargs: dict | None = None,
    call_kwargs: dict | None = None,
    eval_samples: list[tuple[Any, str]] | None = None,
) -> str:
    """Render the card and save it as `output_dir/README.md` (evaluation images go to `output_dir/images/`).

    Args:
        repo_id (`str`, *optional*):
            The Hub repo the snippet loads the adapter from. Without one, the snippet loads it from `output_dir` as
            given (`trl-nft push` and `push_to_hub` rewrite it to the repo id).
        eval_samples (list of `(PIL.Image, str)`, *optional*):
            Evaluation images and their prompts, saved beside the card as its gallery and `widget`.

    Returns:
        `str`: the card's path.
    """
    base = resolve_base_model(base_model, load_kwargs)
    widget = save_eval_images(output_dir, list(eval_samples or []))
    family = pipeline_class
    card_data = ModelCardData(
        base_model=base.hub_id,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=list(
            dict.fromkeys(
                [
                    *(tags or []),
                    "diffusion-nft",
                    "lora" if use_lora else "full-finetune",
                    "trl",
                    family,
                    "template:sd-lora",
                ]
            )
        ),
        datasets=[dataset_name] if dataset_name and _REPO_ID.match(dataset_name) else None,
        widget=widget or None,
        model_name=model_name,
        **base.license,
    )
    guidance = args.eval_guidance_scale if args.eval_guidance_scale is not None else args.guidance_scale
    # The family's own sampling arguments (call_kwargs) win: for some families guidance is another argument.
    call_args = {
        "guidance_scale": guidance,
        "num_inference_steps": args.eval_num_inference_steps,
        **(call_kwargs or {}),
    }
    call = "".join(f", {k}={v!r}" for k, v in call_args.items())
    snippet = [base.import_line]
    if not use_lora:
        snippet.append(f"from diffusers import {denoiser_class}")
    snippet += ["", f'repo_id = "{repo_id or args.output_dir}"', *base.load_lines]
    if use_lora:
        snippet.append("pipe.load_lora_weights(repo_id)")
    else:
        snippet.append(
            f'pipe.{denoiser_name} = {denoiser_class}.from_pretrained(repo_id, subfolder="{denoiser_name}")'
        )
    snippet.append(f"image = pipe({example_prompt!r}{call}).images[0]")
    eval_table, eval_step, train_table, train_step = _last_tables(log_history)
    card = ModelCard.from_template(
        card_data,
        template_path=TEMPLATE_PATH,
        model_name=model_name,
        kind="A LoRA adapter" if use_lora else "A fine-tuned denoiser",
        base_model_md=base.display,
        snippet="\n".join(snippet),
        guidance_note=(
            "DiffusionNFT trains without classifier-free guidance, so sample it as above (`guidance_scale=1.0`)."
            if guidance == 1.0
            else f"It was evaluated with classifier-free guidance {guidance:g}, as in the snippet."
        ),
        pipeline_class=pipeline_class,
        rewards=", ".join(f"`{n}` ({w:g})" for n, w in zip(reward_names, reward_weights, strict=True)),
        global_step=global_step,
        dataset=f"`{dataset_name}`" if dataset_name else "see the training script",
        rollout_guidance=_guidance(args.guidance_scale),
        eval_guidance=_guidance(guidance),
        args=args,
        resolution=resolution,
        lora={"r": args.lora_r, "alpha": args.lora_alpha} if use_lora else None,
        eval_table=eval_table,
        eval_step=eval_step,
        train_table=train_table,
        train_step=train_step,
        versions=framework_versions(),
        citation=CITATION,
    )
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path


def set_card_repo_id(card_path: str, repo_id: str) -> bool:
    """Point the snippet of an existing card at `repo_id` (what `trl-nft push` does before uploading).

    Returns whether the card had a snippet to update.
    """
    with open(card_path, encoding="utf-8") as f:
        text = f.read()
    new, n = _REPO_ID_LINE.subn(f'repo_id = "{repo_id}"', text, count=1)
    if n:
        with open(card_path, "w", encoding="utf-8") as f:
            f.write(new)
    return bool(n)
