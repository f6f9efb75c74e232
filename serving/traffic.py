"""Traffic policies: which arm answers each request, and the canary's promote-or-roll-back decision."""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
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

    A request with a key (e.g. a user id) is placed by a hash of the key and `salt` instead of a random
    draw: one user sees one model in every request and every worker. The server's salt is its secret and
    the challenger's version (serving/server.py `traffic_secret`): nobody outside can pick keys that land
    on the canary, and a new challenger draws its share of users afresh.
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


MAX_CLIENTS = 10_000  # distinct clients one canary keeps tallies for; later newcomers are not evidence


@dataclass
class CanaryStats:
    """What the canary has shown so far for one (champion, challenger) pair: one worker's, or the sum of all
    workers' (`combined`). Latencies are kept as a sparse histogram, so workers' counts add up exactly.

    `clients` holds [answers, errors, agreements] per client (a keyed hash of its address): the guardrails
    are judged on these, each client weighing at most `max_per_client` answers (see `counted`)."""

    champion: str
    challenger: str
    requests: int = 0
    errors: int = 0
    agreements: int = 0
    latency_buckets: dict[int, int] = field(default_factory=dict)
    workers: int = 1
    clients: dict[str, list[int]] = field(default_factory=dict)
    since: float | None = None  # time.time() of the first canary answer (the earliest worker's)

    def add(
        self,
        n: int,
        errors: int,
        agreements: int,
        latency_ms: float,
        client: str = "",
        cap: int | None = None,
    ) -> None:
        """Add `n` canary answers from one client; `latency_ms` is per answer. A client's answers past `cap`
        in this worker add no latency (its other counts are weighed down in `counted`)."""
        tally = self.clients.get(client)
        if tally is None:
            if len(self.clients) >= MAX_CLIENTS:
                return
            tally = self.clients[client] = [0, 0, 0]
        room = n if cap is None else max(0, min(n, cap - tally[0]))
        tally[0], tally[1], tally[2] = tally[0] + n, tally[1] + errors, tally[2] + agreements
        self.requests += n
        self.errors += errors
        self.agreements += agreements
        if self.since is None:
            self.since = time.time()
        if room:
            bucket = latency_bucket(latency_ms)
            self.latency_buckets[bucket] = self.latency_buckets.get(bucket, 0) + room

    def counted(self, cap: int | None = None) -> tuple[float, float, float]:
        """(answers, errors, agreements) with each client's counts scaled down to at most `cap` answers:
        one client's thousand answers count like `cap` of them, with the same error and agreement rates."""
        answers = errors = agreements = 0.0
        for n, e, a in self.clients.values():
            weight = 1.0 if cap is None or n <= cap else cap / n
            answers, errors, agreements = answers + n * weight, errors + e * weight, agreements + a * weight
        return answers, errors, agreements

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

    def evidence(self, cap: int | None = None, now: float | None = None) -> dict[str, Any]:
        answers, errors, agreements = self.counted(cap)
        answered = answers - errors
        now = time.time() if now is None else now
        return {
            "champion": self.champion,
            "challenger": self.challenger,
            "workers": self.workers,
            "requests": self.requests,
            "errors": self.errors,
            "clients": len(self.clients),
            "counted": round(answers, 3),
            "max_per_client": cap,
            "seconds": None if self.since is None else round(max(0.0, now - self.since), 1),
            "error_rate": round(errors / answers, 6) if answers else None,
            "agreement": round(agreements / answered, 6) if answered > 0 else None,
            "p99_ms": None if (p99 := self.p99_ms()) is None else round(p99, 3),
        }


def combined(champion: str, challenger: str, tallies: Sequence[CanaryStats]) -> CanaryStats:
    """The sum of several workers' stats for one pair (a client's counts add up over the workers)."""
    total = CanaryStats(champion, challenger, workers=len(tallies))
    for t in tallies:
        total.requests += t.requests
        total.errors += t.errors
        total.agreements += t.agreements
        for bucket, n in t.latency_buckets.items():
            total.latency_buckets[bucket] = total.latency_buckets.get(bucket, 0) + n
        for client, counts in t.clients.items():
            mine = total.clients.setdefault(client, [0, 0, 0])
            for i, value in enumerate(counts):
                mine[i] += value
        if t.since is not None and (total.since is None or t.since < total.since):
            total.since = t.since
    return total


def decide_canary(stats: CanaryStats, guard: CanaryConfig, now: float | None = None) -> CanaryDecision:
    """Roll back as soon as a guardrail breaks on enough evidence; promote once they held for long enough.

    Enough evidence, either way, means answers from `min_clients` distinct clients, each weighing at most
    `max_per_client` answers: a single client can neither promote nor roll back a canary."""
    ev = {**stats.evidence(guard.max_per_client, now), "guardrails": guard.model_dump()}
    counted, clients = ev["counted"], ev["clients"]
    if counted < guard.min_requests_to_fail or clients < guard.min_clients:
        return CanaryDecision(
            "continue",
            f"{counted:g} canary answers counted from {clients} of at least {guard.min_clients} clients so "
            "far; collecting evidence.",
            ev,
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
            f"canary v{stats.challenger} broke a guardrail after {counted:g} answers from {clients} clients: "
            + "; ".join(breaches)
            + ".",
            ev,
        )
    if counted < guard.min_requests:
        return CanaryDecision(
            "continue", f"guardrails hold after {counted:g} of {guard.min_requests} answers.", ev
        )
    if (ev["seconds"] or 0.0) < guard.min_seconds:
        return CanaryDecision(
            "continue",
            f"guardrails hold; the canary has run {ev['seconds'] or 0:g} of its {guard.min_seconds:g} s.",
            ev,
        )
    return CanaryDecision(
        "promote",
        f"canary v{stats.challenger} held every guardrail for {counted:g} answers from {clients} clients "
        f"over {ev['seconds']:g} s (error rate {ev['error_rate']:.4f}, p99 {ev['p99_ms']:.1f} ms, agreement "
        f"{ev['agreement']:.3f}).",
        ev,
    )


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
        self,
        champion: str,
        challenger: str,
        n: int,
        errors: int,
        agreements: int,
        latency_ms: float,
        client: str = "",
    ) -> None:
        """Add one client's canary outcomes (`latency_ms` per answer); a new pair starts from zero."""
        with self._lock:
            s = self._stats
            if s is None or (s.champion, s.challenger) != (champion, challenger):
                self._stats, self._combined = CanaryStats(champion, challenger), None
            self._stats.add(n, errors, agreements, latency_ms, client, self.guard.max_per_client)

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
            clients = {client: list(counts) for client, counts in s.clients.items()}
            return CanaryStats(s.champion, s.challenger, s.requests, s.errors, s.agreements,
                               dict(s.latency_buckets), clients=clients, since=s.since)  # fmt: skip

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
            return None if shown is None else shown.evidence(self.guard.max_per_client)
