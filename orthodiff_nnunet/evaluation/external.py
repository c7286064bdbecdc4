"""``orthodiff evaluate``: predict an external site's converted datasets and report every metric per stratum.

Segmentation: each orientation's model predicts that orientation's ``imagesTs`` (through
nnU-Net's predictor), and every *labeled* case is scored per structure against ``labelsTs``.
Classification: the fused three-view model predicts the site's exams; thresholds are the ones the
model chose on its validation data. Site, field strength, vendor and the patient pseudonym come from
the converter's targets file, so every metric is stratified by them (and by orientation for
segmentation) and every interval resamples patients.

What a user runs is what is evaluated: segmentation predicts with mirroring test-time augmentation
by default, as ``orthodiff predict seg`` and nnU-Net do (``--disable-tta`` turns it off; the choice
is recorded in the report). When the site annotates other labels than the classifier predicts, the
labels both share are evaluated and the others are named with the reason. A metric that is
undefined on the site's data (e.g. AUROC when every exam is negative) is reported as undefined
with its reason, never a crash.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orthodiff_nnunet import paths
from orthodiff_nnunet.conventions import CLS_CONFIG_FILE, CLS_THRESHOLDS_FILE
from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.utils import load_json

log = logging.getLogger(__name__)


class EvaluationError(OrthodiffError):
    """The external datasets or the models cannot be evaluated as asked."""


@dataclass
class EvaluationResult:
    output_folder: Path
    report_html: Path
    num_seg_cases: int
    num_cls_exams: int
    headline: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join([f"evaluated {self.num_seg_cases} segmentation case(s) and {self.num_cls_exams} exam(s); "
                          f"report: {self.report_html}", *self.headline])


def _num(v, digits: int = 3) -> str:
    """A number for the headline; ``n/a`` for None/NaN (an undefined metric is not a crash)."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _headline(report: Mapping) -> list[str]:
    """One line per task with the report's overall figures (the full tables are in the report)."""
    lines = []
    seg = report.get("segmentation", {}).get("overall", {})
    dice = {k: v["dice"]["mean"] for k, v in seg.items() if v.get("dice", {}).get("mean") is not None}
    if dice:
        best = max(dice, key=dice.get)
        missed = sum(int(v.get("n_missed", 0) or 0) for v in seg.values())
        false = sum(int(v.get("n_false_detection", 0) or 0) for v in seg.values())
        lines.append(f"  segmentation: mean Dice over {len(dice)} structures {sum(dice.values()) / len(dice):.3f} "
                     f"(highest: {best} {dice[best]:.3f}); {missed} missed structure(s), {false} false detection(s)")
    cls = report.get("classification", {})
    if cls.get("overall"):
        m = cls["overall"]["macro"].get("auroc")
        ci = cls["overall"].get("macro_ci", {}).get("auroc") or (None, None)
        ece = cls.get("calibration_pooled", {}).get("ece")
        auroc = (f"macro AUROC {_num(m)} [{_num(ci[0])}, {_num(ci[1])}]" if m is not None
                 else "macro AUROC undefined (no label has both positive and negative exams)")
        lines.append(f"  classification: {auroc} over {cls['overall']['n_exams']} exams; "
                     f"expected calibration error {_num(ece)}")
        undefined = {name: why["auroc"] for name, why in cls.get("undefined", {}).items() if "auroc" in why}
        if undefined:
            lines.append("  AUROC undefined for " + "; ".join(f"{k} ({v})" for k, v in undefined.items()))
        if cls.get("labels_not_evaluated"):
            lines.append("  not evaluated: " + "; ".join(f"{k} ({v})" for k, v in cls["labels_not_evaluated"].items()))
    return lines


def _external_datasets(external: Sequence[int | str], raw: Path | None):
    from orthodiff_nnunet.planning import resolve_datasets

    infos = resolve_datasets(external, orientations=["sag", "cor", "ax"], raw=raw)
    if not infos:
        raise EvaluationError(f"no converted datasets for {list(external)} in {paths.raw_dir(raw)}")
    return {info.orientation: info for info in infos}


def _cases_folder(info, kind: str) -> Path:
    """imagesTs/labelsTs of an external site (imagesTr/labelsTr if it was converted as a training site)."""
    for sub in (f"{kind}Ts", f"{kind}Tr"):
        if (info.folder / sub).is_dir():
            return info.folder / sub
    raise EvaluationError(f"{info.name} has neither {kind}Ts nor {kind}Tr: convert the site with `orthodiff convert --external`")


def evaluate_segmentation(
    datasets: Mapping[str, object],
    seg_models: Mapping[str, Path],
    output: Path,
    device: str = "auto",
    mirroring: bool = True,
    num_processes: int = 2,
    tolerance_mm: float = 1.0,
    subfolder: str = "segmentation",
) -> tuple[list[dict], list[str]]:
    """Predict each orientation with its model and score the labeled cases; returns (rows, model folders).

    Each row carries the case's exam and patient pseudonym (the bootstrap's cluster) from the
    targets file. A prediction off its reference's grid raises
    :class:`~orthodiff_nnunet.evaluation.segmentation.GridMismatchError` naming the case and both files.
    """
    from orthodiff_nnunet.evaluation.segmentation import evaluate_case_files
    from orthodiff_nnunet.segmentation import predict_segmentation

    rows: list[dict] = []
    used: list[str] = []
    for orientation, model in seg_models.items():
        if orientation not in datasets:
            raise EvaluationError(f"a {orientation} segmentation model was given but the external site has no "
                                  f"{orientation} dataset (it has {', '.join(datasets)})")
        info = datasets[orientation]
        targets = load_json(info.folder / "orthodiff_targets.json")["cases"]
        labels = info.dataset_json["labels"]
        pred_dir = output / subfolder / orientation
        result = predict_segmentation(_cases_folder(info, "images"), pred_dir, Path(model), device=device,
                                      mirroring=mirroring, num_processes=num_processes, show_progress=True)
        used.append(str(Path(model).resolve()))
        ref_dir = _cases_folder(info, "labels")
        image_dir = _cases_folder(info, "images")
        for mask in sorted(result.masks):
            case = mask.name[: -len(info.dataset_json["file_ending"])]
            t = targets.get(case, {})
            if t.get("segmentation") != "labeled":
                continue  # unlabeled cases have no reference
            metrics = evaluate_case_files(ref_dir / mask.name, mask, labels, tolerance_mm, case=case)
            # the files let the report draw the case's contours (they are not copied into report.json)
            files = {"image_file": str(image_dir / f"{case}_0000{info.dataset_json['file_ending']}"),
                     "reference_file": str(ref_dir / mask.name), "prediction_file": str(mask)}
            for structure, m in metrics.items():
                rows.append({"case": case, "orientation": orientation, "site": t.get("site"),
                             "field_strength_t": t.get("field_strength_t"), "vendor": t.get("vendor"),
                             "exam": t.get("exam") or case, "patient": t.get("patient"),
                             "structure": structure, **m, "label_value": labels[structure], **files})
    return rows, used


def evaluate(
    external: Sequence[int | str],
    output: Path,
    *,
    seg_models: Mapping[str, Path] | None = None,
    cls_model: Path | None = None,
    raw: Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    mirroring: bool = True,
    num_processes: int = 2,
    compare_seg_models: Mapping[str, Path] | None = None,
    names: tuple[str, str] = ("--seg", "--seg-compare"),
) -> EvaluationResult:
    """Validate trained models on an external site's converted datasets and write the report.

    Args:
        external: dataset ids or names of the external site (one is enough: its convert group's
            sagittal, coronal and axial datasets are found).
        output: report folder (predictions go below it).
        seg_models: orientation -> segmentation model folder (``orthodiff train seg`` output).
        cls_model: classification model folder (``orthodiff train cls`` output).
        raw: nnUNet_raw (default: environment).
        n_boot: bootstrap resamples for the 95% intervals.
        seed: bootstrap seed.
        device: ``auto``, ``cuda`` or ``cpu``.
        mirroring: mirroring test-time augmentation for segmentation (default on, as
            ``orthodiff predict seg`` and nnU-Net predict; recorded in the report).
        num_processes: worker processes of nnU-Net's predictor.
        compare_seg_models: orientation -> a second segmentation model for the same orientations (e.g.
            the from-scratch twin); the report sets the two side by side with paired differences.
        names: what the report calls ``seg_models`` and ``compare_seg_models``.
    """
    from orthodiff_nnunet.evaluation.report import build_report, hash_inputs

    if not seg_models and cls_model is None:
        raise EvaluationError("nothing to evaluate: give segmentation models (--seg sag=MODEL ...) and/or --cls MODEL")
    output = Path(output)
    if compare_seg_models and set(compare_seg_models) != set(seg_models or {}):  # before any prediction
        raise EvaluationError(f"--seg-compare has {', '.join(sorted(compare_seg_models))} but --seg has "
                              f"{', '.join(sorted(seg_models or {})) or 'none'}: give both models per orientation")
    datasets = _external_datasets(external, raw)
    seg_rows, used = evaluate_segmentation(datasets, seg_models or {}, output, device, mirroring, num_processes) \
        if seg_models else ([], [])
    comparison = None
    if compare_seg_models:
        from orthodiff_nnunet.evaluation.comparison import compare_segmentation

        other_rows, other_used = evaluate_segmentation(datasets, compare_seg_models, output, device, mirroring,
                                                       num_processes, subfolder="segmentation_compared")
        used += other_used
        comparison = compare_segmentation(seg_rows, other_rows, names, n_boot, seed)
    cls_exams: list[dict] = []
    label_names: list[str] = []
    thresholds: dict[str, float] = {}
    not_evaluated: dict[str, str] = {}
    if cls_model is not None:
        cls_exams, label_names, thresholds, not_evaluated = _evaluate_classification(datasets, Path(cls_model), output,
                                                                                     device)
        used.append(str(Path(cls_model).resolve()))
    provenance = {
        "external_datasets": {o: info.name for o, info in datasets.items()},
        "input_data_sha256": hash_inputs([info.folder for info in datasets.values()]),
        "models": used,
        # segmentation model folders hold plans.json; a classifier holds plans_<view>.json per view
        "plans": sorted({str(p) for m in used for pat in ("plans.json", "plans_*.json") for p in Path(m).glob(pat)}),
        "checkpoints": sorted({str(p) for m in used for p in Path(m).rglob("checkpoint_*.pth")}),
    }
    if seg_models:
        provenance["segmentation_mirroring"] = bool(mirroring)
    html = build_report(output, seg_rows, cls_exams, label_names, thresholds, provenance, n_boot, seed,
                        labels_not_evaluated=not_evaluated, seg_comparison=comparison)
    headline = _headline(load_json(output / "report.json"))
    return EvaluationResult(output, html, len({(r["case"], r["orientation"]) for r in seg_rows}), len(cls_exams),
                            headline)


def shared_labels(model_labels: Sequence[str], site_labels: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The labels both the model and the site have (model order), and why each other label is not evaluated."""
    site = set(site_labels)
    shared = [n for n in model_labels if n in site]
    reasons = {n: "the model predicts it but the external site does not annotate it" for n in model_labels
               if n not in site}
    reasons.update({n: "the external site annotates it but the model does not predict it" for n in site_labels
                    if n not in set(model_labels)})
    return shared, reasons


def _evaluate_classification(datasets, cls_model: Path, output: Path, device: str):
    """Fused three-view predictions of the external exams, with their targets and the model's thresholds.

    The external datasets are first preprocessed with the model's plans of each view (plans transfer;
    cases already preprocessed are skipped), then ``predict_classification`` writes the per-exam CSV
    that is read back here. The site's targets files give each exam's patient pseudonym and the
    labels the site annotates; only the labels shared with the model are evaluated.

    Returns:
        ``(exams, evaluated labels, thresholds, {label: reason not evaluated})``.
    """
    import csv

    from orthodiff_nnunet.classification import predict_classification
    from orthodiff_nnunet.data.targets import TARGETS_FILE, read_targets
    from orthodiff_nnunet.planning import plan_and_preprocess

    cfg = load_json(cls_model / CLS_CONFIG_FILE)
    views = [v for v in cfg["views"] if v in datasets]
    if not views:
        raise EvaluationError(f"the classifier reads {cfg['views']} but the external site has {', '.join(datasets)}")
    for v in views:
        plan_and_preprocess([datasets[v].name], plans_from=cfg["datasets"][v], plans_name=cfg["plans_identifiers"][v],
                            configurations=[cfg["configuration"]], num_processes=1, show_progress=False)
    csv_path = output / "classification" / "predictions.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    result = predict_classification(cls_model, [datasets[v].name for v in views], csv_path, device=device, n_boot=0)
    thr_file = cls_model / CLS_THRESHOLDS_FILE
    model_labels = list(result.label_names)
    thresholds = load_json(thr_file)["thresholds"] if thr_file.is_file() else {n: 0.5 for n in model_labels}
    site_labels: list[str] = []
    patient_of: dict[str, str | None] = {}
    for v in views:
        tf_path = datasets[v].folder / TARGETS_FILE
        if not tf_path.is_file():
            continue
        tf = read_targets(tf_path)
        site_labels += [n for n in tf.label_names if n not in site_labels]
        for ct in tf.cases.values():
            patient_of.setdefault(ct.exam, ct.patient)
    labels, not_evaluated = shared_labels(model_labels, site_labels)
    if not_evaluated:
        log.warning("classification labels not evaluated: %s",
                    "; ".join(f"{k} ({v})" for k, v in not_evaluated.items()))
    exams = []
    with open(result.csv, newline="") as f:
        for row in csv.DictReader(f):
            exams.append({
                "exam": row["exam"], "patient": patient_of.get(row["exam"]), "site": row["site"] or None,
                "field_strength_t": float(row["field_strength_t"]) if row["field_strength_t"] else None,
                "vendor": row["vendor"] or None, "views": row["views_present"].split(),
                "targets": {n: (int(row[f"target_{n}"]) if row[f"target_{n}"] != "" else None) for n in labels},
                "probabilities": {n: float(row[f"p_{n}"]) for n in model_labels},
            })
    return exams, labels, thresholds, not_evaluated


def _model_pairs(values: Sequence[str]) -> dict[str, Path]:
    out = {}
    for v in values or []:
        if "=" not in v:
            raise EvaluationError(f"--seg {v!r}: write ORIENTATION=MODEL_FOLDER, e.g. sag=$nnUNet_results/...")
        o, m = v.split("=", 1)
        from orthodiff_nnunet.schemes import normalize_orientation

        out[normalize_orientation(o)] = Path(m)
    return out


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="validate trained models on an external site and write a report (JSON, Markdown, HTML)",
        description=("Predict an external site's converted datasets with trained segmentation and/or classification "
                     "models and report Dice, HD95, surface Dice, AUROC, AUPRC, sensitivity, specificity with "
                     "bootstrap 95% CIs, stratified by site, field strength, vendor and orientation, plus calibration."),
        epilog="Example: orthodiff evaluate -d 511 --seg sag=$nnUNet_results/Dataset501_.../ --cls MODEL -o report/",
    )
    p.add_argument("-d", "--datasets", nargs="+", required=True, help="the external site's dataset id(s) or name(s)")
    p.add_argument("--seg", nargs="+", default=None, metavar="ORIENT=MODEL", help="segmentation model folder per orientation")
    p.add_argument("--seg-compare", nargs="+", default=None, metavar="ORIENT=MODEL",
                   help="a second segmentation model per orientation (e.g. the --init scratch twin): the report "
                        "sets it beside --seg with paired Dice differences and patient-bootstrap intervals")
    p.add_argument("--cls", type=Path, default=None, metavar="MODEL", help="classification model folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="report folder")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--disable-tta", action="store_true",
                   help="segmentation without mirroring test-time augmentation (faster; `predict seg` and nnU-Net "
                        "mirror by default, and so does evaluate)")
    p.add_argument("--mirroring", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    p.add_argument("-np", "--num-processes", type=int, default=2, help="predictor worker processes (default 2)")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    result = evaluate(args.datasets, args.output, seg_models=_model_pairs(args.seg), cls_model=args.cls,
                      n_boot=args.bootstrap, seed=args.seed, device=args.device, mirroring=not args.disable_tta,
                      num_processes=args.num_processes, compare_seg_models=_model_pairs(args.seg_compare))
    print(result.summary())
    return 0
