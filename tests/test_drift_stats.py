"""The vectorised null statistics equal the plain ones on the samples the counts stand for."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from monitoring import stats


def _expand(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.repeat(values, counts.astype(int))


def test_count_draws_are_the_two_sample_bootstrap():
    draws = list(stats.count_draws(reference_rows=50, window_rows=200, resamples=250, seed=1, block=100))
    assert [len(w) for w, _ in draws] == [100, 100, 50]
    w, r = np.concatenate([d[0] for d in draws]), np.concatenate([d[1] for d in draws])
    assert (w.sum(axis=1) == 200).all() and (r.sum(axis=1) == 50).all()  # each side at its real size
    assert abs(w.mean() - 4.0) < 0.1  # every reference row equally likely


def test_vectorised_statistics_match_scipy_row_by_row():
    rng = np.random.default_rng(0)
    values = rng.beta(8, 2, 40)
    codes = rng.integers(0, 5, 40)
    onehot = np.eye(5)[codes]
    (w, r), *_ = stats.count_draws(40, 120, 20, seed=2)
    for i in range(len(w)):
        a, b = _expand(values, w[i]), _expand(values, r[i])
        assert stats.wasserstein_rows(values, w[i : i + 1], r[i : i + 1])[0] == pytest.approx(
            wasserstein_distance(a, b), abs=1e-12
        )
        ca, cb = (
            np.bincount(_expand(codes, w[i]), minlength=5),
            np.bincount(_expand(codes, r[i]), minlength=5),
        )
        expected = jensenshannon(ca, cb, base=2)
        assert stats.js_distance_rows(w[i : i + 1] @ onehot, r[i : i + 1] @ onehot)[0] == pytest.approx(
            expected
        )
        assert stats.js_distance(ca.astype(float), cb.astype(float)) == pytest.approx(expected)


def test_upper_threshold_respects_the_floor_and_the_resolution():
    null = np.linspace(0, 1, 101)
    assert stats.upper_threshold(null, level=0.05, floor=0.0)[0] == pytest.approx(0.95)
    assert stats.upper_threshold(null, level=0.05, floor=0.99)[0] == 0.99
    # A level finer than 1/(R+1) cannot be resolved with R draws: the quantile is capped, not extrapolated.
    threshold, quantile = stats.upper_threshold(null, level=1e-6, floor=0.0)
    assert quantile == pytest.approx(1 - 1 / 102) and threshold == pytest.approx(1.0)


def test_macro_f1_and_its_interval():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    y = rng.choice(list("abcd"), 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.choice(list("abcde"), 300))
    assert stats.macro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="macro"))
    low, high = stats.bootstrap_interval(y, pred, "accuracy", 500, 0.95, seed=0)
    assert low < (y == pred).mean() < high and high - low < 0.15
