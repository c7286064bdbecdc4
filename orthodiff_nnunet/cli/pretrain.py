"""``orthodiff pretrain``: the parser, its mapping onto :func:`orthodiff_nnunet.pretraining.pretrain` and
the torchrun process group around it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from orthodiff_nnunet.cli import options as opt
from orthodiff_nnunet.conventions import DIFFUSION_CONFIGURATION


def add_pretrain_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``pretrain`` to ``orthodiff``'s subcommands."""
    p = opt.add_command(sub, "pretrain", _run_pretrain,
                        help="diffusion (or masked-autoencoder) pretraining of the planned network on one orientation's "
                             "(unlabeled) scans")
    opt.add_dataset(p, "dataset id or name (one orientation)")
    opt.add_orientation(p, "check that the dataset has this orientation")
    opt.add_plans(p)
    opt.add_configuration(p, DIFFUSION_CONFIGURATION, f"diffusion configuration (default {DIFFUSION_CONFIGURATION})")
    p.add_argument("--objective", choices=["diffusion", "mae"], default="diffusion",
                   help="diffusion: denoising diffusion (the method, default); mae: masked autoencoder on the same "
                        "network and data (the control: blocks of the input set to 0, MSE on them, no timestep)")
    p.add_argument("--mask-ratio", type=float, default=0.75,
                   help="mae: fraction of the mask blocks set to 0 per patch, in (0, 1) (default 0.75)")
    p.add_argument("--mask-block", type=int, nargs="+", default=None, metavar="VOXELS",
                   help="mae: mask block edge in voxels, one or one per axis (default: the encoder's total stride "
                        "from the plans, clipped to the patch)")
    p.add_argument("--iterations", type=int, default=2000, help="training iterations (default 2000)")
    p.add_argument("--checkpoint-every", type=int, default=250, help="iterations between checkpoints (default 250)")
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="noise schedule (default cosine)")
    p.add_argument("--prediction", choices=["epsilon", "v"], default="epsilon", help="network target (default epsilon)")
    p.add_argument("--min-snr-gamma", type=float, default=None, help="min-SNR loss weighting gamma (default off)")
    opt.add_learning_rate(p, 1e-4, "AdamW learning rate (default 1e-4)")
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of the weights (default 0.995)")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16", "fp16"], default=None,
                   help="CUDA autocast precision (default fp16 with loss scaling; CPU always fp32)")
    p.add_argument("--channels-last", action="store_true", help="channels-last-3d memory format")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    opt.add_device(p)
    p.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of the sanity picture (0: none)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the scans (whole patients, seeded) held out for the EMA validation loss "
                        "(default 0.1, at least 1 scan when there are 2 or more; 0: validate on training scans)")
    p.add_argument("--exclude-cases", nargs="+", default=[], metavar="CASE|@FILE",
                   help="cases never used for pretraining, e.g. a downstream test set (@FILE: one case a line)")
    p.add_argument("--exclude-fold", type=int, nargs="+", default=[], metavar="K",
                   help="never use the validation cases of these folds of splits_final.json, e.g. the test fold of "
                        "`train cls` (default for --fold k: fold k+1), which refuses an encoder that saw its test exams")
    opt.add_seed(p, None, "seed torch/numpy/random; with nnUNet_n_proc_DA=0 a resumed run is bit-identical (CPU)")
    p.add_argument("--reference-timestep", type=int, default=0,
                   help="timestep whose conditioning the exported encoder carries (default 0: clean input)")
    return p


def _init_distributed(device: str) -> None:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU) when started by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _finish_distributed() -> None:
    """Leave the process group before the interpreter exits: a rank that exits with a live gloo/NCCL group
    can abort at shutdown ("terminate called without an active exception") and fail the whole torchrun job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _case_list(items: list[str]) -> list[str]:
    """Case identifiers given on the command line, ``@FILE`` entries read one a line."""
    out: list[str] = []
    for item in items:
        if item.startswith("@"):
            out += [ln.strip() for ln in Path(item[1:]).read_text().splitlines() if ln.strip()]
        else:
            out.append(item)
    return out


def _mask_block(values: list[int] | None) -> int | tuple[int, ...] | None:
    """``--mask-block``: one edge for every axis, or one per axis."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _run_pretrain(args: argparse.Namespace) -> int:
    """Train the plans' network as a timestep-conditioned denoiser (3D DDPM, T=1000) on a preprocessed dataset, then
    export its EMA encoder with provenance. --objective mae trains the same network as a masked autoencoder instead
    (the control). Several GPUs: torchrun --nproc_per_node N $(which orthodiff) pretrain ...
    """
    from orthodiff_nnunet.pretraining import check_objective, check_orientation, pretrain

    check_objective(args.objective, args.mask_ratio, args.mask_block)  # before anything is loaded
    if args.orientation:
        check_orientation(args.dataset, args.orientation)
    _init_distributed(args.device)
    try:
        result = opt.call(pretrain, args, learning_rate=args.lr, exclude_cases=_case_list(args.exclude_cases),
                      exclude_folds=args.exclude_fold, mask_block=_mask_block(args.mask_block))
        _barrier()  # rank 0 exports the encoder after training: the other ranks wait for it
    finally:
        _finish_distributed()
    if result.load_report:
        print(result.summary())
    return 0
