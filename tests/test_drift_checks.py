"""The drift checks on a synthetic served model: quiet on iid windows, loud on constructed shifts."""

from __future__ import annotations

import numpy as np
import pytest
from drift_world import HELD_OUT, KNOWN, World, window

from monitoring.config import MonitorConfig
from monitoring.drift import DRIFT, INSUFFICIENT, NOT_COMPUTABLE, OK, check_drift


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=0)


@pytest.fixture(scope="module")
def ref(world):
    return world.reference(2000)  # nulls are cached on it, so every test after the first is fast


def _by_name(decision):
    return {c.name: c for c in decision.checks}


def test_iid_windows_raise_fewer_false_alarms_than_the_target(world, ref):
    """120 iid windows of 500 rows, every check on: the decision's false-alarm rate stays under 1%."""
    cfg = MonitorConfig()
    decisions = [check_drift(window(world.draw(500, seed=s), labelled=True), ref, cfg) for s in range(120)]
    statuses = [d.status for d in decisions]
    assert set(statuses) <= {OK, DRIFT}
    false_alarms = [d.reason for d in decisions if d.status == DRIFT]
    assert len(false_alarms) / len(decisions) <= cfg.calibration.false_alarm_rate, false_alarms
    # Every check judged (none hid behind insufficient_data or not_computable).
    assert all(c.status in (OK, DRIFT) for d in decisions for c in d.checks)


def test_false_alarms_do_not_grow_with_the_window(world, ref):
    """The p-value failure: a large window makes every test fire. Calibrated thresholds shrink instead."""
    cfg = MonitorConfig()
    small = check_drift(window(world.draw(300, seed=900)), ref, cfg)
    large = check_drift(window(world.draw(5000, seed=901)), ref, cfg)
    assert small.status == OK and large.status == OK, (small.reason, large.reason)
    assert _by_name(large)["prediction"].threshold < _by_name(small)["prediction"].threshold


def test_held_out_intents_are_detected_by_several_checks(world, ref):
    cfg = MonitorConfig()
    detected = 0
    for s in range(10):
        d = check_drift(window(world.draw(500, seed=2000 + s, intents=KNOWN[:6] + HELD_OUT)), ref, cfg)
        detected += d.status == DRIFT
        fired = {c.name for c in d.fired}
        assert {"embedding", "confidence", "estimated_accuracy"} <= fired, d.reason
    assert detected == 10


def test_vocabulary_shift_is_detected_on_the_text(world, ref):
    d = check_drift(window(world.draw(500, seed=3000, vocabulary_shift=1.0)), ref, MonitorConfig())
    checks = _by_name(d)
    assert d.status == DRIFT and checks["text_content"].drifted, d.reason


def test_texts_never_seen_in_training_are_counted_against_the_reference(world):
    """Production that repeats training tickets 80% of the time, then stops repeating them."""
    import dataclasses

    from monitoring.reference import fingerprint, seen_in

    def repeating(frame, seed):
        rng = np.random.default_rng(seed)
        texts = frame["text"].to_numpy(dtype=object)
        repeat = rng.random(len(frame)) < 0.8
        texts[repeat] = rng.choice(world.train_texts.to_numpy(), repeat.sum())
        return frame.assign(text=texts)

    base = world.reference(2000)
    rows = repeating(base.rows, 1)
    rows["seen_in_training"] = seen_in(fingerprint(rows["text"]), world.train_fp)
    ref = dataclasses.replace(base, rows=rows, nulls={})
    cfg = MonitorConfig()
    same = _by_name(check_drift(window(repeating(world.draw(400, seed=3100), 2)), ref, cfg))["unseen_texts"]
    novel = _by_name(check_drift(window(world.draw(400, seed=3101)), ref, cfg))["unseen_texts"]
    assert same.status == OK and novel.drifted, (same.reason, novel.reason)
    assert novel.details["reference_mean"] < 0.3 and novel.details["window_mean"] > 0.9


def test_label_mix_shift_is_detected_on_the_predictions(world, ref):
    weights = {intent: (20.0 if intent == KNOWN[0] else 1.0) for intent in KNOWN}
    d = check_drift(window(world.draw(500, seed=4000, label_weights=weights)), ref, MonitorConfig())
    prediction = _by_name(d)["prediction"]
    assert prediction.drifted and KNOWN[0] in prediction.details["largest_changes"], prediction.reason


def test_confidence_collapse_is_detected_and_lowers_the_estimated_accuracy(world, ref):
    d = check_drift(window(world.draw(500, seed=5000, confidence_scale=0.6)), ref, MonitorConfig())
    checks = _by_name(d)
    assert checks["confidence"].drifted and checks["estimated_accuracy"].drifted
    estimate = checks["estimated_accuracy"].details
    assert estimate["estimated_accuracy"] < estimate["reference_estimate"] - 0.1


def test_concept_drift_is_seen_through_feedback_labels(world, ref):
    cfg = MonitorConfig()
    same = _by_name(check_drift(window(world.draw(400, seed=6000), labelled=True), ref, cfg))["concept"]
    assert same.status == OK and same.rows == 400
    worse = _by_name(
        check_drift(window(world.draw(400, seed=6001, accuracy_scale=0.7), labelled=True), ref, cfg)
    )
    concept = worse["concept"]
    assert concept.drifted and concept.details["labelled"] == 400
    assert concept.details["accuracy_interval"][1] < concept.details["held_out_accuracy"]
    # Nothing else moved (same inputs, same confidences): only the labels show it.
    assert not worse["embedding"].drifted and not worse["text_content"].drifted


def test_feedback_labels_the_version_never_saw_are_counted_as_errors(world, ref):
    frame = world.draw(200, seed=7000, intents=KNOWN + HELD_OUT[:1])
    concept = _by_name(check_drift(window(frame, labelled=True), ref, MonitorConfig()))["concept"]
    assert concept.details["unseen_true_labels"] == [HELD_OUT[0]] and HELD_OUT[0] in concept.reason


def test_few_labels_are_reported_and_never_judged(world, ref):
    frame = world.draw(300, seed=7100)
    frame.loc[frame.index[10:], "label"] = None  # only 10 labels arrived
    concept = _by_name(check_drift(window(frame, labelled=True), ref, MonitorConfig()))["concept"]
    assert (
        concept.status == INSUFFICIENT
        and concept.details["labelled"] == 10
        and "10 labelled rows" in concept.reason
    )


@pytest.mark.parametrize("rows", [0, 1, 20])
def test_tiny_windows_are_insufficient_data_never_a_verdict(world, ref, rows):
    d = check_drift(
        window(world.draw(max(rows, 1), seed=8000).head(rows), labelled=True), ref, MonitorConfig()
    )
    assert d.status == INSUFFICIENT and not d.fired
    assert all(c.status == INSUFFICIENT for c in d.checks), [(c.name, c.status) for c in d.checks]
    assert "fewer than" in d.checks[0].reason


def test_a_constant_window_gives_a_verdict_without_crashing(world, ref):
    frame = world.draw(300, seed=8100)
    frame = frame.assign(pred_label=KNOWN[0], confidence=np.float32(0.99), tokens=7, text="where is my order")
    d = check_drift(window(frame), ref, MonitorConfig())
    checks = _by_name(d)
    assert d.status == DRIFT and checks["prediction"].drifted
    # One repeated text gives Evidently's vectorizer no vocabulary: that check says so instead of crashing.
    assert checks["text_content"].status in (DRIFT, NOT_COMPUTABLE)
    assert all(np.isfinite(c.value) for c in d.checks if c.value is not None)


def test_a_stop_word_window_is_text_drift_and_no_vocabulary_at_all_is_not_computable(world, ref):
    import dataclasses

    frame = world.draw(300, seed=8200).assign(text="the and of it is")
    text = _by_name(check_drift(window(frame), ref, MonitorConfig()))["text_content"]
    assert text.drifted  # against real tickets, a window of stop words is as drifted as text gets
    # When neither side has a word left after Evidently's stop-word filter, its vectorizer raises.
    empty = dataclasses.replace(ref, rows=ref.rows.assign(text="it is the"), nulls={})
    d = check_drift(window(frame), empty, MonitorConfig())
    text = _by_name(d)["text_content"]
    assert text.status == NOT_COMPUTABLE and not text.drifted and "vocabulary" in text.reason
    assert d.status in (OK, DRIFT)  # the other checks still judged


def test_every_check_reports_statistic_threshold_and_rows(world, ref):
    d = check_drift(
        window(world.draw(500, seed=8300), labelled=True), ref, MonitorConfig(), model="m", version="3"
    )
    data = d.to_dict()
    assert data["status"] == OK and data["model"] == "m" and data["version"] == "3" and data["rows"] == 500
    names = [c["name"] for c in data["checks"]]
    assert names == [
        "prediction", "confidence", "estimated_accuracy", "embedding", "text_content", "text_length",
        "unknown_tokens", "unseen_texts", "concept",
    ]  # fmt: skip
    for c in data["checks"]:
        assert {"name", "statistic", "value", "threshold", "drifted", "rows", "status", "reason"} <= set(c)
        assert c["value"] is not None and c["threshold"] is not None and c["rows"] > 0, c
        assert c["reason"].startswith(c["name"] + ":") and c["reason"].endswith(".")


def test_thresholds_never_fall_below_their_floor(world, ref):
    cfg = MonitorConfig()
    d = check_drift(window(world.draw(5000, seed=8400)), ref, cfg)
    for c in d.checks:
        floor = getattr(cfg.checks, c.name).floor if c.name != "concept" else None
        if floor is not None:
            assert c.threshold >= floor, (c.name, c.threshold, floor)


def test_a_disabled_check_is_left_out_and_its_budget_goes_to_the_others(world, ref):
    cfg = MonitorConfig.model_validate(
        {"checks": {"embedding": {"enabled": False, "min_rows": 100, "floor": 0.0}}}
    )
    d = check_drift(window(world.draw(300, seed=8500)), ref, cfg)
    assert "embedding" not in _by_name(d)
    assert d.window["level_per_check"] == pytest.approx(0.01 / 7)
