"""Label remapping onto the 11 knee structures: unit tests on small arrays and checks on the real maps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from orthodiff_nnunet.remap import (
    RemapError,
    RemapTable,
    builtin_remap_tables,
    load_remap_table,
    present_values,
    unknown_labels,
)
from orthodiff_nnunet.schemes import KNEE_STRUCTURES

K = KNEE_STRUCTURES
KNEE_VALUES = set(K.values())


def shared_data_dir() -> Path | None:
    """The shared real-data folder: $ORTHODIFF_SHARED_DATA, ../shared/data next to the repo, /work/shared/data."""
    candidates = []
    if os.environ.get("ORTHODIFF_SHARED_DATA"):
        candidates.append(Path(os.environ["ORTHODIFF_SHARED_DATA"]))
    candidates += [Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")]
    for c in candidates:
        if (c / "labelmaps").is_dir():
            return c
    return None


def _labelmaps() -> Path:
    root = shared_data_dir()
    if root is None:
        pytest.skip("real label maps not found: set ORTHODIFF_SHARED_DATA or place them in ../shared/data "
                    "(a fresh clone has no shared data; these tests only run in the development workspace)")
    return root / "labelmaps"


def _read(path: Path) -> np.ndarray:
    sitk = pytest.importorskip("SimpleITK")
    if not path.is_file():
        pytest.skip(f"{path} is absent from the shared data")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ---------------------------------------------------------------- unit tests on small arrays


def test_builtin_tables_listed_and_loadable():
    names = builtin_remap_tables()
    assert {"oai_zib", "pymskt_dess", "spl_knee_atlas"} <= set(names)
    for n in names:
        t = load_remap_table(n)
        assert t.name == n
        assert t.target_scheme == "knee11"
        assert set(t.mapping.values()) <= KNEE_VALUES
        assert t.notes


def test_builtin_tables_content():
    oai = load_remap_table("oai_zib")
    assert oai.mapping == {1: 1, 2: 5, 3: 2, 4: 6, 5: 3, 6: 7, 7: 1, 8: 2, 9: 3}
    assert oai.unmapped == "error"
    pm = load_remap_table("pymskt_dess")
    assert pm.mapping == {1: 5, 2: 6, 3: 6, 4: 7, 5: 1, 6: 2, 7: 3, 8: 4, 9: 9, 10: 8}
    assert pm.unmapped == "error"
    spl = load_remap_table("spl_knee_atlas")
    assert spl.unmapped == "background"
    assert spl.mapping == {31: 10, 32: 11, 81: 9, 82: 8, 83: 5, 84: 6, 85: 6, 86: 7, 95: 1, 96: 2, 97: 4, 98: 3}
    assert set(spl.mapping.values()) == KNEE_VALUES - {0}  # the atlas covers all 11 structures


def test_apply_oai_small_array():
    oai = load_remap_table("oai_zib")
    src = np.array([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], dtype=np.uint16)
    out = oai.apply(src)
    assert out.dtype == np.uint8 and out.shape == src.shape
    np.testing.assert_array_equal(out, [[0, K["femur"], K["femoral_cartilage"], K["tibia"], K["tibial_cartilage"]],
                                        [K["patella"], K["patellar_cartilage"], K["femur"], K["tibia"], K["patella"]]])
    assert oai.unknown_values(src) == []


def test_unknown_values_error_table():
    oai = load_remap_table("oai_zib")
    src = np.array([0, 1, 12, 12, 40, 3], dtype=np.int32)
    assert oai.unknown_values(src) == [12, 40]
    with pytest.raises(RemapError, match=r"\[12, 40\].*oai_zib"):
        oai.apply(src)


def test_background_table_drops_unlisted_and_handles_negative_and_large_values():
    spl = load_remap_table("spl_knee_atlas")
    src = np.array([-5, 0, 3, 9, 31, 32, 81, 82, 98, 70000], dtype=np.int64)  # exercises the np.unique path
    out = spl.apply(src)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 0, 0, 0, K["ACL"], K["PCL"], K["lateral_meniscus"], K["medial_meniscus"],
                                        K["patella"], 0])
    assert spl.unknown_values(src) == []  # background tables never report
    small = np.array([[0, 9, 95], [96, 97, 12]], dtype=np.int16)  # lookup-table path
    np.testing.assert_array_equal(spl.apply(small), [[0, 0, K["femur"]], [K["tibia"], K["fibula"], 0]])


def test_apply_keeps_shape_and_handles_float_bool_empty():
    t = RemapTable(name="t", source="test", mapping={1: 2, 2: 1}, unmapped="error")
    vol = np.zeros((3, 4, 5), dtype=np.float32)
    vol[1, 2, 3] = 1
    vol[2, 0, 0] = 2
    out = t.apply(vol)
    assert out.shape == (3, 4, 5) and out.dtype == np.uint8
    assert out[1, 2, 3] == 2 and out[2, 0, 0] == 1 and out.sum() == 3
    with pytest.raises(RemapError, match="non-integer"):
        t.apply(np.array([0.5, 1.0]))
    np.testing.assert_array_equal(t.apply(np.array([True, False])), [2, 0])
    assert t.apply(np.zeros((0, 3), dtype=np.uint8)).shape == (0, 3)


def test_lut_and_unique_paths_agree():
    rng = np.random.default_rng(0)
    t = RemapTable(name="t", source="test", mapping={5: 1, 9: 2, 300: 3}, unmapped="background")
    a = rng.choice([0, 5, 9, 300, 17], size=(20, 20)).astype(np.int32)
    b = a.astype(np.int64)
    b[0, 0] = 1 << 20  # forces the np.unique path
    expect = np.select([a == 5, a == 9, a == 300], [1, 2, 3], 0)
    np.testing.assert_array_equal(t.apply(a), expect)
    expect[0, 0] = 0
    np.testing.assert_array_equal(t.apply(b), expect)


def test_custom_json_table(tmp_path):
    p = tmp_path / "my_site.json"
    p.write_text(json.dumps({
        "name": "my_site", "source": "site X", "target_scheme": "knee11",
        "mapping": {"10": 1, "20": 2, "30": 5}, "unmapped": "background", "notes": "test",
    }))
    t = load_remap_table(p)
    assert t.name == "my_site" and t.mapping == {10: 1, 20: 2, 30: 5}
    assert load_remap_table(str(p)) == t
    np.testing.assert_array_equal(t.apply(np.array([10, 20, 30, 40, 0], dtype=np.uint8)), [1, 2, 5, 0, 0])
    round_trip = tmp_path / "rt.json"
    round_trip.write_text(json.dumps(t.to_json()))
    assert load_remap_table(round_trip) == t


def test_bad_tables_are_refused(tmp_path):
    with pytest.raises(RemapError, match="oai_zib, pymskt_dess, spl_knee_atlas"):
        load_remap_table("no_such_table")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "mapping": {"1": 12}}))  # 12 is not a knee11 label
    with pytest.raises(RemapError, match="not in scheme knee11"):
        load_remap_table(bad)
    bad.write_text(json.dumps({"name": "bad", "mapping": {"x": 1}}))
    with pytest.raises(RemapError, match="integer"):
        load_remap_table(bad)
    bad.write_text(json.dumps({"name": "bad", "mapping": {"1": 1}, "unmapped": "ignore"}))
    with pytest.raises(RemapError, match="unmapped"):
        load_remap_table(bad)
    bad.write_text("{not json")
    with pytest.raises(RemapError, match="JSON"):
        load_remap_table(bad)
    # another scheme: targets are only range-checked
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"name": "o", "mapping": {"1": 40}, "target_scheme": "ankle"}))
    assert load_remap_table(other).apply(np.array([1], dtype=np.uint8))[0] == 40


def test_unknown_labels_and_present_values():
    a = np.array([[0, 1, 11], [12, 255, 1]], dtype=np.uint8)
    assert present_values(a) == [0, 1, 11, 12, 255]
    assert unknown_labels(a, KNEE_STRUCTURES.values()) == [12, 255]
    assert unknown_labels(np.array([0, 3]), range(12)) == []
    assert unknown_labels(np.array([-1, 3], dtype=np.int16), range(12)) == [-1]


def test_apply_image_keeps_geometry():
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.GetImageFromArray(np.array([[[0, 2, 4]]], dtype=np.uint16))
    img.SetSpacing((0.5, 0.6, 0.7))
    img.SetOrigin((1.0, 2.0, 3.0))
    out = load_remap_table("oai_zib").apply_image(img)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert out.GetSpacing() == img.GetSpacing() and out.GetOrigin() == img.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), [[[0, 5, 6]]])


# ---------------------------------------------------------------- real label maps (shared data)


def _check_real(table: str, src: np.ndarray, expected: set[str]) -> np.ndarray:
    t = load_remap_table(table)
    assert t.unknown_values(src) == []
    out = t.apply(src)
    assert out.dtype == np.uint8 and out.shape == src.shape
    assert unknown_labels(out, KNEE_VALUES) == []
    present = {name for name, v in K.items() if v and v in set(present_values(out))}
    assert present == expected, f"{table}: structures present {sorted(present)}"
    return out


@pytest.mark.realdata
def test_real_oai_maps():
    root = _labelmaps() / "oai_bone_cartilage"
    lesion_map = root / "OAI_AKOA" / "9099363_00m_WB01_Femur+Tibia+Patella(Bone)_Femur+Tibia+Patella(Cartilage).nii.gz"
    paths = [lesion_map if lesion_map.is_file() else sorted((root / "OAI_AKOA").glob("*.nii.gz"))[0],
             sorted((root / "OAI_ZIB-UQ").glob("*.nii.gz"))[0]]
    expected = {"femur", "tibia", "patella", "femoral_cartilage", "tibial_cartilage", "patellar_cartilage"}
    for p in paths:
        src = _read(p)
        assert set(present_values(src)) <= set(range(10))
        out = _check_real("oai_zib", src, expected)
        for lesion, bone in ((7, "femur"), (8, "tibia"), (9, "patella")):
            if np.any(src == lesion):
                assert np.all(out[src == lesion] == K[bone])


@pytest.mark.realdata
def test_real_pymskt_map():
    src = _read(_labelmaps() / "pymskt_dess" / "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd")
    assert present_values(src) == list(range(11))
    out = _check_real("pymskt_dess", src, {
        "femur", "tibia", "patella", "fibula", "femoral_cartilage", "tibial_cartilage", "patellar_cartilage",
        "medial_meniscus", "lateral_meniscus"})
    # the two tibial cartilages (2 medial, 3 lateral) merge into one structure
    assert np.count_nonzero(out == K["tibial_cartilage"]) == np.count_nonzero((src == 2) | (src == 3))


@pytest.mark.realdata
def test_real_spl_atlas():
    src = _read(_labelmaps() / "spl_knee_atlas" / "seg.nrrd")
    table = load_remap_table("spl_knee_atlas")
    assert len(set(present_values(src)) - set(table.mapping) - {0}) > 30  # muscles, vessels... -> background
    out = _check_real("spl_knee_atlas", src, set(K) - {"background"})
    assert np.count_nonzero(out) == np.count_nonzero(np.isin(src, list(table.mapping)))
