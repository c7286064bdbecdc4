"""``orthodiff train seg`` and ``orthodiff predict seg``: the parsers and their mapping onto
:func:`~orthodiff_nnunet.segmentation.train_segmentation` and
:func:`~orthodiff_nnunet.segmentation.predict_segmentation`."""

from __future__ import annotations

import argparse
from pathlib import Path

from orthodiff_nnunet.cli import options as opt
from orthodiff_nnunet.conventions import SEG_AUGMENTATIONS, SEG_TRAINER_OF_INIT, SEGMENTATION_CONFIGURATION
from orthodiff_nnunet.data.splits import SPLIT_SEED
from orthodiff_nnunet.segmentation import (
    DEFAULT_LEARNING_RATES,
    NNUNET_CONSOLE_LOG,
    SegmentationError,
    export_dicom_segs_of,
    predict_segmentation,
    train_segmentation,
)


def add_train_seg_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``seg`` to ``orthodiff train``'s subcommands; its ``func`` returns an exit code."""
    p = opt.add_command(subparsers, "seg", _run_train_seg,
                        help="nnU-Net segmentation warm-started from the diffusion encoder (or its from-scratch twin)")
    opt.add_dataset(p, "dataset id or name")
    opt.add_orientation(p, "train the dataset of this orientation in -d's convert group (and check it)")
    p.add_argument("-f", "--fold", default="0", help="cross-validation fold 0-4 or 'all' (default 0)")
    p.add_argument("--init", choices=list(SEG_TRAINER_OF_INIT), default="diffusion",
                   help="diffusion: encoder from the pretraining (default); scratch: nnU-Net's random init")
    p.add_argument("--encoder", type=Path, default=None,
                   help="encoder checkpoint (default: orthodiff pretrain's encoder.pt for this dataset and plans)")
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="share of the fold's labeled training cases, per site, in (0, 1] (default 1)")
    opt.add_seed(p, SPLIT_SEED, f"label-fraction subset seed (default {SPLIT_SEED})")
    opt.add_plans(p)
    opt.add_configuration(p, SEGMENTATION_CONFIGURATION, "segmentation configuration (default 3d_fullres)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default nnU-Net's 1000)")
    p.add_argument("--iterations-per-epoch", type=int, default=None, help="iterations per epoch (default 250)")
    p.add_argument("--val-iterations", type=int, default=None, help="validation iterations per epoch (default 50)")
    p.add_argument("--optimizer", choices=tuple(DEFAULT_LEARNING_RATES), default="sgd",
                   help="sgd: nnU-Net's SGD (default); adamw: nnU-Net's nnUNetTrainerAdam, for short runs")
    opt.add_learning_rate(p, None, "initial learning rate (default 1e-2 with sgd, nnU-Net's; 3e-3 with adamw)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="linear learning-rate warm-up epochs (default 5%% of the epochs; 0: nnU-Net's schedule)")
    p.add_argument("--freeze-encoder-epochs", type=int, default=0,
                   help="first epochs with the encoder frozen (default 0; diffusion init only)")
    p.add_argument("--continue", dest="continue_training", action="store_true",
                   help="continue the run from its latest checkpoint")
    p.add_argument("--checkpoint-minutes", type=float, default=None,
                   help="write checkpoint_latest.pth at the end of the first epoch after this many minutes since the "
                        "last one (default 3; 0: every epoch): a killed run continued with --continue loses at most "
                        "that plus one epoch")
    opt.add_device(p)
    p.add_argument("--channels-last", action="store_true",
                   help="network and batches in channels-last-3d memory format: same results, faster 3D convolutions "
                        "on a CPU (1.28x per step of the demo's network, BENCHMARKS.md)")
    p.add_argument("--run-seed", type=int, default=None,
                   help="seed of the random weights, batch sampling and augmentation (default: unseeded, as nnU-Net); "
                        "two inits trained with one seed differ by the init alone (CPU, nnUNet_n_proc_DA=0)")
    p.add_argument("--augmentation", choices=SEG_AUGMENTATIONS, default="nnunet",
                   help="nnunet: nnU-Net's training augmentation (default); cross-site: nnU-Net's with its noise and "
                        "contrast transforms in more patches and wider (noise sd up to 0.6 z units in half the patches, "
                        "contrast 0.6-1.25 in 30%%), for a model validated at a site of lower field strength (docs/DEMO.md)")
    p.add_argument("--no-validation", action="store_true", help="skip nnU-Net's final validation")
    p.add_argument("--no-validation-mirroring", action="store_true",
                   help="final validation without mirroring test-time augmentation")
    opt.add_verbose(p, f"nnU-Net's configuration and per-epoch lines on the console (default: in "
                   f"<fold folder>/{NNUNET_CONSOLE_LOG})")
    return p


def _run_train_seg(args: argparse.Namespace) -> int:
    """Train nnU-Net's 3d_fullres segmentation on the labeled cases of one orientation's dataset, with the encoder
    initialised from `orthodiff pretrain` (--init diffusion) or at random (--init scratch, the baseline twin: same
    plans, data, schedule and iterations). Everything but the init and a linear learning-rate warm-up is nnU-Net's.

    Examples:
        orthodiff train seg -d 501 --orientation sag --fold 0; orthodiff train seg -d 501 --orientation sag --fold 0
        --init scratch --label-fraction 0.1. Models:
        $nnUNet_results/<Dataset>/nnUNetTrainerOrthoDiffSeg[Scratch]__<plans>__3d_fullres
        ($nnUNet_results/label_fraction_<F>/... for F < 1).
    """
    result = opt.call(train_segmentation, args, val_iterations_per_epoch=args.val_iterations, learning_rate=args.lr,
                      validate=not args.no_validation, validation_mirroring=not args.no_validation_mirroring,
                      quiet=not opt.verbose(args))
    return opt.report(result)


def add_predict_seg_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``seg`` to ``orthodiff predict``'s subcommands; its ``func`` returns an exit code."""
    p = opt.add_command(subparsers, "seg", _run_predict_seg,
                        help="segment images with a trained model (nnU-Net's predictor; masks on the source grid)")
    p.add_argument("-i", "--input", type=Path, required=True, help="folder of images (CASE_0000.nii.gz ...)")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for the masks (created)")
    p.add_argument("-m", "--model", type=Path, required=True,
                   help="model folder <Trainer>__<plans>__<configuration> (or one of its fold_X folders)")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to ensemble (default: all trained folds)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    opt.add_device(p)
    p.add_argument("--disable-tta", action="store_true",
                   help="no mirroring test-time augmentation: up to 8x faster on a CPU for a 3D model (8 mirrored "
                        "passes per tile), at some cost in accuracy")
    p.add_argument("--step-size", type=float, default=0.5, help="sliding-window step, fraction of the patch (default 0.5)")
    opt.add_num_processes(p, 2, "processes for preprocessing and export (default 2; 0: in this process)")
    p.add_argument("--no-layout-check", action="store_true",
                   help="do not refuse images outside the converter's canonical layout")
    p.add_argument("--dicom-seg", type=Path, default=None, metavar="OUT_DIR",
                   help="also write each mask as a DICOM SEG on its source DICOM series (found through --key-file): "
                        "OUT_DIR/<exam pseudonym>/seg_<orientation>.dcm. A SEG carries the source study's identifiers: "
                        "OUT_DIR must be a private folder at the site, outside the nnU-Net folders")
    p.add_argument("--key-file", type=Path, default=None,
                   help="with --dicom-seg: the key table `orthodiff convert --key-file` wrote")
    p.add_argument("--site-root", type=Path, default=None,
                   help="with --dicom-seg: the site folder the key table's series paths are relative to "
                        "(default: the key table's folder)")
    from orthodiff_nnunet.io.dicomweb import add_store_argument

    add_store_argument(p)
    return p


def _check_dicom_seg_options(args: argparse.Namespace) -> None:
    """Refuse a wrong DICOM SEG destination, key table or server (or their options without --dicom-seg) before
    minutes of predicting."""
    if args.dicom_seg is None:
        if any(getattr(args, k, None) is not None for k in ("key_file", "site_root", "dicom_seg_to")):
            raise SegmentationError("--key-file, --site-root and --dicom-seg-to apply to --dicom-seg OUT_DIR only: "
                                    "add it or leave them out")
        return
    from orthodiff_nnunet.io.dicom_seg import check_seg_destination, read_key_table

    if args.key_file is None:
        raise SegmentationError("--dicom-seg needs --key-file KEY.csv (the key table `orthodiff convert "
                                "--key-file` wrote) to find each case's source DICOM series")
    check_seg_destination(args.dicom_seg)
    read_key_table(args.key_file)
    if getattr(args, "dicom_seg_to", None):
        from orthodiff_nnunet.io.dicomweb import check_server

        check_server(args.dicom_seg_to)  # a wrong URL or credentials fail now, not after predicting


def _run_predict_seg(args: argparse.Namespace) -> int:
    """Segment every image in -i with the model folder -m (written by `orthodiff train seg`) through nnU-Net's
    nnUNetPredictor. Masks keep each image's size, spacing, origin and direction. The images must be laid out as
    `orthodiff convert` writes them (e.g. an external site's imagesTs).
    """
    _check_dicom_seg_options(args)
    result = opt.call(predict_segmentation, args, input_folder=args.input, output_folder=args.output,
                      mirroring=not args.disable_tta, tile_step_size=args.step_size,
                      check_layout=not args.no_layout_check)
    opt.report(result)
    if args.dicom_seg is None:
        return 0
    export = export_dicom_segs_of(result, args.model, args.dicom_seg, args.key_file, site_root=args.site_root)
    print(export.summary())
    if getattr(args, "dicom_seg_to", None) and export.written:
        from orthodiff_nnunet.io.dicomweb import redact_url, store_files

        stored = store_files(args.dicom_seg_to, sorted(export.written.values()))
        print(f"DICOM SEG: {stored.instances} stored on {redact_url(args.dicom_seg_to)} (STOW-RS)")
    return 0
