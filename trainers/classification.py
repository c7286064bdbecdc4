"""Multi-view abnormality classification on the diffusion encoders: the training lifecycle.

Not an ``nnUNetTrainer`` subclass: that is built around one dataset, one configuration and a dense
target (one plans file, patch loaders of one folder, sliding-window validation). The fused exam-level
classifier needs each exam from three datasets (sag, cor, ax: three plans, folders and patch sizes),
missing views per exam, exam-level targets with unknowns and AUROC-based model selection; forcing
that through nnUNetTrainer would override nearly every method. So ``nnUNetTrainerOrthoDiffCls``
(imported by bare module name through ``nnUNet_extTrainer``: absolute imports only) *composes*
nnU-Net's pieces, each beside its kind of code:

* :mod:`orthodiff_nnunet.data.exam_loaders`: per view nnU-Net's plans, dataset, loader and transforms;
  exam batches in nnU-Net's augmenters; the patient-disjoint train/selection/test sets;
* :mod:`orthodiff_nnunet.networks.classifier`: the network on the plans networks' encoders (filled by
  the encoder contract), its loss, learning-rate schedule and checkpoints;
* :mod:`orthodiff_nnunet.networks.precision`: the precision, measured on CUDA and recorded;
* :mod:`orthodiff_nnunet.evaluation.classification`: metrics, thresholds and the run's records.

After every epoch the selection exams are predicted and the checkpoint with the best mean AUROC is
kept; :meth:`~nnUNetTrainerOrthoDiffCls.finish` chooses the thresholds on its selection predictions
and applies them unchanged to the test exams.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from tqdm import tqdm

from orthodiff_nnunet.console import BAR_FORMAT
from orthodiff_nnunet.conventions import CLS_CONFIG_FILE
from orthodiff_nnunet.data import exam_loaders
from orthodiff_nnunet.data.targets import Exam, TargetsFile
from orthodiff_nnunet.errors import ClassificationError
from orthodiff_nnunet.evaluation import classification as evaluation
from orthodiff_nnunet.networks import classifier
from orthodiff_nnunet.networks import precision as prec
from orthodiff_nnunet.utils import atomic_write_json, to_plain

log = logging.getLogger(__name__)

Mode = Literal["finetune", "probe", "scratch"]
MODES: tuple[str, ...] = ("finetune", "probe", "scratch")


class nnUNetTrainerOrthoDiffCls(prec.TrainerPrecision):
    """Trains a multi-view classifier on the ``3d_classification`` configuration of each view's plans.

    Construct, set the public attributes below, then :meth:`initialize` and :meth:`run_training`
    (the ``orthodiff train cls`` API does this). The precision methods (``choose_precision``,
    ``runtime_precision``, autocast) come from :class:`~orthodiff_nnunet.networks.precision.TrainerPrecision`.

    Args:
        views: ordered view -> :class:`~orthodiff_nnunet.data.exam_loaders.ViewData` (fusion order: sag, cor, ax).
        targets: view -> that dataset's targets file (exams are matched by their ``exam`` field).
        fold: cross-validation fold of ``splits_final.json`` whose validation exams are the selection set
            (or ``"all"``: train and select on all exams, no test set).
        output_folder: where checkpoints, thresholds, metrics and logs go.
        device: torch device.
    """

    def __init__(self, views: Mapping[str, exam_loaders.ViewData], targets: Mapping[str, TargetsFile], fold: int | str,
                 output_folder: Path, device: torch.device = torch.device("cuda")) -> None:
        self.views: dict[str, exam_loaders.ViewData] = dict(views)
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
        self.fusion, self.feature_stages, self.dropout = "concat", 1, 0.0
        # optimisation (the method: head learning rate, encoder at 0.05x)
        self.initial_lr, self.encoder_lr_factor, self.weight_decay = 1e-3, 0.05, 1e-4
        self.num_epochs, self.num_iterations_per_epoch = 50, 50
        self.batch_size: int | None = None  # default: the classification configuration's batch size
        self.label_fraction, self.label_fraction_seed = 1.0, 12345
        self.test_fold: exam_loaders.TestFold = "auto"  # held-out test set: "auto" (next fold), a fold, or None
        self.allow_pretraining_overlap = False  # accept encoders pretrained on scans of the test exams
        self.pretraining_overlap: dict[str, int] = {}  # view -> test exams whose scan the encoder saw
        self.precision: prec.Precision = "auto"  # what was asked for; resolved by choose_precision()
        self.precision_requested: prec.Precision = "auto"
        self.mirror_axes: exam_loaders.MirrorAxes = "lr"
        self.augment, self.threshold_method, self.n_boot, self.seed = True, "youden", 1000, 0
        # state
        self.network: classifier.MultiViewClassifier | None = None
        self.optimizer = self.lr_scheduler = self.grad_scaler = self._train_gen = None
        self.current_epoch, self.best_metric, self.best_epoch = 0, -math.inf, -1
        self.history: list[dict] = []  # one row per epoch (progress.csv)
        self.load_reports: dict[str, str] = {}
        self.precision_timings: dict[str, float] = {}
        self.exams_train, self.exams_selection, self.exams_test = [], [], []  # lists of Exam
        self.split: exam_loaders.ExamSplit | None = None
        self._schedule_cfg: dict[str, dict] | None = None
        self._film_cfg: dict[str, bool] | None = None

    # -- set-up ----------------------------------------------------------------------------------
    def config(self) -> dict:
        """Everything needed to rebuild the network and read new data the same way (saved with the model)."""
        return {
            "format": classifier.CHECKPOINT_FORMAT, "trainer": type(self).__name__,
            **exam_loaders.views_record(self.views),
            "label_names": list(self.label_names),
            "mode": self.mode,
            "encoders": {v: (str(p) if p else None) for v, p in self.encoder_paths.items()},
            "pretraining_saw_test_exams": dict(self.pretraining_overlap),
            "noise_timesteps": {v: int(self.noise_timesteps.get(v, 0)) for v in self.views},
            "schedules": self.schedules(),
            "film": self.film_views(),
            "fusion": self.fusion, "feature_stages": self.feature_stages, "dropout": self.dropout,
            "fold": self.fold, "test_fold": self.test_fold, "sets": self._sets_record(),
            "label_fraction": self.label_fraction, "label_fraction_seed": self.label_fraction_seed,
            "precision": self.precision, "precision_requested": self.precision_requested,
            "precision_timings_ms": dict(self.precision_timings),
            "mirror_axes": self.mirror_axes, "threshold_method": self.threshold_method,
        }

    def schedules(self) -> dict[str, dict]:
        """Per view, the pretraining's noise schedule (from the encoder's provenance; cosine/1000 without one)."""
        if self._schedule_cfg is None:
            self._schedule_cfg = {v: classifier.encoder_schedule(self.encoder_paths.get(v)) for v in self.views}
        return self._schedule_cfg

    def film_views(self) -> dict[str, bool]:
        """Per view, whether the encoder carries the pretraining's timestep FiLM (pretrained encoders only)."""
        if self._film_cfg is None:
            self._film_cfg = {v: bool(self.film and self.mode != "scratch" and self.encoder_paths.get(v))
                              for v in self.views}
        return self._film_cfg

    def restore_config(self, cfg: Mapping) -> None:
        """Set the attributes of a trained model from its ``classifier.json`` (for prediction)."""
        if cfg.get("format") != classifier.CHECKPOINT_FORMAT:
            raise ClassificationError(f"not an orthodiff classifier configuration (format {cfg.get('format')!r})")
        self.mode, self.fusion = cfg["mode"], cfg["fusion"]
        self.feature_stages, self.dropout = int(cfg["feature_stages"]), float(cfg.get("dropout", 0.0))
        self.noise_timesteps = {v: int(t) for v, t in cfg["noise_timesteps"].items()}
        self.precision = cfg.get("precision", "fp32")
        if self.precision not in prec.PRECISIONS:  # written before the precision was resolved (older runs)
            log.warning("classifier.json records precision %r, not the precision the model was trained in: "
                        "predicting in fp32", self.precision)
            self.precision = "fp32"
        self.threshold_method = cfg.get("threshold_method", "youden")
        self._schedule_cfg = {v: dict(s) for v, s in cfg["schedules"].items()}
        self._film_cfg = {v: bool(f) for v, f in cfg["film"].items()}
        self.encoder_paths = {v: (Path(p) if p else None) for v, p in cfg.get("encoders", {}).items()}
        self.label_names = tuple(cfg["label_names"])

    def _sets_record(self) -> dict | None:
        sizes = len(self.exams_train), len(self.exams_selection), len(self.exams_test)
        return self.split.record(*sizes) if self.split else None

    def _split(self) -> None:
        """Train/selection/test exams (:func:`~orthodiff_nnunet.data.exam_loaders.exam_sets`)."""
        sets = exam_loaders.exam_sets(self.views, self.targets, self.fold, self.test_fold, self.label_fraction,
                         self.label_fraction_seed)
        self.split, self.exams_train, self.exams_selection, self.exams_test = sets.split, sets.train, sets.selection, \
            sets.test

    def _loaders(self, exams: Sequence[Exam], training: bool) -> dict[str, exam_loaders.ExamCaseLoader]:
        return exam_loaders.exam_case_loaders(self.views, exams, training, self.mirror_axes, self.augment)

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {v: (d.num_input_channels, *d.patch_size) for v, d in self.views.items()}

    def build_network(self) -> classifier.MultiViewClassifier:
        """The classifier of these views and settings (weights freshly initialised)."""
        return classifier.build_classifier(
            {v: d.plans for v, d in self.views.items()}, next(iter(self.views.values())).configuration,
            {v: d.num_input_channels for v, d in self.views.items()}, len(self.label_names), fusion=self.fusion,
            feature_stages=self.feature_stages, noise_timesteps=self.noise_timesteps, schedules=self.schedules(),
            film=self.film_views(), dropout=self.dropout)

    def _check_pretraining_overlap(self) -> None:
        """Refuse encoders whose pretraining saw a scan of a test exam, unless the user accepts it (recorded)."""
        self.pretraining_overlap.update(exam_loaders.pretraining_overlap(
            self.encoder_paths, self.views, self.exams_test, self.split.test_source if self.split else "none",
            self.allow_pretraining_overlap))

    def _load_encoders(self) -> None:
        self._check_pretraining_overlap()
        for v, branch in self.network.branches.items():
            path = self.encoder_paths.get(v)
            if path is None:
                raise ClassificationError(f"mode {self.mode!r} needs a pretrained encoder for view {v}: pass "
                                          f"--encoder {v}=PATH, --encoders-from DATASET, or run `orthodiff pretrain` "
                                          f"on {self.views[v].dataset_name}")
            self.load_reports[v] = classifier.load_timestep_film(branch, path, self.views[v].architecture_hash)
            log.info("%s: %s", v, self.load_reports[v])

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
        groups = classifier.param_groups(self.network, self.mode, self.initial_lr, self.encoder_lr_factor)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=self.weight_decay)
        self.lr_scheduler = classifier.poly_lr_schedule(self.optimizer, self.num_epochs * self.num_iterations_per_epoch)
        self.pos_weight = classifier.positive_weights(np.stack([e.targets for e in self.exams_train])).to(self.device)
        if self.batch_size is None:
            self.batch_size = max(2, min(int(d.configuration_manager.batch_size) for d in self.views.values()))
        self.output_folder.mkdir(parents=True, exist_ok=True)
        for v, d in self.views.items():
            atomic_write_json(self.output_folder / f"plans_{v}.json", d.plans)
        exam_loaders.write_sets_json(self.output_folder / "split.json", self.fold, self.test_fold, self._sets_record(),
                        self.exams_train, self.exams_selection, self.exams_test)
        # classifier.json is written by run_training() once the precision is resolved (never "auto")

    def write_config(self) -> None:
        """``classifier.json``: the settings of this model, with the precision it computes in."""
        if self.precision not in prec.PRECISIONS:
            raise RuntimeError("the precision is not resolved yet: call choose_precision() first")
        atomic_write_json(self.output_folder / CLS_CONFIG_FILE, self.config())

    # -- steps -----------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
        nb = self.device.type == "cuda"
        data = {v: x.to(self.device, non_blocking=nb) for v, x in batch["data"].items()}
        return data, batch["present"].to(self.device), batch["target"].to(self.device, non_blocking=nb)

    def _forward_backward(self, batch: dict, precision: str, step: bool = True) -> torch.Tensor:
        """Forward/backward in ``precision`` (fp16: loss scaling), the optimizer step (clipped at 12) if ``step``."""
        with self._tf32(precision):
            data, present, target = self._to_device(batch)
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast(precision):
                logits = self.network(data, present)
            loss = classifier.masked_bce(logits, target, self.pos_weight)
            scaler = self._scaler(precision)
            scaler.scale(loss).backward()
            if step:
                scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
                scaler.step(self.optimizer)
                scaler.update()
        return loss.detach()

    def train_step(self, batch: dict) -> float:
        self.network.train()
        if self.mode == "probe":  # frozen encoders: their normalisation statistics stay as pretrained
            for b in self.network.branches.values():
                b.encoder.eval()
        loss = self._forward_backward(batch, self.precision)
        self.lr_scheduler.step()
        return float(loss)

    @torch.no_grad()
    def predict_exams(self, exams: Sequence[Exam], batch_size: int | None = None) -> np.ndarray:
        """``(N, L)`` probabilities of ``exams`` (centre crop, no augmentation, deterministic noise)."""
        self.network.eval()
        bs = batch_size or self.batch_size
        loader = exam_loaders.MultiViewExamLoader(exams, self._loaders(exams, False), self._shapes(), bs, False)
        out = []
        for i in range(0, len(exams), bs):
            data, present, _ = self._to_device(loader.collate(exams[i:i + bs]))
            with self._tf32(), self._autocast():
                out.append(torch.sigmoid(self.network(data, present).float()).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.label_names)), dtype=np.float32)

    # -- training loop ---------------------------------------------------------------------------
    def _start_augmenter(self):
        loader = exam_loaders.MultiViewExamLoader(self.exams_train, self._loaders(self.exams_train, training=True),
                                                  self._shapes(), self.batch_size)
        return exam_loaders.exam_augmenter(loader, pin_memory=self.device.type == "cuda")

    def validate(self) -> dict:
        """Mean AUROC and BCE of the selection exams (the model-selection criterion)."""
        y = np.stack([e.targets for e in self.exams_selection])
        p = self.predict_exams(self.exams_selection)
        return {"selection_mean_auroc": evaluation.mean_auroc(y, p), "selection_loss": evaluation.mean_known_bce(y, p)}

    def _train_epoch(self, progress) -> dict:
        """``num_iterations_per_epoch`` steps, then the selection exams predicted: the epoch's row of the history."""
        start = time.perf_counter()
        losses = []
        for _ in range(int(self.num_iterations_per_epoch)):
            losses.append(self.train_step(next(self._train_gen)))
            progress.set_postfix(epoch=self.current_epoch, loss=f"{losses[-1]:.3f}", refresh=False)
            progress.update(1)
        train_seconds = time.perf_counter() - start
        return {"epoch": self.current_epoch, "train_loss": float(np.mean(losses)), **self.validate(),
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_exams_per_s": self.num_iterations_per_epoch * self.batch_size / max(train_seconds, 1e-9),
                "seconds": time.perf_counter() - start}

    def run_training(self) -> None:
        """Epochs of ``num_iterations_per_epoch`` steps, the selection exams predicted after each (best checkpoint
        by their mean AUROC), best/latest/final checkpoints; ``classifier.json`` once the precision is resolved."""
        if self.network is None:
            raise RuntimeError("call initialize() first")
        self._train_gen = self._start_augmenter()
        try:
            self._precision_at_start(lambda: next(self._train_gen))
            self.write_config()
            per_epoch = int(self.num_iterations_per_epoch)
            progress = tqdm(total=int(self.num_epochs) * per_epoch, initial=int(self.current_epoch) * per_epoch,
                            unit="it", desc="train cls", mininterval=1.0, dynamic_ncols=True, bar_format=BAR_FORMAT)
            while self.current_epoch < self.num_epochs:
                row = self._train_epoch(progress)
                self.history.append(row)
                metric = row["selection_mean_auroc"]
                improved = not math.isnan(metric) and metric > self.best_metric
                if improved:
                    self.best_metric, self.best_epoch = metric, self.current_epoch
                self.current_epoch += 1
                if improved:
                    self.save_checkpoint(self.output_folder / "checkpoint_best.pth")
                self.save_checkpoint(self.output_folder / "checkpoint_latest.pth")
                evaluation.write_training_progress(self.output_folder, self.history)
                log.info("epoch %d: train loss %.4f, selection loss %.4f, selection mean AUROC %.3f%s (%.1f s)",
                         row["epoch"], row["train_loss"], row["selection_loss"], metric, " (best)" if improved else "",
                         row["seconds"])
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

    # -- after training --------------------------------------------------------------------------
    def finish(self) -> dict:
        """Best weights -> selection predictions -> thresholds -> the same thresholds on the test exams.

        Returns:
            :func:`~orthodiff_nnunet.evaluation.classification.write_heldout_results`' result (it writes the
            run's records), with a test set also ``test_exams_per_s``.
        """
        self.load_checkpoint(self.output_folder / "checkpoint_best.pth", weights_only=True)
        sp = self.split
        selection = evaluation.PredictedSet(self.exams_selection, self.predict_exams(self.exams_selection),
                                 sp.selection_source if sp else f"fold {self.fold} validation")
        test, speed = None, {}
        if self.exams_test:
            start = time.perf_counter()
            probs = self.predict_exams(self.exams_test)
            speed["test_exams_per_s"] = len(self.exams_test) / max(time.perf_counter() - start, 1e-9)
            test = evaluation.PredictedSet(self.exams_test, probs, sp.test_source if sp else "")
        out = evaluation.write_heldout_results(self.output_folder, selection, test, self.label_names, list(self.views),
                                    self.threshold_method, self.n_boot, self.seed, self._sets_record())
        return {**out, **speed}

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, path: Path) -> None:
        """Atomic (:func:`~orthodiff_nnunet.networks.classifier.write_classifier_checkpoint`)."""
        classifier.write_classifier_checkpoint(path, {
            "config": to_plain(self.config()), "network_weights": self.network.state_dict(),
            "optimizer_state": self.optimizer.state_dict() if self.optimizer else None,
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler else None,
            "lr_scheduler_state": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
            "current_epoch": self.current_epoch, "best_metric": self.best_metric, "best_epoch": self.best_epoch,
            "history": to_plain(self.history), "load_reports": to_plain(self.load_reports),
            "precision_timings": to_plain(self.precision_timings)})

    def load_checkpoint(self, path: Path, weights_only: bool = False) -> None:
        """The network's weights; unless ``weights_only`` also the run's state, to resume in its precision."""
        ckpt = classifier.read_classifier_checkpoint(path)
        self.network.load_state_dict(ckpt["network_weights"])
        if weights_only:
            return
        self._resume_precision(ckpt.get("config") or {}, ckpt.get("precision_timings"), path)
        for state, target in (("optimizer_state", self.optimizer), ("lr_scheduler_state", self.lr_scheduler),
                              ("grad_scaler_state", self.grad_scaler)):
            if ckpt.get(state) and target is not None:
                target.load_state_dict(ckpt[state])
        self.current_epoch = ckpt["current_epoch"]
        self.best_metric, self.best_epoch = ckpt["best_metric"], ckpt["best_epoch"]
        renamed = {"val_mean_auroc": "selection_mean_auroc", "val_loss": "selection_loss"}  # runs before the rename
        self.history = [{renamed.get(k, k): v for k, v in row.items()} for row in ckpt["history"]]
