"""Example reward functions for `trl-nft train` (`reward_funcs: [my_rewards:saturation]`, run from this folder)."""


def saturation(prompts, images, **kwargs):
    """Mean per-pixel (max - min) over RGB, in [0, 1]: rewards colourful images."""
    return (images.amax(dim=1) - images.amin(dim=1)).mean(dim=(1, 2)).tolist()


def prefers_short_prompts(prompts, images, **kwargs):
    """A toy reward that ignores the image: constant within a prompt group, so it teaches nothing (see
    `frac_reward_zero_std`); useful to see why only within-group differences matter."""
    return [1.0 / len(p.split()) for p in prompts]
