"""CPU time per exam of ``orthodiff predict seg`` against ``nnUNetv2_predict``, and one real exam at default size.

Two parts (``--part``):

* ``paired``: a tiny model (the demo's network size: ``write_shrunk_plans`` with 16 features and
  4 stages, trained for 2 iterations with ``orthodiff train seg --init scratch``: speed, not accuracy)
  on procedural sagittal knee phantoms of a 3 T site. Both commands are run as the user runs them,
  each in its own process, on the same model folder and the same images, with the same settings
  (fold 0, ``checkpoint_final.pth``, CPU, step 0.5, 2 preprocessing and 2 export processes; with
  mirroring and, with ``--tta both``, without):

  - ``orthodiff predict seg -i IMAGES -o OUT -m MODEL -f 0 --device cpu -np 2 [--disable-tta]``
  - ``nnUNetv2_predict -i IMAGES -o OUT -d DATASET -tr nnUNetTrainerOrthoDiffSegScratch -p PLANS -c 3d_fullres
    -f 0 -chk checkpoint_final.pth -device cpu -npp 2 -nps 2 -step_size 0.5 [--disable_tta]``

  alternating which goes first (a b, b a, ...). Per run: wall clock and the CPU time (user + system)
  of the command and all its worker processes (``getrusage(RUSAGE_CHILDREN)``), divided by the
  number of exams; per pair the ratio ours / nnU-Net's. The masks of both commands are compared
  voxel by voxel. Process start-up (importing torch and nnunetv2) is included for both.

* ``real-knee``: what one real exam costs on a CPU at the **default plans size**: the pyKNEEr DESS
  knee of ``../shared/data/dicom`` (80 sagittal slices of 512 x 512, 0.3125 x 0.3125 x 1.5 mm) is
  converted by ``orthodiff convert``, planned by ``orthodiff plan_and_preprocess`` with the default
  ResEnc-M preset (``orthodiffResEncMPlans``, 8 GB target), and a model folder of that
  ``3d_fullres`` network is written by nnU-Net's own ``save_checkpoint`` right after
  ``initialize`` (random weights: the image has no labels to train on, and the time does not depend
  on the weights' values). The exam is preprocessed by nnU-Net's preprocessor, its sliding-window
  tiles are counted by nnU-Net's predictor, and one network pass on a real tile is timed (wall and
  CPU, after a warm-up pass); the exam's time is tiles x passes (8 with mirroring) x that. A whole
  ``predict seg`` at this size takes hours on 2 cores, too long to time end to end on a shared
  machine.

Usage::

    python -m bench.bench_predict_cpu --part paired --cases 3 --repeats 3 --tta both
    python -m bench.bench_predict_cpu --part real-knee --threads 2

Prints Markdown (table, machine, load, command); ``--out FILE`` appends it to FILE.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from orthodiff_nnunet.conventions import SEG_SCRATCH_TRAINER, SEGMENTATION_CONFIGURATION

PAIRED_ID = 571
REAL_ID = 581
TINY_PLANS = "benchPredictTinyPlans"
TRAINER = SEG_SCRATCH_TRAINER
CFG = SEGMENTATION_CONFIGURATION


def same_masks(a: Path, b: Path, ending: str = ".nii.gz") -> bool:
    import numpy as np
    import SimpleITK as sitk

    files = sorted(p.name for p in a.glob(f"*{ending}"))
    if not files or files != sorted(p.name for p in b.glob(f"*{ending}")):
        return False
    return all(np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(a / f))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(b / f)))) for f in files)


# ----------------------------------------------------------------------------------------------
# paired: ours vs nnUNetv2_predict
def tiny_model(work: Path, n_cases: int, in_plane_mm: float) -> tuple[str, Path, Path]:
    """Phantoms -> convert -> plan -> demo-size plans -> 2 training iterations; (dataset, model folder, images)."""
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.segmentation import train_segmentation

    name, plans_id = common.make_phantom_dataset(work, PAIRED_ID, "PredictBench", n_cases=n_cases, seed=11,
                                                 in_plane_mm=in_plane_mm)
    pre = work / "preprocessed" / name
    write_shrunk_plans(pre, plans_id, TINY_PLANS, max_features=16, max_stages=4)  # the demo's network size
    model = work / "results" / name / f"{TRAINER}__{TINY_PLANS}__{CFG}"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        saved = {k: os.environ.get(k) for k in ("nnUNet_n_proc_DA", "nnUNet_compile")}
        os.environ.update({"nnUNet_n_proc_DA": "0", "nnUNet_compile": "0"})  # in-process augmentation, no compile
        try:
            train_segmentation(name, fold=0, init="scratch", plans=TINY_PLANS, epochs=1, iterations_per_epoch=2,
                               val_iterations_per_epoch=1, device="cpu", validate=False)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return name, model, work / "raw" / name / "imagesTr"


def paired_commands(name: str, model: Path, images: Path, tta: str) -> tuple[list[str], list[str]]:
    """(ours, nnUNetv2_predict) for one mirroring setting, without ``-o``."""
    ours = [common.console_script("orthodiff"), "predict", "seg", "-i", str(images), "-m", str(model), "-f", "0",
            "--device", "cpu", "-np", "2"] + ([] if tta == "on" else ["--disable-tta"])
    theirs = [common.console_script("nnUNetv2_predict"), "-i", str(images), "-d", name, "-tr", TRAINER, "-p", TINY_PLANS,
              "-c", CFG, "-f", "0", "-chk", "checkpoint_final.pth", "-device", "cpu",
              "-npp", "2", "-nps", "2", "-step_size", "0.5"] + ([] if tta == "on" else ["--disable_tta"])
    return ours, theirs


def paired_setting(args: argparse.Namespace, work: Path, env: dict, cmds: tuple[list[str], list[str]], tta: str,
                   n: int) -> dict:
    """``--repeats`` alternating pairs of one mirroring setting: per-exam wall and CPU seconds, identical masks."""
    wall: dict[str, list[float]] = {"ours": [], "nnunet": []}
    cpu: dict[str, list[float]] = {"ours": [], "nnunet": []}
    identical = []
    for r in range(args.repeats):
        outs = {k: work / f"out_{tta}_{r}_{k}" for k in ("ours", "nnunet")}
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
        for key in (["ours", "nnunet"] if r % 2 == 0 else ["nnunet", "ours"]):
            cmd = (cmds[0] if key == "ours" else cmds[1]) + ["-o", str(outs[key])]
            w, c = common.run_timed(cmd, env, work / f"log_{tta}_{r}_{key}.txt")
            wall[key].append(w / n)
            cpu[key].append(c / n)
            print(f"  mirroring {tta}, repeat {r + 1}, {key}: {w / n:.1f} s wall, {c / n:.1f} s CPU per exam",
                  file=sys.stderr, flush=True)
        identical.append(same_masks(outs["ours"], outs["nnunet"]))
    return {"tta": tta, "wall": wall, "cpu": cpu, "identical": identical}


def paired(args: argparse.Namespace, work: Path) -> dict:
    """Both commands on the tiny model's phantoms, per mirroring setting (see the module docstring)."""
    import SimpleITK as sitk

    from orthodiff_nnunet.segmentation import trainers_folder

    name, model, images = tiny_model(work, args.cases, args.in_plane_mm)
    n = len(list(images.glob("*_0000.nii.gz")))
    env = dict(os.environ, nnUNet_extTrainer=str(trainers_folder()))
    settings, cmds = [], None
    for tta in (["on", "off"] if args.tta == "both" else [args.tta]):
        cmds = paired_commands(name, model, images, tta)
        settings.append(paired_setting(args, work, env, cmds, tta, n))
    return {"name": name, "n": n, "settings": settings, "commands": cmds,
            "size": sitk.ReadImage(str(sorted(images.glob("*_0000.nii.gz"))[0])).GetSize(),
            "cfg": json.loads((model / "plans.json").read_text())["configurations"][CFG]}


def paired_section(res: dict, args: argparse.Namespace) -> str:
    """The paired part's Markdown: data, model, the table of CPU and wall time per exam, machine, commands."""
    def ratios(v: dict[str, list[float]]) -> list[float]:
        return [a / b for a, b in zip(v["ours"], v["nnunet"])]

    rows, notes = [], []
    for st in res["settings"]:
        cpu, wall, identical = st["cpu"], st["wall"], st["identical"]
        rc, rw = ratios(cpu), ratios(wall)
        rows.append([st["tta"], f"{statistics.median(cpu['ours']):.1f}", f"{statistics.median(cpu['nnunet']):.1f}",
                     f"**{statistics.median(rc):.3f}** ({min(rc):.2f}-{max(rc):.2f})",
                     f"{statistics.median(wall['ours']):.1f}", f"{statistics.median(wall['nnunet']):.1f}",
                     f"{statistics.median(rw):.3f} ({min(rw):.2f}-{max(rw):.2f})",
                     f"{sum(identical)}/{len(identical)}"])
        notes.append(f"mirroring {st['tta']}: CPU-time ratio per pair " + ", ".join(f"{x:.3f}" for x in rc))
    table = common.markdown_table(
        ["mirroring", "ours CPU s/exam", "nnUNetv2_predict CPU s/exam", "CPU ratio ours/nnU-Net (range of pairs)",
         "ours wall s/exam", "nnUNetv2_predict wall s/exam", "wall ratio (range)", "identical masks"], rows)
    cfg, (ours_cmd, theirs_cmd) = res["cfg"], res["commands"]
    patch = "x".join(str(x) for x in cfg["patch_size"])
    arch = cfg["architecture"]["arch_kwargs"]
    return "\n".join([
        f"### {common.now()}: `orthodiff predict seg` vs `nnUNetv2_predict`, CPU time per exam (paired)", "",
        f"- data: {res['n']} procedural sagittal knee phantoms (3 T site, {args.in_plane_mm:g} mm pixels), image size "
        f"{' x '.join(map(str, res['size']))} voxels (x y z); dataset {res['name']}",
        f"- model: `{TRAINER}__{TINY_PLANS}__{CFG}` fold 0, the demo's network size "
        f"({arch['n_stages']} stages, features {arch['features_per_stage']}), patch {patch}, trained 2 iterations "
        "(speed, not accuracy)",
        f"- {args.repeats} paired repeats per setting, order alternating; CPU time = user + system of the command and "
        "its worker processes; start-up (imports) included for both", "",
        table, "", "; ".join(notes) + ".", "",
        f"Machine: {common.machine()}. Load average at the end: {common.load_average()}.",
        f"Commands timed: `{' '.join(['orthodiff'] + ours_cmd[1:])} -o OUT` and "
        f"`{' '.join(['nnUNetv2_predict'] + theirs_cmd[1:])} -o OUT` (last setting shown).",
        f"Command: `{common.command_line()}`",
    ])


# ----------------------------------------------------------------------------------------------
# real-knee: one real exam at the default plans size
def real_knee_model(shared: Path, work: Path) -> tuple[str, Path, Path]:
    """Convert the pyKNEEr DESS knee, plan with the default preset, write an initialised model folder."""
    import torch

    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.planning import plan_and_preprocess
    from orthodiff_nnunet.trainers.segmentation import nnUNetTrainerOrthoDiffSegScratch

    folders = common.use_work_folder(work)
    if not list(folders["raw"].glob(f"Dataset{REAL_ID}_*")):
        manifest = work / "real_knee_manifest.csv"
        with open(manifest, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case_id", "patient_id", "site", "field_strength", "vendor", "image"])
            w.writeheader()
            w.writerow({"case_id": "pyKNEEr-DESS", "patient_id": "pyKNEEr-01", "site": "pyKNEEr",
                        "field_strength": "3", "vendor": "GE",
                        "image": str(shared / "dicom" / "pykneer_dess_sag_3t" / "echo1")})
        convert(manifest, REAL_ID, "PredictRealKnee", raw=folders["raw"], num_processes=1)
    name = sorted(folders["raw"].glob(f"Dataset{REAL_ID}_*"))[0].name
    with common.with_planning_env():
        result = plan_and_preprocess([REAL_ID], num_processes=1, configurations=(CFG,), show_progress=False)
    plans_id = common.plans_identifier_of(result)
    plans, dataset_json = common.load_plans_and_dataset_json(name, plans_id)
    model = folders["results"] / name / f"{TRAINER}__{plans_id}__{CFG}"
    ckpt = model / "fold_0" / "checkpoint_final.pth"
    if ckpt.is_file() and torch.load(ckpt, map_location="cpu", weights_only=False).get(
            "inference_allowed_mirroring_axes") is None:
        ckpt.unlink()  # written by an earlier version of this script without the mirroring axes
    if not ckpt.is_file():
        os.environ.setdefault("nnUNet_compile", "0")
        trainer = common.make_trainer(nnUNetTrainerOrthoDiffSegScratch, plans, CFG, dataset_json,
                                      torch.device("cpu"), fold=0)
        (model / "fold_0").mkdir(parents=True, exist_ok=True)
        (model / "plans.json").write_text(json.dumps(plans, indent=2))
        (model / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        # nnU-Net sets the inference mirroring axes when training starts; a trained model's checkpoint has them
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        trainer.save_checkpoint(str(ckpt))
    return name, model, folders["raw"] / name / "imagesTr"


def tile_pass_seconds(net, x, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of ``repeats`` network passes on ``x``, after one warm-up pass."""
    import torch

    walls, cpus = [], []
    with torch.no_grad():
        for i in range(repeats + 1):  # the first pass warms up (allocation, oneDNN kernels)
            t, c = time.perf_counter(), time.process_time()
            net(x)
            if i:
                walls.append(time.perf_counter() - t)
                cpus.append(time.process_time() - c)
            print(f"  forward pass {i}: {time.perf_counter() - t:.1f} s wall, {time.process_time() - c:.1f} s CPU",
                  file=sys.stderr, flush=True)
    return walls, cpus


def real_knee(args: argparse.Namespace, work: Path) -> dict:
    """Per-tile network time at the default plans size and the exam's tile count (see the module docstring)."""
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from torch.utils.flop_counter import FlopCounterMode

    from orthodiff_nnunet.segmentation import _with_our_trainers

    shared = args.shared or common.shared_data() or common.REPO.parent / "shared" / "data"
    if not (shared / "dicom" / "pykneer_dess_sag_3t" / "echo1").is_dir():
        return {"skipped": f"real-knee part skipped: {shared}/dicom/pykneer_dess_sag_3t/echo1 is absent"}
    name, model, images = real_knee_model(shared, work)
    image_file = sorted(images.glob("*_0000.nii.gz"))[0]
    res = {"image": sitk.ReadImage(str(image_file)), "model": model, "load_start": common.load_average(),
           "cfg": json.loads((model / "plans.json").read_text())["configurations"][CFG]}
    torch.set_num_threads(args.threads)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    with _with_our_trainers():
        predictor.initialize_from_trained_model_folder(str(model), (0,), checkpoint_name="checkpoint_final.pth")
    res["axes"] = predictor.allowed_mirroring_axes or ()
    t0, c0 = time.perf_counter(), time.process_time()
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, _ = preprocessor.run_case([str(image_file)], None, predictor.plans_manager,
                                       predictor.configuration_manager, predictor.dataset_json)
    res["pre_wall"], res["pre_cpu"] = time.perf_counter() - t0, time.process_time() - c0
    res["data_shape"] = data.shape[1:]
    res["tiles"] = len(predictor._internal_get_sliding_window_slicers(data.shape[1:]))
    patch = res["patch"] = tuple(int(x) for x in res["cfg"]["patch_size"])
    net = predictor.network.eval()
    res["n_params"] = sum(p.numel() for p in net.parameters()) / 1e6
    x = torch.from_numpy(data[:, : patch[0], : patch[1], : patch[2]].copy())[None].float()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        copy.deepcopy(net).to("meta")(x.to("meta"))  # shapes only: counted without computing
    res["gflop"] = counter.get_total_flops() / 1e9
    res["walls"], res["cpus"] = tile_pass_seconds(net, x, args.tile_repeats)
    return res


def real_knee_section(res: dict, args: argparse.Namespace) -> str:
    """The real-knee part's Markdown: the exam, the plans, tiles and passes, the estimated exam time."""
    if "skipped" in res:
        return res["skipped"]
    image, cfg, patch, tiles, gflop = res["image"], res["cfg"], res["patch"], res["tiles"], res["gflop"]
    arch = cfg["architecture"]["arch_kwargs"]
    passes = 2 ** len(res["axes"])
    w, c = statistics.median(res["walls"]), statistics.median(res["cpus"])

    def hours(seconds: float) -> str:
        return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"

    rows = [[label, str(tiles * k), f"{tiles * k * gflop / 1000:.0f}", hours(tiles * k * c),
             f"**{hours(tiles * k * c / args.threads)}**", hours(tiles * k * w)]
            for label, k in (("off", 1), (f"on ({passes} passes per tile)", passes))]
    table = common.markdown_table(["mirroring", "network passes", "TFLOP", "CPU time (core-hours)",
                                   f"expected wall on a dedicated {args.threads}-core CPU (CPU time / "
                                   f"{args.threads})", "wall here (shared cores)"], rows)
    return "\n".join([
        f"### {common.now()}: one real knee exam at the default plans size on CPU (tile time x tiles)", "",
        f"- exam: pyKNEEr DESS echo 1 (real, GE 3 T, sagittal), converted by `orthodiff convert`: "
        f"{' x '.join(map(str, image.GetSize()))} voxels, {' x '.join(f'{s:g}' for s in image.GetSpacing())} mm; "
        f"preprocessed (nnU-Net's preprocessor) to {' x '.join(map(str, res['data_shape']))} in {res['pre_wall']:.0f} s",
        f"- plans: `orthodiff plan_and_preprocess` default preset ({res['model'].name.split('__')[1]}, ResEnc-M, 8 GB "
        f"target) of this knee: 3d_fullres spacing {' x '.join(f'{s:g}' for s in cfg['spacing'])} mm, patch "
        f"{' x '.join(map(str, patch))}, {arch['n_stages']} stages, features {arch['features_per_stage']}, "
        f"{res['n_params']:.1f} M parameters; {gflop:.0f} GFLOP per network pass (torch FlopCounterMode)",
        f"- sliding window (step 0.5): **{tiles} tiles**; mirroring on axes {', '.join(map(str, res['axes']))} = "
        f"{passes} passes per tile",
        f"- measured: one network pass on a real tile of this exam, {args.threads} torch thread(s), median of "
        f"{len(res['walls'])} after a warm-up: **{w:.0f} s wall, {c:.0f} s CPU** (weights: nnU-Net's initialisation "
        "saved by its own `save_checkpoint`; the time does not depend on their values)", "",
        table, "",
        f"Exam time = tiles x passes x the measured pass; preprocessing took {res['pre_wall']:.0f} s wall "
        f"({res['pre_cpu']:.0f} s CPU), resampling and export of the mask add about as much.",
        f"Machine: {common.machine()}. Load average at the start: {res['load_start']}; at the end: "
        f"{common.load_average()} (the 2 cores are shared with other jobs: wall times are upper bounds for a quiet "
        "machine; the CPU time is what a dedicated core would spend).",
        f"Command: `{common.command_line()}`",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["paired", "real-knee", "both"], default="paired")
    ap.add_argument("--cases", type=int, default=3, help="phantom exams (paired part, default 3)")
    ap.add_argument("--in-plane-mm", type=float, default=0.8, help="phantom pixel size (default 0.8 mm)")
    ap.add_argument("--repeats", type=int, default=3, help="paired repeats per setting (default 3)")
    ap.add_argument("--tta", choices=["on", "off", "both"], default="both", help="mirroring settings (default both)")
    ap.add_argument("--threads", type=int, default=2, help="real-knee part: torch threads (default 2)")
    ap.add_argument("--tile-repeats", type=int, default=2, help="real-knee part: timed network passes (default 2)")
    ap.add_argument("--shared", type=Path, default=None,
                    help="the shared data folder (default: $ORTHODIFF_SHARED_DATA, else ../shared/data)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="append the Markdown result to this file")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, dict]:
    """The parts asked for: part name -> what it measured."""
    work = (args.work or Path(tempfile.mkdtemp(prefix="orthodiff_predictbench_"))).resolve()
    parts = {}
    if args.part in ("paired", "both"):
        parts["paired"] = paired(args, work / "paired")
    if args.part in ("real-knee", "both"):
        parts["real-knee"] = real_knee(args, work / "real")
    return parts


def record(parts: dict[str, dict], args: argparse.Namespace) -> None:
    """Print each part's section; append them to ``--out`` when given."""
    sections = {"paired": paired_section, "real-knee": real_knee_section}
    text = "\n\n".join(sections[k](v, args) for k, v in parts.items())
    print(text)
    if args.out:
        common.append_markdown(args.out, text, title="# Prediction on CPU")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
