"""Denoising diffusion maths (pure, dimension-agnostic, no randomness inside) and conditioning.

The scheduler is configuration, never the network: the caller passes noise and timesteps.
"""

from orthodiff_nnunet.diffusion.schedules import NoiseSchedule, PredictionType, ScheduleName, make_schedule
from orthodiff_nnunet.diffusion.process import (
    diffusion_loss,
    min_snr_weights,
    predict_x0,
    predict_eps,
    q_sample,
    training_target,
)

__all__ = [
    "NoiseSchedule", "PredictionType", "ScheduleName", "make_schedule", "q_sample", "training_target",
    "predict_x0", "predict_eps", "min_snr_weights", "diffusion_loss",
]
