"""Classification trainer: train / selection / test on different, patient-disjoint exams, and precision.

* The checkpoint and the decision thresholds are chosen on the *selection* exams, the reported
  metrics come from the *test* exams; no patient is in two of train / selection / test.
* The precision a run computes in is resolved before it is recorded (never ``"auto"``), read back
  by prediction and resume, and TF32 is switched only inside the trainer's own passes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from orthodiff_nnunet.data.phantom import write_site
from orthodiff_nnunet.data.sites import SITE_3T
from orthodiff_nnunet.data.exam_loaders import three_way_split
from orthodiff_nnunet.errors import ClassificationError
from orthodiff_nnunet.networks.precision import (
    PRECISIONS,
    autocast_dtype,
    precision_candidates,
    resolve_precision,
    tf32_context,
)
from orthodiff_nnunet.trainers.classification import nnUNetTrainerOrthoDiffCls

from conftest import nnunet_env

DATASET = 571
PLANS = "tinyPlans"
KEY = "3c" * 32  # fixed pseudonym key: fixed exam names, fixed folds


# ----------------------------------------------------------------------------------------------
# the split, by its inputs
def _folds(*vals: list[str]) -> list[dict[str, list[str]]]:
    """Folds of ``splits_final.json`` whose validation sets are ``vals`` (training: every other exam)."""
    every = [e for v in vals for e in v]
    return [{"train": [e for e in every if e not in v], "val": list(v)} for v in vals]


def test_three_way_split_known_answers() -> None:
    folds = _folds(["a1", "a2"], ["b1", "b2"], ["c1", "c2"], ["d1", "d2"])
    own = {e: f"P{e}" for f in folds for e in f["val"]}  # one exam per patient
    sp = three_way_split(folds, 1, "auto", own)
    assert (sp.selection, sp.test, sp.train) == (("b1", "b2"), ("c1", "c2"), ("a1", "a2", "d1", "d2"))
    assert sp.selection_source == "fold 1 validation" and sp.test_source == "fold 2 validation"
    assert three_way_split(folds, 3, "auto", own).test == ("a1", "a2")  # (k + 1) mod n
    sp = three_way_split(folds, 0, 3, own)
    assert (sp.selection, sp.test, sp.train) == (("a1", "a2"), ("d1", "d2"), ("b1", "b2", "c1", "c2"))
    sp = three_way_split(folds, 0, None, own)
    assert sp.test == () and sp.train == ("b1", "b2", "c1", "c2", "d1", "d2") and sp.test_source == "none"
    assert sp.set_of()["a1"] == "selection" and sp.set_of()["b1"] == "train"

    # a patient with an exam in the test fold and one in a training fold: the training exam goes
    patients = {**own, "d1": own["c1"]}
    sp = three_way_split(folds, 1, "auto", patients)
    assert sp.train == ("a1", "a2", "d2") and sp.dropped_train == ("d1",) and sp.test == ("c1", "c2")
    # a patient in both the selection and the test fold: the splits are not patient-grouped
    with pytest.raises(ClassificationError, match="not grouped by patient"):
        three_way_split(folds, 1, "auto", {**own, "c2": own["b1"]})
    with pytest.raises(ClassificationError, match="another fold"):
        three_way_split(folds, 1, 1, own)
    with pytest.raises(ClassificationError, match="fold 4 does not exist"):
        three_way_split(folds, 4, "auto", own)

    # two folds: the selection fold's patients are halved, patient-grouped (e2/e3 are one patient)
    two = _folds(["e1", "e2", "e3", "e4", "e5"], ["f1", "f2", "f3"])
    patients = {e: f"P{e}" for f in two for e in f["val"]} | {"e3": "Pe2"}
    sp = three_way_split(two, 0, "auto", patients)
    assert sp.train == ("f1", "f2", "f3")
    assert sorted(sp.selection + sp.test) == ["e1", "e2", "e3", "e4", "e5"]
    assert sp.selection and sp.test
    assert {"e2", "e3"} <= set(sp.selection) or {"e2", "e3"} <= set(sp.test)  # one patient, one side
    assert not {patients[e] for e in sp.selection} & {patients[e] for e in sp.test}
    assert "2 folds" in sp.selection_source
    # too few patients for three sets: the error says what is needed and how to go on
    with pytest.raises(ClassificationError, match=r"at least 3 patients.*--test-fold none"):
        three_way_split(_folds(["g1", "g2"], ["h1"]), 0, "auto", {"g1": "P1", "g2": "P1", "h1": "P2"})
    with pytest.raises(ClassificationError, match="holds no fold"):
        three_way_split([], 0, "auto", {})
    # ... while without a test set two patients do
    sp = three_way_split(_folds(["g1", "g2"], ["h1"]), 0, None, {"g1": "P1", "g2": "P1", "h1": "P2"})
    assert (sp.train, sp.selection, sp.test) == (("h1",), ("g1", "g2"), ())


def test_test_fold_option_parses_auto_none_and_a_fold() -> None:
    import argparse

    from orthodiff_nnunet.cli.classification import add_train_cls_parser

    parser = argparse.ArgumentParser(prog="orthodiff train")
    add_train_cls_parser(parser.add_subparsers(dest="what", required=True))
    assert parser.parse_args(["cls", "-d", "501"]).test_fold == "auto"  # held out by default
    assert parser.parse_args(["cls", "-d", "501", "--test-fold", "none"]).test_fold is None
    assert parser.parse_args(["cls", "-d", "501", "--test-fold", "2"]).test_fold == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["cls", "-d", "501", "--test-fold", "next"])


# ----------------------------------------------------------------------------------------------
# precision, by its inputs
def test_precision_resolution_by_device_and_capability() -> None:
    assert precision_candidates("cpu") == ("fp32",)
    assert precision_candidates("cuda", (9, 0)) == PRECISIONS == ("fp32", "tf32", "bf16", "fp16")
    assert precision_candidates("cuda", (8, 0)) == PRECISIONS
    assert precision_candidates("cuda", (7, 5)) == ("fp32", "fp16")  # Turing: no TF32, no bf16
    timings = {"fp32": 10.0, "tf32": 6.0, "bf16": 4.0, "fp16": 5.0}
    assert resolve_precision("auto", "cuda", (9, 0), timings) == "bf16"  # the fastest measured
    assert resolve_precision("auto", "cuda", (9, 0), {**timings, "bf16": float("nan")}) == "fp16"
    assert resolve_precision("auto", "cuda", (7, 5), timings) == "fp16"  # bf16 measured faster but unsupported
    assert resolve_precision("auto", "cuda", (7, 5), {"fp32": 3.0, "fp16": 5.0}) == "fp32"
    assert resolve_precision("auto", "cuda", (8, 6), {}) == "fp32"  # nothing measured
    assert resolve_precision("tf32", "cuda", (8, 0)) == "tf32"
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "fp32"
    with pytest.raises(ClassificationError, match=r"capability 8.0 or newer \(this GPU: 7.5\).*fp32 or fp16"):
        resolve_precision("bf16", "cuda", (7, 5))
    with pytest.raises(ClassificationError, match="use auto or one of"):
        resolve_precision("fp8", "cuda", (9, 0))
    assert autocast_dtype("bf16", "cuda") is torch.bfloat16 and autocast_dtype("fp16", "cuda") is torch.float16
    assert autocast_dtype("tf32", "cuda") is None and autocast_dtype("bf16", "cpu") is None


def test_tf32_context_restores_the_process_settings() -> None:
    """Set inside the block, the caller's (non-default) values afterwards, also after an exception."""
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.allow_tf32 = False
        with tf32_context(True):
            assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32 is True
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("medium", False)
        torch.backends.cudnn.allow_tf32 = True
        with pytest.raises(ValueError), tf32_context(False):
            assert torch.get_float32_matmul_precision() == "highest" and torch.backends.cudnn.allow_tf32 is False
            raise ValueError("inside")
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("medium", True)
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]

    # a process using PyTorch's newer fp32_precision switches (reading the legacy ones then raises): those are
    # the ones touched and put back
    b = torch.backends
    initial = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision)
    try:
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision = "tf32", "ieee"
        with pytest.raises(RuntimeError):
            torch.get_float32_matmul_precision()  # the legacy reader refuses a process on the new API
        with tf32_context(False):
            assert b.cuda.matmul.fp32_precision == "ieee"
        with tf32_context(True):
            assert b.cudnn.conv.fp32_precision == "tf32"
        assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision) == ("tf32", "ieee")
    finally:
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision = initial
    assert torch.get_float32_matmul_precision() == before[0]  # legacy readers work again


def test_restore_config_reads_the_recorded_precision(tmp_path: Path) -> None:
    trainer = nnUNetTrainerOrthoDiffCls({}, {"sag": SimpleNamespace(label_names=("A",))}, "all", tmp_path,
                                        torch.device("cpu"))
    cfg = {"format": "orthodiff-classifier/1", "mode": "scratch", "fusion": "concat", "feature_stages": 1,
           "noise_timesteps": {}, "schedules": {}, "film": {}, "label_names": ["A"], "precision": "bf16"}
    trainer.restore_config(cfg)
    assert trainer.precision == "bf16"
    trainer.restore_config({**cfg, "precision": "auto"})  # a run recorded before the precision was resolved
    assert trainer.precision == "fp32"


# ----------------------------------------------------------------------------------------------
# end to end on a small phantom: 12 exams of 9 patients (3 with two exams), 3 patient-grouped folds
@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.planning import plan_and_preprocess

    root = tmp_path_factory.mktemp("heldout")
    with nnunet_env(root):
        key = root / "pseudonym.key"
        key.write_text(KEY + "\n")
        manifest = write_site(root / "site", SITE_3T, n_cases=12, seed=3, orientations=("sag",), prevalence=0.5,
                              patients_with_two_exams=3, scale=0.3)
        convert(manifest, DATASET, "HeldOut", num_processes=1, pseudonym_key=key, num_folds=3)
        plan_and_preprocess([DATASET], num_processes=1, show_progress=False, planner="plain")
        (folder,) = (root / "pre").glob(f"Dataset{DATASET}_*")
        write_shrunk_plans(folder, "orthodiffPlans", PLANS, max_features=4, max_stages=3)
        targets = json.loads((root / "raw" / folder.name / "orthodiff_targets.json").read_text())
        patient = {c["exam"]: c["patient"] for c in targets["cases"].values()}
        yield SimpleNamespace(root=root, folder=folder, patient=patient,
                              splits=json.loads((folder / "splits_final.json").read_text()))


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _arrays(rows: list[dict], labels: list[str], prefix: str) -> np.ndarray:
    return np.array([[float(r[f"{prefix}{n}"]) if r[f"{prefix}{n}"] != "" else np.nan for n in labels] for r in rows])


def test_selection_thresholds_and_test_metrics_on_disjoint_patients(phantom, tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    from orthodiff_nnunet.classification import predict_classification, train_classification
    from orthodiff_nnunet.evaluation.classification import choose_thresholds

    assert len(set(phantom.patient.values())) == 9 and len(phantom.splits) == 3
    flags = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    try:  # non-default process-wide settings: training and prediction must leave them as they are
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.allow_tf32 = False
        res = train_classification(DATASET, plans=PLANS, mode="scratch", fold=0, epochs=2, iterations_per_epoch=2,
                                   batch_size=2, device="cpu", n_boot=20, run_name="heldout")
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("medium", False)
        pred = predict_classification(res.output_folder, DATASET, tmp_path / "all.csv", device="cpu", n_boot=0)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("medium", False)
    finally:
        torch.set_float32_matmul_precision(flags[0])
        torch.backends.cudnn.allow_tf32 = flags[1]
    out = res.output_folder

    # the three sets: fold 0's validation selects, fold 1's validation tests, fold 2's validation trains
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["selection"]) == sorted(phantom.splits[0]["val"])
    assert sorted(split["test"]) == sorted(phantom.splits[1]["val"])
    assert sorted(split["train"]) == sorted(phantom.splits[2]["val"])
    pats = {k: {phantom.patient[e] for e in split[k]} for k in ("train", "selection", "test")}
    assert all(pats.values())
    assert not pats["train"] & pats["selection"] and not pats["train"] & pats["test"]
    assert not pats["selection"] & pats["test"]
    assert res.num_exams == {"train": len(split["train"]), "selection": len(split["selection"]),
                             "test": len(split["test"])}

    # thresholds: recomputed from the selection exams' predictions alone, they are the recorded ones
    labels = res.label_names
    rows = _rows(out / "predictions.csv")
    assert {r["set"] for r in rows} == {"selection", "test"}
    assert sorted(r["exam"] for r in rows if r["set"] == "test") == sorted(split["test"])
    sel = [r for r in rows if r["set"] == "selection"]
    test = [r for r in rows if r["set"] == "test"]
    recorded = json.loads((out / "thresholds.json").read_text())
    assert recorded["chosen_on"] == "selection" and recorded["num_exams"] == len(split["selection"])
    again = choose_thresholds(_arrays(sel, labels, "target_"), _arrays(sel, labels, "p_"), labels, "youden")
    assert again == pytest.approx(recorded["thresholds"], abs=2e-6)
    assert res.thresholds == recorded["thresholds"]
    # ... and applied unchanged to the test exams
    p_test, d_test = _arrays(test, labels, "p_"), _arrays(test, labels, "pred_")
    thr = np.array([recorded["thresholds"][n] for n in labels])
    np.testing.assert_array_equal(d_test, (p_test >= thr).astype(float))

    # test metrics come from the test exams only, selection metrics from the selection exams only
    metrics = json.loads((out / "metrics.json").read_text())
    assert "optimistic" in metrics["selection"]["note"] and "held out" in metrics["test"]["note"]
    assert metrics["selection"]["n_exams"] == len(sel) and metrics["test"]["n_exams"] == len(test)
    assert json.loads((out / "test_metrics.json").read_text())["n_exams"] == len(test)
    y_test = _arrays(test, labels, "target_")
    for j, name in enumerate(labels):
        m = next(x for x in metrics["test"]["labels"] if x["name"] == name)
        known = np.isfinite(y_test[:, j])
        assert m["n"] == int(known.sum()) and m["n_pos"] == int(np.nansum(y_test[:, j]))
        yk = y_test[known, j]
        if 0 < yk.sum() < yk.size:
            assert m["auroc"] == pytest.approx(roc_auc_score(yk, p_test[known, j]), abs=1e-5)
        else:
            assert m["auroc"] is None  # undefined with one class: reported as such
    assert res.test.n_exams == len(test) and res.selection.n_exams == len(sel)
    progress = (out / "progress.csv").read_text().splitlines()[0].split(",")
    assert "selection_mean_auroc" in progress and not any(k.startswith("val_") for k in progress)

    # precision: the resolved value is recorded, prediction reads it back and reproduces the test rows
    cfg = json.loads((out / "classifier.json").read_text())
    assert cfg["precision"] == "fp32" and cfg["precision_requested"] == "auto"
    ckpt = torch.load(out / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    assert ckpt["config"]["precision"] == "fp32"
    assert pred.precision == "fp32" and res.precision == "fp32"
    again = {r["exam"]: float(r["p_EFFU"]) for r in _rows(pred.csv)}
    assert {r["exam"]: float(r["p_EFFU"]) for r in test} == pytest.approx({e: again[e] for e in split["test"]},
                                                                          abs=1e-5)

    # resume (epoch 2 -> 3) continues in the recorded precision
    res2 = train_classification(DATASET, plans=PLANS, mode="scratch", fold=0, epochs=3, iterations_per_epoch=2,
                                batch_size=2, device="cpu", n_boot=0, run_name="heldout", resume=True)
    ckpt = torch.load(res2.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 3 and ckpt["config"]["precision"] == "fp32" and res2.precision == "fp32"
    assert json.loads((out / "classifier.json").read_text())["precision"] == "fp32"


def test_two_folds_and_too_few_patients(phantom, tmp_path: Path) -> None:
    """The demo's setting (2 folds): selection and test are halves of fold 0's validation patients."""
    from orthodiff_nnunet.classification import train_classification
    from orthodiff_nnunet.data.splits import patient_grouped_splits

    exams = sorted(phantom.patient)
    two = patient_grouped_splits(exams, phantom.patient, {e: "S" for e in exams}, num_folds=2)
    splits_file = phantom.folder / "splits_final.json"
    original = splits_file.read_text()
    try:
        splits_file.write_text(json.dumps(two))
        res = train_classification(DATASET, plans=PLANS, mode="scratch", fold=0, epochs=1, iterations_per_epoch=1,
                                   batch_size=2, device="cpu", n_boot=0, output_folder=tmp_path / "two")
        split = json.loads((res.output_folder / "split.json").read_text())
        assert sorted(split["train"]) == sorted(two[0]["train"])
        assert sorted(split["selection"] + split["test"]) == sorted(two[0]["val"])
        assert split["selection"] and split["test"]
        sel_p = {phantom.patient[e] for e in split["selection"]}
        assert not sel_p & {phantom.patient[e] for e in split["test"]}
        assert "2 folds" in json.loads((res.output_folder / "classifier.json").read_text())["sets"][
            "selection_source"]

        # one patient in the selection fold: no three sets; the error says what is needed
        one = [{"train": [e for e in exams if phantom.patient[e] != phantom.patient[exams[0]]],
                "val": [e for e in exams if phantom.patient[e] == phantom.patient[exams[0]]]}]
        one.append({"train": one[0]["val"], "val": one[0]["train"]})
        splits_file.write_text(json.dumps(one))
        with pytest.raises(ClassificationError, match=r"at least 3 patients.*--test-fold none"):
            train_classification(DATASET, plans=PLANS, mode="scratch", fold=0, epochs=1, iterations_per_epoch=1,
                                 batch_size=2, device="cpu", n_boot=0, output_folder=tmp_path / "one")
    finally:
        splits_file.write_text(original)


# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_bf16_recorded_and_reproduced_by_predict(phantom, tmp_path: Path) -> None:
    """On CUDA (capability 8.0+): a bf16 run records bf16; predict and resume compute in it again."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0 or newer")
    from orthodiff_nnunet.classification import predict_classification, train_classification

    flags = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    res = train_classification(DATASET, plans=PLANS, mode="scratch", fold=0, epochs=1, iterations_per_epoch=2,
                               batch_size=2, device="cuda", n_boot=0, precision="bf16",
                               output_folder=tmp_path / "bf16")
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == flags
    out = res.output_folder
    assert json.loads((out / "classifier.json").read_text())["precision"] == "bf16"
    test = {r["exam"]: float(r["p_EFFU"]) for r in _rows(out / "test_predictions.csv")}
    pred = predict_classification(out, DATASET, tmp_path / "bf16.csv", device="cuda", n_boot=0, exams=list(test))
    assert pred.precision == "bf16"
    assert {r["exam"]: float(r["p_EFFU"]) for r in _rows(pred.csv)} == pytest.approx(test, abs=1e-5)
    res2 = train_classification(DATASET, plans=PLANS, mode="scratch", fold=0, epochs=2, iterations_per_epoch=2,
                                batch_size=2, device="cuda", n_boot=0, output_folder=out, resume=True)
    assert res2.precision == "bf16" and json.loads((out / "classifier.json").read_text())["precision"] == "bf16"
    auto = train_classification(DATASET, plans=PLANS, mode="scratch", fold=0, epochs=1, iterations_per_epoch=2,
                                batch_size=2, device="cuda", n_boot=0, output_folder=tmp_path / "auto")
    cfg = json.loads((auto.output_folder / "classifier.json").read_text())
    assert cfg["precision"] in PRECISIONS and cfg["precision_requested"] == "auto"
    assert cfg["precision"] == min(cfg["precision_timings_ms"], key=cfg["precision_timings_ms"].get)
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == flags
