"""Forward process, prediction targets and losses; any number of spatial dimensions.

All functions take the noise and the timesteps from the caller (no randomness inside). Schedule
coefficients are gathered in float32 and cast to the data's dtype only for the final arithmetic,
so a half-precision input never changes the stored schedule.
"""

from __future__ import annotations

import torch

from orthodiff_nnunet.diffusion.schedules import NoiseSchedule, PredictionType


def _gather(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """coef[t] shaped (B, 1, 1, ...) to broadcast against ``like`` (B, C, *spatial)."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"timesteps must have shape (batch,) = ({like.shape[0]},), got {tuple(t.shape)}")
    out = coef.to(device=t.device)[t.long()]
    return out.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε. ``t`` is 0-based; ``t = 0`` is (nearly) the input."""
    return _gather(schedule.sqrt_alphas_cumprod, t, x0) * x0 + _gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def training_target(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, prediction: PredictionType = "epsilon"
) -> torch.Tensor:
    """What the network learns to output: ε, or v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022)."""
    if prediction == "epsilon":
        return noise
    if prediction == "v":
        return _gather(schedule.sqrt_alphas_cumprod, t, x0) * noise - _gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    raise ValueError(f"unknown prediction type {prediction!r}: use 'epsilon' or 'v'")


def predict_x0(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor, prediction: PredictionType = "epsilon"
) -> torch.Tensor:
    """Clean-image estimate from the network output."""
    a = _gather(schedule.sqrt_alphas_cumprod, t, x_t)
    b = _gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    if prediction == "epsilon":
        return (x_t - b * output) / a
    if prediction == "v":
        return a * x_t - b * output
    raise ValueError(f"unknown prediction type {prediction!r}")


def predict_eps(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor, prediction: PredictionType = "epsilon"
) -> torch.Tensor:
    """Noise estimate from the network output."""
    if prediction == "epsilon":
        return output
    a = _gather(schedule.sqrt_alphas_cumprod, t, x_t)
    b = _gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    if prediction == "v":
        return b * x_t + a * output
    raise ValueError(f"unknown prediction type {prediction!r}")


def min_snr_weights(
    schedule: NoiseSchedule, t: torch.Tensor, gamma: float = 5.0, prediction: PredictionType = "epsilon"
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), shape (B,), float32.

    For ε-prediction the weight is min(SNR, γ) / SNR; for v-prediction min(SNR, γ) / (SNR + 1).
    """
    snr = schedule.snr.to(t.device)[t.long()]
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "epsilon":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1.0)
    raise ValueError(f"unknown prediction type {prediction!r}")


def diffusion_loss(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (float32), optionally weighted per sample, averaged over the batch."""
    per_sample = (output.float() - target.float()).pow(2).flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()
