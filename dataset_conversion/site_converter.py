"""Generic site converter: manifest CSV -> nnU-Net raw datasets, one per orientation.

Flow (every step collects *all* problems before refusing):

1. the manifest is parsed and checked (:mod:`orthodiff_nnunet.dataset_conversion.manifest`);
2. the raw folder's lock ``<raw>/.orthodiff/convert.lock`` is taken (a second conversion into the
   same folder waits), leftovers of killed runs in ``<raw>/.orthodiff_tmp`` are removed, and the
   free space is compared with an estimate of the output;
3. every series is read (DICOM through SimpleITK/GDCM, or NIfTI/NRRD/MHA), checked (3D, finite,
   not empty or constant, label geometry and values), its plane decided from the slice normal,
   put into the canonical LPS layout and written into a staging folder (each file verified:
   ITK does not report a full disk);
4. only when no series failed, each orientation's dataset is assembled in the staging folder
   (unchanged cases of an existing dataset are hard-linked, not rewritten) with ``dataset.json``,
   the targets file and patient-grouped splits (earlier exams keep their folds), and moved into place.

Nothing is written with ``dry_run``. A refused or failed conversion leaves no dataset change,
no new pseudonym key and no staging folder (only the empty lock file).
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
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from orthodiff_nnunet import __version__, paths
from orthodiff_nnunet.data.splits import extend_patient_grouped_splits, folds_from_splits
from orthodiff_nnunet.dataset_conversion.manifest import ManifestRow, read_manifest
from orthodiff_nnunet.errors import ConversionError, OrthodiffError
from orthodiff_nnunet.orientation import (
    THROUGH_PLANE_NUMPY_AXIS,
    OrientationError,
    PlaneInfo,
    detect_plane,
    to_canonical,
)
from orthodiff_nnunet.privacy import pseudonym, read_or_new_key, store_new_key, write_key_file
from orthodiff_nnunet.schemes import (
    KNEE_STRUCTURES,
    ORIENTATION_ID_OFFSET,
    ORIENTATION_SUFFIX,
    ORIENTATIONS,
)
from orthodiff_nnunet.utils import atomic_write_json, format_bytes, free_bytes, load_json, write_image_checked

log = logging.getLogger(__name__)

FILE_ENDING = ".nii.gz"
TARGETS_FILE = "orthodiff_targets.json"
RECORD_FILE = ".orthodiff_conversion.json"
TMP_DIRNAME = ".orthodiff_tmp"
STAGING_OWNER = ".owner.json"  # pid, host and start time of the run that staged there
LOCK_DIRNAME = ".orthodiff"  # beside the pseudonym key
LOCK_NAME = "convert.lock"
LOCK_OWNER = "convert.owner.json"
DISK_RESERVE_BYTES = 64 * 1024 * 1024  # kept free beyond the estimated output


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
    # the series was valid but its output could not be written (disk full, ...)
    write_errors: list[str] = field(default_factory=list)


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
    # what else the user should know: leftovers cleaned, how new exams were placed into folds
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = ["dry run: every series is valid, nothing was written" if self.dry_run else "conversion complete"]
        lines.append(f"{'orientation':<12}{'cases':>7}  dataset")
        for o in ORIENTATIONS:
            if o in self.datasets:
                lines.append(f"{o:<12}{self.num_cases.get(o, 0):>7}  {self.datasets[o]}")
        lines.append(f"series: {self.added} added, {self.updated} updated, {self.unchanged} unchanged")
        for n in self.notes:
            lines.append(f"note: {n}")
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


def _numbers(values: np.ndarray, digits: int) -> str:
    """``(0.5, 0.5, 3.0)``: rounded plain numbers (a tuple of numpy scalars prints ``np.float64(0.5)``)."""
    return "(" + ", ".join(repr(round(float(v), digits)) for v in np.asarray(values).ravel()) + ")"


def _same_grid(a: sitk.Image, b: sitk.Image, tol: GeometryTolerance) -> list[str]:
    diffs: list[str] = []
    if a.GetSize() != b.GetSize():
        return [f"size {b.GetSize()} != image {a.GetSize()}"]
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if np.any(np.abs(sa - sb) > tol.spacing * np.abs(sa)):
        diffs.append(f"spacing {_numbers(sb, 4)} != image {_numbers(sa, 4)} mm")
    oa, ob = np.array(a.GetOrigin()), np.array(b.GetOrigin())
    if np.any(np.abs(oa - ob) > tol.origin * sa.min()):
        diffs.append(f"origin {_numbers(ob, 3)} != image {_numbers(oa, 3)} mm")
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


class _EchoRefused(Exception):
    """One echo of a series is refused; the message (without the row's place) says why and what to do."""


def _read_label(row: ManifestRow) -> sitk.Image | None:
    """The row's label map (``None`` without one); a label map that is not scalar 3D refuses the row."""
    if row.label is None:
        return None
    _verify_nifti(row.label)
    label_img = sitk.ReadImage(str(row.label))
    if label_img.GetNumberOfComponentsPerPixel() != 1 or label_img.GetDimension() != 3:
        raise SeriesProblem(f"label map {row.label.name} is not a scalar 3D image")
    return label_img


def _decide_orientation(image: sitk.Image, row: ManifestRow, max_obliquity_deg: float) -> tuple[str, PlaneInfo | None]:
    """The series' orientation from its slice normal, checked against the manifest's column.

    Returns:
        (orientation, plane); plane is ``None`` when the geometry is ambiguous and the manifest's
        orientation was taken instead (the caller warns).

    Raises:
        _EchoRefused: the plane cannot be decided and the manifest gives none, or the two disagree.
    """
    try:
        plane = detect_plane(image, max_obliquity_deg)
    except OrientationError as exc:
        if row.orientation is None:
            raise _EchoRefused(f"plane cannot be decided: {exc}") from None
        return row.orientation, None
    if row.orientation is not None and row.orientation != plane.orientation:
        raise _EchoRefused(
            f"the manifest says {row.orientation} but the slice normal says {plane.orientation} "
            f"({plane.obliquity_deg:.0f} degrees oblique); fix or clear the orientation column"
        )
    return plane.orientation, plane


def _label_values(image: sitk.Image, label_img: sitk.Image, label_name: str, remap, allowed: set[int],
                  tol: GeometryTolerance) -> np.ndarray:
    """The label map's voxels in the dataset's label scheme, after the grid, integer and value checks.

    Args:
        remap: the row's label remap table (:class:`orthodiff_nnunet.remap.RemapTable`) or ``None``.
        allowed: the label values of the dataset's scheme.

    Raises:
        _EchoRefused: the label map does not fit the image, or holds values the scheme lacks.
    """
    diffs = _same_grid(image, label_img, tol)
    if diffs:
        raise _EchoRefused(
            f"label map {label_name} does not match the image grid ({'; '.join(diffs)}); "
            "resample the label map onto the image (nearest neighbour) or fix its header"
        )
    lab = sitk.GetArrayFromImage(label_img)
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise _EchoRefused(f"label map {label_name} holds non-integer values; labels must be integers")
        lab = lab.astype(np.int64)
    if remap is not None:
        missing = remap.unknown_values(lab)
        if missing:
            raise _EchoRefused(
                f"label values {[int(v) for v in missing]} are not in the remap table {remap.name}; add them to the table"
            )
        lab = remap.apply(lab)
    unknown = sorted(set(np.unique(lab).tolist()) - allowed)
    if unknown:
        raise _EchoRefused(
            f"label values {unknown} are not in the dataset's labels {sorted(allowed)}; "
            "give a label_remap table for this source or a --label-scheme that declares them"
        )
    return lab


def _stage_case(task: dict, case: str, orientation: str, image: sitk.Image, label: sitk.Image) -> None:
    """Write one case, in the canonical LPS layout, into its dataset's staging folder.

    ITK reports no error when the disk fills up, so every file is decompressed and checked.

    Raises:
        OSError: the files could not be written (ImageWriteError, ENOSPC, EDQUOT, EROFS, ...).
    """
    image_c, label_c = to_canonical(image), to_canonical(label)
    if image_c.GetPixelID() == sitk.sitkFloat64:
        image_c = sitk.Cast(image_c, sitk.sitkFloat32)
    folder = Path(task["staging"]) / task["dataset_names"][orientation]
    img_dir, lab_dir = task["subdirs"]
    (folder / img_dir).mkdir(parents=True, exist_ok=True)
    (folder / lab_dir).mkdir(parents=True, exist_ok=True)
    write_image_checked(image_c, folder / img_dir / f"{case}_0000{FILE_ENDING}")
    write_image_checked(label_c, folder / lab_dir / f"{case}{FILE_ENDING}")


def _convert_series(task: dict, out: SeriesOutcome) -> None:
    """Convert one row into ``out``: per echo, check, decide the plane, check the labels and stage the case."""
    row: ManifestRow = task["row"]
    where = row.where()
    allowed = set(task["allowed_labels"])

    previous = task.get("previous")  # same digest already converted: keep those files
    if previous is not None:
        out.cases = [dict(c, status="unchanged") for c in previous]
        return

    images = _read_images(row)
    label_img = _read_label(row)
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
            orientation, plane = _decide_orientation(image, row, task["max_obliquity_deg"])
            if plane is None:
                out.warnings.append(f"{tag}: plane taken from the manifest ({orientation}); geometry is ambiguous")
            if label_img is not None:
                lab = _label_values(image, label_img, row.label.name, remap, allowed, task["tolerance"])
            else:
                lab = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
        except _EchoRefused as exc:
            out.problems.append(f"{tag}: {exc}")
            continue
        if label_img is not None and not np.any(lab):
            out.warnings.append(f"{tag}: label map is all background")
        label_out = sitk.GetImageFromArray(lab.astype(np.uint8 if max(allowed) < 256 else np.uint16))
        label_out.CopyInformation(image)

        case = task["case"] + (f"e{echo}" if echo is not None else "")
        if task["staging"] is not None:
            try:
                _stage_case(task, case, orientation, image, label_out)
            except OSError as exc:
                out.write_errors.append(f"{tag}: {exc}")
                return
        out.cases.append({
            "case": case,
            "exam": task["case"],
            "orientation": orientation,
            "echo": echo,
            "labeled": label_img is not None,
            "digest": task["digest"],
            "obliquity_deg": None if plane is None else round(plane.obliquity_deg, 2),
            "status": "new",
        })


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


def _existing_group(raw: Path, dataset_id: int, names: Mapping[str, str]) -> dict[str, Path]:
    """This group's existing datasets per orientation; refuses ids taken by other datasets."""
    problems: list[str] = []
    existing: dict[str, Path] = {}
    for o in ORIENTATIONS:
        found = _existing_dataset(raw, dataset_id + ORIENTATION_ID_OFFSET[o]) if raw.is_dir() else None
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
    return existing


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


# ----------------------------------------------------------------------------------------------
# one conversion at a time per nnUNet_raw, leftovers of interrupted runs, disk space


def _owner_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _describe_owner(owner_file: Path) -> str:
    try:
        o = load_json(owner_file)
        return f"process {o['pid']} on {o['host']}, started {o['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def _raw_lock(raw: Path, timeout_s: float | None) -> Iterator[None]:
    """Hold ``<raw>/.orthodiff/convert.lock`` (one conversion at a time per nnUNet_raw folder).

    Two conversions into one folder would each read the same old state and the second's move
    would throw away the first's cases (or both would take one dataset id). The lock makes the
    second wait until the first has finished (``timeout_s=None``), or refuses it after
    ``timeout_s`` seconds (``0``: at once) with a message naming the running conversion. The
    operating system releases the lock when a process dies, so a killed run never blocks later
    ones. The lock file itself (empty) stays.
    """
    from filelock import FileLock, Timeout

    lock_dir = raw / LOCK_DIRNAME
    owner_file = lock_dir / LOCK_OWNER
    lock = FileLock(str(lock_dir / LOCK_NAME))

    def unwritable(exc: OSError) -> ConversionError:
        return ConversionError(
            [f"cannot write into {raw} ({exc.filename or lock_dir / LOCK_NAME}: {exc.strerror or exc}); check that the folder is "
             "writable and not full"],
            header="conversion refused, nothing was written",
        )

    def refused(waited: float) -> ConversionError:
        return ConversionError(
            [f"another orthodiff convert ({_describe_owner(owner_file)}) is writing into {raw}"
             + (f"; waited {waited:g} s" if waited > 0 else "")
             + ": let it finish and run this conversion again (without --lock-timeout it waits as long as needed)"],
            header="conversion refused, nothing was written",
        )

    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:  # a TimeoutError, hence an OSError: caught first
        if timeout_s is not None and timeout_s <= 0:
            raise refused(0) from None
        log.warning("another orthodiff convert (%s) is writing into %s: waiting for it to finish",
                    _describe_owner(owner_file), raw)
        try:
            lock.acquire(timeout=-1 if timeout_s is None else timeout_s)
        except Timeout:
            raise refused(float(timeout_s)) from None
        except OSError as exc:
            raise unwritable(exc) from exc
    except OSError as exc:
        raise unwritable(exc) from exc
    try:
        try:
            atomic_write_json(owner_file, _owner_record())  # only for the waiting run's message
        except OSError:
            pass
        yield
    finally:
        owner_file.unlink(missing_ok=True)
        lock.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _clean_leftovers(raw: Path) -> list[str]:
    """Remove what interrupted conversions left in ``<raw>/.orthodiff_tmp``; called under the raw lock.

    Only a conversion holding the lock writes there, so while this one holds it every staging
    folder belongs to a dead run. A staging folder whose owner record names a live process on this
    machine is kept anyway (a conversion started by a version without the lock). A dataset that a
    killed run had moved aside (``<name>.old.<id>``) while swapping in its new version is put back
    when its place is empty, else removed.

    Returns:
        One note per action, for the log and the summary.
    """
    tmp = raw / TMP_DIRNAME
    notes: list[str] = []
    if not tmp.is_dir():
        return notes
    host = socket.gethostname()
    freed = 0
    removed = 0
    for p in sorted(tmp.iterdir()):
        m = re.fullmatch(r"(Dataset\d{3}_[A-Za-z0-9]+)\.old\.[0-9a-f]+", p.name)
        if m and p.is_dir():
            final = raw / m.group(1)
            if not final.exists():
                try:
                    os.replace(p, final)
                    notes.append(f"restored {final.name}, which an interrupted conversion had moved aside")
                except OSError as exc:
                    notes.append(f"could not restore {final.name} from {p} ({exc.strerror or exc}): move it back by hand")
                log.warning(notes[-1])
                continue  # never removed
        if p.is_dir() and (p / STAGING_OWNER).exists():
            try:
                owner = load_json(p / STAGING_OWNER)
                if owner.get("host") == host and owner.get("pid") != os.getpid() and _pid_alive(int(owner["pid"])):
                    log.warning("kept %s: process %s on this machine is still running", p, owner["pid"])
                    continue
            except (OSError, ValueError, KeyError, TypeError):
                pass
        try:
            size = _tree_bytes(p) if p.is_dir() else p.stat().st_size
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as exc:
            log.warning("could not remove the leftover %s (%s); remove it by hand", p, exc.strerror or exc)
            continue
        freed += size
        removed += 1
    if removed:
        notes.append(f"removed {removed} leftover(s) of interrupted conversions from {tmp} ({format_bytes(freed)})")
        log.warning(notes[-1])
    _remove_if_empty(tmp)
    return notes


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (or gone): fine


def _source_bytes(row: ManifestRow) -> int:
    """Bytes of the row's input files (image series and label map)."""
    total = 0
    if row.image.is_dir():
        total += sum(p.stat().st_size for p in row.image.rglob("*") if p.is_file())
    elif row.image.exists():
        total += row.image.stat().st_size
        if row.image.suffix.lower() == ".mhd":
            total += sum(p.stat().st_size for p in row.image.parent.iterdir()
                         if p.stem == row.image.stem and p != row.image)
    if row.label is not None and row.label.exists():
        total += row.label.stat().st_size
    return total


def _space_needed(tasks: list[dict], reserve_bytes: int) -> int:
    """Bytes a conversion needs free in nnUNet_raw, estimated before anything is written.

    New or changed series are rewritten as compressed NIfTI: their size is about that of the
    source files (MR grey values compress to roughly their DICOM size or less; label maps to
    almost nothing), so the estimate is 1.1 x the source bytes plus ``reserve_bytes`` for the
    JSON files and what the system needs. Unchanged cases are hard links (no space). The staged
    datasets replace the old ones by a rename, so no second copy is needed.
    """
    return int(1.1 * sum(_source_bytes(t["row"]) for t in tasks if t["previous"] is None)) + int(reserve_bytes)


def _write_refusal(manifest: Path, raw: Path, needed: int, errors: Sequence[str]) -> ConversionError:
    shown = list(errors[:5]) + ([f"... and {len(errors) - 5} more"] if len(errors) > 5 else [])
    free = free_bytes(raw)
    if free < needed:
        cause = (f"the disk holding {raw} is full: {format_bytes(free)} free, this conversion needs about "
                 f"{format_bytes(needed)}")
    else:
        cause = (f"writing into {raw} failed although {format_bytes(free)} are free (this conversion needs about "
                 f"{format_bytes(needed)}): a disk quota, a file size limit (ulimit -f), a read-only or failing "
                 "disk or network share, or a disk that filled up meanwhile")
    return ConversionError(
        shown + [
            f"{cause}. The existing datasets are unchanged and the partial output was removed: free space "
            "(or use another nnUNet_raw) and run again",
        ],
        header=f"conversion of {Path(manifest).name} failed while writing, no dataset was changed",
    )


def _site_relative(row: ManifestRow, base: Path) -> str:
    """How the key file names a series: the image path relative to the site folder (absolute outside it)."""
    image = Path(row.image)
    text = str(image.relative_to(base)) if image.is_relative_to(base) else str(image)
    extra = [f"series {row.series}"] if row.series else []
    extra += [f"echo {row.echo}"] if row.echo is not None else []
    return text + (f" [{', '.join(extra)}]" if extra else "")


def _previous_folds(existing: dict[str, Path], old_targets: dict[str, dict]) -> tuple[dict[str, int] | None, int | None, list[str]]:
    """Exam -> fold of the group's existing ``splits_final.json`` files, and their number of folds."""
    assignment: dict[str, int] = {}
    counts: set[int] = set()
    warnings: list[str] = []
    for o, folder in sorted(existing.items(), key=lambda item: ORIENTATIONS.index(item[0])):
        if not (folder / "splits_final.json").is_file():
            continue
        splits = load_json(folder / "splits_final.json")
        counts.add(len(splits))
        for case, k in folds_from_splits(splits).items():
            exam = old_targets.get(case, {}).get("exam", case)
            if assignment.setdefault(exam, k) != k:
                warnings.append(f"exam {exam} was in fold {assignment[exam]} of one view and fold {k} of another; "
                                f"fold {assignment[exam]} kept")
    if not counts:
        return None, None, warnings
    if len(counts) > 1:
        warnings.append(f"the group's datasets have splits with {sorted(counts)} folds; all exams are split anew")
        return None, None, warnings
    return assignment, counts.pop(), warnings


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
    lock_timeout_s: float | None = None,
    disk_reserve_bytes: int = DISK_RESERVE_BYTES,
) -> ConversionResult:
    """Convert a site's series into nnU-Net raw datasets, one per orientation (``orthodiff_nnunet.api.convert``).

    Long only because its docstring documents the 20 options (the public API's one list of them); the
    body is a few lines that take the lock and call the named steps.

    Args:
        manifest: CSV with one row per series (columns in the README / docs/CONTRACTS.md).
        dataset_id: base id: sagittal -> ``dataset_id``, coronal -> +1, axial -> +2.
        name: dataset name (letters, digits); folders are ``Dataset{id:03d}_{name}{Sag|Cor|Ax}``.
        site_dir: folder the manifest's relative paths start from (default: the manifest's folder).
        raw: the nnUNet_raw folder (default: environment variable ``nnUNet_raw``).
        external: an external validation site (imagesTs/labelsTs, no splits).
        abnormality_labels: label columns (default: the 8 knee abnormalities present in the manifest).
        label_scheme: segmentation labels ``{name: value}`` or a JSON path (default: 11 knee structures).
        dry_run: validate everything, write nothing.
        key_file: also write the pseudonym -> source id CSV here (refused inside ``raw``).
        pseudonym_key: secret key file (default ``<raw>/.orthodiff/pseudonym.key``, created once).
        num_folds: patient-grouped folds of ``splits_final.json``.
        max_obliquity_deg: largest accepted slice-normal obliquity; beyond it the plane must be given.
        num_processes: worker processes reading series.
        spacing_source: recorded in ``dataset.json`` (``"user-supplied"`` when the header has none).
        tolerance: label/image geometry tolerance.
        allow_outside_site: accept ``image``/``label`` paths leading out of the site folder (``../``,
            absolute paths); refused by default so that no other site's images slip in.
        lock_timeout_s: one conversion at a time writes into a ``raw`` folder; another one waits this
            many seconds for it (``None``: as long as it takes, ``0``: refused at once).
        disk_reserve_bytes: free space to keep beyond the estimated output (refused below it).

    Returns:
        What was written (or, for a dry run, what would be).

    Raises:
        ConversionError: listing every bad series and how to fix it; nothing is written then.
    """
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
    settings = dict(manifest=manifest, dataset_id=dataset_id, name=name, rows=rows, labels=labels, scheme=scheme,
                    raw=raw, external=external, dry_run=dry_run, key_file=key_file, pseudonym_key=pseudonym_key,
                    num_folds=num_folds, max_obliquity_deg=max_obliquity_deg, num_processes=num_processes,
                    spacing_source=spacing_source, tolerance=tolerance, disk_reserve_bytes=disk_reserve_bytes,
                    site_base=Path(site_dir).resolve() if site_dir else Path(manifest).resolve().parent)
    if dry_run:
        return _convert_locked(**settings, cleanup_notes=[])  # writes nothing, so needs no lock
    # refuse a taken id before writing anything (checked again under the lock: another run may take it)
    _existing_group(raw, dataset_id, {o: _dataset_folder_name(dataset_id, name, o) for o in ORIENTATIONS})
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionError([f"cannot create {raw}: {exc.strerror or exc}; check the path and its permissions"]) from exc
    with _raw_lock(raw, lock_timeout_s):
        notes = _clean_leftovers(raw)
        return _convert_locked(**settings, cleanup_notes=notes)


def _convert_locked(
    *, manifest: Path, dataset_id: int, name: str, rows: list[ManifestRow], labels: list[str],
    scheme: dict[str, int], raw: Path, external: bool, dry_run: bool, key_file: Path | None,
    pseudonym_key: Path | None, num_folds: int, max_obliquity_deg: float, num_processes: int,
    spacing_source: str, tolerance: GeometryTolerance, disk_reserve_bytes: int, site_base: Path,
    cleanup_notes: list[str],
) -> ConversionResult:
    """The conversion proper; runs while this process holds the raw folder's lock (or writes nothing)."""
    names = {o: _dataset_folder_name(dataset_id, name, o) for o in ORIENTATIONS}
    existing = _existing_group(raw, dataset_id, names)

    # a new key stays in memory until the conversion is known to succeed: a refused one leaves none
    key_path = Path(pseudonym_key) if pseudonym_key else paths.pseudonym_key_default(raw)
    key, key_is_new = read_or_new_key(key_path)
    subdirs = ("imagesTs", "labelsTs") if external else ("imagesTr", "labelsTr")

    previous_by_digest, old_targets = _previous_conversions(existing)
    staging = None if dry_run else raw / TMP_DIRNAME / uuid.uuid4().hex[:12]
    tasks = [{
        **_row_task(row, key, name, previous_by_digest),
        "staging": None if staging is None else str(staging), "dataset_names": names, "subdirs": subdirs,
        "allowed_labels": sorted(scheme.values()), "max_obliquity_deg": max_obliquity_deg, "tolerance": tolerance,
    } for row in rows]
    needed, space_problem = _check_space(manifest, raw, tasks, disk_reserve_bytes, dry_run)

    try:
        if staging is not None:
            try:
                staging.mkdir(parents=True)
                atomic_write_json(staging / STAGING_OWNER, _owner_record())
            except OSError as exc:
                raise _write_refusal(manifest, raw, needed, [f"{staging}: {exc.strerror or exc}"]) from exc
        outcomes = _run_series(tasks, num_processes)
        _refuse_failed_series(manifest, raw, needed, dry_run, tasks, outcomes)

        by_orientation, targets_new, key_rows = _collect_cases(tasks, outcomes, key, site_base)
        counts = _status_counts(by_orientation, existing)
        result = ConversionResult(
            datasets={o: raw / names[o] for o in by_orientation}, num_cases={}, added=counts["new"],
            updated=counts["updated"], unchanged=counts["unchanged"], dry_run=dry_run,
            warnings=[w for o in outcomes for w in o.warnings],
            orientations_detected={o: len(c) for o, c in by_orientation.items()}, notes=list(cleanup_notes),
        )
        if dry_run:
            result.num_cases = {o: len(c) for o, c in by_orientation.items()}
            if space_problem:
                result.warnings.append(space_problem)
            return result

        all_targets = {**old_targets, **targets_new}
        all_cases_by_o = _merged_cases(by_orientation, existing)
        exam_folds = [] if external else _group_folds(all_targets, all_cases_by_o, existing, old_targets, num_folds, result)
        try:
            for o in by_orientation:
                _assemble_dataset(
                    staging / names[o], existing.get(o), all_cases_by_o[o], all_targets, labels, scheme, o, subdirs,
                    external, name, dataset_id, exam_folds, spacing_source,
                )
                result.num_cases[o] = len(all_cases_by_o[o])
            if key_is_new:
                store_new_key(key_path, key)
        except OSError as exc:  # disk full, quota, read-only: the staged copy is dropped below
            raise _write_refusal(manifest, raw, needed, [f"{exc.filename or raw}: {exc.strerror or exc}"]) from exc
        if key_file is not None:
            _write_key_rows(manifest, key_file, key_rows, raw)
        _move_all_into_place(manifest, staging, raw, [names[o] for o in by_orientation])
        return result
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if staging is not None:
            _remove_if_empty(staging.parent)


def _previous_conversions(existing: dict[str, Path]) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """What earlier runs converted into the group's datasets.

    Returns:
        (series digest -> the cases written from it, each with its case name and orientation;
        case -> its entry of the targets file).
    """
    previous_by_digest: dict[str, list[dict]] = {}
    old_targets: dict[str, dict] = {}
    for o, folder in existing.items():
        record = load_json(folder / RECORD_FILE) if (folder / RECORD_FILE).exists() else {"cases": {}}
        for case, info in record["cases"].items():
            previous_by_digest.setdefault(info["digest"], []).append(dict(info, case=case, orientation=o))
        if (folder / TARGETS_FILE).exists():
            old_targets.update(load_json(folder / TARGETS_FILE)["cases"])
    return previous_by_digest, old_targets


def _row_task(row: ManifestRow, key: bytes, name: str, previous_by_digest: Mapping[str, list[dict]]) -> dict:
    """The row's exam pseudonym, series digest and, when that series was converted before, its earlier cases."""
    case = pseudonym(key, "case", f"{row.site}/{row.case_id}", prefix=f"{name}_")
    digest = _series_digest(row, key)
    previous = [c for c in previous_by_digest.get(digest, []) if c.get("exam") == case] or None
    return {"row": row, "case": case, "digest": digest, "previous": previous}


def _check_space(manifest: Path, raw: Path, tasks: list[dict], reserve_bytes: int, dry_run: bool) -> tuple[int, str | None]:
    """Compare the free space in ``raw`` with the estimated output; refuses a real run that would not fit.

    Returns:
        (bytes needed, the shortage message or ``None``); a dry run reports the shortage as a warning.
    """
    needed = _space_needed(tasks, reserve_bytes)
    free = free_bytes(raw)
    space_problem = None
    if free < needed:
        space_problem = (
            f"not enough free space in {raw}: {format_bytes(free)} free, this conversion needs about "
            f"{format_bytes(needed)} ({sum(t['previous'] is None for t in tasks)} series to write, estimated from "
            f"their source files, plus {format_bytes(reserve_bytes)} to spare); free space or use another nnUNet_raw"
        )
        if not dry_run:
            raise ConversionError([space_problem], header=f"conversion of {Path(manifest).name} refused, nothing was written")
    log.info("about %s to write (and %s kept in reserve), %s free in %s", format_bytes(needed - reserve_bytes),
             format_bytes(reserve_bytes), format_bytes(free), raw)
    return needed, space_problem


def _run_series(tasks: list[dict], num_processes: int) -> list[SeriesOutcome]:
    """:func:`convert_series` over every task, in ``num_processes`` spawned workers when it pays."""
    from tqdm import tqdm

    if num_processes > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=num_processes, mp_context=get_context("spawn")) as pool:
            return list(tqdm(pool.map(convert_series, tasks), total=len(tasks), desc="converting series", unit="series"))
    return [convert_series(t) for t in tqdm(tasks, desc="converting series", unit="series")]


def _refuse_failed_series(manifest: Path, raw: Path, needed: int, dry_run: bool, tasks: list[dict],
                          outcomes: list[SeriesOutcome]) -> None:
    """Raise :class:`ConversionError` naming every invalid series, duplicate exam view or failed write."""
    problems = [p for o in outcomes for p in o.problems]
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
        raise ConversionError(
            problems,
            header=f"conversion of {Path(manifest).name} refused, nothing was written"
            + ("" if dry_run else " (no dataset, pseudonym key or staging folder)"),
        )
    write_errors = [e for o in outcomes for e in o.write_errors]
    if write_errors:
        raise _write_refusal(manifest, raw, needed, write_errors)


def _collect_cases(tasks: list[dict], outcomes: list[SeriesOutcome], key: bytes, site_base: Path,
                   ) -> tuple[dict[str, dict[str, dict]], dict[str, dict], list[dict[str, str]]]:
    """Sort the converted cases by orientation and build their targets entries and key-file rows.

    Returns:
        (orientation -> case -> case record; case -> targets entry (pseudonyms only); one key-file
        row per case, the only place where pseudonyms meet the site's identifiers).
    """
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
            key_rows.append({"pseudonym": c["exam"], "case_id": row.case_id, "patient_pseudonym": patient,
                             "patient_id": row.patient_id, "site": row.site,
                             "cases": f"{c['case']} ({c['orientation']})",
                             "series": f"{c['orientation']}: {_site_relative(row, site_base)}"})
    return by_orientation, targets_new, key_rows


def _status_counts(by_orientation: dict[str, dict[str, dict]], existing: dict[str, Path]) -> dict[str, int]:
    """How many cases are new, updated (a new series under an existing case name) or unchanged."""
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
    return counts


def _merged_cases(by_orientation: dict[str, dict[str, dict]], existing: dict[str, Path]) -> dict[str, dict[str, dict]]:
    """Per orientation, the earlier conversion record's cases updated with this run's (their record entries)."""
    all_cases_by_o: dict[str, dict[str, dict]] = {}
    for o in set(by_orientation) | set(existing):
        merged: dict[str, dict] = {}
        if o in existing and (existing[o] / RECORD_FILE).exists():
            merged.update(load_json(existing[o] / RECORD_FILE)["cases"])
        merged.update({k: {kk: vv for kk, vv in v.items() if kk not in ("case", "orientation", "status")}
                       for k, v in by_orientation.get(o, {}).items()})
        all_cases_by_o[o] = merged
    return all_cases_by_o


def _group_folds(all_targets: dict[str, dict], all_cases_by_o: dict[str, dict[str, dict]], existing: dict[str, Path],
                 old_targets: dict[str, dict], num_folds: int, result: ConversionResult) -> list[dict[str, list[str]]]:
    """One patient-grouped split over every exam of the group, so the three views of an exam share a fold.

    Exams of earlier conversions keep their folds; what moved is added to ``result.warnings``, how
    new exams were placed to ``result.notes`` (both also logged).
    """
    exams = sorted({all_targets[c]["exam"] for cs in all_cases_by_o.values() for c in cs})
    exam_patient = {all_targets[c]["exam"]: all_targets[c]["patient"] for cs in all_cases_by_o.values() for c in cs}
    exam_site = {all_targets[c]["exam"]: all_targets[c]["site"] for cs in all_cases_by_o.values() for c in cs}
    previous_folds, previous_k, fold_warnings = _previous_folds(existing, old_targets)
    update = extend_patient_grouped_splits(exams, exam_patient, exam_site, previous_folds, previous_k, num_folds)
    for w in fold_warnings + update.changes:
        log.warning("splits_final.json: %s", w)
        result.warnings.append(f"splits_final.json: {w}")
    for n in update.notes:
        log.info("splits_final.json: %s", n)
        result.notes.append(f"splits_final.json: {n}")
    return update.folds


def _write_key_rows(manifest: Path, key_file: Path, key_rows: list[dict[str, str]], raw: Path) -> None:
    """Write the site's private key file (never inside ``raw``); a failure stops before any dataset moves."""
    try:
        write_key_file(Path(key_file), key_rows, forbidden_root=raw)
    except OSError as exc:
        raise ConversionError(
            [f"cannot write the key file {key_file}: {exc.strerror or exc}; choose a writable place with "
             "free space (or leave out --key-file)"],
            header=f"conversion of {Path(manifest).name} stopped, no dataset was changed",
        ) from exc


def _move_all_into_place(manifest: Path, staging: Path, raw: Path, names: list[str]) -> None:
    """Move each staged dataset into ``raw``; a failure names the datasets already updated."""
    moved: list[str] = []
    for dataset in names:
        try:
            _move_into_place(staging / dataset, raw / dataset, raw)
        except OSError as exc:
            raise ConversionError(
                [f"moving {dataset} into {raw} failed: {exc.strerror or exc}. "
                 + (f"Already updated: {', '.join(moved)}; " if moved else "No dataset was changed; ")
                 + "run the same conversion again once the folder is writable (it completes the others)"],
                header=f"conversion of {Path(manifest).name} stopped",
            ) from exc
        moved.append(dataset)


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
