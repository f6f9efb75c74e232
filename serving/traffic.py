"""Traffic policies: which arm answers each request, and the canary's promote-or-roll-back decision."""

from __future__ import annotations

import hashlib
import random
import threading
from collections import deque
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


@dataclass
class CanaryStats:
    """What the canary has shown so far for one (champion, challenger) pair, in this worker."""

    champion: str
    challenger: str
    requests: int = 0
    errors: int = 0
    agreements: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=5_000))

    def p99_ms(self) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def evidence(self) -> dict[str, Any]:
        answered = self.requests - self.errors
        return {
            "champion": self.champion,
            "challenger": self.challenger,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 6) if self.requests else None,
            "agreement": round(self.agreements / answered, 6) if answered else None,
            "p99_ms": None if (p99 := self.p99_ms()) is None else round(p99, 3),
        }


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
    """Collects canary outcomes across batches and hands out a decision once, per challenger."""

    def __init__(self, guard: CanaryConfig):
        self.guard = guard
        self._lock = threading.Lock()
        self._stats: CanaryStats | None = None
        self._decided: set[tuple[str, str]] = set()

    def record(
        self, champion: str, challenger: str, n: int, errors: int, agreements: int, latency_ms: float
    ) -> CanaryDecision | None:
        """Add one batch's canary outcomes; returns a decision the first time one is reached."""
        with self._lock:
            key = (champion, challenger)
            if key in self._decided:
                return None
            if self._stats is None or (self._stats.champion, self._stats.challenger) != key:
                self._stats = CanaryStats(champion, challenger)
            s = self._stats
            s.requests += n
            s.errors += errors
            s.agreements += agreements
            s.latencies_ms.extend([latency_ms] * n)
            decision = decide_canary(s, self.guard)
            if decision.action == "continue":
                return None
            self._decided.add(key)
            return decision

    def snapshot(self) -> dict[str, Any] | None:
        with self._lock:
            return None if self._stats is None else self._stats.evidence()
