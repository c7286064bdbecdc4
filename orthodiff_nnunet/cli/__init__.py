"""``orthodiff`` command line: it parses; the typed API functions of the stage modules orchestrate.

One module per stage builds its parsers and maps the parsed arguments onto its API function
(:mod:`.convert`, :mod:`.demo`, :mod:`.planning`, :mod:`.pretrain`, :mod:`.segmentation`,
:mod:`.classification`); the options several commands share and the one way a Namespace reaches
an API function live in :mod:`.options`. Heavy imports (torch, nnunetv2) happen inside the
commands so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse

from orthodiff_nnunet import __version__
from orthodiff_nnunet.cli.options import CommandError, configure_logging, run_command

__all__ = ["CommandError", "build_parser", "main"]

DESCRIPTION = ("OrthoDiff-nnU-Net: convert -> plan_and_preprocess -> pretrain -> train -> evaluate, "
               "on top of nnU-Net v2.")


def _add_stage_group(sub: argparse._SubParsersAction, name: str, help: str,
                     description: str) -> argparse._SubParsersAction:
    """``orthodiff train`` / ``orthodiff predict``: a command whose subcommand is the task (seg or cls)."""
    group = sub.add_parser(name, help=help, description=description)
    return group.add_subparsers(dest="task", metavar="TASK", required=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``orthodiff`` parser with every subcommand; ``args.func(args)`` runs the chosen one."""
    from orthodiff_nnunet.cli.classification import add_predict_cls_parser, add_train_cls_parser
    from orthodiff_nnunet.cli.convert import add_convert_parser, add_scan_parser
    from orthodiff_nnunet.cli.demo import add_demo_parser
    from orthodiff_nnunet.cli.planning import add_plan_and_preprocess_parser
    from orthodiff_nnunet.cli.pretrain import add_pretrain_parser
    from orthodiff_nnunet.cli.segmentation import add_predict_seg_parser, add_train_seg_parser
    from orthodiff_nnunet.evaluation.external import add_evaluate_parser

    parser = argparse.ArgumentParser(prog="orthodiff", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"orthodiff-nnunet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_convert_parser(sub)
    add_scan_parser(sub)
    add_demo_parser(sub)
    add_plan_and_preprocess_parser(sub)
    add_pretrain_parser(sub)
    train = _add_stage_group(
        sub, "train", "train segmentation (seg) or classification (cls)",
        "Train a model on planned, preprocessed data: `orthodiff train seg|cls --help`.")
    predict = _add_stage_group(
        sub, "predict", "predict with a trained segmentation (seg) or classification (cls) model",
        "Predict with a trained model: `orthodiff predict seg|cls --help`.")
    add_train_seg_parser(train)
    add_train_cls_parser(train)
    add_predict_seg_parser(predict)
    add_predict_cls_parser(predict)
    add_evaluate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``orthodiff ...``: the exit status (0 done, 1 no command, 2 a user error, printed without a traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(debug=args.verbose)
    if args.command is None:
        parser.print_help()
        return 1
    return run_command(args, f"orthodiff {args.command}")

