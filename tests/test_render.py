"""Renderer of synthetic series from label maps (images "synthesised from real label maps")."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from orthodiff_nnunet.data.render import acquisition_grid, render_exam, write_rendered_site
from orthodiff_nnunet.data.sites import SITE_3T, SITE_15T, TISSUE_SIGNAL
from orthodiff_nnunet.orientation import detect_plane
from orthodiff_nnunet.schemes import KNEE_STRUCTURES

NAMES = {v: k for k, v in KNEE_STRUCTURES.items()}
SPACING = dict(in_plane_spacing_mm=1.5, slice_thickness_mm=3.0)


def _rot(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    r = np.eye(3)
    a, b = [i for i in range(3) if i != axis]
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def sphere_map(values=range(1, 12), radius_mm: float = 6.5, pitch_mm: float = 17.0) -> sitk.Image:
    """Labels 1..11 as spheres on a 3x2x2 lattice, on an anisotropic (0.7, 0.5, 0.5 mm) oblique grid."""
    direction = _rot(2, 20.0) @ _rot(0, 10.0) @ np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float)
    spacing = np.array([0.7, 0.5, 0.5])
    size = np.array([80, 100, 100])  # 56 x 50 x 50 mm
    img = sitk.Image(size.tolist(), sitk.sitkUInt8)
    img.SetSpacing(spacing.tolist())
    img.SetDirection(direction.flatten().tolist())
    img.SetOrigin((12.0, -30.0, 40.0))
    # voxel centres in physical space, numpy order (k, j, i)
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    idx = np.stack([i, j, k], axis=-1) * spacing
    phys = idx @ direction.T + np.array(img.GetOrigin())
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    lab = np.zeros(size[::-1], dtype=np.uint8)
    offsets = [np.array(o, dtype=float) for o in np.ndindex(3, 2, 2)]
    for v, o in zip(values, offsets):
        c = centre + (o - np.array([1.0, 0.5, 0.5])) * pitch_mm
        lab[np.linalg.norm(phys - c, axis=-1) <= radius_mm] = v
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(img)
    return out


@pytest.fixture(scope="module")
def spheres() -> sitk.Image:
    return sphere_map()


@pytest.fixture(scope="module")
def rendered(spheres):
    return render_exam(spheres, seed=7, **SPACING)


def test_planes_spacing_and_grids(spheres, rendered):
    assert set(rendered) == {"sag", "cor", "ax"}
    for o, (img, seg) in rendered.items():
        plane = detect_plane(img)
        assert plane.orientation == o
        assert plane.obliquity_deg < 1e-6
        assert plane.through_plane_axis == 2
        np.testing.assert_allclose(img.GetSpacing(), (1.5, 1.5, 3.0))
        assert img.GetPixelID() == sitk.sitkFloat32 and seg.GetPixelID() == sitk.sitkUInt8
        assert img.GetSize() == seg.GetSize()
        np.testing.assert_allclose(img.GetOrigin(), seg.GetOrigin())
        np.testing.assert_allclose(img.GetSpacing(), seg.GetSpacing())
        np.testing.assert_allclose(img.GetDirection(), seg.GetDirection())
        assert np.all(sitk.GetArrayViewFromImage(img) >= 0)


def test_grid_covers_the_label_extent(spheres, rendered):
    for o, (img, _) in rendered.items():
        size = np.array(img.GetSize())
        sp = np.array(img.GetSpacing())
        frame = np.asarray(img.GetDirection()).reshape(3, 3)
        corners = []
        for c in np.ndindex(2, 2, 2):
            corners.append(spheres.TransformContinuousIndexToPhysicalPoint((-0.5 + np.array(c) * np.array(spheres.GetSize())).tolist()))
        proj = np.asarray(corners) @ frame
        first = np.asarray(img.GetOrigin()) @ frame
        lo, hi = first - sp / 2, first + (size - 0.5) * sp
        assert np.all(lo <= proj.min(0) + 1e-6) and np.all(hi >= proj.max(0) - 1e-6)
        assert np.all(hi - lo < proj.max(0) - proj.min(0) + sp + 1e-6)


def test_every_label_survives(rendered):
    for o, (_, seg) in rendered.items():
        assert set(np.unique(sitk.GetArrayViewFromImage(seg)).tolist()) == set(range(12)), o


def test_mean_intensity_follows_tissue_signal(rendered):
    for o, (img, seg) in rendered.items():
        a, s = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(seg)
        means = {NAMES[v]: float(a[s == v].mean()) for v in range(1, 12)}
        checked = 0
        for x in means:
            for y in means:
                if TISSUE_SIGNAL[x] >= 2.0 * TISSUE_SIGNAL[y]:
                    assert means[x] > means[y], f"{o}: {x} {means[x]:.0f} should be brighter than {y} {means[y]:.0f}"
                    checked += 1
        assert checked >= 20
        assert min(means[n] for n in ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage")) > \
            1.5 * max(means[n] for n in ("femur", "tibia", "patella", "fibula"))


def test_determinism_and_orientation_subsets(spheres, rendered):
    again = render_exam(spheres, seed=7, orientations=("cor",), **SPACING)
    assert list(again) == ["cor"]
    for a, b in zip(again["cor"], rendered["cor"]):
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
    other = render_exam(spheres, seed=8, orientations=("cor",), **SPACING)
    assert not np.array_equal(sitk.GetArrayViewFromImage(other["cor"][0]), sitk.GetArrayViewFromImage(rendered["cor"][0]))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(other["cor"][1]), sitk.GetArrayViewFromImage(rendered["cor"][1]))


def test_site_defaults_max_size_and_obliquity(spheres):
    out = render_exam(spheres, seed=1, site=SITE_15T, orientations=("sag", "ax"), max_in_plane_size=24,
                      max_obliquity_deg=12.0)
    for o, (img, seg) in out.items():
        assert max(img.GetSize()[:2]) <= 24
        sp = img.GetSpacing()
        assert sp[0] == sp[1] > SITE_15T.in_plane_spacing_mm
        assert sp[2] == pytest.approx(max(SITE_15T.slice_thickness_mm, sp[0]))
        plane = detect_plane(img)
        assert plane.orientation == o and 0.0 < plane.obliquity_deg <= 12.0 + 1e-6
        assert img.GetSize() == seg.GetSize()
    # the 1.5 T site: vendor offset and scale show in the stored values
    a = sitk.GetArrayViewFromImage(out["sag"][0])
    assert a.min() >= SITE_15T.vendor_offset and a.max() > 1000


def test_acquisition_grid_defaults():
    lab = sphere_map(values=[1])
    g = acquisition_grid(lab, "sagittal", SITE_3T.in_plane_spacing_mm, SITE_3T.slice_thickness_mm)
    np.testing.assert_allclose(g.GetSpacing(), (0.8, 0.8, 3.0))
    assert detect_plane(g).orientation == "sag"


def test_refuses_values_outside_the_scheme():
    lab = sphere_map(values=[1, 12])
    with pytest.raises(ValueError, match=r"\[12\].*remap"):
        render_exam(lab, seed=0, orientations=("ax",))


def test_write_rendered_site(tmp_path: Path):
    # two maps in the OAI source scheme (1 femur, 2 femoral cartilage, 3 tibia ...), one patient at two time points
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    paths = []
    for name in ("1234_00m_map.nii.gz", "1234_12m_map.nii.gz"):
        lab = sphere_map(values=[1, 2, 3, 4, 5, 6, 7], radius_mm=6.0)
        p = src_dir / name
        sitk.WriteImage(sitk.Cast(lab, sitk.sitkUInt16), str(p))
        paths.append(p)
    out = tmp_path / "site"
    manifest = write_rendered_site(paths, out, SITE_15T, seed=3, remap="oai_zib", orientations=("sag", "ax"),
                                   max_in_plane_size=32)
    assert manifest == out / "manifest.csv"
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case_id", "patient_id", "site", "field_strength", "vendor", "image", "orientation", "label"]
    assert [r["case_id"] for r in rows] == ["RENDER-0001"] * 2 + ["RENDER-0002"] * 2
    assert {r["patient_id"] for r in rows} == {"1234"}
    assert {(r["site"], r["field_strength"], r["vendor"], r["orientation"]) for r in rows} == {("SiteB", "1.5", "VendorB", "")}
    for r in rows:
        img = sitk.ReadImage(str(out / r["image"]))
        seg = sitk.ReadImage(str(out / r["label"]))
        assert img.GetSize() == seg.GetSize()
        vals = set(np.unique(sitk.GetArrayViewFromImage(seg)).tolist())
        # remapped: OAI 2 (femoral cartilage) -> 5, 3 (tibia) -> 2, 7 (femoral lesion) -> femur 1
        assert vals <= {0, 1, 2, 3, 5, 6, 7} and 5 in vals
        assert detect_plane(img).orientation in r["image"]
    assert (out / "render_info.json").is_file()
    # the manifest follows the contract of the site converter
    from orthodiff_nnunet.dataset_conversion.manifest import read_manifest

    parsed, labels = read_manifest(manifest)
    assert len(parsed) == 4 and labels == []


@pytest.mark.realdata
def test_render_real_oai_map(shared_data):
    from orthodiff_nnunet.remap import load_remap_table

    folder = shared_data / "labelmaps" / "oai_bone_cartilage" / "OAI_ZIB-UQ"
    maps = sorted(folder.glob("*.nii.gz"))
    if not maps:
        pytest.skip(f"no OAI label maps in {folder}")
    labels = load_remap_table("oai_zib").apply_image(sitk.ReadImage(str(maps[0])))
    out = render_exam(labels, seed=0, max_in_plane_size=96)
    expected = {0} | {KNEE_STRUCTURES[n] for n in ("femur", "tibia", "patella", "femoral_cartilage",
                                                  "tibial_cartilage", "patellar_cartilage")}
    for o, (img, seg) in out.items():
        assert detect_plane(img).orientation == o
        assert max(img.GetSize()[:2]) <= 96 and img.GetSpacing()[2] == pytest.approx(3.0)
        s = sitk.GetArrayFromImage(seg)
        assert set(np.unique(s).tolist()) == expected, o
        a = sitk.GetArrayFromImage(img)
        assert a[s == KNEE_STRUCTURES["femoral_cartilage"]].mean() > a[s == KNEE_STRUCTURES["femur"]].mean()
