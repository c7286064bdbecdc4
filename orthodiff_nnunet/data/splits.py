"""Cross-validation splits grouped by patient and stratified by site."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

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
