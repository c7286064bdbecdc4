"""Few-step deterministic DDIM sampling (Song et al. 2021), for sanity pictures of a denoiser."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from orthodiff_nnunet.diffusion.process import predict_eps, predict_x0
from orthodiff_nnunet.diffusion.schedules import NoiseSchedule, PredictionType


@torch.no_grad()
def ddim_sample(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    num_steps: int = 10,
    prediction: PredictionType = "epsilon",
    clip: float | None = 5.0,
    start_step: int | None = None,
) -> torch.Tensor:
    """Run ``num_steps`` DDIM steps (eta = 0) from ``x_T`` (noise from the caller) at timestep ``start_step``.

    Args:
        model: ``model(x_t, t) -> output`` (ε or v).
        schedule: the training schedule.
        x_T: the starting sample, e.g. unit Gaussian noise, or a noised image for partial denoising.
        num_steps: number of denoising steps, spaced evenly from ``start_step`` down to 0.
        prediction: what the model outputs.
        clip: clamp x0 estimates to ±clip (z-scored images rarely exceed a few units), None for no clamp.
        start_step: timestep of ``x_T`` (default: the last step).
    """
    start = schedule.num_steps - 1 if start_step is None else int(start_step)
    steps = np.unique(np.linspace(0, start, num_steps).round().astype(int))[::-1]
    acp = schedule.alphas_cumprod
    x = x_T
    for i, t in enumerate(steps):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        out = model(x, tt).to(x.dtype)
        x0 = predict_x0(schedule, x, tt, out, prediction)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        eps = predict_eps(schedule, x, tt, out, prediction)
        if i + 1 < len(steps):
            a_next = acp[int(steps[i + 1])].item()
            x = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
        else:
            x = x0
    return x
