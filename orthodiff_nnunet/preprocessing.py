"""Resumable preprocessing, as an nnU-Net preprocessor (:class:`OrthodiffPreprocessor`).

nnU-Net's ``DefaultPreprocessor.run`` deletes a configuration's data folder and preprocesses every
case again, once per configuration. :class:`OrthodiffPreprocessor` keeps nnU-Net's per-case work
(``run_case_save``: transpose, crop, normalise, resample, sample class locations, blosc2) and
changes only the bookkeeping around it:

- a progress record beside the data folder (:func:`progress_record_path`: the plans'
  :func:`~orthodiff_nnunet.plans.preprocessing_hash`, plans name, cases done) says which cases
  are complete; a rerun skips them and redoes only the rest, after removing what an interrupted
  run left of a case (blosc2 refuses to overwrite);
- configurations that share a data identifier (segmentation, diffusion, classification) are
  preprocessed once: the second sees every case done under the same hash;
- a folder whose record holds another hash is rebuilt, unless another, still present plans file of
  the dataset owns it (:func:`orthodiff_nnunet.preprocessor._refuse_taking_over`);
- one run at a time per dataset: :func:`dataset_lock` (also held by ``orthodiff plan_and_preprocess``).

``orthodiff plan_and_preprocess`` calls :func:`preprocess_configurations`; every trainer calls
:func:`check_preprocessed_data`. nnU-Net's own entry (``preprocess_dataset``/``nnUNetv2_preprocess``)
runs the class a plans configuration names in ``preprocessor_name``, looked up by name among the
modules of ``nnunetv2.preprocessing`` only (nnU-Net 2.8.1 has no extension folder for
preprocessors, unlike ``nnUNet_extTrainer`` for trainers). Inside
:func:`nnunet_finds_orthodiff_preprocessor` that lookup finds :class:`OrthodiffPreprocessor`, so
nnU-Net's preprocessing of plans naming it resumes too. Outside (a fresh ``nnUNetv2_preprocess`` or
``nnUNetv2_predict`` worker) the name is unknown to nnU-Net, which is why the planners keep writing
``DefaultPreprocessor`` (see :data:`PREPROCESSOR_NAME`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.plans import PlansError, preprocessing_hash, read_orthodiff_block, resolve_configuration
from orthodiff_nnunet.utils import load_json

if TYPE_CHECKING:
    from orthodiff_nnunet.preprocessor import OrthodiffPreprocessor

log = logging.getLogger(__name__)

__all__ = [
    "PREPROCESSOR_NAME",
    "OrthodiffPreprocessor",
    "PlanningError",
    "PreprocessedDataError",
    "check_preprocessed_data",
    "dataset_lock",
    "nnunet_finds_orthodiff_preprocessor",
    "preprocess_configurations",
    "progress_record_path",
]

#: the ``preprocessor_name`` a plans configuration gives to have nnU-Net's preprocessing resume. The
#: planners do not write it: nnU-Net finds it only inside :func:`nnunet_finds_orthodiff_preprocessor`,
#: and a plans file naming it would stop a fresh ``nnUNetv2_preprocess`` or ``nnUNetv2_predict``
#: (its spawned preprocessing workers import nothing of orthodiff) with ``'NoneType' object is not
#: callable``. Both classes make the same arrays, but the name enters
#: :func:`~orthodiff_nnunet.plans.preprocessing_hash`: a plans file switched to it has its data redone once.
PREPROCESSOR_NAME = "OrthodiffPreprocessor"
_PROGRESS_SUFFIX = ".orthodiff_progress.json"
#: held (``flock``) by a plan_and_preprocess run on a preprocessed dataset folder; released by the OS when
#: the process dies, so a killed run never leaves a stale lock
_LOCK_FILE = ".orthodiff_plan_and_preprocess.lock"


def __getattr__(name: str) -> Any:
    """``OrthodiffPreprocessor`` on first use: its module imports torch (see :mod:`orthodiff_nnunet.preprocessor`)."""
    if name == PREPROCESSOR_NAME:
        from orthodiff_nnunet.preprocessor import OrthodiffPreprocessor

        return OrthodiffPreprocessor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PlanningError(OrthodiffError):
    """plan_and_preprocess cannot go on; the message says what to do."""


class PreprocessedDataError(PlanningError):
    """A preprocessed data folder was not made (or not completely) by the plans about to use it."""


@contextlib.contextmanager
def dataset_lock(pre_folder: Path) -> Iterator[None]:
    """Hold the preprocessed dataset folder for this run; refuse when another run holds it.

    ``filelock`` takes an ``flock`` on :data:`_LOCK_FILE`; the operating system releases it when
    the process ends, however it ends, so a killed run never blocks the next one. Not reentrant:
    code that already holds it calls :meth:`OrthodiffPreprocessor.preprocess_resumable` directly.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(pre_folder / _LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout as exc:
        raise PlanningError(
            f"another plan_and_preprocess is running on {pre_folder} (it holds {pre_folder / _LOCK_FILE}): "
            "wait for it to finish, then run this command again"
        ) from exc
    try:
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------
# the data folder's stamp
def progress_record_path(dataset_folder: Path, data_identifier: str) -> Path:
    """The stamp of a preprocessed data folder: ``.<data_identifier>.orthodiff_progress.json`` beside it.

    Written by preprocessing before the first case and after each: ``hash`` (the plans'
    :func:`~orthodiff_nnunet.plans.preprocessing_hash`), ``plans_name``, ``configuration``,
    ``data_identifier``, ``cases`` (how many cases the dataset has) and ``done`` (cases complete).
    """
    return Path(dataset_folder) / f".{data_identifier}{_PROGRESS_SUFFIX}"


def _fix_command(dataset_name: str, plans: dict) -> str:
    """The plan_and_preprocess command that (re)makes ``plans``' data of ``dataset_name``."""
    name = plans.get("plans_name", "?")
    try:
        source = read_orthodiff_block(plans).plans_transferred_from
    except PlansError:
        source = None
    if source:
        return (f"orthodiff plan_and_preprocess -d {dataset_name} --plans-from {source} --plans-name {name} "
                f"(or --plans-from <the plans file they came from>)")
    return f"orthodiff plan_and_preprocess -d {dataset_name} --plans-name {name}"


def check_preprocessed_data(
    dataset_folder: Path, plans: dict, configuration: str, dataset_json: dict | None = None,
) -> Path:
    """Refuse data that was not made, completely, by ``plans``: every trainer calls this before training.

    The data folder's stamp (:func:`progress_record_path`) must hold the plans' preprocessing hash
    (spacing, normalisation, resampling, transpose, intensity properties and labels: what changes the
    arrays; patch and batch size do not) and list every case as done. Another plans file that shares
    the data identifier, a plans file edited after preprocessing, a preprocessing run that was killed
    or data made by another tool all fail here, before the first iteration, instead of training on
    data that does not match the plans.

    Args:
        dataset_folder: ``nnUNet_preprocessed/<dataset>``.
        plans: the plans the trainer uses.
        configuration: the trainer's configuration (inheritance resolved).
        dataset_json: the preprocessed ``dataset.json`` (its labels enter the hash); read from the
            folder when None.

    Returns:
        The checked data folder.

    Raises:
        PreprocessedDataError: naming the folder, what is wrong and the command that fixes it.
    """
    dataset_folder = Path(dataset_folder)
    if dataset_json is None:
        dataset_json = load_json(dataset_folder / "dataset.json")
    resolved = resolve_configuration(plans, configuration)
    identifier = resolved["data_identifier"]
    data = dataset_folder / identifier
    stamp = progress_record_path(dataset_folder, identifier)
    name = plans.get("plans_name", "?")
    fix = _fix_command(dataset_folder.name, plans)
    if not data.is_dir():
        raise PreprocessedDataError(f"{data} does not exist: the {configuration} data of plans {name} were never "
                                    f"preprocessed. Run `{fix}`")
    if not stamp.is_file():
        raise PreprocessedDataError(
            f"{data} has no preprocessing stamp ({stamp.name}): it was not made by `orthodiff plan_and_preprocess`, "
            f"so nothing shows it matches plans {name}. Run `{fix}`")
    record = load_json(stamp)
    digest = preprocessing_hash(plans, configuration, dataset_json.get("labels"))
    if record.get("hash") != digest:
        by = record.get("plans_name")
        if by == name:
            detail = f"plans {name} as they were before they were edited"
        else:
            detail = f"plans {by}" if by else f"another plans file, or plans {name} before an edit"
        raise PreprocessedDataError(
            f"{data} was preprocessed with other plans ({detail}): its spacing, normalisation or resampling "
            f"differ from what plans {name} ({configuration}) say. Run `{fix}` to preprocess the data for "
            "these plans")
    done = set(record.get("done", []))
    total = record.get("cases")
    present = {p.name[: -len(".pkl")] for p in data.glob("*.pkl")}
    missing = sorted(present - done)
    if missing or (total is not None and len(done) < int(total)):
        n_total = int(total) if total is not None else len(present)
        raise PreprocessedDataError(
            f"{data} is incomplete: {len(done)} of {n_total} cases preprocessed (the preprocessing was "
            f"interrupted?). Run `{fix}`: it resumes with the missing cases")
    return data


@contextlib.contextmanager
def nnunet_finds_orthodiff_preprocessor() -> Iterator[None]:
    """Let nnU-Net's lookup by ``preprocessor_name`` find :class:`OrthodiffPreprocessor` (in this process).

    nnU-Net 2.8.1 looks a preprocessor up by name among the modules of ``nnunetv2.preprocessing``
    only (``ConfigurationManager.preprocessor_class``); unlike trainers (``nnUNet_extTrainer``)
    there is no folder to add. Here the class is added as a name of the module that holds
    ``DefaultPreprocessor`` while the context lasts, and removed afterwards; nothing of nnU-Net
    is replaced. A configuration's lookup is cached per configuration object: create the
    ``PlansManager`` inside the context.
    """
    from nnunetv2.preprocessing.preprocessors import default_preprocessor as module

    from orthodiff_nnunet.preprocessor import OrthodiffPreprocessor

    if getattr(module, PREPROCESSOR_NAME, None) is OrthodiffPreprocessor:
        yield  # already findable (a nested context): leave it to the outer one
        return
    setattr(module, PREPROCESSOR_NAME, OrthodiffPreprocessor)
    try:
        yield
    finally:
        delattr(module, PREPROCESSOR_NAME)


# ----------------------------------------------------------------------------------------------
# what plan_and_preprocess calls
def _copy_gt_segmentations(dataset_name: str, cases: dict[str, dict[str, Any]], pre_root: Path) -> None:
    """As nnU-Net: labels copied to ``gt_segmentations`` for validation without the raw data."""
    folder = pre_root / dataset_name
    dataset_json = load_json(folder / "dataset.json")
    gt = folder / "gt_segmentations"
    gt.mkdir(parents=True, exist_ok=True)
    for k, v in cases.items():
        src, dst = Path(v["label"]), gt / f"{k}{dataset_json['file_ending']}"
        s = src.stat()
        if dst.is_file():
            d = dst.stat()
            if d.st_size == s.st_size and d.st_mtime_ns == s.st_mtime_ns:
                continue
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def preprocess_configurations(
    dataset_name: str, plans: dict, configurations: Sequence[str], cases: dict[str, dict[str, Any]],
    pre_root: Path, num_processes: int, clean: bool = False, show_progress: bool = True,
) -> tuple[int, int, int]:
    """Preprocess ``configurations`` of one dataset, once per distinct data identifier (resumable).

    The caller holds :func:`dataset_lock` (``plan_and_preprocess`` does). Every configuration is
    preprocessed by :class:`OrthodiffPreprocessor`, whatever preprocessor its plans name (nnU-Net's
    ``DefaultPreprocessor`` or this one: the same arrays).

    Args:
        cases: the raw training cases (:func:`orthodiff_nnunet.planning.list_training_cases`).

    Returns:
        (number of cases, newly preprocessed, skipped as already done), summed over data identifiers.
    """
    by_identifier: dict[str, str] = {}
    for c in configurations:
        if c not in plans.get("configurations", {}):
            log.info("%s: no configuration %s in the plans; skipped", dataset_name, c)
            continue
        by_identifier.setdefault(resolve_configuration(plans, c)["data_identifier"], c)
    from orthodiff_nnunet.preprocessor import OrthodiffPreprocessor

    preprocessor = OrthodiffPreprocessor(verbose=False)
    preprocessor.show_progress_bar = show_progress
    totals = [0, 0, 0]
    for identifier, c in by_identifier.items():
        n, new, skipped = preprocessor.preprocess_resumable(dataset_name, plans, c, cases, pre_root, num_processes,
                                                            clean)
        log.info("%s: %s: %d cases, %d preprocessed now, %d already done", dataset_name, identifier, n, new, skipped)
        totals = [totals[0] + n, totals[1] + new, totals[2] + skipped]
    _copy_gt_segmentations(dataset_name, cases, pre_root)
    return totals[0], totals[1], totals[2]
