"""Approval before promotion: nothing moves until a second person approves; rejection, expiry, void, CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from helpers import make_versions

from champion.approval import approve, pending_promotions, recent, reject, request_approval
from champion.errors import ChampionError
from champion.registry import promote, story
from champion.safety import DIGEST_TAG
from champion_cli.cli import main

GATE = "beats the champion on 400 fresh rows (macro-F1 +0.031, 95% CI [+0.012, +0.050])"


@pytest.fixture
def waiting(registry):
    """clf: v1 is champion; v2 passed the gate against v1 and waits for approval, asked by the scheduler."""
    v1, v2 = make_versions(registry, "clf", [0.8, 0.9])
    promote(registry, "clf", v1, reason="first")
    evidence = {"gate": {"promote": True, "holdout_sha256": "a" * 64}}
    item = request_approval(registry, "clf", v2, "direct", v1, GATE, evidence, hours=24, actor="scheduler")
    return v1, v2, item


def _aliases(registry) -> dict[str, str]:
    return {k: str(v) for k, v in registry.client.get_registered_model("clf").aliases.items()}


def _another_version(registry, like: str, score: float) -> str:
    like_mv = registry.client.get_model_version("clf", like)
    source, digest = like_mv.source, like_mv.tags[DIGEST_TAG]  # the same files, so the same digest
    tags = {"metric.val_macro_f1": str(score), "data_sha256": "d" * 64, DIGEST_TAG: digest}
    return str(registry.client.create_model_version("clf", source=source, tags=tags).version)


def test_nothing_moves_until_a_second_person_approves(registry, waiting):
    v1, v2, item = waiting
    assert _aliases(registry) == {"champion": v1}
    assert [p.version for p in pending_promotions(registry, "clf")] == [v2]
    assert item.requested_by == "scheduler" and item.expires_at - item.requested_at == timedelta(hours=24)

    with pytest.raises(ChampionError, match="a second person must decide"):
        approve(registry, "clf", v2, reason="looks fine", actor="scheduler")
    with pytest.raises(ChampionError, match="--reason"):
        approve(registry, "clf", v2, reason="  ", actor="ana")
    assert _aliases(registry) == {"champion": v1}

    moved = approve(registry, "clf", v2, reason="checked the per-class report", actor="ana")
    assert moved.allowed, moved.reason
    assert _aliases(registry) == {"champion": v2}
    assert pending_promotions(registry, "clf") == []
    assert recent(registry, "clf")[0].status == "approved" and recent(registry, "clf")[0].decided_by == "ana"

    event = registry.audit.events("clf", "champion")[-1]
    assert event.actor == "ana" and event.to_version == v2 and event.action == "gate_promote"
    assert event.reason == "approved by ana: checked the per-class report"
    assert event.evidence["approval"]["requested_by"] == "scheduler"
    assert event.evidence["gate"]["holdout_sha256"] == "a" * 64  # the gate's evidence travels with the move
    steps = [s["action"] for s in story(registry, "clf") if s["type"] == "loop"]
    assert steps == ["approval_requested", "approval"]

    with pytest.raises(ChampionError, match="already approved by ana"):
        approve(registry, "clf", v2, reason="again", actor="bob")


def test_a_rejected_promotion_moves_nothing(registry, waiting):
    v1, v2, _ = waiting
    item = reject(registry, "clf", v2, reason="class 'refund' dropped 6 points", actor="ana")
    assert item.status == "rejected" and item.decision_reason == "class 'refund' dropped 6 points"
    assert _aliases(registry) == {"champion": v1}
    assert pending_promotions(registry, "clf") == []
    with pytest.raises(ChampionError, match="already rejected"):
        approve(registry, "clf", v2, reason="changed my mind", actor="bob")
    assert story(registry, "clf")[-1]["reason"] == "ana rejected v2: class 'refund' dropped 6 points"


def test_a_pending_promotion_expires(registry, waiting):
    v1, v2, item = waiting
    later = item.expires_at + timedelta(seconds=1)
    assert pending_promotions(registry, "clf", now=item.expires_at - timedelta(minutes=1))  # not yet
    assert pending_promotions(registry, "clf", now=later) == []
    assert recent(registry, "clf")[0].status == "expired"
    with pytest.raises(ChampionError, match="already expired"):
        approve(registry, "clf", v2, reason="late", actor="ana", now=later)
    assert _aliases(registry) == {"champion": v1}
    assert story(registry, "clf")[-1]["action"] == "approval_expired"


def test_an_approval_after_the_champion_moved_is_void(registry, waiting):
    v1, v2, _ = waiting
    v3 = _another_version(registry, v1, 0.95)
    promote(registry, "clf", v3, reason="hotfix")
    moved = approve(registry, "clf", v2, reason="ok", actor="ana")
    assert not moved.allowed and "the champion moved" in moved.reason
    assert _aliases(registry) == {"champion": v3}
    assert recent(registry, "clf")[0].status == "void"


def test_a_newer_gate_pass_supersedes_the_waiting_one(registry, waiting):
    v1, v2, _ = waiting
    v3 = _another_version(registry, v1, 0.85)
    request_approval(registry, "clf", v3, "direct", v1, GATE, {}, hours=24, actor="scheduler")
    assert [p.version for p in pending_promotions(registry, "clf")] == [v3]
    assert [(p.version, p.status) for p in recent(registry, "clf")] == [(v3, "pending"), (v2, "void")]


def test_approving_a_canary_promotion_hands_the_version_to_the_canary(registry):
    v1, v2 = make_versions(registry, "clf", [0.8, 0.9])
    promote(registry, "clf", v1, reason="first")
    request_approval(registry, "clf", v2, "canary", v1, GATE, {}, hours=24, actor="scheduler")
    assert approve(registry, "clf", v2, reason="canary it", actor="ana").allowed
    assert _aliases(registry) == {"champion": v1, "challenger": v2}


def test_the_cli_lists_approves_and_rejects(registry, waiting, capsys):
    _, v2, _ = waiting
    assert main(["pending", "clf", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(p["version"], p["requested_by"], p["gate_reason"]) for p in listed] == [(v2, "scheduler", GATE)]

    assert main(["approve", "clf", "99", "--reason", "x"]) == 2  # no such pending promotion: a clear error
    assert "has no promotion waiting for approval" in capsys.readouterr().err

    assert main(["approve", "clf", v2, "--reason", "per-class report is fine"]) == 0  # CHAMPION_ACTOR=pytest
    assert "approve:" in capsys.readouterr().out
    assert _aliases(registry) == {"champion": v2}
    assert main(["pending"]) == 0
    assert "no promotion waits" in capsys.readouterr().out


def test_the_cli_rejects(registry, waiting, capsys):
    v1, v2, _ = waiting
    assert main(["reject", "clf", v2, "--reason", "not this week"]) == 0
    assert "rejected: v2" in capsys.readouterr().out
    assert _aliases(registry) == {"champion": v1}


def test_of_people_approving_at_once_exactly_one_moves_the_champion(store_urls):
    import threading

    from champion.registry import connect, history

    setup = connect(*store_urls)
    v1, v2 = make_versions(setup, "clf", [0.8, 0.9])
    promote(setup, "clf", v1, reason="first")
    request_approval(setup, "clf", v2, "direct", v1, GATE, {}, hours=24, actor="scheduler")
    people = 4
    barrier, outcomes = threading.Barrier(people), {}

    def decide(i: int) -> None:
        reg = connect(*store_urls)
        barrier.wait()
        try:
            outcomes[i] = approve(
                reg, "clf", v2, reason=f"reviewer {i} says yes", actor=f"reviewer-{i}"
            ).allowed
        except ChampionError as err:
            outcomes[i] = str(err)
        finally:
            reg.close()

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(people)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    winners = [i for i, o in outcomes.items() if o is True]
    assert len(winners) == 1, outcomes
    for i, o in outcomes.items():
        if i not in winners:
            assert "being approved by reviewer" in o or "already approved by reviewer" in o, o
    moves = [e for e in history(setup, "clf") if e.alias == "champion"]
    assert [(e.to_version, e.actor) for e in moves] == [(v1, "pytest"), (v2, f"reviewer-{winners[0]}")]
    assert recent(setup, "clf")[0].status == "approved"
    setup.close()


def test_an_approval_cut_off_mid_move_is_settled_from_the_aliases(registry, waiting, monkeypatch):
    import champion.registry as registry_module

    v1, v2, _ = waiting
    promote_on_gate = registry_module.promote_on_gate
    monkeypatch.setattr(registry_module, "promote_on_gate", _dies)
    with pytest.raises(KeyboardInterrupt):
        approve(registry, "clf", v2, reason="ok", actor="ana")
    assert [p.version for p in pending_promotions(registry, "clf")] == [v2]  # it waits again
    assert _aliases(registry) == {"champion": v1}

    # A process killed between its claim and its end leaves the claim; after STALE_CLAIM it is settled.
    from champion.approval import DECIDING, _claim

    _claim(registry, "clf", v2, "ok", "ana", None, DECIDING)
    assert pending_promotions(registry, "clf") == []  # claimed: nobody else can decide it meanwhile
    with pytest.raises(ChampionError, match="being approved by ana"):
        approve(registry, "clf", v2, reason="me too", actor="bob")
    later = datetime.now(UTC) + timedelta(minutes=6)
    assert [p.version for p in pending_promotions(registry, "clf", now=later)] == [v2]  # nothing had moved
    assert story(registry, "clf")[-1]["action"] == "approval_recovered"

    # Killed after its move: the champion points at the version, so the claim settles as approved.
    monkeypatch.setattr(registry_module, "promote_on_gate", promote_on_gate)
    _claim(registry, "clf", v2, "ok", "ana", None, DECIDING)
    promote_on_gate(registry, "clf", v2, v1, GATE, {}, reason="approved by ana: ok", actor="ana")
    assert pending_promotions(registry, "clf", now=later) == []
    assert (recent(registry, "clf")[0].status, recent(registry, "clf")[0].decided_by) == ("approved", "ana")


def _dies(*_args, **_kwargs):
    raise KeyboardInterrupt
