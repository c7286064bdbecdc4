"""MRNet converter: synthetic MRNet-like folders and the real 6-exam excerpt in ../shared/data/mrnet."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from orthodiff_nnunet.dataset_conversion.mrnet import MRNetError, convert_mrnet, main, plane_image
from orthodiff_nnunet.orientation import THROUGH_PLANE_SITK_AXIS, detect_plane, to_canonical

PLANES = {"sag": "sagittal", "cor": "coronal", "ax": "axial"}
SPACING = {"sag": (0.6, 0.6, 3.0), "cor": (0.5, 0.55, 3.5), "ax": (0.45, 0.45, 4.0)}
#: synthetic labels (abnormal, ACL, meniscus); the CSVs also list exams without volumes, like MRNet's
LABELS = {"0000": (0, 0, 0), "0001": (1, 1, 0), "0002": (1, 0, 1), "0003": (1, 1, 1), "0004": (0, 0, 0)}
CASES = ("0000", "0001", "0002")


def _volume(case: str, plane: str) -> np.ndarray:
    seed = int(case) * 3 + list(PLANES).index(plane)
    n_slices = 4 + int(case)
    return np.random.default_rng(seed).integers(1, 255, (n_slices, 12, 14)).astype(np.uint8)


def _make_mrnet(root: Path, split: str = "train", cases=CASES) -> Path:
    for plane, folder in PLANES.items():
        (root / split / folder).mkdir(parents=True, exist_ok=True)
        for case in cases:
            np.save(root / split / folder / f"{case}.npy", _volume(case, plane))
    for i, name in enumerate(("abnormal", "acl", "meniscus")):
        with open(root / f"{split}-{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([(c, v[i]) for c, v in LABELS.items()])
    return root


def _key_map(key_file: Path) -> dict[str, str]:
    with open(key_file, newline="") as f:
        return {r["pseudonym"]: r["case_id"] for r in csv.DictReader(f)}


def _dataset(raw: Path, dataset_id: int, plane: str) -> Path:
    (folder,) = raw.glob(f"Dataset{dataset_id:03d}_*")
    suffix = {"sag": "Sag", "cor": "Cor", "ax": "Ax"}[plane]
    assert folder.name == f"Dataset{dataset_id:03d}_MRNet{suffix}"
    return folder


def test_synthetic_mrnet_three_datasets(tmp_path: Path) -> None:
    root = _make_mrnet(tmp_path / "mrnet")
    raw, key_file = tmp_path / "raw", tmp_path / "private" / "key.csv"
    result = convert_mrnet(root, 640, spacing=SPACING, raw=raw, field_strength_t=1.5, key_file=key_file,
                           num_processes=1, num_folds=3)
    assert sorted(result.datasets) == ["ax", "cor", "sag"]
    assert result.num_cases == {"sag": 3, "cor": 3, "ax": 3}
    assert any("user-supplied" in w for w in result.warnings)
    assert any("1.5 T" in w for w in result.warnings)
    source = _key_map(key_file)
    assert sorted(set(source.values())) == list(CASES)

    for offset, plane in enumerate(("sag", "cor", "ax")):
        folder = _dataset(raw, 640 + offset, plane)
        assert result.datasets[plane] == folder
        meta = json.loads((folder / "dataset.json").read_text())
        od = meta["orthodiff"]
        assert od["orientation"] == plane
        assert od["spacing_source"] == "user-supplied"
        assert od["abnormality_labels"] == ["abnormal", "ACL", "meniscus"]
        assert od["sites"] == ["MRNet"] and od["vendors"] == ["GE"] and od["field_strengths_t"] == [1.5]
        assert (od["num_labeled"], od["num_unlabeled"]) == (0, 3)
        assert meta["numTraining"] == 3
        targets = json.loads((folder / od["targets_file"]).read_text())
        assert targets["label_names"] == ["abnormal", "ACL", "meniscus"]
        assert len(targets["cases"]) == 3
        for case, info in targets["cases"].items():
            src = source[case]
            assert src not in case  # pseudonyms only
            assert tuple(info["targets"][k] for k in ("abnormal", "ACL", "meniscus")) == LABELS[src]
            assert info["segmentation"] == "unlabeled"
            assert info["site"] == "MRNet" and info["field_strength_t"] == 1.5 and info["vendor"] == "GE"
            image = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
            label = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
            # spacing as given, the slice distance on the plane's through-plane axis
            assert image.GetSpacing()[THROUGH_PLANE_SITK_AXIS[plane]] == pytest.approx(SPACING[plane][2], rel=1e-6)
            assert sorted(image.GetSpacing()) == pytest.approx(sorted(SPACING[plane]), rel=1e-6)
            assert detect_plane(image).orientation == plane
            expected = to_canonical(plane_image(_volume(src, plane), plane, SPACING[plane]))
            assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected))
            assert not sitk.GetArrayViewFromImage(label).any()
        splits = json.loads((folder / "splits_final.json").read_text())
        assert sorted(c for s in splits for c in s["val"]) == sorted(targets["cases"])


def test_plane_image_directions() -> None:
    for plane in PLANES:
        image = plane_image(np.ones((5, 8, 10), dtype=np.uint8), plane, SPACING[plane])
        info = detect_plane(image)
        assert info.orientation == plane and info.obliquity_deg == 0.0
        assert image.GetSpacing() == SPACING[plane]
        d = np.asarray(image.GetDirection()).reshape(3, 3)
        assert np.allclose(np.cross(d[:, 0], d[:, 1]), d[:, 2])  # right-handed like DICOM
        centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
        assert np.allclose(centre, 0.0)


def test_one_spacing_for_all_planes_dry_run(tmp_path: Path) -> None:
    root = _make_mrnet(tmp_path / "mrnet")
    raw = tmp_path / "raw"
    result = convert_mrnet(root, 650, spacing=(0.5, 0.5, 3.0), raw=raw, dry_run=True, num_processes=1)
    assert result.dry_run and result.num_cases == {"sag": 3, "cor": 3, "ax": 3}
    assert not raw.exists()


def test_missing_or_bad_spacing(tmp_path: Path) -> None:
    root = _make_mrnet(tmp_path / "mrnet")
    raw = tmp_path / "raw"
    with pytest.raises(MRNetError, match="MRNet publishes no voxel spacing"):
        convert_mrnet(root, 660, spacing=None, raw=raw)
    with pytest.raises(MRNetError, match="plane\\(s\\) ax.*--spacing-ax"):
        convert_mrnet(root, 660, spacing={"sagittal": (0.6, 0.6, 3), "cor": (0.6, 0.6, 3)}, raw=raw)
    with pytest.raises(MRNetError, match="order is in-plane x, in-plane y, slice distance"):
        convert_mrnet(root, 660, spacing=(3.0, 0.6, 0.6), raw=raw)
    with pytest.raises(MRNetError, match="three numbers"):
        convert_mrnet(root, 660, spacing=(0.6, 3.0), raw=raw)
    with pytest.raises(MRNetError, match="three numbers"):
        convert_mrnet(root, 660, spacing=(0.6, -0.6, 3.0), raw=raw)
    assert not raw.exists()


def test_cli_requires_spacing(tmp_path: Path, capsys) -> None:
    root = _make_mrnet(tmp_path / "mrnet")
    assert main([str(root), "-d", "670", "--raw", str(tmp_path / "raw")]) == 2
    err = capsys.readouterr().err
    assert "MRNet publishes no voxel spacing" in err and "--spacing-sag" in err
    assert not (tmp_path / "raw").exists()


def test_cli_cases_subset_and_valid_split(tmp_path: Path, capsys) -> None:
    root = _make_mrnet(tmp_path / "mrnet", split="valid")
    raw, key_file = tmp_path / "raw", tmp_path / "key.csv"
    argv = [str(root), "-d", "680", "--raw", str(raw), "--split", "valid", "--cases", "1", "0002",
            "--spacing-sag", "0.6", "0.6", "3", "--spacing", "0.5", "0.5", "4", "--field-strength", "3",
            "--key-file", str(key_file), "-np", "1", "--folds", "2"]
    assert main(argv) == 0
    assert "conversion complete" in capsys.readouterr().out
    assert sorted(set(_key_map(key_file).values())) == ["0001", "0002"]
    sag = sitk.ReadImage(str(next((_dataset(raw, 680, "sag") / "imagesTr").glob("*.nii.gz"))))
    ax = sitk.ReadImage(str(next((_dataset(raw, 682, "ax") / "imagesTr").glob("*.nii.gz"))))
    assert sag.GetSpacing()[THROUGH_PLANE_SITK_AXIS["sag"]] == pytest.approx(3.0)
    assert ax.GetSpacing()[THROUGH_PLANE_SITK_AXIS["ax"]] == pytest.approx(4.0)
    with pytest.raises(MRNetError, match="train does not exist"):
        convert_mrnet(root, 690, spacing=(0.5, 0.5, 3.0), raw=raw)


def test_missing_volume_and_label_file(tmp_path: Path) -> None:
    root = _make_mrnet(tmp_path / "mrnet")
    (root / "train" / "coronal" / "0001.npy").unlink()
    # a missing plane no longer refuses the exam (tests/test_site_inputs.py checks the targets files)
    result = convert_mrnet(root, 700, spacing=(0.5, 0.5, 3.0), raw=tmp_path / "raw", dry_run=True, num_processes=1)
    assert result.num_cases == {"sag": 3, "cor": 2, "ax": 3}
    convert_mrnet(root, 700, spacing=(0.5, 0.5, 3.0), raw=tmp_path / "raw", cases=["0000"], dry_run=True,
                  num_processes=1)
    (root / "train-acl.csv").unlink()
    with pytest.raises(MRNetError, match="train-acl.csv is missing"):
        convert_mrnet(root, 700, spacing=(0.5, 0.5, 3.0), raw=tmp_path / "raw", cases=["0000"])


def test_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "orthodiff_nnunet.dataset_conversion.mrnet", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "--spacing-sag" in out and "--cases" in out and "--split" in out and "MRNet publishes none" in out


# ----------------------------------------------------------------------------------------------
# real data: the 6 MRNet exams of ../shared/data/mrnet with their official labels

REAL_LABELS = {  # (abnormal, ACL, meniscus) from train-{abnormal,acl,meniscus}.csv
    "0001": (1, 1, 1), "0003": (1, 0, 1), "1123": (0, 0, 0),
    "1127": (0, 0, 0), "1128": (1, 0, 0), "1129": (1, 1, 0),
}


@pytest.mark.realdata
def test_real_mrnet_exams(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "mrnet"
    if not (root / "train").is_dir():
        pytest.skip(f"{root} is absent")
    raw, key_file = tmp_path / "raw", tmp_path / "key.csv"
    spacing = {"sag": (0.6, 0.6, 3.0), "cor": (0.6, 0.6, 3.0), "ax": (0.6, 0.6, 3.5)}
    result = convert_mrnet(root, 720, spacing=spacing, raw=raw, cases=sorted(REAL_LABELS), key_file=key_file,
                           num_processes=1, num_folds=3)
    assert result.num_cases == {"sag": 6, "cor": 6, "ax": 6}
    source = _key_map(key_file)
    for offset, plane in enumerate(("sag", "cor", "ax")):
        folder = _dataset(raw, 720 + offset, plane)
        od = json.loads((folder / "dataset.json").read_text())["orthodiff"]
        assert od["spacing_source"] == "user-supplied" and od["num_unlabeled"] == 6
        targets = json.loads((folder / "orthodiff_targets.json").read_text())["cases"]
        assert {source[c] for c in targets} == set(REAL_LABELS)
        for case, info in targets.items():
            assert tuple(info["targets"][k] for k in ("abnormal", "ACL", "meniscus")) == REAL_LABELS[source[case]]
            image = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
            n_slices = np.load(root / "train" / PLANES[plane] / f"{source[case]}.npy", mmap_mode="r").shape[0]
            assert image.GetSize()[THROUGH_PLANE_SITK_AXIS[plane]] == n_slices
            assert image.GetSpacing()[THROUGH_PLANE_SITK_AXIS[plane]] == pytest.approx(spacing[plane][2])
