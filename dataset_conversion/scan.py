"""``orthodiff scan``: a PACS export folder -> a draft manifest for ``orthodiff convert``.

The export is walked (and every ``DICOMDIR`` in it is read with pydicom's ``FileSet``: files it
lists but that are missing are reported), and only the *headers* of each file are read
(``dcmread(stop_before_pixels=True, specific_tags=...)``), in a process pool with a progress bar.
Files are grouped by study (one exam = one ``case_id``) and series, and each series is judged:

* **kept** (a manifest row): an original MR image series with one stack of slices in one plane;
* **flagged** (a commented row, ``#`` before the ``case_id``, that ``convert`` skips): localizers
  (ImageType LOCALIZER, fewer than ``min_slices`` slices, or several orientations), several stacks in one
  series (repeated slice positions or irregular gaps), derived images and secondary captures, non-MR
  images, mixed matrices, files that are unreadable or cut short, files spread over several folders,
  and series too oblique for the plane to be decided;
* **to choose** (rows whose ``note`` begins with ``choose:``): two or more kept series of the same
  plane in one exam (e.g. PD FS and T2 FS sagittal). ``convert`` refuses the manifest while two
  uncommented rows of one exam carry the same ``choose:`` note: put ``#`` before the ``case_id`` of
  the rows you do not want (or delete them).

The manifest holds the site's own identifiers (``patient_id`` from PatientID; ``case_id`` from the
AccessionNumber, or the StudyInstanceUID when the accession is missing or shared by several studies):
it stays at the site and is never written into an nnU-Net folder (refused). ``convert`` replaces
these identifiers by keyed pseudonyms. Nothing identifying is logged or printed: the console summary
names exams by their manifest lines and non-DICOM files by their names only.

Reading DICOM without pixel data: a file whose pixel data is cut short is still scanned (its header
is intact), and flagged as damaged when the file is smaller than its uncompressed pixel data.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.orientation import DEFAULT_MAX_OBLIQUITY_DEG

log = logging.getLogger(__name__)

__all__ = [
    "ScanError",
    "SeriesScan",
    "ExamScan",
    "ScanResult",
    "scan_export",
    "default_workers",
    "write_manifest",
    "check_manifest_location",
    "MANIFEST_COLUMNS",
    "HINT_COLUMNS",
    "REASONS",
]

#: Columns of the draft manifest read by ``convert``, then the note, then the hints (``scan_*``, ignored by convert).
MANIFEST_COLUMNS = ("case_id", "patient_id", "site", "field_strength", "vendor", "image", "orientation", "series",
                    "echo", "note")
HINT_COLUMNS = ("scan_plane", "scan_obliquity_deg", "scan_series_number", "scan_description", "scan_slices",
                "scan_echoes", "scan_te_ms", "scan_tr_ms", "scan_ti_ms", "scan_fat_sat", "scan_spacing_mm",
                "scan_matrix", "scan_acquisition", "scan_files")

#: Why a series is left out, in the order they are checked (the first that applies is the series' reason).
#: DICOM objects without an image (reports, presentation states, raw data) form no series: they are counted.
REASONS = {
    "secondary_capture": "secondary capture (a screenshot, SOP class Secondary Capture)",
    "derived": "derived image (ImageType DERIVED or SECONDARY: a reformat, subtraction or map)",
    "not_mr": "not MR",
    "damaged": "damaged file(s): unreadable header or pixel data cut short",
    "localizer": "localizer",
    "mixed_matrix": "files of different matrix sizes",
    "several_stacks": "several stacks in one series",
    "several_folders": "files spread over several folders",
    "no_geometry": "no slice geometry (ImageOrientationPatient/ImagePositionPatient missing)",
    "oblique": "too oblique for the plane to be decided",
}

_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_MR_STORAGE = ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4")
#: Nominal field strengths (T): a header value within 5 % of one is written as the nominal value
#: (Siemens 3 T scanners write 2.89362).
_NOMINAL_FIELDS_T = (0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.55, 0.6, 0.7, 1.0, 1.2, 1.5, 3.0, 4.0, 7.0, 9.4, 10.5, 11.7)
_PLANE_NAMES = {"sag": "sagittal", "cor": "coronal", "ax": "axial"}
_FAT_SAT = re.compile(r"(?<![a-z])(fs|fatsat|fat[ _-]?sat\w*|spair|spir|stir|fat[ _-]?supp?\w*|chess|dixon[ _-]?w)(?![a-z])",
                      re.IGNORECASE)

#: Header tags read from each file (never the pixel data).
_TAGS = [
    "SOPClassUID", "Modality", "ImageType", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
    "SeriesDescription", "PatientID", "AccessionNumber", "Manufacturer", "MagneticFieldStrength",
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns",
    "NumberOfFrames", "EchoTime", "RepetitionTime", "InversionTime", "ScanOptions", "MRAcquisitionType",
    "BitsAllocated", "SamplesPerPixel", "SharedFunctionalGroupsSequence",
]

ExecutorKind = Literal["process", "thread", "serial"]


class ScanError(OrthodiffError):
    """The export cannot be scanned or the manifest not written where asked; the message says why."""


# ----------------------------------------------------------------------------------------------
# reading one file (runs in worker processes: plain picklable values only)


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _floats(v: Any, n: int) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n and all(math.isfinite(x) for x in vals) else None


def _text(ds: Any, key: str) -> str:
    v = ds.get(key)
    if v is None:
        return ""
    v = getattr(v, "value", v)
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v).strip()


#: Value representations whose raw bytes are plain ASCII: decoded here, without pydicom's conversion machinery
#: (which costs most of a header's parse time); texts that may use the dataset's character set
#: (LO, SH, PN ...) still go through pydicom.
_ASCII_VRS = frozenset({"CS", "UI", "DS", "IS", "AS", "DA", "TM", "DT"})
_TAG_OF: dict[str, int] = {}


def _tag(keyword: str) -> int:
    tag = _TAG_OF.get(keyword)
    if tag is None:
        from pydicom.datadict import tag_for_keyword

        tag = _TAG_OF[keyword] = int(tag_for_keyword(keyword))
    return tag


class _Fast:
    """Values of a dataset read from their raw bytes where that is safe (ASCII VRs, US), else through pydicom."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        _, little = getattr(ds, "original_encoding", (False, True))
        self.order: Literal["little", "big"] = "big" if little is False else "little"

    def raw(self, keyword: str) -> Any:
        """The value: ``str`` for ASCII VRs (multi-values joined by a backslash), ``int`` for US, else pydicom's."""
        from pydicom.datadict import dictionary_VR
        from pydicom.dataelem import RawDataElement

        tag = _tag(keyword)
        elem = self.ds.get_item(tag)
        if elem is None:
            return None
        if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
            vr = elem.VR or dictionary_VR(tag)
            if vr in _ASCII_VRS:
                return elem.value.decode("ascii", "replace").strip(" \x00")
            if vr == "US" and len(elem.value) >= 2:
                return int.from_bytes(elem.value[:2], self.order)
        return self.ds.get(keyword)

    def text(self, keyword: str) -> str:
        v = self.raw(keyword)
        if v is None:
            return ""
        if isinstance(v, str):
            return v.strip()
        return _text(self.ds, keyword)

    def number(self, keyword: str) -> float | None:
        v = self.raw(keyword)
        if isinstance(v, str):
            v = v.split("\\")[0]
        return _float(v)

    def numbers(self, keyword: str, n: int) -> tuple[float, ...] | None:
        v = self.raw(keyword)
        if isinstance(v, str):
            v = v.split("\\")
        return _floats(v, n)


def read_header(path: str) -> dict[str, Any]:
    """What the scan needs of one file, read without its pixel data.

    Returns a dict with ``kind``: ``image`` (with the header values), ``dicomdir``, ``not_dicom``
    or ``damaged`` (with ``reason``). Never raises for a bad file.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    out: dict[str, Any] = {"path": path}
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return out | {"kind": "damaged", "reason": f"cannot be opened: {exc.strerror or type(exc).__name__}"}
    if size == 0:
        return out | {"kind": "not_dicom", "reason": "empty (0 bytes)"}
    try:
        with warnings.catch_warnings(), open(path, "rb") as fp:
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_TAGS)
            except InvalidDicomError:
                # no DICM preamble: a raw dataset (old exports), or not DICOM at all
                fp.seek(0)
                ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_TAGS, force=True)
                if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
                    return out | {"kind": "not_dicom"}
            pixel_at = fp.tell()  # pydicom stops at the start of the pixel data element
            pixel_header = fp.read(12)  # its tag and length: the pixel data themselves are not read
    except Exception as exc:  # noqa: BLE001 - any parse failure: report the file, scan the rest
        with open(path, "rb") as f:
            magic = f.read(132)[128:132] == b"DICM"
        if magic:
            return out | {"kind": "damaged", "reason": f"header unreadable ({type(exc).__name__})"}
        return out | {"kind": "not_dicom"}
    meta = getattr(ds, "file_meta", None)
    f = _Fast(ds)
    sop_class = f.text("SOPClassUID") or (str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else "")
    if sop_class == _DICOMDIR_SOP_CLASS:
        return out | {"kind": "dicomdir"}
    iop, ipp, pixel = _geometry(ds, f)
    rows, cols = int(f.number("Rows") or 0), int(f.number("Columns") or 0)
    frames = int(f.number("NumberOfFrames") or 1)
    series_number = f.number("SeriesNumber")
    reason = _pixel_problem(ds, size, pixel_at, pixel_header) if rows and cols else ""
    return out | {
        "kind": "image" if rows and cols else "not_image",
        "damaged_reason": reason,
        "sop_class": sop_class,
        "modality": f.text("Modality").upper(),
        "image_type": tuple(v.strip() for v in f.text("ImageType").upper().split("\\")) if "ImageType" in ds else (),
        "study_uid": f.text("StudyInstanceUID"),
        "series_uid": f.text("SeriesInstanceUID"),
        "series_number": int(series_number) if series_number is not None else None,
        "description": _text(ds, "SeriesDescription"),
        "patient_id": _text(ds, "PatientID"),
        "accession": _text(ds, "AccessionNumber"),
        "manufacturer": _text(ds, "Manufacturer"),
        "field_strength": f.number("MagneticFieldStrength"),
        "iop": iop,
        "ipp": ipp,
        "pixel": pixel,
        "thickness": f.number("SliceThickness"),
        "rows": rows,
        "cols": cols,
        "frames": frames,
        "te": f.number("EchoTime"),
        "tr": f.number("RepetitionTime"),
        "ti": f.number("InversionTime"),
        "scan_options": f.text("ScanOptions").upper(),
        "acquisition": f.text("MRAcquisitionType").upper(),
    }


def _geometry(ds: Any, f: _Fast) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None, tuple[float, ...] | None]:
    """ImageOrientationPatient, ImagePositionPatient and PixelSpacing of a header (``None`` where absent).

    An enhanced multi-frame file keeps orientation and pixel spacing in its shared functional groups.
    """
    iop = f.numbers("ImageOrientationPatient", 6)
    ipp = f.numbers("ImagePositionPatient", 3)
    pixel = f.numbers("PixelSpacing", 2)
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and (iop is None or pixel is None):  # enhanced multi-frame: geometry in the functional groups
        item = shared[0]
        if iop is None and item.get("PlaneOrientationSequence"):
            iop = _floats(item.PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6)
        if item.get("PixelMeasuresSequence"):
            pm = item.PixelMeasuresSequence[0]
            pixel = pixel or _floats(pm.get("PixelSpacing"), 2)
    return iop, ipp, pixel


def _pixel_problem(ds: Any, size: int, at: int, header: bytes) -> str:
    """Why the pixel data element that starts at byte ``at`` is missing or cut short ("" when intact).

    Only the element's tag and length are looked at: the declared length is compared with the
    bytes left in the file.
    """
    implicit, little = getattr(ds, "original_encoding", (False, True))
    order = "little" if little in (True, None) else "big"
    if len(header) < 8:
        return "no pixel data: the file ends before it (exported without the image, or cut short)"
    group, element = int.from_bytes(header[0:2], order), int.from_bytes(header[2:4], order)
    if (group, element) not in ((0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)):
        return ""  # something else follows the header: leave it to convert
    if implicit:
        hlen, length = 8, int.from_bytes(header[4:8], order)
    elif header[4:6] in (b"OB", b"OW", b"OF", b"OD", b"UN", b"OL", b"OV"):
        if len(header) < 12:
            return "pixel data cut short: the file ends inside its header"
        hlen, length = 12, int.from_bytes(header[8:12], order)
    else:
        hlen, length = 8, int.from_bytes(header[6:8], order)
    if length == 0xFFFFFFFF:  # encapsulated (compressed): fragments, not checked
        return ""
    left = size - at - hlen
    if left < length:
        return f"pixel data cut short: {left} of {length} bytes"
    return ""


def _read_chunk(paths: Sequence[str]) -> list[dict[str, Any]]:
    return [read_header(p) for p in paths]


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class SeriesScan:
    """One series of the export, with what its headers say and the scan's verdict.

    ``uid`` and ``study_uid`` identify it for grouping and for the manifest's ``series`` column only;
    they are hidden from ``repr`` and never logged.
    """

    uid: str = field(repr=False)
    study_uid: str = field(repr=False)
    series_number: int | None
    description: str = field(repr=False)
    files: list[Path] = field(repr=False)
    folders: list[Path] = field(repr=False)
    modality: str = ""
    sop_class: str = ""
    image_type: tuple[str, ...] = ()
    plane: str | None = None  # sag / cor / ax (the nearest plane, also when too oblique)
    obliquity_deg: float | None = None
    orientations: int = 0  # distinct ImageOrientationPatient values
    slices: int = 0  # per echo
    echo_times_ms: tuple[float, ...] = ()
    spacing_mm: tuple[float, float, float] | None = None  # pixel spacing (row, column), slice spacing
    matrix: tuple[int, int] | None = None  # rows, columns (None: mixed)
    tr_ms: float | None = None
    ti_ms: float | None = None
    fat_sat: bool | None = None
    field_strength_t: float | None = None
    manufacturer: str = ""
    acquisition: str = ""
    flags: list[str] = field(default_factory=list)  # REASONS keys, the first one decides
    details: list[str] = field(default_factory=list)  # human-readable why, parallel to flags
    damaged: list[tuple[Path, str]] = field(default_factory=list, repr=False)

    @property
    def kept(self) -> bool:
        return not self.flags

    @property
    def reason(self) -> str | None:
        return self.flags[0] if self.flags else None

    @property
    def num_echoes(self) -> int:
        return max(1, len(self.echo_times_ms))

    def describe(self) -> str:
        """Non-identifying description: number, plane, slices, echoes (no SeriesDescription)."""
        number = f"series {self.series_number}" if self.series_number is not None else "series without number"
        plane = self.plane or "no plane"
        echoes = f", {self.num_echoes} echoes" if self.num_echoes > 1 else ""
        return f"{number} ({plane}, {self.slices} slices{echoes})"


@dataclass
class ExamScan:
    """One study: its identifiers (site-private) and its series."""

    case_id: str = field(repr=False)
    patient_id: str = field(repr=False)
    study_uid: str = field(repr=False)
    series: list[SeriesScan]
    manifest_lines: tuple[int, int] | None = None  # first and last line in the written manifest

    @property
    def kept(self) -> list[SeriesScan]:
        return [s for s in self.series if s.kept]

    @property
    def planes(self) -> list[str]:
        return [p for p in ("sag", "cor", "ax") if any(s.plane == p for s in self.kept)]

    @property
    def choices(self) -> dict[str, list[SeriesScan]]:
        """Planes with several kept series: the user keeps one."""
        out: dict[str, list[SeriesScan]] = {}
        for s in self.kept:
            out.setdefault(s.plane or "", []).append(s)
        return {p: ss for p, ss in out.items() if len(ss) > 1}


@dataclass
class ScanResult:
    """What :func:`scan_export` found."""

    root: Path
    exams: list[ExamScan]
    num_files: int
    not_dicom: list[Path]
    damaged: list[tuple[Path, str]]
    non_image: list[Path]  # DICOM objects without an image (reports, presentation states)
    dicomdirs: list[Path]
    missing_from_dicomdir: list[Path]
    seconds: float
    workers: int
    executor: str

    @property
    def series(self) -> list[SeriesScan]:
        return [s for e in self.exams for s in e.series]

    def flagged_by_reason(self) -> dict[str, int]:
        c = Counter(s.reason for s in self.series if not s.kept)
        return {r: c[r] for r in REASONS if c[r]}

    def summary(self, max_exams_listed: int = 40) -> str:
        """Console summary: exams, series kept / flagged by reason, planes per exam, exams missing a plane.

        With more than ``max_exams_listed`` exams, only those missing a plane or with a choice open get a line.

        Names no identifier: exams are numbered in manifest order (with their manifest lines once written),
        non-DICOM files are named by their file name only.
        """
        from orthodiff_nnunet.io.dicom import _file_label

        rate = self.num_files / self.seconds if self.seconds > 0 else float("nan")
        kept = sum(len(e.kept) for e in self.exams)
        flagged = self.flagged_by_reason()
        lines = [
            f"scanned {self.num_files} files in {self.seconds:.1f} s ({rate:.0f} files/s, "
            + ("read serially" if self.executor == "serial" else f"{self.workers} {self.executor} workers")
            + f"): {len(self.exams)} exam(s), {len(self.series)} series",
            f"series kept: {kept}; flagged (commented out in the manifest): {sum(flagged.values())}",
        ]
        for r, n in flagged.items():
            lines.append(f"  {n:4d}  {REASONS[r]}")
        if self.dicomdirs:
            lines.append(f"DICOMDIR read: {len(self.dicomdirs)}; files it lists that are missing: "
                         f"{len(self.missing_from_dicomdir)}")
        if self.not_dicom:
            names = Counter(_file_label(p) for p in self.not_dicom)
            shown = ", ".join(f"{n}" + (f" (x{k})" if k > 1 else "") for n, k in sorted(names.items())[:20])
            more = f" and {len(names) - 20} more names" if len(names) > 20 else ""
            lines.append(f"not DICOM (skipped): {len(self.not_dicom)} file(s): {shown}{more}")
        if self.non_image:
            lines.append(f"DICOM without an image (skipped): {len(self.non_image)} file(s)")
        if self.damaged:
            shown = ", ".join(_file_label(p) for p, _ in self.damaged[:10])
            lines.append(f"damaged DICOM: {len(self.damaged)} file(s): {shown}"
                         + (" ..." if len(self.damaged) > 10 else "") + "; replace them from the archive")
        short = len(self.exams) > max_exams_listed
        lines.append("exam  manifest lines  planes      series kept  to choose"
                     + (f"   (only exams missing a plane or with a choice: more than {max_exams_listed} exams)"
                        if short else ""))
        missing: Counter[str] = Counter()
        for i, e in enumerate(self.exams, start=1):
            where = f"{e.manifest_lines[0]}-{e.manifest_lines[1]}" if e.manifest_lines else "-"
            choose = ", ".join(f"{len(ss)} {p}" for p, ss in e.choices.items()) or "-"
            if not short or e.choices or len(e.planes) < 3:
                lines.append(f"{i:4d}  {where:>14}  {','.join(e.planes) or '-':<10}  {len(e.kept):>11}  {choose}")
            for p in ("sag", "cor", "ax"):
                if p not in e.planes:
                    missing[p] += 1
        if missing:
            lines.append("exams missing a plane: " + ", ".join(f"{n} without {_PLANE_NAMES[p]}"
                                                               for p, n in missing.items()))
        else:
            lines.append("every exam has a sagittal, a coronal and an axial series")
        n_choose = sum(len(e.choices) for e in self.exams)
        if n_choose:
            lines.append(f"{n_choose} choice(s) open: rows whose note begins with 'choose:' - put # before the "
                         "case_id of the rows you do not keep; convert refuses the manifest until then")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# walking


def _walk(root: Path, exclude: set[Path]) -> list[Path]:
    """Every regular file under ``root`` (hidden ones included: they are counted as not DICOM)."""
    out: list[Path] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            log.warning("a folder of the export cannot be listed (%s); its files are not scanned",
                        exc.strerror or type(exc).__name__)
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file():
                p = Path(entry.path)
                if p not in exclude:
                    out.append(p)
    return sorted(out)


def _dicomdir_files(dicomdir: Path) -> list[Path]:
    """The files a DICOMDIR's directory records reference (ReferencedFileID, relative to its folder).

    The records are read directly: pydicom's ``FileSet`` drops records whose file is missing,
    which are exactly the ones to report.
    """
    from pydicom import dcmread

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(dicomdir)
    out = []
    for record in ds.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if file_id:
            parts = [file_id] if isinstance(file_id, str) else list(file_id)
            out.append(dicomdir.parent.joinpath(*[str(p) for p in parts]))
    return out


def default_workers() -> int:
    """Worker processes worth starting: the cores the 1-minute load average leaves free, at most 8 (at least 1).

    On a busy machine a pool costs more than it gives: on the project's saturated 2-core machine a
    2-process pool read 10,036 headers 22 % slower than one process (pickling and process overhead,
    bench/results/scan.md), so with no free core the scan reads serially.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(8, int(cores - load)))


def _pool(kind: ExecutorKind, workers: int) -> Executor | None:
    if kind == "serial" or workers <= 1:
        return None
    if kind == "thread":
        return ThreadPoolExecutor(max_workers=workers)
    import multiprocessing

    import threading

    # fork starts workers in milliseconds (spawn re-imports numpy in each); forking a process that runs
    # other threads can deadlock the child, so then spawn
    single = threading.active_count() == 1
    method = "fork" if single and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
    pool.submit(int).result()  # start the workers now, before the progress bar's monitor thread
    return pool


def _read_all(files: Sequence[Path], executor: ExecutorKind, workers: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    paths = [str(f) for f in files]
    pool = _pool(executor, workers) if len(paths) >= 64 else None  # before the bar (and its monitor thread)
    bar = tqdm(total=len(paths), desc="reading DICOM headers", unit="file", disable=not progress, smoothing=0.1)
    out: list[dict[str, Any]] = []
    try:
        if pool is None:
            for p in paths:
                out.append(read_header(p))
                bar.update(1)
        else:
            chunk = max(16, min(256, len(paths) // (workers * 8) or 16))
            chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
            for part in pool.map(_read_chunk, chunks):
                out.extend(part)
                bar.update(len(part))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    return out


# ----------------------------------------------------------------------------------------------
# judging a series


def _plane_of(iop: Sequence[float]) -> tuple[str, float, np.ndarray]:
    """Nearest plane, obliquity (degrees from the nearest patient axis) and unit normal of a slice."""
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise ValueError("degenerate ImageOrientationPatient")
    normal = normal / norm
    axis = int(np.argmax(np.abs(normal)))
    obliquity = float(np.degrees(np.arccos(np.clip(abs(normal[axis]), 0.0, 1.0))))
    return ("sag", "cor", "ax")[axis], obliquity, normal


def _nominal_field(t: float | None) -> float | None:
    """Tesla from MagneticFieldStrength: gauss (>= 1000) and millitesla (> 20) converted, near-nominal rounded."""
    if t is None or t <= 0:
        return None
    if t >= 1000:
        t = t / 10000.0 if t >= 2000 and t / 10000.0 >= 0.1 else t / 1000.0
    elif t > 20:
        t = t / 1000.0
    nearest = min(_NOMINAL_FIELDS_T, key=lambda n: abs(n - t))
    return nearest if abs(nearest - t) <= 0.05 * nearest else round(t, 2)


def _convert_plane(s: SeriesScan, iop: Sequence[float], normal: np.ndarray, max_obliquity_deg: float) -> bool:
    """Set ``s.plane``/``s.obliquity_deg`` as ``convert`` will decide them; True when it will refuse the plane.

    A voxel-less 2x2x2 image with the series' spacing and direction goes through
    :func:`orthodiff_nnunet.orientation.detect_plane`, the converter's own rule.
    """
    import SimpleITK as sitk

    from orthodiff_nnunet.orientation import OrientationError, detect_plane

    assert s.spacing_mm is not None
    row, col = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    image = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    try:
        image.SetSpacing((float(s.spacing_mm[1]), float(s.spacing_mm[0]), float(s.spacing_mm[2])))  # x = column spacing
        image.SetDirection(tuple(float(v) for v in np.stack([row, col, normal], axis=1).flatten()))
    except RuntimeError:  # a degenerate direction: keep the nearest-plane answer
        return s.obliquity_deg is not None and s.obliquity_deg > max_obliquity_deg
    try:
        info = detect_plane(image, max_obliquity_deg)
    except OrientationError:
        return True
    s.plane, s.obliquity_deg = info.orientation, info.obliquity_deg
    return False


def _flag(s: SeriesScan, key: str, detail: str) -> None:
    """Add the reason ``key`` (a :data:`REASONS` key) with its detail to ``s``, once."""
    if key not in s.flags:
        s.flags.append(key)
        s.details.append(detail)


def _judge(s: SeriesScan, headers: list[dict[str, Any]], min_slices: int, max_obliquity_deg: float) -> None:
    """Fill in the derived values of ``s`` and its flags (in the order of :data:`REASONS`)."""
    _sequence_values(s, headers)
    _flag_kind(s)
    iop, normal = _plane_values(s, headers)
    frames = sum(h["frames"] for h in headers)
    per_echo = Counter(round(h["te"], 3) if h["te"] is not None else None for h in headers)
    s.slices = (frames if len(headers) == 1 else max(per_echo.values()))
    types = set(s.image_type)
    if "LOCALIZER" in types or "SCOUT" in types:
        _flag(s, "localizer", "localizer (ImageType LOCALIZER)")
    elif s.orientations > 1:
        _flag(s, "localizer", f"{s.orientations} slice orientations in one series (a localizer)")
    elif s.slices < min_slices and "secondary_capture" not in s.flags:
        _flag(s, "localizer", f"{s.slices} slice(s), fewer than {min_slices} (a localizer or a single image)")
    if s.matrix is None:
        sizes = {(h["rows"], h["cols"]) for h in headers}
        _flag(s, "mixed_matrix", "files of " + ", ".join(f"{r}x{c}" for r, c in sorted(sizes)) + " pixels")

    geometry = [h for h in headers if h["iop"] is not None and h["ipp"] is not None]
    _stack_spacing(s, headers, geometry, normal)
    ambiguous = s.obliquity_deg is not None and s.obliquity_deg > max_obliquity_deg
    if iop is not None and normal is not None and s.spacing_mm is not None and min(s.spacing_mm) > 0:
        # the plane as convert will decide it (orientation.detect_plane: thickest spacing, else the slice axis)
        ambiguous = _convert_plane(s, iop, normal, max_obliquity_deg)
    if len(s.folders) > 1:
        _flag(s, "several_folders", f"files in {len(s.folders)} folders: convert reads one folder; move them into one")
    if not geometry and not s.flags:
        _flag(s, "no_geometry", "no ImageOrientationPatient/ImagePositionPatient")
    if ambiguous:
        _flag(s, "oblique", f"{s.obliquity_deg:.0f} degrees oblique (limit {max_obliquity_deg:.0f}): the plane is "
              "ambiguous; set the orientation column (sag, cor or ax) and remove the #")


def _sequence_values(s: SeriesScan, headers: list[dict[str, Any]]) -> None:
    """Set what the headers say about the acquisition: modality, SOP class, image type, vendor, field, TE/TR/TI,
    fat saturation and matrix (the most common value where files disagree)."""
    h0 = headers[0]
    s.modality = h0["modality"]
    s.sop_class = h0["sop_class"]
    s.image_type = h0["image_type"]
    s.manufacturer = Counter(h["manufacturer"] for h in headers).most_common(1)[0][0]
    s.acquisition = h0["acquisition"]
    fields = [h["field_strength"] for h in headers if h["field_strength"] is not None]
    s.field_strength_t = _nominal_field(Counter(fields).most_common(1)[0][0]) if fields else None
    tes = sorted({round(h["te"], 3) for h in headers if h["te"] is not None})
    s.echo_times_ms = tuple(tes)
    trs = [h["tr"] for h in headers if h["tr"] is not None]
    tis = [h["ti"] for h in headers if h["ti"] is not None]
    s.tr_ms = Counter(trs).most_common(1)[0][0] if trs else None
    s.ti_ms = Counter(tis).most_common(1)[0][0] if tis else None
    options = h0["scan_options"]
    if "FS" in options.split("\\") or "FAT" in options or _FAT_SAT.search(s.description or ""):
        s.fat_sat = True
    elif options or s.description:
        s.fat_sat = False
    sizes = {(h["rows"], h["cols"]) for h in headers}
    s.matrix = next(iter(sizes)) if len(sizes) == 1 else None


def _flag_kind(s: SeriesScan) -> None:
    """Flag what is not an original MR image: secondary captures, derived images, other modalities, damaged files."""
    types = set(s.image_type)
    if s.sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
        _flag(s, "secondary_capture", "secondary capture (SOP class Secondary Capture)")
    if "DERIVED" in types or "SECONDARY" in types:
        _flag(s, "derived", f"derived image (ImageType {'/'.join(s.image_type[:3])})")
    if s.modality and s.modality != "MR" and "secondary_capture" not in s.flags:
        _flag(s, "not_mr", f"modality {s.modality}, not MR")
    if s.damaged:
        _flag(s, "damaged", f"{len(s.damaged)} damaged file(s): replace them from the archive")


def _plane_values(s: SeriesScan, headers: list[dict[str, Any]]) -> tuple[tuple[float, ...] | None, np.ndarray | None]:
    """Set ``s.orientations`` and, for one slice orientation, the nearest plane and obliquity.

    Returns:
        (the series' ImageOrientationPatient, the unit slice normal); both ``None`` unless the
        series has one non-degenerate orientation.
    """
    iops = {tuple(round(v, 3) for v in h["iop"]) for h in headers if h["iop"] is not None}
    s.orientations = len(iops)
    iop: tuple[float, ...] | None = None
    normal = None
    if len(iops) == 1:
        iop = Counter(tuple(round(v, 4) for v in h["iop"]) for h in headers if h["iop"] is not None).most_common(1)[0][0]
        try:
            s.plane, s.obliquity_deg, normal = _plane_of(iop)
        except ValueError:
            iop = None
    return iop, normal


def _stack_spacing(s: SeriesScan, headers: list[dict[str, Any]], geometry: list[dict[str, Any]],
                   normal: np.ndarray | None) -> None:
    """Set ``s.spacing_mm`` and flag several stacks (repeated slice positions, irregular gaps) per echo.

    The slice spacing is the median gap of the slice positions along the normal when every file has
    geometry, else the SliceThickness.
    """
    pixel = next((h["pixel"] for h in headers if h["pixel"] is not None), None)
    if normal is not None and len(geometry) == len(headers) and s.orientations == 1 and len(headers) > 1:
        by_echo: dict[float | None, list[float]] = {}
        for h in geometry:
            by_echo.setdefault(round(h["te"], 3) if h["te"] is not None else None, []).append(float(np.dot(normal, h["ipp"])))
        gaps_all: list[float] = []
        for te, locs in by_echo.items():
            locs = sorted(locs)
            distinct = np.unique(np.round(locs, 3))
            if len(distinct) < len(locs):
                _flag(s, "several_stacks", f"{len(locs) - len(distinct)} repeated slice position(s)"
                      + (f" at echo time {te:g} ms" if te is not None and len(by_echo) > 1 else "")
                      + ": several stacks (or repetitions) in one series")
            gaps = np.diff(distinct)
            if len(gaps):
                med = float(np.median(gaps))
                if med > 0 and float(gaps.max()) > 1.5 * med:
                    _flag(s, "several_stacks", f"slice gaps of {med:.3g} and {float(gaps.max()):.3g} mm: several "
                          "stacks or missing slices")
                gaps_all += list(gaps)
        if gaps_all:
            slice_mm = float(np.median(gaps_all))
            s.spacing_mm = ((pixel[0], pixel[1], round(slice_mm, 4)) if pixel else None)
    elif pixel is not None and headers[0]["thickness"] is not None:
        s.spacing_mm = (pixel[0], pixel[1], headers[0]["thickness"])


# ----------------------------------------------------------------------------------------------
# public


def scan_export(
    folder: Path,
    *,
    workers: int | None = None,
    executor: ExecutorKind = "process",
    progress: bool = True,
    min_slices: int = 8,
    max_obliquity_deg: float = DEFAULT_MAX_OBLIQUITY_DEG,
    exclude: Iterable[Path] = (),
) -> ScanResult:
    """Scan a PACS export: every file's header (no pixel data), grouped into exams and series, each judged.

    Args:
        folder: the export folder (or a DICOMDIR file: its folder is scanned).
        workers: parallel readers (default :func:`default_workers`: the cores the load average leaves
            free, at most 8; 1 = serial).
        executor: ``process`` (default: pydicom's parsing is Python code that holds the GIL, so threads
            share one core), ``thread`` or ``serial``. Fewer than 64 files are read serially.
        progress: show a tqdm progress bar (stderr).
        min_slices: a series with fewer slices (per echo) is flagged as a localizer.
        max_obliquity_deg: a series whose slice normal is further from every patient axis is flagged
            (``convert``'s ``--max-obliquity``, default 35).
        exclude: files not to scan (e.g. the manifest being written into the export).

    Returns:
        The :class:`ScanResult`; exams in the order of (patient, case id), series by series number.

    Raises:
        ScanError: the folder does not exist or holds no DICOM image.
    """
    t0 = time.perf_counter()
    root = Path(folder)
    if root.is_file() and root.name.upper() == "DICOMDIR":
        root = root.parent
    if not root.is_dir():
        raise ScanError(f"the export folder {root} does not exist or is not a folder; pass the folder of the PACS export")
    excluded = {Path(p).absolute() for p in exclude}
    files = [p for p in _walk(root.absolute(), excluded)]
    if not files:
        raise ScanError(f"the export folder {root} holds no file")
    workers = default_workers() if workers is None else max(1, workers)
    headers = _read_all(files, executor, workers, progress)

    dicomdirs = [Path(h["path"]) for h in headers if h["kind"] == "dicomdir"]
    missing = _missing_from_dicomdirs(dicomdirs, files)
    not_dicom = [Path(h["path"]) for h in headers if h["kind"] == "not_dicom"]
    non_image = [Path(h["path"]) for h in headers if h["kind"] == "not_image"]
    damaged = [(Path(h["path"]), h["reason"]) for h in headers if h["kind"] == "damaged"]
    damaged += [(Path(h["path"]), h["damaged_reason"]) for h in headers if h["kind"] == "image" and h["damaged_reason"]]
    images = [h for h in headers if h["kind"] == "image"]
    if not images:
        raise ScanError(
            f"no DICOM image among the {len(files)} files of the export {root} ({len(not_dicom)} not DICOM, "
            f"{len(damaged)} damaged, {len(non_image)} DICOM without an image, {len(dicomdirs)} DICOMDIR); pass the "
            "folder that holds the exported series")

    series = _group_series(images, damaged, min_slices, max_obliquity_deg)
    exams = _group_exams(series, images)
    seconds = time.perf_counter() - t0
    result = ScanResult(
        root=root, exams=exams, num_files=len(files), not_dicom=not_dicom, damaged=damaged, non_image=non_image,
        dicomdirs=dicomdirs, missing_from_dicomdir=missing, seconds=seconds,
        workers=1 if (executor == "serial" or len(files) < 64) else workers,
        executor="serial" if (executor == "serial" or len(files) < 64 or workers <= 1) else executor,
    )
    log.info("scanned %d files: %d exams, %d series (%d kept)", len(files), len(exams), len(series),
             sum(s.kept for s in series))
    return result


def _missing_from_dicomdirs(dicomdirs: list[Path], files: list[Path]) -> list[Path]:
    """The files the export's DICOMDIRs list that are not among ``files`` (an unreadable DICOMDIR is skipped)."""
    missing: list[Path] = []
    present = {str(f) for f in files}
    for d in dicomdirs:
        try:
            listed = _dicomdir_files(d)
        except Exception as exc:  # noqa: BLE001 - a broken DICOMDIR must not stop the scan of the files
            log.warning("a DICOMDIR could not be read (%s); the export's files are scanned without it", type(exc).__name__)
            continue
        present_lower = {p.lower() for p in present}  # IDs are upper case; a copy from CD may be lower case
        missing += [p for p in listed if str(p.absolute()) not in present and str(p.absolute()).lower() not in present_lower]
    return missing


def _group_series(images: list[dict[str, Any]], damaged: list[tuple[Path, str]], min_slices: int,
                  max_obliquity_deg: float) -> list[SeriesScan]:
    """The image headers grouped by (study, series), each series judged (:func:`_judge`)."""
    by_series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for h in images:
        key = (h["study_uid"], h["series_uid"] or f"no series uid: {Path(h['path']).parent}")
        by_series.setdefault(key, []).append(h)
    damaged_by_path = {str(p): r for p, r in damaged}
    series: list[SeriesScan] = []
    for (study_uid, uid), hs in by_series.items():
        hs.sort(key=lambda h: h["path"])
        s = SeriesScan(
            uid=uid, study_uid=study_uid,
            series_number=Counter(h["series_number"] for h in hs).most_common(1)[0][0],
            description=hs[0]["description"],
            files=[Path(h["path"]) for h in hs],
            folders=sorted({Path(h["path"]).parent for h in hs}),
            damaged=[(Path(h["path"]), damaged_by_path[h["path"]]) for h in hs if h["path"] in damaged_by_path],
        )
        _judge(s, hs, min_slices, max_obliquity_deg)
        series.append(s)
    return series


def _group_exams(series: list[SeriesScan], images: list[dict[str, Any]]) -> list[ExamScan]:
    """One exam per study, in (patient, case id) order, its series by series number.

    The case_id is the accession number when it names this study alone, else the StudyInstanceUID.
    """
    studies: dict[str, list[SeriesScan]] = {}
    for s in series:
        studies.setdefault(s.study_uid, []).append(s)
    first_header = {}
    for h in images:
        first_header.setdefault(h["study_uid"], h)
    accession_studies = Counter(first_header[u]["accession"] for u in studies if first_header[u]["accession"])
    exams: list[ExamScan] = []
    for study_uid, ss in studies.items():
        h = first_header[study_uid]
        acc = h["accession"]
        case_id = acc if acc and accession_studies[acc] == 1 else study_uid
        ss.sort(key=lambda s: (s.series_number is None, s.series_number or 0, len(s.files)))
        exams.append(ExamScan(case_id=case_id, patient_id=h["patient_id"], study_uid=study_uid, series=ss))
    exams.sort(key=lambda e: (e.patient_id, e.case_id))
    return exams


_NNUNET_DIR_NAMES = {"nnunet_raw", "nnunet_preprocessed", "nnunet_results"}
_DATASET_DIR = re.compile(r"^Dataset\d{3}_\w+$")


def check_manifest_location(path: Path) -> None:
    """Refuse a manifest path inside an nnU-Net raw, preprocessed or results folder.

    The manifest holds the site's identifiers (PatientID, accession numbers); datasets are shared.
    Checked: the folders named by ``$nnUNet_raw``, ``$nnUNet_preprocessed``, ``$nnUNet_results``, any
    folder named like them, and any ``DatasetNNN_Name`` folder.

    Raises:
        ScanError: naming the folder and what to do.
    """
    target = Path(path).expanduser().absolute().resolve()
    roots = [Path(os.environ[v]).expanduser().resolve() for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
             if os.environ.get(v)]
    for root in roots:
        if target == root or root in target.parents:
            raise ScanError(
                f"the manifest {target} would lie inside the nnU-Net folder {root}: it holds the site's patient "
                "identifiers and must stay at the site, outside every dataset folder; write it elsewhere "
                "(e.g. -o siteA/manifest.csv beside the export)")
    for parent in target.parents:
        if parent.name.lower() in _NNUNET_DIR_NAMES or _DATASET_DIR.match(parent.name):
            raise ScanError(
                f"the manifest {target} would lie inside {parent}, an nnU-Net dataset folder: it holds the site's "
                "patient identifiers and must stay at the site; write it elsewhere (e.g. -o siteA/manifest.csv)")


def _num(v: float | None, digits: int = 4) -> str:
    return "" if v is None else f"{v:.{digits}g}"


def write_manifest(
    result: ScanResult,
    path: Path,
    *,
    site: str,
    site_dir: Path | None = None,
) -> Path:
    """Write the draft manifest (atomic) and record each exam's manifest lines in ``result``.

    One row per series with images: kept series as ordinary rows, flagged ones commented out (``#``
    before the ``case_id``: convert skips them) with the reason in ``note``; several kept series of
    one plane in an exam get the same ``choose: ...`` note (convert refuses the manifest while two
    of them are left uncommented). Columns: :data:`MANIFEST_COLUMNS` then :data:`HINT_COLUMNS`.

    Args:
        result: what :func:`scan_export` returned.
        path: the CSV to write; refused inside an nnU-Net folder (:func:`check_manifest_location`).
        site: the ``site`` column (short site name, written to outputs by convert).
        site_dir: the folder the ``image`` paths start from (default: the manifest's folder when the
            export lies inside it, else the export folder: then convert needs ``--site-dir``).

    Returns:
        The folder the ``image`` paths are relative to (give it to convert as ``--site-dir`` when it
        is not the manifest's folder).

    Raises:
        ScanError: a place inside an nnU-Net folder, an export outside ``site_dir``, an empty site.
    """
    from orthodiff_nnunet.utils import atomic_write_text

    path = Path(path)
    check_manifest_location(path)
    if not site.strip() or "," in site:
        raise ScanError(f"site {site!r} is not a short site name (letters, digits); pass --site, e.g. --site SiteA")
    site_dir = _manifest_site_dir(result.root, path, site_dir)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS + HINT_COLUMNS)
    line = 1
    for exam in result.exams:
        vendor, field_t, exam_notes = _exam_values(exam)
        choices = exam.choices
        order = sorted(exam.series, key=lambda s: (not s.kept, ("sag", "cor", "ax", None).index(s.plane)
                                                   if s.plane in ("sag", "cor", "ax") else 3, s.series_number or 0))
        first = line + 1
        for s in order:
            folder = s.folders[0]
            rel = os.path.relpath(folder.absolute().resolve(), site_dir).replace(os.sep, "/")
            notes = _series_notes(s, choices, exam_notes)
            case = exam.case_id if s.kept else f"#{exam.case_id}"
            spacing = "x".join(f"{v:.4g}" for v in s.spacing_mm) if s.spacing_mm else ""
            writer.writerow([
                case, exam.patient_id, site, _num(field_t if s.kept else s.field_strength_t), vendor if s.kept
                else s.manufacturer, rel, "", _series_column(s, folder, result.series), "", " | ".join(notes),
                s.plane or "", "" if s.obliquity_deg is None else f"{s.obliquity_deg:.1f}",
                "" if s.series_number is None else s.series_number, s.description, s.slices, s.num_echoes,
                ";".join(f"{t:g}" for t in s.echo_times_ms), _num(s.tr_ms), _num(s.ti_ms),
                {True: "yes", False: "no", None: ""}[s.fat_sat], spacing,
                f"{s.matrix[0]}x{s.matrix[1]}" if s.matrix else "mixed", s.acquisition, len(s.files),
            ])
            line += 1
        exam.manifest_lines = (first, line) if line >= first else None
    atomic_write_text(path, buf.getvalue())
    log.info("draft manifest written: %d rows", line - 1)
    return site_dir


def _manifest_site_dir(export: Path, path: Path, site_dir: Path | None) -> Path:
    """The folder the ``image`` paths start from (see :func:`write_manifest`); it must hold the export."""
    root = export.absolute().resolve()
    if site_dir is None:
        manifest_dir = path.absolute().parent.resolve()
        site_dir = manifest_dir if (root == manifest_dir or manifest_dir in root.parents) else root
    site_dir = Path(site_dir).absolute().resolve()
    if not (root == site_dir or site_dir in root.parents):
        raise ScanError(f"the export {root} is not inside the site folder {site_dir}; give a site folder that holds it")
    return site_dir


def _exam_values(exam: ExamScan) -> tuple[str, float | None, list[str]]:
    """The exam's vendor and field strength (most common over its kept series) and the notes its rows carry."""
    kept = [s for s in exam.kept]
    vendors = Counter(s.manufacturer for s in kept if s.manufacturer)
    fields = Counter(s.field_strength_t for s in kept if s.field_strength_t is not None)
    vendor = vendors.most_common(1)[0][0] if vendors else ""
    field_t = fields.most_common(1)[0][0] if fields else None
    exam_notes = []
    if not exam.patient_id:
        exam_notes.append("no PatientID in the headers: fill in patient_id")
    if field_t is None and kept:
        exam_notes.append("no MagneticFieldStrength in the headers: fill in field_strength (tesla)")
    if len(fields) > 1:
        exam_notes.append(f"series disagree on the field strength ({', '.join(f'{f:g}' for f in fields)} T)")
    return vendor, field_t, exam_notes


def _series_column(s: SeriesScan, folder: Path, all_series: list[SeriesScan]) -> str:
    """The ``series`` column: empty when ``s`` is alone in its folder, else its number (or UID when the number repeats)."""
    if not any(t is not s and folder in t.folders for t in all_series):
        return ""
    same_number = [t for t in all_series if t is not s and t.series_number == s.series_number and folder in t.folders]
    return str(s.series_number) if s.series_number is not None and not same_number else s.uid


def _series_notes(s: SeriesScan, choices: dict[str, list[SeriesScan]], exam_notes: list[str]) -> list[str]:
    """The ``note`` column's parts: why a flagged series is left out, or a kept one's choice, echoes and obliquity."""
    if not s.kept:
        return ["left out: " + "; ".join(s.details)]
    notes: list[str] = []
    if s.plane in choices:
        n = len(choices[s.plane])
        notes.append(f"choose: {n} {_PLANE_NAMES[s.plane]} series in this exam; keep one, put # before "
                     "the case_id of the others")
    if s.num_echoes > 1:
        notes.append(f"{s.num_echoes} echoes (TE {', '.join(f'{t:g}' for t in s.echo_times_ms)} ms): echo 1 "
                     "is converted; set echo to another number or to all")
    if s.obliquity_deg is not None and s.obliquity_deg >= 5:
        notes.append(f"{s.obliquity_deg:.0f} degrees oblique")
    return notes + exam_notes
