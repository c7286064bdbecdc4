"""Diffusion maths against known numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orthodiff_nnunet.diffusion import (
    diffusion_loss,
    make_schedule,
    min_snr_weights,
    predict_eps,
    predict_x0,
    q_sample,
    training_target,
)
from orthodiff_nnunet.diffusion.schedules import cosine_betas, linear_betas


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_schedule_endpoints_and_monotonicity(name):
    s = make_schedule(name, 1000)
    acp = s.alphas_cumprod.double()
    assert s.num_steps == 1000 and s.betas.dtype == torch.float32
    assert torch.all(acp[1:] < acp[:-1])  # strictly decreasing
    assert torch.all(s.betas > 0) and torch.all(s.betas < 1)
    assert acp[0] > 0.999  # almost no noise at the first step
    assert acp[-1] < 1e-4  # almost pure noise at the last
    assert torch.all(s.snr[1:] < s.snr[:-1])


def test_known_numbers():
    cos = make_schedule("cosine", 1000)
    # ᾱ_t = f(t+1)/f(0) with f(u) = cos²(((u/T + s)/(1+s)) π/2), s = 0.008
    f = lambda u: math.cos(((u / 1000 + 0.008) / 1.008) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 250, 499, 998):
        assert cos.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    lin = make_schedule("linear", 1000)
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    assert lin.alphas_cumprod[-1].item() == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rel=1e-4)
    # a shorter linear schedule is rescaled to the same range of noise
    assert make_schedule("linear", 100).betas[-1].item() == pytest.approx(0.2)
    # float64 computation: the float32 store equals the rounded float64 values
    assert np.array_equal(cos.betas.numpy(), cosine_betas(1000).astype(np.float32))
    assert np.array_equal(make_schedule("linear", 1000).betas.numpy(), linear_betas(1000).astype(np.float32))


def test_forward_at_t0_returns_input_and_at_end_is_noise():
    s = make_schedule("cosine")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 1, 8, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t0 = torch.zeros(2, dtype=torch.long)
    assert torch.allclose(q_sample(s, x0, t0, noise), x0, atol=0.03)
    tT = torch.full((2,), 999)
    assert torch.allclose(q_sample(s, x0, tT, noise), noise, atol=1e-3)


@pytest.mark.parametrize("t", [10, 300, 700])
def test_variance_preservation(t):
    s = make_schedule("cosine")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 1, 32, 32, 32, generator=g)  # unit variance data
    noise = torch.randn(x0.shape, generator=g)
    xt = q_sample(s, x0, torch.full((4,), t), noise)
    assert xt.var().item() == pytest.approx(1.0, abs=0.02)
    # and the signal fraction is ᾱ_t
    corr = (xt * x0).mean() / x0.var()
    assert corr.item() == pytest.approx(s.sqrt_alphas_cumprod[t].item(), abs=0.02)


@pytest.mark.parametrize("shape", [(3, 1, 16, 16), (3, 2, 6, 8, 10)])
def test_2d_and_3d_broadcasting_per_sample_timesteps(shape):
    s = make_schedule("linear")
    x0, noise = torch.ones(shape), torch.zeros(shape)
    t = torch.tensor([0, 500, 999])
    xt = q_sample(s, x0, t, noise)
    for i in range(3):
        assert torch.allclose(xt[i], torch.full(shape[1:], s.sqrt_alphas_cumprod[t[i]].item()))
    with pytest.raises(ValueError, match="timesteps must have shape"):
        q_sample(s, x0, torch.tensor([1, 2]), noise)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_targets_invert_to_x0_and_eps(prediction):
    s = make_schedule("cosine")
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 1, 8, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 400, 990])
    xt = q_sample(s, x0, t, noise)
    target = training_target(s, x0, t, noise, prediction)
    # a perfect network output recovers x0 and ε
    assert torch.allclose(predict_x0(s, xt, t, target, prediction), x0, atol=1e-4 if prediction == "v" else 2e-2)
    assert torch.allclose(predict_eps(s, xt, t, target, prediction), noise, atol=1e-4)


def test_half_precision_never_degrades_the_stored_schedule():
    s = make_schedule("cosine")
    before = {k: getattr(s, k).clone() for k in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "snr")}
    x0 = torch.randn(2, 1, 4, 4, 4).half()
    out = q_sample(s, x0, torch.tensor([1, 998]), torch.randn_like(x0))
    assert out.dtype == torch.float16
    training_target(s, x0, torch.tensor([1, 998]), torch.randn_like(x0), "v")
    for k, v in before.items():
        assert getattr(s, k).dtype == torch.float32 and torch.equal(getattr(s, k), v)
    # late-step coefficients that float16 could not hold stay exact in the schedule
    assert s.sqrt_alphas_cumprod[-1].item() == pytest.approx(math.sqrt(s.alphas_cumprod[-1].item()), rel=1e-6)


def test_min_snr_weights_known_values():
    s = make_schedule("cosine")
    t = torch.tensor([0, 999])
    snr = s.snr[t]
    w_eps = min_snr_weights(s, t, gamma=5.0, prediction="epsilon")
    assert w_eps[0].item() == pytest.approx(5.0 / snr[0].item(), rel=1e-5)  # high SNR: clipped
    assert w_eps[1].item() == pytest.approx(1.0)  # low SNR: weight 1
    w_v = min_snr_weights(s, t, gamma=5.0, prediction="v")
    assert w_v[1].item() == pytest.approx(snr[1].item() / (snr[1].item() + 1), rel=1e-5)


def test_loss_values():
    out = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert diffusion_loss(out, target).item() == pytest.approx((1 + 4) / 2)
    assert diffusion_loss(out, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 2) / 2)
    assert diffusion_loss(out.half(), target.half()).dtype == torch.float32
