"""A site's real inputs read right on the first try: damaged DICOM slices, slice counts, manifests from
spreadsheets, paths, formats, MRNet exams missing a plane.

Every test builds its own data (DICOM with pydicom through ``write_series``, NIfTI with SimpleITK,
MRNet-like ``.npy`` folders) and checks a known answer.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import make_series, write_manifest
from orthodiff_nnunet.api import convert
from orthodiff_nnunet.data.targets import match_exams, read_targets
from orthodiff_nnunet.dataset_conversion.manifest import read_manifest
from orthodiff_nnunet.dataset_conversion.mrnet import MRNetError, convert_mrnet
from orthodiff_nnunet.errors import ConversionError
from orthodiff_nnunet.io.dicom import DicomError, read_series, write_series

#: sagittal, right-handed (k = i x j), as a DICOM reader returns it
SAG = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float).flatten().tolist()
SPACING = (0.5, 0.55, 3.0)


def _series(folder: Path, n_slices: int = 6, seed: int = 0, **kw) -> tuple[np.ndarray, list[Path]]:
    arr = np.random.default_rng(seed).integers(1, 3000, (n_slices, 10, 12)).astype(np.int16)
    return arr, write_series(folder, arr, SPACING, (0.0, 0.0, 0.0), SAG, **kw)


def _damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":  # cut inside the pixel data (10x12 int16 = 240 bytes)
        path.write_bytes(data[:-100])
    elif kind == "truncated-header":  # cut inside the header, before Rows/Columns
        path.write_bytes(data[:300])
    elif kind == "no-pixel-data":
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
    else:
        raise AssertionError(kind)


REASONS = {
    "zero-byte": "empty: 0 bytes",
    "truncated": "truncated: its pixel data holds 140 of 240 bytes",
    "truncated-header": "truncated: its 300 bytes end before the image attributes",
    "no-pixel-data": "no pixel data",
}
POSITIONS = {"first": 0, "middle": 3, "last": 5}


# ----------------------------------------------------------------------------------------------
# damaged DICOM files are refused by name, wherever they sit in the series


@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("kind", list(REASONS))
def test_damaged_slice_refused_by_name(tmp_path: Path, kind: str, position: str) -> None:
    _, files = _series(tmp_path)
    victim = files[POSITIONS[position]]
    _damage(victim, kind)
    with pytest.raises(DicomError) as err:
        read_series(tmp_path)
    msg = str(err.value)
    assert f"{victim.name} ({REASONS[kind]}" in msg, msg
    assert "1 file(s) of the series folder cannot be read" in msg and "replace them" in msg
    assert "unevenly spaced" not in msg
    assert str(tmp_path) not in msg  # the file's name only, never its folder


def test_damaged_file_given_as_the_image_is_named(tmp_path: Path) -> None:
    _, files = _series(tmp_path)
    _damage(files[0], "zero-byte")
    with pytest.raises(DicomError, match=r"IM_S0001_00001.dcm \(empty: 0 bytes\) cannot be read"):
        read_series(files[0])


def test_uid_named_damaged_file_is_shortened(tmp_path: Path) -> None:
    _, files = _series(tmp_path)
    uid_name = tmp_path / "1.2.826.0.1.3680043.8.498.12345678901234567890.dcm"
    files[5].rename(uid_name)
    _damage(uid_name, "truncated")
    with pytest.raises(DicomError) as err:
        read_series(tmp_path)
    assert "...567890.dcm (truncated" in str(err.value)
    assert "3680043" not in str(err.value)


def test_clean_series_with_stray_files_still_reads(tmp_path: Path) -> None:
    arr, _ = _series(tmp_path, seed=3)
    (tmp_path / "notes.txt").write_text("exported from PACS")
    (tmp_path / "preview.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a real jpeg")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (echo,) = read_series(tmp_path)
    assert np.array_equal(sitk.GetArrayFromImage(echo.image), arr)
    assert echo.image.GetSpacing() == pytest.approx(SPACING)


def _convert(site: Path, rows: list[dict], raw: Path, **kw):
    manifest = write_manifest(site / "manifest.csv", rows)
    kw.setdefault("num_processes", 1)
    return convert(manifest, 531, "Inputs", raw=raw, **kw)


def test_damaged_edge_slice_refused_through_convert_and_clean_series_converts(tmp_path: Path) -> None:
    site = tmp_path / "site"
    arr, files = _series(site / "exam1", seed=4)
    row = {"case_id": "EX1", "patient_id": "P1", "site": "S", "field_strength": "3", "image": "exam1"}
    good = files[-1].read_bytes()
    _damage(files[-1], "no-pixel-data")
    raw = tmp_path / "raw"
    with pytest.raises(ConversionError) as err:
        _convert(site, [row], raw)
    assert "manifest line 2 (case EX1)" in str(err.value) and "IM_S0001_00006.dcm (no pixel data" in str(err.value)
    assert not any(raw.glob("Dataset*"))
    files[-1].write_bytes(good)
    result = _convert(site, [row], raw)
    assert result.num_cases == {"sag": 1}
    (image,) = (result.datasets["sag"] / "imagesTr").iterdir()
    out = sitk.ReadImage(str(image))
    assert sorted(out.GetSize()) == [6, 10, 12]  # all six slices
    assert sorted(np.unique(sitk.GetArrayFromImage(out)).tolist()) == sorted(np.unique(arr).tolist())


# ----------------------------------------------------------------------------------------------
# slices deleted outright: what the headers say the series holds


def _set(files: list[Path], **values) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        for k, v in values.items():
            setattr(ds, k, v)
        ds.save_as(f)


@pytest.mark.parametrize("position", ["first", "last"])
def test_lost_edge_slice_found_by_images_in_acquisition(tmp_path: Path, position: str) -> None:
    _, files = _series(tmp_path)
    _set(files, ImagesInAcquisition=6, AcquisitionNumber=1)
    files[POSITIONS[position]].unlink()
    with pytest.raises(DicomError, match=r"acquisition has 6 images \(ImagesInAcquisition\) but the folder holds 5"):
        read_series(tmp_path)


def test_one_echo_of_a_two_echo_acquisition_is_complete(tmp_path: Path) -> None:
    # like the real pyKNEEr DESS folder: every other instance (one echo), ImagesInAcquisition twice the files
    arr, files = _series(tmp_path, n_slices=12, seed=5)
    _set(files, ImagesInAcquisition=12, AcquisitionNumber=1)
    kept = arr[0::2]
    for f in files[1::2]:
        f.unlink()
    # the kept slices are 6 mm apart: instance numbers 1, 3, ..., 11 advance by a constant step of 2
    (echo,) = read_series(tmp_path)
    assert np.array_equal(sitk.GetArrayFromImage(echo.image), kept)
    assert echo.image.GetSpacing()[2] == pytest.approx(6.0)


def test_lost_middle_slice_names_the_instance_number(tmp_path: Path) -> None:
    _, files = _series(tmp_path, n_slices=8)
    files[4].unlink()
    with pytest.raises(DicomError, match=r"slices are missing: InstanceNumber runs from 1 to 8 in steps of 1 but "
                                         r"1 number\(s\) are absent \(5\)"):
        read_series(tmp_path)


def test_echo_with_a_lost_last_slice(tmp_path: Path) -> None:
    arr = np.random.default_rng(6).integers(1, 3000, (6, 10, 12)).astype(np.int16)
    files = write_series(tmp_path, arr, SPACING, (0.0, 0.0, 0.0), SAG, echo_times=[10.0, 20.0])
    files[-1].unlink()  # echo 2, last slice: its geometry alone is still even
    (first,) = read_series(tmp_path, echo=1)
    assert np.array_equal(sitk.GetArrayFromImage(first.image), arr)
    with pytest.raises(DicomError, match="echo 2 of 2: slices are missing: this echo has 5 files where another"):
        read_series(tmp_path, echo=2)


# ----------------------------------------------------------------------------------------------
# manifests from spreadsheets


HEADER = ["case_id", "patient_id", "site", "field_strength", "vendor", "image"]
ROWS = [["EXÄ1", "Pé1", "Görlitz", "1.5", "Siemens", "a.nii.gz"], ["EX2", "P2", "Görlitz", "3", "GE", "a.nii.gz"]]


def _manifest_text(delimiter: str = ",", decimal: str = ".", blank_rows: int = 0) -> str:
    lines = [delimiter.join(HEADER)]
    for r in ROWS:
        lines.append(delimiter.join([*r[:3], r[3].replace(".", decimal), *r[4:]]))
    lines += [delimiter * (len(HEADER) - 1)] * blank_rows  # what spreadsheets leave below the table
    return "\r\n".join(lines) + "\r\n"


@pytest.mark.parametrize(
    "encoding,delimiter,decimal",
    [
        ("utf-8", ",", "."),
        ("utf-8-sig", ",", "."),  # Excel "CSV UTF-8"
        ("cp1252", ",", "."),  # Excel "CSV" on Windows
        ("latin-1", ";", ","),  # a German-locale spreadsheet: semicolons, decimal comma
        ("utf-16", "\t", "."),  # Excel "Unicode text": UTF-16 with BOM, tab-separated
        ("utf-16-le", ",", "."),  # UTF-16 without BOM
    ],
)
def test_manifest_encodings_and_separators(tmp_path: Path, encoding: str, delimiter: str, decimal: str) -> None:
    (tmp_path / "a.nii.gz").write_bytes(b"placeholder")
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(_manifest_text(delimiter, decimal, blank_rows=2).encode(encoding))
    rows, _ = read_manifest(manifest)
    assert [(r.row, r.case_id, r.patient_id, r.site, r.field_strength_t) for r in rows] == [
        (2, "EXÄ1", "Pé1", "Görlitz", 1.5), (3, "EX2", "P2", "Görlitz", 3.0)]


def test_undecodable_manifest_names_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "a.nii.gz").write_bytes(b"placeholder")
    manifest = tmp_path / "manifest.csv"
    # 0x81 is neither UTF-8 nor Windows-1252: line 3, byte column 5
    manifest.write_bytes(_manifest_text().encode("cp1252").replace(b"EX2,", b"EX2,\x81", 1))
    with pytest.raises(ConversionError) as err:
        read_manifest(manifest)
    msg = str(err.value)
    assert "not readable as UTF-8 nor Windows-1252 (Latin-1) text: byte 0x81 at line 3, column 5" in msg, msg
    assert "CSV UTF-8" in msg and "Traceback" not in msg


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\r\n\r\n  \r\n", b"\xff\xfe"])
def test_empty_manifest_says_empty(tmp_path: Path, content: bytes) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(content)
    with pytest.raises(ConversionError) as err:
        read_manifest(manifest)
    assert f"manifest manifest.csv is empty ({len(content)} bytes, no header row)" in str(err.value)
    assert "lacks required" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# paths and formats


def _nifti_site(tmp_path: Path, name: str = "a", folder: str = "site") -> tuple[Path, dict]:
    site = tmp_path / folder
    site.mkdir(parents=True, exist_ok=True)
    img, lab = make_series()
    sitk.WriteImage(img, str(site / f"{name}.nii.gz"))
    sitk.WriteImage(lab, str(site / f"{name}_seg.nii.gz"))
    return site, {"case_id": name.upper(), "patient_id": "P" + name, "site": "S", "field_strength": "3",
                  "image": f"{name}.nii.gz", "label": f"{name}_seg.nii.gz"}


def test_label_remap_path_starts_at_the_site_folder(tmp_path: Path, monkeypatch) -> None:
    site, row = _nifti_site(tmp_path)
    lab = sitk.ReadImage(str(site / "a_seg.nii.gz"))
    arr = sitk.GetArrayFromImage(lab)
    arr[arr == 5] = 42  # a source value the table maps onto 5
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(lab)
    sitk.WriteImage(new, str(site / "a_seg.nii.gz"))
    (site / "tables").mkdir()
    (site / "tables" / "mine.json").write_text(
        json.dumps({"name": "mine", "mapping": {"0": 0, "1": 1, "42": 5}, "unmapped": "error"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the table must be found from the manifest's folder, not from here
    result = _convert(site, [dict(row, label_remap="tables/mine.json")], tmp_path / "raw")
    (label,) = (result.datasets["sag"] / "labelsTr").iterdir()
    assert sorted(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(label)))).tolist()) == [0, 1, 5]
    with pytest.raises(ConversionError, match=r"label_remap 'tables/nope.json' is neither a built-in table \(oai_zib"):
        _convert(site, [dict(row, label_remap="tables/nope.json")], tmp_path / "raw2")


def test_paths_outside_the_site_folder(tmp_path: Path, capsys) -> None:
    site, row = _nifti_site(tmp_path)
    _, other = _nifti_site(tmp_path, "b", folder="other_site")
    outside = [
        dict(other, image="../other_site/b.nii.gz", label="../other_site/b_seg.nii.gz"),
        dict(other, case_id="C", image=str(tmp_path / "other_site" / "b.nii.gz"), label=""),
    ]
    raw = tmp_path / "raw"
    with pytest.raises(ConversionError) as err:
        _convert(site, [row, *outside], raw, dry_run=True)
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "manifest line 3 (case B): image ../other_site/b.nii.gz lies outside the site folder" in msg
    assert "manifest line 3 (case B): label ../other_site/b_seg.nii.gz lies outside" in msg
    assert "manifest line 4 (case C): image" in msg and "--allow-outside-site" in msg
    result = _convert(site, [row, *outside], raw, dry_run=True, allow_outside_site=True)
    assert result.num_cases == {"sag": 3}
    # an absolute path inside the site folder is fine without the flag
    assert _convert(site, [dict(row, image=str(site / "a.nii.gz"))], raw, dry_run=True).num_cases == {"sag": 1}
    from orthodiff_nnunet.cli import main

    manifest = write_manifest(site / "manifest.csv", [row, *outside])
    argv = ["convert", str(manifest), "-d", "531", "-n", "Inputs", "--raw", str(raw), "--dry-run", "-np", "1"]
    assert main(argv) == 2
    assert "--allow-outside-site" in capsys.readouterr().err
    assert main([*argv, "--allow-outside-site"]) == 0


def test_windows_separators_in_paths(tmp_path: Path) -> None:
    site, row = _nifti_site(tmp_path / "x", "a", folder="site/sub")
    site = site.parent
    rows, _ = read_manifest(write_manifest(site / "m.csv", [dict(row, image="sub\\a.nii.gz", label="sub\\a_seg.nii.gz")]))
    assert rows[0].image == site / "sub" / "a.nii.gz" and rows[0].label == site / "sub" / "a_seg.nii.gz"


def test_unaccepted_formats_are_named(tmp_path: Path) -> None:
    site, row = _nifti_site(tmp_path)
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(site / "slice.png"))
    (site / "lab.png").write_bytes((site / "slice.png").read_bytes())
    with pytest.raises(ConversionError) as err:
        read_manifest(write_manifest(site / "m.csv", [dict(row, image="slice.png"), dict(row, case_id="B", label="lab.png")]))
    msg = str(err.value)
    assert "line 2 (case A): image slice.png: the .png format is not accepted; accepted images are a DICOM series" in msg
    assert ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd" in msg and "not a readable DICOM" not in msg
    assert "line 3 (case B): label map lab.png is not a .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd file" in msg


def test_geometry_messages_print_plain_numbers(tmp_path: Path) -> None:
    site, row = _nifti_site(tmp_path)
    lab = sitk.ReadImage(str(site / "a_seg.nii.gz"))
    lab.SetSpacing((0.5, 0.6, 3.0))
    sitk.WriteImage(lab, str(site / "a_seg.nii.gz"))
    with pytest.raises(ConversionError) as err:
        _convert(site, [row], tmp_path / "raw")
    assert "spacing (0.5, 0.6, 3.0) != image (0.5, 0.5, 3.0) mm" in str(err.value)
    assert "np.float64" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# MRNet


MRNET_PLANES = {"sag": "sagittal", "cor": "coronal", "ax": "axial"}


def _mrnet(root: Path, planes_by_case: dict[str, tuple[str, ...]], labels: dict[str, tuple[int, int, int]],
           split: str = "train") -> Path:
    for folder in MRNET_PLANES.values():
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    for k, (case, planes) in enumerate(planes_by_case.items()):
        for j, plane in enumerate(planes):
            arr = np.random.default_rng(10 * k + j).integers(1, 255, (4, 12, 14)).astype(np.uint8)
            np.save(root / split / MRNET_PLANES[plane] / f"{case}.npy", arr)
    for i, name in enumerate(("abnormal", "acl", "meniscus")):
        with open(root / f"{split}-{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([(c, v[i]) for c, v in labels.items()])
    return root


def test_mrnet_exams_with_missing_planes_convert(tmp_path: Path) -> None:
    planes = {
        "0000": ("sag", "cor", "ax"),
        "0001": ("sag", "cor"),  # no axial
        "0002": ("sag",),  # sagittal only
        "0003": ("cor", "ax"),  # no sagittal
        "0009": ("sag",),  # sagittal only and in no label file
    }
    labels = {"0000": (0, 0, 0), "0001": (1, 1, 0), "0002": (1, 0, 1), "0003": (1, 1, 1)}
    root = _mrnet(tmp_path / "mrnet", planes, labels)
    raw, key_file = tmp_path / "raw", tmp_path / "private" / "key.csv"
    result = convert_mrnet(root, 740, spacing=(0.5, 0.5, 3.0), raw=raw, key_file=key_file, num_processes=1, num_folds=2)
    assert result.num_cases == {"sag": 4, "cor": 3, "ax": 2}
    note = next(w for w in result.warnings if "lack a plane" in w)
    assert note.startswith("MRNet: 4 of 5 exams lack a plane")
    assert "1 without sagittal (0003); 2 without coronal (0002, 0009); 3 without axial (0001, 0002, 0009)" in note
    with open(key_file, newline="") as f:
        source = {r["pseudonym"]: r["case_id"] for r in csv.DictReader(f)}
    views = {v: read_targets(result.datasets[v] / "orthodiff_targets.json") for v in ("sag", "cor", "ax")}
    exams = {source[next(iter(e.cases.values()))]: e for e in match_exams(views)}
    assert sorted(exams) == sorted(planes)
    for case, exam in exams.items():
        assert sorted(exam.cases) == sorted(planes[case])
        assert exam.missing_views(["sag", "cor", "ax"]) == [v for v in ("sag", "cor", "ax") if v not in planes[case]]
        expected = labels.get(case, (None, None, None))
        got = tuple(None if np.isnan(t) else int(t) for t in exam.targets)
        assert got == expected


def test_mrnet_spacing_needed_only_for_planes_converted(tmp_path: Path) -> None:
    root = _mrnet(tmp_path / "mrnet", {"0000": ("sag",), "0001": ("sag",)}, {"0000": (0, 0, 0), "0001": (1, 0, 0)})
    result = convert_mrnet(root, 750, spacing={"sag": (0.6, 0.6, 3.0)}, raw=tmp_path / "raw", dry_run=True,
                           num_processes=1)
    assert result.num_cases == {"sag": 2}
    with pytest.raises(MRNetError, match=r"have no volume in any plane under train/ \(0005\)"):
        convert_mrnet(root, 750, spacing=(0.6, 0.6, 3.0), raw=tmp_path / "raw", cases=["0000", "5"])


def test_mrnet_messages_name_the_path_below_the_folder_given(tmp_path: Path) -> None:
    root = _mrnet(tmp_path / "mrnet", {"0007": ("sag", "cor", "ax")}, {"0007": (0, 0, 0)}, split="valid")
    (root / "valid" / "axial" / "0007.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(MRNetError, match=r"^valid/axial/0007\.npy cannot be read as a numpy array"):
        convert_mrnet(root, 760, spacing=(0.5, 0.5, 3.0), raw=tmp_path / "raw", split="valid", dry_run=True,
                      num_processes=1)
    np.save(root / "valid" / "axial" / "0007.npy", np.zeros((3, 4), dtype=np.uint8))
    with pytest.raises(MRNetError, match=r"^valid/axial/0007\.npy has shape \(3, 4\)"):
        convert_mrnet(root, 760, spacing=(0.5, 0.5, 3.0), raw=tmp_path / "raw", split="valid", dry_run=True,
                      num_processes=1)


def test_mrnet_messages_print_plain_numbers(tmp_path: Path) -> None:
    root = _mrnet(tmp_path / "mrnet", {"0000": ("sag", "cor", "ax")}, {"0000": (0, 0, 0)})
    with pytest.raises(MRNetError) as err:
        convert_mrnet(root, 770, spacing=np.array([3.0, 0.6, 0.6]), raw=tmp_path / "raw")
    assert "spacing for sag (3, 0.6, 0.6) has in-plane pixels larger" in str(err.value)
    with pytest.raises(MRNetError) as err:
        convert_mrnet(root, 770, spacing=np.array([0.6, -0.6, 3.0]), raw=tmp_path / "raw")
    assert "got (0.6, -0.6, 3)" in str(err.value)
    with pytest.raises(MRNetError) as err:
        convert_mrnet(root, 770, spacing=(0.6, 0.6, 3.0), raw=tmp_path / "raw", field_strength_t=np.float64(40.0))
    assert "field strength 40 T is not plausible" in str(err.value)
    for e in (err,):
        assert "np.float64" not in str(e.value)


def test_windows_path_leading_out_of_the_site_folder_is_refused(tmp_path: Path) -> None:
    site, row = _nifti_site(tmp_path)
    _nifti_site(tmp_path, "b", folder="other_site")
    with pytest.raises(ConversionError, match=r"image \.\.\\other_site\\b\.nii\.gz lies outside the site folder"):
        read_manifest(write_manifest(site / "m.csv", [dict(row, image="..\\other_site\\b.nii.gz", label="")]))
