"""Diffusion pretraining with the plans' own network as the denoiser.

``nnUNetTrainerOrthoDiffPretrain`` is an nnUNetTrainer that keeps nnU-Net's data loading,
logging and checkpoint format, and changes only what a denoising diffusion model needs: the
network is the plans' U-Net wrapped with timestep conditioning and as many outputs as inputs, the
step noises a clean patch to a random timestep and regresses the noise (or v), an EMA copy of the
weights is kept, and DDP also runs on CPU (gloo) for testing. The clean patch is the preprocessed
scan cropped and mirrored, nothing else (:meth:`get_training_transforms`); a seeded fraction of
the scans is held out for the validation loss (:meth:`do_split`); one epoch is ``checkpoint_every``
iterations, the last one shorter so that the run takes exactly ``total_iterations``; checkpoints
are written atomically with the RNG states, so a resumed run continues the same random streams.
Before anything is built, ``initialize`` checks that the preprocessed data were made by these plans
(:func:`orthodiff_nnunet.planning.check_preprocessed_data`).

This module is imported by nnU-Net by bare module name through ``nnUNet_extTrainer``: absolute
imports only.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from time import time

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from orthodiff_nnunet.diffusion import diffusion_loss, make_schedule, min_snr_weights, q_sample, training_target
from orthodiff_nnunet.networks.conditioning import TimestepConditionedNetwork
from orthodiff_nnunet.networks.precision import PRECISIONS
from orthodiff_nnunet.preprocessing import check_preprocessed_data
from orthodiff_nnunet.trainers.progress import TrainingProgressMixin
from orthodiff_nnunet.utils import (atomic_write_json, atomic_write_text, remove_dead_temporaries, save_figure,
                                    temporary_path)



class DiffusionModel(nn.Module):
    """The trained denoiser and its EMA copy; one module so both travel in nnU-Net's checkpoint.

    ``forward`` runs the trained denoiser. The EMA is torch's
    ``AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(ema_decay))`` (``ema_model``; ``ema`` is the
    averaged network itself), excluded from the optimizer and from gradients. It starts equal to
    the denoiser (W_0^EMA = W_0) and :meth:`update_ema` blends it after each step,
    ``W^EMA <- decay W^EMA + (1 - decay) W`` (one ``torch._foreach_lerp_``), with the buffers
    copied, as the hand-written update it replaced did, bit for bit
    (``tests/test_trainer_library.py``). The EMA network is built by a second ``make_denoiser()``
    call rather than a deep copy of the denoiser so that a seeded run draws the same random
    numbers as before the switch.

    Checkpoints: the EMA tensors are stored under ``ema_model.module.*`` with ``ema_model.n_averaged``;
    a checkpoint of the earlier layout (``ema.*``) is renamed on load, so an old run resumes.
    """

    def __init__(self, make_denoiser, ema_decay: float = 0.995) -> None:
        super().__init__()
        self.denoiser: TimestepConditionedNetwork = make_denoiser()
        self.ema_model = AveragedModel(make_denoiser())
        self.ema_model.requires_grad_(False)
        self.ema_decay = ema_decay
        self.ema_model.update_parameters(self.denoiser)  # n_averaged 0: copies weights and buffers
        self.register_load_state_dict_pre_hook(_rename_old_ema_keys)

    @property
    def ema(self) -> nn.Module:
        """The EMA network (call it like the denoiser)."""
        return self.ema_model.module

    @property
    def ema_decay(self) -> float:
        return self._ema_decay

    @ema_decay.setter
    def ema_decay(self, decay: float) -> None:
        self._ema_decay = float(decay)
        self.ema_model.multi_avg_fn = get_ema_multi_avg_fn(self._ema_decay)

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, *args)

    @torch.no_grad()
    def update_ema(self) -> None:
        self.ema_model.update_parameters(self.denoiser)


def _rename_old_ema_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: ``ema.*`` (the hand-written EMA's layout) -> ``ema_model.module.*``, EMA counted as started."""
    old = [k for k in state_dict if k.startswith(prefix + "ema.")]
    for k in old:
        state_dict[prefix + "ema_model.module." + k[len(prefix + "ema."):]] = state_dict.pop(k)
    if old:
        state_dict.setdefault(prefix + "ema_model.n_averaged", torch.tensor(1, dtype=torch.long))


class nnUNetTrainerOrthoDiffPretrain(TrainingProgressMixin, nnUNetTrainer):
    """Denoising-diffusion pretraining on (unlabeled) preprocessed scans of one orientation.

    Set the public attributes below before :meth:`initialize` (the ``orthodiff pretrain`` API does).
    Another objective on the same network and data path (the masked-autoencoder control,
    ``trainers/mae_pretraining.py``) overrides the hooks :meth:`objective_config`,
    :meth:`_step_inputs`, :meth:`_build_loss` and :meth:`_loss_label`, and sets
    :attr:`TIMESTEP_CONDITIONED` to False.
    """

    #: what ``objective_config`` is written to beside the checkpoints (checked on --resume)
    OBJECTIVE = "diffusion"
    CONFIG_FILE = "diffusion_config.json"
    #: the network takes (x, t): the plans' U-Net wrapped in :class:`TimestepConditionedNetwork`
    TIMESTEP_CONDITIONED = True

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":
            # nnU-Net assumes DDP means CUDA; CPU DDP (gloo) is used for tests and CPU clusters
            self.device = torch.device("cpu")
            self.grad_scaler = None
        self.enable_deep_supervision = False
        # diffusion
        self.schedule_name = "cosine"
        self.num_timesteps = 1000
        self.prediction = "epsilon"
        self.min_snr_gamma: float | None = None
        self.ema_decay = 0.995
        # optimisation (the method's recipe: Adam 1e-4)
        self.initial_lr = 1e-4
        self.weight_decay = 0.0
        self.total_iterations = 2000
        self.checkpoint_every = 250
        self.num_val_iterations_per_epoch = 5
        self.precision = "fp16" if self.device.type == "cuda" else "fp32"
        self.channels_last = False
        self.oversample_foreground_percent = 0.0  # labels play no role here
        # held-out scans for the EMA validation loss (fold 'all' would validate on training scans)
        self.val_fraction = 0.1
        self.split_seed = 12345
        self.exclude_cases: list[str] = []
        self.seed: int | None = None
        self._schedule = None
        self._pretrain_split: tuple[list[str], list[str], list[str]] | None = None
        self._rng_to_restore: dict | None = None

    # -- configuration --------------------------------------------------------------------------

    def _apply_run_length(self) -> None:
        """One nnU-Net epoch = ``checkpoint_every`` iterations; the last one is shorter if need be, so
        the run takes exactly ``total_iterations`` steps (see :meth:`on_train_epoch_start`)."""
        if int(self.total_iterations) < 1 or int(self.checkpoint_every) < 1:
            raise ValueError(f"iterations ({self.total_iterations}) and checkpoint_every ({self.checkpoint_every}) "
                             "must be at least 1")
        self.num_iterations_per_epoch = int(self.checkpoint_every)
        self.num_epochs = int(np.ceil(self.total_iterations / self.checkpoint_every))
        self.save_every = 1

    def iterations_in_epoch(self, epoch: int) -> int:
        """Training iterations of nnU-Net epoch ``epoch`` (the last may be shorter)."""
        return max(0, min(int(self.checkpoint_every), int(self.total_iterations) - epoch * int(self.checkpoint_every)))

    def diffusion_config(self) -> dict:
        return {"schedule": self.schedule_name, "num_timesteps": self.num_timesteps, "prediction": self.prediction,
                "min_snr_gamma": self.min_snr_gamma, "ema_decay": self.ema_decay, "precision": self.precision}

    def objective_config(self) -> dict:
        """The objective's settings, written to :attr:`CONFIG_FILE` and compared on --resume."""
        return self.diffusion_config()

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """The plans' network with ``num_input_channels`` outputs, timestep-conditioned if
        :attr:`TIMESTEP_CONDITIONED`, plus EMA (a classmethod: nnU-Net calls it on the class or an instance)."""
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        def make() -> nn.Module:
            net = get_network_from_plans(
                configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
                configuration_manager.network_arch_init_kwargs_req_import, num_input_channels, num_input_channels,
                allow_init=True, deep_supervision=False)
            # without deep supervision only the last output layer is used; the others would stall DDP
            for layer in list(net.decoder.seg_layers)[:-1]:
                layer.requires_grad_(False)
            return TimestepConditionedNetwork(net) if cls.TIMESTEP_CONDITIONED else net

        return DiffusionModel(make)

    def initialize(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: use one of {PRECISIONS}")
        if self.device.type != "cuda" and self.precision in ("fp16", "bf16", "tf32"):
            self.precision = "fp32"
        check_preprocessed_data(Path(self.preprocessed_dataset_folder_base), self.plans_manager.plans,
                                self.configuration_name, self.dataset_json)
        if self.precision == "tf32":  # opt in only: never switch off a process-wide default others rely on
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self._apply_run_length()
        self._schedule = make_schedule(self.schedule_name, self.num_timesteps)
        ddp, self.is_ddp = self.is_ddp, False  # wrap in DDP ourselves: nnU-Net's wrapper assumes CUDA
        try:
            super().initialize()
        finally:
            self.is_ddp = ddp
        self._model().ema_decay = self.ema_decay
        if self.precision != "fp16":
            self.grad_scaler = None
        if self.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last_3d)
        if ddp:
            self._set_batch_size_and_oversample()
            self.network = DDP(self.network, device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def _model(self) -> DiffusionModel:
        mod = self.network.module if isinstance(self.network, DDP) else self.network
        return getattr(mod, "_orig_mod", mod)

    def configure_optimizers(self):
        params = [p for p in self._model().denoiser.parameters() if p.requires_grad]  # not the EMA copy
        optimizer = torch.optim.AdamW(params, lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def _build_loss(self):
        return diffusion_loss

    # -- data: which scans, held-out validation ----------------------------------------------------

    def _patients(self) -> dict[str, str]:
        """case -> patient pseudonym from the converter's ``orthodiff_targets.json`` ({} if not found)."""
        from orthodiff_nnunet.data.targets import TargetsError, find_targets_file

        try:
            f = find_targets_file(self.plans_manager.dataset_name,
                                  preprocessed=Path(self.preprocessed_dataset_folder_base).parent)
        except TargetsError:
            return {}
        cases = json.loads(f.read_text()).get("cases", {})
        return {c: str(v.get("patient") or c) for c, v in cases.items()}

    def do_split(self):
        """Every scan except ``exclude_cases``; a seeded ``val_fraction`` of patients held out for validation.

        Returns (training cases, held-out cases). With ``val_fraction = 0``, or a single scan, nothing is
        held out and the validation loss is measured on training scans (then it is a training loss).
        Scans of one patient stay on one side.
        """
        if self._pretrain_split is None:
            if not 0 <= float(self.val_fraction) < 1:
                raise ValueError(f"val_fraction {self.val_fraction} must be in [0, 1)")
            all_cases, _ = super().do_split()
            excluded = sorted(set(self.exclude_cases) & set(all_cases))
            unknown = sorted(set(self.exclude_cases) - set(all_cases))
            if unknown:
                self.print_to_log_file(f"{len(unknown)} excluded cases are not in this dataset (e.g. {unknown[0]})")
            cases = sorted(set(all_cases) - set(excluded))
            if not cases:
                raise ValueError("no scan left for pretraining after the exclusions")
            held: list[str] = []
            if self.val_fraction > 0 and len(cases) >= 2:
                patients = self._patients()
                groups: dict[str, list[str]] = {}
                for c in cases:
                    groups.setdefault(patients.get(c, c), []).append(c)
                wanted = max(1, int(round(self.val_fraction * len(cases))))
                order = np.random.RandomState(int(self.split_seed)).permutation(sorted(groups))
                for g in order:
                    if len(held) >= wanted or len(held) + len(groups[g]) >= len(cases):
                        continue
                    held += groups[g]
            train = [c for c in cases if c not in set(held)]
            self._pretrain_split = (train, sorted(held), excluded)
            self.print_to_log_file(f"pretraining split: {len(train)} training scans, {len(held)} held out for the EMA "
                                   f"validation loss (fraction {self.val_fraction:g}, seed {self.split_seed}), "
                                   f"{len(excluded)} excluded")
        train, held, _ = self._pretrain_split
        return list(train), list(held or train)

    def split_record(self) -> dict:
        """Which scans the encoder saw and which were held out (for the run record and provenance)."""
        self.do_split()
        train, held, excluded = self._pretrain_split
        return {"train_cases": list(train), "held_out_cases": list(held), "excluded_cases": list(excluded),
                "val_fraction": float(self.val_fraction), "split_seed": int(self.split_seed),
                "validation_on": "held-out scans" if held else "training scans (nothing held out)"}

    # -- data: what the denoiser learns from ------------------------------------------------------

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's mirror axes; the loader crops the patch itself (no enlarged crop for rotations)."""
        rotation_for_DA, do_dummy_2d_data_aug, _, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        return rotation_for_DA, do_dummy_2d_data_aug, tuple(self.configuration_manager.patch_size), mirror_axes

    @staticmethod
    def get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        """Random patch location (the loader's crop) and mirroring only: x0 is the preprocessed image.

        nnU-Net's pipeline adds Gaussian noise, blur, simulated low resolution and brightness,
        contrast and gamma changes; applied to x0 *before* noising, they put synthetic noise and
        blur into the "clean" target the denoiser learns to recover, against the objective. They
        are left out (as ``nnUNetTrainerNoDA`` leaves out everything), and so are rotations and
        scaling: both resample the patch by interpolation, a low-pass filter, i.e. the same kind of
        blur in the target; the unlabeled scans are plentiful (augmentation matters less than for
        the few labeled ones), and the segmentation fine-tuning adds nnU-Net's full spatial
        augmentation itself. What remains moves or flips voxels without changing a value: the crop
        location chosen by nnU-Net's loader (zero padding where the patch exceeds the scan, as in
        nnU-Net), mirroring along nnU-Net's axes, nnU-Net's masking for ``use_mask_for_norm``
        channels (zero outside the mask, as preprocessing already did), and the label clean-up.
        """
        from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
        from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
        from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
        from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

        transforms = []
        if mirror_axes is not None and len(mirror_axes) > 0:
            transforms.append(MirrorTransform(allowed_axes=mirror_axes))
        if use_mask_for_norm is not None and any(use_mask_for_norm):
            transforms.append(MaskImageTransform(
                apply_to_channels=[i for i in range(len(use_mask_for_norm)) if use_mask_for_norm[i]],
                channel_idx_in_seg=0, set_outside_to=0))
        transforms.append(RemoveLabelTansform(-1, 0))
        return ComposeTransforms(transforms)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """The denoiser is built without deep supervision; nothing to switch."""

    def plot_network_architecture(self) -> None:
        """Skipped: hiddenlayer cannot trace the two-argument denoiser."""

    # -- steps ----------------------------------------------------------------------------------

    def _autocast(self):
        if self.device.type == "cuda" and self.precision in ("fp16", "bf16"):
            return torch.autocast("cuda", dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def clean_patch(self, batch: dict) -> torch.Tensor:
        """The batch's clean patches x0 on the device (channels-last if asked)."""
        x0 = batch["data"].to(self.device, non_blocking=True)
        return x0.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x0

    def _noised(self, batch: dict, generator: torch.Generator | None = None):
        x0 = self.clean_patch(batch)
        n = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator).to(self.device) if generator is not None else torch.randn_like(x0)
        x_t = q_sample(self._schedule, x0, t, noise)
        target = training_target(self._schedule, x0, t, noise, self.prediction)
        weights = None if self.min_snr_gamma is None else min_snr_weights(self._schedule, t, self.min_snr_gamma, self.prediction)
        return x_t, t, target, weights

    def _step_inputs(self, batch: dict, generator: torch.Generator | None = None):
        """(network arguments, target, loss extra) of one step: here ((x_t, t), noise or v, min-SNR weights).

        Draws from ``generator`` (validation: fixed) or from torch's global stream (training).
        """
        x_t, t, target, weights = self._noised(batch, generator)
        return (x_t, t), target, weights

    def train_step(self, batch: dict) -> dict:
        args, target, extra = self._step_inputs(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss(self.network(*args), target, extra)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
            self.optimizer.step()
        self._model().update_ema()
        out = {"loss": loss.detach().cpu().numpy()}
        self.advance_progress(loss=f"{float(out['loss']):.4f}")
        return out

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._val_generator = torch.Generator().manual_seed(1234)  # same timesteps and noise (masks) every epoch

    def validation_step(self, batch: dict) -> dict:
        args, target, extra = self._step_inputs(batch, self._val_generator)
        with self._autocast():
            loss = self.loss(self._model().ema(*args), target, extra)
        return {"loss": loss.detach().cpu().numpy()}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        loss = float(np.mean([o["loss"] for o in val_outputs]))
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, loss)
            loss = float(np.mean(gathered))
        self.logger.log("val_losses", loss, self.current_epoch)

    def on_epoch_end(self) -> None:
        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        tr = float(self.logger.get_value("train_losses", step=-1))
        va = float(self.logger.get_value("val_losses", step=-1))
        seconds = self.logger.get_value("epoch_end_timestamps", -1) - self.logger.get_value("epoch_start_timestamps", -1)
        iteration = min((self.current_epoch + 1) * int(self.checkpoint_every), int(self.total_iterations))
        self.print_to_log_file(f"iteration {iteration}: train loss {tr:.4f}, EMA val loss {va:.4f}, "
                               f"{1000 * seconds / self.num_iterations_per_epoch:.0f} ms/iteration")
        if self.current_epoch != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        if self.local_rank == 0:
            self._write_loss_curve()
        self.current_epoch += 1

    def _loss_label(self) -> str:
        """The y-axis label of the loss curve (what the loss measures)."""
        return f"{self.prediction} MSE"

    def _write_loss_curve(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tr = self.logger.get_value("train_losses", None)
        va = self.logger.get_value("val_losses", None)
        its = [min((i + 1) * int(self.checkpoint_every), int(self.total_iterations)) for i in range(len(tr))]
        rows = ["iteration,train_loss,val_loss_ema"] + [f"{i},{a:.6f},{b:.6f}" for i, a, b in zip(its, tr, va)]
        atomic_write_text(Path(self.output_folder, "loss_curve.csv"), "\n".join(rows) + "\n")
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(its, tr, label="train")
        ax.plot(its, va, label="validation (EMA weights)")
        ax.set_xlabel("iteration")
        ax.set_ylabel(self._loss_label())
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, Path(self.output_folder) / "loss_curve.png", dpi=100)

    # -- checkpoints ----------------------------------------------------------------------------

    @staticmethod
    def rng_states() -> dict:
        """Every random stream the training step and nnU-Net's single-threaded loader draw from.

        The loader (crop location, case choice) draws from numpy's global generator, the mirroring and
        the diffusion noise and timesteps from torch's; Python's ``random`` is kept for completeness.
        """
        states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return states

    @staticmethod
    def set_rng_states(states: dict) -> None:
        torch.set_rng_state(states["torch"])
        np.random.set_state(states["numpy"])
        random.setstate(states["python"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus the RNG states, written to a temporary name and renamed: never half-written.

        The RNG states are those at the end of the epoch, i.e. at the start of the next one, where
        :meth:`on_train_epoch_start` restores them after a resume (nnU-Net's ``on_train_start`` draws a
        first batch from each new loader, which would otherwise shift every random stream).
        """
        if self.local_rank != 0:
            return
        tmp, with_rng = temporary_path(Path(filename)), temporary_path(Path(filename), "rng")
        states = self.rng_states()
        try:
            super().save_checkpoint(str(tmp))
            if tmp.exists():
                ckpt = torch.load(tmp, map_location="cpu", weights_only=False, mmap=True)
                ckpt["orthodiff_rng_states"] = states
                torch.save(ckpt, with_rng)
                del ckpt
                os.replace(with_rng, filename)
                atomic_write_json(Path(self.output_folder, self.CONFIG_FILE), self.objective_config())
        finally:
            tmp.unlink(missing_ok=True)
            with_rng.unlink(missing_ok=True)

    def on_train_start(self) -> None:
        """nnU-Net's start, then (rank 0) delete the temporaries that a killed run left in the output folder."""
        super().on_train_start()
        if self.local_rank == 0:
            remove_dead_temporaries(Path(self.output_folder), self.print_to_log_file)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's load; the checkpoint's RNG states are restored when the next epoch starts."""
        super().load_checkpoint(filename_or_checkpoint)
        ckpt = filename_or_checkpoint
        if isinstance(ckpt, (str, os.PathLike)):
            ckpt = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        self._rng_to_restore = ckpt.get("orthodiff_rng_states")
        if self._rng_to_restore is None:
            self.print_to_log_file("this checkpoint has no RNG states (older run): the resumed run draws other "
                                   "patches and noise than an uninterrupted one would")

    def on_train_epoch_start(self) -> None:
        """Restore a resumed run's RNG states, size this epoch (exact total), show progress.

        The checkpoint holds rank 0's states. Under DDP the other ranks re-seed from (seed, rank,
        iteration) instead: deterministic, distinct per rank, but not the streams an uninterrupted run
        would have drawn.
        """
        if self._rng_to_restore is not None:
            if self.local_rank == 0 or not self.is_ddp:
                self.set_rng_states(self._rng_to_restore)
            else:
                ss = np.random.SeedSequence([int(self.seed or 0), int(self.local_rank), self.iterations_done()])
                a, b, c = (int(x) for x in ss.generate_state(3))
                torch.manual_seed(a)
                np.random.seed(b)
                random.seed(c)
            self._rng_to_restore = None
        self.num_iterations_per_epoch = self.iterations_in_epoch(self.current_epoch)
        self.start_progress(self.total_iterations, self.iterations_done(), "pretraining")
        super().on_train_epoch_start()

    def iterations_done(self) -> int:
        """Training iterations taken so far (epochs done, the last one possibly shorter)."""
        return min(self.current_epoch * int(self.checkpoint_every), int(self.total_iterations))
