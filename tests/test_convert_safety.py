"""Conversion safety: concurrent runs, stable folds, disk full, leftovers, key CSV, one-patient sites.

Every test runs the real converter (in this process or as a real ``orthodiff convert`` process)
on small generated series.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_series, write_manifest
from orthodiff_nnunet.data.splits import extend_patient_grouped_splits, folds_from_splits, patient_grouped_splits
from orthodiff_nnunet.dataset_conversion.site_converter import convert_site
from orthodiff_nnunet.errors import ConversionError

REPO = Path(__file__).resolve().parents[1]


def _site(folder: Path, exams: list[tuple[str, str, str]], orientations=("sag",), size=(24, 20, 8)) -> list[dict]:
    """Write NIfTI series (image + label) for ``(case_id, patient_id, site)`` exams; return manifest rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for e, (case, patient, site) in enumerate(exams):
        for o in orientations:
            img, lab = make_series(o, size=size, seed=e)
            sitk.WriteImage(img, str(folder / f"{case}_{o}.nii.gz"))
            sitk.WriteImage(lab, str(folder / f"{case}_{o}_seg.nii.gz"))
            rows.append({"case_id": case, "patient_id": patient, "site": site, "field_strength": "3",
                         "image": f"{case}_{o}.nii.gz", "label": f"{case}_{o}_seg.nii.gz", "ACL": str(e % 2)})
    return rows


def _convert(folder: Path, rows: list[dict], raw: Path, dataset_id: int = 601, name: str = "Safe", **kw):
    manifest = write_manifest(folder / "manifest.csv", rows)
    kw.setdefault("num_processes", 1)
    return convert_site(manifest, dataset_id, name, raw=raw, **kw)


def _exam_folds(dataset: Path) -> dict[str, int]:
    targets = json.loads((dataset / "orthodiff_targets.json").read_text())["cases"]
    splits = json.loads((dataset / "splits_final.json").read_text())
    return {targets[c]["exam"]: k for c, k in folds_from_splits(splits).items()}


def _snapshot(raw: Path) -> dict[str, bytes]:
    return {str(p.relative_to(raw)): p.read_bytes() for p in sorted(raw.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# two conversions at once


def _wait_for(text: str, paths: list[Path], timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if all(p.exists() and text in p.read_text() for p in paths):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen in {[p.read_text() if p.exists() else None for p in paths]}")


@pytest.mark.parametrize("same_name", [True, False], ids=["same-dataset", "same-id-other-name"])
def test_two_concurrent_converts_never_lose_a_site(tmp_path, same_name):
    """Two real `orthodiff convert` processes into one nnUNet_raw and one dataset id.

    The lock is held by this test until both processes report that they wait, so they are
    released together and race for it: the second must see the first's result.
    """
    from filelock import FileLock

    raw = tmp_path / "raw"
    site_a = tmp_path / "A"
    site_b = tmp_path / "B"
    man_a = write_manifest(site_a / "m.csv", _site(site_a, [("A1", "PA1", "SiteA"), ("A2", "PA2", "SiteA")]))
    man_b = write_manifest(site_b / "m.csv", _site(site_b, [("B1", "PB1", "SiteB"), ("B2", "PB2", "SiteB")]))
    (raw / ".orthodiff").mkdir(parents=True)
    held = FileLock(str(raw / ".orthodiff" / "convert.lock"))
    held.acquire(timeout=0)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = []
    try:
        for man, name, log_path in ((man_a, "Knee", logs[0]), (man_b, "Knee" if same_name else "Other", logs[1])):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "orthodiff_nnunet.cli", "convert", str(man), "-d", "601", "-n", name,
                 "--raw", str(raw), "-np", "1", "--folds", "2"],
                env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO, stdout=subprocess.DEVNULL,
                stderr=open(log_path, "w")))
        _wait_for("waiting for it to finish", logs)
    finally:
        held.release()
    codes = [p.wait(timeout=300) for p in procs]
    errors = [p.read_text() for p in logs]
    datasets = sorted(p.name for p in raw.glob("Dataset*"))
    if same_name:
        assert codes == [0, 0], errors
        assert datasets == ["Dataset601_KneeSag"]
        targets = json.loads((raw / datasets[0] / "orthodiff_targets.json").read_text())["cases"]
        assert sorted(t["site"] for t in targets.values()) == ["SiteA", "SiteA", "SiteB", "SiteB"]
        assert len(list((raw / datasets[0] / "imagesTr").iterdir())) == 4
        splits = json.loads((raw / datasets[0] / "splits_final.json").read_text())
        assert sorted(c for f in splits for c in f["val"]) == sorted(targets)
    else:
        assert sorted(codes) == [0, 2], errors
        loser = codes.index(2)
        assert "dataset id 601 is taken by" in errors[loser] and "Traceback" not in errors[loser]
        assert len(datasets) == 1 and len(list((raw / datasets[0] / "imagesTr").iterdir())) == 2
    assert not (raw / ".orthodiff_tmp").exists()


def test_lock_timeout_refuses_with_the_holder_named(tmp_path):
    from filelock import FileLock

    raw = tmp_path / "raw"
    site = tmp_path / "A"
    rows = _site(site, [("A1", "PA1", "SiteA")])
    (raw / ".orthodiff").mkdir(parents=True)
    (raw / ".orthodiff" / "convert.owner.json").write_text(
        json.dumps({"pid": 4242, "host": "workstation7", "started": "2026-12-01T10:00:00+00:00"}))
    held = FileLock(str(raw / ".orthodiff" / "convert.lock"))
    held.acquire(timeout=0)
    try:
        t0 = time.time()
        with pytest.raises(ConversionError, match=r"another orthodiff convert \(process 4242 on workstation7, "
                                                  r"started 2026-12-01T10:00:00\+00:00\) is writing into .*waited 1 s"):
            _convert(site, rows, raw, lock_timeout_s=1)
        assert 0.9 < time.time() - t0 < 30
        with pytest.raises(ConversionError, match="is writing into"):
            _convert(site, rows, raw, lock_timeout_s=0)
        out = subprocess.run([sys.executable, "-m", "orthodiff_nnunet.cli", "convert", str(site / "manifest.csv"),
                              "-d", "601", "-n", "Safe", "--raw", str(raw), "--lock-timeout", "0"],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
        assert out.returncode == 2 and "(process 4242 on workstation7" in out.stderr, out.stderr
    finally:
        held.release()
    assert not list(raw.glob("Dataset*")) and not (raw / ".orthodiff" / "pseudonym.key").exists()
    assert _convert(site, rows, raw, lock_timeout_s=0).added == 1  # free again
    assert not (raw / ".orthodiff" / "convert.owner.json").exists()


# ---------------------------------------------------------------------------------------------
# adding exams keeps the folds


def test_new_patients_fill_folds_without_moving_earlier_exams():
    """24 exams in 5 folds, then 12 new patients: re-splitting moved 21 of the 24; now none moves."""
    cases = [f"e{i:02d}" for i in range(24)]
    patients = {c: f"p{i}" for i, c in enumerate(cases)}
    sites = {c: ("A" if i % 3 else "B") for i, c in enumerate(cases)}
    first = patient_grouped_splits(cases, patients, sites, 5)
    before = folds_from_splits(first)
    new = [f"n{i:02d}" for i in range(12)]
    patients.update({c: f"q{i}" for i, c in enumerate(new)})
    sites.update({c: ("A" if i % 2 else "B") for i, c in enumerate(new)})
    resplit = folds_from_splits(patient_grouped_splits(cases + new, patients, sites, 5))
    assert sum(resplit[c] != before[c] for c in cases) == 21  # what the issue reported

    update = extend_patient_grouped_splits(cases + new, patients, sites, before, 5, 5)
    after = folds_from_splits(update.folds)
    assert all(after[c] == before[c] for c in cases) and update.changes == []
    sizes = [len(f["val"]) for f in update.folds]
    assert sum(sizes) == 36 and max(sizes) - min(sizes) <= 1
    for site in ("A", "B"):
        per_fold = [sum(sites[c] == site for c in f["val"]) for f in update.folds]
        assert max(per_fold) - min(per_fold) <= 1, (site, per_fold)
    for f in update.folds:
        assert sorted(f["train"] + f["val"]) == sorted(cases + new) and not set(f["train"]) & set(f["val"])
    assert "folds kept for the 24 earlier exam(s); 12 exam(s) of 12 new patient(s)" in update.notes[0]


def test_incremental_convert_keeps_folds_and_reports_forced_moves(tmp_path):
    site = tmp_path / "site"
    rows = _site(site, [(f"EX{i}", f"PAT{i}", "SiteA" if i < 6 else "SiteB") for i in range(9)])
    raw = tmp_path / "raw"
    key_csv = tmp_path / "key.csv"
    res1 = _convert(site, rows, raw, num_folds=3)
    ds = res1.datasets["sag"]
    folds1 = _exam_folds(ds)
    assert len(folds1) == 9 and sorted(folds1.values()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    # 3 new patients, and a second exam of PAT0, which must join PAT0's fold
    more = [("EX9", "PAT9", "SiteA"), ("EX10", "PAT10", "SiteB"), ("EX11", "PAT11", "SiteB"), ("EX12", "PAT0", "SiteA")]
    rows2 = rows + _site(site / "more", more)
    for r in rows2[9:]:
        r["image"], r["label"] = "more/" + r["image"], "more/" + r["label"]
    res2 = _convert(site, rows2, raw, num_folds=3, key_file=key_csv)
    exam = {r["case_id"]: r["pseudonym"] for r in csv.DictReader(open(key_csv))}
    folds2 = _exam_folds(ds)
    assert {e: folds2[e] for e in folds1} == folds1 and res2.warnings == []
    assert folds2[exam["EX12"]] == folds2[exam["EX0"]]
    assert sorted(list(folds2.values()).count(k) for k in range(3)) == [4, 4, 5]
    summary = res2.summary()
    assert "folds kept for the 9 earlier exam(s); 3 exam(s) of 3 new patient(s)" in summary
    assert "1 new exam(s) of earlier patients follow their patient's fold" in summary

    # the manifest now says EX1 belongs to the patient of an exam in another fold: one of the two must move
    other = next(f"EX{i}" for i in range(2, 9) if folds2[exam[f"EX{i}"]] != folds2[exam["EX1"]])
    a, b = folds2[exam["EX1"]], folds2[exam[other]]
    rows3 = [dict(r, patient_id=f"PAT{other[2:]}") if r["case_id"] == "EX1" else r for r in rows2]
    res3 = _convert(site, rows3, raw, num_folds=3)
    folds3 = _exam_folds(ds)
    moved = sorted(e for e in folds2 if folds3[e] != folds2[e])
    assert moved == [exam["EX1"] if a > b else exam[other]]
    assert folds3[exam["EX1"]] == folds3[exam[other]] == min(a, b)
    assert res3.warnings == [f"splits_final.json: exam {moved[0]} moved from fold {max(a, b)} to fold {min(a, b)}: "
                             f"the manifest now gives it the same patient as exams in fold {min(a, b)}, and one "
                             "patient's exams must share a fold"]
    assert "warning: splits_final.json: exam" in res3.summary()
    # another number of folds re-splits everything, and says so
    res4 = _convert(site, rows3, raw, num_folds=2)
    assert any("every exam was split anew into 2 folds because 2 folds were asked for and the existing split has 3"
               in w for w in res4.warnings)
    assert len(json.loads((ds / "splits_final.json").read_text())) == 2


# ---------------------------------------------------------------------------------------------
# disk full


def test_not_enough_space_is_refused_before_writing_and_keeps_the_datasets(tmp_path):
    site = tmp_path / "site"
    rows = _site(site, [("EX1", "P1", "S"), ("EX2", "P2", "S")])
    raw = tmp_path / "raw"
    _convert(site, rows[:1], raw)
    before = _snapshot(raw)
    free = __import__("shutil").disk_usage(raw).free
    with pytest.raises(ConversionError, match=r"not enough free space in .*: [\d.]+ [MG]B free, this conversion needs about "
                                              r"[\d.]+ [MG]B \(1 series to write") as err:
        _convert(site, rows, raw, disk_reserve_bytes=free + 10**9)
    assert "nothing was written" in str(err.value) and "np.float64" not in str(err.value)
    assert _snapshot(raw) == before and not (raw / ".orthodiff_tmp").exists()
    # a dry run only warns
    dry = _convert(site, rows, raw, dry_run=True, disk_reserve_bytes=free + 10**9)
    assert any("not enough free space" in w for w in dry.warnings)


def _run_with_file_size_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """The CLI in a process whose files cannot grow beyond ``limit`` bytes: every write past it fails
    with EFBIG (a real kernel write failure like ENOSPC; Python ignores SIGXFSZ)."""
    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "orthodiff_nnunet.cli", "convert", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, preexec_fn=limit_files, timeout=300)


def test_failed_image_and_json_writes_are_caught_and_keep_the_datasets(tmp_path):
    site = tmp_path / "site"
    rows = _site(site, [("EX1", "P1", "S"), ("EX2", "P2", "S"), ("EX3", "P3", "S")])
    raw = tmp_path / "raw"
    _convert(site, rows[:2], raw)
    before = _snapshot(raw)
    manifest = write_manifest(site / "manifest.csv", rows)
    args = [str(manifest), "-d", "601", "-n", "Safe", "--raw", str(raw), "-np", "1"]
    # the new image (~14 kB compressed noise) cannot be written: ITK truncates it silently
    out = _run_with_file_size_limit(args, 8_000)
    assert out.returncode == 2, out.stderr
    assert "failed while writing, no dataset was changed" in out.stderr and "Traceback" not in out.stderr
    assert "EX3" in out.stderr and "Compressed file ended" in out.stderr
    assert "failed although" in out.stderr and "a file size limit (ulimit -f)" in out.stderr
    assert _snapshot(raw) == before and not (raw / ".orthodiff_tmp").exists()

    # unchanged images (hard links), new abnormality labels: dataset.json (994 bytes) cannot be written
    assert len(before["Dataset601_SafeSag/dataset.json"]) > 900
    relabeled = write_manifest(site / "manifest.csv", [dict(r, ACL="1") for r in rows[:2]])
    out = _run_with_file_size_limit([str(relabeled), *args[1:]], 600)
    assert out.returncode == 2, out.stderr
    assert "File too large" in out.stderr and "failed while writing, no dataset was changed" in out.stderr
    assert "Traceback" not in out.stderr
    assert _snapshot(raw) == before and not (raw / ".orthodiff_tmp").exists()


def test_truncated_nifti_is_detected(tmp_path):
    from orthodiff_nnunet.utils import ImageWriteError, verify_nifti_gz, write_image_checked

    img, _ = make_series("sag")
    path = tmp_path / "a.nii.gz"
    write_image_checked(img, path)
    verify_nifti_gz(path, 24 * 20 * 8 * 4)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageWriteError, match="a.nii.gz: EOFError"):
        verify_nifti_gz(path, 24 * 20 * 8 * 4)
    path.write_bytes(b"\0" * 100)  # what a write to /dev/full leaves readable
    with pytest.raises(ImageWriteError, match="a.nii.gz: BadGzipFile"):
        verify_nifti_gz(path, 24 * 20 * 8 * 4)
    write_image_checked(img, path)
    with pytest.raises(ImageWriteError, match="a.nii.gz: 15712 bytes after decompression, 17064 expected"):
        verify_nifti_gz(path, 24 * 20 * 8 * 4 + 1352)  # 352-byte header + 15360 voxel bytes


# ---------------------------------------------------------------------------------------------
# leftovers


def test_killed_convert_leaves_staging_that_the_next_run_removes(tmp_path):
    site = tmp_path / "site"
    rows = _site(site, [(f"EX{i}", f"P{i}", "S") for i in range(30)], size=(64, 64, 24))
    manifest = write_manifest(site / "manifest.csv", rows)
    raw = tmp_path / "raw"
    proc = subprocess.Popen([sys.executable, "-m", "orthodiff_nnunet.cli", "convert", str(manifest), "-d", "601",
                             "-n", "Safe", "--raw", str(raw), "-np", "1"],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.time() + 120
    while time.time() < end and proc.poll() is None:
        if len(list((raw / ".orthodiff_tmp").glob("*/*/imagesTr/*.nii.gz"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the conversion ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    staged = list((raw / ".orthodiff_tmp").iterdir())
    assert len(staged) == 1 and not list(raw.glob("Dataset*"))
    assert not (raw / ".orthodiff" / "pseudonym.key").exists()  # the killed run had not finished

    res = _convert(site, rows[:3], raw)
    assert res.added == 3 and not (raw / ".orthodiff_tmp").exists()
    assert any(n.startswith("removed 1 leftover(s) of interrupted conversions") for n in res.notes)
    assert "note: removed 1 leftover(s)" in res.summary()


def test_leftover_cleanup_restores_a_dataset_moved_aside_and_spares_a_live_run(tmp_path):
    import socket

    site = tmp_path / "site"
    rows = _site(site, [("EX1", "P1", "S"), ("EX2", "P2", "S")])
    raw = tmp_path / "raw"
    res = _convert(site, rows[:1], raw)
    folder = res.datasets["sag"]
    tmp = raw / ".orthodiff_tmp"
    tmp.mkdir()
    # a run killed between moving the old dataset aside and moving the new one in
    os.replace(folder, tmp / f"{folder.name}.old.0badc0de")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp / "aaaaaaaaaaaa"
        live.mkdir()
        (live / ".owner.json").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                      "started": "x"}))
        res2 = _convert(site, rows, raw)
        assert res2.added == 1 and res2.unchanged == 1
        assert (folder / "imagesTr").is_dir() and len(list((folder / "imagesTr").iterdir())) == 2
        assert any("restored Dataset601_SafeSag" in n for n in res2.notes)
        assert live.is_dir()  # a live process's staging is never removed
    finally:
        sleeper.kill()
        sleeper.wait()
    _convert(site, rows, raw)
    assert not tmp.exists()  # dead now: removed


def test_refused_conversion_writes_no_key_and_no_staging(tmp_path):
    site = tmp_path / "site"
    rows = _site(site, [("EX1", "P1", "S")])
    img, _ = make_series("sag")
    const = sitk.GetImageFromArray(np.full(sitk.GetArrayViewFromImage(img).shape, 7, np.float32))
    const.CopyInformation(img)
    sitk.WriteImage(const, str(site / "bad.nii.gz"))
    rows.append({"case_id": "EX2", "patient_id": "P2", "site": "S", "field_strength": "3", "image": "bad.nii.gz"})
    raw = tmp_path / "raw"
    with pytest.raises(ConversionError, match="refused, nothing was written") as err:
        _convert(site, rows, raw)
    assert "constant (7)" in str(err.value)
    left = sorted(str(p.relative_to(raw)) for p in raw.rglob("*"))
    assert left == [".orthodiff", ".orthodiff/convert.lock"]  # the (empty) lock file only
    assert (raw / ".orthodiff" / "convert.lock").stat().st_size == 0


# ---------------------------------------------------------------------------------------------
# key CSV, one-patient sites, messages


def test_key_file_has_one_row_per_exam_with_its_series(tmp_path):
    site = tmp_path / "site"
    rows = _site(site, [("ACC-1", "MRN-1", "S"), ("ACC-2", "MRN-1", "S")], orientations=("sag", "cor", "ax"))
    key_csv = tmp_path / "private" / "key.csv"
    res = _convert(site, rows, tmp_path / "raw", key_file=key_csv)
    table = list(csv.DictReader(open(key_csv)))
    assert len(table) == 2 and sorted(r["case_id"] for r in table) == ["ACC-1", "ACC-2"]
    targets = json.loads((res.datasets["sag"] / "orthodiff_targets.json").read_text())["cases"]
    for r in table:
        assert r["patient_id"] == "MRN-1" and r["pseudonym"] in {t["exam"] for t in targets.values()}
        assert r["cases"].split("; ") == [f"{r['pseudonym']} ({o})" for o in ("sag", "cor", "ax")]
        assert r["series"].split("; ") == [f"{o}: {r['case_id']}_{o}.nii.gz" for o in ("sag", "cor", "ax")]
    assert len({r["patient_pseudonym"] for r in table}) == 1
    assert oct(key_csv.stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow  # plan_and_preprocess: ~15 s on an idle 2-core machine, 90 s under load
def test_one_patient_site_gets_a_fold_all_split_that_nnunet_uses(tmp_path, monkeypatch):
    """A single patient: one fold validating on its training exams; nnU-Net's trainer takes it as fold 0."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from orthodiff_nnunet.planning import plan_and_preprocess
    from orthodiff_nnunet.utils import load_json

    site = tmp_path / "site"
    rows = _site(site, [("EX1", "P1", "S"), ("EX2", "P1", "S")], size=(48, 40, 12))
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    res = _convert(site, rows, raw)
    ds = res.datasets["sag"]
    splits = json.loads((ds / "splits_final.json").read_text())
    cases = sorted(p.name[: -len(".nii.gz")] for p in (ds / "labelsTr").iterdir())
    assert splits == [{"train": cases, "val": cases}]
    assert "1 patient(s): splits_final.json holds one fold whose validation exams are its training exams" in res.summary()

    for k, v in {"nnUNet_raw": raw, "nnUNet_preprocessed": pre, "nnUNet_results": tmp_path / "res"}.items():
        monkeypatch.setenv(k, str(v))
    planned = plan_and_preprocess([601], num_processes=1, raw=raw, preprocessed=pre, show_progress=False,
                                  planner="plain", configurations=("3d_fullres",))
    folder = pre / ds.name
    assert load_json(folder / "splits_final.json") == splits
    plans_id = planned.datasets[0].plans_identifier
    for fold in (0, "all"):
        plans = load_json(folder / f"{plans_id}.json")
        plans["continue_training"] = False  # this nnunetv2 build pops it (see tests/test_segmentation.py)
        trainer = nnUNetTrainer(plans, "3d_fullres", fold, load_json(folder / "dataset.json"), torch.device("cpu"))
        tr, val = trainer.do_split()
        assert sorted(tr) == cases and sorted(val) == cases


def test_geometry_message_prints_plain_numbers(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    img, lab = make_series("sag")
    lab.SetSpacing((0.5, 0.5, 3.3))
    sitk.WriteImage(img, str(site / "a.nii.gz"))
    sitk.WriteImage(lab, str(site / "a_seg.nii.gz"))
    rows = [{"case_id": "A", "patient_id": "P", "site": "S", "field_strength": "3", "image": "a.nii.gz",
             "label": "a_seg.nii.gz"}]
    with pytest.raises(ConversionError) as err:
        _convert(site, rows, tmp_path / "raw")
    assert "spacing (0.5, 0.5, 3.3) != image (0.5, 0.5, 3.0) mm" in str(err.value)
    assert "np.float64" not in str(err.value)


def test_unwritable_staging_place_is_a_clear_refusal(tmp_path):
    """``<raw>/.orthodiff_tmp`` is a file: creating the staging folder fails with a real OSError."""
    site = tmp_path / "site"
    rows = _site(site, [("EX1", "P1", "S")])
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / ".orthodiff_tmp").write_text("not a folder")
    with pytest.raises(ConversionError, match=r"failed while writing, no dataset was changed[\s\S]*"
                                              r"\.orthodiff_tmp/[0-9a-f]{12}: Not a directory") as err:
        _convert(site, rows, raw)
    assert "failed although" in str(err.value)
    assert not list(raw.glob("Dataset*")) and not (raw / ".orthodiff" / "pseudonym.key").exists()
    (raw / ".orthodiff").rename(tmp_path / "moved")
    (raw / ".orthodiff").write_text("not a folder either")  # mkdir of the lock folder: FileExistsError
    with pytest.raises(ConversionError, match=r"cannot write into .*raw \(.*raw/\.orthodiff: File exists\); check that the folder is writable"):
        _convert(site, rows, raw)


def test_split_changes_are_reported_with_their_reason():
    cases = ["a", "b", "c", "d"]
    patients = {"a": "p1", "b": "p2", "c": "p3", "d": "p4"}
    sites = dict.fromkeys(cases, "S")
    before = folds_from_splits(patient_grouped_splits(cases, patients, sites, 2))
    # an exam of another fold is now given a's patient: exactly one of the two moves, to the lower fold
    other = next(c for c in "bcd" if before[c] != before["a"])
    update = extend_patient_grouped_splits(cases, dict(patients, **{other: "p1"}), sites, before, 2, 2)
    after = folds_from_splits(update.folds)
    assert after["a"] == after[other] == 0
    assert all(after[c] == before[c] for c in cases if c not in ("a", other))
    mover = "a" if before["a"] == 1 else other
    assert update.changes == [f"exam {mover} moved from fold 1 to fold 0: the manifest now gives it the same patient "
                              "as exams in fold 0, and one patient's exams must share a fold"]
    # every exam now of one patient: a single fold, and the change is reported
    single = extend_patient_grouped_splits(cases, dict.fromkeys(cases, "p1"), sites, before, 2, 2)
    assert single.folds == [{"train": cases, "val": cases}]
    assert single.changes[0].startswith("the 2 folds were replaced by a single fold")
    # 2 patients -> 2 folds; 6 patients later allow 3 folds: re-split, and said so
    grown = extend_patient_grouped_splits(cases + ["e", "f"], dict(patients, e="p5", f="p6"), dict.fromkeys(cases + ["e", "f"], "S"),
                                          before, 2, 3)
    assert len(grown.folds) == 3
    assert grown.changes == ["every exam was split anew into 3 folds because 3 folds were asked for and the existing "
                             "split has 2: models trained on the old splits_final.json must be retrained (pass --folds 2 "
                             "to keep the old folds)"]


@pytest.mark.slow
def test_planning_after_an_incremental_convert_takes_the_extended_folds(tmp_path, monkeypatch):
    """plan_and_preprocess accepts a raw split that only adds exams (and updates its copy); a re-split is refused."""
    from orthodiff_nnunet.planning import PlanningError, plan_and_preprocess
    from orthodiff_nnunet.utils import load_json

    site = tmp_path / "site"
    rows = _site(site, [(f"EX{i}", f"PAT{i}", "S") for i in range(6)], size=(40, 32, 10))
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    for k, v in {"nnUNet_raw": raw, "nnUNet_preprocessed": pre, "nnUNet_results": tmp_path / "res"}.items():
        monkeypatch.setenv(k, str(v))
    ds = _convert(site, rows, raw, num_folds=3).datasets["sag"]

    def plan():
        return plan_and_preprocess([601], num_processes=1, raw=raw, preprocessed=pre, show_progress=False,
                                   planner="plain", configurations=("3d_fullres",))

    plan()
    old = load_json(pre / ds.name / "splits_final.json")
    rows2 = rows + _site(site / "more", [("EX6", "PAT6", "S"), ("EX7", "PAT7", "S")], size=(40, 32, 10))
    for r in rows2[6:]:
        r["image"], r["label"] = "more/" + r["image"], "more/" + r["label"]
    _convert(site, rows2, raw, num_folds=3)
    plan()
    new = load_json(pre / ds.name / "splits_final.json")
    assert new == load_json(ds / "splits_final.json")
    assert all(set(o["val"]) < set(n["val"]) or set(o["val"]) == set(n["val"]) for o, n in zip(old, new))
    assert sum(len(f["val"]) for f in new) == sum(len(f["val"]) for f in old) + 2

    _convert(site, rows2, raw, num_folds=2)  # every exam split anew: models of the old folds no longer match
    with pytest.raises(PlanningError, match="earlier cases changed fold"):
        plan()
