"""Segmentation metrics per structure: Dice (nnU-Net's counting), 95% Hausdorff distance and surface Dice (MONAI).

Conventions follow nnU-Net: a structure absent from both reference and prediction has no Dice
(NaN, left out of means), and distances are undefined (NaN) unless both masks are non-empty. All
distances are in millimetres, computed with the reference image's voxel spacing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def structure_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    labels: Mapping[str, int],
    spacing_zyx: tuple[float, float, float],
    tolerance_mm: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Dice, HD95 (mm) and surface Dice at ``tolerance_mm`` for every non-background label.

    Args:
        reference: integer label array (z, y, x).
        prediction: integer label array of the same shape.
        labels: structure name -> label value (``background`` is skipped).
        spacing_zyx: voxel spacing in mm in array order.
        tolerance_mm: surface Dice tolerance.

    Returns:
        name -> {"dice", "hd95_mm", "surface_dice", "n_ref", "n_pred"} (NaN where undefined).
    """
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    if reference.shape != prediction.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from the reference {reference.shape}")
    out: dict[str, dict[str, float]] = {}
    for name, value in labels.items():
        if value == 0:
            continue
        ref, pred = reference == value, prediction == value
        tp, fp, fn, _ = compute_tp_fp_fn_tn(ref, pred)
        dice = math.nan if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))
        hd95 = nsd = math.nan
        if ref.any() and pred.any():
            p = torch.from_numpy(np.stack([~pred, pred]))[None].float()
            r = torch.from_numpy(np.stack([~ref, ref]))[None].float()
            hd95 = float(compute_hausdorff_distance(p, r, include_background=False, percentile=95,
                                                    spacing=list(spacing_zyx))[0, 0])
            nsd = float(compute_surface_dice(p, r, class_thresholds=[tolerance_mm], include_background=False,
                                             spacing=list(spacing_zyx))[0, 0])
        out[name] = {"dice": dice, "hd95_mm": hd95, "surface_dice": nsd,
                     "n_ref": int(ref.sum()), "n_pred": int(pred.sum())}
    return out


def evaluate_case_files(
    reference_file: Path,
    prediction_file: Path,
    labels: Mapping[str, int],
    tolerance_mm: float = 1.0,
) -> dict[str, dict[str, float]]:
    """:func:`structure_metrics` of two label files; the prediction must lie on the reference grid."""
    import SimpleITK as sitk

    ref_img, pred_img = sitk.ReadImage(str(reference_file)), sitk.ReadImage(str(prediction_file))
    if ref_img.GetSize() != pred_img.GetSize() or not np.allclose(ref_img.GetSpacing(), pred_img.GetSpacing(), rtol=1e-3):
        raise ValueError(f"{Path(prediction_file).name}: prediction grid {pred_img.GetSize()} / {pred_img.GetSpacing()} "
                         f"differs from the reference {ref_img.GetSize()} / {ref_img.GetSpacing()}")
    return structure_metrics(sitk.GetArrayFromImage(ref_img), sitk.GetArrayFromImage(pred_img), labels,
                             tuple(ref_img.GetSpacing()[::-1]), tolerance_mm)
