"""Shared fixtures: tiny synthetic series and manifests, tiny planned phantom datasets (built once per
session, copied per module), nnU-Net's environment for a block, and the location of ../shared/data."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

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


@contextlib.contextmanager
def nnunet_env(root: Path, in_process: bool = True) -> Iterator[Path]:
    """nnUNet_raw, nnUNet_preprocessed and nnUNet_results at ``root``/raw, /pre and /res for the block.

    ``in_process``: training augments in-process without torch.compile (``nnUNet_n_proc_DA=0``,
    ``nnUNet_compile=0``): small data on 2 cores. The whole environment is restored on exit, including
    what the library exported meanwhile (``plan_and_preprocess`` sets the nnU-Net folders).
    """
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res")}
    if in_process:
        env.update(nnUNet_n_proc_DA="0", nnUNet_compile="0")
    with mock.patch.dict(os.environ, env):
        yield root


@dataclass(frozen=True)
class TinyPhantom:
    """A sagittal phantom site (SITE_3T), converted, planned, preprocessed, with tiny-network plans
    ``tinyPlans`` (:func:`write_shrunk_plans` with ``max_features`` features and ``max_stages`` stages)."""

    dataset_id: int
    name: str
    n_cases: int
    seed: int
    max_features: int = 8
    max_stages: int = 3

    @property
    def dataset(self) -> str:
        return f"Dataset{self.dataset_id}_{self.name}Sag"


#: 5 scans, 4 features: the MAE and the faithful-pretraining tests
TINY_SAG5 = TinyPhantom(523, "Tiny", n_cases=5, seed=7, max_features=4)
#: 4 scans, 8 features: tests/test_pretraining.py (one scan held out, the encoder sees 3)
TINY_SAG4 = TinyPhantom(521, "Pretrain", n_cases=4, seed=5)


def _build_tiny_phantom(spec: TinyPhantom, root: Path) -> str:
    """Convert, plan and preprocess ``spec`` under ``root``; returns the tiny plans' identifier."""
    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.data.phantom import write_site
    from orthodiff_nnunet.data.sites import SITE_3T
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.planning import plan_and_preprocess

    with nnunet_env(root):
        manifest = write_site(root / "site", SITE_3T, n_cases=spec.n_cases, seed=spec.seed, orientations=("sag",))
        convert(manifest, spec.dataset_id, spec.name, num_processes=1)
        result = plan_and_preprocess([spec.dataset_id], num_processes=1, show_progress=False)
        return write_shrunk_plans(root / "pre" / spec.dataset, result.datasets[0].plans_identifier, "tinyPlans",
                                  max_features=spec.max_features, max_stages=spec.max_stages)


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    """``tiny_phantom(spec, root)``: a context manager giving ``(root, plans_id)``, ``root`` holding its own
    copy of ``spec``'s raw and preprocessed folders (built once per session, read only) and an empty
    ``res``, with nnU-Net's environment pointing there for the block."""
    built: dict[TinyPhantom, tuple[Path, str]] = {}

    @contextlib.contextmanager
    def planned(spec: TinyPhantom, root: Path) -> Iterator[tuple[Path, str]]:
        if spec not in built:
            source = tmp_path_factory.mktemp(f"tiny{spec.dataset_id}")
            built[spec] = source, _build_tiny_phantom(spec, source)
        source, plans_id = built[spec]
        for sub in ("raw", "pre"):
            shutil.copytree(source / sub, root / sub)
        with nnunet_env(root):
            yield root, plans_id

    return planned


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` are skipped, before their fixtures are built, where no CUDA device is present."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu): torch.cuda.is_available() is False here")
    for item in gpu_items:
        item.add_marker(skip)
