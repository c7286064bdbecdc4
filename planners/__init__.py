"""Installed as orthodiff_nnunet.planners: per-orientation nnU-Net experiment planners."""

from orthodiff_nnunet.planners.orthodiff_planner import (
    PLANNER_VERSION,
    OrthodiffFingerprintExtractor,
    OrthodiffPlainPlanner,
    OrthodiffPlannerMixin,
    OrthodiffResEncMPlanner,
)

__all__ = [
    "PLANNER_VERSION",
    "OrthodiffFingerprintExtractor",
    "OrthodiffPlainPlanner",
    "OrthodiffPlannerMixin",
    "OrthodiffResEncMPlanner",
]
