"""Traffic policies and the canary decision: pure functions, checked without a model."""

from __future__ import annotations

import random

import pytest

from serving.config import CanaryConfig, TrafficConfig
from serving.traffic import CanaryMonitor, CanaryStats, choose_arms, combined, decide_canary


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("champion", {"champion"}), ("shadow", {"champion"}), ("ab", {"champion", "challenger"})],
)
def test_arms_per_policy(policy, expected):
    arms = choose_arms(TrafficConfig(policy=policy, challenger_weight=0.5), 400, True, random.Random(0))
    assert set(arms) == expected


def test_ab_and_canary_shares_follow_the_config():
    rng = random.Random(1)
    ab = choose_arms(TrafficConfig(policy="ab", challenger_weight=0.2), 20_000, True, rng)
    assert abs(ab.count("challenger") / len(ab) - 0.2) < 0.015
    canary = choose_arms(TrafficConfig(policy="canary", canary={"share": 0.05}), 20_000, True, rng)
    assert abs(canary.count("canary") / len(canary) - 0.05) < 0.01


def test_without_a_challenger_the_champion_answers_everything():
    for policy in ("ab", "canary", "shadow"):
        assert set(choose_arms(TrafficConfig(policy=policy), 100, False, random.Random(0))) == {"champion"}


def _stats(requests, errors=0, agreements=None, latency=10.0):
    s = CanaryStats("1", "2")
    s.add(requests, errors, requests - errors if agreements is None else agreements, latency)
    return s


# The guardrails alone: one client may decide, with no cap and no wait (the client rules are tested below).
GUARD = CanaryConfig(min_requests=100, min_requests_to_fail=20, max_error_rate=0.05, max_p99_ms=50,
                     min_agreement=0.8, min_clients=1, max_per_client=1_000_000, min_seconds=0)  # fmt: skip


def test_canary_waits_for_evidence_then_promotes():
    assert decide_canary(_stats(10, errors=10), GUARD).action == "continue"  # too few to judge
    assert decide_canary(_stats(60), GUARD).action == "continue"
    decision = decide_canary(_stats(100), GUARD)
    assert decision.action == "promote"
    assert "held every guardrail for 100 answers from 1 clients" in decision.reason
    assert decision.evidence["requests"] == 100 and decision.evidence["agreement"] == 1.0


@pytest.mark.parametrize(
    ("stats", "words"),
    [
        (_stats(40, errors=5), "error rate"),
        (_stats(40, latency=80.0), "p99 latency"),
        (_stats(40, agreements=20), "agreement"),
    ],
)
def test_each_broken_guardrail_rolls_back_and_says_which(stats, words):
    decision = decide_canary(stats, GUARD)
    assert decision.action == "rollback"
    assert words in decision.reason
    assert decision.evidence["guardrails"]["max_p99_ms"] == 50


def test_monitor_decides_once_per_pair_and_restarts_for_a_new_challenger():
    monitor = CanaryMonitor(GUARD)
    for _ in range(12):
        monitor.record("1", "2", 10, 0, 10, 5.0)
    mine = monitor.local()
    assert (mine.requests, mine.agreements, mine.p99_ms()) == (120, 120, pytest.approx(5.0, rel=0.02))
    assert monitor.judge(mine).action == "promote"
    assert monitor.judge(mine) is None  # already decided
    monitor.record("2", "3", 30, 0, 0, 5.0)  # a new pair starts from zero
    assert monitor.local().requests == 30 and monitor.judge(monitor.local()).action == "rollback"
    monitor.restart()  # the same pair canaried anew: no stats, and a verdict can be reached again
    assert monitor.local() is None
    monitor.record("2", "3", 30, 0, 0, 5.0)
    assert monitor.judge(monitor.local()).action == "rollback"


def test_guardrails_are_judged_on_every_workers_traffic_together():
    """Two workers with 60 canary requests each: neither alone reaches min_requests (100), together they
    do; one worker's slow batches set the combined p99, and the counts add up exactly."""
    fast, slow = _stats(60, latency=10.0), _stats(60, agreements=50, latency=10.0)
    assert decide_canary(fast, GUARD).action == decide_canary(slow, GUARD).action == "continue"
    total = combined("1", "2", [fast, slow])
    assert (total.requests, total.agreements, total.workers) == (120, 110, 2)
    decision = decide_canary(total, GUARD)
    assert decision.action == "promote" and decision.evidence["workers"] == 2, decision.reason
    slow.add(3, 0, 3, 400.0)  # 3 of 123 answers slow: above the 99th percentile's rank
    assert decide_canary(combined("1", "2", [fast, slow]), GUARD).action == "rollback"


def test_p99_comes_from_the_histogram_within_two_percent():
    stats = CanaryStats("1", "2")
    for ms in range(1, 1001):  # 1..1000 ms, one batch each
        stats.add(1, 0, 1, float(ms))
    assert 990 <= stats.p99_ms() <= 990 * 1.02
    assert CanaryStats("1", "2").p99_ms() is None


def test_a_key_keeps_its_sender_on_one_arm_and_a_new_challenger_draws_afresh():
    ab = TrafficConfig(policy="ab", challenger_weight=0.3)
    users = [f"user-{i}" for i in range(4000)]
    first = choose_arms(ab, len(users), True, random.Random(1), users, salt="7")
    again = choose_arms(ab, len(users), True, random.Random(2), users, salt="7")  # another worker, rng
    assert first == again
    assert abs(first.count("challenger") / len(users) - 0.3) < 0.03  # the configured share of users
    other = choose_arms(ab, len(users), True, random.Random(1), users, salt="8")  # the next challenger
    assert 0.3 < sum(a != b for a, b in zip(first, other, strict=True)) / len(users) < 0.5
    canary = TrafficConfig(policy="canary", canary={"share": 0.1})
    mixed = [None, "user-1", None, "user-1"]  # unkeyed requests still draw at random
    arms = choose_arms(canary, 4, True, random.Random(0), mixed, salt="7")
    assert arms[1] == arms[3] and set(arms) <= {"champion", "canary"}


# --- who decides a canary (issue 24 item 6): clients, not requests -----------------------------------

CLIENTS = CanaryConfig(min_requests=100, min_requests_to_fail=20, max_error_rate=0.05, max_p99_ms=50,
                       min_agreement=0.8, min_clients=5, max_per_client=20, min_seconds=0)  # fmt: skip


def test_one_client_never_decides_a_canary_however_many_requests_it_sends():
    monitor = CanaryMonitor(CLIENTS)
    for _ in range(1_000):
        monitor.record("1", "2", 10, 0, 10, 1.0, client="attacker")  # a perfect challenger, 10,000 answers
    assert monitor.judge(monitor.local()) is None
    decision = decide_canary(monitor.local(), CLIENTS)
    assert decision.action == "continue" and "from 1 of at least 5 clients" in decision.reason
    assert decision.evidence["counted"] == 20  # its 10,000 answers count as 20
    flop = CanaryMonitor(CLIENTS)
    flop.record("1", "2", 500, 500, 0, 900.0, client="attacker")  # nor can it force a rollback
    assert decide_canary(flop.local(), CLIENTS).action == "continue"


def test_a_flooding_client_weighs_like_one_client_among_many():
    stats = CanaryStats("1", "2")
    for i in range(6):
        stats.add(20, 0, 20, 5.0, client=f"user-{i}", cap=20)  # six clients, all in agreement
    stats.add(5_000, 0, 0, 5.0, client="flood", cap=20)  # one client whose every answer disagrees
    decision = decide_canary(stats, CLIENTS)
    assert decision.evidence["counted"] == 140 and decision.evidence["clients"] == 7
    assert decision.evidence["agreement"] == pytest.approx(120 / 140)
    assert decision.action == "promote", decision.reason  # without the cap, agreement would be 0.02
    stats.add(5_000, 0, 5_000, 900.0, client="slow", cap=20)  # its latencies count 20 times, too
    assert sum(stats.latency_buckets.values()) == 160 and stats.requests == 10_120


def test_a_canary_promotes_only_after_min_seconds_and_workers_add_up_per_client():
    a, b = CanaryStats("1", "2"), CanaryStats("1", "2")
    for i in range(5):
        a.add(10, 0, 10, 5.0, client=f"user-{i}", cap=20)
        b.add(15, 0, 15, 5.0, client=f"user-{i}", cap=20)  # the same clients on another worker
    total = combined("1", "2", [a, b])
    assert total.clients["user-0"] == [25, 0, 25] and total.counted(20)[0] == 100  # capped across workers
    slow = CLIENTS.model_copy(update={"min_seconds": 600})
    decision = decide_canary(total, slow, now=total.since + 60)
    assert decision.action == "continue" and "60 of its 600 s" in decision.reason
    assert decide_canary(total, slow, now=total.since + 601).action == "promote"
