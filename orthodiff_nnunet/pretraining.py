"""``orthodiff pretrain``: label-free pretraining of the planned network on one orientation's scans.

Runs :class:`~orthodiff_nnunet.trainers.diffusion_pretraining.nnUNetTrainerOrthoDiffPretrain`
(``objective="diffusion"``, the method) or its masked-autoencoder control
:class:`~orthodiff_nnunet.trainers.mae_pretraining.nnUNetTrainerOrthoDiffMAE` (``objective="mae"``)
on the diffusion configuration of the dataset's plans, then exports the EMA encoder with its
provenance, checks that the segmentation network of the same plans loads it strictly, and writes
a sanity picture (denoised slices, or masked and reconstructed slices).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from orthodiff_nnunet import paths
from orthodiff_nnunet.conventions import (
    ENCODER_FILE,
    PRETRAIN_FOLD,
    DIFFUSION_CONFIGURATION,
    PRETRAIN_RUN_RECORD,
    SEGMENTATION_CONFIGURATION,
    find_plans,
    resolve_device,
)
from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.utils import atomic_write_json, save_figure, seed_everything

log = logging.getLogger(__name__)

OBJECTIVES = ("diffusion", "mae")


def check_objective(objective: str, mask_ratio: float, mask_block: int | Sequence[int] | None) -> None:
    """Refuse an unknown objective or MAE settings outside their range, before anything is loaded."""
    if objective not in OBJECTIVES:
        raise OrthodiffError(f"--objective {objective!r} is not known: use one of {', '.join(OBJECTIVES)}")
    if not 0 < float(mask_ratio) < 1:
        raise OrthodiffError(f"--mask-ratio {mask_ratio} must be in (0, 1), the fraction of mask blocks set to 0 "
                             "(e.g. 0.75, the MAE papers' ratio)")
    blocks = [] if mask_block is None else [mask_block] if isinstance(mask_block, int) else list(mask_block)
    if any(int(b) < 1 for b in blocks) or (mask_block is not None and not blocks):
        raise OrthodiffError(f"--mask-block {mask_block}: give one edge or one per axis, each at least 1 voxel "
                             "(default: the encoder's total stride from the plans)")


@dataclass
class PretrainResult:
    """Where the run wrote its outputs and what it measured."""

    output_folder: Path
    encoder_path: Path
    iterations: int
    train_losses: list[float]
    val_losses: list[float]
    sample_png: Path | None
    load_report: str

    def summary(self) -> str:
        return (f"pretraining done: {self.iterations} iterations, train loss {self.train_losses[0]:.4f} -> "
                f"{self.train_losses[-1]:.4f}, EMA validation loss {self.val_losses[-1]:.4f}\n"
                f"encoder: {self.encoder_path}\n{self.load_report}\n"
                f"loss curve: {self.output_folder / 'loss_curve.png'}"
                + (f"\nsanity picture: {self.sample_png}" if self.sample_png else ""))


def pretrain(
    dataset: int | str,
    *,
    plans: str | None = None,
    configuration: str = DIFFUSION_CONFIGURATION,
    iterations: int = 2000,
    checkpoint_every: int = 250,
    schedule: Literal["cosine", "linear"] = "cosine",
    prediction: Literal["epsilon", "v"] = "epsilon",
    min_snr_gamma: float | None = None,
    learning_rate: float = 1e-4,
    ema_decay: float = 0.995,
    precision: Literal["fp32", "tf32", "bf16", "fp16"] | None = None,
    channels_last: bool = False,
    resume: bool = False,
    device: str = "auto",
    val_iterations: int = 5,
    sample_steps: int = 10,
    reference_timestep: int = 0,
    val_fraction: float = 0.1,
    split_seed: int = 12345,
    exclude_cases: Sequence[str] | None = None,
    exclude_folds: Sequence[int] | None = None,
    seed: int | None = None,
    objective: Literal["diffusion", "mae"] = "diffusion",
    mask_ratio: float = 0.75,
    mask_block: int | Sequence[int] | None = None,
) -> PretrainResult:
    """Pretrain the plans' network without labels on a preprocessed dataset.

    ``objective="diffusion"`` (the method) trains it as a timestep-conditioned denoiser;
    ``objective="mae"`` (the control) as a masked autoencoder: the same network, data path, EMA,
    checkpoints and encoder contract, with blocks of the input set to 0 and reconstructed (MSE on the
    masked voxels only, no timestep). The diffusion settings are unused with ``mae``, the mask settings
    with ``diffusion``.

    Long (about 100 lines) only because it documents its 26 parameters; the body is named steps.

    Args:
        dataset: nnU-Net dataset id or name (one orientation).
        plans: plans identifier (default: orthodiff's ResEnc-M plans, else orthodiff's plain plans).
        configuration: the diffusion configuration of the plans.
        iterations: total training iterations.
        checkpoint_every: iterations between atomic checkpoints (one nnU-Net "epoch"; the last one is
            shorter when ``iterations`` is not a multiple: the run takes exactly ``iterations`` steps).
        schedule: noise schedule (T = 1000 steps).
        prediction: ``epsilon`` (the method's) or ``v``.
        min_snr_gamma: min-SNR loss weighting γ (None: unweighted MSE).
        learning_rate: AdamW learning rate (polynomial decay).
        ema_decay: decay of the exponential moving average of the weights.
        precision: ``fp32``, ``tf32``, ``bf16`` or ``fp16`` autocast on CUDA (default fp16, nnU-Net's);
            always fp32 on CPU.
        channels_last: channels-last-3d memory format.
        resume: continue from the run's latest checkpoint.
        device: ``auto``, ``cuda`` or ``cpu``.
        val_iterations: validation batches per checkpoint (fixed noise, EMA weights).
        sample_steps: DDIM steps of the sanity picture (0: no picture).
        reference_timestep: the timestep whose FiLM conditioning the exported encoder carries
            (0: clean input, what segmentation feeds it; docs/CONTRACTS.md).
        val_fraction: share of the scans (whole patients, seeded by ``split_seed``) held out for the
            EMA validation loss; at least one when there are two or more scans; 0: validate on the
            training scans. The record (``orthodiff_pretrain_run.json``) and the encoder's provenance
            list the scans the encoder saw and the held-out ones.
        split_seed: seed of the held-out choice (fixed on --resume: the run's record is checked).
        exclude_cases: cases never used (e.g. a downstream test set or external cases in this dataset).
        exclude_folds: folds of the dataset's ``splits_final.json`` whose validation cases are never used,
            e.g. the test fold of ``train cls`` (which refuses an encoder that saw its test exams).
        seed: seeds torch, numpy and Python's ``random`` before the network is built. Checkpoints carry
            the RNG states, so with nnU-Net's single-threaded loader (``nnUNet_n_proc_DA=0``) a run
            killed and resumed ends bit-identical to an uninterrupted one on CPU. Background loader
            workers (``nnUNet_n_proc_DA > 0``) draw from their own streams: reproducible only in
            distribution.
        objective: ``diffusion`` or ``mae``.
        mask_ratio: MAE: fraction of the mask blocks set to 0 per sample, in (0, 1) (default 0.75).
        mask_block: MAE: mask block edge in voxels, one or one per axis (default: the encoder's total
            stride from the plans, i.e. one bottleneck voxel, clipped to the patch).
    """
    check_objective(objective, mask_ratio, mask_block)
    inputs = _resolve_inputs(dataset, plans, configuration)
    dev = resolve_device(device)
    seed_everything(seed)
    trainer = _make_trainer(inputs, configuration, dev, resume, objective, mask_ratio, mask_block)
    _configure(trainer, total_iterations=iterations, checkpoint_every=checkpoint_every, schedule_name=schedule,
               prediction=prediction, min_snr_gamma=min_snr_gamma, initial_lr=learning_rate, ema_decay=ema_decay,
               num_val_iterations_per_epoch=val_iterations, channels_last=channels_last, val_fraction=val_fraction,
               split_seed=split_seed, seed=seed,
               exclude_cases=list(exclude_cases or []) + fold_cases(inputs.dataset_name, exclude_folds or ()))
    if not 0 <= reference_timestep < trainer.num_timesteps:
        raise OrthodiffError(f"--reference-timestep {reference_timestep} outside 0..{trainer.num_timesteps - 1}")
    if precision is not None:
        trainer.precision = precision
    out = Path(trainer.output_folder)
    latest = _refuse_unasked_resume(out, resume)
    trainer.initialize()
    if resume:
        _resume(trainer, out, latest, objective)
    record = _start_record(trainer, out, inputs, configuration, iterations, checkpoint_every, seed, objective)
    trainer.run_training()
    return _finish(trainer, out, record, inputs, reference_timestep, sample_steps)


@dataclass
class _PretrainInputs:
    """What a pretraining run reads before anything is built: the dataset, its plans and its ``dataset.json``."""

    dataset_name: str
    plans_identifier: str
    plans: dict
    dataset_json: dict


def _resolve_inputs(dataset: int | str, plans: str | None, configuration: str) -> _PretrainInputs:
    """The dataset's name, plans and ``dataset.json``; refuses plans without ``configuration``."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    dataset_name = str(maybe_convert_to_dataset_name(dataset))  # nnU-Net returns numpy strings
    plans_identifier, plans_dict = find_plans(dataset_name, plans)
    if configuration not in plans_dict["configurations"]:
        raise OrthodiffError(f"plans {plans_identifier} of {dataset_name} have no configuration {configuration!r} "
                             f"(they have {', '.join(plans_dict['configurations'])}): re-run plan_and_preprocess")
    dataset_json = json.loads((paths.preprocessed_dir() / dataset_name / "dataset.json").read_text())
    return _PretrainInputs(dataset_name, plans_identifier, plans_dict, dataset_json)


def _make_trainer(inputs: _PretrainInputs, configuration: str, dev, resume: bool, objective: str,
                  mask_ratio: float, mask_block: int | Sequence[int] | None):
    """The objective's trainer on a copy of the plans; for MAE with its mask settings checked and logged."""
    from orthodiff_nnunet.trainers.diffusion_pretraining import nnUNetTrainerOrthoDiffPretrain
    from orthodiff_nnunet.trainers.mae_pretraining import nnUNetTrainerOrthoDiffMAE

    trainer_plans = copy.deepcopy(inputs.plans)  # nnU-Net's trainer pops keys from the dict it is given
    trainer_plans["continue_training"] = resume
    trainer_class = nnUNetTrainerOrthoDiffMAE if objective == "mae" else nnUNetTrainerOrthoDiffPretrain
    trainer = trainer_class(trainer_plans, configuration, PRETRAIN_FOLD, inputs.dataset_json, dev)
    if objective == "mae":
        trainer.mask_ratio = float(mask_ratio)
        trainer.mask_block = mask_block
        try:
            block = trainer.resolved_mask_block()
        except ValueError as exc:
            raise OrthodiffError(f"--mask-block: {exc}") from None
        log.info("MAE: %g of the %s-voxel blocks of each %s patch set to 0 and reconstructed", trainer.mask_ratio,
                 "x".join(map(str, block)), "x".join(map(str, trainer.configuration_manager.patch_size)))
    return trainer


def _configure(trainer, **settings) -> None:
    """Set the trainer's run settings (attributes it reads in ``initialize`` and ``run_training``)."""
    for name, value in settings.items():
        setattr(trainer, name, value)


def _refuse_unasked_resume(out: Path, resume: bool) -> list[Path]:
    """The run folder's checkpoints (latest first); refuses a folder holding a run when ``resume`` is off."""
    latest = [out / n for n in ("checkpoint_latest.pth", "checkpoint_final.pth") if (out / n).is_file()]
    if latest and not resume:
        raise OrthodiffError(f"{out} already holds a pretraining run: pass --resume to continue it, "
                             "or remove the folder to start again")
    return latest


def _resume(trainer, out: Path, latest: list[Path], objective: str) -> None:
    """Load the run's latest checkpoint into the initialised trainer, refusing other settings or scans."""
    if not latest:
        raise OrthodiffError(f"--resume: no checkpoint in {out}; start without --resume")
    saved = json.loads((out / trainer.CONFIG_FILE).read_text())
    now = trainer.objective_config()
    differs = {k: (saved[k], now.get(k)) for k in saved if k != "precision" and saved.get(k) != now.get(k)}
    if differs:
        raise OrthodiffError(f"--resume with other {objective} settings than the run's: {differs}")
    if not (out / PRETRAIN_RUN_RECORD).is_file():  # a run from before held-out validation trained on every scan
        log.warning("%s has no %s: the run trained on every scan; resuming it so (nothing held out)",
                    out, PRETRAIN_RUN_RECORD)
        trainer.val_fraction = 0.0
    trainer.load_checkpoint(str(latest[0]))
    log.info("resuming %s at iteration %d", out, trainer.iterations_done())
    if (out / PRETRAIN_RUN_RECORD).is_file():
        before = json.loads((out / PRETRAIN_RUN_RECORD).read_text())
        now_split = trainer.split_record()
        if before.get("train_cases") != now_split["train_cases"]:
            raise OrthodiffError(f"--resume with other training scans than the run's ({out / PRETRAIN_RUN_RECORD}): "
                                 "use the run's --val-fraction, split seed and exclusions")


def _start_record(trainer, out: Path, inputs: _PretrainInputs, configuration: str, iterations: int,
                  checkpoint_every: int, seed: int | None, objective: str) -> dict:
    """The run record (``orthodiff_pretrain_run.json``), written with status ``running`` by rank 0."""
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    record = {"dataset": inputs.dataset_name, "plans_identifier": inputs.plans_identifier,
              "configuration": configuration,
              **trainer.split_record(), "iterations_requested": int(iterations),
              "checkpoint_every": int(checkpoint_every), "seed": seed, "objective": objective,
              ("diffusion" if objective == "diffusion" else "mae"): trainer.objective_config(),
              "data_loader_workers": get_allowed_n_proc_DA()}
    if trainer.local_rank == 0:
        atomic_write_json(out / PRETRAIN_RUN_RECORD, {**record, "status": "running"})
    return record


def _finish(trainer, out: Path, record: dict, inputs: _PretrainInputs, reference_timestep: int,
            sample_steps: int) -> PretrainResult:
    """After training: rank 0 exports the EMA encoder, checks it loads, draws the sanity picture and closes the record."""
    train_losses = [float(x) for x in trainer.logger.get_value("train_losses", None)]
    val_losses = [float(x) for x in trainer.logger.get_value("val_losses", None)]
    encoder_path = out / ENCODER_FILE
    report = ""
    sample_png = None
    if trainer.local_rank == 0:
        report = _export_and_check_encoder(trainer, encoder_path, inputs, record, reference_timestep)
        if record["objective"] == "mae":
            if sample_steps > 0:
                sample_png = write_mae_sanity_picture(trainer, out / "reconstruction_sanity.png")
        elif sample_steps > 0:
            sample_png = write_sanity_picture(trainer, out / "denoising_sanity.png", sample_steps)
        atomic_write_json(out / PRETRAIN_RUN_RECORD, {**record, "status": "done", "iterations_done": trainer.iterations_done(),
                                             "train_losses": train_losses, "val_losses": val_losses,
                                             "encoder": str(encoder_path)})
    return PretrainResult(out, encoder_path, trainer.iterations_done(), train_losses, val_losses, sample_png, report)


def _export_and_check_encoder(trainer, encoder_path: Path, inputs: _PretrainInputs, record: dict,
                              reference_timestep: int) -> str:
    """Export the EMA encoder with its provenance; the segmentation network of the same plans must load it strictly.

    Returns:
        The load report's summary.
    """
    from orthodiff_nnunet.networks.build import architecture_hash, architecture_of, build_network
    from orthodiff_nnunet.networks.encoder_io import export_encoder, load_encoder

    plans_dict, dataset_json, configuration = inputs.plans, inputs.dataset_json, record["configuration"]
    objective = record["objective"]
    seg_cfg = SEGMENTATION_CONFIGURATION
    arch = architecture_of(plans_dict, configuration)
    block = plans_dict.get("orthodiff", {})
    provenance = {
        "dataset": inputs.dataset_name,
        "plans_identifier": inputs.plans_identifier,
        "configuration": configuration,
        "architecture": arch,
        "architecture_hash": architecture_hash(arch),
        "orientation": block.get("orientation") or dataset_json.get("orthodiff", {}).get("orientation"),
        "objective": objective,
        **({"schedule": trainer._schedule.to_dict(), "prediction": trainer.prediction} if objective == "diffusion" else
           {"mask_ratio": float(trainer.mask_ratio), "mask_block": list(trainer.resolved_mask_block())}),
        "ema_decay": trainer.ema_decay,
        "weights": "ema",
        "iterations": trainer.iterations_done(),
        "scans": len(trainer.split_record()["train_cases"]),
        "train_cases": trainer.split_record()["train_cases"],
        "held_out_cases": trainer.split_record()["held_out_cases"],
    }
    # an MAE encoder has no timestep conditioning: exported with the identity affine at reference t = 0
    export_encoder(trainer._model().ema, encoder_path, provenance,
                   reference_timestep if objective == "diffusion" else 0)
    seg_net = build_network(plans_dict, seg_cfg, trainer.num_input_channels, len(dataset_json["labels"]))
    seg_hash = architecture_hash(architecture_of(plans_dict, seg_cfg))
    report = load_encoder(seg_net, encoder_path, seg_hash).summary()
    log.info("%s; the %s network of these plans loads it strictly", report, seg_cfg)
    return report


def _middle_patch(trainer) -> "torch.Tensor":  # noqa: F821
    """The centre patch (zero-padded to the patch size) of a held-out scan (a training scan if none), (1, C, *patch)."""
    import torch

    split = trainer.split_record()
    ds = trainer.dataset_class(trainer.preprocessed_dataset_folder, (split["held_out_cases"] or split["train_cases"])[:1])
    data, *_ = ds.load_case(ds.identifiers[0])
    data = np.asarray(data[:])
    patch = trainer.configuration_manager.patch_size
    starts = [max(0, (s - p) // 2) for s, p in zip(data.shape[1:], patch)]
    crop = data[(slice(None),) + tuple(slice(a, a + p) for a, p in zip(starts, patch))]
    pad = [(0, 0)] + [(0, p - c) for c, p in zip(crop.shape[1:], patch)]
    return torch.from_numpy(np.pad(crop, pad)).float()[None].to(trainer.device)


def write_mae_sanity_picture(trainer, path: Path) -> Path:
    """Middle slices of a held-out scan (a training scan if none): clean, masked (seeded mask), the EMA
    network's reconstruction, and the clean voxels with the masked blocks replaced by the reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    x0 = _middle_patch(trainer)
    g = torch.Generator().manual_seed(0)
    masked, _, mask = trainer.masked_batch({"data": x0}, g)
    model = trainer._model().ema.eval()
    with torch.no_grad():
        recon = model(masked).float()
    panels = [("clean", x0), (f"masked ({trainer.mask_ratio:g} of blocks)", masked), ("reconstruction", recon),
              ("clean + reconstructed blocks", torch.where(mask, recon, x0))]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    mid = x0.shape[2] // 2
    for ax, (title, vol) in zip(axes, panels):
        ax.imshow(vol[0, 0, mid].float().cpu().numpy(), cmap="gray", vmin=-2.5, vmax=2.5)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{trainer.plans_manager.dataset_name}: MAE, {trainer.iterations_done()} iterations (EMA weights)",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def write_sanity_picture(trainer, path: Path, steps: int = 10) -> Path:
    """Middle slices of a held-out scan (a training scan if none): clean, noised to t = T/2, denoised back
    from there, and a sample from noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from orthodiff_nnunet.diffusion import q_sample
    from orthodiff_nnunet.diffusion.sampling import ddim_sample

    x0 = _middle_patch(trainer)
    model = trainer._model().ema.eval()
    sched = trainer._schedule
    g = torch.Generator().manual_seed(0)
    half = sched.num_steps // 2
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    t = torch.full((1,), half, device=x0.device)
    noisy = q_sample(sched, x0, t, noise)
    with torch.no_grad():
        denoised = ddim_sample(model, sched, noisy, steps, trainer.prediction, start_step=half)
        sample = ddim_sample(model, sched, torch.randn(x0.shape, generator=g).to(x0.device), steps, trainer.prediction)
    panels = [("clean", x0), (f"noised t={half}", noisy), (f"denoised ({steps} DDIM steps)", denoised),
              (f"sample from noise ({steps} steps)", sample)]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    mid = x0.shape[2] // 2  # through-plane axis is first in the plans' patch
    for ax, (title, vol) in zip(axes, panels):
        ax.imshow(vol[0, 0, mid].float().cpu().numpy(), cmap="gray", vmin=-2.5, vmax=2.5)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{trainer.plans_manager.dataset_name}: {trainer.iterations_done()} iterations (EMA weights)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def fold_cases(dataset_name: str, folds: Sequence[int]) -> list[str]:
    """The validation cases of ``folds`` in the dataset's ``splits_final.json`` (sorted, unique).

    Raises:
        OrthodiffError: no splits file, or a fold it does not have.
    """
    if not folds:
        return []
    f = paths.preprocessed_dir() / dataset_name / "splits_final.json"
    if not f.is_file():
        raise OrthodiffError(f"--exclude-fold: {f} does not exist; run `orthodiff plan_and_preprocess -d {dataset_name}` "
                             "(it writes the converter's patient-grouped folds) or list the cases with --exclude-cases")
    splits = json.loads(f.read_text())
    bad = [k for k in folds if not 0 <= int(k) < len(splits)]
    if bad:
        raise OrthodiffError(f"--exclude-fold {bad[0]}: {f} has folds 0..{len(splits) - 1}")
    return sorted({c for k in folds for c in splits[int(k)]["val"]})


def check_orientation(dataset: int | str, orientation: str) -> None:
    """Refuse a dataset whose converted orientation is not ``orientation``."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(dataset)
    f = paths.preprocessed_dir() / name / "dataset.json"
    if not f.is_file():
        raise OrthodiffError(f"{name} is not preprocessed ({f} missing): run `orthodiff plan_and_preprocess -d {dataset}`")
    found = json.loads(f.read_text()).get("orthodiff", {}).get("orientation")
    if found != orientation:
        raise OrthodiffError(f"{name} holds {found or 'unknown'} series, not {orientation}: pick that orientation's dataset")
