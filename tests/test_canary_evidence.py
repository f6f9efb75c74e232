"""Who decides a canary (issue 24 item 6), on the server's request path in-process: distinct clients, not
requests; per-text latency; a secret sticky salt; `approval: required` leaves the move to a person."""

from __future__ import annotations

import os
import random
import stat
import time

from test_serving import NAME, TEXTS, make_server, versions  # noqa: F401  (fixtures)

from serving.traffic import choose_arms

CANARY = {"share": 0.5, "min_requests": 20, "min_requests_to_fail": 20, "min_agreement": 0.0,
          "sync_seconds": 0.1, "min_seconds": 0}  # fmt: skip


def _aliases(registry) -> dict[str, str]:
    return {k: str(v) for k, v in registry.client.get_registered_model(NAME).aliases.items()}


def _as_http(server, texts, client: str):
    """What the service does for one HTTP request: answer (in a batch gathered from many requests, so
    without a client), then name the answers' client, the connection's peer address (serving/service.py)."""
    answers = server.predict(texts)
    server.credit_canary(client, [a.request_id for a in answers])
    return answers


def _until_decided(server, clients: list[str], seconds: float, pause: float) -> None:
    """Send TEXTS as HTTP requests from `clients` in turn until the canary reaches a verdict."""
    deadline, sent = time.monotonic() + seconds, 0
    while not server.canary_decisions:
        assert time.monotonic() < deadline, server.status()
        _as_http(server, TEXTS, clients[sent % len(clients)])
        sent += 1
        time.sleep(pause)


def test_anonymous_batches_never_promote_a_canary(make_server, registry, versions):  # noqa: F811
    """The issue's attack: many /predict requests of one sentence. BentoML gathers requests into batches,
    so the batch itself names no client: none of it is evidence until the HTTP layer names one."""
    server = make_server(traffic={"policy": "canary", "canary": {**CANARY, "min_clients": 2}})
    for _ in range(150):
        server.predict(["where is my order"] * 4)
    time.sleep(0.5)  # five sync rounds
    assert not server.canary_decisions, server.canary_decisions
    assert _aliases(registry) == {"champion": versions[0], "challenger": versions[2]}


def test_a_canary_fed_by_one_client_never_promotes(make_server, registry, versions):  # noqa: F811
    server = make_server(traffic={"policy": "canary", "canary": {**CANARY, "min_clients": 2}})
    for _ in range(150):  # some 300 canary answers, all in agreement or not: one client decides nothing
        _as_http(server, TEXTS, "203.0.113.7")
    time.sleep(0.5)
    assert not server.canary_decisions and _aliases(registry)["champion"] == versions[0]
    assert server.status()["canary"]["clients"] == 1
    assert server.status()["canary"]["counted"] == 20  # max_per_client (default 20)
    _as_http(server, TEXTS * 10, "198.51.100.9")  # a second client: now the evidence is enough
    _until_decided(server, ["198.51.100.9"], seconds=10, pause=0.05)
    decision, outcome = server.canary_decisions[0]
    assert decision.action == "promote" and outcome.allowed and decision.evidence["clients"] == 2
    assert _aliases(registry) == {"champion": versions[2]}  # the challenger is retired in the same move


def test_canary_latency_is_per_text_not_per_batch(make_server, versions):  # noqa: F811
    import dataclasses

    from serving.follower import Served

    server = make_server(traffic={"policy": "canary", "canary": {**CANARY, "share": 0.99, "min_clients": 50}})
    served = server.follower.served
    real = served.challenger.predict_proba

    def slow(texts, chunk=0):
        time.sleep(0.2)  # 200 ms for the whole batch, whatever its size
        return real(texts, chunk)

    server.follower.served = Served(served.champion, dataclasses.replace(served.challenger), served.previous)
    object.__setattr__(server.follower.served.challenger, "predict_proba", slow)
    server.predict(TEXTS * 4, client="203.0.113.7")  # 16 texts, about all on the canary
    p99 = server.canary.local().p99_ms()
    assert 200 / 16 * 0.9 < p99 < 200 / 8, p99  # the batch's 200 ms shared by its ~16 texts


def test_the_sticky_salt_is_a_server_secret_not_the_version(make_server, versions, home):  # noqa: F811
    """Keys are placed by a hash the public cannot compute: nobody picks keys that land on the canary."""
    server = make_server(traffic={"policy": "ab", "challenger_weight": 0.5})
    users = [f"user-{i}" for i in range(64)]
    answers = server.predict([{"text": "where is my order", "key": u} for u in users])
    public = choose_arms(server.cfg.traffic, len(users), True, random.Random(0), users, salt=versions[2])
    differ = sum(a.arm != arm for a, arm in zip(answers, public, strict=True))
    assert differ >= 16, f"only {differ} of 64 users placed unlike the public salt would place them"
    secret = home / "keys" / "traffic.secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600 and len(secret.read_text()) == 64
    again = make_server(traffic={"policy": "ab", "challenger_weight": 0.5})  # another worker, same home
    assert [a.arm for a in again.predict([{"text": "where is my order", "key": u} for u in users])] == [
        a.arm for a in answers
    ]


def test_with_approval_required_a_passing_canary_waits_for_a_person(make_server, registry, versions):  # noqa: F811
    from champion.approval import approve, pending_promotions

    canary = {**CANARY, "min_clients": 2, "approval": "required"}
    server = make_server(traffic={"policy": "canary", "canary": canary})
    _until_decided(server, ["10.0.0.0", "10.0.0.1", "10.0.0.2"], seconds=20, pause=0.02)
    decision, pending = server.canary_decisions[0]
    assert decision.action == "promote" and pending.target == "after_canary"
    time.sleep(0.3)
    assert _aliases(registry) == {"champion": versions[0], "challenger": versions[2]}  # nothing moved
    (waiting,) = pending_promotions(registry, NAME)
    assert waiting.version == versions[2] and waiting.evidence["clients"] == 3
    assert waiting.requested_by.startswith("canary@")

    moved = approve(registry, NAME, versions[2], reason="the canary's evidence is convincing", actor="ana")
    assert moved.allowed, moved.reason
    assert _aliases(registry) == {"champion": versions[2]}
    event = registry.audit.events(NAME, "champion")[-1]
    assert (event.action, event.actor, event.to_version) == ("canary_promote", "ana", versions[2])
    assert server.reload()["champion"] == versions[2]


def test_a_challenger_that_came_through_an_approval_waits_for_one_again(make_server, registry, versions):  # noqa: F811
    """The retrain's `approval: required` with `promotion: canary`: a person approved the version for the
    canary, not for champion; its canary, however well it goes, files a promotion for a person to decide."""
    from champion.approval import approve, pending_promotions, request_approval

    request_approval(registry, NAME, versions[1], "canary", versions[0], "passed the gate", {}, hours=1,
                     actor="scheduler")  # fmt: skip
    assert approve(registry, NAME, versions[1], reason="fine for a canary", actor="ana").allowed
    server = make_server(traffic={"policy": "canary", "canary": {**CANARY, "min_clients": 2}})  # no approval
    _until_decided(server, ["10.0.0.0", "10.0.0.1"], seconds=20, pause=0.02)
    assert server.canary_decisions[0][1].target == "after_canary"
    assert _aliases(registry) == {"champion": versions[0], "challenger": versions[1]}
    assert [p.version for p in pending_promotions(registry, NAME)] == [versions[1]]
