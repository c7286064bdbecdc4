"""``orthodiff plan_and_preprocess``: fingerprint, plan per orientation, preprocess (resumable).

Stages, each reading and writing files under ``nnUNet_preprocessed/<dataset>/``:

1. ``splits_final.json`` of the raw dataset is copied (only when not already there).
2. Fingerprint with :class:`~orthodiff_nnunet.planners.OrthodiffFingerprintExtractor` (nnU-Net's,
   plus a fallback for datasets without any foreground label). Reused when the raw files are
   unchanged (names, sizes and modification times).
3. Plans with an orthodiff planner (``resenc_m``, the default, or ``plain``), or, with
   ``plans_from``, the plans of a planned dataset of the same orientation (or of a plans file)
   copied over (same topology, spacing and normalisation: encoders move between the two). Plans
   copied or transferred under another name never overwrite another plans' data: where their data
   identifier names a folder that holds other data, it is renamed to start with their plans name
   (:func:`give_own_data_folders`).
4. Preprocessing (:mod:`orthodiff_nnunet.preprocessing`) with nnU-Net's ``run_case_save``, once per data identifier
   (the segmentation, diffusion and classification configurations share one). Cases already
   preprocessed under the same preprocessing-relevant plans (see
   :func:`orthodiff_nnunet.plans.preprocessing_hash`) are skipped; a progress record beside the
   data folder (its stamp: hash, plans name, cases done) says which cases are complete, and
   :func:`check_preprocessed_data` lets every trainer refuse data its plans did not make.

One run at a time per dataset: a lock in the preprocessed dataset folder (released by the
operating system when the run ends, however it ends); the next run removes the temporary files a
killed run left there.

Dataset selection (``dataset_ids`` / ``-d``): each entry is a dataset id (``501``) or name
(``Dataset501_KneeSag``). Without ``orientations`` exactly those datasets are processed
(``-d 501 502 503``). With ``orientations`` each entry stands for its whole orientation group
(``orthodiff convert`` writes ids base+0 sag, +1 cor, +2 ax, named ``<Name>Sag/Cor/Ax``), and
only the group's datasets whose ``dataset.json["orthodiff"]["orientation"]`` is listed are kept:
``-d 501 --orientations cor ax`` processes 502 and 503.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from orthodiff_nnunet.conventions import PLAIN_PLANS, RESENC_M_PLANS
from orthodiff_nnunet.paths import preprocessed_dir, raw_dir, set_nnunet_paths
from orthodiff_nnunet.plans import (
    CLASSIFICATION_CONFIGURATION,
    CONFIGURATION_ROLES,
    DIFFUSION_CONFIGURATION,
    SEGMENTATION_CONFIGURATION,
    PlansError,
    load_plans,
    own_data_identifiers,
    preprocessing_hash,
    read_orthodiff_block,
    resolve_configuration,
    save_plans,
    summarize_configuration,
    with_orthodiff_block,
)
from orthodiff_nnunet.preprocessing import (
    PlanningError,
    PreprocessedDataError,
    check_preprocessed_data,
    preprocess_configurations,
    progress_record_path,
)
from orthodiff_nnunet.preprocessing import dataset_lock as _dataset_lock
from orthodiff_nnunet.schemes import ORIENTATION_ID_OFFSET, ORIENTATION_SUFFIX, ORIENTATIONS, normalize_orientation
from orthodiff_nnunet.utils import atomic_write_json, load_json, nnunet_stdout_to_log

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CONFIGURATIONS",
    "PLANNERS",
    "ConfigurationSummary",
    "DatasetPlanResult",
    "PlannerName",
    "PlanningError",
    "PlanningResult",
    "PreprocessedDataError",
    "check_preprocessed_data",
    "default_plans_name",
    "give_own_data_folders",
    "plan_and_preprocess",
    "resolve_datasets",
]

PlannerName = Literal["resenc_m", "plain"]
#: planner name -> (class name in orthodiff_nnunet.planners, plans identifier, default GPU memory target in GB)
PLANNERS: dict[str, tuple[str, str, float]] = {
    "resenc_m": ("OrthodiffResEncMPlanner", RESENC_M_PLANS, 8.0),
    "plain": ("OrthodiffPlainPlanner", PLAIN_PLANS, 8.0),
}
#: Configurations preprocessed by default; all three share one data identifier, so one pass.
DEFAULT_CONFIGURATIONS: tuple[str, ...] = (
    SEGMENTATION_CONFIGURATION,
    DIFFUSION_CONFIGURATION,
    CLASSIFICATION_CONFIGURATION,
)
_FINGERPRINT_RECORD = ".orthodiff_fingerprint_source.json"
_FINGERPRINT_RECORD_VERSION = 1
#: an atomic write's temporary file older than this (seconds) belongs to no live write
_STALE_TEMPORARY_S = 60.0
_ROLE_OF = {v: k for k, v in CONFIGURATION_ROLES.items()}


# ----------------------------------------------------------------------------------------------
# results
@dataclass(frozen=True)
class ConfigurationSummary:
    """One configuration of a plans file. Spacing in mm and patch in voxels, through-plane axis first."""

    name: str
    role: str
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    n_stages: int
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    network: str
    estimated_vram_gb: float | None


@dataclass
class DatasetPlanResult:
    """What plan_and_preprocess did for one dataset."""

    dataset_name: str
    orientation: str
    plans_identifier: str
    plans_file: Path
    planner: str
    transferred_from: str | None
    configurations: list[ConfigurationSummary]
    num_cases: int = 0
    num_preprocessed: int = 0
    num_skipped: int = 0
    fingerprint_reused: bool = False
    plans_reused: bool = False
    seconds: float = 0.0

    def configuration(self, name: str) -> ConfigurationSummary:
        for c in self.configurations:
            if c.name == name:
                return c
        raise KeyError(f"{self.dataset_name} has no configuration {name!r}")


@dataclass
class PlanningResult:
    """Per-dataset results, in processing order."""

    datasets: list[DatasetPlanResult] = field(default_factory=list)

    def for_orientation(self, orientation: str) -> list[DatasetPlanResult]:
        return [d for d in self.datasets if d.orientation == orientation]

    def dataset(self, name_or_orientation: str) -> DatasetPlanResult:
        """The result for a dataset name, or the only dataset of an orientation."""
        hits = [d for d in self.datasets if d.dataset_name == name_or_orientation]
        hits = hits or self.for_orientation(name_or_orientation)
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} datasets match {name_or_orientation!r}")
        return hits[0]

    @property
    def seconds(self) -> float:
        return sum(d.seconds for d in self.datasets)

    def summary(self) -> str:
        """Tables per orientation: spacing, patch, batch, stages, estimated memory, cases."""
        lines: list[str] = []
        header = ("dataset", "configuration", "spacing mm (tp first)", "patch (tp first)", "batch", "stages",
                  "est. GPU GB", "network")
        for o in ORIENTATIONS:
            results = self.for_orientation(o)
            if not results:
                continue
            rows = []
            for d in results:
                for c in d.configurations:
                    rows.append((
                        d.dataset_name, c.name,
                        " x ".join(f"{s:.3g}" for s in c.spacing),
                        " x ".join(str(p) for p in c.patch_size),
                        str(c.batch_size), str(c.n_stages),
                        "?" if c.estimated_vram_gb is None else f"{c.estimated_vram_gb:.1f}",
                        c.network,
                    ))
            widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
            lines.append(f"orientation {o} ({', '.join(sorted({d.plans_identifier for d in results}))})")
            lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
            for r in rows:
                lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)))
            for d in results:
                origin = f"plans from {d.transferred_from}" if d.transferred_from else f"planned by {d.planner}"
                if d.plans_reused:
                    origin += " (unchanged, reused)"
                lines.append(
                    f"  {d.dataset_name}: {origin}; {d.num_cases} cases, {d.num_preprocessed} preprocessed, "
                    f"{d.num_skipped} already done; {d.seconds:.1f} s; plans {d.plans_file}"
                )
            lines.append("")
        return "\n".join(lines).rstrip()


# ----------------------------------------------------------------------------------------------
# dataset selection
@dataclass(frozen=True)
class DatasetInfo:
    """A raw dataset as found in nnUNet_raw."""

    dataset_id: int
    name: str
    folder: Path
    dataset_json: dict = field(repr=False, compare=False, hash=False)

    @property
    def block(self) -> dict:
        return self.dataset_json.get("orthodiff") or {}

    @property
    def orientation(self) -> str | None:
        o = self.block.get("orientation")
        return normalize_orientation(o) if o else None

    @property
    def external(self) -> bool:
        return bool(self.block.get("external", False))


def _dataset_id_of(name: str) -> int:
    try:
        return int(name[len("Dataset"):len("Dataset") + 3])
    except ValueError as exc:
        raise PlanningError(f"{name!r} is not an nnU-Net dataset name (DatasetNNN_Name)") from exc


def _find_dataset(raw: Path, id_or_name: int | str) -> DatasetInfo:
    text = str(id_or_name).strip()
    if text.startswith("Dataset"):
        folder = raw / text
        if not folder.is_dir():
            raise PlanningError(f"dataset folder {folder} not found")
    else:
        try:
            dataset_id = int(text)
        except ValueError as exc:
            raise PlanningError(f"{text!r} is neither a dataset id (e.g. 501) nor a name (Dataset501_KneeSag)") from exc
        hits = sorted(raw.glob(f"Dataset{dataset_id:03d}_*"))
        hits = [h for h in hits if h.is_dir()]
        if not hits:
            raise PlanningError(f"no dataset with id {dataset_id} in {raw} (expected a folder Dataset{dataset_id:03d}_*)")
        if len(hits) > 1:
            raise PlanningError(f"several datasets with id {dataset_id} in {raw}: {[h.name for h in hits]}")
        folder = hits[0]
    dj = folder / "dataset.json"
    if not dj.is_file():
        raise PlanningError(f"{folder} has no dataset.json")
    return DatasetInfo(_dataset_id_of(folder.name), folder.name, folder, load_json(dj))


def _group(raw: Path, info: DatasetInfo) -> dict[str, DatasetInfo]:
    """orientation -> dataset of ``info``'s convert group (ids base+0/1/2, names <Name>Sag/Cor/Ax)."""
    block = info.block
    if info.orientation is None:
        raise PlanningError(
            f"{info.name}/dataset.json has no orthodiff orientation, so its orientation group is unknown: "
            "give its id without --orientations, or convert it with `orthodiff convert`"
        )
    base = block.get("base_dataset_id", info.dataset_id - ORIENTATION_ID_OFFSET[info.orientation])
    name = block.get("name")
    group: dict[str, DatasetInfo] = {}
    for o in ORIENTATIONS:
        ds_id = int(base) + ORIENTATION_ID_OFFSET[o]
        candidates = [raw / f"Dataset{ds_id:03d}_{name}{ORIENTATION_SUFFIX[o]}"] if name else []
        candidates += sorted(p for p in raw.glob(f"Dataset{ds_id:03d}_*") if p not in candidates)
        for c in candidates:
            if (c / "dataset.json").is_file():
                other = DatasetInfo(ds_id, c.name, c, load_json(c / "dataset.json"))
                ob = other.block
                if other.orientation == o and ob.get("base_dataset_id", base) == base and ob.get("name", name) == name:
                    group[o] = other
                    break
    group.setdefault(info.orientation, info)
    return group


def resolve_datasets(
    dataset_ids: Sequence[int | str], orientations: Sequence[str] | None = None, raw: Path | None = None
) -> list[DatasetInfo]:
    """The datasets to process, in order, without duplicates (see the module docstring).

    Raises:
        PlanningError: for unknown ids, or when the filter leaves nothing.
    """
    raw = raw_dir(raw)
    if not dataset_ids:
        raise PlanningError("no dataset given: pass one or more ids with -d")
    given = [_find_dataset(raw, d) for d in dataset_ids]
    if orientations is None:
        out = given
    else:
        wanted = [normalize_orientation(o) for o in orientations]
        out = []
        for info in given:
            group = _group(raw, info)
            out += [group[o] for o in ORIENTATIONS if o in wanted and o in group]
        if not out:
            raise PlanningError(
                f"none of the datasets in the group(s) of {list(dataset_ids)} has orientation "
                f"{'/'.join(wanted)} (dataset.json orthodiff.orientation)"
            )
    unique: dict[str, DatasetInfo] = {}
    for info in out:
        unique.setdefault(info.name, info)
    return list(unique.values())


# ----------------------------------------------------------------------------------------------
# helpers
def default_plans_name(planner: PlannerName = "resenc_m", gpu_memory_gb: float | None = None) -> str:
    """``orthodiffResEncMPlans`` / ``orthodiffPlans``, with ``_<G>G`` for a non-default memory target."""
    if planner not in PLANNERS:
        raise PlanningError(f"unknown planner {planner!r}: use one of {', '.join(PLANNERS)}")
    _, name, default_gb = PLANNERS[planner]
    if gpu_memory_gb is None or float(gpu_memory_gb) == default_gb:
        return name
    return f"{name}_{float(gpu_memory_gb):g}G".replace(".", "p")


def _planner_class(planner: PlannerName):
    import orthodiff_nnunet.planners as planners

    return getattr(planners, PLANNERS[planner][0])


def _remove_stale_temporaries(pre_folder: Path, min_age_s: float = _STALE_TEMPORARY_S) -> list[Path]:
    """Delete what interrupted atomic writes left in a preprocessed dataset folder.

    Only called while holding :func:`_dataset_lock`, so no other plan_and_preprocess writes there;
    a temporary is further only removed when it is hidden, ends in ``.tmp`` (the names
    :func:`orthodiff_nnunet.utils.atomic_write_bytes` and the label copy use, e.g.
    ``.<data_identifier>.orthodiff_progress.json.k2j4x9.tmp``) and is older than ``min_age_s``
    seconds (an atomic write of another command lasts milliseconds).

    Returns:
        The removed files.
    """
    removed = []
    now = time.time()
    for sub in (pre_folder, pre_folder / "gt_segmentations"):
        if not sub.is_dir():
            continue
        for f in sub.glob(".*.tmp"):
            try:
                if f.is_file() and now - f.stat().st_mtime > min_age_s:
                    f.unlink()
                    removed.append(f)
            except FileNotFoundError:
                continue
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted run: %s", pre_folder.name, len(removed),
                 ", ".join(f.name for f in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


def _splits_extend(new: list[dict], old: list[dict]) -> bool:
    """True when ``new`` keeps every case of ``old`` in the same fold and part and only adds cases.

    That is what an incremental ``orthodiff convert`` writes (earlier exams keep their folds, new
    patients are placed into folds): models trained on the old folds stay valid for the old cases.
    """
    if len(new) != len(old):
        return False
    return all(set(o["train"]) <= set(n["train"]) and set(o["val"]) <= set(n["val"]) for n, o in zip(new, old))


def _copy_splits(info: DatasetInfo, pre_folder: Path) -> None:
    """Copy the raw splits_final.json to nnUNet_preprocessed unless the copy there is already the same.

    nnU-Net's planner asserts that an existing copy matches the raw one. A raw split that only adds
    cases to the existing folds (an incremental convert) replaces the copy, with a log line; any other
    difference is refused here with what to do instead of a bare AssertionError.
    """
    src = info.folder / "splits_final.json"
    if not src.is_file():
        return
    dst = pre_folder / "splits_final.json"
    if not dst.is_file():
        atomic_write_json(dst, load_json(src))
        return
    a, b = load_json(src), load_json(dst)
    same = all(
        set(a[i]["train"]) == set(b[i]["train"]) and set(a[i]["val"]) == set(b[i]["val"]) for i in range(len(a))
    ) if len(b) >= len(a) else False
    if same:
        return
    if _splits_extend(a, b):
        added = len({c for f in a for c in f["val"]}) - len({c for f in b for c in f["val"]})
        log.info("%s: the raw splits_final.json adds %d case(s) to the existing folds (an incremental convert; "
                 "no earlier case changed fold): updating the preprocessed copy", info.name, added)
        atomic_write_json(dst, a)
        return
    raise PlanningError(
        f"{dst} differs from the raw dataset's splits_final.json and earlier cases changed fold (the dataset was "
        f"re-converted with other folds?). Delete {dst} to use the new splits (models trained on the old folds "
        "no longer match), or restore the old raw splits."
    )


def list_training_cases(info: DatasetInfo) -> dict[str, dict[str, Any]]:
    """The raw cases ``{case: {"images": [...], "label": ...}}``, as nnU-Net lists them.

    Listed once per dataset and passed around. For the standard ``imagesTr/<case>_<XXXX><ending>``
    layout the files are grouped in one pass (nnU-Net's own listing matches every file against
    every case, O(n^2), in a pool of 12 forked processes per call); datasets that list their
    files in ``dataset.json["dataset"]`` go through nnU-Net's function. An external site has
    ``imagesTs``/``labelsTs`` only: those are listed, so that it can be preprocessed with transferred
    plans (classification and evaluation read preprocessed exams).
    """
    import re

    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_json = info.dataset_json
    if "dataset" in dataset_json:
        return get_filenames_of_train_images_and_targets(str(info.folder), copy.deepcopy(dataset_json))
    for images_sub, labels_sub in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        images = info.folder / images_sub
        if images.is_dir():
            break
    else:
        return {}
    ending = dataset_json["file_ending"]
    pattern = re.compile(r"(.+)_\d{4}" + re.escape(ending))
    grouped: dict[str, list[str]] = {}
    for name in sorted(os.listdir(images)):
        m = pattern.fullmatch(name)
        if m:
            grouped.setdefault(m.group(1), []).append(str(images / name))
    labels = info.folder / labels_sub
    return {k: {"images": grouped[k], "label": str(labels / f"{k}{ending}")} for k in sorted(grouped)}


def _raw_files_key(info: DatasetInfo, dataset: dict[str, dict[str, Any]]) -> str:
    """Hash of every raw training file's name, size and modification time (fingerprint reuse)."""
    items = []
    for k in sorted(dataset):
        for f in [*dataset[k]["images"], dataset[k]["label"]]:
            st = os.stat(f)
            items.append((k, os.path.basename(f), st.st_size, st.st_mtime_ns))
    payload = json.dumps({"v": _FINGERPRINT_RECORD_VERSION, "files": items,
                          "labels": info.dataset_json.get("labels"),
                          "channels": info.dataset_json.get("channel_names")}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _fingerprint(info: DatasetInfo, cases: dict[str, dict[str, Any]], pre_folder: Path, num_processes: int,
                 clean: bool, verify: bool, show_progress: bool) -> bool:
    """Extract the fingerprint unless an up-to-date one exists. Returns True when reused."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    from orthodiff_nnunet.planners import OrthodiffFingerprintExtractor

    key = _raw_files_key(info, cases)
    record = pre_folder / _FINGERPRINT_RECORD
    if not clean and (pre_folder / "dataset_fingerprint.json").is_file() and record.is_file():
        if load_json(record).get("key") == key:
            log.info("%s: raw files unchanged, reusing the fingerprint", info.name)
            return True
    log.info("%s: extracting the fingerprint", info.name)
    record.unlink(missing_ok=True)  # a run killed while nnU-Net rewrites the fingerprint must not reuse it
    with nnunet_stdout_to_log(log):
        extract_fingerprint_dataset(
            info.dataset_id, OrthodiffFingerprintExtractor, num_processes=max(1, num_processes),
            check_dataset_integrity=verify, clean=True, verbose=False, show_progress_bar=show_progress,
        )
    atomic_write_json(record, {"key": key})
    return False


def _plans_are_current(plans_file: Path, dataset_name: str, planner: PlannerName, gpu_memory_gb: float | None) -> bool:
    """Whether existing plans were made for this dataset by the same planner, version and memory target.

    Together with an unchanged fingerprint this means re-planning would write the same plans,
    so a resumed run skips it (nnU-Net's planning instantiates many networks: seconds).
    """
    from orthodiff_nnunet.planners.orthodiff_planner import PLANNER_VERSION

    if not plans_file.is_file():
        return False
    try:
        block = read_orthodiff_block(load_plans(plans_file))
    except (PlansError, ValueError):
        return False
    target = PLANNERS[planner][2] if gpu_memory_gb is None else float(gpu_memory_gb)
    return (
        block.planner == PLANNERS[planner][0]
        and block.planner_version == PLANNER_VERSION
        and block.gpu_memory_target_gb == target
        and block.plans_transferred_from is None
        and block.source_datasets == (dataset_name,)
    )


def give_own_data_folders(plans: dict, plans_name: str, folder: Path, labels: dict | None) -> dict:
    """``plans`` named ``plans_name``, with data identifiers of their own where another plans' data would clash.

    A data identifier not starting with ``<plans_name>_`` (plans copied by hand, transferred under
    another name, or shrunk copies) is renamed with
    :func:`~orthodiff_nnunet.plans.own_data_identifiers` when another plans file of ``folder``, or
    the stamp of that data folder written for another plans name, holds other data under it (a
    different :func:`~orthodiff_nnunet.plans.preprocessing_hash`): preprocessing would otherwise
    overwrite that data with other spacing or normalisation. Identifiers shared with identical
    preprocessing (a tiny-network copy of the same plans) stay shared: the data are the same.

    Args:
        plans: a plans dict (not modified).
        plans_name: the plans identifier (the file name without ``.json``).
        folder: ``nnUNet_preprocessed/<dataset>``.
        labels: the dataset.json ``labels`` (part of the hash).

    Returns:
        A copy with ``plans_name`` set and, where needed, renamed data identifiers.
    """
    out = copy.deepcopy(plans)
    out["plans_name"] = plans_name
    prefix = f"{plans_name}_"
    mine: dict[str, str] = {}  # data identifier -> hash, for identifiers that plans_name does not own
    for cfg in out.get("configurations", {}):
        d = resolve_configuration(out, cfg).get("data_identifier")
        if d and not str(d).startswith(prefix):
            mine.setdefault(d, preprocessing_hash(out, cfg, labels))
    if not mine:
        return out
    clashes: set[str] = set()
    for f in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
        if f.stem == plans_name:
            continue
        try:
            other = load_json(f)
        except ValueError:
            continue
        if not isinstance(other, dict) or "configurations" not in other or "plans_name" not in other:
            continue
        for cfg in other["configurations"]:
            try:
                d = resolve_configuration(other, cfg).get("data_identifier")
                if d in mine and preprocessing_hash(other, cfg, labels) != mine[d]:
                    clashes.add(f"{d} (plans {f.stem})")
            except PlansError:
                continue
    for d, digest in mine.items():
        stamp = progress_record_path(folder, d)
        if stamp.is_file():
            record = load_json(stamp)
            if record.get("hash") != digest and record.get("plans_name") not in (None, plans_name):
                clashes.add(f"{d} (data of plans {record['plans_name']})")
    if not clashes:
        return out
    owned = own_data_identifiers(out, plans_name)
    log.info("%s: plans %s name data folders that hold other data (%s): their data identifiers are now %s",
             Path(folder).name, plans_name, ", ".join(sorted(clashes)),
             ", ".join(sorted({c["data_identifier"] for c in owned["configurations"].values() if "data_identifier" in c})))
    return owned


def _summaries(plans: dict, configurations: Sequence[str]) -> list[ConfigurationSummary]:
    out = []
    for name in configurations:
        if name not in plans.get("configurations", {}):
            continue
        s = summarize_configuration(plans, name)
        out.append(ConfigurationSummary(
            name=name, role=_ROLE_OF.get(name, "nnU-Net"), spacing=tuple(s["spacing"]),
            patch_size=tuple(s["patch_size"]), batch_size=s["batch_size"], n_stages=s["n_stages"],
            kernel_sizes=tuple(tuple(k) for k in s["kernel_sizes"]), strides=tuple(tuple(k) for k in s["strides"]),
            network=s["network"], estimated_vram_gb=s["estimated_vram_gb"],
        ))
    return out


def transfer_plans(
    source_plans: dict, source_name: str, target: DatasetInfo, pre_root: Path,
    cases: dict[str, dict[str, Any]] | None = None, plans_name: str | None = None,
) -> dict:
    """Copy a planned dataset's plans to ``target`` (same orientation): same topology and normalisation.

    Only the dataset name, the image reader/writer, and the orthodiff block's label and
    abnormality names (and ``plans_transferred_from``) change; spacing, patch, batch, network and
    intensity properties are the source's. Written atomically as ``<plans_name>.json`` (default:
    the source's plans name), with their own data folders (:func:`give_own_data_folders`), so
    plans transferred under another name never share a preprocessed folder with other data.

    Raises:
        PlanningError: when the orientations differ or the source plans have no orthodiff block.
    """
    import dataclasses

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    try:
        block = read_orthodiff_block(source_plans)
    except PlansError as exc:
        raise PlanningError(f"cannot transfer plans from {source_name}: {exc}") from exc
    if target.orientation != block.orientation:
        raise PlanningError(
            f"cannot transfer {block.orientation} plans of {source_name} to {target.name}, which is "
            f"{target.orientation or 'of unknown orientation'}: plans move only between datasets of one orientation"
        )
    plans = copy.deepcopy(source_plans)
    plans["dataset_name"] = target.name
    dataset = cases if cases is not None else list_training_cases(target)
    if dataset:
        example = next(iter(dataset.values()))["images"][0]
    else:  # external sites: imagesTs only
        ending = target.dataset_json["file_ending"]
        examples = sorted((target.folder / "imagesTs").glob(f"*{ending}"))
        example = str(examples[0]) if examples else None
    if example is not None:
        rw = determine_reader_writer_from_dataset_json(target.dataset_json, example,
                                                       allow_nonmatching_filename=True, verbose=False)
        plans["image_reader_writer"] = rw.__name__
    labels = target.dataset_json.get("labels", {})
    label_names = [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1] if isinstance(kv[1], int) else 1 << 30)]
    abnormal = target.block.get("abnormality_labels", list(block.abnormality_names))
    new_block = dataclasses.replace(block, label_names=label_names or block.label_names,
                                    abnormality_names=abnormal, plans_transferred_from=source_name)
    folder = pre_root / target.name
    plans = give_own_data_folders(with_orthodiff_block(plans, new_block), plans_name or plans["plans_name"], folder,
                                  target.dataset_json.get("labels"))
    save_plans(folder / f"{plans['plans_name']}.json", plans)
    atomic_write_json(folder / "dataset.json", target.dataset_json)
    return plans


# ----------------------------------------------------------------------------------------------
# the API function
def plan_and_preprocess(
    dataset_ids: Sequence[int | str],
    orientations: Sequence[str] | None = None,
    num_processes: int = 2,
    gpu_memory_gb: float | None = None,
    planner: PlannerName = "resenc_m",
    plans_from: int | str | None = None,
    raw: Path | None = None,
    preprocessed: Path | None = None,
    *,
    plans_name: str | None = None,
    configurations: Sequence[str] = DEFAULT_CONFIGURATIONS,
    preprocess: bool = True,
    clean: bool = False,
    verify_dataset_integrity: bool = False,
    show_progress: bool = True,
) -> PlanningResult:
    """Fingerprint, plan and preprocess datasets, one per orientation.

    Args:
        dataset_ids: dataset ids or names (see the module docstring for how they combine with
            ``orientations``).
        orientations: keep only these orientations of each given dataset's group (``sag``,
            ``cor``, ``ax``); None: exactly the given datasets.
        num_processes: worker processes for fingerprinting and preprocessing.
        gpu_memory_gb: GPU memory target for patch and batch sizes (GB); None: the planner's
            default (8 GB, nnU-Net's ResEnc-M preset). A non-default target changes the plans
            name (``orthodiffResEncMPlans_24G``) unless ``plans_name`` is given.
        planner: ``resenc_m`` (residual-encoder U-Net, nnU-Net's recommended preset) or ``plain``.
        plans_from: a planned dataset (id or name): instead of planning, each dataset gets the plans
            of the dataset of the same orientation in that dataset's group (e.g. an unlabeled
            corpus, an external site or another joint preprocessed like the labeled data). Or a
            plans file (a path ending in ``.json``, e.g. another run's
            ``nnUNet_preprocessed/<Dataset>/<plans>.json`` or a model folder's ``plans.json``):
            every dataset (all of its orientation) gets those plans; nothing of the other run's raw
            or preprocessed data is needed.
        raw: nnUNet_raw folder (default: the environment variable).
        preprocessed: nnUNet_preprocessed folder (default: the environment variable).
        plans_name: plans identifier (default: :func:`default_plans_name`; with a plans file as
            ``plans_from``, the file's ``plans_name``). With ``plans_from`` a dataset it picks the
            source's plans, which keep that name; with a plans file it is the name they get.
            Data identifiers always start with it, so each plans file owns its data folder.
        configurations: configurations to preprocess (default: segmentation, diffusion and
            classification, which share one preprocessed data folder). ``2d`` may be added.
        preprocess: False plans only.
        clean: re-extract fingerprints and re-preprocess every case.
        verify_dataset_integrity: run nnU-Net's dataset check before fingerprinting.
        show_progress: tqdm progress bars.

    Returns:
        PlanningResult with one entry per dataset (plans file, configurations, case counts).

    Raises:
        PlanningError: with what to do, for unknown datasets, orientation mismatches, missing
            source plans, external datasets without ``plans_from`` and similar.
    """
    if planner not in PLANNERS:
        raise PlanningError(f"unknown planner {planner!r}: use one of {', '.join(PLANNERS)}")
    if gpu_memory_gb is not None and not gpu_memory_gb > 0:
        raise PlanningError(f"--gpu-memory-gb must be > 0, got {gpu_memory_gb}")
    raw_root = raw_dir(raw)
    pre_root = preprocessed_dir(preprocessed)
    set_nnunet_paths(raw=raw_root, preprocessed=pre_root)
    targets = resolve_datasets(dataset_ids, orientations, raw_root)
    source_file, identifier = _plans_file_and_name(plans_from, plans_name, planner, gpu_memory_gb)
    sources: dict[str, DatasetInfo] = {}
    if plans_from is not None and source_file is None:
        sources, targets = _same_orientation_sources(raw_root, plans_from, targets)
    for t in targets:
        if t.external and t.name not in sources and source_file is None:
            raise PlanningError(
                f"{t.name} is an external site: it never enters fingerprinting or planning. Give it the plans "
                "of the training site: --plans-from <the training site's dataset id, or its plans file>"
            )
    run = _PlanningRun(identifier, planner, gpu_memory_gb, pre_root, source_file, sources, num_processes, clean,
                       verify_dataset_integrity, show_progress, preprocess, configurations)
    return PlanningResult(datasets=[_plan_dataset(t, run) for t in targets])


def _plans_file_and_name(plans_from: int | str | None, plans_name: str | None, planner: PlannerName,
                         gpu_memory_gb: float | None) -> tuple[Path | None, str]:
    """The plans file ``plans_from`` names (None for a dataset or nothing) and the plans identifier to write.

    Raises:
        PlanningError: a plans file that does not exist or is not an nnU-Net plans file.
    """
    if plans_from is not None and _is_plans_file(plans_from):
        source_file = Path(plans_from).expanduser().resolve()
        if not source_file.is_file():
            raise PlanningError(f"--plans-from {plans_from}: no such plans file")
        file_plans = load_plans(source_file)
        if "configurations" not in file_plans or "plans_name" not in file_plans:
            raise PlanningError(f"--plans-from {source_file} is not an nnU-Net plans file (no configurations)")
        return source_file, plans_name or str(file_plans["plans_name"])
    return None, plans_name or default_plans_name(planner, gpu_memory_gb)


def _same_orientation_sources(raw_root: Path, plans_from: int | str,
                              targets: list[DatasetInfo]) -> tuple[dict[str, DatasetInfo], list[DatasetInfo]]:
    """target name -> the dataset of its orientation in ``plans_from``'s group (not for the source itself), and
    the targets with those sources first.

    Raises:
        PlanningError: a target without an orientation, or one whose orientation the group lacks.
    """
    sources: dict[str, DatasetInfo] = {}
    source = _find_dataset(raw_root, plans_from)
    group = _group(raw_root, source)
    for t in targets:
        if t.orientation is None:
            raise PlanningError(f"{t.name}/dataset.json has no orthodiff orientation: plans cannot be matched")
        if t.orientation not in group:
            raise PlanningError(
                f"--plans-from {source.name}: its group has no {t.orientation} dataset to give {t.name} its plans "
                f"(group: {', '.join(g.name for g in group.values())})"
            )
        if group[t.orientation].name != t.name:
            sources[t.name] = group[t.orientation]
    # datasets that are sources of others go first
    targets = sorted(targets, key=lambda t: 0 if t.name in {s.name for s in sources.values()} else 1)
    return sources, targets


@dataclass(frozen=True)
class _PlanningRun:
    """The settings one ``plan_and_preprocess`` call applies to each of its datasets."""

    identifier: str
    planner: PlannerName
    gpu_memory_gb: float | None
    pre_root: Path
    source_file: Path | None  # --plans-from a plans file
    sources: dict[str, DatasetInfo]  # --plans-from a dataset: target name -> its same-orientation source
    num_processes: int
    clean: bool
    verify_dataset_integrity: bool
    show_progress: bool
    preprocess: bool
    configurations: Sequence[str]


def _plan_dataset(t: DatasetInfo, run: _PlanningRun) -> DatasetPlanResult:
    """Plan (or transfer plans to) one dataset and preprocess it, under its lock."""
    start = time.perf_counter()
    folder = run.pre_root / t.name
    folder.mkdir(parents=True, exist_ok=True)
    with _dataset_lock(folder):
        _remove_stale_temporaries(folder)
        _copy_splits(t, folder)
        cases = list_training_cases(t)
        fingerprint_reused = plans_reused = False
        transferred_from: str | None = None
        if run.source_file is not None or t.name in run.sources:
            plans, transferred_from = _transferred_plans(t, cases, folder, run)
            planner_used = read_orthodiff_block(plans).planner
        else:
            plans, fingerprint_reused, plans_reused = _own_plans(t, cases, folder, run)
            planner_used = PLANNERS[run.planner][0]
        n, new, skipped = len(cases), 0, 0
        if run.preprocess:
            n, new, skipped = preprocess_configurations(t.name, plans, run.configurations, cases, run.pre_root,
                                                        run.num_processes, run.clean, run.show_progress)
    shown = list(dict.fromkeys([*DEFAULT_CONFIGURATIONS, *run.configurations]))
    return DatasetPlanResult(
        dataset_name=t.name, orientation=read_orthodiff_block(plans).orientation, plans_identifier=run.identifier,
        plans_file=folder / f"{run.identifier}.json", planner=planner_used, transferred_from=transferred_from,
        configurations=_summaries(plans, shown), num_cases=n, num_preprocessed=new, num_skipped=skipped,
        fingerprint_reused=fingerprint_reused, plans_reused=plans_reused, seconds=time.perf_counter() - start,
    )


def _transferred_plans(t: DatasetInfo, cases: dict[str, dict[str, Any]], folder: Path,
                       run: _PlanningRun) -> tuple[dict, str]:
    """The source's plans (a plans file, or the same-orientation dataset's) transferred to ``t``; and the source.

    Raises:
        PlanningError: the source dataset has no such plans, or they would replace ``t``'s own plans.
    """
    identifier, pre_root = run.identifier, run.pre_root
    if run.source_file is not None:
        source_plans, source_name, shown_source = load_plans(run.source_file), None, str(run.source_file)
    else:
        src = run.sources[t.name]
        src_file = pre_root / src.name / f"{identifier}.json"
        if not src_file.is_file():
            have = (sorted(p.stem for p in (pre_root / src.name).glob("*.json"))
                    if (pre_root / src.name).is_dir() else [])
            raise PlanningError(
                f"{src.name} has no plans {identifier!r} to transfer to {t.name} (found: {have or 'none'}): "
                f"plan it first (orthodiff plan_and_preprocess -d {src.dataset_id}), or include it in -d"
            )
        source_plans, source_name, shown_source = load_plans(src_file), src.name, str(src_file)
    source_name = source_name or str(source_plans.get("dataset_name", run.source_file))
    _refuse_replacing_own_plans(folder / f"{identifier}.json", t.name, source_name, shown_source)
    log.info("%s: plans %s transferred from %s", t.name, identifier, shown_source)
    plans = transfer_plans(source_plans, source_name, t, pre_root, cases, plans_name=identifier)
    return plans, source_name


def _own_plans(t: DatasetInfo, cases: dict[str, dict[str, Any]], folder: Path,
               run: _PlanningRun) -> tuple[dict, bool, bool]:
    """``t``'s fingerprint and plans (both reused when unchanged), owning their data folders.

    Returns:
        The plans, whether the fingerprint was reused and whether the plans were.

    Raises:
        PlanningError: ``t`` was not converted by ``orthodiff convert`` (no orientation).
    """
    from orthodiff_nnunet.planners.orthodiff_planner import n_proc_da_at_least_one

    identifier, planner = run.identifier, run.planner
    if t.orientation is None:
        raise PlanningError(
            f"{t.name}/dataset.json has no orthodiff block with an orientation; convert the data with "
            "`orthodiff convert` first"
        )
    fingerprint_reused = _fingerprint(t, cases, folder, run.num_processes, run.clean, run.verify_dataset_integrity,
                                      run.show_progress)
    plans_file = folder / f"{identifier}.json"
    plans_reused = False
    if fingerprint_reused and _plans_are_current(plans_file, t.name, planner, run.gpu_memory_gb):
        log.info("%s: fingerprint and planner settings unchanged, reusing %s", t.name, plans_file.name)
        plans_reused = True
    else:
        from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

        log.info("%s: planning (%s, %s)", t.name, PLANNERS[planner][0], identifier)
        with n_proc_da_at_least_one(), nnunet_stdout_to_log(log):
            plan_experiment_dataset(
                t.dataset_id, experiment_planner_class=_planner_class(planner),
                gpu_memory_target_in_gb=run.gpu_memory_gb, overwrite_plans_name=identifier,
            )
    plans = load_plans(plans_file)
    owned = give_own_data_folders(plans, identifier, folder, t.dataset_json.get("labels"))
    if owned != plans:  # e.g. a plans file copied under this name, spacing edited
        save_plans(plans_file, owned)
        plans = owned
    return plans, fingerprint_reused, plans_reused


def _is_plans_file(plans_from: int | str | os.PathLike) -> bool:
    """``--plans-from`` names a plans file (a path ending in ``.json``) rather than a dataset."""
    return isinstance(plans_from, os.PathLike) or str(plans_from).strip().lower().endswith(".json")


def _refuse_replacing_own_plans(target_file: Path, target_name: str, source_name: str, shown_source: str) -> None:
    """A transfer must not overwrite plans that the target dataset was planned with itself.

    Models trained on those plans, and their preprocessed data, would silently stop matching.
    """
    if not target_file.is_file():
        return
    try:
        block = read_orthodiff_block(load_plans(target_file))
    except (PlansError, ValueError):
        return
    if block.plans_transferred_from is None and block.source_datasets == (target_name,) and source_name != target_name:
        raise PlanningError(
            f"{target_name} already has its own plans {target_file.stem} ({target_file}); transferring {source_name}'s "
            f"plans under the same name would replace them and their preprocessed data. Transfer them under "
            f"another name: --plans-from {shown_source} --plans-name <a new plans name>"
        )


# ----------------------------------------------------------------------------------------------
# command line
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orthodiff_nnunet.planning ...``: the same command without the orthodiff CLI."""
    from orthodiff_nnunet.cli.planning import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
