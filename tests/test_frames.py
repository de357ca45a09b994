"""The flow-frame maps of `trl_nft.families.frames`, without a model."""

import pytest
import torch
from diffusers import DDPMScheduler

from trl_nft.families import FlowFrame, VPFrame


def _sd_frame(prediction_type="epsilon"):
    config = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").config
    return VPFrame.from_scheduler_config({**config, "prediction_type": prediction_type})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_velocity_is_eps_minus_x0_for_every_prediction_type(prediction_type):
    frame = _sd_frame(prediction_type)
    torch.manual_seed(0)
    x0, eps = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    t = torch.tensor([0.05, 0.2, 0.5, 0.7, 0.9])
    x_flow = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    # The VP sample with alpha^2 + sigma^2 = 1 whose rescaling is x_flow.
    n = ((1 - t) ** 2 + t**2).sqrt().view(-1, 1, 1, 1)
    alpha, sigma = (1 - t.view(-1, 1, 1, 1)) / n, t.view(-1, 1, 1, 1) / n
    x_k = frame.model_input(x_flow, t)
    torch.testing.assert_close(x_k, alpha * x0 + sigma * eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frame.flow_sample(x_k, t), x_flow, rtol=1e-5, atol=1e-5)
    output = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(frame.velocity(output, x_flow, t), eps - x0, rtol=1e-4, atol=1e-4)


def test_vp_timestep_map_is_the_inverse_of_the_schedule():
    frame = _sd_frame()
    k = torch.tensor([0.0, 1.0, 10.0, 250.0, 500.5, 999.0])
    t = frame.flow_time(k)
    # t(k) = sigma_k / (alpha_k + sigma_k) from alphas_cumprod, increasing.
    ac = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.double()
    expected = (1 - ac[999]).sqrt() / (ac[999].sqrt() + (1 - ac[999]).sqrt())
    assert float(t[-1]) == pytest.approx(float(expected))
    assert bool((t[1:] > t[:-1]).all())
    torch.testing.assert_close(frame.model_timestep(t.float()), k.float(), rtol=1e-4, atol=1e-3)
    lo, hi = frame.t_range
    assert 0.02 < lo < 0.04 and 0.9 < hi < 0.95  # SD1.x's schedule never reaches pure noise


def test_vp_rejects_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        _sd_frame("flow_prediction")


@pytest.mark.parametrize(
    "frame",
    [
        FlowFrame(scale=1000.0),
        FlowFrame(scale=1.0),
        FlowFrame(scale=-1.0, offset=1.0, sign=-1.0),
        FlowFrame(scale=1000.0, shift_mu=0.9),
        FlowFrame(scale=1000.0, shift_mu=1.3, shift_type="linear"),
    ],
)
def test_flow_frame_timestep_round_trip(frame):
    t = torch.tensor([0.01, 0.3, 0.5, 0.9, 1.0])
    torch.testing.assert_close(frame.flow_time(frame.model_timestep(t)).float(), t, rtol=1e-5, atol=1e-6)
    out = torch.randn(5, 2)
    torch.testing.assert_close(frame.velocity(out, out, t), frame.sign * out)


def test_cogview4_style_shift_matches_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    timesteps = torch.tensor([1000.0, 750.0, 500.0, 250.0])
    scheduler.set_timesteps(timesteps=timesteps.tolist(), sigmas=(timesteps / 1000).tolist(), mu=1.1)
    frame = FlowFrame(scale=1000.0, shift_mu=1.1, shift_type="linear")
    torch.testing.assert_close(frame.flow_time(timesteps).float(), scheduler.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_output_gain_is_the_derivative_of_x0_hat_with_respect_to_the_output(prediction_type):
    # x0_hat = x_flow - t v(output): its derivative with respect to the output, by autograd, is what the
    # `loss_time_weighting="flow_equivalent"` weights divide by.
    frame = _sd_frame(prediction_type)
    t = torch.tensor([0.05, 0.3, 0.6, 0.894])
    x_flow = torch.randn(4, 1)
    output = torch.randn(4, 1, requires_grad=True)
    x0_hat = x_flow - t.view(-1, 1) * frame.velocity(output, x_flow, t)
    (grad,) = torch.autograd.grad(x0_hat.sum(), output)
    torch.testing.assert_close(grad.abs().squeeze(1).double(), frame.output_gain(t), rtol=1e-4, atol=1e-6)
    flow = FlowFrame(scale=1.0, sign=-1.0)
    output_flow = torch.randn(4, 1, requires_grad=True)
    (grad_flow,) = torch.autograd.grad(
        (x_flow - t.view(-1, 1) * flow.velocity(output_flow, x_flow, t)).sum(), output_flow
    )
    torch.testing.assert_close(grad_flow.abs().squeeze(1).double(), flow.output_gain(t), rtol=1e-5, atol=1e-6)
