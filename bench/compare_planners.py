"""Side-by-side plans: orthodiff planners vs nnU-Net's default ExperimentPlanner and nnUNetPlannerResEncM.

All four planners run on the same fingerprint of the same datasets (nnU-Net 2.8.1, CPU; planning
needs no GPU). Datasets (generated into a temporary folder unless --work is given):

* ``PhantomSag/Cor/Ax``: the procedural knee phantom (adult size, 3 T site with 0.4 mm in-plane
  pixels and 3 mm slices), 3 exams, converted with ``orthodiff convert``: the thick axis sits at
  numpy axis 2 (sag), 1 (cor), 0 (ax) of the canonical LPS layout.
* ``DessSag``: the real pyKNEEr sagittal 3D DESS knee (0.3125 x 0.3125 x 1.5 mm, 512 x 512 x 80),
  when ``../shared/data`` (or $ORTHODIFF_SHARED_DATA) holds it.
* ``IsoSag``: a near-isotropic 3D sagittal acquisition (0.5 mm isotropic, 2 cases): nnU-Net's
  spacing guess cannot tell the slice axis.
* ``MixDessSag``: sagittal 3D DESS from two protocols (0.36 mm in-plane, 0.7 and 1.0 mm slices,
  4 cases): the through-plane target spacing differs.

Usage::

    OMP_NUM_THREADS=1 python -m bench.compare_planners [--work DIR] [--skip-real]

Prints a Markdown table: per dataset and planner, transpose, 3d_fullres spacing (mm), patch,
batch, stages, the first two stages' kernels, and the extra configurations.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bench import common
from orthodiff_nnunet.conventions import PLAIN_PLANS, RESENC_M_PLANS, SEGMENTATION_CONFIGURATION


def write_blob_dataset(raw: Path, dataset_id: int, name: str, orientation: str, spacings: list[tuple],
                       shape_mm: tuple[float, float, float]) -> Path:
    """Synthetic canonical-LPS dataset: one case per numpy spacing (z, y, x) in mm, an ellipsoid label."""
    from orthodiff_nnunet.orientation import THROUGH_PLANE_NUMPY_AXIS

    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(dataset_id)
    for i, sp in enumerate(spacings):
        shape = [int(round(m / s)) for m, s in zip(shape_mm, sp)]
        grid = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, sp)], indexing="ij")
        r = np.sqrt(sum((g / (0.3 * m)) ** 2 for g, m in zip(grid, shape_mm)))
        lab = ((r < 1).astype(np.uint8) + (r < 0.5)).astype(np.uint8)
        img = (np.abs(rng.normal(20, 5, shape)) + 200 * (r < 1) + 100 * (r < 0.5)).astype(np.float32)
        for arr, path in ((img, folder / "imagesTr" / f"c{i:03d}_0000.nii.gz"), (lab, folder / "labelsTr" / f"c{i:03d}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(tuple(float(s) for s in sp[::-1]))
            sitk.WriteImage(im, str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": len(spacings),
        "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO",
        "orthodiff": {"orientation": orientation, "through_plane_numpy_axis": THROUGH_PLANE_NUMPY_AXIS[orientation],
                      "base_dataset_id": dataset_id, "name": name[:-3], "abnormality_labels": []},
    }))
    return folder


def write_dess(raw: Path, dataset_id: int, series: Path) -> Path:
    from orthodiff_nnunet.orientation import to_canonical

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    image = sitk.Cast(to_canonical(reader.Execute()), sitk.sitkFloat32)
    sitk.ProcessObject.SetGlobalWarningDisplay(True)
    folder = raw / f"Dataset{dataset_id:03d}_DessSag"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(image)
    label = sitk.GetImageFromArray((array > np.percentile(array, 90)).astype(np.uint8))
    label.CopyInformation(image)
    sitk.WriteImage(image, str(folder / "imagesTr" / "dess_0000.nii.gz"))
    sitk.WriteImage(label, str(folder / "labelsTr" / "dess.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "bright": 1}, "numTraining": 1,
        "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO",
        "orthodiff": {"orientation": "sag", "through_plane_numpy_axis": 2, "base_dataset_id": dataset_id,
                      "name": "Dess", "abnormality_labels": []},
    }))
    return folder


def make_datasets(raw: Path, skip_real: bool) -> list[int]:
    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.data.phantom import write_site
    from orthodiff_nnunet.data.sites import SITE_3T

    ids = []
    site = dataclasses.replace(SITE_3T, in_plane_spacing_mm=0.4)
    if not (raw / "Dataset801_PhantomSag").is_dir():
        manifest = write_site(raw.parent / "site", site, n_cases=3, seed=11, scale=1.0)
        convert(manifest, 801, "Phantom", raw=raw, num_processes=1)
    ids += [801, 802, 803]
    shared = common.shared_data()
    series = shared / "dicom" / "pykneer_dess_sag_3t" / "echo1" if shared else None
    if not skip_real and series is not None and series.is_dir():
        if not (raw / "Dataset811_DessSag").is_dir():
            write_dess(raw, 811, series)
        ids.append(811)
    else:
        print("(real DESS knee absent or skipped)", file=sys.stderr)
    if not (raw / "Dataset821_IsoSag").is_dir():
        write_blob_dataset(raw, 821, "IsoSag", "sag", [(0.5, 0.5, 0.5)] * 2, (80.0, 80.0, 70.0))
    if not (raw / "Dataset831_MixDessSag").is_dir():
        write_blob_dataset(raw, 831, "MixDessSag", "sag", [(0.36, 0.36, 0.7)] * 2 + [(0.36, 0.36, 1.0)] * 2,
                           (110.0, 110.0, 100.0))
    ids += [821, 831]
    return ids


PLANNERS = (
    ("nnU-Net ExperimentPlanner", "nnunetv2.experiment_planning.experiment_planners.default_experiment_planner",
     "ExperimentPlanner", "nnUNetPlans"),
    ("nnU-Net nnUNetPlannerResEncM",
     "nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners",
     "nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
    ("orthodiff plain", "orthodiff_nnunet.planners", "OrthodiffPlainPlanner", PLAIN_PLANS),
    ("orthodiff resenc_m (default)", "orthodiff_nnunet.planners", "OrthodiffResEncMPlanner", RESENC_M_PLANS),
)


def _fmt(seq, sep="x") -> str:
    return sep.join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in seq)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--skip-real", action="store_true", help="leave out the real DESS knee")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[tuple[str, ...]]:
    """Every dataset's fingerprint, planned by each of the four planners: one table row per pair."""
    from orthodiff_nnunet.paths import set_nnunet_paths

    args.work = args.work or Path(tempfile.mkdtemp(prefix="orthodiff_compare_"))
    raw, pre = args.work / "raw", args.work / "pre"
    set_nnunet_paths(raw=raw, preprocessed=pre)
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints its plans
        return _plan_all(make_datasets(raw, args.skip_real), raw, pre)


def record(rows: list[tuple[str, ...]], args: argparse.Namespace) -> None:
    """Print the Markdown table on stdout (the work folder on stderr)."""
    header = ["dataset", "planner", "transpose", "3d_fullres spacing mm", "patch", "batch", "stages",
              "kernels st.0 st.1", "other 3D configurations (patch, batch)", "plan s"]
    print(common.markdown_table(header, [list(r) for r in rows]))
    print(f"\n(work folder: {args.work})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record(run(args), args)
    return 0


def _plan_all(ids: list[int], raw: Path, pre: Path) -> list[tuple[str, ...]]:
    import importlib

    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
    )

    from orthodiff_nnunet.planners import OrthodiffFingerprintExtractor
    from orthodiff_nnunet.plans import resolve_configuration

    rows = []
    for ds in ids:
        if not (pre / next(raw.glob(f"Dataset{ds:03d}_*")).name / "dataset_fingerprint.json").is_file():
            extract_fingerprint_dataset(ds, OrthodiffFingerprintExtractor, num_processes=1, clean=True,
                                        verbose=False, show_progress_bar=False)
        for label, module, cls_name, plans_name in PLANNERS:
            cls = getattr(importlib.import_module(module), cls_name)
            t0 = time.perf_counter()
            plans, _ = plan_experiment_dataset(ds, cls, overwrite_plans_name=plans_name)
            seconds = time.perf_counter() - t0
            plans = json.loads((pre / plans["dataset_name"] / f"{plans_name}.json").read_text())
            fullres = resolve_configuration(plans, SEGMENTATION_CONFIGURATION)
            a = fullres["architecture"]["arch_kwargs"]
            extra = []
            for c in plans["configurations"]:
                if c in (SEGMENTATION_CONFIGURATION, "2d", "3d_cascade_fullres"):
                    continue
                r = resolve_configuration(plans, c)
                extra.append(f"{c} {_fmt(r['patch_size'])} b{r['batch_size']}")
            rows.append((
                plans["dataset_name"], label, _fmt(plans["transpose_forward"], ","),
                _fmt(fullres["spacing"]), _fmt(fullres["patch_size"]), str(fullres["batch_size"]),
                str(a["n_stages"]), " ".join(_fmt(k, "") for k in a["kernel_sizes"][:2]),
                "; ".join(extra) or "-", f"{seconds:.1f}",
            ))
    return rows


if __name__ == "__main__":
    sys.exit(main())
