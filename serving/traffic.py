"""Traffic policies: which arm answers each request, and the canary's promote-or-roll-back decision."""

from __future__ import annotations

import hashlib
import math
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from serving.config import CanaryConfig, TrafficConfig

CHAMPION_ARM, CHALLENGER_ARM, CANARY_ARM, SHADOW_ARM = "champion", "challenger", "canary", "shadow"


def choose_arms(
    traffic: TrafficConfig,
    n: int,
    has_challenger: bool,
    rng: random.Random,
    keys: Sequence[str | None] | None = None,
    salt: str = "",
) -> list[str]:
    """The arm that answers each of `n` requests; without a loaded challenger the champion answers all.

    A request with a key (e.g. a user id) is placed by a hash of the key and `salt` (the challenger's
    version) instead of a random draw: one user sees one model in every request and every worker, and a
    new challenger draws its share of users afresh.
    """
    if not has_challenger or traffic.policy in ("champion", "shadow"):
        return [CHAMPION_ARM] * n
    arm, share = (
        (CHALLENGER_ARM, traffic.challenger_weight)
        if traffic.policy == "ab"
        else (CANARY_ARM, traffic.canary.share)
    )
    draws = (
        rng.random() if keys is None or keys[i] is None else sticky_draw(keys[i], salt) for i in range(n)
    )
    return [arm if u < share else CHAMPION_ARM for u in draws]


def sticky_draw(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by the key and the salt, uniform over keys."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class CanaryDecision:
    action: str  # "continue" | "promote" | "rollback"
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


_BUCKET_BASE_MS, _BUCKET_RATIO = 0.01, 1.02  # latency buckets 2 % wide from 10 µs: p99 within 2 %


def latency_bucket(ms: float) -> int:
    """The histogram bucket of a latency; bucket k holds (base·r^(k-1), base·r^k]."""
    return max(0, math.ceil(math.log(max(ms, _BUCKET_BASE_MS) / _BUCKET_BASE_MS) / math.log(_BUCKET_RATIO)))


def bucket_upper_ms(bucket: int) -> float:
    return _BUCKET_BASE_MS * _BUCKET_RATIO**bucket


@dataclass
class CanaryStats:
    """What the canary has shown so far for one (champion, challenger) pair: one worker's, or the sum of all
    workers' (`combined`). Latencies are kept as a sparse histogram, so workers' counts add up exactly."""

    champion: str
    challenger: str
    requests: int = 0
    errors: int = 0
    agreements: int = 0
    latency_buckets: dict[int, int] = field(default_factory=dict)
    workers: int = 1

    def add(self, n: int, errors: int, agreements: int, latency_ms: float) -> None:
        self.requests += n
        self.errors += errors
        self.agreements += agreements
        bucket = latency_bucket(latency_ms)
        self.latency_buckets[bucket] = self.latency_buckets.get(bucket, 0) + n

    def p99_ms(self) -> float | None:
        """The 99th percentile, as the upper edge of its bucket (at most 2 % above the true value)."""
        total = sum(self.latency_buckets.values())
        if not total:
            return None
        rank, seen = min(total - 1, int(0.99 * total)), 0
        for bucket in sorted(self.latency_buckets):
            seen += self.latency_buckets[bucket]
            if seen > rank:
                return bucket_upper_ms(bucket)
        raise AssertionError("unreachable: the ranks add up to the total")

    def evidence(self) -> dict[str, Any]:
        answered = self.requests - self.errors
        return {
            "champion": self.champion,
            "challenger": self.challenger,
            "workers": self.workers,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 6) if self.requests else None,
            "agreement": round(self.agreements / answered, 6) if answered else None,
            "p99_ms": None if (p99 := self.p99_ms()) is None else round(p99, 3),
        }


def combined(champion: str, challenger: str, tallies: Sequence[CanaryStats]) -> CanaryStats:
    """The sum of several workers' stats for one pair."""
    total = CanaryStats(champion, challenger, workers=len(tallies))
    for t in tallies:
        total.requests += t.requests
        total.errors += t.errors
        total.agreements += t.agreements
        for bucket, n in t.latency_buckets.items():
            total.latency_buckets[bucket] = total.latency_buckets.get(bucket, 0) + n
    return total


def decide_canary(stats: CanaryStats, guard: CanaryConfig) -> CanaryDecision:
    """Roll back as soon as a guardrail breaks on enough evidence; promote once they held for long enough."""
    ev = {**stats.evidence(), "guardrails": guard.model_dump()}
    if stats.requests < guard.min_requests_to_fail:
        return CanaryDecision(
            "continue", f"{stats.requests} canary requests so far; collecting evidence.", ev
        )
    breaches = []
    if ev["error_rate"] is not None and ev["error_rate"] > guard.max_error_rate:
        breaches.append(f"error rate {ev['error_rate']:.4f} > {guard.max_error_rate}")
    if ev["p99_ms"] is not None and ev["p99_ms"] > guard.max_p99_ms:
        breaches.append(f"p99 latency {ev['p99_ms']:.1f} ms > {guard.max_p99_ms} ms")
    if ev["agreement"] is not None and ev["agreement"] < guard.min_agreement:
        breaches.append(f"agreement with the champion {ev['agreement']:.3f} < {guard.min_agreement}")
    if breaches:
        return CanaryDecision(
            "rollback",
            f"canary v{stats.challenger} broke a guardrail after {stats.requests} requests: "
            + "; ".join(breaches)
            + ".",
            ev,
        )
    if stats.requests >= guard.min_requests:
        return CanaryDecision(
            "promote",
            f"canary v{stats.challenger} held every guardrail for {stats.requests} requests (error rate "
            f"{ev['error_rate']:.4f}, p99 {ev['p99_ms']:.1f} ms, agreement {ev['agreement']:.3f}).",
            ev,
        )
    return CanaryDecision("continue", f"guardrails hold after {stats.requests} of {guard.min_requests}.", ev)


class CanaryMonitor:
    """One worker's canary outcomes for the pair it serves now, and its verdict, reached once per pair.

    The request path calls `record` (counters only). The server's canary thread publishes `local()` to the
    inference log database, reads back the tallies of every worker, and passes their sum to `judge`: the
    guardrails are judged on all workers' traffic together (serving/server.py `_canary_loop`).
    """

    def __init__(self, guard: CanaryConfig):
        self.guard = guard
        self._lock = threading.Lock()
        self._stats: CanaryStats | None = None
        self._combined: CanaryStats | None = None
        self._decided: set[tuple[str, str]] = set()

    def record(
        self, champion: str, challenger: str, n: int, errors: int, agreements: int, latency_ms: float
    ) -> None:
        """Add one batch's canary outcomes; a new pair starts from zero."""
        with self._lock:
            s = self._stats
            if s is None or (s.champion, s.challenger) != (champion, challenger):
                self._stats, self._combined = CanaryStats(champion, challenger), None
            self._stats.add(n, errors, agreements, latency_ms)

    def restart(self) -> None:
        """Forget the current pair's stats and verdict: the same pair is being canaried anew."""
        with self._lock:
            if self._stats is not None:
                self._decided.discard((self._stats.champion, self._stats.challenger))
            self._stats = self._combined = None

    def local(self) -> CanaryStats | None:
        """A copy of this worker's stats for the current pair (None before its first canary request)."""
        with self._lock:
            if self._stats is None:
                return None
            s = self._stats
            return CanaryStats(s.champion, s.challenger, s.requests, s.errors, s.agreements,
                               dict(s.latency_buckets))  # fmt: skip

    def judge(self, total: CanaryStats) -> CanaryDecision | None:
        """The verdict on all workers' stats for a pair, the first time one is reached in this worker."""
        with self._lock:
            key = (total.champion, total.challenger)
            self._combined = total
            if key in self._decided:
                return None
            decision = decide_canary(total, self.guard)
            if decision.action == "continue":
                return None
            self._decided.add(key)
            return decision

    def snapshot(self) -> dict[str, Any] | None:
        """All workers' stats as last read, else this worker's own."""
        with self._lock:
            shown = self._combined or self._stats
            return None if shown is None else shown.evidence()
