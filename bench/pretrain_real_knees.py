"""Diffusion (and masked-autoencoder) pretraining on the real unlabeled knees of ../shared/data, on CPU, with loss curves.

The corpus (all sagittal, no label maps):

* pyKNEEr's 3D DESS, echo 1 (GE 3 T, 80 slices of 512 x 512, 0.3125 x 0.3125 x 1.5 mm), DICOM;
* pymskt's multi-echo spin-echo T2 series (GE 3 T, 24 slices of 256 x 256, 0.625 mm, 4 mm
  slices, 8 echoes), DICOM with ``echo=all``: one case per echo (8 cases of one knee);
* the sagittal volumes of the 6 MRNet exams, converted by
  :func:`orthodiff_nnunet.dataset_conversion.mrnet.convert_mrnet` with a **user-supplied
  spacing** (default 0.6 x 0.6 x 3.0 mm in-plane x in-plane x slice). MRNet publishes no spacing:
  that value is an assumption of this script, not a property of the data.

``convert_mrnet`` writes MRNet's three planes as three datasets; the pretraining run needs one
dataset, so the sagittal MRNet images it wrote (canonical NIfTI carrying the assumed spacing)
and the two DICOM series go through one more ``orthodiff_nnunet.api.convert`` into one sagittal
corpus (15 cases). Every label map is background.

Planning: the orthodiff planner plans this all-background corpus directly (its fingerprint
extractor takes the intensity statistics from the nonzero image voxels when no case has
foreground; the plans record ``intensity_statistics: nonzero image``), with a small GPU memory
target (default 1 GB) so that the self-configured patch and batch are affordable on CPU, and the
network shrunk with ``write_shrunk_plans`` (default 16 features, 5 stages). Then
``orthodiff_nnunet.pretraining.pretrain`` runs for as many iterations as fit in ``--minutes``
(estimated from a few timed steps first), on CPU.

``--objective diffusion|mae|both`` picks the pretraining objective (``both``: the diffusion run, then
the masked-autoencoder control on the same converted and planned data, with the same iteration
count, learning rate and time limit, one after the other in this process).

Writes ``bench/results/pretraining_real_knees_loss.{csv,png}`` (diffusion) and
``bench/results/pretraining_real_knees_loss_mae.{csv,png}`` (MAE) (loss values only: no image
data) and appends a section per objective to ``bench/results/pretraining.md``. Nothing of ../shared/data is
copied into the repository; the converted and preprocessed data stay in ``--work`` (default: a
new folder under the system's temporary folder, kept so the run can be inspected).

Usage::

    python -m bench.pretrain_real_knees --minutes 18
    nice -n 10 python -m bench.pretrain_real_knees --objective both --iterations 40 --minutes 6
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import common
from orthodiff_nnunet.conventions import DIFFUSION_CONFIGURATION
from orthodiff_nnunet.utils import save_figure

DICOM_DATASET_ID = 751  # the combined sagittal corpus
MRNET_DATASET_ID = 744  # convert_mrnet: 744 sag, 745 cor, 746 ax
RESULTS = common.RESULTS


def convert_corpus(shared: Path, raw: Path, spacing: tuple[float, float, float], work: Path) -> tuple[Path, dict]:
    """The sagittal corpus (raw dataset folder) and how many cases came from where."""
    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.dataset_conversion.mrnet import convert_mrnet

    mrnet = convert_mrnet(shared / "mrnet", MRNET_DATASET_ID, "MRNet", spacing=spacing, raw=raw, split="train",
                          num_processes=min(2, common.usable_cores()), work_dir=work)
    mrnet_sag = mrnet.datasets["sag"]
    rows = [
        {"case_id": "pyKNEEr-DESS", "patient_id": "pyKNEEr-01", "site": "pyKNEEr", "field_strength": "3",
         "vendor": "GE", "image": str(shared / "dicom" / "pykneer_dess_sag_3t" / "echo1"), "orientation": "",
         "echo": ""},
        {"case_id": "pymskt-MESE", "patient_id": "pymskt-01", "site": "pymskt", "field_strength": "3",
         "vendor": "GE", "image": str(shared / "dicom" / "pymskt_mese_t2_sag_3t"), "orientation": "", "echo": "all"},
    ]
    mrnet_images = sorted((mrnet_sag / "imagesTr").glob("*_0000.nii.gz"))
    for img in mrnet_images:
        case = img.name[: -len("_0000.nii.gz")]  # already a pseudonym
        rows.append({"case_id": f"mrnet-{case}", "patient_id": f"mrnet-{case}", "site": "MRNet",
                     "field_strength": "3", "vendor": "GE", "image": str(img), "orientation": "sag", "echo": ""})
    manifest = work / "real_knees_manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    s = " x ".join(f"{v:g}" for v in spacing)
    result = convert(manifest, DICOM_DATASET_ID, "RealKnees", raw=raw, num_processes=min(2, common.usable_cores()),
                     spacing_source=f"image header (DICOM); user-supplied {s} mm, assumed (MRNet)",
                     allow_outside_site=True)  # the shared data and the MRNet staging lie outside work/
    if set(result.datasets) != {"sag"}:
        raise SystemExit(f"expected one sagittal dataset, got {sorted(result.datasets)}")
    counts = {"DESS": 1, "MESE echoes": result.num_cases["sag"] - 1 - len(mrnet_images), "MRNet sag": len(mrnet_images)}
    return result.datasets["sag"], counts


def time_per_iteration(dataset: str, plans_id: str, steps: int = 3, objective: str = "diffusion") -> float:
    """Seconds per training iteration (batch from the dataloader + train_step), measured on a throwaway trainer."""
    import torch

    from orthodiff_nnunet.trainers.diffusion_pretraining import nnUNetTrainerOrthoDiffPretrain
    from orthodiff_nnunet.trainers.mae_pretraining import nnUNetTrainerOrthoDiffMAE

    plans, dataset_json = common.load_plans_and_dataset_json(dataset, plans_id)
    cls = nnUNetTrainerOrthoDiffMAE if objective == "mae" else nnUNetTrainerOrthoDiffPretrain
    trainer = common.make_trainer(cls, plans, DIFFUSION_CONFIGURATION, dataset_json, torch.device("cpu"))
    dl, dl_val = trainer.get_dataloaders()
    trainer.train_step(next(dl))  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(dl))
    seconds = (time.perf_counter() - t0) / steps
    shutil.rmtree(trainer.output_folder, ignore_errors=True)  # the throwaway trainer's log only
    return seconds


class deadline_training:
    """Within this block, the pretraining trainer stops after the first checkpoint interval that ends
    later than ``seconds`` after training started (None: no limit).

    nnU-Net's ``run_training`` loops over a fixed range of epochs; this replaces it, for this
    process only, by the same loop with a time check after each epoch (``on_train_end`` still
    writes the final checkpoint, so the encoder export and the loss curve follow as usual). The
    learning-rate schedule keeps the planned length: a run cut short ends before the LR has decayed.
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds

    def __enter__(self):
        import torch

        from orthodiff_nnunet.trainers.diffusion_pretraining import nnUNetTrainerOrthoDiffPretrain as cls

        self.cls, self.original = cls, cls.run_training
        if self.seconds is None:
            return self
        limit = self.seconds

        def run_training(trainer):
            start = time.perf_counter()
            trainer.on_train_start()
            for _ in range(trainer.current_epoch, trainer.num_epochs):
                trainer.on_epoch_start()
                trainer.on_train_epoch_start()
                outputs = [trainer.train_step(next(trainer.dataloader_train))
                           for _ in range(trainer.num_iterations_per_epoch)]
                trainer.on_train_epoch_end(outputs)
                with torch.no_grad():
                    trainer.on_validation_epoch_start()
                    val = [trainer.validation_step(next(trainer.dataloader_val))
                           for _ in range(trainer.num_val_iterations_per_epoch)]
                    trainer.on_validation_epoch_end(val)
                trainer.on_epoch_end()
                if time.perf_counter() - start > limit:
                    trainer.print_to_log_file(f"time budget of {limit / 60:.1f} min reached: stopping")
                    break
            trainer.on_train_end()

        cls.run_training = run_training
        return self

    def __exit__(self, *exc):
        self.cls.run_training = self.original


def write_curve(checkpoint: Path, csv_path: Path, png_path: Path, title: str, every: int,
                ylabel: str = "epsilon MSE", val_label: str = "validation, EMA weights, fixed noise") -> list[dict]:
    """Loss values per checkpoint interval from the final checkpoint's log: CSV and a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    log = torch.load(checkpoint, map_location="cpu", weights_only=False)["logging"]
    start = log["epoch_start_timestamps"][0]
    rows = []
    for i, (tr, va, end) in enumerate(zip(log["train_losses"], log["val_losses"], log["epoch_end_timestamps"])):
        rows.append({"iteration": (i + 1) * every, "train_loss": float(tr), "val_loss_ema": float(va),
                     "elapsed_min": (end - start) / 60})
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({"iteration": r["iteration"], "train_loss": f"{r['train_loss']:.6f}",
                             "val_loss_ema": f"{r['val_loss_ema']:.6f}", "elapsed_min": f"{r['elapsed_min']:.2f}"})
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    its = [r["iteration"] for r in rows]
    ax.plot(its, [r["train_loss"] for r in rows], marker=".", label=f"train (mean of {every} iterations)")
    ax.plot(its, [r["val_loss_ema"] for r in rows], marker=".", label=val_label)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, png_path)
    return rows


@dataclass
class Corpus:
    """The converted and planned corpus every objective pretrains on."""

    dataset: str
    plans_id: str
    small: str  # the shrunk plans the runs use
    diff: dict  # their resolved 3d_diffusion configuration
    block: object  # the plans' orthodiff block
    counts: dict
    t_convert: float
    t_plan: float
    work: Path


def prepare_corpus(args: argparse.Namespace, shared: Path) -> Corpus:
    """Convert the real knees into one sagittal dataset, plan it, shrink the network (see the module docstring)."""
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.paths import preprocessed_dir
    from orthodiff_nnunet.planning import plan_and_preprocess
    from orthodiff_nnunet.plans import read_orthodiff_block, resolve_configuration

    work = args.work or Path(tempfile.mkdtemp(prefix="orthodiff_real_knees_"))
    folders = common.use_work_folder(work)
    t0 = time.perf_counter()
    raw_folder, counts = convert_corpus(shared, folders["raw"], tuple(args.mrnet_spacing), work)
    dataset = raw_folder.name
    t_convert = time.perf_counter() - t0
    with common.with_planning_env():
        planned = plan_and_preprocess([DICOM_DATASET_ID], num_processes=min(2, common.usable_cores()),
                                      gpu_memory_gb=args.gpu_memory_gb, show_progress=False)
    plans_id = common.plans_identifier_of(planned)
    t_plan = time.perf_counter() - t0 - t_convert
    print(planned.summary())
    small = write_shrunk_plans(preprocessed_dir() / dataset, plans_id, f"{plans_id}_cpu{args.features}f{args.stages}s",
                               max_features=args.features, max_stages=args.stages, max_batch_size=None)
    os.environ.update({"nnUNet_n_proc_DA": "0", "nnUNet_compile": "0"})
    plans, _ = common.load_plans_and_dataset_json(dataset, small)
    return Corpus(dataset, plans_id, small, resolve_configuration(plans, DIFFUSION_CONFIGURATION),
                  read_orthodiff_block(plans), counts, t_convert, t_plan, work)


def plan_iterations(objective: str, args: argparse.Namespace, c: Corpus) -> tuple[int, float | None, float]:
    """(iterations, measured seconds per iteration or None, deadline in seconds) of one run."""
    every = args.checkpoint_every
    if args.iterations:
        return args.iterations, None, args.minutes * 60
    # The shared cores make the speed swing by 10x within minutes (other jobs, OpenMP threads
    # waiting on each other), so the run is planned from a measurement with some headroom and
    # stopped at the deadline after a whole checkpoint interval (see deadline_training).
    est = time_per_iteration(c.dataset, c.small, steps=5, objective=objective)
    per_it = est * (1 + args.val_iterations / (3 * every))  # validation: forward passes, ~1/3 of a step each
    iterations = max(every, int(1.5 * args.minutes * 60 / per_it) // every * every)
    print(f"{est:.2f} s per training iteration -> planning {iterations} iterations, stopping after "
          f"{args.minutes:g} min")
    return iterations, est, args.minutes * 60


def run_objective(objective: str, args: argparse.Namespace, c: Corpus) -> dict:
    """One pretraining run of ``objective`` on the planned corpus; its loss curve files; what the section needs."""
    import torch

    from orthodiff_nnunet.pretraining import pretrain
    from orthodiff_nnunet.trainers.mae_pretraining import nnUNetTrainerOrthoDiffMAE

    iterations, est, deadline = plan_iterations(objective, args, c)
    torch.manual_seed(0)
    t_train = time.perf_counter()
    with deadline_training(deadline):
        result = pretrain(c.dataset, plans=c.small, iterations=iterations, checkpoint_every=args.checkpoint_every,
                          learning_rate=args.learning_rate, device="cpu", val_iterations=args.val_iterations,
                          sample_steps=10, objective=objective, mask_ratio=args.mask_ratio)
    minutes = (time.perf_counter() - t_train) / 60
    print(result.summary())
    r = {"objective": objective, "mae": objective == "mae", "iterations": iterations, "est": est,
         "minutes": minutes, "result": result, "mask_text": ""}
    if r["mae"]:
        mcfg = json.loads((result.output_folder / nnUNetTrainerOrthoDiffMAE.CONFIG_FILE).read_text())
        r["mask_text"] = f"{mcfg['mask_ratio']:g} of {' x '.join(map(str, mcfg['mask_block']))}-voxel blocks masked"
    stem = "pretraining_real_knees_loss" + ("_mae" if r["mae"] else "")
    folder = args.out.parent if not args.no_write else c.work
    r["csv"], r["png"] = folder / f"{stem}.csv", folder / f"{stem}.png"
    r["csv"].parent.mkdir(parents=True, exist_ok=True)
    r["rows"] = write_curve(result.output_folder / "checkpoint_final.pth", r["csv"], r["png"], curve_title(r, args, c),
                            args.checkpoint_every, "MSE on masked voxels" if r["mae"] else "epsilon MSE",
                            "validation, EMA weights, fixed masks" if r["mae"] else
                            "validation, EMA weights, fixed noise")
    r["params"] = sum(p.numel() for p in torch.load(result.encoder_path, map_location="cpu",
                                                    weights_only=False)["state_dict"].values())
    return r


def curve_title(r: dict, args: argparse.Namespace, c: Corpus) -> str:
    """The loss-curve figure's title: objective, corpus, patch, network."""
    kw = c.diff["architecture"]["arch_kwargs"]
    patch = " x ".join(map(str, c.diff["patch_size"]))
    spacing = " x ".join(f"{v:.3g}" for v in c.diff["spacing"])
    s = " x ".join(f"{v:g}" for v in args.mrnet_spacing)
    name = "MAE pretraining" if r["mae"] else "Diffusion pretraining"
    return (f"{name}, {sum(c.counts.values())} real unlabeled sagittal knee series (CPU)\n"
            + (f"{r['mask_text']}, MSE on them\n" if r["mae"] else "cosine schedule, epsilon prediction\n") +
            f"DESS 1 + MESE {c.counts['MESE echoes']} echoes + MRNet {c.counts['MRNet sag']} (assumed {s} mm)\n"
            f"patch {patch} @ {spacing} mm, batch {c.diff['batch_size']}, {kw['n_stages']} stages x "
            f"{max(kw['features_per_stage'])} features")


def objective_section(r: dict, args: argparse.Namespace, c: Corpus) -> str:
    """The Markdown section of one run: machine, command, corpus, plans, run, result, curve files."""
    import torch

    kw, mae, rows, result = c.diff["architecture"]["arch_kwargs"], r["mae"], r["rows"], r["result"]
    every, est, iterations = args.checkpoint_every, r["est"], r["iterations"]
    s = " x ".join(f"{v:g}" for v in args.mrnet_spacing)
    lines = [
        f"## {common.now()}: {'MAE' if mae else 'diffusion'} pretraining on the real unlabeled knees (CPU)",
        "",
        f"- machine: {common.machine(torch.device('cpu'))}; load average at the end "
        f"{common.load_average()} (the 2 cores are shared)",
        f"- command: `{common.command_line()}`",
        f"- corpus: {sum(c.counts.values())} sagittal series, all unlabeled: pyKNEEr DESS echo 1 (DICOM, 1 case), "
        f"pymskt MESE T2 (DICOM, echo=all: {c.counts['MESE echoes']} cases of one knee), MRNet train exams' sagittal "
        f"volumes ({c.counts['MRNet sag']} cases) via convert_mrnet with spacing {s} mm (in-plane x, in-plane y, "
        "slice): **an assumption**, MRNet publishes none; MRNet's sag output and the DICOM series then converted "
        f"together into {c.dataset}. Conversion {c.t_convert:.0f} s.",
        f"- plans: planned directly on the all-background corpus (intensity statistics: "
        f"`{c.block.intensity_statistics}`, the planner's no-foreground fallback; no plans transfer needed), GPU "
        f"memory target {args.gpu_memory_gb:g} GB to get a CPU-sized patch -> `{c.plans_id}` ({c.t_plan:.0f} s incl. "
        f"preprocessing); `3d_diffusion`: spacing {' x '.join(f'{v:.3g}' for v in c.diff['spacing'])} mm, patch "
        f"{' x '.join(map(str, c.diff['patch_size']))}, batch {c.diff['batch_size']}; network shrunk with "
        f"write_shrunk_plans to {kw['n_stages']} stages, features {kw['features_per_stage']}, blocks per stage "
        f"{kw.get('n_blocks_per_stage', 'n/a')}, planned batch kept (`{c.small}`)",
        f"- run: pretrain(objective='{r['objective']}', iterations={iterations}, checkpoint_every={every}, "
        f"learning_rate={args.learning_rate:g}, val_iterations={args.val_iterations}, device='cpu'), "
        + (f"{r['mask_text']} (block = the encoder's total stride from the plans), MSE on the masked voxels, "
           if mae else "cosine schedule, epsilon prediction, ") + "EMA 0.995, fp32"
        + (f"; {est:.2f} s/iteration measured beforehand -> {iterations} iterations planned (LR schedule length), "
           f"stopped at the first checkpoint after {args.minutes:g} min" if est else
           f"; time limit {args.minutes:g} min (stop at the first checkpoint after it)"),
        f"- result: **{result.iterations} iterations in {rows[-1]['elapsed_min']:.1f} min of training** "
        f"({60 * rows[-1]['elapsed_min'] / result.iterations:.2f} s/iteration incl. augmentation and validation; "
        f"{r['minutes']:.1f} min for the whole pretrain() call with start-up, encoder export and the "
        f"{'reconstruction' if mae else 'DDIM'} sanity picture); train loss (mean of {every} iterations) "
        f"**{rows[0]['train_loss']:.4f} -> {rows[-1]['train_loss']:.4f}**; EMA validation loss "
        f"{rows[0]['val_loss_ema']:.4f} -> {rows[-1]['val_loss_ema']:.4f} (EMA 0.995 lags on a run this short; "
        f"{'masked-voxel reconstruction MSE' if mae else 'epsilon MSE'}: not comparable in value with the other "
        "objective's loss); "
        f"encoder exported ({r['params'] / 1e6:.2f} M parameters) and loaded strictly by the 3d_fullres network: "
        f"{result.load_report.splitlines()[0] if result.load_report else 'n/a'}",
        f"- curve: `bench/results/{r['png'].name}`, values `bench/results/{r['csv'].name}` (loss values only)",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=None,
                        help="the shared data folder (default: $ORTHODIFF_SHARED_DATA, else ../shared/data)")
    parser.add_argument("--mrnet-spacing", type=float, nargs=3, default=(0.6, 0.6, 3.0), metavar=("X", "Y", "SLICE"),
                        help="ASSUMED MRNet voxel spacing in mm, in-plane x, in-plane y, slice (default 0.6 0.6 3.0)")
    parser.add_argument("--gpu-memory-gb", type=float, default=1.0,
                        help="planner memory target: sets patch and batch (default 1 GB: CPU-sized)")
    parser.add_argument("--features", type=int, default=16, help="max features per stage (default 16)")
    parser.add_argument("--stages", type=int, default=5, help="max stages (default 5)")
    parser.add_argument("--objective", choices=["diffusion", "mae", "both"], default="diffusion",
                        help="pretraining objective; both: diffusion then the MAE control, same data and budget")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="mae: fraction of blocks masked (default 0.75)")
    parser.add_argument("--minutes", type=float, default=18.0,
                        help="training time budget per objective (default 18); with --iterations, a time limit")
    parser.add_argument("--iterations", type=int, default=None, help="fixed iteration count instead of --minutes")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="iterations per loss-curve point (default 10)")
    parser.add_argument("--learning-rate", type=float, default=1e-3,
                        help="default 1e-3 for this short run (the method's recipe is 1e-4 for 21,500 iterations)")
    parser.add_argument("--val-iterations", type=int, default=2, help="EMA validation batches per point (default 2)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: new temporary folder, kept)")
    parser.add_argument("--out", type=Path, default=RESULTS / "pretraining.md")
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/results")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[Corpus, list[dict]] | None:
    """The corpus and one run per objective (None when the shared data is absent)."""
    shared = common.shared_data(args.shared)
    if shared is None:
        print("skipped: the shared real-data folder (../shared/data) is absent; set ORTHODIFF_SHARED_DATA or --shared")
        return None
    os.environ.setdefault("OMP_NUM_THREADS", str(common.usable_cores()))
    __import__("torch")  # after OMP_NUM_THREADS is set (torch reads it once)

    corpus = prepare_corpus(args, shared)
    objectives = ["diffusion", "mae"] if args.objective == "both" else [args.objective]
    return corpus, [run_objective(objective, args, corpus) for objective in objectives]


def record(measured: tuple[Corpus, list[dict]] | None, args: argparse.Namespace) -> None:
    """Print each objective's section and append it to ``--out`` (unless ``--no-write``)."""
    if measured is None:
        return
    corpus, runs = measured
    for r in runs:
        text = objective_section(r, args, corpus)
        print(text)
        if not args.no_write:
            common.append_markdown(args.out, text)
    print(f"work folder (converted data, run, sanity picture): {corpus.work}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    record(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
