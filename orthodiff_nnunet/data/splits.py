"""Cross-validation splits grouped by patient and stratified by site."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

SPLIT_SEED = 12345  # nnU-Net's own split seed


def patient_grouped_splits(
    cases: Sequence[str],
    patients: Mapping[str, str],
    sites: Mapping[str, str],
    num_folds: int = 5,
    seed: int = SPLIT_SEED,
) -> list[dict[str, list[str]]]:
    """nnU-Net style ``splits_final.json`` content: no patient in two folds' validation sets.

    Stratified by site where there is more than one site (scikit-learn's StratifiedGroupKFold),
    otherwise grouped only (GroupKFold, shuffled). With fewer patients than folds, the number of
    folds shrinks to the number of patients; with a single patient no split is possible and an
    empty list is returned (train on fold ``all``).

    Args:
        cases: case identifiers (pseudonyms).
        patients: case -> patient pseudonym.
        sites: case -> site name.
        num_folds: requested number of folds.
        seed: shuffling seed.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    cases = sorted(cases)
    groups = np.array([patients[c] for c in cases])
    n_patients = len(set(groups.tolist()))
    k = min(num_folds, n_patients)
    if k < 2:
        log.warning("only %d patient(s): no cross-validation split is possible; train on fold 'all'", n_patients)
        return []
    if k < num_folds:
        log.warning("%d patients: using %d folds instead of %d", n_patients, k, num_folds)
    y = np.array([sites[c] for c in cases])
    x = np.zeros(len(cases))
    patients_per_site = {s: len({patients[c] for c in cases if sites[c] == s}) for s in set(y.tolist())}
    # stratification needs every site to have at least one patient per fold
    if len(patients_per_site) > 1 and min(patients_per_site.values()) >= k:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        folds = splitter.split(x, y, groups)
    else:
        splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
        folds = splitter.split(x, y, groups)
    arr = np.array(cases)
    return [{"train": sorted(arr[tr].tolist()), "val": sorted(arr[va].tolist())} for tr, va in folds]


def label_fraction_subset(
    cases: Sequence[str],
    sites: Mapping[str, str],
    fraction: float,
    seed: int = SPLIT_SEED,
) -> list[str]:
    """Deterministic subset of ``cases`` holding ``fraction`` of each site's cases (at least one per site).

    Used for label-efficiency runs (``--label-fraction``): the same fraction, seed and case list
    always give the same subset, and every site keeps its share, so a 10% run still sees every site.

    Args:
        cases: training case identifiers.
        sites: case -> site name.
        fraction: in (0, 1]; 1 returns every case.
        seed: selection seed (recorded with the results).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction} must be in (0, 1]")
    if fraction == 1:
        return sorted(cases)
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for site in sorted({sites[c] for c in cases}):
        members = sorted(c for c in cases if sites[c] == site)
        k = max(1, int(round(fraction * len(members))))
        chosen += rng.permutation(members)[:k].tolist()
    return sorted(chosen)


@dataclass
class SplitUpdate:
    """Folds of an incremental conversion and what changed compared with the previous split.

    Attributes:
        folds: ``splits_final.json`` content (exam ids).
        changes: existing assignments that had to change, each with the reason (warnings).
        notes: what else happened (new exams placed, a first split made), for the summary.
    """

    folds: list[dict[str, list[str]]]
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def folds_from_splits(splits: Sequence[Mapping[str, Sequence[str]]]) -> dict[str, int]:
    """Fold index of every case from a ``splits_final.json`` list: the fold whose ``val`` holds it."""
    out: dict[str, int] = {}
    for k, fold in enumerate(splits):
        for c in fold["val"]:
            out.setdefault(str(c), k)
    return out


def _folds_of(assignment: Mapping[str, int], cases: Sequence[str], k: int) -> list[dict[str, list[str]]]:
    every = sorted(cases)
    out = []
    for i in range(k):
        val = sorted(c for c in every if assignment[c] == i)
        out.append({"train": [c for c in every if assignment[c] != i], "val": val})
    return out


def _tiebreak(seed: int, name: str) -> str:
    """A seeded, platform-independent order of names (pseudonyms are already random, but sorted order
    would put the same prefix first in every site)."""
    return hashlib.sha256(f"{seed}\x1f{name}".encode()).hexdigest()


def extend_patient_grouped_splits(
    cases: Sequence[str],
    patients: Mapping[str, str],
    sites: Mapping[str, str],
    previous: Mapping[str, int] | None,
    previous_num_folds: int | None,
    num_folds: int = 5,
    seed: int = SPLIT_SEED,
) -> SplitUpdate:
    """Splits of a dataset that grows: earlier exams keep their fold, new patients are placed.

    Re-splitting everything (:func:`patient_grouped_splits`) after adding exams moves most existing
    exams to other folds, which silently invalidates every model trained on the old folds. Here:

    * an exam that already had a fold keeps it;
    * a new exam of a known patient joins that patient's fold (grouping by patient);
    * a new patient goes to the fold with the fewest exams of the patient's site, then the fewest
      exams overall (balanced and stratified by site); larger patients are placed first;
    * an existing assignment changes only when it must: when one patient's exams sit in several
      folds (the manifest now gives an exam another patient) the minority exams follow the fold
      holding most of them, and when the number of folds changes (another ``num_folds``, or a
      dataset that had fewer patients than folds) everything is re-split. Each such change is
      reported in ``changes`` with its reason.

    One patient allows no cross-validation: the result is a single fold whose validation set is
    its training set (nnU-Net's fold ``all`` semantics; nnU-Net accepts it with a warning).

    Args:
        cases: every exam id of the dataset after this conversion.
        patients: exam -> patient pseudonym.
        sites: exam -> site name.
        previous: exam -> fold of the previous ``splits_final.json`` (``None`` when there was none).
        previous_num_folds: number of folds of that file.
        num_folds: requested number of folds.
        seed: seed of the first split and of tie-breaking.
    """
    cases = sorted(cases)
    n_patients = len({patients[c] for c in cases})
    k = min(num_folds, n_patients)
    update = SplitUpdate(folds=[])
    if k < 2:
        return _single_fold(cases, n_patients, previous, previous_num_folds, update)
    present = set(cases)
    previous = {c: f for c, f in (previous or {}).items() if c in present}
    if not previous or previous_num_folds != k:
        return _split_anew(cases, patients, sites, previous, previous_num_folds, num_folds, k, seed, update)
    assignment: dict[str, int] = dict(previous)
    by_patient: dict[str, list[str]] = {}
    for c in cases:
        by_patient.setdefault(patients[c], []).append(c)
    _reunite_patients(assignment, by_patient, update)
    followed, new_patients = _follow_known_patients(assignment, by_patient)
    size = _place_new_patients(assignment, by_patient, new_patients, sites, k, seed)
    n_new = sum(len(by_patient[p]) for p in new_patients)
    if n_new or followed:
        update.notes.append(
            f"folds kept for the {len(previous)} earlier exam(s); {n_new} exam(s) of {len(new_patients)} new patient(s) "
            f"placed into the smallest folds of their site; {followed} new exam(s) of earlier patients follow their "
            f"patient's fold (fold sizes now {size})"
        )
    update.folds = _folds_of(assignment, cases, k)
    return update


def _single_fold(cases: list[str], n_patients: int, previous: Mapping[str, int] | None,
                 previous_num_folds: int | None, update: SplitUpdate) -> SplitUpdate:
    """Fewer than two patients: one fold that validates on its training exams (nnU-Net's fold ``all``)."""
    log.warning("only %d patient(s): no cross-validation split is possible; splits_final.json gets one fold "
                "that validates on its training exams (fold 'all' semantics)", n_patients)
    update.notes.append(
        f"{n_patients} patient(s): splits_final.json holds one fold whose validation exams are its training exams "
        "(nnU-Net's fold 'all'); its validation scores are not a held-out estimate. Add patients for cross-validation"
    )
    update.folds = [{"train": list(cases), "val": list(cases)}] if cases else []
    if previous and previous_num_folds is not None and previous_num_folds >= 2:
        update.changes.append(f"the {previous_num_folds} folds were replaced by a single fold: every exam now "
                              "belongs to one patient; models trained on the old splits_final.json must be retrained")
    return update


def _split_anew(cases: list[str], patients: Mapping[str, str], sites: Mapping[str, str], previous: Mapping[str, int],
                previous_num_folds: int | None, num_folds: int, k: int, seed: int, update: SplitUpdate) -> SplitUpdate:
    """No earlier split, or another number of folds: split everything, saying why when an old split is replaced."""
    update.folds = patient_grouped_splits(cases, patients, sites, num_folds, seed)
    if previous:
        n_patients = len({patients[c] for c in cases})
        if previous_num_folds is not None and previous_num_folds < 2:
            why = f"the dataset had one patient (fold 'all'); it now has {n_patients}"
        elif num_folds != previous_num_folds and k == num_folds:
            why = f"{num_folds} folds were asked for and the existing split has {previous_num_folds}"
        else:
            why = f"{n_patients} patients now allow {k} folds (the existing split has {previous_num_folds})"
        update.changes.append(
            f"every exam was split anew into {k} folds because {why}: models trained on the old "
            f"splits_final.json must be retrained"
            + (f" (pass --folds {previous_num_folds} to keep the old folds)" if previous_num_folds and previous_num_folds >= 2 else "")
        )
    return update


def _reunite_patients(assignment: dict[str, int], by_patient: Mapping[str, list[str]], update: SplitUpdate) -> None:
    """A patient whose earlier exams sit in several folds: the minority follows the majority (reported)."""
    for p, members in sorted(by_patient.items()):
        folds_here = [assignment[c] for c in members if c in assignment]
        if len(set(folds_here)) < 2:
            continue
        counts = {f: folds_here.count(f) for f in set(folds_here)}
        target = min(counts, key=lambda f: (-counts[f], f))
        for c in members:
            if c in assignment and assignment[c] != target:
                update.changes.append(
                    f"exam {c} moved from fold {assignment[c]} to fold {target}: the manifest now gives it the same "
                    f"patient as exams in fold {target}, and one patient's exams must share a fold"
                )
                assignment[c] = target


def _follow_known_patients(assignment: dict[str, int], by_patient: Mapping[str, list[str]]) -> tuple[int, list[str]]:
    """New exams of earlier patients join their patient's fold. Returns (exams placed, the new patients)."""
    followed = 0
    new_patients = []
    for p, members in by_patient.items():
        known = {assignment[c] for c in members if c in assignment}
        if known:
            f = known.pop()
            for c in members:
                if c not in assignment:
                    assignment[c] = f
                    followed += 1
        else:
            new_patients.append(p)
    return followed, new_patients


def _place_new_patients(assignment: dict[str, int], by_patient: Mapping[str, list[str]], new_patients: list[str],
                        sites: Mapping[str, str], k: int, seed: int) -> list[int]:
    """New patients, largest first, into the fold with fewest exams of their site, then fewest overall; fold sizes."""
    size = [0] * k
    site_size: dict[str, list[int]] = {}
    for c, f in assignment.items():
        size[f] += 1
        site_size.setdefault(sites[c], [0] * k)[f] += 1
    new_patients.sort(key=lambda p: (-len(by_patient[p]), _tiebreak(seed, p)))
    for p in new_patients:
        members = by_patient[p]
        per_site = site_size.setdefault(sites[members[0]], [0] * k)
        f = min(range(k), key=lambda i: (per_site[i], size[i], i))
        for c in members:
            assignment[c] = f
            size[f] += 1
            site_size.setdefault(sites[c], [0] * k)[f] += 1
    return size
