"""Reading and checking the site manifest CSV (one row per series).

The columns are documented in the README and in ``docs/CONTRACTS.md``. Every problem in the
manifest is collected (not only the first) so that a data team can fix them in one pass.

Manifests come from spreadsheet programs, so the reader accepts what they write: UTF-8 (with or
without BOM), UTF-16/UTF-32 with a BOM ("Unicode text"), UTF-16 without BOM, Windows-1252/Latin-1
("CSV" on Windows), comma, semicolon or tab separated, blank trailing rows, decimal commas in
``field_strength``. Anything else is refused with the line and column of the first bad byte.

Paths (``image``, ``label``, a ``label_remap`` JSON file) are relative to the site folder (default:
the manifest's folder). ``image`` and ``label`` must stay inside it: a ``../`` or an absolute path
leading out of it is refused unless ``allow_outside_site`` is given, so that one site's conversion
cannot silently pick up another site's images. The check is on the written path (symbolic links
inside the site folder are followed without complaint: linking storage into the site folder is a
deliberate act). Remap tables are not patient data and may lie anywhere.

Draft manifests written by ``orthodiff scan`` (:mod:`.scan`) add three things the reader accepts:

* comment rows: a row whose first cell begins with ``#`` is skipped (``scan`` writes the series it
  leaves out that way, ``#`` before the ``case_id``; remove the ``#`` to convert one);
* a ``note`` column and hint columns named ``scan_*``: read by people, ignored here;
* open choices: rows of one exam whose ``note`` begins with ``choose:`` (two sagittal sequences, say)
  are refused while two or more of them with the same note are left uncommented.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orthodiff_nnunet.errors import ConversionError
from orthodiff_nnunet.io.dicom import ACCEPTED_IMAGES, looks_like_dicom_file
from orthodiff_nnunet.schemes import KNEE_ABNORMALITIES, normalize_orientation

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("case_id", "patient_id", "site", "field_strength", "image")
OPTIONAL_COLUMNS = ("vendor", "orientation", "label", "label_remap", "series", "echo")
#: Columns for people (``orthodiff scan`` writes them), ignored by the converter: ``note`` and ``scan_*`` hints.
NOTE_COLUMN = "note"
HINT_PREFIX = "scan_"
#: A row whose first cell begins with this is a comment (skipped).
COMMENT_PREFIX = "#"
#: A ``note`` beginning with this marks a choice left open (see the module docstring).
CHOOSE_PREFIX = "choose:"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MIN_FIELD_T, MAX_FIELD_T = 0.05, 12.0
#: Byte-order marks, longest first (the UTF-32-LE mark begins with the UTF-16-LE one).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)
#: Separators spreadsheet programs write: comma, semicolon (locales with a decimal comma), tab ("Unicode text").
_DELIMITERS = (",", ";", "\t")


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
    image_text: str = ""  # the 'image' value as written in the manifest (for messages)

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


def _line_column(data: bytes, pos: int) -> tuple[int, int]:
    """1-based line and column (in bytes) of byte ``pos``."""
    return data.count(b"\n", 0, pos) + 1, pos - (data.rfind(b"\n", 0, pos) + 1) + 1


def _decode(path: Path, data: bytes) -> tuple[str, str]:
    """The manifest's text and the name of its encoding.

    A BOM decides; without one, NUL bytes mean UTF-16 (byte order from where the NULs sit), else
    UTF-8, then Windows-1252 (what spreadsheet programs on Windows write as "CSV"; it agrees with
    Latin-1 on every letter). Raises ConversionError naming the line and column of the first
    byte that fits none of them.
    """
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            candidates = [(codec, name)]
            break
    else:
        if b"\x00" in data[:4096]:
            head = data[:4096]
            odd_nuls = head[1::2].count(0) >= head[0::2].count(0)
            candidates = [("utf-16-le", "UTF-16-LE") if odd_nuls else ("utf-16-be", "UTF-16-BE")]
        else:
            candidates = [("utf-8", "UTF-8"), ("cp1252", "Windows-1252 (Latin-1)")]
    error: UnicodeDecodeError | None = None
    for codec, name in candidates:
        try:
            return data.decode(codec), name
        except UnicodeDecodeError as exc:
            error = exc if error is None or exc.start > error.start else error
    assert error is not None
    line, column = _line_column(data, error.start)
    tried = " nor ".join(name for _, name in candidates)
    raise ConversionError([
        f"manifest {path.name} is not readable as {tried} text: byte 0x{data[error.start]:02x} at line {line}, "
        f"column {column} fits no encoding tried; save it from the spreadsheet as 'CSV UTF-8' (or check that "
        "the file is the manifest)"
    ])


def _delimiter(header_line: str) -> str:
    """The separator that splits the header into the most known column names (comma on a tie)."""
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS) | {NOTE_COLUMN}

    def hits(d: str) -> int:
        return sum(1 for c in header_line.split(d) if c.strip().strip('"') in known)

    return max(_DELIMITERS, key=lambda d: (hits(d), d == ","))


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line number, row)`` pairs of the manifest; blank and comment rows skipped."""
    data = path.read_bytes()
    text, encoding = _decode(path, data)
    if not text.strip().lstrip("\ufeff").strip():
        raise ConversionError([
            f"manifest {path.name} is empty ({len(data)} bytes, no header row): it needs a header "
            f"({','.join(REQUIRED_COLUMNS)}, ...) and one row per series (see the README's manifest section)"
        ])
    if encoding != "UTF-8":
        log.info("manifest %s read as %s", path.name, encoding)
    text = text.lstrip("\ufeff")
    first = next(line for line in text.splitlines() if line.strip())
    delimiter = _delimiter(first)
    if delimiter != ",":
        log.info("manifest %s is %s-separated", path.name, "tab" if delimiter == "\t" else "semicolon")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    comments = 0
    for values in reader:
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if header is None:
            header = [v.strip() for v in values]
            continue
        if values[0].lstrip().startswith(COMMENT_PREFIX):
            comments += 1
            continue
        row = {h: (values[i].strip() if i < len(values) else "") for i, h in enumerate(header) if h}
        extra = [v for v in values[len(header):] if v.strip()]
        if extra:
            row["\0extra"] = ",".join(extra)
        rows.append((line, row))
    if comments:
        log.info("manifest %s: %d commented row(s) (first cell beginning with '#') skipped", path.name, comments)
    return header or [], rows


def _inside(path_text: str, site_dir: Path) -> bool:
    """Whether the written path stays in the site folder (lexically: '..' and absolute paths count).

    A Windows path is judged with its backslashes read as separators too (see :func:`_resolve`).
    """
    root = os.path.normpath(os.path.abspath(site_dir))
    for text in {path_text, path_text.replace("\\", "/")}:
        full = os.path.normpath(os.path.join(root, os.path.expanduser(text)))
        if os.path.commonpath([root, full]) != root:
            return False
    return True


def _parse_field_strength(text: str) -> float:
    text = text.strip()
    if re.fullmatch(r"\d+,\d+", text):  # a decimal comma from a spreadsheet locale
        text = text.replace(",", ".")
    try:
        return float(text or "nan")
    except ValueError:
        return math.nan


def _resolve(site_dir: Path, text: str) -> Path:
    """``text`` under ``site_dir``; a Windows path (backslashes) is tried with slashes when needed."""
    path = site_dir / os.path.expanduser(text)
    if not path.exists() and "\\" in text and os.sep == "/":
        alt = site_dir / text.replace("\\", "/")
        if alt.exists():
            return alt
    return path


def read_manifest(
    path: Path,
    site_dir: Path | None = None,
    abnormality_labels: Sequence[str] | None = None,
    *,
    allow_outside_site: bool = False,
) -> tuple[list[ManifestRow], list[str]]:
    """Parse and check the manifest.

    Args:
        path: the CSV file (header row; comma, semicolon or tab separated; UTF-8, UTF-16 or
            Windows-1252/Latin-1, see the module docstring).
        site_dir: folder relative paths start from (default: the manifest's folder).
        abnormality_labels: label columns; default the 8 knee abnormalities present as columns.
        allow_outside_site: accept ``image``/``label`` paths that lead out of the site folder
            (``../``, absolute paths); refused by default.

    Returns:
        The rows and the abnormality label names in use.

    Raises:
        ConversionError: listing every problem found (an empty or undecodable file, missing
            columns, unknown columns, bad values, missing files, unaccepted formats, paths outside
            the site folder, unknown remap tables, inconsistent rows of one case).
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError([f"manifest {path} does not exist: pass the path of the site's manifest CSV"])
    site_dir = Path(site_dir) if site_dir is not None else path.parent
    header, numbered_rows = _read_table(path)

    labels, problems = _check_columns(path, header, abnormality_labels)
    if not numbered_rows:
        problems.append(f"manifest {path.name} has no rows")
    rows: list[ManifestRow] = []
    for i, r in numbered_rows:
        where = f"manifest line {i} (case {r.get('case_id', '') or '?'})"
        fs, orientation, echo, targets, value_problems = _row_values(where, r, labels)
        image, label, path_problems = _row_paths(where, r, site_dir, allow_outside_site)
        label_remap, remap_problems = _row_remap(where, r, site_dir)
        problems += value_problems + path_problems + remap_problems
        rows.append(
            ManifestRow(
                row=i, case_id=r.get("case_id", ""), patient_id=r.get("patient_id", ""), site=r.get("site", ""),
                field_strength_t=fs, vendor=r.get("vendor", ""), image=image, orientation=orientation,
                label=label, label_remap=label_remap, series=r.get("series") or None,
                echo=echo, targets=targets, image_text=r.get("image", ""),
            )
        )
    problems += _open_choices(numbered_rows) + _disagreeing_exams(rows)
    if problems:
        raise ConversionError(problems, header=f"manifest {path.name} refused")
    return rows, labels


def _check_columns(path: Path, header: list[str], abnormality_labels: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The abnormality label columns in use and the header's problems.

    Raises:
        ConversionError: a required column is missing (no row can be read without it).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ConversionError(
            [f"manifest {path.name} lacks required column(s) {', '.join(missing)}; "
             f"required: {', '.join(REQUIRED_COLUMNS)} (see the README's manifest section)"]
        )
    problems: list[str] = []
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    if abnormality_labels is None:
        labels = [c for c in KNEE_ABNORMALITIES if c in header]
    else:
        labels = list(abnormality_labels)
        absent = [c for c in labels if c not in header]
        if absent:
            problems.append(f"label column(s) {', '.join(absent)} given with --labels are not in the manifest")
    unknown = [c for c in header if c and c not in known and c not in labels
               and c != NOTE_COLUMN and not c.startswith(HINT_PREFIX)]
    if unknown:
        problems.append(
            f"unknown column(s) {', '.join(unknown)}: to use them as abnormality labels pass "
            f"--labels {','.join(labels + unknown)}; otherwise remove them"
        )
    return labels, problems


def _row_values(where: str, r: dict[str, str], labels: list[str],
                ) -> tuple[float, str | None, int | str | None, dict[str, int | None], list[str]]:
    """A row's field strength (tesla, NaN when unreadable), orientation, echo and targets, and its value problems."""
    problems: list[str] = []
    if "\0extra" in r:
        problems.append(f"{where}: more values than header columns; quote values that contain the separator")
    for c in REQUIRED_COLUMNS:
        if not r.get(c):
            problems.append(f"{where}: empty {c}")
    fs = _parse_field_strength(r.get("field_strength", ""))
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
    return fs, orientation, echo, targets, problems


def _row_paths(where: str, r: dict[str, str], site_dir: Path, allow_outside_site: bool,
               ) -> tuple[Path, Path | None, list[str]]:
    """A row's image and label map paths under ``site_dir``, and their problems (outside, missing, format)."""
    problems: list[str] = []
    for column in ("image", "label"):
        text = r.get(column, "")
        if text and not allow_outside_site and not _inside(text, site_dir):
            problems.append(
                f"{where}: {column} {text} lies outside the site folder {site_dir} ('../' or an absolute path); "
                "move it into the site folder, point --site-dir at a folder that holds it, or pass "
                "--allow-outside-site if this is intended"
            )
    image = _resolve(site_dir, r["image"]) if r.get("image") else site_dir
    if r.get("image") and not image.exists():
        problems.append(f"{where}: image {r['image']} not found under {site_dir}; fix the path or --site-dir")
    elif r.get("image") and image.is_file() and not image.name.lower().endswith(IMAGE_SUFFIXES) \
            and not looks_like_dicom_file(image):
        fmt = "".join(image.suffixes[-1:]) or "this"
        problems.append(
            f"{where}: image {r['image']}: the {fmt} format is not accepted; {ACCEPTED_IMAGES} (convert it, "
            "e.g. to .nii.gz, or give the DICOM series)"
        )
    label = _resolve(site_dir, r["label"]) if r.get("label") else None
    if label is not None and not label.exists():
        problems.append(f"{where}: label map {r['label']} not found under {site_dir}; fix the path")
    elif label is not None and not (label.is_file() and label.name.lower().endswith(IMAGE_SUFFIXES)):
        problems.append(
            f"{where}: label map {r['label']} is not a {', '.join(IMAGE_SUFFIXES)} file; save the label map "
            "in one of these formats on the image's grid"
        )
    return image, label, problems


def _row_remap(where: str, r: dict[str, str], site_dir: Path) -> tuple[str | None, list[str]]:
    """A row's label remap table (a JSON path under ``site_dir`` or a built-in name), loaded once to check it."""
    from orthodiff_nnunet.remap import RemapError, builtin_remap_tables, load_remap_table

    if not r.get("label_remap"):
        return None, []
    problems: list[str] = []
    label_remap: str | None = None
    remap_text = r["label_remap"]
    remap_path = _resolve(site_dir, remap_text)
    if remap_path.is_file():
        label_remap = str(remap_path)
    elif remap_text in builtin_remap_tables():
        label_remap = remap_text
    else:
        problems.append(
            f"{where}: label_remap {remap_text!r} is neither a built-in table ({', '.join(builtin_remap_tables())}) "
            f"nor a JSON file under {site_dir} (paths start from the site folder); fix the name or the path"
        )
    if label_remap is not None:
        try:
            load_remap_table(label_remap)
        except RemapError as exc:
            problems.append(f"{where}: {exc}")
    return label_remap, problems


def _open_choices(numbered_rows: list[tuple[int, dict[str, str]]]) -> list[str]:
    """Choices left open by ``orthodiff scan``: rows of one exam with the same ``choose:`` note."""
    open_choices: dict[tuple[str, str], list[int]] = {}
    for i, r in numbered_rows:
        note = r.get(NOTE_COLUMN, "")
        if note.lower().startswith(CHOOSE_PREFIX):
            open_choices.setdefault((r.get("case_id", ""), note.split("|")[0].strip()), []).append(i)
    return [
        f"manifest lines {', '.join(map(str, lines))} (case {case}) leave a choice open: {note} "
        "(or delete the rows you do not keep)"
        for (case, note), lines in open_choices.items() if len(lines) > 1
    ]


def _disagreeing_exams(rows: list[ManifestRow]) -> list[str]:
    """One exam = one case_id: its rows must agree on everything but the series."""
    problems: list[str] = []
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
    return problems
