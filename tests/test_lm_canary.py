"""A canary for a text-generation model: the champion answers each canary conversation too (never sent), the
two answers agree when they name the same intent (or, without JSON, say the same), and the guardrails promote
or roll back on that evidence, counted per client, as for a classifier."""

from __future__ import annotations

import time

import pytest
from lm_world import two_versions

NAME = "tiny-replies"
MESSAGES = ["where is my order 123", "cancel order 77", "I want a refund", "reset my password please",
            "has my package shipped", "stop order 55 now"]  # fmt: skip
GUARD = {"share": 0.5, "min_requests": 12, "min_requests_to_fail": 12, "min_clients": 3,
         "max_per_client": 1000, "min_seconds": 0, "sync_seconds": 0.2}  # fmt: skip


@pytest.fixture
def world(tmp_path, tiny_llama_dir):
    from champion.registry import assign_alias

    with pytest.MonkeyPatch.context() as mp:
        reg, v1, v2 = two_versions(mp, tmp_path, tiny_llama_dir)
        assign_alias(reg, NAME, "challenger", v2, reason="the canary")
        yield reg, v1, v2, tmp_path
        reg.close()


def _server(world, **guard):
    from serving.config import ServeConfig
    from serving.inference_log import InferenceLog
    from serving.lm_server import LMServer

    reg, *_, root = world
    cfg = ServeConfig.model_validate(
        {"model": NAME, "task": "text-generation", "threads": 1,
         "traffic": {"policy": "canary", "canary": {**GUARD, **guard}}, "generation": {"max_tokens": 8}}
    )  # fmt: skip
    log = InferenceLog(f"sqlite:///{root / 'log.db'}", spool_dir=root / "spool")
    return LMServer(cfg, registry=reg, inference_log=log).start()


def _until_decided(server, clients: int | None = 5, timeout: float = 90.0):
    from serving.lm_server import ChatParams

    deadline, sent = time.monotonic() + timeout, 0
    while not server.canary_decisions:
        assert time.monotonic() < deadline, f"no canary decision after {sent} answers: {server.status()}"
        message = MESSAGES[sent % len(MESSAGES)] + f" #{sent}"
        call = server.chat(
            ChatParams(messages=[{"role": "user", "content": message}], max_tokens=6, temperature=0),
            client=None if clients is None else f"10.0.0.{sent % clients}",
        )
        call.stream.result(30)
        sent += 1
    return server.canary_decisions[0], sent


def test_a_canary_that_agrees_with_its_champion_is_promoted_and_audited(world):
    reg, v1, v2, _ = world
    server = _server(world, min_agreement=0.0)
    try:
        (decision, outcome), _ = _until_decided(server)
        assert decision.action == "promote" and outcome.allowed, decision.reason
        assert reg.client.get_registered_model(NAME).aliases["champion"] == int(v2)
        event = reg.audit.events(NAME, "champion")[-1]
        assert (event.action, event.from_version, event.to_version) == ("canary_promote", v1, v2)
        assert event.evidence["requests"] >= 12 and event.evidence["clients"] >= 3
        assert 0 <= event.evidence["agreement"] <= 1
        assert server.reload()["champion"] == v2
    finally:
        server.close()


def test_a_canary_that_answers_differently_is_rolled_back(world):
    reg, v1, _, _ = world
    server = _server(world, min_agreement=1.0, min_requests=10_000)
    try:
        (decision, outcome), _ = _until_decided(server)
        assert decision.action == "rollback" and outcome.allowed, decision.reason
        assert "agreement" in decision.reason
        aliases = reg.client.get_registered_model(NAME).aliases
        assert aliases["champion"] == int(v1) and "challenger" not in aliases
        server.log.flush()
        logged = server.log.read(NAME, generated=True)
        assert set(logged.arm) <= {"champion", "canary"} and (logged.arm == "canary").any()
        assert len(logged) == len(set(logged.request_id))  # the champion's comparisons are never logged
    finally:
        server.close()


def test_anonymous_canary_answers_are_never_evidence(world):
    server = _server(world, min_agreement=0.0)
    try:
        with pytest.raises(AssertionError, match="no canary decision"):
            _until_decided(server, clients=None, timeout=8)
        assert server.canary.snapshot() is None  # nothing was counted at all
    finally:
        server.close()


def test_answers_agree_on_their_intent_or_else_on_their_text():
    from serving.lm_server import answer_intent, same_answer

    a = '{"intent": "track_order", "category": "ORDER", "entities": {}, "reply": "It ships today."}'
    b = 'Sure: {"intent":"track_order","category":"ORDER","entities":{"order_id":"1"},"reply":"Soon."}'
    assert answer_intent(b) == "track_order" and answer_intent("no json {here") is None
    assert same_answer(a, b)  # the same intent, whatever the reply's words
    assert not same_answer(a, a.replace("track_order", "cancel_order"))
    assert not same_answer(a, "It ships today.")  # an intent never agrees with none
    assert same_answer("Hello  there", "hello there") and not same_answer("hello", "goodbye")
