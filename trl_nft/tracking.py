"""Images to the trackers: the one place that knows how TensorBoard, W&B and trackio take an image.

`DiffusionNFTTrainer.log_images` calls `log_image_to_trackers` for every tracker in `report_to`, then the public hook
`on_log_images(args, state, control, key=..., images=..., captions=..., grid=...)` of every callback that defines it,
so a custom `TrainerCallback` can save or forward the same samples (e.g. to an in-house dashboard).
"""

from __future__ import annotations

import numpy as np
from transformers.integrations import TensorBoardCallback


def log_image_to_trackers(callbacks, key: str, image, step: int, caption: str | None = None) -> list[str]:
    """Send one PIL `image` under `key` at `step` to each initialised tracker callback among `callbacks`.

    Returns:
        `list[str]`: the names of the trackers that received it (`tensorboard`, `wandb`, `trackio`).
    """
    sent = []
    for callback in callbacks:
        name = type(callback).__name__
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            callback.tb_writer.add_image(key, np.asarray(image), step, dataformats="HWC")
            callback.tb_writer.flush()
            sent.append("tensorboard")
        elif name == "WandbCallback":
            wandb = getattr(callback, "_wandb", None)
            if wandb is not None and wandb.run is not None:
                # commit=False: the image joins the step's scalars instead of advancing W&B's own step counter.
                wandb.log({key: wandb.Image(image, caption=caption)}, commit=False)
                sent.append("wandb")
        elif name == "TrackioCallback":
            trackio = getattr(callback, "_trackio", None)
            if trackio is not None and getattr(callback, "_initialized", True) and hasattr(trackio, "Image"):
                trackio.log({key: trackio.Image(image, caption=caption)}, step=step)
                sent.append("trackio")
    return sent
