"""A downstream test exam must not have been seen by pretraining unless the user accepts it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

from orthodiff_nnunet.classification import default_test_folds
from orthodiff_nnunet.data.targets import Exam
from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.pretraining import fold_cases
from orthodiff_nnunet.data.exam_loaders import ExamSplit
from orthodiff_nnunet.errors import ClassificationError
from orthodiff_nnunet.trainers.classification import nnUNetTrainerOrthoDiffCls


def _encoder(path: Path, train_cases: list[str] | None) -> Path:
    """A real (tiny) U-Net's encoder exported with the given provenance."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from orthodiff_nnunet.networks.encoder_io import export_encoder

    net = PlainConvUNet(1, 2, [2, 4], torch.nn.Conv3d, 3, [1, 2], 1, 2, 1)
    prov = {"architecture_hash": "h", "dataset": "Dataset900_X"}
    if train_cases is not None:
        prov["train_cases"] = train_cases
    return export_encoder(net, path, prov)


def _trainer(tmp_path: Path, encoders: dict[str, Path], allow: bool) -> nnUNetTrainerOrthoDiffCls:
    """The real trainer class with only what the check reads (building one needs preprocessed data)."""
    t = nnUNetTrainerOrthoDiffCls.__new__(nnUNetTrainerOrthoDiffCls)
    t.encoder_paths = encoders
    t.allow_pretraining_overlap = allow
    t.pretraining_overlap = {}
    t.views = {"sag": SimpleNamespace(dataset_name="Dataset900_X")}
    y = np.zeros(1, dtype=np.float32)
    t.exams_test = [Exam("E1", {"sag": "X_001"}, y), Exam("E2", {"sag": "X_002"}, y), Exam("E3", {"cor": "Y_003"}, y)]
    t.split = ExamSplit(("E9",), ("E8",), ("E1", "E2", "E3"), "fold 0 validation", "fold 1 validation")
    return t


def test_encoder_that_saw_a_test_exam_is_refused_unless_accepted(tmp_path: Path) -> None:
    seen = _encoder(tmp_path / "seen.pt", ["X_001", "X_005", "X_006"])
    t = _trainer(tmp_path, {"sag": seen}, allow=False)
    with pytest.raises(ClassificationError, match=r"pretrained on scans of 1 of the 3 test exams.*exam E1.*"
                                                  r"--exclude-fold.*--allow-pretraining-overlap"):
        t._check_pretraining_overlap()

    accepted = _trainer(tmp_path, {"sag": seen}, allow=True)
    accepted._check_pretraining_overlap()
    assert accepted.pretraining_overlap == {"sag": 1}  # recorded in classifier.json

    clean = _trainer(tmp_path, {"sag": _encoder(tmp_path / "clean.pt", ["X_005", "X_006"])}, allow=False)
    clean._check_pretraining_overlap()
    assert clean.pretraining_overlap == {"sag": 0}

    unknown = _trainer(tmp_path, {"sag": _encoder(tmp_path / "old.pt", None)}, allow=False)
    unknown._check_pretraining_overlap()  # an encoder without its case list: warned, not refused
    assert unknown.pretraining_overlap == {}


def test_exclude_fold_reads_the_splits_and_default_test_folds(tmp_path: Path) -> None:
    pre = tmp_path / "pre"
    (pre / "Dataset900_X").mkdir(parents=True)
    splits = [{"train": ["b", "c"], "val": ["a"]}, {"train": ["a", "c"], "val": ["b"]}, {"train": ["a", "b"], "val": ["c", "d"]}]
    (pre / "Dataset900_X" / "splits_final.json").write_text(json.dumps(splits))
    with mock.patch.dict(os.environ, {"nnUNet_preprocessed": str(pre)}):
        assert fold_cases("Dataset900_X", [2]) == ["c", "d"]
        assert fold_cases("Dataset900_X", [0, 2]) == ["a", "c", "d"]
        assert fold_cases("Dataset900_X", []) == []
        with pytest.raises(OrthodiffError, match=r"--exclude-fold 3: .* has folds 0\.\.2"):
            fold_cases("Dataset900_X", [3])
        with pytest.raises(OrthodiffError, match="splits_final.json does not exist.*--exclude-cases"):
            fold_cases("Dataset901_Y", [0])
    # train cls --fold k --test-fold auto tests on fold k+1 (3+ folds) or on half of fold k (2 folds)
    assert default_test_folds(5, 0) == [1] and default_test_folds(5, 4) == [0]
    assert default_test_folds(2, 1) == [1] and default_test_folds(1, 0) == []
