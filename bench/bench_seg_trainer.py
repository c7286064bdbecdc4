"""Speed of the warm-started segmentation trainer against nnU-Net's ``nnUNetTrainer``, same plans, one process.

What is timed, per repetition: one ``on_train_epoch_start`` (where our trainer adds the learning-rate
warm-up and the encoder-freeze check) followed by N ``train_step`` calls (forward with deep
supervision, Dice + CE, backward, gradient clipping, SGD step) of

* (a) ``nnUNetTrainerOrthoDiffSeg`` initialised from an encoder checkpoint (``init = "diffusion"``;
  with ``--control`` a second ``nnUNetTrainer`` instead: the noise floor of the procedure),
* (b) nnU-Net's own ``nnUNetTrainer``,

on the same plans (``3d_fullres``), in one process. The batches are drawn once from nnU-Net's
dataloader (augmentation included) before timing, and both trainers step on the same batches, so
data loading is not timed (it is the same nnU-Net code for both and runs in background workers in
real training). After a warm-up, repetitions alternate a, b, b, a, a, b, ...; reported are the
median ms/iteration of each and the ratio ours / nnU-Net's (median of the per-pair ratios, with
their range). On the CPU the process's CPU time (``time.process_time``, all threads) is reported
beside the wall clock: on a machine shared with other jobs the wall clock of a repetition depends on
what else runs, the CPU time this process spends much less (one torch thread by default, so
that no OpenMP thread spins while waiting for a core). Goal: ratio <= 1.02.

The encoder checkpoint is exported from a freshly built network of the same plans (the timing does
not depend on the weights' values; the loading path is the real one, checked at initialize).

Data: unless ``--dataset`` names an existing preprocessed dataset (``nnUNet_preprocessed`` set),
procedural sagittal knee phantoms of a 3 T site are written, converted and planned (ResEnc-M) in a
work folder. ``--size reduced`` (CPU): 4 small phantoms (1.6 mm pixels, 3 mm slices) and a tiny
network (``write_shrunk_plans``, 16 features, 4 stages); ``--size full``: adult-size phantoms at
0.4 mm and the planned network unchanged (for the GPU).

Usage::

    OMP_NUM_THREADS=2 python bench/bench_seg_trainer.py --device cpu --size reduced
    python bench/bench_seg_trainer.py --device cuda --size full

Prints a Markdown table row (with header) and the machine; ``--out FILE`` appends them to FILE.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, machine
DATASET_ID = 561


def make_dataset(work: Path, size: str) -> tuple[str, str]:
    """Phantoms -> convert -> plan_and_preprocess (reused when present); returns (dataset, plans)."""
    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.data.phantom import write_site
    from orthodiff_nnunet.data.sites import SITE_3T
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.paths import set_nnunet_paths
    from orthodiff_nnunet.planning import plan_and_preprocess

    set_nnunet_paths(raw=work / "raw", preprocessed=work / "preprocessed", results=work / "results")
    reduced = size == "reduced"
    if not list((work / "raw").glob(f"Dataset{DATASET_ID}_*")):
        site = dataclasses.replace(SITE_3T, in_plane_spacing_mm=1.6 if reduced else 0.4)
        manifest = write_site(work / "site", site, n_cases=4 if reduced else 6, seed=3, orientations=("sag",))
        convert(manifest, DATASET_ID, "SegBench", raw=work / "raw", num_processes=1)
    saved = os.environ.pop("nnUNet_n_proc_DA", None)  # nnUNet_n_proc_DA=0 breaks planning
    try:
        result = plan_and_preprocess([DATASET_ID], num_processes=2, show_progress=False)
    finally:
        if saved is not None:
            os.environ["nnUNet_n_proc_DA"] = saved
    name, plans_id = result.datasets[0].dataset_name, result.datasets[0].plans_identifier
    if reduced:
        plans_id = write_shrunk_plans(work / "preprocessed" / name, plans_id, "segBenchTinyPlans",
                                      max_features=16, max_stages=4)
    return name, plans_id


def build(cls, plans: dict, dataset_json: dict, device, **attributes):
    p = copy.deepcopy(plans)
    p["continue_training"] = False
    trainer = cls(p, "3d_fullres", "all", copy.deepcopy(dataset_json), device)
    for k, v in attributes.items():
        setattr(trainer, k, v)
    trainer.initialize()
    return trainer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--size", choices=["reduced", "full"], default="reduced")
    ap.add_argument("--dataset", default=None, help="an existing preprocessed dataset (name) instead of phantoms")
    ap.add_argument("--plans", default=None, help="its plans identifier (default orthodiffResEncMPlans)")
    ap.add_argument("--iterations", type=int, default=2, help="train steps per repetition (default 2)")
    ap.add_argument("--repeats", type=int, default=20, help="repetitions per trainer (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per trainer first (default 3)")
    ap.add_argument("--control", action="store_true",
                    help="A/A control: time nnUNetTrainer against a second nnUNetTrainer instead of ours")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="append the Markdown result to this file")
    args = ap.parse_args(argv)

    os.environ.setdefault("nnUNet_compile", "0" if args.device == "cpu" else "1")
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from orthodiff_nnunet.networks.build import architecture_hash, architecture_of, build_network
    from orthodiff_nnunet.networks.encoder_io import export_encoder
    from orthodiff_nnunet.paths import preprocessed_dir
    from orthodiff_nnunet.trainers.segmentation import nnUNetTrainerOrthoDiffSeg

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)  # one thread: no OpenMP spin-waiting under a shared machine's load
    work = args.work or Path(tempfile.mkdtemp(prefix="orthodiff_segbench_"))
    if args.dataset:
        name, plans_id = args.dataset, args.plans or "orthodiffResEncMPlans"
        os.environ.setdefault("nnUNet_results", str(work / "results"))
    else:
        name, plans_id = make_dataset(work, args.size)
    os.environ["nnUNet_n_proc_DA"] = "0"  # batches are prefetched in this process
    folder = preprocessed_dir() / name
    plans = json.loads((folder / f"{plans_id}.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    arch = architecture_of(plans, "3d_fullres")
    encoder = export_encoder(build_network(plans, "3d_fullres", 1, len(dataset_json["labels"])),
                             work / "bench_encoder.pt", {"architecture_hash": architecture_hash(arch),
                                                          "plans_identifier": plans_id, "dataset": name})

    torch.manual_seed(0)
    if args.control:  # A/A: nnU-Net's trainer against itself, the noise floor of this procedure
        ours = build(nnUNetTrainer, plans, dataset_json, device)
    else:
        ours = build(nnUNetTrainerOrthoDiffSeg, plans, dataset_json, device, encoder_path=str(encoder))
        assert ours.encoder_report is not None and ours.encoder_report.tensors > 0
    torch.manual_seed(0)
    theirs = build(nnUNetTrainer, plans, dataset_json, device)
    dl, _ = theirs.get_dataloaders()
    batches = [next(dl) for _ in range(args.iterations)]
    for t in (ours, theirs):
        t.set_deep_supervision_enabled(True)
        t.on_train_epoch_start()
        for i in range(args.warmup):
            t.train_step(batches[i % len(batches)])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def rep(trainer) -> tuple[float, float]:
        trainer.current_epoch += 1  # a new "epoch" each repetition (nnU-Net logs the LR once per epoch)
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        trainer.on_train_epoch_start()
        for b in batches:
            trainer.train_step(b)
        sync()
        n = len(batches)
        return 1000 * (time.perf_counter() - start) / n, 1000 * (time.process_time() - cpu) / n

    wall: dict[str, list[float]] = {"ours": [], "nnunet": []}
    cpu: dict[str, list[float]] = {"ours": [], "nnunet": []}
    for i in range(args.repeats):
        order = [("ours", ours), ("nnunet", theirs)] if i % 2 == 0 else [("nnunet", theirs), ("ours", ours)]
        for key, trainer in order:
            w, c = rep(trainer)
            wall[key].append(w)
            cpu[key].append(c)

    def cell(values: dict[str, list[float]], key: str) -> str:
        return f"{statistics.median(values[key]):.0f}"

    def ratio(values: dict[str, list[float]]) -> str:
        pairs = [a / b for a, b in zip(values["ours"], values["nnunet"])]
        return f"{statistics.median(pairs):.3f} ({min(pairs):.2f}-{max(pairs):.2f})"

    cm = ours.configuration_manager
    row = [("A/A control: nnUNetTrainer vs itself, " if args.control else "") + args.device, args.size, f"{tuple(cm.patch_size)} x {cm.batch_size}", plans_id,
           cell(wall, "ours"), cell(wall, "nnunet"), ratio(wall)]
    header = ["device", "size", "patch x batch", "plans", "ours ms/it (wall)", "nnUNetTrainer ms/it (wall)",
              "wall ratio (range of pairs)"]
    if device.type == "cpu":
        row += [cell(cpu, "ours"), cell(cpu, "nnunet"), ratio(cpu)]
        header += ["ours CPU ms/it", "nnUNetTrainer CPU ms/it", "CPU-time ratio (range)"]
    row.append(f"{args.repeats} x {args.iterations}")
    header.append("reps x its")
    text = "\n".join([
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |", "",
        f"Machine: {machine(device)}. Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}.",
        f"Command: `{command_line()}`",
    ])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
