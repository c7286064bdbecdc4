"""``orthodiff train cls`` and ``orthodiff predict cls``: the parsers and their mapping onto
:func:`~orthodiff_nnunet.classification.train_classification` and
:func:`~orthodiff_nnunet.classification.predict_classification` (also
``python -m orthodiff_nnunet.classification {train,predict} cls``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from orthodiff_nnunet.cli import options as opt
from orthodiff_nnunet.classification import CONSOLE_LOG, predict_classification, train_classification
from orthodiff_nnunet.conventions import CLASSIFICATION_CONFIGURATION, RESENC_M_PLANS


def _fold(text: str) -> int | str:
    return "all" if text == "all" else int(text)


def _test_fold(text: str) -> int | str | None:
    text = text.strip().lower()
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto, none or a fold number") from None


def add_train_cls_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``cls`` to ``orthodiff train``'s subcommands; ``func`` returns an exit code."""
    p = opt.add_command(subparsers, "cls", _run_train,
                        help="train the multi-view abnormality classifier on the diffusion encoders")
    opt.add_dataset(p, "a dataset id/name standing for its sag/cor/ax group, or one dataset per view", nargs="+")
    p.add_argument("--views", nargs="+", default=None, help="views to fuse, in order (default: all found)")
    opt.add_plans(p, f"plans identifier (default {RESENC_M_PLANS})")
    opt.add_configuration(p, CLASSIFICATION_CONFIGURATION, f"default {CLASSIFICATION_CONFIGURATION}")
    p.add_argument("-f", "--fold", type=_fold, default=0,
                   help="fold of splits_final.json: its validation exams select the checkpoint and thresholds; "
                        "or 'all' (default 0)")
    p.add_argument("--mode", choices=["finetune", "probe", "scratch"], default="finetune",
                   help="finetune (encoder at a lower lr, default), probe (frozen encoder) or scratch")
    p.add_argument("--encoder", nargs="+", default=None, metavar="VIEW=PATH",
                   help="encoder checkpoints per view (default: each view's `orthodiff pretrain` output)")
    p.add_argument("--encoders-from", default=None,
                   help="take the encoders from this dataset group's pretraining (transfer, e.g. knee -> ankle)")
    p.add_argument("--noise-timestep", nargs="+", default=["0"], metavar="T|VIEW=T",
                   help="noise the input to timestep T (0 = clean, default); the method: 100, or sag=200 cor=150 ax=50")
    p.add_argument("--no-film", action="store_true",
                   help="ablation: run the pretrained encoders without the pretraining's timestep conditioning "
                        "(default: encoder.pt's conditioning at the noise timestep, 0 included)")
    p.add_argument("--fusion", choices=["concat", "gated"], default="concat", help="view fusion (default concat)")
    p.add_argument("--feature-stages", type=int, default=1, help="last encoder stages pooled (default 1: bottleneck)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout before the fusion layer")
    p.add_argument("--epochs", type=int, default=50, help="epochs (default 50)")
    p.add_argument("--iterations-per-epoch", type=int, default=50, help="steps per epoch (default 50)")
    opt.add_batch_size(p, "exams per step (default: the plans' batch size)")
    opt.add_learning_rate(p, 1e-3, "head learning rate, AdamW (default 1e-3)")
    p.add_argument("--encoder-lr-factor", type=float, default=0.05, help="fine-tune encoder lr factor (default 0.05)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--label-fraction", type=float, default=1.0, help="fraction of training exams used (default 1)")
    p.add_argument("--test-fold", type=_test_fold, default="auto",
                   help="held-out test set: auto (default: the next fold's validation exams; with 2 folds half of "
                        "the selection fold's patients), a fold number, or none (no test set: optimistic figures)")
    p.add_argument("--allow-pretraining-overlap", action="store_true",
                   help="accept encoders whose pretraining saw scans of the test exams (refused by default: pretrain "
                        "with --exclude-fold TEST_FOLD); the overlap is recorded with the metrics")
    p.add_argument("--precision", choices=["auto", "fp32", "tf32", "bf16", "fp16"], default="auto",
                   help="CUDA precision; auto = the fastest measured at start (CPU: fp32)")
    p.add_argument("--mirror-axes", choices=["lr", "all", "none"], default="lr",
                   help="mirroring augmentation: left-right only (default), all axes (nnU-Net), none")
    p.add_argument("--no-augment", action="store_true", help="no augmentation (centre crop only)")
    p.add_argument("--threshold-method", choices=["youden", "f1", "fixed"], default="youden",
                   help="decision threshold per label, chosen on the selection exams (default youden)")
    opt.add_n_boot(p, "bootstrap resamples for the CIs (default 1000)")
    opt.add_seed(p, 0, None)
    opt.add_device(p, None)
    p.add_argument("-o", "--output-folder", type=Path, default=None, help="explicit output folder")
    p.add_argument("--run-name", default=None, help="run folder name (default from views, mode, fraction, timestep)")
    p.add_argument("--resume", action="store_true", help="continue the run from checkpoint_latest.pth")
    opt.add_verbose(p, f"per-epoch lines on the console (default: in <output folder>/{CONSOLE_LOG})")
    return p


def add_predict_cls_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``cls`` to ``orthodiff predict``'s subcommands; ``func`` returns an exit code."""
    p = opt.add_command(subparsers, "cls", _run_predict,
                        help="per-exam abnormality probabilities with a trained classifier")
    p.add_argument("-m", "--model", type=Path, required=True, help="the training run's fold folder")
    opt.add_dataset(p, "a dataset group id, or one dataset per view", nargs="+")
    p.add_argument("-o", "--output", type=Path, required=True, help="CSV to write")
    p.add_argument("--checkpoint", choices=["best", "final", "latest"], default="best")
    opt.add_batch_size(p)
    opt.add_n_boot(p)
    opt.add_device(p, None)
    return p


def _run_train(args: argparse.Namespace) -> int:
    """Multi-label abnormality classification: each view's (sag/cor/ax) diffusion-pretrained encoder, attention +
    average pooling, fusion of the views of one exam, masked BCE with per-label positive weights, nnU-Net's
    augmentation. Three patient-disjoint sets: train, selection (best checkpoint by mean AUROC, decision thresholds)
    and a held-out test set whose metrics are reported apart. Labels come from the datasets' targets file.
    """
    result = opt.call(train_classification, args, dataset=opt.one_or_many(args.dataset), encoders=args.encoder,
                      film=not args.no_film, learning_rate=args.lr, augment=not args.no_augment,
                      quiet=not opt.verbose(args))
    return opt.report(result)


def _run_predict(args: argparse.Namespace) -> int:
    """Predict every exam of preprocessed datasets (preprocessed with the model's plans: plan_and_preprocess
    --plans-from). Writes a CSV: per-label probabilities, decisions at the thresholds chosen on validation, views
    present/missing, targets when known; with known targets also metrics with bootstrap CIs
    (<csv>_metrics.json/.md).
    """
    result = opt.call(predict_classification, args, model_folder=args.model, dataset=opt.one_or_many(args.dataset))
    return opt.report(result)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orthodiff_nnunet.classification {train,predict} cls ...`` (as ``orthodiff train/predict cls``)."""
    parser = argparse.ArgumentParser(prog="python -m orthodiff_nnunet.classification")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_cls_parser(sub.add_parser("train").add_subparsers(dest="what", required=True))
    add_predict_cls_parser(sub.add_parser("predict").add_subparsers(dest="what", required=True))
    args = parser.parse_args(argv)
    opt.configure_logging()
    return opt.run_command(args, f"orthodiff {args.command} cls")
