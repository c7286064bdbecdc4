"""``orthodiff scan``: a generated PACS export -> exams, series verdicts, a draft manifest that converts."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from orthodiff_nnunet.cli import main
from orthodiff_nnunet.data.pacs_export import ExamSpec, SeriesSpec, write_pacs_export
from orthodiff_nnunet.dataset_conversion.manifest import read_manifest
from orthodiff_nnunet.dataset_conversion.scan import (
    ScanError,
    check_manifest_location,
    scan_export,
    write_manifest,
)
from orthodiff_nnunet.errors import ConversionError


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """The default export (3 exams, 172 DICOM files, 4 junk files) under <site>/export; read-only for the tests."""
    site = tmp_path_factory.mktemp("site")
    files = write_pacs_export(site / "export")
    assert len(files) == 172
    return site / "export"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_known_answers_of_the_default_export(export):
    result = scan_export(export, executor="serial", progress=False)
    assert result.num_files == 176
    assert sorted(p.name for p in result.not_dicom) == [".DS_Store", "README.txt", "Thumbs.db", "report.pdf"]
    assert result.damaged == [] and result.dicomdirs == []
    assert [e.case_id for e in result.exams] == ["ACC0001", "ACC0002", "ACC0003"]
    assert [e.patient_id for e in result.exams] == ["PAT001", "PAT002", "PAT002"]
    assert len(result.series) == 14
    assert result.flagged_by_reason() == {"secondary_capture": 1, "derived": 1, "localizer": 3}
    assert [len(e.kept) for e in result.exams] == [4, 3, 2]
    assert [e.planes for e in result.exams] == [["sag", "cor", "ax"], ["sag", "cor", "ax"], ["sag", "cor"]]
    assert {p: len(ss) for p, ss in result.exams[0].choices.items()} == {"sag": 2}

    by_number = {s.series_number: s for s in result.exams[1].series}
    oblique = by_number[2]
    assert oblique.plane == "sag" and oblique.obliquity_deg == pytest.approx(12.0, abs=0.05)
    t2map = by_number[3]
    assert t2map.kept and t2map.num_echoes == 3 and t2map.echo_times_ms == (10.0, 20.0, 30.0)
    assert t2map.slices == 12 and len(t2map.files) == 36 and t2map.spacing_mm == (0.5, 0.5, 3.0)
    assert t2map.field_strength_t == 1.5 and t2map.manufacturer == "GE MEDICAL SYSTEMS"
    localizer = by_number[1]
    assert localizer.reason == "localizer" and localizer.orientations == 3 and localizer.plane is None

    first = {s.series_number: s for s in result.exams[0].series}
    assert first[2].fat_sat is True and first[4].fat_sat is False  # ScanOptions FS / none
    assert first[2].field_strength_t == 3.0  # 2.89362 in the header, a nominal 3 T scanner
    assert (first[2].tr_ms, first[4].tr_ms, first[4].echo_times_ms) == (3000.0, 600.0, (12.0,))
    assert first[6].reason == "derived" and first[7].reason == "secondary_capture"

    text = result.summary()
    assert "exams missing a plane: 1 without axial" in text
    assert "not DICOM (skipped): 4 file(s): .DS_Store, README.txt, Thumbs.db, report.pdf" in text
    assert "PAT00" not in text and "ACC00" not in text  # no identifier in the console summary


def test_process_and_thread_pools_agree_with_serial(export):
    serial = scan_export(export, executor="serial", progress=False)
    for kind in ("process", "thread"):
        parallel = scan_export(export, executor=kind, workers=2, progress=False)
        assert parallel.executor == kind and parallel.workers == 2
        assert [(s.uid, s.reason, s.plane, s.slices, len(s.files)) for s in parallel.series] == \
               [(s.uid, s.reason, s.plane, s.slices, len(s.files)) for s in serial.series]


def test_draft_manifest_is_refused_until_the_choice_is_made_then_converts(export, tmp_path):
    from orthodiff_nnunet.api import convert

    result = scan_export(export, executor="serial", progress=False)
    manifest = export.parent / "manifest.csv"
    site_dir = write_manifest(result, manifest, site="SiteA")
    assert site_dir == export.parent.resolve()
    rows = _rows(manifest)
    assert len(rows) == 14
    assert sum(r["case_id"].startswith("#") for r in rows) == 5
    assert [e.manifest_lines for e in result.exams] == [(2, 8), (9, 12), (13, 15)]
    flat = [r for r in rows if r["case_id"] == "ACC0002"]  # every series of this study in one folder
    assert {r["image"] for r in flat} == {"export/PAT002/ACC0002"} and [r["series"] for r in flat] == ["2", "3", "4"]
    assert rows[0]["field_strength"] == "3" and rows[0]["vendor"] == "SIEMENS" and rows[0]["scan_fat_sat"] == "yes"
    assert "3 echoes" in flat[1]["note"] and flat[0]["scan_obliquity_deg"] == "12.0"

    with pytest.raises(ConversionError, match=r"manifest lines 2, 3 \(case ACC0001\) leave a choice open"):
        convert(manifest, 501, "Scan", raw=tmp_path / "raw", num_processes=1, dry_run=True)

    # the user keeps the PD FS sagittal and comments out the T2 FS one
    text = manifest.read_text().splitlines()
    assert text[2].startswith("ACC0001,") and "003_T2_FS_SAG" in text[2]
    text[2] = "#" + text[2]
    manifest.write_text("\n".join(text) + "\n")
    out = convert(manifest, 501, "Scan", raw=tmp_path / "raw", num_processes=1)
    assert out.num_cases == {"sag": 3, "cor": 3, "ax": 2}
    assert out.added == 8


def test_dicomdir_export_and_a_missing_file(tmp_path):
    exams = [ExamSpec("PAT9", "ACC9", series=(SeriesSpec("Sag", "sag"), SeriesSpec("Cor", "cor"),
                                               SeriesSpec("Ax", "ax")))]
    files = write_pacs_export(tmp_path / "cd", exams, dicomdir=True, junk=False)
    assert (tmp_path / "cd" / "DICOMDIR").is_file() and len(files) == 36
    assert all(f.suffix == "" for f in files)  # IM000000 ...: no .dcm suffix on export media
    sag_file = next(f for f in files if f.parent.name == "SE000000" and f.name == "IM000005")
    sag_file.unlink()  # a slice in the middle of the sagittal series lost on the way

    result = scan_export(tmp_path / "cd" / "DICOMDIR", executor="serial", progress=False)
    assert result.root == tmp_path / "cd"
    assert len(result.dicomdirs) == 1 and result.not_dicom == []  # the DICOMDIR is not junk
    assert [p.name for p in result.missing_from_dicomdir] == ["IM000005"]
    (exam,) = result.exams
    assert exam.case_id == "ACC9" and exam.planes == ["cor", "ax"]
    sag = next(s for s in exam.series if s.plane == "sag")
    assert sag.reason == "several_stacks" and len(sag.files) == 11
    assert "DICOMDIR read: 1; files it lists that are missing: 1" in result.summary()


def test_truncated_pixel_data_is_scanned_from_the_header(tmp_path):
    exams = [ExamSpec("PAT8", "ACC8", series=(SeriesSpec("Sag", "sag"), SeriesSpec("Cor", "cor")))]
    files = write_pacs_export(tmp_path / "e", exams, junk=False)
    victim = files[3]
    data = victim.read_bytes()
    victim.write_bytes(data[:-300])  # 512 bytes of pixels, 212 left

    result = scan_export(tmp_path / "e", executor="serial", progress=False)
    sag, cor = result.exams[0].series
    assert len(sag.files) == 12 and sag.slices == 12  # the cut file's header was read
    assert sag.reason == "damaged" and cor.kept
    assert [(p.name, r) for p, r in result.damaged] == [
        (victim.name, "pixel data cut short: 212 of 512 bytes")]


def test_too_oblique_and_few_slices_are_flagged(tmp_path):
    exams = [ExamSpec("PAT7", "ACC7", series=(SeriesSpec("Sag oblique", "sag", oblique_deg=40.0),
                                               SeriesSpec("Cor short", "cor", slices=5)))]
    write_pacs_export(tmp_path / "e", exams, junk=False)
    result = scan_export(tmp_path / "e", executor="serial", progress=False, max_obliquity_deg=35)
    oblique, short = result.exams[0].series
    assert oblique.reason == "oblique" and oblique.obliquity_deg == pytest.approx(40.0, abs=0.05)
    assert short.reason == "localizer" and short.slices == 5
    assert "5 slice(s), fewer than 8" in short.details[0]
    assert result.exams[0].planes == []


def test_manifest_reader_ignores_note_hints_and_comment_rows(tmp_path):
    import numpy as np
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    sitk.WriteImage(img, str(tmp_path / "a.nii.gz"))
    header = "case_id,patient_id,site,field_strength,image,note,scan_plane,scan_whatever\n"
    (tmp_path / "m.csv").write_text(
        header
        + "E1,P1,S,3,a.nii.gz,a note,sag,x\n"
        + "#E1,P1,S,3,missing.nii.gz,left out: localizer,,\n"  # a comment row: its missing image is not checked
    )
    rows, _ = read_manifest(tmp_path / "m.csv")
    assert [(r.row, r.case_id) for r in rows] == [(2, "E1")]

    (tmp_path / "bad.csv").write_text("case_id,patient_id,site,field_strength,image,notes\nE1,P1,S,3,a.nii.gz,x\n")
    with pytest.raises(ConversionError, match="unknown column"):  # typos are still caught
        read_manifest(tmp_path / "bad.csv")

    choose = "choose: 2 sagittal series in this exam"
    (tmp_path / "c.csv").write_text(header + f"E1,P1,S,3,a.nii.gz,{choose},,\nE1,P1,S,3,a.nii.gz,{choose},,\n")
    with pytest.raises(ConversionError, match=r"manifest lines 2, 3 \(case E1\) leave a choice open"):
        read_manifest(tmp_path / "c.csv")
    (tmp_path / "c.csv").write_text(header + f"E1,P1,S,3,a.nii.gz,{choose},,\n#E1,P1,S,3,a.nii.gz,{choose},,\n")
    assert len(read_manifest(tmp_path / "c.csv")[0]) == 1


def test_manifest_is_refused_inside_nnunet_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    with pytest.raises(ScanError, match="patient identifiers"):
        check_manifest_location(tmp_path / "raw" / "manifest.csv")
    with pytest.raises(ScanError, match="nnU-Net dataset folder"):
        check_manifest_location(tmp_path / "elsewhere" / "Dataset501_KneeSag" / "manifest.csv")
    with pytest.raises(ScanError, match="nnU-Net dataset folder"):
        check_manifest_location(tmp_path / "nnUNet_results" / "m.csv")
    check_manifest_location(tmp_path / "site" / "manifest.csv")  # fine


def test_cli_scan_writes_manifest_and_summary(export, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    out = tmp_path / "private" / "draft.csv"
    assert main(["scan", str(export), "-o", str(out), "--site", "SiteA", "--no-progress", "-np", "1"]) == 0
    printed = capsys.readouterr().out
    assert "3 exam(s), 14 series" in printed and "series kept: 9; flagged" in printed
    assert f"--site-dir {export.resolve()}" in printed  # the export is not under the manifest's folder
    rows = _rows(out)
    assert rows[0]["image"] == "PAT001/ACC0001/002_PD_FS_SAG" and rows[0]["site"] == "SiteA"
    assert main(["scan", str(export), "-o", str(tmp_path / "Dataset501_X" / "m.csv"), "--no-progress"]) == 2


def test_an_export_without_images_is_refused(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("no images here\n")
    (tmp_path / "e" / "IM0001").write_bytes(b"")
    with pytest.raises(ScanError, match=r"no DICOM image among the 2 files .* \(2 not DICOM, 0 damaged"):
        scan_export(tmp_path / "e", executor="serial", progress=False)
    with pytest.raises(ScanError, match="does not exist"):
        scan_export(tmp_path / "missing", progress=False)


def test_two_stacks_in_one_series_are_flagged(tmp_path):
    import pydicom

    exams = [ExamSpec("PAT6", "ACC6", series=(SeriesSpec("Sag a", "sag"), SeriesSpec("Sag b", "sag"),
                                               SeriesSpec("Cor", "cor")))]
    files = write_pacs_export(tmp_path / "e", exams, junk=False)
    first_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    for f in files[12:24]:  # the second sagittal stack joins the first one's series (a repeated acquisition)
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = first_uid
        ds.save_as(f)
    result = scan_export(tmp_path / "e", executor="serial", progress=False)
    merged, cor = result.exams[0].series
    assert len(merged.files) == 24 and merged.reason == "several_stacks" and cor.kept
    assert merged.details[0].startswith("12 repeated slice position(s)")
    assert result.exams[0].planes == ["cor"]


def test_default_workers_follow_the_free_cores(monkeypatch):
    import os

    from orthodiff_nnunet.dataset_conversion.scan import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert default_workers() == 8  # at most 8
    monkeypatch.setattr(os, "getloadavg", lambda: (12.5, 0.0, 0.0))
    assert default_workers() == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 0.0, 0.0))
    assert default_workers() == 1  # saturated: serial
