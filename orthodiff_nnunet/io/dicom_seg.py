"""Segmentations as DICOM SEG objects that reference the source DICOM series they were predicted on.

A label map predicted by ``orthodiff predict seg`` lies on the converted image's grid: the source
DICOM series read by :func:`orthodiff_nnunet.io.dicom.read_series` (slices sorted along the slice
normal) and permuted/flipped into the canonical LPS layout by
:func:`orthodiff_nnunet.orientation.to_canonical` (no resampling). :func:`write_dicom_seg` maps such a
label map back onto the source slices exactly: for every source slice it computes where the slice's
pixels lie in the label map's index space from the slices' own ``ImagePositionPatient`` /
``ImageOrientationPatient`` / ``PixelSpacing`` and the label map's origin, spacing and direction,
requires those positions to be whole voxel indices along signed index axes (a permutation/flip) and
the map to cover the series exactly, and reads the labels there. Any other grid (resampled, cropped,
another series) is refused with the mismatch in millimetres or voxels.

The SEG (highdicom ``Segmentation``, BINARY, one segment per structure named in the label names)
references every source instance and the source frame of reference, and takes the patient and
study of the source: it carries the source study's identifiers by necessity. Therefore it is
written only where the caller asks, never inside the nnU-Net raw, preprocessed or results folders
(:func:`check_seg_destination`), and nothing identifying is logged or put into an error message.

Segment codes (:data:`KNEE_SEGMENT_CODES`) come from pydicom's code dictionary (SNOMED CT values as
published in DICOM PS3.16). Bones are pre-coordinated codes. The dictionary has no pre-coordinated
concepts for the menisci, the cruciate ligaments or the articular cartilage of one bone, so those
are post-coordinated with DICOM's own mechanisms: the type (Meniscus, Ligament, Cartilage tissue)
with a ``SegmentedPropertyTypeModifierCodeSequence`` (Medial, Lateral, Anterior, Posterior) and an
``AnatomicRegionSequence`` (Knee joint; Femur/Tibia/Patella for cartilage); the segment label keeps
the full name. A site with its own code table passes ``segment_codes``.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from orthodiff_nnunet.errors import OrthodiffError

log = logging.getLogger(__name__)

__all__ = [
    "DicomSegError",
    "SegmentCode",
    "KNEE_SEGMENT_CODES",
    "segment_code",
    "label_names_from_dataset_json",
    "source_datasets",
    "labels_on_source_slices",
    "check_seg_destination",
    "build_dicom_seg",
    "write_dicom_seg",
    "KeyTableSource",
    "read_key_table",
    "DicomSegExport",
    "export_dicom_segs",
]

#: Largest accepted distance (in label-map voxels) between a source pixel centre and the nearest
#: label-map voxel centre. NIfTI stores its geometry in float32, about 1e-5 voxel at knee sizes.
GRID_TOLERANCE_VOXELS = 1e-2

PRODUCT_NAME = "OrthoDiff-nnU-Net"


class DicomSegError(OrthodiffError):
    """A DICOM SEG cannot be written as asked; the message says why and what to do.

    Messages never contain identifying DICOM values (names, ids, dates, UIDs).
    """


# ----------------------------------------------------------------------------------------------
# segment codes


@dataclass(frozen=True)
class SegmentCode:
    """How one structure is coded in a DICOM SEG segment description.

    Attributes:
        category: SegmentedPropertyCategoryCodeSequence (CID 7150: Tissue, Anatomical Structure).
        property_type: SegmentedPropertyTypeCodeSequence.
        type_modifiers: SegmentedPropertyTypeModifierCodeSequence (e.g. Medial), post-coordination.
        anatomic_region: AnatomicRegionSequence (where the structure is, e.g. Knee joint).
        label: SegmentLabel, the human-readable name.
    """

    category: object  # pydicom.sr.coding.Code
    property_type: object
    label: str
    type_modifiers: tuple = ()
    anatomic_region: object | None = None


def _knee_codes() -> dict[str, SegmentCode]:
    from pydicom.sr.codedict import codes

    sct = codes.SCT
    anat, tissue = sct.AnatomicalStructure, sct.Tissue
    knee = sct.KneeJoint
    return {
        "femur": SegmentCode(anat, sct.Femur, "femur"),
        "tibia": SegmentCode(anat, sct.Tibia, "tibia"),
        "fibula": SegmentCode(anat, sct.Fibula, "fibula"),
        "patella": SegmentCode(anat, sct.Patella, "patella"),
        "femoral_cartilage": SegmentCode(tissue, sct.CartilageTissue, "femoral cartilage", anatomic_region=sct.Femur),
        "tibial_cartilage": SegmentCode(tissue, sct.CartilageTissue, "tibial cartilage", anatomic_region=sct.Tibia),
        "patellar_cartilage": SegmentCode(tissue, sct.CartilageTissue, "patellar cartilage",
                                          anatomic_region=sct.Patella),
        "medial_meniscus": SegmentCode(anat, sct.Meniscus, "medial meniscus", (sct.Medial,), knee),
        "lateral_meniscus": SegmentCode(anat, sct.Meniscus, "lateral meniscus", (sct.Lateral,), knee),
        "acl": SegmentCode(anat, sct.Ligament, "anterior cruciate ligament", (sct.Anterior,), knee),
        "pcl": SegmentCode(anat, sct.Ligament, "posterior cruciate ligament", (sct.Posterior,), knee),
        "mcl": SegmentCode(anat, sct.Ligament, "medial collateral ligament", (sct.Medial,), knee),
        "lcl": SegmentCode(anat, sct.Ligament, "lateral collateral ligament", (sct.Lateral,), knee),
        "patellar_ligament": SegmentCode(anat, sct.StructureOfPatellarLigament, "patellar ligament"),
    }


#: Codes of the knee structures by normalised name (see :func:`segment_code` for the aliases).
KNEE_SEGMENT_CODES: dict[str, SegmentCode] = _knee_codes()

_ALIASES = {
    "anterior_cruciate_ligament": "acl",
    "posterior_cruciate_ligament": "pcl",
    "medial_collateral_ligament": "mcl",
    "lateral_collateral_ligament": "lcl",
    "patellar_tendon": "patellar_ligament",
    "femur_cartilage": "femoral_cartilage",
    "tibia_cartilage": "tibial_cartilage",
    "patella_cartilage": "patellar_cartilage",
    "meniscus_medial": "medial_meniscus",
    "meniscus_lateral": "lateral_meniscus",
}


def _normalise(name: str) -> str:
    key = re.sub(r"[\s\-]+", "_", str(name).strip().lower())
    return _ALIASES.get(key, key)


def segment_code(name: str, segment_codes: Mapping[str, SegmentCode] | None = None) -> SegmentCode:
    """The code of a structure named as in ``dataset.json`` (case, spaces and hyphens ignored).

    ``segment_codes`` (same normalised keys) wins over :data:`KNEE_SEGMENT_CODES`. A name without a
    code is coded as a generic anatomical structure (SCT 91723000) under its own label, with a warning.
    """
    key = _normalise(name)
    table = {**KNEE_SEGMENT_CODES, **{_normalise(k): v for k, v in (segment_codes or {}).items()}}
    if key in table:
        return table[key]
    from pydicom.sr.codedict import codes

    log.warning("no standard code for the structure %r: coded as a generic anatomical structure; "
                "pass segment_codes to give it one", name)
    return SegmentCode(codes.SCT.AnatomicalStructure, codes.SCT.AnatomicalStructure, str(name))


def label_names_from_dataset_json(dataset_json: Mapping) -> dict[int, str]:
    """``{value: name}`` of the foreground labels of an nnU-Net ``dataset.json`` (``labels``: name -> value).

    nnU-Net's ``ignore`` label (unannotated voxels in training; never predicted) is left out.

    Raises:
        DicomSegError: region-based labels (a list of values per name), which a label map cannot hold.
    """
    out: dict[int, str] = {}
    for name, value in dict(dataset_json.get("labels", {})).items():
        if isinstance(value, (list, tuple)):
            raise DicomSegError(f"label {name!r} is region-based ({value}); DICOM SEG export needs one value per label")
        if int(value) != 0 and str(name) != "ignore":
            out[int(value)] = str(name)
    return out


# ----------------------------------------------------------------------------------------------
# the source series


def source_datasets(source_series_dir: Path, series: str | int | None = None, echo: int | None = None) -> list:
    """The source series' instances (pydicom datasets without pixel data), sorted along the slice normal.

    The series and echo are chosen as :func:`orthodiff_nnunet.io.dicom.read_series` chooses them, so
    the slices are those the converter read: ``series`` (SeriesInstanceUID or SeriesNumber) when the
    folder holds several, ``echo`` 1-based by ascending EchoTime (default 1).

    Raises:
        DicomSegError: no such series or echo, a damaged file, a multi-frame source.
    """
    import pydicom

    from orthodiff_nnunet.io.dicom import (
        DicomError,
        _echo_groups,
        _normal_of,
        _scan_folder,
        _select_series,
        _series_of_file,
    )

    folder = Path(source_series_dir)
    try:
        if folder.is_file():  # one file of the series: its series, as read_series takes it
            series = series if series is not None and str(series).strip() else _series_of_file(folder)
            folder = folder.parent
        if not folder.is_dir():
            raise DicomSegError("the source DICOM folder does not exist; check the key table's series path and "
                                "--site-root")
        info = _select_series(_scan_folder(folder), series)
    except DicomError as exc:
        raise DicomSegError(f"source series: {exc}") from None
    groups = _echo_groups(info)
    k = 1 if echo is None else int(echo)
    if not 1 <= k <= len(groups):
        raise DicomSegError(f"{info.describe()}: echo {k} was asked for but the series has {len(groups)} echo(es)")
    headers = groups[k - 1][1]
    if any(h.frames > 1 for h in headers):
        raise DicomSegError(f"{info.describe()}: multi-frame source images are not supported for DICOM SEG export")
    normal = _normal_of(headers[0].orientation)
    headers = sorted(headers, key=lambda h: float(np.dot(normal, h.position)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [pydicom.dcmread(h.path, stop_before_pixels=True) for h in headers]


def _slice_geometry(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """(position, row direction, column direction, column spacing dx, row spacing dy) of one instance, mm."""
    pos = np.asarray([float(v) for v in ds.ImagePositionPatient])
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    dy, dx = (float(v) for v in ds.PixelSpacing)  # row spacing (between rows), column spacing
    return pos, row, col, dx, dy


def labels_on_source_slices(labels: sitk.Image, datasets: Sequence) -> np.ndarray:
    """The label map read at every pixel of every source slice: ``(slices, rows, columns)``.

    Exact, no interpolation: each source pixel centre must coincide with a label-map voxel centre
    (within :data:`GRID_TOLERANCE_VOXELS`), stepping along signed label-map index axes (the
    converter's permutation/flip), and the source slices must cover the label map voxel for voxel.

    Raises:
        DicomSegError: the grids differ (resampled, cropped, another series); the message gives the
            largest offset and says what to check.
    """
    if labels.GetDimension() != 3:
        raise DicomSegError(f"the label map is {labels.GetDimension()}D; a 3D label map is needed")
    lab = sitk.GetArrayViewFromImage(labels)  # (k, j, i)
    size = np.asarray(labels.GetSize())  # (i, j, k)
    d = np.asarray(labels.GetDirection(), dtype=float).reshape(3, 3)
    to_index = np.linalg.inv(d @ np.diag(labels.GetSpacing()))
    origin = np.asarray(labels.GetOrigin(), dtype=float)
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    n_source = len(datasets) * rows * cols
    if n_source != int(np.prod(size)):
        raise DicomSegError(
            f"the label map ({'x'.join(map(str, size))} voxels) and the source series ({len(datasets)} slices of "
            f"{rows}x{cols}) differ in size; the label map must lie on the converted image of this series "
            "(check the key table's series and echo)"
        )
    out = np.empty((len(datasets), rows, cols), dtype=lab.dtype)
    seen = np.zeros(lab.shape, dtype=bool)
    rr, cc = np.mgrid[0:rows, 0:cols]
    worst = 0.0
    for s, ds in enumerate(datasets):
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise DicomSegError("the source slices mix image sizes; choose the series the converter read")
        pos, row, col, dx, dy = _slice_geometry(ds)
        base = to_index @ (pos - origin)
        step_c = to_index @ (row * dx)  # one column to the right
        step_r = to_index @ (col * dy)  # one row down
        exact = [np.round(v) for v in (base, step_c, step_r)]
        worst = max(worst, *(float(np.max(np.abs(v - e))) for v, e in zip((base, step_c, step_r), exact)))
        if worst > GRID_TOLERANCE_VOXELS or not all(np.sum(np.abs(e)) == 1 for e in exact[1:]):
            raise DicomSegError(
                f"source slice {s + 1} of {len(datasets)} does not lie on the label map's voxel grid (offset up to "
                f"{worst:.3g} voxel, tolerance {GRID_TOLERANCE_VOXELS}); the label map must lie on the converted "
                "image of this very series (not resampled or cropped): check the key table's series and echo"
            )
        b, sc, sr = (e.astype(np.int64) for e in exact)
        idx = b[:, None, None] + sc[:, None, None] * cc[None] + sr[:, None, None] * rr[None]  # (3, rows, cols): i, j, k
        if np.any(idx < 0) or np.any(idx >= size[:, None, None]):
            raise DicomSegError(
                f"source slice {s + 1} of {len(datasets)} reaches beyond the label map; the label map must lie on "
                "the converted image of this very series: check the key table's series and echo"
            )
        out[s] = lab[idx[2], idx[1], idx[0]]
        seen[idx[2], idx[1], idx[0]] = True
    if not seen.all():
        raise DicomSegError("the source slices cover only part of the label map (repeated slice positions?); "
                            "check the key table's series and echo")
    log.debug("label map mapped onto %d source slices (largest offset %.2g voxel)", len(datasets), worst)
    return out


# ----------------------------------------------------------------------------------------------
# writing


def _nnunet_folders() -> list[Path]:
    from orthodiff_nnunet.paths import PathsNotSetError, preprocessed_dir, raw_dir, results_dir

    out = []
    for get in (raw_dir, preprocessed_dir, results_dir):
        try:
            out.append(get())
        except PathsNotSetError:
            pass
    return out


def check_seg_destination(path: Path, forbidden_roots: Sequence[Path] | None = None) -> None:
    """Refuse a SEG destination inside the nnU-Net raw, preprocessed or results folders.

    A SEG carries the source study's identifiers (patient, study): it must stay at the site, in a
    place the user chose, never beside the pseudonymised datasets that may be shared.

    Args:
        path: the file (or folder) to write.
        forbidden_roots: folders to refuse (default: ``nnUNet_raw``, ``nnUNet_preprocessed``,
            ``nnUNet_results`` where set).

    Raises:
        DicomSegError: ``path`` lies inside one of them.
    """
    target = Path(path).expanduser().resolve()
    given = forbidden_roots if forbidden_roots is not None else _nnunet_folders()
    roots = [Path(r).expanduser().resolve() for r in given]
    for root in roots:
        if target == root or root in target.parents:
            raise DicomSegError(
                f"{target} lies inside the nnU-Net folder {root}: a DICOM SEG carries the source study's identifiers "
                "and must stay outside the datasets; write it to a private folder (e.g. --dicom-seg ~/secure/seg)"
            )


def build_dicom_seg(
    labels: sitk.Image,
    source_series_dir: Path,
    label_names: Mapping[int, str],
    *,
    series: str | int | None = None,
    echo: int | None = None,
    segment_codes: Mapping[str, SegmentCode] | None = None,
    series_number: int = 901,
    series_description: str = "OrthoDiff segmentation",
    algorithm_version: str | None = None,
    algorithm_parameters: Mapping[str, str] | None = None,
):
    """One DICOM Segmentation (BINARY, ``highdicom.seg.Segmentation``) of ``labels`` on the source series' slices.

    Nothing is written: :func:`write_dicom_seg` writes it to a file; a DICOMweb client can STOW it as it is.
    It carries the source patient and study (identifying): keep it at the site.

    Args:
        labels: integer label map on the source series' grid, as read by ``read_series`` or as converted
            (canonical LPS layout; any permutation/flip of the source grid). Not resampled, never.
        source_series_dir: the folder of the source DICOM series (or one file of it: its series).
        label_names: ``{label value: structure name}``; background (0) is ignored. One segment per name,
            numbered 1.. in ascending label value, also when the structure is absent from ``labels``.
        series: SeriesInstanceUID or SeriesNumber, when the folder holds several series.
        echo: the converted echo of a multi-echo series (1-based by ascending EchoTime; default 1).
        segment_codes: codes that override :data:`KNEE_SEGMENT_CODES` (keys: structure names).
        series_number: SeriesNumber of the SEG.
        series_description: SeriesDescription of the SEG.
        algorithm_version: algorithm version (default: this package's version).
        algorithm_parameters: non-identifying parameters recorded with the algorithm (e.g. the model name).

    Returns:
        The SEG dataset (new SeriesInstanceUID and SOPInstanceUID, the source's StudyInstanceUID).

    Raises:
        DicomSegError: the label map holds values without a name or does not lie on the source slices,
            the source series cannot be read.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from orthodiff_nnunet import __version__

    names = {int(v): n for v, n in label_names.items() if int(v) != 0}
    if not names:
        raise DicomSegError("no foreground label names given; pass the labels of the model's dataset.json")
    datasets = source_datasets(source_series_dir, series, echo)
    values, pixel = _segment_pixels(labels_on_source_slices(labels, datasets), names)
    version = algorithm_version or __version__
    algorithm = hd.AlgorithmIdentificationSequence(
        name=PRODUCT_NAME, family=codes.cid7162.ArtificialIntelligence, version=version,
        parameters=dict(algorithm_parameters) if algorithm_parameters else None,
    )
    descriptions = [_segment_description(number, value, names[value], segment_codes, algorithm)
                    for number, value in enumerate(values, start=1)]
    seg = _segmentation(datasets, pixel, descriptions, int(series_number), version, series_description[:64])
    seg.SeriesDescription = series_description[:64]
    return seg


def _segment_pixels(mapped: np.ndarray, names: Mapping[int, str]) -> tuple[list[int], np.ndarray]:
    """The named label values, ascending, and the label map as segment numbers (value -> 1.. in that order).

    Raises:
        DicomSegError: the label map holds a value without a name.
    """
    present = set(np.unique(mapped).tolist()) - {0}
    unnamed = sorted(present - set(names))
    if unnamed:
        raise DicomSegError(f"the label map holds values {unnamed} that the label names do not name "
                            f"(named: {sorted(names)}); pass the labels of the model that predicted it")
    values = sorted(names)
    segment_of = np.zeros(max(values) + 1, dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        segment_of[value] = number
    return values, segment_of[mapped.astype(np.int64)]


def _segment_description(number: int, value: int, name: str, segment_codes: Mapping[str, SegmentCode] | None,
                         algorithm):
    """The SEG's description of segment ``number`` (label ``value``, structure ``name``), coded as :func:`segment_code` says."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    code = segment_code(name, segment_codes)
    desc = hd.seg.SegmentDescription(
        segment_number=number, segment_label=code.label[:64],
        segmented_property_category=code.category, segmented_property_type=code.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        anatomic_regions=[code.anatomic_region] if code.anatomic_region is not None else None,
        tracking_uid=generate_uid(), tracking_id=f"{name} (label {value})"[:64],
    )
    if code.type_modifiers:
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(m) for m in code.type_modifiers
        ]
    return desc


def _segmentation(datasets: Sequence, pixel: np.ndarray, descriptions: list, series_number: int, version: str,
                  content_description: str):
    """``highdicom.seg.Segmentation`` (BINARY, empty frames omitted) with highdicom's INFO log silenced.

    highdicom logs the source SOPInstanceUIDs at INFO: they never reach this package's logs.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    hd_log = logging.getLogger("highdicom")
    level = hd_log.level
    hd_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return hd.seg.Segmentation(
                source_images=datasets,
                pixel_array=pixel,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=generate_uid(),
                series_number=series_number,
                sop_instance_uid=generate_uid(),
                instance_number=1,
                manufacturer=PRODUCT_NAME,
                manufacturer_model_name=PRODUCT_NAME,
                software_versions=version,
                device_serial_number="0",
                content_label="SEGMENTATION",
                content_description=content_description,
                omit_empty_frames=True,
            )
    finally:
        hd_log.setLevel(level)


def write_dicom_seg(
    labels: sitk.Image,
    source_series_dir: Path,
    out_path: Path,
    label_names: Mapping[int, str],
    *,
    forbidden_roots: Sequence[Path] | None = None,
    **options: Any,
) -> Path:
    """Write one DICOM Segmentation of ``labels`` on the source series' slices to ``out_path`` (atomically).

    Args:
        out_path: the ``.dcm`` file to write (parent folders are created); refused inside the nnU-Net folders.
        forbidden_roots: folders the SEG must not be inside (default: the nnU-Net folders where set).
        options: :func:`build_dicom_seg`'s keyword arguments (``series``, ``echo``, ``segment_codes``,
            ``series_number``, ``series_description``, ``algorithm_version``, ``algorithm_parameters``),
            with its defaults.
        others: as :func:`build_dicom_seg`.

    Returns:
        ``out_path``.

    Raises:
        DicomSegError: the destination is inside an nnU-Net folder, or :func:`build_dicom_seg` refuses.
    """
    from orthodiff_nnunet.utils import atomic_write_bytes

    out_path = Path(out_path)
    check_seg_destination(out_path, forbidden_roots)
    seg = build_dicom_seg(labels, source_series_dir, label_names, **options)
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    atomic_write_bytes(out_path, buf.getvalue())
    log.info("wrote a DICOM SEG: %d segment(s) on %d source slice(s), %d frame(s)", len(seg.SegmentSequence),
             len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence), int(seg.NumberOfFrames))
    return out_path


# ----------------------------------------------------------------------------------------------
# predicted cases -> their source series through the key table


@dataclass(frozen=True)
class KeyTableSource:
    """Where a converted case came from, as the key table says (never logged: the path may identify)."""

    case: str
    exam: str = field(repr=False)
    case_id: str = field(repr=False)
    orientation: str
    image: str = field(repr=False)  # relative to the site folder (or absolute)
    series: str | None = field(default=None, repr=False)
    echo: int | None = None


_CASE_RE = re.compile(r"^(?P<case>.+?) \((?P<o>sag|cor|ax)\)$")
_SERIES_SPLIT = re.compile(r";\s*(?=(?:sag|cor|ax): )")
_BRACKET_RE = re.compile(r"^(?P<path>.*?)(?: \[(?P<extra>[^\[\]]*)\])?$")


def read_key_table(key_file: Path) -> dict[tuple[str, str], KeyTableSource]:
    """The source of every case of a key table (``orthodiff convert --key-file``), by (case, orientation).

    One exam's views share a case name across the orientation datasets, hence the orientation in the key.

    Rows have ``cases`` like ``"<case> (<orientation>)"`` and ``series`` like
    ``"<orientation>: <image path> [series <s>, echo <e>]"`` (several joined with ``"; "``). With
    ``echo all`` the cases are named ``<exam>e<k>`` and come from echo ``k``.

    Raises:
        DicomSegError: the file is missing or is not a key table.
    """
    key_file = Path(key_file)
    if not key_file.is_file():
        raise DicomSegError(f"key table {key_file} does not exist: pass the file `orthodiff convert --key-file` wrote")
    with open(key_file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"pseudonym", "case_id", "cases", "series"} - set(reader.fieldnames or [])
        if missing:
            raise DicomSegError(f"{key_file} is not a key table of `orthodiff convert --key-file` "
                                f"(columns {', '.join(sorted(missing))} missing)")
        rows = list(reader)
    out: dict[tuple[str, str], KeyTableSource] = {}
    for row in rows:
        by_o: dict[str, tuple[str, str | None, str | None]] = {}
        for entry in _SERIES_SPLIT.split(row["series"] or ""):
            o, _, rest = entry.strip().partition(": ")
            m = _BRACKET_RE.match(rest)
            extra = dict(p.strip().split(" ", 1) for p in (m.group("extra") or "").split(",") if " " in p.strip())
            by_o[o] = (m.group("path"), extra.get("series"), extra.get("echo"))
        for item in (row["cases"] or "").split("; "):
            m = _CASE_RE.match(item.strip())
            if not m or m.group("o") not in by_o:
                continue
            case, o = m.group("case"), m.group("o")
            image, series, echo_text = by_o[o]
            echo: int | None = None
            if echo_text == "all":
                exam = row["pseudonym"]
                tail = re.fullmatch(r"e(\d+)", case[len(exam):]) if case.startswith(exam) else None
                echo = int(tail.group(1)) if tail else None
            elif echo_text:
                echo = int(echo_text)
            out[(case, o)] = KeyTableSource(case, row["pseudonym"], row["case_id"], o, image, series, echo)
    return out


@dataclass
class DicomSegExport:
    """What :func:`export_dicom_segs` did: SEG files by case, and skipped cases with the reason."""

    written: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"DICOM SEG: {len(self.written)} written, {len(self.skipped)} skipped"]
        lines += [f"  {case}: {path}" for case, path in sorted(self.written.items())]
        lines += [f"  skipped {case}: {why}" for case, why in sorted(self.skipped.items())]
        return "\n".join(lines)


_IMAGE_FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _read_mask(path: Path) -> sitk.Image:
    """A predicted mask, decoded completely first when NIfTI: ITK's NIfTI reader zero-fills a truncated
    ``.nii.gz`` without an error, which would become a SEG of missing structures."""
    if path.name.lower().endswith((".nii", ".nii.gz")):
        import nibabel

        try:
            np.asanyarray(nibabel.load(str(path)).dataobj)
        except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
            raise DicomSegError(f"{path.name} is damaged or incomplete ({type(exc).__name__})") from exc
    return sitk.ReadImage(str(path))


def export_dicom_segs(
    masks: Sequence[Path],
    out_dir: Path,
    key_file: Path,
    label_names: Mapping[int, str],
    *,
    orientation: str | None = None,
    site_root: Path | None = None,
    file_ending: str = ".nii.gz",
    algorithm_parameters: Mapping[str, str] | None = None,
    forbidden_roots: Sequence[Path] | None = None,
) -> DicomSegExport:
    """Write a DICOM SEG for every predicted mask whose case comes from a DICOM series.

    The SEG of case ``C`` (exam pseudonym ``E``, orientation ``o``) goes to ``out_dir/E/seg_o.dcm``
    (``seg_o_e<k>.dcm`` for echo ``k`` of an ``echo all`` conversion): folder names are pseudonyms,
    never the site's ids. Cases not in the key table, converted from a NIfTI/NRRD file, or whose
    series folder is not found are skipped with the reason; a SEG that cannot be written (grid
    mismatch) is skipped with its error, and the others are still written.

    Args:
        masks: label maps named ``<case><file_ending>`` (``orthodiff predict seg`` output).
        out_dir: where the SEGs go; refused inside the nnU-Net folders.
        key_file: the key table of the conversion (``orthodiff convert --key-file``).
        label_names: ``{value: name}`` (see :func:`label_names_from_dataset_json`).
        orientation: the model's plane (``sag``, ``cor``, ``ax``; plans.json ``orthodiff.orientation``): an
            exam's views share one case name, so it picks the view. None: cases in one plane only.
        site_root: the site folder the key table's series paths are relative to (default: the key
            table's folder).
        file_ending: the masks' file ending.
        algorithm_parameters: recorded in each SEG's algorithm identification (non-identifying).
        forbidden_roots: see :func:`check_seg_destination`.

    Raises:
        DicomSegError: ``out_dir`` inside an nnU-Net folder, an unreadable key table.
    """
    out_dir = Path(out_dir)
    check_seg_destination(out_dir, forbidden_roots)
    sources = read_key_table(key_file)
    root = Path(site_root) if site_root is not None else Path(key_file).resolve().parent
    result = DicomSegExport()
    for mask in masks:
        mask = Path(mask)
        case = mask.name[: -len(file_ending)] if mask.name.endswith(file_ending) else mask.name
        found = [v for (c, o), v in sources.items() if c == case and orientation in (None, o)]
        if not found:
            result.skipped[case] = ("not in the key table (converted without --key-file, or by another conversion)"
                                    + (f" as a {orientation} view" if orientation else ""))
            continue
        if len(found) > 1:
            result.skipped[case] = (f"the key table has {len(found)} views of it "
                                    f"({', '.join(v.orientation for v in found)}): give the model's orientation")
            continue
        src = found[0]
        image = Path(src.image)
        image = image if image.is_absolute() else root / image
        if image.name.lower().endswith(_IMAGE_FILE_SUFFIXES):
            result.skipped[case] = "converted from an image file, not a DICOM series"
            continue
        if not image.exists():
            result.skipped[case] = ("its source series is not found under the site folder"
                                    + ("" if site_root is not None else "; pass --site-root"))
            continue
        name = f"seg_{src.orientation}" + (f"_e{src.echo}" if src.echo is not None and case != src.exam else "")
        target = out_dir / src.exam / f"{name}.dcm"
        try:
            labels = _read_mask(mask)
        except (RuntimeError, DicomSegError):
            result.skipped[case] = f"the mask {mask.name} cannot be read (missing or damaged); predict it again"
            continue
        try:
            write_dicom_seg(labels, image, target, label_names, series=src.series, echo=src.echo,
                            algorithm_parameters=algorithm_parameters, forbidden_roots=forbidden_roots)
        except (DicomSegError, OrthodiffError) as exc:
            result.skipped[case] = str(exc).splitlines()[0]
            continue
        result.written[case] = target
    return result
