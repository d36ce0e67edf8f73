"""Metrics against hand counts and brute force; thresholds; mean +/- std."""
import itertools
import math

import numpy as np
import pytest

from dsconv import metrics


def test_counts_and_ratios():
    y = [1, 1, 1, 1, 0, 0, 0]
    s = [0.9, 0.8, 0.4, 0.7, 0.6, 0.1, 0.2]
    m = metrics.evaluate(y, s, 0.5)
    assert m["confusion"] == {"tp": 3, "fp": 1, "tn": 2, "fn": 1}
    assert m["accuracy"] == 5 / 7 and m["sensitivity"] == 3 / 4 and m["specificity"] == 2 / 3
    assert m["precision"] == 3 / 4 and m["f1"] == pytest.approx(3 / 4)
    assert m["auc"] == pytest.approx(11 / 12)


def test_auc_with_ties_against_pairs():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = np.round(rng.random(200) + 0.3 * y, 1)  # many ties
    pairs = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(s[y], s[~y])]
    assert metrics.auc(y, s) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert math.isnan(metrics.auc([1, 1], [0.2, 0.3]))


def test_thresholds():
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.9])
    t = metrics.youden_threshold(y, s)
    assert t == pytest.approx(0.5)  # between 0.4 and 0.6: J = 0.75, the maximum
    assert metrics.sensitivity_threshold(y, s, 1.0) == 0.35
    assert metrics.sensitivity_threshold(y, s, 0.75) == 0.6
    assert metrics.evaluate(y, s, metrics.sensitivity_threshold(y, s, 0.95))["sensitivity"] == 1


def test_summary_sample_std():
    runs = [{"accuracy": a} for a in (0.97, 0.975, 0.98)]
    s = metrics.summary(runs, ["accuracy"])["accuracy"]
    assert s["mean"] == pytest.approx(0.975) and s["std"] == pytest.approx(0.005)
    assert math.isnan(metrics.summary(runs[:1], ["accuracy"])["accuracy"]["std"])


def test_threshold_spread():
    # two well separated classes: every resample puts the threshold in the gap between them
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(50, bool), np.ones(50, bool)]
    s = np.r_[rng.uniform(0, 0.3, 50), rng.uniform(0.7, 1, 50)]
    low, high = metrics.threshold_spread(y, s, metrics.accuracy_threshold, n=200)
    assert s[~y].max() / 2 <= low <= high <= (1 + s[y].min()) / 2
    # overlapping classes: a wider band, containing the threshold chosen on all of them
    s = np.r_[rng.normal(0.4, 0.15, 50), rng.normal(0.6, 0.15, 50)]
    low, high = metrics.threshold_spread(y, s, metrics.accuracy_threshold, n=200)
    assert low < metrics.accuracy_threshold(y, s) < high and high - low > 0.05
    # one class only: no threshold to choose
    assert all(math.isnan(v) for v in metrics.threshold_spread(y[:50], s[:50], metrics.accuracy_threshold))
