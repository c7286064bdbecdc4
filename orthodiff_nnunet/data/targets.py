"""Typed reader of ``orthodiff_targets.json`` and the exam table that links the three views.

``orthodiff convert`` writes one targets file per orientation dataset (docs/CONTRACTS.md)::

    {"label_names": ["ACL", ...],
     "cases": {case: {"exam": ..., "echo": null, "targets": {"ACL": 1, "PCL": null, ...},
                      "site": ..., "field_strength_t": 3.0, "vendor": ..., "patient": ...,
                      "segmentation": "labeled" | "unlabeled"}}}

A target is 1, 0 or null (unknown: masked out of the loss and the metrics). The label set is data:
the 8 knee abnormalities by default, MRNet's 3, an ankle's or shoulder's labels, whatever the
manifest declared.

The three orientation datasets of one conversion name their cases identically per exam (the
``exam`` field is the exam's pseudonym; multi-echo series add an ``e<k>`` suffix to the case). An
:class:`Exam` gathers, per view, the case of that exam; an exam without a series of some view is
kept with that view missing. Targets, site, patient, field strength and vendor are exam-level
facts and must agree across views.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.utils import load_json

TARGETS_FILE = "orthodiff_targets.json"

__all__ = ["TARGETS_FILE", "TargetsError", "CaseTargets", "TargetsFile", "Exam", "read_targets", "find_targets_file",
           "load_dataset_targets", "match_exams"]


class TargetsError(OrthodiffError):
    """A targets file is missing or inconsistent; the message says what to do."""


@dataclass(frozen=True)
class CaseTargets:
    """One case (one series of one exam) of a targets file.

    Attributes:
        case: nnU-Net case identifier (pseudonym).
        exam: the exam it belongs to (shared by the exam's sag/cor/ax cases).
        targets: label -> 1, 0 or None (unknown), for every label of the file.
        site, field_strength_t, vendor, patient: as written by the converter (patient is a pseudonym).
        echo: echo index of a multi-echo series, else None.
        segmentation: ``labeled`` or ``unlabeled``.
    """

    case: str
    exam: str
    targets: Mapping[str, int | None]
    site: str | None = None
    field_strength_t: float | None = None
    vendor: str | None = None
    patient: str | None = None
    echo: int | None = None
    segmentation: str | None = None


@dataclass(frozen=True)
class TargetsFile:
    """A whole ``orthodiff_targets.json``: label names in target order and the cases."""

    label_names: tuple[str, ...]
    cases: Mapping[str, CaseTargets]
    path: Path | None = None

    def vector(self, case: str) -> np.ndarray:
        """``(L,)`` float32 targets of ``case`` in label order; NaN = unknown."""
        t = self.cases[case].targets
        return np.array([np.nan if t.get(n) is None else float(t[n]) for n in self.label_names], dtype=np.float32)

    def prevalence(self, cases: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
        """label -> (positives, known) over ``cases`` (default all)."""
        cases = list(self.cases) if cases is None else list(cases)
        out = {}
        for j, name in enumerate(self.label_names):
            col = np.array([self.vector(c)[j] for c in cases], dtype=np.float64)
            known = np.isfinite(col)
            out[name] = (int(np.nansum(col[known])), int(known.sum()))
        return out


def read_targets(path: Path) -> TargetsFile:
    """Read and validate a targets file.

    Raises:
        TargetsError: missing file, missing keys, labels outside ``label_names``, values other than
            0, 1 or null, naming the case and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise TargetsError(f"targets file {path} not found: convert the dataset with `orthodiff convert` "
                           "(it writes orthodiff_targets.json beside dataset.json)")
    data = load_json(path)
    if not isinstance(data, dict) or "label_names" not in data or "cases" not in data:
        raise TargetsError(f"{path} is not an orthodiff targets file (needs 'label_names' and 'cases')")
    names = tuple(str(n) for n in data["label_names"])
    if len(set(names)) != len(names):
        raise TargetsError(f"{path}: duplicate label names {list(names)}")
    problems: list[str] = []
    cases: dict[str, CaseTargets] = {}
    for case, info in data["cases"].items():
        raw = info.get("targets", {}) or {}
        extra = sorted(set(raw) - set(names))
        if extra:
            problems.append(f"case {case}: targets {extra} are not in label_names {list(names)}")
        targets: dict[str, int | None] = {}
        for n in names:
            v = raw.get(n)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                targets[n] = None
            elif v in (0, 1) and not isinstance(v, str):
                targets[n] = int(v)
            else:
                problems.append(f"case {case}: target {n}={v!r} must be 0, 1 or null (unknown)")
        fs = info.get("field_strength_t")
        cases[case] = CaseTargets(
            case=case, exam=str(info.get("exam") or case), targets=targets, site=info.get("site"),
            field_strength_t=None if fs is None else float(fs), vendor=info.get("vendor"),
            patient=info.get("patient"), echo=info.get("echo"), segmentation=info.get("segmentation"),
        )
    if problems:
        raise TargetsError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems[:10])
                           + ". Fix the manifest's label columns and convert again.")
    return TargetsFile(label_names=names, cases=cases, path=path)


def find_targets_file(dataset_name: str, raw: Path | None = None, preprocessed: Path | None = None) -> Path:
    """The dataset's targets file: ``nnUNet_preprocessed/<name>/`` first, then ``nnUNet_raw/<name>/``.

    The file named in ``dataset.json["orthodiff"]["targets_file"]`` is used when given.
    """
    from orthodiff_nnunet import paths

    tried = []
    for getter, value in ((paths.preprocessed_dir, preprocessed), (paths.raw_dir, raw)):
        try:
            folder = getter(value) / dataset_name
        except paths.PathsNotSetError:
            continue
        name = TARGETS_FILE
        if (folder / "dataset.json").is_file():
            name = load_json(folder / "dataset.json").get("orthodiff", {}).get("targets_file") or TARGETS_FILE
        tried.append(folder / name)
        if (folder / name).is_file():
            return folder / name
    raise TargetsError(f"no targets file for {dataset_name} (looked for {', '.join(map(str, tried)) or 'nothing: set nnUNet_raw'}); "
                       "the converter writes it into nnUNet_raw/<dataset>/: keep nnUNet_raw set or copy the file "
                       "next to the preprocessed dataset")


def load_dataset_targets(dataset_name: str, raw: Path | None = None, preprocessed: Path | None = None) -> TargetsFile:
    """:func:`read_targets` of :func:`find_targets_file`."""
    return read_targets(find_targets_file(dataset_name, raw, preprocessed))


@dataclass(frozen=True)
class Exam:
    """One exam across views.

    Attributes:
        exam: exam identifier.
        cases: view -> case identifier; a view without a series of this exam is absent.
        targets: ``(L,)`` float32, NaN = unknown.
        site, patient, field_strength_t, vendor: exam-level facts.
    """

    exam: str
    cases: Mapping[str, str]
    targets: np.ndarray = field(compare=False)
    site: str | None = None
    patient: str | None = None
    field_strength_t: float | None = None
    vendor: str | None = None

    def has(self, view: str) -> bool:
        return view in self.cases

    def missing_views(self, views: Sequence[str]) -> list[str]:
        return [v for v in views if v not in self.cases]


def match_exams(views: Mapping[str, TargetsFile], restrict: Mapping[str, Sequence[str]] | None = None) -> list[Exam]:
    """Gather the cases of every view into exams (sorted by exam id).

    Args:
        views: view name (``sag``, ``cor``, ``ax``) -> that dataset's targets.
        restrict: optional view -> the only cases to consider (e.g. the preprocessed ones).

    When a view holds several cases of one exam (multi-echo), the lowest echo is used.

    Raises:
        TargetsError: label sets that differ between views, or exam-level facts (targets, site,
            patient) that disagree between the views of one exam.
    """
    if not views:
        raise TargetsError("no view given")
    label_sets = {v: t.label_names for v, t in views.items()}
    first = next(iter(label_sets.values()))
    if any(names != first for names in label_sets.values()):
        raise TargetsError(f"the views' targets files declare different label sets: {label_sets}; "
                           "convert every orientation with the same --labels")
    by_exam: dict[str, dict[str, CaseTargets]] = {}
    for view, tf in views.items():
        allowed = None if restrict is None or view not in restrict else set(restrict[view])
        for case, ct in sorted(tf.cases.items()):
            if allowed is not None and case not in allowed:
                continue
            slot = by_exam.setdefault(ct.exam, {})
            old = slot.get(view)
            if old is None or (ct.echo or 0) < (old.echo or 0):
                slot[view] = ct
    exams: list[Exam] = []
    problems = []
    for exam, per_view in sorted(by_exam.items()):
        cts = list(per_view.values())
        vectors = [views[v].vector(ct.case) for v, ct in per_view.items()]
        ref = vectors[0]
        if any(not np.array_equal(ref, vec, equal_nan=True) for vec in vectors[1:]):
            problems.append(f"exam {exam}: targets differ between views {sorted(per_view)}")
        for attr in ("site", "patient"):
            vals = {getattr(ct, attr) for ct in cts}
            if len(vals) > 1:
                problems.append(f"exam {exam}: {attr} differs between views ({sorted(map(str, vals))})")
        exams.append(Exam(exam=exam, cases={v: ct.case for v, ct in per_view.items()}, targets=ref,
                          site=cts[0].site, patient=cts[0].patient, field_strength_t=cts[0].field_strength_t,
                          vendor=cts[0].vendor))
    if problems:
        raise TargetsError(f"{len(problems)} inconsistent exam(s) across views: " + "; ".join(problems[:10])
                           + ". The three orientation datasets must come from one conversion.")
    return exams
