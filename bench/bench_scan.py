"""Speed of ``orthodiff scan``: DICOM header files read per second, serial vs a thread pool vs a process pool.

A PACS-like export of at least 10,000 files is generated (``orthodiff_nnunet.data.pacs_export.bench_exams``:
per exam a 9-image localizer, sagittal, coronal and axial series of ``--slices`` slices and a two-echo
series; 16x16 pixels, so the files are tiny and the figure measures header parsing and file opening, not
disk bandwidth), then scanned with each executor. The files are read once before the timed scans so that
every mode finds them in the page cache. The scans must agree on every series' verdict.

Usage::

    nice -n 10 .venv/bin/python bench/bench_scan.py --exams 48 --workers 2 --modes serial,process,thread

Appends a dated section to ``bench/results/scan.md`` (``--no-record`` prints only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, cpu_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exams", type=int, default=48, help="exams (209 files each at 40 slices; default 48 = 10,032 files)")
    ap.add_argument("--slices", type=int, default=40, help="slices per series (default 40)")
    ap.add_argument("--workers", type=int, default=2, help="pool size (default 2)")
    ap.add_argument("--modes", default="serial,process,thread", help="comma-separated: serial, process, thread")
    ap.add_argument("--work", type=Path, default=None, help="folder for the export (default: a temporary one, removed)")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/results/scan.md")
    args = ap.parse_args()

    from orthodiff_nnunet.data.pacs_export import bench_exams, write_pacs_export
    from orthodiff_nnunet.dataset_conversion.scan import scan_export

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_scan_"))
    export = work / "export"
    t0 = time.perf_counter()
    files = write_pacs_export(export, bench_exams(args.exams, args.slices), junk=True)
    gen_s = time.perf_counter() - t0
    print(f"generated {len(files)} DICOM files (+junk) in {gen_s:.0f} s", flush=True)
    for f in export.rglob("*"):  # page cache: every mode reads warm files
        if f.is_file():
            f.read_bytes()

    rows = []
    verdicts = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        t = time.perf_counter()
        cpu0 = os.times()
        result = scan_export(export, executor=mode, workers=args.workers, progress=False)
        wall = time.perf_counter() - t
        cpu1 = os.times()
        cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system) + (cpu1.children_user - cpu0.children_user) \
            + (cpu1.children_system - cpu0.children_system)
        verdicts[mode] = [(s.uid, s.reason, s.plane, s.slices) for s in result.series]
        rows.append((mode, result.workers, result.num_files, wall, result.num_files / wall, cpu))
        print(f"{mode:8s} workers {result.workers}: {result.num_files} files in {wall:.1f} s = "
              f"{result.num_files / wall:.0f} files/s (CPU {cpu:.0f} s); {len(result.exams)} exams, "
              f"{len(result.series)} series, {sum(s.kept for s in result.series)} kept", flush=True)
    same = len({tuple(v) for v in verdicts.values()}) == 1
    print("all modes agree on every series" if same else "MODES DISAGREE", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()
    now = dt.datetime.now(dt.timezone.utc)
    cmd = "nice -n 10 .venv/bin/python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]])
    serial = next((r for r in rows if r[0] == "serial"), None)
    lines = [
        f"## {now:%Y-%m-%d %H:%M} UTC: {rows[0][2]} files, {args.workers} workers",
        "",
        f"Machine: {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores, shared with other jobs (load average "
        f"{load[0]:.1f} at the end); Python {platform.python_version()}.",
        f"Command: `{cmd}`. Export: {args.exams} exams x (9-image localizer, sag/cor/ax of {args.slices} slices, "
        f"a 2-echo series), 16x16 pixels, written in {gen_s:.0f} s; files in the page cache before each scan.",
        "",
        "| executor | workers | files | wall time | files/s | CPU time | speed-up vs serial |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, workers, n, wall, rate, cpu in rows:
        speed = f"{serial[3] / wall:.2f}x" if serial else "-"
        lines.append(f"| {mode} | {workers} | {n} | {wall:.1f} s | {rate:.0f} | {cpu:.0f} s | {speed} |")
    lines += ["", "All executors gave the same verdict for every series." if same else "The executors DISAGREED.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        out = REPO / "bench" / "results" / "scan.md"
        head = "" if out.exists() else (
            "# `orthodiff scan`: DICOM headers read per second\n\n"
            "`bench/bench_scan.py` (see its docstring). Newest run last.\n\n")
        with open(out, "a") as f:
            f.write(head + text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
