"""Multi-label classification metrics with bootstrap confidence intervals.

Conventions (used by ``orthodiff train cls``/``predict cls`` and the evaluation report):

* ``y_true`` is an ``(N, L)`` float array of 0/1 with ``NaN`` for an unknown label; every metric of
  a label uses only the exams where that label is known.
* ``y_score`` is an ``(N, L)`` array of probabilities (any monotone score works for AUROC/AUPRC).
* An exam is called positive for a label when ``score >= threshold``.
* A metric that is undefined on the data (AUROC or AUPRC without positives, AUROC without
  negatives, sensitivity without positives, specificity without negatives) is ``NaN``, never a
  made-up 0.5; macro averages are the mean over the labels where the metric is defined.

Point estimates come from scikit-learn (``roc_auc_score``, ``average_precision_score``,
``roc_curve``, ``precision_recall_curve``).

Bootstrap (cluster bootstrap): the unit of resampling is the *patient*. The three views and the
echoes of one exam, and a patient's several exams, are not independent observations, so each
resample draws patients with replacement and takes every row of each drawn patient (one index set
per resample, shared by every label, so macro CIs keep the labels' correlation). A row without a
patient id is its own cluster (the caller says so in its report). With every row its own cluster
this is the ordinary bootstrap. The generator is a seeded :func:`numpy.random.default_rng`;
inside the resampling loop AUROC and AUPRC are computed by exact NumPy equivalents of
scikit-learn's formulas (rank statistic with tie averaging; step-wise average precision over
distinct thresholds), which are ~50x faster and checked against scikit-learn in the tests. The
interval is the percentile interval; resamples where a metric is undefined are skipped and counted
(``ci_valid``): with a handful of patients the interval is wide or missing, which is the honest
answer.

Macro averages (one definition for the estimate and its interval): the label set of a macro
metric is fixed on the full data (the labels where that metric is defined, ``macro_labels``). A
resample's macro value is the mean over exactly that label set; a resample where one of those
labels is undefined (e.g. it drew no positive of a rare label) has no macro value and is skipped
and counted (``macro_ci_valid``), so the interval is an interval of the same quantity as the
estimate.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from orthodiff_nnunet.conventions import CLS_THRESHOLDS_FILE
from orthodiff_nnunet.utils import atomic_write_json, atomic_write_text, save_figure

if TYPE_CHECKING:
    from orthodiff_nnunet.data.targets import Exam

log = logging.getLogger(__name__)

ThresholdMethod = Literal["youden", "f1", "fixed"]
METRICS: tuple[str, ...] = ("auroc", "auprc", "sensitivity", "specificity")
DEFAULT_THRESHOLD = 0.5

__all__ = [
    "METRICS", "ThresholdMethod", "LabelMetrics", "ClassificationMetrics", "auroc", "average_precision",
    "binary_metrics", "bootstrap_ci", "choose_threshold", "choose_thresholds", "classification_metrics",
    "cluster_ids", "cluster_members", "mean_auroc", "resample_clusters", "PredictedSet", "mean_known_bce",
    "patient_clusters", "write_heldout_results", "write_predictions_csv", "write_training_progress",
]


# ----------------------------------------------------------------------------------------------
# single-label metrics
def _known(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} differ in length")
    keep = np.isfinite(y_true)
    if not np.all(np.isfinite(y_score[keep])):
        raise ValueError("y_score holds NaN or infinite values where the label is known")
    yt = y_true[keep]
    if np.any((yt != 0) & (yt != 1)):
        raise ValueError(f"labels must be 0, 1 or NaN (unknown), got {sorted(set(yt.tolist()) - {0.0, 1.0})[:5]}")
    return yt.astype(np.int64), y_score[keep]


def _rank_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic with average ranks for ties (= scikit-learn's value)."""
    from scipy.stats import rankdata

    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _step_average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """scikit-learn's average precision: sum over distinct thresholds of (R_k - R_{k-1}) * P_k."""
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn); NaN without both classes."""
    from sklearn.metrics import roc_auc_score

    y, s = _known(y_true, y_score)
    if y.size == 0 or y.min() == y.max():
        return math.nan
    return float(roc_auc_score(y, s))


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (scikit-learn); NaN without positives."""
    from sklearn.metrics import average_precision_score

    y, s = _known(y_true, y_score)
    if y.sum() == 0:
        return math.nan
    return float(average_precision_score(y, s))


def _sens_spec(y: np.ndarray, s: np.ndarray, threshold: float, decided: np.ndarray | None = None) -> tuple[float, float]:
    pred = s >= threshold if decided is None else decided.astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    sens = float(np.sum(pred & (y == 1)) / n_pos) if n_pos else math.nan
    spec = float(np.sum(~pred & (y == 0)) / n_neg) if n_neg else math.nan
    return sens, spec


def binary_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """AUROC, AUPRC, sensitivity and specificity at ``threshold``, and the counts, of one label."""
    y, s = _known(y_true, y_score)
    sens, spec = _sens_spec(y, s, threshold)
    return {"auroc": auroc(y, s), "auprc": average_precision(y, s), "sensitivity": sens, "specificity": spec,
            "n": int(y.size), "n_pos": int(y.sum())}


def mean_auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Macro AUROC over the labels where it is defined (NaN if none is): the checkpoint-selection metric."""
    y_true = np.atleast_2d(np.asarray(y_true, dtype=np.float64))
    y_score = np.atleast_2d(np.asarray(y_score, dtype=np.float64))
    values = [auroc(y_true[:, j], y_score[:, j]) for j in range(y_true.shape[1])]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


# ----------------------------------------------------------------------------------------------
# thresholds
def choose_threshold(y_true: np.ndarray, y_score: np.ndarray, method: ThresholdMethod = "youden",
                     fixed: float = DEFAULT_THRESHOLD) -> float:
    """Decision threshold of one label, chosen on validation data.

    Args:
        y_true: 0/1 (NaN = unknown, ignored).
        y_score: probabilities.
        method: ``youden`` (maximise sensitivity + specificity - 1 on the ROC curve), ``f1``
            (maximise F1 on the precision-recall curve) or ``fixed``.
        fixed: the threshold of ``fixed``, and the fallback when the validation data has only
            one class (no curve to choose on).

    Returns:
        A threshold halfway between the chosen operating point's score and the next lower
        validation score, so that it does not sit exactly on a validation exam's score.
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    if method not in ("youden", "f1", "fixed"):
        raise ValueError(f"threshold method {method!r}: use youden, f1 or fixed")
    y, s = _known(y_true, y_score)
    if method == "fixed" or y.size == 0 or y.min() == y.max():
        return float(fixed)
    if method == "youden":
        fpr, tpr, thr = roc_curve(y, s)
        best = thr[int(np.argmax(tpr - fpr))]  # first maximum: the highest threshold among ties
    else:
        precision, recall, thr = precision_recall_curve(y, s)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        best = thr[int(np.argmax(f1))]
    if not np.isfinite(best):
        return float(fixed)
    lower = s[s < best]
    return float((best + lower.max()) / 2) if lower.size else float(best)


def choose_thresholds(y_true: np.ndarray, y_score: np.ndarray, label_names: Sequence[str],
                      method: ThresholdMethod = "youden", fixed: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Per-label thresholds (see :func:`choose_threshold`), as ``{label: threshold}``."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    return {name: choose_threshold(y_true[:, j], y_score[:, j], method, fixed) for j, name in enumerate(label_names)}


# ----------------------------------------------------------------------------------------------
# bootstrap
def cluster_members(clusters: Sequence[object] | None, n: int) -> list[np.ndarray]:
    """Row indices of each cluster, clusters in order of first appearance.

    Args:
        clusters: one hashable cluster id per row (e.g. the patient pseudonym); ``None`` = every
            row is its own cluster.
        n: number of rows.
    """
    if clusters is None:
        return [np.array([i]) for i in range(n)]
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster ids for {n} rows")
    members: dict[object, list[int]] = {}
    for i, c in enumerate(clusters):
        members.setdefault(c, []).append(i)
    return [np.asarray(v, dtype=np.int64) for v in members.values()]


def cluster_ids(patients: Sequence[object | None], fallback: Sequence[object]) -> tuple[list[object], int]:
    """Cluster id per row: the patient, or the row's own ``fallback`` id (exam or case) without one.

    Returns:
        ``(ids, n_without_patient)``; a missing patient is ``None`` or ``""``.
    """
    ids: list[object] = []
    missing = 0
    for p, f in zip(patients, fallback, strict=True):
        if p is None or p == "":
            ids.append(("own", f))
            missing += 1
        else:
            ids.append(("patient", p))
    return ids, missing


def resample_clusters(rng: np.random.Generator, members: Sequence[np.ndarray]) -> np.ndarray:
    """One bootstrap resample: draw ``len(members)`` clusters with replacement, return all their rows."""
    drawn = rng.integers(0, len(members), len(members))
    if not len(members):
        return np.zeros(0, np.int64)
    return np.concatenate([members[k] for k in drawn])


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05, clusters: Sequence[object] | None = None) -> tuple[float, float, int]:
    """Percentile (cluster) bootstrap interval of ``statistic(indices)`` over ``n`` rows.

    Args:
        statistic: maps an index array (rows of the drawn clusters, with repeats) to a number;
            NaN = undefined.
        n: number of rows.
        n_boot: resamples.
        seed: seed of :func:`numpy.random.default_rng` (same seed, same interval).
        alpha: 0.05 gives a 95% interval.
        clusters: one cluster id per row (the patient); ``None`` resamples rows.

    Returns:
        ``(low, high, n_valid)``; ``(nan, nan, n_valid)`` when fewer than half the resamples are defined.
    """
    rng = np.random.default_rng(seed)
    members = cluster_members(clusters, n)
    values = []
    for _ in range(int(n_boot)):
        v = statistic(resample_clusters(rng, members))
        if not math.isnan(v):
            values.append(v)
    if n == 0 or len(values) < max(1, n_boot // 2):
        return math.nan, math.nan, len(values)
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi), len(values)


# ----------------------------------------------------------------------------------------------
# reports
def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


@dataclass
class LabelMetrics:
    """One label: counts, threshold, point estimates and ``ci[metric] = (low, high)``.

    ``undefined[metric]`` gives the reason of every metric that is undefined (NaN) on these data,
    e.g. ``"no positive exam"``; ``ci_valid[metric]`` the number of resamples where it was defined.
    """

    name: str
    n: int
    n_pos: int
    threshold: float
    auroc: float
    auprc: float
    sensitivity: float
    specificity: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    undefined: dict[str, str] = field(default_factory=dict)
    ci_valid: dict[str, int] = field(default_factory=dict)


@dataclass
class ClassificationMetrics:
    """Per-label and macro-averaged metrics with (cluster) bootstrap CIs (see the module docstring).

    ``macro_labels[metric]``: the labels the macro average of that metric runs over (those where it
    is defined on the full data); ``macro_ci_valid[metric]``: resamples where every one of them was
    defined. ``resampling``: the bootstrap unit (``patient``), the number of clusters and how many
    exams had no patient id (each its own cluster).
    """

    labels: list[LabelMetrics]
    macro: dict[str, float]
    macro_ci: dict[str, tuple[float, float]]
    n_exams: int
    n_boot: int
    seed: int
    alpha: float
    macro_labels: dict[str, list[str]] = field(default_factory=dict)
    macro_ci_valid: dict[str, int] = field(default_factory=dict)
    resampling: dict[str, object] = field(default_factory=dict)

    def label(self, name: str) -> LabelMetrics:
        for m in self.labels:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict:
        """JSON-ready (NaN becomes None)."""

        def clean(x):
            if isinstance(x, float):
                return None if math.isnan(x) else x
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        return clean(asdict(self))

    def to_markdown(self) -> str:
        """A table: label, n (positives), threshold, then each metric as ``value [low, high]``."""
        level = int(round(100 * (1 - self.alpha)))
        head = ["label", "n (pos)", "threshold"] + [f"{m} [{level}% CI]" for m in METRICS]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def cell(v, ci):
            lo, hi = ci if ci else (math.nan, math.nan)
            return f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"

        for m in self.labels:
            threshold = "per-fold" if isinstance(m.threshold, float) and math.isnan(m.threshold) else _fmt(m.threshold)
            rows.append("| " + " | ".join([m.name, f"{m.n} ({m.n_pos})", threshold]
                                           + [cell(getattr(m, k), m.ci.get(k)) for k in METRICS]) + " |")
        rows.append("| " + " | ".join(["**macro**", f"{self.n_exams} exams", ""]
                                       + [cell(self.macro[k], self.macro_ci.get(k)) for k in METRICS]) + " |")
        notes = [f"{m.name} {k}: {why}" for m in self.labels for k, why in m.undefined.items()]
        unit = self.resampling.get("unit", "exam")
        text = "\n".join(rows) + (f"\n\nBootstrap: {self.n_boot} resamples of {unit}s "
                                  f"({self.resampling.get('n_clusters', self.n_exams)} clusters), seed {self.seed}, "
                                  "percentile intervals; macro = mean over the labels defined on all exams; "
                                  "n/a = undefined on these exams.")
        missing = int(self.resampling.get("n_without_patient", 0) or 0)
        if missing:
            text += f" {missing} exam(s) without a patient id were resampled as their own cluster."
        if notes:
            text += "\n\nUndefined: " + "; ".join(notes) + "."
        return text


def _undefined_reasons(n: int, n_pos: int) -> dict[str, str]:
    """Why each metric of one label is undefined: no exam with a known target, no positive, no negative."""
    if n == 0:
        return {k: "no exam with a known target" for k in METRICS}
    out: dict[str, str] = {}
    if n_pos == 0:
        why = "no positive exam (every known target is 0)"
        out.update(auroc=why, auprc=why, sensitivity=why)
    if n_pos == n:
        out.update(auroc="no negative exam (every known target is 1)",
                   specificity="no negative exam (every known target is 1)")
    return out


def _metric_inputs(y_true: np.ndarray, y_score: np.ndarray, label_names: Sequence[str],
                   thresholds: Mapping[str, float] | None, decisions: np.ndarray | None):
    """``(y_true, y_score, thresholds, decisions)`` as ``(N, L)`` float64 arrays and one threshold per label.

    With ``decisions`` every threshold is NaN: the decisions were made per exam elsewhere.

    Raises:
        ValueError: shapes that disagree with each other or with the label names.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim == 1 and y_true.size == 0:  # no exam at all
        y_true = y_score = np.zeros((0, len(label_names)))
    y_true, y_score = np.atleast_2d(y_true), np.atleast_2d(y_score)
    if y_true.shape != y_score.shape or y_true.shape[1] != len(label_names):
        raise ValueError(f"y_true {y_true.shape}, y_score {y_score.shape} and {len(label_names)} label names disagree")
    thr = {n: float((thresholds or {}).get(n, DEFAULT_THRESHOLD)) for n in label_names}
    if decisions is not None:
        decisions = np.atleast_2d(np.asarray(decisions, dtype=np.float64))
        if decisions.shape != y_true.shape:
            raise ValueError(f"decisions {decisions.shape} and y_true {y_true.shape} differ")
        thr = {name: math.nan for name in label_names}  # per-exam decisions: no single threshold
    return y_true, y_score, thr, decisions


def _label_metrics(y_true: np.ndarray, y_score: np.ndarray, label_names: Sequence[str], thr: Mapping[str, float],
                   decisions: np.ndarray | None) -> list[LabelMetrics]:
    """Point estimates of every label (no intervals yet), with the reasons of the undefined ones."""
    labels = []
    for j, name in enumerate(label_names):
        m = binary_metrics(y_true[:, j], y_score[:, j], thr[name])
        if decisions is not None:
            keep = np.isfinite(y_true[:, j])
            m["sensitivity"], m["specificity"] = _sens_spec(y_true[keep, j].astype(np.int64), y_score[keep, j], 0.0,
                                                            decisions[keep, j])
        labels.append(LabelMetrics(name=name, n=m["n"], n_pos=m["n_pos"], threshold=thr[name], auroc=m["auroc"],
                                   auprc=m["auprc"], sensitivity=m["sensitivity"], specificity=m["specificity"],
                                   undefined=_undefined_reasons(m["n"], m["n_pos"])))
    return labels


def _bootstrap_values(y_true: np.ndarray, y_score: np.ndarray, label_names: Sequence[str], thr: Mapping[str, float],
                      decisions: np.ndarray | None, members: Sequence[np.ndarray], n_boot: int,
                      seed: int) -> np.ndarray:
    """``(n_boot, L, len(METRICS))`` metric values of each resample; NaN = undefined in that resample.

    One pass over the resamples computes every label's metrics on the same exam indices.
    """
    rng = np.random.default_rng(seed)
    values = np.full((int(n_boot), len(label_names), len(METRICS)), np.nan)
    known = [np.isfinite(y_true[:, j]) for j in range(len(label_names))]
    for b in range(int(n_boot)):
        idx = resample_clusters(rng, members)
        for j, name in enumerate(label_names):
            sel = idx[known[j][idx]]
            if sel.size == 0:
                continue
            y = y_true[sel, j].astype(np.int64)
            s = y_score[sel, j]
            sens, spec = _sens_spec(y, s, thr[name], None if decisions is None else decisions[sel, j])
            values[b, j] = (_rank_auroc(y, s), _step_average_precision(y, s), sens, spec)
    return values


def _percentile_interval(v: np.ndarray, n_boot: int, alpha: float) -> tuple[tuple[float, float], int]:
    """``((low, high), n_defined)`` of the defined values; NaN bounds when fewer than half are defined."""
    v = v[~np.isnan(v)]
    if v.size < max(1, n_boot // 2):
        return (math.nan, math.nan), int(v.size)
    lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi)), int(v.size)


def _attach_intervals(labels: Sequence[LabelMetrics], values: np.ndarray, macro_idx: Mapping[str, list[int]],
                      n_boot: int, alpha: float) -> tuple[dict[str, tuple[float, float]], dict[str, int]]:
    """Fill every label's ``ci``/``ci_valid`` from the resampled ``values``; return the macro intervals.

    A resample's macro value is the mean over the fixed label set of that metric; NaN (skipped,
    counted) where one of them is undefined.
    """
    for j, m in enumerate(labels):
        for i, k in enumerate(METRICS):
            m.ci[k], m.ci_valid[k] = _percentile_interval(values[:, j, i], n_boot, alpha)
    macro_ci: dict[str, tuple[float, float]] = {}
    macro_valid: dict[str, int] = {}
    for i, k in enumerate(METRICS):
        idx = macro_idx[k]
        if not idx:
            macro_ci[k], macro_valid[k] = (math.nan, math.nan), 0
            continue
        macro_ci[k], macro_valid[k] = _percentile_interval(values[:, idx, i].mean(axis=1), n_boot, alpha)
    return macro_ci, macro_valid


def classification_metrics(
    y_true: np.ndarray,
    y_score: np.ndarray,
    label_names: Sequence[str],
    thresholds: Mapping[str, float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    decisions: np.ndarray | None = None,
    clusters: Sequence[object] | None = None,
    n_without_patient: int | None = None,
) -> ClassificationMetrics:
    """Per-label AUROC, AUPRC, sensitivity and specificity at the thresholds, macro averages, bootstrap CIs.

    Args:
        y_true: ``(N, L)`` 0/1, NaN = unknown.
        y_score: ``(N, L)`` probabilities.
        label_names: the ``L`` label names, in column order.
        thresholds: per-label decision thresholds (default 0.5), chosen on *other* (validation) data.
        n_boot: bootstrap resamples (0: no intervals).
        seed: bootstrap seed.
        alpha: 1 - confidence level.
        decisions: optional ``(N, L)`` 0/1 decisions made elsewhere (e.g. pooled out-of-fold
            predictions, each fold at its own validation threshold); sensitivity and specificity
            then come from them instead of ``y_score >= threshold``.
        clusters: one cluster id per exam, normally the patient pseudonym (see :func:`cluster_ids`);
            ``None``: every exam is its own cluster (recorded as ``resampling.unit = "exam"``).
        n_without_patient: how many exams had no patient id (recorded in ``resampling``).
    """
    y_true, y_score, thr, decisions = _metric_inputs(y_true, y_score, label_names, thresholds, decisions)
    n = y_true.shape[0]
    labels = _label_metrics(y_true, y_score, label_names, thr, decisions)
    # one definition of macro: the labels where the metric is defined on the full data
    macro_idx = {k: [j for j, m in enumerate(labels) if not math.isnan(getattr(m, k))] for k in METRICS}
    macro = {k: float(np.mean([getattr(labels[j], k) for j in idx])) if idx else math.nan
             for k, idx in macro_idx.items()}
    members = cluster_members(clusters, n)
    resampling = {"unit": "exam" if clusters is None else "patient", "n_clusters": len(members),
                  "n_without_patient": None if clusters is None else int(n_without_patient or 0)}
    macro_ci: dict[str, tuple[float, float]] = {}
    macro_valid: dict[str, int] = {}
    if n_boot > 0 and n > 0:
        values = _bootstrap_values(y_true, y_score, label_names, thr, decisions, members, n_boot, seed)
        macro_ci, macro_valid = _attach_intervals(labels, values, macro_idx, n_boot, alpha)
    return ClassificationMetrics(labels=labels, macro=macro, macro_ci=macro_ci, n_exams=n, n_boot=int(n_boot),
                                 seed=int(seed), alpha=float(alpha),
                                 macro_labels={k: [labels[j].name for j in idx] for k, idx in macro_idx.items()},
                                 macro_ci_valid=macro_valid, resampling=resampling)


# ----------------------------------------------------------------------------------------------
# a training run's predictions and records
def patient_clusters(exams: Sequence[Exam]) -> dict:
    """:func:`classification_metrics` keywords that make its bootstrap resample patients, not exams."""
    clusters, missing = cluster_ids([e.patient for e in exams], [e.exam for e in exams])
    return {"clusters": clusters, "n_without_patient": missing}


def mean_known_bce(y_true: np.ndarray, y_prob: np.ndarray, eps: float = 1e-6) -> float:
    """Binary cross-entropy of probabilities, averaged over the known targets (NaN = unknown; 0 without any)."""
    known = np.isfinite(y_true)
    y = np.nan_to_num(y_true)
    bce = -(y * np.log(y_prob + eps) + (1 - y) * np.log(1 - y_prob + eps))
    return float((bce * known).sum() / max(known.sum(), 1))


def write_predictions_csv(path: Path, exams: Sequence[Exam], probs: np.ndarray, label_names: Sequence[str],
                          thresholds: Mapping[str, float], views: Sequence[str],
                          sets: Mapping[str, str] | None = None) -> Path:
    """One row per exam: ids, site facts, views present/missing, ``p_<label>``, ``pred_<label>``, ``target_<label>``.

    With ``sets`` (exam -> ``selection``/``test``) a ``set`` column follows ``exam``: which set of the
    training run the exam belongs to. Written atomically.
    """
    buf = io.StringIO()
    cols = (["exam"] + (["set"] if sets is not None else []) + ["site", "field_strength_t", "vendor", "views_present",
                                                                "views_missing"]
            + [f"p_{n}" for n in label_names] + [f"pred_{n}" for n in label_names] + [f"target_{n}" for n in label_names])
    w = csv.writer(buf)
    w.writerow(cols)
    for e, p in zip(exams, probs):
        targets = ["" if not np.isfinite(t) else int(t) for t in e.targets]
        w.writerow([e.exam] + ([sets[e.exam]] if sets is not None else [])
                   + [e.site or "", "" if e.field_strength_t is None else f"{e.field_strength_t:g}", e.vendor or "",
                      " ".join(v for v in views if e.has(v)), " ".join(e.missing_views(views))]
                   + [f"{x:.6f}" for x in p] + [int(x >= thresholds[n]) for x, n in zip(p, label_names)] + targets)
    atomic_write_text(Path(path), buf.getvalue())
    return Path(path)


def write_training_progress(folder: Path, history: Sequence[Mapping[str, object]]) -> None:
    """``progress.csv`` (one row per epoch, floats to 6 significant digits) and ``progress.png``.

    The plot shows the training and selection BCE and the selection mean AUROC per epoch; a plot
    that fails is logged at debug level and never stops training.
    """
    keys = list(history[0])
    rows = [",".join(keys)] + [",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
                               for r in history]
    atomic_write_text(Path(folder) / "progress.csv", "\n".join(rows) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ep = [r["epoch"] for r in history]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(ep, [r["train_loss"] for r in history], label="train loss")
        ax.plot(ep, [r["selection_loss"] for r in history], label="selection loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("BCE")
        ax2 = ax.twinx()
        ax2.plot(ep, [r["selection_mean_auroc"] for r in history], "g--", label="selection mean AUROC")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("mean AUROC")
        fig.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        save_figure(fig, Path(folder) / "progress.png")
    except Exception as exc:  # a plot must never stop training
        log.debug("progress plot failed: %s", exc)


@dataclass
class PredictedSet:
    """One set of a training run's exams with their ``(N, L)`` probabilities.

    Attributes:
        exams: the exams, in row order.
        probs: ``(N, L)`` probabilities of the best checkpoint.
        source: where the set comes from, in words (e.g. ``fold 1 validation``).
    """

    exams: Sequence[Exam]
    probs: np.ndarray
    source: str

    @property
    def targets(self) -> np.ndarray:
        return np.stack([e.targets for e in self.exams])


def write_heldout_results(folder: Path, selection: PredictedSet, test: PredictedSet | None,
                          label_names: Sequence[str], views: Sequence[str], threshold_method: ThresholdMethod,
                          n_boot: int, seed: int, sets_record: Mapping | None) -> dict:
    """Thresholds chosen on the selection exams, applied unchanged to the test exams; every record of a run.

    Writes ``thresholds.json`` (chosen on the selection exams only), ``predictions.csv`` (selection
    and test exams, column ``set``), ``metrics.json`` (``selection`` and ``test`` metrics apart, the
    selection's marked optimistic) and, with a test set, ``test_predictions.csv`` and
    ``test_metrics.{json,md}`` (test exams only). Intervals resample patients (:func:`patient_clusters`).

    Returns:
        ``thresholds``, ``selection`` (:class:`ClassificationMetrics`) and with a test set ``test``.
    """
    folder = Path(folder)
    thresholds = choose_thresholds(selection.targets, selection.probs, label_names, threshold_method)
    atomic_write_json(folder / CLS_THRESHOLDS_FILE,
                      {"method": threshold_method, "chosen_on": "selection", "selection_source": selection.source,
                       "num_exams": len(selection.exams), "checkpoint": "checkpoint_best.pth",
                       "thresholds": thresholds})
    metrics = classification_metrics(selection.targets, selection.probs, label_names, thresholds, n_boot, seed,
                                     **patient_clusters(selection.exams))
    out = {"thresholds": thresholds, "selection": metrics}
    record = {"selection": {"note": "the checkpoint and the thresholds were chosen on these exams: optimistic, "
                                    "not an estimate of performance on new exams",
                            "source": selection.source, **metrics.to_dict()},
              "test": None, "sets": sets_record}
    sets = {e.exam: "selection" for e in selection.exams}
    if test is not None:
        out["test"] = classification_metrics(test.targets, test.probs, label_names, thresholds, n_boot, seed,
                                             **patient_clusters(test.exams))
        record["test"] = {"note": "held out: never trained on, never used to choose the checkpoint or the "
                                  "thresholds (applied unchanged from the selection exams)",
                          "source": test.source, **out["test"].to_dict()}
        write_predictions_csv(folder / "test_predictions.csv", test.exams, test.probs, label_names, thresholds, views,
                              sets={e.exam: "test" for e in test.exams})
        atomic_write_json(folder / "test_metrics.json", out["test"].to_dict())
        atomic_write_text(folder / "test_metrics.md", out["test"].to_markdown() + "\n")
        sets.update({e.exam: "test" for e in test.exams})
    both = [selection] + ([test] if test is not None else [])
    write_predictions_csv(folder / "predictions.csv", [e for s in both for e in s.exams],
                          np.concatenate([s.probs for s in both]), label_names, thresholds, views, sets=sets)
    atomic_write_json(folder / "metrics.json", record)
    return out
