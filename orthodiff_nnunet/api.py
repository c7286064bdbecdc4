"""Typed API: one function per ``orthodiff`` command. The CLI only parses arguments and calls these."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orthodiff_nnunet.conventions import SEGMENTATION_CONFIGURATION
from orthodiff_nnunet.dataset_conversion.site_converter import ConversionResult, convert_site

log = logging.getLogger(__name__)

__all__ = ["ConversionResult", "DemoResult", "convert", "demo"]


convert = convert_site
"""Convert a site's series into nnU-Net raw datasets, one per orientation: ``orthodiff convert``.

The converter itself (:func:`orthodiff_nnunet.dataset_conversion.site_converter.convert_site`, whose
docstring lists the arguments), under the API's name.
"""


@dataclass
class DemoResult:
    """What ``orthodiff demo`` produced: the stage lines, the report and its headline figures."""

    output: Path
    report_html: Path
    headline: dict[str, float | None]
    stages: list[str]
    details: str
    next_command: str
    logs: Path | None = None

    def summary(self) -> str:
        return self.details


#: the demo's settings: ``full`` (the default command) and ``quick`` (the tests' path: the same stages and
#: code, fewer iterations). 24 external exams: evaluation is cheap (about 2.5 s per exam for both segmentation
#: models and the classifier) and 24 exams narrow the intervals that the newcomer reads. 24 training exams: a
#: training exam costs only its conversion and preprocessing (the iterations are fixed), and twice the 12 of
#: before raised the external patella Dice over 4 run seeds from 0.872 to 0.903 on average (docs/DEMO.md). Segmentation trains the sagittal view only (all three views classify), twice:
#: from the diffusion encoder and from scratch, the same iterations, data and seed (docs/DEMO.md).
DEMO_SETTINGS = {
    "full": {"cases_per_site": 24, "external_cases": 24, "pretrain_iterations": 50, "seg_epochs": 10, "seg_iterations": 650,
             "cls_epochs": 6, "cls_iterations": 10, "n_boot": 500, "cls_boot": 200},
    "quick": {"cases_per_site": 6, "external_cases": 6, "pretrain_iterations": 4, "seg_epochs": 2, "seg_iterations": 4,
              "cls_epochs": 1, "cls_iterations": 2, "n_boot": 20, "cls_boot": 20},
}
#: the demo's sites: the tests' 3 T and 1.5 T phantom profiles at twice their in-plane pixel spacing
#: (1.6 and 1.8 mm): a quarter of the voxels, so that a network wide enough to learn the structures
#: trains in minutes on two cores (docs/DEMO.md)
DEMO_IN_PLANE_MM = {"SiteA": 1.6, "SiteB": 1.8}
#: how the demo reduces the planned network (:func:`orthodiff_nnunet.networks.build.shrink_architecture`):
#: features / 4 on every stage (nnU-Net's 32-64-128-256 -> 8-16-32-64), the plans' stages, kernels and
#: strides kept, 1 residual block per stage, batch 2. Features / 8 (4 at full resolution) had learnt no
#: structure after 350 iterations; / 2 learns per iteration a little faster but costs 2.7 times as much
#: per iteration (docs/DEMO.md).
DEMO_NETWORK = {"feature_divisor": 4, "max_features": 320, "max_stages": 12, "max_blocks_per_stage": 1,
                "max_batch_size": 2}
#: the segmentation's optimizer in the demo: nnU-Net's AdamW variant (its SGD learns too slowly for a
#: few hundred iterations), at 1e-2: on the phantom it learnt the patella in 300 iterations, 3e-3 did not
#: (docs/DEMO.md)
DEMO_SEG_OPTIMIZER = "adamw"
DEMO_SEG_LR = 1e-2
#: the segmentation's augmentation in the demo: nnU-Net's, with its noise and contrast transforms in more patches
#: and wider (``train seg --augmentation cross-site``): the external site is a 1.5 T site with twice the relative
#: noise of the 3 T training site, far beyond nnU-Net's noise augmentation (docs/DEMO.md has the measurement)
DEMO_SEG_AUGMENTATION = "cross-site"
#: the identifier of the demo's reduced copy of the planned network's plans (:data:`DEMO_NETWORK`)
DEMO_PLANS = "orthodiffDemoPlans"
#: the two initialisations the demo trains and sets side by side in its report
DEMO_SEG_INITS = ("diffusion", "scratch")
#: the seed of every trained stage (pretraining ``--seed``, segmentation ``--run-seed``; the classifier's
#: default seed is 0 too): a demo run repeats on the same machine, and both segmentation inits start from the
#: same decoder and heads and see the same batches, so that their difference is the init alone
DEMO_SEED = 0
DEMO_STAGES = ("convert", "plan_and_preprocess", "pretrain sag", "pretrain cor", "pretrain ax", "train seg",
               "train cls", "evaluate")


def split_iterations(total: int, max_epochs: int) -> tuple[int, int]:
    """``(epochs, iterations per epoch)`` whose product is exactly ``total``, with as many epochs as divide it up
    to ``max_epochs`` (each epoch ends with a pseudo Dice on the bar). E.g. 300, 10 -> (10, 30); 25, 10 -> (5, 5)."""
    total, max_epochs = max(1, int(total)), max(1, int(max_epochs))
    epochs = max(e for e in range(1, min(total, max_epochs) + 1) if total % e == 0)
    return epochs, total // epochs


def _fmt(v: float | None, digits: int = 3) -> str:
    import math

    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _report_headline(report_json: Path) -> dict[str, float | None]:
    """Mean Dice, femur/tibia/patella Dice, macro AUROC and its CI from the evaluation's ``report.json``."""
    from orthodiff_nnunet.utils import load_json

    report = load_json(report_json)
    out: dict[str, float | None] = {}
    seg = report.get("segmentation", {}).get("overall", {})
    dice = {k: v["dice"]["mean"] for k, v in seg.items() if v.get("dice", {}).get("mean") is not None}
    out["mean_dice"] = sum(dice.values()) / len(dice) if dice else None
    out["n_structures"] = float(len(dice))
    for name in ("femur", "tibia", "patella"):
        out[f"dice_{name}"] = dice.get(name)
    comparison = (report.get("segmentation_comparison") or {}).get("mean") or {}
    for key, part in (("mean_dice_first", "first"), ("scratch_mean_dice", "second"), ("dice_difference", "difference")):
        cell = comparison.get(part) or {}
        out[key] = cell.get("mean")
        out[f"{key}_lo"], out[f"{key}_hi"] = (cell.get("ci") or (None, None))
    cls = report.get("classification", {}).get("overall") or {}
    out["macro_auroc"] = (cls.get("macro") or {}).get("auroc")
    ci = (cls.get("macro_ci") or {}).get("auroc") or (None, None)
    out["macro_auroc_lo"], out["macro_auroc_hi"] = ci[0], ci[1]
    return out


def demo(output: Path = Path("orthodiff_demo"), cases_per_site: int | None = None,
         external_cases: int | None = None, seed: int = 0,
         pretrain_iterations: int | None = None, seg_iterations: int | None = None, cls_epochs: int | None = None,
         device: str = "auto", *, quick: bool = False, verbose: bool = False,
         write: Callable[[str], None] | None = None) -> DemoResult:
    """End-to-end demo on two phantom sites, one console line per stage.

    From nothing: a 3 T training site and a 1.5 T external site are generated (procedural knee
    phantom with the 8 abnormalities), converted into per-orientation nnU-Net raw datasets, the
    training site is planned and preprocessed per orientation, each orientation's diffusion model is
    pretrained, segmentation is trained per orientation from the pretrained encoder, the three-view
    classifier is fine-tuned, and everything is evaluated on the external site (HTML report). Small
    settings (a reduced copy of the planned network, few iterations) but the real code path.
    Synthetic data: never evidence of clinical accuracy.

    Each stage writes, through ``write``, the equivalent ``orthodiff`` command before it starts and
    one line (``[k/8] title  seconds  figures  log: file``) when it ends; nnU-Net's configuration
    dumps and per-epoch lines go to that stage's log file under ``<output>/logs`` (``verbose``: to
    the console instead, as nnU-Net prints them).

    Args:
        output: work folder (removed and rebuilt if it holds an earlier demo).
        cases_per_site: exams of the training site (default 12; quick 6).
        external_cases: exams of the external site (default 24; quick 6).
        seed: phantom seed.
        pretrain_iterations, seg_iterations, cls_epochs: override the settings' lengths.
        device: ``auto``, ``cuda`` or ``cpu``.
        quick: the short settings (:data:`DEMO_SETTINGS`), for tests and a first look.
        verbose: everything on the console, no stage log files.
        write: where console lines go (default: this module's logger at INFO; the CLI prints them).
    """
    settings = dict(DEMO_SETTINGS["quick" if quick else "full"])
    for key, value in (("cases_per_site", cases_per_site), ("external_cases", external_cases),
                       ("pretrain_iterations", pretrain_iterations),
                       ("seg_iterations", seg_iterations), ("cls_epochs", cls_epochs)):
        if value is not None:
            settings[key] = int(value)
    run = _DemoRun(_fresh_demo_folder(output), settings, device, quick=quick, verbose=verbose, write=write)
    run.convert_sites(settings["cases_per_site"], settings["external_cases"], seed)
    planning = run.plan()
    plans_id = DEMO_PLANS
    run.pretrain(planning, plans_id)
    seg_models = run.train_seg(planning, plans_id)
    cls = run.train_cls(plans_id)
    evaluation, head = run.evaluate(seg_models, cls)
    return run.summarise(evaluation, head)


def _fresh_demo_folder(output: Path) -> Path:
    """``output`` resolved, emptied if it holds an earlier demo (refused if it holds anything else), and marked."""
    import shutil

    from orthodiff_nnunet.errors import OrthodiffError

    output = Path(output).resolve()
    marker = output / ".orthodiff_demo"
    if output.exists() and any(output.iterdir()):
        if not marker.exists():
            raise OrthodiffError(f"{output} exists and is not an orthodiff demo folder: choose another -o")
        shutil.rmtree(output)  # a previous demo run: start from nothing again
    output.mkdir(parents=True, exist_ok=True)
    marker.write_text("created by orthodiff demo; removed and rebuilt by the next demo run\n")
    return output


def _demo_pseudonym_key(path: Path, seed: int) -> Path:
    """The demo's pseudonym key, derived from the phantom seed and written beside the sites (outside the datasets).

    Pseudonyms name the cases and so decide nnU-Net's case order and the folds; a fresh random key per run (the
    default for real data) made two demo runs split, pretrain and classify differently. The phantom has no
    patient to protect, so its key is a function of the seed: the same seed gives the same cases, folds and
    figures on the same machine. Real data keep a random key (``orthodiff convert`` creates it)."""
    import hashlib

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hashlib.sha256(f"orthodiff demo phantom, seed {int(seed)}".encode()).hexdigest() + "\n")
    return path


def _on_cpu(device: str) -> bool:
    from orthodiff_nnunet.conventions import resolve_device

    return resolve_device(device).type == "cpu"


def _seg_lanes(device: str) -> int:
    """How many segmentation runs the demo trains side by side: 2 on a CPU with 2 or more usable cores, else 1
    (on a GPU the runs share the one device; one after the other is as fast)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 2 if _on_cpu(device) and cores >= 2 else 1


def _train_seg_in_lane(kwargs: dict, log_file: Path | None, bar_position: int):
    """One ``train_segmentation`` in a process of :func:`~orthodiff_nnunet.utils.one_thread_processes`: its own log
    file, its progress bar on line ``bar_position`` of the console."""
    import os

    from orthodiff_nnunet.console import output_to_log
    from orthodiff_nnunet.segmentation import train_segmentation

    os.environ["TQDM_POSITION"] = str(bar_position)  # tqdm reads its defaults from TQDM_* variables
    with output_to_log(log_file):
        return train_segmentation(**kwargs)


def _train_seg_side_by_side(kwargs: dict[str, dict], logs: dict[str, Path | None]) -> dict:
    """init -> ``SegmentationTrainResult``: the runs of ``kwargs`` in one spawned process each, at the same time;
    an error in either is raised here (after both have stopped)."""
    from orthodiff_nnunet.utils import one_thread_processes

    with one_thread_processes(len(kwargs)) as pool:
        futures = {init: pool.submit(_train_seg_in_lane, kw, logs[init], i)
                   for i, (init, kw) in enumerate(kwargs.items())}
        return {init: f.result() for init, f in futures.items()}


class _DemoRun:
    """One demo run: its folder, nnU-Net paths and console, set up once; one method per stage.

    Each stage method shows the equivalent ``orthodiff`` command, runs the typed API function,
    appends its summary to :attr:`details` and puts its figures on the stage's console line.
    """

    def __init__(self, output: Path, settings: dict[str, int], device: str, *, quick: bool, verbose: bool,
                 write: Callable[[str], None] | None) -> None:
        from orthodiff_nnunet import paths
        from orthodiff_nnunet.console import StageConsole

        self.output, self.settings, self.device, self.verbose = output, settings, device, verbose
        self.raw, self.pre, self.res = output / "nnUNet_raw", output / "nnUNet_preprocessed", output / "nnUNet_results"
        paths.set_nnunet_paths(self.raw, self.pre, self.res)
        self.logs = output / "logs"
        self.console = StageConsole(self.logs, total=len(DEMO_STAGES), verbose=verbose, write=write or log.info)
        self.details: list[str] = [f"OrthoDiff-nnU-Net demo in {output} (synthetic phantom data)"]
        self.console.say(f"OrthoDiff-nnU-Net demo{' (--quick)' if quick else ''} in {output}: synthetic phantom knees, "
                         f"{settings['cases_per_site']} training and {settings['external_cases']} external exams; "
                         f"{len(DEMO_STAGES)} stages"
                         + ("" if verbose else f", nnU-Net's output in {self.logs}/ (-v shows it here)"))
        self.console.say("Each stage's equivalent command follows its `$`; they run as shown after")
        self.console.say(f"      $ export nnUNet_raw={self.raw} nnUNet_preprocessed={self.pre} nnUNet_results={self.res}")

    def rel(self, p: Path) -> str:
        """``p`` relative to the demo folder (commands are shown so)."""
        import os

        return os.path.relpath(p, self.output)

    def convert_sites(self, training_cases: int, external_cases: int, seed: int) -> None:
        """Stage 1: write the 3 T training and 1.5 T external phantom sites and convert them."""
        import dataclasses

        from orthodiff_nnunet.data.phantom import write_site
        from orthodiff_nnunet.data.sites import SITE_3T, SITE_15T

        output = self.output
        site_a, site_b = (dataclasses.replace(site, in_plane_spacing_mm=DEMO_IN_PLANE_MM[site.name])
                          for site in (SITE_3T, SITE_15T))
        sites = ((site_a, 501, False, seed, training_cases), (site_b, 511, True, seed + 1000, external_cases))
        manifests = {site.name: output / "sites" / site.name / "manifest.csv" for site, *_ in sites}
        key = _demo_pseudonym_key(output / "sites" / "pseudonym.key", seed)
        commands = [f"orthodiff convert {self.rel(manifests[site.name])} -d {base} -n Knee{site.name} -np 1 "
                    f"--pseudonym-key {self.rel(key)}" + (" --external" if external else " --folds 2")
                    for site, base, external, *_ in sites]
        with self.console.stage("convert", [f"cd {output}", *commands]) as stage:
            counts = []
            for site, base_id, external, site_seed, n_cases in sites:
                manifest = write_site(output / "sites" / site.name, site, n_cases=n_cases, seed=site_seed,
                                      patients_with_two_exams=1)
                # 2 folds: with a handful of exams, fold 0's validation still holds several exams
                result = convert(manifest, base_id, f"Knee{site.name}", raw=self.raw, external=external,
                                 num_processes=1, num_folds=2, pseudonym_key=key)
                self.details.append(result.summary())
                counts.append(f"{site.name} ({site.field_strength_t:g} T, {'external' if external else 'training'}) "
                              f"{max(result.num_cases.values(), default=0)} exams x {len(result.datasets)} orientations")
            stage.figures = "; ".join(counts)

    def plan(self):
        """Stage 2: plan and preprocess the training site's three orientations."""
        from orthodiff_nnunet.planning import plan_and_preprocess

        # one process: a handful of small cases are preprocessed faster in-process than by spawned workers
        # (each imports torch and nnU-Net); nnU-Net's fingerprint extraction spawns its workers anyway
        with self.console.stage("plan_and_preprocess", ["orthodiff plan_and_preprocess -d 501 502 503 -np 1"]) as stage:
            planning = plan_and_preprocess([501, 502, 503], num_processes=1, show_progress=True)
            self.details.append(planning.summary())
            fullres = {d.orientation: d.configuration(SEGMENTATION_CONFIGURATION) for d in planning.datasets}
            stage.figures = f"{SEGMENTATION_CONFIGURATION} patch " + ", ".join(
                f"{o} {'x'.join(str(s) for s in c.patch_size)}" for o, c in fullres.items())
        return planning

    def pretrain(self, planning, plans_id: str) -> None:
        """Stages 3-5: shrink each orientation's plans and pretrain its diffusion model (the test fold left out)."""
        import json
        import os

        from orthodiff_nnunet.classification import default_test_folds
        from orthodiff_nnunet.networks.build import write_shrunk_plans
        from orthodiff_nnunet.pretraining import pretrain

        device = self.device
        os.environ.setdefault("nnUNet_n_proc_DA", "0")  # augmentation in-process: small data, 2 cores
        os.environ.setdefault("nnUNet_compile", "0")
        n_pre = self.settings["pretrain_iterations"]
        for dataset in planning.datasets:
            folder = self.pre / dataset.dataset_name
            # the plans' network with every stage's features divided by 8 (nnU-Net's 32-64-128-256-320 ->
            # 4-8-16-32-40) and one residual block per stage: the plans' stages, kernels and strides, a third
            # of the CPU time per step of the earlier flat cap at 16 features (measured, see DEMO_NETWORK)
            write_shrunk_plans(folder, dataset.plans_identifier, plans_id, **DEMO_NETWORK)
            # one nnU-Net epoch (= one validation pass and checkpoint) for the whole short run: each epoch
            # end costs 5 validation steps, a checkpoint and a plot, more than a few training steps
            # the classifier (fold 0) tests on exams the encoders must not have seen: they are left out here
            test_folds = default_test_folds(len(json.loads((folder / "splits_final.json").read_text())), 0)
            command = (f"orthodiff pretrain -d {dataset.dataset_name} -p {plans_id} --iterations {n_pre} "
                       f"--checkpoint-every {n_pre} --lr 1e-3 --sample-steps 5 --seed {DEMO_SEED} --device {device} "
                       f"--exclude-fold {' '.join(map(str, test_folds))}")
            with self.console.stage(f"pretrain {dataset.orientation}", [command]) as stage:
                result = pretrain(dataset.dataset_name, plans=plans_id, iterations=n_pre, checkpoint_every=n_pre,
                                  learning_rate=1e-3, device=device, sample_steps=5, exclude_folds=test_folds,
                                  seed=DEMO_SEED)
                self.details.append(result.summary())
                stage.figures = (f"{result.iterations} it, train loss {_fmt(result.train_losses[-1])}, "
                                 f"EMA val loss {_fmt(result.val_losses[-1])}"
                                 if result.train_losses and result.val_losses else f"{result.iterations} it")

    def train_seg(self, planning, plans_id: str) -> dict[str, Path]:
        """Stage 6: sagittal segmentation from the diffusion encoder and from scratch; init -> model folder.

        On a CPU with two or more cores the two inits train side by side, one process of one thread each (1.35
        times the iterations per second of one after the other with two threads, measured; docs/DEMO.md); each
        run's nnU-Net output goes to its own log file."""
        device, settings = self.device, self.settings
        dataset = next(d for d in planning.datasets if d.orientation == "sag")
        epochs, per_epoch = split_iterations(settings["seg_iterations"], settings["seg_epochs"])
        channels_last = _on_cpu(device)  # mkldnn's 3D convolutions: 1.28x per demo step (BENCHMARKS.md)
        commands = [f"orthodiff train seg -d {dataset.dataset_name} -f all -p {plans_id} --init {init} "
                    f"--optimizer {DEMO_SEG_OPTIMIZER} --lr {DEMO_SEG_LR:g} --epochs {epochs} "
                    f"--iterations-per-epoch {per_epoch} --val-iterations 2 --no-validation --device {device}"
                    + (" --channels-last" if channels_last else "")
                    + f" --augmentation {DEMO_SEG_AUGMENTATION} --run-seed {DEMO_SEED}"
                    for init in DEMO_SEG_INITS]
        lanes = _seg_lanes(device)
        if lanes > 1:
            commands = [f"{c} &" for c in commands] + ["wait"]
        seg_models = {}
        with self.console.stage("train seg", commands) as stage:
            kwargs = {init: dict(dataset=dataset.dataset_name, fold="all", init=init, plans=plans_id, epochs=epochs,
                                 iterations_per_epoch=per_epoch, val_iterations_per_epoch=2, device=device,
                                 validate=False, optimizer=DEMO_SEG_OPTIMIZER, learning_rate=DEMO_SEG_LR,
                                 channels_last=channels_last, run_seed=DEMO_SEED,
                                 augmentation=DEMO_SEG_AUGMENTATION)
                      for init in DEMO_SEG_INITS}
            if lanes > 1:
                logs = {init: None if stage.log_file is None else stage.log_file.with_suffix(f".{init}.log")
                        for init in DEMO_SEG_INITS}
                log.info("training %s side by side, one process of one thread each; nnU-Net's output: %s",
                         " and ".join(f"{i} init" for i in DEMO_SEG_INITS), ", ".join(map(str, logs.values())))
                results = _train_seg_side_by_side(kwargs, logs)
                for init in DEMO_SEG_INITS:
                    log.info("%s init: %s", init, results[init].summary())
                if stage.log_file is not None:
                    stage.extra.append(f"the {lanes} runs went side by side, one process of one thread each; "
                                       f"nnU-Net's output in {', '.join(str(x) for x in logs.values())}")
            else:
                from orthodiff_nnunet.segmentation import train_segmentation

                results = {init: train_segmentation(**kw) for init, kw in kwargs.items()}
            figures = []
            for init in DEMO_SEG_INITS:
                trained = results[init]
                seg_models[init] = trained.model_folder
                self.details.append(trained.summary())
                figures.append(f"{init} init loss {_fmt(trained.train_loss)}, pseudo Dice {_fmt(trained.pseudo_dice)}")
            stage.figures = f"sag, {epochs * per_epoch} it each: " + "; ".join(figures)
        return seg_models

    def train_cls(self, plans_id: str):
        """Stage 7: fine-tune the three-view classifier on fold 0."""
        from orthodiff_nnunet.classification import train_classification

        device, settings = self.device, self.settings
        cls_epochs_n, cls_iters = settings["cls_epochs"], settings["cls_iterations"]
        cls_command = (f"orthodiff train cls -d 501 -p {plans_id} -f 0 --mode finetune --epochs {cls_epochs_n} "
                       f"--iterations-per-epoch {cls_iters} --batch-size 2 --n-boot {settings['cls_boot']} "
                       f"--device {device}")
        with self.console.stage("train cls", [cls_command]) as stage:
            cls = train_classification(501, plans=plans_id, fold=0, mode="finetune", epochs=cls_epochs_n,
                                       iterations_per_epoch=cls_iters, batch_size=2, n_boot=settings["cls_boot"],
                                       device=device)
            self.details.append(cls.summary())
            last = cls.history[-1] if cls.history else {}
            stage.figures = (f"loss {_fmt(last.get('train_loss'))}, selection mean AUROC "
                             f"{_fmt(cls.best_selection_mean_auroc)} (epoch {cls.best_epoch})")
        return cls

    def evaluate(self, seg_models: dict[str, Path], cls):
        """Stage 8: evaluate both models on the external site; the evaluation and its headline figures."""
        from orthodiff_nnunet.evaluation.external import evaluate

        device, settings = self.device, self.settings
        report_dir = self.output / "report"
        main, other = ({"sag": seg_models[init]} for init in DEMO_SEG_INITS)
        eval_command = (f"orthodiff evaluate -d 511 --seg sag={self.rel(main['sag'])} "
                        f"--seg-compare sag={self.rel(other['sag'])} --cls {self.rel(cls.output_folder)} -o report "
                        f"--bootstrap {settings['n_boot']} --disable-tta -np 1 --device {device}")
        with self.console.stage("evaluate", [eval_command]) as stage:
            # Without mirroring (8 flips per patch) to keep the demo short on a CPU; the report records the choice.
            # `orthodiff evaluate` mirrors by default, like `predict seg` and nnU-Net.
            evaluation = evaluate([511], report_dir, seg_models=main, cls_model=cls.output_folder,
                                  n_boot=settings["n_boot"], device=device, num_processes=1, mirroring=False,
                                  compare_seg_models=other, names=tuple(f"{i} init" for i in DEMO_SEG_INITS))
            self.details.append(evaluation.summary())
            head = _report_headline(evaluation.output_folder / "report.json")
            stage.figures = (f"mean Dice {_fmt(head['mean_dice'])} (scratch {_fmt(head['scratch_mean_dice'])}), "
                             f"macro AUROC {_fmt(head['macro_auroc'])} "
                             f"[{_fmt(head['macro_auroc_lo'])}, {_fmt(head['macro_auroc_hi'])}]")
        return evaluation, head

    def summarise(self, evaluation, head: dict[str, float | None]) -> DemoResult:
        """The closing console lines (time, report, headline figures, next step) and the result."""
        console = self.console
        total = sum(s.seconds for s in console.stages)
        next_command = ("orthodiff convert my_site/manifest.csv -d 601 -n KneeMySite   "
                        "(manifest columns: README, section \"Converting a site's data\")")
        console.say("")
        console.say(f"Done in {total / 60:.1f} min. Report: {evaluation.report_html}")
        console.say(f"  external site (1.5 T): Dice femur {_fmt(head['dice_femur'])}, tibia {_fmt(head['dice_tibia'])}, "
                    f"patella {_fmt(head['dice_patella'])}; mean Dice over {int(head['n_structures'] or 0)} structures "
                    f"{_fmt(head['mean_dice'])}; macro AUROC {_fmt(head['macro_auroc'])} "
                    f"[{_fmt(head['macro_auroc_lo'])}, {_fmt(head['macro_auroc_hi'])}]")
        console.say(f"  the method, same labels and iterations: mean Dice over the cases' structures, diffusion init "
                    f"{_fmt(head['mean_dice_first'])} [{_fmt(head['mean_dice_first_lo'])}, "
                    f"{_fmt(head['mean_dice_first_hi'])}] vs scratch init {_fmt(head['scratch_mean_dice'])} "
                    f"[{_fmt(head['scratch_mean_dice_lo'])}, {_fmt(head['scratch_mean_dice_hi'])}]; difference "
                    f"{_fmt(head['dice_difference'])} [{_fmt(head['dice_difference_lo'])}, "
                    f"{_fmt(head['dice_difference_hi'])}] (95% CI, patients resampled)")
        console.say("  synthetic phantom knees and small networks trained for minutes: the pipeline at work, not "
                    "clinical accuracy (BENCHMARKS.md has measured figures)")
        console.say(f"Next, on your own data: {next_command}")
        return DemoResult(output=self.output, report_html=evaluation.report_html, headline=head,
                          stages=[s.line() for s in console.stages], details="\n\n".join(self.details),
                          next_command=next_command, logs=None if self.verbose else self.logs)
