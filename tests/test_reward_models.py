"""Built-in reward models on tiny random-weight transformers models built from configs (no download), plus
known-answer tests where the answer is computable (JPEG size, OCR edit distance)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from trl_nft.rewards import BUILTIN_REWARDS, resolve_reward
from trl_nft.rewards.models import edit_distance, jpeg_sizes_kb, ocr_score, quoted_text


VOCAB = ["a", "sign", "that", "says", "open", "hello", "red", "circle", "cat", "photo", "of"]
PROMPTS = ['a sign that says "open"', "a red circle", 'a "cat" photo']


def _images(n=3, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny CLIP (with image processor and tokenizer), a tiny TrOCR and an aesthetic head, saved like Hub repos."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        TrOCRConfig,
        TrOCRProcessor,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    from trl_nft.shapes.tiny import build_word_tokenizer

    root = tmp_path_factory.mktemp("reward_models")
    tok = build_word_tokenizer(VOCAB, 16)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    small = dict(intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, max_position_embeddings=16, **small, **ids)
    vision = dict(hidden_size=32, image_size=32, patch_size=8, **small)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip"
    )

    encoder = ViTConfig(hidden_size=32, image_size=32, patch_size=8, **small)
    decoder = TrOCRConfig(
        vocab_size=len(tok),
        d_model=32,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
        decoder_start_token_id=tok.bos_token_id,
        **ids,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = (
        tok.bos_token_id,
        tok.pad_token_id,
        tok.eos_token_id,
    )
    trocr = VisionEncoderDecoderModel(config=config)
    for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
        setattr(trocr.generation_config, key, getattr(config, key))
    trocr.save_pretrained(root / "trocr")
    TrOCRProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(
        root / "trocr"
    )

    # the LAION predictor's layout: Linear layers at indices 0, 2, 4 (dropouts between them hold no weights)
    head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 4))
    head.append(torch.nn.Dropout(0.1)).append(torch.nn.Linear(4, 1))
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, root / "head.pth")
    return root


def _expected_clip(path, prompts, images, use_logit_scale=True, divisor=1.0):
    """The CLIP score computed by hand from the model's towers and projections."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    from trl_nft.rewards.models import to_pil

    model = CLIPModel.from_pretrained(path).eval()
    pixels = AutoImageProcessor.from_pretrained(path)(images=to_pil(images), return_tensors="pt")["pixel_values"]
    text = AutoTokenizer.from_pretrained(path)(
        prompts, padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        words = model.text_projection(model.text_model(**text).pooler_output)
    cosine = torch.nn.functional.cosine_similarity(image, words, dim=-1)
    scale = model.logit_scale.exp() if use_logit_scale else 1.0
    return (scale * cosine / divisor).tolist()


@pytest.mark.parametrize(
    "name, kwargs, use_logit_scale, divisor",
    [
        ("pickscore", {"processor": None}, True, 26.0),
        ("clipscore", {}, True, 100.0),
        ("hpsv2", {}, False, 1.0),
    ],
)
def test_clip_rewards_match_the_hand_computation(tiny_models, name, kwargs, use_logit_scale, divisor):
    path = str(tiny_models / "clip")
    reward = resolve_reward(name, model=path, **kwargs)
    assert reward.name == name
    images = _images()
    expected = _expected_clip(path, PROMPTS, images, use_logit_scale, divisor)
    np.testing.assert_allclose(reward(PROMPTS, images), expected, rtol=1e-5, atol=1e-6)


def test_reward_models_load_lazily_batch_and_keep_their_own_dtype(tiny_models):
    path = str(tiny_models / "clip")
    missing = resolve_reward("clipscore", model=str(tiny_models / "nowhere"))  # nothing is read at construction
    with pytest.raises(OSError):
        missing(PROMPTS, _images())
    images = _images(5)
    prompts = PROMPTS + PROMPTS[:2]
    whole = resolve_reward("clipscore", model=path, batch_size=8)(prompts, images)
    batched = resolve_reward("clipscore", model=path, batch_size=2)
    np.testing.assert_allclose(batched(prompts, images), whole, rtol=1e-5, atol=1e-6)
    assert batched._loaded_on == images.device and batched.model.dtype == torch.float32
    low = resolve_reward("clipscore", model=path, dtype="bfloat16")
    np.testing.assert_allclose(low(prompts, images), whole, atol=0.05)
    assert low.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="needs `model`"):
        resolve_reward("hpsv2")
    with pytest.raises(ValueError, match="takes no arguments"):
        resolve_reward("brightness", model=path)


def test_aesthetic_head_on_normalised_clip_image_embedding(tiny_models):
    from transformers import AutoImageProcessor, CLIPModel

    from trl_nft.rewards.models import to_pil

    path = str(tiny_models / "clip")
    reward = resolve_reward("aesthetic", model=path, head=str(tiny_models / "head.pth"))
    images = _images()
    scores = reward(PROMPTS, images)
    clip = CLIPModel.from_pretrained(path).eval()
    pixels = AutoImageProcessor.from_pretrained(path)(images=to_pil(images), return_tensors="pt")["pixel_values"]
    state = torch.load(tiny_models / "head.pth", weights_only=True)
    with torch.no_grad():
        x = torch.nn.functional.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        for i in (0, 2, 4):
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    np.testing.assert_allclose(scores, x.squeeze(-1).tolist(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- OCR
@pytest.mark.parametrize(
    "a, b, distance", [("kitten", "sitting", 3), ("", "abc", 3), ("flaw", "lawn", 2), ("same", "same", 0)]
)
def test_edit_distance_known_answers(a, b, distance):
    assert edit_distance(a, b) == distance == edit_distance(b, a)


def test_ocr_score_is_the_official_formula_on_the_quoted_text():
    assert quoted_text('a sign that says "Open Late" in neon') == "Open Late"
    assert quoted_text("a sign with no quotes") is None and quoted_text('one "quote') is None
    assert ocr_score("OPEN LATE tonight", "Open Late") == 1.0  # contained: distance 0
    assert ocr_score("helo", "hello") == pytest.approx(0.8)  # one deletion of five characters
    assert ocr_score("zzzzzzzzzz", "ab") == 0.0  # distance clamped to the target length
    assert ocr_score("anything", "") is None


def test_ocr_reward_with_a_recognizer_and_a_target_column():
    read = ["OPEN", "whatever", "a cat"]
    reward = resolve_reward("ocr", recognizer=lambda images: read[: len(images)])
    # prompt 2 has no quoted text: no score, rather than a score against the whole prompt
    assert reward(PROMPTS, _images()) == [1.0, None, 1.0]
    by_column = resolve_reward("ocr", recognizer=lambda images: ["opn"] * len(images), target_column="text")
    assert by_column(PROMPTS, _images(), text=["open", "open", None]) == [
        pytest.approx(0.75),
        pytest.approx(0.75),
        None,
    ]
    with pytest.raises(ValueError, match="target_column='text' is not a dataset column"):
        by_column(PROMPTS, _images())


def test_ocr_reward_with_a_transformers_model_scores_what_it_reads(tiny_models):
    reward = resolve_reward("ocr", model=str(tiny_models / "trocr"), batch_size=2, max_new_tokens=6)
    images = _images()
    scores = reward(PROMPTS, images)
    from trl_nft.rewards.models import to_pil

    texts = reward.read(to_pil(images))
    assert scores == [ocr_score(texts[0], "open"), None, ocr_score(texts[2], "cat")]
    assert all(0.0 <= s <= 1.0 for s in scores if s is not None)


# ---------------------------------------------------------------------------------------------------- JPEG
def test_jpeg_rewards_are_ddpo_sizes_in_kb():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = _images(1, 64)
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(buffer, format="JPEG", quality=95)
    assert jpeg_sizes_kb(flat) == [len(buffer.getvalue()) / 1000]
    incompressible = BUILTIN_REWARDS["jpeg_incompressibility"]
    compressible = BUILTIN_REWARDS["jpeg_compressibility"]
    both = torch.cat([flat, noise])
    sizes = incompressible(["p", "q"], both)
    assert compressible(["p", "q"], both) == [-s for s in sizes]
    assert sizes[1] > 5 * sizes[0]  # noise does not compress, a flat image does


def test_builtin_reward_models_train_by_name(tiny_pipe, tmp_path, tiny_models):
    from conftest import PROMPTS as TRAIN_PROMPTS
    from conftest import tiny_config

    from trl_nft import DiffusionNFTTrainer

    clip = resolve_reward("clipscore", model=str(tiny_models / "clip"))
    trainer = DiffusionNFTTrainer(
        tiny_pipe,
        [clip, "jpeg_compressibility"],
        args=tiny_config(tmp_path, max_steps=1, reward_weights=[1.0, 0.01]),
        train_dataset=[{"prompt": p} for p in TRAIN_PROMPTS],
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    assert -1 <= logs["rewards/clipscore/mean"] <= 1 and logs["rewards/jpeg_compressibility/mean"] < 0
