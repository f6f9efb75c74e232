"""`check_drift`: is what the served version sees now still what it was validated on?

A window (rows of the inference log, or a file scored by the served version) is compared with the
version's reference, check by check. Each check has its statistic, a threshold calibrated on the
reference for a window of this size (`monitoring.stats`), never below its effect-size floor, and a minimum
window below which it answers `insufficient_data` instead of a verdict. The decision is `drift` when any
check fired, `ok` when at least one check could judge and none fired, else `insufficient_data`.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from monitoring import stats
from monitoring.config import MonitorConfig
from monitoring.reference import Reference, fingerprint, seen_in

if TYPE_CHECKING:
    import pandas as pd

OK, DRIFT, INSUFFICIENT, NOT_COMPUTABLE = "ok", "drift", "insufficient_data", "not_computable"
# The checks whose thresholds share the false-alarm budget (concept drift has its own interval).
CALIBRATED = (
    "prediction",
    "confidence",
    "estimated_accuracy",
    "embedding",
    "text_content",
    "text_length",
    "unknown_tokens",
    "unseen_texts",
)


@dataclass
class CheckResult:
    name: str
    statistic: str
    value: float | None
    threshold: float | None
    drifted: bool
    rows: int
    status: str  # ok | drift | insufficient_data | not_computable
    reason: str  # one sentence
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class DriftDecision:
    status: str  # ok | drift | insufficient_data
    model: str
    version: str
    rows: int  # rows in the window (before any sampling)
    checks: list[CheckResult]
    window: dict[str, Any] = field(default_factory=dict)  # how the window was chosen, its bounds, sampling
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def fired(self) -> list[CheckResult]:
        return [c for c in self.checks if c.drifted]

    @property
    def reason(self) -> str:
        if self.status == DRIFT:
            return " ".join(c.reason for c in self.fired)
        if self.status == INSUFFICIENT:
            return f"no check had enough rows to judge ({self.rows} in the window)."
        judged = sum(c.status == OK for c in self.checks)
        return f"{judged} checks judged the window and none found drift."

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reason"] = self.reason
        return out


@dataclass
class Window:
    """What the checks read of a window; arrays are aligned row by row, samples are index subsets."""

    pred_labels: np.ndarray  # every row
    confidence: np.ndarray  # every row
    texts: np.ndarray  # every row
    true_labels: np.ndarray | None  # every row, None where no label arrived (object array)
    tokens: np.ndarray | None = None  # the descriptor sample
    unk_share: np.ndarray | None = None
    fingerprints: np.ndarray | None = None
    embeddings: np.ndarray | None = None  # the embedding sample
    sample_index: np.ndarray | None = None  # rows of the descriptor sample
    sampled_from: int = 0


def window_from_frame(frame: pd.DataFrame) -> Window:
    """Read a window's core columns: `text`, `label` (predicted), `score` (top probability), `true_label`."""
    true = frame["true_label"].to_numpy(dtype=object) if "true_label" in frame else None
    return Window(
        pred_labels=frame["label"].astype(str).to_numpy(),
        confidence=frame["score"].astype(np.float64).to_numpy(),
        texts=frame["text"].astype(str).to_numpy(),
        true_labels=true,
        sampled_from=len(frame),
    )


def describe_window(window: Window, model, cfg: MonitorConfig, seed: int = 0) -> Window:
    """Add token descriptors (on a bounded sample) and the encoder's embeddings (on a smaller one)."""
    rng = np.random.default_rng(seed)
    n = len(window.texts)
    sample = _sample(n, cfg.calibration.max_window_rows, rng)
    texts = list(window.texts[sample])
    enc = model.tokenizer(texts, truncation=True, max_length=model.max_tokens)
    unk = model.tokenizer.unk_token_id
    lengths = np.array([len(ids) for ids in enc["input_ids"]], dtype=np.int64)
    unks = np.array([sum(t == unk for t in ids) for ids in enc["input_ids"]], dtype=np.float64)
    window.sample_index = sample
    window.tokens = lengths
    window.unk_share = (unks / np.maximum(lengths - 2, 1)).astype(np.float32)
    window.fingerprints = fingerprint(texts)
    embed = cfg.checks.embedding
    if window.embeddings is None and embed.enabled and n >= embed.min_rows:  # a scored file has them
        pick = _sample(n, embed.sample_rows, rng)
        window.embeddings = model.describe(list(window.texts[pick]))["embeddings"]
    return window


def _sample(n: int, limit: int, rng) -> np.ndarray:
    return np.arange(n) if n <= limit else np.sort(rng.choice(n, limit, replace=False))


def check_drift(
    window: Window, ref: Reference, cfg: MonitorConfig, model: str = "", version: str = "", **about: Any
) -> DriftDecision:
    """Every enabled check on `window` against `ref`; `about` goes into the decision's window record."""
    checks = cfg.checks
    enabled = [name for name in CALIBRATED if getattr(checks, name).enabled]
    level = cfg.calibration.false_alarm_rate / max(1, len(enabled))
    results = []
    for name in enabled:
        results.append(CHECKS[name](window, ref, cfg, getattr(checks, name), level))
    if checks.concept.enabled:
        results.append(_concept(window, ref, cfg))
    status = overall_status(results)
    info = {"false_alarm_rate": cfg.calibration.false_alarm_rate, "level_per_check": level, **about}
    rows = max(window.sampled_from, len(window.texts))  # the window's rows, before any sampling
    return DriftDecision(status, model, str(version), rows, results, info)


# --- the checks ---------------------------------------------------------------------------------------------


def overall_status(results: list[CheckResult]) -> str:
    """`drift` if any check fired, `ok` if one judged and none fired, else `insufficient_data`."""
    if any(r.drifted for r in results):
        return DRIFT
    return OK if any(r.status == OK for r in results) else INSUFFICIENT


def _too_few(name: str, statistic: str, rows: int, needed: int, what: str = "rows") -> CheckResult:
    return CheckResult(
        name, statistic, None, None, False, rows, INSUFFICIENT,
        f"{name}: {rows} {what} in the window, fewer than the {needed} it needs for a verdict.",
    )  # fmt: skip


def _verdict(
    name: str, statistic: str, value: float, threshold: float, rows: int, what: str, details: dict[str, Any]
) -> CheckResult:
    drifted = bool(value > threshold)
    verb = "above" if drifted else "within"
    reason = f"{name}: {what} {value:.4g} is {verb} its calibrated threshold {threshold:.4g} ({rows} rows)."
    return CheckResult(
        name, statistic, value, threshold, drifted, rows, DRIFT if drifted else OK, reason, details
    )


def _calibrated(
    ref: Reference, name: str, statistic_fn, ref_rows: int, n: int, ref_size: int, cfg: MonitorConfig,
    floor: float, level: float, resamples: int | None = None,
) -> tuple[float, dict[str, Any]]:  # fmt: skip
    size = min(n, cfg.calibration.max_window_rows)
    resamples = resamples or cfg.calibration.resamples
    key = (name, size, ref_rows, ref_size, resamples, cfg.calibration.seed)
    null = ref.nulls.get(key)
    if null is None:
        null = stats.calibrate(statistic_fn, ref_rows, size, ref_size, resamples, cfg.calibration.seed)
        ref.nulls[key] = null
    return _threshold(null, size, floor, level)


def _threshold(null: np.ndarray, size: int, floor: float, level: float) -> tuple[float, dict[str, Any]]:
    """The threshold from a null, and how it was found (for the decision's details)."""
    threshold, quantile = stats.upper_threshold(null, level, floor)
    return threshold, {
        "null_quantile": quantile,
        "null_max": float(np.nanmax(null)) if null.size else None,
        "null_windows": int(null.size),
        "calibrated_rows": size,
        "floor": floor,
    }


def _calibrated_counts(
    ref: Reference, name: str, null_fn, n: int, cfg: MonitorConfig, floor: float, level: float
) -> tuple[float, dict[str, Any]]:
    """Like `_calibrated`, for statistics of the two empirical distributions: `null_fn(w_counts, r_counts)`
    gets blocks of the two-sample bootstrap as count matrices over the reference rows (stats.count_draws)."""
    size = min(n, cfg.calibration.max_window_rows)
    m, resamples, seed = len(ref), cfg.calibration.resamples, cfg.calibration.seed
    key = (name, "counts", size, m, resamples, seed)
    null = ref.nulls.get(key)
    if null is None:
        null = np.concatenate([null_fn(w, r) for w, r in stats.count_draws(m, size, resamples, seed)])
        ref.nulls[key] = null
    return _threshold(null, size, floor, level)


def _prediction(window: Window, ref: Reference, cfg: MonitorConfig, check, level: float) -> CheckResult:
    name, statistic, n = "prediction", "jensen_shannon", len(window.pred_labels)
    if n < check.min_rows:
        return _too_few(name, statistic, n, check.min_rows)
    order = ref.labels
    ref_codes = _codes(ref.rows["pred_label"].to_numpy(), order)
    ref_counts = np.bincount(ref_codes, minlength=len(order) + 1).astype(float)
    counts = stats.label_counts(window.pred_labels, order)
    value = stats.js_distance(counts, ref_counts)
    k = len(order) + 1

    onehot = np.zeros((len(ref_codes), k))
    onehot[np.arange(len(ref_codes)), ref_codes] = 1.0
    threshold, details = _calibrated_counts(
        ref, name, lambda w, r: stats.js_distance_rows(w @ onehot, r @ onehot), n, cfg, check.floor, level
    )
    unseen = int(counts[-1])
    details["unseen_labels"] = unseen
    window_share = counts[:-1] / max(1, n)
    ref_share = ref_counts[:-1] / max(1, ref_counts.sum())
    moved = np.argsort(-np.abs(window_share - ref_share))[:3]
    details["largest_changes"] = {order[i]: [round(float(ref_share[i]), 4), round(float(window_share[i]), 4)]
                                  for i in moved}  # fmt: skip
    result = _verdict(name, statistic, value, threshold, n, "the predicted-label mix's JS distance", details)
    if unseen:
        result.reason += f" {unseen} predictions carry labels this version does not know."
    return result


def _codes(labels: np.ndarray, order: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(order)}
    return np.fromiter((index.get(label, len(order)) for label in labels), dtype=np.int64, count=len(labels))


def _confidence(window: Window, ref: Reference, cfg: MonitorConfig, check, level: float) -> CheckResult:
    name, statistic = "confidence", "wasserstein_normed"
    values = window.confidence[np.isfinite(window.confidence)]
    n = len(values)
    if n < check.min_rows:
        return _too_few(name, statistic, n, check.min_rows, "rows with a confidence")
    ref_conf = ref.rows["confidence"].to_numpy(dtype=np.float64)
    scale = float(np.std(ref_conf))
    value = stats.normed_wasserstein(values, ref_conf, scale)
    threshold, details = _calibrated_counts(
        ref, name, lambda w, r: stats.wasserstein_rows(ref_conf, w, r) / max(scale, 1e-3), n, cfg,
        check.floor, level,
    )  # fmt: skip
    details.update(
        window_mean=float(values.mean()), reference_mean=float(ref_conf.mean()), reference_std=scale
    )
    return _verdict(name, statistic, value, threshold, n, "the top probability's normed Wasserstein distance",
                    details)  # fmt: skip


def _estimated_accuracy(
    window: Window, ref: Reference, cfg: MonitorConfig, check, level: float
) -> CheckResult:
    name, statistic = "estimated_accuracy", "expected_accuracy_drop"
    values = window.confidence[np.isfinite(window.confidence)]
    n = len(values)
    if n < check.min_rows:
        return _too_few(name, statistic, n, check.min_rows, "rows with a confidence")
    ref_conf = ref.rows["confidence"].to_numpy(dtype=np.float64)
    correct = (ref.rows["label"] == ref.rows["pred_label"]).to_numpy()
    iso = stats.fit_confidence_calibration(ref_conf, correct)
    ref_expected = iso.predict(ref_conf)
    baseline = float(ref_expected.mean())
    estimate = float(iso.predict(values).mean())
    threshold, details = _calibrated_counts(
        ref, name, lambda w, r: r @ ref_expected / r.sum(1) - w @ ref_expected / w.sum(1), n, cfg,
        check.floor, level,
    )  # fmt: skip
    details.update(
        estimated_accuracy=estimate,
        reference_estimate=baseline,
        reference_accuracy=float(correct.mean()),
        band=[baseline - threshold, 1.0],
    )
    result = _verdict(
        name, statistic, baseline - estimate, threshold, n, "the estimated accuracy's drop", details
    )
    result.reason += f" Estimated accuracy {estimate:.3f} against {baseline:.3f} on held-out rows."
    return result


def _embedding(window: Window, ref: Reference, cfg: MonitorConfig, check, level: float) -> CheckResult:
    name, statistic = "embedding", "mmd2_rbf"
    n = len(window.texts)
    if n < check.min_rows:
        return _too_few(name, statistic, n, check.min_rows)
    if window.embeddings is None or len(window.embeddings) < 2:
        return CheckResult(name, statistic, None, None, False, n, NOT_COMPUTABLE,
                           f"{name}: the window's texts were not embedded by the encoder.")  # fmt: skip
    rng = np.random.default_rng(cfg.calibration.seed)
    ref_emb = ref.embeddings
    if len(ref_emb) > 2 * check.sample_rows:  # bound the kernel: 2x the per-side sample is enough
        ref_emb = ref_emb[np.sort(rng.choice(len(ref_emb), 2 * check.sample_rows, replace=False))]
    cur = window.embeddings
    if len(cur) > check.sample_rows:
        cur = cur[np.sort(rng.choice(len(cur), check.sample_rows, replace=False))]
    side = min(len(ref_emb), check.sample_rows)
    bandwidth = stats.median_bandwidth(ref_emb, seed=cfg.calibration.seed)
    k_rr = stats.rbf_kernel(ref_emb, ref_emb, bandwidth)
    ref_pick = np.sort(rng.choice(len(ref_emb), side, replace=False))
    value = stats.mmd2(
        stats.rbf_kernel(cur, cur, bandwidth), k_rr[np.ix_(ref_pick, ref_pick)],
        stats.rbf_kernel(cur, ref_emb[ref_pick], bandwidth),
    )  # fmt: skip

    def null(w, r):
        return stats.mmd2(k_rr[np.ix_(w, w)], k_rr[np.ix_(r, r)], k_rr[np.ix_(w, r)])

    threshold, details = _calibrated(
        ref, name, null, len(ref_emb), len(cur), side, cfg, check.floor, level,
        cfg.calibration.embedding_resamples,
    )  # fmt: skip
    details.update(window_sample=len(cur), reference_sample=side, bandwidth=bandwidth)
    return _verdict(name, statistic, value, threshold, len(cur), "the encoder embeddings' MMD^2", details)


def _text_content(window: Window, ref: Reference, cfg: MonitorConfig, check, level: float) -> CheckResult:
    """Evidently's domain classifier; its held-out AUC has the Mann-Whitney null, so no resampling."""
    import pandas as pd
    from scipy.stats import norm

    name, statistic = "text_content", "domain_classifier_roc_auc"
    n = len(window.texts)
    if n < check.min_rows:
        return _too_few(name, statistic, n, check.min_rows)
    from evidently.legacy.utils.data_drift_utils import calculate_text_drift_score
    from sklearn.exceptions import ConvergenceWarning

    rng = np.random.default_rng(cfg.calibration.seed)
    cur = window.texts[_sample(n, check.sample_rows, rng)]
    ref_texts = ref.rows["text"].to_numpy()
    ref_texts = ref_texts[_sample(len(ref_texts), check.sample_rows, rng)]
    try:
        with warnings.catch_warnings():
            # Evidently fixes SGDClassifier(max_iter=50), which often stops before sklearn's tolerance; the
            # AUC is what we read, and no Evidently issue tracks this yet.
            warnings.simplefilter("ignore", ConvergenceWarning)
            value, _ = calculate_text_drift_score(
                pd.Series(ref_texts), pd.Series(cur), bootstrap=False, threshold=check.floor
            )
    except ValueError as err:  # sklearn's vectorizer: a tiny, stop-word-only or templated vocabulary
        return CheckResult(
            name, statistic, None, None, False, n, NOT_COMPUTABLE,
            f"{name}: Evidently's text classifier cannot run on this window's vocabulary ({err}).",
        )  # fmt: skip
    sd = stats.auc_null_sd(max(1, len(cur) // 2), max(1, len(ref_texts) // 2))
    threshold = max(check.floor, 0.5 + float(norm.ppf(1 - level)) * sd)
    details = {
        "window_sample": len(cur),
        "reference_sample": len(ref_texts),
        "null_sd": sd,
        "floor": check.floor,
    }
    return _verdict(
        name, statistic, float(value), threshold, len(cur), "the domain classifier's ROC AUC", details
    )


def _mean_rise(
    ref: Reference, name: str, statistic: str, what: str, cur: np.ndarray | None,
    ref_values: np.ndarray | None, cfg: MonitorConfig, check, level: float, missing: str,
) -> CheckResult:  # fmt: skip
    if cur is None or ref_values is None:
        return CheckResult(name, statistic, None, None, False, 0, NOT_COMPUTABLE, f"{name}: {missing}")
    n = len(cur)
    if n < check.min_rows:
        return _too_few(name, statistic, n, check.min_rows)
    ref_values = ref_values.astype(np.float64)
    value = float(cur.mean() - ref_values.mean())
    threshold, details = _calibrated_counts(
        ref, name, lambda w, r: w @ ref_values / w.sum(1) - r @ ref_values / r.sum(1), n, cfg,
        check.floor, level,
    )  # fmt: skip
    details.update(window_mean=float(cur.mean()), reference_mean=float(ref_values.mean()))
    return _verdict(name, statistic, value, threshold, n, what, details)


def _text_length(window: Window, ref: Reference, cfg: MonitorConfig, check, level: float) -> CheckResult:
    name, statistic = "text_length", "wasserstein_normed"
    if window.tokens is None:
        return CheckResult(name, statistic, None, None, False, 0, NOT_COMPUTABLE,
                           f"{name}: the window's texts were not tokenised.")  # fmt: skip
    n = len(window.tokens)
    if n < check.min_rows:
        return _too_few(name, statistic, n, check.min_rows)
    ref_tokens = ref.rows["tokens"].to_numpy(dtype=np.float64)
    scale = float(np.std(ref_tokens))
    cur = window.tokens.astype(np.float64)
    value = stats.normed_wasserstein(cur, ref_tokens, scale)
    threshold, details = _calibrated_counts(
        ref, name, lambda w, r: stats.wasserstein_rows(ref_tokens, w, r) / max(scale, 1e-3), n, cfg,
        check.floor, level,
    )  # fmt: skip
    details.update(window_mean=float(cur.mean()), reference_mean=float(ref_tokens.mean()))
    return _verdict(
        name, statistic, value, threshold, n, "the token count's normed Wasserstein distance", details
    )


def _unknown_tokens(window: Window, ref: Reference, cfg: MonitorConfig, check, level: float) -> CheckResult:
    return _mean_rise(
        ref, "unknown_tokens", "mean_unk_share_rise", "the rise in the share of [UNK] tokens",
        window.unk_share,
        ref.rows["unk_share"].to_numpy(), cfg, check, level, "the window's texts were not tokenised.",
    )  # fmt: skip


def _unseen_texts(window: Window, ref: Reference, cfg: MonitorConfig, check, level: float) -> CheckResult:
    seen = seen_in(window.fingerprints, ref.train_fingerprints) if window.fingerprints is not None else None
    unseen = None if seen is None else (~seen).astype(np.float64)
    ref_unseen = (
        None if ref.train_fingerprints is None else (~ref.rows["seen_in_training"].to_numpy()).astype(float)
    )
    return _mean_rise(
        ref, "unseen_texts", "unseen_share_rise", "the rise in the share of texts never seen in training",
        unseen, ref_unseen, cfg, check, level,
        "the reference holds no fingerprints of the training texts (rebuild it with the training data).",
    )  # fmt: skip


def _concept(window: Window, ref: Reference, cfg: MonitorConfig) -> CheckResult:
    """Accuracy and macro-F1 of the labelled rows, with a bootstrap interval, against the held-out figures."""
    check = cfg.checks.concept
    name, statistic = "concept", "labelled_accuracy"
    if window.true_labels is None:
        labelled = np.zeros(len(window.pred_labels), dtype=bool)
    else:
        labelled = np.array([isinstance(t, str) and t != "" for t in window.true_labels], dtype=bool)
    n = int(labelled.sum())
    if n < check.min_labels:
        result = _too_few(name, statistic, n, check.min_labels, "labelled rows")
        result.details["labelled"] = n
        return result
    y_true = window.true_labels[labelled].astype(str)
    y_pred = window.pred_labels[labelled].astype(str)
    ref_true, ref_pred = (
        ref.rows["label"].to_numpy().astype(str),
        ref.rows["pred_label"].to_numpy().astype(str),
    )
    held_acc = float((ref_true == ref_pred).mean())
    held_f1 = stats.macro_f1(ref_true, ref_pred)
    acc = float((y_true == y_pred).mean())
    f1 = stats.macro_f1(y_true, y_pred)
    seed = cfg.calibration.seed
    acc_ci = stats.bootstrap_interval(y_true, y_pred, "accuracy", check.resamples, check.confidence, seed)
    f1_ci = stats.bootstrap_interval(y_true, y_pred, "macro_f1", check.resamples, check.confidence, seed)
    unseen = sorted(set(y_true) - set(ref.labels))
    acc_drift = acc_ci[1] < held_acc - check.margin
    f1_drift = f1_ci[1] < held_f1 - check.margin
    drifted = bool(acc_drift or f1_drift)
    pct = f"{check.confidence:.0%}"
    reason = (
        f"{name}: on {n} labelled rows accuracy is {acc:.3f} ({pct} interval "
        f"{acc_ci[0]:.3f}-{acc_ci[1]:.3f}) and macro-F1 {f1:.3f} ({f1_ci[0]:.3f}-{f1_ci[1]:.3f}) against "
        f"{held_acc:.3f} and {held_f1:.3f} held out"
        + ("; the interval lies below the held-out figure, so the model has got worse." if drifted else ".")
    )
    if unseen:
        reason += f" {len(unseen)} true labels are unknown to this version: {', '.join(unseen[:5])}."
    details = {
        "labelled": n, "accuracy": acc, "accuracy_interval": list(acc_ci), "macro_f1": f1,
        "macro_f1_interval": list(f1_ci), "held_out_accuracy": held_acc, "held_out_macro_f1": held_f1,
        "margin": check.margin, "unseen_true_labels": unseen,
    }  # fmt: skip
    return CheckResult(name, statistic, acc, held_acc - check.margin, drifted, n, DRIFT if drifted else OK,
                       reason, details)  # fmt: skip


CHECKS = {
    "prediction": _prediction,
    "confidence": _confidence,
    "estimated_accuracy": _estimated_accuracy,
    "embedding": _embedding,
    "text_content": _text_content,
    "text_length": _text_length,
    "unknown_tokens": _unknown_tokens,
    "unseen_texts": _unseen_texts,
}
