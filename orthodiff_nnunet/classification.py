"""``orthodiff train cls`` / ``orthodiff predict cls``: multi-label abnormality classification.

Training fuses the views (sagittal, coronal, axial datasets of one conversion, matched per exam)
through :class:`~orthodiff_nnunet.trainers.classification.nnUNetTrainerOrthoDiffCls` on each view's
``3d_classification`` configuration, with each view's diffusion-pretrained encoder:

* ``finetune`` (default): encoder trained at ``encoder_lr_factor`` x the head's learning rate;
* ``probe``: encoder frozen (linear probe on pooled features);
* ``scratch``: same network, random encoder, full learning rate (the baseline).

The label set is the datasets' targets file (8 knee labels by default, MRNet's 3, another
joint's). Transfer to another joint is the same command: preprocess that joint's datasets with the
knee plans (``orthodiff plan_and_preprocess -d <ankle> --plans-from <knee>``) and pass the knee
encoders (``--encoders-from <knee dataset>`` or ``--encoder sag=PATH``).

Outputs (``nnUNet_results/<first view's dataset>/nnUNetTrainerOrthoDiffCls__<plans>__<configuration>/<run>/fold_<k>/``):
``classifier.json`` (settings), ``plans_<view>.json``, ``checkpoint_{best,latest,final}.pth``,
``progress.csv/png``, ``split.json`` (the exams of each set), ``thresholds.json`` (chosen on the
selection exams), ``predictions.csv`` (selection and test exams, column ``set``), ``metrics.json``
(``selection`` and ``test`` metrics apart) and ``test_predictions.csv``/``test_metrics.{json,md}``.

Three patient-disjoint sets by default: train on fold ``k``'s training exams, choose the checkpoint
and the thresholds on fold ``k``'s validation exams (the *selection* set), report on the next
fold's validation exams (the *test* set; with only two folds, half of fold ``k``'s validation
patients). ``--test-fold none`` drops the test set (selection metrics only: optimistic).

Prediction writes a CSV with one row per exam: per-label probabilities, decisions at the
thresholds chosen on the selection exams, which views were present (an exam with a missing view
is still predicted), and the targets when known (then also metrics with bootstrap CIs). It
computes in the precision recorded in ``classifier.json`` (fp16/bf16 autocast, TF32 on CUDA).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from orthodiff_nnunet import paths
from orthodiff_nnunet.console import output_to_log
from orthodiff_nnunet.conventions import (
    CLASSIFICATION_CONFIGURATION,
    CLS_CONFIG_FILE,
    CLS_TRAINER,
    CLS_THRESHOLDS_FILE,
    default_encoder_path,
    find_plans,
    resolve_device,
)
from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.schemes import ORIENTATION_ID_OFFSET, ORIENTATIONS, normalize_orientation
from orthodiff_nnunet.utils import load_json

log = logging.getLogger(__name__)

CONSOLE_LOG = "console.log"  # a quiet run's console output (per-epoch lines), in its output folder

__all__ = ["ClassificationTrainResult", "ClassificationPredictResult", "train_classification",
           "predict_classification", "resolve_views"]


class ClassificationUsageError(OrthodiffError):
    """Bad options or inputs of train/predict cls; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# dataset and encoder resolution
def _find_preprocessed(pre: Path, id_or_name: int | str) -> Path:
    text = str(id_or_name).strip()
    if text.startswith("Dataset"):
        folder = pre / text
        if not folder.is_dir():
            raise ClassificationUsageError(f"{folder} not found: run `orthodiff plan_and_preprocess -d {text}` first")
        return folder
    try:
        ds = int(text)
    except ValueError:
        raise ClassificationUsageError(f"{text!r} is neither a dataset id (501) nor a name (Dataset501_KneeSag)") from None
    hits = [p for p in sorted(pre.glob(f"Dataset{ds:03d}_*")) if p.is_dir()]
    if len(hits) != 1:
        raise ClassificationUsageError(
            f"{'no' if not hits else 'several'} preprocessed dataset(s) with id {ds} in {pre}"
            + ("" if hits else f": run `orthodiff plan_and_preprocess -d {ds}` first"))
    return hits[0]


def _orientation_of(folder: Path) -> str | None:
    f = folder / "dataset.json"
    o = load_json(f).get("orthodiff", {}).get("orientation") if f.is_file() else None
    return normalize_orientation(o) if o else None


def resolve_views(datasets: Sequence[int | str] | int | str, views: Sequence[str] | None = None,
                  preprocessed: Path | None = None) -> dict[str, str]:
    """view -> preprocessed dataset name, in view order.

    Args:
        datasets: one dataset (id or name) standing for its conversion group (ids base+0 sag,
            +1 cor, +2 ax), or one dataset per view.
        views: views to use, in fusion order (default: every orientation found, sag, cor, ax).
        preprocessed: nnUNet_preprocessed (default: the environment variable).
    """
    pre = paths.preprocessed_dir(preprocessed)
    items = [datasets] if isinstance(datasets, (int, str)) else list(datasets)
    if not items:
        raise ClassificationUsageError("no dataset given: pass -d with a dataset id")
    wanted = [normalize_orientation(v) for v in views] if views else None
    found: dict[str, str] = {}
    for item in items:
        folder = _find_preprocessed(pre, item)
        o = _orientation_of(folder)
        if o is None:
            raise ClassificationUsageError(f"{folder.name}/dataset.json has no orthodiff orientation: convert it with "
                                           "`orthodiff convert`")
        if o in found and found[o] != folder.name:
            raise ClassificationUsageError(f"two {o} datasets given: {found[o]} and {folder.name}")
        found[o] = folder.name
    if len(items) == 1:  # the whole conversion group
        folder = pre / found[next(iter(found))]
        block = load_json(folder / "dataset.json").get("orthodiff", {})
        o = next(iter(found))
        base = int(block.get("base_dataset_id", int(folder.name[7:10]) - ORIENTATION_ID_OFFSET[o]))
        name = block.get("name")
        for other in ORIENTATIONS:
            if other in found:
                continue
            for cand in sorted(pre.glob(f"Dataset{base + ORIENTATION_ID_OFFSET[other]:03d}_*")):
                ob = load_json(cand / "dataset.json").get("orthodiff", {}) if (cand / "dataset.json").is_file() else {}
                if _orientation_of(cand) == other and ob.get("name", name) == name:
                    found[other] = cand.name
                    break
    order = wanted or [o for o in ORIENTATIONS if o in found]
    missing = [v for v in order if v not in found]
    if missing:
        raise ClassificationUsageError(f"no preprocessed {'/'.join(missing)} dataset for {items} (found: {found}); "
                                       "preprocess that orientation or drop it from --views")
    return {v: found[v] for v in order}


def _view_data(view: str, dataset_name: str, plans_identifier: str | None, configuration: str):
    from orthodiff_nnunet.data.exam_loaders import ViewData

    ident, plans = find_plans(dataset_name, plans_identifier)
    if configuration not in plans["configurations"]:
        raise ClassificationUsageError(f"plans {ident} of {dataset_name} have no configuration {configuration!r} "
                                       f"({', '.join(plans['configurations'])}): re-run plan_and_preprocess")
    folder = paths.preprocessed_dir() / dataset_name
    return ViewData(view, dataset_name, ident, plans, configuration, load_json(folder / "dataset.json"), folder)


def _per_view(value, views: Sequence[str], what: str, cast) -> dict:
    """One value for all views, a mapping, or ``["sag=..", ...]`` strings -> {view: value}."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {normalize_orientation(k): cast(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and "=" not in str(value[0]):
            return {v: cast(value[0]) for v in views}
        out = {}
        for item in value:
            if "=" not in str(item):
                raise ClassificationUsageError(f"{what}: give one value, or VIEW=VALUE per view (e.g. sag=...), got {item!r}")
            k, val = str(item).split("=", 1)
            out[normalize_orientation(k)] = cast(val)
        return out
    return {v: cast(value) for v in views}


# ----------------------------------------------------------------------------------------------
@dataclass
class ClassificationTrainResult:
    """What a training run produced."""

    output_folder: Path
    views: dict[str, str]
    label_names: list[str]
    mode: str
    best_epoch: int
    best_selection_mean_auroc: float
    history: list[dict]
    thresholds: dict[str, float]
    selection: object  # ClassificationMetrics of the selection exams (optimistic: chosen on them)
    test: object | None = None  # ClassificationMetrics of the held-out test exams
    precision: str = "fp32"
    precision_timings: dict[str, float] = field(default_factory=dict)
    load_reports: dict[str, str] = field(default_factory=dict)
    num_exams: dict[str, int] = field(default_factory=dict)
    train_exams_per_s: float = float("nan")
    test_exams_per_s: float | None = None

    def summary(self) -> str:
        lines = [f"classification ({self.mode}, views {'+'.join(self.views)}: {', '.join(self.views.values())}), "
                 f"{len(self.label_names)} labels; exams {self.num_exams}",
                 f"best epoch {self.best_epoch}: selection-set mean AUROC {self.best_selection_mean_auroc:.3f} "
                 "(checkpoint and thresholds chosen on it); "
                 f"precision {self.precision}; {self.train_exams_per_s:.1f} training exams/s"]
        lines += [f"  encoder {v}: {r}" for v, r in self.load_reports.items()]
        if self.test is not None:
            lines.append("held-out test exams (thresholds from the selection exams):\n" + self.test.to_markdown())
        else:
            lines.append("no held-out test set: the selection-set figures are optimistic")
        lines.append(f"outputs: {self.output_folder}")
        return "\n".join(lines)


def default_test_folds(n_folds: int, fold: int) -> list[int]:
    """The folds holding ``train cls --fold fold --test-fold auto``'s test exams (what pretraining must exclude).

    With 3 or more folds the test set is the next fold's validation set; with 2 it is half of the
    selection fold's patients, so the whole selection fold is excluded.
    """
    if n_folds >= 3:
        return [(int(fold) + 1) % n_folds]
    return [int(fold)] if n_folds == 2 else []


def train_classification(
    dataset: int | str | Sequence[int | str],
    *,
    views: Sequence[str] | None = None,
    plans: str | None = None,
    configuration: str = CLASSIFICATION_CONFIGURATION,
    fold: int | str = 0,
    mode: Literal["finetune", "probe", "scratch"] = "finetune",
    encoders: Mapping[str, Path] | Path | None = None,
    encoders_from: int | str | None = None,
    noise_timestep: int | Mapping[str, int] = 0,
    film: bool = True,
    fusion: Literal["concat", "gated"] = "concat",
    feature_stages: int = 1,
    dropout: float = 0.0,
    epochs: int = 50,
    iterations_per_epoch: int = 50,
    batch_size: int | None = None,
    learning_rate: float = 1e-3,
    encoder_lr_factor: float = 0.05,
    weight_decay: float = 1e-4,
    label_fraction: float = 1.0,
    test_fold: int | Literal["auto"] | None = "auto",
    allow_pretraining_overlap: bool = False,
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = "auto",
    mirror_axes: Literal["lr", "all", "none"] = "lr",
    augment: bool = True,
    threshold_method: Literal["youden", "f1", "fixed"] = "youden",
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    output_folder: Path | None = None,
    run_name: str | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> ClassificationTrainResult:
    """Train the multi-view abnormality classifier.

    Long (about 110 lines) only because it documents its 34 parameters; the body is named steps.

    Args:
        dataset: a dataset id/name standing for its sag/cor/ax group, or one dataset per view.
        views: views to fuse, in order (default: every orientation found).
        plans: plans identifier (default: orthodiff's ResEnc-M plans, else plain).
        configuration: the classification configuration.
        fold: fold of ``splits_final.json``: its training exams train, its validation exams are the
            selection set (checkpoint, thresholds); or ``"all"`` (no held-out set at all).
        mode: ``finetune``, ``probe`` (frozen encoder) or ``scratch``.
        encoders: view -> encoder checkpoint (one path: for a single view); default: each view's
            own pretraining output (:func:`default_encoder_path`).
        encoders_from: take each view's encoder from this dataset group's pretraining instead
            (transfer, e.g. knee encoders for ankle data with transferred plans).
        noise_timestep: timestep the input is noised to (0 = clean), one for all views or per view.
        film: the pretrained encoders apply the pretraining's timestep conditioning at the noise timestep
            (encoder.pt's contract; the pretrained network applied it at every t, 0 included); False:
            the identity (an ablation: a state the pretraining never saw).
        fusion: ``concat`` (default) or ``gated`` (per label).
        feature_stages: last encoder stages pooled (1 = bottleneck).
        dropout: before the fusion layer.
        epochs, iterations_per_epoch: training length (the selection exams are predicted after every epoch).
        batch_size: exams per step (default: the configuration's batch size).
        learning_rate: AdamW learning rate of the head (polynomial decay).
        encoder_lr_factor: encoder learning rate = factor x ``learning_rate`` (fine-tune; the method: 0.05).
        weight_decay: AdamW weight decay.
        label_fraction: use this fraction of the training exams (per site, seeded; label efficiency).
        test_fold: the held-out test set (never trained on, never used for selection or thresholds;
            its metrics with bootstrap CIs are reported apart): ``"auto"`` (default) the next fold
            ``(fold + 1) mod n``, or with only two folds half of the selection fold's patients; a
            fold index; or None (no test set). Needs 3 patients with targets (else an error says so).
        precision: ``auto`` (CUDA: measured, the fastest), or fixed; CPU always fp32. The resolved
            precision is recorded in ``classifier.json`` and used by prediction and resume.
        mirror_axes: ``lr`` (left-right only, default), ``all`` (nnU-Net's), ``none``.
        augment: nnU-Net's training augmentation (False: centre crop only).
        threshold_method: per-label decision threshold on the selection exams: ``youden``, ``f1``, ``fixed`` (0.5).
        n_boot: bootstrap resamples for the CIs.
        seed: seed of sampling, initialisation and bootstrap.
        device: ``auto``, ``cuda`` or ``cpu``.
        output_folder: explicit output folder (default: under nnUNet_results, see the module docstring).
        run_name: name of the run folder (default: views, mode, fraction, timestep).
        resume: continue from the run's ``checkpoint_latest.pth``.
        quiet: per-epoch lines and other console output go to ``<output folder>/console.log``; the
            progress bar and warnings stay on the console.
    """
    from orthodiff_nnunet.data.targets import load_dataset_targets

    view_names = resolve_views(dataset, views)
    vds = {v: _view_data(v, name, plans, configuration) for v, name in view_names.items()}
    targets = {v: load_dataset_targets(name) for v, name in view_names.items()}
    order = list(view_names)
    enc = _encoder_paths(encoders, encoders_from, mode, view_names, vds)
    timesteps = _per_view(noise_timestep, order, "--noise-timestep", int)
    if fold != "all":
        fold = int(fold)
    if test_fold not in (None, "auto"):
        test_fold = int(test_fold)
    out = _run_folder(output_folder, run_name, view_names, vds, configuration, mode, label_fraction, timesteps, fold)
    latest = _refuse_unasked_resume(out, resume)
    console_log = out / CONSOLE_LOG if quiet else None
    if console_log is not None:
        log.info("training the classifier in %s; per-epoch lines go to %s", out, console_log)
    with output_to_log(console_log):
        trainer = _new_trainer(
            vds, targets, fold, out, device, mode=mode, encoder_paths=enc if mode != "scratch" else {},
            noise_timesteps=timesteps, film=film, fusion=fusion, feature_stages=feature_stages, dropout=dropout,
            num_epochs=epochs, num_iterations_per_epoch=iterations_per_epoch, batch_size=batch_size,
            initial_lr=learning_rate, encoder_lr_factor=encoder_lr_factor, weight_decay=weight_decay,
            label_fraction=label_fraction, test_fold=test_fold, allow_pretraining_overlap=allow_pretraining_overlap,
            precision=precision, mirror_axes=mirror_axes, augment=augment, threshold_method=threshold_method,
            n_boot=n_boot, seed=seed)
        done = _train(trainer, out, latest if resume else None)
    return _train_result(trainer, done, out, view_names, mode)


def _encoder_paths(encoders: Mapping[str, Path] | Path | None, encoders_from: int | str | None, mode: str,
                   view_names: dict[str, str], vds: dict) -> dict[str, Path]:
    """view -> encoder checkpoint: the given ones, the others from each view's (or ``encoders_from``'s) pretraining.

    Raises:
        ClassificationUsageError: one path for several views, or a view without its pretrained encoder.
    """
    order = list(view_names)
    if isinstance(encoders, (list, tuple)) and len(encoders) == 1 and "=" not in str(encoders[0]):
        encoders = encoders[0]  # one bare path
    enc = _per_view(encoders, order, "--encoder", Path) if not isinstance(encoders, (str, Path)) else (
        {order[0]: Path(encoders)} if len(order) == 1 else None)
    if enc is None:
        raise ClassificationUsageError("one encoder path for several views: give VIEW=PATH per view")
    if mode != "scratch":
        source = resolve_views(encoders_from, order) if encoders_from is not None else view_names
        for v in order:
            if v not in enc:
                path = default_encoder_path(source[v], vds[v].plans_identifier)
                if not path.is_file():
                    raise ClassificationUsageError(
                        f"no pretrained {v} encoder at {path}: run `orthodiff pretrain -d {source[v]}`, pass "
                        f"--encoder {v}=PATH or --encoders-from DATASET, or use --mode scratch")
                enc[v] = path
    return enc


def _run_folder(output_folder: Path | None, run_name: str | None, view_names: dict[str, str], vds: dict,
                configuration: str, mode: str, label_fraction: float, timesteps: dict[str, int],
                fold: int | str) -> Path:
    """The run's fold folder: ``output_folder``, else under nnUNet_results (see the module docstring), in a run
    folder named ``run_name`` or after the views, mode, label fraction and noise timesteps."""
    order = list(view_names)
    run = run_name or "_".join([ "-".join(order), mode]
                               + ([f"lf{label_fraction:g}"] if label_fraction < 1 else [])
                               + ([f"t{'-'.join(str(timesteps.get(v, 0)) for v in order)}"] if any(timesteps.values()) else []))
    return Path(output_folder) if output_folder else (
        paths.results_dir() / view_names[order[0]] / f"{CLS_TRAINER}__{vds[order[0]].plans_identifier}__{configuration}"
        / run / f"fold_{fold}")


def _refuse_unasked_resume(out: Path, resume: bool) -> Path:
    """The run's ``checkpoint_latest.pth``; refuses a folder holding a finished run, or an unfinished one
    without ``resume``."""
    latest = out / "checkpoint_latest.pth"
    if (out / "checkpoint_final.pth").is_file() and not resume:
        raise ClassificationUsageError(f"{out} already holds a finished run: choose another --run-name or remove it")
    if latest.is_file() and not resume:
        raise ClassificationUsageError(f"{out} holds an unfinished run: pass --resume to continue it, or remove it")
    return latest


def _new_trainer(vds: dict, targets: dict, fold: int | str, out: Path, device: str, **settings):
    """The classifier's trainer with its run settings (attributes read by ``initialize`` and training)."""
    from orthodiff_nnunet.trainers.classification import nnUNetTrainerOrthoDiffCls

    trainer = nnUNetTrainerOrthoDiffCls(vds, targets, fold, out, resolve_device(device))
    for name, value in settings.items():
        setattr(trainer, name, value)
    return trainer


def _train(trainer, out: Path, resume_from: Path | None) -> dict:
    """Initialise, resume from ``resume_from`` (the run's latest checkpoint) if given, train and finish.

    Returns:
        ``trainer.finish()``'s outputs (thresholds, selection and test metrics).
    """
    trainer.initialize()
    if resume_from is not None:
        if not resume_from.is_file():
            raise ClassificationUsageError(f"--resume: no checkpoint in {out}; start without --resume")
        trainer.load_checkpoint(resume_from)
        log.info("resuming %s at epoch %d", out, trainer.current_epoch)
    trainer.run_training()
    return trainer.finish()


def _train_result(trainer, done: dict, out: Path, view_names: dict[str, str], mode: str) -> ClassificationTrainResult:
    """The result of a finished run, from the trainer's history and its ``finish()`` outputs."""
    hist = trainer.history
    return ClassificationTrainResult(
        output_folder=out, views=view_names, label_names=list(trainer.label_names), mode=mode,
        best_epoch=trainer.best_epoch, best_selection_mean_auroc=trainer.best_metric, history=hist,
        thresholds=done["thresholds"], selection=done["selection"], test=done.get("test"),
        precision=trainer.precision, precision_timings=dict(trainer.precision_timings),
        load_reports=dict(trainer.load_reports),
        num_exams={"train": len(trainer.exams_train), "selection": len(trainer.exams_selection),
                   "test": len(trainer.exams_test)},
        train_exams_per_s=float(sum(h["train_exams_per_s"] for h in hist[1:]) / max(1, len(hist) - 1)
                                if len(hist) > 1 else hist[-1]["train_exams_per_s"]),
        test_exams_per_s=done.get("test_exams_per_s"),
    )


# ----------------------------------------------------------------------------------------------
@dataclass
class ClassificationPredictResult:
    """What a prediction run wrote and measured."""

    csv: Path
    num_exams: int
    num_with_missing_views: int
    label_names: list[str]
    exams_per_s: float
    metrics: object | None = None  # ClassificationMetrics when targets are known
    precision: str = "fp32"  # the precision computed in: the model's recorded one (fp32 where the device lacks it)
    labels_evaluated: list[str] = field(default_factory=list)  # model labels the dataset annotates
    labels_not_evaluated: dict[str, str] = field(default_factory=dict)  # label -> why not

    def summary(self) -> str:
        lines = [f"predicted {self.num_exams} exams ({self.num_with_missing_views} with a missing view) at "
                 f"{self.exams_per_s:.1f} exams/s -> {self.csv}"]
        if self.metrics is not None:
            lines.append(self.metrics.to_markdown())
        return "\n".join(lines)


def _plans_transfer_command(cfg: Mapping, dataset: int | str | Sequence[int | str],
                            views: Sequence[str]) -> str | None:
    """The ``orthodiff plan_and_preprocess`` command that preprocesses ``dataset``'s raw datasets of ``views`` with
    the classifier's plans (``--plans-from`` its training datasets, ``--plans-name`` its plans); None when the raw
    datasets or the training datasets' plans are not here (then no command can do it)."""
    from orthodiff_nnunet.planning import default_plans_name, resolve_datasets

    items = [dataset] if isinstance(dataset, (int, str)) else list(dataset)
    try:
        raw = paths.raw_dir()
        targets = [t for t in resolve_datasets(items, list(views) if len(items) == 1 else None, raw)
                   if t.orientation in views]
        if not targets:
            return None
        sources = {t.orientation: cfg["datasets"][t.orientation] for t in targets}
        idents = {o: cfg["plans_identifiers"][o] for o in sources}
        pre = paths.preprocessed_dir()
        if any(not (pre / sources[o] / f"{idents[o]}.json").is_file() for o in sources):
            return None
        first = resolve_datasets([sources[targets[0].orientation]], list(sources), raw)
    except (OrthodiffError, KeyError):
        return None

    def command(ids: list[int], source: int | str, ident: str) -> str:
        name = "" if ident == default_plans_name() else f" --plans-name {ident}"
        return (f"orthodiff plan_and_preprocess -d {' '.join(map(str, ids))} --plans-from {source}{name} "
                f"-c {cfg['configuration']}")

    if {i.orientation: i.name for i in first} == sources and len(set(idents.values())) == 1:
        return command([t.dataset_id for t in targets], first[0].dataset_id, next(iter(idents.values())))
    return " && ".join(command([t.dataset_id], sources[t.orientation], idents[t.orientation]) for t in targets)


def predict_classification(
    model_folder: Path,
    dataset: int | str | Sequence[int | str],
    output: Path,
    *,
    checkpoint: Literal["best", "final", "latest"] = "best",
    device: str = "auto",
    batch_size: int | None = None,
    exams: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> ClassificationPredictResult:
    """Predict every exam of preprocessed datasets with a trained classifier.

    Args:
        model_folder: a training run's fold folder (holds ``classifier.json``).
        dataset: the datasets to predict (a group id, or one per view); they must be preprocessed
            with the model's plans (``plan_and_preprocess --plans-from <training dataset>``).
        output: the CSV to write (per exam: ``p_<label>``, ``pred_<label>`` at the validation
            thresholds, ``target_<label>`` when known, views present/missing).
        checkpoint: which weights.
        device: ``auto``, ``cuda`` or ``cpu``.
        batch_size: exams per forward pass.
        exams: only these exam ids (e.g. one fold's validation exams); default every exam.
        n_boot, seed: bootstrap of the metrics written when targets are known.
    """
    from orthodiff_nnunet.evaluation.classification import write_predictions_csv

    model_folder = Path(model_folder)
    cfg, ckpt_path = _load_classifier(model_folder, checkpoint)
    order = list(cfg["views"])
    view_names = _views_to_predict(cfg, dataset, order)
    vds, targets, declared = _view_inputs(model_folder, cfg, order, view_names)
    trainer = _restored_trainer(model_folder, cfg, vds, targets, ckpt_path, device, batch_size)
    exams = _exams_to_predict(targets, vds, exams, view_names)
    thr_file = model_folder / CLS_THRESHOLDS_FILE
    thresholds = load_json(thr_file)["thresholds"] if thr_file.is_file() else {n: 0.5 for n in cfg["label_names"]}
    start = time.perf_counter()
    probs = trainer.predict_exams(exams)
    seconds = time.perf_counter() - start
    output = Path(output)
    write_predictions_csv(output, exams, probs, cfg["label_names"], thresholds, order)
    metrics, evaluated, not_evaluated = _write_metrics(output, exams, probs, cfg["label_names"], thresholds, declared,
                                                       n_boot, seed)
    return ClassificationPredictResult(
        csv=output, num_exams=len(exams), num_with_missing_views=sum(bool(e.missing_views(order)) for e in exams),
        label_names=list(cfg["label_names"]), exams_per_s=len(exams) / max(seconds, 1e-9), metrics=metrics,
        precision=trainer.precision,
        labels_evaluated=[cfg["label_names"][j] for j in evaluated] if declared else [],
        labels_not_evaluated=not_evaluated if declared else {})


def _load_classifier(model_folder: Path, checkpoint: str) -> tuple[dict, Path]:
    """The run's ``classifier.json`` and the checkpoint file; refuses a folder that is not a finished classifier."""
    if not (model_folder / CLS_CONFIG_FILE).is_file():
        raise ClassificationUsageError(f"{model_folder} is not a trained classifier (no classifier.json): give a "
                                       "training run's fold folder")
    cfg = load_json(model_folder / CLS_CONFIG_FILE)
    ckpt_path = model_folder / f"checkpoint_{checkpoint}.pth"
    if not ckpt_path.is_file():
        raise ClassificationUsageError(f"{ckpt_path} not found (the run did not finish?)")
    return cfg, ckpt_path


def _views_to_predict(cfg: Mapping, dataset: int | str | Sequence[int | str], order: list[str]) -> dict[str, str]:
    """view -> given dataset, for the model's views; warns about extra views and views without a dataset.

    Raises:
        ClassificationUsageError: the datasets are not preprocessed with the model's plans (with the command that
            does it, when it can be given), or hold none of the model's views.
    """
    try:
        given = resolve_views(dataset)
    except ClassificationUsageError as exc:
        fix = _plans_transfer_command(cfg, dataset, order)
        if fix is None:  # the site's raw datasets or the model's training datasets are not here
            sources = sorted(set(cfg["datasets"].values()))
            idents = sorted(set(cfg["plans_identifiers"].values()))
            raise ClassificationUsageError(
                f"{dataset} is not preprocessed with the model's plans. A site that only predicts gets the plans the "
                f"model was trained with: `orthodiff plan_and_preprocess -d <the site's dataset ids> --plans-from "
                f"{sources[0]} --plans-name {idents[0]} -c {cfg['configuration']}`. That needs the site converted into "
                "nnUNet_raw (`orthodiff convert MANIFEST -d ID -n NAME --external`) and the model's training datasets "
                f"{', '.join(sources)} (dataset.json in nnUNet_raw, plans in nnUNet_preprocessed)") from exc
        raise ClassificationUsageError(
            f"{dataset} is not preprocessed with the model's plans: run `{fix}` first (a site that only predicts is "
            "never planned itself: it gets the plans the model was trained with)") from exc
    view_names = {v: given[v] for v in order if v in given}
    if not view_names:
        raise ClassificationUsageError(f"the model reads {order}; the given datasets hold {list(given)}")
    for v in given:
        if v not in order:
            log.warning("%s (%s) is not a view of this model: ignored", given[v], v)
    for v in order:
        if v not in view_names:
            fix = _plans_transfer_command(cfg, dataset, [v]) if isinstance(dataset, (int, str)) else None
            log.warning("no %s dataset given: every exam is predicted without its %s view%s", v, v,
                        f" (its raw dataset is there: `{fix}` preprocesses it)" if fix else "")
    return view_names


def _view_inputs(model_folder: Path, cfg: Mapping, order: list[str],
                 view_names: dict[str, str]) -> tuple[dict, dict, set[str]]:
    """Each view's data (a shape-only stand-in for an absent view) and targets on the model's labels, and the
    labels the datasets' targets files declare.

    Raises:
        ClassificationUsageError: a dataset preprocessed with other plans than the model's (with the fix).
    """
    from orthodiff_nnunet.data.targets import TargetsError, TargetsFile, load_dataset_targets
    from orthodiff_nnunet.plans import preprocessing_hash
    from orthodiff_nnunet.data.exam_loaders import ViewData

    config_name = cfg["configuration"]
    vds, targets = {}, {}
    declared: set[str] = set()  # labels the datasets' targets files declare
    for v in order:
        model_plans = load_json(model_folder / f"plans_{v}.json")
        if v not in view_names:  # the view is absent for every exam: only its shape is needed
            channels = int(cfg["num_input_channels"][v])
            vds[v] = ViewData(v, f"(no {v} dataset)", cfg["plans_identifiers"][v], model_plans, config_name,
                              {"channel_names": {str(i): "MRI" for i in range(channels)}}, Path("/nonexistent"))
            continue
        name = view_names[v]
        folder = paths.preprocessed_dir() / name
        own = folder / f"{cfg['plans_identifiers'][v]}.json"
        if not own.is_file() or preprocessing_hash(load_json(own), config_name) != preprocessing_hash(model_plans, config_name):
            fix = _plans_transfer_command(cfg, name, [v]) or (
                f"orthodiff plan_and_preprocess -d {name} --plans-from {cfg['datasets'][v]} --plans-name "
                f"{cfg['plans_identifiers'][v]} -c {config_name}")
            raise ClassificationUsageError(
                f"{name} is not preprocessed with the model's {v} plans ({cfg['plans_identifiers'][v]} of "
                f"{cfg['datasets'][v]}): run `{fix}`")
        vds[v] = ViewData(v, name, cfg["plans_identifiers"][v], model_plans, config_name,
                          load_json(folder / "dataset.json"), folder)
        try:
            own_targets = load_dataset_targets(name)
            declared.update(own_targets.label_names)
            if list(own_targets.label_names) != list(cfg["label_names"]):
                shared = [n for n in cfg["label_names"] if n in own_targets.label_names]
                log.warning("%s declares labels %s, the model predicts %s: evaluating the shared labels %s",
                            name, list(own_targets.label_names), cfg["label_names"], shared)
            # the model's label order; a label the dataset does not declare is unknown (None). The
            # exam, patient, site, field strength and vendor of every case are kept (the strata).
            targets[v] = _on_labels(own_targets, cfg["label_names"])
        except TargetsError:
            from orthodiff_nnunet.data.targets import CaseTargets

            cases = vds[v].available_cases()
            targets[v] = TargetsFile(tuple(cfg["label_names"]),
                                     {c: CaseTargets(c, c, {n: None for n in cfg["label_names"]}) for c in cases})
    return vds, targets, declared


def _restored_trainer(model_folder: Path, cfg: Mapping, vds: dict, targets: dict, ckpt_path: Path, device: str,
                      batch_size: int | None):
    """The trainer rebuilt from ``classifier.json`` with the checkpoint's weights, in the recorded precision."""
    from orthodiff_nnunet.trainers.classification import nnUNetTrainerOrthoDiffCls

    trainer = nnUNetTrainerOrthoDiffCls(vds, targets, "all", model_folder, resolve_device(device))
    trainer.restore_config(cfg)
    trainer.network = trainer.build_network().to(trainer.device)
    trainer.load_checkpoint(ckpt_path, weights_only=True)
    # the recorded precision (fp32 where this device lacks it); predict_exams applies its autocast/TF32 locally
    trainer.precision = trainer.runtime_precision(trainer.precision)
    trainer.batch_size = batch_size or max(2, min(int(d.configuration_manager.batch_size) for d in vds.values()))
    return trainer


def _exams_to_predict(targets: dict, vds: dict, exams: Sequence[str] | None, view_names: dict[str, str]) -> list:
    """The exams matched across the views (every one, or those of ``exams``; refuses ids that are not there)."""
    from orthodiff_nnunet.data.targets import match_exams

    all_exams = match_exams(targets, {v: vds[v].available_cases() for v in targets})
    if exams is not None:
        wanted = set(exams)
        unknown = wanted - {e.exam for e in all_exams}
        if unknown:
            raise ClassificationUsageError(f"{len(unknown)} requested exam(s) are not in {list(view_names.values())}: "
                                           f"{sorted(unknown)[:3]}")
        all_exams = [e for e in all_exams if e.exam in wanted]
    return all_exams


def _write_metrics(output: Path, exams: list, probs, label_names: list[str], thresholds: Mapping[str, float],
                   declared: set[str], n_boot: int, seed: int) -> tuple[object | None, list[int], dict[str, str]]:
    """Metrics of the labels both the model and the datasets have, written beside the CSV when any target is known.

    Returns:
        The metrics (None without known targets), the evaluated label indices and the labels not evaluated (why).
    """
    import numpy as np

    from orthodiff_nnunet.evaluation.classification import classification_metrics
    from orthodiff_nnunet.utils import atomic_write_json, atomic_write_text

    y = np.stack([e.targets for e in exams]) if exams else np.zeros((0, len(label_names)))
    evaluated = [j for j, n in enumerate(label_names) if n in declared]
    not_evaluated = {n: "the model predicts it but the dataset does not annotate it"
                     for n in label_names if n not in declared}
    not_evaluated.update({n: "the dataset annotates it but the model does not predict it"
                          for n in sorted(declared - set(label_names))})
    if declared and not_evaluated:
        log.warning("labels not evaluated: %s", "; ".join(f"{k} ({w})" for k, w in not_evaluated.items()))
    metrics = None
    if exams and evaluated and np.isfinite(y[:, evaluated]).any():
        from orthodiff_nnunet.evaluation.classification import cluster_ids

        clusters, missing = cluster_ids([e.patient for e in exams], [e.exam for e in exams])
        metrics = classification_metrics(y[:, evaluated], probs[:, evaluated],
                                         [label_names[j] for j in evaluated], thresholds, n_boot, seed,
                                         clusters=clusters, n_without_patient=missing)
        atomic_write_json(output.with_name(output.stem + "_metrics.json"),
                          {**metrics.to_dict(), "labels_not_evaluated": not_evaluated})
        notes = "".join(f"\n- not evaluated: {k} ({w})" for k, w in not_evaluated.items())
        atomic_write_text(output.with_name(output.stem + "_metrics.md"), metrics.to_markdown() + "\n" + notes
                          + ("\n" if notes else ""))
    return metrics, evaluated, not_evaluated


def _on_labels(tf, label_names: Sequence[str]):
    """``tf`` with its targets re-keyed to ``label_names`` (None where ``tf`` does not declare a label).

    Everything else of each case (exam, patient, site, field strength, vendor, echo) is kept, so a
    dataset annotated with another label set keeps its exams and strata.
    """
    from dataclasses import replace

    from orthodiff_nnunet.data.targets import TargetsFile

    return TargetsFile(tuple(label_names), {c: replace(ct, targets={n: ct.targets.get(n) for n in label_names})
                                            for c, ct in tf.cases.items()}, tf.path)


# ----------------------------------------------------------------------------------------------
# command line
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orthodiff_nnunet.classification {train,predict} cls ...``: as ``orthodiff train/predict cls``."""
    from orthodiff_nnunet.cli.classification import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
