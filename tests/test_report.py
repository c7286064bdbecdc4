"""Evaluation report: metrics against known values, intervals around their estimates, files written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from orthodiff_nnunet.evaluation.report import build_report, calibration, summarize_segmentation


def test_calibration_known_values():
    y = np.array([0, 0, 1, 1, 1, np.nan])
    p = np.array([0.05, 0.15, 0.85, 0.95, 0.55, 0.5])
    cal = calibration(y, p, n_bins=10)
    assert cal["n"] == 5
    # bins: [0,.1): p=.05 y=0 -> |0-.05|; [.1,.2): .15 -> .15; [.5,.6): .55 y=1 -> .45; [.8,.9): .15; [.9,1]: .05
    assert cal["ece"] == pytest.approx((0.05 + 0.15 + 0.45 + 0.15 + 0.05) / 5)
    assert [b["n"] for b in cal["bins"]] == [1, 1, 1, 1, 1]
    perfect = calibration(np.array([0, 1] * 50), np.array([0.0, 1.0] * 50))
    assert perfect["ece"] == 0.0


def _seg_rows(rng):
    rows = []
    for i in range(12):
        site = "SiteA" if i < 6 else "SiteB"
        for s, base in (("femur", 0.9), ("tibia", 0.8)):
            rows.append({"case": f"c{i}", "orientation": "sag" if i % 2 else "cor", "site": site,
                         "field_strength_t": 3.0 if site == "SiteA" else 1.5, "vendor": "V", "structure": s,
                         "dice": float(np.clip(base - (0.1 if site == "SiteB" else 0) + rng.normal(0, 0.02), 0, 1)),
                         "hd95_mm": float(abs(rng.normal(2, 0.5))), "surface_dice": 0.8})
    return rows


def test_segmentation_summary_means_and_intervals():
    rows = _seg_rows(np.random.default_rng(0))
    s = summarize_segmentation(rows, n_boot=300, seed=1)
    femur = s["overall"]["femur"]["dice"]
    expected = np.mean([r["dice"] for r in rows if r["structure"] == "femur"])
    assert femur["mean"] == pytest.approx(expected)
    assert femur["ci"][0] <= femur["mean"] <= femur["ci"][1]
    # the 1.5 T site is worse, and the strata show it
    assert s["strata"]["site"]["SiteA"]["femur"]["dice"]["mean"] > s["strata"]["site"]["SiteB"]["femur"]["dice"]["mean"] + 0.05
    assert set(s["strata"]["field_strength_t"]) == {"3.0", "1.5"}
    assert set(s["strata"]["orientation"]) == {"sag", "cor"}


def test_report_files_and_classification_against_sklearn(tmp_path):
    rng = np.random.default_rng(3)
    labels = ["ACL", "EFFU"]
    exams = []
    for i in range(40):
        t = {"ACL": int(rng.random() < 0.4), "EFFU": int(rng.random() < 0.5)}
        probs = {k: float(np.clip(0.3 + 0.4 * v + rng.normal(0, 0.2), 0, 1)) for k, v in t.items()}
        exams.append({"exam": f"e{i}", "site": "SiteB", "field_strength_t": 1.5, "vendor": "V",
                      "views": ["sag", "cor"] if i == 0 else ["sag", "cor", "ax"], "targets": t, "probabilities": probs})
    exams[5]["targets"]["EFFU"] = None  # unknown label: left out
    html = build_report(tmp_path, _seg_rows(rng), exams, labels, {"ACL": 0.5, "EFFU": 0.5},
                        provenance={"checkpoints": ["x.pth"]}, n_boot=200, seed=0)
    for f in ("report.json", "report.md", "report.html", "roc_curves.png", "dice_boxplot.png", "reliability_diagram.png"):
        assert (tmp_path / f).is_file() and (tmp_path / f).stat().st_size > 0
    rep = json.loads((tmp_path / "report.json").read_text())
    acl = next(m for m in rep["classification"]["overall"]["labels"] if m["name"] == "ACL")
    y = [e["targets"]["ACL"] for e in exams]
    p = [e["probabilities"]["ACL"] for e in exams]
    assert acl["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert acl["ci"]["auroc"][0] <= acl["auroc"] <= acl["ci"]["auroc"][1]
    effu = next(m for m in rep["classification"]["overall"]["labels"] if m["name"] == "EFFU")
    assert effu["n"] == 39
    assert rep["classification"]["missing_views"] == {"e0": ["ax"]}
    assert rep["provenance"]["packages"]["nnunetv2"].startswith("2.8")
    text = html.read_text()
    assert text.count("data:image/png;base64,") == 3 and "http" not in text.split("<body>")[1]
    md = (tmp_path / "report.md").read_text()
    assert "SiteB" in md
    # two segmentation sites get a table each; the exams come from one site, one field strength, one vendor:
    # their stratum tables would repeat the overall one, so a note replaces them (report.json keeps them)
    assert "### Segmentation, site = SiteA" in md and "### Segmentation, site = SiteB" in md
    assert "### Classification, site = SiteB" not in md
    assert "overall table holds: site SiteB; field strength (T) 1.5; vendor V" in md
    assert list(rep["classification"]["strata"]["site"]) == ["SiteB"]
    assert not math.isnan(rep["classification"]["calibration_pooled"]["ece"])
