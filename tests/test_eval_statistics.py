"""Statistics of the cross-site evaluation, each against a known answer.

* intervals resample patients (cluster bootstrap): duplicated rows of one patient do not narrow them;
* a missed structure counts (surface Dice 0, HD95 counted and capped at the image diagonal);
* one definition of macro for the estimate and its interval;
* undefined metrics are reported with their reason, and ``orthodiff evaluate`` exits 0;
* a site annotated with another label set keeps its strata and its shared labels;
* segmentation is evaluated as users predict it (mirroring), on the reference's full grid.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.metrics import roc_auc_score

from orthodiff_nnunet.evaluation.classification import bootstrap_ci, classification_metrics, cluster_ids
from orthodiff_nnunet.evaluation.report import cluster_mean_ci, summarize_classification, summarize_segmentation
from orthodiff_nnunet.evaluation.segmentation import (
    GridMismatchError,
    evaluate_case_files,
    image_diagonal_mm,
    structure_metrics,
)

from conftest import nnunet_env

# ----------------------------------------------------------------------------------------------
# resample patients, not rows


def test_duplicated_rows_of_a_patient_do_not_narrow_the_interval():
    rng = np.random.default_rng(0)
    v = rng.normal(0.8, 0.1, 25)  # one value per patient
    patients = [f"P{i}" for i in range(25)]
    lo1, hi1, n1 = bootstrap_ci(lambda idx: float(v[idx].mean()), 25, 2000, seed=7, clusters=patients)
    # the same patients, each with three rows (three views of one exam): the same information
    v3, p3 = np.repeat(v, 3), [p for p in patients for _ in range(3)]
    lo3, hi3, n3 = bootstrap_ci(lambda idx: float(v3[idx].mean()), 75, 2000, seed=7, clusters=p3)
    assert (lo3, hi3) == pytest.approx((lo1, hi1), abs=1e-12) and n1 == n3 == 2000
    # the fast per-cluster mean of the report draws the same resamples
    mean, lo, hi, n = cluster_mean_ci(v3, p3, 2000, seed=7)
    assert mean == pytest.approx(v.mean()) and (lo, hi) == pytest.approx((lo1, hi1), abs=1e-12) and n == 75
    # resampling rows treats the three copies as independent: the interval is ~1/sqrt(3) as wide
    lo_r, hi_r, _ = bootstrap_ci(lambda idx: float(v3[idx].mean()), 75, 2000, seed=7)
    assert (hi_r - lo_r) / (hi1 - lo1) == pytest.approx(1 / math.sqrt(3), rel=0.15)
    # and the cluster interval is the textbook one: +-1.96 SE of the mean of the 25 patients
    se = v.std(ddof=0) / math.sqrt(25)
    assert (hi1 - lo1) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_classification_intervals_resample_patients():
    rng = np.random.default_rng(1)
    n = 40
    y = (rng.random((n, 2)) < 0.5).astype(float)
    s = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.25, (n, 2)), 0, 1)
    patients = [f"P{i}" for i in range(n)]
    one = classification_metrics(y, s, ["a", "b"], n_boot=500, seed=3, clusters=patients, n_without_patient=0)
    # every exam twice (a patient scanned twice with the same result): same estimates, same intervals
    two = classification_metrics(np.repeat(y, 2, axis=0), np.repeat(s, 2, axis=0), ["a", "b"], n_boot=500, seed=3,
                                 clusters=[p for p in patients for _ in range(2)], n_without_patient=0)
    for m1, m2 in zip(one.labels, two.labels):
        assert m1.auroc == pytest.approx(roc_auc_score(y[:, ["a", "b"].index(m1.name)], s[:, ["a", "b"].index(m1.name)]))
        assert m2.auroc == pytest.approx(m1.auroc) and m2.auprc == pytest.approx(m1.auprc)
        for k in ("auroc", "auprc", "sensitivity", "specificity"):
            assert m2.ci[k] == pytest.approx(m1.ci[k], abs=1e-12)
    assert two.macro_ci["auroc"] == pytest.approx(one.macro_ci["auroc"], abs=1e-12)
    assert two.resampling == {"unit": "patient", "n_clusters": 40, "n_without_patient": 0}
    # the old row bootstrap of the duplicated exams is narrower
    rows = classification_metrics(np.repeat(y, 2, axis=0), np.repeat(s, 2, axis=0), ["a", "b"], n_boot=500, seed=3)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(rows.labels[0].ci["auroc"]) < 0.85 * width(one.labels[0].ci["auroc"])
    assert rows.resampling["unit"] == "exam"


def test_rows_without_patient_fall_back_to_their_exam_and_are_counted():
    ids, missing = cluster_ids(["P1", None, "", "P1"], ["e1", "e2", "e3", "e4"])
    assert missing == 2 and len(set(ids)) == 3 and ids[0] == ids[3]
    rows = []
    for case, exam, patient, orientation in (("c1", "e1", "P1", "sag"), ("c1", "e1", "P1", "cor"),
                                             ("c2", "e2", "P1", "sag"), ("c3", "e3", None, "sag"),
                                             ("c3", "e3", None, "cor"), ("c4", None, None, "sag")):
        rows.append({"case": case, "exam": exam, "patient": patient, "orientation": orientation, "site": "S",
                     "structure": "femur", "dice": 0.9, "hd95_mm": 1.0, "surface_dice": 0.9, "n_ref": 5, "n_pred": 5})
    s = summarize_segmentation(rows, n_boot=20, seed=0)
    # clusters: P1 (3 rows), exam e3 (2 rows, no patient), case c4 (no patient, no exam)
    assert s["resampling"]["n_clusters"] == 3 and s["resampling"]["n_rows_without_patient"] == 3
    assert s["resampling"]["unit"] == "patient" and "own cluster" in s["resampling"]["fallback"]
    exams = [{"exam": f"e{i}", "patient": None if i == 0 else f"P{i // 2}", "site": "S", "views": ["sag", "cor", "ax"],
              "targets": {"a": i % 2}, "probabilities": {"a": 0.2 + 0.6 * (i % 2)}} for i in range(6)]
    c = summarize_classification(exams, ["a"], {"a": 0.5}, n_boot=50, seed=0)
    # e0 alone; P0 = {e1}; P1 = {e2, e3}; P2 = {e4, e5}
    assert c["resampling"]["n_clusters"] == 4 and c["resampling"]["n_exams_without_patient"] == 1


# ----------------------------------------------------------------------------------------------
# a missed structure counts


def test_missed_structure_and_false_detection_count():
    ref = np.zeros((20, 30, 30), np.uint8)
    ref[5:15, 5:15, 5:15] = 1
    ref[5:10, 20:25, 20:25] = 2  # tibia present, predicted nowhere: a miss
    pred = np.zeros_like(ref)
    pred[5:15, 5:15, 5:15] = 1
    pred[0:2, 0:2, 0:2] = 3  # patella predicted, absent from the reference: a false detection
    spacing = (3.0, 0.5, 0.5)
    m = structure_metrics(ref, pred, {"background": 0, "femur": 1, "tibia": 2, "patella": 3, "fibula": 4}, spacing)
    diagonal = math.sqrt((20 * 3.0) ** 2 + (30 * 0.5) ** 2 + (30 * 0.5) ** 2)  # field of view diagonal, 63.64 mm
    assert image_diagonal_mm(ref.shape, spacing) == pytest.approx(diagonal)
    assert m["femur"]["status"] == "both_present" and m["femur"]["hd95_capped_mm"] == m["femur"]["hd95_mm"] == 0.0
    tib, pat, fib = m["tibia"], m["patella"], m["fibula"]
    assert tib["status"] == "missed" and tib["dice"] == 0.0 and tib["surface_dice"] == 0.0
    assert math.isnan(tib["hd95_mm"]) and tib["hd95_capped_mm"] == pytest.approx(diagonal)
    assert pat["status"] == "false_detection" and pat["surface_dice"] == 0.0 and pat["hd95_capped_mm"] == pytest.approx(diagonal)
    # absent from both: not applicable, no metric at all
    assert fib["status"] == "both_empty" and all(math.isnan(fib[k]) for k in ("dice", "hd95_mm", "hd95_capped_mm",
                                                                               "surface_dice"))


def test_summary_counts_misses_and_penalises_them_in_the_capped_mean():
    rows = []
    for i, (hd, status) in enumerate(((1.0, "both_present"), (2.0, "both_present"), (3.0, "both_present"),
                                      (None, "missed"), (None, "both_empty"))):
        present = status == "both_present"
        rows.append({"case": f"c{i}", "patient": f"P{i}", "orientation": "sag", "site": "S", "structure": "tibia",
                     "status": status, "cap_mm": 100.0,
                     "dice": 0.8 if present else (0.0 if status == "missed" else math.nan),
                     "surface_dice": 0.9 if present else (0.0 if status == "missed" else math.nan),
                     "hd95_mm": math.nan if hd is None else hd,
                     "hd95_capped_mm": hd if present else (100.0 if status == "missed" else math.nan)})
    e = summarize_segmentation(rows, n_boot=100, seed=0)["overall"]["tibia"]
    assert (e["n_cases"], e["n_missed"], e["n_false_detection"], e["n_both_empty"], e["n_both_present"]) == (5, 1, 0, 1, 3)
    assert e["hd95_mm"]["mean"] == pytest.approx(2.0) and e["hd95_mm"]["n"] == 3  # distances where both exist
    assert e["hd95_capped_mm"]["mean"] == pytest.approx((1 + 2 + 3 + 100) / 4) and e["hd95_capped_mm"]["n"] == 4
    assert e["hd95_capped_mm"]["cap_mm_max"] == 100.0
    assert e["surface_dice"]["mean"] == pytest.approx((0.9 * 3 + 0) / 4)  # the miss scores 0, not dropped
    assert e["dice"]["mean"] == pytest.approx(0.8 * 3 / 4) and e["dice"]["n"] == 4


# ----------------------------------------------------------------------------------------------
# one definition of macro


def test_macro_interval_is_over_the_labels_of_the_estimate():
    rng = np.random.default_rng(5)
    n = 12
    y = np.zeros((n, 3))
    y[:, 0] = np.arange(n) % 2  # a: balanced
    y[3, 1] = 1  # rare: one positive exam
    y[:, 2] = 0  # never: no positive at all -> AUROC undefined, not in the macro
    s = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2, (n, 3)), 0, 1)
    n_boot, seed = 400, 11
    m = classification_metrics(y, s, ["a", "rare", "never"], n_boot=n_boot, seed=seed)
    assert m.macro_labels["auroc"] == ["a", "rare"] and m.macro_labels["specificity"] == ["a", "rare", "never"]
    assert m.macro["auroc"] == pytest.approx((roc_auc_score(y[:, 0], s[:, 0]) + roc_auc_score(y[:, 1], s[:, 1])) / 2)
    # the known answer: redraw the same resamples and average a and rare with scikit-learn; a resample
    # without the one positive of rare has no macro value (it is skipped and counted)
    draws = np.random.default_rng(seed)
    same, mixed = [], []
    for _ in range(n_boot):
        idx = draws.integers(0, n, n)
        a = roc_auc_score(y[idx, 0], s[idx, 0]) if 0 < y[idx, 0].sum() < n else math.nan
        r = roc_auc_score(y[idx, 1], s[idx, 1]) if 0 < y[idx, 1].sum() < n else math.nan
        if not (math.isnan(a) or math.isnan(r)):
            same.append((a + r) / 2)
        if not (math.isnan(a) and math.isnan(r)):
            mixed.append(np.nanmean([a, r]))
    assert m.macro_ci_valid["auroc"] == len(same) and 0.5 * n_boot <= len(same) < n_boot
    assert m.macro_ci["auroc"] == pytest.approx(tuple(np.percentile(same, [2.5, 97.5])), abs=1e-12)
    # the old definition (each resample's own labels) is another quantity with another interval
    assert m.macro_ci["auroc"] != pytest.approx(tuple(np.percentile(mixed, [2.5, 97.5])), abs=1e-3)


# ----------------------------------------------------------------------------------------------
# undefined is not a crash


def test_all_negative_labels_are_undefined_with_reason_and_the_rest_is_computed():
    exams = [{"exam": f"e{i}", "patient": f"P{i}", "site": "SiteB", "field_strength_t": 1.5, "vendor": "V",
              "views": ["sag", "cor", "ax"], "targets": {"ACL": 0, "EFFU": 0},
              "probabilities": {"ACL": 0.1 * i, "EFFU": 0.05}} for i in range(8)]
    c = summarize_classification(exams, ["ACL", "EFFU"], {"ACL": 0.45, "EFFU": 0.5}, n_boot=50, seed=0,
                                 labels_not_evaluated={"MM": "the model predicts it but the external site does not "
                                                             "annotate it"})
    acl = c["overall"]["labels"][0]
    assert acl["auroc"] is None and "no positive exam" in acl["undefined"]["auroc"]
    assert acl["specificity"] == pytest.approx(5 / 8)  # p = 0.0 ... 0.7 at threshold 0.45: 5 negatives below
    assert "sensitivity" in acl["undefined"] and "specificity" not in acl["undefined"]
    assert c["overall"]["macro"]["auroc"] is None and c["overall"]["macro_labels"]["auroc"] == []
    assert set(c["undefined"]) == {"ACL", "EFFU"} and c["labels_not_evaluated"] == {
        "MM": "the model predicts it but the external site does not annotate it"}
    assert c["calibration_pooled"]["n"] == 16 and c["calibration_pooled"]["ece"] == pytest.approx(
        (sum(0.1 * i for i in range(8)) + 8 * 0.05) / 16)
    from orthodiff_nnunet.evaluation.external import _headline

    lines = _headline({"classification": c})
    assert "macro AUROC undefined" in lines[0] and "AUROC undefined for ACL (no positive exam" in lines[1]
    assert "not evaluated: MM" in lines[2]


# ----------------------------------------------------------------------------------------------
# evaluate the predictor users run, on the full grid


def test_grid_mismatch_names_the_case_and_both_files(tmp_path):
    a = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
    a.SetSpacing((0.5, 0.5, 3.0))
    sitk.WriteImage(a, str(tmp_path / "ref.nii.gz"))
    shifted = sitk.Image(a)
    shifted.SetOrigin((0.0, 10.0, 0.0))  # same size and spacing, 10 mm elsewhere
    sitk.WriteImage(shifted, str(tmp_path / "pred.nii.gz"))
    with pytest.raises(GridMismatchError, match=r"case K1: .*pred\.nii\.gz.*ref\.nii\.gz.*origin") as err:
        evaluate_case_files(tmp_path / "ref.nii.gz", tmp_path / "pred.nii.gz", {"femur": 1}, case="K1")
    assert "size" not in str(err.value)  # only what differs is named
    flipped = sitk.Image(a)
    flipped.SetDirection((-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    sitk.WriteImage(flipped, str(tmp_path / "flip.nii.gz"))
    with pytest.raises(GridMismatchError, match="direction"):
        evaluate_case_files(tmp_path / "ref.nii.gz", tmp_path / "flip.nii.gz", {"femur": 1}, case="K1")
    assert evaluate_case_files(tmp_path / "ref.nii.gz", tmp_path / "ref.nii.gz", {"femur": 1})["femur"]["status"] == "both_empty"


def test_evaluate_mirrors_by_default_like_predict_seg():
    import inspect

    from orthodiff_nnunet.cli import build_parser
    from orthodiff_nnunet.evaluation.external import evaluate, evaluate_segmentation
    from orthodiff_nnunet.segmentation import predict_segmentation

    default = inspect.signature(predict_segmentation).parameters["mirroring"].default
    assert default is True
    assert inspect.signature(evaluate).parameters["mirroring"].default is default
    assert inspect.signature(evaluate_segmentation).parameters["mirroring"].default is default
    parser = build_parser()
    assert parser.parse_args(["evaluate", "-d", "1", "-o", "x"]).disable_tta is False
    assert parser.parse_args(["evaluate", "-d", "1", "-o", "x", "--disable-tta"]).disable_tta is True
    assert parser.parse_args(["predict", "seg", "-i", "a", "-o", "b", "-m", "m", "--disable-tta"]).disable_tta is True


# ----------------------------------------------------------------------------------------------
# end to end: an all-negative external site annotated with 3 of the model's 8 labels


def _keep_label_columns(manifest, keep):
    import csv

    from orthodiff_nnunet.schemes import KNEE_ABNORMALITIES

    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c not in KNEE_ABNORMALITIES or c in keep]
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


@pytest.fixture()
def negative_three_label_site(tmp_path):
    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.classification import train_classification
    from orthodiff_nnunet.data.phantom import write_site
    from orthodiff_nnunet.data.sites import SITE_3T, SITE_15T
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.planning import plan_and_preprocess

    with nnunet_env(tmp_path):
        train = write_site(tmp_path / "A", SITE_3T, n_cases=4, seed=1, orientations=("sag",), prevalence=0.5,
                           scale=0.3)
        convert(train, 571, "StatA", num_processes=1, num_folds=2)
        # every exam negative for every label; two exams of one patient
        external = write_site(tmp_path / "B", SITE_15T, n_cases=5, seed=2, orientations=("sag",), prevalence=0.0,
                              patients_with_two_exams=1, scale=0.3)
        _keep_label_columns(external, ["ACL", "MM", "EFFU"])  # the site annotates 3 labels
        convert(external, 581, "StatB", external=True, num_processes=1)
        planned = plan_and_preprocess([571], num_processes=1, show_progress=False)
        write_shrunk_plans(tmp_path / "pre" / "Dataset571_StatASag", planned.datasets[0].plans_identifier, "tinyPlans")
        classifier = train_classification(571, plans="tinyPlans", mode="scratch", fold=0, epochs=1,
                                          iterations_per_epoch=1, batch_size=2, device="cpu", n_boot=0)
        yield tmp_path, classifier


def test_cli_evaluate_all_negative_other_label_set_exits_0(negative_three_label_site, capsys):
    from orthodiff_nnunet.cli import main

    root, classifier = negative_three_label_site
    out = root / "report"
    rc = main(["evaluate", "-d", "581", "--cls", str(classifier.output_folder), "-o", str(out), "--bootstrap", "50",
               "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "macro AUROC undefined" in printed and "AUROC undefined for ACL (no positive exam" in printed
    rep = json.loads((out / "report.json").read_text())
    cls = rep["classification"]
    # the shared labels are evaluated, the model's other five are named with the reason
    assert cls["labels_evaluated"] == ["ACL", "MM", "EFFU"]
    assert set(cls["labels_not_evaluated"]) == {"PCL", "LM", "MCL", "LCL", "PD"}
    assert all("does not annotate" in why for why in cls["labels_not_evaluated"].values())
    labels = {m["name"]: m for m in cls["overall"]["labels"]}
    assert list(labels) == ["ACL", "MM", "EFFU"]
    for name, m in labels.items():
        assert (m["n"], m["n_pos"]) == (5, 0)  # the shared labels' targets are read, not ignored
        assert m["auroc"] is None and "no positive exam" in m["undefined"]["auroc"]
        p = np.array([e["probabilities"][name] for e in cls["exams"]])
        assert m["specificity"] == pytest.approx(float(np.mean(p < m["threshold"])))
    # the strata are kept (site, field strength, vendor of the converter's targets file)
    assert list(cls["strata"]["site"]) == ["SiteB"] and list(cls["strata"]["field_strength_t"]) == ["1.5"]
    assert list(cls["strata"]["vendor"]) == ["VendorB"]
    # 5 exams of 4 patients: the bootstrap draws 4 clusters
    assert cls["resampling"]["n_clusters"] == 4 and cls["resampling"]["n_exams_without_patient"] == 0
    assert cls["calibration_pooled"]["n"] == 15 and cls["calibration_pooled"]["ece"] is not None
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    # predict cls itself (run by evaluate) scored the shared labels and named the others
    pm = json.loads((out / "classification" / "predictions_metrics.json").read_text())
    assert [m["name"] for m in pm["labels"]] == ["ACL", "MM", "EFFU"] and len(pm["labels_not_evaluated"]) == 5
    assert pm["resampling"] == {"unit": "patient", "n_clusters": 4, "n_without_patient": 0}
