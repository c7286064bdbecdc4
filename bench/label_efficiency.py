"""Label efficiency: does pretraining help nnU-Net with 10 % of the labels? (scratch / diffusion / MAE init)

Images *rendered from real label maps*: the 68 expert OAI bone/cartilage label maps of
``../shared/data/labelmaps/oai_bone_cartilage`` (44 knees; 24 with two time points) are remapped onto the
knee scheme (``oai_zib``: femur, tibia, patella and their cartilages) and rendered as sagittal 2D-style
series (``orthodiff_nnunet.data.render.render_exam``). The anatomy and the ground truth are real; the
images are synthetic (every table says so).

Protocol (knees = patients; both time points of a knee always stay together):

1. Split the 44 knees (seeded by ``--split-seed``): ``--test-knees`` held out (never converted into the
   training dataset, never seen by pretraining or training), ``--val-knees`` validation knees (nnU-Net's
   per-epoch pseudo-Dice, i.e. the learning curves; never trained on), the rest the labeled pool.
2. Render: every non-test knee at three scanner/site renderings (SiteA 3 T, the labeled site; SiteC 3 T,
   other vendor, noisier, stronger bias field; SiteD 1.0 T, flatter contrast, low SNR). The SiteA series
   of pool and validation knees are labeled; the SiteC/SiteD series are converted *without* labels (the
   unlabeled pretraining corpus). The test knees are rendered twice: SiteA (internal test) and an
   external 1.5 T site (other vendor, contrast, noise, bias, slice thickness; not in the corpus).
3. Plan with ``orthodiff plan_and_preprocess`` (ResEnc-M). ``--size cpu`` (default) shrinks the network
   (``write_shrunk_plans``: fewer features, stages and blocks) and renders on a coarse grid so that
   scratch training converges on 2 CPU cores; ``--size full`` keeps the plans and the renderer's site
   spacing and uses the methods' default iteration budgets (for a GPU).
4. Pretrain each objective ONCE (not per seed) on the same corpus (every scan of the training dataset:
   pool + validation knees, all three renderings), same network, same iterations: ``orthodiff pretrain``
   (diffusion) and ``orthodiff pretrain --objective mae`` (masked autoencoder). Each run's record is checked: a test knee
   among its cases stops the study.
5. Segmentation, ``orthodiff``'s ``train_segmentation``, every arm the same iterations, schedule and
   plans: init scratch / diffusion / MAE x label fraction 10 % / 100 % x seeds. The seed sets torch /
   numpy and picks the 10 % subset (whole knees, at least 2). The subsets are written as folds of
   ``splits_final.json`` (train = the SiteA series of the chosen knees, val = the validation knees).
6. Predict the internal and external test series (nnU-Net's predictor, no mirroring, for time) and score
   with nnU-Net's ``compute_metrics_on_folder``; Dice per structure and mean; 95 % intervals by
   bootstrap over test knees (``orthodiff_nnunet.evaluation.report.cluster_mean_ci``): seeds pooled as
   the mean over seeds per scan, then knees resampled; paired differences to scratch (same scan, seed
   and fraction) likewise.

Usage::

    OMP_NUM_THREADS=1 python -m bench.label_efficiency --work /tmp/le3a   # 2 lanes, the CPU defaults
    OMP_NUM_THREADS=1 python -m bench.label_efficiency --work /tmp/le4 --channels-last   # the same, 1.28x per step
    python -m bench.label_efficiency --size full --lanes 1 --work /scratch/le_full   # GPU, plans unchanged
    python -m bench.label_efficiency --only-analysis --work ...                     # tables from what is there
    OMP_NUM_THREADS=1 python -m bench.label_efficiency --work /tmp/le5 --channels-last --fractions 0.1   # in parts

On a shared 2-core machine torch with 2 threads ran 3.4x slower than with 1, so the default runs two
processes (``--lanes``) of one thread each. The CPU defaults were chosen by checking convergence first
(2026-12-02, scratch at 100 %, AdamW 1e-2, validation pseudo-Dice): with features 4-8-16-32-32 scratch never
learnt the patella (0 after 400 and 800 iterations); with 8-16-32-64-64 femur / tibia / patella reached
0.93 / 0.92 / 0.86 after 275 of 400 iterations. But the cartilage had not converged at 400: a later check over
1,500 iterations (scratch, 100 %) found every validation curve flat only from about 1,200 (bones 0.95 / 0.94 / 0.91,
cartilages 0.71-0.74), so the default is now 48 epochs x 25 = 1,200 iterations per arm. An earlier run with
nnU-Net's SGD and 350 iterations per arm
learnt nothing (BENCHMARKS.md).

Every stage reuses what the work folder holds (delete it, or a stage's folder, to redo it). Writes
``results.json``, ``results.md`` and the figures into the work folder.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import time
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import REPO, command_line, console_script, cpu_seconds, machine, with_planning_env
from orthodiff_nnunet.conventions import (
    DIFFUSION_CONFIGURATION,
    ENCODER_FILE,
    PRETRAIN_FOLD,
    PRETRAIN_RUN_RECORD,
    RESENC_M_PLANS,
    SEG_RUN_RECORD,
    SEG_TRAINER_OF_INIT,
    SEGMENTATION_CONFIGURATION,
    result_folder,
)

if TYPE_CHECKING:
    import numpy as np

    from orthodiff_nnunet.data.sites import SiteProfile

TRAIN_ID, TEST_ID, EXT_ID = 701, 711, 712
TRAIN_NAME, TEST_NAME, EXT_NAME = "LERender", "LERenderTest", "LERenderExt"
STRUCTURES = {1: "femur", 2: "tibia", 3: "patella", 5: "femoral cartilage", 6: "tibial cartilage",
              7: "patellar cartilage"}  # what the OAI maps hold after remapping
BONES = (1, 2, 3)
INITS = ("scratch", "diffusion", "mae")
NOTE = ("images rendered from real OAI label maps (real anatomy and ground truth, synthetic intensities); "
        "not real MR images")
CPU_PLANS = "labelEffCpuPlans"


# ----------------------------------------------------------------------------------------------
# sites
def site_profiles() -> dict[str, SiteProfile]:
    from orthodiff_nnunet.data.sites import SiteProfile

    return {
        # labeled training site and internal test site
        "A": SiteProfile(name="SiteA", field_strength_t=3.0, vendor="VendorA", vendor_scale=1000.0,
                         slice_thickness_mm=3.0, in_plane_spacing_mm=0.8, snr_at_3t=25.0, bias_strength=0.2),
        # unlabeled corpus only
        "C": SiteProfile(name="SiteC", field_strength_t=3.0, vendor="VendorC", vendor_scale=4000.0,
                         vendor_offset=0.0, slice_thickness_mm=3.0, in_plane_spacing_mm=0.8, snr_at_3t=15.0,
                         bias_strength=0.35),
        "D": SiteProfile(name="SiteD", field_strength_t=1.0, vendor="VendorD", vendor_scale=600.0,
                         vendor_offset=30.0, slice_thickness_mm=3.3, in_plane_spacing_mm=0.9, snr_at_3t=30.0,
                         bias_strength=0.25),
        # external test site (never in the corpus): 1.5 T, other vendor, thicker slices
        "E": SiteProfile(name="SiteExt", field_strength_t=1.5, vendor="VendorB", vendor_scale=2500.0,
                         vendor_offset=100.0, slice_thickness_mm=3.5, in_plane_spacing_mm=0.9, snr_at_3t=25.0,
                         bias_strength=0.3),
    }


def site_spacing(site_key: str, size: str, profiles: dict) -> tuple[float, float]:
    """(in-plane mm, slice thickness mm) of a site's series: coarse grid for ``--size cpu``."""
    p = profiles[site_key]
    if size == "full":
        return p.in_plane_spacing_mm, p.slice_thickness_mm
    return {"A": (2.0, 3.0), "C": (2.0, 3.0), "D": (2.2, 3.3), "E": (2.2, 3.5)}[site_key]


# ----------------------------------------------------------------------------------------------
# bookkeeping
class Stages:
    """Wall and CPU time per stage (CPU = this process and its finished children, user + system)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, name: str):
        stages = self

        class _Stage:
            def __enter__(self):
                self.t0, self.c0 = time.perf_counter(), cpu_seconds()
                self.child_cpu = None  # set by stages whose work runs in a child process (lanes overlap)
                print(f"[label-efficiency {_now()}] {name} ...", flush=True)
                return self

            def __exit__(self, *exc):
                w = time.perf_counter() - self.t0
                c = self.child_cpu if self.child_cpu is not None else cpu_seconds() - self.c0
                stages.wall[name] = stages.wall.get(name, 0.0) + w
                stages.cpu[name] = stages.cpu.get(name, 0.0) + c
                load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
                print(f"[label-efficiency {_now()}] {name}: {w:.0f} s wall, {c:.0f} s CPU (load {load})"
                      + (" FAILED" if exc[0] else ""), flush=True)

        return _Stage()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")


def run_child(cmd: list[str], log_file: Path, env: dict | None = None) -> float:
    """Run ``cmd`` with its output appended to ``log_file``; returns its CPU seconds (user + system, with its
    children); raises on a non-zero exit."""
    with open(log_file, "a") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)  # cwd: `-m bench.X`
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log_file}")
    return usage.ru_utime + usage.ru_stime


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def shared_labelmaps() -> Path:
    env = os.environ.get("ORTHODIFF_SHARED_DATA")
    base = Path(env) if env else REPO.parent / "shared" / "data"
    folder = base / "labelmaps" / "oai_bone_cartilage"
    if not folder.is_dir():
        folder = Path("/work/shared/data/labelmaps/oai_bone_cartilage")
    if not folder.is_dir():
        raise SystemExit(f"{folder} is absent: this study needs the real OAI label maps (../shared/data or "
                         "$ORTHODIFF_SHARED_DATA)")
    return folder


# ----------------------------------------------------------------------------------------------
# design: knees, splits, subsets
def design(work: Path, args) -> dict:
    """Knee split and per-seed 10 % subsets (written once to ``design.json``; reused)."""
    import numpy as np

    f = work / "design.json"
    if f.is_file():
        return json.loads(f.read_text())
    maps = sorted(shared_labelmaps().glob("OAI_*/*.nii.gz"))
    by_patient: dict[str, list[str]] = {}
    for p in maps:
        by_patient.setdefault(p.name.split("_")[0], []).append(str(p))
    patients = sorted(by_patient)
    # knees get study-local names K01..K44 (sorted source order): no OAI id appears in any output
    knees = {f"K{i + 1:02d}": sorted(by_patient[p]) for i, p in enumerate(patients)}
    order = [list(knees)[i] for i in np.random.default_rng(args.split_seed).permutation(len(knees))]
    test = sorted(order[:args.test_knees])
    val = sorted(order[args.test_knees:args.test_knees + args.val_knees])
    pool = sorted(order[args.test_knees + args.val_knees:])
    n_sub = max(2, int(round(0.1 * len(pool))))
    subsets = {str(s): sorted(np.random.default_rng(1000 + s).choice(pool, n_sub, replace=False).tolist())
               for s in range(args.seeds)}
    d = {"knees": knees, "test": test, "val": val, "pool": pool, "subset_10": subsets,
         "split_seed": args.split_seed}
    work.mkdir(parents=True, exist_ok=True)
    write_json(f, d)
    return d


def scans_of(d: dict, knee_list: list[str]) -> list[tuple[str, int, str]]:
    """(knee, time point 1/2, map path) of every scan of these knees."""
    return [(k, i + 1, p) for k in knee_list for i, p in enumerate(d["knees"][k])]


# ----------------------------------------------------------------------------------------------
# rendering and conversion
def _render_job(job: dict) -> str:
    import numpy as np  # noqa: F401
    import SimpleITK as sitk

    from orthodiff_nnunet.data.render import render_exam
    from orthodiff_nnunet.remap import load_remap_table

    img_path, lab_path = Path(job["image"]), Path(job["label"])
    if img_path.is_file() and lab_path.is_file():
        return "reused"
    labels = load_remap_table("oai_zib").apply_image(sitk.ReadImage(job["map"]))
    series = render_exam(labels, job["seed"], site=job["site"], orientations=("sag",),
                         in_plane_spacing_mm=job["spacing"], slice_thickness_mm=job["thickness"])
    image, seg = series["sag"]
    for obj, path in ((seg, lab_path), (image, img_path)):  # image last: its presence marks a finished job
        tmp = path.with_name("tmp_" + path.name)
        sitk.WriteImage(obj, str(tmp), True)
        os.replace(tmp, path)
    return "rendered"


def render_all(work: Path, d: dict, size: str, workers: int) -> dict[str, Path]:
    """Render the three site folders; returns their manifests."""
    import numpy as np

    profiles = site_profiles()
    folders = {"train": work / "sites" / "train", "test": work / "sites" / "test_internal",
               "ext": work / "sites" / "test_external"}
    plan = {"train": [("A", d["pool"] + d["val"], True), ("C", d["pool"] + d["val"], False),
                      ("D", d["pool"] + d["val"], False)],
            "test": [("A", d["test"], True)], "ext": [("E", d["test"], True)]}
    jobs, rows = [], {k: [] for k in folders}
    for key, entries in plan.items():
        folder = folders[key]
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        for site_key, knee_list, labeled in entries:
            site = profiles[site_key]
            sp, th = site_spacing(site_key, size, profiles)
            for knee, tp, path in scans_of(d, knee_list):
                case = f"{knee}T{tp}{site_key}"
                seed = int(np.random.SeedSequence([int(knee[1:]), tp, ord(site_key)]).generate_state(1)[0])
                img, lab = f"images/{case}_sag.nii.gz", f"labels/{case}_sag.nii.gz"
                jobs.append({"map": path, "image": str(folder / img), "label": str(folder / lab), "seed": seed,
                             "site": site, "spacing": sp, "thickness": th})
                rows[key].append({"case_id": case, "patient_id": knee, "site": site.name,
                                  "field_strength": f"{site.field_strength_t:g}", "vendor": site.vendor,
                                  "image": img, "orientation": "", "label": lab if labeled else ""})
    todo = [j for j in jobs if not Path(j["image"]).is_file()]
    print(f"  {len(jobs)} series, {len(jobs) - len(todo)} already rendered", flush=True)
    t0 = time.perf_counter()
    if todo:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for i, _ in enumerate(pool.map(_render_job, todo), start=1):
                if i % 20 == 0 or i == len(todo):
                    el = time.perf_counter() - t0
                    print(f"  rendered {i}/{len(todo)} ({el:.0f} s, ETA {el / i * (len(todo) - i):.0f} s)", flush=True)
    manifests = {}
    for key, folder in folders.items():
        m = folder / "manifest.csv"
        with open(m, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[key][0]))
            w.writeheader()
            w.writerows(rows[key])
        (folder / "render_info.json").write_text(json.dumps({"note": NOTE, "size": size}, indent=2))
        manifests[key] = m
    return manifests


def convert_all(work: Path, manifests: dict[str, Path]) -> None:
    from orthodiff_nnunet.api import convert

    raw = work / "raw"
    keys = work / "keys"
    keys.mkdir(exist_ok=True)
    for key, did, name, external in (("train", TRAIN_ID, TRAIN_NAME, False), ("test", TEST_ID, TEST_NAME, True),
                                     ("ext", EXT_ID, EXT_NAME, True)):
        if list(raw.glob(f"Dataset{did}_*")) and (keys / f"{key}.csv").is_file():
            continue
        convert(manifests[key], did, name, raw=raw, external=external, num_processes=2,
                key_file=keys / f"{key}.csv")


def case_map(work: Path) -> dict[str, dict]:
    """nnU-Net case id -> {"source": K01T1A, "knee": K01, "site": A, "dataset": train/test/ext} (from the key files)."""
    out = {}
    for key in ("train", "test", "ext"):
        with open(work / "keys" / f"{key}.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                for c in row["cases"].split("; "):
                    case = c.split(" ")[0]
                    src = row["case_id"]
                    out[case] = {"source": src, "knee": src[:3], "site": src[-1], "dataset": key}
    return out


# ----------------------------------------------------------------------------------------------
# plans and folds
def plan(work: Path, args) -> tuple[str, str]:
    from orthodiff_nnunet.planning import plan_and_preprocess
    from orthodiff_nnunet.utils import atomic_write_json, load_json

    pre = work / "preprocessed"
    done_flag = f"{SEGMENTATION_CONFIGURATION}_done.flag"
    found = list(pre.glob(f"Dataset{TRAIN_ID}_*/{RESENC_M_PLANS}.json"))
    if found and (found[0].parent / done_flag).is_file():
        dataset = found[0].parent.name
        ident = RESENC_M_PLANS
    else:
        with with_planning_env():  # nnUNet_n_proc_DA=0 breaks planning
            result = plan_and_preprocess([TRAIN_ID], num_processes=2, show_progress=False)
        dataset, ident = result.datasets[0].dataset_name, result.datasets[0].plans_identifier
        (pre / dataset / done_flag).write_text("planned and preprocessed\n")
    folder = pre / dataset
    if args.size == "full":
        return dataset, ident
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.planning import _find_dataset, give_own_data_folders, list_training_cases
    from orthodiff_nnunet.preprocessing import preprocess_configurations

    small = write_shrunk_plans(folder, ident, CPU_PLANS, max_features=max(args.features), max_stages=args.stages,
                               max_blocks_per_stage=1, max_batch_size=args.batch)
    plans = load_json(folder / f"{small}.json")
    for c in plans["configurations"].values():
        if "architecture" in c:
            kw = c["architecture"]["arch_kwargs"]
            kw["features_per_stage"] = [min(int(f), int(g)) for f, g in zip(kw["features_per_stage"], args.features)]
    fr = plans["configurations"][SEGMENTATION_CONFIGURATION]
    fr["patch_size"] = list(args.patch)
    plans["configurations"][DIFFUSION_CONFIGURATION]["patch_size"] = list(args.pretrain_patch)
    if args.spacing:  # coarser grid than planned: nnU-Net's preprocessing resamples into a data folder of its own
        fr["spacing"] = [float(x) for x in args.spacing]
        fr["median_image_size_in_voxels"] = [round(m * s / t, 1) for m, s, t in
                                             zip(fr["median_image_size_in_voxels"],
                                                 load_json(folder / f"{ident}.json")["configurations"][SEGMENTATION_CONFIGURATION]["spacing"],
                                                 fr["spacing"])]
        plans = give_own_data_folders(plans, small, folder, load_json(folder / "dataset.json")["labels"])
    atomic_write_json(folder / f"{small}.json", plans)
    if args.spacing:
        info = _find_dataset(work / "raw", TRAIN_ID)
        preprocess_configurations(dataset, plans, [SEGMENTATION_CONFIGURATION], list_training_cases(info), pre, 2,
                                  show_progress=False)
    return dataset, small


def fold_of(fraction: float, seed: int) -> int:
    """Fold index of (fraction, seed) in the study's ``splits_final.json``: 2 * seed + (fraction < 1)."""
    return 2 * int(seed) + (1 if fraction < 1 else 0)


def write_folds(work: Path, dataset: str, d: dict, cmap: dict, seeds: int) -> list[dict]:
    """The study's folds: train = SiteA series of the arm's knees, val = SiteA series of the validation knees."""
    site_a = {c: v for c, v in cmap.items() if v["dataset"] == "train" and v["site"] == "A"}

    def cases(knees):
        return sorted(c for c, v in site_a.items() if v["knee"] in set(knees))

    folds = []
    for s in range(seeds):
        folds.append({"train": cases(d["pool"]), "val": cases(d["val"])})
        folds.append({"train": cases(d["subset_10"][str(s)]), "val": cases(d["val"])})
    for name in ("preprocessed",):
        write_json(work / name / dataset / "splits_final.json", folds)
    return folds


# ----------------------------------------------------------------------------------------------
# pretraining
def pretrain_objective(work: Path, dataset: str, plans: str, objective: str, args, d: dict, cmap: dict) -> dict:
    """Run ``orthodiff pretrain`` (own results root per objective), check its cases, return its record."""
    root = work / "results_pretrain" / objective
    encoders = f"*/*/fold_{PRETRAIN_FOLD}/{ENCODER_FILE}"
    encs = list(root.glob(encoders))
    if not encs:
        env = dict(os.environ, nnUNet_results=str(root))
        cmd = [console_script("orthodiff"), "pretrain", "-d", dataset, "-p", plans,
               "--seed", "0", "--sample-steps", "10", "--device", args.device]
        if args.size == "cpu":
            cmd += ["--iterations", str(args.pretrain_iterations),
                    "--checkpoint-every", str(max(1, args.pretrain_iterations // 8)), "--lr", str(args.pretrain_lr)]
        if objective != "diffusion":
            cmd += ["--objective", objective]
        running = list(root.glob(f"*/*/fold_{PRETRAIN_FOLD}/checkpoint_latest.pth"))
        if running:
            cmd.append("--resume")
        root.mkdir(parents=True, exist_ok=True)
        print("  " + " ".join(cmd), flush=True)
        cpu = run_child(cmd, root / "pretrain.log", env)
        write_json(root / "pretrain_cpu.json", {"cpu_seconds": cpu})
        encs = list(root.glob(encoders))
    if len(encs) != 1:
        raise SystemExit(f"expected one encoder under {root}, found {encs}")
    record_files = list(encs[0].parent.glob(PRETRAIN_RUN_RECORD))
    record = json.loads(record_files[0].read_text())
    seen = list(record.get("train_cases", [])) + list(record.get("held_out_cases", []))
    leaks = sorted({cmap[c]["knee"] for c in seen if c in cmap and cmap[c]["knee"] in set(d["test"])})
    unknown = [c for c in seen if c not in cmap]
    if leaks or unknown:
        raise SystemExit(f"TEST KNEE LEAK in {objective} pretraining ({record_files[0]}): knees {leaks}, "
                         f"unknown cases {unknown[:5]}")
    sites = sorted({cmap[c]["site"] for c in seen})
    knees = sorted({cmap[c]["knee"] for c in seen})
    return {"objective": objective, "encoder": str(encs[0]), "record": str(record_files[0]),
            "train_scans": len(record.get("train_cases", [])), "held_out_scans": len(record.get("held_out_cases", [])),
            "knees": len(knees), "sites": sites, "test_knees_seen": 0,
            "iterations": record.get("iterations_done", record.get("iterations_requested")),
            "train_losses": record.get("train_losses"), "val_losses": record.get("val_losses")}


# ----------------------------------------------------------------------------------------------
# one arm (run in a child process, so that code merged into the worktree meanwhile is used)
def arm_dir(work: Path, init: str, fraction: float, seed: int) -> Path:
    return work / "arms" / f"{init}_{fraction:g}_s{seed}"


def train_arm(args, work: Path, state: dict, init: str, fraction: float, seed: int) -> tuple[Path, dict]:
    """Train one arm (reused when its final checkpoint exists), check its cases; (fold folder, its timing).
    The arm's seed is ``train_segmentation``'s ``run_seed`` (torch/numpy/random before the trainer is built)."""
    from orthodiff_nnunet.paths import set_nnunet_paths
    from orthodiff_nnunet.segmentation import train_segmentation

    dataset, plans = state["dataset"], state["plans"]
    set_nnunet_paths(raw=work / "raw", preprocessed=work / "preprocessed", results=work / "results" / init)
    os.environ["nnUNet_n_proc_DA"] = "0"
    fold = fold_of(fraction, seed)
    encoder = None if init == "scratch" else Path(state["encoders"][init])
    seg_init = "scratch" if init == "scratch" else "diffusion"
    model = result_folder(work / "results" / init, dataset, SEG_TRAINER_OF_INIT[seg_init], plans,
                          SEGMENTATION_CONFIGURATION)
    fold_dir = model / f"fold_{fold}"
    t0, c0 = time.perf_counter(), cpu_seconds()
    if not (fold_dir / "checkpoint_final.pth").is_file():
        if fold_dir.is_dir() and not (fold_dir / "checkpoint_latest.pth").is_file():
            import shutil

            print(f"  {fold_dir}: a run killed before its first checkpoint; starting it again", flush=True)
            shutil.rmtree(fold_dir)  # nothing to continue from, and train seg refuses a used folder
        kw = {}
        if args.size == "cpu":
            kw = {"epochs": args.epochs, "iterations_per_epoch": args.iterations_per_epoch,
                  "val_iterations_per_epoch": args.val_iterations}
        train_segmentation(dataset, fold=fold, init=seg_init, encoder=encoder, plans=plans, device=args.device,
                           optimizer=args.optimizer, learning_rate=args.seg_lr,
                           validate=False, continue_training=(fold_dir / "checkpoint_latest.pth").is_file(),
                           checkpoint_minutes=3, channels_last=args.channels_last, run_seed=seed, **kw)
    timing = {"train_wall": time.perf_counter() - t0, "train_cpu": cpu_seconds() - c0}
    record = json.loads((fold_dir / SEG_RUN_RECORD).read_text())
    expected = json.loads((work / "preprocessed" / dataset / "splits_final.json").read_text())[fold]["train"]
    if sorted(record["training_cases"]) != sorted(expected):
        raise SystemExit(f"{fold_dir}: trained on {record['training_cases']}, expected {expected}")
    return fold_dir, timing


def training_logs(fold_dir: Path) -> dict:
    """nnU-Net's per-epoch logs of the final checkpoint (losses, pseudo-Dice, per class)."""
    import numpy as np
    import torch

    ckpt = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logs = {k: [float(np.mean(v)) if isinstance(v, (list, tuple)) else float(v) for v in ckpt["logging"].get(k, [])]
            for k in ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice")}
    logs["dice_per_class"] = [[float(x) for x in v] for v in ckpt["logging"].get("dice_per_class_or_region", [])]
    return logs


def score_arm(args, work: Path, out: Path, fold_dir: Path) -> dict:
    """Predict the internal and external test series and score them (nnU-Net's metrics); Dice per scan."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from orthodiff_nnunet.segmentation import predict_segmentation

    scores = {}
    for key, did in (("internal", TEST_ID), ("external", EXT_ID)):
        raw = next((work / "raw").glob(f"Dataset{did}_*"))
        pred = out / f"pred_{key}"
        summary = pred / "summary.json"
        if not summary.is_file():
            predict_segmentation(raw / "imagesTs", pred, fold_dir, device=args.device, mirroring=False,
                                 num_processes=0, show_progress=False)
            compute_metrics_on_folder(str(raw / "labelsTs"), str(pred), str(summary), SimpleITKIO(), ".nii.gz",
                                      sorted(STRUCTURES), num_processes=1)
        s = json.loads(summary.read_text())
        scores[key] = {Path(c["prediction_file"]).name.replace(".nii.gz", ""):
                       {str(lab): c["metrics"][str(lab)]["Dice"] for lab in STRUCTURES} for c in s["metric_per_case"]}
    return scores


def run_arm(args) -> int:
    """One arm in this (child) process: train, score, write ``result.json`` beside it."""
    work = args.work.resolve()
    init, fraction, seed = args.arm[0], float(args.arm[1]), int(args.arm[2])
    out = arm_dir(work, init, fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    state = json.loads((work / "state.json").read_text())
    fold_dir, seconds = train_arm(args, work, state, init, fraction, seed)
    record = json.loads((fold_dir / SEG_RUN_RECORD).read_text())
    logs = training_logs(fold_dir)
    t1, c1 = time.perf_counter(), cpu_seconds()
    scores = score_arm(args, work, out, fold_dir)
    seconds.update({"predict_wall": time.perf_counter() - t1, "predict_cpu": cpu_seconds() - c1})
    result = {"init": init, "fraction": fraction, "seed": seed, "fold": fold_of(fraction, seed), "model": str(fold_dir),
              "training_cases": record["training_cases"], "encoder": record.get("encoder"),
              "encoder_tensors_loaded": record.get("encoder_tensors_loaded"), "schedule": record.get("schedule"),
              "logs": logs, "scores": scores, "seconds": seconds}
    prev = out / "result.json"
    if prev.is_file() and seconds["train_wall"] < 5:  # reused training: keep the original training time
        old = json.loads(prev.read_text())["seconds"]
        result["seconds"]["train_wall"], result["seconds"]["train_cpu"] = old["train_wall"], old["train_cpu"]
    write_json(prev, result)
    return 0


def arm_command(args, init: str, fraction: float, seed: int) -> list[str]:
    """This module run for one arm (from the repository root: ``run_child`` starts it there)."""
    return [sys.executable, "-m", "bench.label_efficiency",
            "--work", str(args.work), "--size", args.size,
            "--device", args.device, "--epochs", str(args.epochs), "--iterations-per-epoch",
            str(args.iterations_per_epoch), "--val-iterations", str(args.val_iterations),
            "--optimizer", args.optimizer, *(["--seg-lr", str(args.seg_lr)] if args.seg_lr is not None else []),
            *(["--channels-last"] if args.channels_last else []),
            "--arm", init, f"{fraction:g}", str(seed)]


def launch_arm(args, work: Path, init: str, fraction: float, seed: int) -> dict:
    out = arm_dir(work, init, fraction, seed)
    res = out / "result.json"
    if res.is_file():
        return json.loads(res.read_text())
    out.mkdir(parents=True, exist_ok=True)
    run_child(arm_command(args, init, fraction, seed), out / "arm.log")
    return json.loads(res.read_text())


# ----------------------------------------------------------------------------------------------
# main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Stages: design, render, convert, plan, pretrain diffusion, arms (scratch, "
                                        "diffusion), pretrain MAE, arms (MAE), analysis. Each reuses the work folder.")
    ap.add_argument("--work", type=Path, default=Path("/tmp/orthodiff_label_efficiency2"),
                    help="work folder (outside the repository; default /tmp/orthodiff_label_efficiency2)")
    ap.add_argument("--size", choices=["cpu", "full"], default="cpu",
                    help="cpu (default): coarse grid, shrunk network, the iterations below; full: the sites' "
                         "spacing, plans unchanged, the methods' default iterations (for a GPU)")
    ap.add_argument("--test-knees", type=int, default=12, help="held-out test knees (default 12)")
    ap.add_argument("--val-knees", type=int, default=4, help="validation knees for the learning curves (default 4)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    ap.add_argument("--fractions", type=float, nargs="+", choices=[0.1, 1.0], default=[0.1, 1.0], metavar="F",
                    help="label fractions to train, 0.1 and/or 1.0 (default both); the analysis tabulates what the "
                         "work folder holds")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the knee split (default 0)")
    ap.add_argument("--features", type=int, nargs="+", default=[8, 16, 32, 64, 64],
                    help="cpu: features per stage, capping the planned ones (default 8 16 32 64 64: with 4 8 16 32 32 "
                         "scratch never learnt the patella; planned ResEnc-M 32 64 128 256 320)")
    ap.add_argument("--spacing", type=float, nargs=3, default=[3.0, 3.0, 3.0],
                    help="cpu: target spacing of the segmentation/pretraining data, mm (default 3 3 3; rendered "
                         "3 x 2 x 2)")
    ap.add_argument("--stages", type=int, default=5, help="cpu: network stages (default 5)")
    ap.add_argument("--batch", type=int, default=2, help="cpu: batch size (default 2)")
    ap.add_argument("--patch", type=int, nargs=3, default=[32, 48, 48],
                    help="cpu: segmentation patch, through-plane first (default 32 48 48)")
    ap.add_argument("--pretrain-patch", type=int, nargs=3, default=[32, 48, 48],
                    help="cpu: pretraining patch (default 32 48 48)")
    ap.add_argument("--pretrain-iterations", type=int, default=1000,
                    help="cpu: pretraining iterations (default 1000)")
    ap.add_argument("--pretrain-lr", type=float, default=1e-3, help="cpu: pretraining AdamW lr (default 1e-3)")
    ap.add_argument("--epochs", type=int, default=48,
                    help="cpu: segmentation epochs (default 48 = 1,200 iterations: scratch at 100 %% converged there, "
                         "the 2026-12-02 check over 1,500; 16 = 400 was not converged)")
    ap.add_argument("--iterations-per-epoch", type=int, default=25, help="cpu: iterations per epoch (default 25)")
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw",
                    help="segmentation optimizer of every arm (default adamw: nnU-Net's SGD learnt nothing in a few "
                         "hundred iterations at this size, docs/DEMO.md)")
    ap.add_argument("--seg-lr", type=float, default=1e-2,
                    help="segmentation learning rate of every arm (default 1e-2)")
    ap.add_argument("--val-iterations", type=int, default=3, help="cpu: pseudo-Dice batches per epoch (default 3)")
    ap.add_argument("--lanes", type=int, default=2,
                    help="runs (pretrainings, arms) side by side, each with torch threads = OMP_NUM_THREADS "
                         "(default 2 lanes: one per core of a 2-core machine with OMP_NUM_THREADS=1)")
    ap.add_argument("--render-workers", type=int, default=2, help="rendering processes (default 2)")
    ap.add_argument("--stop-after", choices=["prepare", "scratch-diffusion"], help="stop after this stage")
    ap.add_argument("--only-analysis", action="store_true", help="tabulate what the work folder holds, run nothing")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--channels-last", action="store_true",
                    help="segmentation arms in channels-last-3d memory format (train seg --channels-last): the same "
                         "results up to float rounding, 1.28x per step of a small network on a CPU (BENCHMARKS.md)")
    ap.add_argument("--arm", nargs=3, metavar=("INIT", "FRACTION", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    if REPO in args.work.parents or args.work == REPO:
        ap.error("--work must lie outside the repository (never put data into it)")
    return args


class Study:
    """The run of every stage: state (``state.json``), stage times, and the lanes the runs share."""

    def __init__(self, args) -> None:
        self.args, self.work = args, args.work
        self.stages = Stages()
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.state_file = self.work / "state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        self.state.setdefault("stage_wall", {})
        self.state.setdefault("stage_cpu", {})
        self.lock = threading.Lock()
        self.pre_futures: dict = {}
        self.d = self.dataset = self.plans = self.cmap = None

    def save_stage_times(self) -> None:
        for k in self.stages.wall:
            if k in self.state["stage_wall"] and self.stages.wall[k] < 5:
                continue  # reused from an earlier invocation: keep its times
            self.state["stage_wall"][k] = round(self.stages.wall[k], 1)
            self.state["stage_cpu"][k] = round(self.stages.cpu[k], 1)
        write_json(self.state_file, self.state)

    def prepare(self) -> None:
        """Render, convert, plan and write the folds (each reused when the work folder holds it)."""
        args, work, d, stages = self.args, self.work, self.d, self.stages
        with stages("render"):
            manifests = render_all(work, d, args.size, args.render_workers)
        with stages("convert"):
            convert_all(work, manifests)
        self.cmap = case_map(work)
        with stages("plan + preprocess"):
            self.dataset, self.plans = plan(work, args)
            folds = write_folds(work, self.dataset, d, self.cmap, args.seeds)
        self.state.update({"dataset": self.dataset, "plans": self.plans,
                           "folds": [{k: len(v) for k, v in f.items()} for f in folds]})
        self.state.setdefault("encoders", {})
        self.save_stage_times()

    def pretrain_task(self, objective: str):
        with self.stages(f"pretrain {objective}") as st:
            pre = pretrain_objective(self.work, self.dataset, self.plans, objective, self.args, self.d, self.cmap)
            f = self.work / "results_pretrain" / objective / "pretrain_cpu.json"
            st.child_cpu = json.loads(f.read_text())["cpu_seconds"] if f.is_file() else 0.0
        with self.lock:
            self.state["encoders"][objective] = pre["encoder"]
            self.save_stage_times()
        return pre

    def arm_task(self, init: str, fraction: float, seed: int):
        if init != "scratch":
            self.pre_futures[init].result()  # its encoder first
        with self.stages(f"arm {init} {fraction:.0%} seed {seed}") as st:
            res = launch_arm(self.args, self.work, init, fraction, seed)
            st.child_cpu = res["seconds"]["train_cpu"] + res["seconds"]["predict_cpu"]
        with self.lock:
            self.save_stage_times()
        return res

    def run_lanes(self) -> None:
        """Pretrainings and arms in ``--lanes`` lanes, one thread each (torch with 2 threads on 2 shared cores ran
        3x slower than with 1): the pretrainings run beside the scratch arms; the MAE arms come last."""
        inits = ["scratch", "diffusion"] + (["mae"] if self.args.stop_after != "scratch-diffusion" else [])
        with ThreadPoolExecutor(max_workers=self.args.lanes) as lanes:
            self.pre_futures["diffusion"] = lanes.submit(self.pretrain_task, "diffusion")
            if "mae" in inits:
                self.pre_futures["mae"] = lanes.submit(self.pretrain_task, "mae")
            arm_futures = [lanes.submit(self.arm_task, i, f, s) for i in inits for f in self.args.fractions
                           for s in range(self.args.seeds)]
            for fut in [*self.pre_futures.values(), *arm_futures]:
                fut.result()  # re-raise a failure

    def record_invocation(self) -> None:
        now = _dt.datetime.now(_dt.timezone.utc)
        self.state.setdefault("invocations", []).append(
            {"start": self.started.isoformat(timespec="seconds"), "end": now.isoformat(timespec="seconds"),
             "wall_s": round((now - self.started).total_seconds(), 1)})
        self.save_stage_times()


def run(args) -> Study | None:
    """Every stage that ``--only-analysis`` / ``--stop-after`` leave in; None when stopped after preparing."""
    from orthodiff_nnunet.paths import set_nnunet_paths

    set_nnunet_paths(raw=args.work / "raw", preprocessed=args.work / "preprocessed", results=args.work / "results")
    study = Study(args)
    study.d = d = design(args.work, args)
    print(f"[label-efficiency] knees: {len(d['test'])} test, {len(d['val'])} validation, {len(d['pool'])} pool; "
          f"10 % subsets: {d['subset_10']}", flush=True)
    if args.only_analysis:
        return study
    study.prepare()
    if args.stop_after == "prepare":
        return None
    study.run_lanes()
    study.record_invocation()
    return study


def record(study: Study | None, args) -> None:
    """The analysis: ``results.json``, ``results.md`` and the figures in the work folder."""
    if study is None:
        return
    with study.stages("analysis"):
        analyse(args.work, args, study.d, study.state)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("nnUNet_compile", "0")
    if args.arm:
        return run_arm(args)
    record(run(args), args)
    return 0


ARM_ORDER = [(i, f) for f in (0.1, 1.0) for i in INITS]
N_BOOT = 2000


def _fmt_ci(m: float, lo: float, hi: float, digits: int = 3) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "n/a"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _per_scan_values(arms: list[dict], key: str, which) -> tuple[list[str], np.ndarray]:
    """scans x seeds matrix of ``which(scores of one scan)`` for one arm's seeds (sorted by seed)."""
    import numpy as np

    scans = sorted(arms[0]["scores"][key])
    mat = np.array([[which(a["scores"][key][c]) for a in arms] for c in scans], dtype=float)
    return scans, mat


def _structure_value(label):
    import numpy as np

    if label == "mean of 6":
        return lambda sc: float(np.nanmean([sc[str(k)] if sc[str(k)] is not None else np.nan for k in STRUCTURES]))
    if label == "mean of bones":
        return lambda sc: float(np.nanmean([sc[str(k)] if sc[str(k)] is not None else np.nan for k in BONES]))
    return lambda sc: float("nan") if sc[str(label)] is None else float(sc[str(label)])


ROWS = [(k, v) for k, v in STRUCTURES.items()] + [("mean of bones", "mean of bones (femur, tibia, patella)"),
                                                   ("mean of 6", "**mean of 6**")]


def load_arm_results(work: Path) -> dict[tuple[str, float], list[dict]]:
    """(init, fraction) -> the arms' ``result.json`` found in the work folder, sorted by seed."""
    results: dict[tuple[str, float], list[dict]] = {}
    for f in sorted((work / "arms").glob("*/result.json")):
        r = json.loads(f.read_text())
        results.setdefault((r["init"], float(r["fraction"])), []).append(r)
    for v in results.values():
        v.sort(key=lambda r: r["seed"])
    return results


def paired_seeds(a: list[dict], b: list[dict]) -> tuple[list[dict], list[dict]]:
    """The arms of ``a`` and ``b`` (sorted by seed) restricted to the seeds both have: a paired difference
    compares one seed of one init with the same seed (same subset, same decoder start) of the other."""
    common = {r["seed"] for r in a} & {r["seed"] for r in b}
    return [r for r in a if r["seed"] in common], [r for r in b if r["seed"] in common]


def test_site_tables(key: str, complete: dict, cmap: dict, out: dict) -> tuple[dict, dict, dict]:
    """Per arm on one test site: pooled Dice per structure with knee-bootstrap CIs, the paired difference to
    scratch, each seed's mean (also sets ``out``'s scan and knee counts)."""
    import numpy as np

    from orthodiff_nnunet.evaluation.report import cluster_mean_ci

    table, diffs, per_seed = {}, {}, {}
    for (init, frac), arms in complete.items():
        name = f"{init} {frac:.0%}"
        scans, _ = _per_scan_values(arms, key, _structure_value(1))
        knees = [cmap[c]["knee"] for c in scans]
        table[name], per_seed[name] = {}, {}
        for label, _title in ROWS:
            _, mat = _per_scan_values(arms, key, _structure_value(label))
            m, lo, hi, n = cluster_mean_ci(np.nanmean(mat, axis=1), knees, N_BOOT, 0)
            table[name][str(label)] = [m, lo, hi, n]
            per_seed[name][str(label)] = [float(np.nanmean(mat[:, j])) for j in range(mat.shape[1])]
        pa, pb = paired_seeds(arms, complete.get(("scratch", frac), []))
        if init != "scratch" and pa:
            diffs[name] = {}
            for label, _title in ROWS:
                _, a = _per_scan_values(pa, key, _structure_value(label))
                _, b = _per_scan_values(pb, key, _structure_value(label))
                m, lo, hi, n = cluster_mean_ci(np.nanmean(a - b, axis=1), knees, N_BOOT, 0)
                diffs[name][str(label)] = [m, lo, hi, n]
        out["n_scans_" + key] = len(scans)
        out["n_knees_" + key] = len(set(knees))
    return table, diffs, per_seed


def goals_of(key: str, complete: dict, diffs: dict, cmap: dict) -> dict:
    """With 10 % labels: pretrained >= scratch + 0.02 (CI excluding 0) and >= 95 % of its own 100 %."""
    import numpy as np

    from orthodiff_nnunet.evaluation.classification import bootstrap_ci

    goals = {}
    for init in ("diffusion", "mae"):
        pa, pb = paired_seeds(complete.get((init, 0.1), []), complete.get(("scratch", 0.1), []))
        if not pa:
            continue
        diff = diffs[f"{init} 10%"]["mean of 6"]
        scans, a10 = _per_scan_values(pa, key, _structure_value("mean of 6"))
        _, s10 = _per_scan_values(pb, key, _structure_value("mean of 6"))
        goal = {"difference_to_scratch": diff, "goal1_met": bool(diff[0] >= 0.02 and diff[1] > 0),
                "difference_ci_knees_and_seeds": list(knee_and_seed_ci(a10 - s10, [cmap[c]["knee"] for c in scans],
                                                                       N_BOOT, 0))}
        if (init, 1.0) in complete:
            scans, m100 = _per_scan_values(complete[(init, 1.0)], key, _structure_value("mean of 6"))
            _, own10 = _per_scan_values(complete[(init, 0.1)], key, _structure_value("mean of 6"))
            a, b = np.nanmean(own10, axis=1), np.nanmean(m100, axis=1)
            ratio = float(np.mean(a) / np.mean(b))
            lo, hi, _ = bootstrap_ci(lambda idx: float(np.mean(a[idx]) / np.mean(b[idx])), len(a), N_BOOT, 0,
                                     clusters=[cmap[c]["knee"] for c in scans])
            goal.update({"ratio_10_to_100": [ratio, lo, hi], "goal2_met": bool(ratio >= 0.95)})
        goals[f"{key} {init}"] = goal
    return goals


def knee_and_seed_ci(values: "np.ndarray", knees: list[str], n_boot: int, seed: int,
                     alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of the mean of a scans x seeds matrix when both the knees and the seeds are
    resampled: each draw takes knees with replacement (all their scans) and, independently, seed columns
    with replacement (a paired difference keeps its pairs: one column is one seed of both arms). The knee
    bootstrap alone holds the seeds fixed, and so leaves out how much another seed would change the result."""
    import numpy as np

    from orthodiff_nnunet.evaluation.classification import cluster_members, resample_clusters

    rng = np.random.default_rng(seed)
    members = cluster_members(knees, values.shape[0])
    boot = np.empty(int(n_boot))
    for b in range(int(n_boot)):
        rows = resample_clusters(rng, members)
        cols = rng.integers(0, values.shape[1], values.shape[1])
        boot[b] = np.nanmean(values[np.ix_(rows, cols)])
    lo, hi = np.nanpercentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def learning_curves(results: dict) -> dict:
    """Per arm: pseudo-Dice on the validation knees per epoch, training loss, times, iterations."""
    import numpy as np

    curves = {}
    for (init, frac), arms in results.items():
        ema = np.array([a["logs"]["ema_fg_dice"] for a in arms], dtype=float)
        mean_fg = np.array([a["logs"]["mean_fg_dice"] for a in arms], dtype=float)
        tl = np.array([a["logs"]["train_losses"] for a in arms], dtype=float)
        first = [float(x) for x in mean_fg[:, :5].mean(axis=0)]
        reach = [next((e for e, v in enumerate(row) if v >= 0.8), None) for row in ema]
        curves[f"{init} {frac:.0%}"] = {
            "pseudo_dice_first_5_epochs": first, "pseudo_dice_final_ema": [float(x) for x in ema[:, -1]],
            "pseudo_dice_last5_mean": float(mean_fg[:, -5:].mean()), "epoch_ema_reaches_0.8": reach,
            "train_loss_first": float(tl[:, 0].mean()), "train_loss_final": float(tl[:, -1].mean()),
            "train_seconds": [_train_wall(a) for a in arms],
            "train_cpu_seconds": [a["seconds"]["train_cpu"] for a in arms],
            "iterations": (arms[0]["schedule"] or {}).get("num_epochs", 0)
                          * (arms[0]["schedule"] or {}).get("num_iterations_per_epoch", 0),
            "training_cases": [len(a["training_cases"]) for a in arms]}
    return curves


def pretraining_summary(work: Path, cmap: dict, d: dict) -> dict:
    """Per objective, from its run record: iterations, scans, knees, test knees seen (must be 0), losses."""
    pre = {}
    for obj in ("diffusion", "mae"):
        recs = list((work / "results_pretrain" / obj).glob(f"*/*/fold_{PRETRAIN_FOLD}/{PRETRAIN_RUN_RECORD}"))
        if recs:
            r = json.loads(recs[0].read_text())
            seen = r.get("train_cases", []) + r.get("held_out_cases", [])
            pre[obj] = {"iterations": r.get("iterations_done"), "train_scans": len(r.get("train_cases", [])),
                        "held_out_scans": len(r.get("held_out_cases", [])),
                        "knees": len({cmap[c]["knee"] for c in seen}),
                        "test_knees_seen": len({cmap[c]["knee"] for c in seen if cmap[c]["knee"] in set(d["test"])}),
                        "train_losses": r.get("train_losses"), "val_losses": r.get("val_losses")}
    return pre


def analyse(work: Path, args, d: dict, state: dict) -> None:
    """Tables (pooled Dice with patient-bootstrap CIs, paired differences, per-seed means), figures, goals."""
    cmap = case_map(work)
    results = load_arm_results(work)
    out: dict = {"note": NOTE, "command": command_line(), "machine": machine(_device(args)),
                 "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="minutes"),
                 "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                 "design": {"test_knees": len(d["test"]), "val_knees": len(d["val"]), "pool_knees": len(d["pool"]),
                            "subset_10_knees": d["subset_10"], "split_seed": d["split_seed"]},
                 "state": state, "arms_found": {f"{i} {f:g}": len(v) for (i, f), v in results.items()},
                 "seeds": {f"{i} {f:.0%}": [a["seed"] for a in v] for (i, f), v in results.items()},
                 "tables": {}, "differences": {}, "per_seed": {}, "goals": {}, "curves": {}}
    for key in ("internal", "external"):
        # every arm with at least one finished seed (each table names its seeds); paired differences use the
        # seeds both arms have
        table, diffs, per_seed = test_site_tables(key, results, cmap, out)
        out["tables"][key], out["differences"][key], out["per_seed"][key] = table, diffs, per_seed
        out["goals"].update(goals_of(key, results, diffs, cmap))
    out["curves"] = learning_curves(results)
    out["pretraining"] = pre = pretraining_summary(work, cmap, d)
    out["arm_cpu_seconds"] = sum(a["seconds"]["train_cpu"] + a["seconds"]["predict_cpu"]
                                 for v in results.values() for a in v)
    out["figures"] = [str(f) for f in make_figures(work, results, pre)]
    write_json(work / "results.json", out)
    md = markdown(out, args)
    (work / "results.md").write_text(md)
    print(md, flush=True)


def _train_wall(arm: dict) -> float:
    """Training wall time from nnU-Net's epoch timestamps in the final checkpoint (first start to last end)."""
    try:
        import torch

        log = torch.load(Path(arm["model"]) / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
        return float(log["epoch_end_timestamps"][-1] - log["epoch_start_timestamps"][0])
    except Exception:  # noqa: BLE001  (a figure for the table only)
        return float(arm["seconds"]["train_wall"])


def _device(args):
    from orthodiff_nnunet.conventions import resolve_device

    return resolve_device(args.device)


def make_figures(work: Path, results: dict, pre: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figs = []
    colors = {"scratch": "tab:gray", "diffusion": "tab:blue", "mae": "tab:orange"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for col, frac in enumerate((0.1, 1.0)):
        for init in INITS:
            arms = results.get((init, frac))
            if not arms:
                continue
            for row, key in enumerate(("mean_fg_dice", "train_losses")):
                vals = np.array([a["logs"][key] for a in arms], dtype=float)
                ax = axes[row, col]
                for v in vals:
                    ax.plot(v, color=colors[init], alpha=0.25, lw=0.8)
                ax.plot(vals.mean(axis=0), color=colors[init], lw=2, label=f"{init} (mean of {len(arms)} seeds)")
        axes[0, col].set_title(f"{frac:.0%} labels: nnU-Net pseudo-Dice (mean of structures), validation knees",
                                fontsize=9)
        axes[1, col].set_title(f"{frac:.0%} of the labels: training loss")
        axes[1, col].set_xlabel("epoch")
        axes[0, col].set_ylim(0, 1)
        axes[0, col].legend(fontsize=8)
        axes[0, col].grid(alpha=0.3)
        axes[1, col].grid(alpha=0.3)
    fig.suptitle("Segmentation learning curves (images rendered from real OAI label maps)", fontsize=11)
    fig.tight_layout()
    p = work / "figures" / "label_efficiency_curves.png"
    p.parent.mkdir(exist_ok=True)
    fig.savefig(p, dpi=90)
    plt.close(fig)
    figs.append(p)
    if pre:
        fig, ax = plt.subplots(1, len(pre), figsize=(5.5 * len(pre), 3.6), squeeze=False)
        for a, (obj, r) in zip(ax[0], pre.items()):
            tl, vl = r.get("train_losses") or [], r.get("val_losses") or []
            a.plot(np.arange(1, len(tl) + 1), tl, "o-", label="train (mean per checkpoint interval)")
            a.plot(np.arange(1, len(vl) + 1), vl, "s-", label="held-out scans, EMA weights")
            a.set_title(f"{obj} pretraining loss ({r.get('iterations')} iterations)")
            a.set_xlabel("checkpoint interval")
            a.legend(fontsize=8)
            a.grid(alpha=0.3)
        fig.tight_layout()
        p = work / "figures" / "label_efficiency_pretraining.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        figs.append(p)
    return figs


def _markdown_test_site(r: dict, key: str, title: str) -> list[str]:
    """One test site: Dice per structure and arm, the paired differences to scratch, per-seed means."""
    table = r["tables"].get(key, {})
    if not table:
        return []
    names = [f"{i} {f:.0%}" for i, f in ARM_ORDER if f"{i} {f:.0%}" in table]
    L = ["", f"#### {title}: Dice, mean [95 % CI] over {r.get('n_knees_' + key)} knees / "
             f"{r.get('n_scans_' + key)} scans", "",
         "| structure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, rowname in ROWS:
        L.append(f"| {rowname} | " + " | ".join(_fmt_ci(*table[n][str(label)][:3]) for n in names) + " |")
    diffs = r["differences"].get(key, {})
    if diffs:
        dn = [n for n in names if n in diffs]
        L += ["", f"Paired difference to scratch (same scan, seed and fraction; mean over seeds per scan, "
                  f"knee bootstrap), {key} test:", "",
              "| structure | " + " | ".join(f"{n} − scratch" for n in dn) + " |", "|---|" + "---|" * len(dn)]
        for label, rowname in ROWS:
            L.append(f"| {rowname} | " + " | ".join(_fmt_ci(*diffs[n][str(label)][:3]) for n in dn) + " |")
    ps = r["per_seed"].get(key, {})
    seeds = r.get("seeds", {})
    L += ["", f"Per-seed mean of 6 ({key} test): "
          + "; ".join(f"{n} (seeds {', '.join(map(str, seeds.get(n, [])))}) "
                      + " / ".join(f"{v:.3f}" for v in ps[n]["mean of 6"]) for n in names)]
    return L


def _markdown_goals_and_curves(r: dict) -> list[str]:
    """The goals table and the learning-curve table (each when there is something to show)."""
    L = []
    if r["goals"]:
        L += ["", "#### Goals (primary endpoint: mean Dice of the 6 structures)", "",
              "| test site, init | 10 %: pretrained − scratch [knee CI] | CI over knees and seeds | "
              "goal 1 (≥ +0.02, knee CI > 0) | 10 % / 100 % [CI] | goal 2 (≥ 0.95) |", "|---|---|---|---|---|---|"]
        for k, g in r["goals"].items():
            ratio = g.get("ratio_10_to_100")
            ks = g.get("difference_ci_knees_and_seeds")
            L.append(f"| {k} | {_fmt_ci(*g['difference_to_scratch'][:3])} | "
                     + (f"[{ks[0]:.3f}, {ks[1]:.3f}]" if ks else "n/a") + f" | {'met' if g['goal1_met'] else 'NOT met'} | "
                     + (_fmt_ci(*ratio) if ratio else "n/a") + " | "
                     + ("n/a" if ratio is None else ("met" if g["goal2_met"] else "NOT met")) + " |")
    if r["curves"]:
        L += ["", "#### Learning curves (nnU-Net pseudo-Dice on the validation knees; mean of seeds)", "",
              "| arm | training scans | iterations | pseudo-Dice epochs 1-5 | final EMA pseudo-Dice (per seed) | "
              "epoch EMA ≥ 0.8 (per seed) | train loss first → last | train wall s (per seed) |",
              "|---|---|---|---|---|---|---|---|"]
        for i, f in ARM_ORDER:
            c = r["curves"].get(f"{i} {f:.0%}")
            if not c:
                continue
            L.append(f"| {i} {f:.0%} | {'/'.join(map(str, c['training_cases']))} | {c['iterations']} | "
                     + ", ".join(f"{x:.2f}" for x in c["pseudo_dice_first_5_epochs"]) + " | "
                     + " / ".join(f"{x:.3f}" for x in c["pseudo_dice_final_ema"]) + " | "
                     + " / ".join(str(x) for x in c["epoch_ema_reaches_0.8"]) + " | "
                     + f"{c['train_loss_first']:.3f} → {c['train_loss_final']:.3f} | "
                     + " / ".join(f"{x:.0f}" for x in c["train_seconds"]) + " |")
    return L


def markdown(r: dict, args) -> str:
    """``results.md``: design, per test site the tables, goals, curves, pretraining, command, machine, times."""
    st, de = r["state"], r["design"]
    L = [f"**{NOTE[0].upper() + NOTE[1:]}.** Dice on held-out knees; 95 % intervals: percentile bootstrap "
         f"({N_BOOT} resamples) over test KNEES (both time points of a knee drawn together); the seeds of an arm "
         "pooled as the mean over seeds per scan before resampling. Prediction without mirroring (for time).", "",
         f"Design: {de['test_knees']} test knees ({r.get('n_scans_internal', '?')} scans), {de['val_knees']} "
         f"validation knees (learning curves only), {de['pool_knees']} pool knees. 10 % = "
         f"{len(next(iter(de['subset_10_knees'].values())))} whole knees per seed (subset drawn per seed). "
         "Arms (init x label fraction) and their seeds: "
         + "; ".join(f"{n} {', '.join(map(str, v))}" for n, v in r.get("seeds", {}).items()) + "."]
    for key, title in (("internal", "Internal test site (SiteA 3 T, the labeled site)"),
                       ("external", "External test site (1.5 T, other vendor/contrast/noise/bias/thickness; "
                                    "not in the pretraining corpus)")):
        L += _markdown_test_site(r, key, title)
    L += _markdown_goals_and_curves(r)
    if r.get("pretraining"):
        L += ["", "Pretraining (each objective once, same corpus, network and iterations; not per seed):"]
        for obj, p in r["pretraining"].items():
            tl, vl = p.get("train_losses") or [], p.get("val_losses") or []
            L.append(f"- {obj}: {p['iterations']} iterations on {p['train_scans']} scans of {p['knees']} knees "
                     f"({p['held_out_scans']} held out for the validation loss); test knees seen: "
                     f"{p['test_knees_seen']}; train loss " + " → ".join(f"{x:.3f}" for x in tl[:1] + tl[-1:])
                     + "; validation loss " + " → ".join(f"{x:.3f}" for x in vl[:1] + vl[-1:]))
    L += ["", f"Command: `{r['command']}`", f"Machine: {r['machine']}; date {r['date_utc']}; load average at the end "
          + ", ".join(str(x) for x in r["load_average_at_end"]) + " (shared machine).",
          "Stage times (wall s / CPU s): " + "; ".join(f"{k} {st['stage_wall'][k]:.0f} / {st['stage_cpu'].get(k, 0):.0f}"
                                                       for k in st.get("stage_wall", {})),
          f"Arms and pretrainings ran in {args.lanes}+ lanes side by side, so stage wall times overlap; "
          f"CPU time of the arms (training + prediction, from each arm's own process): "
          f"{r.get('arm_cpu_seconds', 0) / 60:.0f} CPU-min."]
    return "\n".join(L) + "\n"

if __name__ == "__main__":
    sys.exit(main())
