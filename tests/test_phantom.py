"""Tests of the procedural knee phantom (synthetic data; these check the generator, not anatomy)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from orthodiff_nnunet.data import phantom as ph
from orthodiff_nnunet.data.sites import SITE_3T, SITE_15T, TISSUE_SIGNAL
from orthodiff_nnunet.orientation import detect_plane
from orthodiff_nnunet.schemes import KNEE_ABNORMALITIES, KNEE_STRUCTURES

SEED = 11
STRUCTURE_LABELS = sorted(v for v in KNEE_STRUCTURES.values() if v > 0)


@pytest.fixture(scope="module")
def normal_exam() -> ph.KneeExam:
    return ph.make_exam(SEED)


@pytest.fixture(scope="module")
def single_abnormality_exams() -> dict[str, ph.KneeExam]:
    return {name: ph.make_exam(SEED, {name: True}) for name in KNEE_ABNORMALITIES}


def _centroid_world(label_img: sitk.Image, value: int) -> np.ndarray:
    """Centroid (LPS, mm) of the voxels with ``value``."""
    arr = sitk.GetArrayFromImage(label_img)
    kji = np.argwhere(arr == value)
    assert len(kji) > 0, f"label {value} absent"
    ijk = kji[:, ::-1].astype(float)
    d = np.asarray(label_img.GetDirection()).reshape(3, 3)
    pts = np.asarray(label_img.GetOrigin()) + (ijk * np.asarray(label_img.GetSpacing())) @ d.T
    return pts.mean(axis=0)


def test_determinism_same_seed_identical_other_seed_different(normal_exam):
    again = ph.make_exam(SEED)
    other = ph.make_exam(SEED + 1)
    for o in ("sag", "cor", "ax"):
        a_img, a_lab = normal_exam.arrays(o)
        b_img, b_lab = again.arrays(o)
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_lab, b_lab)
        c_img, c_lab = other.arrays(o)
        # a different seed: different noise and a different random knee (and possibly grid)
        if c_img.shape == a_img.shape:
            assert np.mean(c_img != a_img) > 0.9
            assert np.mean(c_lab != a_lab) > 0.005
    assert normal_exam.abnormalities == {k: 0 for k in KNEE_ABNORMALITIES}


def test_abnormalities_do_not_change_the_anatomy_draw(normal_exam, single_abnormality_exams):
    # the femur and tibia labels are the same with or without a ligament tear (same anatomy seed)
    exam = single_abnormality_exams["ACL"]
    for o in ("sag", "cor", "ax"):
        _, lab0 = normal_exam.arrays(o)
        _, lab1 = exam.arrays(o)
        for v in (KNEE_STRUCTURES["femur"], KNEE_STRUCTURES["tibia"]):
            np.testing.assert_array_equal(lab0 == v, lab1 == v)
    assert exam.abnormalities["ACL"] == 1 and sum(exam.abnormalities.values()) == 1


@pytest.mark.parametrize("obliquity", [0.0, 10.0])
def test_detect_plane_gives_back_each_orientation(obliquity):
    exam = ph.make_exam(3, obliquity_deg=obliquity)
    for o in ("sag", "cor", "ax"):
        info = detect_plane(exam.images[o])
        assert info.orientation == o
        assert info.through_plane_axis == 2  # slices are stacked along image axis k
        assert info.obliquity_deg <= obliquity + 1e-6
        if obliquity == 0:
            assert info.obliquity_deg < 1e-6
    if obliquity > 0:
        assert max(detect_plane(exam.images[o]).obliquity_deg for o in ("sag", "cor", "ax")) > 0.5


def test_dicom_like_in_plane_directions(normal_exam):
    d = {o: np.asarray(normal_exam.images[o].GetDirection()).reshape(3, 3) for o in ("sag", "cor", "ax")}
    # columns of the direction matrix: image i (columns), j (rows), k (slice normal)
    np.testing.assert_allclose(d["sag"][:, 0], [0, 1, 0])  # columns A->P
    np.testing.assert_allclose(d["sag"][:, 1], [0, 0, -1])  # rows S->I
    np.testing.assert_allclose(d["cor"][:, 0], [1, 0, 0])  # columns R->L
    np.testing.assert_allclose(d["cor"][:, 1], [0, 0, -1])
    np.testing.assert_allclose(d["ax"][:, :2], [[1, 0], [0, 1], [0, 0]])
    for m in d.values():
        np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(m) == pytest.approx(1.0)


@pytest.mark.parametrize("site", [SITE_3T, SITE_15T], ids=["3T", "1.5T"])
def test_spacing_equals_site_and_default_size_is_small(site):
    exam = ph.make_exam(5, site=site)
    for o in ("sag", "cor", "ax"):
        img, lab = exam[o]
        assert img.GetSpacing() == pytest.approx(
            (site.in_plane_spacing_mm, site.in_plane_spacing_mm, site.slice_thickness_mm))
        ni, nj, nk = img.GetSize()
        assert 60 <= ni <= 100 and 60 <= nj <= 100, (o, img.GetSize())
        assert 14 <= nk <= 24, (o, img.GetSize())


def test_label_grid_identical_to_image_grid_and_dtypes(normal_exam):
    for o in ("sag", "cor", "ax"):
        img, lab = normal_exam[o]
        assert img.GetPixelID() == sitk.sitkFloat32
        assert lab.GetPixelID() == sitk.sitkUInt8
        assert img.GetSize() == lab.GetSize()
        assert img.GetSpacing() == lab.GetSpacing()
        assert img.GetOrigin() == lab.GetOrigin()
        assert img.GetDirection() == lab.GetDirection()
        arr = sitk.GetArrayFromImage(img)
        assert arr.min() >= 0 and np.isfinite(arr).all()
        assert sitk.GetArrayFromImage(lab).max() <= max(KNEE_STRUCTURES.values())


def test_all_structures_present_in_sagittal_series(normal_exam):
    present = {o: sorted(int(v) for v in np.unique(normal_exam.arrays(o)[1]) if v > 0)
               for o in ("sag", "cor", "ax")}
    # measured at the default size: sag and cor hold all 11; ax may miss the thin tibial cartilage
    assert present["sag"] == STRUCTURE_LABELS, present
    assert present["cor"] == STRUCTURE_LABELS, present
    required_ax = {KNEE_STRUCTURES[n] for n in ("femur", "tibia", "patella", "fibula", "femoral_cartilage",
                                                  "medial_meniscus", "lateral_meniscus", "ACL", "PCL")}
    assert required_ax <= set(present["ax"]), present


def test_anatomical_layout_in_world_coordinates(normal_exam):
    """Femur above tibia, patella anterior, fibula lateral (right knee: patient's right = -x)."""
    L = KNEE_STRUCTURES
    for o in ("sag", "cor", "ax"):
        lab = normal_exam.labels[o]
        c = {n: _centroid_world(lab, L[n]) for n in ("femur", "tibia", "patella", "fibula",
                                                     "medial_meniscus", "lateral_meniscus")}
        if o != "ax":  # the axial FOV covers only the joint region
            assert c["femur"][2] > c["tibia"][2] + 20
        assert c["patella"][1] < c["femur"][1] - 10  # anterior = smaller y (LPS)
        assert c["fibula"][0] < c["tibia"][0] - 10  # lateral
        assert c["fibula"][1] > c["tibia"][1]  # posterior
        assert c["lateral_meniscus"][0] < c["medial_meniscus"][0] - 10
    left = ph.make_exam(SEED, side="left", orientations=("cor",))
    cl = {n: _centroid_world(left.labels["cor"], KNEE_STRUCTURES[n]) for n in ("tibia", "fibula")}
    assert cl["fibula"][0] > cl["tibia"][0] + 10  # left knee: lateral = +x


@pytest.mark.parametrize("name", [n for n in KNEE_ABNORMALITIES if n != "PD"])
def test_each_abnormality_is_a_local_bright_change(name, normal_exam, single_abnormality_exams):
    exam = single_abnormality_exams[name]
    # meniscal tears are measured where they are conspicuous; axial slices may straddle the meniscus
    orientations = ("sag", "cor") if name in ("MM", "LM") else ("sag", "cor", "ax")
    for o in orientations:
        a0, _ = normal_exam.arrays(o)
        a1, _ = exam.arrays(o)
        roi = ph.abnormality_roi(normal_exam, name, o)
        assert roi.sum() > 20, (name, o)
        ratio = a1[roi].mean() / a0[roi].mean()
        assert ratio > 1.4, (name, o, ratio)  # measured about 1.8-4 at the default size
        change = np.abs(a1.astype(np.float64) - a0)
        assert change[roi].sum() / change.sum() > 0.7, (name, o)  # the change is where it should be
        assert change.max() > 0.3 * SITE_3T.vendor_scale


def test_ligament_tear_interrupts_the_label(normal_exam, single_abnormality_exams):
    for name in ("ACL", "PCL"):
        value = KNEE_STRUCTURES[name]
        n0 = (normal_exam.arrays("sag")[1] == value).sum()
        n1 = (single_abnormality_exams[name].arrays("sag")[1] == value).sum()
        assert 0 < n1 < 0.85 * n0, (name, n0, n1)  # the remaining fibres keep the label


def test_patellar_dislocation_moves_the_patella_laterally(normal_exam, single_abnormality_exams):
    exam = single_abnormality_exams["PD"]
    for o in ("sag", "cor", "ax"):
        for structure in ("patella", "patellar_cartilage"):
            c0 = _centroid_world(normal_exam.labels[o], KNEE_STRUCTURES[structure])
            c1 = _centroid_world(exam.labels[o], KNEE_STRUCTURES[structure])
            # right knee: lateral is -x; expected shift about 20 mm * scale (0.55) = 11 mm
            assert c0[0] - c1[0] > 6.0, (o, structure, c0, c1)


def _relative_noise(exam: ph.KneeExam, o: str) -> float:
    """Noise std / mean in homogeneous soft tissue, from differences of neighbouring voxels."""
    img, lab = exam.arrays(o)
    img = img.astype(np.float64) - exam.site.vendor_offset
    homogeneous = np.isclose(exam.clean[o], TISSUE_SIGNAL["soft_tissue"]) & (lab == 0)
    pairs = homogeneous[:, :, 1:] & homogeneous[:, :, :-1]
    assert pairs.sum() > 1000
    diffs = (img[:, :, 1:] - img[:, :, :-1])[pairs]
    return float(diffs.std() / np.sqrt(2) / img[homogeneous].mean())


def test_15t_site_is_noisier_than_3t():
    e3 = ph.make_exam(21, site=SITE_3T)
    e15 = ph.make_exam(21, site=SITE_15T)
    for o in ("sag", "cor", "ax"):
        n3, n15 = _relative_noise(e3, o), _relative_noise(e15, o)
        assert 0.05 < n3 < 0.2, n3  # measured ~0.11 (SNR 25 at 3 T on a 0.35 signal)
        assert n15 > 1.6 * n3, (o, n3, n15)  # measured ~0.25


def test_sample_abnormalities_bernoulli():
    rng = np.random.default_rng(0)
    draws = [ph.sample_abnormalities(rng, 0.35) for _ in range(1000)]
    assert all(set(d) == set(KNEE_ABNORMALITIES) for d in draws)
    assert all(v in (0, 1) for d in draws for v in d.values())
    rate = np.mean([[d[k] for k in KNEE_ABNORMALITIES] for d in draws], axis=0)
    assert np.all(np.abs(rate - 0.35) < 0.06), rate
    assert all(v == 0 for v in ph.sample_abnormalities(rng, 0.0).values())
    assert all(v == 1 for v in ph.sample_abnormalities(rng, 1.0).values())


def test_unknown_abnormality_is_refused():
    with pytest.raises(ValueError, match="unknown abnormality"):
        ph.make_exam(1, {"MENISCUS": True}, orientations=("sag",))


def _read_manifest(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


@pytest.mark.parametrize("ending,orients", [(".nii.gz", ("sag", "cor", "ax")), (".nrrd", ("sag",)),
                                            (".mha", ("cor",))])
def test_write_site_manifest_and_files(tmp_path, ending, orients):
    manifest = ph.write_site(tmp_path / "siteA", SITE_3T, n_cases=3, seed=4, orientations=orients,
                             file_ending=ending, patients_with_two_exams=1)
    assert manifest == tmp_path / "siteA" / "manifest.csv"
    columns, rows = _read_manifest(manifest)
    assert columns == ["case_id", "patient_id", "site", "field_strength", "vendor", "image", "orientation",
                       "label", *KNEE_ABNORMALITIES]
    assert len(rows) == 3 * len(orients)
    assert [r["case_id"] for r in rows[::len(orients)]] == ["EXAM-0001", "EXAM-0002", "EXAM-0003"]
    patients = {r["case_id"]: r["patient_id"] for r in rows}
    assert patients == {"EXAM-0001": "PAT-0001", "EXAM-0002": "PAT-0001", "EXAM-0003": "PAT-0002"}
    arrays = {}
    for r in rows:
        assert r["site"] == "SiteA" and r["field_strength"] == "3" and r["vendor"] == "VendorA"
        assert r["orientation"] == ""
        assert all(r[k] in ("0", "1") for k in KNEE_ABNORMALITIES)
        img = sitk.ReadImage(str(manifest.parent / r["image"]))
        lab = sitk.ReadImage(str(manifest.parent / r["label"]))
        assert r["image"].endswith(ending) and r["label"].endswith(ending)
        assert img.GetPixelID() == sitk.sitkFloat32 and lab.GetPixelID() == sitk.sitkUInt8
        assert img.GetSize() == lab.GetSize() and img.GetOrigin() == pytest.approx(lab.GetOrigin())
        assert img.GetSpacing() == pytest.approx((0.8, 0.8, 3.0))
        o = detect_plane(img).orientation
        assert r["image"].endswith(f"_{o}{ending}")
        arrays[(r["case_id"], o)] = (sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab))
    o = orients[0]
    femur = KNEE_STRUCTURES["femur"]
    # two exams of one patient: same knee (same femur), different acquisition noise
    (i1, l1), (i2, l2), (i3, l3) = (arrays[(c, o)] for c in ("EXAM-0001", "EXAM-0002", "EXAM-0003"))
    np.testing.assert_array_equal(l1 == femur, l2 == femur)
    assert not np.array_equal(i1, i2)
    assert l3.shape != l1.shape or not np.array_equal(l3 == femur, l1 == femur)


def test_write_site_is_deterministic_and_labels_optional(tmp_path):
    m1 = ph.write_site(tmp_path / "a", SITE_15T, n_cases=2, seed=9, orientations=("ax",))
    m2 = ph.write_site(tmp_path / "b", SITE_15T, n_cases=2, seed=9, orientations=("ax",), with_labels=False)
    _, rows1 = _read_manifest(m1)
    _, rows2 = _read_manifest(m2)
    assert [r["field_strength"] for r in rows1] == ["1.5", "1.5"]
    assert all(r["label"] == "" for r in rows2) and not (tmp_path / "b" / "labels").exists()
    for r1, r2 in zip(rows1, rows2):
        assert {k: r1[k] for k in KNEE_ABNORMALITIES} == {k: r2[k] for k in KNEE_ABNORMALITIES}
        a1 = sitk.GetArrayFromImage(sitk.ReadImage(str(m1.parent / r1["image"])))
        a2 = sitk.GetArrayFromImage(sitk.ReadImage(str(m2.parent / r2["image"])))
        np.testing.assert_array_equal(a1, a2)
