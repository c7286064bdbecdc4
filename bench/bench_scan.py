"""Speed of ``orthodiff scan``: DICOM header files read per second, serial vs a thread pool vs a process pool.

A PACS-like export of at least 10,000 files is generated (``orthodiff_nnunet.data.pacs_export.bench_exams``:
per exam a 9-image localizer, sagittal, coronal and axial series of ``--slices`` slices and a two-echo
series; 16x16 pixels, so the files are tiny and the figure measures header parsing and file opening, not
disk bandwidth), then scanned with each executor. The files are read once before the timed scans so that
every mode finds them in the page cache. The scans must agree on every series' verdict.

Usage::

    nice -n 10 .venv/bin/python -m bench.bench_scan --exams 48 --workers 2 --modes serial,process,thread

Appends a dated section to ``bench/results/scan.md`` (``--no-record`` prints only).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import common

TITLE = ("# `orthodiff scan`: DICOM headers read per second\n\n"
         "`bench/bench_scan.py` (see its docstring). Newest run last.")


@dataclass
class ScanResult:
    """What the scans measured: one row per executor and whether they agreed."""

    files: int
    generate_s: float
    rows: list[tuple[str, int, int, float, float, float]] = field(default_factory=list)  # mode, workers, files, wall, files/s, CPU
    same: bool = True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exams", type=int, default=48, help="exams (209 files each at 40 slices; default 48 = 10,032 files)")
    ap.add_argument("--slices", type=int, default=40, help="slices per series (default 40)")
    ap.add_argument("--workers", type=int, default=2, help="pool size (default 2)")
    ap.add_argument("--modes", default="serial,process,thread", help="comma-separated: serial, process, thread")
    ap.add_argument("--work", type=Path, default=None, help="folder for the export (default: a temporary one, removed)")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/results/scan.md")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> ScanResult:
    """Generate the export, warm the page cache, scan it with each executor."""
    from orthodiff_nnunet.data.pacs_export import bench_exams, write_pacs_export
    from orthodiff_nnunet.dataset_conversion.scan import scan_export

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_scan_"))
    export = work / "export"
    t0 = time.perf_counter()
    files = write_pacs_export(export, bench_exams(args.exams, args.slices), junk=True)
    result = ScanResult(files=len(files), generate_s=time.perf_counter() - t0)
    print(f"generated {len(files)} DICOM files (+junk) in {result.generate_s:.0f} s", flush=True)
    for f in export.rglob("*"):  # page cache: every mode reads warm files
        if f.is_file():
            f.read_bytes()
    verdicts = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        t, cpu0 = time.perf_counter(), common.cpu_seconds()
        scanned = scan_export(export, executor=mode, workers=args.workers, progress=False)
        wall, cpu = time.perf_counter() - t, common.cpu_seconds() - cpu0
        verdicts[mode] = [(s.uid, s.reason, s.plane, s.slices) for s in scanned.series]
        result.rows.append((mode, scanned.workers, scanned.num_files, wall, scanned.num_files / wall, cpu))
        print(f"{mode:8s} workers {scanned.workers}: {scanned.num_files} files in {wall:.1f} s = "
              f"{scanned.num_files / wall:.0f} files/s (CPU {cpu:.0f} s); {len(scanned.exams)} exams, "
              f"{len(scanned.series)} series, {sum(s.kept for s in scanned.series)} kept", flush=True)
    result.same = len({tuple(v) for v in verdicts.values()}) == 1
    print("all modes agree on every series" if result.same else "MODES DISAGREE", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


def section(result: ScanResult, args: argparse.Namespace) -> str:
    """The dated Markdown section: machine, command, export, one table row per executor."""
    serial = next((r for r in result.rows if r[0] == "serial"), None)
    lines = [
        f"## {common.now()}: {result.rows[0][2]} files, {args.workers} workers",
        "",
        f"Machine: {common.cpu_model()}, {common.usable_cores()} usable cores, shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the end); Python {platform.python_version()}.",
        f"Command: `{common.command_line()}`. Export: {args.exams} exams x (9-image localizer, sag/cor/ax of "
        f"{args.slices} slices, a 2-echo series), 16x16 pixels, written in {result.generate_s:.0f} s; files in the "
        "page cache before each scan.",
        "",
        "| executor | workers | files | wall time | files/s | CPU time | speed-up vs serial |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, workers, n, wall, rate, cpu in result.rows:
        speed = f"{serial[3] / wall:.2f}x" if serial else "-"
        lines.append(f"| {mode} | {workers} | {n} | {wall:.1f} s | {rate:.0f} | {cpu:.0f} s | {speed} |")
    lines += ["", "All executors gave the same verdict for every series." if result.same
              else "The executors DISAGREED.", ""]
    return "\n".join(lines)


def record(result: ScanResult, args: argparse.Namespace) -> None:
    """Print the section; append it to ``bench/results/scan.md`` unless ``--no-record``."""
    text = section(result, args)
    print(text)
    if not args.no_record:
        common.append_markdown(common.RESULTS / "scan.md", text, title=TITLE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    record(result, args)
    return 0 if result.same else 1


if __name__ == "__main__":
    sys.exit(main())
