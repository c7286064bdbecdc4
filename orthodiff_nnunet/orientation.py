"""Acquisition plane of a series from its geometry, and the canonical array layout.

Conventions (all SimpleITK / DICOM patient coordinates, LPS):

* The *through-plane axis* of a series is the image axis along which slices are stacked. It is
  the axis with clearly the largest spacing (thick 2D slices); for (near-)isotropic volumes it is
  the third image axis (``k``), which is the slice-stacking axis of DICOM series and of the
  files written from them.
* The *slice normal* is the direction cosine (a column of the direction matrix) of that axis.
  Its dominant patient-axis component gives the plane: L-R -> sagittal, A-P -> coronal,
  S-I -> axial. Oblique series are accepted up to ``max_obliquity_deg`` from the nearest
  patient axis; beyond that the plane is ambiguous and the series is refused.
* Converted images are stored in one canonical layout, LPS (``sitk.DICOMOrient(img, "LPS")``,
  a lossless permutation/flip): SimpleITK index (i, j, k) runs along (L, P, S), i.e. a numpy
  array ``(z=S, y=P, x=L)``. The through-plane axis therefore sits at a known array position
  per orientation (see :data:`THROUGH_PLANE_NUMPY_AXIS`), which the planner relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from orthodiff_nnunet.schemes import Orientation

#: Patient axis (0 = L-R, 1 = A-P, 2 = S-I) that is normal to each plane.
NORMAL_PATIENT_AXIS: dict[str, int] = {"sag": 0, "cor": 1, "ax": 2}
_PLANE_OF_PATIENT_AXIS: dict[int, Orientation] = {0: "sag", 1: "cor", 2: "ax"}
#: Through-plane axis in the canonical LPS layout, as a SimpleITK index axis and a numpy axis.
THROUGH_PLANE_SITK_AXIS: dict[str, int] = {"sag": 0, "cor": 1, "ax": 2}
THROUGH_PLANE_NUMPY_AXIS: dict[str, int] = {"sag": 2, "cor": 1, "ax": 0}
CANONICAL_ORIENTATION_CODE = "LPS"

#: A spacing this many times larger than every other marks the through-plane axis.
THICK_SLICE_RATIO = 1.25
DEFAULT_MAX_OBLIQUITY_DEG = 35.0


class OrientationError(ValueError):
    """The acquisition plane of a series cannot be decided from its geometry."""


@dataclass(frozen=True)
class PlaneInfo:
    """What the geometry says about a series' acquisition plane."""

    orientation: Orientation
    through_plane_axis: int  # SimpleITK index axis (0=i, 1=j, 2=k) of the source image
    slice_normal: tuple[float, float, float]  # unit vector in LPS patient coordinates
    obliquity_deg: float  # angle between the slice normal and the nearest patient axis
    rule: str  # how the through-plane axis was found: "thickest spacing" or "slice stacking axis"


def through_plane_axis(spacing: tuple[float, ...]) -> tuple[int, str]:
    """Index (SimpleITK order) of the through-plane axis and the rule that decided it.

    The thickest spacing wins when it exceeds every other by :data:`THICK_SLICE_RATIO`
    (2D acquisitions have slices thicker than the in-plane pixels); otherwise the slice
    stacking axis ``k`` is used (3D acquisitions are near-isotropic).
    """
    sp = np.asarray(spacing, dtype=float)
    order = np.argsort(sp)[::-1]
    if sp[order[0]] >= THICK_SLICE_RATIO * sp[order[1]]:
        return int(order[0]), "thickest spacing"
    return 2, "slice stacking axis"


def detect_plane(image: sitk.Image, max_obliquity_deg: float = DEFAULT_MAX_OBLIQUITY_DEG) -> PlaneInfo:
    """Decide sagittal / coronal / axial from the direction cosines of the slice normal.

    Args:
        image: a 3D image with its patient geometry (spacing in mm, LPS direction).
        max_obliquity_deg: largest accepted angle between the slice normal and the nearest
            patient axis. Beyond it (double-oblique series near 45 degrees) the plane is refused.

    Raises:
        OrientationError: when the image is not 3D or the plane cannot be decided; the
            message says why and how to decide it by hand.
    """
    if image.GetDimension() != 3:
        raise OrientationError(f"the image is {image.GetDimension()}D; a 3D series is needed")
    axis, rule = through_plane_axis(image.GetSpacing())
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    normal = direction[:, axis]
    normal = normal / np.linalg.norm(normal)
    patient_axis = int(np.argmax(np.abs(normal)))
    obliquity = float(np.degrees(np.arccos(np.clip(np.abs(normal[patient_axis]), 0.0, 1.0))))
    if obliquity > max_obliquity_deg:
        raise OrientationError(
            f"the slice normal ({normal[0]:+.2f}, {normal[1]:+.2f}, {normal[2]:+.2f}) (LPS) is "
            f"{obliquity:.0f} degrees from the nearest patient axis (limit {max_obliquity_deg:.0f}); "
            "the plane is ambiguous: set the 'orientation' column (sag, cor or ax) for this series"
        )
    return PlaneInfo(
        orientation=_PLANE_OF_PATIENT_AXIS[patient_axis],
        through_plane_axis=axis,
        slice_normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        obliquity_deg=obliquity,
        rule=rule,
    )


def to_canonical(image: sitk.Image) -> sitk.Image:
    """Permute/flip axes (no resampling) so the index axes run along L, P, S."""
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION_CODE)
