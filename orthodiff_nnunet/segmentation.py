"""``orthodiff train seg`` and ``orthodiff predict seg``: warm-started nnU-Net segmentation.

Training runs :class:`~orthodiff_nnunet.trainers.segmentation.nnUNetTrainerOrthoDiffSeg` (encoder
from the diffusion pretraining) or its from-scratch twin ``nnUNetTrainerOrthoDiffSegScratch`` on
the dataset's ``3d_fullres`` configuration; prediction runs nnU-Net's ``nnUNetPredictor`` on the
trained model folder. Everything else is nnU-Net's.

Where the models go (every variant is a complete, standard nnU-Net results tree, so nnU-Net's own
tools work on each unchanged):

* the init is the trainer's class name, i.e. part of nnU-Net's model folder name:
  ``<results>/<Dataset>/nnUNetTrainerOrthoDiffSeg__<plans>__3d_fullres/fold_0`` (diffusion) beside
  ``<results>/<Dataset>/nnUNetTrainerOrthoDiffSegScratch__<plans>__3d_fullres/fold_0`` (scratch);
* ``<results>`` is ``nnUNet_results`` for all the labels, and its subfolder
  ``label_fraction_<F>`` (``label_fraction_<F>_seed<S>`` for a non-default seed) for a label
  fraction ``F < 1``, so that ``nnUNet_results=$nnUNet_results/label_fraction_0.1 nnUNetv2_predict
  -d ... -tr nnUNetTrainerOrthoDiffSeg ...`` finds the 10% model.

Each fold folder holds ``orthodiff_seg_run.json``: init, encoder and its provenance, label fraction,
seed, the training cases used and the schedule.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from unittest import mock

from orthodiff_nnunet import paths
from orthodiff_nnunet.data.splits import SPLIT_SEED
from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.console import output_to_log
from orthodiff_nnunet.conventions import (
    SEG_RUN_RECORD,
    SEG_TRAINER_OF_INIT,
    SEGMENTATION_CONFIGURATION,
    default_encoder_path,
    find_plans,
    resolve_device,
)
from orthodiff_nnunet.utils import nnunet_stdout_to_log, seed_everything

if TYPE_CHECKING:
    from orthodiff_nnunet.io.dicom_seg import DicomSegExport

log = logging.getLogger(__name__)

Init = Literal["diffusion", "scratch"]
Fold = int | Literal["all"]
NNUNET_CONSOLE_LOG = "nnunet_console.log"  # nnU-Net's console output of a quiet run, beside its training log
_EXT_TRAINER_ENV = "nnUNet_extTrainer"
#: the optimizers ``train seg`` offers (the trainer's ``OPTIMIZERS``) and the initial learning rate of each when
#: none is given: nnU-Net's 1e-2 for its SGD; 3e-3 for AdamW
#: (on the demo's phantom it learnt bones in 100-200 iterations, docs/DEMO.md)
DEFAULT_LEARNING_RATES = {"sgd": 1e-2, "adamw": 3e-3}

__all__ = [
    "SegmentationError",
    "SegmentationPredictResult",
    "SegmentationTrainResult",
    "export_dicom_segs_of",
    "model_folder",
    "predict_segmentation",
    "results_root_for",
    "train_segmentation",
    "trainers_folder",
]


class SegmentationError(OrthodiffError):
    """Segmentation training or prediction cannot go on; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# results
@dataclass
class SegmentationTrainResult:
    """What a training run wrote and measured.

    Attributes:
        model_folder: nnU-Net model folder (``<Trainer>__<plans>__<configuration>``), usable by
            ``orthodiff predict seg -m`` and nnU-Net's predictors.
        output_folder: the fold folder inside it (checkpoints, logs, ``validation/``).
        results_root: the ``nnUNet_results`` tree the model folder belongs to.
        run_record: ``orthodiff_seg_run.json`` (init, encoder, label fraction, seed, cases, schedule).
        validation_summary: nnU-Net's ``validation/summary.json``, None without validation.
        dice: validation Dice per structure name (mean over validation cases).
        mean_dice: nnU-Net's foreground mean Dice.
        train_loss: the last epoch's mean training loss (nnU-Net's Dice + cross-entropy, deep supervision).
        pseudo_dice: nnU-Net's EMA pseudo Dice of the last epoch (validation patches, foreground mean).
        console_log: where nnU-Net's console output went (None: to the console).
    """

    model_folder: Path
    output_folder: Path
    results_root: Path
    run_record: dict
    validation_summary: Path | None = None
    dice: dict[str, float] = field(default_factory=dict)
    mean_dice: float | None = None
    train_loss: float | None = None
    pseudo_dice: float | None = None
    console_log: Path | None = None

    @property
    def checkpoint(self) -> Path:
        return self.output_folder / "checkpoint_final.pth"

    def summary(self) -> str:
        r = self.run_record
        lines = [f"segmentation training done ({r['init']} init, label fraction {r['label_fraction']:g}: "
                 f"{len(r['training_cases'])} training cases, fold {r['fold']})",
                 f"model folder: {self.model_folder}"]
        if self.train_loss is not None:
            lines.append(f"last epoch: train loss {self.train_loss:.4f}, pseudo Dice "
                         f"{'n/a' if self.pseudo_dice is None else format(self.pseudo_dice, '.4f')}")
        if self.console_log is not None:
            lines.append(f"nnU-Net's output: {self.console_log}")
        if r.get("encoder"):
            lines.append(f"encoder: {r['encoder']}")
        if self.validation_summary is not None:
            lines.append(f"validation: {self.validation_summary} (mean foreground Dice {self.mean_dice:.4f})")
            lines += [f"  {name:<20s} {d:.4f}" for name, d in self.dice.items()]
        return "\n".join(lines)


@dataclass
class SegmentationPredictResult:
    """Masks written by a prediction run (one per input case, on the input image's grid)."""

    output_folder: Path
    masks: list[Path]

    def summary(self) -> str:
        return f"{len(self.masks)} segmentation(s) written to {self.output_folder}"


# ----------------------------------------------------------------------------------------------
# helpers
def trainers_folder() -> Path:
    """The folder of orthodiff's trainer modules, for ``nnUNet_extTrainer``."""
    import orthodiff_nnunet.trainers as trainers

    return Path(trainers.__file__).resolve().parent


def _environment(**values: str) -> contextlib.AbstractContextManager:
    """Set environment variables for nnunetv2 (read at call time); the environment is restored afterwards."""
    return mock.patch.dict(os.environ, values)


def _with_our_trainers() -> contextlib.AbstractContextManager:
    """``nnUNet_extTrainer`` with orthodiff's trainers folder first, so nnU-Net finds them by name."""
    from nnunetv2.paths import nnUNet_extTrainer

    current = [p for p in (nnUNet_extTrainer.get() or "").split(os.pathsep) if p]
    ours = str(trainers_folder())
    return _environment(**{_EXT_TRAINER_ENV: os.pathsep.join([ours] + [p for p in current if p != ours])})


def _parse_fold(fold: int | str) -> Fold:
    if isinstance(fold, str) and fold.strip().lower() == "all":
        return "all"
    try:
        value = int(fold)
    except (TypeError, ValueError) as exc:
        raise SegmentationError(f"fold {fold!r}: give a fold number (0-4) or 'all'") from exc
    if value < 0:
        raise SegmentationError(f"fold {value}: give a fold number (0-4) or 'all'")
    return value


def results_root_for(label_fraction: float = 1.0, seed: int = SPLIT_SEED, results: Path | None = None) -> Path:
    """The ``nnUNet_results`` tree of a label fraction (``nnUNet_results`` itself for 1)."""
    base = paths.results_dir(results)
    if not 0 < label_fraction <= 1:
        raise SegmentationError(f"--label-fraction {label_fraction}: give a fraction in (0, 1]")
    if label_fraction == 1:
        return base
    suffix = "" if int(seed) == SPLIT_SEED else f"_seed{int(seed)}"
    return base / f"label_fraction_{label_fraction:g}{suffix}"


def model_folder(dataset: int | str, init: Init = "diffusion", plans: str | None = None,
                 configuration: str = SEGMENTATION_CONFIGURATION, label_fraction: float = 1.0,
                 seed: int = SPLIT_SEED) -> Path:
    """The nnU-Net model folder that :func:`train_segmentation` writes for these settings."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name


    if init not in SEG_TRAINER_OF_INIT:
        raise SegmentationError(f"--init {init!r}: use one of {', '.join(SEG_TRAINER_OF_INIT)}")
    name = maybe_convert_to_dataset_name(dataset)
    ident, _ = find_plans(name, plans)
    return results_root_for(label_fraction, seed) / name / f"{SEG_TRAINER_OF_INIT[init]}__{ident}__{configuration}"


def _resolve_dataset(dataset: int | str, orientation: str | None) -> str:
    """Dataset name; with ``orientation``, the dataset of that orientation in ``dataset``'s convert group."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from orthodiff_nnunet.pretraining import check_orientation

    if orientation is None:
        try:
            return maybe_convert_to_dataset_name(dataset)
        except RuntimeError as exc:
            raise SegmentationError(f"dataset {dataset}: {exc}") from exc
    try:
        raw = paths.raw_dir()
    except paths.PathsNotSetError:
        raw = None  # only preprocessed data here: -d must be the dataset itself
    if raw is not None:
        from orthodiff_nnunet.planning import resolve_datasets

        found = resolve_datasets([dataset], [orientation], raw)
        if len(found) != 1:
            raise SegmentationError(f"{len(found)} datasets of orientation {orientation} match {dataset}")
        name = found[0].name
    else:
        name = maybe_convert_to_dataset_name(dataset)
    check_orientation(name, orientation)
    return name


def _read_summary(summary: Path, dataset_json: dict) -> tuple[dict[str, float], float | None]:
    data = json.loads(summary.read_text())
    names = {str(v): k for k, v in dataset_json["labels"].items() if not isinstance(v, (list, tuple))}
    mean_of = data.get("mean", {})
    keys = sorted(mean_of, key=lambda k: (0, int(k)) if str(k).isdigit() else (1, str(k)))
    dice = {names.get(str(k), str(k)): float(mean_of[k]["Dice"]) for k in keys}
    mean = data.get("foreground_mean", {}).get("Dice")
    return dice, None if mean is None else float(mean)


# ----------------------------------------------------------------------------------------------
# training
def train_segmentation(
    dataset: int | str,
    *,
    fold: int | str = 0,
    init: Init = "diffusion",
    encoder: Path | None = None,
    label_fraction: float = 1.0,
    seed: int = SPLIT_SEED,
    orientation: str | None = None,
    plans: str | None = None,
    configuration: str = SEGMENTATION_CONFIGURATION,
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    val_iterations_per_epoch: int | None = None,
    learning_rate: float | None = None,
    optimizer: str = "sgd",
    warmup_epochs: int | None = None,
    freeze_encoder_epochs: int = 0,
    continue_training: bool = False,
    device: str = "auto",
    validate: bool = True,
    validation_mirroring: bool = True,
    checkpoint_minutes: float | None = None,
    channels_last: bool = False,
    run_seed: int | None = None,
    augmentation: str = "nnunet",
    quiet: bool = False,
) -> SegmentationTrainResult:
    """Train nnU-Net segmentation on labeled cases, warm-started from the diffusion encoder or from scratch.

    Long (about 100 lines) only because it documents its 24 parameters; the body is named steps.

    Args:
        dataset: dataset id or name (one orientation), preprocessed with ``orthodiff plan_and_preprocess``.
        fold: cross-validation fold of the dataset's ``splits_final.json`` (0-4) or ``"all"``.
        init: ``diffusion`` (encoder from the pretraining checkpoint) or ``scratch`` (the twin: nnU-Net's
            random initialisation, everything else identical).
        encoder: encoder checkpoint (default: ``orthodiff pretrain``'s output for this dataset and
            plans); only with ``init="diffusion"``.
        label_fraction: share of the fold's labeled training cases used, per site, in (0, 1].
        seed: seed of the label-fraction subset (recorded; a non-default seed gets its own results tree).
        orientation: ``sag``/``cor``/``ax``: train the dataset of this orientation in ``dataset``'s
            convert group (ids base+0/1/2), and check it.
        plans: plans identifier (default: orthodiff's ResEnc-M plans, else orthodiff's plain plans).
        configuration: segmentation configuration of the plans.
        epochs: epochs (default nnU-Net's 1000).
        iterations_per_epoch: training iterations per epoch (default nnU-Net's 250).
        val_iterations_per_epoch: validation iterations per epoch (default nnU-Net's 50).
        optimizer: ``sgd`` (nnU-Net's) or ``adamw`` (nnU-Net's ``nnUNetTrainerAdam``; for short schedules).
        learning_rate: initial learning rate (default: 1e-2 with SGD, nnU-Net's; 3e-3 with AdamW; see
            the trainer module for the schedule and why).
        warmup_epochs: linear warm-up epochs (default 5% of the epochs; 0 = nnU-Net's schedule).
        freeze_encoder_epochs: epochs at the start with the encoder frozen (diffusion init only).
        continue_training: continue the run from its latest checkpoint (nnU-Net's ``--c``).
        device: ``auto``, ``cuda`` or ``cpu``.
        validate: run nnU-Net's final validation (sliding window on the fold's validation cases).
        validation_mirroring: mirroring test-time augmentation in that validation.
        checkpoint_minutes: write ``checkpoint_latest.pth`` (atomically) at the end of the first
            epoch after this many minutes since the last one; 0: every epoch; None: the trainer's
            default (3). A killed run continued with ``continue_training`` loses at most this
            time plus one epoch (nnU-Net alone: up to 50 epochs).
        channels_last: network and batches in channels-last-3d memory format (same results; faster 3D
            convolutions on a CPU, see the trainer).
        run_seed: seed Python's, numpy's and torch's random generators before the trainer is built: the same
            seed gives the same random weights (the decoder and heads of a diffusion init, the whole network
            from scratch) and, with augmentation in-process (``nnUNet_n_proc_DA=0``) on a CPU, the same
            batches, so two inits trained with one seed differ by the init alone. None (default): unseeded,
            as nnU-Net. Recorded in the run record.
        augmentation: ``nnunet`` (nnU-Net's training transforms) or ``cross-site`` (nnU-Net's, with its noise
            and contrast transforms applied more often and wider, for validation at sites of lower field
            strength; ``CROSS_SITE_AUGMENTATION`` in the trainer module). Recorded in the run record.
        quiet: nnU-Net's console output (plans, configuration, per-epoch lines) and this package's log
            records go to ``<fold folder>/nnunet_console.log`` instead of the console; the progress bar
            and warnings stay on the console.

    Returns:
        :class:`SegmentationTrainResult`.

    Raises:
        SegmentationError: unknown dataset/plans/configuration, an encoder with ``init="scratch"``,
            a missing encoder ("run orthodiff pretrain first"), a run that exists without
            ``continue_training`` or differs from the one being continued.
        PreprocessedDataError: the preprocessed data were not made (completely) by these plans.
        EncoderMismatchError: the encoder was pretrained on other plans.
    """
    import torch  # noqa: F401  (heavy imports only once a command runs)

    _check_init(init, encoder)
    fold = _parse_fold(fold)
    root = results_root_for(label_fraction, seed)
    dataset_name = _resolve_dataset(dataset, orientation)
    plans_identifier, plans_dict, dataset_json = _training_plans(dataset_name, plans, configuration)
    encoder = _resolve_encoder(init, encoder, dataset_name, plans_identifier)
    dev = resolve_device(device)
    trainer_class = _trainer_class(init)
    out = root / dataset_name / f"{trainer_class.__name__}__{plans_identifier}__{configuration}" / f"fold_{fold}"
    checkpoints = _checkpoints_to_continue(out, continue_training, init, encoder, label_fraction, seed)
    console_log = out / NNUNET_CONSOLE_LOG if quiet else None
    if console_log is not None:
        log.info("training %s (%s init); nnU-Net's configuration and per-epoch lines go to %s", dataset_name, init,
                 console_log)
    with output_to_log(console_log):
        trainer_plans = copy.deepcopy(plans_dict)  # nnU-Net's trainer pops keys from the dict it is given
        trainer_plans["continue_training"] = continue_training
        root.mkdir(parents=True, exist_ok=True)
        seed_everything(run_seed)
        with _environment(**{paths.ENV_RESULTS: str(root)}):  # the trainer names its output folder from it
            trainer = trainer_class(trainer_plans, configuration, fold, dataset_json, dev)
        if optimizer not in DEFAULT_LEARNING_RATES:
            raise SegmentationError(f"optimizer {optimizer!r}: use one of {', '.join(DEFAULT_LEARNING_RATES)}")
        if learning_rate is None:
            learning_rate = DEFAULT_LEARNING_RATES[optimizer]
        trainer.optimizer_name = optimizer
        trainer.channels_last = bool(channels_last)
        trainer.run_seed = None if run_seed is None else int(run_seed)
        trainer.augmentation = augmentation
        _configure_trainer(trainer, encoder, label_fraction, seed, learning_rate, warmup_epochs, freeze_encoder_epochs,
                           validation_mirroring, checkpoint_minutes, epochs, iterations_per_epoch,
                           val_iterations_per_epoch)
        _run_trainer(trainer, dataset_name, out, checkpoints[0] if continue_training else None)
        result = _train_result(trainer, out, root, console_log)
        if validate:
            _validate(trainer, out, dataset_json, result)
    return result


def _check_init(init: str, encoder: Path | None) -> None:
    """Refuse an unknown init, or an encoder given to the from-scratch twin."""
    if init not in SEG_TRAINER_OF_INIT:
        raise SegmentationError(f"--init {init!r}: use one of {', '.join(SEG_TRAINER_OF_INIT)}")
    if encoder is not None and init == "scratch":
        raise SegmentationError("--encoder is only used with --init diffusion; the scratch twin starts from "
                                "nnU-Net's random initialisation")


def _training_plans(dataset_name: str, plans: str | None, configuration: str) -> tuple[str, dict, dict]:
    """The plans identifier, plans and preprocessed ``dataset.json``; refuses plans without ``configuration``."""
    plans_identifier, plans_dict = find_plans(dataset_name, plans)
    if configuration not in plans_dict["configurations"]:
        raise SegmentationError(f"plans {plans_identifier} of {dataset_name} have no configuration {configuration!r} "
                                f"(they have {', '.join(plans_dict['configurations'])}): re-run plan_and_preprocess")
    dataset_json = json.loads((paths.preprocessed_dir() / dataset_name / "dataset.json").read_text())
    return plans_identifier, plans_dict, dataset_json


def _resolve_encoder(init: str, encoder: Path | None, dataset_name: str, plans_identifier: str) -> Path | None:
    """The encoder checkpoint of a diffusion init (default: the pretraining's output), resolved; None otherwise."""
    if init != "diffusion":
        return encoder
    encoder = Path(encoder) if encoder is not None else default_encoder_path(
        dataset_name, plans_identifier)
    if not encoder.is_file():
        raise SegmentationError(
            f"no encoder checkpoint at {encoder}: run `orthodiff pretrain -d {dataset_name} -p {plans_identifier}` "
            "first, pass --encoder, or train the from-scratch twin with --init scratch")
    return encoder.resolve()


def _trainer_class(init: str) -> type:
    """The trainer of ``init``: the warm-started one, or its from-scratch twin."""
    from orthodiff_nnunet.trainers.segmentation import (
        nnUNetTrainerOrthoDiffSeg,
        nnUNetTrainerOrthoDiffSegScratch,
    )

    return nnUNetTrainerOrthoDiffSeg if init == "diffusion" else nnUNetTrainerOrthoDiffSegScratch


def _checkpoints_to_continue(out: Path, continue_training: bool, init: str, encoder: Path | None,
                             label_fraction: float, seed: int) -> list[Path]:
    """The fold folder's checkpoints in nnU-Net's order for ``--c``; refuses a run that exists without
    ``continue_training``, or one to continue that is absent or was started with other settings."""
    checkpoints = [out / n for n in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
                   if (out / n).is_file()]  # nnU-Net's order for --c
    if checkpoints and not continue_training:
        raise SegmentationError(f"{out} already holds a training run: pass --continue to continue it, or remove "
                                "the folder to start again")
    if continue_training:
        if not checkpoints:
            raise SegmentationError(f"--continue: no checkpoint in {out}; start without --continue")
        _check_same_run(out / SEG_RUN_RECORD, init, encoder, label_fraction, seed)
    return checkpoints


def _configure_trainer(trainer, encoder: Path | None, label_fraction: float, seed: int, learning_rate: float,
                       warmup_epochs: int | None, freeze_encoder_epochs: int, validation_mirroring: bool,
                       checkpoint_minutes: float | None, epochs: int | None, iterations_per_epoch: int | None,
                       val_iterations_per_epoch: int | None) -> None:
    """Set the run's settings on the trainer before ``initialize``; None keeps the trainer's default."""
    trainer.encoder_path = None if encoder is None else str(encoder)
    trainer.label_fraction = float(label_fraction)
    trainer.label_fraction_seed = int(seed)
    trainer.initial_lr = float(learning_rate)
    trainer.warmup_epochs = warmup_epochs
    trainer.freeze_encoder_epochs = int(freeze_encoder_epochs)
    trainer.validation_mirroring = bool(validation_mirroring)
    if checkpoint_minutes is not None:
        trainer.checkpoint_minutes = float(checkpoint_minutes)
    if epochs is not None:
        trainer.num_epochs = int(epochs)
    if iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = int(iterations_per_epoch)
    if val_iterations_per_epoch is not None:
        trainer.num_val_iterations_per_epoch = int(val_iterations_per_epoch)


def _run_trainer(trainer, dataset_name: str, out: Path, checkpoint: Path | None) -> None:
    """Initialise (loading the encoder), continue from ``checkpoint`` if given, and train."""
    trainer.initialize()
    if trainer.encoder_report is not None:
        log.info("%s: %s", dataset_name, trainer.encoder_report.summary())
    if checkpoint is not None:
        trainer.load_checkpoint(str(checkpoint))
        log.info("continuing %s at epoch %d", out, trainer.current_epoch)
    trainer.run_training()


def _train_result(trainer, out: Path, root: Path, console_log: Path | None) -> SegmentationTrainResult:
    """The result of a finished run: its folders, run record and last epoch's loss and pseudo Dice."""
    losses = trainer.logger.get_value("train_losses", None) or [None]
    dices = trainer.logger.get_value("ema_fg_dice", None) or [None]
    record = json.loads((out / SEG_RUN_RECORD).read_text())
    return SegmentationTrainResult(model_folder=out.parent, output_folder=out, results_root=root, run_record=record,
                                   train_loss=None if losses[-1] is None else float(losses[-1]),
                                   pseudo_dice=None if dices[-1] is None else float(dices[-1]),
                                   console_log=console_log)


def _validate(trainer, out: Path, dataset_json: dict, result: SegmentationTrainResult) -> None:
    """nnU-Net's final validation; its Dice per structure goes into ``result``."""
    trainer.perform_actual_validation()
    summary = out / "validation" / "summary.json"
    if summary.is_file():
        result.validation_summary = summary
        result.dice, result.mean_dice = _read_summary(summary, dataset_json)


def _check_same_run(record_file: Path, init: str, encoder: Path | None, label_fraction: float, seed: int) -> None:
    """Refuse to continue a run with other settings than it was started with."""
    if not record_file.is_file():
        return  # started by nnUNetv2_train or an older version: nothing to compare
    saved = json.loads(record_file.read_text())
    now = {"init": init, "encoder": None if encoder is None else str(encoder),
           "label_fraction": float(label_fraction), "label_fraction_seed": int(seed)}
    differs = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if differs:
        raise SegmentationError("--continue with other settings than the run was started with "
                                f"(saved, now): {differs}")


# ----------------------------------------------------------------------------------------------
# prediction
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _input_cases(folder: Path, file_ending: str, num_channels: int) -> dict[str, list[Path]]:
    """case -> channel files. nnU-Net naming (``case_0000.nii.gz``) or, for one channel, any name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(file_ending))
    if not files:
        inside = [folder / sub for sub in ("imagesTs", "imagesTr")
                  if (folder / sub).is_dir() and any((folder / sub).glob(f"*{file_ending}"))]
        if inside:  # a converted dataset folder instead of its images folder
            raise SegmentationError(f"no {file_ending} images in {folder}, but in its {inside[0].name}: pass "
                                    f"-i {inside[0]}")
        raise SegmentationError(f"no {file_ending} images in {folder}: put the converted images there "
                                f"(nnU-Net naming CASE_0000{file_ending})")
    cases: dict[str, list[Path]] = {}
    unnamed = []
    for f in files:
        m = _CHANNEL.match(f.name[: -len(file_ending)])
        if m:
            cases.setdefault(m["case"], []).append(f)
        else:
            unnamed.append(f)
    if unnamed:
        if num_channels != 1 or cases:
            raise SegmentationError(f"{len(unnamed)} file(s) in {folder} lack nnU-Net's channel suffix "
                                    f"(e.g. {unnamed[0].name}): name them CASE_0000{file_ending}")
        cases = {f.name[: -len(file_ending)]: [f] for f in unnamed}
    wrong = [c for c, fs in cases.items() if len(fs) != num_channels]
    if wrong:
        raise SegmentationError(f"the model needs {num_channels} channel(s) per case; {wrong[0]} has "
                                f"{len(cases[wrong[0]])} in {folder}")
    return cases


def _check_layout(cases: dict[str, list[Path]], orientation: str | None) -> None:
    """Inputs must be in the converter's canonical LPS layout with the model's through-plane axis."""
    import SimpleITK as sitk

    from orthodiff_nnunet.orientation import CANONICAL_ORIENTATION_CODE, THROUGH_PLANE_SITK_AXIS, through_plane_axis

    problems, other_plane, plane_only = [], set(), 0
    for case, files in cases.items():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(files[0]))
        reader.ReadImageInformation()
        if reader.GetDimension() != 3:
            problems.append(f"{files[0].name}: {reader.GetDimension()}D, a 3D image is needed")
            continue
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reader.GetDirection())
        if code != CANONICAL_ORIENTATION_CODE:
            problems.append(f"{files[0].name}: axes run {code}, not the canonical {CANONICAL_ORIENTATION_CODE}")
            continue
        axis, rule = through_plane_axis(reader.GetSpacing())
        if orientation in THROUGH_PLANE_SITK_AXIS and rule == "thickest spacing" and axis != THROUGH_PLANE_SITK_AXIS[orientation]:
            problems.append(f"{files[0].name}: thick slices along image axis {axis}, but the model is {orientation} "
                            f"(axis {THROUGH_PLANE_SITK_AXIS[orientation]})")
            other_plane.update(o for o, a in THROUGH_PLANE_SITK_AXIS.items() if a == axis)
            plane_only += 1
    if problems and plane_only == len(problems):
        # converted images of another plane: converting again would not help
        theirs = ", ".join(sorted(other_plane))
        sibling = _same_group_images(next(iter(cases.values()))[0].parent, orientation)
        raise SegmentationError(
            f"these are {theirs} images, the model is {orientation}: predict them with a {theirs} model (-m), or give "
            f"this model the {orientation} images" + (f": pass -i {sibling}" if sibling else "")
            + ":\n" + "\n".join(f"  - {p}" for p in problems))
    if problems:
        raise SegmentationError(
            "input images are not laid out like the model's training data: convert them with `orthodiff convert` "
            "(an external site with --external; its imagesTs are ready to predict), or pass --no-layout-check "
            "if you know better:\n" + "\n".join(f"  - {p}" for p in problems))


def _start_message(n: int, model: str, folds: Sequence[str], device: str, mirroring: bool,
                   axes: Sequence[int] | None) -> str:
    """What is about to run: cases, device, mirroring and, on a CPU, what mirroring costs and how to avoid it."""
    head = f"predicting {n} case(s) with {model} (fold(s) {', '.join(map(str, folds))}) on {device}"
    if not mirroring or not axes:
        return f"{head}; mirroring off"
    passes = 2 ** len(axes)
    text = (f"{head}; mirroring on (axes {', '.join(str(int(a)) for a in axes)}: {passes} network passes per "
            "sliding-window tile)")
    if device == "cpu":
        text += (". On a CPU mirroring makes prediction up to 8x slower (a 3D model mirrored along all 3 axes); "
                 "--disable-tta (mirroring=False) turns it off at some cost in accuracy")
    return text


_PREDICTOR_CLASS = None


def _case_progress_predictor() -> type:
    """nnU-Net's ``nnUNetPredictor`` whose default (multiprocess) path moves a per-case progress bar.

    The bar (``case_bar``, a tqdm with rate and ETA) advances each time nnU-Net takes the next
    preprocessed case from its data iterator, i.e. when a case's sliding window is done; nnU-Net's
    own per-tile bar runs inside it. Built on first use so that importing this module stays light.
    """
    global _PREDICTOR_CLASS
    if _PREDICTOR_CLASS is None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        class CaseProgressPredictor(nnUNetPredictor):
            case_bar = None

            def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                           num_processes_segmentation_export: int = 2):
                bar = self.case_bar

                def counted():
                    started = False
                    for item in data_iterator:  # nnU-Net asks for the next case when one is predicted
                        if started and bar is not None:
                            bar.update()
                        started = True
                        yield item
                    if started and bar is not None:
                        bar.update()

                try:
                    return super().predict_from_data_iterator(counted(), save_probabilities,
                                                              num_processes_segmentation_export)
                finally:
                    finish = getattr(data_iterator, "_finish", None)  # nnU-Net only finishes its own iterator types
                    if finish is not None:
                        finish()

        _PREDICTOR_CLASS = CaseProgressPredictor
    return _PREDICTOR_CLASS


def _same_group_images(folder: Path, orientation: str) -> Path | None:
    """``orientation``'s images folder of the convert group that ``folder`` (``.../DatasetNNN_X/imagesTs``) is in."""
    from orthodiff_nnunet.schemes import ORIENTATION_ID_OFFSET, ORIENTATION_SUFFIX

    dataset_json = folder.parent / "dataset.json"
    if orientation not in ORIENTATION_ID_OFFSET or not dataset_json.is_file():
        return None
    try:
        block = json.loads(dataset_json.read_text()).get("orthodiff") or {}
        base, name = int(block["base_dataset_id"]), str(block["name"])
    except (ValueError, KeyError, TypeError):
        return None
    dataset = f"Dataset{base + ORIENTATION_ID_OFFSET[orientation]:03d}_{name}{ORIENTATION_SUFFIX[orientation]}"
    cand = folder.parent.parent / dataset / folder.name
    return cand if cand.is_dir() else None


def predict_segmentation(
    input_folder: Path,
    output_folder: Path,
    model: Path,
    *,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    device: str = "auto",
    mirroring: bool = True,
    tile_step_size: float = 0.5,
    num_processes: int = 2,
    check_layout: bool = True,
    show_progress: bool = True,
) -> SegmentationPredictResult:
    """Segment every image of ``input_folder`` with a trained model through nnU-Net's predictor.

    The masks are written as ``<case><file ending>`` on each input image's grid (same size, spacing,
    origin and direction): nnU-Net resamples the prediction back and writes it with the source
    geometry.

    Args:
        input_folder: images as ``orthodiff convert`` writes them (canonical LPS layout), named like
            nnU-Net's (``CASE_0000.nii.gz``) or, for a one-channel model, any name with the dataset's
            file ending.
        output_folder: where the masks go (created).
        model: the model folder (``<Trainer>__<plans>__<configuration>``) or one of its ``fold_X``
            folders (then that fold only).
        folds: folds to ensemble (default: every fold with the checkpoint).
        checkpoint: checkpoint file name in each fold folder.
        device: ``auto``, ``cuda`` or ``cpu``.
        mirroring: mirroring test-time augmentation (nnU-Net's default). It runs the network once per
            mirror combination: 8 passes per tile for a 3D model mirrored along all axes, so up to 8x
            the time on a CPU, where the network dominates; the log says so before starting.
        tile_step_size: sliding-window step as a fraction of the patch (nnU-Net's 0.5).
        num_processes: worker processes for preprocessing and export (0: all in this process).
        check_layout: refuse images that are not in the converter's canonical layout.
        show_progress: tqdm progress bars: one per case with rate and ETA, nnU-Net's per tile inside.

    Raises:
        SegmentationError: no model or checkpoint, no images, wrong naming or layout; the message
            says which flag or folder fixes it.
    """

    model, folds = _resolve_model_folder(Path(model).resolve(), folds)
    use = _folds_to_use(model, folds, checkpoint)
    folds_arg = tuple("all" if f == "all" else int(f) for f in use)
    dataset_json = json.loads((model / "dataset.json").read_text())
    plans = json.loads((model / "plans.json").read_text())
    file_ending = dataset_json["file_ending"]
    input_folder, output_folder = Path(input_folder), Path(output_folder)
    if not input_folder.is_dir():
        raise SegmentationError(f"input folder {input_folder} does not exist")
    cases = _input_cases(input_folder, file_ending, len(dataset_json["channel_names"]))
    if check_layout:
        _check_layout(cases, (plans.get("orthodiff") or {}).get("orientation"))
    output_folder.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    predictor = _case_progress_predictor()(
        tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=mirroring,
        perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False, verbose_preprocessing=False,
        allow_tqdm=show_progress)
    with _with_our_trainers():
        predictor.initialize_from_trained_model_folder(str(model), folds_arg, checkpoint_name=checkpoint)
    names = sorted(cases)
    log.info("%s", _start_message(len(names), model.name, use, dev.type, mirroring, predictor.allowed_mirroring_axes))
    _run_predictor(predictor, [[str(p) for p in cases[c]] for c in names], [str(output_folder / c) for c in names],
                   num_processes, show_progress)
    masks = [output_folder / f"{c}{file_ending}" for c in names]
    absent = [m.name for m in masks if not m.is_file()]
    if absent:
        raise SegmentationError(f"nnU-Net wrote no mask for {', '.join(absent)} in {output_folder}")
    return SegmentationPredictResult(output_folder, masks)


def _resolve_model_folder(model: Path, folds: Sequence[int | str] | None) -> tuple[Path, Sequence[int | str] | None]:
    """The model folder and folds: a ``fold_X`` folder stands for its model folder and (by default) that fold.

    Raises:
        SegmentationError: not a model folder (naming the model folders inside a dataset's results folder).
    """
    if model.name.startswith("fold_") and (model.parent / "plans.json").is_file():
        if folds is None:
            folds = [model.name[len("fold_"):]]
        model = model.parent
    for f in ("plans.json", "dataset.json"):
        inside = sorted(p.parent for p in model.glob("*/plans.json")) if model.is_dir() else []
        if not (model / f).is_file() and inside:  # a dataset's results folder: its model folders are inside
            raise SegmentationError(f"{model} is not a model folder but holds {len(inside)}: pass -m {inside[0]}"
                                    + "".join(f" (or -m {p})" for p in inside[1:]))
        if not (model / f).is_file():
            raise SegmentationError(f"{model} is not a trained nnU-Net model folder ({f} missing): pass the folder "
                                    "<Trainer>__<plans>__<configuration> that `orthodiff train seg` printed")
    return model, folds


def _folds_to_use(model: Path, folds: Sequence[int | str] | None, checkpoint: str) -> list[str]:
    """The folds to ensemble (default: every fold with ``checkpoint``); refuses a fold without it, naming the
    checkpoints that are there."""
    available = sorted(p.name[len("fold_"):] for p in model.glob("fold_*") if (p / checkpoint).is_file())
    use = [str(f) for f in folds] if folds is not None else available
    missing = [f for f in use if f not in available]
    if not use or missing:
        there = {p.name for f in (missing or ["*"]) for p in model.glob(f"fold_{f}/checkpoint_*.pth")}
        preferred = ["checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth"]
        others = [n for n in preferred if n in there] + sorted(there - set(preferred))
        fix = (f"pass --checkpoint {others[0]} (there: {', '.join(others)})" if others
               else "finish training first (`orthodiff train seg ... --continue` resumes it)")
        raise SegmentationError(f"no {checkpoint} for fold(s) {', '.join(missing) or 'any'} in {model} (folds with it: "
                                f"{', '.join(available) or 'none'}): {fix}")
    return use


def _run_predictor(predictor, inputs: list[list[str]], outputs: list[str], num_processes: int,
                   show_progress: bool) -> None:
    """Predict ``inputs`` into ``outputs`` (file names without ending) with a per-case progress bar; logs the time."""
    from tqdm import tqdm

    bar = tqdm(total=len(inputs), desc="predict seg", unit="case", disable=not show_progress)
    predictor.case_bar = bar
    start = time.perf_counter()
    try:
        with nnunet_stdout_to_log(log):
            if num_processes <= 0:  # one case per call: the bar moves after each case
                for one_input, one_output in zip(inputs, outputs):
                    predictor.predict_from_files_sequential([one_input], [one_output], save_probabilities=False,
                                                            overwrite=True)
                    bar.update()
            else:
                predictor.predict_from_files(inputs, outputs, save_probabilities=False, overwrite=True,
                                             num_processes_preprocessing=num_processes,
                                             num_processes_segmentation_export=num_processes)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    log.info("predicted %d case(s) in %.0f s (%.1f s per case)", len(inputs), seconds, seconds / max(len(inputs), 1))


# ----------------------------------------------------------------------------------------------
# DICOM SEG export of predicted masks
def export_dicom_segs_of(result: SegmentationPredictResult, model: Path, out_dir: Path, key_file: Path, *,
                         site_root: Path | None = None) -> DicomSegExport:
    """Write each predicted mask as a DICOM SEG on its source DICOM series.

    Args:
        result: what :func:`predict_segmentation` wrote.
        model: the model folder it predicted with (or one of its ``fold_X`` folders): its
            ``dataset.json`` names the labels and the file ending, its ``plans.json`` the orientation.
        out_dir: a private folder at the site (a SEG carries the source study's identifiers).
        key_file: the key table ``orthodiff convert --key-file`` wrote (pseudonym -> source series).
        site_root: the folder the key table's series paths are relative to (default: its folder).

    Returns:
        The export (what was written, what was skipped and why).
    """
    from orthodiff_nnunet.io.dicom_seg import export_dicom_segs, label_names_from_dataset_json

    model = Path(model).resolve()
    model = model.parent if model.name.startswith("fold_") else model
    dataset_json = json.loads((model / "dataset.json").read_text())
    plans = json.loads((model / "plans.json").read_text())
    return export_dicom_segs(
        result.masks, out_dir, key_file, label_names_from_dataset_json(dataset_json),
        orientation=(plans.get("orthodiff") or {}).get("orientation"), site_root=site_root,
        file_ending=dataset_json["file_ending"], algorithm_parameters={"model": model.name},
    )
