"""MRNet (Stanford knee MRI, Bien et al. 2018) -> three nnU-Net raw datasets (sag, cor, ax).

MRNet is published as ``{train,valid}/{axial,coronal,sagittal}/NNNN.npy`` volumes (uint8,
``(slices, 256, 256)``) with exam-level labels in ``{split}-{abnormal,acl,meniscus}.csv`` (rows
``case,label``, no header). The volumes carry **no spacing and no orientation**; this converter:

* takes the spacing from the user (per plane: in-plane x, in-plane y, slice distance, mm). There
  is no default: MRNet publishes none and its paper does not give it per exam. The datasets
  record ``"spacing_source": "user-supplied"``;
* gives each plane a plausible patient orientation (the standard radiological display of each
  plane, see :data:`PLANE_DIRECTIONS`) so that the generic converter's plane detection, canonical
  LPS layout and ``through_plane_numpy_axis`` apply. The knee side (left/right) and the slice
  order are unknown, so L-R and the slice direction are a convention, not a fact. The three
  views of an exam are centred on the same point; they are NOT registered to each other;
* stages each volume as NIfTI in a temporary folder, writes a manifest (``docs/CONTRACTS.md``)
  with ``site`` ``MRNet``, ``vendor`` ``GE`` (all MRNet exams are GE), the field strength given
  (MRNet does not say which exam is 1.5 T or 3 T: 56.6% of its exams are 3 T, hence the default
  3.0, recorded per case in the targets file) and the label columns ``abnormal``, ``ACL``,
  ``meniscus``; then runs :func:`orthodiff_nnunet.api.convert` on it. No label maps: every case
  is an unlabeled segmentation case.

MRNet publishes no patient ids (its 1,130 training exams come from 1,088 patients), so each exam
is its own patient here: patient-grouped splits cannot keep a patient's repeat exams together.

An exam missing a plane (no ``{split}/<plane>/NNNN.npy``) is converted with the planes it has,
labeled or not. The missing view is represented as the classifier expects it
(:mod:`orthodiff_nnunet.data.targets`): the exam has no case in that plane's dataset and targets
file, and :func:`~orthodiff_nnunet.data.targets.match_exams` keeps it with that view missing.
How many exams lack which plane is logged and added to the result's warnings. Spacing is needed
only for the planes converted.

Command line: ``python -m orthodiff_nnunet.dataset_conversion.mrnet --help``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.schemes import MRNET_LABELS, ORIENTATIONS, normalize_orientation

log = logging.getLogger(__name__)

__all__ = ["convert_mrnet", "main", "MRNetError", "PLANE_DIRECTIONS", "DEFAULT_FIELD_STRENGTH_T"]

#: MRNet folder name of each plane.
PLANE_FOLDERS: dict[str, str] = {"sag": "sagittal", "cor": "coronal", "ax": "axial"}
#: Label CSV suffix of each label column: ``{split}-{suffix}.csv``.
LABEL_FILES: dict[str, str] = {"abnormal": "abnormal", "ACL": "acl", "meniscus": "meniscus"}
#: 56.6% of MRNet's exams are 3 T, the rest 1.5 T; which exam is which is not published.
DEFAULT_FIELD_STRENGTH_T = 3.0
SITE = "MRNet"
VENDOR = "GE"
MAX_SPACING_MM = 20.0

#: Direction cosines (columns = numpy x, numpy y, slice axes, in LPS) given to each plane's
#: ``(slices, rows, cols)`` volume. They follow the usual radiological display of each plane:
#: sagittal: columns run anterior -> posterior, rows superior -> inferior, slices along the
#: slice normal row x column = patient left -> right;
#: coronal: columns run right -> left, rows superior -> inferior, slices anterior -> posterior;
#: axial: columns run right -> left, rows anterior -> posterior, slices inferior -> superior.
#: All three are right-handed (slice axis = row x column), as a DICOM series would be.
PLANE_DIRECTIONS: dict[str, np.ndarray] = {
    "sag": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float),
    "cor": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float),
    "ax": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float),
}

SpacingArg = Mapping[str, Sequence[float]] | Sequence[float] | None

_SPACING_HELP = (
    "MRNet publishes no voxel spacing: give it per plane as in-plane x, in-plane y and slice distance in mm, "
    "e.g. spacing={'sag': (0.6, 0.6, 3.0), 'cor': ..., 'ax': ...} or one triple for all planes "
    "(command line: --spacing-sag 0.6 0.6 3.0 --spacing-cor ... --spacing-ax ..., or --spacing X Y Z)"
)


class MRNetError(OrthodiffError):
    """The MRNet folder or the options cannot be converted; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# options


def _plain(value: object) -> str:
    """A spacing as the user would write it: ``(0.6, 0.6, 3)``, not numpy's ``np.float64(0.6)`` repr."""
    try:
        return "(" + ", ".join(f"{float(v):g}" for v in value) + ")"  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return repr(value)


def _normalize_spacing(spacing: SpacingArg, needed: Sequence[str] = ORIENTATIONS) -> dict[str, tuple[float, float, float]]:
    """Per-plane spacing from a mapping or one triple; refuses anything missing or implausible.

    ``needed``: the planes to convert; only they need a spacing.
    """
    if spacing is None:
        raise MRNetError(f"no spacing given. {_SPACING_HELP}")
    if isinstance(spacing, Mapping):
        per_plane: dict[str, Sequence[float]] = {}
        for key, value in spacing.items():
            try:
                per_plane[normalize_orientation(key)] = value
            except ValueError as exc:
                raise MRNetError(f"spacing for {key!r}: {exc}") from None
    else:
        per_plane = {o: spacing for o in ORIENTATIONS}
    missing = [o for o in ORIENTATIONS if o in needed and (o not in per_plane or per_plane[o] is None)]
    if missing:
        raise MRNetError(f"no spacing given for plane(s) {', '.join(missing)}. {_SPACING_HELP}")
    out: dict[str, tuple[float, float, float]] = {}
    for o in ORIENTATIONS:
        if o not in needed or per_plane.get(o) is None:
            continue
        try:
            values = tuple(float(v) for v in per_plane[o])
        except (TypeError, ValueError):
            raise MRNetError(f"spacing for {o} must be three numbers (mm), got {_plain(per_plane[o])}") from None
        if len(values) != 3 or not all(math.isfinite(v) and 0 < v <= MAX_SPACING_MM for v in values):
            raise MRNetError(
                f"spacing for {o} must be three numbers in (0, {MAX_SPACING_MM:g}] mm "
                f"(in-plane x, in-plane y, slice distance), got {_plain(per_plane[o])}"
            )
        if max(values[:2]) >= 1.25 * values[2]:
            raise MRNetError(
                f"spacing for {o} {_plain(values)} has in-plane pixels larger than the slice distance: the order is "
                "in-plane x, in-plane y, slice distance (MRNet's slices are thicker than their 256x256 pixels)"
            )
        out[o] = values  # type: ignore[assignment]
    return out


def _case_key(case: str | int) -> str:
    text = str(case).strip()
    if text.endswith(".npy"):
        text = text[:-4]
    return text.zfill(4) if text.isdigit() else text


def _read_labels(root: Path, split: str) -> dict[str, dict[str, int]]:
    """label column -> {case: 0/1} from ``{split}-{abnormal,acl,meniscus}.csv``."""
    labels: dict[str, dict[str, int]] = {}
    for column, suffix in LABEL_FILES.items():
        path = root / f"{split}-{suffix}.csv"
        if not path.is_file():
            raise MRNetError(
                f"label file {path.name} is missing in {root}; MRNet ships {split}-abnormal.csv, "
                f"{split}-acl.csv and {split}-meniscus.csv next to the {split}/ folder"
            )
        values: dict[str, int] = {}
        with open(path, newline="", encoding="utf-8-sig") as f:
            for line_no, row in enumerate(csv.reader(f), start=1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 2:
                    raise MRNetError(f"{path.name} line {line_no}: expected 'case,label'")
                case, value = row[0].strip(), row[1].strip()
                if value not in ("0", "1"):
                    if line_no == 1:  # a header row in a re-saved file
                        continue
                    raise MRNetError(f"{path.name} line {line_no}: label {value!r} must be 0 or 1")
                values[_case_key(case)] = int(value)
        labels[column] = values
    return labels


def _find_cases(root: Path, split: str, cases: Sequence[str | int] | None) -> dict[str, list[str]]:
    """Exam id -> the planes it has (in ``ORIENTATIONS`` order); every asked exam has at least one."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise MRNetError(
            f"{split_dir} does not exist; give the MRNet folder that holds {split}/axial, {split}/coronal, "
            f"{split}/sagittal (and --split train or valid)"
        )
    present = {o: {p.stem for p in (split_dir / PLANE_FOLDERS[o]).glob("*.npy")} for o in ORIENTATIONS}
    wanted = sorted({_case_key(c) for c in cases}) if cases else sorted(set().union(*present.values()))
    if not wanted:
        raise MRNetError(f"no .npy volumes under {split_dir}/{{axial,coronal,sagittal}}")
    nowhere = [c for c in wanted if not any(c in present[o] for o in ORIENTATIONS)]
    if nowhere:
        shown = ", ".join(nowhere[:10]) + (f" and {len(nowhere) - 10} more" if len(nowhere) > 10 else "")
        raise MRNetError(
            f"{len(nowhere)} exam(s) asked for with --cases have no volume in any plane under {split}/ "
            f"({shown}); check the ids and --split"
        )
    return {c: [o for o in ORIENTATIONS if c in present[o]] for c in wanted}


def _missing_planes_note(planes_by_case: Mapping[str, Sequence[str]]) -> str | None:
    """'MRNet: 2 of 5 exams lack a plane ...' or None when every exam has all three."""
    lacking = {o: [c for c, planes in planes_by_case.items() if o not in planes] for o in ORIENTATIONS}
    n_lacking = sum(1 for planes in planes_by_case.values() if len(planes) < len(ORIENTATIONS))
    if not n_lacking:
        return None
    parts = []
    for o in ORIENTATIONS:
        ids = lacking[o]
        if ids:
            shown = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
            parts.append(f"{len(ids)} without {PLANE_FOLDERS[o]} ({shown})")
    return (
        f"MRNet: {n_lacking} of {len(planes_by_case)} exams lack a plane and are converted with the planes they "
        f"have: {'; '.join(parts)}; the missing view is absent from that plane's dataset and targets file, "
        "which the classifier treats as a missing view"
    )


def _load_volume(root: Path, rel: str) -> np.ndarray:
    """``root / rel`` as an array; messages name ``rel``, the path below the folder the user gave."""
    try:
        arr = np.load(root / rel, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise MRNetError(f"{rel} cannot be read as a numpy array ({exc}); re-download the file") from None
    if arr.ndim != 3 or min(arr.shape) < 2 or arr.dtype.kind not in "uif":
        raise MRNetError(
            f"{rel} has shape {tuple(int(n) for n in arr.shape)} ({arr.dtype}); MRNet volumes are "
            "(slices, 256, 256) grey values"
        )
    return arr


def plane_image(array: np.ndarray, orientation: str, spacing: Sequence[float]) -> sitk.Image:
    """A ``(slices, rows, cols)`` MRNet volume as an image with its plane's direction, centred at 0.

    Args:
        array: the volume as stored by MRNet, slice axis first.
        orientation: ``sag``, ``cor`` or ``ax``.
        spacing: in-plane x (columns), in-plane y (rows), slice distance, mm.
    """
    o = normalize_orientation(orientation)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    direction = PLANE_DIRECTIONS[o]
    sp = np.asarray(spacing, dtype=float)
    size = np.asarray(image.GetSize(), dtype=float)
    origin = -direction @ ((size - 1) / 2 * sp)  # volume centre at the patient-coordinate origin
    image.SetSpacing(tuple(float(s) for s in sp))
    image.SetDirection(tuple(float(d) for d in direction.flatten()))
    image.SetOrigin(tuple(float(v) for v in origin))
    return image


# ----------------------------------------------------------------------------------------------
# conversion


def convert_mrnet(
    mrnet_root: Path,
    dataset_id: int,
    name: str = "MRNet",
    *,
    spacing: SpacingArg,
    raw: Path | None = None,
    split: str = "train",
    cases: Sequence[str | int] | None = None,
    field_strength_t: float = DEFAULT_FIELD_STRENGTH_T,
    dry_run: bool = False,
    external: bool = False,
    key_file: Path | None = None,
    pseudonym_key: Path | None = None,
    num_folds: int = 5,
    num_processes: int = 2,
    work_dir: Path | None = None,
):
    """Convert MRNet exams into three nnU-Net raw datasets (``{name}Sag``, ``{name}Cor``, ``{name}Ax``).

    Args:
        mrnet_root: the MRNet folder (``train/``, ``valid/`` and the label CSVs).
        dataset_id: base id: sagittal ``dataset_id``, coronal +1, axial +2.
        name: dataset name (letters and digits).
        spacing: required; ``{"sag": (x, y, slice), "cor": ..., "ax": ...}`` in mm, or one triple
            for all planes. MRNet publishes none; ``dataset.json`` records ``"user-supplied"``.
        raw: nnUNet_raw folder (default: ``$nnUNet_raw``).
        split: ``train`` or ``valid``.
        cases: exam ids to convert (``"0001"`` or ``1``); default every exam of the split found.
        field_strength_t: recorded for every exam (MRNet: 56.6% 3 T, the rest 1.5 T, per exam unknown).
        dry_run: validate everything, write nothing.
        external: write ``imagesTs`` (e.g. MRNet's valid split as an external test set).
        key_file, pseudonym_key, num_folds, num_processes: as in :func:`orthodiff_nnunet.api.convert`.
        work_dir: where the staged NIfTI volumes go (default: the system's temporary folder);
            removed afterwards. A whole split needs about 2 GB there.

    Returns:
        The generic converter's ``ConversionResult`` (its warnings say what was assumed).

    Raises:
        MRNetError: missing spacing, folders, files or labels; ConversionError from the generic converter.
    """
    from orthodiff_nnunet.api import convert

    if split not in ("train", "valid"):
        raise MRNetError(f"split {split!r}: use train or valid")
    if spacing is None:
        raise MRNetError(f"no spacing given. {_SPACING_HELP}")
    if not (0.05 <= float(field_strength_t) <= 12.0):
        raise MRNetError(f"field strength {float(field_strength_t):g} T is not plausible; MRNet exams are 1.5 T or 3 T")
    root = Path(mrnet_root)
    if not root.is_dir():
        raise MRNetError(f"MRNet folder {root} does not exist")
    planes_by_case = _find_cases(root, split, cases)
    case_ids = list(planes_by_case)
    needed = [o for o in ORIENTATIONS if any(o in planes for planes in planes_by_case.values())]
    spacing_by_plane = _normalize_spacing(spacing, needed)
    labels = _read_labels(root, split)
    unlabeled = [c for c in case_ids if any(c not in labels[col] for col in LABEL_FILES)]
    if unlabeled:
        shown = ", ".join(unlabeled[:10]) + (" ..." if len(unlabeled) > 10 else "")
        log.warning("%d exam(s) have no label in the %s CSVs (%s): their targets are left unknown", len(unlabeled), split, shown)

    notes = _assumption_notes(planes_by_case, needed, spacing_by_plane, field_strength_t)
    with tempfile.TemporaryDirectory(prefix="orthodiff_mrnet_", dir=work_dir) as tmp:
        staged = Path(tmp)
        manifest = _stage_exams(staged, root, split, planes_by_case, labels, spacing_by_plane, field_strength_t)
        result = convert(
            manifest, dataset_id, name, site_dir=staged, raw=raw, external=external,
            abnormality_labels=list(MRNET_LABELS), dry_run=dry_run, key_file=key_file,
            pseudonym_key=pseudonym_key, num_folds=num_folds, num_processes=num_processes,
            spacing_source="user-supplied",
        )
    result.warnings.extend(notes)
    return result


def _assumption_notes(planes_by_case: Mapping[str, Sequence[str]], planes: Sequence[str],
                      spacing_by_plane: Mapping[str, Sequence[float]], field_strength_t: float) -> list[str]:
    """What the conversion assumes (user-supplied spacing, one field strength) and which exams lack a plane; logged."""
    spacing_text = ", ".join(f"{o} {' x '.join(f'{v:g}' for v in spacing_by_plane[o])}" for o in planes)
    notes = [
        f"MRNet: voxel spacing is user-supplied ({spacing_text} mm); orientation is a convention (no header)",
        f"MRNet: field strength per exam is unknown; every exam is recorded at {float(field_strength_t):g} T",
    ]
    for n in notes:
        log.info(n)
    missing_note = _missing_planes_note(planes_by_case)
    if missing_note:
        log.warning(missing_note)
        notes.append(missing_note)
    return notes


def _stage_exams(staged: Path, root: Path, split: str, planes_by_case: Mapping[str, Sequence[str]],
                 labels: Mapping[str, Mapping[str, int]], spacing_by_plane: Mapping[str, Sequence[float]],
                 field_strength_t: float) -> Path:
    """Write each exam's planes as NIfTI under ``staged/images`` and the manifest that lists them.

    Returns:
        The manifest (``staged/manifest.csv``; paths relative to ``staged``).
    """
    (staged / "images").mkdir()
    rows: list[dict[str, str]] = []
    for case, planes in planes_by_case.items():
        targets = {col: labels[col].get(case) for col in LABEL_FILES}
        for o in planes:
            arr = _load_volume(root, f"{split}/{PLANE_FOLDERS[o]}/{case}.npy")
            rel = f"images/{case}_{o}.nii.gz"
            sitk.WriteImage(plane_image(arr, o, spacing_by_plane[o]), str(staged / rel), True)
            rows.append({
                "case_id": case, "patient_id": case, "site": SITE, "field_strength": f"{float(field_strength_t):g}",
                "vendor": VENDOR, "image": rel, "orientation": o,
                **{col: "" if v is None else str(v) for col, v in targets.items()},
            })
    manifest = staged / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


# ----------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orthodiff_nnunet.dataset_conversion.mrnet",
        description=(
            "Convert MRNet (Stanford knee MRI; .npy volumes without spacing) into three nnU-Net raw datasets: "
            "Dataset<ID>_<Name>Sag, <ID+1>_<Name>Cor, <ID+2>_<Name>Ax, with the exam labels abnormal, ACL, "
            "meniscus as classification targets and no segmentation labels. The voxel spacing must be given: "
            "MRNet publishes none."
        ),
    )
    p.add_argument("mrnet_root", type=Path, help="MRNet folder holding train/, valid/ and the label CSVs")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="base dataset id: sag ID, cor ID+1, ax ID+2")
    p.add_argument("-n", "--name", default="MRNet", help="dataset name (letters and digits; default MRNet)")
    for o, plane in PLANE_FOLDERS.items():
        p.add_argument(f"--spacing-{o}", type=float, nargs=3, metavar=("X", "Y", "SLICE"), default=None,
                       help=f"{plane} spacing in mm: in-plane x, in-plane y, slice distance")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "SLICE"), default=None,
                   help="one spacing (mm) for every plane without its own --spacing-<plane>")
    p.add_argument("--raw", type=Path, default=None, help="nnUNet_raw folder (default: $nnUNet_raw)")
    p.add_argument("--split", choices=("train", "valid"), default="train", help="MRNet split (default train)")
    p.add_argument("--cases", nargs="+", default=None, metavar="ID", help="only these exams, e.g. --cases 0001 0003")
    p.add_argument("--field-strength", type=float, default=DEFAULT_FIELD_STRENGTH_T,
                   help=f"tesla recorded for every exam (default {DEFAULT_FIELD_STRENGTH_T:g}: MRNet mixes 3 T "
                        "(56.6%%) and 1.5 T without saying which exam is which)")
    p.add_argument("--external", action="store_true", help="write imagesTs (an external test set, no splits)")
    p.add_argument("--dry-run", action="store_true", help="validate everything, write nothing")
    p.add_argument("--key-file", type=Path, default=None, help="also write the pseudonym -> MRNet id CSV here")
    p.add_argument("--pseudonym-key", type=Path, default=None, help="secret key file for stable pseudonyms")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="parallel workers (default 2)")
    p.add_argument("--work-dir", type=Path, default=None, help="folder for the temporary NIfTI staging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    per_plane = {o: getattr(args, f"spacing_{o}") or args.spacing for o in ORIENTATIONS}
    spacing = None if all(v is None for v in per_plane.values()) else per_plane
    try:
        result = convert_mrnet(
            args.mrnet_root, args.dataset_id, args.name, spacing=spacing, raw=args.raw, split=args.split,
            cases=args.cases, field_strength_t=args.field_strength, dry_run=args.dry_run, external=args.external,
            key_file=args.key_file, pseudonym_key=args.pseudonym_key, num_folds=args.folds,
            num_processes=args.num_processes, work_dir=args.work_dir,
        )
    except OrthodiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # e.g. nnUNet_raw not set
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
