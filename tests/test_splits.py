"""Patient-grouped, site-stratified splits."""

from __future__ import annotations

from collections import Counter

from orthodiff_nnunet.data.splits import patient_grouped_splits


def test_grouped_and_stratified():
    cases = [f"c{i:02d}" for i in range(30)]
    patients = {c: f"p{i // 2}" for i, c in enumerate(cases)}  # two exams per patient
    sites = {c: ("A" if i < 20 else "B") for i, c in enumerate(cases)}
    folds = patient_grouped_splits(cases, patients, sites, num_folds=5)
    assert len(folds) == 5
    assert sorted(c for f in folds for c in f["val"]) == sorted(cases)
    for f in folds:
        val_patients = {patients[c] for c in f["val"]}
        assert not val_patients & {patients[c] for c in f["train"]}
        # site B (10 exams, 5 patients) contributes one patient (2 exams) to every fold
        assert Counter(sites[c] for c in f["val"])["B"] == 2


def test_sites_too_small_to_stratify_fall_back_to_grouping():
    cases = ["a", "b", "c"]
    folds = patient_grouped_splits(cases, {"a": "p1", "b": "p2", "c": "p2"}, {"a": "S1", "b": "S2", "c": "S2"}, 5)
    assert len(folds) == 2  # 2 patients -> 2 folds
    assert sorted(map(tuple, (f["val"] for f in folds))) == [("a",), ("b", "c")]


def test_single_patient_has_no_split():
    assert patient_grouped_splits(["a", "b"], {"a": "p", "b": "p"}, {"a": "S", "b": "S"}) == []


def test_deterministic():
    cases = [f"c{i}" for i in range(12)]
    pats = {c: c for c in cases}
    sites = {c: "S" for c in cases}
    assert patient_grouped_splits(cases, pats, sites) == patient_grouped_splits(list(reversed(cases)), pats, sites)


def test_label_fraction_subset_stratified_and_deterministic():
    from orthodiff_nnunet.data.splits import label_fraction_subset

    cases = [f"c{i:03d}" for i in range(100)]
    sites = {c: ("A" if i < 70 else "B") for i, c in enumerate(cases)}
    sub = label_fraction_subset(cases, sites, 0.1)
    assert len(sub) == 10 and sum(sites[c] == "B" for c in sub) == 3
    assert sub == label_fraction_subset(list(reversed(cases)), sites, 0.1)
    assert sub != label_fraction_subset(cases, sites, 0.1, seed=1)
    assert set(label_fraction_subset(cases, sites, 0.1)) <= set(cases)
    tiny = label_fraction_subset(cases[:3], {c: "A" for c in cases[:3]}, 0.1)
    assert len(tiny) == 1  # at least one case per site
    assert label_fraction_subset(cases, sites, 1.0) == cases
