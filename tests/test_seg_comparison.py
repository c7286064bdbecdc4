"""Two segmentation models side by side: paired Dice differences with patient-bootstrap intervals, in the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from orthodiff_nnunet.evaluation.comparison import MEAN_ROW, compare_segmentation, comparison_table
from orthodiff_nnunet.evaluation.report import build_report


def _rows(dice_by_case: dict[str, dict[str, float | None]], patient_of: dict[str, str]) -> list[dict]:
    return [{"case": case, "orientation": "sag", "structure": s, "dice": d, "patient": patient_of[case],
             "exam": case, "site": "SiteB", "field_strength_t": 1.5, "vendor": "V"}
            for case, by_structure in dice_by_case.items() for s, d in by_structure.items()]


def test_paired_difference_known_answer_and_undefined_pairs():
    # 4 cases of 3 patients (p0 has two exams); ACL is absent from c3's reference and both predictions
    patients = {"c0": "p0", "c1": "p0", "c2": "p1", "c3": "p2"}
    first = _rows({"c0": {"femur": 0.9, "ACL": 0.5}, "c1": {"femur": 0.8, "ACL": 0.4},
                   "c2": {"femur": 0.7, "ACL": 0.3}, "c3": {"femur": 0.6, "ACL": None}}, patients)
    second = _rows({"c0": {"femur": 0.7, "ACL": 0.5}, "c1": {"femur": 0.7, "ACL": 0.2},
                    "c2": {"femur": 0.6, "ACL": 0.4}, "c3": {"femur": 0.6, "ACL": None}}, patients)
    c = compare_segmentation(first, second, ("diffusion init", "scratch init"), n_boot=400, seed=0)
    femur = c["structures"]["femur"]
    assert femur["n_cases"] == 4 and femur["n_patients"] == 3
    assert femur["first"]["mean"] == pytest.approx(0.75)
    assert femur["second"]["mean"] == pytest.approx(0.65)
    assert femur["difference"]["mean"] == pytest.approx((0.2 + 0.1 + 0.1 + 0.0) / 4)
    lo, hi = femur["difference"]["ci"]
    # resampling patients: p0's two cases (0.2, 0.1) travel together, so no resample can reach 0.2 or 0
    assert 0.0 <= lo <= femur["difference"]["mean"] <= hi <= 0.15 + 1e-12
    acl = c["structures"]["ACL"]
    assert acl["n_cases"] == 3  # c3's ACL is undefined for both models: not a pair
    assert acl["difference"]["mean"] == pytest.approx((0.0 + 0.2 - 0.1) / 3)
    # the mean over structures is taken per case first: c3 has only the femur
    per_case = [((0.9 + 0.5) / 2) - ((0.7 + 0.5) / 2), ((0.8 + 0.4) / 2) - ((0.7 + 0.2) / 2),
                ((0.7 + 0.3) / 2) - ((0.6 + 0.4) / 2), 0.6 - 0.6]
    assert c["mean"]["difference"]["mean"] == pytest.approx(np.mean(per_case))
    table = comparison_table(c)
    assert table[0][1] == "Dice, diffusion init" and table[-1][0] == MEAN_ROW and len(table) == 4


def test_identical_models_differ_by_exactly_zero():
    rng = np.random.default_rng(1)
    patients = {f"c{i}": f"p{i}" for i in range(6)}
    rows = _rows({c: {"femur": float(rng.random()), "tibia": float(rng.random())} for c in patients}, patients)
    c = compare_segmentation(rows, [dict(r) for r in rows], ("a", "b"), n_boot=200, seed=0)
    for block in (*c["structures"].values(), c["mean"]):
        assert block["difference"]["mean"] == 0.0 and block["difference"]["ci"] == [0.0, 0.0]


def test_nothing_paired_is_undefined_not_a_crash():
    first = _rows({"c0": {"femur": None}}, {"c0": "p0"})
    c = compare_segmentation(first, first, ("a", "b"), n_boot=50, seed=0)
    assert c["structures"]["femur"]["n_cases"] == 0
    assert math.isnan(c["structures"]["femur"]["difference"]["mean"]) and math.isnan(c["mean"]["first"]["mean"])
    assert "n/a" in comparison_table(c)[1][3]


def test_report_shows_the_comparison_section(tmp_path):
    patients = {f"c{i}": f"p{i}" for i in range(5)}
    first = _rows({c: {"femur": 0.9, "tibia": 0.8} for c in patients}, patients)
    second = _rows({c: {"femur": 0.5, "tibia": 0.8} for c in patients}, patients)
    comparison = compare_segmentation(first, second, ("diffusion init", "scratch init"), n_boot=100, seed=0)
    html_path = build_report(tmp_path, first, n_boot=100, seed=0, seg_comparison=comparison)
    page = html_path.read_text()
    assert "id='comparison'" in page and "Dice, scratch init" in page and "seg-comparison" in page
    assert "Segmentation: diffusion init vs scratch init" in (tmp_path / "report.md").read_text()
    saved = json.loads((tmp_path / "report.json").read_text())["segmentation_comparison"]
    assert saved["structures"]["femur"]["difference"]["mean"] == pytest.approx(0.4)
    assert saved["structures"]["tibia"]["difference"]["ci"] == [0.0, 0.0]


def test_models_for_other_orientations_are_refused_before_any_prediction(tmp_path):
    from orthodiff_nnunet.evaluation.external import EvaluationError, evaluate

    with pytest.raises(EvaluationError, match="--seg-compare has sag but --seg has cor"):
        evaluate([999], tmp_path / "report", seg_models={"cor": tmp_path / "a"},
                 compare_seg_models={"sag": tmp_path / "b"})
    assert not (tmp_path / "report").exists()
