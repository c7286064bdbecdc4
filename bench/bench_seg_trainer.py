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

``--versus contiguous`` times the memory format instead: (a) our trainer with ``channels_last`` (network
and batches in channels-last-3d) against (b) the same trainer in nnU-Net's default (contiguous) format,
both from the same encoder, on the same batches: the ratio is the speed-up of ``train seg
--channels-last``.

The encoder checkpoint is exported from a freshly built network of the same plans (the timing does
not depend on the weights' values; the loading path is the real one, checked at initialize).

Data: unless ``--dataset`` names an existing preprocessed dataset (``nnUNet_preprocessed`` set),
procedural sagittal knee phantoms of a 3 T site are written, converted and planned (ResEnc-M) in a
work folder. ``--size reduced`` (CPU): 4 small phantoms (1.6 mm pixels, 3 mm slices) and a tiny
network (``write_shrunk_plans``, 16 features, 4 stages); ``--size full``: adult-size phantoms at
0.4 mm and the planned network unchanged (for the GPU); ``--size demo``: the ``orthodiff demo`` network
(4 phantoms at 1.6 mm, the plans reduced by ``DEMO_NETWORK``: features / 4, one block per stage, batch 2).

Usage::

    OMP_NUM_THREADS=2 python -m bench.bench_seg_trainer --device cpu --size reduced
    python -m bench.bench_seg_trainer --device cpu --size demo --versus contiguous
    python -m bench.bench_seg_trainer --device cuda --size full

Prints a Markdown table row (with header) and the machine; ``--out FILE`` appends them to FILE.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import common
from orthodiff_nnunet.conventions import RESENC_M_PLANS, SEGMENTATION_CONFIGURATION

DATASET_ID = 561


def make_dataset(work: Path, size: str) -> tuple[str, str]:
    """Phantoms -> convert -> plan_and_preprocess (reused when present); returns (dataset, plans)."""
    from orthodiff_nnunet.networks.build import write_shrunk_plans

    small = size in ("reduced", "demo")
    name, plans_id = common.make_phantom_dataset(work, DATASET_ID, "SegBench", n_cases=4 if small else 6, seed=3,
                                                 in_plane_mm=1.6 if small else 0.4)
    if size == "reduced":
        plans_id = write_shrunk_plans(work / "preprocessed" / name, plans_id, "segBenchTinyPlans",
                                      max_features=16, max_stages=4)
    elif size == "demo":
        from orthodiff_nnunet.api import DEMO_NETWORK

        plans_id = write_shrunk_plans(work / "preprocessed" / name, plans_id, "segBenchDemoPlans", **DEMO_NETWORK)
    return name, plans_id


@dataclass
class Timing:
    """ms/iteration per repetition (wall and process CPU) of each trainer, and what was timed."""

    row_label: str
    patch_batch: str
    plans_id: str
    wall: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "nnunet": []})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "nnunet": []})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--size", choices=["reduced", "demo", "full"], default="reduced")
    ap.add_argument("--dataset", default=None, help="an existing preprocessed dataset (name) instead of phantoms")
    ap.add_argument("--plans", default=None, help=f"its plans identifier (default {RESENC_M_PLANS})")
    ap.add_argument("--iterations", type=int, default=2, help="train steps per repetition (default 2)")
    ap.add_argument("--repeats", type=int, default=20, help="repetitions per trainer (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per trainer first (default 3)")
    ap.add_argument("--control", action="store_true",
                    help="A/A control: time nnUNetTrainer against a second nnUNetTrainer instead of ours")
    ap.add_argument("--versus", choices=["nnunet", "contiguous"], default="nnunet",
                    help="nnunet: ours against nnUNetTrainer (default); contiguous: ours with channels_last against "
                         "ours in the default memory format")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="append the Markdown result to this file")
    return ap.parse_args(argv)


def build_trainers(args: argparse.Namespace, device) -> tuple[object, object, str]:
    """(ours or the A/A control, nnU-Net's nnUNetTrainer, plans identifier), initialised on the same plans."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from orthodiff_nnunet.networks.build import architecture_hash, architecture_of, build_network
    from orthodiff_nnunet.networks.encoder_io import export_encoder
    from orthodiff_nnunet.trainers.segmentation import nnUNetTrainerOrthoDiffSeg

    work = args.work or Path(tempfile.mkdtemp(prefix="orthodiff_segbench_"))
    if args.dataset:
        name, plans_id = args.dataset, args.plans or RESENC_M_PLANS
        os.environ.setdefault("nnUNet_results", str(work / "results"))
    else:
        name, plans_id = make_dataset(work, args.size)
    os.environ["nnUNet_n_proc_DA"] = "0"  # batches are prefetched in this process
    plans, dataset_json = common.load_plans_and_dataset_json(name, plans_id)
    cfg = SEGMENTATION_CONFIGURATION
    arch = architecture_of(plans, cfg)
    encoder = export_encoder(build_network(plans, cfg, 1, len(dataset_json["labels"])),
                             work / "bench_encoder.pt", {"architecture_hash": architecture_hash(arch),
                                                          "plans_identifier": plans_id, "dataset": name})
    compile_ = os.environ.get("nnUNet_compile") == "1"

    def build(cls, **attributes):
        return common.make_trainer(cls, plans, cfg, dataset_json, device, compile_=compile_, **attributes)

    torch.manual_seed(0)
    if args.versus == "contiguous":  # the memory format alone: the same trainer, the same encoder
        a = build(nnUNetTrainerOrthoDiffSeg, encoder_path=str(encoder), channels_last=True)
        torch.manual_seed(0)
        return a, build(nnUNetTrainerOrthoDiffSeg, encoder_path=str(encoder)), plans_id
    if args.control:  # A/A: nnU-Net's trainer against itself, the noise floor of this procedure
        ours = build(nnUNetTrainer)
    else:
        ours = build(nnUNetTrainerOrthoDiffSeg, encoder_path=str(encoder))
        assert ours.encoder_report is not None and ours.encoder_report.tensors > 0
    torch.manual_seed(0)
    return ours, build(nnUNetTrainer), plans_id


def time_repetition(trainer, batches: list, device) -> tuple[float, float]:
    """One repetition: a new "epoch" start and a train step per batch; (wall, CPU) ms per iteration."""
    import torch

    trainer.current_epoch += 1  # a new "epoch" each repetition (nnU-Net logs the LR once per epoch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.on_train_epoch_start()
    for b in batches:
        trainer.train_step(b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n = len(batches)
    return 1000 * (time.perf_counter() - start) / n, 1000 * (time.process_time() - cpu) / n


def run(args: argparse.Namespace) -> Timing:
    """Both trainers on the same prefetched batches, after a warm-up, in alternating repetitions."""
    os.environ.setdefault("nnUNet_compile", "0" if args.device == "cpu" else "1")
    import torch

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)  # one thread: no OpenMP spin-waiting under a shared machine's load
    ours, theirs, plans_id = build_trainers(args, device)
    dl, _ = theirs.get_dataloaders()
    batches = [next(dl) for _ in range(args.iterations)]
    for t in (ours, theirs):
        t.set_deep_supervision_enabled(True)
        t.on_train_epoch_start()
        for i in range(args.warmup):
            t.train_step(batches[i % len(batches)])
    cm = ours.configuration_manager
    label = ("A/A control: nnUNetTrainer vs itself, " if args.control else
             "channels-last vs contiguous (ours both), " if args.versus == "contiguous" else "")
    timing = Timing(label + args.device,
                    f"{tuple(cm.patch_size)} x {cm.batch_size}", plans_id)
    for i in range(args.repeats):
        order = [("ours", ours), ("nnunet", theirs)] if i % 2 == 0 else [("nnunet", theirs), ("ours", ours)]
        for key, trainer in order:
            w, c = time_repetition(trainer, batches, device)
            timing.wall[key].append(w)
            timing.cpu[key].append(c)
    return timing


def record(timing: Timing, args: argparse.Namespace) -> None:
    """Print the table row (with header), machine and command; append them to ``--out`` when given."""
    import torch

    def cell(values: dict[str, list[float]], key: str) -> str:
        return f"{statistics.median(values[key]):.0f}"

    def ratio(values: dict[str, list[float]]) -> str:
        pairs = [a / b for a, b in zip(values["ours"], values["nnunet"])]
        return f"{statistics.median(pairs):.3f} ({min(pairs):.2f}-{max(pairs):.2f})"

    row = [timing.row_label, args.size, timing.patch_batch, timing.plans_id,
           cell(timing.wall, "ours"), cell(timing.wall, "nnunet"), ratio(timing.wall)]
    a, b = ("channels-last", "contiguous") if args.versus == "contiguous" else ("ours", "nnUNetTrainer")
    header = ["device", "size", "patch x batch", "plans", f"{a} ms/it (wall)", f"{b} ms/it (wall)",
              "wall ratio (range of pairs)"]
    if args.device == "cpu":
        row += [cell(timing.cpu, "ours"), cell(timing.cpu, "nnunet"), ratio(timing.cpu)]
        header += [f"{a} CPU ms/it", f"{b} CPU ms/it", "CPU-time ratio (range)"]
    row.append(f"{args.repeats} x {args.iterations}")
    header.append("reps x its")
    text = "\n".join([common.markdown_table(header, [row]), "", common.footer(torch.device(args.device))])
    print(text)
    if args.out:
        common.append_markdown(args.out, text, title="# Segmentation")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
