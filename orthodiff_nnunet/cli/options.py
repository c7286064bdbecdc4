"""The argument plumbing every ``orthodiff`` command shares, written once.

* ``add_command`` adds a subcommand and names the function that runs it (whose docstring describes it);
* one ``add_*`` helper per option that several commands take (``-d/--dataset``, ``-p/--plans``,
  ``--device``, ``--raw``, ``-v`` ...), so that its flags, type and default are spelled once;
* :func:`call` maps a parsed :class:`argparse.Namespace` onto a typed API function the same way for
  every stage: each option whose name is one of the function's parameters is passed as it is, and
  the caller names only what the command line spells differently (``--lr`` for ``learning_rate``,
  ``--no-validation`` for ``validate=False``).

Nothing here imports torch or nnunetv2: ``orthodiff --help`` stays instant.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orthodiff_nnunet.conventions import DEFAULT_PLANS_ORDER
from orthodiff_nnunet.schemes import ORIENTATIONS

DEVICE_HELP = "default: cuda when available"
PLANS_HELP = f"plans identifier (default: {', else '.join(DEFAULT_PLANS_ORDER)})"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

Run = Callable[[argparse.Namespace], int]


class CommandError(RuntimeError):
    """A user-facing error: printed without a traceback, exit status 2."""


# ----------------------------------------------------------------------------------------------
# commands
def add_command(subparsers: argparse._SubParsersAction, name: str, run: Run, *, help: str) -> argparse.ArgumentParser:
    """Add the subcommand ``name``, run by ``run`` (``args.func``, which returns the exit code).

    ``help`` is its line in the command list; ``run``'s docstring is its ``--help`` text: the
    description, and an ``Examples:`` section, if any, as the epilog.
    """
    description, _, examples = inspect.getdoc(run).partition("\n\nExamples:")
    parser = subparsers.add_parser(name, help=help, description=description,
                                   epilog="Examples:" + examples if examples else None)
    parser.set_defaults(func=run)
    return parser


def api_arguments(func: Callable[..., Any], args: argparse.Namespace, /, **renamed: Any) -> dict[str, Any]:
    """The keyword arguments of the typed API function ``func`` for the parsed command line ``args``.

    Every option whose name is a parameter of ``func`` is passed unchanged; ``renamed`` gives the
    parameters the command line spells differently (and overrides a same-named option).

    Raises:
        TypeError: ``renamed`` names a parameter ``func`` does not have (a programming error).
    """
    parameters = inspect.signature(func).parameters
    unknown = sorted(set(renamed) - set(parameters))
    if unknown:
        raise TypeError(f"{func.__qualname__} has no parameter {', '.join(unknown)}")
    values = {name: getattr(args, name) for name in parameters if name not in renamed and hasattr(args, name)}
    return values | renamed


def call(func: Callable[..., Any], args: argparse.Namespace, /, **renamed: Any) -> Any:
    """Call ``func`` with :func:`api_arguments`; the one way every command reaches its stage."""
    return func(**api_arguments(func, args, **renamed))


def report(result: Any) -> int:
    """Print a stage result's summary (the command's output); exit status 0."""
    print(result.summary())
    return 0


def verbose(args: argparse.Namespace) -> bool:
    """``-v`` given (``orthodiff -v`` or the subcommand's own): the stage's console lines here, not in its log."""
    return getattr(args, "verbose", False)  # a parser without orthodiff's top level may lack it


def one_or_many(values: Sequence[str]) -> str | Sequence[str]:
    """``-d A`` as ``A`` and ``-d A B`` as ``[A, B]``: a dataset group, or one dataset per view."""
    return values if len(values) > 1 else values[0]


def configure_logging(debug: bool = False) -> None:
    """Log to stderr at INFO (DEBUG with ``orthodiff -v``), with the time and the module."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S")


def run_command(args: argparse.Namespace, label: str) -> int:
    """Run the command ``args`` chose; a user error is printed as ``<label>: error: ...`` with exit status 2."""
    from orthodiff_nnunet.errors import OrthodiffError

    try:
        return int(args.func(args) or 0)
    except (CommandError, OrthodiffError) as exc:
        print(f"{label}: error: {exc}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------
# options several commands take
def add_dataset(p: argparse.ArgumentParser, help: str, *, nargs: str | None = None) -> None:
    """``-d/--dataset``: a dataset id or name (``nargs="+"``: a group, or one dataset per view)."""
    p.add_argument("-d", "--dataset", nargs=nargs, required=True, help=help)


def add_orientation(p: argparse.ArgumentParser, help: str) -> None:
    """``--orientation sag|cor|ax`` (default none)."""
    p.add_argument("--orientation", choices=list(ORIENTATIONS), default=None, help=help)


def add_plans(p: argparse.ArgumentParser, help: str = PLANS_HELP) -> None:
    """``-p/--plans``: the plans identifier (default: the conventions' search order)."""
    p.add_argument("-p", "--plans", default=None, help=help)


def add_configuration(p: argparse.ArgumentParser, default: str, help: str) -> None:
    """``-c/--configuration``: the nnU-Net configuration of the stage."""
    p.add_argument("-c", "--configuration", default=default, help=help)


def add_device(p: argparse.ArgumentParser, help: str | None = DEVICE_HELP) -> None:
    """``--device auto|cuda|cpu`` (default auto)."""
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help=help)


def add_verbose(p: argparse.ArgumentParser, help: str) -> None:
    """A subcommand's ``-v/--verbose``: the stage's console lines here, not in its log file.

    Suppressed by default, so that ``orthodiff -v COMMAND`` (debug logging) also sets it.
    """
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=help)


def add_seed(p: argparse.ArgumentParser, default: int | None, help: str | None) -> None:
    """``--seed``: the stage's random seed."""
    p.add_argument("--seed", type=int, default=default, help=help)


def add_learning_rate(p: argparse.ArgumentParser, default: float, help: str) -> None:
    """``--lr``: the stage's (initial) learning rate; the API's ``learning_rate``."""
    p.add_argument("--lr", type=float, default=default, help=help)


def add_num_processes(p: argparse.ArgumentParser, default: int | None, help: str) -> None:
    """``-np/--num-processes``: worker processes."""
    p.add_argument("-np", "--num-processes", type=int, default=default, help=help)


def add_max_obliquity(p: argparse.ArgumentParser, help: str) -> None:
    """``--max-obliquity`` in degrees (default 35, as the converter)."""
    p.add_argument("--max-obliquity", type=float, default=35.0, help=help)


def add_raw(p: argparse.ArgumentParser) -> None:
    """``--raw``: the nnUNet_raw folder."""
    p.add_argument("--raw", type=Path, default=None, help="nnUNet_raw folder (default: $nnUNet_raw)")


def add_preprocessed(p: argparse.ArgumentParser) -> None:
    """``--preprocessed``: the nnUNet_preprocessed folder."""
    p.add_argument("--preprocessed", type=Path, default=None,
                   help="nnUNet_preprocessed folder (default: $nnUNet_preprocessed)")


def add_no_progress(p: argparse.ArgumentParser, help: str) -> None:
    """``--no-progress``: no progress bars; the API's ``show_progress=False``."""
    p.add_argument("--no-progress", action="store_true", help=help)


def add_batch_size(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--batch-size`` (default: the plans')."""
    p.add_argument("--batch-size", type=int, default=None, help=help)


def add_n_boot(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--n-boot``: bootstrap resamples for the confidence intervals (default 1000)."""
    p.add_argument("--n-boot", type=int, default=1000, help=help)
