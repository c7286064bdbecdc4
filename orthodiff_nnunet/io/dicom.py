"""DICOM series: listing, reading (multi-echo aware) and writing synthetic MR series.

Reading goes through SimpleITK/GDCM, which handles little- and big-endian and the usual
compressed transfer syntaxes (JPEG lossless, JPEG-LS, JPEG 2000, RLE).

Privacy rules of this module:

* no DICOM value that identifies anyone (names, ids, dates, institution, descriptions, UIDs)
  is logged or put into an error message: messages and logs show only series numbers, file
  and echo counts, image sizes and geometry;
* the images returned carry no metadata dictionary: each is rebuilt from its voxel array with
  origin, spacing and direction only;
* file and folder names are not logged either (sites sometimes name folders after patients);
  the caller names the case in its own messages. The one exception: a damaged file is named in
  the error that refuses it (its name only, never its folder; a run of digits and dots that looks
  like a UID is shortened to its last 6 characters), since the site must find it to replace it.

Multi-echo series (several EchoTime values in one SeriesInstanceUID) are split into one volume
per echo, ordered by ascending EchoTime (SimpleITK's series reader alone would stack every
file of the series into one volume). Each echo's slices are sorted along the slice normal and
checked for missing or repeated slices.

Every file of the folder is accounted for: GDCM's series listing silently leaves out files it
cannot read (zero bytes, truncated, no pixel data), which at the first or last slice position
would shorten the volume without a trace. Such files are classified with pydicom and refused by
name (:func:`_damaged_files`). The slice count is then checked against what the headers say the
series holds (:func:`_check_complete`).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from orthodiff_nnunet.errors import OrthodiffError

log = logging.getLogger(__name__)

__all__ = [
    "DicomError",
    "EchoImage",
    "SeriesInfo",
    "list_series",
    "read_series",
    "write_series",
    "TRANSFER_SYNTAXES",
    "ACCEPTED_IMAGES",
    "DamagedFile",
    "looks_like_dicom_file",
]

# DICOM tags read from each file (SimpleITK metadata keys)
_TAG_SERIES_UID = "0020|000e"
_TAG_SERIES_NUMBER = "0020|0011"
_TAG_ECHO_TIME = "0018|0081"
_TAG_POSITION = "0020|0032"
_TAG_ORIENTATION = "0020|0037"
_TAG_INSTANCE_NUMBER = "0020|0013"
_TAG_ACQUISITION_NUMBER = "0020|0012"
_TAG_IMAGES_IN_ACQUISITION = "0020|1002"
_TAG_NUMBER_OF_SLICES = "0054|0081"

#: Largest accepted relative deviation of one slice gap from the median gap.
SLICE_GAP_TOLERANCE = 0.10
#: Echo times closer than this (ms) count as the same echo.
_ECHO_TIME_DECIMALS = 3
#: Direction cosines of the slices of one volume may differ by this much.
_ORIENTATION_TOLERANCE = 1e-3

#: Transfer syntaxes ``write_series`` can produce, by short name.
TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit_le": "1.2.840.10008.1.2.1",
    "implicit_le": "1.2.840.10008.1.2",
    "explicit_be": "1.2.840.10008.1.2.2",
    "jpeg_ls_lossless": "1.2.840.10008.1.2.4.80",
    "jpeg2000_lossless": "1.2.840.10008.1.2.4.90",
    "rle_lossless": "1.2.840.10008.1.2.5",
}

#: The compressed syntaxes: pydicom's encoding plugin and the PyPI packages it needs. None of
#: them is a dependency of this package (its 'test' extra installs them).
_ENCODERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "jpeg_ls_lossless": ("pyjpegls", ("pyjpegls",)),
    "jpeg2000_lossless": ("pylibjpeg", ("pylibjpeg", "pylibjpeg-openjpeg")),
    "rle_lossless": ("pydicom", ()),  # pydicom's native encoder
}

#: pylibjpeg-openjpeg encodes 6 wavelet resolutions, which OpenJPEG allows only when both image
#: sides are at least 2**5 pixels.
_J2K_MIN_SIDE = 32

TransferSyntax = Literal[
    "explicit_le", "implicit_le", "explicit_be", "jpeg_ls_lossless", "jpeg2000_lossless", "rle_lossless"
]

_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

#: What the converter reads, for messages about anything else.
ACCEPTED_IMAGES = (
    "accepted images are a DICOM series (its folder, or one of its files) and .nii, .nii.gz, .nrrd, .nhdr, "
    ".mha, .mhd files"
)


class DicomError(OrthodiffError):
    """A DICOM folder or series cannot be read as asked; the message says what to do.

    Messages never contain identifying DICOM values; the caller prefixes the case. The first
    line is complete in itself (callers may show only the first line).
    """


# ----------------------------------------------------------------------------------------------
# headers


@dataclass(frozen=True)
class _FileHeader:
    path: Path = field(repr=False)
    series_uid: str = field(repr=False)
    series_number: int | None
    echo_time_ms: float | None
    rows: int
    cols: int
    frames: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None  # 6 direction cosines (row, column)
    spacing: tuple[float, float, float]  # what GDCM reports for the file (x, y, z)
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 floats, SimpleITK order
    instance_number: int | None = None
    acquisition_number: int | None = None
    images_in_acquisition: int | None = None
    number_of_slices: int | None = None


@dataclass(frozen=True)
class DamagedFile:
    """A file of a DICOM folder that GDCM's series listing left out although it looks like DICOM.

    ``series_uid`` is the SeriesInstanceUID when pydicom could still read it (None: the file may
    belong to any series of the folder); it is used for matching only and never shown.
    """

    path: Path
    reason: str
    series_uid: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        return f"{_file_label(self.path)} ({self.reason})"


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series of a folder, as needed to choose it.

    ``uid`` is kept for selection only: it is hidden from ``repr`` and never logged.
    """

    uid: str = field(repr=False)
    series_number: int | None
    num_files: int
    echo_times_ms: tuple[float, ...]
    rows: int | None = None  # None when the files mix sizes
    cols: int | None = None
    files: tuple[Path, ...] = field(default=(), repr=False, compare=False)
    _headers: tuple[_FileHeader, ...] = field(default=(), repr=False, compare=False)
    #: damaged files of the folder that belong to this series or to no known series
    damaged: tuple[DamagedFile, ...] = field(default=(), repr=False, compare=False)

    @property
    def num_echoes(self) -> int:
        return max(1, len(self.echo_times_ms))

    def describe(self) -> str:
        """Non-identifying description for messages, e.g. ``series number 8: 192 files, 8 echoes, 256x256``."""
        number = f"series number {self.series_number}" if self.series_number is not None else "series without number"
        size = f"{self.rows}x{self.cols}" if self.rows is not None else "mixed image sizes"
        echoes = f"{self.num_echoes} echo" + ("es" if self.num_echoes != 1 else "")
        return f"{number}: {self.num_files} files, {echoes}, {size}"


@dataclass(frozen=True)
class EchoImage:
    """One volume of a series: one echo (``echo_index`` 1-based by ascending echo time)."""

    echo_index: int
    echo_time_ms: float | None
    number_of_echoes: int
    image: sitk.Image = field(repr=False)


def _floats(text: str) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(v) for v in text.strip().split("\\") if v.strip() != "")
    except ValueError:
        return None
    return vals or None


def _int_or_none(text: str) -> int | None:
    try:
        return int(float(text)) if text else None
    except ValueError:
        return None


def _read_header(reader: sitk.ImageFileReader, path: Path) -> _FileHeader:
    reader.SetFileName(str(path))
    reader.ReadImageInformation()

    def get(tag: str) -> str:
        return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""

    number_text = get(_TAG_SERIES_NUMBER)
    try:
        series_number: int | None = int(float(number_text)) if number_text else None
    except ValueError:
        series_number = None
    te = _floats(get(_TAG_ECHO_TIME))
    pos = _floats(get(_TAG_POSITION))
    iop = _floats(get(_TAG_ORIENTATION))
    size = reader.GetSize()
    spacing = tuple(float(s) for s in reader.GetSpacing())
    if len(spacing) == 2:
        spacing = (*spacing, 1.0)
    origin = tuple(float(o) for o in reader.GetOrigin())
    if len(origin) == 2:
        origin = (*origin, 0.0)
    direction = tuple(float(d) for d in reader.GetDirection())
    if len(direction) == 4:
        direction = (direction[0], direction[1], 0.0, direction[2], direction[3], 0.0, 0.0, 0.0, 1.0)
    return _FileHeader(
        path=path,
        series_uid=get(_TAG_SERIES_UID),
        series_number=series_number,
        echo_time_ms=round(te[0], _ECHO_TIME_DECIMALS) if te else None,
        rows=int(size[1]),
        cols=int(size[0]),
        frames=int(size[2]) if len(size) > 2 else 1,
        position=pos if pos is not None and len(pos) == 3 else None,  # type: ignore[arg-type]
        orientation=iop if iop is not None and len(iop) == 6 else None,
        spacing=spacing,  # type: ignore[arg-type]
        origin=origin,  # type: ignore[arg-type]
        direction=direction,
        instance_number=_int_or_none(get(_TAG_INSTANCE_NUMBER)),
        acquisition_number=_int_or_none(get(_TAG_ACQUISITION_NUMBER)),
        images_in_acquisition=_int_or_none(get(_TAG_IMAGES_IN_ACQUISITION)),
        number_of_slices=_int_or_none(get(_TAG_NUMBER_OF_SLICES)),
    )


def _new_reader() -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.LoadPrivateTagsOff()
    return reader


#: Names DICOM files usually carry: these suffixes, none, or a number (``...113619.2.1.3``).
_DICOM_SUFFIXES = frozenset({"", ".dcm", ".dicom", ".dic", ".ima", ".dc3"})
#: DICOMDIR: a media directory, not an image.
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: A run of digits and dots as long as a UID (a file named after its SOPInstanceUID).
_UID_LIKE = re.compile(r"\d+(?:\.\d+){3,}")


def _file_label(path: Path) -> str:
    """How a message names a file: its name only, a UID-like part cut to its last 6 characters."""
    return _UID_LIKE.sub(lambda m: "..." + m.group(0)[-6:], Path(path).name)


def _dicom_like_name(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in _DICOM_SUFFIXES or suffix[1:].isdigit()


def looks_like_dicom_file(path: Path) -> bool:
    """Whether a file is to be read as DICOM: the DICM marker of a Part 10 file, or a DICOM-style name.

    DICOM-style names: ``.dcm``, ``.dicom``, ``.dic``, ``.ima``, ``.dc3``, no suffix, or a numeric one
    (files named after their UID). Anything else (``.png``, ``.jpg``, ``.npy`` ...) is not DICOM.
    """
    path = Path(path)
    if _dicom_like_name(path):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _classify_left_out(path: Path) -> DamagedFile | None:
    """Why GDCM left ``path`` out of every series: a damaged DICOM file, or None (not DICOM at all).

    pydicom reads what it can of the file (``force=True`` reads a truncated file up to where it
    ends), which tells a damaged image (zero bytes, a cut-off header, no or short pixel data)
    from a file that is no image (notes, thumbnails, DICOMDIR, structured reports).
    """
    import pydicom

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        return DamagedFile(path, f"cannot be opened: {exc.strerror or type(exc).__name__}")
    has_magic = head[128:132] == b"DICM"
    if size == 0:
        return DamagedFile(path, "empty: 0 bytes") if _dicom_like_name(path) else None
    if not has_magic and not _dicom_like_name(path):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure of a DICOM-looking file means damage
        if has_magic:
            return DamagedFile(path, f"damaged DICOM, pydicom stops with {type(exc).__name__}")
        return None
    meta = getattr(ds, "file_meta", None)
    sop_class = str(meta.get("MediaStorageSOPClassUID", "") if meta is not None else "") or str(ds.get("SOPClassUID", ""))
    series_uid = str(ds.get("SeriesInstanceUID", "")).strip() or None
    if not has_magic and not sop_class and series_uid is None:
        return None  # nothing DICOM in it
    if sop_class == _DICOMDIR_SOP_CLASS:
        return None
    if "Rows" not in ds or "Columns" not in ds:
        if not sop_class:
            return DamagedFile(path, f"truncated: its {size} bytes end inside the header", series_uid)
        if "Image Storage" in pydicom.uid.UID(sop_class).name:
            return DamagedFile(path, f"truncated: its {size} bytes end before the image attributes", series_uid)
        return None  # a DICOM object that holds no image (report, presentation state, raw data)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return DamagedFile(path, "no pixel data: truncated, or exported without the image", series_uid)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if "PixelData" in ds and not (ts and pydicom.uid.UID(ts).is_compressed):
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                        * int(ds.get("BitsAllocated", 16)) // 8 * frames)
        except (TypeError, ValueError):
            expected = 0
        got = len(ds.PixelData or b"")
        if expected and got < expected:
            return DamagedFile(path, f"truncated: its pixel data holds {got} of {expected} bytes", series_uid)
    return DamagedFile(path, "GDCM cannot read it (damaged or an unsupported encoding)", series_uid)


def _damaged_files(folder: Path, listed: set[Path]) -> list[DamagedFile]:
    """Files of ``folder`` (not recursive, hidden files skipped) that no GDCM series holds and that are damaged DICOM."""
    out: list[DamagedFile] = []
    ignored = 0
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.resolve() in listed:
            continue
        found = _classify_left_out(path)
        if found is None:
            ignored += 1
        else:
            out.append(found)
    if ignored:
        log.debug("%d file(s) of the DICOM folder are not DICOM images and were skipped", ignored)
    return out


def _damaged_message(damaged: Sequence[DamagedFile], prefix: str) -> str:
    shown = "; ".join(d.describe() for d in damaged[:10]) + (f"; and {len(damaged) - 10} more" if len(damaged) > 10 else "")
    return (
        f"{prefix}{len(damaged)} file(s) of the series folder cannot be read: {shown}; a series is converted only "
        "when every file of it is read, so replace them with intact copies from the scanner or archive (or delete "
        "files that do not belong to the series) and convert again"
    )


def _scan_folder(folder: Path) -> list[SeriesInfo]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(
            "the DICOM folder does not exist or is not a folder; check the manifest's 'image' path"
        )
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    reader = _new_reader()
    out: list[SeriesInfo] = []
    listed: set[Path] = set()
    series_files: list[tuple[str, tuple[Path, ...], list[_FileHeader]]] = []
    for uid in uids:
        files = tuple(Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        listed.update(f.resolve() for f in files)
        headers: list[_FileHeader] = []
        for f in files:
            try:
                headers.append(_read_header(reader, f))
            except RuntimeError:
                raise DicomError(
                    f"GDCM cannot read the header of {_file_label(f)}, one of the {len(files)} files of a series "
                    "(damaged or not DICOM); replace it with an intact copy or re-export the series"
                ) from None
        series_files.append((uid, files, headers))
    damaged = _damaged_files(folder, listed)
    if not series_files:
        if damaged:
            raise DicomError(_damaged_message(damaged, "no readable DICOM series in the folder: "))
        raise DicomError(
            "no DICOM series found in the folder (no readable DICOM file); point 'image' at the folder "
            f"that holds the series' .dcm files (sub-folders are not searched); {ACCEPTED_IMAGES}"
        )
    for uid, files, headers in series_files:
        uids_here = {uid} | {h.series_uid for h in headers}
        numbers = sorted({h.series_number for h in headers if h.series_number is not None})
        tes = sorted({h.echo_time_ms for h in headers if h.echo_time_ms is not None})
        sizes = {(h.rows, h.cols) for h in headers}
        rows, cols = next(iter(sizes)) if len(sizes) == 1 else (None, None)
        out.append(
            SeriesInfo(
                uid=uid,
                series_number=numbers[0] if len(numbers) == 1 else None,
                num_files=len(files),
                echo_times_ms=tuple(tes),
                rows=rows,
                cols=cols,
                files=files,
                _headers=tuple(headers),
                damaged=tuple(d for d in damaged if d.series_uid is None or d.series_uid in uids_here),
            )
        )
    out.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.num_files))
    return out


def list_series(folder: Path) -> list[SeriesInfo]:
    """The DICOM series of ``folder`` (not recursive), ordered by series number.

    Raises:
        DicomError: when the folder does not exist or holds no readable DICOM file.
    """
    series = _scan_folder(Path(folder))
    log.debug("DICOM folder holds %d series: %s", len(series), "; ".join(s.describe() for s in series))
    return series


# ----------------------------------------------------------------------------------------------
# choosing a series and an echo


def _candidates(series: Sequence[SeriesInfo]) -> str:
    return "; ".join(f"[{s.describe()}]" for s in series)


def _select_series(all_series: list[SeriesInfo], wanted: str | int | None) -> SeriesInfo:
    if wanted is not None and str(wanted).strip() != "":
        key = str(wanted).strip()
        # GDCM's series id is the SeriesInstanceUID; the files' own value is matched too
        by_uid = [s for s in all_series if s.uid == key or any(h.series_uid == key for h in s._headers)]
        if by_uid:
            return by_uid[0]
        number: int | None
        try:
            number = int(float(key))
        except ValueError:
            number = None
        by_number = [s for s in all_series if number is not None and s.series_number == number]
        if len(by_number) == 1:
            return by_number[0]
        if len(by_number) > 1:
            raise DicomError(
                f"{len(by_number)} series of the folder share series number {number}: set the manifest's "
                f"'series' column to the SeriesInstanceUID instead; candidates: {_candidates(by_number)}"
            )
        raise DicomError(
            "the series given in the manifest's 'series' column is not in the folder (neither a "
            "SeriesInstanceUID nor a series number of it); correct the 'series' column; the folder holds "
            f"{len(all_series)} series: {_candidates(all_series)}"
        )
    if len(all_series) == 1:
        return all_series[0]
    # advice first: callers may shorten long messages
    raise DicomError(
        f"the folder holds {len(all_series)} DICOM series: set the manifest's 'series' column to the "
        "SeriesInstanceUID or series number of the one to convert (one manifest row per series); "
        f"candidates: {_candidates(all_series)}"
    )


def _echo_groups(info: SeriesInfo) -> list[tuple[float | None, list[_FileHeader]]]:
    groups: dict[float | None, list[_FileHeader]] = {}
    for h in info._headers:
        groups.setdefault(h.echo_time_ms, []).append(h)
    keys = sorted(groups, key=lambda t: (t is None, t if t is not None else 0.0))
    return [(k, groups[k]) for k in keys]


# ----------------------------------------------------------------------------------------------
# one echo -> one volume


def _normal_of(iop: Sequence[float]) -> np.ndarray:
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:], dtype=float)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise DicomError("the slice orientation (ImageOrientationPatient) is degenerate; re-export the series")
    return n / norm


def _check_complete(groups: list[tuple[float | None, list[_FileHeader]]], k: int, label: str) -> None:
    """Refuse echo ``k`` (1-based) of a series when its headers say that slices are missing.

    The checks, and why these tags:

    * the echoes of one series have the same number of slices (one slice lost from one echo);
    * InstanceNumber (0020,0013): within one echo the numbers advance by a constant step (1, or
      the number of echoes when echoes are interleaved); an isolated larger gap names the absent
      instances. It cannot see a lost first or last slice, and is skipped when numbers are
      missing or repeated;
    * ImagesInAcquisition (0020,1002), per AcquisitionNumber (0020,0012): how many images the
      acquisition produced. The files of the series must number a divisor or a multiple of it:
      a folder may hold one echo of a two-echo acquisition (the real pyKNEEr DESS folder holds 80
      of its 160 images) or several echoes each counted alone; a lost slice, first and last
      included, leaves a count that is neither. Checked only when the echoes have equal counts
      (otherwise the first check speaks) and the files of the acquisition agree on the value;
    * NumberOfSlices (0054,0081) where present (NM/PET-style headers): each echo holds a multiple.

    A series whose headers carry none of these cannot be checked for a lost edge slice: no header
    field says where it ends. Damaged files still on disk are refused by name before this check.
    """
    te, headers = groups[k - 1]
    n = len(headers)
    if len(groups) > 1:
        most = max(len(h) for _, h in groups)
        if n < most:
            raise DicomError(
                f"{label}: slices are missing: this echo has {n} files where another echo of the series has "
                f"{most}; re-export the complete series"
            )
    numbers = [h.instance_number for h in headers]
    if n >= 3 and all(v is not None for v in numbers) and len(set(numbers)) == n:
        ordered = np.sort(np.asarray(numbers, dtype=np.int64))
        diffs = np.diff(ordered)
        values, counts = np.unique(diffs, return_counts=True)
        step = int(values[np.argmax(counts)])
        irregular = diffs[diffs != step]
        # a lost file leaves few larger gaps that are whole multiples of the step
        if irregular.size and step > 0 and np.all(irregular % step == 0) and irregular.size <= max(1, diffs.size // 4):
            present = {int(v) for v in ordered}
            absent = [v for v in range(int(ordered[0]), int(ordered[-1]) + 1, step) if v not in present]
            shown = ", ".join(str(v) for v in absent[:10]) + (" ..." if len(absent) > 10 else "")
            raise DicomError(
                f"{label}: slices are missing: InstanceNumber runs from {int(ordered[0])} to {int(ordered[-1])} in "
                f"steps of {step} but {len(absent)} number(s) are absent ({shown}); re-export the complete series"
            )
    if len({len(h) for _, h in groups}) == 1:
        all_headers = [h for _, hs in groups for h in hs]
        by_acquisition: dict[int | None, list[_FileHeader]] = {}
        for h in all_headers:
            by_acquisition.setdefault(h.acquisition_number, []).append(h)
        for acq, hs in by_acquisition.items():
            stated = {h.images_in_acquisition for h in hs}
            if len(stated) != 1 or None in stated:
                continue
            total = stated.pop()
            if total and total > 0 and total % len(hs) != 0 and len(hs) % total != 0:
                which = "" if acq is None or len(by_acquisition) == 1 else f" (acquisition {acq})"
                raise DicomError(
                    f"{label}: slices are missing: the headers say the acquisition{which} has {total} images "
                    f"(ImagesInAcquisition) but the folder holds {len(hs)} files of it, neither a divisor nor a "
                    "multiple of that; re-export the complete series"
                )
    stated_slices = {h.number_of_slices for h in headers}
    if len(stated_slices) == 1 and None not in stated_slices:
        per_volume = stated_slices.pop()
        if per_volume and per_volume > 0 and n % per_volume != 0:
            raise DicomError(
                f"{label}: slices are missing: the headers say {per_volume} slices per volume (NumberOfSlices) "
                f"but this echo has {n} files; re-export the complete series"
            )


def _sort_and_check(headers: list[_FileHeader], label: str) -> tuple[list[_FileHeader], float | None]:
    """Slices sorted along the slice normal, and the mean slice spacing (None for one slice)."""
    if any(h.position is None or h.orientation is None for h in headers):
        if len(headers) == 1:
            return headers, None
        raise DicomError(
            f"{label}: some slices have no ImagePositionPatient/ImageOrientationPatient, so they cannot be "
            "stacked; export the series with its patient geometry"
        )
    iop0 = np.asarray(headers[0].orientation, dtype=float)
    if any(np.max(np.abs(np.asarray(h.orientation) - iop0)) > _ORIENTATION_TOLERANCE for h in headers):
        raise DicomError(
            f"{label}: the slices have different orientations (a localizer or several stacks in one series); "
            "export the stack to convert as a series of its own, or choose another series"
        )
    normal = _normal_of(iop0)
    proj = np.array([float(np.dot(normal, h.position)) for h in headers])  # type: ignore[arg-type]
    order = np.argsort(proj, kind="stable")
    proj = proj[order]
    ordered = [headers[i] for i in order]
    if len(ordered) == 1:
        return ordered, None
    gaps = np.diff(proj)
    smallest = max(1e-3, 1e-3 * float(np.max(np.abs(proj - proj[0]))))
    repeated = int(np.sum(gaps < smallest))
    if repeated:
        raise DicomError(
            f"{label}: {repeated + 1} or more slices share a position (repeated acquisitions, temporal "
            "positions or averages that echo time does not separate); export one acquisition per series"
        )
    median = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - median)))
    if abs(gaps[worst] - median) > SLICE_GAP_TOLERANCE * median:
        raise DicomError(
            f"{label}: slices are missing or unevenly spaced: the gaps between the {len(ordered)} slices "
            f"range from {gaps.min():.3g} to {gaps.max():.3g} mm (median {median:.3g} mm, the largest "
            f"deviation after slice {worst + 1}); re-export the complete series"
        )
    return ordered, float(np.mean(gaps))


def _fresh_image(array: np.ndarray, spacing, origin, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in direction))
    return image


def _undecodable(files: Sequence[str]) -> list[str]:
    """Names of the files GDCM cannot decode alone (asked only after a series read failed)."""
    bad = []
    reader = _new_reader()
    for f in files:
        reader.SetFileName(f)
        try:
            reader.Execute()
        except RuntimeError:
            bad.append(_file_label(Path(f)))
    return bad


def _read_volume(ordered: list[_FileHeader], slice_spacing: float | None, label: str) -> sitk.Image:
    files = [str(h.path) for h in ordered]
    # ITK warns about non-uniform slices on stderr; the spacing was checked above (with a
    # clearer message), so its warning is silenced for this read only.
    warnings_were_on = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        if len(files) == 1:
            reader = _new_reader()
            reader.SetFileName(files[0])
            raw = reader.Execute()
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetImageIO("GDCMImageIO")
            reader.MetaDataDictionaryArrayUpdateOff()
            reader.LoadPrivateTagsOff()
            reader.SetFileNames(files)
            raw = reader.Execute()
    except RuntimeError:
        bad = _undecodable(files)
        which = f"of {'; '.join(bad[:10])}" if bad else f"of {len(files)} file(s)"
        raise DicomError(
            f"{label}: GDCM cannot decode the pixel data {which} (damaged files or an unsupported transfer syntax); "
            "replace the files named with intact copies, or re-export the series uncompressed"
        ) from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_were_on)
    if raw.GetNumberOfComponentsPerPixel() != 1:
        raise DicomError(f"{label}: the images are not greyscale (colour or multi-component); choose an MR greyscale series")
    array = sitk.GetArrayFromImage(raw)
    if array.ndim == 2:
        array = array[None]
    first = ordered[0]
    if len(files) == 1:
        # one file (single slice or a multi-frame object): keep the geometry GDCM computed
        spacing, origin, direction = raw.GetSpacing(), raw.GetOrigin(), raw.GetDirection()
        if raw.GetDimension() == 2:
            spacing, origin, direction = first.spacing, first.origin, first.direction
        return _fresh_image(array, spacing, origin, direction)
    # several slices: geometry from the sorted slice positions (slice axis = row x column)
    row = np.asarray(first.orientation[:3], dtype=float)  # type: ignore[index]
    col = np.asarray(first.orientation[3:], dtype=float)  # type: ignore[index]
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = _normal_of(first.orientation)  # type: ignore[arg-type]
    direction = np.stack([row, col, normal], axis=1).flatten()
    spacing = (first.spacing[0], first.spacing[1], slice_spacing)
    return _fresh_image(array, spacing, first.position, direction)


# ----------------------------------------------------------------------------------------------
# public reading


def _series_of_file(path: Path) -> str:
    reader = _new_reader()
    try:
        header = _read_header(reader, path)
    except RuntimeError:
        damaged = _classify_left_out(path)
        if damaged is not None:
            raise DicomError(
                f"the DICOM file {damaged.describe()} cannot be read; replace it with an intact copy, or point 'image' "
                "at the series folder"
            ) from None
        raise DicomError(
            f"{_file_label(path)} is not a readable DICOM file; {ACCEPTED_IMAGES}"
        ) from None
    if not header.series_uid:
        raise DicomError("the DICOM file has no SeriesInstanceUID; point 'image' at the series folder")
    return header.series_uid


def _parse_echo(echo: int | str | None) -> int | Literal["all"] | None:
    if echo is None or (isinstance(echo, str) and echo.strip() == ""):
        return None
    if isinstance(echo, str):
        e = echo.strip().lower()
        if e == "all":
            return "all"
        try:
            echo = int(e)
        except ValueError:
            raise DicomError(f"echo {echo!r} is not valid: use a 1-based echo number or 'all'") from None
    if isinstance(echo, bool) or not isinstance(echo, (int, np.integer)) or echo < 1:
        raise DicomError(f"echo {echo!r} is not valid: use a 1-based echo number or 'all'")
    return int(echo)


def read_series(
    path: Path,
    series: str | int | None = None,
    echo: int | Literal["all"] | None = None,
) -> list[EchoImage]:
    """Read one DICOM series into one volume per echo.

    Args:
        path: a folder holding the series, or one DICOM file of it (its folder and its series are used).
        series: SeriesInstanceUID or SeriesNumber; needed when the folder holds several series.
        echo: multi-echo series: ``None`` -> echo 1 (and an INFO log says how many there are),
            ``k`` -> the k-th echo by ascending EchoTime, ``"all"`` -> every echo.

    Returns:
        The echoes asked for, each a fresh ``sitk.Image`` (no metadata dictionary) in the DICOM
        slice layout (index axes along row, column and slice normal = row x column).

    Raises:
        DicomError: no DICOM, several series without ``series``, an unknown series or echo,
            a damaged file in the folder (named), fewer slices than the headers say the series
            holds (see :func:`_check_complete`), missing or repeated slices, mixed image sizes or
            orientations, undecodable pixels.
    """
    folder, wanted = _series_folder(Path(path), series)
    info = _select_series(_scan_folder(folder), wanted)
    what = info.describe()
    if info.damaged:
        raise DicomError(_damaged_message(info.damaged, f"{what}: "))
    if info.rows is None:
        sizes: dict[tuple[int, int], int] = {}
        for h in info._headers:
            sizes[(h.rows, h.cols)] = sizes.get((h.rows, h.cols), 0) + 1
        listing = ", ".join(f"{r}x{c}: {n} files" for (r, c), n in sorted(sizes.items()))
        raise DicomError(
            f"{what}: the files mix image sizes ({listing}), e.g. a localizer stored in the series; "
            "export the volume alone as its own series or choose another series"
        )
    groups = _echo_groups(info)
    return [_read_echo(groups, k, what) for k in _echo_indices(groups, echo, what)]


def _series_folder(path: Path, series: str | int | None) -> tuple[Path, str | int | None]:
    """The folder to read and the series to pick in it: a file stands for its folder and its own series.

    Raises:
        DicomError: the path does not exist, the file is not DICOM, or it belongs to another series
            than ``series`` names.
    """
    if path.is_file():
        file_uid = _series_of_file(path)
        if series is not None and str(series).strip() != "":
            # the file and the 'series' column must agree
            chosen = _select_series(_scan_folder(path.parent), series)
            if chosen.uid != file_uid:
                raise DicomError(
                    "the DICOM file given as 'image' belongs to another series than the manifest's 'series' "
                    "column names; give the series folder, or clear the 'series' column"
                )
        return path.parent, file_uid
    if not path.exists():
        raise DicomError("the DICOM path does not exist; check the manifest's 'image' path")
    return path, series


def _echo_indices(groups: list[tuple[float | None, list[_FileHeader]]], echo: int | str | None, what: str) -> list[int]:
    """The 1-based echoes to read: echo 1 by default (logged when there are more), all, or the one asked for.

    Args:
        groups: :func:`_echo_groups`' (echo time, headers) pairs, by ascending echo time.

    Raises:
        DicomError: an invalid echo, or one beyond the series' echoes.
    """
    n_echoes = len(groups)
    choice = _parse_echo(echo)
    if choice is None:
        if n_echoes > 1:
            log.info(
                "%s has %d echoes (echo times %s ms); using echo 1: the manifest's 'echo' column chooses "
                "another one or 'all'",
                what, n_echoes, ", ".join(f"{t:g}" for t, _ in groups if t is not None),
            )
        return [1]
    if choice == "all":
        return list(range(1, n_echoes + 1))
    if choice > n_echoes:
        raise DicomError(
            f"{what}: echo {choice} was asked for but the series has {n_echoes} echo(es); "
            f"set the manifest's 'echo' column to 1..{n_echoes} or 'all'"
        )
    return [choice]


def _read_echo(groups: list[tuple[float | None, list[_FileHeader]]], k: int, what: str) -> EchoImage:
    """Echo ``k`` (1-based) of the series as one checked volume (complete, sorted, evenly spaced)."""
    n_echoes = len(groups)
    te, headers = groups[k - 1]
    label = what if n_echoes == 1 else f"{what}, echo {k} of {n_echoes}"
    if any(h.frames > 1 for h in headers) and len(headers) > 1:
        raise DicomError(
            f"{label}: several multi-frame files in one echo are not supported; export one volume per file"
        )
    _check_complete(groups, k, label)
    ordered, slice_spacing = _sort_and_check(headers, label)
    image = _read_volume(ordered, slice_spacing, label)
    log.debug(
        "read %s: size %s, spacing %s mm",
        label, "x".join(str(s) for s in image.GetSize()), "x".join(f"{s:.4g}" for s in image.GetSpacing()),
    )
    return EchoImage(echo_index=k, echo_time_ms=te, number_of_echoes=n_echoes, image=image)


# ----------------------------------------------------------------------------------------------
# writing synthetic MR series (tests, synthetic sites)


def _ds_number(value: float) -> str:
    """A DICOM DS string (at most 16 characters) as close to ``value`` as fits."""
    for digits in range(15, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.6g}"


def write_series(
    folder: Path,
    array: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float],
    *,
    patient_name: str = "Anon",
    patient_id: str = "ANON",
    birth_date: str = "",
    study_date: str = "",
    institution: str = "",
    echo_times: Sequence[float] | None = None,
    series_number: int = 1,
    transfer_syntax: TransferSyntax = "explicit_le",
    series_description: str = "",
    series_uid: str | None = None,
) -> list[Path]:
    """Write a valid MR image series with pydicom, one file per slice (and per echo).

    Args:
        folder: where the files go (created); existing files are never overwritten.
        array: ``(z, y, x)`` integer voxels (int16/uint16 range), or with ``echo_times``
            ``(echoes, z, y, x)`` (a 3D array is repeated for every echo).
        spacing: ``(x, y, z)`` mm; ``z`` is the distance between slice positions.
        origin: position (LPS, mm) of the first voxel.
        direction: 9 direction cosines in SimpleITK order (columns = i, j, k axes).
            A left-handed direction (k = -(i x j)) is written as its right-handed equivalent
            (slices reversed), which is how any DICOM reader returns it.
        echo_times: one set of slices per echo time (ms), all in one series (same
            SeriesInstanceUID), ``EchoNumbers`` 1..n in the given order.
        transfer_syntax: ``explicit_le``, ``implicit_le``, ``explicit_be`` (pixel data
            byte-swapped here), or a lossless compression done by pydicom's
            ``Dataset.compress``: ``jpeg_ls_lossless`` (1.2.840.10008.1.2.4.80, needs
            ``pyjpegls``), ``jpeg2000_lossless`` (1.2.840.10008.1.2.4.90, needs ``pylibjpeg``
            and ``pylibjpeg-openjpeg``; slices of at least 32x32 pixels, since that encoder always
            uses 6 wavelet resolutions) or ``rle_lossless`` (pydicom's native encoder). The
            JPEG encoders are not dependencies of this package (the ``test`` extra installs them).
        series_uid: reuse a SeriesInstanceUID (default: a new one).

    Returns:
        The written files, echo by echo, slice by slice.

    Raises:
        ValueError: an unknown ``transfer_syntax``, non-integer values, values beyond 16 bits,
            or ``jpeg2000_lossless`` slices smaller than 32x32.
        ModuleNotFoundError: the encoder a compressed ``transfer_syntax`` needs is not installed.
        FileExistsError: a file of the series exists already.
    """
    import pydicom

    plugin = _encoder_plugin(transfer_syntax)
    arr, signed = _pixel_array(array, echo_times)
    sx, sy, sz = (float(s) for s in spacing)
    arr, o, row, col, k_axis = _right_handed(arr, origin, direction, sz)
    normal = np.cross(row, col)
    nz, ny, nx = arr.shape[1:]
    _check_frame_size(transfer_syntax, ny, nx)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ts_uid = pydicom.uid.UID(TRANSFER_SYNTAXES[transfer_syntax])
    common = _series_attributes(
        patient_name=patient_name, patient_id=patient_id, birth_date=birth_date, study_date=study_date,
        institution=institution, series_description=series_description, series_number=series_number,
        series_uid=series_uid, row=row, col=col, matrix=(ny, nx), spacing=(sx, sy, sz), signed=signed,
    )
    paths: list[Path] = []
    instance = 0
    for e in range(arr.shape[0]):
        for z in range(nz):
            instance += 1
            pos = o + z * sz * k_axis
            path = folder / f"IM_S{series_number:04d}_{instance:05d}.dcm"
            if path.exists():
                raise FileExistsError(f"{path} exists; write each series into its own names (series_number)")
            ds = _slice_dataset(common, ts_uid, instance, pos, normal, (float(echo_times[e]), e + 1) if echo_times else None)
            _set_pixel_data(ds, np.ascontiguousarray(arr[e, z]), transfer_syntax, ts_uid, plugin)
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def _encoder_plugin(transfer_syntax: str) -> str:
    """The pydicom encoding plugin a compressed transfer syntax needs ("" for an uncompressed one).

    Raises:
        ValueError: an unknown transfer syntax.
        ModuleNotFoundError: the plugin's packages are not installed (named with the pip command).
    """
    from pydicom.pixels import get_encoder

    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {', '.join(TRANSFER_SYNTAXES)}")
    plugin, packages = _ENCODERS.get(transfer_syntax, ("", ()))
    if plugin and plugin not in get_encoder(TRANSFER_SYNTAXES[transfer_syntax]).available_plugins:
        raise ModuleNotFoundError(
            f"transfer_syntax {transfer_syntax!r} needs {' and '.join(packages)}: pip install {' '.join(packages)} "
            "(or install this package with its 'test' extra)"
        )
    return plugin


def _check_frame_size(transfer_syntax: str, ny: int, nx: int) -> None:
    """Refuse slices too small for the JPEG 2000 encoder (it always encodes 6 wavelet resolutions)."""
    if transfer_syntax == "jpeg2000_lossless" and min(ny, nx) < _J2K_MIN_SIDE:
        raise ValueError(
            f"jpeg2000_lossless needs slices of at least {_J2K_MIN_SIDE}x{_J2K_MIN_SIDE} pixels (pylibjpeg-openjpeg "
            f"always encodes 6 wavelet resolutions); these are {ny}x{nx}: choose another transfer_syntax"
        )


def _set_pixel_data(ds, frame: np.ndarray, transfer_syntax: str, ts_uid: str, plugin: str) -> None:
    """Store one slice's pixels: compressed by ``plugin``, else raw in the transfer syntax's byte order."""
    if plugin:
        ds.compress(ts_uid, frame, encoding_plugin=plugin, generate_instance_uid=False)
    else:
        little = transfer_syntax != "explicit_be"
        ds.PixelData = frame.astype(frame.dtype.newbyteorder("<" if little else ">")).tobytes()
        ds["PixelData"].VR = "OW"


def _pixel_array(array: np.ndarray, echo_times: Sequence[float] | None) -> tuple[np.ndarray, int]:
    """``(echoes, z, y, x)`` 16-bit pixels and the PixelRepresentation (0 unsigned, 1 signed).

    Raises:
        ValueError: a shape that does not fit the echo times, non-integer values, values beyond 16 bits.
    """
    arr = np.asarray(array)
    n_echo = len(echo_times) if echo_times else 1
    if arr.ndim == 3:
        arr = np.broadcast_to(arr, (n_echo, *arr.shape))
    elif arr.ndim != 4 or arr.shape[0] != n_echo:
        raise ValueError("array must be (z, y, x), or (echoes, z, y, x) with one volume per echo time")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError("array must hold integer values (DICOM stores integer pixels)")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo >= 0 and hi <= 65535 and arr.dtype != np.int16:
        pixel_dtype, signed = np.uint16, 0
    elif lo >= -32768 and hi <= 32767:
        pixel_dtype, signed = np.int16, 1
    else:
        raise ValueError("array values must fit into 16 bits (int16 or uint16)")
    return arr.astype(pixel_dtype), signed


def _right_handed(arr: np.ndarray, origin: Sequence[float], direction: Sequence[float], sz: float,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixels, origin, row, column and slice axes with the slice axis along row x column.

    A left-handed direction (k = -(i x j)) becomes its right-handed equivalent: slices reversed,
    the origin moved to the last slice (how any DICOM reader returns such a volume).
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    o = np.asarray(origin, dtype=float)
    row, col, k_axis = d[:, 0], d[:, 1], d[:, 2]
    if float(np.dot(np.cross(row, col), k_axis)) < 0:
        o = o + (arr.shape[1] - 1) * sz * k_axis
        k_axis = -k_axis
        arr = arr[:, ::-1]
    return arr, o, row, col, k_axis


def _series_attributes(*, patient_name: str, patient_id: str, birth_date: str, study_date: str, institution: str,
                       series_description: str, series_number: int, series_uid: str | None,
                       row: np.ndarray, col: np.ndarray, matrix: tuple[int, int], spacing: tuple[float, float, float],
                       signed: int) -> dict[str, object]:
    """The attributes every slice of a synthetic MR series shares: a table, keyword -> value.

    New study and frame-of-reference UIDs; a new series UID unless ``series_uid`` is given.
    """
    from pydicom.uid import generate_uid

    sx, sy, sz = spacing
    study_uid, frame_uid = generate_uid(), generate_uid()
    series_uid = series_uid or generate_uid()
    return {
        "SpecificCharacterSet": "ISO_IR 100",
        "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
        "SOPClassUID": _MR_IMAGE_STORAGE,
        "StudyDate": study_date,
        "SeriesDate": study_date,
        "StudyTime": "",
        "AccessionNumber": "",
        "Modality": "MR",
        "Manufacturer": "orthodiff synthetic",
        "InstitutionName": institution,
        "ReferringPhysicianName": "",
        "SeriesDescription": series_description,
        "PatientName": patient_name,
        "PatientID": patient_id,
        "PatientBirthDate": birth_date,
        "PatientSex": "",
        "ScanningSequence": "SE",
        "SequenceVariant": "NONE",
        "ScanOptions": "",
        "MRAcquisitionType": "2D",
        "SliceThickness": _ds_number(sz),
        "SpacingBetweenSlices": _ds_number(sz),
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "StudyID": "",
        "SeriesNumber": str(series_number),
        "ImageOrientationPatient": [_ds_number(v) for v in (*row, *col)],
        "FrameOfReferenceUID": frame_uid,
        "PositionReferenceIndicator": "",
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": matrix[0],
        "Columns": matrix[1],
        "PixelSpacing": [_ds_number(sy), _ds_number(sx)],  # row spacing (y), column spacing (x)
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": signed,
    }


def _slice_dataset(common: dict[str, object], ts_uid: str, instance: int, pos: np.ndarray, normal: np.ndarray,
                   echo: tuple[float, int] | None):
    """One slice's dataset (no pixel data yet): the series' attributes, a new SOP instance, its position and echo.

    Args:
        echo: (EchoTime in ms, EchoNumbers) or ``None`` for a series without echo times.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts_uid
    ds = Dataset()
    ds.file_meta = meta
    for keyword, value in common.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = sop_uid
    if echo is not None:
        ds.EchoTime = _ds_number(echo[0])
        ds.EchoNumbers = str(echo[1])
    ds.InstanceNumber = str(instance)
    ds.ImagePositionPatient = [_ds_number(v) for v in pos]
    ds.SliceLocation = _ds_number(float(np.dot(normal, pos)))
    return ds
