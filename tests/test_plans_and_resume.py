"""Each plans file owns its preprocessed data; trainers refuse data of other plans; a killed run loses
little: plans transferred or copied under another name get their own data folder, another run's plans
are used from a plans file alone, stale temporaries of a killed plan_and_preprocess are cleaned (never
a live run's), and a SIGKILLed segmentation run continues from a checkpoint written minutes, not 50
epochs, before.

Tiny synthetic sagittal datasets in the canonical LPS layout (numpy z=S, y=P, x=L; slices on axis 2),
planned with the plain planner; CPU only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk

from orthodiff_nnunet.plans import own_data_identifiers, preprocessing_hash, resolve_configuration

PLAIN = "orthodiffPlans"


@pytest.fixture(autouse=True)
def _restore_nnunet_env():
    """plan_and_preprocess exports nnUNet_raw/preprocessed; do not leak them into other tests."""
    with mock.patch.dict(os.environ):
        yield


def make_sag_dataset(raw: Path, dataset_id: int, name: str, *, n_cases: int = 3, tp: float = 3.0,
                     ip: float = 0.8, shape_ip: tuple[int, int] = (40, 32), slices: int = 10, seed: int = 0) -> Path:
    """A labeled sagittal raw dataset as `orthodiff convert` writes it (two-structure ellipsoid phantoms)."""
    rng = np.random.default_rng(seed)
    folder = raw / f"Dataset{dataset_id:03d}_{name}Sag"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)
    shape, spacing = (*shape_ip, slices), (ip, ip, tp)  # numpy (z, y, x): slices along x for sagittal
    grid = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    r = np.sqrt(sum((g / (0.3 * n * s)) ** 2 for g, n, s in zip(grid, shape, spacing)))
    cases = []
    for i in range(n_cases):
        lab = ((r < 1).astype(np.uint8) + (r < 0.5)).astype(np.uint8)
        img = (np.abs(rng.normal(20, 5, shape)) + 200 * (r < 1) + 100 * (r < 0.5)).astype(np.float32)
        case = f"{name.lower()}_{i:03d}"
        for arr, path in ((img, folder / "imagesTr" / f"{case}_0000.nii.gz"),
                          (lab, folder / "labelsTr" / f"{case}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(spacing[::-1])
            sitk.WriteImage(im, str(path))
        cases.append(case)
    block = {"orientation": "sag", "through_plane_numpy_axis": 2, "layout": "LPS", "name": name,
             "base_dataset_id": dataset_id, "external": False, "sites": ["SiteA"], "abnormality_labels": ["ACL"],
             "targets_file": "orthodiff_targets.json", "num_labeled": n_cases, "num_unlabeled": 0}
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "femur": 1, "tibia": 2},
        "numTraining": n_cases, "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO",
        "name": folder.name[11:], "orthodiff": block}))
    (folder / "splits_final.json").write_text(json.dumps([{"train": cases[:-1], "val": cases[-1:]}]))
    return folder


SITE = "Dataset511_SiteBSag"


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """Dataset511_SiteBSag (3 cases, 2 mm slices, 0.6 mm pixels) converted and planned once (plain planner);
    tests work on their own copies (:func:`_copy`), so none depends on another."""
    root = tmp_path_factory.mktemp("golden")
    with mock.patch.dict(os.environ):
        make_sag_dataset(root / "raw", 511, "SiteB", tp=2.0, ip=0.6, shape_ip=(44, 36), seed=2)
        _plan([511], root / "raw", root / "pre")
    return root


def _copy(golden: Path, tmp_path: Path) -> tuple[Path, Path]:
    """This test's own raw and preprocessed folders (modification times kept: the fingerprint is reused)."""
    for sub in ("raw", "pre"):
        shutil.copytree(golden / sub, tmp_path / sub)
    return tmp_path / "raw", tmp_path / "pre"


def _plan(ids, raw, pre, **kw):
    from orthodiff_nnunet.planning import plan_and_preprocess

    kw.setdefault("planner", "plain")
    return plan_and_preprocess(ids, num_processes=1, raw=raw, preprocessed=pre, show_progress=False, **kw)


def _data_id(plans: dict) -> str:
    return resolve_configuration(plans, "3d_fullres")["data_identifier"]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# -- pure -----------------------------------------------------------------------------------------

def test_own_data_identifiers_renames_the_plans_prefix_like_nnunet():
    plans = {"plans_name": "orthodiffResEncMPlans", "configurations": {
        "3d_fullres": {"data_identifier": "orthodiffResEncMPlans_3d_fullres", "spacing": [3, 1, 1]},
        "3d_diffusion": {"inherits_from": "3d_fullres"},
        "2d": {"data_identifier": "nnUNetPlans_2d"},
        "3d_other": {"data_identifier": "orthodiffResEncMPlans_3d_fullres"},
        "3d_custom": {"data_identifier": "myData"}}}
    out = own_data_identifiers(plans, "siteAPlans")
    assert out["plans_name"] == "siteAPlans"
    ids = {k: c.get("data_identifier") for k, c in out["configurations"].items()}
    assert ids == {"3d_fullres": "siteAPlans_3d_fullres", "3d_diffusion": None, "2d": "siteAPlans_2d",
                   "3d_other": "siteAPlans_3d_fullres",  # a shared folder stays shared
                   "3d_custom": "siteAPlans_myData"}
    assert plans["configurations"]["3d_fullres"]["data_identifier"] == "orthodiffResEncMPlans_3d_fullres"  # a copy
    assert own_data_identifiers(out, "siteAPlans") == out  # already owned: unchanged


# -- two plans, one dataset -------------------------------------------------------------------------

def test_plans_under_another_name_get_their_own_data_folder(golden, tmp_path):
    """Another run's plans transferred from a plans file under another name, and a plans file copied
    under another name (the nnU-Net way to make custom plans): each gets its own data folder, the
    dataset's own plans and data stay as they were, and the other run's raw/preprocessed folders are
    not needed."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from orthodiff_nnunet.planning import PlanningError, check_preprocessed_data

    raw, pre = _copy(golden, tmp_path)
    b = SITE
    own = json.loads((pre / b / f"{PLAIN}.json").read_text())
    own_data = pre / b / _data_id(own)
    before = _snapshot(own_data)
    stamp = json.loads((pre / b / f".{own_data.name}.orthodiff_progress.json").read_text())
    assert (own_data.name, stamp["plans_name"], stamp["cases"], len(stamp["done"])) == \
        (f"{PLAIN}_3d_fullres", PLAIN, 3, 3)

    # another run's plans (same name, 3 mm slices, 0.8 mm pixels) of its sagittal dataset 501
    a = make_sag_dataset(raw, 501, "RunA", seed=1).name
    theirs_src = json.loads(json.dumps(own))
    theirs_src["dataset_name"] = a
    theirs_src["orthodiff"]["source_datasets"] = [a]
    theirs_src["configurations"]["3d_fullres"]["spacing"] = [3.0, 0.8, 0.8]
    (pre / a).mkdir()
    (pre / a / f"{PLAIN}.json").write_text(json.dumps(theirs_src))

    # 1. the dataset id form would overwrite 511's own plans under the same name: refused, saying how instead
    with pytest.raises(PlanningError, match=f"already has its own plans {PLAIN}.*--plans-name <a new plans name>"):
        _plan([511], raw, pre, plans_from=501)
    assert json.loads((pre / b / f"{PLAIN}.json").read_text()) == own

    # 2. from the plans file alone (the other run's raw and preprocessed folders gone), under another name
    other_run = tmp_path / "other_run_plans.json"
    shutil.copy(pre / a / f"{PLAIN}.json", other_run)
    shutil.rmtree(raw / a)
    shutil.rmtree(pre / a)
    d = _plan([511], raw, pre, plans_from=str(other_run), plans_name="runAPlans").dataset(b)
    theirs = json.loads((pre / b / "runAPlans.json").read_text())
    assert (d.plans_identifier, d.transferred_from, d.num_preprocessed) == ("runAPlans", a, 3)
    assert (theirs["plans_name"], _data_id(theirs)) == ("runAPlans", "runAPlans_3d_fullres")
    assert resolve_configuration(theirs, "3d_fullres")["spacing"] == [3.0, 0.8, 0.8]
    shape_own = nnUNetDatasetBlosc2(str(own_data)).load_case("siteb_000")[0].shape
    shape_theirs = nnUNetDatasetBlosc2(str(pre / b / "runAPlans_3d_fullres")).load_case("siteb_000")[0].shape
    assert shape_own[1:] == (10, 44, 36)  # own plans: 2 mm slices, 0.6 mm pixels as acquired
    assert shape_theirs[1:] == (round(10 * 2 / 3), round(44 * 0.6 / 0.8), round(36 * 0.6 / 0.8))
    assert _snapshot(own_data) == before  # the dataset's own data untouched
    assert json.loads((pre / b / f"{PLAIN}.json").read_text()) == own  # and its own plans

    # 3. a hand copy of the own plans under a new name, spacing edited, keeping the old data_identifier
    copy_ = json.loads(json.dumps(own))
    copy_["plans_name"] = "thinPlans"
    copy_["configurations"]["3d_fullres"]["spacing"] = [1.0, 0.6, 0.6]
    (pre / b / "thinPlans.json").write_text(json.dumps(copy_))
    assert _data_id(copy_) == own_data.name  # the trap: same folder, other spacing
    _plan([511], raw, pre, plans_name="thinPlans")
    thin = json.loads((pre / b / "thinPlans.json").read_text())
    assert _data_id(thin) == "thinPlans_3d_fullres"
    assert resolve_configuration(thin, "3d_fullres")["spacing"] == [1.0, 0.6, 0.6]
    thin_shape = nnUNetDatasetBlosc2(str(pre / b / "thinPlans_3d_fullres")).load_case("siteb_000")[0].shape
    assert thin_shape[1] == 20  # 10 slices of 2 mm at 1 mm
    assert _snapshot(own_data) == before

    # 4. a tiny-network copy (same preprocessing) keeps sharing the data: nothing renamed or redone
    from orthodiff_nnunet.networks.build import write_shrunk_plans

    write_shrunk_plans(pre / b, PLAIN, "tinyPlans")
    d = _plan([511], raw, pre, plans_name="tinyPlans").dataset(b)
    assert (_data_id(json.loads((pre / b / "tinyPlans.json").read_text())), d.num_skipped) == (own_data.name, 3)
    assert _snapshot(own_data) == before
    for plans in (own, theirs, thin):  # each plans' data is its own and complete
        assert check_preprocessed_data(pre / b, plans, "3d_fullres").name == _data_id(plans)


def test_trainers_refuse_data_made_by_other_plans(golden, tmp_path, monkeypatch):
    """Plans edited after preprocessing, data of other plans in the folder, an interrupted preprocessing:
    pretraining and segmentation training refuse before the first iteration, naming the folder and the
    command that fixes it; plan_and_preprocess refuses to rebuild a folder another plans file owns."""
    from orthodiff_nnunet.planning import PlanningError, PreprocessedDataError, preprocess_configurations
    from orthodiff_nnunet.pretraining import pretrain
    from orthodiff_nnunet.segmentation import train_segmentation

    raw, pre = _copy(golden, tmp_path)
    res, name = tmp_path / "res", SITE
    for k, v in {"nnUNet_results": str(res), "nnUNet_n_proc_DA": "0", "nnUNet_compile": "0"}.items():
        monkeypatch.setenv(k, v)
    plans_file = pre / name / f"{PLAIN}.json"
    good = plans_file.read_text()
    data = pre / name / f"{PLAIN}_3d_fullres"

    # another plans file naming the same folder with other spacing: plan_and_preprocess will not overwrite it
    other = json.loads(good)
    other["plans_name"] = "otherPlans"
    other["configurations"]["3d_fullres"]["spacing"] = [1.5, 0.8, 0.8]
    from orthodiff_nnunet.planning import list_training_cases, resolve_datasets

    cases = list_training_cases(resolve_datasets([511], raw=raw)[0])
    with pytest.raises(PlanningError, match=f"holds the data of plans {PLAIN}.*would overwrite"):
        preprocess_configurations(name, other, ["3d_fullres"], cases, pre, 1, show_progress=False)

    # the folder now preprocessed with other spacing (plans edited, preprocessed, edit undone)
    edited = json.loads(good)
    edited["configurations"]["3d_fullres"]["spacing"] = [1.5, 0.8, 0.8]
    plans_file.write_text(json.dumps(edited))
    assert _plan([511], raw, pre).dataset(name).num_preprocessed == 3
    plans_file.write_text(good)
    fix = re.escape(f"orthodiff plan_and_preprocess -d {name} --plans-name {PLAIN}")
    expected = rf"{re.escape(str(data))} was preprocessed with other plans .*{fix}"
    with pytest.raises(PreprocessedDataError, match=expected):
        pretrain(511, iterations=2, checkpoint_every=1, device="cpu", sample_steps=0, val_iterations=1)
    with pytest.raises(PreprocessedDataError, match=expected):
        train_segmentation(511, init="scratch", epochs=2, iterations_per_epoch=1, device="cpu", validate=False)
    assert not list(res.rglob("checkpoint_*.pth")) and not list(res.rglob("*.pt"))  # nothing trained

    # rerunning the command named in the message fixes it
    assert _plan([511], raw, pre).dataset(name).num_preprocessed == 3
    from orthodiff_nnunet.planning import check_preprocessed_data

    assert check_preprocessed_data(pre / name, json.loads(good), "3d_diffusion") == data

    # an interrupted preprocessing (one case not done) is refused too
    stamp_file = pre / name / f".{data.name}.orthodiff_progress.json"
    stamp = json.loads(stamp_file.read_text())
    stamp["done"] = stamp["done"][:-1]
    stamp_file.write_text(json.dumps(stamp))
    with pytest.raises(PreprocessedDataError, match=r"is incomplete: 2 of 3 cases preprocessed.*it resumes"):
        train_segmentation(511, init="scratch", epochs=2, iterations_per_epoch=1, device="cpu", validate=False)


# -- leftovers of a killed plan_and_preprocess ----------------------------------------------------

def test_stale_temporaries_are_cleaned_never_a_live_runs(golden, tmp_path):
    from orthodiff_nnunet.planning import PlanningError

    raw, pre = _copy(golden, tmp_path)
    folder = pre / SITE
    stale = [folder / f".{PLAIN}_3d_fullres.orthodiff_progress.json.x1y2z3.tmp",
             folder / ".dataset.json.a8b9c0.tmp", folder / "gt_segmentations" / ".siteb_000.nii.gz.tmp"]
    fresh = folder / f".{PLAIN}_3d_fullres.orthodiff_progress.json.q4r5s6.tmp"  # a write happening right now
    keep = folder / "notes.tmp"  # not a hidden temporary of ours
    for f in [*stale, fresh, keep]:
        f.write_text("{")
    hour_ago = time.time() - 3600
    for f in stale:
        os.utime(f, (hour_ago, hour_ago))

    # while another plan_and_preprocess holds the dataset, this one refuses and removes nothing
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; "
         "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(120)",
         str(folder / ".orthodiff_plan_and_preprocess.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PlanningError, match="another plan_and_preprocess is running on"):
            _plan([511], raw, pre, preprocess=False)
        assert all(f.exists() for f in stale)
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed run: the operating system releases its lock
        holder.wait()
    d = _plan([511], raw, pre).dataset(SITE)
    assert (d.num_skipped, d.fingerprint_reused, d.plans_reused) == (3, True, True)
    assert not any(f.exists() for f in stale)
    assert fresh.exists() and keep.exists()
    assert sorted(folder.rglob(".*.tmp")) == [fresh]  # only the live write's temporary is left


# -- kill and continue ----------------------------------------------------------------------------

def _latest_epoch(path: Path) -> int | None:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["current_epoch"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return None


def test_segmentation_killed_mid_training_continues_from_the_latest_epoch(golden, tmp_path, monkeypatch):
    """SIGKILL a real `orthodiff train seg` process after a few epochs; `--continue` resumes at the epoch
    of the last checkpoint_latest.pth (written every epoch here with --checkpoint-minutes 0; nnU-Net's
    every-50-epochs cadence had none yet, so it would have restarted from checkpoint_best or 0) and
    completes the run."""
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.segmentation import train_segmentation

    raw, pre = _copy(golden, tmp_path)
    res, name = tmp_path / "res", SITE
    write_shrunk_plans(pre / name, PLAIN, "microPlans", max_features=4, max_stages=3)
    env = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
           "nnUNet_n_proc_DA": "0", "nnUNet_compile": "0"}
    epochs = 5
    cmd = [sys.executable, "-m", "orthodiff_nnunet.cli", "train", "seg", "-d", "511", "--init", "scratch",
           "-p", "microPlans", "--epochs", str(epochs), "--iterations-per-epoch", "1", "--val-iterations", "1",
           "--checkpoint-minutes", "0", "--device", "cpu", "--no-validation"]
    fold = res / name / "nnUNetTrainerOrthoDiffSegScratch__microPlans__3d_fullres" / "fold_0"
    latest = fold / "checkpoint_latest.pth"
    err = tmp_path / "killed_run.stderr"
    proc = subprocess.Popen(cmd, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=open(err, "w"))
    killed_at = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            e = _latest_epoch(latest) if latest.is_file() else None
            if e is not None and e >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = e
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed_at is not None, f"no checkpoint_latest.pth of epoch >= 2 appeared: {err.read_text()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not (fold / "checkpoint_final.pth").exists()
    resumed_from = _latest_epoch(latest)  # the run may have written one more before the kill landed
    assert epochs > resumed_from >= killed_at > 50 * (killed_at // 50)  # nnU-Net's cadence: no latest before 50
    logs_before = set(fold.glob("training_log_*.txt"))

    time.sleep(1.1)  # nnU-Net names training logs by the second
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    train_segmentation(511, init="scratch", plans="microPlans", epochs=epochs, iterations_per_epoch=1,
                       val_iterations_per_epoch=1, checkpoint_minutes=0, device="cpu", validate=False,
                       continue_training=True)
    (new_log,) = set(fold.glob("training_log_*.txt")) - logs_before
    text = new_log.read_text()
    first = int(re.search(r"^.*Epoch (\d+)\s*$", text, re.M).group(1))
    assert first == resumed_from  # continued at the latest epoch, not at 0
    assert re.search(rf"Epoch {epochs - 1}\s*$", text, re.M)
    assert _latest_epoch(fold / "checkpoint_final.pth") == epochs
    assert not latest.exists() and not list(fold.glob(".checkpoint_*.tmp"))
    assert "np.float" not in text and re.search(r"Pseudo dice \[(nan|\d)", text)  # plain numbers in the log
