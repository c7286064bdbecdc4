"""nnU-Net's ``DefaultPreprocessor``, resumable: :class:`OrthodiffPreprocessor`.

Kept apart from :mod:`orthodiff_nnunet.preprocessing` because subclassing ``DefaultPreprocessor``
imports torch and nnU-Net's data loading (seconds): ``orthodiff --help`` and the planning module
stay light, and :mod:`orthodiff_nnunet.preprocessing` hands the class out on first use
(``orthodiff_nnunet.preprocessing.OrthodiffPreprocessor``). What the class does is described there.
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

from orthodiff_nnunet.paths import preprocessed_dir, raw_dir
from orthodiff_nnunet.plans import PlansError, load_plans, preprocessing_hash, resolve_configuration
from orthodiff_nnunet.preprocessing import PlanningError, dataset_lock, progress_record_path
from orthodiff_nnunet.utils import atomic_write_json, load_json

log = logging.getLogger(__name__)

__all__ = ["OrthodiffPreprocessor"]

_CASE_FILES = (".b2nd", "_seg.b2nd", ".pkl")  # what nnUNetDatasetBlosc2.save_case writes per case
#: seconds between two writes of the progress record while cases complete (it is always written at the end)
_RECORD_EVERY_S = 2.0


def _case_complete(out_dir: Path, case: str) -> bool:
    return all((out_dir / f"{case}{suffix}").is_file() for suffix in _CASE_FILES)


def _remove_partial_case(out_dir: Path, case: str) -> None:
    """blosc2 refuses to overwrite: clear what an interrupted run left of a case."""
    for suffix in _CASE_FILES:
        (out_dir / f"{case}{suffix}").unlink(missing_ok=True)


def _refuse_taking_over(folder: Path, out_dir: Path, record: dict, plans_name: str) -> None:
    """Never redo a data folder that another, still present plans file of the dataset owns.

    Plans names own their data identifiers (:func:`~orthodiff_nnunet.plans.own_data_identifiers`),
    so this only fires for hand-edited plans whose identifier was made to point at another plans'
    folder: rebuilding it would silently change the data the other plans' models train on.
    """
    owner = record.get("plans_name")
    if not owner or owner == plans_name:
        return
    owner_file = folder / f"{owner}.json"
    if not owner_file.is_file():
        return
    try:
        owner_plans = load_plans(owner_file)
        configuration = record.get("configuration")
        owns = (resolve_configuration(owner_plans, configuration)["data_identifier"] == out_dir.name
                and preprocessing_hash(owner_plans, configuration, load_json(folder / "dataset.json").get("labels"))
                == record.get("hash"))
    except (PlansError, KeyError, ValueError):
        return
    if owns:
        raise PlanningError(
            f"{out_dir} holds the data of plans {owner} ({owner_file}), and plans {plans_name} name the same "
            f"folder (data_identifier {out_dir.name!r}) with other spacing or normalisation: preprocessing them "
            f"would overwrite {owner}'s data. Give plans {plans_name} their own data_identifier (e.g. "
            f"'{plans_name}_3d_fullres' in {folder / (plans_name + '.json')}) and run plan_and_preprocess again")


class _ProgressRecord:
    """The stamp of one data folder while it is being preprocessed: written atomically, at most every
    :data:`_RECORD_EVERY_S` seconds while cases complete (a stamp per case would cost more than a tiny
    case), and always when forced (start and end)."""

    def __init__(self, path: Path, stamp: dict[str, Any], done: set[str]) -> None:
        self.path, self.stamp, self.done = path, stamp, done
        self._last = 0.0

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last > _RECORD_EVERY_S:
            atomic_write_json(self.path, {**self.stamp, "done": sorted(self.done)})
            self._last = now


class OrthodiffPreprocessor(DefaultPreprocessor):
    """nnU-Net's ``DefaultPreprocessor``, resumable: completed cases are skipped, not redone.

    Only :meth:`run` (nnU-Net's entry, one configuration) differs; the arrays of a case are made by
    nnU-Net's ``run_case_save``, unchanged.
    """

    def run(self, dataset_name_or_id: int | str, configuration_name: str, plans_identifier: str,
            num_processes: int) -> None:
        """nnU-Net's entry (``preprocess_dataset``, ``nnUNetv2_preprocess``): preprocess what is not done.

        As ``DefaultPreprocessor.run``: the plans and ``dataset.json`` from ``nnUNet_preprocessed``,
        the training cases of ``nnUNet_raw`` listed by nnU-Net, but under :func:`dataset_lock` and
        keeping every case already done under the same plans.
        """
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
        pre_root, raw_folder = preprocessed_dir(), raw_dir() / dataset_name
        if not raw_folder.is_dir():
            raise PlanningError(f"{raw_folder} does not exist: nnUNet_raw has no dataset {dataset_name}")
        folder = pre_root / dataset_name
        plans = load_plans(folder / f"{plans_identifier}.json")
        cases = get_filenames_of_train_images_and_targets(str(raw_folder), load_json(folder / "dataset.json"))
        with dataset_lock(folder):
            n, new, skipped = self.preprocess_resumable(dataset_name, plans, configuration_name, cases, pre_root,
                                                        num_processes)
        log.info("%s: %s: %d cases, %d preprocessed now, %d already done", dataset_name, configuration_name, n, new,
                 skipped)

    def preprocess_resumable(
        self, dataset_name: str, plans: dict, configuration: str, cases: dict[str, dict[str, Any]], pre_root: Path,
        num_processes: int, clean: bool = False,
    ) -> tuple[int, int, int]:
        """Preprocess the cases of one configuration's data identifier that are not done yet.

        The caller holds :func:`dataset_lock`.

        Args:
            cases: the raw training cases ``{case: {"images": [...], "label": ...}}``.
            clean: redo every case.

        Returns:
            (cases, newly preprocessed, skipped as already done).
        """
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        folder = pre_root / dataset_name
        dataset_json = load_json(folder / "dataset.json")
        plans_manager = PlansManager(plans)
        cm = plans_manager.get_configuration(configuration)
        out_dir = folder / cm.data_identifier
        stamp = {"hash": preprocessing_hash(plans, configuration, dataset_json.get("labels")),
                 "plans_name": str(plans.get("plans_name")), "configuration": configuration,
                 "data_identifier": cm.data_identifier, "cases": len(cases)}
        done = self._cases_done(folder, out_dir, stamp, set(cases), clean)
        todo = [k for k in cases if k not in done]
        for k in todo:
            _remove_partial_case(out_dir, k)
        record = _ProgressRecord(progress_record_path(folder, cm.data_identifier), stamp, done)
        record.write(force=True)
        if todo:
            args = {k: (str(out_dir / k), cases[k]["images"], cases[k]["label"], plans_manager, cm, dataset_json)
                    for k in todo}
            self._save_cases(dataset_name, args, num_processes, record)
        return len(cases), len(todo), len(cases) - len(todo)

    @staticmethod
    def _cases_done(folder: Path, out_dir: Path, stamp: dict[str, Any], cases: set[str], clean: bool) -> set[str]:
        """The cases of ``out_dir`` that are complete and were made under ``stamp``'s hash.

        A folder made under another hash (or without a record, or with ``clean``) is emptied first,
        unless another plans file owns it (:func:`_refuse_taking_over` raises).
        """
        progress_file = progress_record_path(folder, out_dir.name)
        record = load_json(progress_file) if progress_file.is_file() else None
        if record is not None and record.get("hash") != stamp["hash"]:
            _refuse_taking_over(folder, out_dir, record, stamp["plans_name"])
        done: set[str] = set()
        if clean or record is None or record.get("hash") != stamp["hash"]:
            if out_dir.exists():
                log.info("%s: %s was made with other plans (or is incomplete): redoing it", folder.name, out_dir.name)
                shutil.rmtree(out_dir)
        else:
            done = set(record.get("done", []))
        out_dir.mkdir(parents=True, exist_ok=True)
        return {k for k in done if k in cases and _case_complete(out_dir, k)}

    def _save_cases(self, dataset_name: str, args: dict[str, tuple], num_processes: int,
                    record: _ProgressRecord) -> None:
        """nnU-Net's ``run_case_save`` per case (in ``num_processes`` spawned workers when > 1).

        Each completed case enters ``record`` (written every few seconds and at the end, however the
        loop ends), so that a rerun after an interruption skips it.
        """
        from tqdm import tqdm

        bar = tqdm(total=len(args), desc=f"Preprocessing {dataset_name}", unit="case",
                   disable=not getattr(self, "show_progress_bar", True))
        try:
            if num_processes <= 1 or len(args) == 1:
                for k, a in args.items():
                    self.run_case_save(*a)
                    record.done.add(k)
                    bar.update()
                    record.write()
                return
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")  # as nnU-Net: torch and fork do not mix
            with ProcessPoolExecutor(max_workers=min(num_processes, len(args)), mp_context=ctx) as pool:
                futures = {pool.submit(self.run_case_save, *a): k for k, a in args.items()}
                for fut in as_completed(futures):
                    k = futures[fut]
                    try:
                        fut.result()
                    except Exception as exc:
                        for f in futures:
                            f.cancel()
                        raise PlanningError(
                            f"{dataset_name}: preprocessing case {k} failed: {exc!r} (a killed worker usually "
                            "means out of memory: lower -np). Cases done so far are kept; rerun to resume."
                        ) from exc
                    record.done.add(k)
                    bar.update()
                    record.write()
        finally:
            bar.close()
            record.write(force=True)
