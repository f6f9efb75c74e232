"""The review queue: its rules, its daily budget, the unbiased sample, answers that become labels, and the
fresh holdout that takes only the unbiased share (sqlite, and PostgreSQL where marked)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from champion.errors import ChampionError
from monitoring.review import RANDOM, TARGETED, ReviewConfig, ReviewQueue, in_random_sample
from serving.inference_log import InferenceLog, PredictionRecord, encode_probs, feedback

LABELS = ("track_order", "reset_password", "card_declined", "invoice_request")
MODEL = "intents"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request, home) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{home / 'inference.db'}"
    return request.getfixturevalue("pg_url")


def _log(url, rows):
    """Write predictions: each row (request_id, score, arm, agrees, at)."""
    log = InferenceLog(url).start()
    records = []
    for rid, score, arm, agrees, at in rows:
        probs = np.array([score, (1 - score) / 3, (1 - score) / 3, (1 - score) / 3])
        records.append(PredictionRecord(rid, at, MODEL, "3", arm, f"text of {rid}", LABELS[0], score, 1.0,
                                        agrees, encode_probs(probs)))  # fmt: skip
    log.append(records)
    log.flush()
    log.close()


def _population(n, start=0, at=NOW - timedelta(hours=1)):
    """n predictions: every 10th a disagreeing canary answer, every 4th low-confidence, the rest confident."""
    rows = []
    for i in range(start, start + n):
        score = 0.3 + (i % 7) / 100 if i % 4 == 0 else 0.9
        arm, agrees = ("canary", False) if i % 10 == 0 else ("champion", None)
        rows.append((f"r{i:05d}", score, arm, agrees, at))
    return rows


def _labels(_version):
    return LABELS


def test_rules_budget_and_the_unbiased_sample(url):
    _log(url, _population(400))
    queue = ReviewQueue(url)
    cfg = ReviewConfig(daily_budget=60, random_share=0.05, random_budget_share=0.5, low_confidence=0.5)
    sel = queue.select(MODEL, cfg, now=NOW, labels=_labels)
    assert sel.considered == 400 and sum(sel.queued.values()) == 60 and sel.budget_left == 0
    # Every prediction in the hash sample is queued, whatever its score: under the reserve of 30, none cut.
    expected = {f"r{i:05d}" for i in range(400) if in_random_sample(f"r{i:05d}", 0.05) is not None}
    c = sa.table("champion_review_queue", sa.column("request_id"), sa.column("sample"),
                 sa.column("reasons"), sa.column("priority"), sa.column("score"))  # fmt: skip
    with queue.engine.connect() as conn:
        rows = conn.execute(sa.select(c.c.request_id, c.c.sample, c.c.reasons, c.c.priority, c.c.score)).all()
    random_ids = {r.request_id for r in rows if r.sample == RANDOM}
    assert 5 <= len(expected) <= 30 and random_ids == expected
    assert sel.queued[RANDOM] == len(expected) and sel.queued[TARGETED] == 60 - len(expected)
    targeted = [r for r in rows if r.sample == TARGETED]
    assert all(r.reasons for r in targeted) and sel.over_budget[TARGETED] > 0
    # Most useful first: every disagreement (40 of them, more than the room) outranks any low confidence.
    assert all("disagreement" in r.reasons for r in targeted)
    # The reviewer sees the unbiased sample first, then targeted rows by priority; each answer once.
    seen = []
    while (item := queue.next(MODEL)) is not None:
        seen.append(item)
        queue.answer(MODEL, item.request_id, "ana", skip=True)
    assert len(seen) == 60 and [i.sample for i in seen] == sorted(
        (i.sample for i in seen), key=[RANDOM, TARGETED].index
    )
    assert [i.priority for i in seen] == sorted((i.priority for i in seen), reverse=True)
    assert (
        seen[0].choices[0] == (LABELS[0], pytest.approx(seen[0].score, abs=1e-3))
        and len(seen[0].choices) == 4
    )
    # The day's budget is spent: new predictions wait for tomorrow's, which starts afresh.
    _log(url, _population(100, start=400))
    assert sum(queue.select(MODEL, cfg, now=NOW, labels=_labels).queued.values()) == 0
    tomorrow = queue.select(MODEL, cfg, now=NOW + timedelta(days=1), labels=_labels)
    assert tomorrow.considered == 0  # yesterday's pass already read them; what it left out stays out
    _log(url, _population(100, start=500))
    assert (
        0 < sum(queue.select(MODEL, cfg, now=NOW + timedelta(days=1), labels=_labels).queued.values()) <= 60
    )
    assert queue.progress(MODEL, cfg, now=NOW)["queued_today"] == 60


def test_low_confidence_and_drift_windows_are_rules_and_confident_rows_are_left_alone(url):
    from monitoring.store import drift_checks

    quiet, drifted_at = NOW - timedelta(hours=5), NOW - timedelta(hours=2)
    _log(url, [("confident", 0.95, "champion", None, quiet), ("unsure", 0.35, "champion", None, quiet),
               ("in-window", 0.95, "champion", None, drifted_at)])  # fmt: skip
    queue = ReviewQueue(url)
    window = {"first_at": (drifted_at - timedelta(minutes=30)).isoformat(), "last_at": drifted_at.isoformat()}
    with queue.engine.begin() as conn:
        drift_checks.metadata.create_all(conn, checkfirst=True)
        conn.execute(drift_checks.insert().values(at=NOW, model_name=MODEL, model_version="3", status="drift",
                                                  rows=500, reason="drift", window=json.dumps(window),
                                                  checks="[]"))  # fmt: skip
    sel = queue.select(MODEL, ReviewConfig(random_share=0.0), now=NOW, labels=_labels)
    assert sel.queued == {RANDOM: 0, TARGETED: 2}
    assert queue.get(MODEL, "confident") is None
    assert queue.get(MODEL, "unsure").reasons == ("low_confidence",)
    assert queue.get(MODEL, "in-window").reasons == ("drift_window",)
    off = ReviewQueue(url)
    _log(url, [("later", 0.95, "champion", None, drifted_at)])
    assert off.select(MODEL, ReviewConfig(random_share=0.0, drift_windows=False), now=NOW).considered == 1
    assert off.get(MODEL, "later") is None


def test_an_answer_becomes_a_feedback_label_with_its_reviewer_and_bad_answers_change_nothing(url):
    _log(url, [(f"q{i}", 0.3, "champion", None, NOW) for i in range(4)])
    queue = ReviewQueue(url)
    queue.select(MODEL, ReviewConfig(random_share=0.0), now=NOW, labels=_labels)
    done = queue.answer(MODEL, "q0", "ana", "card_declined")
    assert (done.status, done.answer, done.reviewer) == ("labelled", "card_declined", "ana")
    new = queue.answer(MODEL, "q1", "ben", "  crypto   refund ")  # not one of the model's labels
    assert new.answer == "crypto refund"
    with queue.engine.connect() as conn:
        labels = conn.execute(sa.select(feedback.c.request_id, feedback.c.label, feedback.c.actor)).all()
        flagged = conn.execute(
            sa.text("SELECT new_intent FROM champion_review_queue WHERE request_id='q1'")
        ).scalar()
    assert sorted(labels) == [("q0", "card_declined", "ana"), ("q1", "crypto refund", "ben")] and flagged
    assert queue.answer(MODEL, "q2", "ana", skip=True).status == "skipped"
    for call, words in [
        (lambda: queue.answer(MODEL, "q0", "ana", "track_order"), "already answered"),
        (lambda: queue.answer(MODEL, "nope", "ana", "track_order"), "not in the review queue"),
        (lambda: queue.answer(MODEL, "q3", "", "track_order"), "reviewer"),
        (lambda: queue.answer(MODEL, "q3", "ana", "x" * 300), "label: give 1 to 256"),
        (lambda: queue.answer(MODEL, "q3", "ana", "track_order", skip=True), "either a label or skip"),
    ]:
        with pytest.raises(ChampionError, match=words):
            call()
    with queue.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(feedback)).scalar() == 2
    assert queue.get(MODEL, "q3").status == "pending"


def test_a_prediction_committed_after_a_pass_saw_later_ones_is_picked_up_next_time(home):
    url = f"sqlite:///{home / 'inference.db'}"
    _log(url, [(f"g{i}", 0.3, "champion", None, NOW) for i in range(6)])
    queue = ReviewQueue(url)
    with queue.engine.begin() as conn:  # as if the row with id 3 were still being committed
        held = conn.execute(sa.text("SELECT * FROM champion_predictions WHERE id = 3")).mappings().one()
        conn.execute(sa.text("DELETE FROM champion_predictions WHERE id = 3"))
    assert queue.select(MODEL, ReviewConfig(random_share=0.0), now=NOW, labels=_labels).considered == 5
    with queue.engine.begin() as conn:
        conn.execute(sa.table("champion_predictions", *[sa.column(k) for k in held]).insert().values(**held))
    again = queue.select(MODEL, ReviewConfig(random_share=0.0), now=NOW, labels=_labels)
    assert again.considered == 1 and queue.get(MODEL, held["request_id"]) is not None


def test_the_fresh_holdout_takes_only_the_unbiased_share(url, monkeypatch):
    from pipelines.fresh import FreshConfig, fresh_data

    monkeypatch.setenv("CHAMPION_INFERENCE_LOG_URL", url)
    _log(url, _population(600))
    queue = ReviewQueue(url)
    cfg = ReviewConfig(daily_budget=10_000, random_share=0.2, random_budget_share=1.0)
    queue.select(MODEL, cfg, now=NOW, labels=_labels)
    samples = {}
    while (item := queue.next(MODEL)) is not None:
        queue.answer(MODEL, item.request_id, "ana", LABELS[int(item.request_id[1:]) % 4])
        samples[item.text] = item.sample
    data = fresh_data(MODEL, FreshConfig(holdout_share=0.5))
    assert {samples[t] for t in data.holdout["text"]} == {RANDOM}
    assert set(data.holdout["source"]) == {"review:random"}
    targeted = [t for t, s in samples.items() if s == TARGETED]
    assert set(targeted) <= set(data.train["text"])  # targeted labels still teach the retrain
    assert data.counts["targeted_review_rows"] == len(targeted) > 0
    assert not set(data.train["text"]) & set(data.holdout["text"])
    # The holdout is half of the random sample, as the hash deals it: an unbiased sample of production.
    random_rows = sum(s == RANDOM for s in samples.values())
    assert 0.3 * random_rows < len(data.holdout) < 0.7 * random_rows


def test_feedback_labels_never_reach_the_default_holdout(url, monkeypatch):
    from pipelines.fresh import FreshConfig, fresh_data

    monkeypatch.setenv("CHAMPION_INFERENCE_LOG_URL", url)
    _log(url, _population(600))
    queue = ReviewQueue(url)
    queue.select(MODEL, ReviewConfig(daily_budget=10_000, random_share=0.2, random_budget_share=1.0),
                 now=NOW, labels=_labels)  # fmt: skip
    truth = {}
    while (item := queue.next(MODEL)) is not None:
        truth[item.request_id] = LABELS[int(item.request_id[1:]) % 4]
        queue.answer(MODEL, item.request_id, "ana", truth[item.request_id])
    queue.close()
    # Whoever holds the ingest key labels everything else, and relabels what the reviewer answered.
    # Some of it repeats texts of the reviewed sample, to take them out of the holdout if it could.
    log = InferenceLog(url).start()
    random_ids = [rid for rid in truth if in_random_sample(rid, 0.2) is not None]
    log.append([PredictionRecord(f"d{rid}", NOW, MODEL, "3", "champion", f"text of {rid}", LABELS[0], 0.9,
                                 1.0) for rid in random_ids])  # fmt: skip
    log.flush()
    for rid in [f"r{i:05d}" for i in range(600)] + [f"d{rid}" for rid in random_ids]:
        log.add_feedback(rid, "card_declined", actor="help-desk")
    log.close()
    data = fresh_data(MODEL, FreshConfig(holdout_share=0.5))
    assert set(data.holdout["source"]) == {"review:random"} and len(data.holdout) > 20
    # The holdout keeps the reviewers' answers; feedback sent later for the same request replaced nothing.
    expected = {f"text of {rid}": label for rid, label in truth.items()}
    assert all(
        expected[t] == label for t, label in zip(data.holdout["text"], data.holdout["label"], strict=True)
    )
    # The /feedback labels still teach the retrain (train only), and never take a text out of the holdout.
    feedback_rows = data.train[data.train["source"] == "feedback"]
    assert (
        len(feedback_rows)
        == 600 - len(truth) + len(random_ids) - data.counts["feedback_dropped_holdout_text"]
    )
    assert data.counts["feedback_dropped_holdout_text"] == len(data.holdout) > 0
    assert not set(data.train["text"]) & set(data.holdout["text"])
    # Configured otherwise (every /feedback sender trusted), /feedback labels are dealt to both sides again.
    trusting = fresh_data(
        MODEL, FreshConfig(holdout_share=0.5, holdout_sources=["review:random", "feedback"])
    )
    assert "feedback" in set(trusting.holdout["source"])


def test_the_cli_takes_the_next_item_and_answers_it(home, capsys, monkeypatch):
    from champion_cli.cli import main

    url = f"sqlite:///{home / 'inference.db'}"
    _log(url, [("q0", 0.3, "champion", None, NOW), ("q1", 0.35, "champion", None, NOW)])
    ReviewQueue(url).select(MODEL, ReviewConfig(random_share=0.0), now=NOW, labels=_labels)
    assert main(["review", "next", MODEL, "--log-url", url, "--json"]) == 0
    item = json.loads(capsys.readouterr().out)
    assert item["request_id"] == "q0" and item["choices"][0][0] == LABELS[0]  # least confident first
    assert main(["review", "answer", MODEL, "q0", "--label", "card_declined", "--log-url", url]) == 0
    assert "labelled: q0 as 'card_declined'" in capsys.readouterr().out
    assert main(["review", "answer", MODEL, "q0", "--label", "track_order", "--log-url", url]) == 2
    assert "already answered" in capsys.readouterr().err
    assert main(["review", "answer", MODEL, "q1", "--skip", "--log-url", url]) == 0
    assert main(["review", "next", MODEL, "--log-url", url]) == 0
    assert "nothing waits for review" in capsys.readouterr().out
    with sa.create_engine(url).connect() as conn:
        assert conn.execute(sa.select(feedback.c.request_id, feedback.c.actor)).all() == [("q0", "pytest")]
