"""Two segmentation models on the same external cases, side by side: each one's Dice and their paired difference.

``orthodiff evaluate --seg ... --seg-compare ...`` (and the demo: the diffusion-initialised model against
its from-scratch twin) predicts the same cases with both models. Per structure, the report gives both
mean Dice values and the mean paired difference (first model minus second, case by case) with a
percentile bootstrap interval that resamples patients, as everywhere in the report. A case enters a
structure's comparison only where both models' Dice is defined (a structure absent from the reference
and from both predictions has none). The mean over structures is compared per case first (each model's
mean over the structures defined for both), then resampled the same way.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

import numpy as np

from orthodiff_nnunet.evaluation.report import _fmt, _html_table, _md, _seg_clusters, cluster_mean_ci

MEAN_ROW = "mean over structures"


def _key(r: Mapping) -> tuple:
    return r["case"], r["orientation"], r["structure"]


def _dice(r: Mapping) -> float:
    return math.nan if r.get("dice") is None else float(r["dice"])


def _block(first: Sequence[float], second: Sequence[float], rows: Sequence[Mapping], n_boot: int, seed: int) -> dict:
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    clusters = [c for c, k in zip(_seg_clusters(list(rows))[0], keep) if k]
    out = {"n_cases": int(keep.sum()), "n_patients": len(set(clusters))}
    for name, values in (("first", a[keep]), ("second", b[keep]), ("difference", a[keep] - b[keep])):
        mean, lo, hi, _ = cluster_mean_ci(values, clusters, n_boot, seed)
        out[name] = {"mean": mean, "ci": [lo, hi]}
    return out


def compare_segmentation(rows: Sequence[Mapping], other_rows: Sequence[Mapping], names: tuple[str, str],
                         n_boot: int = 1000, seed: int = 0) -> dict:
    """Per structure and for the per-case mean over structures: both models' mean Dice and their paired difference.

    Args:
        rows, other_rows: the two models' segmentation rows (``evaluate_segmentation``) on the same cases.
        names: what to call the two models (e.g. ``("diffusion init", "scratch init")``).
        n_boot, seed: the patient bootstrap.

    Returns:
        ``{"names", "difference": "first - second", "structures": {structure: block}, "mean": block}``, a
        block being ``{"n_cases", "n_patients", "first", "second", "difference"}`` with ``{"mean", "ci"}``
        each (NaN where undefined).
    """
    other = {_key(r): r for r in other_rows}
    paired = [(r, other[_key(r)]) for r in rows if _key(r) in other]
    structures = list(dict.fromkeys(r["structure"] for r, _ in paired))
    out: dict = {"names": list(names), "difference": f"{names[0]} - {names[1]}", "structures": {}}
    for s in structures:
        sel = [(r, o) for r, o in paired if r["structure"] == s]
        out["structures"][s] = _block([_dice(r) for r, _ in sel], [_dice(o) for _, o in sel], [r for r, _ in sel],
                                      n_boot, seed)
    per_case: dict[tuple, list[tuple[float, float]]] = {}
    first_row: dict[tuple, Mapping] = {}
    for r, o in paired:
        a, b = _dice(r), _dice(o)
        if math.isfinite(a) and math.isfinite(b):
            per_case.setdefault((r["case"], r["orientation"]), []).append((a, b))
            first_row.setdefault((r["case"], r["orientation"]), r)
    cases = list(per_case)
    out["mean"] = _block([float(np.mean([a for a, _ in per_case[c]])) for c in cases],
                         [float(np.mean([b for _, b in per_case[c]])) for c in cases],
                         [first_row[c] for c in cases], n_boot, seed)
    return out


def _ci(cell: Mapping) -> str:
    lo, hi = cell["ci"]
    return f"{_fmt(cell['mean'])} [{_fmt(lo)}, {_fmt(hi)}]"


def comparison_table(comparison: Mapping) -> list[list]:
    """Header and one row per structure, then the mean over structures: Dice of both models and the difference."""
    first, second = comparison["names"]
    rows: list[list] = [["structure", f"Dice, {first}", f"Dice, {second}", f"difference ({first} - {second})",
                         "cases", "patients"]]
    blocks = [*comparison["structures"].items(), (MEAN_ROW, comparison["mean"])]
    for name, b in blocks:
        rows.append([name, _ci(b["first"]), _ci(b["second"]), _ci(b["difference"]), b["n_cases"], b["n_patients"]])
    return rows


def comparison_section(comparison: Mapping) -> tuple[list[str], list[str]]:
    """The report's side-by-side section (Markdown lines, HTML parts)."""
    first, second = comparison["names"]
    note = (f"The same external cases segmented by two models: {first} and {second}. Mean Dice with 95% intervals; "
            f"the difference is paired ({first} minus {second}, case by case) and its interval resamples patients. "
            "An interval that excludes 0 is a difference these cases can show; one that includes 0 is not.")
    table = comparison_table(comparison)
    md = [f"## Segmentation: {first} vs {second}", "", note, "", _md(table), ""]
    parts = [f"<h2 id='comparison'>Segmentation: {html.escape(first)} vs {html.escape(second)}</h2>",
             f"<p class='note'>{html.escape(note)}</p>", _html_table(table, True, "seg-comparison", foot=1)]
    return md, parts
