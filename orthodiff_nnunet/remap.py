"""Remapping tables from a source's label values onto a target label scheme (default: the 11 knee structures).

A table is a JSON file::

    {"name": "oai_zib", "source": "...", "target_scheme": "knee11",
     "mapping": {"1": 1, "2": 5, ...}, "unmapped": "error", "notes": "..."}

* ``mapping``: source value -> target value (0 = background). Source value 0 maps to 0 unless the
  table says otherwise.
* ``unmapped``: what happens to a source value the table does not list: ``"error"`` (it is reported
  by :meth:`RemapTable.unknown_values` and :meth:`RemapTable.apply` refuses the map) or
  ``"background"`` (it becomes 0, e.g. the muscles and vessels of an atlas).

Built-in tables live in ``orthodiff_nnunet.dataset_conversion/remap/*.json``
(:func:`builtin_remap_tables`); any other JSON file of the same format can be given by path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.schemes import KNEE_STRUCTURES

Unmapped = Literal["error", "background"]
#: Target schemes whose label values are known, used to check a table's targets.
TARGET_SCHEMES: dict[str, dict[str, int]] = {"knee11": KNEE_STRUCTURES}
#: Integer label maps whose values lie in [0, _LUT_LIMIT) are remapped with a lookup table.
_LUT_LIMIT = 1 << 16


class RemapError(OrthodiffError, ValueError):
    """A remapping table cannot be found or read, or a label map holds values it does not cover."""


def _remap_dir():
    return resources.files("orthodiff_nnunet.dataset_conversion") / "remap"


def builtin_remap_tables() -> list[str]:
    """Names of the built-in tables (``oai_zib``, ``pymskt_dess``, ``spl_knee_atlas``, ...)."""
    return sorted(p.name[: -len(".json")] for p in _remap_dir().iterdir() if p.name.endswith(".json"))


def _is_int_like(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, np.integer)):
        return True
    return isinstance(x, str) and x.strip().lstrip("-").isdigit()


def _integer_array(labels: np.ndarray) -> np.ndarray:
    """The label map as an integer array; float maps must hold whole numbers."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iu":
        return arr
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise RemapError("the label map holds non-integer values; labels must be whole numbers")
        return arr.astype(np.int64)
    raise RemapError(f"the label map has dtype {arr.dtype}; an integer label map is needed")


def present_values(labels: np.ndarray) -> list[int]:
    """Sorted distinct values of an integer label map (bincount for small non-negative ranges)."""
    arr = _integer_array(labels)
    if arr.size == 0:
        return []
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi < _LUT_LIMIT:
        counts = np.bincount(arr.ravel(), minlength=hi + 1)
        return np.flatnonzero(counts).tolist()
    return [int(v) for v in np.unique(arr)]


def unknown_labels(array: np.ndarray, allowed_values: Iterable[int]) -> list[int]:
    """Values present in ``array`` that are not in ``allowed_values`` (sorted; empty when all are allowed).

    Used after remapping, e.g. ``unknown_labels(lab, KNEE_STRUCTURES.values())``.
    """
    allowed = {int(v) for v in allowed_values}
    return [v for v in present_values(array) if v not in allowed]


@dataclass(frozen=True)
class RemapTable:
    """Source label value -> target label value.

    Attributes:
        name: short name (the built-in tables' file stem).
        source: where the source label maps come from and what their values mean.
        mapping: source value -> target value (0..255). Source 0 maps to 0 unless listed.
        unmapped: ``"error"``: values not in ``mapping`` are reported and refused;
            ``"background"``: they become 0.
        target_scheme: the scheme of the target values (``"knee11"`` = :data:`KNEE_STRUCTURES`).
        notes: free text (how the table was established).
    """

    name: str
    source: str
    mapping: dict[int, int]
    unmapped: Unmapped = "error"
    target_scheme: str = "knee11"
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.unmapped not in ("error", "background"):
            raise RemapError(f"remap table {self.name}: unmapped must be 'error' or 'background', not {self.unmapped!r}")
        clean: dict[int, int] = {}
        for k, v in self.mapping.items():
            if not (_is_int_like(k) and _is_int_like(v)):
                raise RemapError(f"remap table {self.name}: mapping {k!r} -> {v!r} is not integer -> integer")
            src, dst = int(k), int(v)
            if not 0 <= dst <= 255:
                raise RemapError(f"remap table {self.name}: target value {dst} (from {src}) is outside 0..255")
            clean[src] = dst
        scheme = TARGET_SCHEMES.get(self.target_scheme)
        if scheme is not None:
            bad = sorted(set(clean.values()) - set(scheme.values()))
            if bad:
                raise RemapError(
                    f"remap table {self.name}: target values {bad} are not in scheme {self.target_scheme} "
                    f"(values {sorted(scheme.values())})"
                )
        object.__setattr__(self, "mapping", clean)

    def _full_mapping(self) -> dict[int, int]:
        return {0: 0, **self.mapping}

    def unknown_values(self, labels: np.ndarray) -> list[int]:
        """Source values present in ``labels`` that the table does not cover.

        Always empty for ``unmapped="background"`` tables (uncovered values become 0).
        """
        if self.unmapped == "background":
            return []
        known = self._full_mapping()
        return [v for v in present_values(labels) if v not in known]

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """Remap a label map (any shape, integer values); returns a uint8 array of the same shape.

        Raises:
            RemapError: with ``unmapped="error"``, when values the table does not list are present.
        """
        arr = _integer_array(labels)
        if arr.size == 0:
            return np.zeros(arr.shape, dtype=np.uint8)
        full = self._full_mapping()
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi < _LUT_LIMIT:
            lut = np.zeros(hi + 1, dtype=np.uint8)
            known = np.zeros(hi + 1, dtype=bool)
            for src, dst in full.items():
                if 0 <= src <= hi:
                    lut[src] = dst
                    known[src] = True
            if self.unmapped == "error":
                counts = np.bincount(arr.ravel(), minlength=hi + 1)
                missing = np.flatnonzero((counts > 0) & ~known).tolist()
                if missing:
                    raise self._missing_error(missing)
            return lut[arr]
        values, inverse = np.unique(arr, return_inverse=True)
        if self.unmapped == "error":
            missing = [int(v) for v in values if int(v) not in full]
            if missing:
                raise self._missing_error(missing)
        targets = np.array([full.get(int(v), 0) for v in values], dtype=np.uint8)
        return targets[inverse].reshape(arr.shape)

    def apply_image(self, image):
        """Remap a SimpleITK label image; returns a uint8 image with the same geometry."""
        import SimpleITK as sitk

        out = sitk.GetImageFromArray(self.apply(sitk.GetArrayViewFromImage(image)))
        out.CopyInformation(image)
        return out

    def _missing_error(self, missing: list[int]) -> RemapError:
        return RemapError(
            f"label values {missing} are not in the remap table {self.name} (it covers "
            f"{sorted(self._full_mapping())}); add them to the table or set unmapped to 'background'"
        )

    def to_json(self) -> dict:
        """The table in its JSON file format."""
        return {
            "name": self.name, "source": self.source, "target_scheme": self.target_scheme,
            "mapping": {str(k): v for k, v in sorted(self.mapping.items())},
            "unmapped": self.unmapped, "notes": self.notes,
        }


def _table_from_json(data: dict, origin: str) -> RemapTable:
    if not isinstance(data, dict) or not isinstance(data.get("mapping"), dict):
        raise RemapError(f"remap table {origin}: expected a JSON object with a 'mapping' object (source -> target)")
    return RemapTable(
        name=str(data.get("name") or Path(origin).stem),
        source=str(data.get("source", "")),
        mapping=dict(data["mapping"]),
        unmapped=data.get("unmapped", "error"),
        target_scheme=str(data.get("target_scheme", "knee11")),
        notes=str(data.get("notes", "")),
    )


def load_remap_table(name_or_path: str | Path | RemapTable) -> RemapTable:
    """A built-in table by name (``oai_zib``, ``pymskt_dess``, ``spl_knee_atlas``) or a JSON file by path.

    Raises:
        RemapError: when it is neither an existing JSON file nor a built-in name (the message lists
            the built-in names), or when the file is not a valid table.
    """
    if isinstance(name_or_path, RemapTable):
        return name_or_path
    text = str(name_or_path).strip()
    path = Path(text).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RemapError(f"remap table {path} cannot be read as JSON: {exc}") from None
        return _table_from_json(data, str(path))
    builtin = builtin_remap_tables()
    if text in builtin:
        res = _remap_dir() / f"{text}.json"
        return _table_from_json(json.loads(res.read_text(encoding="utf-8")), text)
    raise RemapError(
        f"remap table {text!r} is neither a built-in table ({', '.join(builtin)}) nor an existing JSON file; "
        "give one of these names or the path of a JSON table {\"name\", \"mapping\": {\"<src>\": <dst>}, "
        "\"unmapped\": \"error\"|\"background\"}"
    )
