"""Label efficiency: nnU-Net from scratch vs diffusion-initialised, at 10% and 100% of the training labels.

Images *rendered from real label maps*: the 68 expert OAI bone/cartilage label maps of
``../shared/data/labelmaps/oai_bone_cartilage`` (44 knees; 24 of them with two time points) are
remapped onto the 11 knee structures (``oai_zib``: femur, tibia, patella, femoral, tibial and patellar
cartilage; no fibula, menisci or ligaments in these maps) and rendered as sagittal 2D-style series of
one 3 T site (``orthodiff_nnunet.data.render.write_rendered_site``, small in-plane size). The anatomy
and the ground truth are real; the images are synthetic.

Protocol (all splits by patient, so both time points of a knee stay together; seeded):

1. ``--test-patients`` knees are held out: rendered into their own external dataset, never
   converted into the training dataset, never seen by pretraining or training; they are only
   predicted and scored.
2. ``--labeled-patients`` knees form the labeled training pool; the remaining knees are converted
   *without* label maps (unlabeled: used by pretraining, skipped by segmentation training).
3. ``orthodiff plan_and_preprocess`` plans the training dataset (ResEnc-M), and a tiny network is
   derived from the plans (``write_shrunk_plans``: 4 stages of 16 features, one residual block each,
   batch 2) with smaller patches (``--patch``, ``--pretrain-patch``) so that the study fits a 2-core CPU.
4. ``orthodiff pretrain`` trains the diffusion model on every training-dataset scan (labeled pool and
   unlabeled knees; fold ``all``), exporting the EMA encoder.
5. ``orthodiff train seg`` trains four models on fold ``all`` with the same plans, iterations, schedule
   and seed: init scratch / diffusion x label fraction 10% / 100% of the labeled pool (10% = the
   site-stratified, seeded subset of ``label_fraction_subset``).
6. ``orthodiff predict seg`` segments the held-out images (no mirroring, for time) and nnU-Net's
   ``compute_metrics_on_folder`` scores them: Dice per structure, mean and sd over the held-out cases.

Usage (the recorded run: 37 CPU-minutes after rendering, about 25 minutes on an idle 2-core machine plus 3
for rendering, conversion and planning; 56 minutes on the shared machine it was recorded on)::

    OMP_NUM_THREADS=2 python bench/label_efficiency.py --work /tmp/orthodiff_label_efficiency

Every stage reuses what the work folder already holds (delete it to start over). Writes
``results.json`` and ``results.md`` into the work folder and prints the Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

from common import REPO, command_line, machine

from orthodiff_nnunet.pretraining import resolve_device

TRAIN_ID, TEST_ID = 601, 611
TRAIN_NAME, TEST_NAME = "OAIRender", "OAIRenderTest"
STRUCTURES = {1: "femur", 2: "tibia", 3: "patella", 5: "femoral cartilage", 6: "tibial cartilage",
              7: "patellar cartilage"}  # what the OAI maps hold after remapping


def shared_labelmaps() -> Path:
    env = os.environ.get("ORTHODIFF_SHARED_DATA")
    base = Path(env) if env else REPO.parent / "shared" / "data"
    folder = base / "labelmaps" / "oai_bone_cartilage"
    if not folder.is_dir():
        raise SystemExit(f"{folder} is absent: this study needs the real OAI label maps (../shared/data or "
                         "$ORTHODIFF_SHARED_DATA)")
    return folder


def patient_of(path: Path) -> str:
    return path.name.split("_")[0]


def split_patients(maps: list[Path], n_test: int, n_labeled: int, seed: int) -> dict[str, list[Path]]:
    import numpy as np

    patients = sorted({patient_of(p) for p in maps})
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    groups = {"test": order[:n_test], "labeled": order[n_test:n_test + n_labeled],
              "unlabeled": order[n_test + n_labeled:]}
    return {k: sorted(p for p in maps if patient_of(p) in set(v)) for k, v in groups.items()}


class Timer:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.start = time.perf_counter()
                print(f"[label-efficiency] {name} ...", flush=True)

            def __exit__(self, *exc):
                timer.stages[name] = timer.stages.get(name, 0.0) + time.perf_counter() - self.start
                print(f"[label-efficiency] {name}: {timer.stages[name]:.0f} s", flush=True)

        return _Stage()


def render_and_convert(work: Path, split: dict[str, list[Path]], size: int, seed: int) -> None:
    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.data.render import write_rendered_site
    from orthodiff_nnunet.data.sites import SITE_3T

    raw = work / "raw"
    if not list(raw.glob(f"Dataset{TRAIN_ID}_*")):
        train_maps = split["labeled"] + split["unlabeled"]
        manifest = write_rendered_site(train_maps, work / "site_train", SITE_3T, seed=seed, remap="oai_zib",
                                       orientations=("sag",), max_in_plane_size=size)
        rows = list(csv.DictReader(open(manifest, newline="", encoding="utf-8")))
        n_labeled = len(split["labeled"])
        for row in rows:  # RENDER-0001.. follow train_maps' order: the unlabeled knees lose their label maps
            if int(row["case_id"].split("-")[1]) > n_labeled:
                row["label"] = ""
        with open(manifest, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        convert(manifest, TRAIN_ID, TRAIN_NAME, raw=raw, num_processes=2)
    if not list(raw.glob(f"Dataset{TEST_ID}_*")):
        manifest = write_rendered_site(split["test"], work / "site_test", SITE_3T, seed=seed + 1, remap="oai_zib",
                                       orientations=("sag",), max_in_plane_size=size)
        convert(manifest, TEST_ID, TEST_NAME, raw=raw, external=True, num_processes=2)


def plan(work: Path, features: int, stages: int, patch: list[int], pretrain_patch: list[int]) -> tuple[str, str]:
    """Plan with orthodiff's ResEnc-M planner, then a tiny copy of the plans (network and patch) for the CPU."""
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.planning import plan_and_preprocess
    from orthodiff_nnunet.utils import atomic_write_json, load_json

    saved = os.environ.pop("nnUNet_n_proc_DA", None)  # nnUNet_n_proc_DA=0 breaks planning
    try:
        result = plan_and_preprocess([TRAIN_ID], num_processes=2, show_progress=False)
    finally:
        if saved is not None:
            os.environ["nnUNet_n_proc_DA"] = saved
    d = result.datasets[0]
    folder = work / "preprocessed" / d.dataset_name
    tiny = write_shrunk_plans(folder, d.plans_identifier, "labelEffTinyPlans", max_features=features, max_stages=stages)
    plans = load_json(folder / f"{tiny}.json")
    plans["configurations"]["3d_fullres"]["patch_size"] = list(patch)
    plans["configurations"]["3d_diffusion"]["patch_size"] = list(pretrain_patch)
    atomic_write_json(folder / f"{tiny}.json", plans)
    return d.dataset_name, tiny


def evaluate(reference: Path, predictions: Path) -> dict:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    compute_metrics_on_folder(str(reference), str(predictions), str(predictions / "summary.json"),
                              SimpleITKIO(), ".nii.gz", sorted(STRUCTURES), num_processes=1)
    return json.loads((predictions / "summary.json").read_text())


def dice_table(metrics: dict) -> dict[str, tuple[float, float]]:
    import numpy as np

    out = {}
    for label, name in STRUCTURES.items():
        values = [c["metrics"][str(label)]["Dice"] for c in metrics["metric_per_case"]]
        values = np.array([v for v in values if v == v], dtype=float)  # NaN: structure absent in both
        out[name] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    per_case_mean = [np.nanmean([c["metrics"][k]["Dice"] for k in c["metrics"]]) for c in metrics["metric_per_case"]]
    out["mean of 6"] = (float(np.mean(per_case_mean)), float(np.std(per_case_mean, ddof=1)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/orthodiff_label_efficiency"))
    ap.add_argument("--size", type=int, default=64, help="in-plane size cap of the rendered series (default 64)")
    ap.add_argument("--test-patients", type=int, default=8, help="held-out knees (default 8)")
    ap.add_argument("--labeled-patients", type=int, default=14, help="labeled training knees (default 14)")
    ap.add_argument("--features", type=int, default=16, help="tiny network: max features per stage (default 16)")
    ap.add_argument("--stages", type=int, default=4, help="tiny network: stages (default 4)")
    ap.add_argument("--patch", type=int, nargs=3, default=[16, 48, 48],
                    help="segmentation patch, through-plane first (default 16 48 48; planned: 48 64 64)")
    ap.add_argument("--pretrain-patch", type=int, nargs=3, default=[16, 48, 48],
                    help="diffusion patch (default 16 48 48; planned: 24 64 64)")
    ap.add_argument("--pretrain-iterations", type=int, default=600, help="diffusion iterations (default 600)")
    ap.add_argument("--pretrain-lr", type=float, default=1e-3, help="diffusion AdamW learning rate (default 1e-3)")
    ap.add_argument("--ema-decay", type=float, default=0.98, help="EMA decay for the short pretraining (default 0.98)")
    ap.add_argument("--epochs", type=int, default=15, help="segmentation epochs (default 15)")
    ap.add_argument("--iterations-per-epoch", type=int, default=20, help="segmentation iterations/epoch (default 20)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0], help="label fractions (default 0.1 1)")
    ap.add_argument("--seed", type=int, default=0, help="patient split, rendering and torch seed (default 0)")
    ap.add_argument("--prepare-only", action="store_true", help="render, convert and plan, then stop")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = ap.parse_args(argv)

    work = args.work.resolve()
    from orthodiff_nnunet.paths import set_nnunet_paths

    set_nnunet_paths(raw=work / "raw", preprocessed=work / "preprocessed", results=work / "results")
    os.environ.setdefault("nnUNet_compile", "0")
    timer = Timer()
    maps = sorted(shared_labelmaps().glob("OAI_*/*.nii.gz"))
    split = split_patients(maps, args.test_patients, args.labeled_patients, args.seed)
    with timer("render + convert"):
        render_and_convert(work, split, args.size, args.seed)
    with timer("plan + preprocess"):
        dataset, plans = plan(work, args.features, args.stages, args.patch, args.pretrain_patch)
    if args.prepare_only:
        return 0
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process: no spare cores for workers

    import torch

    from orthodiff_nnunet.pretraining import pretrain
    from orthodiff_nnunet.segmentation import model_folder, predict_segmentation, train_segmentation
    from orthodiff_nnunet.trainers.segmentation import default_encoder_path

    encoder = default_encoder_path(work / "results", dataset, plans)
    with timer("pretrain"):
        if not encoder.is_file():
            torch.manual_seed(args.seed)
            pretrain(dataset, plans=plans, iterations=args.pretrain_iterations,
                     checkpoint_every=max(1, args.pretrain_iterations // 4), learning_rate=args.pretrain_lr,
                     ema_decay=args.ema_decay, device=args.device, sample_steps=10)
    pre_prov = torch.load(encoder, map_location="cpu", weights_only=False)["provenance"]

    test_raw = next((work / "raw").glob(f"Dataset{TEST_ID}_*"))
    runs = []
    for fraction in args.fractions:
        for init in ("scratch", "diffusion"):
            key = f"{init}_{fraction:g}"
            model = model_folder(dataset, init, plans, label_fraction=fraction)
            with timer(f"train {key}"):
                if not (model / "fold_all" / "checkpoint_final.pth").is_file():  # else: reuse the trained model
                    torch.manual_seed(args.seed)
                    train_segmentation(dataset, fold="all", init=init, label_fraction=fraction, plans=plans,
                                       epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
                                       val_iterations_per_epoch=1, device=args.device, validate=False)
            record = json.loads((model / "fold_all" / "orthodiff_seg_run.json").read_text())
            pred = work / "predictions" / key
            with timer(f"predict {key}"):
                predict_segmentation(test_raw / "imagesTs", pred, model, device=args.device, mirroring=False,
                                     num_processes=0, show_progress=False)
            metrics = evaluate(test_raw / "labelsTs", pred)
            runs.append({"init": init, "label_fraction": fraction, "training_cases": record["training_cases"],
                         "model": str(model), "dice": dice_table(metrics),
                         "final_train_loss": _final_loss(model)})

    results = {
        "note": "images rendered from real label maps (OAI bone/cartilage expert segmentations); not real MR images",
        "command": command_line(),
        "machine": machine(resolve_device(args.device)),
        "split": {k: [p.name for p in v] for k, v in split.items()},
        "counts": {k: len(v) for k, v in split.items()},
        "plans": plans, "dataset": dataset,
        "pretraining": {k: pre_prov.get(k) for k in ("iterations", "scans", "weights", "ema_decay")},
        "segmentation_iterations": args.epochs * args.iterations_per_epoch,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "stage_seconds": timer.stages,
        "cpu_seconds": cpu_seconds(),
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
        "runs": runs,
    }
    (work / "results.json").write_text(json.dumps(results, indent=2))
    md = markdown(results)
    (work / "results.md").write_text(md)
    print(md)
    return 0


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system), all threads."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, 1)


def _final_loss(model: Path) -> float | None:
    import torch

    ckpt = torch.load(model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    losses = ckpt["logging"].get("train_losses") or []
    return float(losses[-1]) if losses else None


def markdown(results: dict) -> str:
    runs = results["runs"]
    names = list(STRUCTURES.values()) + ["mean of 6"]
    header = ["structure"] + [f"{r['init']} {r['label_fraction']:.0%} ({len(r['training_cases'])} cases)" for r in runs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n in names:
        lines.append("| " + " | ".join([n] + [f"{r['dice'][n][0]:.3f} ± {r['dice'][n][1]:.3f}" for r in runs]) + " |")
    c = results["counts"]
    lines += ["", f"Dice on {c['test']} held-out scans (mean ± sd over scans), images rendered from real label maps; "
              f"training pool {c['labeled']} labeled scans, {c['unlabeled']} unlabeled scans added for pretraining; "
              f"{results['segmentation_iterations']} segmentation iterations per model; pretraining "
              f"{results['pretraining']['iterations']} iterations on {results['pretraining']['scans']} scans.",
              f"Machine: {results['machine']}. Stage times (s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in results["stage_seconds"].items())
              + f"; CPU time {results['cpu_seconds']:.0f} s; load average at the end "
              + ", ".join(str(x) for x in results["load_average_at_end"]) + " (a shared machine).",
              f"Command: `{results['command']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
