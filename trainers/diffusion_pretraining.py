"""Diffusion pretraining with the plans' own network as the denoiser.

``nnUNetTrainerOrthoDiffPretrain`` is an nnUNetTrainer that keeps nnU-Net's data loading,
augmentation, logging and checkpoint format, and changes only what a denoising diffusion model
needs: the network is the plans' U-Net wrapped with timestep conditioning and as many outputs as
inputs, the step noises a clean patch to a random timestep and regresses the noise (or v), an EMA
copy of the weights is kept, checkpoints are written atomically every epoch (one epoch =
``checkpoint_every`` iterations), and DDP also runs on CPU (gloo) for testing. Before anything is
built, ``initialize`` checks that the preprocessed data were made by these plans
(:func:`orthodiff_nnunet.planning.check_preprocessed_data`).

This module is imported by nnU-Net by bare module name through ``nnUNet_extTrainer``: absolute
imports only.
"""

from __future__ import annotations

import os
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

from orthodiff_nnunet.diffusion import diffusion_loss, make_schedule, min_snr_weights, q_sample, training_target
from orthodiff_nnunet.networks.conditioning import TimestepConditionedNetwork
from orthodiff_nnunet.planning import check_preprocessed_data
from orthodiff_nnunet.utils import atomic_write_json, atomic_write_text, save_figure

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


class DiffusionModel(nn.Module):
    """The trained denoiser and its EMA copy; one module so both travel in nnU-Net's checkpoint.

    ``forward`` runs the trained denoiser. ``ema`` is excluded from the optimizer and from
    gradients; :meth:`update_ema` blends it towards the denoiser after each step.
    """

    def __init__(self, make_denoiser, ema_decay: float = 0.995) -> None:
        super().__init__()
        self.denoiser: TimestepConditionedNetwork = make_denoiser()
        self.ema: TimestepConditionedNetwork = make_denoiser()
        self.ema.load_state_dict(self.denoiser.state_dict())
        self.ema.requires_grad_(False)
        self.ema_decay = ema_decay

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, t)

    @torch.no_grad()
    def update_ema(self) -> None:
        ema = [p for p in self.ema.parameters()]
        cur = [p.detach() for p in self.denoiser.parameters()]
        torch._foreach_lerp_(ema, cur, 1.0 - self.ema_decay)
        for e, c in zip(self.ema.buffers(), self.denoiser.buffers()):
            e.copy_(c)


class nnUNetTrainerOrthoDiffPretrain(nnUNetTrainer):
    """Denoising-diffusion pretraining on (unlabeled) preprocessed scans of one orientation.

    Set the public attributes below before :meth:`initialize` (the ``orthodiff pretrain`` API does).
    """

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
        self._schedule = None

    # -- configuration --------------------------------------------------------------------------

    def _apply_run_length(self) -> None:
        self.num_iterations_per_epoch = int(self.checkpoint_every)
        self.num_epochs = int(np.ceil(self.total_iterations / self.checkpoint_every))
        self.save_every = 1

    def diffusion_config(self) -> dict:
        return {"schedule": self.schedule_name, "num_timesteps": self.num_timesteps, "prediction": self.prediction,
                "min_snr_gamma": self.min_snr_gamma, "ema_decay": self.ema_decay, "precision": self.precision}

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """The plans' network with ``num_input_channels`` outputs (a denoiser), timestep-conditioned, plus EMA."""
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        def make() -> TimestepConditionedNetwork:
            net = get_network_from_plans(
                configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
                configuration_manager.network_arch_init_kwargs_req_import, num_input_channels, num_input_channels,
                allow_init=True, deep_supervision=False)
            # without deep supervision only the last output layer is used; the others would stall DDP
            for layer in list(net.decoder.seg_layers)[:-1]:
                layer.requires_grad_(False)
            return TimestepConditionedNetwork(net)

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

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """The denoiser is built without deep supervision; nothing to switch."""

    def plot_network_architecture(self) -> None:
        """Skipped: hiddenlayer cannot trace the two-argument denoiser."""

    # -- steps ----------------------------------------------------------------------------------

    def _autocast(self):
        if self.device.type == "cuda" and self.precision in ("fp16", "bf16"):
            return torch.autocast("cuda", dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def _noised(self, batch: dict, generator: torch.Generator | None = None):
        x0 = batch["data"].to(self.device, non_blocking=True)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last_3d)
        n = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator).to(self.device) if generator is not None else torch.randn_like(x0)
        x_t = q_sample(self._schedule, x0, t, noise)
        target = training_target(self._schedule, x0, t, noise, self.prediction)
        weights = None if self.min_snr_gamma is None else min_snr_weights(self._schedule, t, self.min_snr_gamma, self.prediction)
        return x_t, t, target, weights

    def train_step(self, batch: dict) -> dict:
        x_t, t, target, weights = self._noised(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss(self.network(x_t, t), target, weights)
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
        return {"loss": loss.detach().cpu().numpy()}

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._val_generator = torch.Generator().manual_seed(1234)  # same timesteps and noise every epoch

    def validation_step(self, batch: dict) -> dict:
        x_t, t, target, weights = self._noised(batch, self._val_generator)
        with self._autocast():
            loss = self.loss(self._model().ema(x_t, t), target, weights)
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
        iteration = (self.current_epoch + 1) * self.num_iterations_per_epoch
        self.print_to_log_file(f"iteration {iteration}: train loss {tr:.4f}, EMA val loss {va:.4f}, "
                               f"{1000 * seconds / self.num_iterations_per_epoch:.0f} ms/iteration")
        if self.current_epoch != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        if self.local_rank == 0:
            self._write_loss_curve()
        self.current_epoch += 1

    def _write_loss_curve(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tr = self.logger.get_value("train_losses", None)
        va = self.logger.get_value("val_losses", None)
        its = [(i + 1) * self.num_iterations_per_epoch for i in range(len(tr))]
        rows = ["iteration,train_loss,val_loss_ema"] + [f"{i},{a:.6f},{b:.6f}" for i, a, b in zip(its, tr, va)]
        atomic_write_text(Path(self.output_folder, "loss_curve.csv"), "\n".join(rows) + "\n")
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(its, tr, label="train")
        ax.plot(its, va, label="validation (EMA weights)")
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"{self.prediction} MSE")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, Path(self.output_folder) / "loss_curve.png", dpi=100)

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary name and renamed: never half-written."""
        if self.local_rank != 0:
            return
        tmp = f"{filename}.tmp"
        super().save_checkpoint(tmp)
        if os.path.exists(tmp):
            os.replace(tmp, filename)
            atomic_write_json(Path(self.output_folder, "diffusion_config.json"), self.diffusion_config())

    def iterations_done(self) -> int:
        return self.current_epoch * self.num_iterations_per_epoch
