"""How a denoiser's own parameterisation maps into the trainer's flow frame, as pure tensor functions.

The trainer works in one frame for every model (`trl_nft.core`): `x_t = (1 - t) x0 + t eps` with `t` in [0, 1] and the
velocity `v = eps - x0`. A family's denoiser sees something else: another timestep scale, a reversed time, a
negated output, or, for UNets, the variance-preserving process `x_k = alpha_k x0 + sigma_k eps` with an epsilon, v or
sample prediction. A frame converts in both directions:

* `model_timestep(t)`: the flow time as the value the denoiser's `timestep` argument expects;
* `flow_time(timestep)`: the inverse (used to read the training grid off the timesteps a rollout visited);
* `model_input(x, t)`: the flow-frame sample as the denoiser's input;
* `velocity(output, x, t)`: the denoiser's output as a flow-frame velocity.

**Variance-preserving models (SD1.x, SD2.x, SDXL).** With `alpha_k = sqrt(alphas_cumprod[k])` and `sigma_k =
sqrt(1 - alphas_cumprod[k])` (both read from the scheduler's config), dividing by `alpha + sigma` gives

    x_k / (alpha_k + sigma_k) = (1 - t) x0 + t eps,   t = sigma_k / (alpha_k + sigma_k),

so the flow frame is the VP process rescaled: `x_flow = x_k / (alpha + sigma)`. Given `t`, `sigma/alpha = t / (1 - t)`
and `alpha^2 + sigma^2 = 1` give `alpha = (1 - t) / n`, `sigma = t / n`, `alpha + sigma = 1 / n` with
`n = sqrt((1 - t)^2 + t^2)`; the discrete timestep `k` is found by interpolating `t(k)` (monotone in `k`). The
prediction becomes `(x0_hat, eps_hat)`: epsilon: `eps_hat = out`, `x0_hat = (x_k - sigma eps_hat) / alpha`;
v-prediction: `x0_hat = alpha x_k - sigma out`, `eps_hat = sigma x_k + alpha out`; sample: `x0_hat = out`,
`eps_hat = (x_k - alpha x0_hat) / sigma`. The flow velocity is `eps_hat - x0_hat`. DDIM (eta = 0) is exactly the Euler
solver in this frame, which is how the tests check the conversion against a pipeline's own steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@dataclass(frozen=True)
class FlowFrame:
    """A flow-matching denoiser: `timestep = offset + scale * t`, `v = sign * output`.

    Args:
        scale (`float`): SD3, HiDream: 1000 (`num_train_timesteps`); FLUX, Qwen-Image, Chroma, AuraFlow: 1;
            SANA: `1000 * timestep_scale`; Lumina 2, Z-Image: -1 (reversed time).
        offset (`float`, defaults to 0): Lumina 2, Z-Image: 1 (their `t = 0` is noise).
        sign (`float`, defaults to 1): -1 where the denoiser predicts `x0 - eps` (Lumina 2, Z-Image, HiDream).
        shift_mu (`float`, *optional*): CogView4 feeds its denoiser the *unshifted* time while the sampler moves
            along sigmas shifted by `mu` (resolution-dependent): the model timestep is then
            `offset + scale * unshift(t)`.
        shift_type (`str`, defaults to `"exponential"`): the scheduler's `time_shift_type` for `shift_mu`.
    """

    scale: float
    offset: float = 0.0
    sign: float = 1.0
    shift_mu: float | None = None
    shift_type: str = "exponential"

    def _shift_factor(self) -> float:
        # The scheduler's resolution-dependent time shift (FlowMatchEulerDiscreteScheduler.time_shift, sigma = 1):
        # shifted = m / (m + 1/u - 1) with m = exp(mu) ("exponential") or mu ("linear").
        return math.exp(self.shift_mu) if self.shift_type == "exponential" else self.shift_mu

    def _shift(self, u: torch.Tensor) -> torch.Tensor:
        if self.shift_mu is None:
            return u
        m = self._shift_factor()
        return m / (m + (1 / u.clamp_min(1e-12) - 1))

    def _unshift(self, t: torch.Tensor) -> torch.Tensor:
        if self.shift_mu is None:
            return t
        return 1 / (1 + self._shift_factor() * (1 / t.double().clamp_min(1e-12) - 1))

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return (self.offset + self.scale * self._unshift(t)).to(t.dtype)

    def flow_time(self, timestep: torch.Tensor) -> torch.Tensor:
        return self._shift((timestep.double() - self.offset) / self.scale)

    def model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x

    def flow_sample(self, x_model: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_model

    def velocity(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.sign * output.float()

    def output_gain(self, t: torch.Tensor) -> torch.Tensor:
        """`|d x0_hat / d output|` at flow times `t` (`[B]`): `x0_hat = x - t v` and `v = ±output`, so `t`."""
        return t.double()


class VPFrame:
    """A variance-preserving (DDPM-family) denoiser: SD1.x (epsilon), SD2.x (v-prediction), SDXL.

    Args:
        alphas_cumprod (`torch.Tensor` of shape `[num_train_timesteps]`): the scheduler's cumulative alphas.
        prediction_type (`str`): `"epsilon"`, `"v_prediction"` or `"sample"` (the scheduler config's field).

    Raises:
        ValueError: for another prediction type.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type {prediction_type!r} is not supported: the scheduler config must say 'epsilon', "
                "'v_prediction' or 'sample'."
            )
        self.prediction_type = prediction_type
        ac = alphas_cumprod.double().clamp(1e-12, 1.0)
        alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
        # t(k) = sigma_k / (alpha_k + sigma_k), increasing in k.
        self.t_table = sigma / (alpha + sigma)
        if not bool((self.t_table[1:] > self.t_table[:-1]).all()):
            raise ValueError(
                "alphas_cumprod must decrease strictly with the timestep to map a UNet into the flow frame."
            )

    @classmethod
    def from_scheduler_config(cls, config) -> VPFrame:
        """Built from any DDPM-family scheduler's config (betas and prediction type), whichever solver it configures."""
        from diffusers import DDPMScheduler

        keys = (
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "rescale_betas_zero_snr",
        )
        ddpm = DDPMScheduler(**{k: config[k] for k in keys if k in config})
        return cls(ddpm.alphas_cumprod, config.get("prediction_type", "epsilon"))

    @property
    def t_range(self) -> tuple[float, float]:
        """The flow times the discrete schedule covers (`t(0)`, `t(T-1)`)."""
        return float(self.t_table[0]), float(self.t_table[-1])

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        # Piecewise-linear inverse of t(k); UNets embed fractional timesteps.
        table = self.t_table.to(t.device)
        tc = t.double().clamp(float(table[0]), float(table[-1]))
        idx = torch.searchsorted(table, tc).clamp(1, table.numel() - 1)
        lo, hi = table[idx - 1], table[idx]
        k = (idx - 1).double() + (tc - lo) / (hi - lo)
        return k.to(t.dtype if t.is_floating_point() else torch.float32)

    def flow_time(self, timestep: torch.Tensor) -> torch.Tensor:
        table = self.t_table
        k = timestep.double().cpu().clamp(0, table.numel() - 1)
        lo = k.floor().long().clamp(max=table.numel() - 2)
        frac = k - lo.double()
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    @staticmethod
    def _alpha_sigma(t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.double()
        n = ((1 - t) ** 2 + t**2).sqrt()
        return _bcast((1 - t) / n, like), _bcast(t / n, like)

    def model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(t, x)
        return x * (alpha + sigma)

    def flow_sample(self, x_model: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(t, x_model)
        return x_model / (alpha + sigma)

    def velocity(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = output.float()
        alpha, sigma = (a.float() for a in self._alpha_sigma(t, out))
        x_k = x.float() * (alpha + sigma)
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x_k - sigma * eps) / alpha
        elif self.prediction_type == "v_prediction":
            x0 = alpha * x_k - sigma * out
            eps = sigma * x_k + alpha * out
        else:
            x0 = out
            eps = (x_k - alpha * x0) / sigma
        return eps - x0

    def output_gain(self, t: torch.Tensor) -> torch.Tensor:
        """`|d x0_hat / d output|` at flow times `t` (`[B]`), the factor by which an error of the denoiser's own
        output becomes an error of the clean-sample estimate: epsilon `sigma / alpha = t / (1 - t)` (8.4 at SD1.x's
        timestep 901, 0.04 at 1), v-prediction `sigma = t / n`, sample 1."""
        t = t.double()
        if self.prediction_type == "epsilon":
            return t / (1 - t).clamp_min(1e-12)
        if self.prediction_type == "v_prediction":
            return t / ((1 - t) ** 2 + t**2).sqrt()
        return torch.ones_like(t)
