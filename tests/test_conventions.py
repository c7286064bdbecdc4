"""The names stages share live in ``orthodiff_nnunet.conventions`` and nowhere else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orthodiff_nnunet import conventions as cv

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("orthodiff_nnunet", "planners", "trainers", "dataset_conversion")


def test_trainer_classes_carry_the_conventional_names():
    """nnU-Net finds model folders by the trainer's class name: a renamed class must fail here."""
    from orthodiff_nnunet.trainers.classification import nnUNetTrainerOrthoDiffCls
    from orthodiff_nnunet.trainers.diffusion_pretraining import nnUNetTrainerOrthoDiffPretrain
    from orthodiff_nnunet.trainers.mae_pretraining import nnUNetTrainerOrthoDiffMAE
    from orthodiff_nnunet.trainers.segmentation import nnUNetTrainerOrthoDiffSeg, nnUNetTrainerOrthoDiffSegScratch

    assert nnUNetTrainerOrthoDiffPretrain.__name__ == cv.PRETRAIN_TRAINER
    assert nnUNetTrainerOrthoDiffMAE.__name__ == cv.MAE_TRAINER
    assert nnUNetTrainerOrthoDiffSeg.__name__ == cv.SEG_TRAINER
    assert nnUNetTrainerOrthoDiffSegScratch.__name__ == cv.SEG_SCRATCH_TRAINER
    assert nnUNetTrainerOrthoDiffCls.__name__ == cv.CLS_TRAINER
    assert set(cv.SEG_TRAINER_OF_INIT) == {"diffusion", "scratch"}


def test_planners_write_the_conventional_plans_names():
    import inspect

    from orthodiff_nnunet.planners.orthodiff_planner import OrthodiffPlainPlanner, OrthodiffResEncMPlanner
    from orthodiff_nnunet.planning import PLANNERS

    for cls, name in ((OrthodiffResEncMPlanner, cv.RESENC_M_PLANS), (OrthodiffPlainPlanner, cv.PLAIN_PLANS)):
        assert inspect.signature(cls.__init__).parameters["plans_name"].default == name
    assert {ident for _, ident, _ in PLANNERS.values()} == set(cv.DEFAULT_PLANS_ORDER)


def test_default_encoder_path_is_nnunets_pretraining_fold(tmp_path):
    path = cv.default_encoder_path("Dataset501_KneeSag", cv.RESENC_M_PLANS, tmp_path)
    assert path == (tmp_path / "Dataset501_KneeSag" / "nnUNetTrainerOrthoDiffPretrain__orthodiffResEncMPlans__3d_diffusion"
                    / "fold_all" / "encoder.pt")


def test_default_encoder_path_reads_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    assert cv.default_encoder_path("D", "P").parent.parent.parent == tmp_path / "D"


def test_find_plans_prefers_resenc_and_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    folder = tmp_path / "Dataset501_KneeSag"
    folder.mkdir()
    with pytest.raises(cv.OrthodiffError, match="orthodiff plan_and_preprocess -d Dataset501_KneeSag"):
        cv.find_plans("Dataset501_KneeSag")
    (folder / "orthodiffPlans.json").write_text('{"plans_name": "plain"}')
    assert cv.find_plans("Dataset501_KneeSag") == ("orthodiffPlans", {"plans_name": "plain"})
    (folder / "orthodiffResEncMPlans.json").write_text('{"plans_name": "resenc"}')
    assert cv.find_plans("Dataset501_KneeSag")[0] == "orthodiffResEncMPlans"
    assert cv.find_plans("Dataset501_KneeSag", "orthodiffPlans")[0] == "orthodiffPlans"


def test_resolve_device_refuses_cuda_without_a_gpu():
    import torch

    assert cv.resolve_device("cpu").type == "cpu"
    assert cv.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(cv.OrthodiffError, match="--device cpu"):
            cv.resolve_device("cuda")


def _shared_names() -> dict[str, str]:
    names = {k: v for k, v in vars(cv).items() if k.isupper() and isinstance(v, str) and k != "PRETRAIN_FOLD"}
    assert len(names) >= 15
    return names


def test_no_module_spells_a_shared_name_again():
    """A quoted trainer, configuration, plans or record name outside conventions.py is a second source of truth.

    Docstrings and comments may name them (they are documentation); code may not.
    """
    import ast

    wanted = set(_shared_names().values())
    offenders = []
    for d in PACKAGE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            if path.name == "conventions.py":
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                          if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                          and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                        and node.value in wanted):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not offenders, "use orthodiff_nnunet.conventions instead of:\n" + "\n".join(offenders)


def test_the_names_have_nnunets_shape():
    assert re.fullmatch(r"3d_\w+", cv.DIFFUSION_CONFIGURATION) and cv.SEGMENTATION_CONFIGURATION == "3d_fullres"
    assert all(n.startswith("nnUNetTrainer") for n in
               (cv.PRETRAIN_TRAINER, cv.MAE_TRAINER, cv.SEG_TRAINER, cv.SEG_SCRATCH_TRAINER, cv.CLS_TRAINER))
