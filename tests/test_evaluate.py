"""orthodiff evaluate on a two-site phantom: a 3 T training site's models validated on a 1.5 T external site."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orthodiff_nnunet.api import convert
from orthodiff_nnunet.data.phantom import write_site
from orthodiff_nnunet.data.sites import SITE_3T, SITE_15T
from orthodiff_nnunet.networks.build import write_shrunk_plans

from conftest import nnunet_env


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    from orthodiff_nnunet.planning import plan_and_preprocess
    from orthodiff_nnunet.segmentation import train_segmentation

    root = tmp_path_factory.mktemp("evaluate")
    with nnunet_env(root), pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "default_num_processes", 1)  # validation export/metrics pools: one worker
        train = write_site(root / "A", SITE_3T, n_cases=6, seed=1, orientations=("sag",), prevalence=0.5,
                           scale=0.3)
        convert(train, 541, "EvalA", num_processes=1, num_folds=2)
        external = write_site(root / "B", SITE_15T, n_cases=6, seed=2, orientations=("sag",), prevalence=0.5,
                              scale=0.3)
        convert(external, 551, "EvalB", external=True, num_processes=1)
        planned = plan_and_preprocess([541], num_processes=1, show_progress=False)
        write_shrunk_plans(root / "pre" / "Dataset541_EvalASag", planned.datasets[0].plans_identifier, "tinyPlans")
        model = train_segmentation(541, fold="all", init="scratch", plans="tinyPlans", epochs=2,
                                   iterations_per_epoch=5, val_iterations_per_epoch=1, device="cpu",
                                   validation_mirroring=False)
        from orthodiff_nnunet.classification import train_classification

        classifier = train_classification(541, plans="tinyPlans", mode="scratch", fold=0, epochs=2,
                                          iterations_per_epoch=3, batch_size=2, device="cpu", n_boot=0)
        yield root, model, classifier


def test_evaluate_segmentation_on_external_site(two_sites):
    from orthodiff_nnunet.evaluation.external import EvaluationError, evaluate

    root, model, _ = two_sites
    out = root / "report"
    result = evaluate([551], out, seg_models={"sag": model.model_folder}, n_boot=100, device="cpu", num_processes=0,
                      mirroring=False)
    assert result.num_seg_cases == 6 and result.report_html.is_file()
    rep = json.loads((out / "report.json").read_text())
    rows = rep["segmentation"]["cases"]
    assert len(rows) == 6 * 11  # every labeled external case x 11 structures
    assert {r["site"] for r in rows} == {"SiteB"} and {r["field_strength_t"] for r in rows} == {1.5}
    dice = [r["dice"] for r in rows if r["dice"] is not None]
    assert dice and all(0.0 <= d <= 1.0 for d in dice)
    femur = rep["segmentation"]["overall"]["femur"]["dice"]
    assert femur["n"] == 6
    mean_dice = sum(v["dice"]["mean"] for v in rep["segmentation"]["overall"].values()
                    if v["dice"]["mean"] is not None)
    n_defined = sum(v["dice"]["mean"] is not None for v in rep["segmentation"]["overall"].values())
    assert f"mean Dice over {n_defined} structures {mean_dice / n_defined:.3f}" in result.summary()
    assert list(rep["segmentation"]["strata"]["site"]) == ["SiteB"]
    assert rep["provenance"]["external_datasets"] == {"sag": "Dataset551_EvalBSag"}
    assert rep["provenance"]["segmentation_mirroring"] is False  # the choice is recorded (default: mirroring)
    assert all(r["patient"] and r["exam"] for r in rows) and rep["segmentation"]["resampling"]["n_clusters"] == 6
    assert len(rep["provenance"]["input_data_sha256"]) == 64
    # every prediction lies on its source image's grid
    preds = sorted((out / "segmentation" / "sag").glob("*.nii.gz"))
    assert len(preds) == 6
    with pytest.raises(EvaluationError, match="no cor dataset|has no cor"):
        evaluate([551], root / "r2", seg_models={"cor": model.model_folder}, n_boot=10, device="cpu")


def test_evaluate_classification_on_external_site(two_sites):
    """The classifier's branch: external exams preprocessed with the model's plans, metrics = scikit-learn's."""
    import csv

    import numpy as np
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import average_precision_score, roc_auc_score

    from orthodiff_nnunet.evaluation.external import evaluate

    root, _, classifier = two_sites
    out = root / "report_cls"
    result = evaluate([551], out, cls_model=classifier.output_folder, n_boot=200, device="cpu", num_processes=0)
    assert result.num_cls_exams == 6 and result.num_seg_cases == 0
    assert "classification: macro AUROC" in result.summary() and "segmentation:" not in result.summary()
    # the external dataset was preprocessed with the classifier's plans (transferred, same name)
    assert (root / "pre" / "Dataset551_EvalBSag" / "tinyPlans.json").is_file()
    rep = json.loads((out / "report.json").read_text())
    cls = rep["classification"]
    with open(out / "classification" / "predictions.csv", newline="") as f:
        csv_rows = {r["exam"]: r for r in csv.DictReader(f)}
    exams = cls["exams"]
    assert sorted(e["exam"] for e in exams) == sorted(csv_rows) and len(exams) == 6
    assert {e["site"] for e in exams} == {"SiteB"} and {e["field_strength_t"] for e in exams} == {1.5}
    labels = [m["name"] for m in cls["overall"]["labels"]]
    assert labels == list(classifier.label_names) and len(labels) == 8
    thresholds = json.loads((classifier.output_folder / "thresholds.json").read_text())["thresholds"]
    checked = 0
    for m in cls["overall"]["labels"]:
        y = np.array([e["targets"][m["name"]] for e in exams])
        p = np.array([e["probabilities"][m["name"]] for e in exams])
        assert p == pytest.approx([float(csv_rows[e["exam"]][f"p_{m['name']}"]) for e in exams])
        assert m["n"] == 6 and m["n_pos"] == int(y.sum()) and m["threshold"] == pytest.approx(thresholds[m["name"]])
        if 0 < y.sum() < len(y):
            checked += 1
            assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
            assert m["auprc"] == pytest.approx(average_precision_score(y, p))
            lo, hi = m["ci"]["auroc"]
            assert lo - 1e-9 <= m["auroc"] <= hi + 1e-9
        pred = p >= thresholds[m["name"]]
        if y.sum():
            assert m["sensitivity"] == pytest.approx(pred[y == 1].mean())
        if (y == 0).sum():
            assert m["specificity"] == pytest.approx((~pred[y == 0]).mean())
    assert checked >= 4, "prevalence 0.5 on 6 exams: most labels have both classes"
    # stratified by site / field strength / vendor, and calibration agrees with scikit-learn's binning
    assert list(cls["strata"]["site"]) == ["SiteB"] and list(cls["strata"]["vendor"]) == ["VendorB"]
    y_all = np.array([e["targets"][n] for e in exams for n in labels])
    p_all = np.array([e["probabilities"][n] for e in exams for n in labels])
    frac, mean_p = calibration_curve(y_all, p_all, n_bins=10, strategy="uniform")
    bins = cls["calibration_pooled"]["bins"]
    assert [b["fraction_positive"] for b in bins] == pytest.approx(list(frac))
    assert [b["mean_probability"] for b in bins] == pytest.approx(list(mean_p))
    ece = sum(b["n"] / len(y_all) * abs(b["fraction_positive"] - b["mean_probability"]) for b in bins)
    assert cls["calibration_pooled"]["ece"] == pytest.approx(ece) and cls["calibration_pooled"]["n"] == 48
    html = (out / "report.html").read_text()
    assert "ROC curves" in html and "Reliability" in html and html.count("data:image/png;base64,") >= 2
    assert any(str(classifier.output_folder.resolve()) in m for m in rep["provenance"]["models"])
    assert {Path(f).name for f in rep["provenance"]["plans"]} == {"plans_sag.json"}
