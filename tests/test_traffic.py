"""Traffic policies and the canary decision: pure functions, checked without a model."""

from __future__ import annotations

import random

import pytest

from serving.config import CanaryConfig, TrafficConfig
from serving.traffic import CanaryMonitor, CanaryStats, choose_arms, decide_canary


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
    s = CanaryStats("1", "2", requests, errors, requests - errors if agreements is None else agreements)
    s.latencies_ms.extend([latency] * requests)
    return s


GUARD = CanaryConfig(min_requests=100, min_requests_to_fail=20, max_error_rate=0.05, max_p99_ms=50,
                     min_agreement=0.8)  # fmt: skip


def test_canary_waits_for_evidence_then_promotes():
    assert decide_canary(_stats(10, errors=10), GUARD).action == "continue"  # too few to judge
    assert decide_canary(_stats(60), GUARD).action == "continue"
    decision = decide_canary(_stats(100), GUARD)
    assert decision.action == "promote"
    assert "held every guardrail for 100 requests" in decision.reason
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
    decisions = [monitor.record("1", "2", 10, 0, 10, 5.0) for _ in range(12)]
    made = [d for d in decisions if d is not None]
    assert len(made) == 1 and made[0].action == "promote"
    assert monitor.record("1", "2", 10, 0, 10, 5.0) is None  # already decided
    assert monitor.record("2", "3", 30, 0, 0, 5.0).action == "rollback"  # a new pair starts from zero


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
