"""``orthodiff plan_and_preprocess``: the parser and its mapping onto
:func:`orthodiff_nnunet.planning.plan_and_preprocess` (also ``python -m orthodiff_nnunet.planning``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from orthodiff_nnunet.cli import options as opt
from orthodiff_nnunet.planning import DEFAULT_CONFIGURATIONS, PLANNERS, PlanningError, plan_and_preprocess


def add_plan_and_preprocess_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``plan_and_preprocess`` to ``orthodiff``'s subcommands; its ``func`` returns an exit code."""
    p = opt.add_command(subparsers, "plan_and_preprocess", _run_from_args,
                        help="fingerprint, plan per orientation (segmentation, diffusion, classification) and preprocess")
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--dataset-ids", nargs="+", required=True, metavar="ID",
                   help="dataset ids (e.g. 501) or names (Dataset501_KneeSag)")
    p.add_argument("--orientations", nargs="+", default=None, metavar="ORIENT",
                   help="sag, cor and/or ax: process these orientations of each given dataset's group "
                        "(ids base+0/1/2), selected by dataset.json orthodiff.orientation (default: exactly the "
                        "given datasets)")
    opt.add_num_processes(p, 2, "worker processes for fingerprinting and preprocessing (default 2; RAM bounds this)")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="GPU memory target in GB that patch and batch sizes are fitted to (default 8)")
    p.add_argument("--planner", choices=sorted(PLANNERS), default="resenc_m",
                   help="resenc_m: residual-encoder U-Net, nnU-Net's recommended preset (default); plain: plain U-Net")
    p.add_argument("--plans-from", default=None, metavar="ID|PLANS.json",
                   help="use the plans of this planned dataset (the dataset of the same orientation in its group) "
                        "instead of planning: unlabeled corpora, external sites, other joints. Or a plans file "
                        "(e.g. another run's nnUNet_preprocessed/<Dataset>/<plans>.json or a model folder's "
                        "plans.json): that run's raw and preprocessed folders are then not needed")
    p.add_argument("--plans-name", default=None,
                   help="plans identifier (default orthodiffResEncMPlans / orthodiffPlans, with _<G>G for a "
                        "non-default --gpu-memory-gb; with --plans-from FILE, the file's plans name). With "
                        "--plans-from FILE it is the name the transferred plans get, e.g. to keep them beside the "
                        "dataset's own plans")
    p.add_argument("-c", "--configurations", nargs="+", default=list(DEFAULT_CONFIGURATIONS),
                   help="configurations to preprocess (default: 3d_fullres 3d_diffusion 3d_classification, one "
                        "shared data folder); add 2d for nnU-Net's 2D configuration")
    opt.add_raw(p)
    opt.add_preprocessed(p)
    p.add_argument("--no-preprocess", action="store_true", help="fingerprint and plan only")
    p.add_argument("--clean", action="store_true", help="re-extract fingerprints and re-preprocess every case")
    p.add_argument("--verify", action="store_true", help="run nnU-Net's dataset integrity check first")
    opt.add_no_progress(p, "no progress bars")


def _run_from_args(args: argparse.Namespace) -> int:
    """Fingerprint each dataset, plan it with an orthodiff planner (through-plane axis from the orientation, thick
    slices never resampled to in-plane spacing; 3d_fullres, 3d_diffusion and 3d_classification of one topology) and
    preprocess it. Resumable: cases already preprocessed with the same plans are skipped.

    Examples:
        -d 501 502 503 (the three datasets of one conversion); -d 501 --orientations sag cor (501's group filtered by
        dataset.json orientation); -d 511 512 513 --plans-from 501 (an unlabeled corpus or external site preprocessed
        with the plans of 501/502/503, matched by orientation); -d 601 --plans-from
        /other/nnUNet_preprocessed/Dataset501_KneeSag/orthodiffResEncMPlans.json --plans-name siteAPlans (another
        run's plans, kept beside 601's own).
    """
    if args.num_processes < 1:
        raise PlanningError(f"-np must be at least 1, got {args.num_processes}")
    result = opt.call(plan_and_preprocess, args, preprocess=not args.no_preprocess,
                      verify_dataset_integrity=args.verify, show_progress=not args.no_progress)
    return opt.report(result)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orthodiff_nnunet.planning ...``: the same command without the orthodiff CLI."""
    parser = argparse.ArgumentParser(prog="python -m orthodiff_nnunet.planning",
                                     description="orthodiff plan_and_preprocess")
    _add_arguments(parser)
    parser.set_defaults(func=_run_from_args)
    args = parser.parse_args(argv)
    opt.configure_logging()
    return opt.run_command(args, "plan_and_preprocess")
