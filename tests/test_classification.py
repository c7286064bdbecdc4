"""Abnormality classification: metrics, targets, fused classifier, training on phantoms, transfer, MRNet.

The phantom exams have conspicuous abnormalities (docs in ``orthodiff_nnunet.data.phantom``); joint
effusion (EFFU: distended fluid-filled recesses) is the most visible one. The pseudonym key is
fixed so that the patient-grouped folds, and hence the held-out test fold, are the same on every run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from orthodiff_nnunet.data.phantom import write_site
from orthodiff_nnunet.data.sites import SITE_3T
from orthodiff_nnunet.data.targets import TargetsError, match_exams, read_targets
from orthodiff_nnunet.evaluation.classification import (
    _rank_auroc,
    _step_average_precision,
    choose_threshold,
    classification_metrics,
    mean_auroc,
)
from orthodiff_nnunet.schemes import ANKLE_LABELS, KNEE_ABNORMALITIES

from conftest import nnunet_env

KNEE = 541
ANKLE = 561
PLANS = "tinyPlans"
SEED = 7
KEY = "5a" * 32  # fixed pseudonym key: fixed exam names, fixed folds


def _rewrite_manifest(path: Path, keep_row=lambda row: True, rename: dict[str, str] | None = None,
                      drop: tuple[str, ...] = ()) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [r for r in rows if keep_row(r)]
    out = [{(rename or {}).get(k, k): v for k, v in r.items() if k not in drop} for r in rows]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)


@pytest.fixture(scope="module")
def knee(tmp_path_factory):
    """30 phantom exams x sag/cor/ax (one exam without its axial series), planned, tiny-network plans."""
    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.planning import plan_and_preprocess

    root = tmp_path_factory.mktemp("cls")
    with nnunet_env(root):
        key = root / "pseudonym.key"
        key.write_text(KEY + "\n")
        manifest = write_site(root / "site", SITE_3T, n_cases=30, seed=SEED, prevalence=0.5, scale=0.3)
        _rewrite_manifest(manifest, keep_row=lambda r: not (r["case_id"] == "EXAM-0003" and "_ax" in r["image"]))
        convert(manifest, KNEE, "ClsKnee", num_processes=1, pseudonym_key=key)
        plan_and_preprocess([KNEE, KNEE + 1, KNEE + 2], num_processes=1, show_progress=False, planner="plain")
        names = {}
        for folder in sorted((root / "pre").glob("Dataset54[123]_*")):
            write_shrunk_plans(folder, "orthodiffPlans", PLANS, max_features=4, max_stages=3)
            names[json.loads((folder / "dataset.json").read_text())["orthodiff"]["orientation"]] = folder.name
        yield SimpleNamespace(root=root, key=key, names=names)


def _plans(knee, view: str) -> dict:
    return json.loads((knee.root / "pre" / knee.names[view] / f"{PLANS}.json").read_text())


# ----------------------------------------------------------------------------------------------
# metrics
def test_metrics_match_sklearn_and_bootstrap_is_seeded() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 30)
        s = np.round(rng.random(30), 1)  # many ties
        if y.min() == y.max():
            continue
        assert _rank_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert _step_average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)

    y = np.array([[0, 1, np.nan], [0, 1, 1], [1, 1, 0], [1, 1, np.nan], [0, 1, 1], [1, 1, 0]], dtype=float)
    s = np.array([[0.1, 0.5, 0.9], [0.2, 0.4, 0.8], [0.8, 0.3, 0.1], [0.9, 0.9, 0.5], [0.3, 0.6, 0.7], [0.7, 0.2, 0.2]])
    m = classification_metrics(y, s, ["a", "b", "c"], {"a": 0.5, "b": 0.5, "c": 0.5}, n_boot=300, seed=3)
    a, b, c = m.labels
    assert a.auroc == 1.0 and a.sensitivity == 1.0 and a.specificity == 1.0 and (a.n, a.n_pos) == (6, 3)
    assert math.isnan(b.auroc) and math.isnan(b.specificity) and b.sensitivity == pytest.approx(0.5)
    assert (c.n, c.n_pos) == (4, 2) and c.auroc == 1.0  # unknowns (NaN) are left out
    assert m.macro["auroc"] == pytest.approx(1.0)  # undefined labels do not count as 0.5
    assert mean_auroc(y, s) == pytest.approx(1.0)
    again = classification_metrics(y, s, ["a", "b", "c"], {"a": 0.5, "b": 0.5, "c": 0.5}, n_boot=300, seed=3)
    assert again.labels[2].ci == c.ci and again.macro_ci == m.macro_ci
    other = classification_metrics(y, s, ["a", "b", "c"], n_boot=300, seed=4)
    # a separable label: every resample gives sensitivity 1; an all-positive label: sensitivity 3/6 at 0.5 with
    # a non-degenerate interval around it, while its AUROC and specificity stay undefined (no negatives)
    assert other.labels[0].ci["sensitivity"] == (1.0, 1.0)
    lo, hi = other.labels[1].ci["sensitivity"]
    assert other.labels[1].sensitivity == pytest.approx(0.5) and 0.0 < lo < 0.5 < hi < 1.0
    assert all(math.isnan(v) for v in other.labels[1].ci["auroc"] + other.labels[1].ci["specificity"])
    assert "| **macro** |" in m.to_markdown() and json.dumps(m.to_dict())  # NaN -> null, JSON-safe

    # Youden threshold separates two separable classes; one class only falls back to 0.5
    t = choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9])
    assert 0.3 < t <= 0.6
    assert choose_threshold([1, 1], [0.2, 0.9]) == 0.5
    assert 0.3 < choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9], "f1") <= 0.6

    # decisions made elsewhere (pooled out-of-fold, each fold at its own threshold)
    d = (s >= 0.5).astype(float)
    d[0, 0] = 1  # a false positive decided at another fold's threshold
    md = classification_metrics(y, s, ["a", "b", "c"], n_boot=50, seed=3, decisions=d)
    assert md.labels[0].specificity == pytest.approx(2 / 3) and md.labels[0].auroc == a.auroc
    assert "per-fold" in md.to_markdown()


def test_targets_reader_and_exam_matching(tmp_path: Path) -> None:
    def write(name: str, cases: dict, labels=("ACL", "EFFU")) -> Path:
        p = tmp_path / name
        p.write_text(json.dumps({"label_names": list(labels), "cases": cases}))
        return p

    base = {"site": "SiteA", "field_strength_t": 3.0, "vendor": "GE", "patient": "P1", "echo": None}
    sag = read_targets(write("sag.json", {
        "E1": {**base, "exam": "E1", "targets": {"ACL": 1, "EFFU": None}},
        "E2": {**base, "exam": "E2", "patient": "P2", "targets": {"ACL": 0, "EFFU": 1}}}))
    ax = read_targets(write("ax.json", {"E1": {**base, "exam": "E1", "targets": {"ACL": 1, "EFFU": None}}}))
    assert sag.label_names == ("ACL", "EFFU")
    np.testing.assert_array_equal(sag.vector("E1"), [1, np.nan])
    assert sag.prevalence() == {"ACL": (1, 2), "EFFU": (1, 1)}
    exams = match_exams({"sag": sag, "ax": ax})
    assert [e.exam for e in exams] == ["E1", "E2"]
    assert exams[1].missing_views(["sag", "ax"]) == ["ax"] and exams[0].site == "SiteA"
    assert [e.exam for e in match_exams({"sag": sag, "ax": ax}, {"sag": ["E2"], "ax": []})] == ["E2"]

    conflict = read_targets(write("cor.json", {"E1": {**base, "exam": "E1", "targets": {"ACL": 0, "EFFU": None}}}))
    with pytest.raises(TargetsError, match="targets differ"):
        match_exams({"sag": sag, "cor": conflict})
    with pytest.raises(TargetsError, match="different label sets"):
        match_exams({"sag": sag, "cor": read_targets(write("x.json", {}, labels=("ATFL",)))})
    with pytest.raises(TargetsError, match="must be 0, 1 or null"):
        read_targets(write("bad.json", {"E1": {**base, "exam": "E1", "targets": {"ACL": 2}}}))
    with pytest.raises(TargetsError, match="orthodiff convert"):
        read_targets(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------
# network
def test_fusion_handles_missing_views_and_loss_masks_unknowns(knee) -> None:
    from orthodiff_nnunet.networks.classifier import build_classifier, masked_bce

    plans = {v: _plans(knee, v) for v in ("sag", "cor", "ax")}
    patch = {v: tuple(p["configurations"]["3d_fullres"]["patch_size"]) for v, p in plans.items()}
    torch.manual_seed(0)
    x = {v: torch.randn(3, 1, *patch[v]) for v in plans}  # exam 0: all views, 1: no ax, 2: cor only
    present = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.bool)
    for fusion in ("concat", "gated"):
        model = build_classifier(plans, "3d_classification", 1, 8, fusion=fusion, feature_stages=2).eval()
        with torch.no_grad():
            out = model(x, present)
            x2 = {v: t.clone() for v, t in x.items()}
            x2["ax"][1:] = 100.0  # what sits in a missing view's rows is never looked at
            x2["sag"][2] = -7.0
            out2 = model(x2, present)
        assert out.shape == (3, 8) and torch.isfinite(out).all()
        torch.testing.assert_close(out, out2)
        assert not torch.allclose(out[0], out[1])
    enc = {id(p) for p in model.encoder_parameters()}
    assert all(id(p) not in enc for p in model.head_parameters()) and len(enc) > 0

    logits = torch.zeros(2, 3, requires_grad=True)
    target = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), float("nan"), 1.0]])
    loss = masked_bce(logits, target, torch.tensor([2.0, 1.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss) and logits.grad[0, 1] == 0 and logits.grad[1, 0] == 0 and logits.grad[1, 1] == 0
    expected = (2 * math.log(2) + math.log(2) + math.log(2)) / 3  # pos_weight 2 on the known ACL positive
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_noised_input_uses_pretrained_film(knee, tmp_path: Path) -> None:
    """The timestep conditioning travels in encoder.pt (format 2) and is set at the noise timestep."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from orthodiff_nnunet.networks.build import build_network
    from orthodiff_nnunet.networks.classifier import ViewBranch, load_timestep_film
    from orthodiff_nnunet.networks.encoder_io import export_encoder
    from orthodiff_nnunet.trainers.diffusion_pretraining import nnUNetTrainerOrthoDiffPretrain

    plans = _plans(knee, "sag")
    cm = PlansManager(plans).get_configuration("3d_diffusion")
    torch.manual_seed(1)
    model = nnUNetTrainerOrthoDiffPretrain.build_network_architecture(PlansManager(plans), cm, 1, 1)
    with torch.no_grad():
        for p in model.ema.film.parameters():
            p.normal_(0, 0.1)  # as if trained (they start at zero)
    from orthodiff_nnunet.networks.build import architecture_hash, architecture_of

    export_encoder(model.ema, tmp_path / "encoder.pt", {"schedule": {"name": "cosine", "num_steps": 1000},
                                                        "architecture_hash": architecture_hash(architecture_of(plans, "3d_diffusion"))})

    def branch(film: bool) -> ViewBranch:
        b = ViewBranch(build_network(plans, "3d_classification", 1, 1).encoder, noise_timestep=100, film=film)
        load_timestep_film(b, tmp_path / "encoder.pt")
        return b.eval()

    with_film, without = branch(True), branch(False)
    expected = model.ema.encoder_conditioning().affine(100)
    for stage, (scale, shift) in zip(with_film.encoder.stages, expected):
        torch.testing.assert_close(stage.film_scale, scale)
        torch.testing.assert_close(stage.film_shift, shift)
    assert all(float(s.film_scale.abs().max()) == 0 for s in without.encoder.stages)
    x = torch.randn(2, 1, *plans["configurations"]["3d_fullres"]["patch_size"])
    with torch.no_grad():
        a, b, a2 = with_film(x), without(x), with_film(x)
    torch.testing.assert_close(a, a2)  # evaluation noise is seeded: deterministic
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------------------------
# training and prediction on phantoms
def _cls_parser(kind: str) -> argparse.ArgumentParser:
    from orthodiff_nnunet.cli.classification import add_predict_cls_parser, add_train_cls_parser

    parser = argparse.ArgumentParser(prog=f"orthodiff {kind}")
    sub = parser.add_subparsers(dest="what", required=True)
    (add_train_cls_parser if kind == "train" else add_predict_cls_parser)(sub)
    return parser


def test_three_view_training_detects_effusion_on_held_out_exams(knee, tmp_path: Path, capsys) -> None:
    """Short scratch training (45 steps) on fused sag/cor/ax; held-out EFFU AUROC far above chance."""
    torch.manual_seed(0)
    args = _cls_parser("train").parse_args([
        "cls", "-d", str(KNEE), "-p", PLANS, "--mode", "scratch", "--fold", "0", "--test-fold", "1",
        "--epochs", "3", "--iterations-per-epoch", "15", "--batch-size", "4", "--lr", "3e-3", "--device", "cpu",
        "--n-boot", "200", "--run-name", "effusion"])
    assert args.func(args) == 0
    out = knee.root / "res" / knee.names["sag"] / f"nnUNetTrainerOrthoDiffCls__{PLANS}__3d_classification" / "effusion" / "fold_0"
    printed = capsys.readouterr().out
    assert "held-out test exams" in printed and "views sag+cor+ax" in printed
    for name in ("checkpoint_best.pth", "checkpoint_final.pth", "thresholds.json", "metrics.json", "predictions.csv",
                 "split.json", "test_metrics.json", "test_predictions.csv", "progress.csv", "classifier.json",
                 "plans_ax.json"):
        assert (out / name).is_file(), name
    test = json.loads((out / "test_metrics.json").read_text())
    effu = next(m for m in test["labels"] if m["name"] == "EFFU")
    assert 0 < effu["n_pos"] < effu["n"], "the held-out fold must hold exams with and without effusion"
    assert effu["auroc"] >= 0.85, test  # chance is 0.5
    cfg = json.loads((out / "classifier.json").read_text())
    assert cfg["label_names"] == list(KNEE_ABNORMALITIES) and cfg["views"] == ["sag", "cor", "ax"]
    assert len((out / "progress.csv").read_text().strip().splitlines()) == 4  # header + 3 epochs

    # predict every exam, the one without an axial series included
    pred_csv = tmp_path / "pred.csv"
    args = _cls_parser("predict").parse_args(["cls", "-m", str(out), "-d", str(KNEE), "-o", str(pred_csv),
                                              "--device", "cpu", "--n-boot", "100"])
    assert args.func(args) == 0
    with open(pred_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30
    gap = [r for r in rows if r["views_missing"]]
    assert len(gap) == 1 and gap[0]["views_missing"] == "ax" and gap[0]["views_present"] == "sag cor"
    assert all(0 <= float(r[f"p_{n}"]) <= 1 for r in rows for n in KNEE_ABNORMALITIES)
    thresholds = json.loads((out / "thresholds.json").read_text())["thresholds"]
    for r in rows:
        assert int(r["pred_EFFU"]) == int(float(r["p_EFFU"]) >= thresholds["EFFU"])
    assert (tmp_path / "pred_metrics.json").is_file() and "EFFU" in (tmp_path / "pred_metrics.md").read_text()

    # a site without any axial series: the datasets of the other views only
    from orthodiff_nnunet.classification import predict_classification

    two = predict_classification(out, [knee.names["sag"], knee.names["cor"]], tmp_path / "no_ax.csv", device="cpu",
                                 n_boot=0)
    with open(two.csv, newline="") as f:
        no_ax = list(csv.DictReader(f))
    assert two.num_exams == 30 and two.num_with_missing_views == 30
    assert {r["views_missing"] for r in no_ax} == {"ax"}
    assert all(0 <= float(r["p_EFFU"]) <= 1 for r in no_ax)

    # the held-out predictions are reproduced by predict on the same exams
    with open(out / "test_predictions.csv", newline="") as f:
        held_out = {r["exam"]: float(r["p_EFFU"]) for r in csv.DictReader(f)}
    again = {r["exam"]: float(r["p_EFFU"]) for r in rows if r["exam"] in held_out}
    assert again == pytest.approx(held_out, abs=1e-5)


def test_gated_fusion_label_fraction_and_usage_errors(knee) -> None:
    from orthodiff_nnunet.classification import ClassificationUsageError, _per_view, resolve_views, train_classification
    from orthodiff_nnunet.errors import ClassificationError

    assert resolve_views(KNEE) == {"sag": knee.names["sag"], "cor": knee.names["cor"], "ax": knee.names["ax"]}
    assert list(resolve_views([knee.names["ax"], knee.names["sag"]], ["ax", "sag"])) == ["ax", "sag"]
    assert resolve_views(KNEE + 2, ["cor"]) == {"cor": knee.names["cor"]}  # any member stands for its group
    assert _per_view(["sag=200", "cor=150", "ax=50"], ["sag", "cor", "ax"], "t", int) == {"sag": 200, "cor": 150, "ax": 50}
    assert _per_view(["100"], ["sag", "ax"], "t", int) == {"sag": 100, "ax": 100}
    with pytest.raises(ClassificationUsageError, match="one encoder path for several views"):
        train_classification(KNEE, plans=PLANS, encoders=["x.pt"], device="cpu")

    result = train_classification(KNEE, views=["sag", "ax"], plans=PLANS, mode="scratch", fusion="gated",
                                  label_fraction=0.5, epochs=1, iterations_per_epoch=2, batch_size=2, device="cpu",
                                  n_boot=20, run_name="gated")
    # fold 0 trains on its 24 training exams minus the held-out test fold 1's 6: half of those 18
    assert list(result.views) == ["sag", "ax"] and result.num_exams == {"train": 9, "selection": 6, "test": 6}
    assert math.isfinite(result.train_exams_per_s) and result.precision == "fp32"
    with pytest.raises(ClassificationUsageError, match="no pretrained (sag|cor|ax) encoder.*orthodiff pretrain"):
        train_classification(KNEE, plans=PLANS, mode="finetune", device="cpu")
    with pytest.raises(ClassificationError, match="another fold"):
        train_classification(KNEE, plans=PLANS, mode="scratch", fold=1, test_fold=1, device="cpu", run_name="bad")
    with pytest.raises(ClassificationUsageError, match="already holds a finished run"):
        train_classification(KNEE, views=["sag", "ax"], plans=PLANS, mode="scratch", device="cpu", run_name="gated")


def test_knee_encoder_transfers_to_ankle_label_set(knee) -> None:
    """A knee encoder (real pretraining run) loads into a classifier of 4 ankle labels on transferred plans."""
    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.classification import train_classification
    from orthodiff_nnunet.conventions import default_encoder_path
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.networks.encoder_io import read_encoder_checkpoint
    from orthodiff_nnunet.planning import plan_and_preprocess
    from orthodiff_nnunet.pretraining import pretrain

    pretrain(KNEE, plans=PLANS, iterations=4, checkpoint_every=2, device="cpu", sample_steps=0, val_iterations=1)
    knee_encoder = default_encoder_path(knee.names["sag"], PLANS)
    assert knee_encoder.is_file()

    # an "ankle" site: phantom images, 4 ankle label columns (transfer needs data, not anatomy, here)
    manifest = write_site(knee.root / "ankle", SITE_3T, n_cases=6, seed=SEED + 1, prevalence=0.5, scale=0.3,
                          orientations=("sag",))
    _rewrite_manifest(manifest, rename=dict(zip(("PD", "EFFU", "ACL", "MM"), ANKLE_LABELS)),
                      drop=("PCL", "LM", "MCL", "LCL"))
    convert(manifest, ANKLE, "ClsAnkle", num_processes=1, pseudonym_key=knee.key, abnormality_labels=ANKLE_LABELS)
    plan_and_preprocess([ANKLE], num_processes=1, show_progress=False, planner="plain", plans_from=KNEE)
    (ankle_name,) = [p.name for p in (knee.root / "pre").glob(f"Dataset{ANKLE}_*")]
    write_shrunk_plans(knee.root / "pre" / ankle_name, "orthodiffPlans", PLANS, max_features=4, max_stages=3)

    result = train_classification(ANKLE, plans=PLANS, mode="probe", encoders_from=KNEE, fold="all", epochs=1,
                                  iterations_per_epoch=2, batch_size=2, device="cpu", n_boot=20,
                                  noise_timestep=100, run_name="transfer")
    assert result.label_names == list(ANKLE_LABELS)
    assert "loaded" in result.load_reports["sag"] and knee.names["sag"] in result.load_reports["sag"]
    assert "timestep conditioning of t=100" in result.load_reports["sag"]
    ckpt = torch.load(result.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = ckpt["network_weights"]
    assert weights["fusion.linear.weight"].shape[0] == 4
    # linear probe: the encoder is the knee encoder, bit for bit, after training; its conditioning is the
    # pretraining's at the noise timestep (encoder.pt holds it at t = 0)
    from orthodiff_nnunet.networks.encoder_io import conditioning_of

    prefix = "branches.sag.body.encoder."
    payload = read_encoder_checkpoint(knee_encoder)
    for k, v in payload["state_dict"].items():
        if "film_" not in k:
            assert torch.equal(weights[prefix + k], v), k
    for i, (scale, shift) in enumerate(conditioning_of(payload).affine(100)):
        assert torch.equal(weights[f"{prefix}stages.{i}.film_scale"], scale)
        assert torch.equal(weights[f"{prefix}stages.{i}.film_shift"], shift)


# ----------------------------------------------------------------------------------------------
# real MRNet exams
MRNET_SPACING = {"sag": (0.6, 0.6, 3.0), "cor": (0.6, 0.6, 3.0), "ax": (0.6, 0.6, 3.5)}


@pytest.mark.realdata
@pytest.mark.slow
def test_real_mrnet_three_views_out_of_fold(shared_data: Path, tmp_path: Path) -> None:
    """The 6 real MRNet exams, three views fused, held-out predictions of 3 runs pooled: the run completes and
    reports metrics with bootstrap CIs. Six exams are a smoke test: no accuracy is claimed or asserted."""
    from orthodiff_nnunet.classification import predict_classification, train_classification
    from orthodiff_nnunet.dataset_conversion.mrnet import convert_mrnet
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.planning import plan_and_preprocess

    root = shared_data / "mrnet"
    if not (root / "train").is_dir():
        pytest.skip(f"{root} is absent")
    with nnunet_env(tmp_path):
        key = tmp_path / "pseudonym.key"
        key.write_text(KEY + "\n")
        cases = ["0001", "0003", "1123", "1127", "1128", "1129"]
        convert_mrnet(root, 731, spacing=MRNET_SPACING, cases=cases, num_processes=1, num_folds=3,
                      pseudonym_key=key)
        plan_and_preprocess([731, 732, 733], num_processes=1, show_progress=False, planner="plain")
        for folder in sorted((tmp_path / "pre").glob("Dataset73[123]_*")):
            write_shrunk_plans(folder, "orthodiffPlans", PLANS, max_features=4, max_stages=3)
        rows = []
        for fold in range(3):  # train on fold k minus fold k+1, select on fold k, predict the unseen fold k+1
            res = train_classification(731, plans=PLANS, mode="scratch", fold=fold, test_fold=(fold + 1) % 3, epochs=1,
                                       iterations_per_epoch=2, batch_size=2, device="cpu", n_boot=0, seed=fold)
            assert res.label_names == ["abnormal", "ACL", "meniscus"] and list(res.views) == ["sag", "cor", "ax"]
            with open(res.output_folder / "test_predictions.csv", newline="") as f:
                fold_rows = list(csv.DictReader(f))  # held out: not trained on, not used for selection/thresholds
            rows += fold_rows
            if fold == 0:  # `predict cls` on real data gives the same numbers
                pred = predict_classification(res.output_folder, 731, tmp_path / "fold0.csv", device="cpu",
                                              exams=[r["exam"] for r in fold_rows], n_boot=0)
                with open(pred.csv, newline="") as f:
                    again = {r["exam"]: float(r["p_ACL"]) for r in csv.DictReader(f)}
                assert again == pytest.approx({r["exam"]: float(r["p_ACL"]) for r in fold_rows}, abs=1e-5)
        assert sorted(r["exam"] for r in rows) == sorted({r["exam"] for r in rows}) and len(rows) == 6
        labels = ["abnormal", "ACL", "meniscus"]
        y = np.array([[float(r[f"target_{n}"]) for n in labels] for r in rows])
        p = np.array([[float(r[f"p_{n}"]) for n in labels] for r in rows])
        d = np.array([[float(r[f"pred_{n}"]) for n in labels] for r in rows])
        metrics = classification_metrics(y, p, labels, n_boot=1000, seed=0, decisions=d)
        print("\nMRNet, 6 real exams, three views fused, pooled held-out predictions of 3 runs "
              "(smoke test, no accuracy claim):\n" + metrics.to_markdown())
        assert metrics.n_exams == 6 and set(metrics.macro_ci) == {"auroc", "auprc", "sensitivity", "specificity"}
