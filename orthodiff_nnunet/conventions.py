"""The names that stages share, in one place.

Every stage finds the previous stage's output by name: ``orthodiff train seg`` warm-starts from
``<results>/<dataset>/nnUNetTrainerOrthoDiffPretrain__<plans>__3d_diffusion/fold_all/encoder.pt``,
``train cls`` reads the same file, ``predict`` finds its model folder from the trainer and
configuration names, and the planner writes configurations under the names the trainers ask for.
Writing one of these names twice lets a rename silently break warm-start discovery, so they live
here and nowhere else (``tests/test_conventions.py`` checks that the trainer classes carry these
names and that no module spells them out again).

The module imports nothing heavy (no torch, no nnunetv2), so the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from orthodiff_nnunet import paths
from orthodiff_nnunet.errors import OrthodiffError

# --- nnU-Net configurations that orthodiff's plans hold (see ``orthodiff_nnunet.plans``) ---------------
SEGMENTATION_CONFIGURATION = "3d_fullres"  # nnU-Net's own; orthodiff adds the two below
DIFFUSION_CONFIGURATION = "3d_diffusion"  # label-free pretraining (diffusion and the MAE control)
CLASSIFICATION_CONFIGURATION = "3d_classification"  # three-view abnormality classification

# --- plans identifiers, in the order a stage looks for them when none is given ----------------------
RESENC_M_PLANS = "orthodiffResEncMPlans"  # OrthodiffResEncMPlanner, the default planner
PLAIN_PLANS = "orthodiffPlans"  # OrthodiffPlainPlanner
DEFAULT_PLANS_ORDER = (RESENC_M_PLANS, PLAIN_PLANS)

# --- trainer class names (nnU-Net names result folders ``<trainer>__<plans>__<configuration>``) -------
PRETRAIN_TRAINER = "nnUNetTrainerOrthoDiffPretrain"
MAE_TRAINER = "nnUNetTrainerOrthoDiffMAE"
SEG_TRAINER = "nnUNetTrainerOrthoDiffSeg"
SEG_SCRATCH_TRAINER = "nnUNetTrainerOrthoDiffSegScratch"
CLS_TRAINER = "nnUNetTrainerOrthoDiffCls"
#: ``train seg --init`` -> the trainer that runs it
SEG_TRAINER_OF_INIT: dict[str, str] = {"diffusion": SEG_TRAINER, "scratch": SEG_SCRATCH_TRAINER}
#: ``train seg --augmentation`` profiles: nnU-Net's training transforms as they are, or with the noise and
#: contrast transforms stronger (``CROSS_SITE_AUGMENTATION`` in the segmentation trainer)
SEG_AUGMENTATIONS = ("nnunet", "cross-site")
#: ``pretrain --objective`` -> the trainer that runs it
PRETRAIN_TRAINER_OF_OBJECTIVE: dict[str, str] = {"diffusion": PRETRAIN_TRAINER, "mae": MAE_TRAINER}

# --- files that pass between stages ------------------------------------------------------------------
PRETRAIN_FOLD = "all"  # unlabeled pretraining uses every scan (less a held-out fraction for validation)
ENCODER_FILE = "encoder.pt"  # the exported encoder (docs/CONTRACTS.md)
PRETRAIN_RUN_RECORD = "orthodiff_pretrain_run.json"
SEG_RUN_RECORD = "orthodiff_seg_run.json"
CLS_CONFIG_FILE = "classifier.json"  # the classifier's configuration, beside its checkpoints
CLS_THRESHOLDS_FILE = "thresholds.json"


def result_folder(results_root: str | os.PathLike, dataset_name: str, trainer: str, plans_identifier: str,
                  configuration: str) -> Path:
    """nnU-Net's model folder ``<results>/<dataset>/<trainer>__<plans>__<configuration>``."""
    return Path(results_root) / dataset_name / f"{trainer}__{plans_identifier}__{configuration}"


def default_encoder_path(dataset_name: str, plans_identifier: str,
                         results_root: str | os.PathLike | None = None) -> Path:
    """Where ``orthodiff pretrain`` (diffusion objective) exports the encoder of ``dataset_name``.

    Args:
        dataset_name: ``DatasetXXX_Name`` of the orientation's dataset.
        plans_identifier: the plans the encoder was pretrained with (the consumer's own plans).
        results_root: ``nnUNet_results``; ``None`` reads it from the environment.
    """
    root = paths.results_dir(results_root)
    return (result_folder(root, dataset_name, PRETRAIN_TRAINER, plans_identifier, DIFFUSION_CONFIGURATION)
            / f"fold_{PRETRAIN_FOLD}" / ENCODER_FILE)


def find_plans(dataset_name: str, plans_identifier: str | None = None) -> tuple[str, dict]:
    """The dataset's plans (the given identifier, else orthodiff's ResEnc-M, else plain plans).

    Returns:
        ``(plans_identifier, plans)`` as read from ``nnUNet_preprocessed/<dataset>/<plans>.json``.
    """
    folder = paths.preprocessed_dir() / dataset_name
    candidates = [plans_identifier] if plans_identifier else list(DEFAULT_PLANS_ORDER)
    for ident in candidates:
        f = folder / f"{ident}.json"
        if f.is_file():
            return ident, json.loads(f.read_text())
    raise OrthodiffError(
        f"no plans {' or '.join(candidates)} for {dataset_name} in {folder}: "
        f"run `orthodiff plan_and_preprocess -d {dataset_name}` first"
    )


def resolve_device(device: str) -> "torch.device":  # noqa: F821
    """``auto`` -> CUDA when visible, else CPU; ``cuda`` without a GPU is refused with what to do."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise OrthodiffError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)
