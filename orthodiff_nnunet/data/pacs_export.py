"""A synthetic PACS export: nested study folders of small MR series, for tests and the scan bench.

What a site's PACS export typically holds besides the series to convert, and what
``orthodiff scan`` must sort out, is all here: localizers (three planes in one series),
a multi-echo series, a derived reformat, a secondary capture (a screenshot), a second sagittal
sequence in one exam, an oblique series, an exam missing its axial series, a study folder
holding several series side by side, and files that are not DICOM. Optionally the whole export
is written through pydicom's :class:`~pydicom.fileset.FileSet` with a DICOMDIR, as export CDs do.

Matrices are tiny (16x16 by default) so that thousands of files are written in seconds; the
voxels are random integers (never constant, so ``orthodiff convert`` accepts them). All
identifiers are synthetic (``PAT001``, ``ACC0001``).

The default layout (:func:`default_exams`) has these known answers (used by ``tests/test_scan.py``):

===========  =====================================================================
exam         series (plane, what)
===========  =====================================================================
ACC0001      localizer, sag PD FS, sag T2 FS (second sagittal), cor T1, ax PD FS,
             derived MPR (axial), secondary capture
ACC0002      localizer, sag PD 12 deg oblique, cor T2 multi-echo (3 echoes), ax PD;
             all in one folder (the ``series`` column is needed)
ACC0003      localizer, sag PD, cor PD (no axial series)
===========  =====================================================================

ACC0002 and ACC0003 belong to the same patient (PAT002). Junk: ``README.txt``, ``report.pdf``,
``Thumbs.db`` at the top, and ``.DS_Store`` in one study folder.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["SeriesSpec", "ExamSpec", "default_exams", "bench_exams", "write_pacs_export", "JUNK_FILES"]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

#: Row and column direction cosines (LPS) of each plane, as DICOM ImageOrientationPatient writes them.
PLANE_IOP: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "sag": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "cor": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "ax": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}

#: Non-DICOM files written at the export's top (name -> content); ``.DS_Store`` goes into a study folder.
JUNK_FILES: dict[str, bytes] = {
    "README.txt": b"Exported by the PACS. Do not edit.\n",
    "report.pdf": b"%PDF-1.4\n% not really a report\n",
    "Thumbs.db": b"\x00\x01junk" * 10,
}


@dataclass(frozen=True)
class SeriesSpec:
    """One series to write.

    Attributes:
        description: SeriesDescription.
        plane: ``sag``, ``cor`` or ``ax``; ``localizer``: three planes of ``slices`` images each.
        slices: slices per echo (per plane for a localizer).
        echo_times_ms: one stack per echo time, all in one series.
        oblique_deg: rotation of the slice plane about the S-I axis (sag, cor) or the A-P axis (ax).
        image_type: ImageType values.
        sop_class: SOPClassUID (MR Image Storage, or Secondary Capture).
        scan_options: ScanOptions (``FS`` marks fat suppression).
        tr_ms, ti_ms: RepetitionTime, InversionTime (None: not written).
        slice_mm, pixel_mm: slice spacing and in-plane pixel spacing.
    """

    description: str
    plane: str
    slices: int = 12
    echo_times_ms: tuple[float, ...] = (30.0,)
    oblique_deg: float = 0.0
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND")
    sop_class: str = MR_IMAGE_STORAGE
    scan_options: str = ""
    tr_ms: float | None = 3000.0
    ti_ms: float | None = None
    slice_mm: float = 3.0
    pixel_mm: float = 0.5


@dataclass(frozen=True)
class ExamSpec:
    """One study: its patient, accession number, scanner and series.

    ``flat`` writes every series of the study into one folder (several series per folder).
    """

    patient_id: str
    accession: str
    series: tuple[SeriesSpec, ...]
    field_strength_t: float = 3.0
    manufacturer: str = "SIEMENS"
    flat: bool = False


def _localizer() -> SeriesSpec:
    return SeriesSpec("localizer", "localizer", slices=3, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                      tr_ms=8.6, echo_times_ms=(4.0,), slice_mm=10.0, pixel_mm=1.0)


def default_exams() -> list[ExamSpec]:
    """The three exams of the test export (see the module docstring for what they hold)."""
    return [
        ExamSpec("PAT001", "ACC0001", field_strength_t=2.89362, series=(
            _localizer(),
            SeriesSpec("PD_FS_SAG", "sag", scan_options="FS", echo_times_ms=(35.0,)),
            SeriesSpec("T2_FS_SAG", "sag", scan_options="FS", echo_times_ms=(70.0,), tr_ms=4000.0),
            SeriesSpec("T1_COR", "cor", echo_times_ms=(12.0,), tr_ms=600.0),
            SeriesSpec("PD_FS_AX", "ax", scan_options="FS", echo_times_ms=(35.0,)),
            SeriesSpec("PD_FS_SAG_MPR_AX", "ax", image_type=("DERIVED", "SECONDARY", "MPR")),
            SeriesSpec("screen save", "ax", slices=1, sop_class=SECONDARY_CAPTURE_STORAGE,
                       image_type=("DERIVED", "SECONDARY")),
        )),
        ExamSpec("PAT002", "ACC0002", field_strength_t=1.5, manufacturer="GE MEDICAL SYSTEMS", flat=True, series=(
            _localizer(),
            SeriesSpec("Sag PD", "sag", oblique_deg=12.0),
            SeriesSpec("Cor T2 map", "cor", echo_times_ms=(10.0, 20.0, 30.0), tr_ms=1500.0),
            SeriesSpec("Ax PD", "ax"),
        )),
        ExamSpec("PAT002", "ACC0003", field_strength_t=1.5, manufacturer="GE MEDICAL SYSTEMS", series=(
            _localizer(),
            SeriesSpec("Sag PD", "sag"),
            SeriesSpec("Cor PD", "cor"),
        )),
    ]


def bench_exams(num_exams: int, slices: int = 40) -> list[ExamSpec]:
    """``num_exams`` complete exams (localizer, sag, cor, ax, one 2-echo series): ``12 * slices - ...`` files each.

    With ``slices=40``: 9 (localizer) + 40 + 40 + 40 + 80 (two echoes) = 209 files per exam.
    """
    out = []
    for i in range(num_exams):
        out.append(ExamSpec(f"PAT{i // 2 + 1:04d}", f"ACC{i + 1:05d}", field_strength_t=3.0 if i % 2 else 1.5, series=(
            _localizer(),
            SeriesSpec("PD_FS_SAG", "sag", slices=slices, scan_options="FS"),
            SeriesSpec("T1_COR", "cor", slices=slices),
            SeriesSpec("PD_AX", "ax", slices=slices),
            SeriesSpec("DESS_SAG", "sag", slices=slices, echo_times_ms=(5.0, 40.0)) if i % 4 == 0
            else SeriesSpec("T2_COR", "cor", slices=slices, echo_times_ms=(5.0, 40.0)),
        )))
    return out


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    r = np.eye(3)
    a, b = [i for i in range(3) if i != axis]
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def _ds(value: float) -> str:
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6g}"


#: Marker values of the per-file elements, at the widths the files get (see ``_Writer.write_series``;
#: zero-padded: pydicom strips spaces from IS/DS strings but keeps leading zeros, which DICOM allows).
_MARK_COUNTER = 999_999_999
_MARK_INSTANCE = "07654321"
_MARK_POSITION = "-009876.5432"
_MARK_LOCATION = "-008765.4321"
_MARK_ECHO_TIME = "-5432.1098"
_MARK_ECHO_NUMBER = "-007"


def _find_all(data: bytes, mark: bytes) -> list[int]:
    """Every offset of ``mark`` in ``data``; refuses a marker that is not there."""
    out, at = [], data.find(mark)
    while at >= 0:
        out.append(at)
        at = data.find(mark, at + 1)
    if not out:
        raise RuntimeError(f"marker {mark!r} not found in the encoded template")
    return out


@dataclass
class _Writer:
    """Writes the files of one export (fresh UIDs, random pixels), counting what it wrote."""

    rng: np.random.Generator
    matrix: int
    files: list[Path] = field(default_factory=list)
    uid_prefix: str = ""
    counter: int = 0

    def _uid(self, i: int) -> str:
        """A UID of fixed length: this export's random root, then ``1`` and 9 digits."""
        if not self.uid_prefix:
            self.uid_prefix = f"1.2.826.0.1.3680043.8.498.{int(self.rng.integers(10**11, 10**12))}."
        return f"{self.uid_prefix}1{i:09d}"

    def _template(self, exam: ExamSpec, study_uid: str, series_uid: str, frame_uid: str, number: int,
                  spec: SeriesSpec, row: np.ndarray, col: np.ndarray):
        """The dataset of one stack; the slice loop changes only the per-file values (writing is 2x faster)."""
        from pydicom.dataset import Dataset, FileMetaDataset

        n = self.matrix
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = spec.sop_class
        meta.TransferSyntaxUID = EXPLICIT_LE
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = list(spec.image_type)
        ds.SOPClassUID = spec.sop_class
        ds.SOPInstanceUID = ""
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = exam.accession
        ds.Modality = "MR" if spec.sop_class == MR_IMAGE_STORAGE else "OT"
        ds.Manufacturer = exam.manufacturer
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = spec.description
        ds.PatientName = f"Synthetic^{exam.patient_id}"
        ds.PatientID = exam.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = exam.accession[-4:]
        ds.SeriesNumber = str(number)
        ds.InstanceNumber = "1"
        if spec.sop_class == MR_IMAGE_STORAGE:
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "SK"
            ds.ScanOptions = spec.scan_options
            ds.MRAcquisitionType = "2D"
            ds.MagneticFieldStrength = _ds(exam.field_strength_t)
            ds.SliceThickness = _ds(spec.slice_mm)
            ds.SpacingBetweenSlices = _ds(spec.slice_mm)
            if spec.tr_ms is not None:
                ds.RepetitionTime = _ds(spec.tr_ms)
            if spec.ti_ms is not None:
                ds.InversionTime = _ds(spec.ti_ms)
            ds.ImageOrientationPatient = [_ds(float(v)) for v in (*row, *col)]
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.PixelSpacing = [_ds(spec.pixel_mm), _ds(spec.pixel_mm)]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = n
        ds.Columns = n
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = b""
        ds["PixelData"].VR = "OW"
        return ds

    def write_series(self, folder: Path, exam: ExamSpec, study_uid: str, number: int, spec: SeriesSpec,
                     name_prefix: str) -> list[Path]:
        from pydicom.uid import generate_uid

        folder.mkdir(parents=True, exist_ok=True)
        series_uid, frame_uid = generate_uid(), generate_uid()
        planes = ["sag", "cor", "ax"] if spec.plane == "localizer" else [spec.plane]
        written: list[Path] = []
        instance = 0
        n = self.matrix
        for plane in planes:
            row, col = (np.asarray(v, dtype=float) for v in PLANE_IOP[plane])
            if spec.oblique_deg:
                r = _rotation(2 if plane != "ax" else 1, spec.oblique_deg)
                row, col = r @ row, r @ col
            normal = np.cross(row, col)
            origin = -0.5 * n * spec.pixel_mm * (row + col) - 0.5 * spec.slices * spec.slice_mm * normal
            ds = self._template(exam, study_uid, series_uid, frame_uid, number, spec, row, col)
            mr = spec.sop_class == MR_IMAGE_STORAGE
            # Write the stack's file once with marker values, then only patch the per-file bytes (fixed
            # widths): pydicom encodes a dataset in milliseconds, a 10,000-file export would take minutes.
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = self._uid(_MARK_COUNTER)
            ds.InstanceNumber = _MARK_INSTANCE
            if mr:
                ds.ImagePositionPatient = [_MARK_POSITION] * 3
                ds.SliceLocation = _MARK_LOCATION
                ds.EchoTime = _MARK_ECHO_TIME
                ds.EchoNumbers = _MARK_ECHO_NUMBER
            ds.PixelData = b"\0" * (2 * n * n)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            template = buf.getvalue()
            marks = {"uid": self._uid(_MARK_COUNTER).encode(), "instance": _MARK_INSTANCE.encode()}
            if mr:
                marks |= {"position": "\\".join([_MARK_POSITION] * 3).encode(), "location": _MARK_LOCATION.encode(),
                          "echo_time": _MARK_ECHO_TIME.encode(), "echo_number": _MARK_ECHO_NUMBER.encode()}
            offsets = {k: _find_all(template, m) for k, m in marks.items()}
            if [len(v) for v in offsets.values()] != [2] + [1] * (len(offsets) - 1):  # UID: file meta and dataset
                raise RuntimeError("a marker value occurs elsewhere in the template; change the seed")
            pixel_at = len(template) - 2 * n * n
            for e, te in enumerate(spec.echo_times_ms):
                for z in range(spec.slices):
                    instance += 1
                    self.counter += 1
                    pos = origin + z * spec.slice_mm * normal
                    values = {"uid": self._uid(self.counter), "instance": f"{instance:08d}"}
                    if mr:
                        values |= {"position": "\\".join(f"{v:+012.4f}" for v in pos),
                                   "location": f"{float(np.dot(normal, pos)):+012.4f}",
                                   "echo_time": f"{te:010.4f}", "echo_number": f"{e + 1:04d}"}
                    data = bytearray(template)
                    for key, value in values.items():
                        raw = value.encode()
                        assert len(raw) == len(marks[key]), (key, value)
                        for at in offsets[key]:
                            data[at:at + len(raw)] = raw
                    data[pixel_at:] = self.rng.integers(0, 1000, size=(n, n), dtype=np.uint16).astype("<u2").tobytes()
                    path = folder / f"{name_prefix}{instance:04d}.dcm"
                    if path.exists():
                        raise FileExistsError(f"{path} exists; write the export into an empty folder")
                    path.write_bytes(data)
                    written.append(path)
        self.files += written
        return written


def write_pacs_export(
    root: Path,
    exams: Sequence[ExamSpec] | None = None,
    *,
    dicomdir: bool = False,
    junk: bool = True,
    matrix: int = 16,
    seed: int = 0,
) -> list[Path]:
    """Write a PACS-like export under ``root``.

    Args:
        root: the export folder (created; must not hold the files to be written).
        exams: the studies (default :func:`default_exams`).
        dicomdir: write the export through pydicom's ``FileSet``: a ``DICOMDIR`` at ``root`` and the
            files in its ``PT*/ST*/SE*/IM*`` layout (names without suffix), as export CDs do. Without
            it: ``<patient>/<accession>/<number>_<description>/IM####.dcm`` (``flat`` exams: every
            series in the study folder, ``S<number>_IM####.dcm``).
        junk: also write the non-DICOM files of :data:`JUNK_FILES` at the top and a ``.DS_Store``
            in the first study folder.
        matrix: rows = columns of every image (pixels).
        seed: random pixels.

    Returns:
        The DICOM files written (not the DICOMDIR, not the junk).
    """
    from pydicom.uid import generate_uid

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    exams = list(default_exams() if exams is None else exams)
    writer = _Writer(np.random.default_rng(seed), matrix)
    staging = root / ".staging" if dicomdir else root
    study_dirs: list[Path] = []
    for exam in exams:
        study_uid = generate_uid()
        study_dir = staging / exam.patient_id / exam.accession
        study_dirs.append(study_dir)
        for number, spec in enumerate(exam.series, start=1):
            if exam.flat:
                writer.write_series(study_dir, exam, study_uid, number, spec, f"S{number:03d}_IM")
            else:
                name = "".join(c if c.isalnum() else "_" for c in spec.description)
                writer.write_series(study_dir / f"{number:03d}_{name}", exam, study_uid, number, spec, "IM")
    files = list(writer.files)
    if dicomdir:
        import shutil

        from pydicom import dcmread
        from pydicom.fileset import FileSet

        fs = FileSet()
        for f in files:
            fs.add(dcmread(f))
        fs.write(root)
        shutil.rmtree(staging)
        files = sorted(Path(inst.path) for inst in fs)
        study_dirs = sorted({f.parent.parent for f in files})
    if junk:
        for name, content in JUNK_FILES.items():
            (root / name).write_bytes(content)
        (study_dirs[0] / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 20)
    log.info("wrote a PACS-like export: %d exams, %d DICOM files", len(exams), len(files))
    return files
