"""Noise schedules: computed in float64, stored in float32.

``alphas_cumprod[t]`` (written ᾱ_t) is the fraction of signal variance left at step ``t``
(0-based, ``t = 0 .. T-1``). The forward process is ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε``.

Why this small module and not MONAI's ``DDPMScheduler`` (decided with
``bench/bench_noise_schedule.py``, results in ``bench/results/noise_schedule.md``; MONAI 1.6.1,
T = 1000, CPU): both give the same schedules, ᾱ_t within 4.2e-7 (cosine) and 2.4e-7 (linear), and
MONAI would save no code: the schedule and forward-process part here is 50 lines, the smallest
MONAI-based replacement with this API also 50 (an adapter for ``snr`` and the square roots that
``predict_x0``, ``min_snr_weights`` and DDIM read, the rescaled linear betas for T != 1000, and a
guard restoring the schedule after each call). Speed does not decide either: ``q_sample`` and
the v-target take about the same time as ``add_noise`` and ``get_velocity`` (MONAI / ours 0.95-1.31
on a (2, 1, 32, 64, 64) batch, a shared machine), construction is 1.8-3x faster here (0.1 ms, once
per run). What decides is precision and the API: MONAI computes in float32, so ``sqrt(1 - ᾱ_0)``,
the noise level of the first steps, is off by 4.6e-4 relative (cosine; 1.8e-9 here, from float64)
and x_t by up to 1.5e-5; and its ``add_noise`` casts the stored ``alphas_cumprod`` to the input's
dtype, so one float16 call degrades the schedule of every later float32 call (here the schedule is
never changed: ``tests/test_diffusion.py``). Switching would also change every pretraining run's
numbers. ``tests/test_trainer_library.py`` checks the agreement with MONAI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

ScheduleName = Literal["cosine", "linear"]
PredictionType = Literal["epsilon", "v"]


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021) cosine schedule: ᾱ(t) = cos²(((t/T + s)/(1 + s)) π/2), float64.

    Betas are clipped at ``max_beta`` so the last step does not divide by zero.
    """
    steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    betas = 1.0 - f[1:] / f[:-1]
    return np.clip(betas, 0.0, max_beta)


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. (2020) linear schedule, rescaled so any ``num_steps`` matches T = 1000, float64."""
    scale = 1000.0 / num_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete schedule of ``num_steps`` steps; tensors are float32 on the CPU.

    Attributes:
        name: ``cosine`` or ``linear``.
        betas: β_t, shape (T,).
        alphas_cumprod: ᾱ_t = Π_{s<=t} (1 - β_s), shape (T,), strictly decreasing in (0, 1).
        sqrt_alphas_cumprod: sqrt(ᾱ_t).
        sqrt_one_minus_alphas_cumprod: sqrt(1 - ᾱ_t).
        snr: signal-to-noise ratio ᾱ_t / (1 - ᾱ_t).
    """

    name: str
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    snr: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])

    def to_dict(self) -> dict:
        """What a checkpoint records to rebuild the schedule."""
        return {"name": self.name, "num_steps": self.num_steps}


def make_schedule(name: ScheduleName = "cosine", num_steps: int = 1000) -> NoiseSchedule:
    """Build a schedule; every derived quantity is computed in float64 and then stored in float32."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if name == "cosine":
        betas = cosine_betas(num_steps)
    elif name == "linear":
        betas = linear_betas(num_steps)
    else:
        raise ValueError(f"unknown schedule {name!r}: use 'cosine' or 'linear'")
    acp = np.cumprod(1.0 - betas)
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return NoiseSchedule(
        name=name,
        betas=f32(betas),
        alphas_cumprod=f32(acp),
        sqrt_alphas_cumprod=f32(np.sqrt(acp)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - acp)),
        snr=f32(acp / (1.0 - acp)),
    )
