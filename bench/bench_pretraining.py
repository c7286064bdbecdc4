"""Pretraining step speed against vanilla nnU-Net segmentation training, same plans and data, one process.

What is timed: ``train_step`` of

* (a) ``nnUNetTrainerOrthoDiffPretrain`` (the plans' network as a timestep-conditioned denoiser:
  noising, forward, epsilon MSE, backward, clipping, AdamW step, EMA update), and
* (b) nnU-Net's own ``nnUNetTrainer`` (segmentation: deep supervision, Dice + CE, SGD step),

both on the same plans configuration (default ``3d_diffusion``: same patch and batch, so the
per-voxel ratio equals the per-iteration ratio), the same preprocessed data, in one process.
Batches are drawn from each trainer's own nnU-Net dataloader before timing and reused, so data
loading and augmentation are not timed (they run in background workers during real training).
After a warm-up (which also absorbs torch.compile), repetitions of N iterations alternate between
the two trainers (a, b, b, a, a, b, ...); the median per repetition is reported with min-max.

Reported per run: ms/iteration, voxels/s (batch x patch voxels / time), time per voxel relative
to vanilla (goal <= 1.15), peak memory (CUDA: ``max_memory_allocated`` during the trainer's own
steps, minus what the other trainer holds; CPU: the process's peak RSS, both trainers), FLOPs of
one train_step counted with ``torch.utils.flop_counter.FlopCounterMode`` (eager) and the achieved
TFLOP/s. On CUDA, a sweep of our trainer over precision {fp32, tf32, bf16, fp16} x torch.compile
{off, on} x channels-last {off, on}, each row timed against vanilla blocks interleaved with it.

Data: unless ``--dataset`` names an existing preprocessed dataset (``nnUNet_preprocessed`` must
be set), procedural sagittal knee phantoms of a 3 T site are written, converted
(``orthodiff_nnunet.api.convert``) and planned (``plan_and_preprocess``, ResEnc-M plans) in a
temporary folder. ``--size reduced`` (for CPU): 4 small phantoms (0.8 x 0.8 x 3 mm) and a tiny
network (``write_shrunk_plans``); ``--size full``: adult-size phantoms at 0.4 x 0.4 x 3 mm and the
planned network unchanged.

Usage::

    python -m bench.bench_pretraining --device cpu --size reduced          # this repository's CPU row
    python -m bench.bench_pretraining --device cuda --size full            # the GPU figures + sweep

Appends a Markdown section to ``--out`` (default ``bench/results/pretraining.md``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bench import common
from orthodiff_nnunet.conventions import DIFFUSION_CONFIGURATION, SEGMENTATION_CONFIGURATION

#: The method's released pretraining code, fp32 on an H100, batch 6 x 1 x 16 x 256 x 256
#: (docs: ../shared/docs/NNUNET_2.8.1_NOTES.md); it cannot run bf16.
REFERENCE_VOXELS_PER_S = 10.4e6
GOAL_RATIO = 1.15
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@dataclass
class Run:
    """One trainer setting and what was measured for it."""

    label: str
    precision: str
    compile: bool
    channels_last: bool
    seconds: list[float] = field(default_factory=list)  # wall seconds per iteration, one entry per repetition
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU seconds per iteration (CPU runs)
    vanilla: "Run | None" = None  # the vanilla blocks interleaved with this run's blocks
    peak_bytes: int = 0
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def paired_ratios(self, cpu_time: bool = False) -> list[float]:
        """Per repetition: this run's time / the adjacent vanilla block's time (robust to slow drifts)."""
        mine, theirs = (self.cpu_seconds, self.vanilla.cpu_seconds) if cpu_time else (self.seconds, self.vanilla.seconds)
        return [a / b for a, b in zip(mine, theirs)]


# ----------------------------------------------------------------------------------------------
# measurement
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(enabled: bool | tuple[bool, bool]) -> None:
    """Process-wide TF32 switches (matmul, cuDNN). Our trainer's initialize sets both from its
    precision; vanilla nnU-Net runs with PyTorch's defaults, so they are set before every block."""
    import torch

    matmul, cudnn = (enabled, enabled) if isinstance(enabled, bool) else enabled
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


def resident_bytes(trainer) -> int:
    """Bytes a trainer keeps on the GPU between steps: weights, buffers, gradients, optimizer state."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.is_cuda and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in trainer.network.parameters():
        add(p)
        add(p.grad)
    for b in trainer.network.buffers():
        add(b)
    for state in trainer.optimizer.state.values():
        for v in state.values():
            add(v)
    return total


def time_block(trainer, batches, n: int, device, tf32, run: "Run | None" = None) -> tuple[float, float, int]:
    """Wall and process-CPU seconds per iteration over ``n`` train steps, and (CUDA) the trainer's own
    peak bytes; appended to ``run`` when given."""
    import torch

    set_tf32(tf32)
    sync(device)
    peak = 0
    if device.type == "cuda":
        others = torch.cuda.memory_allocated(device) - resident_bytes(trainer)
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        trainer.train_step(batches[i % len(batches)])
    sync(device)
    seconds, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - others
    if run is not None:
        run.seconds.append(seconds)
        run.cpu_seconds.append(cpu)
        run.peak_bytes = max(run.peak_bytes, peak)
    return seconds, cpu, peak


def count_flops(trainer, batch) -> int:
    """FLOPs of one train_step (forward + backward; the optimizer's elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.train_step(batch)
    return int(counter.get_total_flops())


def compiled(trainer) -> bool:
    """Whether nnU-Net actually compiled the trainer's network (it refuses on CPU)."""
    return hasattr(trainer.network, "_orig_mod")


def fetch_batches(trainer, k: int) -> list[dict]:
    """``k`` batches from the trainer's own training dataloader (its augmentation, its sampling)."""
    dl_train, dl_val = trainer.get_dataloaders()
    batches = [next(dl_train) for _ in range(k)]
    for dl in (dl_train, dl_val):
        if hasattr(dl, "_finish"):
            dl._finish()
    return batches


def free() -> None:
    """Collect what the caller dropped and give cached GPU memory back."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
def prepare_data(args, work: Path) -> tuple[str, str, str]:
    """(dataset name, plans identifier, description of the data)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.paths import preprocessed_dir
    from orthodiff_nnunet.conventions import find_plans

    if args.dataset:
        name = maybe_convert_to_dataset_name(int(args.dataset) if args.dataset.isdigit() else args.dataset)
        ident, _ = find_plans(name, args.plans)
        what = f"existing preprocessed dataset {name}"
    elif args.size == "reduced":
        name, ident = common.make_phantom_dataset(work, 961, "BenchPretrainSmall", n_cases=args.cases or 4, seed=5)
        what = (f"{args.cases or 4} procedural knee phantoms (sagittal, 3 T site, 0.8 x 0.8 x 3 mm, default scale), "
                "converted and planned by orthodiff")
    else:
        name, ident = common.make_phantom_dataset(work, 962, "BenchPretrainFull", n_cases=args.cases or 6, seed=5,
                                                  in_plane_mm=0.4, scale=1.0)
        what = (f"{args.cases or 6} procedural knee phantoms (sagittal, 3 T site, 0.4 x 0.4 x 3 mm, adult size), "
                "converted and planned by orthodiff")
    if args.size == "reduced":
        ident = write_shrunk_plans(preprocessed_dir() / name, ident, f"{ident}_bench{args.features}f{args.stages}s",
                                   max_features=args.features, max_stages=args.stages, max_batch_size=None)
        what += (f"; network shrunk with write_shrunk_plans (max {args.features} features, {args.stages} stages, "
                 "1 block per stage; planned batch kept)")
    return name, ident, what


@dataclass
class Measured:
    """What ``run`` measured, and what the section says about how (machine, data, network, settings)."""

    device: object
    size: str
    dataset: str = ""
    plans_id: str = ""
    data_what: str = ""
    configuration: str = ""
    n_it: int = 0
    repeats: int = 0
    warmup: int = 0
    batch_size: int = 0
    patch: tuple = ()
    voxels: int = 0
    flops_ours: int = 0
    flops_vanilla: int = 0
    arch_what: str = ""
    head: Run | None = None
    vanilla: Run | None = None
    sweep: list[Run] = field(default_factory=list)
    rss_gib: float = 0.0
    load_start: str = ""
    t_start: float = 0.0
    work: Path | None = None
    temp: bool = False
    prepared_only: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--size", choices=("reduced", "full"), default=None,
                        help="reduced: tiny network and small phantoms (CPU); full: planned network (default: "
                             "full on CUDA, reduced on CPU)")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per timed repetition "
                        "(default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per trainer (default 12 on CPU, 5 on CUDA; 3 per sweep row)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 3 CPU, 10 CUDA)")
    parser.add_argument("--dataset", default=None, help="existing preprocessed dataset (id or name) instead of phantoms")
    parser.add_argument("--plans", default=None, help="plans identifier (with --dataset)")
    parser.add_argument("--configuration", default=DIFFUSION_CONFIGURATION, help="plans configuration of both trainers")
    parser.add_argument("--cases", type=int, default=None, help="number of phantoms (default 4 reduced, 6 full)")
    parser.add_argument("--features", type=int, default=8, help="reduced: max features per stage (default 8)")
    parser.add_argument("--stages", type=int, default=3, help="reduced: max stages (default 3)")
    parser.add_argument("--compile", choices=("default", "on", "off"), default="default",
                        help="torch.compile of the headline pair (default: nnU-Net's, on for CUDA, off for CPU)")
    parser.add_argument("--sweep", choices=("auto", "on", "off"), default="auto",
                        help="precision x compile x channels-last sweep of our trainer (auto: on CUDA)")
    parser.add_argument("--sweep-precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: temporary, removed)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "pretraining.md")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build and plan the data, print the configuration, time nothing")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace, m: Measured) -> tuple[bool, bool]:
    """Fill the device-dependent defaults into ``m``; (compile the headline pair, run the sweep)."""
    cuda = m.cuda
    m.n_it = args.iterations or (20 if cuda else 3)
    m.repeats = args.repeats or (5 if cuda else 12)
    m.warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)
    sweep = cuda if args.sweep == "auto" else args.sweep == "on"
    if sweep and not cuda:
        print("note: --sweep on a CPU is a smoke test of this script: the trainer runs fp32 and nnU-Net never "
              "compiles on CPU; rows show the settings actually in effect", file=sys.stderr)
    compile_headline = cuda if args.compile == "default" else args.compile == "on"
    if compile_headline and not cuda:
        print("note: nnU-Net never compiles on CPU (_do_i_compile); the headline runs eager", file=sys.stderr)
        compile_headline = False
    if compile_headline or sweep:
        import torch._dynamo.config as dcfg  # each new trainer is a recompile: don't fall back to eager silently

        for key, value in (("cache_size_limit", 64), ("recompile_limit", 64), ("accumulated_cache_size_limit", 1024),
                           ("accumulated_recompile_limit", 1024)):
            if hasattr(dcfg, key):
                setattr(dcfg, key, max(getattr(dcfg, key), value))
    return compile_headline, sweep


def prepare(args: argparse.Namespace, m: Measured) -> tuple[dict, dict]:
    """Work folder, data and plans (``m`` records them); returns (plans, dataset.json)."""
    m.temp = args.work is None and not args.dataset
    m.work = args.work or Path(tempfile.mkdtemp(prefix="orthodiff_bench_pretrain_"))
    if not args.dataset:
        common.use_work_folder(m.work)
    elif not os.environ.get("nnUNet_results"):
        os.environ["nnUNet_results"] = str(Path(tempfile.mkdtemp(prefix="orthodiff_bench_results_")))
    m.t_start = time.perf_counter()
    m.load_start = common.load_average()
    m.dataset, m.plans_id, m.data_what = prepare_data(args, m.work)
    os.environ["nnUNet_n_proc_DA"] = "0"  # batches are drawn once, in this process
    plans, dataset_json = common.load_plans_and_dataset_json(m.dataset, m.plans_id)
    m.configuration = args.configuration
    print(f"data ready in {time.perf_counter() - m.t_start:.0f} s: {m.dataset}, plans {m.plans_id}, "
          f"{m.configuration}", file=sys.stderr)
    return plans, dataset_json


def print_configurations(plans: dict, m: Measured) -> None:
    """``--prepare-only``: the planned configurations, nothing timed."""
    from orthodiff_nnunet.plans import resolve_configuration

    for c in (SEGMENTATION_CONFIGURATION, m.configuration):
        r = resolve_configuration(plans, c)
        kw = r["architecture"]["arch_kwargs"]
        print(f"{c}: spacing {r['spacing']}, patch {r['patch_size']}, batch {r['batch_size']}, "
              f"{kw['n_stages']} stages, features {kw['features_per_stage']}")
    print(f"work folder: {m.work}")


def describe_pair(a0, b0, m: Measured) -> tuple[list[dict], list[dict]]:
    """Phase 0, eager: batch and patch, FLOPs of one step, the network; the batches both trainers train on."""
    import torch

    m.batch_size, m.patch = a0.batch_size, tuple(a0.configuration_manager.patch_size)
    assert b0.batch_size == m.batch_size and tuple(b0.configuration_manager.patch_size) == m.patch
    m.voxels = m.batch_size * int(torch.tensor(m.patch).prod())
    batches_a, batches_b = fetch_batches(a0, 4), fetch_batches(b0, 4)
    m.flops_ours, m.flops_vanilla = count_flops(a0, batches_a[0]), count_flops(b0, batches_b[0])
    params_a = common.count_parameters(a0._model().denoiser)
    params_b = common.count_parameters(b0.network)
    arch = a0.configuration_manager.network_arch_init_kwargs
    m.arch_what = (f"{a0.configuration_manager.network_arch_class_name.rsplit('.', 1)[-1]}, {arch['n_stages']} "
                   f"stages, features {arch['features_per_stage']}; {params_a / 1e6:.2f} M parameters as denoiser "
                   f"(+ EMA copy), {params_b / 1e6:.2f} M as segmentation network "
                   f"({b0.label_manager.num_segmentation_heads} outputs, deep supervision)")
    return batches_a, batches_b


def tf32_of(precision: str) -> bool:
    """Our trainer's TF32 switches follow its precision."""
    return precision == "tf32"


def time_headline(a, b, batches: tuple[list, list], default_tf32, m: Measured) -> None:
    """Warm-up (absorbs torch.compile), then repetitions alternating ours and vanilla (a b b a ...)."""
    batches_a, batches_b = batches
    m.vanilla = van = Run("vanilla nnUNetTrainer (segmentation)", "fp16 autocast" if m.cuda else "fp32",
                          compiled(b), False)
    m.head = head = Run("ours (nnUNetTrainerOrthoDiffPretrain)", a.precision, compiled(a), a.channels_last,
                        vanilla=van)
    for trainer, tf32, bs in ((a, tf32_of(a.precision), batches_a), (b, default_tf32, batches_b)):
        time_block(trainer, bs, m.warmup, m.device, tf32)
    for r in range(m.repeats):
        order = [(a, head, tf32_of(a.precision), batches_a), (b, van, default_tf32, batches_b)]
        for trainer, run_, tf32, bs in (order if r % 2 == 0 else order[::-1]):
            time_block(trainer, bs, m.n_it, m.device, tf32, run_)
        print(f"repetition {r}: ours {1000 * head.seconds[-1]:.1f} ms, vanilla {1000 * van.seconds[-1]:.1f} ms "
              f"(CPU time {1000 * head.cpu_seconds[-1]:.0f} / {1000 * van.cpu_seconds[-1]:.0f} ms)", file=sys.stderr)


def time_sweep(args, ours, b, batches: tuple[list, list], default_tf32, m: Measured) -> None:
    """Our trainer over precision x compile x channels-last, vanilla (headline setting) interleaved with every row."""
    batches_a, batches_b = batches
    van = m.vanilla
    reps = args.repeats or 3
    for precision, comp, cl in itertools.product(args.sweep_precisions, (False, True), (False, True)):
        run_ = Run("ours", precision, comp, cl, vanilla=Run("vanilla", van.precision, van.compile, False))
        m.sweep.append(run_)
        t0 = time.perf_counter()
        trainer = None
        try:
            trainer = ours(precision, comp, cl)
            run_.precision, run_.compile, run_.channels_last = trainer.precision, compiled(trainer), trainer.channels_last
            time_block(trainer, batches_a, m.warmup, m.device, tf32_of(precision))
            for r in range(reps):
                order = [(trainer, run_, tf32_of(precision), batches_a), (b, run_.vanilla, default_tf32, batches_b)]
                for tr, sink, tf32, bs in (order if r % 2 == 0 else order[::-1]):
                    time_block(tr, bs, m.n_it, m.device, tf32, sink)
        except Exception as exc:  # one failing setting (e.g. compile) must not lose the others
            run_.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            traceback.print_exc()
        finally:
            trainer = None
            free()
        status = run_.error or f"{1000 * run_.median:.1f} ms/iteration"
        print(f"sweep {precision} compile={comp} channels_last={cl}: {status} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)


def run(args: argparse.Namespace) -> Measured:
    """Data and plans, then the interleaved headline pair and (CUDA) the sweep."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from orthodiff_nnunet.conventions import resolve_device
    from orthodiff_nnunet.trainers.diffusion_pretraining import nnUNetTrainerOrthoDiffPretrain

    device = resolve_device(args.device)
    m = Measured(device=device, size=args.size or ("full" if device.type == "cuda" else "reduced"))
    args.size = m.size
    compile_headline, sweep = settings(args, m)
    default_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # vanilla's
    plans, dataset_json = prepare(args, m)
    if args.prepare_only:
        print_configurations(plans, m)
        m.prepared_only = True
        return m

    def ours(precision: str, compile_: bool, channels_last: bool):
        return common.make_trainer(nnUNetTrainerOrthoDiffPretrain, plans, m.configuration, dataset_json, device,
                                   compile_=compile_, precision=precision, channels_last=channels_last)

    def vanilla(compile_: bool):
        return common.make_trainer(nnUNetTrainer, plans, m.configuration, dataset_json, device, compile_=compile_)

    torch.manual_seed(0)
    a, b = ours("fp32", False, False), vanilla(False)
    batches = describe_pair(a, b, m)
    if m.cuda or compile_headline:
        a = b = None
        free()
        a, b = ours("fp16" if m.cuda else "fp32", compile_headline, False), vanilla(compile_headline)
    time_headline(a, b, batches, default_tf32, m)
    m.rss_gib = common.peak_rss_gib()
    a = None
    free()
    if sweep:
        time_sweep(args, ours, b, batches, default_tf32, m)
    return m


# ----------------------------------------------------------------------------------------------
HEADER = ["trainer", "precision", "torch.compile", "channels-last", "ms/iteration median (min-max)",
          "voxels/s", "time per voxel vs vanilla: median of paired ratios (min-max)", "peak memory",
          "GFLOP/iteration", "achieved TFLOP/s"]


def table_row(run_: Run, flops: int, m: Measured, ref: bool = True) -> list[str]:
    """One row of the table: times, voxels/s, ratio to vanilla, memory, FLOPs."""
    on_off = ["on" if run_.compile else "off", "on" if run_.channels_last else "off"]
    if run_.error:
        return [run_.label, run_.precision, *on_off, f"failed: {run_.error}", "", "", "", f"{flops / 1e9:.1f}", ""]
    med = run_.median
    if run_.vanilla is None:
        ratio = "1 (reference)"
    else:
        p = run_.paired_ratios()
        ratio = f"**{statistics.median(p):.3f}** ({min(p):.2f}-{max(p):.2f})"
    vps = m.voxels / med
    extra = f" ({vps / REFERENCE_VOXELS_PER_S:.1f}x the method's code)" if m.cuda and ref else ""
    mem = f"{run_.peak_bytes / 2**30:.2f} GiB" if m.cuda else "n/a (see RSS)"
    return [run_.label, run_.precision, *on_off,
            f"{1000 * med:.1f} ({1000 * min(run_.seconds):.1f}-{1000 * max(run_.seconds):.1f})",
            f"{vps / 1e6:.2f} M{extra}", ratio, mem, f"{flops / 1e9:.1f}", f"{flops / med / 1e12:.3f}"]


def section_head(m: Measured, args: argparse.Namespace) -> list[str]:
    """Title, machine, command, data, network and timing bullets, the headline table and its ratio."""
    head, van = m.head, m.vanilla
    ratio = statistics.median(head.paired_ratios())
    return [
        f"## {common.now()}: pretraining step vs vanilla nnU-Net step ({'GPU' if m.cuda else 'CPU'}, size {m.size})",
        "",
        f"- machine: {common.machine(m.device)}; load average at start {m.load_start}, at end {common.load_average()}"
        + (" (the cores are shared with other jobs: expect noise)" if not m.cuda else ""),
        f"- command: `{common.command_line()}`",
        f"- data: {m.data_what}; dataset {m.dataset}, plans `{m.plans_id}`, configuration `{m.configuration}` for "
        f"both trainers: patch {' x '.join(map(str, m.patch))}, batch {m.batch_size} = {m.voxels:,} voxels per iteration",
        f"- network: {m.arch_what}",
        f"- timing: {m.warmup} warm-up iterations each, then {m.repeats} repetitions of {m.n_it} iterations alternating "
        "ours/vanilla (a b b a ...), on 4 batches per trainer drawn from its own nnU-Net dataloader before timing "
        "(augmentation not timed); FLOPs: FlopCounterMode over one eager train_step (forward + backward)",
        "",
        common.markdown_table(HEADER, [table_row(head, m.flops_ours, m), table_row(van, m.flops_vanilla, m, ref=False)]),
        "",
        f"Time per voxel, ours / vanilla (median over repetitions of ours / the adjacent vanilla block): "
        f"**{ratio:.3f}** (goal <= {GOAL_RATIO}: {'met' if ratio <= GOAL_RATIO else 'NOT met'}); per repetition "
        + ", ".join(f"{x:.2f}" for x in head.paired_ratios()) + "; ratio of medians "
        f"{head.median / van.median:.3f}.",
    ]


def section_notes(m: Measured) -> list[str]:
    """CPU-time ratio and RSS (CPU) or the sweep's fastest setting and memory note (CUDA); the sweep table."""
    head, van, lines = m.head, m.vanilla, []
    if not m.cuda:
        pc = head.paired_ratios(cpu_time=True)
        lines.append(f"By process CPU time instead of wall time (less sensitive to other jobs on shared cores): "
                     f"median paired ratio {statistics.median(pc):.3f} ({min(pc):.2f}-{max(pc):.2f}); CPU ms/iteration "
                     f"ours {1000 * statistics.median(head.cpu_seconds):.0f}, vanilla "
                     f"{1000 * statistics.median(van.cpu_seconds):.0f}.")
        lines += [f"Peak memory (CPU): process peak RSS {m.rss_gib:.2f} GiB with both trainers, their data and Python "
                  "(per-trainer GPU memory: n/a on CPU).",
                  "GPU figures (ms/iteration, voxels/s against the method's 10.4 M voxels/s, peak GPU memory, "
                  "achieved TFLOP/s, precision x torch.compile x channels-last sweep): pending: no GPU in this "
                  "session. Run `python -m bench.bench_pretraining --device cuda --size full` on one."]
    else:
        best = min((r for r in m.sweep if not r.error), key=lambda r: r.median, default=None)
        if best is not None:
            lines.append(f"Fastest setting of the sweep: {best.precision}, compile {'on' if best.compile else 'off'}, "
                         f"channels-last {'on' if best.channels_last else 'off'}: {m.voxels / best.median / 1e6:.1f} M "
                         f"voxels/s = {m.voxels / best.median / REFERENCE_VOXELS_PER_S:.1f}x the method's released "
                         f"code (10.4 M voxels/s fp32 on an H100; goal >= 5x).")
        lines.append("Peak memory: max_memory_allocated during the trainer's own steps minus what the other trainer "
                     "holds (weights, gradients, optimizer state); ours includes its EMA copy.")
    if m.sweep:
        lines += ["", "Sweep of our trainer (each row timed against vanilla blocks interleaved with it; TF32 switches "
                  "set per block: ours from its precision, vanilla PyTorch's defaults):", ""]
        lines.append(common.markdown_table(HEADER, [table_row(r, m.flops_ours, m) for r in m.sweep]))
    return lines


def record(m: Measured, args: argparse.Namespace) -> None:
    """Print the section, append it to ``--out`` (unless ``--no-write``), remove a temporary work folder."""
    if m.prepared_only:
        return
    lines = section_head(m, args) + section_notes(m)
    lines.append(f"\nTotal wall time {(time.perf_counter() - m.t_start) / 60:.1f} min (data, planning, compile included).")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        common.append_markdown(args.out, text)
        print(f"appended to {args.out}", file=sys.stderr)
    if m.temp:
        import shutil

        shutil.rmtree(m.work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
