"""The reliability bins are scikit-learn's: same fractions, same mean probabilities, and counts that add up."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from orthodiff_nnunet.evaluation.report import calibration


def test_bins_are_sklearns_and_the_ece_weights_them_by_size():
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.uniform(0, 1, 300), [0.0, 0.1, 0.2, 0.5, 1.0]])  # inner edges go to the lower bin
    y = (rng.uniform(0, 1, p.size) < p).astype(float)
    cal = calibration(y, p, n_bins=10)
    fraction, mean_prob = calibration_curve(y, p, n_bins=10)
    assert [b["fraction_positive"] for b in cal["bins"]] == pytest.approx(list(fraction))
    assert [b["mean_probability"] for b in cal["bins"]] == pytest.approx(list(mean_prob))
    assert sum(b["n"] for b in cal["bins"]) == p.size == cal["n"]
    # each bin's mean probability lies inside its own edges, so the counts belong to the bins they are shown with
    assert all(b["low"] <= b["mean_probability"] <= b["high"] for b in cal["bins"])
    first = cal["bins"][0]
    assert first["n"] == int(np.sum(p <= 0.1)) and (first["low"], first["high"]) == (0.0, 0.1)
    direct = sum(b["n"] / p.size * abs(b["fraction_positive"] - b["mean_probability"]) for b in cal["bins"])
    assert cal["ece"] == pytest.approx(direct) and 0 < cal["ece"] < 0.15


def test_no_known_label_is_undefined_not_a_crash():
    cal = calibration(np.array([np.nan, np.nan]), np.array([0.2, 0.7]))
    assert cal["n"] == 0 and cal["bins"] == [] and math.isnan(cal["ece"])
