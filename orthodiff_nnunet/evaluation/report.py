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
and embedded in the HTML (no external resources, nothing fetched when the page is opened).

The page opens with a headline (what was evaluated, the few figures that matter with their
intervals, what could not be evaluated and why), then per task: the tables (sortable by clicking a
column header, a few lines of inline JavaScript), for segmentation a per-case table (worst first)
linking to the case pictures of :mod:`orthodiff_nnunet.evaluation.figures` (best, median and worst
case per site and orientation, when the rows name their files), for classification ROC curves with
bootstrap bands, a confusion matrix per label at its threshold and the reliability diagram. Any
metric may be undefined (None, NaN, or a string/dict with a reason): it is shown as "n/a (reason)".
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import math
import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from orthodiff_nnunet.evaluation.classification import classification_metrics, cluster_ids, cluster_members
from orthodiff_nnunet.evaluation.figures import (
    FILE_KEYS,
    PLANE_NAMES,
    CaseScore,
    _finite,
    best_median_worst,
    case_scores,
    confusion_counts,
    plot_case_overlay,
    plot_roc_bands,
)
from orthodiff_nnunet.utils import atomic_write_json, atomic_write_text, save_figure

log = logging.getLogger(__name__)

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
    """A number with ``digits`` decimals; "n/a" for None, NaN, inf or anything that is not a number."""
    v = _finite(v)
    return "n/a" if v is None else f"{v:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# calibration


def calibration(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> dict:
    """Expected calibration error over equal-width probability bins, and the bins for a reliability diagram.

    The bins are scikit-learn's :func:`~sklearn.calibration.calibration_curve` (``strategy="uniform"``:
    ``n_bins`` equal widths on [0, 1], a probability on an inner edge counted in the lower bin);
    ECE = Σ_b (n_b / N) |fraction of positives_b − mean probability_b|; unknown labels (NaN) are left out.
    """
    from sklearn.calibration import calibration_curve

    y = np.asarray(y_true, dtype=float).ravel()
    p = np.asarray(prob, dtype=float).ravel()
    keep = np.isfinite(y)
    y, p = y[keep], p[keep]
    if not y.size:
        return {"ece": math.nan, "n": 0, "bins": []}
    fraction, mean_prob = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # the bin sizes (the ECE's weights), binned as calibration_curve bins; it returns the non-empty bins in order
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)
    filled = np.flatnonzero(counts)
    bins = [{"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(counts[b]), "mean_probability": float(c),
             "fraction_positive": float(f)} for b, f, c in zip(filled, fraction, mean_prob)]
    ece = float(np.sum(counts[filled] / y.size * np.abs(fraction - mean_prob)))
    return {"ece": ece, "n": int(y.size), "bins": bins}


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


def plot_dice_boxes(rows: Sequence[Mapping], path: Path) -> Path:
    plt = _plt()
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    sites = sorted({str(r["site"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(structures) * len(sites)), 4.2))
    width = 0.8 / max(1, len(sites))
    for k, site in enumerate(sites):
        data = [[_finite(r.get("dice")) for r in rows if r["structure"] == s and str(r["site"]) == site
                 and _finite(r.get("dice")) is not None] or [np.nan] for s in structures]
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
#
# A table is a list of rows, the first the header; a cell is its text, or a dict with "text" and
# optionally "v" (the number the HTML table sorts by; None = n/a, sorted last), "href" (a link) and
# "cls" (a CSS class).


def _pair(ci) -> tuple[float | None, float | None]:
    """(low, high) of an interval given as [lo, hi], {"low", "high"} or nothing; None where undefined."""
    if isinstance(ci, Mapping):
        ci = (ci.get("low", ci.get("lo")), ci.get("high", ci.get("hi")))
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return _finite(ci[0]), _finite(ci[1])
    return None, None


def _reason(*candidates) -> str | None:
    """The first reason found: a dict's "reason", or a string that is neither a number nor just "undefined"."""
    for x in candidates:
        if isinstance(x, Mapping) and x.get("reason"):
            return str(x["reason"])
        if isinstance(x, str) and x.strip() and _finite(x) is None \
                and x.strip().lower() not in ("undefined", "nan", "n/a", "none", "null"):
            return x.strip()
    return None


def _ci_note(valid, n_boot) -> str | None:
    """Why an interval is missing: too few resamples where the metric was defined (the statistics' count)."""
    valid, n_boot = _finite(valid), _finite(n_boot)
    if valid is None or not n_boot:
        return None
    return f"CI: only {int(valid)} of {int(n_boot)} resamples defined"


def _metric_cell(value, ci=None, reason: str | None = None, ci_note: str | None = None) -> dict:
    """``0.812 [0.700, 0.900]`` sorted by 0.812, or ``n/a (reason)`` sorted last.

    ``ci_note`` says why a defined value has no interval; it is shown only when the interval is missing.
    """
    v = _finite(value)
    if v is None:
        why = reason or _reason(value)
        return {"text": f"n/a ({why})" if why else "n/a", "v": None}
    lo, hi = _pair(ci)
    cell = {"text": f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]", "v": v}
    if (lo is None or hi is None) and ci_note:
        cell["note"] = ci_note
    return cell


def _label_reason(m: Mapping, key: str) -> str | None:
    """Why a label's metric is undefined: the statistics' own reason if they give one, else from the counts."""
    for holder in ("reasons", "undefined", "reason"):
        r = m.get(holder)
        if isinstance(r, Mapping) and r.get(key):
            return str(r[key])
    given = _reason(m.get(key), m.get(f"{key}_reason"))
    if given:
        return given
    n, n_pos = _finite(m.get("n")), _finite(m.get("n_pos"))
    if n is None or n_pos is None:
        return None
    if n == 0:
        return "no exam with a known target"
    if key in ("auroc", "auprc", "sensitivity") and n_pos == 0:
        return "no positive exam"
    if key in ("auroc", "specificity") and n_pos == n:
        return "no negative exam"
    return None


def _extra_counts(entry: Mapping, skip: Sequence[str] = ("n_cases", "n")) -> str:
    """Integer counts the statistics add to an entry (e.g. misses, false detections), as "missed 1, ..."."""
    parts = [f"{k[2:].replace('_', ' ')} {v}" for k, v in entry.items()
             if k.startswith("n_") and k not in skip and isinstance(v, int) and not isinstance(v, bool) and v]
    return ", ".join(parts)


def _seg_table(block: Mapping) -> list[list]:
    """Per structure: n, the misses and false detections (when counted), Dice, HD95, capped HD95, surface Dice."""
    entries = {s: e for s, e in block.items() if isinstance(e, Mapping)}
    counted = any("n_missed" in e or "n_false_detection" in e for e in entries.values())
    capped = any(isinstance(e.get(SEG_CAPPED), Mapping) for e in entries.values())
    metrics = [("dice", "Dice [95% CI]"), ("hd95_mm", "HD95 mm [95% CI]")]
    metrics += [(SEG_CAPPED, "HD95 capped mm [95% CI]")] if capped else []
    metrics += [("surface_dice", "surface Dice [95% CI]")]
    rows: list[list] = [["structure", "n"] + (["missed", "false detections", "absent from both"] if counted else [])
                        + [title for _, title in metrics]]
    for s, e in entries.items():
        extra = _extra_counts(e, skip=("n_cases", "n", "n_missed", "n_false_detection", "n_both_empty",
                                       "n_both_present"))
        n = e.get("n_cases", "")
        cells: list = [s, {"text": f"{n} ({extra})" if extra else str(n), "v": _finite(n)}]
        if counted:
            cells += [{"text": str(e.get(k, "")), "v": _finite(e.get(k))}
                      for k in ("n_missed", "n_false_detection", "n_both_empty")]
        for m, _ in metrics:
            x = e.get(m)
            if isinstance(x, Mapping):
                reason = _reason(x, e.get("reasons", {}).get(m) if isinstance(e.get("reasons"), Mapping) else None)
                if reason is None and _finite(x.get("mean")) is None and x.get("n") == 0:
                    reason = "structure absent from every reference and prediction" if m != "hd95_mm" \
                        else "no case with the structure in both reference and prediction"
                cell = _metric_cell(x.get("mean"), x.get("ci"), reason)
                counts = _extra_counts(x)
                if counts:
                    cell["text"] += f"; {counts}"
                cells.append(cell)
            else:
                cells.append(_metric_cell(x))
        rows.append(cells)
    return rows


def _cls_table(metrics: Mapping) -> list[list]:
    keys = ("auroc", "auprc", "sensitivity", "specificity")
    rows: list[list] = [["label", "n (pos)", "threshold", "AUROC [95% CI]", "AUPRC [95% CI]", "sensitivity [95% CI]",
                         "specificity [95% CI]"]]
    n_boot = metrics.get("n_boot")
    for m in metrics.get("labels", []):
        ci, valid = m.get("ci") or {}, m.get("ci_valid") or {}
        rows.append([m["name"], {"text": f"{m.get('n')} ({m.get('n_pos')})", "v": _finite(m.get("n"))},
                     {"text": _fmt(_finite(m.get("threshold"))), "v": _finite(m.get("threshold"))}]
                    + [_metric_cell(m.get(k), ci.get(k), _label_reason(m, k), _ci_note(valid.get(k), n_boot))
                       for k in keys])
    mac, mci, mvalid = metrics.get("macro") or {}, metrics.get("macro_ci") or {}, metrics.get("macro_ci_valid") or {}
    rows.append(["macro", f"{metrics.get('n_exams')} exams", ""]
                + [_metric_cell(mac.get(k), mci.get(k), _reason(mac.get(k)) or
                                ("no label where it is defined" if _finite(mac.get(k)) is None else None),
                                _ci_note(mvalid.get(k), n_boot))
                   for k in keys])
    return rows


def _text(c) -> str:
    if not isinstance(c, Mapping):
        return str(c)
    return c["text"] + (f" ({c['note']})" if c.get("note") else "")


def _md(rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(_text(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
                     + ["| " + " | ".join(_text(c).replace("|", "/") for c in r) + " |" for r in rows[1:]])


def _html_cell(c) -> str:
    if not isinstance(c, Mapping):
        return f"<td>{html.escape(str(c))}</td>"
    attrs = ""
    if "v" in c:
        attrs += f" data-v='{'' if c['v'] is None else repr(float(c['v']))}'"
    if c.get("cls"):
        attrs += f" class='{html.escape(c['cls'])}'"
    text = c["text"]
    if c.get("v", 0) is None and text.startswith("n/a (") and text.endswith(")"):  # the reason on its own line
        body = f"n/a <small class='why'>{html.escape(text[4:])}</small>"
    else:
        body = html.escape(text)
    if c.get("note"):
        body += f" <small class='why'>({html.escape(c['note'])})</small>"
    if c.get("href"):
        body = f"<a href='{html.escape(c['href'])}'>{body}</a>"
    return f"<td{attrs}>{body}</td>"


def _html_table(rows: list[list], sortable: bool = False, table_id: str | None = None, foot: int = 0) -> str:
    """An HTML table; the last ``foot`` rows (e.g. the macro average) go to a footer that sorting leaves alone."""
    head = "".join(f"<th>{html.escape(_text(c))}</th>" for c in rows[0])
    end = len(rows) - foot
    body = "".join("<tr>" + "".join(_html_cell(c) for c in r) + "</tr>" for r in rows[1:end])
    tail = "".join("<tr>" + "".join(_html_cell(c) for c in r) + "</tr>" for r in rows[end:])
    attrs = (f" id='{html.escape(table_id)}'" if table_id else "") + (" class='sortable'" if sortable else "")
    return (f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            + (f"<tfoot>{tail}</tfoot>" if tail else "") + "</table>")


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
    seg_comparison: Mapping | None = None,
) -> Path:
    """Write report.json, report.md, report.html and the PNG plots into ``out_dir``; returns report.html.

    Segmentation rows that carry ``image_file``, ``reference_file`` and ``prediction_file`` (and the
    structure's ``label_value``) get case pictures: per site and orientation the best, median and
    worst case by mean Dice (PNG files under ``cases/``). The file paths are not copied into report.json.
    ``labels_not_evaluated``: label -> reason (e.g. the model predicts it but the site does not annotate it).
    ``seg_comparison``: :func:`~orthodiff_nnunet.evaluation.comparison.compare_segmentation` of the
    segmentation model against a second one; it gets its own section after the headline.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"title": title, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "provenance": {**(provenance or {}), "packages": package_versions()},
                    "bootstrap": {"resamples": n_boot, "seed": seed, "interval": "percentile 95%", "unit": "patient"}}
    plots: dict[str, dict[str, Path]] = {"segmentation": {}, "classification": {}}
    # nnU-Net's progress plot calls seaborn's set(font_scale=2.5), which changes matplotlib globally
    # for the rest of the process: draw with matplotlib's defaults whatever ran before
    with _plt().style.context("default"):
        _draw(out_dir, seg_rows, cls_exams, label_names, thresholds, report, plots, n_boot, seed,
              labels_not_evaluated)
    report["headline"] = headline(report, seg_rows, cls_exams, n_boot, seed)
    if seg_comparison is not None:
        report["segmentation_comparison"] = dict(seg_comparison)
    atomic_write_json(out_dir / "report.json", _nan_to_none(report))
    return _write_pages(out_dir, report, plots, seg_rows, cls_exams, n_boot, seed, title)


def _clean_row(r: Mapping) -> dict:
    return {k: v for k, v in r.items() if k not in FILE_KEYS}


def _per_case(seg_rows: Sequence[Mapping]) -> list[dict]:
    """One entry per (case, orientation): mean and lowest Dice over its structures, mean HD95 / surface Dice."""
    out = []
    for s in case_scores(seg_rows):
        dice = {r["structure"]: _finite(r.get("dice")) for r in s.rows}
        defined = {k: v for k, v in dice.items() if v is not None}
        low = min(defined, key=defined.get) if defined else None

        def mean_of(metric):
            vals = [v for v in (_finite(r.get(metric)) for r in s.rows) if v is not None]
            return float(np.mean(vals)) if vals else None

        first = s.rows[0]
        out.append({"case": s.case, "orientation": s.orientation, "site": s.site,
                    "field_strength_t": first.get("field_strength_t"), "vendor": first.get("vendor"),
                    "patient": first.get("patient"), "exam": first.get("exam"), "n_structures": s.n_structures,
                    "mean_dice": s.mean_dice,
                    "lowest_dice": defined.get(low) if low else None, "lowest_structure": low,
                    "mean_hd95_mm": mean_of("hd95_mm"), "mean_surface_dice": mean_of("surface_dice")})
    return out


def _case_labels(rows: Sequence[Mapping]) -> dict[str, int] | None:
    """Structure name -> label value of one case: from the rows, else from the reference's dataset.json."""
    labels = {r["structure"]: int(r["label_value"]) for r in rows
              if isinstance(r.get("label_value"), (int, np.integer)) and not isinstance(r.get("label_value"), bool)}
    if labels:
        return labels
    ds = Path(rows[0]["reference_file"]).parent.parent / "dataset.json"
    if ds.is_file():
        found = json.loads(ds.read_text()).get("labels", {})
        return {k: int(v) for k, v in found.items() if isinstance(v, int) and v != 0}
    return None


def _draw_cases(out_dir: Path, seg_rows: Sequence[Mapping]) -> tuple[list[dict], list[str]]:
    """Best / median / worst case pictures per site and orientation; returns (pictures, why some are missing)."""
    scores = case_scores(seg_rows)
    if not any(all(r.get(k) for k in FILE_KEYS) for r in seg_rows):
        return [], ["case pictures: the segmentation rows name no image, reference and prediction files"]
    pictures, problems = [], []
    groups: dict[tuple[str, str], list[CaseScore]] = {}
    for s in scores:
        groups.setdefault((s.site, s.orientation), []).append(s)
    for (site, orientation), members in sorted(groups.items()):
        for rank, s in best_median_worst(members):
            r0 = s.rows[0]
            files = {k: r0.get(k) for k in FILE_KEYS}
            missing = [k for k, f in files.items() if not f or not Path(f).is_file()]
            if missing:
                problems.append(f"case picture of {s.case} ({orientation}): missing {', '.join(missing)}")
                continue
            labels = _case_labels(s.rows)
            if not labels:
                problems.append(f"case picture of {s.case} ({orientation}): label values unknown (no label_value "
                                "in the rows and no dataset.json beside the reference folder)")
                continue
            try:
                info = plot_case_overlay(
                    Path(files["image_file"]), Path(files["reference_file"]), Path(files["prediction_file"]),
                    labels, orientation, out_dir / "cases" / f"{s.anchor}.png",
                    f"{site}, {PLANE_NAMES.get(orientation, orientation)}: {rank} case {s.case}, "
                    f"mean Dice {s.mean_dice:.3f} over {s.n_structures} structures")
            except (OSError, RuntimeError, ValueError) as e:  # unreadable file: the report is still written
                log.warning("case picture of %s (%s) not drawn: %s", s.case, orientation, e)
                problems.append(f"case picture of {s.case} ({orientation}): {e}")
                continue
            pictures.append({"case": s.case, "orientation": orientation, "site": site, "rank": rank,
                             "mean_dice": s.mean_dice, "n_structures": s.n_structures, "anchor": s.anchor,
                             **info, "file": f"cases/{info['file']}"})
    return pictures, problems


def _draw(out_dir, seg_rows, cls_exams, label_names, thresholds, report, plots, n_boot, seed,
          labels_not_evaluated=None) -> None:
    if seg_rows:
        rows = [_clean_row(r) for r in seg_rows]
        report["segmentation"] = summarize_segmentation(rows, n_boot, seed)
        report["segmentation"]["cases"] = rows
        report["segmentation"]["per_case"] = _per_case(seg_rows)
        plots["segmentation"]["Dice per structure and site"] = plot_dice_boxes(rows, out_dir / "dice_boxplot.png")
        pictures, problems = _draw_cases(out_dir, seg_rows)
        report["segmentation"]["pictures"] = pictures
        report["segmentation"]["pictures_missing"] = problems
    if cls_exams:
        thresholds = dict(thresholds or {})
        report["classification"] = summarize_classification(cls_exams, label_names, thresholds, n_boot, seed,
                                                            labels_not_evaluated)
        report["classification"]["exams"] = list(cls_exams)
        y, p = _cls_arrays(cls_exams, label_names)
        # the metrics' clusters: the patient, an exam without one on its own
        groups, without_patient = cluster_ids([e.get("patient") for e in cls_exams], [e["exam"] for e in cls_exams])
        unit = "exams" if without_patient == len(cls_exams) else "patients"
        overall = {m["name"]: m for m in report["classification"]["overall"].get("labels", [])}
        # the operating points are the table's thresholds (a label without one there has no single threshold)
        used = {n: overall[n].get("threshold") if n in overall else thresholds.get(n) for n in label_names}
        band_boot = min(int(n_boot), 500)  # a pointwise band: 500 resamples are plenty, and it stays quick
        bands = plot_roc_bands(y, p, label_names, used, groups, overall, out_dir / "roc_curves.png",
                               band_boot, seed)
        plots["classification"]["ROC curves"] = out_dir / "roc_curves.png"
        report["classification"]["roc_band"] = {"resampled": unit, "n_clusters": len(set(groups)),
                                                "n_exams_without_patient": without_patient,
                                                "resamples": band_boot, "seed": seed, "labels": bands}
        report["classification"]["confusion"] = confusion_counts(y, p, label_names, used)
        plots["classification"]["Reliability diagram"] = plot_reliability(
            report["classification"]["calibration_pooled"], out_dir / "reliability_diagram.png")


def _values(items: Sequence[Mapping], key: str) -> list[str]:
    return sorted({str(x.get(key)) for x in items if x.get(key) is not None})


def headline(report: Mapping, seg_rows: Sequence[Mapping], cls_exams: Sequence[Mapping], n_boot: int,
             seed: int) -> dict:
    """What was evaluated, the few figures that matter with their 95% intervals, what could not be evaluated.

    Segmentation's figure is the mean over cases of each case's mean Dice (over its defined
    structures), per orientation, with a percentile bootstrap interval resampling patients when the
    rows name them (cases otherwise); plus the structure with the lowest mean Dice. Classification's
    are the macro AUROC, sensitivity and specificity of the report's table and the pooled calibration error.
    """
    items = list(seg_rows) + list(cls_exams)
    patients = {str(x["patient"]) for x in items if x.get("patient") is not None}
    out: dict = {"sites": _values(items, "site"), "field_strengths_t": _values(items, "field_strength_t"),
                 "vendors": _values(items, "vendor"), "n_patients": len(patients) if patients else None,
                 "n_exams": len(cls_exams), "n_segmentation_cases": len({(str(r["case"]), str(r.get("orientation")))
                                                                           for r in seg_rows}),
                 "figures": [], "not_evaluated": []}
    if not patients:
        out["not_evaluated"].append("patient ids are not in the inputs: the number of patients is unknown")
    if report.get("segmentation"):
        _headline_segmentation(report["segmentation"], out, n_boot, seed)
    if report.get("classification"):
        _headline_classification(report["classification"], out)
    for task in ("segmentation", "classification"):  # notes the statistics may add (e.g. label-set mismatches)
        out["not_evaluated"] += _notes((report.get(task) or {}), task)
    return out


def _headline_segmentation(seg: Mapping, out: dict, n_boot: int, seed: int) -> None:
    """Adds to ``out`` the per-orientation mean Dice, the weakest structure and what is undefined."""
    per_case = seg["per_case"]
    for orientation in sorted({c["orientation"] for c in per_case}):
        cs = [c for c in per_case if c["orientation"] == orientation and c["mean_dice"] is not None]
        if not cs:
            out["not_evaluated"].append(f"segmentation {orientation}: no case with a defined Dice")
            continue
        # clusters as the tables': the patient, else the exam, else the case
        groups, without = cluster_ids([c.get("patient") for c in cs], [c.get("exam") or c["case"] for c in cs])
        mean, lo, hi, _ = cluster_mean_ci(np.array([c["mean_dice"] for c in cs]), groups, n_boot, seed)
        out["figures"].append({"task": "segmentation", "name": f"mean Dice per case, {orientation}",
                               "value": mean, "ci": [lo, hi], "n": len(cs), "n_of": "cases",
                               "unit": "cases" if without == len(cs) else "patients"})
    overall = seg.get("overall", {})
    dice = {s: _finite((e.get("dice") or {}).get("mean")) for s, e in overall.items() if isinstance(e, Mapping)}
    defined = {s: d for s, d in dice.items() if d is not None}
    if defined:
        low = min(defined, key=defined.get)
        out["figures"].append({"task": "segmentation", "name": f"lowest mean Dice of a structure: {low}",
                               "value": defined[low], "ci": list(_pair(overall[low]["dice"].get("ci"))),
                               "n": overall[low].get("n_cases"), "n_of": "cases"})
    for s, e in overall.items():
        if not isinstance(e, Mapping):
            continue
        if dice.get(s) is None:
            out["not_evaluated"].append(f"{s}: Dice undefined (absent from every reference and prediction)")
        else:
            out["not_evaluated"] += _structure_gaps(s, e)
    out["not_evaluated"] += seg.get("pictures_missing", [])


def _structure_gaps(s: str, e: Mapping) -> list[str]:
    """Why some of a structure's metrics are undefined in some cases (misses, false detections, absences)."""
    n_cases = e.get("n_cases")
    if "n_missed" in e or "n_false_detection" in e:  # the statistics count misses themselves
        miss, false, empty = (int(e.get(k) or 0) for k in ("n_missed", "n_false_detection", "n_both_empty"))
        lines = []
        if miss or false:
            lines.append(f"{s}: HD95 undefined in {miss + false} of {n_cases} cases ({miss} missed, {false} false "
                         "detection(s)): Dice and surface Dice count them as 0, the capped HD95 at the image diagonal")
        if empty:
            lines.append(f"{s}: absent from reference and prediction in {empty} of {n_cases} cases (no metric there)")
        return lines
    missing: dict[int, list[str]] = {}
    for m, name in (("hd95_mm", "HD95"), ("surface_dice", "surface Dice")):
        x = e.get(m) or {}
        if isinstance(x, Mapping) and isinstance(x.get("n"), int) and isinstance(n_cases, int) and x["n"] < n_cases:
            missing.setdefault(n_cases - x["n"], []).append(name)
    return [f"{s}: {' and '.join(names)} undefined in {k} of {n_cases} cases "
            "(structure missing from the reference or the prediction)" for k, names in missing.items()]


def _headline_classification(cls: Mapping, out: dict) -> None:
    """Adds to ``out`` the macro AUROC/sensitivity/specificity, the pooled ECE and the undefined labels."""
    ov = cls["overall"]
    mac, mci = ov.get("macro") or {}, ov.get("macro_ci") or {}
    for k, name in (("auroc", "macro AUROC"), ("sensitivity", "macro sensitivity"),
                    ("specificity", "macro specificity")):
        out["figures"].append({"task": "classification", "name": name, "value": _finite(mac.get(k)),
                               "ci": list(_pair(mci.get(k))), "n": ov.get("n_exams"), "n_of": "exams",
                               "ci_note": _ci_note((ov.get("macro_ci_valid") or {}).get(k), ov.get("n_boot"))})
    out["figures"].append({"task": "classification", "name": "expected calibration error (all labels pooled)",
                           "value": _finite(cls.get("calibration_pooled", {}).get("ece")), "ci": [None, None],
                           "n": cls.get("calibration_pooled", {}).get("n"), "n_of": "exam-label pairs"})
    for m in ov.get("labels", []):
        undefined = [k for k in ("auroc", "auprc", "sensitivity", "specificity") if _finite(m.get(k)) is None]
        if undefined:
            why = sorted({r for r in (_label_reason(m, k) for k in undefined) if r})
            out["not_evaluated"].append(f"{m['name']}: {', '.join(k.upper() if k.startswith('au') else k for k in undefined)} "
                                        f"undefined ({'; '.join(why) or 'see report.json'}; n = {m.get('n')}, "
                                        f"positives = {m.get('n_pos')})")
    if cls.get("missing_views"):
        out["not_evaluated"].append(f"{len(cls['missing_views'])} exam(s) predicted without all three views")
    if cls.get("roc_band", {}).get("resampled") == "exams":
        out["not_evaluated"].append("ROC bands resample exams, not patients (the exams name no patient)")


def _notes(section: Mapping, task: str) -> list[str]:
    """Free-text notes a summary carries (``labels_not_evaluated``, ``not_evaluated``, ``notes``, ...)."""
    lines = []
    for key in ("not_evaluated", "notes", "warnings", "label_mismatch", "labels_not_evaluated"):
        x = section.get(key)
        if isinstance(x, str) and x:
            lines.append(f"{task}: {x}")
        elif isinstance(x, Sequence) and not isinstance(x, str):
            lines += [f"{task}: {v}" for v in x if isinstance(v, str) and v]
        elif isinstance(x, Mapping):
            lines += [f"{task}: {k}: {v}" for k, v in x.items() if v]
    return lines


def _single_strata(strata: Mapping) -> dict[str, object]:
    """Strata with a single value (one site, one field strength, ...): their table is the overall one."""
    return {key: next(iter(groups)) for key, groups in strata.items() if len(groups) == 1}


def _same_note(same: Mapping[str, object]) -> str:
    return ("One value only, so the overall table holds: "
            + "; ".join(f"{STRATUM_TITLES[k]} {v}" for k, v in same.items())
            + " (per-stratum figures are in report.json).")


def _headline_lines(h: Mapping) -> tuple[str, list[str], list[str]]:
    """(what was evaluated, one line per figure, one line per thing not evaluated)."""
    what = (f"Sites {', '.join(h['sites']) or 'n/a'}; field strengths {', '.join(h['field_strengths_t']) or 'n/a'} T; "
            f"vendors {', '.join(h['vendors']) or 'n/a'}; "
            f"{h['n_patients'] if h['n_patients'] is not None else 'unknown number of'} patients, "
            f"{h['n_exams']} classified exams, {h['n_segmentation_cases']} segmentation cases (case x orientation).")
    figs = []
    for f in h["figures"]:
        lo, hi = _pair(f.get("ci"))
        ci = f" [95% CI {_fmt(lo)}, {_fmt(hi)}]" if lo is not None and hi is not None else \
            (f" [95% CI n/a: {f['ci_note'][4:]}]" if f.get("ci_note") and _finite(f.get("value")) is not None else "")
        unit = f", resampling {f['unit']}" if f.get("unit") else ""
        n_of = f" {f['n_of']}" if f.get("n_of") else ""
        figs.append(f"{f['task']}: {f['name']} {_fmt(f['value'])}{ci} (n = {f.get('n')}{n_of}{unit})")
    return what, figs, list(h["not_evaluated"])


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}' "
            "onload=\"this.dataset.loaded=this.naturalWidth>0?'ok':'empty'\" onerror=\"this.dataset.loaded='failed'\">")


def _figure(path: Path, caption: str, fig_id: str | None = None) -> str:
    id_attr = f" id='{html.escape(fig_id)}'" if fig_id else ""
    return f"<figure{id_attr}>{_img(path, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _case_tables(report: Mapping) -> tuple[list[list], list[list]]:
    """The per-case table (one row per case and orientation) and the per-structure table."""
    seg = report["segmentation"]
    pics = {(p["case"], p["orientation"]): p for p in seg.get("pictures", [])}
    per_case = [["case", "site", "orientation", "field (T)", "vendor", "structures", "mean Dice",
                 "lowest Dice", "lowest structure", "mean HD95 mm", "mean surface Dice", "picture"]]
    for c in sorted(seg["per_case"], key=lambda c: (c["mean_dice"] is None, c["mean_dice"] or 0.0, c["case"])):
        pic = pics.get((c["case"], c["orientation"]))
        per_case.append([c["case"], str(c["site"]), c["orientation"], str(c.get("field_strength_t")),
                         str(c.get("vendor")), {"text": str(c["n_structures"]), "v": c["n_structures"]},
                         _metric_cell(c["mean_dice"]) | {"text": _fmt(c["mean_dice"])},
                         _metric_cell(c["lowest_dice"]) | {"text": _fmt(c["lowest_dice"])},
                         c["lowest_structure"] or "", {"text": _fmt(c["mean_hd95_mm"], 2), "v": c["mean_hd95_mm"]},
                         {"text": _fmt(c["mean_surface_dice"]), "v": c["mean_surface_dice"]},
                         {"text": f"{pic['rank']} case", "href": f"#{pic['anchor']}"} if pic else ""])
    per_structure = [["case", "site", "orientation", "structure", "Dice", "HD95 mm", "surface Dice"]]
    for r in seg["cases"]:
        per_structure.append([str(r["case"]), str(r.get("site")), str(r.get("orientation")), r["structure"]]
                             + [{"text": _fmt(_finite(r.get(m)), 2 if m == "hd95_mm" else 3), "v": _finite(r.get(m))}
                                for m in SEG_METRICS])
    return per_case, per_structure


def _confusion_html(conf: Mapping) -> str:
    cells = []
    for name, c in conf.items():
        if c.get("tp") is None:
            cells.append(f"<div class='cm'><b>{html.escape(name)}</b><p>n/a ({html.escape(c.get('reason', ''))})</p></div>")
            continue
        cells.append(
            f"<div class='cm'><b>{html.escape(name)}</b> at threshold {_fmt(c['threshold'])}"
            f"<table class='confusion' data-label='{html.escape(name)}'><thead><tr><th></th><th>predicted +</th>"
            f"<th>predicted &minus;</th></tr></thead><tbody>"
            f"<tr><th>target +</th><td class='tp'>{c['tp']}</td><td class='fn'>{c['fn']}</td></tr>"
            f"<tr><th>target &minus;</th><td class='fp'>{c['fp']}</td><td class='tn'>{c['tn']}</td></tr>"
            f"</tbody></table><small>{c['unknown']} unknown target(s) left out</small></div>")
    return "<div class='cms'>" + "".join(cells) + "</div>"


_SCRIPT = """
function sortTable(th) {
  var table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
  var dir = th.getAttribute('data-dir') === 'asc' ? 'desc' : 'asc';
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute('data-dir'); });
  th.setAttribute('data-dir', dir);
  function key(row) {
    var c = row.cells[col], v = c.getAttribute('data-v');
    if (v === null) return c.textContent;
    return v === '' ? null : parseFloat(v);
  }
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);  /* n/a last either way */
    var c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
    return dir === 'asc' ? c : -c;
  });
  rows.forEach(function (r) { body.appendChild(r); });
}
document.querySelectorAll('table.sortable th').forEach(function (th) {
  th.title = 'click to sort';
  th.addEventListener('click', function () { sortTable(th); });
});
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  var ok = Array.prototype.filter.call(imgs, function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
});
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1.2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.82em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; white-space: nowrap; }
th { white-space: normal; } .scroll { overflow-x: auto; }
small.why { display: block; white-space: normal; max-width: 18em; color: #666; }
.strata { display: flex; flex-wrap: wrap; column-gap: 2em; } .strata h3 { margin-bottom: 0.2em; }
th { background: #f0f3f7; } tfoot td { font-weight: 600; } table.sortable th { cursor: pointer; }
table.sortable th[data-dir=asc]::after { content: " \\25B2"; } table.sortable th[data-dir=desc]::after { content: " \\25BC"; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; } img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #444; max-width: 1100px; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.8em; }
.note { color: #555; } .headline { background: #f5f8fb; border: 1px solid #cdd8e3; padding: 0.5em 1.2em; }
.headline li { margin: 0.15em 0; } .cms { display: flex; flex-wrap: wrap; gap: 1em; }
.cm table { margin: 0.2em 0; } td.tp, td.tn { background: #e6f4e6; } td.fp, td.fn { background: #fbe9e7; }
figure:target { outline: 3px solid #e08a00; }
"""


def _write_pages(out_dir, report, plots, seg_rows, cls_exams, n_boot, seed, title) -> Path:
    """``report.md`` and ``report.html``: the same sections in the same order, one as Markdown, one as HTML."""
    boot_txt = _bootstrap_text(report, n_boot, seed)
    md, parts = _headline_section(report["headline"])
    md = [f"# {title}", "", f"Created {report['created']}. {boot_txt}.", ""] + md
    if report.get("segmentation_comparison"):
        from orthodiff_nnunet.evaluation.comparison import comparison_section

        cmp_md, cmp_parts = comparison_section(report["segmentation_comparison"])
        md, parts = md + cmp_md, parts + cmp_parts
    if seg_rows:
        seg_md, seg_parts = _segmentation_section(out_dir, report["segmentation"], plots["segmentation"], report)
        md, parts = md + seg_md, parts + seg_parts
    if cls_exams:
        cls_md, cls_parts = _classification_section(report["classification"], plots["classification"])
        md, parts = md + cls_md, parts + cls_parts
    md += ["## Provenance", "", "```json", json.dumps(_nan_to_none(report["provenance"]), indent=2), "```", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(md))

    prov = html.escape(json.dumps(_nan_to_none(report["provenance"]), indent=2))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">Created {report['created']}. {html.escape(boot_txt)}; n/a = undefined on these data (the reason in brackets).</p>
{''.join(parts)}
<h2>Provenance</h2><pre>{prov}</pre>
<script>{_SCRIPT}</script>
</body></html>
"""
    atomic_write_text(out_dir / "report.html", page)
    return out_dir / "report.html"


def _bootstrap_text(report: Mapping, n_boot: int, seed: int) -> str:
    """One sentence on how the intervals were drawn (unit, resamples, seed, rows without a patient)."""
    boot = report["bootstrap"]
    unit = {"patient": "patients (all rows of a drawn patient)", "exam": "exams", "case": "cases"}.get(
        str(boot.get("unit")), str(boot.get("unit") or "cases/exams"))
    boot_txt = (f"Intervals: {boot.get('interval', 'percentile 95%')} bootstrap ({boot.get('resamples', n_boot)} "
                f"resamples of {unit}, seed {boot.get('seed', seed)})")
    own = [f"{n} {what}" for n, what in (
        ((report.get("segmentation") or {}).get("resampling", {}).get("n_rows_without_patient"), "segmentation rows"),
        ((report.get("classification") or {}).get("resampling", {}).get("n_exams_without_patient"), "exams")) if n]
    if own:
        boot_txt += f"; without a patient id, {' and '.join(own)} count as their own cluster"
    return boot_txt


def _headline_section(headline: Mapping) -> tuple[list[str], list[str]]:
    """The headline box: what was evaluated, its figures, what was not (Markdown lines, HTML parts)."""
    what, figs, missing = _headline_lines(headline)
    md = ["## Headline", "", what, ""] + [f"- {f}" for f in figs] + [""]
    if missing:
        md += ["Not evaluated:", ""] + [f"- {m}" for m in missing] + [""]
    parts = ["<section class='headline' id='headline'><h2>Headline</h2>", f"<p>{html.escape(what)}</p>",
             "<ul id='headline-figures'>" + "".join(f"<li>{html.escape(f)}</li>" for f in figs) + "</ul>"]
    if missing:
        parts.append("<p><b>Not evaluated</b></p><ul id='not-evaluated'>"
                     + "".join(f"<li>{html.escape(m)}</li>" for m in missing) + "</ul>")
    parts.append("</section>")
    return md, parts


def _strata_section(strata: Mapping, task: str, table, foot: int) -> tuple[list[str], list[str]]:
    """One table per stratum value (site, field strength, ...), side by side; strata with one value as a note."""
    md, parts = [], []
    same = _single_strata(strata)
    for key, groups in strata.items():
        if key in same:
            continue
        parts.append("<div class='strata'>")  # a stratum's tables side by side where they fit
        for value, block in groups.items():
            t = f"{task}, {STRATUM_TITLES.get(key, key)} = {value}"
            md += [f"### {t}", "", _md(table(block)), ""]
            parts.append(f"<div><h3>{html.escape(t)}</h3>" + _html_table(table(block), True, foot=foot) + "</div>")
        parts.append("</div>")
    if same:
        note = _same_note(same)
        md += [note, ""]
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    return md, parts


def _segmentation_section(out_dir: Path, seg: Mapping, plots: Mapping, report: Mapping) -> tuple[list[str], list[str]]:
    """Overall and per-stratum tables, plots, the per-case table and the contour pictures."""
    md = ["## Segmentation (overall)", "", _md(_seg_table(seg["overall"])), ""]
    parts = ["<h2>Segmentation (overall)</h2>" + _html_table(_seg_table(seg["overall"]), True, "seg-overall")]
    strata_md, strata_parts = _strata_section(seg["strata"], "Segmentation", _seg_table, 0)
    md, parts = md + strata_md, parts + strata_parts
    for t, p in plots.items():
        md += [f"![{t}]({p.name})", ""]
        parts.append(_figure(p, t))
    per_case, per_structure = _case_tables(report)
    md += ["## Segmentation per case (worst first)", "", _md(per_case), ""]
    parts.append("<h2>Segmentation per case</h2><p class='note'>One row per case and orientation, worst mean "
                 "Dice first (mean over the structures where Dice is defined); click a column header to sort. "
                 "The picture links lead to the case's contours below.</p>"
                 + "<div class='scroll'>" + _html_table(per_case, True, "seg-cases") + "</div>"
                 + "<details><summary>Every case and structure</summary>"
                 + _html_table(per_structure, True, "seg-structures") + "</details>")
    parts.append("<h2>Segmentation pictures</h2>")
    if seg.get("pictures"):
        pic_md, pic_parts = _pictures_section(out_dir, seg["pictures"])
        md, parts = md + pic_md, parts + pic_parts
    for problem in seg.get("pictures_missing", []):
        parts.append(f"<p class='note'>{html.escape(problem)}</p>")
    return md, parts


def _pictures_section(out_dir: Path, pictures: Sequence[Mapping]) -> tuple[list[str], list[str]]:
    """The best, median and worst case per site and orientation, with captions that say what is drawn."""
    parts = ["<p class='note'>Per site and orientation: the best, median and worst case by mean Dice. "
             "Reference contours solid, prediction dashed, one colour per structure, on slices through "
             "the structures, drawn in their physical aspect (mm) with the anatomical directions at the "
             "edges.</p>"]
    md = ["## Segmentation pictures", ""]
    for (site, orientation) in dict.fromkeys((p["site"], p["orientation"]) for p in pictures):
        parts.append(f"<h3>{html.escape(str(site))}, {html.escape(PLANE_NAMES.get(orientation, orientation))}</h3>")
        for pic in (p for p in pictures if p["site"] == site and p["orientation"] == orientation):
            cap = (f"{pic['rank']}: {pic['case']}, mean Dice {_fmt(pic['mean_dice'])} over "
                   f"{pic['n_structures']} structures; {pic['plane']} slices "
                   f"{', '.join(map(str, pic['slices']))} of {pic['n']} (array axis {pic['axis']}), "
                   f"pixels {pic['spacing_mm'][0]:.2f} x {pic['spacing_mm'][1]:.2f} mm")
            parts.append(_figure(out_dir / pic["file"], cap, pic["anchor"]))
            md += [f"![{cap}]({pic['file']})", ""]
    return md, parts


def _classification_section(cls: Mapping, plots: Mapping) -> tuple[list[str], list[str]]:
    """Overall and per-stratum tables, confusion matrices at the thresholds, ROC bands and reliability."""
    ece = _fmt(_finite(cls["calibration_pooled"].get("ece")))
    md = ["## Classification (overall)", "", _md(_cls_table(cls["overall"])), "",
          f"Expected calibration error (all labels pooled): {ece}", ""]
    parts = ["<h2>Classification (overall)</h2>" + _html_table(_cls_table(cls["overall"]), True, "cls-overall", foot=1)
             + f"<p>Expected calibration error (all labels pooled): {ece}</p>"]
    if cls["missing_views"]:
        gaps = ", ".join(f"{e}: {'/'.join(v)}" for e, v in cls["missing_views"].items())
        md += [f"Exams predicted with missing views: {gaps}", ""]
        parts.append(f"<p>Exams predicted with missing views: {html.escape(gaps)}</p>")
    strata_md, strata_parts = _strata_section(cls["strata"], "Classification", _cls_table, 1)
    md, parts = md + strata_md, parts + strata_parts
    parts.append("<h3>Confusion matrices at the decision thresholds</h3>" + _confusion_html(cls["confusion"]))
    md += ["### Confusion matrices at the decision thresholds", "",
           _md([["label", "threshold", "TP", "FN", "FP", "TN", "unknown"]]
               + [[n, _fmt(c["threshold"]), *("n/a" if c[k] is None else str(c[k])
                                               for k in ("tp", "fn", "fp", "tn", "unknown"))]
                  for n, c in cls["confusion"].items()]), ""]
    captions = _classification_captions(cls["roc_band"])
    for t, p in plots.items():
        md += [f"### {t}", "", f"![{t}]({p.name})", "", captions.get(t, t), ""]
        parts.append(f"<h3>{html.escape(t)}</h3>" + _figure(p, captions.get(t, t)))
    return md, parts


def _classification_captions(band: Mapping) -> dict[str, str]:
    """Captions of the ROC and reliability plots, saying what the ROC band resampled."""
    unit = (f"{band['resamples']} resamples of the {band['n_clusters']} patients (all exams of a drawn patient"
            + (f"; {band['n_exams_without_patient']} exams without a patient id on their own"
               if band.get("n_exams_without_patient") else "") + ")"
            if band["resampled"] == "patients" else
            f"{band['resamples']} resamples of the {band['n_clusters']} exams: the exams name no patient, so "
            "exams of one patient count as independent and the band may be too narrow")
    return {"ROC curves": f"ROC curve per label with a pointwise 95% bootstrap band ({unit}); dot: the operating "
                          "point at the label's decision threshold, chosen on validation data. Title: AUROC "
                          "[95% CI] of the table.",
            "Reliability diagram": "Reliability diagram, all labels pooled: fraction of positives against the "
                                   "mean predicted probability per bin (numbers: exams per bin)."}
