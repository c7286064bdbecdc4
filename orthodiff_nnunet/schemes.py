"""Default label schemes (see the project's KNEE_SCHEME notes).

Label sets are data, not code: a dataset's own ``dataset.json`` and targets file always win.
These are only the defaults used when a manifest or a command does not say otherwise.
"""

from __future__ import annotations

from typing import Literal

Orientation = Literal["sag", "cor", "ax"]
ORIENTATIONS: tuple[Orientation, ...] = ("sag", "cor", "ax")
#: Suffix of the nnU-Net dataset name and offset from the base dataset id, per orientation.
ORIENTATION_SUFFIX: dict[str, str] = {"sag": "Sag", "cor": "Cor", "ax": "Ax"}
ORIENTATION_ID_OFFSET: dict[str, int] = {"sag": 0, "cor": 1, "ax": 2}
ORIENTATION_ALIASES: dict[str, Orientation] = {
    "sag": "sag", "sagittal": "sag", "s": "sag",
    "cor": "cor", "coronal": "cor", "c": "cor",
    "ax": "ax", "axial": "ax", "tra": "ax", "transverse": "ax", "a": "ax",
}

#: 11 knee structures, nnU-Net ``dataset.json`` style (name -> label value).
KNEE_STRUCTURES: dict[str, int] = {
    "background": 0,
    "femur": 1,
    "tibia": 2,
    "patella": 3,
    "fibula": 4,
    "femoral_cartilage": 5,
    "tibial_cartilage": 6,
    "patellar_cartilage": 7,
    "medial_meniscus": 8,
    "lateral_meniscus": 9,
    "ACL": 10,
    "PCL": 11,
}

#: 8 knee abnormalities, default order of the multi-label classification targets.
KNEE_ABNORMALITIES: tuple[str, ...] = ("ACL", "PCL", "MM", "LM", "MCL", "LCL", "PD", "EFFU")
KNEE_ABNORMALITY_NAMES: dict[str, str] = {
    "ACL": "anterior cruciate ligament tear",
    "PCL": "posterior cruciate ligament tear",
    "MM": "medial meniscus tear",
    "LM": "lateral meniscus tear",
    "MCL": "medial collateral ligament injury",
    "LCL": "lateral collateral ligament injury",
    "PD": "patellar dislocation",
    "EFFU": "joint effusion",
}
MRNET_LABELS: tuple[str, ...] = ("abnormal", "ACL", "meniscus")
ANKLE_LABELS: tuple[str, ...] = ("ATFL", "CFL", "ATR", "OLT")
SHOULDER_LABELS: tuple[str, ...] = ("SSP", "ISP", "SSC", "LHBT_injury", "AC", "GHJ", "LHBT_effusion", "SASD")


def normalize_orientation(value: str) -> Orientation:
    """Map ``sagittal``/``SAG``/``s`` ... to one of ``sag``, ``cor``, ``ax``.

    Raises:
        ValueError: for anything else, listing the accepted spellings.
    """
    key = str(value).strip().lower()
    if key not in ORIENTATION_ALIASES:
        raise ValueError(
            f"unknown orientation {value!r}: use one of sag, cor, ax (or sagittal, coronal, axial)"
        )
    return ORIENTATION_ALIASES[key]
