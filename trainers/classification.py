"""Multi-label abnormality classification on the diffusion encoders, with three-view fusion.

Why this is not an ``nnUNetTrainer`` subclass. An nnUNetTrainer is built around *one* dataset,
*one* configuration and a dense segmentation target: its ``__init__`` reads one plans/dataset.json
pair, its data loaders sample patches of one preprocessed folder, its validation is sliding-window
segmentation and its checkpoints describe one network. A fused exam-level classifier needs the same
exam from three datasets (sagittal, coronal, axial: three plans, three preprocessed folders,
three patch sizes), a missing view handled per exam, exam-level targets with unknowns, and
AUROC-based model selection. Forcing that through nnUNetTrainer would override nearly every method
and still carry three unused segmentation pipelines. So the trainer is a small class of its own
(``nnUNetTrainerOrthoDiffCls``, unique name, importable by bare module name) that *composes*
nnU-Net's pieces instead of copying them:

* per view, nnU-Net's ``PlansManager``/``ConfigurationManager`` of the ``3d_classification``
  configuration, its dataset class (``infer_dataset_class``: blosc2 or numpy) over the
  configuration's preprocessed folder, and :class:`ExamCaseLoader`, an ``nnUNetDataLoader`` that
  loads the case identifiers it is given (crop/pad to the patch, nnU-Net's transforms) instead of
  drawing its own;
* nnU-Net's training augmentation (``nnUNetTrainer.get_training_transforms``, with the rotation,
  dummy-2D and initial patch size decided by nnUNetTrainer's own
  ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``) and validation transforms;
* :class:`MultiViewExamLoader`, a batchgenerators ``DataLoader`` (so nnU-Net's
  ``SingleThreadedAugmenter``/``NonDetMultiThreadedAugmenter`` run it in worker processes,
  ``nnUNet_n_proc_DA`` workers) that samples *exams* and asks each view's loader for that exam's
  case: the batch is ``{"data": {view: (B, C, *patch)}, "present": (B, V), "target": (B, L),
  "keys": [exam, ...]}``, zeros where a view is missing;
* the network of :mod:`orthodiff_nnunet.networks.classifier` whose per-view encoders are the
  plans networks' encoders, filled by the encoder contract (``load_encoder``).

Mirroring: nnU-Net mirrors along every axis for segmentation. For exam-level labels a flip along
superior-inferior or anterior-posterior makes anatomy no knee has, so by default only the
left-right axis is mirrored (it maps a right knee onto a left one; medial/lateral labels keep
their meaning). ``mirror_axes="all"`` restores nnU-Net's choice.

Precision: on CUDA, ``precision="auto"`` times a few training steps of every precision the GPU
supports (:func:`precision_candidates`: fp32 and fp16 everywhere, tf32 and bf16 from compute
capability 8.0; autocast, fp16 with loss scaling) on the first real batch and keeps the fastest
(:func:`resolve_precision`; the pretraining measurements showed bf16 can be slower than fp32 for
these 3D networks, so it is measured, not assumed). CPU runs in fp32. The *resolved* precision is
what ``classifier.json`` and the checkpoints record, so prediction and ``--resume`` compute in the
precision the thresholds were chosen in. TF32 is switched on or off only inside the trainer's own
forward/backward passes (:func:`tf32_context` restores the caller's settings): no process-wide
default is changed.

Three patient-disjoint sets (:func:`three_way_split`): the network is trained on the *training*
exams, the checkpoint and the decision thresholds are chosen on the *selection* exams (fold ``k``'s
validation set of ``splits_final.json``) and the reported metrics come from the *test* exams
(by default the next fold's validation set, ``(k + 1) mod n``), never trained on, never used for
a choice. With only two folds the selection fold's patients are halved instead (selection | test,
patient-grouped). After every epoch the selection exams (centre crop, no augmentation) are
predicted; the checkpoint with the best mean AUROC over the labels (labels without both classes
among the selection exams are skipped) is kept as ``checkpoint_best.pth``, the per-label
thresholds are chosen on its selection predictions and applied unchanged to the test exams.

This module is imported by nnU-Net by bare module name through ``nnUNet_extTrainer``: absolute
imports only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
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
from torch import nn

from orthodiff_nnunet.conventions import CLS_CONFIG_FILE, CLS_THRESHOLDS_FILE
from orthodiff_nnunet.data.splits import label_fraction_subset
from orthodiff_nnunet.data.targets import Exam, TargetsFile, match_exams
from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.evaluation.classification import choose_thresholds, classification_metrics, mean_auroc
from orthodiff_nnunet.networks.build import architecture_hash, architecture_of
from orthodiff_nnunet.networks.classifier import MultiViewClassifier, build_classifier, load_timestep_film
from orthodiff_nnunet.networks.encoder_io import read_encoder_checkpoint
from orthodiff_nnunet.utils import atomic_write_json, atomic_write_text, save_figure, to_plain

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "orthodiff-classifier/1"
Mode = Literal["finetune", "probe", "scratch"]
MODES: tuple[str, ...] = ("finetune", "probe", "scratch")
Precision = Literal["auto", "fp32", "tf32", "bf16", "fp16"]
MirrorAxes = Literal["lr", "all", "none"]
LR_NUMPY_AXIS = 2  # canonical LPS numpy array (z=S, y=P, x=L): left-right is axis 2


class ClassificationError(OrthodiffError):
    """Classification training or prediction cannot go on; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# precision
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16")


def precision_candidates(device_type: str, capability: tuple[int, int] | None = None) -> tuple[str, ...]:
    """The precisions a device can train in, in measurement order.

    Args:
        device_type: ``"cuda"`` or ``"cpu"`` (anything but CUDA computes in fp32).
        capability: CUDA compute capability ``(major, minor)``, e.g. ``(8, 0)`` for an A100;
            TF32 and bfloat16 need 8.0 or newer (Ampere). None on CUDA: read from the current device.
    """
    if device_type != "cuda":
        return ("fp32",)
    if capability is None:
        capability = tuple(torch.cuda.get_device_capability())
    if tuple(capability) >= (8, 0):
        return PRECISIONS
    return ("fp32", "fp16")


def resolve_precision(requested: str, device_type: str, capability: tuple[int, int] | None = None,
                      timings_ms: Mapping[str, float] | None = None) -> str:
    """The precision a run computes in: never ``"auto"``.

    Args:
        requested: ``auto`` or one of :data:`PRECISIONS`.
        device_type: ``"cuda"`` or ``"cpu"``.
        capability: CUDA compute capability (see :func:`precision_candidates`).
        timings_ms: for ``auto`` on CUDA, measured milliseconds per training step of each
            precision; the fastest supported one wins (none measured: fp32).

    Raises:
        ClassificationError: an unknown name, or a fixed precision this GPU does not support.
    """
    if requested != "auto" and requested not in PRECISIONS:
        raise ClassificationError(f"precision {requested!r}: use auto or one of {', '.join(PRECISIONS)}")
    if device_type != "cuda":
        if requested not in ("auto", "fp32"):
            log.warning("precision %s applies to CUDA only: this %s run computes in fp32", requested, device_type)
        return "fp32"
    candidates = precision_candidates(device_type, capability)
    if requested != "auto":
        if requested not in candidates:
            raise ClassificationError(
                f"precision {requested} needs CUDA compute capability 8.0 or newer (this GPU: "
                f"{'.'.join(map(str, capability or torch.cuda.get_device_capability()))}): use "
                f"{' or '.join(candidates)}, or auto")
        return requested
    measured = {p: t for p, t in (timings_ms or {}).items() if p in candidates and math.isfinite(t)}
    return min(measured, key=measured.get) if measured else "fp32"


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of a precision on a device; None = no autocast (fp32/tf32, or not CUDA)."""
    if device_type != "cuda":
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


def _tf32_api() -> tuple[bool, bool]:
    """Whether the process uses the legacy TF32 switches (matmul, cuDNN); mixing them with the new
    ``fp32_precision`` ones raises in PyTorch, so whichever the process uses is the one touched."""
    try:
        torch.get_float32_matmul_precision()
        matmul_legacy = True
    except RuntimeError:
        matmul_legacy = False
    try:
        _ = torch.backends.cudnn.allow_tf32
        cudnn_legacy = True
    except RuntimeError:
        cudnn_legacy = False
    return matmul_legacy, cudnn_legacy


@contextlib.contextmanager
def tf32_context(enabled: bool):
    """TF32 matmul and cuDNN convolutions on (``enabled``) or off inside the block only.

    The caller's settings (``torch.set_float32_matmul_precision``, ``torch.backends.cudnn.allow_tf32``
    or their ``fp32_precision`` successors) are read first and put back on exit, exceptions
    included: training or predicting never changes a process-wide default.
    """
    matmul_legacy, cudnn_legacy = _tf32_api()
    matmul_before = (torch.get_float32_matmul_precision() if matmul_legacy
                     else torch.backends.cuda.matmul.fp32_precision)
    cudnn_before = torch.backends.cudnn.allow_tf32 if cudnn_legacy else torch.backends.cudnn.conv.fp32_precision
    try:
        if matmul_legacy:
            torch.set_float32_matmul_precision("high" if enabled else "highest")
        else:
            torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"
        if cudnn_legacy:
            torch.backends.cudnn.allow_tf32 = enabled
        else:
            torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
        yield
    finally:
        if matmul_legacy:
            torch.set_float32_matmul_precision(matmul_before)
        else:
            torch.backends.cuda.matmul.fp32_precision = matmul_before
        if cudnn_legacy:
            torch.backends.cudnn.allow_tf32 = cudnn_before
        else:
            torch.backends.cudnn.conv.fp32_precision = cudnn_before


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


def masked_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean binary cross-entropy over the *known* targets (NaN = unknown), per-label positive weights."""
    known = torch.isfinite(target)
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits.float(), torch.nan_to_num(target, nan=0.0), pos_weight=pos_weight, reduction="none")
    return (loss * known).sum() / known.sum().clamp_min(1)


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


# ----------------------------------------------------------------------------------------------
def _patient_clusters(exams) -> dict:
    """``classification_metrics`` keywords that make its bootstrap resample patients, not exams."""
    from orthodiff_nnunet.evaluation.classification import cluster_ids

    clusters, missing = cluster_ids([e.patient for e in exams], [e.exam for e in exams])
    return {"clusters": clusters, "n_without_patient": missing}


class nnUNetTrainerOrthoDiffCls:
    """Trains a multi-view classifier on the ``3d_classification`` configuration of each view's plans.

    Construct, set the public attributes below, then :meth:`initialize` and :meth:`run_training`
    (the ``orthodiff train cls`` API does this).

    Args:
        views: ordered view -> :class:`ViewData` (fusion order, e.g. sag, cor, ax).
        targets: view -> that dataset's targets file (exams are matched by their ``exam`` field).
        fold: cross-validation fold of ``splits_final.json`` whose validation exams are the selection set
            (or ``"all"``: train and select on all exams, no test set).
        output_folder: where checkpoints, thresholds, metrics and logs go.
        device: torch device.
    """

    def __init__(self, views: Mapping[str, ViewData], targets: Mapping[str, TargetsFile], fold: int | str,
                 output_folder: Path, device: torch.device = torch.device("cuda")) -> None:
        self.views: dict[str, ViewData] = dict(views)
        self.targets = dict(targets)
        self.fold = fold
        self.output_folder = Path(output_folder)
        self.device = torch.device(device)
        self.label_names: tuple[str, ...] = next(iter(self.targets.values())).label_names
        # method
        self.mode: Mode = "finetune"
        self.encoder_paths: dict[str, Path | None] = {}
        self.noise_timesteps: dict[str, int] = {}
        self.film = True  # the pretraining's timestep FiLM layers on the pretrained encoders (at t = noise timestep)
        self.fusion = "concat"
        self.feature_stages = 1
        self.dropout = 0.0
        # optimisation (the method: head learning rate, encoder at 0.05x)
        self.initial_lr = 1e-3
        self.encoder_lr_factor = 0.05
        self.weight_decay = 1e-4
        self.num_epochs = 50
        self.num_iterations_per_epoch = 50
        self.batch_size: int | None = None  # default: the classification configuration's batch size
        self.label_fraction = 1.0
        self.label_fraction_seed = 12345
        self.test_fold: TestFold = "auto"  # held-out test set: "auto" (next fold), a fold, or None
        self.allow_pretraining_overlap = False  # accept encoders pretrained on scans of the test exams
        self.pretraining_overlap: dict[str, int] = {}  # view -> test exams whose scan the encoder saw
        self.precision: Precision = "auto"  # what was asked for; resolved by choose_precision()
        self.precision_requested: Precision = "auto"
        self.mirror_axes: MirrorAxes = "lr"
        self.augment = True
        self.threshold_method = "youden"
        self.n_boot = 1000
        self.seed = 0
        # state
        self.network: MultiViewClassifier | None = None
        self.optimizer = None
        self.lr_scheduler = None
        self.grad_scaler = None
        self.current_epoch = 0
        self.best_metric = -math.inf
        self.best_epoch = -1
        self.history: list[dict] = []
        self.load_reports: dict[str, str] = {}
        self.precision_timings: dict[str, float] = {}
        self.exams_train: list[Exam] = []
        self.exams_selection: list[Exam] = []
        self.exams_test: list[Exam] = []
        self.split: ExamSplit | None = None
        self._train_gen = None
        self._schedule_cfg: dict[str, dict] | None = None
        self._film_cfg: dict[str, bool] | None = None

    # -- set-up ----------------------------------------------------------------------------------
    def config(self) -> dict:
        """Everything needed to rebuild the network and read new data the same way (saved with the model)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "trainer": type(self).__name__,
            "views": list(self.views),
            "datasets": {v: d.dataset_name for v, d in self.views.items()},
            "plans_identifiers": {v: d.plans_identifier for v, d in self.views.items()},
            "configuration": next(iter(self.views.values())).configuration,
            "architecture_hashes": {v: d.architecture_hash for v, d in self.views.items()},
            "num_input_channels": {v: d.num_input_channels for v, d in self.views.items()},
            "label_names": list(self.label_names),
            "mode": self.mode,
            "encoders": {v: (str(p) if p else None) for v, p in self.encoder_paths.items()},
            "pretraining_saw_test_exams": dict(self.pretraining_overlap),
            "noise_timesteps": {v: int(self.noise_timesteps.get(v, 0)) for v in self.views},
            "schedules": self.schedules(),
            "film": self.film_views(),
            "fusion": self.fusion,
            "feature_stages": self.feature_stages,
            "dropout": self.dropout,
            "fold": self.fold,
            "test_fold": self.test_fold,
            "sets": self._sets_record(),
            "label_fraction": self.label_fraction,
            "label_fraction_seed": self.label_fraction_seed,
            "precision": self.precision,
            "precision_requested": self.precision_requested,
            "precision_timings_ms": dict(self.precision_timings),
            "mirror_axes": self.mirror_axes,
            "threshold_method": self.threshold_method,
        }

    def schedules(self) -> dict[str, dict]:
        """Per view, the pretraining's noise schedule (from the encoder's provenance; cosine/1000 without one)."""
        if self._schedule_cfg is None:
            out = {}
            for v in self.views:
                path = self.encoder_paths.get(v)
                sched = {"name": "cosine", "num_steps": 1000}
                if path is not None and Path(path).is_file():
                    sched = dict(read_encoder_checkpoint(path)["provenance"].get("schedule") or sched)
                out[v] = sched
            self._schedule_cfg = out
        return self._schedule_cfg

    def film_views(self) -> dict[str, bool]:
        """Per view, whether the encoder carries the pretraining's timestep FiLM (pretrained encoders only)."""
        if self._film_cfg is None:
            self._film_cfg = {v: bool(self.film and self.mode != "scratch" and self.encoder_paths.get(v))
                              for v in self.views}
        return self._film_cfg

    def restore_config(self, cfg: Mapping) -> None:
        """Set the attributes of a trained model from its ``classifier.json`` (for prediction)."""
        if cfg.get("format") != CHECKPOINT_FORMAT:
            raise ClassificationError(f"not an orthodiff classifier configuration (format {cfg.get('format')!r})")
        self.mode = cfg["mode"]
        self.fusion = cfg["fusion"]
        self.feature_stages = int(cfg["feature_stages"])
        self.dropout = float(cfg.get("dropout", 0.0))
        self.noise_timesteps = {v: int(t) for v, t in cfg["noise_timesteps"].items()}
        self.precision = cfg.get("precision", "fp32")
        if self.precision not in PRECISIONS:  # written before the precision was resolved (older runs)
            log.warning("classifier.json records precision %r, not the precision the model was trained in: "
                        "predicting in fp32", self.precision)
            self.precision = "fp32"
        self.threshold_method = cfg.get("threshold_method", "youden")
        self._schedule_cfg = {v: dict(s) for v, s in cfg["schedules"].items()}
        self._film_cfg = {v: bool(f) for v, f in cfg["film"].items()}
        self.encoder_paths = {v: (Path(p) if p else None) for v, p in cfg.get("encoders", {}).items()}
        self.label_names = tuple(cfg["label_names"])

    def _sets_record(self) -> dict | None:
        if self.split is None:
            return None
        sp = self.split
        return {"selection_source": sp.selection_source, "test_source": sp.test_source,
                "num_exams": {"train": len(self.exams_train), "selection": len(self.exams_selection),
                              "test": len(self.exams_test)},
                "dropped_train_exams": len(sp.dropped_train)}

    def _split(self) -> None:
        """Train/selection/test exams (:func:`three_way_split` of splits_final.json, identical across views)."""
        available = {v: d.available_cases() for v, d in self.views.items()}
        exams = match_exams(self.targets, available)
        if not exams:
            raise ClassificationError(f"no preprocessed case of {[d.dataset_name for d in self.views.values()]} has "
                                      "targets: check the datasets' orthodiff_targets.json")
        by_exam = {e.exam: e for e in exams}
        if self.fold == "all":
            if self.test_fold not in (None, "auto"):
                raise ClassificationError("--test-fold needs a numbered fold, not 'all'")
            log.warning("fold 'all': no held-out test set, and the checkpoint and thresholds are chosen on the "
                        "training exams (optimistic)")
            ids = tuple(sorted(by_exam))
            self.split = ExamSplit(ids, ids, (), "all exams (fold 'all': the training exams)", "none")
        else:
            folds = [{part: [e for e in f[part] if e in by_exam] for part in ("train", "val")}
                     for f in self._splits()]
            self.split = three_way_split(folds, int(self.fold), self.test_fold,
                                         {e: x.patient for e, x in by_exam.items()},
                                         {e: x.site for e, x in by_exam.items()})
        usable = [by_exam[e] for e in self.split.train if np.isfinite(by_exam[e].targets).any()]
        if self.label_fraction < 1:
            sites = {e.exam: e.site or "?" for e in usable}
            keep = set(label_fraction_subset([e.exam for e in usable], sites, self.label_fraction, self.label_fraction_seed))
            usable = [e for e in usable if e.exam in keep]
        self.exams_train = usable
        self.exams_selection = [by_exam[e] for e in self.split.selection]
        self.exams_test = [by_exam[e] for e in self.split.test]
        if not self.exams_train or not self.exams_selection:
            raise ClassificationError(f"fold {self.fold}: {len(self.exams_train)} training and "
                                      f"{len(self.exams_selection)} selection exams with targets; need at least one "
                                      "of each")
        missing = sum(len(e.missing_views(self.views)) > 0 for e in exams)
        log.info("exams: %d train, %d selection (%s), %d test (%s); %d with a missing view", len(self.exams_train),
                 len(self.exams_selection), self.split.selection_source, len(self.exams_test),
                 self.split.test_source, missing)

    def _splits(self) -> list[dict]:
        """Fold list in exam ids; the views' splits must agree on every exam."""
        merged: list[dict[str, set[str]]] | None = None
        for v, d in self.views.items():
            f = d.preprocessed_folder / "splits_final.json"
            if not f.is_file():
                raise ClassificationError(f"{f} not found: plan_and_preprocess copies the converter's splits there "
                                          "(or train with --fold all)")
            case_exam = {c: ct.exam for c, ct in self.targets[v].cases.items()}
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

    def _transforms(self, view: ViewData):
        cm = view.configuration_manager
        shim = SimpleNamespace(configuration_manager=cm, print_to_log_file=lambda *a, **k: None)
        rotation, dummy_2d, initial_patch, all_axes = \
            nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(shim)
        mirror = {"lr": (view.lr_patch_axis(),), "all": tuple(all_axes), "none": None}[self.mirror_axes]
        lm = view.plans_manager.get_label_manager(view.dataset_json)
        val = nnUNetTrainer.get_validation_transforms(None, foreground_labels=lm.foreground_labels)
        if not self.augment:
            return view.patch_size, val, val
        train = nnUNetTrainer.get_training_transforms(
            cm.patch_size, rotation, None, mirror, dummy_2d, use_mask_for_norm=cm.use_mask_for_norm,
            foreground_labels=lm.foreground_labels)
        return tuple(int(x) for x in initial_patch), train, val

    def _loaders(self, exams: Sequence[Exam], training: bool) -> dict[str, ExamCaseLoader]:
        out = {}
        for v, d in self.views.items():
            ids = sorted({e.cases[v] for e in exams if e.has(v)})
            if not ids:
                continue  # no exam has this view: the sampler returns zeros for it
            patch, tr, va = self._transforms(d)
            out[v] = ExamCaseLoader(d, ids, patch if training else d.patch_size, tr if training else va,
                                    center_crop=not training)
        return out

    def _channels(self) -> dict[str, int]:
        return {v: d.num_input_channels for v, d in self.views.items()}

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {v: (d.num_input_channels, *d.patch_size) for v, d in self.views.items()}

    def build_network(self) -> MultiViewClassifier:
        """The classifier of these views and settings (weights freshly initialised)."""
        return build_classifier(
            {v: d.plans for v, d in self.views.items()}, next(iter(self.views.values())).configuration,
            self._channels(), len(self.label_names), fusion=self.fusion, feature_stages=self.feature_stages,
            noise_timesteps=self.noise_timesteps, schedules=self.schedules(), film=self.film_views(),
            dropout=self.dropout)

    def _check_pretraining_overlap(self) -> None:
        """Refuse encoders whose pretraining saw a scan of a test exam (unless the user accepts it).

        Pretraining uses no labels, but a test scan it was trained on is no longer unseen: the
        reported test figures would be optimistic. The encoder's provenance lists the cases it was
        trained on (``train_cases``); an encoder without that list is accepted with a warning.
        """
        from orthodiff_nnunet.networks.encoder_io import read_encoder_checkpoint

        for v, path in sorted(self.encoder_paths.items()):
            if path is None or not self.exams_test:
                continue
            prov = read_encoder_checkpoint(path).get("provenance") or {}
            if "train_cases" not in prov:
                log.warning("%s: encoder %s does not record the scans it was pretrained on; cannot check that the "
                            "test exams were unseen", v, path)
                continue
            seen = set(prov["train_cases"])
            hits = sorted(e.exam for e in self.exams_test if e.has(v) and e.cases[v] in seen)
            self.pretraining_overlap[v] = len(hits)
            if hits and not self.allow_pretraining_overlap:
                raise ClassificationError(
                    f"the {v} encoder {path} was pretrained on scans of {len(hits)} of the {len(self.exams_test)} test "
                    f"exams ({self.split.test_source}; e.g. exam {hits[0]}), so they are not unseen. Pretrain "
                    f"{self.views[v].dataset_name} without them (`orthodiff pretrain -d "
                    f"{self.views[v].dataset_name} --exclude-fold <test fold>` or --exclude-cases), train with "
                    "--test-fold none, or accept it with --allow-pretraining-overlap (recorded in classifier.json)")
            if hits:
                log.warning("%s: the encoder saw %d test exams during pretraining (accepted by "
                            "--allow-pretraining-overlap; recorded)", v, len(hits))

    def _load_encoders(self) -> None:
        self._check_pretraining_overlap()
        for v, branch in self.network.branches.items():
            path = self.encoder_paths.get(v)
            if path is None:
                raise ClassificationError(f"mode {self.mode!r} needs a pretrained encoder for view {v}: pass "
                                          f"--encoder {v}=PATH, --encoders-from DATASET, or run `orthodiff pretrain` "
                                          f"on {self.views[v].dataset_name}")
            text = load_timestep_film(branch, path, self.views[v].architecture_hash)
            self.load_reports[v] = text
            log.info("%s: %s", v, text)

    def initialize(self) -> None:
        """Split, build the network, load encoders, optimizer, data loaders; check everything first."""
        if self.mode not in MODES:
            raise ClassificationError(f"mode {self.mode!r}: use one of {', '.join(MODES)}")
        if not 0 < self.label_fraction <= 1:
            raise ClassificationError(f"--label-fraction {self.label_fraction} must be in (0, 1]")
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        self._split()
        if self.mode == "scratch":
            self.encoder_paths = {}
        self.network = self.build_network()
        if self.mode != "scratch":
            self._load_encoders()
        self.network.to(self.device)
        enc = self.network.encoder_parameters()
        if self.mode == "probe":
            for p in enc:
                p.requires_grad_(False)
            groups = [{"params": self.network.head_parameters(), "lr": self.initial_lr}]
        else:
            factor = self.encoder_lr_factor if self.mode == "finetune" else 1.0
            groups = [{"params": self.network.head_parameters(), "lr": self.initial_lr},
                      {"params": enc, "lr": self.initial_lr * factor}]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=self.weight_decay)
        total = max(1, self.num_epochs * self.num_iterations_per_epoch)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: (1 - min(step, total - 1) / total) ** 0.9)
        self.pos_weight = self._pos_weight().to(self.device)
        if self.batch_size is None:
            self.batch_size = max(2, min(int(d.configuration_manager.batch_size) for d in self.views.values()))
        self.output_folder.mkdir(parents=True, exist_ok=True)
        for v, d in self.views.items():
            atomic_write_json(self.output_folder / f"plans_{v}.json", d.plans)
        atomic_write_json(self.output_folder / "split.json", {
            "note": "exam ids (pseudonyms) of each set; the three sets share no patient",
            "fold": self.fold, "test_fold": self.test_fold, **(self._sets_record() or {}),
            "train": [e.exam for e in self.exams_train], "selection": [e.exam for e in self.exams_selection],
            "test": [e.exam for e in self.exams_test]})
        # classifier.json is written by run_training() once the precision is resolved (never "auto")

    def write_config(self) -> None:
        """``classifier.json``: the settings of this model, with the precision it computes in."""
        if self.precision not in PRECISIONS:
            raise RuntimeError("the precision is not resolved yet: call choose_precision() first")
        atomic_write_json(self.output_folder / CLS_CONFIG_FILE, self.config())

    def _pos_weight(self) -> torch.Tensor:
        """Per-label negatives/positives over the training exams (1 without positives, at most 100)."""
        y = np.stack([e.targets for e in self.exams_train]).astype(np.float64)
        pos = np.nansum(y, axis=0)
        neg = np.sum(np.isfinite(y), axis=0) - pos
        w = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
        return torch.tensor(np.clip(w, 1e-2, 100.0), dtype=torch.float32)

    # -- precision -------------------------------------------------------------------------------
    def _autocast(self, precision: str | None = None):
        """Autocast of ``precision`` (default the run's) on this device; disabled for fp32/tf32 and off CUDA."""
        dtype = autocast_dtype(precision or self.precision, self.device.type)
        if dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)

    def _tf32(self, precision: str | None = None):
        """TF32 on (tf32) or off (the others) for this block only, on CUDA; nothing elsewhere."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return tf32_context((precision or self.precision) == "tf32")

    def _capability(self) -> tuple[int, int] | None:
        return tuple(torch.cuda.get_device_capability(self.device)) if self.device.type == "cuda" else None

    def runtime_precision(self, recorded: str) -> str:
        """The precision this device computes a model recorded in ``recorded`` in: the same where the device
        supports it (prediction, resume), else fp32 with a warning (e.g. a bf16 model on a CPU)."""
        if recorded in precision_candidates(self.device.type, self._capability()):
            return recorded
        log.warning("the model was trained in %s, which this %s does not run: computing in fp32 (probabilities "
                    "may differ slightly from the training run's)", recorded, self.device.type)
        return "fp32"

    def choose_precision(self, batch: dict, steps: int = 3) -> str:
        """Resolve ``self.precision`` (:func:`resolve_precision`): fp32 off CUDA, a fixed choice as given,
        ``auto`` on CUDA the fastest supported precision measured on ``batch`` (weights and optimizer
        state are put back after the measurement)."""
        self.precision_requested = self.precision
        capability = self._capability()
        if self.device.type != "cuda" or self.precision != "auto":
            self.precision = resolve_precision(self.precision, self.device.type, capability)
            return self.precision
        saved = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        saved_opt = copy.deepcopy(self.optimizer.state_dict())
        for p in precision_candidates(self.device.type, capability):
            try:
                for i in range(steps + 1):
                    if i == 1:
                        torch.cuda.synchronize(self.device)
                        start = time.perf_counter()
                    self._forward_backward(batch, p, step=False)
                torch.cuda.synchronize(self.device)
                self.precision_timings[p] = 1000 * (time.perf_counter() - start) / steps
            except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. a kernel missing for this GPU
                log.warning("precision %s failed in the measurement: %s", p, exc)
        self.network.load_state_dict(saved)
        self.optimizer.load_state_dict(saved_opt)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision = resolve_precision("auto", self.device.type, capability, self.precision_timings)
        log.info("precision by measurement (ms per step): %s -> %s",
                 ", ".join(f"{k} {v:.1f}" for k, v in self.precision_timings.items()), self.precision)
        return self.precision

    # -- steps -----------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
        nb = self.device.type == "cuda"
        data = {v: x.to(self.device, non_blocking=nb) for v, x in batch["data"].items()}
        return data, batch["present"].to(self.device), batch["target"].to(self.device, non_blocking=nb)

    def _forward_backward(self, batch: dict, precision: str, step: bool = True) -> torch.Tensor:
        with self._tf32(precision):
            return self._forward_backward_inner(batch, precision, step)

    def _forward_backward_inner(self, batch: dict, precision: str, step: bool) -> torch.Tensor:
        data, present, target = self._to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast(precision):
            logits = self.network(data, present)
        loss = masked_bce(logits, target, self.pos_weight)
        scaler = self.grad_scaler if precision == "fp16" else None
        if precision == "fp16" and scaler is None:
            scaler = torch.amp.GradScaler("cuda")
        if scaler is not None:
            scaler.scale(loss).backward()
            if step:
                scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
                scaler.step(self.optimizer)
                scaler.update()
        else:
            loss.backward()
            if step:
                torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
                self.optimizer.step()
        return loss.detach()

    def _train_mode(self) -> None:
        self.network.train()
        if self.mode == "probe":
            for b in self.network.branches.values():
                b.encoder.eval()

    def train_step(self, batch: dict) -> float:
        self._train_mode()
        loss = self._forward_backward(batch, self.precision)
        self.lr_scheduler.step()
        return float(loss)

    @torch.no_grad()
    def predict_exams(self, exams: Sequence[Exam], batch_size: int | None = None) -> np.ndarray:
        """``(N, L)`` probabilities of ``exams`` (centre crop, no augmentation, deterministic noise)."""
        self.network.eval()
        loader = MultiViewExamLoader(exams, self._loaders(exams, training=False), self._shapes(),
                                     batch_size or self.batch_size, False)
        out = []
        bs = batch_size or self.batch_size
        for i in range(0, len(exams), bs):
            batch = loader.collate(exams[i:i + bs])
            data, present, _ = self._to_device(batch)
            with self._tf32(), self._autocast():
                out.append(torch.sigmoid(self.network(data, present).float()).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.label_names)), dtype=np.float32)

    # -- training loop ---------------------------------------------------------------------------
    def _start_augmenter(self):
        dl = MultiViewExamLoader(self.exams_train, self._loaders(self.exams_train, training=True), self._shapes(),
                                 self.batch_size)
        n = get_allowed_n_proc_DA()
        if n == 0:
            return SingleThreadedAugmenter(dl, None)
        return NonDetMultiThreadedAugmenter(dl, None, n, num_cached=max(6, n // 2), seeds=None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    def validate(self) -> dict:
        """Mean AUROC and BCE of the selection exams (the model-selection criterion)."""
        y = np.stack([e.targets for e in self.exams_selection])
        p = self.predict_exams(self.exams_selection)
        known = np.isfinite(y)
        eps = 1e-6
        bce = -(np.nan_to_num(y) * np.log(p + eps) + (1 - np.nan_to_num(y)) * np.log(1 - p + eps))
        return {"selection_mean_auroc": mean_auroc(y, p),
                "selection_loss": float((bce * known).sum() / max(known.sum(), 1))}

    def run_training(self) -> None:
        """Epochs of ``num_iterations_per_epoch`` steps, the selection exams predicted after each (best checkpoint
        by their mean AUROC), best/latest/final checkpoints; ``classifier.json`` once the precision is resolved."""
        if self.network is None:
            raise RuntimeError("call initialize() first")
        self._train_gen = self._start_augmenter()
        try:
            if self.current_epoch == 0:
                self.choose_precision(next(self._train_gen))
                if self.precision == "fp16":
                    self.grad_scaler = torch.amp.GradScaler("cuda")
            elif self.precision not in PRECISIONS:  # resumed from a checkpoint that did not record it
                self.precision = resolve_precision(self.precision, self.device.type, self._capability())
            self.write_config()
            from tqdm import tqdm

            from orthodiff_nnunet.console import BAR_FORMAT

            per_epoch = int(self.num_iterations_per_epoch)
            progress = tqdm(total=int(self.num_epochs) * per_epoch, initial=int(self.current_epoch) * per_epoch,
                            unit="it", desc="train cls", mininterval=1.0, dynamic_ncols=True, bar_format=BAR_FORMAT)
            while self.current_epoch < self.num_epochs:
                start = time.perf_counter()
                losses = []
                for _ in range(per_epoch):
                    losses.append(self.train_step(next(self._train_gen)))
                    progress.set_postfix(epoch=self.current_epoch, loss=f"{losses[-1]:.3f}", refresh=False)
                    progress.update(1)
                train_seconds = time.perf_counter() - start
                row = {"epoch": self.current_epoch, "train_loss": float(np.mean(losses)), **self.validate(),
                       "lr": self.optimizer.param_groups[0]["lr"],
                       "train_exams_per_s": self.num_iterations_per_epoch * self.batch_size / max(train_seconds, 1e-9),
                       "seconds": time.perf_counter() - start}
                self.history.append(row)
                metric = row["selection_mean_auroc"]
                improved = not math.isnan(metric) and metric > self.best_metric
                if improved:
                    self.best_metric, self.best_epoch = metric, self.current_epoch
                self.current_epoch += 1
                if improved:
                    self.save_checkpoint(self.output_folder / "checkpoint_best.pth")
                self.save_checkpoint(self.output_folder / "checkpoint_latest.pth")
                self._write_progress()
                log.info("epoch %d: train loss %.4f, selection loss %.4f, selection mean AUROC %.3f%s (%.1f s)",
                         row["epoch"], row["train_loss"], row["selection_loss"], metric, " (best)" if improved else "", row["seconds"])
            progress.close()
            self.save_checkpoint(self.output_folder / "checkpoint_final.pth")
            if self.best_epoch < 0:  # AUROC undefined on validation every epoch: keep the final weights
                log.warning("the selection exams' AUROC was undefined in every epoch (one class only?): the final "
                            "weights are used as the best checkpoint")
                self.save_checkpoint(self.output_folder / "checkpoint_best.pth")
        finally:
            if isinstance(self._train_gen, NonDetMultiThreadedAugmenter):
                self._train_gen._finish()
            self._train_gen = None

    def _write_progress(self) -> None:
        keys = list(self.history[0])
        rows = [",".join(keys)] + [",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
                                   for r in self.history]
        atomic_write_text(self.output_folder / "progress.csv", "\n".join(rows) + "\n")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            ep = [r["epoch"] for r in self.history]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(ep, [r["train_loss"] for r in self.history], label="train loss")
            ax.plot(ep, [r["selection_loss"] for r in self.history], label="selection loss")
            ax.set_xlabel("epoch")
            ax.set_ylabel("BCE")
            ax2 = ax.twinx()
            ax2.plot(ep, [r["selection_mean_auroc"] for r in self.history], "g--", label="selection mean AUROC")
            ax2.set_ylim(0, 1)
            ax2.set_ylabel("mean AUROC")
            fig.legend(loc="lower left", fontsize=8)
            fig.tight_layout()
            save_figure(fig, self.output_folder / "progress.png")
        except Exception as exc:  # a plot must never stop training
            log.debug("progress plot failed: %s", exc)

    # -- after training --------------------------------------------------------------------------
    def finish(self) -> dict:
        """Best weights -> selection predictions -> thresholds -> the same thresholds on the test exams.

        Writes ``thresholds.json`` (chosen on the selection exams only), ``predictions.csv`` (selection
        and test exams, column ``set``), ``metrics.json`` (``selection`` and ``test`` metrics apart)
        and, with a test set, ``test_predictions.csv`` and ``test_metrics.{json,md}`` (test exams only).

        Returns:
            ``thresholds``, ``selection`` (metrics), and with a test set ``test`` (metrics) and
            ``test_exams_per_s``.
        """
        self.load_checkpoint(self.output_folder / "checkpoint_best.pth", weights_only=True)
        views = list(self.views)
        y_sel = np.stack([e.targets for e in self.exams_selection])
        p_sel = self.predict_exams(self.exams_selection)
        thresholds = choose_thresholds(y_sel, p_sel, self.label_names, self.threshold_method)
        source = self.split.selection_source if self.split else f"fold {self.fold} validation"
        atomic_write_json(self.output_folder / CLS_THRESHOLDS_FILE,
                          {"method": self.threshold_method, "chosen_on": "selection",
                           "selection_source": source, "num_exams": len(self.exams_selection),
                           "checkpoint": "checkpoint_best.pth", "thresholds": thresholds})
        selection = classification_metrics(y_sel, p_sel, self.label_names, thresholds, self.n_boot, self.seed,
                                           **_patient_clusters(self.exams_selection))
        out = {"thresholds": thresholds, "selection": selection}
        record = {"selection": {"note": "the checkpoint and the thresholds were chosen on these exams: optimistic, "
                                        "not an estimate of performance on new exams",
                                "source": source, **selection.to_dict()},
                  "test": None, "sets": self._sets_record()}
        exams, probs = list(self.exams_selection), [p_sel]
        if self.exams_test:
            y_t = np.stack([e.targets for e in self.exams_test])
            start = time.perf_counter()
            p_t = self.predict_exams(self.exams_test)
            out["test_exams_per_s"] = len(self.exams_test) / max(time.perf_counter() - start, 1e-9)
            out["test"] = classification_metrics(y_t, p_t, self.label_names, thresholds, self.n_boot, self.seed,
                                                 **_patient_clusters(self.exams_test))
            record["test"] = {"note": "held out: never trained on, never used to choose the checkpoint or the "
                                      "thresholds (applied unchanged from the selection exams)",
                              "source": self.split.test_source if self.split else "", **out["test"].to_dict()}
            write_predictions_csv(self.output_folder / "test_predictions.csv", self.exams_test, p_t,
                                  self.label_names, thresholds, views, sets={e.exam: "test" for e in self.exams_test})
            atomic_write_json(self.output_folder / "test_metrics.json", out["test"].to_dict())
            atomic_write_text(self.output_folder / "test_metrics.md", out["test"].to_markdown() + "\n")
            exams += self.exams_test
            probs.append(p_t)
        sets = {**{e.exam: "selection" for e in self.exams_selection}, **{e.exam: "test" for e in self.exams_test}}
        write_predictions_csv(self.output_folder / "predictions.csv", exams, np.concatenate(probs), self.label_names,
                              thresholds, views, sets=sets)
        atomic_write_json(self.output_folder / "metrics.json", record)
        return out

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, path: Path) -> None:
        """Atomic: written to a temporary name, then renamed."""
        payload = {
            "format": CHECKPOINT_FORMAT, "config": to_plain(self.config()), "network_weights": self.network.state_dict(),
            "optimizer_state": self.optimizer.state_dict() if self.optimizer else None,
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler else None,
            "lr_scheduler_state": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
            "current_epoch": self.current_epoch, "best_metric": self.best_metric, "best_epoch": self.best_epoch,
            "history": to_plain(self.history), "load_reports": to_plain(self.load_reports),
            "precision_timings": to_plain(self.precision_timings),
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: Path, weights_only: bool = False) -> None:
        ckpt = read_classifier_checkpoint(path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ClassificationError(f"{path} is not an orthodiff classifier checkpoint")
        self.network.load_state_dict(ckpt["network_weights"])
        if weights_only:
            return
        recorded = (ckpt.get("config") or {}).get("precision")
        if recorded in PRECISIONS:  # resume in the precision the run was trained (and measured) in
            if self.precision not in ("auto", recorded):
                log.warning("--precision %s ignored: %s was trained in %s and resumes in it", self.precision, path,
                            recorded)
            self.precision_requested = (ckpt.get("config") or {}).get("precision_requested", recorded)
            self.precision = self.runtime_precision(recorded)
            self.precision_timings = dict(ckpt.get("precision_timings") or {})
        if self.precision == "fp16" and self.grad_scaler is None and self.device.type == "cuda":
            self.grad_scaler = torch.amp.GradScaler("cuda")
        if ckpt.get("optimizer_state"):
            self.optimizer.load_state_dict(ckpt["optimizer_state"])
        if ckpt.get("lr_scheduler_state"):
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler_state"])
        if ckpt.get("grad_scaler_state") and self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(ckpt["grad_scaler_state"])
        self.current_epoch = ckpt["current_epoch"]
        self.best_metric, self.best_epoch = ckpt["best_metric"], ckpt["best_epoch"]
        renamed = {"val_mean_auroc": "selection_mean_auroc", "val_loss": "selection_loss"}  # runs before the rename
        self.history = [{renamed.get(k, k): v for k, v in row.items()} for row in ckpt["history"]]


def read_classifier_checkpoint(path: Path) -> dict:
    """A classifier checkpoint's payload, loaded with ``weights_only=True`` (tensors and plain values only).

    Raises:
        ClassificationError: naming the file when it is not a plain orthodiff classifier checkpoint.
    """
    from orthodiff_nnunet.networks.encoder_io import safe_torch_load

    payload = safe_torch_load(Path(path), "classifier checkpoint", ClassificationError)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ClassificationError(f"{path} is not an orthodiff classifier checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def write_predictions_csv(path: Path, exams: Sequence[Exam], probs: np.ndarray, label_names: Sequence[str],
                          thresholds: Mapping[str, float], views: Sequence[str],
                          sets: Mapping[str, str] | None = None) -> Path:
    """One row per exam: ids, site facts, views present/missing, ``p_<label>``, ``pred_<label>``, ``target_<label>``.

    With ``sets`` (exam -> ``selection``/``test``) a ``set`` column follows ``exam``: which set of the
    training run the exam belongs to.
    """
    import csv
    import io

    buf = io.StringIO()
    cols = (["exam"] + (["set"] if sets is not None else []) + ["site", "field_strength_t", "vendor", "views_present",
                                                                "views_missing"]
            + [f"p_{n}" for n in label_names] + [f"pred_{n}" for n in label_names] + [f"target_{n}" for n in label_names])
    w = csv.writer(buf)
    w.writerow(cols)
    for e, p in zip(exams, probs):
        targets = ["" if not np.isfinite(t) else int(t) for t in e.targets]
        w.writerow([e.exam] + ([sets[e.exam]] if sets is not None else [])
                   + [e.site or "", "" if e.field_strength_t is None else f"{e.field_strength_t:g}", e.vendor or "",
                      " ".join(v for v in views if e.has(v)), " ".join(e.missing_views(views))]
                   + [f"{x:.6f}" for x in p] + [int(x >= thresholds[n]) for x, n in zip(p, label_names)] + targets)
    atomic_write_text(Path(path), buf.getvalue())
    return Path(path)
