"""The typed ``plans["orthodiff"]`` block and small helpers around nnU-Net plans files.

One plans file per dataset (one dataset per orientation) serves three uses, each with a
configuration of the same network topology:

* :data:`SEGMENTATION_CONFIGURATION` (``3d_fullres``, nnU-Net's own),
* :data:`DIFFUSION_CONFIGURATION` (denoising-diffusion pretraining),
* :data:`CLASSIFICATION_CONFIGURATION` (multi-label abnormality classification).

Everything project-specific lives in one block, ``plans["orthodiff"]``, read and written only
through :class:`OrthodiffPlansBlock` (Rule 2 of the architecture notes). nnU-Net ignores unknown
top-level keys, so the block travels with the plans into training and prediction unchanged.

This module imports neither torch nor nnunetv2: trainers, the CLI and reports can read plans
cheaply.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from orthodiff_nnunet.conventions import CLASSIFICATION_CONFIGURATION, DIFFUSION_CONFIGURATION, SEGMENTATION_CONFIGURATION
from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.orientation import THROUGH_PLANE_NUMPY_AXIS
from orthodiff_nnunet.schemes import ORIENTATIONS, Orientation
from orthodiff_nnunet.utils import atomic_write_json, load_json

__all__ = [
    "BLOCK_KEY",
    "BLOCK_VERSION",
    "CLASSIFICATION_CONFIGURATION",
    "CONFIGURATION_ROLES",
    "DIFFUSION_CONFIGURATION",
    "SEGMENTATION_CONFIGURATION",
    "OrthodiffPlansBlock",
    "PlansError",
    "has_orthodiff_block",
    "load_plans",
    "own_data_identifiers",
    "preprocessing_hash",
    "read_orthodiff_block",
    "resolve_configuration",
    "plans_hash",
    "save_plans",
    "summarize_configuration",
    "with_orthodiff_block",
]

BLOCK_KEY = "orthodiff"
BLOCK_VERSION = 1


Role = Literal["segmentation", "diffusion", "classification"]
#: role -> default configuration name; the block records the names actually used.
CONFIGURATION_ROLES: dict[str, str] = {
    "segmentation": SEGMENTATION_CONFIGURATION,
    "diffusion": DIFFUSION_CONFIGURATION,
    "classification": CLASSIFICATION_CONFIGURATION,
}
IntensitySource = Literal["foreground", "nonzero image"]
_INTENSITY_SOURCES = ("foreground", "nonzero image")


class PlansError(OrthodiffError):
    """A plans file or its ``orthodiff`` block is missing or inconsistent."""


@dataclass(frozen=True)
class OrthodiffPlansBlock:
    """What the plans of one orientation's dataset say beyond nnU-Net's own keys.

    Attributes:
        orientation: acquisition plane of the dataset, ``sag``, ``cor`` or ``ax``.
        through_plane_numpy_axis: axis of the raw canonical LPS numpy array ``(z=S, y=P, x=L)``
            along which slices are stacked (sag 2, cor 1, ax 0).
        through_plane_patch_axis: the same axis after the plans' ``transpose_forward``, i.e. its
            index in every configuration's ``patch_size``/``spacing`` (0 for plans made by the
            orthodiff planners, which put the through-plane axis first).
        label_names: segmentation label names in label-value order (background first).
        abnormality_names: classification target names, in target order.
        source_datasets: the datasets whose fingerprints produced these plans (for transferred
            plans, the source dataset, not the dataset the file belongs to).
        planner: class name of the planner that produced the plans.
        planner_version: version of that planner's heuristics.
        configurations: role (``segmentation``, ``diffusion``, ``classification``) -> name of
            the configuration in ``plans["configurations"]``.
        gpu_memory_target_gb: GPU memory target the batch and patch sizes were fitted to (GB).
        estimated_vram_gb: configuration name -> estimated training memory (GB, 3 decimals), from
            nnU-Net's feature-map-size model (not a measurement).
        intensity_statistics: ``foreground`` (nnU-Net's default: intensities under the labels) or
            ``nonzero image`` (the fallback used when every label map is background).
        plans_transferred_from: name of the dataset these plans were copied from, or None.
        block_version: schema version of this block.
    """

    orientation: Orientation
    through_plane_numpy_axis: int
    through_plane_patch_axis: int
    label_names: tuple[str, ...]
    abnormality_names: tuple[str, ...]
    source_datasets: tuple[str, ...]
    planner: str
    planner_version: str
    configurations: Mapping[str, str] = field(default_factory=lambda: dict(CONFIGURATION_ROLES))
    gpu_memory_target_gb: float = 8.0
    estimated_vram_gb: Mapping[str, float] = field(default_factory=dict)
    intensity_statistics: IntensitySource = "foreground"
    plans_transferred_from: str | None = None
    block_version: int = BLOCK_VERSION

    def __post_init__(self) -> None:
        # normalise containers so that equality and hashing of to_dict() are stable
        object.__setattr__(self, "label_names", tuple(str(x) for x in self.label_names))
        object.__setattr__(self, "abnormality_names", tuple(str(x) for x in self.abnormality_names))
        object.__setattr__(self, "source_datasets", tuple(str(x) for x in self.source_datasets))
        object.__setattr__(self, "configurations", {str(k): str(v) for k, v in dict(self.configurations).items()})
        object.__setattr__(
            self, "estimated_vram_gb", {str(k): round(float(v), 3) for k, v in dict(self.estimated_vram_gb).items()}
        )
        self.validate()

    def validate(self) -> None:
        """Check the block on its own (see :func:`with_orthodiff_block` for checks against plans).

        Raises:
            PlansError: naming every problem found.
        """
        problems = []
        if self.orientation not in ORIENTATIONS:
            problems.append(f"orientation {self.orientation!r} is not one of {', '.join(ORIENTATIONS)}")
        elif self.through_plane_numpy_axis != THROUGH_PLANE_NUMPY_AXIS[self.orientation]:
            problems.append(
                f"through_plane_numpy_axis {self.through_plane_numpy_axis} does not match orientation "
                f"{self.orientation!r} (expected {THROUGH_PLANE_NUMPY_AXIS[self.orientation]} in the canonical "
                "LPS layout)"
            )
        if self.through_plane_patch_axis not in (0, 1, 2):
            problems.append(f"through_plane_patch_axis must be 0, 1 or 2, got {self.through_plane_patch_axis}")
        if not self.label_names:
            problems.append("label_names is empty (background at least is expected)")
        for what, names in (("label_names", self.label_names), ("abnormality_names", self.abnormality_names)):
            if any(not n for n in names):
                problems.append(f"{what} holds an empty name")
            if len(set(names)) != len(names):
                problems.append(f"{what} holds duplicates: {list(names)}")
        if not self.source_datasets:
            problems.append("source_datasets is empty")
        missing_roles = set(CONFIGURATION_ROLES) - set(self.configurations)
        unknown_roles = set(self.configurations) - set(CONFIGURATION_ROLES)
        if missing_roles:
            problems.append(f"configurations lacks role(s) {sorted(missing_roles)}")
        if unknown_roles:
            problems.append(f"configurations has unknown role(s) {sorted(unknown_roles)}")
        if not self.gpu_memory_target_gb > 0:
            problems.append(f"gpu_memory_target_gb must be > 0, got {self.gpu_memory_target_gb}")
        if self.intensity_statistics not in _INTENSITY_SOURCES:
            problems.append(f"intensity_statistics must be one of {_INTENSITY_SOURCES}, got {self.intensity_statistics!r}")
        if self.block_version > BLOCK_VERSION:
            problems.append(
                f"block_version {self.block_version} is newer than this orthodiff-nnunet understands "
                f"({BLOCK_VERSION}): upgrade orthodiff-nnunet"
            )
        if problems:
            raise PlansError("invalid plans['orthodiff'] block: " + "; ".join(problems))

    def configuration_for(self, role: Role) -> str:
        """Name of the configuration planned for ``role`` (``segmentation``, ``diffusion``, ``classification``)."""
        if role not in self.configurations:
            raise PlansError(f"unknown role {role!r}: use one of {', '.join(CONFIGURATION_ROLES)}")
        return self.configurations[role]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists instead of tuples)."""
        d = asdict(self)
        for k in ("label_names", "abnormality_names", "source_datasets"):
            d[k] = list(d[k])
        d["configurations"] = dict(self.configurations)
        d["estimated_vram_gb"] = dict(self.estimated_vram_gb)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OrthodiffPlansBlock:
        """Build from a dict as written by :meth:`to_dict`; unknown keys are refused.

        Raises:
            PlansError: on unknown or missing keys or invalid values.
        """
        if not isinstance(data, Mapping):
            raise PlansError(f"plans['orthodiff'] must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PlansError(
                f"plans['orthodiff'] has unknown key(s) {sorted(unknown)}: written by a newer orthodiff-nnunet?"
            )
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = required - set(data)
        if missing:
            raise PlansError(f"plans['orthodiff'] lacks key(s) {sorted(missing)}")
        try:
            return cls(**dict(data))
        except TypeError as exc:  # wrong value types
            raise PlansError(f"plans['orthodiff'] is malformed: {exc}") from exc



def has_orthodiff_block(plans: Mapping[str, Any]) -> bool:
    """Whether ``plans`` carries an ``orthodiff`` block (plans made by nnU-Net's own planners do not)."""
    return BLOCK_KEY in plans


def read_orthodiff_block(plans: Mapping[str, Any]) -> OrthodiffPlansBlock:
    """The validated ``orthodiff`` block of a plans dict.

    Raises:
        PlansError: when the block is missing (plans made by nnU-Net's own planners: re-plan with
            ``orthodiff plan_and_preprocess``) or invalid.
    """
    if BLOCK_KEY not in plans:
        name = plans.get("plans_name", "?")
        raise PlansError(
            f"plans {name!r} of {plans.get('dataset_name', '?')} have no 'orthodiff' block: they were not made "
            "by orthodiff's planners; run `orthodiff plan_and_preprocess -d <id>` (or --plans-from a planned "
            "dataset of the same orientation)"
        )
    return OrthodiffPlansBlock.from_dict(plans[BLOCK_KEY])


def with_orthodiff_block(plans: Mapping[str, Any], block: OrthodiffPlansBlock) -> dict[str, Any]:
    """A deep copy of ``plans`` carrying ``block``, after checking the block against the plans.

    Checks that every configuration named in the block exists and that the through-plane axis
    is consistent with ``transpose_forward``.

    Raises:
        PlansError: when the block does not fit the plans.
    """
    out = copy.deepcopy(dict(plans))
    configurations = out.get("configurations", {})
    missing = [name for name in block.configurations.values() if name not in configurations]
    if missing:
        raise PlansError(f"the orthodiff block names configuration(s) {missing} that the plans do not have")
    transpose = out.get("transpose_forward")
    if transpose is not None and list(transpose)[block.through_plane_patch_axis] != block.through_plane_numpy_axis:
        raise PlansError(
            f"transpose_forward {list(transpose)} does not put numpy axis {block.through_plane_numpy_axis} "
            f"(through-plane, {block.orientation}) at patch axis {block.through_plane_patch_axis}"
        )
    out[BLOCK_KEY] = block.to_dict()
    return out


def load_plans(path: Path) -> dict[str, Any]:
    """Read a plans JSON file.

    Raises:
        PlansError: when the file is missing, naming the command that makes it.
    """
    path = Path(path)
    if not path.is_file():
        raise PlansError(f"plans file {path} not found: run `orthodiff plan_and_preprocess` for that dataset first")
    return load_json(path)


def save_plans(path: Path, plans: Mapping[str, Any]) -> None:
    """Write plans atomically (temporary file, then rename): never a half-written plans file."""
    atomic_write_json(Path(path), plans)


def own_data_identifiers(plans: Mapping[str, Any], plans_name: str) -> dict[str, Any]:
    """A copy of ``plans`` named ``plans_name`` whose preprocessed data folders belong to that name.

    nnU-Net names a configuration's data folder ``<plans name>_<configuration>`` when it plans, so
    that two plans files of one dataset never share a folder. A plans file copied or transferred
    under another name keeps the old ``data_identifier``, and preprocessing it would overwrite the
    original plans' data with other spacing. Here every explicit ``data_identifier`` that does not
    start with ``<plans_name>_`` is renamed, as nnU-Net's ``move_plans_between_datasets`` does, to
    ``<plans_name>_<rest>``: ``rest`` is the identifier without the old plans name
    (``orthodiffResEncMPlans_3d_fullres`` -> ``sitePlans_3d_fullres``), else the configuration name
    when the identifier ends with it (a copy already renamed by hand), else the whole identifier.
    Configurations that share an identifier keep sharing the renamed one; inheriting
    configurations are untouched.

    Args:
        plans: a plans dict (not modified).
        plans_name: the plans identifier, i.e. the plans file name without ``.json``.

    Returns:
        The renamed copy (``plans_name`` set), equal to ``plans`` when nothing needed renaming.
    """
    out = copy.deepcopy(dict(plans))
    old_name = str(out.get("plans_name", ""))
    out["plans_name"] = plans_name
    prefix = f"{plans_name}_"
    renamed: dict[str, str] = {}
    for cfg_name, cfg in out.get("configurations", {}).items():
        old = cfg.get("data_identifier")
        if old is None or str(old).startswith(prefix):
            continue
        if old not in renamed:
            if old_name and old.startswith(f"{old_name}_"):
                rest = old[len(old_name) + 1:]
            elif old.endswith(f"_{cfg_name}"):
                rest = cfg_name
            else:
                rest = old
            renamed[old] = prefix + rest
        cfg["data_identifier"] = renamed[old]
    return out


def resolve_configuration(plans: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A configuration with ``inherits_from`` resolved (parents first), as nnU-Net's PlansManager does."""
    configurations = plans.get("configurations", {})
    chain: list[str] = []
    current: str | None = name
    while current is not None:
        if current in chain:
            raise PlansError(f"circular inherits_from in configurations: {' -> '.join(chain + [current])}")
        if current not in configurations:
            raise PlansError(f"configuration {current!r} not in plans (have {sorted(configurations)})")
        chain.append(current)
        current = configurations[current].get("inherits_from")
    resolved: dict[str, Any] = {}
    for c in reversed(chain):
        resolved.update(copy.deepcopy(configurations[c]))
    resolved.pop("inherits_from", None)
    return resolved


#: Keys of a (resolved) configuration that change the preprocessed arrays. Patch and batch size,
#: the architecture and batch_dice do not, so re-planning them never forces re-preprocessing.
_DATA_KEYS = (
    "data_identifier",
    "preprocessor_name",
    "spacing",
    "normalization_schemes",
    "use_mask_for_norm",
    "resampling_fn_data",
    "resampling_fn_seg",
    "resampling_fn_data_kwargs",
    "resampling_fn_seg_kwargs",
)


def preprocessing_hash(
    plans: Mapping[str, Any], configuration: str, labels: Mapping[str, Any] | None = None
) -> str:
    """SHA-256 of everything that determines a configuration's preprocessed data.

    Used as the resumability marker: cases preprocessed under the same hash are reused.

    Args:
        plans: the plans dict.
        configuration: configuration name (inheritance is resolved).
        labels: the dataset.json ``labels`` (they decide the sampled class locations).
    """
    resolved = resolve_configuration(plans, configuration)
    payload = {
        "configuration": {k: resolved.get(k) for k in _DATA_KEYS},
        "transpose_forward": plans.get("transpose_forward"),
        "image_reader_writer": plans.get("image_reader_writer"),
        "foreground_intensity_properties_per_channel": plans.get("foreground_intensity_properties_per_channel"),
        "labels": dict(labels) if labels is not None else None,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def plans_hash(plans: Mapping[str, Any]) -> str:
    """SHA-256 of the whole plans dict (canonical JSON): provenance for checkpoints."""
    return hashlib.sha256(json.dumps(plans, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def summarize_configuration(plans: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Spacing (mm), patch, batch, stages, kernels and strides of one configuration, for reports."""
    c = resolve_configuration(plans, name)
    arch = c.get("architecture", {}).get("arch_kwargs", {})
    block = plans.get(BLOCK_KEY, {})
    return {
        "configuration": name,
        "spacing": [float(x) for x in c["spacing"]],
        "patch_size": [int(x) for x in c["patch_size"]],
        "batch_size": int(c["batch_size"]),
        "n_stages": int(arch.get("n_stages", 0)),
        "kernel_sizes": [list(k) for k in arch.get("kernel_sizes", [])],
        "strides": [list(s) for s in arch.get("strides", [])],
        "network": c.get("architecture", {}).get("network_class_name", "?").rsplit(".", 1)[-1],
        "estimated_vram_gb": block.get("estimated_vram_gb", {}).get(name),
    }
