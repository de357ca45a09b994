"""Built-in reward models: the rewards of the DiffusionNFT / Flow-GRPO / DDPO papers, on transformers model classes.

Each class takes a local path or Hub id for its weights, loads them on first call (not at construction), on the
device of the images it is given (the trainer's device) unless told otherwise, in its own `dtype`, and scores in
batches of `batch_size` under `torch.inference_mode()`. Images are converted to 8-bit PIL images first, as the
official scorers do. Scales, sources and normalisations are in docs/rewards.md.

| name | class | score |
|---|---|---|
| `pickscore` | `PickScoreReward` | PickScore / 26 (official DiffusionNFT normalisation; raw about 18-24) |
| `clipscore` | `CLIPScoreReward` | CLIP ViT-L/14 `logit_scale * cos / 100`, i.e. the cosine (about 0.2-0.4) |
| `hpsv2` | `HPSv2Reward` | HPSv2.1-style: cosine of a preference-tuned CLIP (HPSv2.1 about 0.2-0.35) |
| `aesthetic` | `AestheticReward` | LAION aesthetic predictor v2 (linear head on CLIP ViT-L/14), about 1-10 |
| `ocr` | `OCRReward` | `1 - min(edit distance, n) / n` against the prompt's quoted text, in [0, 1] |
| `jpeg_compressibility` | `jpeg_compressibility` | minus the JPEG size in kB (DDPO) |
| `jpeg_incompressibility` | `jpeg_incompressibility` | the JPEG size in kB (DDPO) |
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence

import torch


# ------------------------------------------------------------------------------------------------------------ helpers
def to_pil(images: torch.Tensor) -> list:
    """`[N, 3, H, W]` floats in [0, 1] -> N RGB PIL images, rounded to 8 bits (as the official scorers do)."""
    from PIL import Image

    array = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in array]


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or its name ('float32', 'bfloat16', ...), got {dtype!r}.")
    return value


class RewardModel:
    """Base class of the built-in reward models: lazy loading, device, dtype and batching.

    Args:
        model (`str`): local path or Hub id of the weights.
        dtype (`str` or `torch.dtype`, defaults to `"float32"`): dtype of the reward model, independent of the
            trainer's.
        batch_size (`int`, defaults to 16): images per forward pass.
        device (`str`, *optional*): where to run; defaults to the device of the images (the trainer's device).
        revision (`str`, *optional*): Hub revision of the weights.
        name (`str`, *optional*): the name the reward is logged under; defaults to the class's `default_name`.

    Subclasses implement `_load(device)` and `score_batch(prompts, images, **columns) -> list[float | None]`.
    """

    default_name = "reward_model"

    def __init__(
        self,
        model: str,
        *,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 16,
        device: str | None = None,
        revision: str | None = None,
        name: str | None = None,
    ):
        if not model:
            raise ValueError(f"{type(self).__name__} needs `model`: a local path or Hub id of its weights.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.model_id, self.dtype, self.batch_size = str(model), _dtype(dtype), batch_size
        self.device, self.revision = device, revision
        self.name = name or self.default_name
        self._loaded_on: torch.device | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_id!r}, name={self.name!r})"

    def _from_pretrained(self, cls, path: str | None = None, **kwargs):
        path = path or self.model_id
        kwargs.setdefault("revision", self.revision)
        return cls.from_pretrained(path, **kwargs)

    def _load(self, device: torch.device) -> None:
        raise NotImplementedError

    def _modules(self) -> list[torch.nn.Module]:
        return []

    def load(self, device: str | torch.device | None = None) -> RewardModel:
        """Load the weights now (otherwise the first call does), on `device` (default: `self.device` or CPU)."""
        device = torch.device(device or self.device or "cpu")
        if self._loaded_on is None:
            self._load(device)
        elif self._loaded_on != device:
            for module in self._modules():
                module.to(device)
        for module in self._modules():
            module.eval().requires_grad_(False)
        self._loaded_on = device
        return self

    def score_batch(self, prompts: list[str], images: torch.Tensor, **columns) -> list[float | None]:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], images: torch.Tensor, **kwargs) -> list[float | None]:
        kwargs.pop("trainer_state", None)
        kwargs.pop("log_metric", None)
        self.load(self.device or images.device)
        scores: list[float | None] = []
        with torch.inference_mode():
            for i in range(0, len(prompts), self.batch_size):
                columns = {k: v[i : i + self.batch_size] for k, v in kwargs.items()}
                scores.extend(
                    self.score_batch(
                        list(prompts[i : i + self.batch_size]), images[i : i + self.batch_size], **columns
                    )
                )
        return scores


# ------------------------------------------------------------------------------------------------------------ CLIP
class CLIPPreferenceReward(RewardModel):
    """A CLIP-type score: `scale * cos(image embedding, text embedding) / divisor`, with a `transformers.CLIPModel`.

    Args:
        model (`str`): CLIP checkpoint (local path or Hub id).
        processor (`str`, *optional*): where the image processor and tokenizer live, if not with the model.
        divisor (`float`, defaults to 1.0): the score is divided by it (the official normalisation).
        use_logit_scale (`bool`, defaults to `True`): multiply the cosine by the model's `exp(logit_scale)`.
        max_length (`int`, defaults to 77): prompts are truncated to this many tokens (CLIP's context).
        **kwargs: see [`RewardModel`].
    """

    default_name = "clip_preference"

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        divisor: float = 1.0,
        use_logit_scale: bool = True,
        max_length: int = 77,
        **kwargs,
    ):
        super().__init__(model, **kwargs)
        self.processor_id, self.divisor, self.use_logit_scale = processor, float(divisor), use_logit_scale
        self.max_length = max_length

    def _load(self, device):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = self._from_pretrained(CLIPModel, dtype=self.dtype).to(device)
        source = self.processor_id or self.model_id
        self.image_processor = self._from_pretrained(AutoImageProcessor, source)
        self.tokenizer = self._from_pretrained(AutoTokenizer, source)

    def _modules(self):
        return [self.model]

    def score_batch(self, prompts, images, **columns):
        device = self._loaded_on
        pixels = self.image_processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        max_length = min(self.max_length, getattr(self.tokenizer, "model_max_length", self.max_length))
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = self.model(
            input_ids=text["input_ids"].to(device),
            attention_mask=text["attention_mask"].to(device),
            pixel_values=pixels.to(device, self.dtype),
        )
        # CLIPModel's forward returns unit-norm projected embeddings
        cosine = (out.image_embeds.float() * out.text_embeds.float()).sum(dim=-1)
        scale = self.model.logit_scale.float().exp() if self.use_logit_scale else 1.0
        return (scale * cosine / self.divisor).tolist()


class PickScoreReward(CLIPPreferenceReward):
    """PickScore (Kirstain et al. 2023, "Pick-a-Pic", arXiv 2305.01569): a CLIP ViT-H/14 fine-tuned on human
    preferences. Score `exp(logit_scale) * cos / 26`, the official DiffusionNFT / Flow-GRPO normalisation (raw
    PickScore about 18-24, so about 0.7-0.92); `divisor=1` gives the raw PickScore of the paper's tables.

    Args:
        model (`str`, defaults to `"yuvalkirstain/PickScore_v1"`).
        processor (`str`, defaults to `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`): the processor of the model card.
    """

    default_name = "pickscore"

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        divisor: float = 26.0,
        **kwargs,
    ):
        super().__init__(model, processor=processor, divisor=divisor, **kwargs)


class CLIPScoreReward(CLIPPreferenceReward):
    """CLIPScore (Hessel et al. 2021, arXiv 2104.08718) with OpenAI CLIP ViT-L/14: `exp(logit_scale) * cos / 100`,
    the official DiffusionNFT normalisation, i.e. the cosine (about 0.2-0.4).

    Args:
        model (`str`, defaults to `"openai/clip-vit-large-patch14"`).
    """

    default_name = "clipscore"

    def __init__(self, model: str = "openai/clip-vit-large-patch14", divisor: float = 100.0, **kwargs):
        super().__init__(model, divisor=divisor, **kwargs)


class HPSv2Reward(CLIPPreferenceReward):
    """HPSv2.1-style preference score (Wu et al. 2023, "Human Preference Score v2", arXiv 2306.09341): the raw cosine
    of image and text embeddings of a preference-tuned CLIP ViT-H/14, as the official DiffusionNFT scorer (HPSv2.1
    about 0.2-0.35).

    The HPSv2.1 weights are published as an open_clip checkpoint (`xswu/HPSv2`, `HPS_v2.1_compressed.pt`); this class
    loads a `transformers` CLIP checkpoint, so pass a transformers conversion of them (any CLIP-format preference
    model works the same way). There is no default, so that nothing silently scores with the wrong weights.

    Args:
        model (`str`): transformers CLIP checkpoint of the preference model.
    """

    default_name = "hpsv2"

    def __init__(self, model: str | None = None, **kwargs):
        if model is None:
            raise ValueError(
                "HPSv2Reward needs `model`: a transformers CLIP checkpoint of HPSv2.1 (the official weights are an "
                "open_clip checkpoint; convert them to a transformers CLIPModel, or use 'pickscore' / 'clipscore')."
            )
        kwargs.setdefault("use_logit_scale", False)
        super().__init__(model, **kwargs)


# ------------------------------------------------------------------------------------------------------------ aesthetic
class AestheticReward(RewardModel):
    """LAION aesthetic predictor v2 (Schuhmann, "improved-aesthetic-predictor"; used by DDPO, Black et al. 2023,
    arXiv 2305.13301): a linear stack on the unit-normalised CLIP ViT-L/14 image embedding, about 1-10.

    The head's weights are a state dict of `torch.nn.Linear` layers `layers.<i>.weight|bias` applied in index order
    with nothing between them (the predictor's dropouts are inactive at inference). Loaded with
    `torch.load(weights_only=True)` (no code runs) or from `.safetensors`.

    Args:
        model (`str`, defaults to `"openai/clip-vit-large-patch14"`): the CLIP whose image embedding the head reads.
        head (`str`, defaults to `"trl-lib/ddpo-aesthetic-predictor"`): a file, a directory or a Hub repo id holding
            the head's weights.
        head_filename (`str`, defaults to `"aesthetic-model.pth"`): the file inside `head` when it is a directory or
            a repo.
    """

    default_name = "aesthetic"

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        head: str = "trl-lib/ddpo-aesthetic-predictor",
        head_filename: str = "aesthetic-model.pth",
        **kwargs,
    ):
        super().__init__(model, **kwargs)
        self.head_id, self.head_filename = head, head_filename

    def _head_path(self) -> str:
        if os.path.isfile(self.head_id):
            return self.head_id
        if os.path.isdir(self.head_id):
            return os.path.join(self.head_id, self.head_filename)
        from huggingface_hub import hf_hub_download

        return hf_hub_download(self.head_id, self.head_filename, revision=self.revision)

    def _load(self, device):
        from transformers import AutoImageProcessor, CLIPModel

        # The whole CLIPModel, not CLIPVisionModelWithProjection: the projection size lives in the top-level config.
        self.clip = self._from_pretrained(CLIPModel, dtype=self.dtype).to(device)
        self.image_processor = self._from_pretrained(AutoImageProcessor)
        path = self._head_path()
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
        if not indices:
            raise ValueError(f"{path} holds no 'layers.<i>.weight' tensors: it is not an aesthetic predictor head.")
        self.head = torch.nn.ModuleList()
        for i in indices:
            weight = state[f"layers.{i}.weight"]
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=f"layers.{i}.bias" in state)
            layer.load_state_dict(
                {"weight": weight, **({"bias": state[f"layers.{i}.bias"]} if layer.bias is not None else {})}
            )
            self.head.append(layer)
        self.head.to(device)

    def _modules(self):
        return [self.clip, self.head]

    def score_batch(self, prompts, images, **columns):
        pixels = self.image_processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        pooled = self.clip.vision_model(pixel_values=pixels.to(self._loaded_on, self.dtype)).pooler_output
        embedding = self.clip.visual_projection(pooled).float()
        x = embedding / embedding.norm(dim=-1, keepdim=True)
        for layer in self.head:
            x = layer(x)
        return x.squeeze(-1).tolist()


# ------------------------------------------------------------------------------------------------------------ OCR
def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each 1), by dynamic programming."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def quoted_text(prompt: str) -> str | None:
    """The text an OCR prompt asks for: the first double-quoted span (official: `prompt.split('"')[1]`), or `None`
    when the prompt has no complete quoted span."""
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else None


def ocr_score(recognized: str, target: str) -> float | None:
    """The official OCR reward (DiffusionNFT / Flow-GRPO `ocr.py`): spaces removed and lower-cased on both sides,
    `d = 0` if the target occurs in the recognised text else the edit distance, and `1 - min(d, n) / n` with
    `n = len(target)`; in [0, 1]. `None` for an empty target (nothing to read)."""
    recognized = recognized.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if not target:
        return None
    distance = 0 if target in recognized else edit_distance(recognized, target)
    return 1.0 - min(distance, len(target)) / len(target)


class OCRReward(RewardModel):
    """OCR reward: how well the text read from the image matches the prompt's quoted text (`ocr_score`).

    The official code reads text with PaddleOCR; here any transformers image-to-text OCR model loadable with
    `AutoModelForImageTextToText` and `AutoProcessor` reads it (encoder-decoder models such as TrOCR, or
    decoder-only ones such as GOT-OCR2, whose prompt tokens are stripped), or a `recognizer` callable you give.
    The target is the first double-quoted span of the prompt (the peer bug of comparing with the whole prompt is
    avoided), or the dataset column `target_column` when set. A prompt without a target scores `None`.

    Args:
        model (`str`, defaults to `"microsoft/trocr-base-printed"`): the OCR model (TrOCR reads one line of printed
            text; for whole scenes pass e.g. `"stepfun-ai/GOT-OCR-2.0-hf"`).
        recognizer (`Callable[[list[PIL.Image]], list[str]]`, *optional*): reads the text instead of `model`.
        target_column (`str`, *optional*): dataset column holding the target text.
        max_new_tokens (`int`, defaults to 64): most tokens read per image.
    """

    default_name = "ocr"

    def __init__(
        self,
        model: str = "microsoft/trocr-base-printed",
        recognizer: Callable[[list], list[str]] | None = None,
        target_column: str | None = None,
        max_new_tokens: int = 64,
        **kwargs,
    ):
        super().__init__(model, **kwargs)
        self.recognizer, self.target_column, self.max_new_tokens = recognizer, target_column, max_new_tokens

    def _load(self, device):
        if self.recognizer is not None:
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model = self._from_pretrained(AutoModelForImageTextToText, dtype=self.dtype).to(device)
        self.processor = self._from_pretrained(AutoProcessor)

    def _modules(self):
        return [] if self.recognizer is not None else [self.model]

    def read(self, images: list) -> list[str]:
        """The text of each PIL image."""
        if self.recognizer is not None:
            return list(self.recognizer(images))
        inputs = self.processor(images=images, return_tensors="pt").to(self._loaded_on)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if not self.model.config.is_encoder_decoder and "input_ids" in inputs:
            out = out[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(out, skip_special_tokens=True)

    def score_batch(self, prompts, images, **columns):
        if self.target_column is not None:
            if self.target_column not in columns:
                raise ValueError(
                    f"OCRReward target_column={self.target_column!r} is not a dataset column (columns: {sorted(columns)})."
                )
            targets = [None if t is None else str(t) for t in columns[self.target_column]]
        else:
            targets = [quoted_text(p) for p in prompts]
        texts = self.read(to_pil(images))
        return [None if t is None else ocr_score(text, t) for text, t in zip(texts, targets, strict=True)]


# ------------------------------------------------------------------------------------------------------------ JPEG
def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> list[float]:
    """Size in kB (1000 bytes) of each image saved as JPEG at `quality` (DDPO's `jpeg_incompressibility`)."""
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


def jpeg_incompressibility(prompts, images: torch.Tensor, **kwargs) -> list[float]:
    """DDPO (Black et al. 2023, arXiv 2305.13301) incompressibility: the JPEG (quality 95) size in kB; rewards
    detail and noise. About 10-200 for 512 px images."""
    return jpeg_sizes_kb(images)


def jpeg_compressibility(prompts, images: torch.Tensor, **kwargs) -> list[float]:
    """DDPO compressibility: minus the JPEG (quality 95) size in kB; rewards flat, simple images."""
    return [-s for s in jpeg_sizes_kb(images)]


__all__ = [
    "AestheticReward",
    "CLIPPreferenceReward",
    "CLIPScoreReward",
    "HPSv2Reward",
    "OCRReward",
    "PickScoreReward",
    "RewardModel",
    "edit_distance",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "ocr_score",
    "quoted_text",
    "to_pil",
]
