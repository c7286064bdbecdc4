"""The named steps the conversion and DICOM functions were split into (issue 17), each with known answers.

The public functions' tests (test_convert, test_scan, test_dicom, ...) run these steps end to end;
here each step is fed a small hand-made input whose answer is worked out by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from orthodiff_nnunet.dataset_conversion import site_converter as sc
from orthodiff_nnunet.dataset_conversion.manifest import ManifestRow, _disagreeing_exams, _open_choices, _row_values
from orthodiff_nnunet.dataset_conversion.scan import SeriesScan, _series_column, _series_notes
from orthodiff_nnunet.io.dicom import DicomError, _echo_indices, _pixel_array, _right_handed
from orthodiff_nnunet.io.dicom_seg import DicomSegError, _segment_pixels
from orthodiff_nnunet.remap import load_remap_table

# columns of the SimpleITK direction = the i, j, k axes in LPS; k along x (left-right): a sagittal stack
SAGITTAL = (0.0, 0.0, 1.0,
            1.0, 0.0, 0.0,
            0.0, 1.0, 0.0)


def _row(**kw) -> ManifestRow:
    values = dict(row=2, case_id="c1", patient_id="p1", site="A", field_strength_t=3.0, vendor="", image=Path("x"),
                  orientation=None, label=None, label_remap=None, series=None, echo=None)
    values.update(kw)
    return ManifestRow(**values)


def _image(direction=SAGITTAL, spacing=(0.5, 0.5, 3.0), size=(4, 3, 2)) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


# ----------------------------------------------------------------------------------------------
# site_converter


def test_decide_orientation_checks_the_manifest_and_falls_back_only_when_it_names_the_plane():
    orientation, plane = sc._decide_orientation(_image(), _row(), 35.0)
    assert orientation == "sag" and plane.obliquity_deg == pytest.approx(0.0)
    with pytest.raises(sc._EchoRefused, match="the manifest says cor but the slice normal says sag .0 degrees"):
        sc._decide_orientation(_image(), _row(orientation="cor"), 35.0)
    # slice normal halfway between x and y: 45 degrees from both, beyond the 35 degree limit
    c = math.sqrt(0.5)
    oblique = (-c, 0.0, c,
               c, 0.0, c,
               0.0, 1.0, 0.0)
    with pytest.raises(sc._EchoRefused, match="plane cannot be decided: .*45 degrees"):
        sc._decide_orientation(_image(direction=oblique), _row(), 35.0)
    assert sc._decide_orientation(_image(direction=oblique), _row(orientation="ax"), 35.0) == ("ax", None)


def test_label_values_remaps_and_refuses_what_the_scheme_lacks():
    image = _image()
    lab = np.zeros((2, 3, 4), dtype=np.int16)  # (k, j, i)
    lab[0, 0, :3] = [1, 3, 5]  # oai_zib: femur 1 -> 1, tibia 3 -> 2, patella 5 -> 3
    label = sitk.GetImageFromArray(lab)
    label.CopyInformation(image)
    remap = load_remap_table("oai_zib")
    out = sc._label_values(image, label, "lab.nii.gz", remap, {0, 1, 2, 3}, sc.GeometryTolerance())
    assert out[0, 0, :4].tolist() == [1, 2, 3, 0] and int(out.sum()) == 6

    with pytest.raises(sc._EchoRefused, match=r"label values \[3\] are not in the dataset's labels \[0, 1, 2\]"):
        sc._label_values(image, label, "lab.nii.gz", remap, {0, 1, 2}, sc.GeometryTolerance())
    lab[1, 2, 3] = 12
    label12 = sitk.GetImageFromArray(lab)
    label12.CopyInformation(image)
    with pytest.raises(sc._EchoRefused, match=r"label values \[12\] are not in the remap table oai_zib"):
        sc._label_values(image, label12, "lab.nii.gz", remap, {0, 1, 2, 3}, sc.GeometryTolerance())

    halves = sitk.GetImageFromArray(np.full((2, 3, 4), 1.5, dtype=np.float32))
    halves.CopyInformation(image)
    with pytest.raises(sc._EchoRefused, match="lab.nii.gz holds non-integer values"):
        sc._label_values(image, halves, "lab.nii.gz", None, {0, 1, 2}, sc.GeometryTolerance())
    shifted = sitk.GetImageFromArray(np.zeros((2, 3, 4), dtype=np.uint8))
    shifted.CopyInformation(image)
    shifted.SetSpacing((0.5, 0.6, 3.0))  # 20 % off in y, tolerance 0.1 %
    with pytest.raises(sc._EchoRefused, match=r"does not match the image grid \(spacing \(0.5, 0.6, 3.0\) != image"):
        sc._label_values(image, shifted, "lab.nii.gz", None, {0, 1}, sc.GeometryTolerance())


def test_status_counts_and_merged_cases_against_an_earlier_record(tmp_path):
    old = tmp_path / "Dataset501_KneeSag"
    old.mkdir()
    (old / sc.RECORD_FILE).write_text('{"cases": {"K_a": {"digest": "d1", "labeled": true}, '
                                      '"K_b": {"digest": "d2", "labeled": false}}}')
    by_orientation = {"sag": {
        "K_a": {"case": "K_a", "orientation": "sag", "status": "new", "digest": "d9", "labeled": False},
        "K_b": {"case": "K_b", "orientation": "sag", "status": "unchanged", "digest": "d2", "labeled": False},
        "K_c": {"case": "K_c", "orientation": "sag", "status": "new", "digest": "d3", "labeled": True},
    }}
    assert sc._status_counts(by_orientation, {"sag": old}) == {"new": 1, "updated": 1, "unchanged": 1}
    merged = sc._merged_cases(by_orientation, {"sag": old})
    assert sorted(merged) == ["sag"]
    assert merged["sag"]["K_a"] == {"digest": "d9", "labeled": False}  # this run's entry replaces the record's
    assert sorted(merged["sag"]) == ["K_a", "K_b", "K_c"]


# ----------------------------------------------------------------------------------------------
# manifest


def test_row_values_parses_and_lists_every_problem_of_a_row():
    r = {"case_id": "c1", "patient_id": "p1", "site": "A", "field_strength": "1,5", "image": "a",
         "orientation": "Sagittal", "echo": "2", "ACL": "yes", "meniscus": ""}
    fs, orientation, echo, targets, problems = _row_values("line 2", r, ["ACL", "meniscus"])
    assert (fs, orientation, echo, targets, problems) == (1.5, "sag", 2, {"ACL": 1, "meniscus": None}, [])

    bad = {"case_id": "c1", "patient_id": "", "site": "A", "field_strength": "1500", "image": "a", "echo": "0",
           "ACL": "maybe"}
    fs, _, echo, _, problems = _row_values("line 3", bad, ["ACL"])
    assert fs == 1500.0 and echo is None
    assert problems == [
        "line 3: empty patient_id",
        "line 3: field_strength '1500' is not a field strength in tesla (it looks like millitesla: give tesla, e.g. 1.5)",
        "line 3: echo '0' must be a 1-based echo number or 'all'",
        "line 3: label ACL = 'maybe'; use 0, 1 or blank (unknown)",
    ]


def test_open_choices_and_disagreeing_exams():
    numbered = [(2, {"case_id": "e1", "note": "choose: 2 sagittal series | 3 echoes"}),
                (3, {"case_id": "e1", "note": "choose: 2 sagittal series"}),
                (4, {"case_id": "e2", "note": "choose: 2 sagittal series"})]
    assert _open_choices(numbered) == [
        "manifest lines 2, 3 (case e1) leave a choice open: choose: 2 sagittal series (or delete the rows you do not keep)"
    ]
    rows = [_row(row=2), _row(row=3, orientation="cor"), _row(row=4, field_strength_t=1.5),
            _row(row=5, case_id="c2", field_strength_t=math.nan), _row(row=6, case_id="c2", field_strength_t=math.nan)]
    assert _disagreeing_exams(rows) == [
        "manifest lines 2 and 4 (case c1) disagree on field_strength_t: all series of one exam must share patient, "
        "site, field strength, vendor and labels"
    ]


# ----------------------------------------------------------------------------------------------
# scan


def _scanned(uid: str, number: int | None, folder: Path, **kw) -> SeriesScan:
    return SeriesScan(uid=uid, study_uid="s", series_number=number, description="", files=[], folders=[folder], **kw)


def test_series_column_names_a_series_only_when_its_folder_holds_others(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    alone = _scanned("1.1", 3, a)
    first, second, same_number = _scanned("1.2", 4, b), _scanned("1.3", 5, b), _scanned("1.4", 5, b)
    everything = [alone, first, second, same_number]
    assert _series_column(alone, a, everything) == ""
    assert _series_column(first, b, everything) == "4"
    assert _series_column(second, b, everything) == "1.3"  # series number 5 twice in b: the UID decides
    assert _series_column(_scanned("1.5", None, a), a, everything) == "1.5"


def test_series_notes_for_kept_and_flagged_series(tmp_path):
    kept = _scanned("1", 3, tmp_path, plane="sag", obliquity_deg=12.4, echo_times_ms=(9.0, 80.0))
    assert _series_notes(kept, {"sag": [kept, kept]}, ["no PatientID in the headers: fill in patient_id"]) == [
        "choose: 2 sagittal series in this exam; keep one, put # before the case_id of the others",
        "2 echoes (TE 9, 80 ms): echo 1 is converted; set echo to another number or to all",
        "12 degrees oblique",
        "no PatientID in the headers: fill in patient_id",
    ]
    flagged = _scanned("2", 1, tmp_path, flags=["localizer"], details=["3 slice(s), fewer than 8"])
    assert _series_notes(flagged, {}, ["ignored for flagged series"]) == ["left out: 3 slice(s), fewer than 8"]


# ----------------------------------------------------------------------------------------------
# io.dicom and io.dicom_seg


def test_echo_indices():
    groups = [(10.0, []), (20.0, []), (30.0, [])]
    assert _echo_indices(groups, None, "series 1") == [1]
    assert _echo_indices(groups, "all", "series 1") == [1, 2, 3]
    assert _echo_indices(groups, "2", "series 1") == [2]
    with pytest.raises(DicomError, match=r"series 1: echo 4 was asked for but the series has 3 echo\(es\)"):
        _echo_indices(groups, 4, "series 1")


def test_pixel_array_picks_the_16_bit_type_and_repeats_a_volume_per_echo():
    arr, signed = _pixel_array(np.array([[[0, 40000]]]), [10.0, 20.0])
    assert arr.dtype == np.uint16 and signed == 0 and arr.shape == (2, 1, 1, 2) and arr[1, 0, 0, 1] == 40000
    arr, signed = _pixel_array(np.array([[[-5.0, 10.0]]]), None)
    assert arr.dtype == np.int16 and signed == 1 and arr.tolist() == [[[[-5, 10]]]]
    with pytest.raises(ValueError, match="fit into 16 bits"):
        _pixel_array(np.array([[[-1, 40000]]]), None)
    with pytest.raises(ValueError, match="integer values"):
        _pixel_array(np.array([[[0.5]]]), None)


def test_right_handed_reverses_a_left_handed_stack():
    arr = np.arange(3).reshape(1, 3, 1, 1)  # (echo, z, y, x): slice values 0, 1, 2
    left = (1.0, 0.0, 0.0,
            0.0, 1.0, 0.0,
            0.0, 0.0, -1.0)  # k = -(i x j)
    out, origin, row, col, k_axis = _right_handed(arr, (10.0, 20.0, 30.0), left, 2.5)
    assert out[0, :, 0, 0].tolist() == [2, 1, 0]
    assert origin.tolist() == [10.0, 20.0, 25.0]  # the last slice, 2 x 2.5 mm below
    assert k_axis.tolist() == [0.0, 0.0, 1.0] and row.tolist() == [1.0, 0.0, 0.0] and col.tolist() == [0.0, 1.0, 0.0]
    same, origin, *_ = _right_handed(arr, (10.0, 20.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), 2.5)
    assert same[0, :, 0, 0].tolist() == [0, 1, 2] and origin.tolist() == [10.0, 20.0, 30.0]


def test_segment_pixels_numbers_segments_in_ascending_label_value():
    mapped = np.array([[[0, 2, 5, 5]]])
    values, pixel = _segment_pixels(mapped, {7: "c", 2: "a", 5: "b"})
    assert values == [2, 5, 7]
    assert pixel.tolist() == [[[0, 1, 2, 2]]] and pixel.dtype == np.uint16
    with pytest.raises(DicomSegError, match=r"values \[9\] that the label names do not name \(named: \[2, 5\]\)"):
        _segment_pixels(np.array([[[9, 2]]]), {2: "a", 5: "b"})
