"""Small image helpers (PIL/numpy only)."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """`[B, 3, H, W]` in [0, 1] -> PIL images."""
    return [Image.fromarray(a) for a in to_uint8_hwc(images)]


def image_grid(
    images: torch.Tensor | list[Image.Image],
    captions: list[str] | None = None,
    columns: int = 8,
    cell: int = 96,
    caption_lines: int = 3,
) -> Image.Image:
    """A captioned grid of images, each upscaled (nearest) to `cell` pixels so that small images stay readable."""
    pil = to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    captions = captions or [""] * len(pil)
    columns = max(1, min(columns, len(pil)))
    rows = (len(pil) + columns - 1) // columns
    font = ImageFont.load_default()
    line_height = 11
    caption_height = caption_lines * line_height + 4 if any(captions) else 0
    width_chars = max(8, cell // 6)
    grid = Image.new("RGB", (columns * cell, rows * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, caption) in enumerate(zip(pil, captions, strict=False)):
        x, y = (i % columns) * cell, (i // columns) * (cell + caption_height)
        grid.paste(img.resize((cell, cell), Image.NEAREST), (x, y))
        for k, line in enumerate(textwrap.wrap(caption, width_chars)[:caption_lines]):
            draw.text((x + 2, y + cell + 2 + k * line_height), line, fill="black", font=font)
    return grid


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """`[B, 3, H, W]` in [0, 1] -> `uint8 [B, H, W, 3]`."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def require_shapes_extra(what: str) -> None:
    """Raise a clear `ImportError` when the shapes world's optional dependencies (`trl_nft[shapes]`) are missing."""
    from importlib.util import find_spec

    missing = [name for name in ("scipy", "matplotlib") if find_spec(name) is None]
    if missing:
        raise ImportError(
            f"{what} needs the shapes world's extra dependencies ({', '.join(missing)} not installed): "
            'pip install "trl_nft[shapes]"'
        )
