"""Segmentation warm-started from the diffusion-pretrained encoder, and its from-scratch twin.

``nnUNetTrainerOrthoDiffSeg`` is nnU-Net's own trainer (network, loss, SGD, augmentation, deep
supervision, checkpoints, validation, predictor) with four small changes, each a single hook:

* ``initialize``: after nnU-Net builds the network, the encoder checkpoint of the diffusion
  pretraining is loaded strictly into ``network.encoder`` (CPU map location, architecture hash of
  the plans checked first, so an encoder of other plans is refused with a message saying what to
  do) and what was loaded is written to the training log.
* ``do_split``: nnU-Net's split of the fold, restricted to labeled cases (the converter writes
  all-background maps for unlabeled scans and records them in ``orthodiff_targets.json``), and the
  fold's labeled training cases reduced to ``label_fraction`` of each site
  (:func:`orthodiff_nnunet.data.splits.label_fraction_subset`, deterministic).
* ``configure_optimizers``: nnU-Net's SGD with a linear learning-rate warm-up followed by nnU-Net's
  polynomial decay (:class:`WarmupPolyLRScheduler`; no warm-up = nnU-Net's schedule exactly).
* ``on_train_epoch_start``: optionally the first ``freeze_encoder_epochs`` epochs with the encoder
  frozen (no gradients, no updates), then nnU-Net's epoch start.

More hooks only add to nnU-Net's: ``initialize`` first checks that the preprocessed data were made
by these plans (:func:`orthodiff_nnunet.planning.check_preprocessed_data`), ``on_train_start`` writes
``orthodiff_seg_run.json`` (init, encoder and its provenance, label fraction, seed, the chosen
training cases, schedule) beside the checkpoints, ``on_epoch_end``/``save_checkpoint`` write
``checkpoint_latest.pth`` atomically whenever ``checkpoint_minutes`` have passed since the last one
(nnU-Net only every ``save_every`` = 50 epochs, so a killed run lost up to 50 epochs), and
``perform_actual_validation`` can switch off mirroring (``validation_mirroring``, for short CPU runs). ``train_step``, the loss, the network builder and the data pipeline are
nnU-Net's, untouched, so a trained model folder is an ordinary nnU-Net model.

``nnUNetTrainerOrthoDiffSegScratch`` is the same class with ``init = "scratch"``: identical plans,
data, case subset, schedule and iterations; only the encoder's starting weights differ. The two
trainer names give the two runs distinct nnU-Net model folders
(``<Trainer>__<plans>__<configuration>``) side by side, and each can be started by nnU-Net itself
(``nnUNetv2_train <id> 3d_fullres 0 -tr nnUNetTrainerOrthoDiffSeg -p orthodiffResEncMPlans``).

Default schedule, and why: initial learning rate 1e-2 (nnU-Net's SGD, Nesterov momentum 0.99)
with a linear warm-up over the first 5% of the epochs, the same for both inits. The decoder and the
segmentation heads start from random weights and need nnU-Net's learning rate to train in nnU-Net's
epoch budget; the encoder comes from a different objective (denoising, Adam 1e-4), so its features
are a starting point, not an optimum to preserve with a tiny learning rate. What the warm-up protects
against is the first updates, driven by the random decoder's large, uninformative gradients, wiping
out the pretrained filters before the decoder has aligned with them (the nnssl recipe: linear
warm-up, then poly; it uses 1e-3 for fine-tuning, available as ``initial_lr``/``--lr``). The
from-scratch twin gets the same warm-up so that the init is the only difference between the two
runs; ``warmup_epochs = 0`` reproduces ``nnUNetTrainer``'s schedule exactly.

nnU-Net imports this module by bare name through ``nnUNet_extTrainer``: absolute imports only.
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime, timezone
from importlib.metadata import version as _package_version
from pathlib import Path

import numpy as np
import torch
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast
from nnunetv2.paths import nnUNet_raw, nnUNet_results
from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerAdam
from torch.optim.lr_scheduler import _LRScheduler

from orthodiff_nnunet import __version__ as _orthodiff_version
from orthodiff_nnunet.conventions import SEG_AUGMENTATIONS, SEG_RUN_RECORD, default_encoder_path
from orthodiff_nnunet.data.splits import SPLIT_SEED, label_fraction_subset
from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.networks.build import architecture_hash, architecture_of
from orthodiff_nnunet.networks.encoder_io import EncoderLoadReport, encoder_of, load_encoder
from orthodiff_nnunet.preprocessing import check_preprocessed_data
from orthodiff_nnunet.trainers.progress import TrainingProgressMixin
from orthodiff_nnunet.utils import atomic_write_json, remove_dead_temporaries, temporary_path

INITS = ("diffusion", "scratch")
OPTIMIZERS = ("sgd", "adamw")  # nnU-Net's default and its nnUNetTrainerAdam
DEFAULT_WARMUP_FRACTION = 0.05  # nnssl: 50 of 1000 epochs
#: minutes between ``checkpoint_latest.pth`` writes (at the end of the first epoch after that time; 0: every epoch)
DEFAULT_CHECKPOINT_MINUTES = 3.0
AUGMENTATIONS = SEG_AUGMENTATIONS
#: what ``cross-site`` changes in nnU-Net's pipeline: (transform class name) -> (apply probability, attribute,
#: value). nnU-Net adds Gaussian noise of sd 0-0.1 (z-score units) to 10 % of the patches and scales the
#: contrast by 0.75-1.25 in 15 %. Noise in MR magnitude images scales inversely with field strength, so a
#: site at half the field (1.5 T against a 3 T training site) has twice the relative noise: on the demo's
#: 3 T phantom site the noise is 0.28-0.35 z units (median absolute difference of neighbouring voxels), and
#: half the SNR adds about 0.55 to it; lower field also flattens tissue contrast. ``cross-site`` covers that
#: range in half the patches (noise sd 0-0.6) and flattens or raises contrast (0.6-1.25) in 30 %; everything
#: else is nnU-Net's (docs/DEMO.md has the measurement that chose it).
CROSS_SITE_AUGMENTATION = {
    "GaussianNoiseTransform": (0.5, "noise_variance", (0.0, 0.6)),  # batchgeneratorsv2 samples it as the sd
    "ContrastTransform": (0.3, "contrast_range", BGContrast((0.6, 1.25))),  # nnU-Net's sampler: half below 1
}


class SegmentationSetupError(OrthodiffError):
    """The segmentation run cannot start as asked; the message says what to do."""


def plain_numbers(value):
    """``value`` with numpy scalars (also inside lists, tuples and dicts) as plain Python numbers.

    nnU-Net logs lists of numpy scalars (``Pseudo dice [np.float64(0.8123), ...]`` with numpy 2);
    the log should say ``[0.8123, ...]``.
    """
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(plain_numbers(v) for v in value)
    if isinstance(value, dict):
        return {k: plain_numbers(v) for k, v in value.items()}
    return value


class WarmupPolyLRScheduler(_LRScheduler):
    """nnU-Net's linear warm-up, then nnU-Net's polynomial decay; stepped once per epoch like nnU-Net's.

    For epoch ``s < W = warmup_steps`` it steps nnU-Net's ``Lin_incr_LRScheduler`` with
    ``max_steps = W + 1``: ``lr(s) = initial_lr / (W + 1) * (s + 1)``, a straight line from 0 (at
    step -1) to ``initial_lr`` (at step W), so the first epoch already trains, at
    ``initial_lr / (W + 1)``, and every one of the W warm-up epochs is below the target. From ``W`` on
    it steps nnU-Net's ``PolyLRScheduler_offset``: ``lr(s) = initial_lr * (1 - (s - W) / (max_steps -
    W)) ** exponent``, nnU-Net's decay over the remaining epochs, starting at ``initial_lr``. With
    ``W = 0`` it equals nnU-Net's ``PolyLRScheduler``. Both parts take the epoch (nnU-Net's
    ``on_train_epoch_start`` passes ``current_epoch``), so a resumed run continues the same curve;
    torch's ``SequentialLR`` takes no epoch, which is why it is not used.

    nnU-Net's own ``nnUNetTrainer_warmup`` uses ``Lin_incr_LRScheduler(max_steps=W)``: the warm-up
    reaches ``initial_lr`` at its last epoch, so two epochs run at the peak. The denominator ``W + 1``
    keeps this trainer's curve as it was before it used nnU-Net's classes (recorded runs and their
    ``warmup_epochs`` mean the same); it equals the hand-written one to 1 ulp in the warm-up and exactly
    after it (``tests/test_trainer_library.py``).
    """

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int = 0,
                 exponent: float = 0.9, current_step: int | None = None):
        if not 0 <= warmup_steps < max(max_steps, 1):
            raise ValueError(f"warm-up of {warmup_steps} epochs must be shorter than the {max_steps} epochs")
        self.warmup_steps = warmup_steps
        self.warmup = Lin_incr_LRScheduler(optimizer, initial_lr, warmup_steps + 1)
        self.decay = PolyLRScheduler_offset(optimizer, initial_lr, max_steps, warmup_steps, exponent)
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        (self.warmup if current_step < self.warmup_steps else self.decay).step(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr


def adjust_random_transforms(compose, changes: dict[str, tuple[float, str, object]]) -> None:
    """Set, in nnU-Net's composed training transforms, the apply probability and one attribute of each randomly
    applied transform named in ``changes`` (class name -> (probability, attribute, value)).

    Raises:
        SegmentationSetupError: a named transform is not in the pipeline, or more than once (another nnU-Net
            version composes it differently: the profile must be checked against it).
    """
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    for name, (probability, attribute, value) in changes.items():
        found = [t for t in compose.transforms
                 if isinstance(t, RandomTransform) and type(t.transform).__name__ == name]
        if len(found) != 1 or not hasattr(found[0].transform, attribute):
            raise SegmentationSetupError(
                f"nnU-Net's training transforms hold {len(found)} randomly applied {name} (expected one with "
                f"{attribute!r}): this nnU-Net version composes its augmentation differently; use augmentation "
                "'nnunet' or update CROSS_SITE_AUGMENTATION in orthodiff_nnunet/trainers/segmentation.py")
        found[0].apply_probability = float(probability)
        setattr(found[0].transform, attribute, value)


class nnUNetTrainerOrthoDiffSeg(TrainingProgressMixin, nnUNetTrainer):
    """nnU-Net segmentation warm-started from the diffusion encoder (``init = "diffusion"``).

    Public attributes, set before :meth:`initialize` (the ``orthodiff train seg`` API does):

    * ``encoder_path``: encoder checkpoint; None = the pretraining output of this dataset and plans
      (``nnUNet_results/<Dataset>/nnUNetTrainerOrthoDiffPretrain__<plans>__3d_diffusion/fold_all/encoder.pt``).
    * ``label_fraction`` (0, 1] and ``label_fraction_seed``: share of the fold's labeled training
      cases, per site.
    * ``warmup_epochs``: linear LR warm-up length; None = 5% of ``num_epochs`` (at least 1).
    * ``freeze_encoder_epochs``: epochs at the start with the encoder frozen (default 0).
    * ``validation_mirroring``: mirror test-time augmentation in the final validation.
    * ``checkpoint_minutes``: write ``checkpoint_latest.pth`` at the end of the first epoch after this
      many minutes since the last one (default 3; 0 = every epoch), besides nnU-Net's every 50 epochs.
      A killed run then loses at most that time plus one epoch.
    * ``optimizer``: ``sgd`` (nnU-Net's default, SGD with Nesterov momentum 0.99) or ``adamw``
      (nnU-Net's own ``nnUNetTrainerAdam``: AdamW with AMSGrad). Both take ``initial_lr`` and the same
      warm-up and poly schedule. AdamW is for short schedules: on the demo's phantom, from scratch,
      SGD at 1e-2 had learnt no structure after 100 iterations where AdamW at 3e-3 had femur and tibia
      at Dice 0.85 / 0.90 (docs/DEMO.md).
    * ``channels_last``: network and training/validation batches in channels-last-3d memory format
      (same values, another layout). On a CPU, mkldnn's 3D convolutions are faster so: 1.28x per
      training step of the demo's network (BENCHMARKS.md, ``bench/bench_seg_trainer.py --versus
      contiguous``). Default off, as nnU-Net.
    * ``augmentation``: ``nnunet`` (default: nnU-Net's training transforms unchanged) or ``cross-site``
      (nnU-Net's, with the noise and contrast transforms applied more often and wider, for a model that
      meets sites of lower field strength: :data:`CROSS_SITE_AUGMENTATION`).
    """

    init = "diffusion"

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.encoder_path: str | None = None
        self.label_fraction: float = 1.0
        self.label_fraction_seed: int = SPLIT_SEED
        self.warmup_epochs: int | None = None
        self.freeze_encoder_epochs: int = 0
        self.validation_mirroring: bool = True
        self.encoder_report: EncoderLoadReport | None = None
        self._split_cache: tuple[list[str], list[str], dict] | None = None
        self._encoder_frozen = False
        self.checkpoint_minutes: float = DEFAULT_CHECKPOINT_MINUTES
        self.optimizer_name: str = "sgd"
        self.channels_last: bool = False
        self.augmentation: str = "nnunet"
        self.run_seed: int | None = None  # recorded only: ``train_segmentation(run_seed=...)`` seeds the generators
        self._last_latest_checkpoint = time.monotonic()

    def print_to_log_file(self, *args, also_print_to_console: bool = True, add_timestamp: bool = True) -> None:
        """nnU-Net's log line, with numpy scalars printed as plain numbers (see :func:`plain_numbers`)."""
        super().print_to_log_file(*(plain_numbers(a) for a in args), also_print_to_console=also_print_to_console,
                                  add_timestamp=add_timestamp)

    # -- configuration --------------------------------------------------------------------------

    def resolved_warmup_epochs(self) -> int:
        if self.warmup_epochs is None:
            return max(1, math.ceil(DEFAULT_WARMUP_FRACTION * self.num_epochs)) if self.num_epochs > 1 else 0
        return int(self.warmup_epochs)

    def resolved_encoder_path(self) -> Path | None:
        if self.init == "scratch":
            return None
        if self.encoder_path is not None:
            return Path(self.encoder_path)
        return default_encoder_path(self.plans_manager.dataset_name, self.plans_manager.plans_name,
                                    nnUNet_results.require())

    def _check_settings(self) -> None:
        if self.init not in INITS:
            raise SegmentationSetupError(f"init {self.init!r}: use one of {', '.join(INITS)}")
        if self.augmentation not in AUGMENTATIONS:
            raise SegmentationSetupError(f"augmentation {self.augmentation!r}: use one of {', '.join(AUGMENTATIONS)}")
        if self.optimizer_name not in OPTIMIZERS:
            raise SegmentationSetupError(f"optimizer {self.optimizer_name!r}: use one of {', '.join(OPTIMIZERS)}")
        if not 0 < float(self.label_fraction) <= 1:
            raise SegmentationSetupError(f"label fraction {self.label_fraction} must be in (0, 1]")
        w = self.resolved_warmup_epochs()
        if w < 0 or (w and w >= self.num_epochs):
            raise SegmentationSetupError(f"warm-up of {w} epochs must be shorter than the {self.num_epochs} epochs")
        if self.freeze_encoder_epochs < 0 or self.freeze_encoder_epochs >= max(self.num_epochs, 1):
            raise SegmentationSetupError(
                f"freezing the encoder for {self.freeze_encoder_epochs} of {self.num_epochs} epochs: use fewer")
        if self.freeze_encoder_epochs and self.init == "scratch":
            raise SegmentationSetupError("freezing a randomly initialised encoder trains on random features: "
                                         "use freeze_encoder_epochs = 0 with init 'scratch'")
        if not float(self.checkpoint_minutes) >= 0:
            raise SegmentationSetupError(f"checkpoint interval of {self.checkpoint_minutes} minutes: use 0 (every "
                                         "epoch) or more")
        if self.freeze_encoder_epochs and self.is_ddp:
            raise SegmentationSetupError("freezing the encoder is not supported with DDP (parameters without "
                                         "gradients stall its reducer): use freeze_encoder_epochs = 0")

    def initialize(self) -> None:
        """Check the data, nnU-Net's initialize, then the encoder warm start (all before any training)."""
        self._check_settings()
        check_preprocessed_data(Path(self.preprocessed_dataset_folder_base), self.plans_manager.plans,
                                self.configuration_name, self.dataset_json)
        super().initialize()
        self._load_encoder()
        if self.channels_last:
            # in place: the optimizer nnU-Net built holds the same parameter objects
            self.network.to(memory_format=torch.channels_last_3d)
            self.print_to_log_file("network and batches in channels-last-3d memory format")

    def _load_encoder(self) -> None:
        path = self.resolved_encoder_path()
        if path is None:
            self.print_to_log_file("init 'scratch': nnU-Net's random initialisation (the from-scratch twin)")
            return
        if not path.is_file():
            raise SegmentationSetupError(
                f"no encoder checkpoint at {path}: run `orthodiff pretrain -d {self.plans_manager.dataset_name} "
                f"-p {self.plans_manager.plans_name}` first, pass the encoder explicitly, or use init 'scratch'")
        arch_hash = architecture_hash(architecture_of(self.plans_manager.plans, self.configuration_name))
        self.encoder_report = load_encoder(self.network, path, arch_hash)
        self.print_to_log_file(f"encoder warm start from {path}: {self.encoder_report.summary()}; "
                               "decoder and segmentation heads keep nnU-Net's initialisation")

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """nnU-Net's network with the encoder contract's per-stage affine buffers (identity until loaded).

        The pretrained encoder ran with the pretraining's timestep conditioning; the buffers carry it
        (``orthodiff_nnunet.networks.conditioning``). Built here, they are in every checkpoint of
        both twins, and nnU-Net's predictor, which rebuilds the network through this method, applies them.
        """
        from orthodiff_nnunet.networks.conditioning import install_stage_affine

        net = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_output_channels, enable_deep_supervision)
        install_stage_affine(net.encoder)
        return net

    def configure_optimizers(self):
        """nnU-Net's SGD (or its ``nnUNetTrainerAdam``'s AdamW); its poly schedule preceded by a linear warm-up."""
        if self.optimizer_name == "adamw":
            optimizer, _ = nnUNetTrainerAdam.configure_optimizers(self)
        else:
            optimizer, _ = super().configure_optimizers()
        scheduler = WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.resolved_warmup_epochs())
        return optimizer, scheduler

    # -- data: labeled cases, label fraction ------------------------------------------------------

    def case_table(self) -> dict[str, dict]:
        """``orthodiff_targets.json`` cases (site, labeled/unlabeled) of this dataset; {} if unknown.

        Read from the raw dataset (``nnUNet_raw``) where the converter wrote it, else from the
        preprocessed dataset folder.
        """
        name = (self.dataset_json.get("orthodiff") or {}).get("targets_file", "orthodiff_targets.json")
        candidates = [Path(self.preprocessed_dataset_folder_base) / name]
        if nnUNet_raw.is_set():
            candidates.insert(0, Path(nnUNet_raw.get()) / self.plans_manager.dataset_name / name)
        for f in candidates:
            if f.is_file():
                return json.loads(f.read_text())["cases"]
        if (self.dataset_json.get("orthodiff") or {}).get("num_unlabeled", 0):
            raise SegmentationSetupError(
                f"{self.plans_manager.dataset_name} has unlabeled cases but its {name} was not found in "
                f"{' or '.join(str(c.parent) for c in candidates)}: set nnUNet_raw to the converted raw data")
        return {}

    def do_split(self):
        """nnU-Net's split, labeled cases only; the fold's training cases reduced to the label fraction."""
        if self._split_cache is None:
            tr_keys, val_keys = super().do_split()
            table = self.case_table()
            labeled = {c for c, v in table.items() if v.get("segmentation", "labeled") == "labeled"} if table else None
            is_labeled = (lambda c: True) if labeled is None else (lambda c: c in labeled)
            tr_lab = [k for k in tr_keys if is_labeled(k)]
            val_lab = [k for k in val_keys if is_labeled(k)]
            if not tr_lab:
                raise SegmentationSetupError(f"fold {self.fold} of {self.plans_manager.dataset_name} has no labeled "
                                             "training case: convert label maps for the training site")
            if not val_lab and self.fold != "all":
                raise SegmentationSetupError(
                    f"fold {self.fold} of {self.plans_manager.dataset_name} has no labeled validation case (its "
                    f"{len(val_keys)} validation case(s) {', '.join(sorted(val_keys))} are unlabeled), and nnU-Net's "
                    "per-epoch pseudo-Dice needs one: train another fold, or fold 'all', or write a "
                    "splits_final.json whose every fold validates on a labeled case")
            sites = {c: table.get(c, {}).get("site", "unknown") for c in tr_lab}
            chosen = label_fraction_subset(tr_lab, sites, float(self.label_fraction), int(self.label_fraction_seed))
            if self.fold == "all":
                val_lab = list(chosen)  # nnU-Net's fold 'all': validation = training cases
            info = {"excluded_unlabeled_train": len(tr_keys) - len(tr_lab),
                    "excluded_unlabeled_val": len(val_keys) - len(val_lab) if self.fold != "all" else 0,
                    "labeled_train_cases_in_fold": len(tr_lab), "sites": sorted(set(sites.values()))}
            self._split_cache = (chosen, val_lab, info)
            self.print_to_log_file(
                f"segmentation split: {len(chosen)} of {len(tr_lab)} labeled training cases (label fraction "
                f"{self.label_fraction:g}, seed {self.label_fraction_seed}), {len(val_lab)} validation cases; "
                f"{info['excluded_unlabeled_train']} unlabeled training cases left out")
        chosen, val_lab, _ = self._split_cache
        return list(chosen), list(val_lab)

    # -- training ---------------------------------------------------------------------------------

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's training transforms; with ``augmentation == "cross-site"`` its noise and contrast transforms
        get :data:`CROSS_SITE_AUGMENTATION`'s probabilities and ranges (the same transform objects, adjusted).

        nnU-Net declares this a static method and calls it on the trainer (``self.get_training_transforms``
        in ``get_dataloaders``), so an instance method can read the run's setting."""
        transforms = nnUNetTrainer.get_training_transforms(*args, **kwargs)
        if self.augmentation == "cross-site":
            adjust_random_transforms(transforms, CROSS_SITE_AUGMENTATION)
        return transforms

    def on_train_epoch_start(self) -> None:
        """Freeze the encoder for the first ``freeze_encoder_epochs`` epochs, then nnU-Net's epoch start."""
        frozen = self.current_epoch < self.freeze_encoder_epochs
        if frozen != self._encoder_frozen:
            encoder_of(self.network).requires_grad_(not frozen)
            self._encoder_frozen = frozen
            self.print_to_log_file("encoder frozen" if frozen else "encoder unfrozen: training the whole network")
        super().on_train_epoch_start()

    def on_train_start(self) -> None:
        super().on_train_start()
        self._last_latest_checkpoint = time.monotonic()
        if self.local_rank == 0:
            remove_dead_temporaries(Path(self.output_folder), self.print_to_log_file)  # a killed run's leftovers
            atomic_write_json(Path(self.output_folder) / SEG_RUN_RECORD, self.run_record())
        from orthodiff_nnunet.console import BAR_FORMAT

        # on standard error, so that it stays on the console when nnU-Net's prints go to a log file
        per_epoch = int(self.num_iterations_per_epoch)
        self.start_progress(int(self.num_epochs) * per_epoch, int(self.current_epoch) * per_epoch,
                            f"train seg, {self.init} init",
                            bar_format=BAR_FORMAT)

    def _memory_format(self, batch: dict) -> dict:
        """The batch's images in channels-last-3d memory format if ``channels_last`` (same values)."""
        if self.channels_last:
            batch = {**batch, "data": torch.as_tensor(batch["data"]).contiguous(memory_format=torch.channels_last_3d)}
        return batch

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's training step; the progress bar advances and shows the loss."""
        out = super().train_step(self._memory_format(batch))
        self.advance_progress(epoch=self.current_epoch, loss=f"{float(out['loss']):.3f}")
        return out

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step (channels-last batches if ``channels_last``)."""
        return super().validation_step(self._memory_format(batch))

    def on_epoch_end(self) -> None:
        """nnU-Net's epoch end; ``checkpoint_latest.pth`` also when ``checkpoint_minutes`` have passed.

        nnU-Net writes it only every ``save_every`` (50) epochs. Here nnU-Net's own periodic save runs
        for this epoch too once the interval is over (``save_every`` lowered to 1 for this call), so the
        checkpoint is written at the same point, with the same content, as nnU-Net's.
        """
        periodic = self.save_every
        due = time.monotonic() - self._last_latest_checkpoint >= 60.0 * float(self.checkpoint_minutes)
        if due:
            self.save_every = 1
        try:
            super().on_epoch_end()
        finally:
            self.save_every = periodic

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint written to a temporary file, flushed to disk, then renamed into place.

        ``torch.save`` writes in place: a run killed while writing ``checkpoint_latest.pth`` would
        leave a truncated file that ``--continue`` cannot load. The rename is atomic, so the file
        is always a complete old or a complete new checkpoint.
        """
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        path = Path(filename)
        tmp = temporary_path(path)
        try:
            super().save_checkpoint(str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if path.name == "checkpoint_latest.pth":
            self._last_latest_checkpoint = time.monotonic()

    def run_record(self) -> dict:
        """What makes this run what it is (written to ``orthodiff_seg_run.json`` in the fold folder)."""
        self.do_split()
        tr, val, info = self._split_cache
        path = self.resolved_encoder_path()
        prov = self.encoder_report.provenance if self.encoder_report else {}
        return {
            "trainer": type(self).__name__,
            "init": self.init,
            "encoder": str(path) if path is not None else None,
            "encoder_provenance": {k: prov.get(k) for k in ("dataset", "plans_identifier", "architecture_hash",
                                                            "iterations", "scans", "weights", "created")}
                                   if prov else None,
            "encoder_tensors_loaded": self.encoder_report.tensors if self.encoder_report else 0,
            "dataset": self.plans_manager.dataset_name,
            "plans_identifier": self.plans_manager.plans_name,
            "configuration": self.configuration_name,
            "fold": self.fold,
            "label_fraction": float(self.label_fraction),
            "label_fraction_seed": int(self.label_fraction_seed),
            "training_cases": tr,
            "validation_cases": val,
            **info,
            "schedule": {"optimizer": self.optimizer_name, "initial_lr": self.initial_lr, "warmup_epochs": self.resolved_warmup_epochs(),
                         "freeze_encoder_epochs": int(self.freeze_encoder_epochs), "num_epochs": self.num_epochs,
                         "num_iterations_per_epoch": self.num_iterations_per_epoch,
                         "batch_size": self.batch_size, "channels_last": bool(self.channels_last),
                         "run_seed": self.run_seed, "augmentation": self.augmentation},
            "versions": {"orthodiff_nnunet": _orthodiff_version, "nnunetv2": _package_version("nnunetv2"),
                         "torch": torch.__version__},
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's validation; mirroring test-time augmentation only if ``validation_mirroring``."""
        if self.validation_mirroring:
            return super().perform_actual_validation(save_probabilities)
        axes, self.inference_allowed_mirroring_axes = self.inference_allowed_mirroring_axes, None
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = axes


class nnUNetTrainerOrthoDiffSegScratch(nnUNetTrainerOrthoDiffSeg):
    """The from-scratch twin: nnU-Net's random initialisation, everything else identical."""

    init = "scratch"
