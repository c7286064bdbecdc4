"""Rebuild BENCHMARKS.md from the dated sections in bench/results/*.md (run by bench/run_all.sh).

Usage::

    python -m bench.collect [--results bench/results] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from bench.common import REPO, RESULTS

ORDER = ["planning", "pretraining", "segmentation", "classification"]
HEADER = """# Benchmarks

Measured by the scripts in `bench/` (never by tests). Each section names the figure, the machine, the command
and the date; ratios are measured side by side in one run. Absolute times are only meaningful from the GPU
machine; CPU figures here come from a shared 2-core machine at reduced size. `bash bench/run_all.sh` reruns
everything on a GPU machine and rebuilds this file.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result files")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="file to write (default BENCHMARKS.md)")
    return ap.parse_args(argv)


def section(f: Path, results: Path, out: Path) -> str:
    """One result file as a section of ``out``: links made relative to ``out``, its headings demoted."""
    text = f.read_text().strip()
    # links relative to the result file (figures beside it) are made relative to the output file
    prefix = os.path.relpath(results.resolve(), out.resolve().parent).replace(os.sep, "/")
    text = re.sub(r"\]\((?![a-z]+:|/|#)([^)\s]+)\)", lambda m: f"]({prefix}/{m.group(1)})", text)
    return "\n".join(("#" + line) if line.startswith("#") else line for line in text.splitlines())


def run(args: argparse.Namespace) -> tuple[str, int]:
    """(the document, how many result files it holds), the files in ``ORDER`` first."""
    files = sorted(args.results.glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    parts = [HEADER]
    for f in files:
        parts.append(f"\n## {f.stem.replace('_', ' ').capitalize()} (`bench/results/{f.name}`)\n")
        parts.append(section(f, args.results, args.out))
    return "\n".join(parts) + "\n", len(files)


def record(result: tuple[str, int], args: argparse.Namespace) -> None:
    text, n_files = result
    args.out.write_text(text)
    print(f"wrote {args.out} from {n_files} result file(s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
