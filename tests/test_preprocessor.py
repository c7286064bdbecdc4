"""nnU-Net's own preprocessing entry resumes on plans naming ``OrthodiffPreprocessor``.

``nnunetv2.experiment_planning.plan_and_preprocess_api.preprocess`` (what ``nnUNetv2_preprocess``
runs) looks the plans' ``preprocessor_name`` up among nnunetv2's modules; inside
``nnunet_finds_orthodiff_preprocessor`` it finds ours, which skips completed cases, clears a
half-written one, preprocesses a shared data identifier once, holds the dataset lock, and makes
the same arrays as ``orthodiff plan_and_preprocess`` (nnU-Net's ``run_case_save``).

A tiny synthetic sagittal dataset (3 cases, the one of tests/test_plans_and_resume.py), plain
planner, CPU only.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from test_plans_and_resume import make_sag_dataset

PLAIN = "orthodiffPlans"
DATASET = "Dataset521_ResumeSag"
DATA = f"{PLAIN}_3d_fullres"
CASES = ["resume_000", "resume_001", "resume_002"]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """Dataset 521 planned and preprocessed once by ``plan_and_preprocess`` (the reference arrays);
    each test works on its own copy."""
    from orthodiff_nnunet.planning import plan_and_preprocess

    root = tmp_path_factory.mktemp("golden_preprocessor")
    make_sag_dataset(root / "raw", 521, "Resume", n_cases=3, tp=2.0, ip=0.6, shape_ip=(40, 32), seed=4)
    with pytest.MonkeyPatch.context() as mp:  # plan_and_preprocess exports nnU-Net's paths: restored after
        mp.setenv("nnUNet_raw", str(root / "raw"))
        mp.setenv("nnUNet_preprocessed", str(root / "pre"))
        plan_and_preprocess([521], num_processes=1, raw=root / "raw", preprocessed=root / "pre", planner="plain",
                            show_progress=False)
    return root


def _copy(golden: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's raw and preprocessed folders, nnU-Net's paths pointing at them (for this test only);
    returns the dataset's preprocessed folder."""
    for sub in ("raw", "pre"):
        shutil.copytree(golden / sub, tmp_path / sub)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    return tmp_path / "pre" / DATASET


def _name_our_preprocessor(folder: Path) -> dict:
    """The plans as a user switches them to the resumable preprocessor (every configuration that names one)."""
    plans_file = folder / f"{PLAIN}.json"
    plans = json.loads(plans_file.read_text())
    named = [c for c in plans["configurations"].values() if "preprocessor_name" in c]
    assert named, "the planner wrote no preprocessor_name"
    for c in named:
        c["preprocessor_name"] = "OrthodiffPreprocessor"
    plans_file.write_text(json.dumps(plans, indent=2))
    return plans


def _arrays(data: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    ds = nnUNetDatasetBlosc2(str(data))
    out = {}
    for k in CASES:
        d, s, _, props = ds.load_case(k)
        out[k] = (np.asarray(d[:]), np.asarray(s[:]), props)
    return out


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) == CASES
    for k in CASES:
        np.testing.assert_array_equal(a[k][0], b[k][0])
        np.testing.assert_array_equal(a[k][1], b[k][1])
        assert sorted(a[k][2]) == sorted(b[k][2])
        for key in ("spacing", "shape_before_cropping", "bbox_used_for_cropping"):
            assert np.array_equal(np.asarray(a[k][2][key]), np.asarray(b[k][2][key])), (k, key)
        for label, locs in a[k][2]["class_locations"].items():
            np.testing.assert_array_equal(locs, b[k][2]["class_locations"][label])


def _nnunet_preprocess(configurations: list[str]) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

    from orthodiff_nnunet.preprocessing import nnunet_finds_orthodiff_preprocessor

    with nnunet_finds_orthodiff_preprocessor():
        preprocess([521], PLAIN, configurations=configurations, num_processes=[1], show_progress_bar=False)


def test_nnunet_lookup_finds_ours_only_inside_the_context():
    """nnU-Net's lookup by name, the reason the planners keep writing DefaultPreprocessor."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from orthodiff_nnunet.preprocessing import OrthodiffPreprocessor, nnunet_finds_orthodiff_preprocessor

    def lookup(name: str):  # a new manager each time: nnU-Net caches the lookup per manager
        return ConfigurationManager({"architecture": {}, "preprocessor_name": name}).preprocessor_class

    assert lookup("OrthodiffPreprocessor") is None  # a fresh nnUNetv2_preprocess/_predict process
    with nnunet_finds_orthodiff_preprocessor():
        with nnunet_finds_orthodiff_preprocessor():  # nested: the outer one keeps it
            assert lookup("OrthodiffPreprocessor") is OrthodiffPreprocessor
        assert lookup("OrthodiffPreprocessor") is OrthodiffPreprocessor
        assert lookup("DefaultPreprocessor") is DefaultPreprocessor
    assert lookup("OrthodiffPreprocessor") is None
    assert issubclass(OrthodiffPreprocessor, DefaultPreprocessor)


def test_nnunet_preprocess_resumes_an_interrupted_run(golden, tmp_path, monkeypatch, caplog):
    """Run nnU-Net's entry on plans naming OrthodiffPreprocessor, leave its data as a run killed in the
    second case leaves it, rerun: the finished case is kept (same file, same modification time), the
    half-written and the missing one are redone, and every array equals plan_and_preprocess's."""
    from orthodiff_nnunet.preprocessing import PreprocessedDataError, check_preprocessed_data, progress_record_path

    folder = _copy(golden, tmp_path, monkeypatch)
    data = folder / DATA
    reference = _arrays(data)  # plan_and_preprocess, plans naming DefaultPreprocessor
    plans = _name_our_preprocessor(folder)

    # uninterrupted: the name enters the preprocessing hash, so the whole folder is made again, once for the
    # two configurations that share it
    caplog.set_level(logging.INFO, logger="orthodiff_nnunet")
    _nnunet_preprocess(["3d_fullres", "3d_diffusion"])
    runs = [r.getMessage() for r in caplog.records if "preprocessed now" in r.getMessage()]
    assert runs == [f"{DATASET}: 3d_fullres: 3 cases, 3 preprocessed now, 0 already done",
                    f"{DATASET}: 3d_diffusion: 3 cases, 0 preprocessed now, 3 already done"]
    _same(_arrays(data), reference)
    assert check_preprocessed_data(folder, plans, "3d_diffusion") == data

    # killed in the second case: the record lists the first only, the second is half-written, the third absent
    stamp_file = progress_record_path(folder, DATA)
    stamp = json.loads(stamp_file.read_text())
    stamp_file.write_text(json.dumps({**stamp, "done": CASES[:1]}))
    (data / f"{CASES[1]}_seg.b2nd").unlink()
    (data / f"{CASES[1]}.pkl").unlink()
    for f in data.glob(f"{CASES[2]}*"):
        f.unlink()
    kept = {f.name: f.stat().st_mtime_ns for f in data.glob(f"{CASES[0]}*")}
    assert len(kept) == 3
    with pytest.raises(PreprocessedDataError, match="is incomplete: 1 of 3 cases preprocessed"):
        check_preprocessed_data(folder, plans, "3d_fullres")

    caplog.clear()
    _nnunet_preprocess(["3d_fullres"])
    runs = [r.getMessage() for r in caplog.records if "preprocessed now" in r.getMessage()]
    assert runs == [f"{DATASET}: 3d_fullres: 3 cases, 2 preprocessed now, 1 already done"]
    assert {f.name: f.stat().st_mtime_ns for f in data.glob(f"{CASES[0]}*")} == kept  # not redone
    assert sorted(p.name for p in data.iterdir()) == sorted(f"{k}{s}" for k in CASES
                                                             for s in (".b2nd", "_seg.b2nd", ".pkl"))
    _same(_arrays(data), reference)
    assert json.loads(stamp_file.read_text())["done"] == CASES
    assert check_preprocessed_data(folder, plans, "3d_fullres") == data
    assert sorted(p.name for p in (folder / "gt_segmentations").iterdir()) == [f"{k}.nii.gz" for k in CASES]


def test_nnunet_preprocess_is_refused_while_plan_and_preprocess_runs(golden, tmp_path, monkeypatch):
    """The dataset lock of plan_and_preprocess holds nnU-Net's entry off too: refused, nothing touched."""
    from filelock import FileLock

    from orthodiff_nnunet.preprocessing import PlanningError

    folder = _copy(golden, tmp_path, monkeypatch)
    _name_our_preprocessor(folder)
    before = {p.name: p.stat().st_mtime_ns for p in (folder / DATA).iterdir()}
    lock = FileLock(str(folder / ".orthodiff_plan_and_preprocess.lock"))
    lock.acquire()
    try:
        with pytest.raises(PlanningError, match="another plan_and_preprocess is running on"):
            _nnunet_preprocess(["3d_fullres"])
    finally:
        lock.release()
    assert {p.name: p.stat().st_mtime_ns for p in (folder / DATA).iterdir()} == before
