"""``orthodiff demo``: the parser and its mapping onto :func:`orthodiff_nnunet.api.demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from orthodiff_nnunet.api import DEMO_SETTINGS
from orthodiff_nnunet.cli import options as opt

_FULL, _QUICK = DEMO_SETTINGS["full"], DEMO_SETTINGS["quick"]


def add_demo_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``demo`` to ``orthodiff``'s subcommands."""
    p = opt.add_command(sub, "demo", _run_demo,
                        help="run the whole pipeline on generated phantom data (no real data needed)")
    p.add_argument("-o", "--output", type=Path, default=Path("orthodiff_demo"),
                   help="work folder (default ./orthodiff_demo); nnUNet_raw/preprocessed/results go inside")
    p.add_argument("--cases", type=int, default=None,
                   help=f"exams of the 3 T training site (default {_FULL['cases_per_site']}; --quick "
                        f"{_QUICK['cases_per_site']})")
    p.add_argument("--external-cases", type=int, default=None,
                   help=f"exams of the 1.5 T external site (default {_FULL['external_cases']}; --quick "
                        f"{_QUICK['external_cases']})")
    opt.add_seed(p, 0, "random seed of the phantom and of its pseudonym key (default 0)")
    p.add_argument("--pretrain-iterations", type=int, default=None,
                   help=f"diffusion iterations per orientation (default {_FULL['pretrain_iterations']}; "
                        f"--quick {_QUICK['pretrain_iterations']})")
    p.add_argument("--seg-iterations", type=int, default=None,
                   help="segmentation iterations of each of the two sagittal models, diffusion and scratch init "
                        f"(default {_FULL['seg_iterations']}; --quick {_QUICK['seg_iterations']})")
    p.add_argument("--quick", action="store_true",
                   help="the shortest settings (same stages and code, fewer iterations): a first look, and the tests")
    opt.add_device(p)
    opt.add_verbose(p, "show nnU-Net's configuration dumps and per-epoch lines here (default: in <output>/logs)")
    return p


def _run_demo(args: argparse.Namespace) -> int:
    """Generate two phantom knee sites (3 T training site, 1.5 T external site) and run the pipeline on them."""
    from orthodiff_nnunet.api import demo

    opt.call(demo, args, cases_per_site=args.cases, verbose=opt.verbose(args),
             write=lambda text: print(text, flush=True))
    return 0
