"""The generic site converter: layout, orientation, splits, idempotence, privacy of names, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_series, write_manifest
from orthodiff_nnunet.api import convert
from orthodiff_nnunet.errors import ConversionError


def _convert(site: Path, rows: list[dict], raw: Path, **kw):
    manifest = write_manifest(site / "manifest.csv", rows)
    kw.setdefault("num_processes", 1)
    return convert(manifest, 501, "KneeTest", raw=raw, **kw)


def _all_output_text(raw: Path) -> str:
    """Every file under raw as text, .nii.gz decompressed, for leak checks."""
    import gzip

    chunks = []
    for p in raw.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith(".gz"):
                data = gzip.decompress(data)
            chunks.append(p.name + "\n" + data.decode("latin-1"))
    return "\n".join(chunks)


def test_converts_three_orientations_with_targets_and_patient_splits(small_site, tmp_path):
    site, rows = small_site
    raw = tmp_path / "raw"
    result = _convert(site, rows, raw, num_folds=3)
    assert set(result.datasets) == {"sag", "cor", "ax"}
    assert result.datasets["sag"].name == "Dataset501_KneeTestSag"
    assert result.datasets["cor"].name == "Dataset502_KneeTestCor"
    assert result.datasets["ax"].name == "Dataset503_KneeTestAx"
    assert result.num_cases == {"sag": 4, "cor": 4, "ax": 4}

    ds = json.loads((raw / "Dataset501_KneeTestSag" / "dataset.json").read_text())
    assert ds["numTraining"] == 4 and ds["file_ending"] == ".nii.gz" and ds["channel_names"] == {"0": "MRI"}
    assert ds["labels"]["femur"] == 1 and len(ds["labels"]) == 12
    assert ds["orthodiff"]["orientation"] == "sag" and ds["orthodiff"]["through_plane_numpy_axis"] == 2
    assert ds["orthodiff"]["sites"] == ["SiteA"] and ds["orthodiff"]["field_strengths_t"] == [3.0]
    assert ds["orthodiff"]["abnormality_labels"] == ["ACL", "EFFU"]
    assert ds["orthodiff"]["num_labeled"] == 4

    # same exam pseudonyms across the three orientation datasets
    names = {o: sorted(p.name for p in (result.datasets[o] / "labelsTr").iterdir()) for o in result.datasets}
    assert names["sag"] == names["cor"] == names["ax"]

    targets = json.loads((raw / "Dataset501_KneeTestSag" / "orthodiff_targets.json").read_text())
    assert targets["label_names"] == ["ACL", "EFFU"]
    positives = sorted((t["targets"]["ACL"], t["targets"]["EFFU"]) for t in targets["cases"].values())
    assert positives == [(0, 0), (0, 1), (1, 0), (1, 0)]
    assert {t["site"] for t in targets["cases"].values()} == {"SiteA"}
    assert {t["vendor"] for t in targets["cases"].values()} == {"VendorA"}
    assert all(t["segmentation"] == "labeled" for t in targets["cases"].values())

    # the two exams of patient PAT-2 are always in the same fold, and folds are shared by views
    splits = json.loads((raw / "Dataset501_KneeTestSag" / "splits_final.json").read_text())
    assert len(splits) == 3
    by_patient: dict[str, set[str]] = {}
    for c, t in targets["cases"].items():
        by_patient.setdefault(t["patient"], set()).add(c)
    two = next(cs for cs in by_patient.values() if len(cs) == 2)
    for fold in splits:
        assert two <= set(fold["val"]) or not (two & set(fold["val"]))
        assert not set(fold["train"]) & set(fold["val"])
    assert sorted(c for f in splits for c in f["val"]) == sorted(targets["cases"])
    assert splits == json.loads((raw / "Dataset503_KneeTestAx" / "splits_final.json").read_text())


def test_output_is_canonical_lps_with_thick_axis_per_orientation(small_site, tmp_path):
    site, rows = small_site
    result = _convert(site, rows, tmp_path / "raw")
    for o, axis in (("sag", 2), ("cor", 1), ("ax", 0)):
        f = next((result.datasets[o] / "imagesTr").iterdir())
        img = sitk.ReadImage(str(f))
        np.testing.assert_allclose(np.abs(np.array(img.GetDirection())), np.eye(3).flatten(), atol=1e-6)
        spacing_numpy = img.GetSpacing()[::-1]  # (z, y, x)
        assert spacing_numpy[axis] == pytest.approx(3.0)
        assert sorted(spacing_numpy) == pytest.approx([0.5, 0.5, 3.0])
        lab = sitk.ReadImage(str(result.datasets[o] / "labelsTr" / f.name.replace("_0000", "")))
        assert lab.GetSize() == img.GetSize() and lab.GetOrigin() == pytest.approx(img.GetOrigin())
        assert set(np.unique(sitk.GetArrayFromImage(lab))) == {0, 1, 5}


def test_canonical_content_matches_source_voxels(tmp_path):
    site = tmp_path / "s"
    site.mkdir()
    img, lab = make_series("cor", seed=3)
    sitk.WriteImage(img, str(site / "a.nii.gz"))
    sitk.WriteImage(lab, str(site / "a_seg.nii.gz"))
    rows = [{"case_id": "A", "patient_id": "P", "site": "S", "field_strength": "1.5", "image": "a.nii.gz",
             "label": "a_seg.nii.gz"}]
    res = _convert(site, rows, tmp_path / "raw")
    out_lab = sitk.ReadImage(str(next((res.datasets["cor"] / "labelsTr").iterdir())))
    out_img = sitk.ReadImage(str(next((res.datasets["cor"] / "imagesTr").iterdir())))
    # every voxel of the output sits at the same physical point as its source voxel
    for idx in [(0, 0, 0), (5, 7, 3), (23, 19, 7)]:
        p = img.TransformIndexToPhysicalPoint(idx)
        j = out_img.TransformPhysicalPointToIndex(p)
        assert out_img[j] == pytest.approx(img[idx]) and out_lab[j] == lab[idx]


@pytest.mark.parametrize("oblique,expected", [(0.0, "sag"), (20.0, "sag")])
def test_oblique_series_accepted(tmp_path, oblique, expected):
    site = tmp_path / "s"
    site.mkdir()
    img, _ = make_series("sag", oblique_deg=oblique)
    sitk.WriteImage(img, str(site / "a.nii.gz"))
    rows = [{"case_id": "A", "patient_id": "P", "site": "S", "field_strength": "3", "image": "a.nii.gz"}]
    res = _convert(site, rows, tmp_path / "raw")
    assert set(res.datasets) == {expected}
    targets = json.loads((res.datasets[expected] / "orthodiff_targets.json").read_text())
    assert [t["segmentation"] for t in targets["cases"].values()] == ["unlabeled"]


def test_ambiguous_plane_refused_unless_manifest_decides(tmp_path):
    site = tmp_path / "s"
    site.mkdir()
    img, _ = make_series("ax")
    # slice normal halfway between S-I and A-P: 45 degrees from both
    d = np.array(img.GetDirection()).reshape(3, 3)
    r = np.eye(3)
    c = np.cos(np.radians(45))
    r[1, 1], r[1, 2], r[2, 1], r[2, 2] = c, -c, c, c
    img.SetDirection((r @ d).flatten().tolist())
    sitk.WriteImage(img, str(site / "a.nii.gz"))
    row = {"case_id": "A", "patient_id": "P", "site": "S", "field_strength": "3", "image": "a.nii.gz"}
    with pytest.raises(ConversionError, match=r"line 2 \(case A\).*45 degrees.*orientation"):
        _convert(site, [row], tmp_path / "raw")
    res = _convert(site, [dict(row, orientation="axial")], tmp_path / "raw")
    assert set(res.datasets) == {"ax"} and res.warnings


def test_manifest_orientation_contradicting_geometry_refused(tmp_path):
    site = tmp_path / "s"
    site.mkdir()
    img, _ = make_series("cor")
    sitk.WriteImage(img, str(site / "a.nii.gz"))
    row = {"case_id": "A", "patient_id": "P", "site": "S", "field_strength": "3", "image": "a.nii.gz",
           "orientation": "sag"}
    with pytest.raises(ConversionError, match="manifest says sag but the slice normal says cor"):
        _convert(site, [row], tmp_path / "raw")


def test_rerun_is_idempotent_and_adding_cases_leaves_others_untouched(small_site, tmp_path):
    site, rows = small_site
    raw = tmp_path / "raw"
    first_rows = [r for r in rows if r["case_id"] != "EX4"]
    res1 = _convert(site, first_rows, raw)
    assert res1.added == 9
    files1 = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in raw.rglob("*.nii.gz")}

    res2 = _convert(site, first_rows, raw)
    assert (res2.added, res2.updated, res2.unchanged) == (0, 0, 9)
    files2 = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in raw.rglob("*.nii.gz")}
    assert files2 == files1

    res3 = _convert(site, rows, raw)
    assert (res3.added, res3.unchanged) == (3, 9)
    files3 = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in raw.rglob("*.nii.gz")}
    for p, v in files1.items():
        assert files3[p] == v  # same inode, mtime and bytes
    assert len(files3) == len(files1) + 6
    assert json.loads((res3.datasets["ax"] / "dataset.json").read_text())["numTraining"] == 4
    assert not (raw / ".orthodiff_tmp").exists() or not any((raw / ".orthodiff_tmp").iterdir())


def test_dry_run_writes_nothing(small_site, tmp_path):
    site, rows = small_site
    raw = tmp_path / "raw"
    res = _convert(site, rows, raw, dry_run=True)
    assert res.dry_run and res.num_cases == {"sag": 4, "cor": 4, "ax": 4}
    assert not raw.exists()


def test_external_site_goes_to_imagesTs_without_splits(small_site, tmp_path):
    site, rows = small_site
    res = _convert(site, rows, tmp_path / "raw", external=True)
    folder = res.datasets["sag"]
    assert len(list((folder / "imagesTs").iterdir())) == 4 and len(list((folder / "labelsTs").iterdir())) == 4
    assert not (folder / "imagesTr").exists() and not (folder / "splits_final.json").exists()
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["orthodiff"]["external"] is True and ds["numTraining"] == 0


def test_outputs_hold_pseudonyms_only_and_key_file_stays_outside(small_site, tmp_path):
    site, rows = small_site
    raw = tmp_path / "raw"
    for r in rows:
        r["case_id"] = "ACC" + r["case_id"] + "77"
        r["patient_id"] = "MRN" + r["patient_id"] + "99"
    with pytest.raises(ConversionError, match="inside"):
        _convert(site, rows, raw, key_file=raw / "keys.csv")
    assert not any(raw.glob("Dataset*"))  # nothing was moved into place
    key_csv = tmp_path / "private" / "key.csv"
    res = _convert(site, rows, raw, key_file=key_csv)
    text = _all_output_text(raw)
    for r in rows:
        assert r["case_id"] not in text and r["patient_id"] not in text
    key_text = key_csv.read_text()
    case = next(iter(json.loads((res.datasets["sag"] / "orthodiff_targets.json").read_text())["cases"]))
    assert case in key_text and "ACCEX177" in key_text
    assert oct(key_csv.stat().st_mode & 0o777) == "0o600"
    # a new key gives other pseudonyms; the same key gives the same ones
    again = _convert(site, rows, raw)
    assert again.unchanged == 12


def test_converted_dataset_passes_nnunet_integrity_check(small_site, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    site, rows = small_site
    res = _convert(site, rows, tmp_path / "raw")
    for folder in res.datasets.values():
        verify_dataset_integrity(str(folder), num_processes=1)


# ---------------------------------------------------------------------------------------------
# bad input: each class refused with every bad case named and the fix, nothing written


def _one(tmp_path, name="a", **series_kw):
    site = tmp_path / "s"
    site.mkdir(exist_ok=True)
    img, lab = make_series(**series_kw)
    sitk.WriteImage(img, str(site / f"{name}.nii.gz"))
    sitk.WriteImage(lab, str(site / f"{name}_seg.nii.gz"))
    return site, {"case_id": name.upper(), "patient_id": "P" + name, "site": "S", "field_strength": "3",
                  "image": f"{name}.nii.gz", "label": f"{name}_seg.nii.gz"}


def _refused(tmp_path, site, rows, *patterns):
    raw = tmp_path / "raw"
    with pytest.raises(ConversionError) as err:
        _convert(site, rows, raw)
    for p in patterns:
        assert p in str(err.value), str(err.value)
    assert not any(raw.glob("Dataset*"))
    return str(err.value)


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda im: im.SetSpacing((0.5, 0.6, 3.0)), "spacing"),
        (lambda im: im.SetOrigin((-10.0, 25.0, 35.0)), "origin"),
        (lambda im: im.SetDirection(np.eye(3).flatten().tolist()), "direction"),
    ],
)
def test_label_geometry_mismatch_refused(tmp_path, change, expected):
    site, row = _one(tmp_path)
    lab = sitk.ReadImage(str(site / "a_seg.nii.gz"))
    change(lab)
    sitk.WriteImage(lab, str(site / "a_seg.nii.gz"))
    msg = _refused(tmp_path, site, [row], "case A", "does not match the image grid", expected, "resample")
    assert "nearest neighbour" in msg


def test_label_size_mismatch_refused(tmp_path):
    site, row = _one(tmp_path)
    _, lab = make_series(size=(24, 20, 7))
    sitk.WriteImage(lab, str(site / "a_seg.nii.gz"))
    _refused(tmp_path, site, [row], "case A", "size (24, 20, 7) != image (24, 20, 8)")


def test_tiny_header_noise_is_tolerated(tmp_path):
    site, row = _one(tmp_path)
    lab = sitk.ReadImage(str(site / "a_seg.nii.gz"))
    lab.SetOrigin(tuple(o + 1e-5 for o in lab.GetOrigin()))
    sitk.WriteImage(lab, str(site / "a_seg.nii.gz"))
    assert _convert(site, [row], tmp_path / "raw").num_cases == {"sag": 1}


def test_unknown_label_values_refused_and_remap_fixes_them(tmp_path):
    site, row = _one(tmp_path)
    lab = sitk.ReadImage(str(site / "a_seg.nii.gz"))
    arr = sitk.GetArrayFromImage(lab)
    arr[arr == 5] = 42
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(lab)
    sitk.WriteImage(new, str(site / "a_seg.nii.gz"))
    _refused(tmp_path, site, [row], "case A", "label values [42]", "label_remap")
    table = tmp_path / "remap.json"
    table.write_text(json.dumps({"name": "mine", "mapping": {"0": 0, "1": 1, "42": 5}, "unmapped": "error"}))
    res = _convert(site, [dict(row, label_remap=str(table))], tmp_path / "raw")
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(next((res.datasets["sag"] / "labelsTr").iterdir()))))
    assert set(np.unique(out)) == {0, 1, 5}


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])  # ITK's NIfTI reader would hide NaN as 0
def test_nan_inf_refused(tmp_path, bad, ending):
    site, row = _one(tmp_path)
    img = sitk.ReadImage(str(site / "a.nii.gz"))
    arr = sitk.GetArrayFromImage(img)
    arr[3, 4, 5] = bad
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(img)
    sitk.WriteImage(new, str(site / f"a{ending}"))
    _refused(tmp_path, site, [dict(row, image=f"a{ending}")], "case A", "1 NaN/Inf voxel")


@pytest.mark.parametrize("value,expected", [(0.0, "empty (all zero)"), (7.0, "constant (7)")])
def test_empty_and_constant_volumes_refused(tmp_path, value, expected):
    site, row = _one(tmp_path)
    img = sitk.ReadImage(str(site / "a.nii.gz"))
    new = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(img).shape, value, np.float32))
    new.CopyInformation(img)
    sitk.WriteImage(new, str(site / "a.nii.gz"))
    _refused(tmp_path, site, [row], "case A", expected)


def test_non_3d_refused(tmp_path):
    site, row_a = _one(tmp_path, "a")
    site, row_b = _one(tmp_path, "b")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 24), np.float32)), str(site / "a.nii.gz"))
    four = sitk.JoinSeries([sitk.ReadImage(str(site / "b.nii.gz"))] * 2)
    sitk.WriteImage(four, str(site / "b.nii.gz"))
    msg = _refused(tmp_path, site, [row_a, row_b], "case A", "case B", "2D", "4D")
    assert msg.count("3D series is needed") == 2


def test_single_slice_refused(tmp_path):
    site, row = _one(tmp_path, size=(24, 20, 1))
    _refused(tmp_path, site, [row], "case A", "single slice")


def test_duplicate_case_ids_refused(tmp_path):
    site, row_a = _one(tmp_path, "a")
    site, row_b = _one(tmp_path, "b")
    row_b = dict(row_b, case_id="A", patient_id="Pa")  # second sagittal series of exam A
    _refused(tmp_path, site, [row_a, row_b], "manifest lines 2 and 3 (case A)", "same exam")


def test_missing_files_listed_together(tmp_path):
    site, row_a = _one(tmp_path, "a")
    site, row_b = _one(tmp_path, "b")
    os.remove(site / "a.nii.gz")
    os.remove(site / "b_seg.nii.gz")
    _refused(tmp_path, site, [row_a, row_b], "line 2 (case A): image a.nii.gz not found",
             "line 3 (case B): label map b_seg.nii.gz not found")


def test_corrupt_files_refused(tmp_path):
    # ITK would zero-fill a truncated .nii.gz silently; garbage .mha is refused by ITK itself
    site, row_a = _one(tmp_path, "a")
    site, row_b = _one(tmp_path, "b")
    data = (site / "a.nii.gz").read_bytes()
    (site / "a.nii.gz").write_bytes(data[: len(data) // 3])
    (site / "b.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n" + os.urandom(200))
    _refused(tmp_path, site, [row_a, dict(row_b, image="b.mha")], "case A): cannot read a.nii.gz",
             "case B): cannot read b.mha")


def test_manifest_problems_all_reported(tmp_path):
    site, row = _one(tmp_path)
    rows = [dict(row, field_strength="3000", ACL="maybe", orientation="oblique", Foo="x", echo="first")]
    raw = tmp_path / "raw"
    with pytest.raises(ConversionError) as err:
        _convert(site, rows, raw)
    msg = str(err.value)
    for part in ("millitesla", "label ACL = 'maybe'", "unknown orientation 'oblique'", "unknown column(s) Foo",
                 "echo 'first'"):
        assert part in msg, msg
    assert "5 problem(s)" in msg


def test_missing_required_column(tmp_path):
    site, row = _one(tmp_path)
    del row["field_strength"]
    _refused(tmp_path, site, [row], "lacks required column(s) field_strength")


def test_inconsistent_exam_rows_refused(tmp_path):
    site, row_a = _one(tmp_path, "a", orientation="sag")
    site, row_b = _one(tmp_path, "b", orientation="cor")
    row_b = dict(row_b, case_id="A", field_strength="1.5")
    _refused(tmp_path, site, [row_a, row_b], "disagree on field_strength_t")


def test_dataset_id_taken_by_other_dataset(small_site, tmp_path):
    site, rows = small_site
    raw = tmp_path / "raw"
    (raw / "Dataset502_Other").mkdir(parents=True)
    with pytest.raises(ConversionError, match="dataset id 502 is taken by Dataset502_Other"):
        _convert(site, rows, raw)
    assert [p.name for p in raw.iterdir()] == ["Dataset502_Other"]


def test_cli_convert_dry_run_and_error_exit(small_site, tmp_path, capsys):
    from orthodiff_nnunet.cli import main

    site, rows = small_site
    manifest = write_manifest(site / "manifest.csv", rows)
    raw = tmp_path / "raw"
    assert main(["convert", str(manifest), "-d", "501", "-n", "KneeCli", "--raw", str(raw), "--dry-run", "-np", "1"]) == 0
    assert "dry run" in capsys.readouterr().out and not raw.exists()
    os.remove(site / rows[0]["image"])
    assert main(["convert", str(manifest), "-d", "501", "-n", "KneeCli", "--raw", str(raw), "-np", "1"]) == 2
    assert "not found" in capsys.readouterr().err
