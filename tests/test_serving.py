"""The model server in-process: a real sqlite registry with tiny model versions, the real BentoML app."""

from __future__ import annotations

import time

import pytest
from conftest import TINY_INTENTS
from helpers import register_tiny_versions

from champion.registry import promote, rollback
from serving.config import ServeConfig

NAME = "tiny-intents"
TEXTS = ["where is my order", "please reset my password", "my card was declined", "send me an invoice"]


@pytest.fixture
def versions(registry, tiny_model_dir):
    """Three registered versions; v1 is champion, v3 is challenger."""
    found = register_tiny_versions(registry, tiny_model_dir, TINY_INTENTS, 3)
    promote(registry, NAME, found[0], reason="first champion")
    return found


def serve_config(**fields) -> ServeConfig:
    base = {"model": NAME, "follow": {"poll_seconds": 0.1}, "threads": 1}
    for key, value in fields.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return ServeConfig.model_validate(base)


@pytest.fixture
def make_server(home, versions):
    from serving.server import ModelServer

    made = []

    def make(**fields):
        server = ModelServer(serve_config(**fields)).start()
        server.wait_ready(timeout=60)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def test_answers_carry_the_version_and_each_is_logged_once(make_server, versions):
    server = make_server()
    answers = server.predict(TEXTS) + server.predict(TEXTS[:1], probabilities=True)
    assert {a.version for a in answers} == {versions[0]} and {a.arm for a in answers} == {"champion"}
    assert not hasattr(answers[0], "probabilities")  # only when asked for
    assert all(a.label in TINY_INTENTS and 0 < a.score <= 1 for a in answers)
    probs = answers[-1].probabilities
    assert set(probs) == set(TINY_INTENTS) and abs(sum(probs.values()) - 1) < 1e-5
    assert max(probs, key=probs.get) == answers[-1].label
    server.log.flush()
    rows = server.log.read(NAME)
    assert sorted(rows.request_id) == sorted(a.request_id for a in answers)
    assert set(rows.model_version) == {versions[0]} and list(rows.text[:4]) == TEXTS


def test_follows_promotion_and_rollback_without_reloading_the_previous(make_server, registry, versions):
    server = make_server()
    promote(registry, NAME, versions[1], reason="better")
    assert server.reload()["champion"] == versions[1]
    assert {a.version for a in server.predict(TEXTS)} == {versions[1]}
    rollback(registry, NAME, reason="worse live")
    started = time.monotonic()
    status = server.reload()
    assert status["champion"] == versions[0] and status["previous"] == versions[1]
    assert time.monotonic() - started < 1.5  # v1 was still warm: a swap, not a load
    swaps = list(server.follower.swaps)
    assert [(s.from_version, s.to_version) for s in swaps] == [(None, "1"), ("1", "2"), ("2", "1")]
    assert swaps[-1].load_seconds == 0.0


def test_polling_picks_up_an_alias_move_without_a_reload(make_server, registry, versions):
    server = make_server()
    promote(registry, NAME, versions[2], reason="best")
    moved = time.monotonic()
    while server.predict(TEXTS[:1])[0].version != versions[2]:
        assert time.monotonic() - moved < 10, "the new version never answered"
        time.sleep(0.02)
    assert time.monotonic() - moved < 3  # the target: answering within 3 s of the move


def test_polls_ask_mlflow_only_after_an_audited_move_or_the_full_check(
    make_server, registry, versions, monkeypatch
):
    """A poll reads the audit history's newest event id; MLflow's (costly) alias read, to compare, happens
    only when it changed, every `full_check_seconds` (a move made in the MLflow UI), or on /reload."""
    server = make_server(follow={"poll_seconds": 0.05, "full_check_seconds": 2.0})
    reads = []
    real = server.registry.client.get_registered_model
    monkeypatch.setattr(
        server.registry.client,
        "get_registered_model",
        lambda name: reads.append(time.monotonic()) or real(name),
    )
    time.sleep(0.5)
    assert len(reads) <= 1  # ten polls, at most one MLflow read

    promote(registry, NAME, versions[1], reason="audited move")
    moved = time.monotonic()
    while server.predict(TEXTS[:1])[0].version != versions[1]:
        assert time.monotonic() - moved < 3, "an audited move was not followed at poll speed"
        time.sleep(0.02)

    registry.client.set_registered_model_alias(NAME, "champion", versions[2])  # as in the MLflow UI
    moved = time.monotonic()
    while not server.unaudited:
        assert time.monotonic() - moved < 6, "a move outside Champion was not seen by the full check"
        time.sleep(0.05)
    assert server.unaudited == {"champion": (versions[1], versions[2])}
    assert {a.version for a in server.predict(TEXTS)} == {versions[1]}  # not followed


def _metric(name: str, **labels) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels)


def test_an_alias_set_in_mlflow_is_not_served_until_adopted(make_server, registry, versions, capsys):
    """Issue 24 item 7: a move in the MLflow UI or API skips the gate, approval and the audit lock; the
    server keeps the audited champion, says so (log, gauge, status), and follows once a person adopts."""
    from champion_cli.cli import main

    server = make_server(traffic={"policy": "ab", "challenger_weight": 0.5})
    registry.client.set_registered_model_alias(NAME, "champion", versions[1])  # around Champion
    registry.client.delete_registered_model_alias(NAME, "challenger")
    status = server.reload()
    assert (status["champion"], status["challenger"]) == (versions[0], versions[2])  # the audited ones
    assert status["unaudited"] == {
        "champion": {"audited": versions[0], "in_mlflow": versions[1]},
        "challenger": {"audited": versions[2], "in_mlflow": None},
    }
    assert _metric("champion_alias_unaudited", model=NAME, alias="champion") == 1
    time.sleep(0.5)  # several polls: still not followed
    assert {a.version for a in server.predict(TEXTS * 3)} == {versions[0], versions[2]}

    assert main(["doctor", NAME]) == 1
    assert f"champion adopt {NAME} champion {versions[1]}" in capsys.readouterr().out
    assert main(["adopt", NAME, "champion", versions[1], "--reason", "ana's hotfix, checked"]) == 0
    assert main(["adopt", NAME, "challenger", "none", "--reason", "the canary is over"]) == 0
    status = server.reload()
    assert (status["champion"], status["challenger"], status["unaudited"]) == (versions[1], None, {})
    assert {a.version for a in server.predict(TEXTS)} == {versions[1]}
    assert _metric("champion_alias_unaudited", model=NAME, alias="champion") == 0
    adopted = registry.audit.events(NAME, "champion")[-1]
    assert (adopted.action, adopted.from_version, adopted.to_version) == ("adopt", versions[0], versions[1])


def test_a_model_with_no_audit_history_is_not_served_until_adopted(home, registry, versions):
    """A model registered and aliased entirely outside Champion: nothing is served, and the reason says
    how to adopt it."""
    import mlflow

    from serving.server import ModelServer, NotReadyError

    source = registry.client.get_model_version(NAME, versions[0])
    mlflow.register_model(f"models:/{NAME}/{versions[0]}", "outside", tags=dict(source.tags))
    registry.client.set_registered_model_alias("outside", "champion", "1")
    server = ModelServer(serve_config(model="outside")).start()
    try:
        assert not server.ready()
        with pytest.raises(NotReadyError, match="no champion in the audit history.*champion adopt outside"):
            server.predict(TEXTS)
        from champion.registry import adopt

        assert adopt(registry, "outside", "champion", "1", reason="registered by the old pipeline").allowed
        server.reload()
        assert server.predict(TEXTS[:1])[0].version == "1"
    finally:
        server.close()


def test_a_move_cut_off_after_mlflow_is_settled_by_the_server(make_server, registry, versions):
    """A promote killed between MLflow's alias and its audit row being marked done: the server settles it
    as the next registry operation would (the alias is on the announced version: done), and follows."""
    from champion.audit import AliasEvent

    server = make_server()
    with registry.audit.lock(NAME, "champion") as history:
        event = AliasEvent(NAME, "champion", "promote", versions[0], versions[1], "ana", "killed mid-move")
        history.append(event, status="pending")
    registry.client.set_registered_model_alias(NAME, "champion", versions[1])  # then the process died
    status = server.reload()
    assert status["champion"] == versions[1] and status["unaudited"] == {}
    assert registry.audit.events(NAME, "champion")[-1].to_version == versions[1]


def test_ab_split_sends_both_arms_and_logs_the_arm(make_server, versions):
    server = make_server(traffic={"policy": "ab", "challenger_weight": 0.5})
    answers = [a for _ in range(10) for a in server.predict(TEXTS)]
    by_arm = {a.arm: a.version for a in answers}
    assert by_arm == {"champion": versions[0], "challenger": versions[2]}
    server.log.flush()
    logged = server.log.read(NAME)
    assert dict(zip(logged.request_id, logged.arm, strict=True)) == {a.request_id: a.arm for a in answers}


def test_a_keyed_user_sees_one_version_in_every_batch(make_server, versions):
    server = make_server(traffic={"policy": "ab", "challenger_weight": 0.5})
    users = [f"user-{i}" for i in range(12)]
    seen: dict[str, set[str]] = {u: set() for u in users}
    for round_ in range(5):
        batch = [{"text": TEXTS[(i + round_) % 4], "key": u} for i, u in enumerate(users)] + TEXTS[:2]
        answers = server.predict(batch)
        for user, answer in zip(users, answers, strict=False):
            seen[user].add(answer.version)
    assert all(len(v) == 1 for v in seen.values()), seen  # sticky
    assert {v for vs in seen.values() for v in vs} == {versions[0], versions[2]}  # and both arms are used


def test_shadow_scores_a_copy_and_logs_agreement_off_the_answer(make_server, versions):
    server = make_server(traffic={"policy": "shadow"})
    answers = server.predict(TEXTS)
    assert {(a.arm, a.version) for a in answers} == {("champion", versions[0])}
    deadline = time.monotonic() + 10
    while True:
        server.log.flush()
        rows = server.log.read(NAME)
        shadow = rows[rows.arm == "shadow"]
        if len(shadow) == len(TEXTS) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sorted(shadow.request_id) == sorted(a.request_id for a in answers)
    assert set(shadow.model_version) == {versions[2]}
    champion_label = {a.request_id: a.label for a in answers}
    for row in shadow.itertuples():
        assert row.agrees == (row.label == champion_label[row.request_id])


def _wait_for_canary(server, timeout=30, clients=5):
    deadline, sent = time.monotonic() + timeout, 0
    while not server.canary_decisions:
        assert time.monotonic() < deadline, f"no canary decision: {server.status()}"
        server.predict(TEXTS, client=f"10.0.0.{sent % clients}")
        sent += 1
        time.sleep(0.01)
    return server.canary_decisions[0]


CANARY = {"min_clients": 3, "max_per_client": 1000, "min_seconds": 0}  # the guardrails' tests: 5 clients


def test_canary_promotes_when_guardrails_hold_and_audits_it(make_server, registry, versions):
    canary = {"share": 0.5, "min_requests": 20, "min_requests_to_fail": 20, "min_agreement": 0.0, **CANARY}
    server = make_server(traffic={"policy": "canary", "canary": canary})
    decision, outcome = _wait_for_canary(server)
    assert decision.action == "promote" and outcome.allowed
    assert registry.client.get_registered_model(NAME).aliases["champion"] == int(versions[2])
    event = registry.audit.events(NAME, "champion")[-1]
    assert (event.action, event.from_version, event.to_version) == ("canary_promote", "1", "3")
    assert event.evidence["requests"] >= 20 and "agreement" in event.evidence
    assert event.evidence["clients"] >= 3
    status = server.reload()
    assert (status["champion"], status["challenger"]) == (versions[2], None)


def test_canary_rolls_back_when_agreement_breaks(make_server, registry, versions):
    canary = {
        "share": 0.5,
        "min_requests": 10_000,
        "min_requests_to_fail": 20,
        "min_agreement": 1.0,
        **CANARY,
    }
    server = make_server(traffic={"policy": "canary", "canary": canary})
    # v1 and v3 have different random heads, so they disagree on some of these texts.
    decision, outcome = _wait_for_canary(server)
    assert decision.action == "rollback" and outcome.allowed, decision.reason
    aliases = registry.client.get_registered_model(NAME).aliases
    assert aliases["champion"] == int(versions[0]) and "challenger" not in aliases
    event = registry.audit.events(NAME, "challenger")[-1]
    assert (event.action, event.from_version, event.to_version) == ("canary_rollback", "3", None)
    assert "agreement" in event.reason
    assert server.reload()["challenger"] is None
    assert {a.arm for a in server.predict(TEXTS * 5)} == {"champion"}


def test_the_canary_is_judged_on_every_workers_traffic_together(make_server, registry, versions):
    """Two workers share the log database: neither one's canary traffic reaches min_requests, both
    together do, and the challenger is promoted once, with the sum of both as evidence."""
    canary = {"share": 0.5, "min_requests": 50, "min_requests_to_fail": 20, "min_agreement": 0.0,
              "sync_seconds": 0.1, **CANARY}  # fmt: skip
    first, second = (make_server(traffic={"policy": "canary", "canary": canary}) for _ in range(2))

    def send_canary_requests(server, n):
        """Canary answers from `server` until it counted `n`, or until a verdict: once the sum of both reaches
        min_requests, the other worker may promote first, and then this one has no canary to answer with."""
        sent, deadline = 0, time.monotonic() + 60
        while (server.canary.local().requests if server.canary.local() else 0) < n:
            if first.canary_decisions or second.canary_decisions:
                break
            assert time.monotonic() < deadline, f"{n} canary answers not counted in 60 s: {server.status()}"
            server.predict(TEXTS[:1], client=f"10.0.0.{sent % 5}")
            sent += 1
        return server.canary.local().requests

    sent = [send_canary_requests(first, 30)]
    time.sleep(1.0)  # ten sync rounds: 30 of the 50 needed is not enough on its own
    assert not first.canary_decisions and not second.canary_decisions
    assert registry.client.get_registered_model(NAME).aliases["champion"] == int(versions[0])
    sent.append(send_canary_requests(second, 30))
    deadline = time.monotonic() + 30
    while not (first.canary_decisions or second.canary_decisions):
        assert time.monotonic() < deadline, f"no canary decision: {first.status()} {second.status()}"
        time.sleep(0.05)
    time.sleep(0.5)  # the other worker's verdict, if it reaches one, finds the aliases moved
    assert registry.client.get_registered_model(NAME).aliases["champion"] == int(versions[2])
    promotions = [e for e in registry.audit.events(NAME, "champion") if e.action == "canary_promote"]
    assert len(promotions) == 1
    evidence = promotions[0].evidence
    assert evidence["workers"] == 2 and 50 <= evidence["requests"] <= sum(sent), evidence


def test_not_ready_until_a_champion_exists(home, registry, tiny_model_dir):
    from serving.server import ModelServer, NotReadyError

    server = ModelServer(serve_config()).start()
    try:
        assert not server.ready()
        with pytest.raises(NotReadyError, match="no champion loaded yet; promote a version"):
            server.predict(TEXTS)
        register_tiny_versions(registry, tiny_model_dir, TINY_INTENTS, 1)
        promote(registry, NAME, "1", reason="first")
        server.wait_ready(timeout=30)
        assert server.predict(TEXTS[:1])[0].version == "1"
    finally:
        server.close()


@pytest.mark.postgres
def test_inference_log_and_feedback_on_postgresql(pg_url, make_server):  # server closes before the drop
    server = make_server(log={"url": pg_url})
    answers = server.predict(TEXTS)
    server.feedback(answers[0].request_id, "track_order")  # found even before the writer flushed it
    server.log.flush()
    rows = server.log.read(NAME)
    assert sorted(rows.request_id) == sorted(a.request_id for a in answers)
    assert rows.set_index("request_id").true_label[answers[0].request_id] == "track_order"


def test_a_failing_canary_never_fails_a_request_and_is_retired(make_server, registry, versions):
    import dataclasses

    from serving.follower import Served

    canary = {
        "share": 0.5,
        "min_requests": 10_000,
        "min_requests_to_fail": 20,
        "min_agreement": 0.0,
        **CANARY,
    }
    server = make_server(traffic={"policy": "canary", "canary": canary})
    served = server.follower.served
    broken = dataclasses.replace(served.challenger, model=None)  # its forward pass raises
    server.follower.served = Served(served.champion, broken, served.previous)
    answers = [a for i in range(20) for a in server.predict(TEXTS, client=f"10.0.0.{i % 5}")]
    assert {(a.arm, a.version) for a in answers} == {("champion", versions[0])}  # the champion stood in
    decision, outcome = _wait_for_canary(server)
    assert decision.action == "rollback" and "error rate 1.0000" in decision.reason and outcome.allowed
    assert "challenger" not in registry.client.get_registered_model(NAME).aliases


def test_chunked_forward_gives_the_same_probabilities_in_the_same_order(make_server):
    import numpy as np

    model = make_server().follower.served.champion
    texts = [f"{'very ' * (i % 7)}late order number {i}" for i in range(21)]
    np.testing.assert_allclose(model.predict_proba(texts, chunk=4), model.predict_proba(texts), atol=1e-5)
