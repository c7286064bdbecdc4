"""Segmentation metrics against known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from orthodiff_nnunet.evaluation.segmentation import evaluate_case_files, structure_metrics

LABELS = {"background": 0, "femur": 1, "tibia": 2, "patella": 3}


def test_dice_hd95_and_surface_dice_known_values():
    ref = np.zeros((20, 30, 30), np.uint8)
    ref[5:15, 5:15, 5:15] = 1  # 1000 voxels
    ref[5:15, 20:25, 20:25] = 2
    pred = np.zeros_like(ref)
    pred[5:15, 5:15, 7:17] = 1  # shifted by 2 voxels along x: overlap 10*10*8 = 800
    pred[5:15, 20:25, 20:25] = 2  # perfect
    pred[0:2, 0:2, 0:2] = 3  # false positive of a structure absent from the reference
    m = structure_metrics(ref, pred, LABELS, spacing_zyx=(3.0, 0.5, 0.5), tolerance_mm=0.6)
    assert m["femur"]["dice"] == pytest.approx(2 * 800 / 2000)
    assert m["tibia"]["dice"] == 1.0 and m["tibia"]["hd95_mm"] == 0.0 and m["tibia"]["surface_dice"] == 1.0
    # a 2-voxel shift along x at 0.5 mm: surfaces are at most 1 mm apart
    assert m["femur"]["hd95_mm"] == pytest.approx(1.0)
    assert 0.0 < m["femur"]["surface_dice"] < 1.0
    assert m["patella"]["dice"] == 0.0 and math.isnan(m["patella"]["hd95_mm"])
    assert m["patella"]["n_ref"] == 0 and m["patella"]["n_pred"] == 8
    # the same shift along z (3 mm slices) gives 6 mm
    pred_z = np.zeros_like(ref)
    pred_z[7:17, 5:15, 5:15] = 1
    assert structure_metrics(ref, pred_z, {"femur": 1}, (3.0, 0.5, 0.5))["femur"]["hd95_mm"] == pytest.approx(6.0)


def test_absent_everywhere_is_nan_not_perfect():
    z = np.zeros((4, 4, 4), np.uint8)
    m = structure_metrics(z, z, {"femur": 1}, (1.0, 1.0, 1.0))
    assert math.isnan(m["femur"]["dice"]) and math.isnan(m["femur"]["surface_dice"])


def test_files_on_other_grids_are_refused(tmp_path):
    a = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
    b = sitk.GetImageFromArray(np.zeros((4, 5, 7), np.uint8))
    sitk.WriteImage(a, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(b, str(tmp_path / "b.nii.gz"))
    with pytest.raises(ValueError, match="differs from the reference"):
        evaluate_case_files(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", LABELS)
    assert evaluate_case_files(tmp_path / "a.nii.gz", tmp_path / "a.nii.gz", LABELS)["femur"]["n_ref"] == 0
