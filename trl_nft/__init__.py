"""trl_nft: DiffusionNFT, online RL for diffusion models on the forward process, as a Hugging Face Trainer."""

__version__ = "0.1.0.dev0"

from .config import DiffusionNFTConfig
from .trainer import DiffusionNFTTrainer


__all__ = ["DiffusionNFTConfig", "DiffusionNFTTrainer", "__version__"]
