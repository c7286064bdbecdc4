"""DICOM SEG export: label maps written as DICOM Segmentations on their source series' slices.

Every check reads the SEG back (pydicom and highdicom) and compares it with the source DICOM files
independently of the writer: frame geometry against each referenced instance, and labels against
the label map looked up through SimpleITK at each source pixel's physical position.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import PLANE_DIRECTIONS, rotation, write_manifest
from orthodiff_nnunet.api import convert
from orthodiff_nnunet.cli import main
from orthodiff_nnunet.io.dicom import read_series, write_series
from orthodiff_nnunet.io.dicom_seg import (
    GRID_TOLERANCE_VOXELS,
    DicomSegError,
    build_dicom_seg,
    export_dicom_segs,
    label_names_from_dataset_json,
    read_key_table,
    write_dicom_seg,
)
from orthodiff_nnunet.orientation import to_canonical
from orthodiff_nnunet.schemes import KNEE_STRUCTURES

KNEE_NAMES = {v: k for k, v in KNEE_STRUCTURES.items() if v}
SECRET_ID = "MRN0099887"


def _series(folder: Path, orientation: str = "sag", oblique_deg: float = 0.0, echo_times=None, seed: int = 0,
            shape=(5, 14, 12), series_number: int = 3) -> list[Path]:
    rng = np.random.default_rng(seed)
    arr = rng.integers(100, 1000, size=((len(echo_times),) if echo_times else ()) + shape).astype(np.int16)
    direction = PLANE_DIRECTIONS[orientation]
    if oblique_deg:
        direction = rotation(2, oblique_deg) @ rotation(0, oblique_deg / 2) @ direction
    return write_series(folder, arr, spacing=(0.7, 0.6, 3.0), origin=(-5.0, 12.0, 30.0),
                        direction=direction.flatten().tolist(), echo_times=echo_times, series_number=series_number,
                        patient_id=SECRET_ID, patient_name="Roe^Richard")


def _known_labels(image: sitk.Image, values=(1, 2, 5, 8, 10)) -> sitk.Image:
    """A label map on ``image``'s grid: distinct blocks per value, so any flip or shift changes it."""
    lab = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)  # (k, j, i)
    nk, nj, ni = lab.shape
    lab[0:2, 0:nj // 2, 0:ni // 3] = values[0]
    lab[1:4, nj // 2:, ni // 2:] = values[1]
    lab[nk - 1, 1:3, :] = values[2]
    lab[2, 3, 1:5] = values[3]
    lab[nk - 2, nj - 1, ni - 1] = values[4]
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(image)
    return out


def _files_sorted(files: list[Path]) -> list[pydicom.Dataset]:
    """The source files along their slice normal (independently of the writer)."""
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.asarray(dss[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(dss, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, dtype=float))))


def _expected_on_slice(ds: pydicom.Dataset, labels: sitk.Image) -> np.ndarray:
    """The label map at each pixel centre of ``ds``: ITK's nearest-neighbour resampling onto the slice's own
    geometry, after checking that the slice's corner pixels sit on label-map voxel centres."""
    pos = np.asarray(ds.ImagePositionPatient, dtype=float)
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    dy, dx = (float(v) for v in ds.PixelSpacing)
    for r, c in ((0, 0), (0, ds.Columns - 1), (ds.Rows - 1, 0), (ds.Rows - 1, ds.Columns - 1)):
        point = pos + c * dx * iop[:3] + r * dy * iop[3:]
        index = np.asarray(labels.TransformPhysicalPointToContinuousIndex(point.tolist()))
        np.testing.assert_allclose(index, np.round(index), atol=GRID_TOLERANCE_VOXELS)
    ref = sitk.Image(int(ds.Columns), int(ds.Rows), 1, sitk.sitkUInt8)
    ref.SetOrigin(pos.tolist())
    ref.SetSpacing((dx, dy, 1.0))
    ref.SetDirection(np.stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])], axis=1).flatten().tolist())
    on_slice = sitk.Resample(labels, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return sitk.GetArrayFromImage(on_slice)[0].astype(np.int64)  # (rows, columns)


def _check_seg(seg_path: Path, source: list[pydicom.Dataset], labels: sitk.Image,
               names: dict[int, str], require_foreground: bool = True) -> hd.seg.Segmentation:
    """Everything the SEG must say about its source, and its labels voxel for voxel."""
    ds = pydicom.dcmread(seg_path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
    src_uids = [s.SOPInstanceUID for s in source]
    by_uid = {s.SOPInstanceUID: s for s in source}
    # same patient, study and frame of reference; the source series and every instance referenced
    assert ds.StudyInstanceUID == source[0].StudyInstanceUID and ds.PatientID == source[0].PatientID
    assert ds.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert ds.SeriesInstanceUID != source[0].SeriesInstanceUID
    (ref_series,) = ds.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == source[0].SeriesInstanceUID
    assert sorted(i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence) == sorted(src_uids)
    # one segment per named structure, numbered in label order, with the algorithm identified
    full = {"ACL": "anterior cruciate ligament", "PCL": "posterior cruciate ligament"}
    assert [s.SegmentLabel for s in ds.SegmentSequence] == [
        full.get(names[v], names[v].replace("_", " ")) for v in sorted(names)]
    assert len(ds.SegmentSequence) == len(names)
    assert all(s.SegmentAlgorithmType == "AUTOMATIC" and s.SegmentAlgorithmName == "OrthoDiff-nnU-Net"
               for s in ds.SegmentSequence)
    # every frame lies on its source slice: same position, orientation, pixel spacing
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    assert ds.NumberOfFrames == len(ds.PerFrameFunctionalGroupsSequence) > 0
    for frame in ds.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = by_uid[uid]
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
            [float(v) for v in src.ImagePositionPatient], abs=1e-4)
        assert iop == pytest.approx([float(v) for v in src.ImageOrientationPatient], abs=1e-6)
        assert spacing == pytest.approx([float(v) for v in src.PixelSpacing], abs=1e-6)
    # labels, source slice by source slice, equal the label map voxel for voxel
    seg = hd.seg.segread(seg_path)
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=src_uids, combine_segments=True,
                                            skip_overlap_checks=True)
    value_of = np.array([0] + sorted(names))
    expected = np.stack([_expected_on_slice(s, labels) for s in source])
    np.testing.assert_array_equal(value_of[got], expected)
    assert np.count_nonzero(expected) > 0 or not require_foreground
    return seg


def _dciodvfy_errors(path: Path, source_file: Path | None = None) -> list[str]:
    """dciodvfy's errors for ``path``, less those it reports for ``source_file`` too (values the SEG copies
    from its source: patient and study attributes)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed: the DICOM validation of the SEG was not run; "
                    "install dicom3tools to run it")

    def errors(p: Path) -> list[str]:
        run = subprocess.run([exe, str(p)], capture_output=True, text=True, timeout=60)
        return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]

    inherited = set(errors(source_file)) if source_file is not None else set()
    return [e for e in errors(path) if e not in inherited]


@pytest.mark.parametrize("orientation,oblique_deg", [("sag", 0.0), ("cor", 0.0), ("ax", 20.0)])
def test_seg_from_converted_grid_lies_on_source_slices(tmp_path, caplog, orientation, oblique_deg):
    folder = tmp_path / "Roe_Richard_knee"  # sites name folders after patients: never logged
    files = _series(folder, orientation, oblique_deg)
    image = read_series(folder)[0].image
    labels = to_canonical(_known_labels(image))  # what the converter and the predictor write: LPS layout
    assert labels.GetDirection() != image.GetDirection() or orientation == "ax"
    caplog.set_level(logging.DEBUG)
    out = write_dicom_seg(labels, folder, tmp_path / "private" / "seg.dcm", KNEE_NAMES)
    seg = _check_seg(out, _files_sorted(files), labels, KNEE_NAMES)
    assert len(seg.SegmentSequence) == 11  # every structure of the scheme, also those absent here
    assert SECRET_ID not in caplog.text and "Roe" not in caplog.text
    assert "Roe_Richard" not in caplog.text and str(tmp_path) not in caplog.text
    src_uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    assert not any(u in caplog.text for u in src_uids)
    assert _dciodvfy_errors(out) == []


def test_segment_codes_are_standard(tmp_path):
    files = _series(tmp_path / "dicom")
    labels = _known_labels(read_series(files[0])[0].image)
    _series(tmp_path / "dicom", series_number=4, seed=9)  # a second series in the folder
    with pytest.raises(DicomSegError, match="holds 2 DICOM series"):
        write_dicom_seg(labels, tmp_path / "dicom", tmp_path / "seg.dcm", KNEE_NAMES)
    out = write_dicom_seg(labels, files[0], tmp_path / "seg.dcm", KNEE_NAMES)  # one file: its series
    ds = pydicom.dcmread(out)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(files[0]).SeriesInstanceUID
    assert write_dicom_seg(labels, tmp_path / "dicom", tmp_path / "seg4.dcm", KNEE_NAMES, series=3) is not None
    by_label = {s.SegmentLabel: s for s in ds.SegmentSequence}

    def code(item, seq):
        c = getattr(item, seq)[0]
        return c.CodingSchemeDesignator, c.CodeValue

    assert code(by_label["femur"], "SegmentedPropertyTypeCodeSequence") == ("SCT", "71341001")
    assert code(by_label["tibia"], "SegmentedPropertyTypeCodeSequence") == ("SCT", "12611008")
    assert code(by_label["patella"], "SegmentedPropertyTypeCodeSequence") == ("SCT", "64234005")
    assert code(by_label["fibula"], "SegmentedPropertyTypeCodeSequence") == ("SCT", "87342007")
    assert code(by_label["femur"], "SegmentedPropertyCategoryCodeSequence") == ("SCT", "91723000")
    cart = by_label["tibial cartilage"]
    assert code(cart, "SegmentedPropertyCategoryCodeSequence") == ("SCT", "85756007")  # Tissue
    assert code(cart, "SegmentedPropertyTypeCodeSequence") == ("SCT", "309312004")  # cartilage tissue
    assert code(cart, "AnatomicRegionSequence") == ("SCT", "12611008")  # of the tibia
    mm = by_label["medial meniscus"].SegmentedPropertyTypeCodeSequence[0]
    assert (mm.CodeValue, mm.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue) == ("74135004", "255561001")
    pcl = by_label["posterior cruciate ligament"]
    pcl_type = pcl.SegmentedPropertyTypeCodeSequence[0]
    assert (pcl_type.CodeValue, pcl_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue) == (
        "52082005", "255551008")  # ligament, posterior
    assert code(pcl, "AnatomicRegionSequence") == ("SCT", "49076000")  # knee joint
    alg = by_label["femur"].SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "OrthoDiff-nnU-Net" and alg.AlgorithmVersion
    # the dataset alone (for a DICOMweb STOW): the same content, nothing written
    built = build_dicom_seg(labels, files[0], KNEE_NAMES, algorithm_parameters={"model": "m"})
    assert built.StudyInstanceUID == ds.StudyInstanceUID and built.SOPInstanceUID != ds.SOPInstanceUID
    assert [s.SegmentLabel for s in built.SegmentSequence] == [s.SegmentLabel for s in ds.SegmentSequence]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dicom", "seg.dcm", "seg4.dcm"]
    assert label_names_from_dataset_json({"labels": {"background": 0, "femur": 1, "ignore": 2}}) == {1: "femur"}


def test_multi_echo_seg_references_the_converted_echo(tmp_path):
    files = _series(tmp_path / "dicom", "sag", echo_times=[12.0, 45.0, 80.0])
    echoes = read_series(tmp_path / "dicom", echo="all")
    labels = to_canonical(_known_labels(echoes[1].image))
    out = write_dicom_seg(labels, tmp_path / "dicom", tmp_path / "seg_e2.dcm", KNEE_NAMES, echo=2)
    echo2 = [f for f in files if float(pydicom.dcmread(f, stop_before_pixels=True).EchoTime) == 45.0]
    assert len(echo2) == 5
    _check_seg(out, _files_sorted(echo2), labels, KNEE_NAMES)
    assert _dciodvfy_errors(out) == []


def test_grids_that_do_not_match_are_refused(tmp_path):
    _series(tmp_path / "dicom")
    image = read_series(tmp_path / "dicom")[0].image
    labels = _known_labels(image)
    shifted = sitk.Image(labels)
    shifted.SetOrigin([o + 0.3 for o in labels.GetOrigin()])
    resampled = sitk.Resample(labels, [s * 2 for s in labels.GetSize()[:2]] + [labels.GetSize()[2]], sitk.Transform(),
                              sitk.sitkNearestNeighbor, labels.GetOrigin(),
                              [labels.GetSpacing()[0] / 2, labels.GetSpacing()[1] / 2, labels.GetSpacing()[2]],
                              labels.GetDirection())
    cropped = labels[:, :, 1:]
    for bad, says in ((shifted, "does not lie on the label map's voxel grid"), (resampled, "differ in size"),
                      (cropped, "differ in size")):
        with pytest.raises(DicomSegError, match=says):
            write_dicom_seg(bad, tmp_path / "dicom", tmp_path / "seg.dcm", KNEE_NAMES)
    with pytest.raises(DicomSegError, match=r"values \[10\] that the label names do not name"):
        write_dicom_seg(labels, tmp_path / "dicom", tmp_path / "seg.dcm", {1: "femur", 2: "tibia", 5: "a", 8: "b"})
    assert not (tmp_path / "seg.dcm").exists()


def test_seg_refused_inside_nnunet_folders(tmp_path, monkeypatch):
    _series(tmp_path / "dicom")
    labels = _known_labels(read_series(tmp_path / "dicom")[0].image)
    for env in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(env, str(tmp_path / env))
        target = tmp_path / env / "Dataset001_X" / "seg.dcm"
        with pytest.raises(DicomSegError, match="outside the datasets"):
            write_dicom_seg(labels, tmp_path / "dicom", target, KNEE_NAMES)
        assert not target.exists()


def test_predicted_cases_to_segs_through_the_key_table(tmp_path, monkeypatch, capsys):
    """Converter path: convert with a key table, write masks as the predictor does, export SEGs per case."""
    site = tmp_path / "site"
    files = {
        "sag": _series(site / "exam1" / "sag", "sag", seed=1, series_number=3),
        "cor": _series(site / "exam1" / "cor", "cor", oblique_deg=12.0, seed=2, series_number=4),
        "echo": _series(site / "exam2" / "t2map", "sag", echo_times=[10.0, 40.0], seed=3, series_number=5),
    }
    nifti_img = sitk.GetImageFromArray(np.random.default_rng(4).integers(0, 500, (5, 14, 12)).astype(np.int16))
    nifti_img.SetSpacing((0.7, 0.6, 3.0))
    nifti_img.SetDirection(PLANE_DIRECTIONS["sag"].flatten().tolist())
    sitk.WriteImage(nifti_img, str(site / "exam3_sag.nii.gz"))
    base = {"patient_id": SECRET_ID, "site": "SiteA", "field_strength": "3", "vendor": "GE"}
    rows = [
        {**base, "case_id": "ACC-1", "image": "exam1/sag", "echo": ""},
        {**base, "case_id": "ACC-1", "image": "exam1/cor", "echo": ""},
        {**base, "case_id": "ACC-2", "image": "exam2/t2map", "echo": "all"},
        {**base, "case_id": "ACC-3", "image": "exam3_sag.nii.gz", "echo": ""},
    ]
    manifest = write_manifest(site / "manifest.csv", rows)
    raw, key = tmp_path / "nnUNet_raw", tmp_path / "private" / "key.csv"
    assert main(["convert", str(manifest), "-d", "311", "-n", "Seg", "--raw", str(raw), "-np", "1",
                 "--key-file", str(key)]) == 0
    sources = read_key_table(key)
    assert len(sources) == 5  # exam1 sag + cor, exam2 echoes 1 and 2 (sag), exam3 sag
    assert sorted((s.orientation, s.echo or 0) for s in sources.values()) == [
        ("cor", 0), ("sag", 0), ("sag", 0), ("sag", 1), ("sag", 2)]

    # masks as nnU-Net's predictor writes them: <case>.nii.gz on each converted image's grid, one folder per
    # plane's model (an exam's views share one case name)
    labels_of: dict[tuple[str, str], sitk.Image] = {}
    masks: dict[str, list[Path]] = {"sag": [], "cor": []}
    for o, suffix in (("sag", "Sag"), ("cor", "Cor")):
        (tmp_path / f"pred_{o}").mkdir()
        for img_path in sorted(raw.glob(f"Dataset*_Seg{suffix}/imagesTr/*_0000.nii.gz")):
            case = img_path.name[: -len("_0000.nii.gz")]
            labels_of[(case, o)] = _known_labels(sitk.ReadImage(str(img_path)), values=(1, 6, 8, 9, 11))
            masks[o].append(tmp_path / f"pred_{o}" / f"{case}.nii.gz")
            sitk.WriteImage(labels_of[(case, o)], str(masks[o][-1]))
    assert set(labels_of) == set(sources)
    masks["sag"].append(tmp_path / "pred_sag" / "unknowncase.nii.gz")

    monkeypatch.setenv("nnUNet_raw", str(raw))
    with pytest.raises(DicomSegError, match="outside the datasets"):
        export_dicom_segs(masks["sag"], raw / "segs", key, KNEE_NAMES, orientation="sag", site_root=site)
    out_dir = tmp_path / "private" / "segs"
    written: dict[tuple[str, str], Path] = {}
    for o in ("sag", "cor"):
        export = export_dicom_segs(masks[o], out_dir, key, KNEE_NAMES, orientation=o, site_root=site)
        written.update({(c, o): p for c, p in export.written.items()})
        if o == "sag":
            assert len(export.written) == 3
            assert export.skipped["unknowncase"].startswith("not in the key table")
            (nifti_case,) = [c for (c, _), s in sources.items() if s.image.endswith(".nii.gz")]
            assert export.skipped[nifti_case] == "converted from an image file, not a DICOM series"
            assert len(export.skipped) == 2
        else:
            assert len(export.written) == 1 and not export.skipped
    assert len(written) == 4
    for (case, o), path in written.items():
        src = sources[(case, o)]
        assert path.parent.name == src.exam and "ACC" not in str(path)
        if src.echo is not None:
            assert path.name == f"seg_sag_e{src.echo}.dcm"
            chosen = [f for f in files["echo"]
                      if float(pydicom.dcmread(f, stop_before_pixels=True).EchoTime) == (10.0, 40.0)[src.echo - 1]]
        else:
            assert path.name == f"seg_{src.orientation}.dcm"
            chosen = files[src.orientation]
        _check_seg(path, _files_sorted(chosen), labels_of[(case, o)], KNEE_NAMES)
    # exam1's sag and cor SEGs lie side by side in the exam's folder
    exam1 = sources[next(k for k in sources if k[1] == "cor")].exam
    assert sorted(p.name for p in (out_dir / exam1).iterdir()) == ["seg_cor.dcm", "seg_sag.dcm"]

    # an exam with two views and no orientation given: skipped with the reason
    both = export_dicom_segs([masks["cor"][0]], tmp_path / "private" / "segs2", key, KNEE_NAMES, site_root=site)
    assert "2 views of it (cor, sag)" in both.skipped[masks["cor"][0].name[: -len(".nii.gz")]] or \
        "2 views of it (sag, cor)" in both.skipped[masks["cor"][0].name[: -len(".nii.gz")]]
    # without --site-root the key table's folder is the site root: here it is not, so each case says why
    lost = export_dicom_segs(masks["cor"], tmp_path / "private" / "segs3", key, KNEE_NAMES, orientation="cor")
    assert list(lost.skipped.values()) == ["its source series is not found under the site folder; pass --site-root"]
    # a damaged mask: that case is skipped with the reason, nothing half-written
    damaged = tmp_path / "damaged" / masks["cor"][0].name
    damaged.parent.mkdir()
    whole = masks["cor"][0].read_bytes()
    damaged.write_bytes(whole[: len(whole) // 2])
    broken = export_dicom_segs([damaged], tmp_path / "private" / "segs4", key, KNEE_NAMES, orientation="cor",
                               site_root=site)
    assert list(broken.skipped.values()) == [f"the mask {damaged.name} cannot be read (missing or damaged); "
                                             "predict it again"]
    assert not (tmp_path / "private" / "segs4").exists() or not any((tmp_path / "private" / "segs4").rglob("*"))


@pytest.mark.realdata
def test_real_multi_echo_oblique_big_endian_series_to_seg(shared_data, tmp_path):
    """The real pymskt MESE T2 knee (8 echoes x 24 slices, 8 degrees oblique, big-endian): echo 3 converted
    with a key table, a label map on the converted grid, its SEG on echo 3's slices."""
    source = shared_data / "dicom" / "pymskt_mese_t2_sag_3t"
    manifest = write_manifest(tmp_path / "manifest.csv", [
        {"case_id": "MESE", "patient_id": "K2", "site": "pymskt", "field_strength": "3", "image": str(source),
         "echo": "3"}])
    raw, key = tmp_path / "raw", tmp_path / "private" / "key.csv"
    result = convert(manifest, 703, "RealSeg", raw=raw, num_processes=1, allow_outside_site=True, key_file=key)
    (image_path,) = sorted((result.datasets["sag"] / "imagesTr").glob("*_0000.nii.gz"))
    case = image_path.name[: -len("_0000.nii.gz")]
    labels = _known_labels(sitk.ReadImage(str(image_path)))
    assert labels.GetSize() == (24, 256, 256)  # canonical LPS: the sagittal slice axis first
    mask = tmp_path / "pred" / f"{case}.nii.gz"
    mask.parent.mkdir()
    sitk.WriteImage(labels, str(mask))
    export = export_dicom_segs([mask], tmp_path / "private" / "segs", key, KNEE_NAMES, orientation="sag")
    assert list(export.written) == [case] and not export.skipped
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(source.iterdir()) if f.is_file()]
    echo_times = sorted({float(h.EchoTime) for h in headers})
    assert len(echo_times) == 8
    echo3 = [h for h in headers if float(h.EchoTime) == echo_times[2]]
    iop = np.asarray(echo3[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    echo3.sort(key=lambda h: float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float))))
    _check_seg(export.written[case], echo3, labels, KNEE_NAMES)
    # the source's anonymised dates (00010101) are invalid DA values, copied into the SEG's patient and study
    assert _dciodvfy_errors(export.written[case], source_file=Path(echo3[0].filename)) == []


def test_predict_seg_cli_checks_dicom_seg_options_before_predicting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    args = ["predict", "seg", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "model")]
    assert main(args + ["--dicom-seg", str(tmp_path / "segs")]) == 2
    assert "--dicom-seg needs --key-file" in capsys.readouterr().err
    key = tmp_path / "key.csv"
    key.write_text("pseudonym,case_id,patient_pseudonym,patient_id,site,cases,series\n")
    assert main(args + ["--dicom-seg", str(tmp_path / "raw" / "segs"), "--key-file", str(key)]) == 2
    assert "outside the datasets" in capsys.readouterr().err
    assert main(args + ["--key-file", str(key)]) == 2
    assert "apply to --dicom-seg" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
