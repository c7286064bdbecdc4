"""Generic site converter: manifest CSV -> nnU-Net raw datasets, one per orientation.

Flow (every step collects *all* problems before refusing):

1. the manifest is parsed and checked (:mod:`orthodiff_nnunet.dataset_conversion.manifest`);
2. every series is read (DICOM through SimpleITK/GDCM, or NIfTI/NRRD/MHA), checked (3D, finite,
   not empty or constant, label geometry and values), its plane decided from the slice normal,
   put into the canonical LPS layout and written into a staging folder;
3. only when no series failed, each orientation's dataset is assembled in the staging folder
   (unchanged cases of an existing dataset are hard-linked, not rewritten) with ``dataset.json``,
   the targets file and patient-grouped splits, and moved into place.

Nothing is written with ``dry_run``; an interrupted run leaves only ``<raw>/.orthodiff_tmp``.
No value read from a DICOM header reaches an output or a log: images are rebuilt from their
voxel arrays and geometry only, and output names are keyed-hash pseudonyms.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from orthodiff_nnunet import __version__, paths
from orthodiff_nnunet.data.splits import patient_grouped_splits
from orthodiff_nnunet.dataset_conversion.manifest import ManifestRow, read_manifest
from orthodiff_nnunet.errors import ConversionError, OrthodiffError
from orthodiff_nnunet.orientation import (
    THROUGH_PLANE_NUMPY_AXIS,
    OrientationError,
    detect_plane,
    to_canonical,
)
from orthodiff_nnunet.privacy import load_or_create_key, pseudonym, write_key_file
from orthodiff_nnunet.schemes import (
    KNEE_STRUCTURES,
    ORIENTATION_ID_OFFSET,
    ORIENTATION_SUFFIX,
    ORIENTATIONS,
)
from orthodiff_nnunet.utils import atomic_write_json, load_json

log = logging.getLogger(__name__)

FILE_ENDING = ".nii.gz"
TARGETS_FILE = "orthodiff_targets.json"
RECORD_FILE = ".orthodiff_conversion.json"
TMP_DIRNAME = ".orthodiff_tmp"


@dataclass(frozen=True)
class GeometryTolerance:
    """How far label and image headers may differ and still count as the same grid.

    spacing: relative difference per axis; direction: absolute difference of direction cosines;
    origin: absolute difference in units of the smallest voxel spacing.
    """

    spacing: float = 1e-3
    direction: float = 1e-3
    origin: float = 1e-2


@dataclass
class SeriesOutcome:
    """What converting one manifest row produced (picklable, no identifiers)."""

    row: int
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # one entry per written case (several with echo="all")
    cases: list[dict] = field(default_factory=list)


@dataclass
class ConversionResult:
    """What ``convert`` did: the datasets per orientation and per-case bookkeeping."""

    datasets: dict[str, Path]
    num_cases: dict[str, int]
    added: int
    updated: int
    unchanged: int
    dry_run: bool
    warnings: list[str] = field(default_factory=list)
    orientations_detected: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = ["dry run: every series is valid, nothing was written" if self.dry_run else "conversion complete"]
        lines.append(f"{'orientation':<12}{'cases':>7}  dataset")
        for o in ORIENTATIONS:
            if o in self.datasets:
                lines.append(f"{o:<12}{self.num_cases.get(o, 0):>7}  {self.datasets[o]}")
        lines.append(f"series: {self.added} added, {self.updated} updated, {self.unchanged} unchanged")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# reading and checking one series (runs in worker processes)


class SeriesProblem(OrthodiffError):
    """A problem of one series whose message already says what is wrong and what to do."""


def _fresh(image: sitk.Image) -> sitk.Image:
    """A copy with voxels and geometry only: no metadata dictionary can travel on."""
    out = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(image).copy())
    out.SetOrigin(image.GetOrigin())
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(image.GetDirection())
    return out


def _read_images(row: ManifestRow) -> list[tuple[int | None, sitk.Image]]:
    """(echo index or None, image) pairs of the row's series."""
    if row.is_dicom:
        from orthodiff_nnunet.io.dicom import read_series

        echoes = read_series(row.image, series=row.series, echo=row.echo)
        multi = row.echo == "all" and len(echoes) > 1
        return [(e.echo_index if multi else None, _fresh(e.image)) for e in echoes]
    if row.series or row.echo:
        raise OrthodiffError("'series' and 'echo' apply to DICOM series only; clear them for this file")
    _verify_nifti(row.image)
    image = sitk.ReadImage(str(row.image))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        return [(None, image)]  # refused by _check_image
    return [(None, _fresh(image))]


def _verify_nifti(path: Path) -> None:
    """Decode a NIfTI file completely with nibabel, which ITK's reader cannot replace here.

    ITK's NIfTI reader silently zero-fills a truncated ``.nii.gz`` and turns NaN into 0, so a
    damaged file would pass unnoticed. nibabel raises on truncation and keeps NaN/Inf.
    """
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    import nibabel

    try:
        data = np.asanyarray(nibabel.load(str(path)).dataobj)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
        raise SeriesProblem(
            f"cannot read {path.name}: {type(exc).__name__}: {exc}; the file is damaged or incomplete: export it again"
        ) from exc
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise SeriesProblem(f"{path.name} has {bad} NaN/Inf voxel(s); re-export the series or replace them")


def _check_image(image: sitk.Image) -> tuple[list[str], np.ndarray | None]:
    problems: list[str] = []
    if image.GetNumberOfComponentsPerPixel() != 1:
        return [f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar (grey-value) MR series is needed"], None
    if image.GetDimension() != 3:
        return [f"image is {image.GetDimension()}D; a 3D series is needed (split 4D series into one 3D file per volume)"], None
    size = image.GetSize()
    if min(size) < 2:
        return [f"image has size {size}: a single slice is not a 3D series; give the whole series"], None
    spacing = image.GetSpacing()
    if min(spacing) <= 0 or max(spacing) > 20:
        problems.append(f"spacing {tuple(round(s, 4) for s in spacing)} mm is implausible; fix the header (spacing in mm)")
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            problems.append(f"image has {bad} NaN/Inf voxel(s); re-export the series or replace them")
            return problems, None
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        what = "empty (all zero)" if hi == 0 else f"constant ({hi:g})"
        problems.append(f"image is {what}; the file holds no image data: re-export the series")
    return problems, np.asarray(arr)


def _plain(values, decimals: int) -> str:
    """``(0.5, 0.6, 3.0)``: rounded plain numbers (a tuple of numpy scalars prints ``np.float64(...)``)."""
    return "(" + ", ".join(repr(round(float(v), decimals)) for v in values) + ")"


def _same_grid(a: sitk.Image, b: sitk.Image, tol: GeometryTolerance) -> list[str]:
    diffs: list[str] = []
    if a.GetSize() != b.GetSize():
        return [f"size {b.GetSize()} != image {a.GetSize()}"]
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if np.any(np.abs(sa - sb) > tol.spacing * np.abs(sa)):
        diffs.append(f"spacing {_plain(sb, 4)} != image {_plain(sa, 4)} mm")
    oa, ob = np.array(a.GetOrigin()), np.array(b.GetOrigin())
    if np.any(np.abs(oa - ob) > tol.origin * sa.min()):
        diffs.append(f"origin {_plain(ob, 3)} != image {_plain(oa, 3)} mm")
    da, db = np.array(a.GetDirection()), np.array(b.GetDirection())
    if np.any(np.abs(da - db) > tol.direction):
        diffs.append("direction differs from the image's")
    return diffs


def _series_digest(row: ManifestRow, key: bytes) -> str:
    """Keyed hash of the series' files and conversion options (decides 'unchanged' on re-runs)."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    files: list[Path] = []
    if row.image.is_dir():
        files = sorted(p for p in row.image.rglob("*") if p.is_file())
    else:
        files = [row.image]
        if row.image.suffix.lower() == ".mhd" or row.image.name.lower().endswith(".nhdr"):
            files += sorted(p for p in row.image.parent.iterdir() if p.stem == row.image.name.split(".")[0] and p != row.image)
    if row.label is not None:
        files.append(row.label)
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(repr((row.orientation, row.label_remap, row.series, row.echo, __version__)).encode())
    return h.hexdigest()


def convert_series(task: dict) -> SeriesOutcome:
    """Read, check, canonicalise and (unless dry run) write one manifest row. Never raises."""
    row: ManifestRow = task["row"]
    out = SeriesOutcome(row=row.row)
    try:
        _convert_series(task, out)
    except OrthodiffError as exc:  # SeriesProblem, DicomError, RemapError: their message says what to do
        out.problems.append(f"{row.where()}: {exc}")
    except (RuntimeError, OSError, ValueError) as exc:
        # SimpleITK raises RuntimeError for unreadable/corrupt files
        msg = str(exc).strip().splitlines()
        detail = next((m for m in msg if m.strip()), type(exc).__name__)
        out.problems.append(f"{row.where()}: cannot read {row.image_text or row.image.name}: {detail[:300]}; check the file is complete and readable")
    return out


def _convert_series(task: dict, out: SeriesOutcome) -> None:
    row: ManifestRow = task["row"]
    where = row.where()
    tol: GeometryTolerance = task["tolerance"]
    allowed = set(task["allowed_labels"])

    previous = task.get("previous")  # same digest already converted: keep those files
    if previous is not None:
        out.cases = [dict(c, status="unchanged") for c in previous]
        return

    images = _read_images(row)
    label_img = None
    if row.label is not None:
        _verify_nifti(row.label)
        label_img = sitk.ReadImage(str(row.label))
        if label_img.GetNumberOfComponentsPerPixel() != 1 or label_img.GetDimension() != 3:
            out.problems.append(f"{where}: label map {row.label.name} is not a scalar 3D image")
            return
    remap = None
    if row.label_remap:
        from orthodiff_nnunet.remap import load_remap_table

        remap = load_remap_table(row.label_remap)

    for echo, image in images:
        tag = where if echo is None else f"{where} echo {echo}"
        problems, _ = _check_image(image)
        if problems:
            out.problems += [f"{tag}: {p}" for p in problems]
            continue
        try:
            plane = detect_plane(image, task["max_obliquity_deg"])
            orientation = plane.orientation
            if row.orientation is not None and row.orientation != orientation:
                out.problems.append(
                    f"{tag}: the manifest says {row.orientation} but the slice normal says {orientation} "
                    f"({plane.obliquity_deg:.0f} degrees oblique); fix or clear the orientation column"
                )
                continue
        except OrientationError as exc:
            if row.orientation is None:
                out.problems.append(f"{tag}: plane cannot be decided: {exc}")
                continue
            orientation = row.orientation
            out.warnings.append(f"{tag}: plane taken from the manifest ({orientation}); geometry is ambiguous")
            plane = None

        labeled = label_img is not None
        if labeled:
            diffs = _same_grid(image, label_img, tol)
            if diffs:
                out.problems.append(
                    f"{tag}: label map {row.label.name} does not match the image grid ({'; '.join(diffs)}); "
                    "resample the label map onto the image (nearest neighbour) or fix its header"
                )
                continue
            lab = sitk.GetArrayFromImage(label_img)
            if lab.dtype.kind == "f":
                if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
                    out.problems.append(f"{tag}: label map {row.label.name} holds non-integer values; labels must be integers")
                    continue
                lab = lab.astype(np.int64)
            if remap is not None:
                missing = remap.unknown_values(lab)
                if missing:
                    out.problems.append(
                        f"{tag}: label values {missing} are not in the remap table {remap.name}; add them to the table"
                    )
                    continue
                lab = remap.apply(lab)
            unknown = sorted(set(np.unique(lab).tolist()) - allowed)
            if unknown:
                out.problems.append(
                    f"{tag}: label values {unknown} are not in the dataset's labels {sorted(allowed)}; "
                    "give a label_remap table for this source or a --label-scheme that declares them"
                )
                continue
            if not np.any(lab):
                out.warnings.append(f"{tag}: label map is all background")
        else:
            lab = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
        label_out = sitk.GetImageFromArray(lab.astype(np.uint8 if max(allowed) < 256 else np.uint16))
        label_out.CopyInformation(image)

        case = task["case"] + (f"e{echo}" if echo is not None else "")
        info = {
            "case": case,
            "exam": task["case"],
            "orientation": orientation,
            "echo": echo,
            "labeled": labeled,
            "digest": task["digest"],
            "obliquity_deg": None if plane is None else round(plane.obliquity_deg, 2),
            "status": "new",
        }
        if task["staging"] is not None:
            image_c, label_c = to_canonical(image), to_canonical(label_out)
            if image_c.GetPixelID() == sitk.sitkFloat64:
                image_c = sitk.Cast(image_c, sitk.sitkFloat32)
            folder = Path(task["staging"]) / task["dataset_names"][orientation]
            img_dir, lab_dir = task["subdirs"]
            (folder / img_dir).mkdir(parents=True, exist_ok=True)
            (folder / lab_dir).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image_c, str(folder / img_dir / f"{case}_0000{FILE_ENDING}"), True)
            sitk.WriteImage(label_c, str(folder / lab_dir / f"{case}{FILE_ENDING}"), True)
        out.cases.append(info)


# ----------------------------------------------------------------------------------------------
# assembling datasets


def _dataset_folder_name(dataset_id: int, name: str, orientation: str) -> str:
    return f"Dataset{dataset_id + ORIENTATION_ID_OFFSET[orientation]:03d}_{name}{ORIENTATION_SUFFIX[orientation]}"


def _existing_dataset(raw: Path, dataset_id: int) -> Path | None:
    hits = sorted(raw.glob(f"Dataset{dataset_id:03d}_*"))
    return hits[0] if hits else None


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _load_label_scheme(label_scheme: Path | Mapping[str, int] | None) -> dict[str, int]:
    if label_scheme is None:
        return dict(KNEE_STRUCTURES)
    scheme = dict(label_scheme) if isinstance(label_scheme, Mapping) else load_json(Path(label_scheme))
    values = sorted(int(v) for v in scheme.values())
    if scheme.get("background") != 0 or values != list(range(len(values))):
        raise ConversionError(
            [f"label scheme {scheme} must map 'background' to 0 and use consecutive values 0..N (nnU-Net's rule)"]
        )
    return {k: int(v) for k, v in scheme.items()}


def convert_site(
    manifest: Path,
    dataset_id: int,
    name: str,
    *,
    site_dir: Path | None = None,
    raw: Path | None = None,
    external: bool = False,
    abnormality_labels: Sequence[str] | None = None,
    label_scheme: Path | Mapping[str, int] | None = None,
    dry_run: bool = False,
    key_file: Path | None = None,
    pseudonym_key: Path | None = None,
    num_folds: int = 5,
    max_obliquity_deg: float = 35.0,
    num_processes: int = 2,
    spacing_source: str = "image header",
    tolerance: GeometryTolerance = GeometryTolerance(),
    allow_outside_site: bool = False,
) -> ConversionResult:
    """Convert one site's manifest into nnU-Net raw datasets; see :func:`orthodiff_nnunet.api.convert`."""
    from tqdm import tqdm

    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", name):
        raise ConversionError([f"dataset name {name!r}: use letters and digits only, starting with a letter (e.g. KneeSiteA)"])
    if not 1 <= dataset_id <= 997:
        raise ConversionError([f"dataset id {dataset_id}: use 1..997 (sagittal ID, coronal ID+1, axial ID+2)"])
    rows, labels = read_manifest(manifest, site_dir, abnormality_labels, allow_outside_site=allow_outside_site)
    scheme = _load_label_scheme(label_scheme)
    raw = paths.raw_dir(raw)
    if key_file is not None:
        kf, root = Path(key_file).resolve(), raw.resolve()
        if kf == root or root in kf.parents:
            raise ConversionError([
                f"the key file {kf} would lie inside {root}, next to the datasets; write it somewhere "
                "private instead (e.g. --key-file ~/secure/siteA_key.csv)"
            ])
    if not dry_run:
        raw.mkdir(parents=True, exist_ok=True)

    names = {o: _dataset_folder_name(dataset_id, name, o) for o in ORIENTATIONS}
    problems: list[str] = []
    existing: dict[str, Path] = {}
    for o in ORIENTATIONS:
        found = _existing_dataset(raw, dataset_id + ORIENTATION_ID_OFFSET[o])
        if found is None:
            continue
        if found.name != names[o]:
            problems.append(
                f"dataset id {dataset_id + ORIENTATION_ID_OFFSET[o]} is taken by {found.name} in {raw}; "
                f"choose another -d (this conversion needs ids {dataset_id}..{dataset_id + 2})"
            )
        else:
            existing[o] = found
    if problems:
        raise ConversionError(problems)

    key = load_or_create_key(Path(pseudonym_key) if pseudonym_key else paths.pseudonym_key_default(raw), create=not dry_run)
    subdirs = ("imagesTs", "labelsTs") if external else ("imagesTr", "labelsTr")

    # what earlier runs converted, by series digest
    previous_by_digest: dict[str, list[dict]] = {}
    old_targets: dict[str, dict] = {}
    for o, folder in existing.items():
        record = load_json(folder / RECORD_FILE) if (folder / RECORD_FILE).exists() else {"cases": {}}
        for case, info in record["cases"].items():
            previous_by_digest.setdefault(info["digest"], []).append(dict(info, case=case, orientation=o))
        if (folder / TARGETS_FILE).exists():
            old_targets.update(load_json(folder / TARGETS_FILE)["cases"])

    staging = None if dry_run else raw / TMP_DIRNAME / uuid.uuid4().hex[:12]
    tasks = []
    for row in rows:
        case = pseudonym(key, "case", f"{row.site}/{row.case_id}", prefix=f"{name}_")
        digest = _series_digest(row, key)
        previous = [c for c in previous_by_digest.get(digest, []) if c.get("exam") == case] or None
        tasks.append({
            "row": row, "case": case, "digest": digest, "previous": previous,
            "staging": None if staging is None else str(staging), "dataset_names": names, "subdirs": subdirs,
            "allowed_labels": sorted(scheme.values()), "max_obliquity_deg": max_obliquity_deg, "tolerance": tolerance,
        })

    outcomes: list[SeriesOutcome] = []
    try:
        if num_processes > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(max_workers=num_processes, mp_context=get_context("spawn")) as pool:
                outcomes = list(tqdm(pool.map(convert_series, tasks), total=len(tasks), desc="converting series", unit="series"))
        else:
            outcomes = [convert_series(t) for t in tqdm(tasks, desc="converting series", unit="series")]

        problems = [p for o in outcomes for p in o.problems]
        warnings = [w for o in outcomes for w in o.warnings]
        # duplicates: one exam may have one series per orientation (per echo)
        seen: dict[tuple[str, str], int] = {}
        for task, outcome in zip(tasks, outcomes):
            for c in outcome.cases:
                k = (c["case"], c["orientation"])
                if k in seen:
                    problems.append(
                        f"manifest lines {seen[k]} and {outcome.row} (case {task['row'].case_id}) both give a "
                        f"{c['orientation']} series of the same exam: keep one (or use distinct case_id values)"
                    )
                else:
                    seen[k] = outcome.row
        if problems:
            raise ConversionError(problems, header=f"conversion of {Path(manifest).name} refused, nothing was written")

        by_orientation: dict[str, dict[str, dict]] = {}
        targets_new: dict[str, dict] = {}
        key_rows: list[dict[str, str]] = []
        for task, outcome in zip(tasks, outcomes):
            row: ManifestRow = task["row"]
            patient = pseudonym(key, "patient", row.patient_id, prefix="P")
            for c in outcome.cases:
                by_orientation.setdefault(c["orientation"], {})[c["case"]] = c
                targets_new[c["case"]] = {
                    "exam": c["exam"], "echo": c["echo"], "targets": dict(row.targets), "site": row.site,
                    "field_strength_t": row.field_strength_t, "vendor": row.vendor or None, "patient": patient,
                }
                key_rows.append({"pseudonym": c["case"], "case_id": row.case_id, "patient_pseudonym": patient,
                                 "patient_id": row.patient_id, "site": row.site})

        counts = {"new": 0, "updated": 0, "unchanged": 0}
        for o, cases in by_orientation.items():
            old_record = existing.get(o)
            old_cases = set()
            if old_record is not None and (old_record / RECORD_FILE).exists():
                old_cases = set(load_json(old_record / RECORD_FILE)["cases"])
            for case, c in cases.items():
                status = c["status"]
                if status == "new" and case in old_cases:
                    status = "updated"
                counts[status] += 1
        result = ConversionResult(
            datasets={o: raw / names[o] for o in by_orientation}, num_cases={}, added=counts["new"],
            updated=counts["updated"], unchanged=counts["unchanged"], dry_run=dry_run, warnings=warnings,
            orientations_detected={o: len(c) for o, c in by_orientation.items()},
        )
        if dry_run:
            result.num_cases = {o: len(c) for o, c in by_orientation.items()}
            return result

        # one split over every exam of the group, so the three views of an exam share a fold
        all_targets = {**old_targets, **targets_new}
        all_cases_by_o: dict[str, dict[str, dict]] = {}
        for o in set(by_orientation) | set(existing):
            merged: dict[str, dict] = {}
            if o in existing and (existing[o] / RECORD_FILE).exists():
                merged.update(load_json(existing[o] / RECORD_FILE)["cases"])
            merged.update({k: {kk: vv for kk, vv in v.items() if kk not in ("case", "orientation", "status")}
                           for k, v in by_orientation.get(o, {}).items()})
            all_cases_by_o[o] = merged
        exams = sorted({all_targets[c]["exam"] for cs in all_cases_by_o.values() for c in cs})
        exam_patient = {all_targets[c]["exam"]: all_targets[c]["patient"] for cs in all_cases_by_o.values() for c in cs}
        exam_site = {all_targets[c]["exam"]: all_targets[c]["site"] for cs in all_cases_by_o.values() for c in cs}
        exam_folds = [] if external else patient_grouped_splits(exams, exam_patient, exam_site, num_folds)

        for o in by_orientation:
            _assemble_dataset(
                staging / names[o], existing.get(o), all_cases_by_o[o], all_targets, labels, scheme, o, subdirs,
                external, name, dataset_id, exam_folds, spacing_source,
            )
            result.num_cases[o] = len(all_cases_by_o[o])
        for o in by_orientation:
            _move_into_place(staging / names[o], raw / names[o], raw)
        if key_file is not None:
            write_key_file(Path(key_file), key_rows, forbidden_root=raw)
        return result
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _assemble_dataset(
    folder: Path,
    old_folder: Path | None,
    cases: dict[str, dict],
    all_targets: dict[str, dict],
    label_names: list[str],
    scheme: dict[str, int],
    orientation: str,
    subdirs: tuple[str, str],
    external: bool,
    name: str,
    dataset_id: int,
    exam_folds: list[dict[str, list[str]]],
    spacing_source: str,
) -> None:
    img_dir, lab_dir = subdirs
    (folder / img_dir).mkdir(parents=True, exist_ok=True)
    (folder / lab_dir).mkdir(parents=True, exist_ok=True)
    for case in cases:
        targets = (folder / img_dir / f"{case}_0000{FILE_ENDING}", folder / lab_dir / f"{case}{FILE_ENDING}")
        if targets[0].exists():
            continue  # written by this run
        if old_folder is None:
            raise OrthodiffError(f"internal: case {case} has neither new nor old files")
        _link_or_copy(old_folder / img_dir / targets[0].name, targets[0])
        _link_or_copy(old_folder / lab_dir / targets[1].name, targets[1])

    targets = {c: all_targets[c] for c in sorted(cases)}
    sites = sorted({t["site"] for t in targets.values()})
    n_labeled = sum(1 for c in cases.values() if c["labeled"])
    for c, info in cases.items():
        targets[c]["segmentation"] = "labeled" if info["labeled"] else "unlabeled"
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": scheme,
        "numTraining": 0 if external else len(cases),
        "file_ending": FILE_ENDING,
        "overwrite_image_reader_writer": "SimpleITKIO",
        "name": f"{name}{ORIENTATION_SUFFIX[orientation]}",
        "description": "converted by orthodiff convert; case names are pseudonyms",
        "orthodiff": {
            "orientation": orientation,
            "through_plane_numpy_axis": THROUGH_PLANE_NUMPY_AXIS[orientation],
            "layout": "LPS",
            "name": name,
            "base_dataset_id": dataset_id,
            "external": external,
            "sites": sites,
            "field_strengths_t": sorted({t["field_strength_t"] for t in targets.values()}),
            "vendors": sorted({t["vendor"] for t in targets.values() if t["vendor"]}),
            "abnormality_labels": list(label_names),
            "targets_file": TARGETS_FILE,
            "num_labeled": n_labeled,
            "num_unlabeled": len(cases) - n_labeled,
            "spacing_source": spacing_source,
            "converter_version": __version__,
        },
    }
    if external:
        dataset_json["numTest"] = len(cases)
    atomic_write_json(folder / "dataset.json", dataset_json)
    atomic_write_json(folder / TARGETS_FILE, {"label_names": list(label_names), "cases": targets})
    atomic_write_json(folder / RECORD_FILE, {"converter_version": __version__, "cases": {c: cases[c] for c in sorted(cases)}})
    if exam_folds:
        case_exam = {c: targets[c]["exam"] for c in cases}
        splits = []
        for fold in exam_folds:
            tr, va = set(fold["train"]), set(fold["val"])
            splits.append({"train": sorted(c for c in cases if case_exam[c] in tr),
                           "val": sorted(c for c in cases if case_exam[c] in va)})
        atomic_write_json(folder / "splits_final.json", splits)


def _move_into_place(staged: Path, final: Path, raw: Path) -> None:
    """Swap the staged dataset in; the old one is removed only after the new one is in place."""
    if final.exists():
        old = raw / TMP_DIRNAME / f"{final.name}.old.{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    log.info("wrote %s", final)
