"""Drift statistics and their calibration: plain numpy/scipy functions, no Evidently, no I/O.

Every statistic compares a window with the version's reference (held-out rows). Thresholds are not
p-values: each is the upper quantile of the same statistic over many windows of the same size drawn from
the reference itself (the null: "nothing changed"), never below an effect-size floor. See `null_draws`
for how windows are drawn when the reference is smaller than a window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

UNSEEN = "<unseen>"  # the bucket for labels outside the version's label set


# --- statistics ---------------------------------------------------------------------------------------------


def label_counts(labels, order: list[str]) -> np.ndarray:
    """Counts per label in `order`, plus a last bucket for labels the version does not know."""
    index = {label: i for i, label in enumerate(order)}
    codes = np.fromiter((index.get(label, len(order)) for label in labels), dtype=np.int64)
    return np.bincount(codes, minlength=len(order) + 1).astype(np.float64)


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two count or probability vectors."""
    p = p / max(p.sum(), 1e-12)
    q = q / max(q.sum(), 1e-12)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    return float(np.sqrt(max(0.0, (kl_p + kl_q) / 2)))


def wasserstein(x: np.ndarray, y: np.ndarray) -> float:
    """1-D Wasserstein distance between two samples (scipy's definition, computed on sorted values)."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(x, y))


def normed_wasserstein(x: np.ndarray, ref: np.ndarray, scale: float) -> float:
    """Wasserstein distance in units of the reference's spread (`scale`, clamped away from zero)."""
    return wasserstein(x, ref) / max(scale, 1e-3)


def rbf_kernel(a: np.ndarray, b: np.ndarray, bandwidth: float) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.exp(-np.maximum(sq, 0.0) / (2.0 * bandwidth**2))


def median_bandwidth(x: np.ndarray, max_rows: int = 1000, seed: int = 0) -> float:
    """The median pairwise distance of (a sample of) `x`: the usual RBF bandwidth heuristic."""
    rng = np.random.default_rng(seed)
    if len(x) > max_rows:
        x = x[rng.choice(len(x), max_rows, replace=False)]
    sq = (x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2.0 * x @ x.T
    upper = np.sqrt(np.maximum(sq[np.triu_indices(len(x), k=1)], 0.0))
    return float(np.median(upper)) if upper.size and np.median(upper) > 0 else 1.0


def mmd2(k_aa: np.ndarray, k_bb: np.ndarray, k_ab: np.ndarray) -> float:
    """Unbiased squared maximum mean discrepancy from the three kernel blocks."""
    n, m = len(k_aa), len(k_bb)
    if n < 2 or m < 2:
        return float("nan")
    within_a = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within_a + within_b - 2.0 * k_ab.mean())


def auc_null_sd(n_pos: int, n_neg: int) -> float:
    """Standard deviation of ROC AUC under no difference (the Mann-Whitney null), for sizes n_pos, n_neg."""
    return float(np.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg)))


# --- calibration --------------------------------------------------------------------------------------------


def null_draws(
    reference_rows: int, window_rows: int, reference_size: int, resamples: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(window indices, pseudo-reference indices) into the reference, `resamples` times.

    When the reference holds a window and a full-size reference side by side, both are drawn disjointly
    without replacement (the pseudo-reference being the rest, so never larger than the real one: the null
    comes out a little wide, i.e. conservative). When it does not (a small reference, as in the demo, or a
    window larger than the reference), both are drawn with replacement at their real sizes from the
    reference's empirical distribution: the two-sample bootstrap, which keeps the sampling noise of both
    sides.
    """
    rng = np.random.default_rng(seed)
    disjoint = reference_rows >= window_rows + reference_size
    for _ in range(resamples):
        if disjoint:
            order = rng.permutation(reference_rows)
            yield order[:window_rows], order[window_rows : window_rows + reference_size]
        else:
            yield (
                rng.integers(0, reference_rows, window_rows),
                rng.integers(0, reference_rows, reference_size),
            )


def count_draws(
    reference_rows: int, window_rows: int, resamples: int, seed: int, block: int = 100
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The two-sample bootstrap as counts: blocks of (window counts, pseudo-reference counts), each row how
    often every reference row was drawn into a window of `window_rows` and a reference of the same size as
    the real one. Any statistic that is a function of the two empirical distributions (label mixes, CDFs,
    means) is then a few matrix products per block instead of a Python loop per draw."""
    rng = np.random.default_rng(seed)
    uniform = np.full(reference_rows, 1.0 / reference_rows)
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        yield (
            rng.multinomial(window_rows, uniform, size=size).astype(np.float64),
            rng.multinomial(reference_rows, uniform, size=size).astype(np.float64),
        )


def js_distance_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon distance (base 2) between count matrices."""
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    q = q / np.maximum(q.sum(axis=1, keepdims=True), 1e-12)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=1)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=1)
    return np.sqrt(np.maximum(0.0, (kl_p + kl_q) / 2))


def wasserstein_rows(values: np.ndarray, w_counts: np.ndarray, r_counts: np.ndarray) -> np.ndarray:
    """Row-wise 1-D Wasserstein distance between two weightings of the same reference values."""
    order = np.argsort(values, kind="stable")
    dx = np.diff(values[order])
    fu = np.cumsum(w_counts[:, order], axis=1)[:, :-1] / w_counts.sum(axis=1, keepdims=True)
    fv = np.cumsum(r_counts[:, order], axis=1)[:, :-1] / r_counts.sum(axis=1, keepdims=True)
    return np.abs(fu - fv) @ dx


def upper_threshold(null: np.ndarray, level: float, floor: float) -> tuple[float, float]:
    """(threshold, the quantile actually used): the `1 - level` quantile of the null, never below `floor`.

    With R resamples no quantile beyond 1 - 1/(R+1) can be resolved; then the null's maximum is used.
    """
    null = null[np.isfinite(null)]
    if null.size == 0:
        return floor, float("nan")
    q = min(1.0 - level, 1.0 - 1.0 / (null.size + 1))
    return max(floor, float(np.quantile(null, q, method="higher"))), q


def calibrate(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    reference_rows: int,
    window_rows: int,
    reference_size: int,
    resamples: int,
    seed: int,
) -> np.ndarray:
    """The statistic on `resamples` null draws: `statistic(window_idx, reference_idx)` for each."""
    return np.array(
        [
            statistic(w, r)
            for w, r in null_draws(reference_rows, window_rows, reference_size, resamples, seed)
        ],
        dtype=np.float64,
    )


# --- label-free performance estimate (CBPE-style) -----------------------------------------------------------


def fit_confidence_calibration(confidence: np.ndarray, correct: np.ndarray):
    """Isotonic map from top probability to the chance the prediction is right, fitted on held-out rows."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
    iso.fit(confidence.astype(np.float64), correct.astype(np.float64))
    return iso


# --- labelled performance -----------------------------------------------------------------------------------


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-F1 over the classes present in either array (as sklearn's default labels)."""
    classes, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    n = len(y_true)
    return _macro_f1_codes(codes[:n], codes[n:], len(classes))


def _macro_f1_codes(t: np.ndarray, p: np.ndarray, k: int) -> float:
    if len(t) == 0:
        return float("nan")
    tp = np.bincount(t[t == p], minlength=k)
    fp = np.bincount(p, minlength=k) - tp
    fn = np.bincount(t, minlength=k) - tp
    present = (np.bincount(t, minlength=k) + np.bincount(p, minlength=k)) > 0
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    return float(f1[present].mean())


def bootstrap_interval(
    y_true: np.ndarray, y_pred: np.ndarray, metric: str, resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric` ("accuracy" or "macro_f1"), rows drawn with replacement."""
    classes, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    n, k = len(y_true), len(classes)
    t, p = codes[:n], codes[n:]
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for i in range(resamples):
        idx = rng.integers(0, n, n)
        values[i] = np.mean(t[idx] == p[idx]) if metric == "accuracy" else _macro_f1_codes(t[idx], p[idx], k)
    alpha = (1 - confidence) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))
