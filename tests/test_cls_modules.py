"""The seams of the classifier's modules (issue 17): each against a known answer.

* the learning-rate schedule is nnU-Net's polynomial decay (its PolyLRScheduler's rates) per step, per
  parameter group, and a run resumed with more steps follows the new length;
* the optimizer groups of each mode, the positive weights, one training step without fp16;
* the records of a run: predictions CSV, the progress CSV, thresholds chosen on the selection
  exams and applied unchanged to the test exams;
* ``classification_metrics``' bootstrap intervals equal an independent recomputation;
* the views' folds merged in exam ids; the precision off CUDA; checkpoint round trip.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from sklearn.metrics import roc_auc_score
from torch import nn

from orthodiff_nnunet.data.exam_loaders import ExamSplit, ViewData, view_splits
from orthodiff_nnunet.data.targets import CaseTargets, Exam, TargetsFile
from orthodiff_nnunet.errors import ClassificationError
from orthodiff_nnunet.evaluation.classification import (
    PredictedSet,
    classification_metrics,
    cluster_members,
    mean_known_bce,
    resample_clusters,
    write_heldout_results,
    write_predictions_csv,
    write_training_progress,
)
from orthodiff_nnunet.networks import precision as prec
from orthodiff_nnunet.networks.classifier import (
    CHECKPOINT_FORMAT,
    MultiViewClassifier,
    ViewBranch,
    masked_bce,
    param_groups,
    poly_lr_schedule,
    positive_weights,
    read_classifier_checkpoint,
    write_classifier_checkpoint,
)
from orthodiff_nnunet.trainers.classification import nnUNetTrainerOrthoDiffCls


def _old_poly(step: int, total: int) -> float:
    """The trainer's schedule factor as written before the refactor."""
    return (1 - min(step, total - 1) / total) ** 0.9


def _two_groups(head_lr: float = 1e-3, factor: float = 0.05) -> torch.optim.Optimizer:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [a], "lr": head_lr}, {"params": [b], "lr": head_lr * factor}])


def _tiny_classifier(num_labels: int = 2) -> MultiViewClassifier:
    def encoder():
        return PlainConvEncoder(1, 2, (4, 8), nn.Conv3d, 3, (1, 2), 1, True, nn.InstanceNorm3d, None, None, None,
                                nn.LeakyReLU, None, return_skips=True)

    torch.manual_seed(0)
    return MultiViewClassifier({"sag": ViewBranch(encoder()), "cor": ViewBranch(encoder())}, num_labels)


# ----------------------------------------------------------------------------------------------
# learning rate
@pytest.mark.parametrize("total", [1, 7, 250])
def test_poly_lr_schedule_is_nnunets_polylr_per_group(total: int) -> None:
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    opt = _two_groups()
    sched = poly_lr_schedule(opt, total)
    one = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    nnunet = PolyLRScheduler(one, 1e-3, total)  # one group only: it sets the same rate for every group
    for k in range(total):  # the rate of the k-th optimizer step
        assert opt.param_groups[0]["lr"] == pytest.approx(one.param_groups[0]["lr"], rel=1e-12, abs=0)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * _old_poly(k, total), rel=1e-12, abs=0)
        assert opt.param_groups[1]["lr"] == pytest.approx(5e-5 * _old_poly(k, total), rel=1e-12, abs=0)
        opt.step()
        sched.step()
        one.step()
        nnunet.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(5e-5 * (1 / total) ** 0.9, rel=1e-12)  # clamped, never 0


def test_poly_lr_schedule_resumed_with_more_steps_follows_the_new_length() -> None:
    """``--resume`` with more epochs: the rate goes on from the step count (torch's PolynomialLR would stay at 0)."""
    finished = _two_groups()
    old = poly_lr_schedule(finished, 10)
    chained = _two_groups()
    poly = torch.optim.lr_scheduler.PolynomialLR(chained, total_iters=10, power=0.9)
    for _ in range(10):
        finished.step()
        old.step()
        chained.step()
        poly.step()
    opt = _two_groups()
    sched = poly_lr_schedule(opt, 20)
    opt.load_state_dict(finished.state_dict())
    sched.load_state_dict(old.state_dict())
    poly.total_iters = 20
    for k in range(11, 20):
        opt.step()
        sched.step()
        chained.step()
        poly.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * _old_poly(k, 20), rel=1e-12, abs=0)
        assert opt.param_groups[1]["lr"] == pytest.approx(5e-5 * _old_poly(k, 20), rel=1e-12, abs=0)
        assert chained.param_groups[0]["lr"] == 0.0


# ----------------------------------------------------------------------------------------------
# optimisation pieces
def test_param_groups_of_each_mode() -> None:
    net = _tiny_classifier()
    n_enc, n_head = len(net.encoder_parameters()), len(net.head_parameters())
    assert n_enc == 8 and n_head == 12
    finetune = param_groups(net, "finetune", 1e-3, 0.05)
    assert [(len(g["params"]), g["lr"]) for g in finetune] == [(n_head, 1e-3), (n_enc, pytest.approx(5e-5))]
    scratch = param_groups(net, "scratch", 1e-3, 0.05)
    assert [(len(g["params"]), g["lr"]) for g in scratch] == [(n_head, 1e-3), (n_enc, 1e-3)]
    assert all(p.requires_grad for p in net.parameters())
    probe = param_groups(net, "probe", 1e-3, 0.05)
    assert [(len(g["params"]), g["lr"]) for g in probe] == [(n_head, 1e-3)]
    assert not any(p.requires_grad for p in net.encoder_parameters())


def test_positive_weights_are_negatives_over_positives_of_the_known_targets() -> None:
    y = np.array([[1, 0, np.nan, 0], [0, 0, np.nan, 0], [0, 1, np.nan, 0], [1, 0, np.nan, 0]], dtype=np.float32)
    # label 0: 2 neg / 2 pos; label 1: 3 neg / 1 pos; label 2: nothing known; label 3: no positive
    assert positive_weights(y).tolist() == [1.0, 3.0, 1.0, 1.0]
    many = np.zeros((301, 1), dtype=np.float32)
    many[0] = 1
    assert positive_weights(many).tolist() == [100.0]  # capped


def _batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    data = {v: torch.randn(3, 1, 8, 8, 8, generator=g) for v in ("sag", "cor")}
    present = torch.tensor([[1, 1], [1, 0], [0, 1]], dtype=torch.bool)
    target = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [1.0, 1.0]])
    return {"data": data, "present": present, "target": target}


def test_a_training_step_off_fp16_is_a_plain_clipped_adamw_step(tmp_path: Path) -> None:
    """The trainer's step (disabled loss scaler) equals backward, clip at 12, AdamW step, one schedule step."""
    trainer = nnUNetTrainerOrthoDiffCls({}, {"sag": TargetsFile(("A", "B"), {})}, "all", tmp_path,
                                        torch.device("cpu"))
    trainer.mode, trainer.precision = "finetune", "fp32"
    trainer.network = _tiny_classifier()
    reference = copy.deepcopy(trainer.network)
    trainer.optimizer = torch.optim.AdamW(param_groups(trainer.network, "finetune", 1e-2, 0.05), weight_decay=1e-4)
    ref_opt = torch.optim.AdamW(param_groups(reference, "finetune", 1e-2, 0.05), weight_decay=1e-4)
    trainer.lr_scheduler = poly_lr_schedule(trainer.optimizer, 10)
    trainer.pos_weight = torch.tensor([2.0, 1.0])
    batch = _batch()

    loss = trainer.train_step(batch)

    reference.train()
    ref_opt.zero_grad()
    ref_loss = masked_bce(reference(batch["data"], batch["present"]), batch["target"], torch.tensor([2.0, 1.0]))
    ref_loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 12.0)
    ref_opt.step()
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    for p, q in zip(trainer.network.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(p, q) for p, q in zip(trainer.network.parameters(), _tiny_classifier().parameters()))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9 ** 0.9, rel=1e-12)

    trainer.mode = "probe"  # frozen encoders keep their statistics: eval mode inside a training step
    trainer.train_step(batch)
    assert trainer.network.training and not any(b.encoder.training for b in trainer.network.branches.values())


# ----------------------------------------------------------------------------------------------
# precision off CUDA
def test_precision_off_cuda_is_fp32_without_measuring(tmp_path: Path, caplog) -> None:
    cpu = torch.device("cpu")
    assert prec.runtime_precision("fp32", cpu) == "fp32"
    with caplog.at_level(logging.WARNING):
        assert prec.runtime_precision("bf16", cpu) == "fp32"
    assert "trained in bf16" in caplog.text
    with prec.autocast("bf16", cpu):
        assert not torch.is_autocast_enabled("cpu")
    before = torch.get_float32_matmul_precision()
    with prec.tf32_for("tf32", cpu):
        assert torch.get_float32_matmul_precision() == before  # nothing switched off CUDA

    trainer = nnUNetTrainerOrthoDiffCls({}, {"sag": TargetsFile(("A",), {})}, "all", tmp_path, cpu)
    trainer.precision = "bf16"
    assert trainer.choose_precision(batch={}) == "fp32"  # the batch is never touched off CUDA
    assert trainer.precision_requested == "bf16" and trainer.precision_timings == {}


# ----------------------------------------------------------------------------------------------
# records of a run
def _exam(name: str, targets: list[float], cases: dict[str, str], patient: str | None = None) -> Exam:
    return Exam(name, cases, np.array(targets, dtype=np.float32), site="SiteA", patient=patient,
                field_strength_t=3.0, vendor="GE")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_csv_rows(tmp_path: Path) -> None:
    exams = [_exam("E1", [1, np.nan], {"sag": "c1", "cor": "c2"}), _exam("E2", [0, 1], {"cor": "c3"})]
    out = write_predictions_csv(tmp_path / "p.csv", exams, np.array([[0.7, 0.25], [0.1, 0.9]]), ["ACL", "EFFU"],
                                {"ACL": 0.5, "EFFU": 0.3}, ["sag", "cor"], sets={"E1": "selection", "E2": "test"})
    lines = out.read_text().splitlines()
    assert lines[0] == ("exam,set,site,field_strength_t,vendor,views_present,views_missing,p_ACL,p_EFFU,pred_ACL,"
                        "pred_EFFU,target_ACL,target_EFFU")
    assert lines[1] == "E1,selection,SiteA,3,GE,sag cor,,0.700000,0.250000,1,0,1,"
    assert lines[2] == "E2,test,SiteA,3,GE,cor,sag,0.100000,0.900000,0,1,0,1"


def test_mean_known_bce_leaves_unknown_targets_out() -> None:
    y = np.array([[1, np.nan], [0, 1]], dtype=np.float32)
    p = np.array([[0.8, 0.3], [0.1, 0.6]], dtype=np.float32)
    expected = -(math.log(0.8 + 1e-6) + math.log(0.9 + 1e-6) + math.log(0.6 + 1e-6)) / 3
    assert mean_known_bce(y, p) == pytest.approx(expected, rel=1e-5)
    assert mean_known_bce(np.full((2, 1), np.nan), np.full((2, 1), 0.5)) == 0.0


def test_training_progress_csv(tmp_path: Path) -> None:
    history = [{"epoch": 0, "train_loss": 0.6931471, "selection_mean_auroc": float("nan"), "selection_loss": 0.7,
                "lr": 0.001},
               {"epoch": 1, "train_loss": 0.5, "selection_mean_auroc": 0.75, "selection_loss": 0.65, "lr": 0.0005}]
    write_training_progress(tmp_path, history)
    assert (tmp_path / "progress.csv").read_text() == ("epoch,train_loss,selection_mean_auroc,selection_loss,lr\n"
                                                       "0,0.693147,nan,0.7,0.001\n1,0.5,0.75,0.65,0.0005\n")
    assert (tmp_path / "progress.png").stat().st_size > 0


def test_thresholds_come_from_the_selection_exams_and_apply_unchanged_to_the_test_exams(tmp_path: Path) -> None:
    sel = [_exam(f"S{i}", [t], {"sag": f"s{i}"}, patient=f"P{i}") for i, t in enumerate([0, 0, 1, 1])]
    test = [_exam(f"T{i}", [t], {"sag": f"t{i}"}, patient=f"Q{i}") for i, t in enumerate([0, 1, 0])]
    split = ExamSplit(("X",), tuple(e.exam for e in sel), tuple(e.exam for e in test), "fold 0 validation",
                      "fold 1 validation")
    out = write_heldout_results(
        tmp_path, PredictedSet(sel, np.array([[0.1], [0.2], [0.8], [0.9]]), "fold 0 validation"),
        PredictedSet(test, np.array([[0.4], [0.6], [0.55]]), "fold 1 validation"), ["ACL"], ["sag"], "youden",
        n_boot=20, seed=0, sets_record=split.record(1, 4, 3))
    assert out["thresholds"] == {"ACL": 0.5}  # Youden on the selection exams: between 0.2 and 0.8
    saved = json.loads((tmp_path / "thresholds.json").read_text())
    assert saved["chosen_on"] == "selection" and saved["thresholds"] == {"ACL": 0.5} and saved["num_exams"] == 4
    m = out["test"].label("ACL")
    assert (m.threshold, m.sensitivity, m.specificity, m.auroc) == (0.5, 1.0, 0.5, 1.0)
    assert out["selection"].label("ACL").auroc == 1.0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["test"]["source"] == "fold 1 validation" and "held out" in record["test"]["note"]
    assert record["sets"] == {"selection_source": "fold 0 validation", "test_source": "fold 1 validation",
                              "num_exams": {"train": 1, "selection": 4, "test": 3}, "dropped_train_exams": 0}
    assert record["test"]["resampling"] == {"unit": "patient", "n_clusters": 3, "n_without_patient": 0}
    rows = _rows(tmp_path / "predictions.csv")
    assert [(r["exam"], r["set"], r["pred_ACL"]) for r in rows[4:]] == [("T0", "test", "0"), ("T1", "test", "1"),
                                                                         ("T2", "test", "1")]
    assert [r["set"] for r in rows[:4]] == ["selection"] * 4
    assert [r["exam"] for r in _rows(tmp_path / "test_predictions.csv")] == ["T0", "T1", "T2"]
    assert json.loads((tmp_path / "test_metrics.json").read_text())["labels"][0]["specificity"] == 0.5
    assert "| ACL | 3 (1) | 0.500 |" in (tmp_path / "test_metrics.md").read_text()


# ----------------------------------------------------------------------------------------------
# classification_metrics, split into its steps
def test_bootstrap_intervals_equal_an_independent_recomputation() -> None:
    rng = np.random.default_rng(5)
    n = 40
    y = rng.integers(0, 2, (n, 2)).astype(float)
    y[rng.random((n, 2)) < 0.15] = np.nan
    s = np.clip(0.35 * np.nan_to_num(y) + rng.random((n, 2)) * 0.65, 0, 1)
    patients = [f"P{i // 2}" for i in range(n)]
    got = classification_metrics(y, s, ["a", "b"], n_boot=200, seed=11, clusters=patients, n_without_patient=0)

    draws = np.random.default_rng(11)
    members = cluster_members(patients, n)
    per_label, macro = [[], []], []
    for _ in range(200):
        idx = resample_clusters(draws, members)
        values = []
        for j in range(2):
            keep = idx[np.isfinite(y[idx, j])]
            yy = y[keep, j]
            values.append(roc_auc_score(yy, s[keep, j]) if 0 < yy.sum() < yy.size else math.nan)
            if not math.isnan(values[-1]):
                per_label[j].append(values[-1])
        if not any(math.isnan(v) for v in values):
            macro.append(np.mean(values))
    for j, name in enumerate(["a", "b"]):
        lo, hi = np.percentile(per_label[j], [2.5, 97.5])
        assert got.label(name).ci["auroc"] == pytest.approx((lo, hi), rel=1e-12)
        assert got.label(name).ci_valid["auroc"] == len(per_label[j])
    assert got.macro_ci["auroc"] == pytest.approx(tuple(np.percentile(macro, [2.5, 97.5])), rel=1e-12)
    assert got.macro_ci_valid["auroc"] == len(macro)
    assert got.resampling == {"unit": "patient", "n_clusters": 20, "n_without_patient": 0}


# ----------------------------------------------------------------------------------------------
# the views' folds and the checkpoint
def _view(tmp_path: Path, view: str, splits: list[dict]) -> ViewData:
    folder = tmp_path / view
    folder.mkdir()
    (folder / "splits_final.json").write_text(json.dumps(splits))
    return ViewData(view, f"Dataset90{len(view)}_{view}", "tinyPlans", {}, "cls", {}, folder)


def _targets(case_exam: dict[str, str]) -> TargetsFile:
    return TargetsFile(("A",), {c: CaseTargets(c, e, {"A": 1}) for c, e in case_exam.items()})


def test_view_splits_are_merged_in_exam_ids_and_must_agree(tmp_path: Path) -> None:
    views = {"sag": _view(tmp_path, "sag", [{"train": ["s1", "s2"], "val": ["s3"]}]),
             "cor": _view(tmp_path, "cor", [{"train": ["c1"], "val": ["c3", "c4"]}])}
    targets = {"sag": _targets({"s1": "E1", "s2": "E2", "s3": "E3"}),
               "cor": _targets({"c1": "E1", "c3": "E3", "c4": "E4"})}
    assert view_splits(views, targets) == [{"train": {"E1", "E2"}, "val": {"E3", "E4"}}]
    targets["cor"] = _targets({"c1": "E3", "c3": "E1", "c4": "E4"})  # E1 and E3 change sides in one view
    with pytest.raises(ClassificationError, match=r"fold 0: exams \['E1', 'E3'\] are training in one view"):
        view_splits(views, targets)
    (tmp_path / "cor" / "splits_final.json").unlink()
    with pytest.raises(ClassificationError, match=r"cor/splits_final.json not found.*--fold all"):
        view_splits(views, targets)


def test_classifier_checkpoint_round_trip(tmp_path: Path) -> None:
    path = write_classifier_checkpoint(tmp_path / "checkpoint_latest.pth",
                                       {"network_weights": {"w": torch.arange(3.0)}, "current_epoch": 4})
    payload = read_classifier_checkpoint(path)
    assert payload["format"] == CHECKPOINT_FORMAT and payload["current_epoch"] == 4
    assert torch.equal(payload["network_weights"]["w"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pth"]  # no temporary file left
