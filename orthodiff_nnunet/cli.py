"""``orthodiff`` command line: thin argparse front-ends over :mod:`orthodiff_nnunet.api`.

Heavy imports (torch, nnunetv2) happen inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from orthodiff_nnunet import __version__
from orthodiff_nnunet.conventions import DEFAULT_PLANS_ORDER, DIFFUSION_CONFIGURATION

log = logging.getLogger("orthodiff")


class CommandError(RuntimeError):
    """A user-facing error: printed without a traceback, exit status 2."""


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a site's series (DICOM/NIfTI/NRRD/MHA) into per-orientation nnU-Net raw datasets",
        description=(
            "Convert one site's data, described by a manifest CSV (one row per series), into nnU-Net raw "
            "datasets, one per orientation: Dataset<ID>_<Name>Sag, Dataset<ID+1>_<Name>Cor, "
            "Dataset<ID+2>_<Name>Ax. Output names are pseudonyms; no DICOM value is copied. "
            "See the README for the manifest columns."
        ),
    )
    p.add_argument("manifest", type=Path, help="manifest CSV, one row per series")
    p.add_argument("-d", "--dataset-id", type=int, required=True,
                   help="base dataset id: sagittal gets ID, coronal ID+1, axial ID+2")
    p.add_argument("-n", "--name", required=True, help="dataset name, e.g. KneeSiteA (letters and digits)")
    p.add_argument("--site-dir", type=Path, default=None,
                   help="folder that relative paths in the manifest start from (default: the manifest's folder)")
    p.add_argument("--allow-outside-site", action="store_true",
                   help="accept image/label paths that lead out of the site folder ('../' or absolute paths); "
                        "refused by default")
    p.add_argument("--raw", type=Path, default=None, help="nnUNet_raw folder (default: $nnUNet_raw)")
    p.add_argument("--external", action="store_true",
                   help="an external validation site: write imagesTs/labelsTs instead of imagesTr/labelsTr")
    p.add_argument("--labels", default=None,
                   help="comma-separated abnormality label columns (default: the 8 knee labels found in the manifest)")
    p.add_argument("--label-scheme", type=Path, default=None,
                   help="JSON {name: value} of segmentation labels (default: the 11 knee structures)")
    p.add_argument("--dry-run", action="store_true", help="only validate the manifest and every series; write nothing")
    p.add_argument("--key-file", type=Path, default=None,
                   help="also write a CSV mapping pseudonyms to source ids here (must lie outside nnUNet_raw's datasets)")
    p.add_argument("--pseudonym-key", type=Path, default=None,
                   help="secret key that makes pseudonyms stable across runs (default: <raw>/.orthodiff/pseudonym.key, created once)")
    p.add_argument("--folds", type=int, default=5, help="number of patient-grouped cross-validation folds (default 5)")
    p.add_argument("--max-obliquity", type=float, default=35.0,
                   help="largest accepted angle (degrees) between slice normal and nearest patient axis")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="parallel workers (default 2)")
    p.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                   help="while another conversion writes into the same nnUNet_raw, wait at most this long "
                        "(default: wait until it has finished; 0: refuse at once)")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from orthodiff_nnunet.api import convert

    labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
    result = convert(
        manifest=args.manifest,
        dataset_id=args.dataset_id,
        name=args.name,
        site_dir=args.site_dir,
        raw=args.raw,
        external=args.external,
        abnormality_labels=labels,
        label_scheme=args.label_scheme,
        dry_run=args.dry_run,
        key_file=args.key_file,
        pseudonym_key=args.pseudonym_key,
        num_folds=args.folds,
        max_obliquity_deg=args.max_obliquity,
        num_processes=args.num_processes,
        allow_outside_site=args.allow_outside_site,
        lock_timeout_s=args.lock_timeout,
    )
    print(result.summary())
    return 0


def _add_scan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan",
        help="scan a PACS export (DICOM headers only) and write a draft manifest for convert",
        description=(
            "Walk a PACS export (and its DICOMDIR), read every file's DICOM header (never the pixel data), group "
            "the files into exams (studies) and series, and write a draft manifest for `orthodiff convert`: one "
            "row per series. Localizers, derived images, secondary captures, several stacks in one series and "
            "damaged files are written as commented rows ('#' before the case_id, skipped by convert) with the "
            "reason in the 'note' column; several series of one plane in an exam get a 'choose:' note and convert "
            "refuses them until you comment out all but one. The scan_* columns are hints (plane, obliquity, "
            "slices, echoes, TE/TR/TI, fat suppression, spacing, matrix) that convert ignores. "
            "PRIVACY: the manifest holds your site's identifiers (patient_id = PatientID, case_id = accession "
            "number or StudyInstanceUID); it stays at the site and is refused inside an nnU-Net folder. convert "
            "replaces these identifiers by pseudonyms."
        ),
    )
    p.add_argument("export", type=Path, nargs="?", default=None,
                   help="the PACS export folder (or its DICOMDIR); or none with --dicomweb URL")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="the draft manifest CSV to write (site-private; refused inside nnUNet_raw/preprocessed/results)")
    p.add_argument("--site", default="SITE", help="the site column, a short site name (default SITE)")
    p.add_argument("--site-dir", type=Path, default=None,
                   help="folder the image paths start from (default: the manifest's folder when the export lies "
                        "inside it, else the export folder; then convert needs the same --site-dir)")
    p.add_argument("--min-slices", type=int, default=8,
                   help="series with fewer slices are flagged as localizers (default 8)")
    p.add_argument("--max-obliquity", type=float, default=35.0,
                   help="series more oblique than this (degrees) are flagged (default 35, as convert)")
    p.add_argument("-np", "--num-processes", type=int, default=None,
                   help="parallel header readers (default: the cores the load average leaves free, at most 8; "
                        "1 = serial)")
    p.add_argument("--threads", action="store_true", help="read with threads instead of processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from orthodiff_nnunet.io.dicomweb import add_scan_arguments

    add_scan_arguments(p)
    p.set_defaults(func=_run_scan)


def _run_scan(args: argparse.Namespace) -> int:
    from orthodiff_nnunet.dataset_conversion.scan import check_manifest_location, scan_export, write_manifest

    from orthodiff_nnunet.io.dicomweb import cache_for_scan

    if (args.export is None) == (args.dicomweb is None):
        raise CommandError("give the export folder or --dicomweb URL (one of them)")
    check_manifest_location(args.output)  # before minutes of reading
    export, exclude = args.export, [args.output]
    fetched = cache_for_scan(args, args.output, show_progress=not args.no_progress)  # None without --dicomweb
    if fetched is not None:
        export, cached_out = fetched  # the cache is scanned as an export folder
        exclude += cached_out
    result = scan_export(
        export, workers=args.num_processes, executor="thread" if args.threads else "process",
        progress=not args.no_progress, min_slices=args.min_slices, max_obliquity_deg=args.max_obliquity,
        exclude=exclude,
    )
    site_dir = write_manifest(result, args.output, site=args.site, site_dir=args.site_dir)
    print(result.summary())
    print(f"draft manifest: {args.output} (site-private: it holds patient identifiers)")
    if args.site == "SITE":
        print("note: the site column says SITE; pass --site NAME (or edit the column)")
    manifest_dir = args.output.absolute().parent.resolve()
    extra = "" if site_dir == manifest_dir else f" --site-dir {site_dir}"
    print(f"next: review the manifest, then orthodiff convert {args.output}{extra} -d ID -n NAME --dry-run")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on generated phantom data (no real data needed)",
        description="Generate two phantom knee sites (3 T training site, 1.5 T external site) and run the pipeline on them.",
    )
    p.add_argument("-o", "--output", type=Path, default=Path("orthodiff_demo"),
                   help="work folder (default ./orthodiff_demo); nnUNet_raw/preprocessed/results go inside")
    p.add_argument("--cases", type=int, default=6, help="exams per site (default 6)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the phantom (default 0)")
    p.add_argument("--pretrain-iterations", type=int, default=None,
                   help="diffusion iterations per orientation (default 30; --quick 4)")
    p.add_argument("--seg-iterations", type=int, default=None,
                   help="segmentation iterations per orientation (default 20; --quick 4)")
    p.add_argument("--quick", action="store_true",
                   help="the shortest settings (same stages and code, fewer iterations): a first look, and the tests")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: cuda when available")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show nnU-Net's configuration dumps and per-epoch lines here (default: in <output>/logs)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from orthodiff_nnunet.api import demo

    demo(output=args.output, cases_per_site=args.cases, seed=args.seed, pretrain_iterations=args.pretrain_iterations,
         seg_iterations=args.seg_iterations, device=args.device, quick=args.quick,
         verbose=getattr(args, "verbose", False), write=lambda text: print(text, flush=True))
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="diffusion (or masked-autoencoder) pretraining of the planned network on one orientation's "
             "(unlabeled) scans",
        description=(
            "Train the plans' network as a timestep-conditioned denoiser (3D DDPM, T=1000) on a preprocessed "
            "dataset, then export its EMA encoder with provenance. --objective mae trains the same network as a "
            "masked autoencoder instead (the control). Several GPUs: "
            "torchrun --nproc_per_node N $(which orthodiff) pretrain ..."
        ),
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (one orientation)")
    p.add_argument("--orientation", choices=["sag", "cor", "ax"], default=None,
                   help="check that the dataset has this orientation")
    p.add_argument("-p", "--plans", default=None, help=f"plans identifier (default: {', else '.join(DEFAULT_PLANS_ORDER)})")
    p.add_argument("-c", "--configuration", default=DIFFUSION_CONFIGURATION,
                   help=f"diffusion configuration (default {DIFFUSION_CONFIGURATION})")
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
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of the weights (default 0.995)")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16", "fp16"], default=None,
                   help="CUDA autocast precision (default fp16 with loss scaling; CPU always fp32)")
    p.add_argument("--channels-last", action="store_true", help="channels-last-3d memory format")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: cuda when available")
    p.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of the sanity picture (0: none)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the scans (whole patients, seeded) held out for the EMA validation loss "
                        "(default 0.1, at least 1 scan when there are 2 or more; 0: validate on training scans)")
    p.add_argument("--exclude-cases", nargs="+", default=[], metavar="CASE|@FILE",
                   help="cases never used for pretraining, e.g. a downstream test set (@FILE: one case a line)")
    p.add_argument("--exclude-fold", type=int, nargs="+", default=[], metavar="K",
                   help="never use the validation cases of these folds of splits_final.json, e.g. the test fold of "
                        "`train cls` (default for --fold k: fold k+1), which refuses an encoder that saw its test exams")
    p.add_argument("--seed", type=int, default=None,
                   help="seed torch/numpy/random; with nnUNet_n_proc_DA=0 a resumed run is bit-identical (CPU)")
    p.add_argument("--reference-timestep", type=int, default=0,
                   help="timestep whose conditioning the exported encoder carries (default 0: clean input)")
    p.set_defaults(func=_run_pretrain)


def _init_distributed(device: str) -> None:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU) when started by torchrun."""
    import os

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
    from pathlib import Path

    out: list[str] = []
    for item in items:
        if item.startswith("@"):
            out += [ln.strip() for ln in Path(item[1:]).read_text().splitlines() if ln.strip()]
        else:
            out.append(item)
    return out


def _run_pretrain(args: argparse.Namespace) -> int:
    from orthodiff_nnunet.pretraining import check_objective, check_orientation, pretrain

    check_objective(args.objective, args.mask_ratio, args.mask_block)  # before anything is loaded
    if args.orientation:
        check_orientation(args.dataset, args.orientation)
    _init_distributed(args.device)
    try:
        result = pretrain(
            args.dataset, plans=args.plans, configuration=args.configuration, iterations=args.iterations,
            checkpoint_every=args.checkpoint_every, schedule=args.schedule, prediction=args.prediction,
            min_snr_gamma=args.min_snr_gamma, learning_rate=args.lr, ema_decay=args.ema_decay,
            precision=args.precision, channels_last=args.channels_last, resume=args.resume, device=args.device,
            sample_steps=args.sample_steps, val_fraction=args.val_fraction,
            exclude_cases=_case_list(args.exclude_cases), exclude_folds=args.exclude_fold,
            reference_timestep=args.reference_timestep, seed=args.seed,
            objective=args.objective, mask_ratio=args.mask_ratio,
            mask_block=None if args.mask_block is None else
            (args.mask_block[0] if len(args.mask_block) == 1 else tuple(args.mask_block)),
        )
        _barrier()  # rank 0 exports the encoder after training: the other ranks wait for it
    finally:
        _finish_distributed()
    if result.load_report:
        print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orthodiff",
        description=(
            "OrthoDiff-nnU-Net: convert -> plan_and_preprocess -> pretrain -> train -> evaluate, "
            "on top of nnU-Net v2."
        ),
    )
    parser.add_argument("--version", action="version", version=f"orthodiff-nnunet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_convert(sub)
    _add_scan(sub)
    _add_demo(sub)
    from orthodiff_nnunet.planning import add_plan_and_preprocess_parser

    add_plan_and_preprocess_parser(sub)
    _add_pretrain(sub)
    train = sub.add_parser("train", help="train segmentation (seg) or classification (cls)",
                           description="Train a model on planned, preprocessed data: `orthodiff train seg|cls --help`.")
    train_sub = train.add_subparsers(dest="task", metavar="TASK", required=True)
    predict = sub.add_parser("predict", help="predict with a trained segmentation (seg) or classification (cls) model",
                             description="Predict with a trained model: `orthodiff predict seg|cls --help`.")
    predict_sub = predict.add_subparsers(dest="task", metavar="TASK", required=True)
    from orthodiff_nnunet.segmentation import add_predict_seg_parser, add_train_seg_parser

    add_train_seg_parser(train_sub)
    add_predict_seg_parser(predict_sub)
    try:
        from orthodiff_nnunet.classification import add_predict_cls_parser, add_train_cls_parser
    except ImportError:  # pragma: no cover - classification not installed yet
        pass
    else:
        add_train_cls_parser(train_sub)
        add_predict_cls_parser(predict_sub)
    from orthodiff_nnunet.evaluation.external import add_evaluate_parser

    add_evaluate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 1
    from orthodiff_nnunet.errors import OrthodiffError

    try:
        return int(args.func(args) or 0)
    except (CommandError, OrthodiffError) as exc:
        print(f"orthodiff {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
