"""Masked-autoencoder pretraining of the plans' own network: the control for diffusion pretraining.

``nnUNetTrainerOrthoDiffMAE`` is :class:`nnUNetTrainerOrthoDiffPretrain` with another objective and
nothing else changed: the same planned U-Net (as many outputs as inputs, no deep supervision),
the same data path (crop and mirror only, held-out validation scans, exclusions, seeds, RNG states
in the checkpoints, bit-identical resume, exact iteration count), the same EMA, checkpointing, DDP
and encoder export. So a segmentation or classification result of an MAE-pretrained encoder
differs from the diffusion-pretrained one by the pretraining objective only.

The objective follows He et al. 2022 ("Masked Autoencoders Are Scalable Vision Learners": mask a
high fraction of patches, reconstruct them, loss on the masked patches only) in the form Wald et
al. (CVPR 2025, "Revisiting MAE pre-training for 3D medical image segmentation") use for a CNN
U-Net: the patch is divided into blocks aligned to the encoder's total stride (one block = the
input footprint of one bottleneck voxel), a fraction ``mask_ratio`` of them (default 0.75) chosen
at random per sample is set to 0 (the preprocessed data are z-scored: 0 is the mean intensity),
the dense network sees the masked patch, and the loss is the mean squared error between its
output and the clean patch over the masked voxels only. There is no timestep and no timestep
conditioning: the exported encoder carries the identity affine and no conditioning
(``orthodiff-encoder/2`` with ``conditioning`` None, provenance ``objective: "mae"``), which every
consumer loads like a diffusion encoder.

This module is imported by nnU-Net by bare module name through ``nnUNet_extTrainer``: absolute
imports only.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from orthodiff_nnunet.trainers.diffusion_pretraining import nnUNetTrainerOrthoDiffPretrain


def encoder_total_stride(configuration_manager: ConfigurationManager) -> tuple[int, ...]:
    """Per spatial axis, the product of the plans network's stage strides (input voxels per bottleneck voxel)."""
    kwargs = configuration_manager.network_arch_init_kwargs
    strides = kwargs["strides"]
    dims = len(configuration_manager.patch_size)
    total = [1] * dims
    for s in strides:
        s = [int(s)] * dims if isinstance(s, (int, np.integer)) else [int(v) for v in s]
        total = [a * b for a, b in zip(total, s)]
    return tuple(total)


def resolve_mask_block(block: int | Sequence[int] | None, patch_size: Sequence[int],
                       total_stride: Sequence[int]) -> tuple[int, ...]:
    """The mask block edge per axis (voxels): given, or the encoder's total stride; clipped to the patch.

    Raises:
        ValueError: a block edge below 1, or a block of the wrong number of axes.
    """
    dims = len(patch_size)
    if block is None:
        edges = [int(s) for s in total_stride]
    elif isinstance(block, (int, np.integer)):
        edges = [int(block)] * dims
    else:
        edges = [int(b) for b in block]
        if len(edges) == 1:
            edges = edges * dims
    if len(edges) != dims:
        raise ValueError(f"mask block {list(edges)} has {len(edges)} axes, the patch {list(patch_size)} has {dims}: "
                         "give one edge or one per axis")
    if min(edges) < 1:
        raise ValueError(f"mask block {edges}: every edge must be at least 1 voxel")
    return tuple(min(e, int(p)) for e, p in zip(edges, patch_size))


def block_mask(batch: int, spatial: Sequence[int], block: Sequence[int], ratio: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Random block mask, True = masked, shape (batch, 1, *spatial), on the CPU.

    The patch is tiled by blocks of edge ``block`` from its origin (the last block per axis is cut by
    the patch border when the edge does not divide it). Per sample exactly ``round(ratio * blocks)``
    blocks are masked (at least 1 and, with two or more blocks, at most all but one), chosen
    uniformly without replacement, as MAE's per-sample random shuffle.

    Args:
        batch: samples.
        spatial: the patch's spatial shape.
        block: block edge per axis (voxels).
        ratio: fraction of blocks masked, in (0, 1).
        generator: CPU generator to draw from (None: torch's global stream).
    """
    grid = [math.ceil(int(s) / int(b)) for s, b in zip(spatial, block)]
    n_blocks = int(np.prod(grid))
    k = int(round(float(ratio) * n_blocks))
    k = max(1, min(k, n_blocks - 1)) if n_blocks > 1 else 1
    scores = torch.rand((batch, n_blocks), generator=generator)
    rank = scores.argsort(dim=1).argsort(dim=1)
    mask = (rank < k).reshape(batch, 1, *grid)
    for axis, b in enumerate(block):
        mask = mask.repeat_interleave(int(b), dim=axis + 2)
    return mask[(slice(None), slice(None)) + tuple(slice(0, int(s)) for s in spatial)].contiguous()


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked voxels only (every channel), in float32.

    Args:
        prediction: the network's output (B, C, *spatial).
        target: the clean patch (B, C, *spatial).
        mask: True where masked, (B, 1, *spatial) or (B, C, *spatial).
    """
    m = mask.to(torch.float32).expand_as(prediction)
    sq = (prediction.float() - target.float()).square() * m
    return sq.sum() / m.sum().clamp_min(1.0)


class nnUNetTrainerOrthoDiffMAE(nnUNetTrainerOrthoDiffPretrain):
    """Masked-autoencoder pretraining (the control objective) on the diffusion trainer's network and data path.

    Attributes set before :meth:`initialize`: ``mask_ratio`` (fraction of blocks masked, default
    0.75) and ``mask_block`` (block edge in voxels, one int or one per axis; None: the encoder's total
    stride from the plans, clipped to the patch). The diffusion attributes are unused.
    """

    OBJECTIVE = "mae"
    CONFIG_FILE = "mae_config.json"
    TIMESTEP_CONDITIONED = False  # the plans' U-Net as it is: no timestep, no FiLM

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.mask_ratio = 0.75
        self.mask_block: int | Sequence[int] | None = None
        self._mask_block: tuple[int, ...] | None = None

    def resolved_mask_block(self) -> tuple[int, ...]:
        """The block edge per axis actually used (voxels)."""
        if self._mask_block is None:
            cm = self.configuration_manager
            self._mask_block = resolve_mask_block(self.mask_block, cm.patch_size, encoder_total_stride(cm))
        return self._mask_block

    def objective_config(self) -> dict:
        return {"objective": "mae", "mask_ratio": float(self.mask_ratio), "mask_block": list(self.resolved_mask_block()),
                "mask_block_source": "given" if self.mask_block is not None else "encoder total stride (plans)",
                "masked_value": 0.0, "loss": "MSE over masked voxels", "ema_decay": self.ema_decay,
                "precision": self.precision}

    def initialize(self) -> None:
        if not 0 < float(self.mask_ratio) < 1:
            raise ValueError(f"mask ratio {self.mask_ratio} must be in (0, 1)")
        self.resolved_mask_block()  # refuses a bad block before anything is built
        super().initialize()

    def masked_batch(self, batch: dict, generator: torch.Generator | None = None):
        """(masked input, clean target, mask) of a batch: blocks of the clean patch set to 0."""
        x0 = self.clean_patch(batch)
        mask = block_mask(x0.shape[0], x0.shape[2:], self.resolved_mask_block(), self.mask_ratio,
                          generator).to(self.device)
        return x0.masked_fill(mask, 0.0), x0, mask

    def _step_inputs(self, batch: dict, generator: torch.Generator | None = None):
        x_masked, x0, mask = self.masked_batch(batch, generator)
        return (x_masked,), x0, mask

    def _build_loss(self):
        return masked_mse

    def _loss_label(self) -> str:
        return "MSE on masked voxels"
