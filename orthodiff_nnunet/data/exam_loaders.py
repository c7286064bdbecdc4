"""The classifier's exams: one view's data and loader, multi-view exam batches, patient-disjoint sets.

* :class:`ViewData`: one orientation's dataset as the classifier sees it (its plans'
  ``3d_classification`` configuration through nnU-Net's ``PlansManager``/``ConfigurationManager``,
  its dataset class from ``infer_dataset_class``: blosc2 or numpy).
* :class:`ExamCaseLoader`: an ``nnUNetDataLoader`` that loads the case identifiers it is given
  (crop/pad to the patch, nnU-Net's transforms) instead of drawing its own; the transforms are
  nnU-Net's (:func:`view_transforms`: ``nnUNetTrainer.get_training_transforms`` with the rotation,
  dummy-2D and initial patch size of ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``,
  and the validation transforms).
* :class:`MultiViewExamLoader`: a batchgenerators ``DataLoader`` (so nnU-Net's
  ``SingleThreadedAugmenter``/``NonDetMultiThreadedAugmenter`` run it in worker processes) that
  samples *exams* and asks each view's loader for that exam's case: the batch is
  ``{"data": {view: (B, C, *patch)}, "present": (B, V), "target": (B, L), "keys": [exam, ...]}``,
  zeros where a view is missing.

Mirroring: nnU-Net mirrors along every axis for segmentation. For exam-level labels a flip along
superior-inferior or anterior-posterior makes anatomy no knee has, so by default only the
left-right axis is mirrored (it maps a right knee onto a left one; medial/lateral labels keep
their meaning). ``mirror_axes="all"`` restores nnU-Net's choice.

Three patient-disjoint sets (:func:`three_way_split`, :func:`exam_sets`): the network is trained on
the *training* exams, the checkpoint and the decision thresholds are chosen on the *selection*
exams (fold ``k``'s validation set of ``splits_final.json``) and the reported metrics come from the
*test* exams (by default the next fold's validation set, ``(k + 1) mod n``), never trained on,
never used for a choice. With only two folds the selection fold's patients are halved instead
(selection | test, patient-grouped). An encoder pretrained on a test exam's scan is refused
(:func:`pretraining_overlap`).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import numpy as np
import torch
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from orthodiff_nnunet.data.splits import label_fraction_subset
from orthodiff_nnunet.data.targets import Exam, TargetsFile, match_exams
from orthodiff_nnunet.errors import ClassificationError
from orthodiff_nnunet.networks.build import architecture_hash, architecture_of
from orthodiff_nnunet.utils import atomic_write_json

log = logging.getLogger(__name__)

MirrorAxes = Literal["lr", "all", "none"]
LR_NUMPY_AXIS = 2  # canonical LPS numpy array (z=S, y=P, x=L): left-right is axis 2


# ----------------------------------------------------------------------------------------------
# one view's data
@dataclass
class ViewData:
    """One orientation's dataset as the classifier sees it.

    Attributes:
        view: ``sag``, ``cor`` or ``ax``.
        dataset_name: nnU-Net dataset name.
        plans_identifier: plans file name without ``.json``.
        plans: the plans dict (never handed to nnU-Net without a copy).
        configuration: the classification configuration name.
        dataset_json: the preprocessed dataset's ``dataset.json``.
        preprocessed_folder: ``nnUNet_preprocessed/<dataset>``.
    """

    view: str
    dataset_name: str
    plans_identifier: str
    plans: dict
    configuration: str
    dataset_json: dict
    preprocessed_folder: Path

    @property
    def plans_manager(self) -> PlansManager:
        return PlansManager(copy.deepcopy(self.plans))

    @property
    def configuration_manager(self):
        return self.plans_manager.get_configuration(self.configuration)

    @property
    def data_folder(self) -> Path:
        return self.preprocessed_folder / self.configuration_manager.data_identifier

    @property
    def num_input_channels(self) -> int:
        return len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {"0": "MRI"})))

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.configuration_manager.patch_size)

    @property
    def architecture_hash(self) -> str:
        return architecture_hash(architecture_of(self.plans, self.configuration))

    def available_cases(self) -> list[str]:
        folder = self.data_folder
        if not folder.is_dir():
            raise ClassificationError(
                f"{folder} does not exist: preprocess {self.dataset_name} with these plans "
                f"(orthodiff plan_and_preprocess -d {self.dataset_name}, or --plans-from the dataset the model was "
                "trained on)")
        return sorted(infer_dataset_class(str(folder)).get_identifiers(str(folder)))

    def lr_patch_axis(self) -> int:
        return list(self.plans["transpose_forward"]).index(LR_NUMPY_AXIS)


class ExamCaseLoader(nnUNetDataLoader):
    """nnU-Net's data loader of one view, loading the case identifiers it is given.

    The multi-view sampler decides which exams form a batch; this loader crops/pads each case to
    the patch (random position as nnU-Net's loader, or the centre with ``center_crop``) and applies
    nnU-Net's transforms. Only the image is returned: the targets are exam-level.
    """

    def __init__(self, view: ViewData, identifiers: Sequence[str], patch_size: Sequence[int],
                 transforms, center_crop: bool) -> None:
        folder = str(view.data_folder)
        dataset = infer_dataset_class(folder)(folder, list(identifiers))
        label_manager = view.plans_manager.get_label_manager(view.dataset_json)
        super().__init__(dataset, 1, patch_size, view.patch_size, label_manager, 0.0, transforms=transforms)
        self.center_crop = center_crop
        self._keys: list[str] = []

    def get_indices(self):
        return self._keys

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        if not self.center_crop:
            return super().get_bbox(data_shape, False, class_locations, overwrite_class, verbose)
        lbs = [(int(s) - int(p)) // 2 for s, p in zip(data_shape, self.patch_size)]  # negative: padded
        return lbs, [lb + int(p) for lb, p in zip(lbs, self.patch_size)]

    def load(self, keys: Sequence[str]) -> torch.Tensor:
        """``(len(keys), C, *final_patch)`` float32 images of these cases."""
        self._keys = list(keys)
        self.batch_size = len(self._keys)
        return self.generate_train_batch()["data"]


class MultiViewExamLoader(DataLoader):
    """Samples exams and loads each present view through that view's :class:`ExamCaseLoader`.

    Args:
        exams: the exams to draw from.
        loaders: view -> loader; a view no exam has may be left out.
        shapes: view -> ``(C, *patch)`` of every view of the model, in fusion order (zeros are
            returned for exams without that view).
        batch_size: exams per batch.
        infinite: True: batches drawn at random with replacement (training, run inside nnU-Net's
            augmenters); False: one ordered pass (use :meth:`collate` directly).
    """

    def __init__(self, exams: Sequence[Exam], loaders: Mapping[str, ExamCaseLoader],
                 shapes: Mapping[str, Sequence[int]], batch_size: int, infinite: bool = True) -> None:
        super().__init__(list(exams), batch_size, 1, None, return_incomplete=True, shuffle=False, infinite=infinite)
        self.indices = list(range(len(exams)))
        self.loaders = dict(loaders)
        self.shapes = {v: tuple(int(x) for x in s) for v, s in shapes.items()}
        self.views = tuple(self.shapes)

    def collate(self, exams: Sequence[Exam]) -> dict:
        present = torch.tensor([[e.has(v) for v in self.views] for e in exams], dtype=torch.bool).reshape(len(exams), -1)
        data = {}
        for j, v in enumerate(self.views):
            rows = [i for i, e in enumerate(exams) if e.has(v)]
            if rows and v not in self.loaders:
                raise ValueError(f"exams have a {v} series but no {v} loader was given")
            loaded = self.loaders[v].load([exams[i].cases[v] for i in rows]) if rows else None
            if loaded is not None and len(rows) == len(exams):
                data[v] = loaded
                continue
            out = torch.zeros((len(exams), *self.shapes[v]), dtype=torch.float32)
            if loaded is not None:
                out[rows] = loaded
            data[v] = out
        target = torch.from_numpy(np.stack([e.targets for e in exams]).astype(np.float32))
        return {"data": data, "present": present, "target": target, "keys": [e.exam for e in exams]}

    def generate_train_batch(self) -> dict:
        return self.collate([self._data[i] for i in self.get_indices()])



TestFold = int | Literal["auto"] | None


@dataclass(frozen=True)
class ExamSplit:
    """Train / selection / test exam ids of one run, patient-disjoint.

    Attributes:
        train: exams the network is trained on.
        selection: exams the checkpoint and the decision thresholds are chosen on.
        test: exams the reported metrics come from (empty: no held-out test set).
        selection_source, test_source: where each set comes from, in words (recorded with the run).
        dropped_train: training exams left out because their patient is in the selection or test set.
    """

    train: tuple[str, ...]
    selection: tuple[str, ...]
    test: tuple[str, ...]
    selection_source: str
    test_source: str
    dropped_train: tuple[str, ...] = ()

    def set_of(self) -> dict[str, str]:
        """exam -> ``train``, ``selection`` or ``test``."""
        return {**{e: "train" for e in self.train}, **{e: "selection" for e in self.selection},
                **{e: "test" for e in self.test}}

    def record(self, n_train: int, n_selection: int, n_test: int) -> dict:
        """What a run records of its sets: sources, numbers of exams used (with targets), dropped training exams."""
        return {"selection_source": self.selection_source, "test_source": self.test_source,
                "num_exams": {"train": n_train, "selection": n_selection, "test": n_test},
                "dropped_train_exams": len(self.dropped_train)}


def _too_few(what: str) -> ClassificationError:
    return ClassificationError(
        f"{what}. A held-out test set needs three patient-disjoint sets (train, selection, test), so at least "
        "3 patients with targets; with 3 or more folds in splits_final.json each set is a fold. Fix: convert more "
        "patients (or with --folds 3 or more), or train without a test set: --test-fold none (checkpoint, "
        "thresholds and the reported metrics then come from one fold and are optimistic) or --fold all")


def three_way_split(folds: Sequence[Mapping[str, Sequence[str]]], fold: int, test_fold: TestFold,
                    patients: Mapping[str, str | None], sites: Mapping[str, str | None] | None = None) -> ExamSplit:
    """Train / selection / test exams from the patient-grouped folds of ``splits_final.json``.

    * selection: fold ``fold``'s validation exams;
    * test: ``test_fold``'s validation exams; ``"auto"`` (default of training): the next fold,
      ``(fold + 1) mod n``, with 3 or more folds; with exactly 2 folds the selection fold's patients
      are halved instead (:func:`~orthodiff_nnunet.data.splits.patient_grouped_splits`, seeded,
      stratified by site where possible): one half selects, the other tests. ``None``: no test set;
    * train: fold ``fold``'s training exams minus the test exams.

    The patients (``patients``: exam -> patient pseudonym; None = the exam is its own patient)
    of the three sets are disjoint: a training exam of a selection or test patient is dropped (the
    converter's folds never hold one); a patient in both selection and test is an error.

    Args:
        folds: ``[{"train": [exam, ...], "val": [...]}, ...]``, exam ids, restricted to usable exams.
        fold: the selection fold.
        test_fold: ``"auto"``, another fold's index, or None.
        patients: exam -> patient.
        sites: exam -> site, for the two-fold halving (stratification only).

    Raises:
        ClassificationError: a fold that does not exist, a test fold equal to the selection fold, too
            few patients for three sets (the message says what is needed), patients shared by the
            selection and test sets.
    """
    from orthodiff_nnunet.data.splits import patient_grouped_splits

    n = len(folds)
    if n == 0:
        raise _too_few("splits_final.json holds no fold (fewer than 2 patients)")
    if not 0 <= fold < n:
        raise ClassificationError(f"fold {fold} does not exist: splits_final.json has {n} folds")
    pat = {e: patients.get(e) or f"exam:{e}" for f in folds for part in ("train", "val") for e in f[part]}
    selection = set(folds[fold]["val"])
    train = set(folds[fold]["train"])
    test: set[str] = set()
    selection_source = f"fold {fold} validation"
    test_source = "none"
    if test_fold == "auto" and n >= 3:
        test_fold = (fold + 1) % n
    if test_fold == "auto":  # two folds: halve the selection fold by patient
        chosen = sorted(selection)
        halves = patient_grouped_splits(chosen, {e: pat[e] for e in chosen},
                                        {e: (sites or {}).get(e) or "?" for e in chosen}, num_folds=2)
        if not halves:
            raise _too_few(f"splits_final.json has {n} folds and fold {fold}'s validation exams belong to "
                           f"{len({pat[e] for e in chosen})} patient(s); halving them into selection and test "
                           "needs at least 2")
        selection, test = set(halves[0]["train"]), set(halves[0]["val"])
        selection_source = f"half of fold {fold} validation patients (splits_final.json has 2 folds)"
        test_source = f"other half of fold {fold} validation patients"
    elif test_fold is not None:
        t = int(test_fold)
        if not 0 <= t < n or t == fold:
            raise ClassificationError(f"--test-fold {test_fold} must be another fold than {fold} (0..{n - 1})")
        test = set(folds[t]["val"]) - selection
        test_source = f"fold {t} validation"
    train -= test | selection
    shared = {pat[e] for e in selection} & {pat[e] for e in test}
    if shared:
        raise ClassificationError(
            f"{len(shared)} patient(s) have exams in both the selection ({selection_source}) and the test "
            f"({test_source}) set: splits_final.json is not grouped by patient; convert again with "
            "`orthodiff convert` (its folds are patient-grouped) or fix the splits")
    held = {pat[e] for e in selection | test}
    dropped = sorted(e for e in train if pat[e] in held)
    if dropped:
        log.warning("%d training exam(s) belong to selection/test patients and are left out of training",
                    len(dropped))
    train -= set(dropped)
    if test_fold is not None and (not train or not selection or not test):
        raise _too_few(f"fold {fold} gives {len(train)} training, {len(selection)} selection and {len(test)} test "
                       "exam(s); every set needs at least one")
    return ExamSplit(tuple(sorted(train)), tuple(sorted(selection)), tuple(sorted(test)), selection_source,
                     test_source, tuple(dropped))



def views_record(views: Mapping[str, ViewData]) -> dict:
    """What a trained model records of its views (``classifier.json``): datasets, plans, architecture, channels."""
    return {"views": list(views), "datasets": {v: d.dataset_name for v, d in views.items()},
            "plans_identifiers": {v: d.plans_identifier for v, d in views.items()},
            "configuration": next(iter(views.values())).configuration,
            "architecture_hashes": {v: d.architecture_hash for v, d in views.items()},
            "num_input_channels": {v: d.num_input_channels for v, d in views.items()}}


def view_splits(views: Mapping[str, ViewData], targets: Mapping[str, TargetsFile]) -> list[dict[str, set[str]]]:
    """The folds of every view's ``splits_final.json`` in exam ids; the views must agree on every exam.

    Raises:
        ClassificationError: a missing ``splits_final.json``, or views whose folds disagree.
    """
    merged: list[dict[str, set[str]]] | None = None
    for v, d in views.items():
        f = d.preprocessed_folder / "splits_final.json"
        if not f.is_file():
            raise ClassificationError(f"{f} not found: plan_and_preprocess copies the converter's splits there "
                                      "(or train with --fold all)")
        case_exam = {c: ct.exam for c, ct in targets[v].cases.items()}
        folds = [{part: {case_exam.get(c, c) for c in s[part]} for part in ("train", "val")}
                 for s in json.loads(f.read_text())]
        if merged is None:
            merged = folds
            continue
        if len(folds) != len(merged):
            raise ClassificationError("the views' splits_final.json have different numbers of folds")
        for i, (a, b) in enumerate(zip(merged, folds)):
            clash = (a["train"] & b["val"]) | (a["val"] & b["train"])
            if clash:
                raise ClassificationError(f"fold {i}: exams {sorted(clash)[:3]} are training in one view and "
                                          "validation in another; the views must come from one conversion")
            a["train"] |= b["train"]
            a["val"] |= b["val"]
    return merged or []


@dataclass(frozen=True)
class ExamSets:
    """The exams of one run: the split (ids and sources) and the :class:`Exam` objects of each set."""

    split: ExamSplit
    train: list[Exam]
    selection: list[Exam]
    test: list[Exam]


def exam_sets(views: Mapping[str, ViewData], targets: Mapping[str, TargetsFile], fold: int | str,
              test_fold: TestFold, label_fraction: float = 1.0, label_fraction_seed: int = 12345) -> ExamSets:
    """Train/selection/test exams of the preprocessed cases with targets (identical across views).

    Args:
        views: view -> its data (fusion order).
        targets: view -> that dataset's targets file.
        fold: the selection fold of :func:`view_splits` (see :func:`three_way_split`), or ``"all"``:
            train and select on every exam, no test set (optimistic, with a warning).
        test_fold: see :func:`three_way_split`.
        label_fraction: share of the training exams with targets that is kept (site-stratified,
            :func:`~orthodiff_nnunet.data.splits.label_fraction_subset`); the other sets are whole.
        label_fraction_seed: seed of that subset.

    Raises:
        ClassificationError: no preprocessed case with targets, ``--test-fold`` with fold ``all``, or
            no training or no selection exam with targets.
    """
    available = {v: d.available_cases() for v, d in views.items()}
    exams = match_exams(targets, available)
    if not exams:
        raise ClassificationError(f"no preprocessed case of {[d.dataset_name for d in views.values()]} has "
                                  "targets: check the datasets' orthodiff_targets.json")
    by_exam = {e.exam: e for e in exams}
    if fold == "all":
        if test_fold not in (None, "auto"):
            raise ClassificationError("--test-fold needs a numbered fold, not 'all'")
        log.warning("fold 'all': no held-out test set, and the checkpoint and thresholds are chosen on the "
                    "training exams (optimistic)")
        ids = tuple(sorted(by_exam))
        split = ExamSplit(ids, ids, (), "all exams (fold 'all': the training exams)", "none")
    else:
        folds = [{part: [e for e in f[part] if e in by_exam] for part in ("train", "val")}
                 for f in view_splits(views, targets)]
        split = three_way_split(folds, int(fold), test_fold, {e: x.patient for e, x in by_exam.items()},
                                {e: x.site for e, x in by_exam.items()})
    usable = [by_exam[e] for e in split.train if np.isfinite(by_exam[e].targets).any()]
    if label_fraction < 1:
        sites = {e.exam: e.site or "?" for e in usable}
        keep = set(label_fraction_subset([e.exam for e in usable], sites, label_fraction, label_fraction_seed))
        usable = [e for e in usable if e.exam in keep]
    sets = ExamSets(split, usable, [by_exam[e] for e in split.selection], [by_exam[e] for e in split.test])
    if not sets.train or not sets.selection:
        raise ClassificationError(f"fold {fold}: {len(sets.train)} training and {len(sets.selection)} selection "
                                  "exams with targets; need at least one of each")
    missing = sum(len(e.missing_views(views)) > 0 for e in exams)
    log.info("exams: %d train, %d selection (%s), %d test (%s); %d with a missing view", len(sets.train),
             len(sets.selection), split.selection_source, len(sets.test), split.test_source, missing)
    return sets


def write_sets_json(path: Path, fold: int | str, test_fold: TestFold, record: Mapping | None, train: Sequence[Exam],
                    selection: Sequence[Exam], test: Sequence[Exam]) -> None:
    """``split.json`` of a run: the exam ids (pseudonyms) of each set and where the sets come from."""
    atomic_write_json(path, {"note": "exam ids (pseudonyms) of each set; the three sets share no patient",
                             "fold": fold, "test_fold": test_fold, **(record or {}),
                             "train": [e.exam for e in train], "selection": [e.exam for e in selection],
                             "test": [e.exam for e in test]})


def pretraining_overlap(encoder_paths: Mapping[str, Path | None], views: Mapping[str, ViewData],
                        test: Sequence[Exam], test_source: str, allow: bool) -> dict[str, int]:
    """Per view, how many test exams the encoder saw in pretraining; refused unless ``allow``.

    Pretraining uses no labels, but a test scan it was trained on is no longer unseen: the
    reported test figures would be optimistic. The encoder's provenance lists the cases it was
    trained on (``train_cases``); an encoder without that list is accepted with a warning (and
    left out of the result).

    Raises:
        ClassificationError: an encoder saw a test exam and ``allow`` is False; the message names the
            fixes (pretrain without the test fold, no test set, or accept it).
    """
    from orthodiff_nnunet.networks.encoder_io import read_encoder_checkpoint

    overlap: dict[str, int] = {}
    for v, path in sorted(encoder_paths.items()):
        if path is None or not test:
            continue
        prov = read_encoder_checkpoint(path).get("provenance") or {}
        if "train_cases" not in prov:
            log.warning("%s: encoder %s does not record the scans it was pretrained on; cannot check that the "
                        "test exams were unseen", v, path)
            continue
        seen = set(prov["train_cases"])
        hits = sorted(e.exam for e in test if e.has(v) and e.cases[v] in seen)
        overlap[v] = len(hits)
        if hits and not allow:
            raise ClassificationError(
                f"the {v} encoder {path} was pretrained on scans of {len(hits)} of the {len(test)} test "
                f"exams ({test_source}; e.g. exam {hits[0]}), so they are not unseen. Pretrain "
                f"{views[v].dataset_name} without them (`orthodiff pretrain -d "
                f"{views[v].dataset_name} --exclude-fold <test fold>` or --exclude-cases), train with "
                "--test-fold none, or accept it with --allow-pretraining-overlap (recorded in classifier.json)")
        if hits:
            log.warning("%s: the encoder saw %d test exams during pretraining (accepted by "
                        "--allow-pretraining-overlap; recorded)", v, len(hits))
    return overlap


# ----------------------------------------------------------------------------------------------
# nnU-Net's transforms and the loaders of a set of exams
def view_transforms(view: ViewData, mirror_axes: MirrorAxes = "lr", augment: bool = True):
    """``(initial patch, training transforms, validation transforms)`` of one view, nnU-Net's own.

    The rotation, dummy-2D augmentation and the larger initial patch (cropped after rotation) are
    decided by ``nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size`` for the
    view's configuration; mirroring is along ``mirror_axes`` (see the module docstring). Without
    ``augment`` both transforms are the validation transforms and the patch is the view's.
    """
    cm = view.configuration_manager
    shim = SimpleNamespace(configuration_manager=cm, print_to_log_file=lambda *a, **k: None)
    rotation, dummy_2d, initial_patch, all_axes = \
        nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(shim)
    mirror = {"lr": (view.lr_patch_axis(),), "all": tuple(all_axes), "none": None}[mirror_axes]
    lm = view.plans_manager.get_label_manager(view.dataset_json)
    val = nnUNetTrainer.get_validation_transforms(None, foreground_labels=lm.foreground_labels)
    if not augment:
        return view.patch_size, val, val
    train = nnUNetTrainer.get_training_transforms(
        cm.patch_size, rotation, None, mirror, dummy_2d, use_mask_for_norm=cm.use_mask_for_norm,
        foreground_labels=lm.foreground_labels)
    return tuple(int(x) for x in initial_patch), train, val


def exam_case_loaders(views: Mapping[str, ViewData], exams: Sequence[Exam], training: bool,
                      mirror_axes: MirrorAxes = "lr", augment: bool = True) -> dict[str, ExamCaseLoader]:
    """view -> :class:`ExamCaseLoader` of these exams' cases; views no exam has are left out.

    ``training``: nnU-Net's training transforms on the initial patch at random positions;
    otherwise the validation transforms on a centre crop of the view's patch.
    """
    out = {}
    for v, d in views.items():
        ids = sorted({e.cases[v] for e in exams if e.has(v)})
        if not ids:
            continue  # no exam has this view: the sampler returns zeros for it
        patch, tr, va = view_transforms(d, mirror_axes, augment)
        out[v] = ExamCaseLoader(d, ids, patch if training else d.patch_size, tr if training else va,
                                center_crop=not training)
    return out


def exam_augmenter(loader: MultiViewExamLoader, pin_memory: bool):
    """nnU-Net's augmenter running ``loader``: ``nnUNet_n_proc_DA`` worker processes, or in-process with 0."""
    n = get_allowed_n_proc_DA()
    if n == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(loader, None, n, num_cached=max(6, n // 2), seeds=None, pin_memory=pin_memory,
                                        wait_time=0.002)
