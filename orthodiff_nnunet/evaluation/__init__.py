"""Metrics with confidence intervals: classification (scikit-learn based) now, segmentation and reports later."""

from orthodiff_nnunet.evaluation.classification import (
    ClassificationMetrics,
    LabelMetrics,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    choose_thresholds,
    classification_metrics,
    mean_auroc,
)

__all__ = [
    "ClassificationMetrics", "LabelMetrics", "binary_metrics", "bootstrap_ci", "choose_threshold",
    "choose_thresholds", "classification_metrics", "mean_auroc",
]
