"""Cross-site evaluation report: ``report.json``, ``report.md`` and a self-contained ``report.html``.

Inputs are plain rows, so the report does not care how predictions were made:

* segmentation rows, one per case and structure: ``case, orientation, site, field_strength_t, vendor,
  structure, dice, hd95_mm, surface_dice`` (optionally ``patient, exam, status, hd95_capped_mm,
  cap_mm``: see :mod:`orthodiff_nnunet.evaluation.segmentation`);
* classification exams: ``exam, site, field_strength_t, vendor, views (list), targets {label: 0/1/None},
  probabilities {label: p}`` (optionally ``patient``), with decision thresholds chosen on validation data.

Every metric is given overall and stratified by site, field strength, vendor and (segmentation)
orientation, with percentile-bootstrap 95% intervals that resample *patients* (cluster bootstrap: all
rows of a drawn patient, i.e. every view, echo and exam of that patient; a row without a patient id is
its own cluster, by exam where known, and the report counts such rows). Calibration:
expected calibration error and a reliability diagram. Plots are PNG files next to the report
and embedded in the HTML (no external resources).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from orthodiff_nnunet.evaluation.classification import classification_metrics, cluster_ids, cluster_members
from orthodiff_nnunet.utils import atomic_write_json, atomic_write_text, save_figure

STRATA_SEG = ("site", "field_strength_t", "vendor", "orientation")
STRATA_CLS = ("site", "field_strength_t", "vendor")
SEG_METRICS = ("dice", "hd95_mm", "surface_dice")
#: HD95 with misses and false detections at the cap (the image diagonal): a mean that penalises a miss
SEG_CAPPED = "hd95_capped_mm"
SEG_STATUSES = ("both_present", "missed", "false_detection", "both_empty")


def _nan_to_none(x):
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, np.generic):
        return _nan_to_none(x.item())
    return x


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# calibration


def calibration(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> dict:
    """Expected calibration error over equal-width probability bins, and the bins for a reliability diagram.

    ECE = Σ_b (n_b / N) |fraction of positives_b − mean probability_b|; unknown labels (NaN) are left out.
    """
    y = np.asarray(y_true, dtype=float).ravel()
    p = np.asarray(prob, dtype=float).ravel()
    keep = np.isfinite(y)
    y, p = y[keep], p[keep]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        if n == 0:
            continue
        conf, frac = float(p[sel].mean()), float(y[sel].mean())
        ece += n / max(1, y.size) * abs(frac - conf)
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": n, "mean_probability": conf,
                     "fraction_positive": frac})
    return {"ece": float(ece) if y.size else math.nan, "n": int(y.size), "bins": bins}


# ----------------------------------------------------------------------------------------------
# segmentation


def cluster_mean_ci(values: np.ndarray, clusters: Sequence[object] | None, n_boot: int, seed: int,
                    alpha: float = 0.05) -> tuple[float, float, float, int]:
    """Mean of the finite ``values`` and its percentile cluster-bootstrap interval.

    Each resample draws the clusters (patients) of the finite values with replacement and averages
    every value of the drawn clusters, i.e. the mean over the resample's rows, exactly as
    :func:`~orthodiff_nnunet.evaluation.classification.bootstrap_ci` with ``clusters`` would, from
    per-cluster sums (fast).

    Returns:
        ``(mean, low, high, n)``: NaN for what is undefined; ``n`` is the number of finite values.
    """
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values)
    v = values[keep]
    if v.size == 0:
        return math.nan, math.nan, math.nan, 0
    cl = None if clusters is None else [c for c, k in zip(clusters, keep) if k]
    members = cluster_members(cl, v.size)
    sums = np.array([v[m].sum() for m in members])
    counts = np.array([m.size for m in members], dtype=np.float64)
    lo = hi = math.nan
    if n_boot:
        rng = np.random.default_rng(seed)
        boot = np.empty(int(n_boot))
        for b in range(int(n_boot)):
            drawn = rng.integers(0, len(members), len(members))
            boot[b] = sums[drawn].sum() / counts[drawn].sum()
        lo, hi = (float(x) for x in np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    return float(v.mean()), lo, hi, int(v.size)


def _row_status(r: Mapping) -> str | None:
    """A row's empty-mask status; rows without one are classified from ``n_ref``/``n_pred`` when given."""
    if r.get("status"):
        return str(r["status"])
    if r.get("n_ref") is None or r.get("n_pred") is None:
        return None
    return {(True, True): "both_present", (True, False): "missed", (False, True): "false_detection",
            (False, False): "both_empty"}[(r["n_ref"] > 0, r["n_pred"] > 0)]


def _seg_clusters(rows: Sequence[Mapping]) -> tuple[list[object], int]:
    """Cluster id per segmentation row: the patient, else the exam (all views and echoes), else the case."""
    return cluster_ids([r.get("patient") for r in rows], [r.get("exam") or r["case"] for r in rows])


def summarize_segmentation(rows: Sequence[Mapping], n_boot: int = 1000, seed: int = 0) -> dict:
    """Per structure: mean Dice / HD95 / surface Dice with patient-cluster bootstrap CIs, overall and per stratum.

    Per structure and block: ``n_cases``; ``dice``, ``hd95_mm``, ``surface_dice`` and
    ``hd95_capped_mm`` as ``{"mean", "ci", "n"}`` (``n`` = rows where the metric is defined: Dice
    and surface Dice count a missed structure or a false detection as 0; ``hd95_mm`` only cases
    with both masks non-empty; ``hd95_capped_mm`` puts a miss or false detection at the image
    diagonal, ``cap``); and the counts ``n_missed``, ``n_false_detection``, ``n_both_empty``
    (not applicable: no metric) and ``n_both_present``.
    """
    structures = list(dict.fromkeys(r["structure"] for r in rows))

    def block(subset: list[Mapping]) -> dict:
        out = {}
        for s in structures:
            rs = [r for r in subset if r["structure"] == s]
            clusters, _ = _seg_clusters(rs)
            statuses = [_row_status(r) for r in rs]
            entry: dict = {"n_cases": len(rs), **{f"n_{k}": statuses.count(k) for k in SEG_STATUSES}}
            for m in (*SEG_METRICS, SEG_CAPPED):
                vals = np.array([np.nan if r.get(m) is None else float(r[m]) for r in rs], dtype=float)
                mean, lo, hi, n = cluster_mean_ci(vals, clusters, n_boot, seed)
                entry[m] = {"mean": mean, "ci": [lo, hi], "n": n}
            caps = [float(r["cap_mm"]) for r in rs if r.get("cap_mm") is not None]
            entry[SEG_CAPPED]["cap"] = "diagonal of each case's image (mm)"
            entry[SEG_CAPPED]["cap_mm_max"] = max(caps) if caps else math.nan
            out[s] = entry
        return out

    clusters, missing = _seg_clusters(rows)
    summary = {"overall": block(list(rows)), "strata": {},
               "resampling": {"unit": "patient", "n_clusters": len(set(clusters)), "n_rows_without_patient": missing,
                              "fallback": "a row without a patient id is resampled with its exam (else its case) "
                                          "as its own cluster"}}
    for key in STRATA_SEG:
        values = sorted({r.get(key) for r in rows if r.get(key) is not None}, key=str)
        summary["strata"][key] = {str(v): block([r for r in rows if r.get(key) == v]) for v in values}
    return summary


# ----------------------------------------------------------------------------------------------
# classification


def _cls_arrays(exams: Sequence[Mapping], labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.array([[np.nan if e["targets"].get(n) is None else float(e["targets"][n]) for n in labels] for e in exams],
                 dtype=float).reshape(len(exams), len(labels))
    p = np.array([[float(e["probabilities"][n]) for n in labels] for e in exams], dtype=float).reshape(len(exams), len(labels))
    return y, p


def _cls_metrics(exams: Sequence[Mapping], labels: Sequence[str], thresholds: Mapping[str, float], n_boot: int,
                 seed: int) -> dict:
    y, p = _cls_arrays(exams, labels)
    clusters, missing = cluster_ids([e.get("patient") for e in exams], [e["exam"] for e in exams])
    return classification_metrics(y, p, labels, thresholds, n_boot, seed, clusters=clusters,
                                  n_without_patient=missing).to_dict()


def summarize_classification(exams: Sequence[Mapping], labels: Sequence[str], thresholds: Mapping[str, float],
                             n_boot: int = 1000, seed: int = 0,
                             labels_not_evaluated: Mapping[str, str] | None = None) -> dict:
    """Per-label metrics with patient-cluster CIs (overall and per stratum), calibration, the views each exam had.

    Args:
        exams: see the module docstring; ``patient`` (pseudonym) is the bootstrap's cluster, an exam
            without one is its own cluster.
        labels: the labels to evaluate (those the model predicts *and* the site annotates).
        thresholds: the model's decision thresholds.
        n_boot, seed: bootstrap.
        labels_not_evaluated: label -> why it cannot be evaluated (written as is).
    """
    y, p = _cls_arrays(exams, labels)
    overall = _cls_metrics(exams, labels, thresholds, n_boot, seed)
    out = {"overall": overall, "strata": {},
           "resampling": {"unit": "patient", "n_clusters": overall["resampling"]["n_clusters"],
                          "n_exams_without_patient": overall["resampling"]["n_without_patient"],
                          "fallback": "an exam without a patient id is resampled as its own cluster"},
           "labels_evaluated": list(labels),
           "labels_not_evaluated": dict(labels_not_evaluated or {}),
           "undefined": {m["name"]: m["undefined"] for m in overall["labels"] if m["undefined"]},
           "calibration": {n: calibration(y[:, j], p[:, j]) for j, n in enumerate(labels)},
           "calibration_pooled": calibration(y, p),
           "missing_views": {e["exam"]: sorted(set(("sag", "cor", "ax")) - set(e.get("views", ()))) for e in exams
                             if set(("sag", "cor", "ax")) - set(e.get("views", ("sag", "cor", "ax")))}}
    for key in STRATA_CLS:
        values = sorted({e.get(key) for e in exams if e.get(key) is not None}, key=str)
        out["strata"][key] = {}
        for v in values:
            sub = [e for e in exams if e.get(key) == v]
            out["strata"][key][str(v)] = _cls_metrics(sub, labels, thresholds, n_boot, seed)
    return out


# ----------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(exams: Sequence[Mapping], labels: Sequence[str], path: Path) -> Path | None:
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p = _cls_arrays(exams, labels)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    drawn = 0
    for j, name in enumerate(labels):
        keep = np.isfinite(y[:, j])
        yy = y[keep, j]
        if yy.size == 0 or yy.min() == yy.max():
            continue
        fpr, tpr, _ = roc_curve(yy, p[keep, j])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(yy, p[keep, j]):.2f})")
        drawn += 1
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC curves (external site)")
    if drawn:
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no label with both classes", ha="center")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_dice_boxes(rows: Sequence[Mapping], path: Path) -> Path:
    plt = _plt()
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    sites = sorted({str(r["site"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(structures) * len(sites)), 4.2))
    width = 0.8 / max(1, len(sites))
    for k, site in enumerate(sites):
        data = [[r["dice"] for r in rows if r["structure"] == s and str(r["site"]) == site
                 and r.get("dice") is not None and math.isfinite(r["dice"])] or [np.nan] for s in structures]
        pos = np.arange(len(structures)) + (k - (len(sites) - 1) / 2) * width
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, manage_ticks=False)
        for b in bp["boxes"]:
            b.set_facecolor(f"C{k}")
            b.set_alpha(0.6)
        ax.plot([], [], color=f"C{k}", lw=6, alpha=0.6, label=site)
    ax.set_xticks(np.arange(len(structures)))
    ax.set_xticklabels(structures, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title("Dice per structure and site")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_reliability(cal: Mapping, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    b = cal["bins"]
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    if b:
        ax.plot([x["mean_probability"] for x in b], [x["fraction_positive"] for x in b], "o-", label="model")
        for x in b:
            ax.annotate(str(x["n"]), (x["mean_probability"], x["fraction_positive"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction positive")
    ax.set_title(f"Reliability (all labels pooled), ECE {_fmt(cal['ece'])}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# provenance


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("orthodiff-nnunet", "nnunetv2", "torch", "dynamic-network-architectures", "SimpleITK", "monai",
                "scikit-learn", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def hash_inputs(folders: Sequence[Path]) -> str:
    """SHA-256 over the relative paths and bytes of every file under ``folders`` (sorted)."""
    h = hashlib.sha256()
    for folder in sorted(Path(f) for f in folders):
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(folder.parent)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# writing


def _seg_table(block: Mapping) -> list[list[str]]:
    rows = [["structure", "n", "Dice [95% CI]", "HD95 mm [95% CI]", "surface Dice [95% CI]"]]
    for s, e in block.items():
        cells = [s, str(e["n_cases"])]
        for m in SEG_METRICS:
            lo, hi = e[m]["ci"]
            cells.append(f"{_fmt(e[m]['mean'])} [{_fmt(lo)}, {_fmt(hi)}]")
        rows.append(cells)
    return rows


def _cls_table(metrics: Mapping) -> list[list[str]]:
    rows = [["label", "n (pos)", "threshold", "AUROC [95% CI]", "AUPRC [95% CI]", "sensitivity [95% CI]",
             "specificity [95% CI]"]]

    def cell(v, ci):
        lo, hi = ci if ci else (None, None)
        return f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"

    for m in metrics["labels"]:
        rows.append([m["name"], f"{m['n']} ({m['n_pos']})", _fmt(m["threshold"])]
                    + [cell(m[k], m["ci"].get(k)) for k in ("auroc", "auprc", "sensitivity", "specificity")])
    mac, mci = metrics["macro"], metrics["macro_ci"]
    rows.append(["macro", f"{metrics['n_exams']} exams", ""]
                + [cell(mac.get(k), mci.get(k)) for k in ("auroc", "auprc", "sensitivity", "specificity")])
    return rows


def _md(rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
                     + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STRATUM_TITLES = {"site": "site", "field_strength_t": "field strength (T)", "vendor": "vendor", "orientation": "orientation"}


def build_report(
    out_dir: Path,
    seg_rows: Sequence[Mapping] = (),
    cls_exams: Sequence[Mapping] = (),
    label_names: Sequence[str] = (),
    thresholds: Mapping[str, float] | None = None,
    provenance: Mapping | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    title: str = "OrthoDiff-nnU-Net external validation",
    labels_not_evaluated: Mapping[str, str] | None = None,
) -> Path:
    """Write report.json, report.md, report.html and the PNG plots into ``out_dir``; returns report.html.

    ``labels_not_evaluated``: label -> reason (e.g. the model predicts it but the site does not annotate it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"title": title, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "provenance": {**(provenance or {}), "packages": package_versions()},
                    "bootstrap": {"resamples": n_boot, "seed": seed, "interval": "percentile 95%", "unit": "patient"}}
    plots: dict[str, Path] = {}
    # nnU-Net's progress plot calls seaborn's set(font_scale=2.5), which changes matplotlib globally
    # for the rest of the process: draw with matplotlib's defaults whatever ran before
    with _plt().style.context("default"):
        _draw(out_dir, seg_rows, cls_exams, label_names, thresholds, report, plots, n_boot, seed,
              labels_not_evaluated)
    atomic_write_json(out_dir / "report.json", _nan_to_none(report))
    return _write_pages(out_dir, report, plots, seg_rows, cls_exams, n_boot, seed, title)


def _draw(out_dir, seg_rows, cls_exams, label_names, thresholds, report, plots, n_boot, seed,
          labels_not_evaluated=None) -> None:
    if seg_rows:
        report["segmentation"] = summarize_segmentation(seg_rows, n_boot, seed)
        report["segmentation"]["cases"] = list(seg_rows)
        plots["Dice per structure and site"] = plot_dice_boxes(seg_rows, out_dir / "dice_boxplot.png")
    if cls_exams:
        thresholds = dict(thresholds or {})
        report["classification"] = summarize_classification(cls_exams, label_names, thresholds, n_boot, seed,
                                                            labels_not_evaluated)
        report["classification"]["exams"] = list(cls_exams)
        plots["ROC curves"] = plot_roc(cls_exams, label_names, out_dir / "roc_curves.png")
        plots["Reliability diagram"] = plot_reliability(report["classification"]["calibration_pooled"],
                                                        out_dir / "reliability_diagram.png")


def _single_strata(strata: Mapping) -> dict[str, object]:
    """Strata with a single value (one site, one field strength, ...): their table is the overall one."""
    return {key: next(iter(groups)) for key, groups in strata.items() if len(groups) == 1}


def _same_note(same: Mapping[str, object]) -> str:
    return ("One value only, so the overall table holds: "
            + "; ".join(f"{STRATUM_TITLES[k]} {v}" for k, v in same.items())
            + " (per-stratum figures are in report.json).")


def _write_pages(out_dir, report, plots, seg_rows, cls_exams, n_boot, seed, title) -> Path:

    md = [f"# {title}", "", f"Created {report['created']}. Intervals: percentile bootstrap ({n_boot} resamples, seed {seed}).", ""]
    parts_html = []
    if seg_rows:
        seg = report["segmentation"]
        md += ["## Segmentation (overall)", "", _md(_seg_table(seg["overall"])), ""]
        parts_html.append("<h2>Segmentation (overall)</h2>" + _html_table(_seg_table(seg["overall"])))
        same = _single_strata(seg["strata"])
        for key, groups in seg["strata"].items():
            if key in same:
                continue
            for value, block in groups.items():
                t = f"Segmentation, {STRATUM_TITLES[key]} = {value}"
                md += [f"### {t}", "", _md(_seg_table(block)), ""]
                parts_html.append(f"<h3>{html.escape(t)}</h3>" + _html_table(_seg_table(block)))
        if same:
            note = _same_note(same)
            md += [note, ""]
            parts_html.append(f"<p class='note'>{html.escape(note)}</p>")
    if cls_exams:
        cls = report["classification"]
        md += ["## Classification (overall)", "", _md(_cls_table(cls["overall"])), "",
               f"Expected calibration error (all labels pooled): {_fmt(cls['calibration_pooled']['ece'])}", ""]
        parts_html.append("<h2>Classification (overall)</h2>" + _html_table(_cls_table(cls["overall"]))
                          + f"<p>Expected calibration error (all labels pooled): {_fmt(cls['calibration_pooled']['ece'])}</p>")
        if cls["missing_views"]:
            gaps = ", ".join(f"{e}: {'/'.join(v)}" for e, v in cls["missing_views"].items())
            md += [f"Exams predicted with missing views: {gaps}", ""]
            parts_html.append(f"<p>Exams predicted with missing views: {html.escape(gaps)}</p>")
        same = _single_strata(cls["strata"])
        for key, groups in cls["strata"].items():
            if key in same:
                continue
            for value, block in groups.items():
                t = f"Classification, {STRATUM_TITLES[key]} = {value}"
                md += [f"### {t}", "", _md(_cls_table(block)), ""]
                parts_html.append(f"<h3>{html.escape(t)}</h3>" + _html_table(_cls_table(block)))
        if same:
            note = _same_note(same)
            md += [note, ""]
            parts_html.append(f"<p class='note'>{html.escape(note)}</p>")
    md += ["## Plots", ""] + [f"![{t}]({p.name})" for t, p in plots.items()] + [""]
    md += ["## Provenance", "", "```json", json.dumps(_nan_to_none(report["provenance"]), indent=2), "```", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(md))

    imgs = "".join(
        f"<figure><img alt='{html.escape(t)}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
        f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, p in plots.items())
    prov = html.escape(json.dumps(_nan_to_none(report["provenance"]), indent=2))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f0f3f7; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.8em; }}
.note {{ color: #555; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">Created {report['created']}. Intervals: percentile bootstrap ({n_boot} resamples of cases/exams, seed {seed}); n/a = undefined on these data.</p>
{''.join(parts_html)}
<h2>Plots</h2>{imgs}
<h2>Provenance</h2><pre>{prov}</pre>
</body></html>
"""
    atomic_write_text(out_dir / "report.html", page)
    return out_dir / "report.html"
