"""Preprocessing throughput: ``orthodiff plan_and_preprocess`` vs ``nnUNetv2_plan_and_preprocess``, one run.

Both commands run as subprocesses on the same raw dataset, each into a fresh nnUNet_preprocessed
folder, alternating which goes first, with the same number of processes for fingerprinting and
preprocessing. Timed: the whole command (fingerprint + planning + preprocessing). Throughput =
cases / wall-clock seconds; the ratio is ours / nnU-Net's (must be >= 0.9). The ratio of CPU
seconds (user + system of the command and its workers) is printed too: on a shared machine it is
less sensitive to other load than wall-clock time.

Commands compared (``N`` = ``-np``):

* nnU-Net, like for like: ``nnUNetv2_plan_and_preprocess -d ID -pl nnUNetPlannerResEncM -c 3d_fullres
  -np N -npfp N --no_pbar`` (our default planner is ResEnc-M; our three configurations share the
  3d_fullres data, so one preprocessed configuration on both sides).
* nnU-Net, its default command: ``... -np N -npfp N --no_pbar`` (``-c 2d 3d_fullres 3d_lowres``,
  default planner), with ``--with-nnunet-default``.
* ours: ``python -m orthodiff_nnunet.planning -d ID -np N --no-progress`` (same as
  ``orthodiff plan_and_preprocess``), then once more on the same folder (resumed: all skipped).

It also checks that the preprocessed arrays of both are identical (same spacing and transpose).

Data: the procedural knee phantom, sagittal series of a 3 T site with 0.4 mm pixels and 3 mm
slices at adult size (about 300 x 325 x 33 voxels), converted with ``orthodiff convert``.

Usage::

    OMP_NUM_THREADS=1 python bench/bench_preprocess.py --cases 8 -np 2 --repeats 2

Prints one Markdown table row (plus a header) on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATASET_ID = 901


def make_data(work: Path, cases: int, in_plane_mm: float, seed: int) -> Path:
    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.data.phantom import write_site
    from orthodiff_nnunet.data.sites import SITE_3T

    raw = work / "raw"
    if not any(raw.glob(f"Dataset{DATASET_ID}_*")):
        site = dataclasses.replace(SITE_3T, in_plane_spacing_mm=in_plane_mm)
        manifest = write_site(work / "site", site, n_cases=cases, seed=seed, orientations=("sag",), scale=1.0)
        convert(manifest, DATASET_ID, "Bench", raw=raw, num_processes=1)
    return raw


def run_command(cmd: list[str], raw: Path, pre: Path, log: Path) -> tuple[float, float]:
    """Wall-clock seconds and CPU seconds (user + system, the command and all its workers)."""
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(pre.parent / "res"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def same_arrays(a_dir: Path, b_dir: Path) -> str:
    """'identical' when every case's data and segmentation arrays match exactly."""
    import blosc2
    import numpy as np

    names = sorted(p.name for p in a_dir.glob("*.b2nd"))
    if names != sorted(p.name for p in b_dir.glob("*.b2nd")):
        return "different case lists"
    worst = 0.0
    for n in names:
        a, b = blosc2.open(str(a_dir / n))[:], blosc2.open(str(b_dir / n))[:]
        if a.shape != b.shape:
            return f"different shapes {a.shape} vs {b.shape}"
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return "identical" if worst == 0 else f"max abs difference {worst:g}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=8, help="number of phantom cases (default 8)")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="processes for both tools (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats per tool (default 2)")
    parser.add_argument("--in-plane-mm", type=float, default=0.4, help="phantom in-plane spacing (default 0.4)")
    parser.add_argument("--with-nnunet-default", action="store_true",
                        help="also time nnU-Net's default command (2d, 3d_fullres, 3d_lowres; default planner)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: temporary, removed)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="orthodiff_bench_pp_"))
    raw = make_data(work, args.cases, args.in_plane_mm, seed=5)
    n = str(args.num_processes)
    bindir = Path(sys.executable).parent
    nnunet = [str(bindir / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-np", n, "-npfp", n, "--no_pbar"]
    tools = {
        "nnunet_resencm": nnunet + ["-pl", "nnUNetPlannerResEncM", "-c", "3d_fullres"],
        "ours": [sys.executable, "-m", "orthodiff_nnunet.planning", "-d", str(DATASET_ID), "-np", n, "--no-progress"],
    }
    if args.with_nnunet_default:
        tools["nnunet_default"] = nnunet
    times: dict[str, list[float]] = {k: [] for k in tools}
    cpu: dict[str, list[float]] = {k: [] for k in tools}
    resumed = []
    names = list(tools)
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for tool in order:
            pre = work / f"pre_{tool}_{r}"
            shutil.rmtree(pre, ignore_errors=True)
            t, c = run_command(tools[tool], raw, pre, work / f"log_{tool}_{r}.txt")
            times[tool].append(t)
            cpu[tool].append(c)
            print(f"repeat {r} {tool}: {t:.1f} s wall, {c:.1f} s CPU", file=sys.stderr)
            if tool == "ours":
                resumed.append(run_command(tools[tool], raw, pre, work / f"log_{tool}_{r}_resumed.txt")[0])
    name = next(raw.glob(f"Dataset{DATASET_ID}_*")).name
    check = same_arrays(work / "pre_ours_0" / name / "orthodiffResEncMPlans_3d_fullres",
                        work / "pre_nnunet_resencm_0" / name / "nnUNetPlans_3d_fullres")
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    cps = {k: args.cases / v for k, v in med.items()}
    ratio = cps["ours"] / cps["nnunet_resencm"]
    pair_ratios = [b / a for a, b in zip(times["ours"], times["nnunet_resencm"])]
    cpu_ratio = statistics.median(cpu["nnunet_resencm"]) / statistics.median(cpu["ours"])
    header = ["data", "cases", "-np", "nnUNetv2_plan_and_preprocess ResEncM -c 3d_fullres", "orthodiff plan_and_preprocess",
              "ratio ours/nnU-Net (cases/s)", "per-repeat ratios", "CPU-time ratio", "ours resumed", "arrays"]
    row = [f"phantom sag {args.in_plane_mm}x{args.in_plane_mm}x3 mm", str(args.cases), n,
           f"{med['nnunet_resencm']:.1f} s ({cps['nnunet_resencm']:.3f} cases/s)",
           f"{med['ours']:.1f} s ({cps['ours']:.3f} cases/s)", f"**{ratio:.2f}**",
           ", ".join(f"{x:.2f}" for x in pair_ratios), f"{cpu_ratio:.2f}", f"{statistics.median(resumed):.1f} s", check]
    if args.with_nnunet_default:
        header.insert(5, "nnUNetv2_plan_and_preprocess default (-c 2d 3d_fullres 3d_lowres)")
        row.insert(5, f"{med['nnunet_default']:.1f} s ({cps['nnunet_default']:.3f} cases/s, "
                      f"ratio {cps['ours'] / cps['nnunet_default']:.2f})")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("| " + " | ".join(row) + " |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ratio >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
