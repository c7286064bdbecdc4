"""Reading and checking the site manifest CSV (one row per series).

The columns are documented in the README and in ``docs/CONTRACTS.md``. Every problem in the
manifest is collected (not only the first) so that a data team can fix them in one pass.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orthodiff_nnunet.errors import ConversionError
from orthodiff_nnunet.schemes import KNEE_ABNORMALITIES, normalize_orientation

REQUIRED_COLUMNS = ("case_id", "patient_id", "site", "field_strength", "image")
OPTIONAL_COLUMNS = ("vendor", "orientation", "label", "label_remap", "series", "echo")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MIN_FIELD_T, MAX_FIELD_T = 0.05, 12.0


@dataclass
class ManifestRow:
    """One series of the manifest, with paths resolved against the site folder."""

    row: int  # 1-based line number in the CSV (header = line 1)
    case_id: str
    patient_id: str
    site: str
    field_strength_t: float
    vendor: str
    image: Path
    orientation: str | None
    label: Path | None
    label_remap: str | None
    series: str | None
    echo: int | str | None
    targets: dict[str, int | None] = field(default_factory=dict)

    def where(self) -> str:
        """How error messages name this row: manifest line and the user's case id."""
        return f"manifest line {self.row} (case {self.case_id})"

    @property
    def is_dicom(self) -> bool:
        return self.image.is_dir() or not self.image.name.lower().endswith(IMAGE_SUFFIXES)


def _parse_target(value: str) -> int | None:
    v = value.strip().lower()
    if v in ("", "na", "nan", "none", "unknown", "?"):
        return None
    if v in ("1", "1.0", "true", "yes", "y", "pos", "positive"):
        return 1
    if v in ("0", "0.0", "false", "no", "n", "neg", "negative"):
        return 0
    raise ValueError(value)


def read_manifest(
    path: Path,
    site_dir: Path | None = None,
    abnormality_labels: Sequence[str] | None = None,
) -> tuple[list[ManifestRow], list[str]]:
    """Parse and check the manifest.

    Args:
        path: the CSV file (comma separated, header row, UTF-8).
        site_dir: folder relative paths start from (default: the manifest's folder).
        abnormality_labels: label columns; default the 8 knee abnormalities present as columns.

    Returns:
        The rows and the abnormality label names in use.

    Raises:
        ConversionError: listing every problem found (missing columns, unknown columns, bad values,
            missing files, inconsistent rows of one case).
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError([f"manifest {path} does not exist: pass the path of the site's manifest CSV"])
    site_dir = Path(site_dir) if site_dir is not None else path.parent
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        raw_rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]

    problems: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ConversionError(
            [f"manifest {path.name} lacks required column(s) {', '.join(missing)}; "
             f"required: {', '.join(REQUIRED_COLUMNS)} (see the README's manifest section)"]
        )
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    if abnormality_labels is None:
        labels = [c for c in KNEE_ABNORMALITIES if c in header]
    else:
        labels = list(abnormality_labels)
        absent = [c for c in labels if c not in header]
        if absent:
            problems.append(f"label column(s) {', '.join(absent)} given with --labels are not in the manifest")
    unknown = [c for c in header if c and c not in known and c not in labels]
    if unknown:
        problems.append(
            f"unknown column(s) {', '.join(unknown)}: to use them as abnormality labels pass "
            f"--labels {','.join(labels + unknown)}; otherwise remove them"
        )
    if not raw_rows:
        problems.append(f"manifest {path.name} has no rows")

    rows: list[ManifestRow] = []
    for i, r in enumerate(raw_rows, start=2):
        case = r.get("case_id", "")
        where = f"manifest line {i} (case {case or '?'})"
        for c in REQUIRED_COLUMNS:
            if not r.get(c):
                problems.append(f"{where}: empty {c}")
        try:
            fs = float(r.get("field_strength", "") or "nan")
        except ValueError:
            fs = math.nan
        if r.get("field_strength") and not (MIN_FIELD_T <= fs <= MAX_FIELD_T):
            hint = " (it looks like millitesla: give tesla, e.g. 1.5)" if fs > 100 else ""
            problems.append(f"{where}: field_strength {r.get('field_strength')!r} is not a field strength in tesla{hint}")
        orientation = None
        if r.get("orientation"):
            try:
                orientation = normalize_orientation(r["orientation"])
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
        echo: int | str | None = None
        if r.get("echo"):
            e = r["echo"].lower()
            if e == "all":
                echo = "all"
            elif e.isdigit() and int(e) >= 1:
                echo = int(e)
            else:
                problems.append(f"{where}: echo {r['echo']!r} must be a 1-based echo number or 'all'")
        targets: dict[str, int | None] = {}
        for lab in labels:
            try:
                targets[lab] = _parse_target(r.get(lab, ""))
            except ValueError:
                problems.append(f"{where}: label {lab} = {r.get(lab)!r}; use 0, 1 or blank (unknown)")
        image = (site_dir / r["image"]) if r.get("image") else site_dir
        if r.get("image") and not image.exists():
            problems.append(f"{where}: image {r['image']} not found under {site_dir}; fix the path or --site-dir")
        label = (site_dir / r["label"]) if r.get("label") else None
        if label is not None and not label.exists():
            problems.append(f"{where}: label map {r['label']} not found under {site_dir}; fix the path")
        rows.append(
            ManifestRow(
                row=i, case_id=case, patient_id=r.get("patient_id", ""), site=r.get("site", ""),
                field_strength_t=fs, vendor=r.get("vendor", ""), image=image, orientation=orientation,
                label=label, label_remap=r.get("label_remap") or None, series=r.get("series") or None,
                echo=echo, targets=targets,
            )
        )

    # One exam = one case_id: its rows must agree on everything but the series.
    by_case: dict[str, list[ManifestRow]] = {}
    for row in rows:
        by_case.setdefault(row.case_id, []).append(row)
    for case, case_rows in by_case.items():
        first = case_rows[0]
        for other in case_rows[1:]:
            for attr in ("patient_id", "site", "field_strength_t", "vendor", "targets"):
                a, b = getattr(first, attr), getattr(other, attr)
                if a != b and not (isinstance(a, float) and math.isnan(a) and math.isnan(b)):
                    what = "patient" if attr == "patient_id" else attr
                    problems.append(
                        f"manifest lines {first.row} and {other.row} (case {case}) disagree on {what}: "
                        "all series of one exam must share patient, site, field strength, vendor and labels"
                    )
    if problems:
        raise ConversionError(problems, header=f"manifest {path.name} refused")
    return rows, labels
