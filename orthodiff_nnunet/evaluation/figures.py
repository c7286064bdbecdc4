"""Pictures for the evaluation report: segmentation case overlays and ROC curves with bootstrap bands.

Case overlays: per site and orientation the best, median and worst case by mean Dice (mean over
the structures where Dice is defined) are drawn as reference (solid) and prediction (dashed)
contours on the image, on a few slices through the structures. Each slice is drawn in its physical
aspect (voxel spacing, millimetres on both axes), in the conventional display orientation (superior
up on sagittal and coronal slices, anterior up on axial slices; anterior left on sagittal slices;
the patient's right on the viewer's left on coronal and axial slices, as radiologists read them),
with the anatomical letters at the edges and its name (plane, array axis, index).

ROC curves: one panel per label with a pointwise 95% percentile band of the true-positive rate over
a grid of false-positive rates, from resamples of patients (every exam of a drawn patient is kept,
so exams of one patient do not count as independent evidence) when the exams name their patient, of
exams otherwise; the operating point at the label's decision threshold is marked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orthodiff_nnunet.utils import save_figure

log = logging.getLogger(__name__)

#: world (LPS) axis normal to the slices of each orientation: sagittal slices stack along L-R, ...
NORMAL_AXIS = {"sag": 0, "cor": 1, "ax": 2}
PLANE_NAMES = {"sag": "sagittal", "cor": "coronal", "ax": "axial"}
_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))  # LPS: (negative, positive) end of each world axis
FILE_KEYS = ("image_file", "prediction_file", "reference_file")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(x) -> float | None:
    """A finite float, or None for None / NaN / inf / anything that is not a number (e.g. "undefined")."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, Mapping):  # {"value": ..., "reason": ...} or {"mean": ...}
        return _finite(x.get("value", x.get("mean")))
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------------------------
# which cases to picture


@dataclass
class CaseScore:
    """One (case, orientation) of the segmentation rows with its mean Dice over the defined structures."""

    case: str
    orientation: str
    site: str
    mean_dice: float | None
    n_structures: int
    rows: list[Mapping]

    @property
    def anchor(self) -> str:
        """HTML id of the case's picture (letters, digits, dashes only)."""
        raw = f"case-{self.site}-{self.orientation}-{self.case}"
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in raw)


def case_scores(seg_rows: Sequence[Mapping]) -> list[CaseScore]:
    """Group the per-structure rows by (case, orientation) and average Dice over the defined structures.

    A structure without Dice (absent from reference and prediction: NaN/None) is left out of the
    mean; a case where no structure has a Dice gets ``mean_dice = None``.
    """
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for r in seg_rows:
        groups.setdefault((str(r["case"]), str(r.get("orientation"))), []).append(r)
    out = []
    for (case, orientation), rows in groups.items():
        dice = [d for d in (_finite(r.get("dice")) for r in rows) if d is not None]
        out.append(CaseScore(case, orientation, str(rows[0].get("site")), float(np.mean(dice)) if dice else None,
                             len(dice), rows))
    return out


def best_median_worst(scores: Sequence[CaseScore]) -> list[tuple[str, CaseScore]]:
    """``[("best", s), ("median", s), ("worst", s)]`` of cases by mean Dice (cases without one left out).

    Ties are broken by case name so the choice is reproducible; with fewer than three cases each
    case is shown once (one case: ``only``; two: ``best`` and ``worst``). The median is the middle
    case of the sorted list (the lower middle one for an even count).
    """
    ranked = sorted((s for s in scores if s.mean_dice is not None), key=lambda s: (-s.mean_dice, s.case))
    if not ranked:
        return []
    if len(ranked) == 1:
        return [("only", ranked[0])]
    picks = [("best", ranked[0])]
    if len(ranked) >= 3:
        picks.append(("median", ranked[len(ranked) // 2]))
    picks.append(("worst", ranked[-1]))
    return picks


# ----------------------------------------------------------------------------------------------
# slices


@dataclass
class SliceView:
    """How one 3D array (z, y, x) is cut and shown: slice axis, in-plane axes, flips, edge letters."""

    axis: int  # array axis normal to the slices
    rows_axis: int  # array axis shown vertically
    cols_axis: int  # array axis shown horizontally
    flip_rows: bool
    flip_cols: bool
    letters: dict[str, str]  # "top", "bottom", "left", "right" -> anatomical letter
    plane: str  # "sagittal", "coronal", "axial" or "array axis k"
    spacing_zyx: tuple[float, float, float]

    def cut(self, volume: np.ndarray, index: int) -> np.ndarray:
        """The 2D slice ``index`` as displayed (rows top to bottom, columns left to right)."""
        sl = np.take(volume, index, axis=self.axis)
        rest = [a for a in range(3) if a != self.axis]
        if rest.index(self.rows_axis) == 1:
            sl = sl.T
        if self.flip_rows:
            sl = sl[::-1]
        if self.flip_cols:
            sl = sl[:, ::-1]
        return sl

    def extent_mm(self, shape2d: tuple[int, int]) -> tuple[float, float, float, float]:
        """``imshow`` extent (left, right, bottom, top) in mm, so that pixels keep their physical size."""
        h, w = shape2d
        return 0.0, w * self.spacing_zyx[self.cols_axis], h * self.spacing_zyx[self.rows_axis], 0.0


def _letter(vec: np.ndarray) -> str:
    k = int(np.argmax(np.abs(vec)))
    return _LETTERS[k][int(vec[k] > 0)]


def slice_view(direction: Sequence[float], spacing_xyz: Sequence[float], orientation: str | None) -> SliceView:
    """Slice axis, display axes and flips from a SimpleITK direction (row-major 3x3) and spacing (x, y, z).

    The slice axis is the array axis most aligned with the orientation's normal (L-R for sagittal,
    A-P for coronal, S-I for axial); without a known orientation, the axis with the coarsest spacing
    (the through-plane axis of a 2D acquisition). Display: superior up on sagittal/coronal slices,
    anterior up on axial ones; anterior on the left of sagittal slices, the patient's right on the
    viewer's left of coronal and axial slices.
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    world = {a: d[:, 2 - a] for a in range(3)}  # array axis a (z, y, x) runs along column 2 - a
    spacing_zyx = tuple(float(s) for s in tuple(spacing_xyz)[::-1])
    normal = NORMAL_AXIS.get(str(orientation))
    if normal is None:
        axis = int(np.argmax(spacing_zyx))
        plane = f"array axis {axis}"
        normal = int(np.argmax(np.abs(world[axis])))
    else:
        axis = max(range(3), key=lambda a: (abs(world[a][normal]), -a))
        plane = PLANE_NAMES[str(orientation)]
    rest = [a for a in range(3) if a != axis]
    vertical_world = 1 if normal == 2 else 2  # axial slices: A-P vertical; others: S-I vertical
    rows_axis = max(rest, key=lambda a: abs(world[a][vertical_world]))
    cols_axis = next(a for a in rest if a != rows_axis)
    horizontal_world = 1 if normal == 0 else 0  # sagittal: A-P horizontal; others: R-L horizontal
    # row 0 is drawn at the top: flip when the index runs towards the end that should be up (S, or A)
    up_positive = vertical_world == 2  # S is the positive LPS end, A the negative one
    flip_rows = (world[rows_axis][vertical_world] > 0) == up_positive
    # sagittal: anterior (A, negative y) left -> flip when the index runs towards A;
    # coronal/axial: patient's right (R, negative x) left -> flip when the index runs towards R
    flip_cols = world[cols_axis][horizontal_world] < 0
    down = world[rows_axis] * (-1 if flip_rows else 1)
    right = world[cols_axis] * (-1 if flip_cols else 1)
    letters = {"top": _letter(-down), "bottom": _letter(down), "left": _letter(-right), "right": _letter(right)}
    return SliceView(axis, rows_axis, cols_axis, bool(flip_rows), bool(flip_cols), letters, plane, spacing_zyx)


def pick_slices(masks: Sequence[np.ndarray], axis: int, n: int = 3) -> list[int]:
    """``n`` slice indices through the structures: quantiles of the foreground voxels along ``axis``.

    Foreground is the union of the given label arrays (> 0); the indices are the 1/(n+1), ...,
    n/(n+1) quantiles of the foreground voxels' positions, so slices with more structure weigh more.
    Without any foreground: the middle slice.
    """
    size = masks[0].shape[axis]
    other = tuple(a for a in range(3) if a != axis)
    counts = np.zeros(size)
    for m in masks:
        counts += (np.asarray(m) > 0).sum(axis=other)
    if counts.sum() == 0:
        return [size // 2]
    cdf = np.cumsum(counts) / counts.sum()
    picks = [int(np.searchsorted(cdf, q)) for q in np.arange(1, n + 1) / (n + 1)]
    return sorted(dict.fromkeys(min(p, size - 1) for p in picks))


def _colours(n: int) -> list:
    """``n`` distinct colours: tab10's, then tab20's lighter shades (one per structure, up to 20, then again)."""
    plt = _plt()
    tab20 = plt.get_cmap("tab20")
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # the strong shades first
    return [tab20(order[k % 20]) for k in range(n)]


def _read(path: Path):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


def _read_case(image_file: Path, reference_file: Path, prediction_file: Path):
    """``(image, its SimpleITK image, reference, prediction)`` as arrays on one grid, or a ValueError naming the file."""
    image, img = _read(image_file)
    reference, _ = _read(reference_file)
    prediction, _ = _read(prediction_file)
    if image.ndim == 4:  # a vector image: first component
        image = image[..., 0]
    if not (image.shape == reference.shape == prediction.shape):
        raise ValueError(f"{Path(image_file).name}: image {image.shape}, reference {reference.shape} and "
                         f"prediction {prediction.shape} are not on one grid")
    return image, img, reference, prediction


def _draw_contours(ax, view, ref2: np.ndarray, pred2: np.ndarray, structures: Mapping[str, int],
                   colours: Mapping[str, object]) -> set[str]:
    """Reference (solid, on top) and prediction (dashed) contours of each structure on one slice; the names drawn."""
    h, w = ref2.shape
    xc = (np.arange(w) + 0.5) * view.spacing_zyx[view.cols_axis]
    yc = (np.arange(h) + 0.5) * view.spacing_zyx[view.rows_axis]
    present = set()
    for name, value in structures.items():
        # the reference on top and thicker, so that a noisy prediction does not hide it
        for arr, style, lw, z in ((pred2, "dashed", 0.8, 2), (ref2, "solid", 1.6, 3)):
            m = (arr == value).astype(float)
            if m.any() and not m.all():
                ax.contour(xc, yc, m, levels=[0.5], colors=[colours[name]], linestyles=style, linewidths=lw, zorder=z)
                present.add(name)
    return present


def _label_directions(ax, view) -> None:
    """The anatomical direction letters at the four edges of a slice."""
    for where, (x, y, ha, va) in {"top": (0.5, 0.98, "center", "top"), "bottom": (0.5, 0.02, "center", "bottom"),
                                  "left": (0.02, 0.5, "left", "center"),
                                  "right": (0.98, 0.5, "right", "center")}.items():
        ax.text(x, y, view.letters[where], transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=8,
                fontweight="bold", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})


def plot_case_overlay(
    image_file: Path,
    reference_file: Path,
    prediction_file: Path,
    structures: Mapping[str, int],
    orientation: str | None,
    path: Path,
    title: str,
    n_slices: int = 3,
) -> dict:
    """Reference (solid) and prediction (dashed) contours per structure on ``n_slices`` slices of the image.

    Args:
        image_file: the case's first channel (``<case>_0000`` of imagesTs).
        reference_file: reference label file (same grid).
        prediction_file: predicted label file (same grid).
        structures: structure name -> label value; one colour each.
        orientation: ``sag``, ``cor`` or ``ax`` (chooses the slice plane), or None.
        path: PNG to write.
        title: figure title (case, rank, mean Dice).
        n_slices: slices drawn.

    Returns:
        ``{"file": PNG name, "plane": ..., "axis": array axis, "slices": [indices], "n": slices in the volume,
        "spacing_mm": [row, column] spacing of the drawn slices}``.
    """
    image, img, reference, prediction = _read_case(image_file, reference_file, prediction_file)
    view = slice_view(img.GetDirection(), img.GetSpacing(), orientation)
    slices = pick_slices([reference, prediction], view.axis, n_slices)
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    plt = _plt()
    names = [s for s, v in structures.items() if v != 0]
    colours = dict(zip(names, _colours(len(names))))
    legend_in = 0.6 + 0.075 * max([len(n) for n in names] + [10])  # inches for the legend at font size 7
    fig, axes = plt.subplots(1, len(slices), figsize=(3.4 * len(slices) + legend_in, 4.0), squeeze=False)
    present: set[str] = set()
    for ax, index in zip(axes[0], slices):
        ext = view.extent_mm(view.cut(image, index).shape)
        ax.imshow(view.cut(image, index), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, extent=ext,
                  interpolation="nearest")
        present |= _draw_contours(ax, view, view.cut(reference, index), view.cut(prediction, index),
                                  {n: structures[n] for n in names}, colours)
        ax.set_xlim(ext[0], ext[1])
        ax.set_ylim(ext[2], ext[3])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        _label_directions(ax, view)
        ax.set_title(f"{view.plane} slice {index} of {image.shape[view.axis]}\n(array axis {view.axis})", fontsize=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[n], lw=2, label=n) for n in names if n in present]
    handles += [Line2D([], [], color="k", ls="solid", lw=1.6, label="reference"),
                Line2D([], [], color="k", ls="dashed", lw=0.8, label="prediction")]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - legend_in / fig.get_size_inches()[0], 0.95))
    save_figure(fig, path)
    return {"file": Path(path).name, "plane": view.plane, "axis": view.axis, "slices": slices,
            "n": int(image.shape[view.axis]),
            "spacing_mm": [round(view.spacing_zyx[view.rows_axis], 4), round(view.spacing_zyx[view.cols_axis], 4)]}


# ----------------------------------------------------------------------------------------------
# ROC with bootstrap bands


def roc_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct score, from (0, 0): the points of scikit-learn's ``roc_curve``
    with ``drop_intermediate=False``, by NumPy alone (the bootstrap calls it hundreds of times, where
    scikit-learn's argument checking dominates); checked against scikit-learn in the tests."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return np.r_[0.0, fps / max(1, fps[-1])], np.r_[0.0, tps / max(1, tps[-1])]


def roc_band(y: np.ndarray, p: np.ndarray, groups: Sequence, n_boot: int, seed: int,
             grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Pointwise 95% percentile band of the ROC curve's TPR over a grid of FPR values.

    Each resample draws the clusters (``groups[i]``: exam i's patient, or the exam itself) with
    replacement and keeps all their exams, as the metrics' intervals do
    (:func:`~orthodiff_nnunet.evaluation.classification.resample_clusters`).

    Returns ``(fpr_grid, low, high, n_valid)``; resamples without both classes are skipped
    (``n_valid`` counts the others); fewer than half valid gives NaN bands.
    """
    from orthodiff_nnunet.evaluation.classification import cluster_members, resample_clusters

    grid = np.linspace(0, 1, 101) if grid is None else grid
    rng = np.random.default_rng(seed)
    members = cluster_members(list(groups), len(y))
    curves = []
    for _ in range(int(n_boot)):
        idx = resample_clusters(rng, members)
        yy, pp = y[idx], p[idx]
        if yy.size == 0 or yy.min() == yy.max():
            continue
        fpr, tpr = roc_points(yy, pp)
        curves.append(np.interp(grid, fpr, tpr))  # as scikit-learn's "mean ROC" example does
    if len(curves) < max(1, n_boot // 2):
        nan = np.full_like(grid, np.nan)
        return grid, nan, nan, len(curves)
    lo, hi = np.percentile(np.array(curves), [2.5, 97.5], axis=0)
    return grid, lo, hi, len(curves)


def _roc_axes(ax, first_column: bool, last_row: bool) -> None:
    """The chance diagonal, unit square and the axis titles on the outer panels."""
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)
    if last_row:
        ax.set_xlabel("1 - specificity", fontsize=8)
    if first_column:
        ax.set_ylabel("sensitivity", fontsize=8)


def _roc_panel(ax, name: str, yy: np.ndarray, pp: np.ndarray, gg: Sequence, thresholds: Mapping[str, float],
               m: Mapping, n_boot: int, seed: int) -> dict:
    """One label's ROC curve, band and operating point (or why it is undefined) on ``ax``; what was drawn."""
    from sklearn.metrics import roc_curve

    n_pos, n_neg = int((yy == 1).sum()), int((yy == 0).sum())
    if n_pos == 0 or n_neg == 0:
        reason = f"undefined: {'no positive' if n_pos == 0 else 'no negative'} exam among {yy.size} known"
        ax.text(0.5, 0.5, reason.replace(": ", ":\n"), ha="center", va="center", fontsize=8, color="0.3")
        ax.set_title(f"{name}: AUROC n/a", fontsize=9)
        return {"drawn": False, "reason": reason, "n_valid": 0}
    fpr, tpr, _ = roc_curve(yy, pp)
    grid, lo, hi, n_valid = roc_band(yy, pp, gg, n_boot, seed)
    if np.isfinite(lo).all():
        ax.fill_between(grid, lo, hi, color="C0", alpha=0.25, lw=0, label="95% band")
    ax.plot(fpr, tpr, color="C0", lw=1.5, label="ROC")
    thr = _finite(thresholds.get(name))
    if thr is not None:
        pred = pp >= thr
        sens = float((pred & (yy == 1)).sum() / n_pos)
        spec = float((~pred & (yy == 0)).sum() / n_neg)
        ax.plot([1 - spec], [sens], "o", color="C3", ms=5, label=f"threshold {thr:.2f}")
    auc = _finite(m.get("auroc"))
    ci = (m.get("ci") or {}).get("auroc") or (None, None)
    lo_ci, hi_ci = (_finite(ci[0]), _finite(ci[1])) if len(ci) == 2 else (None, None)
    ci_txt = f" [{lo_ci:.2f}, {hi_ci:.2f}]" if lo_ci is not None and hi_ci is not None else ""
    ax.set_title(f"{name}: AUROC {auc:.2f}{ci_txt}" if auc is not None else f"{name}: AUROC n/a", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    return {"drawn": True, "reason": None, "n_valid": n_valid}


def plot_roc_bands(
    y: np.ndarray,
    p: np.ndarray,
    labels: Sequence[str],
    thresholds: Mapping[str, float],
    groups: Sequence,
    summary: Mapping[str, Mapping],
    path: Path,
    n_boot: int = 200,
    seed: int = 0,
) -> dict:
    """One ROC panel per label with its bootstrap band and the operating point at the threshold.

    Args:
        y: ``(N, L)`` 0/1 with NaN unknown.
        p: ``(N, L)`` probabilities.
        labels: label names (columns).
        thresholds: label -> decision threshold (the operating point).
        groups: cluster of each exam (its patient; the exam itself when unknown).
        summary: label -> the report's metrics of that label (AUROC and its CI for the panel title,
            so the figure shows the table's numbers).
        path: PNG to write.
        n_boot: resamples of the band.
        seed: seed of the band.

    Returns:
        label -> ``{"drawn": bool, "reason": str | None, "n_valid": resamples with both classes}``.
    """
    plt = _plt()
    n = len(labels)
    cols = min(4, max(1, n))
    rows = math.ceil(n / cols) if n else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3.1 * rows), squeeze=False)
    out: dict = {}
    for j, name in enumerate(labels):
        ax = axes[j // cols][j % cols]
        keep = np.isfinite(y[:, j])
        _roc_axes(ax, first_column=j % cols == 0, last_row=j // cols == rows - 1)
        out[name] = _roc_panel(ax, name, y[keep, j], p[keep, j], [g for g, k in zip(groups, keep) if k],
                               thresholds, summary.get(name, {}), n_boot, seed)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    return out


def confusion_counts(y: np.ndarray, p: np.ndarray, labels: Sequence[str], thresholds: Mapping[str, float]) -> dict:
    """Per label at its threshold (positive when ``p >= threshold``): TP, FP, FN, TN and unknown targets."""
    out = {}
    for j, name in enumerate(labels):
        keep = np.isfinite(y[:, j])
        yy, pp = y[keep, j], p[keep, j]
        thr = _finite(thresholds.get(name))
        if thr is None:
            out[name] = {"threshold": None, "tp": None, "fp": None, "fn": None, "tn": None,
                         "unknown": int((~keep).sum()), "reason": "no single decision threshold"}
            continue
        pred = pp >= thr
        out[name] = {"threshold": thr, "tp": int((pred & (yy == 1)).sum()), "fp": int((pred & (yy == 0)).sum()),
                     "fn": int((~pred & (yy == 1)).sum()), "tn": int((~pred & (yy == 0)).sum()),
                     "unknown": int((~keep).sum())}
    return out
