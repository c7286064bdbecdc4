"""Classification benchmarks: throughput (exams/s) and linear probe vs fine-tune vs scratch AUROC.

Two parts, each optional (``--part throughput``, ``--part study``, default both):

**Throughput** of ``nnUNetTrainerOrthoDiffCls`` with the three views fused (sag + cor + ax, concat
fusion, fine-tune-shaped optimizer, scratch weights: the speed does not depend on the weights):

* training, model only: ``train_step`` on batches drawn beforehand from the trainer's own nnU-Net
  loader/augmentation (so loading is not timed), median over repetitions, exams/s = batch / time;
* training, end to end: the trainer's epochs (loading and augmentation in ``nnUNet_n_proc_DA``
  workers, or in-process with 0), exams/s from its progress log;
* inference: ``predict_exams`` (centre crop, loading in the main process) over every exam, and the
  forward pass alone on pre-collated batches;
* on CUDA: ms per training step in fp32/tf32/bf16/fp16 as measured by the trainer's
  ``precision="auto"`` (the choice it makes), and peak GPU memory.

``--size reduced`` (CPU): small phantoms (scale 0.3, 0.8 mm pixels) and a tiny network
(``write_shrunk_plans``, 8 features, 3 stages). ``--size full`` (GPU): adult-size phantoms
(scale 1.0, 0.4 mm pixels, 3 mm slices) and the planned ResEnc-M network unchanged.
Without a GPU the script says what it would measure there and marks those rows pending.

**Study**: phantom exams with visible abnormalities, three views. An *unlabeled* corpus of other
phantom exams (another seed; plans transferred from the labeled set, ``--plans-from``) pretrains one
diffusion model per view (``orthodiff pretrain``), once: every seed and mode uses the same encoders
(reused from ``--work`` when present); the labeled set (patient-grouped 5 folds, fixed pseudonym key)
trains the classifier in three modes -- ``probe`` (frozen pretrained encoder), ``finetune`` (encoder
at 0.05x the head's learning rate) and ``scratch`` (same network, random encoder) -- with identical
data and steps, for ``--seeds`` classifier seeds (initialisation and batch order). Run k (k = 0..4)
trains on fold k's training exams minus fold k+1 (optionally ``--label-fractions`` of them), selects
the checkpoint and thresholds on fold k's validation exams, and predicts fold k+1, which it never
saw; the held-out predictions of the five runs cover every exam once and are pooled. Reported per
mode: each exam's probability averaged over the seeds, pooled held-out per-label and macro AUROC
with 95% CIs that resample patients (``bootstrap_ci``/``classification_metrics`` with
``clusters``); each seed's pooled macro AUROC (the spread); the paired difference of each mode minus
scratch with a patient-bootstrap CI; with two label fractions the ratio low/high against issue 12's
goal (>= 0.95); and, per epoch, the training loss and the selection-set loss and mean AUROC averaged
over the runs (convergence). A small synthetic study: it compares the modes on this data; it is no
evidence of clinical accuracy.

**Convergence** (``--part convergence``): the calibration of the study's training length -- one long run
per mode on fold 0 (same data, pretraining and recipe), the training loss and the selection-set loss
and mean AUROC per epoch.

**MRNet** (``--part mrnet``; needs ``../shared/data/mrnet``): the 6 real MRNet exams converted into
three datasets, one diffusion model per view pretrained on them *without labels*, then the three-view
classifier (3 labels: abnormal, ACL, meniscus) in each mode, 3 out-of-fold runs (validation fold k,
held-out fold k+1) whose held-out predictions are pooled: per-label metrics with bootstrap 95% CIs. Six
exams: the run shows the pipeline on real data; no accuracy is claimed.

Usage::

    OMP_NUM_THREADS=2 python -m bench.bench_classification                       # CPU: both parts, reduced
    python -m bench.bench_classification --part throughput --size full --device cuda   # the GPU figures

Appends a Markdown section to ``--out`` (default ``bench/results/classification.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import common
from bench.common import markdown_table as table
from orthodiff_nnunet.conventions import (
    CLASSIFICATION_CONFIGURATION,
    DIFFUSION_CONFIGURATION,
    PLAIN_PLANS,
    RESENC_M_PLANS,
    default_encoder_path,
)

KEY = "3c" * 32  # fixed pseudonym key: fixed exam names and folds
THROUGHPUT_ID, STUDY_ID, CORPUS_ID, MRNET_ID = 941, 961, 971, 981  # +100 for --size full
MRNET_CASES = ["0001", "0003", "1123", "1127", "1128", "1129"]
# MRNet's .npy volumes carry no spacing: user-supplied, as in tests/test_classification.py
MRNET_SPACING = {"sag": (0.6, 0.6, 3.0), "cor": (0.6, 0.6, 3.0), "ax": (0.6, 0.6, 3.5)}
PLANS = "benchPlans"


# ----------------------------------------------------------------------------------------------
# data
def phantom_group(work: Path, dataset_id: int, name: str, n_cases: int, seed: int, scale: float,
                  in_plane_mm: float, planner: str, plans_from: int | None = None) -> dict[str, str]:
    """sag/cor/ax phantom datasets, converted and preprocessed (reused when present); view -> name."""
    import dataclasses

    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.data.phantom import write_site
    from orthodiff_nnunet.data.sites import SITE_3T
    from orthodiff_nnunet.planning import plan_and_preprocess

    raw, pre = Path(os.environ["nnUNet_raw"]), Path(os.environ["nnUNet_preprocessed"])
    key = work / "pseudonym.key"
    if not key.is_file():
        key.write_text(KEY + "\n")
    if not list(raw.glob(f"Dataset{dataset_id:03d}_*")):
        site = dataclasses.replace(SITE_3T, in_plane_spacing_mm=in_plane_mm)
        manifest = write_site(work / f"site_{name}", site, n_cases=n_cases, seed=seed, prevalence=0.5, scale=scale)
        convert(manifest, dataset_id, name, num_processes=1, pseudonym_key=key)
    with common.with_planning_env():  # nnU-Net's planning breaks with nnUNet_n_proc_DA=0
        plan_and_preprocess([dataset_id, dataset_id + 1, dataset_id + 2], num_processes=2, show_progress=False,
                            planner=planner, plans_from=plans_from)
    out = {}
    for folder in sorted(pre.glob(f"Dataset{dataset_id:03d}_*")) + sorted(pre.glob(f"Dataset{dataset_id + 1:03d}_*")) \
            + sorted(pre.glob(f"Dataset{dataset_id + 2:03d}_*")):
        out[json.loads((folder / "dataset.json").read_text())["orthodiff"]["orientation"]] = folder.name
    return out


def shrink(names: dict[str, str], source: str, features: int, diffusion_batch: int | None = None) -> None:
    """Tiny-network copy of the plans (same data); optionally a smaller diffusion batch for CPU."""
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.utils import atomic_write_json

    pre = Path(os.environ["nnUNet_preprocessed"])
    for name in names.values():
        write_shrunk_plans(pre / name, source, PLANS, max_features=features, max_stages=3)
        if diffusion_batch:
            f = pre / name / f"{PLANS}.json"
            plans = json.loads(f.read_text())
            plans["configurations"][DIFFUSION_CONFIGURATION]["batch_size"] = diffusion_batch
            atomic_write_json(f, plans)


# ----------------------------------------------------------------------------------------------
# throughput
def throughput_trainer(args, device):
    """The three-view phantom data, a scratch-mode classifier on it and batches drawn from its own loader."""
    import torch

    from orthodiff_nnunet.classification import _view_data, resolve_views
    from orthodiff_nnunet.data.targets import load_dataset_targets
    from orthodiff_nnunet.trainers.classification import nnUNetTrainerOrthoDiffCls

    full = args.size == "full"
    names = phantom_group(args.work, THROUGHPUT_ID + (100 if full else 0), "ClsBenchFull" if full else "ClsBench",
                          args.cases, args.seed, 1.0 if full else 0.3, 0.4 if full else 0.8,
                          "resenc_m" if full else "plain")
    plans = RESENC_M_PLANS if full else PLANS
    if not full:
        shrink(names, PLAIN_PLANS, args.features)
    views = resolve_views(list(names.values()))
    vds = {v: _view_data(v, n, plans, CLASSIFICATION_CONFIGURATION) for v, n in views.items()}
    targets = {v: load_dataset_targets(n) for v, n in views.items()}
    trainer = nnUNetTrainerOrthoDiffCls(vds, targets, 0, args.work / "throughput_run", device)
    trainer.mode, trainer.batch_size = "scratch", args.batch_size
    trainer.num_epochs, trainer.num_iterations_per_epoch = 1, args.iterations
    trainer.precision = "auto" if device.type == "cuda" else "fp32"
    trainer.initialize()
    gen = trainer._start_augmenter()
    batches = [next(gen) for _ in range(args.iterations)]
    if hasattr(gen, "_finish"):
        gen._finish()
    trainer.choose_precision(batches[0])
    if trainer.precision == "fp16":
        trainer.grad_scaler = torch.amp.GradScaler("cuda")
    return trainer, batches, vds, plans


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def time_train_steps(trainer, batches, args, device) -> list[float]:
    """Seconds per ``train_step`` of each repetition, after a two-step warm-up."""
    for b in batches[:2]:  # warm-up
        trainer.train_step(b)
    step_s = []
    for _ in range(args.repeats):
        _sync(device)
        t = time.perf_counter()
        for b in batches:
            trainer.train_step(b)
        _sync(device)
        step_s.append((time.perf_counter() - t) / len(batches))
    return step_s


def time_inference(trainer, args, device) -> tuple[float, float, int]:
    """(exams/s of ``predict_exams`` with loading, exams/s of the forward pass alone, exams)."""
    import torch

    from orthodiff_nnunet.data.exam_loaders import MultiViewExamLoader

    exams = trainer.exams_train + trainer.exams_selection
    t = time.perf_counter()
    trainer.predict_exams(exams)
    infer_e2e = len(exams) / (time.perf_counter() - t)
    loader = MultiViewExamLoader(exams, trainer._loaders(exams, training=False), trainer._shapes(), args.batch_size, False)
    collated = [loader.collate(exams[i:i + args.batch_size]) for i in range(0, len(exams), args.batch_size)]
    trainer.network.eval()

    def forward(batch) -> None:
        d, p, _ = trainer._to_device(batch)
        with trainer._autocast():
            trainer.network(d, p)

    with torch.no_grad():
        forward(collated[0])  # warm-up
        _sync(device)
        t = time.perf_counter()
        for b in collated:
            forward(b)
        _sync(device)
    return infer_e2e, len(exams) / (time.perf_counter() - t), len(exams)


def throughput(args, device) -> str:
    """Training (model step; end to end) and inference exams/s of the three-view classifier (module docstring)."""
    import torch

    trainer, batches, vds, plans = throughput_trainer(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = time_train_steps(trainer, batches, args, device)
    train_model = args.batch_size / statistics.median(step_s)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    # end to end: the trainer's own epoch (loading + augmentation included)
    trainer.current_epoch = 0
    trainer.history = []
    trainer.run_training()
    train_e2e = trainer.history[-1]["train_exams_per_s"]
    infer_e2e, infer_model, n_exams = time_inference(trainer, args, device)
    patches = ", ".join(f"{v} {'x'.join(map(str, d.patch_size))}" for v, d in vds.items())
    n_params = sum(p.numel() for p in trainer.network.parameters())
    lines = [f"### Throughput, {args.size} size, {device.type}",
             f"Views sag+cor+ax fused (concat); patches (through-plane first) {patches}; batch {args.batch_size} exams; "
             f"network {n_params / 1e6:.3f} M parameters ({plans}); precision {trainer.precision}; "
             f"{args.iterations} steps x {args.repeats} repetitions; `nnUNet_n_proc_DA`={os.environ.get('nnUNet_n_proc_DA', 'default')}.",
             "",
             table(["what", "exams/s", "notes"], [
                 ["training, model step only", f"{train_model:.2f}",
                  f"median {1000 * statistics.median(step_s):.0f} ms/step (min {1000 * min(step_s):.0f}, max {1000 * max(step_s):.0f})"],
                 ["training, end to end (epoch incl. loading + augmentation)", f"{train_e2e:.2f}", ""],
                 ["inference, forward only", f"{infer_model:.2f}", f"{n_exams} exams"],
                 ["inference, `predict_exams` incl. loading", f"{infer_e2e:.2f}", f"{n_exams} exams"],
             ])]
    if device.type == "cuda":
        lines += ["", "Precision measured by `precision=\"auto\"` (ms per training step): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in trainer.precision_timings.items())
                  + f" -> **{trainer.precision}**; peak GPU memory {peak:.2f} GiB."]
    return "\n".join(lines)


def pending_gpu_section() -> str:
    return "\n".join([
        "### Throughput on GPU: pending",
        "No CUDA device in this session. On a GPU machine run "
        "`python -m bench.bench_classification --part throughput --size full --device cuda`: it measures, with "
        "adult-size phantoms (0.4 mm pixels, 3 mm slices) and the planned ResEnc-M network on the three views, "
        "training exams/s (model step; end to end with nnU-Net's augmentation workers), inference exams/s "
        "(forward; with loading), ms/step in fp32/tf32/bf16/fp16 and the precision the trainer picks, and peak "
        "GPU memory.",
        "",
        table(["what", "exams/s"], [["training, model step only", "pending"], ["training, end to end", "pending"],
                                    ["inference, forward only", "pending"], ["inference, incl. loading", "pending"]]),
    ])


# ----------------------------------------------------------------------------------------------
# probe vs fine-tune vs scratch
def prepare_data(args) -> tuple[dict[str, str], dict[str, str]]:
    """The labeled and the corpus phantom groups (reused when present in ``--work``), plans shrunk."""
    labeled = phantom_group(args.work, STUDY_ID, "ClsStudy", args.study_cases, args.seed, 0.3, 0.8, "plain")
    corpus = phantom_group(args.work, CORPUS_ID, "ClsCorpus", args.corpus_cases, args.seed + 1000, 0.3, 0.8, "plain",
                           plans_from=STUDY_ID)
    shrink(labeled, PLAIN_PLANS, args.features)
    shrink(corpus, PLAIN_PLANS, args.features, diffusion_batch=args.diffusion_batch)
    pre = Path(os.environ["nnUNet_preprocessed"])
    for view, name in corpus.items():
        # Workaround: plans transfer writes no dataset_fingerprint.json, but nnUNetTrainer.on_train_start
        # (used by `orthodiff pretrain`) copies it into the results as a record. Give the corpus the
        # fingerprint of the dataset its plans come from; nothing else reads it.
        if not (pre / name / "dataset_fingerprint.json").is_file():
            shutil.copyfile(pre / labeled[view] / "dataset_fingerprint.json", pre / name / "dataset_fingerprint.json")
    return labeled, corpus


def prepare_study(args, device):
    """Labeled + corpus phantom groups and one diffusion pretraining per view (reused when present in ``--work``).

    Returns ``(labeled, corpus, data_s, pretraining)``: view -> dataset name twice, data seconds, and view ->
    ``{"seconds", "loss_first", "loss_last", "iterations", "reused"}``. The pretraining is done once and shared by
    every classifier seed and mode; its record is kept in ``<work>/pretraining_record.json`` so that a run reusing
    the work folder still reports what the pretraining was.
    """
    t0 = time.perf_counter()
    labeled, corpus = prepare_data(args)
    data_s = time.perf_counter() - t0
    with Lanes(1) as lanes:
        out = collect_pretraining(args, corpus, submit_pretraining(args, corpus, device, lanes))
    return labeled, corpus, data_s, out


def pretrain_view(name: str, args, device) -> dict:
    """One view's diffusion pretraining (a lane's job): seconds and first/last loss."""
    from orthodiff_nnunet.pretraining import pretrain

    t = time.perf_counter()
    r = pretrain(name, plans=PLANS, iterations=args.pretrain_iterations,
                 checkpoint_every=max(1, args.pretrain_iterations // 4), learning_rate=args.pretrain_lr,
                 device=str(device.type), sample_steps=0, val_iterations=2)
    return {"seconds": time.perf_counter() - t, "loss_first": r.train_losses[0], "loss_last": r.train_losses[-1],
            "iterations": args.pretrain_iterations, "reused": False}


def submit_pretraining(args, corpus: dict[str, str], device, lanes: "Lanes") -> dict:
    """view -> future of ``pretrain_view`` for the views without an encoder in ``--work`` (the others are reused)."""
    return {view: lanes.submit(pretrain_view, name, args, device) for view, name in corpus.items()
            if not default_encoder_path(name, PLANS).is_file()}


def collect_pretraining(args, corpus: dict[str, str], futures: dict) -> dict[str, dict]:
    """Wait for the pretrainings; view -> record (kept in ``<work>/pretraining_record.json``, which a run that
    reuses the encoders reports from)."""
    from orthodiff_nnunet.utils import atomic_write_json

    record_file = args.work / "pretraining_record.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {"pretrain": {}}
    out: dict[str, dict] = {}
    for view in corpus:
        if view not in futures:
            out[view] = {**record["pretrain"].get(view, {}), "reused": True}
            continue
        out[view] = record["pretrain"][view] = futures[view].result()
        atomic_write_json(record_file, record)
        print(f"pretrained {view}: loss {out[view]['loss_first']:.3f} -> {out[view]['loss_last']:.3f} "
              f"({out[view]['seconds'] / 60:.1f} min)", flush=True)
    return out


class Lanes:
    """``submit`` runs jobs in ``n`` spawned processes of one thread each (n > 1), or at once in this process (n = 1:
    the future is already done). Torch with 2 threads on a 2-core machine is slower than 2 one-thread processes,
    and the study's runs are independent; the children inherit the nnU-Net folders from ``os.environ``."""

    def __init__(self, n: int):
        self.n, self.pool = n, None

    def __enter__(self) -> "Lanes":
        if self.n > 1:
            from orthodiff_nnunet.utils import one_thread_processes

            self.pool = one_thread_processes(self.n)
        return self

    def submit(self, fn, *a):
        from concurrent.futures import Future

        if self.pool is not None:
            return self.pool.submit(fn, *a)
        f = Future()
        try:
            f.set_result(fn(*a))
        except Exception as e:  # raised by result(), as from a lane
            f.set_exception(e)
        return f

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=exc[0] is not None)


def oof_runs(mode: str, seed: int, label_fraction: float, args, device) -> dict:
    """The study's out-of-fold runs of one mode, classifier seed and label fraction.

    Run k (k = 0..folds-1) trains on fold k's training exams minus fold k+1 (``label_fraction`` of them, the
    same subset for every seed and mode), selects on fold k's validation exams, predicts fold k+1.

    Returns:
        ``{"p": exam -> (L,) held-out probabilities, "pred": exam -> (L,) decisions at the run's thresholds,
        "y": exam -> (L,) targets, "labels", "history": one per run (per-epoch rows), "best_epoch": per run,
        "n_train": per run, "seconds"}``.
    """
    import csv

    import numpy as np

    from orthodiff_nnunet.classification import train_classification

    t = time.perf_counter()
    out = {"p": {}, "pred": {}, "y": {}, "history": [], "best_epoch": [], "n_train": [], "labels": None}
    for k in range(args.folds):
        res = train_classification(
            STUDY_ID, plans=PLANS, mode=mode, encoders_from=None if mode == "scratch" else CORPUS_ID, fold=k,
            test_fold=(k + 1) % 5, epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
            batch_size=args.batch_size, learning_rate=args.lr, label_fraction=label_fraction,
            device=str(device.type), seed=seed, n_boot=0,
            run_name=f"study_{mode}_lf{label_fraction:g}_s{seed}_{int(time.time())}")
        labels = out["labels"] = res.label_names
        out["history"].append(res.history)
        out["best_epoch"].append(res.best_epoch)
        out["n_train"].append(res.num_exams["train"])
        with open(res.output_folder / "test_predictions.csv", newline="") as f:
            for r in csv.DictReader(f):
                cell = lambda key: float(r[key]) if r[key] != "" else np.nan  # noqa: E731
                out["p"][r["exam"]] = np.array([cell(f"p_{n}") for n in labels])
                out["pred"][r["exam"]] = np.array([cell(f"pred_{n}") for n in labels])
                out["y"][r["exam"]] = np.array([cell(f"target_{n}") for n in labels])
    out["seconds"] = time.perf_counter() - t
    return out


def _macro_auroc_on(y, p, label_idx):
    """Macro AUROC over exactly ``label_idx`` (NaN when one of them is undefined on these rows)."""
    import math

    import numpy as np

    from orthodiff_nnunet.evaluation.classification import auroc

    vals = [auroc(y[:, j], p[:, j]) for j in label_idx]
    return math.nan if any(math.isnan(v) for v in vals) else float(np.mean(vals))


@dataclass
class StudyPool:
    """The study's out-of-fold predictions pooled per (mode, label fraction), with patients as clusters."""

    runs: dict  # (mode, fraction) -> one oof_runs result per seed
    labels: list
    exams: list
    y: object  # exams x labels targets
    clusters: list
    n_missing: int
    p_avg: dict  # (mode, fraction) -> exams x labels probability, averaged over the seeds
    metrics: dict
    per_seed: dict  # (mode, fraction) -> each seed's pooled macro AUROC

    @property
    def n_patients(self) -> int:
        return len(set(self.clusters))


RUN_SETTINGS = ("epochs", "iterations_per_epoch", "batch_size", "lr", "folds", "features", "study_cases",
                "corpus_cases", "pretrain_iterations", "pretrain_lr", "diffusion_batch", "seed")


def cached_oof_runs(mode: str, seed: int, label_fraction: float, args, device) -> dict:
    """``oof_runs``, kept in ``<work>/study_runs/`` with the settings it ran with: a killed study resumes at the
    first missing run, and a run with other settings is redone, never mixed in."""
    import numpy as np

    from orthodiff_nnunet.utils import atomic_write_json

    f = args.work / "study_runs" / f"{mode}_lf{label_fraction:g}_s{seed}.json"
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    if f.is_file():
        kept = json.loads(f.read_text())
        if kept["settings"] == settings:
            r = kept["run"]
            for k in ("p", "pred", "y"):
                r[k] = {e: np.array(v, dtype=float) for e, v in r[k].items()}
            return {**r, "reused": True}
    r = oof_runs(mode, seed, label_fraction, args, device)
    f.parent.mkdir(exist_ok=True)
    atomic_write_json(f, {"settings": settings, "run": {
        **r, **{k: {e: [None if x != x else float(x) for x in v] for e, v in r[k].items()} for k in ("p", "pred", "y")}}})
    return r


def study_runs(args, device, fractions: list[float], seeds: list[int], lanes: Lanes, pretrained) -> dict:
    """``oof_runs`` of every label fraction, mode and seed, in ``lanes``: scratch first, beside the pretrainings;
    the pretrained modes once ``pretrained()`` (which waits for the pretrainings) has returned."""
    import numpy as np

    from orthodiff_nnunet.evaluation.classification import mean_auroc

    keys = [(mode, lf, s) for lf in fractions for mode in args.modes for s in seeds]
    futures = {k: lanes.submit(cached_oof_runs, k[0], k[2], k[1], args, device) for k in keys if k[0] == "scratch"}
    pretrained()
    futures.update({k: lanes.submit(cached_oof_runs, k[0], k[2], k[1], args, device) for k in keys if k[0] != "scratch"})
    runs: dict[tuple[str, float], list[dict]] = {}
    for mode, lf, s in keys:
        r = futures[(mode, lf, s)].result()
        runs.setdefault((mode, lf), []).append(r)
        print(f"{mode} lf {lf:g} seed {s}: pooled held-out macro AUROC "
              f"{mean_auroc(np.array(list(r['y'].values())), np.array([r['p'][e] for e in r['y']])):.3f} "
              f"({r['seconds']:.0f} s{', kept from an earlier run' if r.get('reused') else ''})", flush=True)
    return runs


def pool_study(runs: dict, labeled: dict[str, str], args) -> StudyPool:
    """Each exam's probability averaged over the seeds (decisions: majority of the seeds), pooled metrics with
    patient-bootstrap CIs (a patient's exams are not independent observations), each seed's macro AUROC."""
    import numpy as np

    from orthodiff_nnunet.data.targets import load_dataset_targets
    from orthodiff_nnunet.evaluation.classification import classification_metrics, cluster_ids, mean_auroc

    first = next(iter(runs.values()))[0]
    labels, exams = first["labels"], sorted(first["y"])
    if any(sorted(r["p"]) != exams for rs in runs.values() for r in rs):
        raise RuntimeError("the modes/seeds did not predict the same held-out exams")
    y = np.stack([first["y"][e] for e in exams])
    cases = load_dataset_targets(labeled[sorted(labeled)[0]]).cases
    patient_of = {ct.exam: ct.patient for ct in cases.values()}
    clusters, n_missing = cluster_ids([patient_of.get(e) for e in exams], exams)
    p_avg = {key: np.mean([np.stack([r["p"][e] for e in exams]) for r in rs], axis=0) for key, rs in runs.items()}
    d_avg = {key: (np.mean([np.stack([r["pred"][e] for e in exams]) for r in rs], axis=0) > 0.5).astype(float)
             for key, rs in runs.items()}
    metrics = {key: classification_metrics(y, p_avg[key], labels, n_boot=args.n_boot, seed=0, decisions=d_avg[key],
                                           clusters=clusters, n_without_patient=n_missing) for key in runs}
    per_seed = {key: [mean_auroc(y, np.stack([r["p"][e] for e in exams])) for r in rs] for key, rs in runs.items()}
    return StudyPool(runs, labels, exams, y, clusters, n_missing, p_avg, metrics, per_seed)


def compare_macro(pool: StudyPool, a, b, op, n_boot: int) -> tuple[float, float, float]:
    """``op``(macro AUROC of ``a``, of ``b``) on the same exams, patient-bootstrap CI (labels defined for both)."""
    import math

    import numpy as np

    from orthodiff_nnunet.evaluation.classification import auroc, bootstrap_ci

    y, pa, pb = pool.y, pool.p_avg[a], pool.p_avg[b]
    idx = [j for j in range(len(pool.labels)) if not math.isnan(auroc(y[:, j], pa[:, j]))
           and not math.isnan(auroc(y[:, j], pb[:, j]))]

    def stat(rows):
        return op(_macro_auroc_on(y[rows], pa[rows], idx), _macro_auroc_on(y[rows], pb[rows], idx))

    lo, hi, _ = bootstrap_ci(stat, len(pool.exams), n_boot=n_boot, seed=0, clusters=pool.clusters)
    return stat(np.arange(len(pool.exams))), lo, hi


def _na(v: float, digits: int) -> str:
    return "n/a" if v != v else f"{v:.{digits}f}"


def mode_rows(pool: StudyPool, n_seeds: int) -> tuple[list[list[str]], list[str]]:
    """Per (mode, fraction): pooled macro and per-label AUROC with CIs, per-seed spread, minutes; the details."""
    import numpy as np

    rows, details = [], []
    for (mode, lf), m in pool.metrics.items():
        lo, hi = m.macro_ci["auroc"]
        ps = pool.per_seed[(mode, lf)]
        rows.append([mode, f"{100 * lf:g} %", f"{_na(m.macro['auroc'], 3)} [{_na(lo, 3)}, {_na(hi, 3)}]",
                     *[f"{_na(x.auroc, 2)} [{_na(x.ci['auroc'][0], 2)}, {_na(x.ci['auroc'][1], 2)}]" for x in m.labels],
                     " / ".join(_na(a, 3) for a in ps) + f" (sd {np.std(ps, ddof=1):.3f})" if len(ps) > 1
                     else _na(ps[0], 3),
                     f"{sum(r['seconds'] for r in pool.runs[(mode, lf)]) / 60:.1f}"])
        details.append(f"<details><summary>{mode}, {100 * lf:g} % of the labels: pooled held-out metrics, "
                       f"probabilities averaged over {n_seeds} seeds</summary>\n\n{m.to_markdown()}\n\n</details>")
    return rows, details


def comparison_rows(pool: StudyPool, args, fractions: list[float]) -> tuple[list[list[str]], list[list[str]]]:
    """Each mode minus scratch (paired, per fraction); with two fractions the low / high ratio against the goal."""
    diff_rows, goal = [], []
    for lf in fractions:
        for mode in args.modes:
            if mode == "scratch" or ("scratch", lf) not in pool.runs:
                continue
            d, lo, hi = compare_macro(pool, (mode, lf), ("scratch", lf), lambda a, b: a - b, args.n_boot)
            seed_d = [a - b for a, b in zip(pool.per_seed[(mode, lf)], pool.per_seed[("scratch", lf)])]
            diff_rows.append([f"{mode} - scratch", f"{100 * lf:g} %", f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]",
                              " / ".join(f"{x:+.3f}" for x in seed_d)])
    if len(fractions) > 1:
        lo_f, hi_f = fractions[-1], fractions[0]
        for mode in args.modes:
            r, lo, hi = compare_macro(pool, (mode, lo_f), (mode, hi_f), lambda a, b: a / b, args.n_boot)
            goal.append([mode, f"{r:.3f} [{lo:.3f}, {hi:.3f}]", "met" if r >= 0.95 else "not met",
                         "CI above 0.95" if lo >= 0.95 else ("CI below 0.95" if hi < 0.95 else "CI spans 0.95")])
    return diff_rows, goal


def convergence_rows(pool: StudyPool, args, fraction: float) -> tuple[list[str], list[list[str]], dict]:
    """Per epoch, the mean over the runs (folds x seeds) of each mode at ``fraction``; best epochs per mode."""
    import numpy as np

    conv_modes = [m for m in args.modes if (m, fraction) in pool.runs]
    conv_rows = []
    for ep in range(args.epochs):
        row = [str(ep + 1), str((ep + 1) * args.iterations_per_epoch)]
        for mode in conv_modes:
            hs = [h[ep] for r in pool.runs[(mode, fraction)] for h in r["history"]]
            row += [f"{np.mean([h['train_loss'] for h in hs]):.3f}", f"{np.mean([h['selection_loss'] for h in hs]):.3f}",
                    f"{np.nanmean([h['selection_mean_auroc'] for h in hs]):.3f}"]
        conv_rows.append(row)
    best = {mode: [b + 1 for r in pool.runs[(mode, fraction)] for b in r["best_epoch"]] for mode in conv_modes}
    return conv_modes, conv_rows, best


def study_design_text(pool: StudyPool, args, seeds: list[int], fractions: list[float], data_s: float,
                      pretraining: dict) -> list[str]:
    """The study section's opening: labeled data, runs, seeds, pretraining, network, classifier, times."""
    n_train = {lf: sorted({n for rs in (pool.runs[(m, lf)] for m in args.modes) for r in rs for n in r["n_train"]})
               for lf in fractions}
    pre_txt = ", ".join(
        f"{v} {x['loss_first']:.3f} -> {x['loss_last']:.3f}" for v, x in pretraining.items() if "loss_first" in x)
    pre_time = ", ".join(f"{v} {x['seconds'] / 60:.1f} min" + (" (earlier, reused)" if x.get("reused") else "")
                         for v, x in pretraining.items() if "seconds" in x)
    steps = args.epochs * args.iterations_per_epoch
    return [
        f"### Linear probe vs fine-tune vs scratch, {len(seeds)} seeds (phantom, three views fused)",
        f"Labeled: {args.study_cases} phantom exams x sag/cor/ax (scale 0.3, 0.8 mm pixels, 3 mm slices, every "
        f"abnormality with probability 0.5; {pool.n_patients} patients), patient-grouped 5 folds. Per mode and seed "
        f"{args.folds} runs: run k trains on fold k's training exams minus fold k+1, selects the checkpoint and "
        f"thresholds on fold k's validation exams and predicts fold k+1, never seen: the {len(pool.exams)} held-out "
        f"predictions (every exam once) are pooled. Seeds {', '.join(map(str, seeds))}: the seed sets the "
        "classifier's initialisation (head, and the encoder for scratch) and the order/augmentation of the "
        "training batches; the data, folds and pretraining are the same for every seed. "
        f"Pretraining, done once per view and shared by every seed and mode: {args.corpus_cases} other phantom "
        f"exams (used without labels, plans transferred), {args.pretrain_iterations} diffusion iterations per view "
        f"(batch {args.diffusion_batch}, lr {args.pretrain_lr}" + (f"; epsilon-MSE {pre_txt}" if pre_txt else "")
        + f"). Network: plain plans shrunk to {args.features} features, 3 stages. Classifier: {args.epochs} epochs x "
        f"{args.iterations_per_epoch} steps = {steps} steps, batch {args.batch_size}, head lr {args.lr} with "
        "polynomial decay (fine-tune: encoder 0.05x), checkpoint = best selection mean AUROC, nnU-Net augmentation "
        "(left-right mirroring), clean input (t = 0). Training exams per run: "
        + "; ".join(f"{100 * lf:g} % of the labels: {'/'.join(map(str, n))}" for lf, n in n_train.items())
        + " (a label fraction keeps the same seeded subset, per site, for every seed and mode).",
        f"Times: data {data_s / 60:.1f} min" + (f", pretraining {pre_time}" if pre_time else "")
        + (f"; the pretrainings and runs went {args.lanes} at a time, one process of one thread each (train min below "
           "is each run's own wall time)" if args.lanes > 1 else "") + ".",
        "",
    ]


def study_section(pool: StudyPool, args, seeds: list[int], fractions: list[float], data_s: float,
                  pretraining: dict) -> str:
    """The study's Markdown: design, pooled AUROC per mode, paired differences, the goal, convergence."""
    import numpy as np

    rows, details = mode_rows(pool, len(seeds))
    diff_rows, goal = comparison_rows(pool, args, fractions)
    conv_modes, conv_rows, best = convergence_rows(pool, args, fractions[0])
    lines = study_design_text(pool, args, seeds, fractions, data_s, pretraining) + [
        f"Pooled held-out AUROC per mode: each exam's probability averaged over the {len(seeds)} seeds, then the "
        f"metric over the {len(pool.exams)} exams; 95% CIs from {args.n_boot} bootstrap resamples of the "
        f"{pool.n_patients} patients (seed 0). Per seed: the pooled held-out macro AUROC of that seed alone (its "
        "spread is the training noise).",
        "",
        table(["mode", "labels", "macro AUROC [95% CI]", *pool.labels, "macro AUROC per seed", "train min"], rows),
        "",
        f"Paired difference of the seed-averaged pooled macro AUROC on the same {len(pool.exams)} exams (each "
        "resample draws patients once for both modes; labels defined for both):",
        "",
        table(["difference", "labels", "macro AUROC difference [95% CI]", "per seed"], diff_rows),
        "",
    ]
    if goal:
        lines += [f"Goal (issue 12): macro AUROC with {100 * fractions[-1]:g} % of the labels >= 0.95 x with "
                  f"{100 * fractions[0]:g} %. Ratio of the seed-averaged pooled macro AUROCs, patient-bootstrap CI:",
                  "", table(["mode", "ratio [95% CI]", "point estimate", "CI"], goal), ""]
    else:
        lines += ["Goal (issue 12): macro AUROC at 10 % of the labels >= 0.95 x full-label. Not measured in this run "
                  "(only the full label fraction was run: `--label-fractions 1 0.1` runs both).", ""]
    lines += [
        f"Convergence ({100 * fractions[0]:g} % of the labels): per epoch, the mean over the "
        f"{args.folds * len(seeds)} runs (folds x seeds) of the training loss, the selection-set loss (BCE) and the "
        "selection-set mean AUROC; best epoch (checkpoint) per run: "
        + "; ".join(f"{m} median {int(np.median(b))} (range {min(b)}-{max(b)})" for m, b in best.items()) + ".",
        "",
        table(["epoch", "steps", *[f"{m} {k}" for m in conv_modes for k in ("train loss", "sel loss", "sel AUROC")]],
              conv_rows),
        "",
        "Synthetic phantoms, one data seed, a tiny network: the comparison is of the modes on this data; it is no "
        "evidence of clinical accuracy.",
        "",
        *details,
    ]
    return "\n".join(lines)


def study(args, device) -> str:
    """Probe vs fine-tune vs scratch (see the module docstring): pretraining once, the runs, the pooled section."""
    t0 = time.perf_counter()
    labeled, corpus = prepare_data(args)
    data_s = time.perf_counter() - t0
    seeds = [args.seed + i for i in range(args.seeds)]
    fractions = sorted(set(args.label_fractions), reverse=True)
    with Lanes(args.lanes) as lanes:
        pre_futures, pretraining = submit_pretraining(args, corpus, device, lanes), {}
        runs = study_runs(args, device, fractions, seeds, lanes,
                          lambda: pretraining.update(collect_pretraining(args, corpus, pre_futures)))
    pool = pool_study(runs, labeled, args)
    return study_section(pool, args, seeds, fractions, data_s, pretraining)


def convergence(args, device) -> str:
    """Calibration of the study's training length: one long run per mode (fold 0, test fold 1, seed ``--seed``)
    with the study's data, pretraining and recipe; per epoch the training loss and the selection-set loss and
    mean AUROC. Where they flatten gives the ``--epochs x --iterations-per-epoch`` of the study."""
    from orthodiff_nnunet.classification import train_classification

    prepare_study(args, device)
    blocks = []
    for mode in args.modes:
        t = time.perf_counter()
        res = train_classification(
            STUDY_ID, plans=PLANS, mode=mode, encoders_from=None if mode == "scratch" else CORPUS_ID, fold=0,
            test_fold=1, epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
            batch_size=args.batch_size, learning_rate=args.lr, device=str(device.type), seed=args.seed, n_boot=0,
            run_name=f"calib_{mode}_{int(time.time())}")
        seconds = time.perf_counter() - t
        rows = [[str(h["epoch"] + 1), str((h["epoch"] + 1) * args.iterations_per_epoch), f"{h['train_loss']:.3f}",
                 f"{h['selection_loss']:.3f}", f"{h['selection_mean_auroc']:.3f}", f"{h['seconds']:.0f}"]
                for h in res.history]
        blocks += [f"{mode}: {seconds / 60:.1f} min, best epoch {res.best_epoch + 1}, held-out (fold 1) macro AUROC "
                   f"{res.test.macro['auroc']:.3f}", "",
                   table(["epoch", "steps", "train loss", "selection loss", "selection mean AUROC", "s"], rows), ""]
        print(blocks[-4], flush=True)
    return "\n".join([
        "### Convergence calibration of the probe / fine-tune / scratch study (phantom, three views fused)",
        f"One run per mode: fold 0 trains ({args.study_cases} phantom exams, patient-grouped 5 folds), its "
        f"validation exams select, fold 1 is held out; seed {args.seed}; {args.epochs} epochs x "
        f"{args.iterations_per_epoch} steps, batch {args.batch_size}, head lr {args.lr} (polynomial decay); the "
        "study's data, pretraining (reused from --work) and network.",
        "", *blocks])


# ----------------------------------------------------------------------------------------------
# the real MRNet exams
def pooled_runs(dataset_id: int, mode: str, n_folds: int, args, device, encoders_from=None, runs: int | None = None):
    """Out-of-fold runs k = 0..runs-1 (validation fold k, held-out fold k+1 mod n_folds): the pooled held-out
    prediction rows, label names, each run's held-out macro AUROC, and seconds."""
    import csv

    from orthodiff_nnunet.classification import train_classification

    t = time.perf_counter()
    pooled, per_run, labels = [], [], None
    for k in range(n_folds if runs is None else runs):
        res = train_classification(
            dataset_id, plans=PLANS, mode=mode, encoders_from=None if mode == "scratch" else encoders_from, fold=k,
            test_fold=(k + 1) % n_folds, epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
            batch_size=args.batch_size, learning_rate=args.lr, device=str(device.type), seed=args.seed, n_boot=0,
            run_name=f"bench_{mode}_{int(time.time())}")
        labels = res.label_names
        per_run.append(res.test.macro["auroc"])
        with open(res.output_folder / "test_predictions.csv", newline="") as f:
            pooled += list(csv.DictReader(f))
    return pooled, labels, per_run, time.perf_counter() - t


def pooled_metrics(rows: list[dict], labels: list[str]):
    import numpy as np

    from orthodiff_nnunet.evaluation.classification import classification_metrics

    cell = lambda r, k: float(r[k]) if r[k] != "" else np.nan  # noqa: E731
    y = np.array([[cell(r, f"target_{n}") for n in labels] for r in rows])
    p = np.array([[cell(r, f"p_{n}") for n in labels] for r in rows])
    d = np.array([[cell(r, f"pred_{n}") for n in labels] for r in rows])
    return classification_metrics(y, p, labels, n_boot=1000, seed=0, decisions=d)


def mrnet(args, device) -> str:
    from orthodiff_nnunet.dataset_conversion.mrnet import convert_mrnet
    from orthodiff_nnunet.planning import plan_and_preprocess
    from orthodiff_nnunet.pretraining import pretrain

    root = common.REPO.parent / "shared" / "data" / "mrnet"
    if not (root / "train").is_dir():
        return f"### MRNet: skipped\n{root} is absent on this machine."
    t0 = time.perf_counter()
    raw, pre = Path(os.environ["nnUNet_raw"]), Path(os.environ["nnUNet_preprocessed"])
    key = args.work / "pseudonym.key"
    if not key.is_file():
        key.write_text(KEY + "\n")
    if not list(raw.glob(f"Dataset{MRNET_ID:03d}_*")):
        convert_mrnet(root, MRNET_ID, spacing=MRNET_SPACING, cases=MRNET_CASES, num_processes=1, num_folds=3,
                      pseudonym_key=key)
    with common.with_planning_env():
        plan_and_preprocess([MRNET_ID, MRNET_ID + 1, MRNET_ID + 2], num_processes=1, show_progress=False,
                            planner="plain")
    names = {}
    for i in range(3):
        folder = next(pre.glob(f"Dataset{MRNET_ID + i:03d}_*"))
        names[json.loads((folder / "dataset.json").read_text())["orthodiff"]["orientation"]] = folder.name
    shrink(names, PLAIN_PLANS, args.features, diffusion_batch=2)
    patches = {v: json.loads((pre / n / f"{PLANS}.json").read_text())["configurations"][CLASSIFICATION_CONFIGURATION]["patch_size"]
               for v, n in names.items()}
    pre_loss = {}
    for view, name in names.items():
        if not default_encoder_path(name, PLANS).is_file():
            r = pretrain(name, plans=PLANS, iterations=args.mrnet_pretrain_iterations,
                         checkpoint_every=max(1, args.mrnet_pretrain_iterations // 4), learning_rate=args.pretrain_lr,
                         device=str(device.type), sample_steps=0, val_iterations=1)
            pre_loss[view] = f"{r.train_losses[0]:.3f} -> {r.train_losses[-1]:.3f}"
            print(f"MRNet pretrained {view}: loss {pre_loss[view]}", flush=True)
    prep_s = time.perf_counter() - t0
    rows, details, n = [], [], 0
    for mode in args.modes:
        pooled, labels, per_run, seconds = pooled_runs(MRNET_ID, mode, 3, args, device, encoders_from=MRNET_ID)
        m = pooled_metrics(pooled, labels)
        n = m.n_exams
        fmt = lambda v, ci: "n/a" if v != v else f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"  # noqa: E731
        rows.append([mode, *[fmt(x.auroc, x.ci["auroc"]) for x in m.labels],
                     fmt(m.macro["auroc"], m.macro_ci["auroc"]),
                     " / ".join("n/a" if a != a else f"{a:.2f}" for a in per_run), f"{seconds / 60:.1f}"])
        details.append(f"<details><summary>MRNet {mode}: pooled held-out metrics</summary>\n\n{m.to_markdown()}"
                       "\n\n</details>")
        print(f"MRNet {mode}: pooled held-out macro AUROC {m.macro['auroc']:.3f} ({seconds:.0f} s)", flush=True)
    return "\n".join([
        "### MRNet: the 6 real exams, three views fused (no accuracy claim)",
        f"Cases {', '.join(MRNET_CASES)} of `../shared/data/mrnet` (Stanford MRNet v1.0, research use), converted into "
        f"sag/cor/ax datasets with user-supplied spacing {MRNET_SPACING} (MRNet stores none), patient-grouped 3 folds; "
        f"plain plans shrunk to {args.features} features, 3 stages; classification patches (through-plane first) "
        + ", ".join(f"{v} {'x'.join(map(str, ps))}" for v, ps in patches.items()) + ". "
        f"Per view a diffusion model pretrained on the same 6 exams without labels ({args.mrnet_pretrain_iterations} "
        "iterations" + (f"; epsilon-MSE {', '.join(f'{v} {x}' for v, x in pre_loss.items())}" if pre_loss else "")
        + f"). Classifier: {args.epochs} epochs x {args.iterations_per_epoch} steps, batch {args.batch_size}, head lr "
        f"{args.lr}; 3 runs per mode (validation fold k, held-out fold k+1): the {n} held-out predictions (every exam "
        f"once) are pooled. Data, planning and pretraining {prep_s / 60:.1f} min.",
        "",
        table(["mode", "abnormal AUROC [95% CI]", "ACL AUROC [95% CI]", "meniscus AUROC [95% CI]",
               "macro AUROC [95% CI]", "macro AUROC per run", "train min"], rows),
        "",
        f"{n} exams pooled over 3 differently trained runs: nothing is known about accuracy from this run (values "
        "below chance, and intervals that collapse to a point, are what so few exams give); it shows that "
        "conversion, planning, pretraining, three-view training and held-out prediction complete on real MRNet "
        "volumes. Bootstrap: 1000 resamples of exams, seed 0; n/a where a label has one class only.",
        "",
        *details,
    ])


# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["throughput", "study", "convergence", "mrnet", "both", "all"], default="both",
                   help="both = throughput + study; all = both + mrnet; convergence = one long run per mode (fold 0) "
                        "to choose the study's training length")
    p.add_argument("--size", choices=["reduced", "full"], default="reduced")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=common.RESULTS / "classification.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", type=int, default=8, help="reduced size: max features of the shrunk network")
    # throughput
    p.add_argument("--cases", type=int, default=12, help="throughput: phantom exams")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--iterations", type=int, default=6, help="throughput: steps per repetition")
    p.add_argument("--repeats", type=int, default=3)
    # study
    p.add_argument("--study-cases", type=int, default=60)
    p.add_argument("--corpus-cases", type=int, default=40)
    p.add_argument("--pretrain-iterations", type=int, default=1000)
    p.add_argument("--folds", type=int, default=5, help="study: runs per mode and seed (validation fold k, test fold k+1)")
    p.add_argument("--seeds", type=int, default=3,
                   help="study: classifier seeds --seed .. --seed+N-1 (initialisation and data order; the data and "
                        "the pretraining stay fixed); each exam's probability is averaged over them")
    p.add_argument("--label-fractions", type=float, nargs="+", default=[1.0],
                   help="study: fractions of each run's training exams, e.g. 1 0.1 (issue 12's goal: 10 %% >= 0.95 x 100 %%)")
    p.add_argument("--n-boot", type=int, default=1000, help="study: patient-bootstrap resamples")
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--diffusion-batch", type=int, default=8)
    p.add_argument("--modes", nargs="+", default=["probe", "finetune", "scratch"])
    p.add_argument("--epochs", type=int, default=12,
                   help="classifier epochs (x --iterations-per-epoch steps); 12 x 20 from the 2026-12-01 calibration "
                        "(--part convergence: scratch flattens from ~200 steps)")
    p.add_argument("--iterations-per-epoch", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--mrnet-pretrain-iterations", type=int, default=150)
    p.add_argument("--lanes", type=int, default=1,
                   help="study: runs (and pretrainings) side by side in this many one-thread processes; 2 on a "
                        "2-core machine (default 1: one after another, in this process)")
    return p.parse_args(argv)


@dataclass
class Sections:
    """The parts' Markdown sections and the run's circumstances (for the header)."""

    device: object
    sections: list[str]
    load_start: str
    seconds: float


def use_work_folder(args) -> tempfile.TemporaryDirectory | None:
    """nnU-Net's three folders under ``--work`` (a temporary folder, returned for cleanup, when none is given)."""
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_cls_")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    for env, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        os.environ[env] = str((args.work / sub).resolve())
        (args.work / sub).mkdir(exist_ok=True)
    return tmp


def run(args) -> Sections:
    """The parts ``--part`` names, in the work folder (a temporary one is removed afterwards)."""
    import logging

    import torch

    from orthodiff_nnunet.conventions import resolve_device

    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    tmp = use_work_folder(args)
    os.environ.setdefault("nnUNet_compile", "0")
    if device.type == "cpu":
        os.environ.setdefault("nnUNet_n_proc_DA", "0")
    torch.manual_seed(args.seed)
    start, load_start = time.perf_counter(), common.load_average()
    sections = []
    if args.part in ("throughput", "both", "all"):
        sections.append(throughput(args, device))
        if device.type != "cuda":
            sections.append(pending_gpu_section())
    if args.part in ("study", "both", "all"):
        sections.append(study(args, device))
    if args.part == "convergence":
        sections.append(convergence(args, device))
    if args.part in ("mrnet", "all"):
        sections.append(mrnet(args, device))
    if tmp is not None:
        tmp.cleanup()
    return Sections(device, sections, load_start, time.perf_counter() - start)


def record(result: Sections, args) -> None:
    """Print the run (header: machine, command, load, time; then the sections) and append it to ``--out``."""
    header = (f"## Run of {common.now()}\n\n"
              f"- machine: {common.machine(result.device)}\n- command: `{common.command_line()}`\n"
              f"- load average (1/5/15 min) at the start {result.load_start}, at the end {common.load_average()} "
              "(a shared 2-core machine: other jobs inflate wall times)\n"
              f"- total wall time: {result.seconds / 60:.1f} min\n")
    text = header + "\n" + "\n\n".join(result.sections) + "\n"
    print(text)
    common.append_markdown(args.out, text, title="# Classification benchmarks")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record(run(args), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
