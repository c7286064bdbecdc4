"""Rebuild BENCHMARKS.md from the dated sections in bench/results/*.md (run by bench/run_all.sh)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["planning", "pretraining", "segmentation", "classification"]
HEADER = """# Benchmarks

Measured by the scripts in `bench/` (never by tests). Each section names the figure, the machine, the command
and the date; ratios are measured side by side in one run. Absolute times are only meaningful from the GPU
machine; CPU figures here come from a shared 2-core machine at reduced size. `bash bench/run_all.sh` reruns
everything on a GPU machine and rebuilds this file.
"""


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="folder of result files")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="file to write (default BENCHMARKS.md)")
    args = ap.parse_args(argv)
    results = args.results
    files = sorted(results.glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    parts = [HEADER]
    for f in files:
        parts.append(f"\n## {f.stem.replace('_', ' ').capitalize()} (`bench/results/{f.name}`)\n")
        text = f.read_text().strip()
        # links relative to the result file (figures beside it) are made relative to the output file
        prefix = os.path.relpath(results.resolve(), args.out.resolve().parent).replace(os.sep, "/")
        text = re.sub(r"\]\((?![a-z]+:|/|#)([^)\s]+)\)", lambda m: f"]({prefix}/{m.group(1)})", text)
        # demote the file's own headings below this section's
        parts.append("\n".join(("#" + line) if line.startswith("#") else line for line in text.splitlines()))
    args.out.write_text("\n".join(parts) + "\n")
    print(f"wrote {args.out} from {len(files)} result file(s)")


if __name__ == "__main__":
    main()
