"""Segmentation metrics per structure: Dice (nnU-Net's counting), 95% Hausdorff distance and surface Dice (MONAI).

Conventions (Metrics Reloaded, Maier-Hein et al. 2024, for empty reference or prediction):

* both masks non-empty (``status = "both_present"``): Dice, HD95 and surface Dice as computed;
* reference non-empty, prediction empty (``"missed"``) or reference empty, prediction non-empty
  (``"false_detection"``): Dice 0 and surface Dice 0 (no boundary point lies within tolerance);
  HD95 is undefined as a distance (NaN in ``hd95_mm``) and the case is *counted* as a miss or a
  false detection; ``hd95_capped_mm`` gives it the cap, the diagonal of the reference image's
  field of view in mm (``cap_mm``, the largest distance two points of the image can have), so a
  mean of ``hd95_capped_mm`` penalises a missed structure instead of dropping it;
* both empty (``"both_empty"``): not applicable, every metric NaN and left out of means.

All distances are in millimetres, computed with the reference image's voxel spacing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from orthodiff_nnunet.errors import OrthodiffError

STATUSES = ("both_present", "missed", "false_detection", "both_empty")


class GridMismatchError(OrthodiffError, ValueError):
    """A prediction does not lie on its reference's grid (size, spacing, origin or direction)."""


def image_diagonal_mm(shape_zyx: tuple[int, ...], spacing_zyx: tuple[float, ...]) -> float:
    """Length in mm of the diagonal of the image's field of view (``shape * spacing`` per axis)."""
    return float(np.linalg.norm(np.asarray(shape_zyx, dtype=np.float64) * np.asarray(spacing_zyx, dtype=np.float64)))


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
        name -> {"dice", "hd95_mm", "hd95_capped_mm", "surface_dice", "status", "cap_mm", "n_ref",
        "n_pred"}; see the module docstring for empty masks (NaN = not applicable).
    """
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    if reference.shape != prediction.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from the reference {reference.shape}")
    cap = image_diagonal_mm(reference.shape, spacing_zyx)
    out: dict[str, dict[str, float]] = {}
    for name, value in labels.items():
        if value == 0:
            continue
        ref, pred = reference == value, prediction == value
        tp, fp, fn, _ = compute_tp_fp_fn_tn(ref, pred)
        dice = math.nan if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))
        has_ref, has_pred = bool(ref.any()), bool(pred.any())
        if has_ref and has_pred:
            status = "both_present"
            p = torch.from_numpy(np.stack([~pred, pred]))[None].float()
            r = torch.from_numpy(np.stack([~ref, ref]))[None].float()
            hd95 = float(compute_hausdorff_distance(p, r, include_background=False, percentile=95,
                                                    spacing=list(spacing_zyx))[0, 0])
            nsd = float(compute_surface_dice(p, r, class_thresholds=[tolerance_mm], include_background=False,
                                             spacing=list(spacing_zyx))[0, 0])
            hd95_capped = min(hd95, cap)
        elif has_ref or has_pred:
            status = "missed" if has_ref else "false_detection"
            hd95, nsd, hd95_capped = math.nan, 0.0, cap
        else:
            status = "both_empty"
            hd95 = nsd = hd95_capped = math.nan
        out[name] = {"dice": dice, "hd95_mm": hd95, "hd95_capped_mm": hd95_capped, "surface_dice": nsd,
                     "status": status, "cap_mm": cap, "n_ref": int(ref.sum()), "n_pred": int(pred.sum())}
    return out


def check_same_grid(reference_img, prediction_img, reference_file: Path, prediction_file: Path, case: str | None = None,
                    rtol_spacing: float = 1e-3, atol_origin_mm: float = 1e-3, atol_direction: float = 1e-4) -> None:
    """Refuse a prediction that is not on its reference's grid: size, spacing, origin and direction.

    A prediction written on another grid (other origin or axis directions, e.g. resampled or
    reoriented by another tool) would be scored voxel by voxel against the wrong anatomy.

    Raises:
        GridMismatchError: naming the case, both files and every property that differs.
    """
    props = {
        "size": (tuple(reference_img.GetSize()), tuple(prediction_img.GetSize()), lambda a, b: a == b),
        "spacing": (reference_img.GetSpacing(), prediction_img.GetSpacing(),
                    lambda a, b: np.allclose(a, b, rtol=rtol_spacing, atol=0)),
        "origin": (reference_img.GetOrigin(), prediction_img.GetOrigin(),
                   lambda a, b: np.allclose(a, b, rtol=0, atol=atol_origin_mm)),
        "direction": (reference_img.GetDirection(), prediction_img.GetDirection(),
                      lambda a, b: np.allclose(a, b, rtol=0, atol=atol_direction)),
    }
    bad = [f"{k} {tuple(np.round(b, 4).tolist()) if k != 'size' else b} differs from the reference "
           f"{tuple(np.round(a, 4).tolist()) if k != 'size' else a}"
           for k, (a, b, same) in props.items() if not same(a, b)]
    if bad:
        who = f"case {case}: " if case else ""
        raise GridMismatchError(
            f"{who}prediction {prediction_file} is not on the grid of its reference {reference_file} "
            f"({'; '.join(bad)}). Score predictions written by `orthodiff predict seg` (they keep the source image's "
            "grid), or resample the prediction onto the reference image with nearest-neighbour interpolation.")


def evaluate_case_files(
    reference_file: Path,
    prediction_file: Path,
    labels: Mapping[str, int],
    tolerance_mm: float = 1.0,
    case: str | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`structure_metrics` of two label files; the prediction must lie on the reference grid.

    Raises:
        GridMismatchError: size, spacing, origin or direction differ (see :func:`check_same_grid`).
    """
    import SimpleITK as sitk

    ref_img, pred_img = sitk.ReadImage(str(reference_file)), sitk.ReadImage(str(prediction_file))
    check_same_grid(ref_img, pred_img, Path(reference_file), Path(prediction_file), case)
    return structure_metrics(sitk.GetArrayFromImage(ref_img), sitk.GetArrayFromImage(pred_img), labels,
                             tuple(ref_img.GetSpacing()[::-1]), tolerance_mm)
