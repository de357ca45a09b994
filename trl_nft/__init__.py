"""trl_nft: DiffusionNFT, online RL for diffusion models on the forward process, as a Hugging Face Trainer."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0.dev0"

# Lazy exports: `import trl_nft.shapes` (numpy only) must not pay for torch/diffusers/transformers.
_EXPORTS = {"DiffusionNFTConfig": "config", "DiffusionNFTTrainer": "trainer"}

if TYPE_CHECKING:
    from .config import DiffusionNFTConfig
    from .trainer import DiffusionNFTTrainer


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DiffusionNFTConfig", "DiffusionNFTTrainer", "__version__"]
