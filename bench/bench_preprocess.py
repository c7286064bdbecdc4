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

    OMP_NUM_THREADS=1 python -m bench.bench_preprocess --cases 8 -np 2 --repeats 2

Prints one Markdown table row (plus a header) on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench import common
from orthodiff_nnunet.conventions import RESENC_M_PLANS, SEGMENTATION_CONFIGURATION

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


@dataclass
class Timings:
    """Per tool: wall and CPU seconds of each repeat; ours resumed; whether the arrays agree."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    resumed: list[float] = field(default_factory=list)
    arrays: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=8, help="number of phantom cases (default 8)")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="processes for both tools (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats per tool (default 2)")
    parser.add_argument("--in-plane-mm", type=float, default=0.4, help="phantom in-plane spacing (default 0.4)")
    parser.add_argument("--with-nnunet-default", action="store_true",
                        help="also time nnU-Net's default command (2d, 3d_fullres, 3d_lowres; default planner)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: temporary, removed)")
    return parser.parse_args(argv)


def tool_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The commands compared (see the module docstring), by key."""
    n = str(args.num_processes)
    nnunet = [common.console_script("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-np", n, "-npfp", n, "--no_pbar"]
    tools = {
        "nnunet_resencm": nnunet + ["-pl", "nnUNetPlannerResEncM", "-c", SEGMENTATION_CONFIGURATION],
        "ours": [sys.executable, "-m", "orthodiff_nnunet.planning", "-d", str(DATASET_ID), "-np", n, "--no-progress"],
    }
    if args.with_nnunet_default:
        tools["nnunet_default"] = nnunet
    return tools


def run(args: argparse.Namespace) -> Timings:
    """Alternating repeats of every tool into fresh folders; ours once more resumed; arrays compared."""
    work = args.work or Path(tempfile.mkdtemp(prefix="orthodiff_bench_pp_"))
    raw = make_data(work, args.cases, args.in_plane_mm, seed=5)
    tools = tool_commands(args)
    t = Timings(wall={k: [] for k in tools}, cpu={k: [] for k in tools})

    def timed(tool: str, pre: Path, log: Path) -> tuple[float, float]:
        env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre),
                   nnUNet_results=str(pre.parent / "res"))
        return common.run_timed(tools[tool], env, log)

    names = list(tools)
    for r in range(args.repeats):
        for tool in (names if r % 2 == 0 else names[::-1]):
            pre = work / f"pre_{tool}_{r}"
            shutil.rmtree(pre, ignore_errors=True)
            wall, cpu = timed(tool, pre, work / f"log_{tool}_{r}.txt")
            t.wall[tool].append(wall)
            t.cpu[tool].append(cpu)
            print(f"repeat {r} {tool}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr)
            if tool == "ours":
                t.resumed.append(timed(tool, pre, work / f"log_{tool}_{r}_resumed.txt")[0])
    name = next(raw.glob(f"Dataset{DATASET_ID}_*")).name
    t.arrays = same_arrays(work / "pre_ours_0" / name / f"{RESENC_M_PLANS}_{SEGMENTATION_CONFIGURATION}",
                           work / "pre_nnunet_resencm_0" / name / f"nnUNetPlans_{SEGMENTATION_CONFIGURATION}")
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end", file=sys.stderr)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return t


def ratio_of(t: Timings) -> float:
    """Throughput ours / nnU-Net's like-for-like (cases per median second)."""
    return statistics.median(t.wall["nnunet_resencm"]) / statistics.median(t.wall["ours"])


def record(t: Timings, args: argparse.Namespace) -> None:
    """Print the Markdown table (header and one row) on stdout."""
    med = {k: statistics.median(v) for k, v in t.wall.items()}
    cps = {k: args.cases / v for k, v in med.items()}
    ratio = cps["ours"] / cps["nnunet_resencm"]
    pair_ratios = [b / a for a, b in zip(t.wall["ours"], t.wall["nnunet_resencm"])]
    cpu_ratio = statistics.median(t.cpu["nnunet_resencm"]) / statistics.median(t.cpu["ours"])
    header = ["data", "cases", "-np", "nnUNetv2_plan_and_preprocess ResEncM -c 3d_fullres", "orthodiff plan_and_preprocess",
              "ratio ours/nnU-Net (cases/s)", "per-repeat ratios", "CPU-time ratio", "ours resumed", "arrays"]
    row = [f"phantom sag {args.in_plane_mm}x{args.in_plane_mm}x3 mm", str(args.cases), str(args.num_processes),
           f"{med['nnunet_resencm']:.1f} s ({cps['nnunet_resencm']:.3f} cases/s)",
           f"{med['ours']:.1f} s ({cps['ours']:.3f} cases/s)", f"**{ratio:.2f}**",
           ", ".join(f"{x:.2f}" for x in pair_ratios), f"{cpu_ratio:.2f}", f"{statistics.median(t.resumed):.1f} s",
           t.arrays]
    if args.with_nnunet_default:
        header.insert(5, "nnUNetv2_plan_and_preprocess default (-c 2d 3d_fullres 3d_lowres)")
        row.insert(5, f"{med['nnunet_default']:.1f} s ({cps['nnunet_default']:.3f} cases/s, "
                      f"ratio {cps['ours'] / cps['nnunet_default']:.2f})")
    print(common.markdown_table(header, [row]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    timings = run(args)
    record(timings, args)
    return 0 if ratio_of(timings) >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
