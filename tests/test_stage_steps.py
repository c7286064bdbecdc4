"""The named steps the stage functions were split into (issue 17): the refusals and names each step
decides on its own, checked without training anything (files only, a few milliseconds each).

The end-to-end tests (test_pretraining, test_segmentation, test_classification, test_planning,
test_demo_console) run the same steps inside the stage functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from orthodiff_nnunet.conventions import (
    CLASSIFICATION_CONFIGURATION,
    CLS_TRAINER,
    PLAIN_PLANS,
    RESENC_M_PLANS,
    SEG_TRAINER,
    SEGMENTATION_CONFIGURATION,
)
from orthodiff_nnunet.errors import OrthodiffError


def test_pretraining_refuses_an_existing_run_unless_resumed(tmp_path: Path) -> None:
    from orthodiff_nnunet.pretraining import _refuse_unasked_resume

    assert _refuse_unasked_resume(tmp_path, resume=False) == []  # an empty folder: a new run
    assert _refuse_unasked_resume(tmp_path, resume=True) == []  # _resume then says there is nothing to resume
    (tmp_path / "checkpoint_final.pth").write_bytes(b"x")
    (tmp_path / "checkpoint_latest.pth").write_bytes(b"x")
    with pytest.raises(OrthodiffError, match="already holds a pretraining run: pass --resume"):
        _refuse_unasked_resume(tmp_path, resume=False)
    # latest first: a killed run resumes from where it stopped, not from an older final one
    assert _refuse_unasked_resume(tmp_path, resume=True) == [tmp_path / "checkpoint_latest.pth",
                                                             tmp_path / "checkpoint_final.pth"]


def test_plans_file_and_name_from_a_plans_file_or_the_planner(tmp_path: Path) -> None:
    from orthodiff_nnunet.planning import PlanningError, _plans_file_and_name

    assert _plans_file_and_name(None, None, "resenc_m", None) == (None, RESENC_M_PLANS)
    assert _plans_file_and_name(None, None, "resenc_m", 24) == (None, f"{RESENC_M_PLANS}_24G")
    assert _plans_file_and_name(None, "myPlans", "plain", None) == (None, "myPlans")
    assert _plans_file_and_name(501, None, "plain", None) == (None, PLAIN_PLANS)  # a dataset: no file
    with pytest.raises(PlanningError, match="no such plans file"):
        _plans_file_and_name(str(tmp_path / "absent.json"), None, "resenc_m", None)
    not_plans = tmp_path / "other.json"
    not_plans.write_text(json.dumps({"name": "x"}))
    with pytest.raises(PlanningError, match="is not an nnU-Net plans file"):
        _plans_file_and_name(str(not_plans), None, "resenc_m", None)
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps({"plans_name": "siteAPlans", "configurations": {}}))
    assert _plans_file_and_name(str(plans), None, "resenc_m", None) == (plans.resolve(), "siteAPlans")
    assert _plans_file_and_name(plans, "kept", "resenc_m", None) == (plans.resolve(), "kept")


def _model_folder(root: Path, folds: dict[str, list[str]]) -> Path:
    model = root / f"{SEG_TRAINER}__p__{SEGMENTATION_CONFIGURATION}"
    for fold, checkpoints in folds.items():
        (model / f"fold_{fold}").mkdir(parents=True)
        for name in checkpoints:
            (model / f"fold_{fold}" / name).write_bytes(b"x")
    (model / "plans.json").write_text("{}")
    (model / "dataset.json").write_text("{}")
    return model


def test_segmentation_model_folder_and_folds_to_use(tmp_path: Path) -> None:
    from orthodiff_nnunet.segmentation import SegmentationError, _folds_to_use, _resolve_model_folder

    model = _model_folder(tmp_path, {"0": ["checkpoint_final.pth"], "1": ["checkpoint_final.pth"],
                                     "2": ["checkpoint_latest.pth"]})
    # a fold folder stands for its model folder and that fold; given folds win
    assert _resolve_model_folder(model / "fold_1", None) == (model, ["1"])
    assert _resolve_model_folder(model / "fold_1", [0]) == (model, [0])
    with pytest.raises(SegmentationError, match=rf"is not a model folder but holds 1: pass -m .*__{SEGMENTATION_CONFIGURATION}"):
        _resolve_model_folder(tmp_path, None)
    assert _folds_to_use(model, None, "checkpoint_final.pth") == ["0", "1"]  # every fold with the checkpoint
    assert _folds_to_use(model, [1], "checkpoint_final.pth") == ["1"]
    with pytest.raises(SegmentationError, match=r"no checkpoint_final.pth for fold\(s\) 2 .*--checkpoint "
                                                r"checkpoint_latest.pth"):
        _folds_to_use(model, [2], "checkpoint_final.pth")


def test_classification_run_folder_and_resume_refusals(tmp_path: Path, monkeypatch) -> None:
    from orthodiff_nnunet.classification import ClassificationUsageError, _refuse_unasked_resume, _run_folder

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    views = {"sag": "Dataset501_KneeSag", "ax": "Dataset503_KneeAx"}
    vds = {"sag": SimpleNamespace(plans_identifier="p"), "ax": SimpleNamespace(plans_identifier="p")}
    cfg = CLASSIFICATION_CONFIGURATION
    base = tmp_path / "res" / "Dataset501_KneeSag" / f"{CLS_TRAINER}__p__{cfg}"
    assert _run_folder(None, None, views, vds, cfg, "finetune", 1.0, {}, 0) == \
        base / "sag-ax_finetune" / "fold_0"
    assert _run_folder(None, None, views, vds, cfg, "probe", 0.25, {"sag": 0, "ax": 200}, "all") == \
        base / "sag-ax_probe_lf0.25_t0-200" / "fold_all"
    assert _run_folder(None, "mine", views, vds, cfg, "probe", 0.25, {}, 1) == base / "mine" / "fold_1"
    assert _run_folder(tmp_path / "x", "mine", views, vds, cfg, "probe", 1.0, {}, 1) == tmp_path / "x"

    out = tmp_path / "run"
    out.mkdir()
    assert _refuse_unasked_resume(out, resume=False) == out / "checkpoint_latest.pth"
    (out / "checkpoint_latest.pth").write_bytes(b"x")
    with pytest.raises(ClassificationUsageError, match="holds an unfinished run: pass --resume"):
        _refuse_unasked_resume(out, resume=False)
    (out / "checkpoint_final.pth").write_bytes(b"x")
    with pytest.raises(ClassificationUsageError, match="already holds a finished run"):
        _refuse_unasked_resume(out, resume=False)
    assert _refuse_unasked_resume(out, resume=True) == out / "checkpoint_latest.pth"
