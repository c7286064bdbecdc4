"""Shared fixtures: tiny synthetic series and manifests, and the location of ../shared/data."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """../shared/data next to the repository (or $ORTHODIFF_SHARED_DATA); None when absent."""
    env = os.environ.get("ORTHODIFF_SHARED_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("real data folder ../shared/data is absent (set ORTHODIFF_SHARED_DATA to run this test)")
    return d


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    r = np.eye(3)
    a, b = [i for i in range(3) if i != axis]
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


#: DICOM-like direction matrices (columns = i, j, k axes in LPS) for each acquisition plane.
PLANE_DIRECTIONS = {
    "sag": np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float),  # i: A->P, j: S->I, k: R->L
    "cor": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float),  # i: R->L, j: S->I, k: A->P
    "ax": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float),  # i: R->L, j: A->P, k: I->S
}


def make_series(
    orientation: str = "sag",
    size: tuple[int, int, int] = (24, 20, 8),
    spacing: tuple[float, float, float] = (0.5, 0.5, 3.0),
    oblique_deg: float = 0.0,
    seed: int = 0,
) -> tuple[sitk.Image, sitk.Image]:
    """A small (image, label) pair: SimpleITK size (i, j, k), k the slice axis.

    The label holds a box of label 1 and a smaller box of label 5; the image is brighter there.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    lab = np.zeros((nz, ny, nx), dtype=np.uint8)
    lab[1:-1, ny // 4 : 3 * ny // 4, nx // 4 : 3 * nx // 4] = 1
    lab[2:-2, ny // 3 : ny // 2, nx // 3 : nx // 2] = 5
    img = (100 + 200 * (lab > 0) + 100 * (lab == 5) + rng.normal(0, 10, lab.shape)).astype(np.float32)
    direction = PLANE_DIRECTIONS[orientation]
    if oblique_deg:
        direction = rotation(2, oblique_deg) @ rotation(0, oblique_deg / 2) @ direction
    out = []
    for arr in (img, lab):
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing(spacing)
        im.SetDirection(direction.flatten().tolist())
        im.SetOrigin((-10.0, 20.0, 35.0))
        out.append(im)
    return out[0], out[1]


def write_manifest(path: Path, rows: list[dict]) -> Path:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


@pytest.fixture
def small_site(tmp_path: Path):
    """A site folder with 4 exams (patient P2 has two) x 3 orientations, NIfTI, with label maps."""
    site = tmp_path / "site"
    site.mkdir()
    rows = []
    exams = [("EX1", "PAT-1"), ("EX2", "PAT-2"), ("EX3", "PAT-2"), ("EX4", "PAT-4")]
    for e, (case, patient) in enumerate(exams):
        for o in ("sag", "cor", "ax"):
            img, lab = make_series(o, seed=e)
            sitk.WriteImage(img, str(site / f"{case}_{o}.nii.gz"))
            sitk.WriteImage(lab, str(site / f"{case}_{o}_seg.nii.gz"))
            rows.append({
                "case_id": case, "patient_id": patient, "site": "SiteA", "field_strength": "3",
                "vendor": "VendorA", "image": f"{case}_{o}.nii.gz", "orientation": "",
                "label": f"{case}_{o}_seg.nii.gz", "ACL": str(e % 2), "EFFU": "1" if e == 2 else "0",
            })
    return site, rows
