"""The CLI layer (``orthodiff_nnunet.cli``): it parses, the stage modules' typed API functions orchestrate.

What the split exposes: the one mapping from a parsed command line onto an API function
(:func:`orthodiff_nnunet.cli.options.api_arguments`), each command's renamed and negated options
(``--lr`` -> ``learning_rate``, ``--no-validation`` -> ``validate=False``), ``--help`` without torch,
the stage modules' own ``main`` entry points, the environment restored after a stage, and the
``orthodiff_nnunet.cli`` package in the wheel.

The mapping tests put a recorder in place of the stage function (our own, never nnunetv2's): it
checks that the keyword arguments bind to the real function's signature and keeps them, so the test
reads what the command line passes without minutes of training. The stages themselves run in
their own tests (test_segmentation, test_classification, test_pretraining, test_planning ...).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from orthodiff_nnunet.cli import build_parser, main
from orthodiff_nnunet.cli.options import api_arguments

REPO = Path(__file__).resolve().parents[1]


class _Recorder:
    """Stands in for a stage function: binds the call to ``real``'s signature and keeps the arguments."""

    def __init__(self, real, result=None):
        self.real, self.calls = real, []
        self.result = result or SimpleNamespace(summary=lambda: "recorded", load_report=None)
        self.__signature__ = inspect.signature(real)  # api_arguments reads the real parameters

    def __call__(self, *args, **kwargs):
        bound = self.__signature__.bind(*args, **kwargs)  # TypeError on a wrong or missing argument
        self.calls.append(dict(bound.arguments))
        return self.result


def _record(monkeypatch, module, name: str) -> _Recorder:
    recorder = _Recorder(getattr(module, name))
    monkeypatch.setattr(module, name, recorder)
    return recorder


def test_api_arguments_passes_same_named_options_and_the_renamed_ones():
    def stage(dataset, *, learning_rate: float = 1.0, validate: bool = True, seed: int = 0, quiet: bool = False):
        return dataset, learning_rate, validate, seed, quiet

    args = build_parser().parse_args(["train", "seg", "-d", "501", "--lr", "0.5", "--no-validation", "--seed", "7"])
    kwargs = api_arguments(stage, args, learning_rate=args.lr, validate=not args.no_validation)
    # same-named options pass unchanged; options the stage lacks (fold, init, ...) are not passed
    assert kwargs == {"dataset": "501", "seed": 7, "learning_rate": 0.5, "validate": False}
    with pytest.raises(TypeError, match="stage has no parameter learning_rat"):
        api_arguments(stage, args, learning_rat=args.lr)


def test_train_seg_maps_renamed_and_negated_options(monkeypatch, capsys):
    import orthodiff_nnunet.cli.segmentation as cli_seg

    rec = _record(monkeypatch, cli_seg, "train_segmentation")
    assert main(["train", "seg", "-d", "501", "--orientation", "cor", "-f", "all", "--lr", "0.02", "--val-iterations",
                 "3", "--no-validation", "--no-validation-mirroring", "--continue", "--seed", "9", "-v"]) == 0
    (kw,) = rec.calls
    assert kw["dataset"] == "501" and kw["orientation"] == "cor" and kw["fold"] == "all" and kw["seed"] == 9
    assert kw["learning_rate"] == 0.02 and kw["val_iterations_per_epoch"] == 3
    assert kw["validate"] is False and kw["validation_mirroring"] is False and kw["continue_training"] is True
    assert kw["quiet"] is False  # -v: nnU-Net's lines on the console
    assert capsys.readouterr().out.strip() == "recorded"
    main(["train", "seg", "-d", "501"])
    defaults = rec.calls[1]
    # no --lr: the API picks the optimizer's default (nnU-Net's 1e-2 for its SGD, the default optimizer)
    assert defaults["quiet"] is True and defaults["validate"] is True and defaults["learning_rate"] is None
    assert defaults["optimizer"] == inspect.signature(rec.real).parameters["optimizer"].default == "sgd"
    main(["train", "seg", "-d", "501", "--optimizer", "adamw"])
    assert rec.calls[2]["optimizer"] == "adamw" and rec.calls[2]["learning_rate"] is None
    assert defaults["seed"] == inspect.signature(rec.real).parameters["seed"].default  # CLI and API agree


def test_train_and_predict_cls_map_dataset_groups_and_views(monkeypatch, tmp_path):
    import orthodiff_nnunet.cli.classification as cli_cls

    train = _record(monkeypatch, cli_cls, "train_classification")
    assert main(["train", "cls", "-d", "501", "--encoder", "sag=a.pt", "--no-film", "--no-augment", "--lr", "0.01",
                 "--test-fold", "none", "-f", "all"]) == 0
    assert main(["train", "cls", "-d", "501", "502"]) == 0
    one, two = train.calls
    assert one["dataset"] == "501" and two["dataset"] == ["501", "502"]  # one id: the group; several: one per view
    assert one["encoders"] == ["sag=a.pt"] and one["film"] is False and one["augment"] is False
    assert one["learning_rate"] == 0.01 and one["test_fold"] is None and one["fold"] == "all"
    assert two["test_fold"] == "auto" and two["film"] is True and two["quiet"] is True

    predict = _record(monkeypatch, cli_cls, "predict_classification")
    out = tmp_path / "p.csv"
    assert main(["predict", "cls", "-m", str(tmp_path), "-d", "511", "-o", str(out), "--n-boot", "10"]) == 0
    (kw,) = predict.calls
    assert kw == {"model_folder": tmp_path, "dataset": "511", "output": out, "checkpoint": "best", "device": "auto",
                  "batch_size": None, "n_boot": 10}


def test_pretrain_maps_case_lists_folds_and_mask_blocks(monkeypatch, tmp_path):
    import orthodiff_nnunet.pretraining as pretraining

    rec = _record(monkeypatch, pretraining, "pretrain")
    cases = tmp_path / "cases.txt"
    cases.write_text("case_b\n\ncase_c\n")
    assert main(["pretrain", "-d", "521", "--objective", "mae", "--mask-block", "4", "2", "2", "--lr", "0.001",
                 "--exclude-cases", "case_a", f"@{cases}", "--exclude-fold", "1", "2", "--seed", "3"]) == 0
    assert main(["pretrain", "-d", "521", "--objective", "mae", "--mask-block", "4"]) == 0
    kw, single = rec.calls
    assert kw["mask_block"] == (4, 2, 2) and single["mask_block"] == 4
    assert kw["exclude_cases"] == ["case_a", "case_b", "case_c"] and kw["exclude_folds"] == [1, 2]
    assert kw["learning_rate"] == 0.001 and kw["seed"] == 3 and kw["objective"] == "mae"
    # validated before anything is loaded: a mask ratio outside (0, 1) never reaches the stage
    assert main(["pretrain", "-d", "521", "--objective", "mae", "--mask-ratio", "1.5"]) == 2
    assert len(rec.calls) == 2


def test_plan_and_demo_map_their_negations_and_renames(monkeypatch, capsys):
    import orthodiff_nnunet.api as api
    import orthodiff_nnunet.cli.planning as cli_planning

    plan = _record(monkeypatch, cli_planning, "plan_and_preprocess")
    assert main(["plan_and_preprocess", "-d", "501", "502", "--no-preprocess", "--verify", "--no-progress",
                 "-c", "3d_fullres", "2d"]) == 0
    (kw,) = plan.calls
    assert kw["dataset_ids"] == ["501", "502"] and kw["configurations"] == ["3d_fullres", "2d"]
    assert kw["preprocess"] is False and kw["verify_dataset_integrity"] is True and kw["show_progress"] is False

    demo = _record(monkeypatch, api, "demo")
    assert main(["demo", "--cases", "4", "--external-cases", "5", "--quick", "-o", "work"]) == 0
    (kw,) = demo.calls
    assert kw["cases_per_site"] == 4 and kw["external_cases"] == 5 and kw["quick"] is True and kw["output"] == Path("work")
    assert kw["verbose"] is False
    kw["write"]("stage line")
    assert capsys.readouterr().out.endswith("stage line\n")
    assert main(["-v", "demo"]) == 0 and demo.calls[1]["verbose"] is True  # orthodiff -v demo: verbose too


def test_convert_reaches_the_converter_with_its_renamed_options(monkeypatch):
    import orthodiff_nnunet.api as api
    from orthodiff_nnunet.dataset_conversion.site_converter import convert_site

    assert api.convert is convert_site  # one parameter list, the converter's
    rec = _record(monkeypatch, api, "convert")
    assert main(["convert", "m.csv", "-d", "601", "-n", "SiteA", "--labels", "ACL, MENI,", "--folds", "3",
                 "--max-obliquity", "20", "--lock-timeout", "0", "--dry-run"]) == 0
    (kw,) = rec.calls
    assert kw["manifest"] == Path("m.csv") and kw["dataset_id"] == 601 and kw["name"] == "SiteA"
    assert kw["abnormality_labels"] == ["ACL", "MENI"] and kw["num_folds"] == 3
    assert kw["max_obliquity_deg"] == 20.0 and kw["lock_timeout_s"] == 0.0 and kw["dry_run"] is True


def test_help_builds_every_parser_without_torch_or_nnunetv2():
    code = ("import sys; from orthodiff_nnunet.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'nnunetv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stage_module_mains_run_the_cli(tmp_path, capsys):
    from orthodiff_nnunet.classification import main as cls_main
    from orthodiff_nnunet.planning import main as planning_main

    assert planning_main(["-d", "501", "-np", "0", "--raw", str(tmp_path), "--preprocessed", str(tmp_path)]) == 2
    assert "plan_and_preprocess: error: -np must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cls_main(["train", "cls", "-d", "501", "--test-fold", "x"])
    assert exit_.value.code == 2 and "give auto, none or a fold number" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "orthodiff_nnunet.planning", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("usage: python -m orthodiff_nnunet.planning") and "--plans-from" in out


def test_environment_is_restored_after_a_stage(monkeypatch):
    from orthodiff_nnunet.segmentation import _environment

    monkeypatch.setenv("ORTHODIFF_TEST_KEPT", "before")
    monkeypatch.delenv("ORTHODIFF_TEST_NEW", raising=False)
    with pytest.raises(RuntimeError):
        with _environment(ORTHODIFF_TEST_KEPT="during", ORTHODIFF_TEST_NEW="during"):
            assert os.environ["ORTHODIFF_TEST_KEPT"] == os.environ["ORTHODIFF_TEST_NEW"] == "during"
            raise RuntimeError("a stage failed")
    assert os.environ["ORTHODIFF_TEST_KEPT"] == "before" and "ORTHODIFF_TEST_NEW" not in os.environ


def test_wheel_lists_every_package_folder():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "orthodiff_nnunet").rglob("__init__.py")}
    assert "orthodiff_nnunet.cli" in folders
    assert folders <= listed, f"add {sorted(folders - listed)} to [tool.setuptools] packages in pyproject.toml"
