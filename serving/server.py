"""The model server's logic, free of HTTP: route each text to an arm, answer, log, watch the canary.

`serving/service.py` wraps one `ModelServer` per BentoML worker. Kept apart so it can be driven directly
in tests and notebooks, and so the request path is plain Python that is easy to read top to bottom.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import queue
import random
import socket
import threading
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from champion.audit import current_actor
from champion.repair import version_label
from serving.config import ServeConfig, inference_log_url
from serving.follower import Follower, Served, Swap
from serving.inference_log import InferenceLog, PredictionRecord, SpoolFullError, encode_probs
from serving.metrics import metrics
from serving.model import LoadedModel, load_version, serve_forwards_from_one_thread
from serving.traffic import (
    CANARY_ARM,
    CHALLENGER_ARM,
    CHAMPION_ARM,
    SHADOW_ARM,
    CanaryMonitor,
    choose_arms,
    combined,
)

log = logging.getLogger(__name__)

SECRET_FILE = "keys/traffic.secret"  # under CHAMPION_HOME: salts sticky assignment and client identities
_UNCREDITED = 50_000  # canary outcomes kept until the HTTP layer names their client; the oldest go first


def settle_heap() -> float:
    """Collect once, then leave every object alive now out of the garbage collector's later passes.

    A worker holds about half a million objects once torch, transformers, MLflow and BentoML are imported
    and a model is loaded. Python's oldest-generation pass walks all of them: under load, measured in this
    service, that is a 300-500 ms stop every 2-3 s, the whole tail of its latency. `gc.freeze()` moves
    them to the permanent generation, so later passes only walk what requests create. Called once, after
    the first load and before the worker is ready: a full pass at a later swap would hold the GIL while
    requests wait (seconds in a large process), and the versions loaded later are a few thousand objects.
    Returns the seconds it took (one full pass)."""
    import gc

    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - started


class NotReadyError(RuntimeError):
    """No champion is loaded yet (none promoted, or still loading)."""


class Answer(BaseModel):
    """One prediction as the service returns it; every answer names the version that produced it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    request_id: str
    label: str
    score: float
    model: str
    version: str
    arm: str


class KeyedText(BaseModel):
    """A text with the key that keeps its sender on one arm of an A/B test or canary (e.g. a user id)."""

    model_config = ConfigDict(extra="forbid")

    text: str
    key: str


def split_keys(items: list) -> tuple[list[str], list[str | None] | None]:
    """The texts of a batch, and their keys (None for a plain text; None overall when no item has one)."""
    if all(isinstance(item, str) for item in items):
        return items, None
    texts, keys = [], []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            keys.append(None)
        else:  # a KeyedText, the service's own validated model of one, or a plain dict
            item = KeyedText.model_validate(item) if isinstance(item, dict) else item
            texts.append(item.text)
            keys.append(item.key)
    return texts, keys


class AnswerWithProbabilities(Answer):
    probabilities: dict[str, float]


class ModelServer:
    """One worker's state: the follower, the inference log, the shadow worker and the canary monitor."""

    def __init__(self, cfg: ServeConfig, registry=None, inference_log: InferenceLog | None = None):
        from champion.registry import connect

        self.cfg = cfg
        self.name = cfg.model
        self._heap_settled = False  # see settle_heap
        self.registry = registry or connect(cfg.tracking_uri)
        self.log = inference_log or InferenceLog(
            inference_log_url(cfg),
            spool_dir=cfg.log.spool_dir,
            max_spool_bytes=int(cfg.log.spool_max_mb * (1 << 20)),
            batch_size=cfg.log.batch_size,
            flush_seconds=cfg.log.flush_seconds,
            retention_days=cfg.log.retention_days,
        )
        self.metrics = metrics()
        self.canary = CanaryMonitor(cfg.traffic.canary)
        self.canary_decisions: list[Any] = []
        self._worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._canary_epochs: dict[tuple[str, str], int] = {}  # (champion, challenger) -> its audit event
        self._rng = random.Random()
        self._shadow: queue.Queue = queue.Queue(maxsize=cfg.traffic.shadow_queue)
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._refused: set[str] = set()  # versions refused as unsafe, audited once per worker
        self._serving: dict[str, tuple[str, str]] = {}  # alias -> (version, format) now served
        self._aliases_seen: tuple[int | None, float, dict[str, str]] | None = None  # token, when, aliases
        self.unaudited: dict[str, tuple[str | None, str | None]] = {}  # alias -> (audited, in MLflow)
        self._secret = traffic_secret()
        self._uncredited: OrderedDict[str, tuple] = OrderedDict()  # request id -> its canary outcome
        self._uncredited_lock = threading.Lock()
        self._canary_approval: dict[tuple[str, str, int], bool] = {}  # (pair, epoch) -> needs a person
        self.follower = Follower(
            name=self.name,
            read_aliases=self._read_aliases,
            load=self._load,
            poll_seconds=cfg.follow.poll_seconds,
            need_challenger=cfg.traffic.policy != "champion",
            keep_previous=cfg.follow.keep_previous,
            retry_failed_seconds=cfg.follow.retry_failed_seconds,
            on_swap=self._on_swap,
        )

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self, exit_with_parent: bool = False) -> ModelServer:
        """Load the champion and start following; `exit_with_parent` in a server worker (see below)."""
        import torch

        if exit_with_parent:  # flush only: closing the log would fail the requests still in flight
            exit_when_orphaned(lambda: self.log.flush(timeout=2.0))

        torch.set_num_threads(self.cfg.threads)
        self._prepare_forwards()
        self.log.start()
        self.follower.start()
        try:  # load the champion before taking traffic: no worker says "not ready" once /readyz said ok
            self.follower.sync_now(timeout=self.cfg.timeout_seconds)
        except TimeoutError:
            log.warning("%s: no champion loaded after %d s; serving 503 until one is", self.name,
                        self.cfg.timeout_seconds)  # fmt: skip
        if self.cfg.traffic.policy == "shadow":
            self._spawn(self._shadow_loop, "shadow")
        if self.cfg.traffic.policy == "canary":
            self._spawn(self._canary_loop, "canary")
        return self

    def _prepare_forwards(self) -> None:
        serve_forwards_from_one_thread(self.cfg.threads)  # one OpenMP team: see serving/model.py

    def _read_version(self, version: str):
        """Load and warm one version (the language-model server loads its own kind)."""
        return load_version(self.registry.client, self.name, version, self.cfg.device, self.cfg.max_tokens)

    def ready(self) -> bool:
        return self.follower.served.champion is not None

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise NotReadyError(self.not_ready_reason())
            time.sleep(0.05)

    def close(self, timeout: float = 30.0) -> int:
        """Stop following, finish shadow work, flush the inference log; returns records not written."""
        if self._closed.is_set():
            return 0
        self._closed.set()
        self.follower.stop()
        for thread in self._threads:
            thread.join(timeout)
        lost = self.log.close(timeout)
        self.registry.close()
        return lost

    # --- the request path -----------------------------------------------------------------------------

    def predict(self, texts: list, probabilities: bool = False, client: str | None = None) -> list[Answer]:
        """Answer a batch: each text goes to the arm the traffic policy picks, and is logged once.

        An item is a text, or a KeyedText whose key (e.g. a user id) keeps it on one arm (traffic.py).
        `client` is the sender's address, the canary's unit of evidence; without one (a batch gathered from
        several HTTP requests) the canary outcomes wait for `credit_canary` to name each answer's client."""
        started = time.perf_counter()
        texts, keys = split_keys(texts)
        served = self.follower.served  # one snapshot per batch: a swap never splits a batch
        champion = served.champion
        if champion is None:
            raise NotReadyError(self.not_ready_reason())
        challenger = served.challenger if distinct_challenger(served) else None
        salt = f"{self._secret}:{challenger.version}" if challenger is not None else ""  # never guessable
        arms = choose_arms(self.cfg.traffic, len(texts), challenger is not None, self._rng, keys, salt)

        # The champion scores its own texts and the canary's (to compare, and to fall back on).
        on_champion = [i for i, arm in enumerate(arms) if arm in (CHAMPION_ARM, CANARY_ARM)]
        on_challenger = [i for i, arm in enumerate(arms) if arm in (CHALLENGER_ARM, CANARY_ARM)]
        probs: dict[int, tuple[LoadedModel, Any]] = {}
        canary: list[tuple[int, bool, bool, float]] = []  # (text, challenger failed, agreed, ms per text)
        champion_rows = self._forward(champion, texts, on_champion, CHAMPION_ARM)
        probs.update({i: (champion, row) for i, row in zip(on_champion, champion_rows, strict=True)})
        champion_labels = {
            i: champion.labels[int(row.argmax())] for i, row in zip(on_champion, champion_rows, strict=True)
        }
        if on_challenger:
            chall_started = time.perf_counter()
            try:
                rows = self._forward(challenger, texts, on_challenger, arms[on_challenger[0]])
            except Exception:  # the champion answers instead; the canary guardrail counts it
                log.exception("challenger v%s failed on %d texts", challenger.version, len(on_challenger))
                rows = None
            chall_ms = (time.perf_counter() - chall_started) * 1000
            if rows is None:
                fallback = [i for i in on_challenger if i not in probs]
                for i, row in zip(
                    fallback, self._forward(champion, texts, fallback, CHAMPION_ARM), strict=True
                ):
                    probs[i] = (champion, row)
                for i in on_challenger:
                    arms[i] = CHAMPION_ARM
            else:
                probs.update({i: (challenger, row) for i, row in zip(on_challenger, rows, strict=True)})
            canary_idx = [i for i in on_challenger if i in champion_labels]
            if self.cfg.traffic.policy == "canary" and canary_idx:
                agrees = [
                    rows is not None and challenger.labels[int(probs[i][1].argmax())] == champion_labels[i]
                    for i in canary_idx
                ]
                per_text_ms = chall_ms / len(on_challenger)  # the batch's time shared by its texts
                canary = [(i, rows is None, a, per_text_ms) for i, a in zip(canary_idx, agrees, strict=True)]
                self._count_canary(challenger, rows is None, agrees)

        latency_ms = (time.perf_counter() - started) * 1000
        now = datetime.now(UTC)
        answers, records = [], []
        for i, text in enumerate(texts):
            model, row = probs[i]
            best = int(row.argmax())
            fields = {
                "request_id": uuid.uuid4().hex,
                "label": model.labels[best],
                "score": float(row[best]),
                "model": self.name,
                "version": model.version,
                "arm": arms[i],
            }
            if probabilities:
                probs_by_label = dict(zip(model.labels, map(float, row), strict=True))
                answer = AnswerWithProbabilities(**fields, probabilities=probs_by_label)
            else:
                answer = Answer(**fields)
            answers.append(answer)
            agrees = None if arms[i] != CANARY_ARM else answer.label == champion_labels[i]
            records.append(
                PredictionRecord(
                    answer.request_id,
                    now,
                    self.name,
                    model.version,
                    answer.arm,
                    text,
                    answer.label,
                    answer.score,
                    latency_ms,
                    agrees,
                    encode_probs(row),
                )
            )
        self.log.append(records)  # in the spool before anyone sees an answer: a kill loses none
        if canary:
            outcomes = [(records[i].request_id, *outcome) for i, *outcome in canary]
            self._hold_canary(champion.version, challenger.version, outcomes, client)
        self._count(answers)
        if self.cfg.traffic.policy == "shadow" and challenger is not None:
            self._offer_shadow(challenger, texts, answers)
        return answers

    def feedback(self, request_id: str, label: str) -> None:
        self.log.add_feedback(request_id, label)

    def reload(self, timeout: float = 120.0) -> dict[str, Any]:
        """Check the registry now instead of at the next poll; returns what is served afterwards."""
        self._aliases_seen = None  # read the history and MLflow again now, whatever the poll's token says
        served = self.follower.sync_now(timeout)
        return self.status(served)

    def status(self, served: Served | None = None) -> dict[str, Any]:
        served = served or self.follower.served
        return {
            "model": self.name,
            "policy": self.cfg.traffic.policy,
            "champion": served.champion.version if served.champion else None,
            "challenger": served.challenger.version if served.challenger else None,
            "previous": served.previous.version if served.previous else None,
            "ready": served.champion is not None,
            "last_error": self.follower.last_error,
            "canary": self.canary.snapshot() if self.cfg.traffic.policy == "canary" else None,
            "unaudited": {alias: {"audited": a, "in_mlflow": m} for alias, (a, m) in self.unaudited.items()},
        }

    # --- helpers --------------------------------------------------------------------------------------

    def _forward(self, model: LoadedModel, texts: list[str], idx: list[int], arm: str):
        if not idx:
            return []
        started = time.perf_counter()
        try:
            rows = model.predict_proba([texts[i] for i in idx], self.cfg.batching.forward_chunk)
        except Exception:
            self.metrics.errors.labels(self.name, model.version, arm, "model_error").inc(len(idx))
            raise
        self.metrics.model_latency.labels(self.name, model.version, arm).observe(
            time.perf_counter() - started
        )
        self.metrics.batch_size.labels(self.name, model.version, arm).observe(len(idx))
        return rows

    def _count(self, answers: list[Answer]) -> None:
        m = self.metrics
        for a in answers:
            m.requests.labels(self.name, a.version, a.arm).inc()
            m.predicted.labels(self.name, a.version, a.arm, a.label).inc()
            m.confidence.labels(self.name, a.version, a.arm).observe(a.score)
        m.log_pending.labels(self.name).set(self.log.pending)
        m.log_behind.labels(self.name).set(self.log.behind_seconds())
        m.log_database_up.labels(self.name).set(1 if self.log.database_up else 0)

    def _read_aliases(self) -> dict[str, str]:
        """The aliases as the audit history names them: what this server serves.

        A poll asks the history for its newest event id (one indexed query); the aliases are read again only
        when it changed, or every `full_check_seconds`. Each read also asks MLflow (~30 ms of CPU on sqlite)
        to compare: an alias MLflow shows elsewhere (moved in the MLflow UI or API) keeps its audited
        version, and is logged and exported as `champion_alias_unaudited` until a person adopts the move
        (`champion adopt`). A move whose process died between its audit row and MLflow is settled here as
        the next registry operation would (champion/repair.py)."""
        from champion.registry import alias_disagreements

        token = self.registry.audit.latest_event_id(self.name)  # unreachable: keep serving what we have
        cached = self._aliases_seen
        if (
            cached is not None
            and cached[0] == token
            and time.monotonic() - cached[1] < self.cfg.follow.full_check_seconds
        ):
            return cached[2]
        in_mlflow = self._mlflow_aliases()
        audited = self.registry.audit.aliases(self.name)
        if alias_disagreements(audited, in_mlflow) and self.registry.audit.has_pending(self.name):
            self._settle_moves()
            token = self.registry.audit.latest_event_id(self.name)
            audited = self.registry.audit.aliases(self.name)
        served = {alias: v for alias, v in audited.items() if alias in SERVED_ALIASES}
        mlflow_served = {alias: v for alias, v in in_mlflow.items() if alias in SERVED_ALIASES}
        self._report_unaudited(alias_disagreements(served, mlflow_served))
        self._aliases_seen = (token, time.monotonic(), served)
        return served

    def _mlflow_aliases(self) -> dict[str, str]:
        from mlflow.exceptions import MlflowException

        try:
            model = self.registry.client.get_registered_model(self.name)
        except MlflowException:
            return {}  # not registered yet: stay unready and keep looking
        return {alias: str(version) for alias, version in model.aliases.items()}

    def _settle_moves(self) -> None:
        """Settle alias moves announced in the history and not marked done: a live writer's finishes while
        we wait for the lock; a dead one's is marked done or aborted from where MLflow's alias is."""
        from champion.repair import settle_model

        with self.registry.audit.lock(self.name) as history:
            settle_model(self.registry, self.name, history)

    def _report_unaudited(self, found: dict[str, tuple[str | None, str | None]]) -> None:
        gauge = self.metrics.unaudited
        for alias in set(self.unaudited) - set(found):
            gauge.labels(self.name, alias).set(0)
            log.warning("%s: MLflow's '%s' agrees with the audit history again.", self.name, alias)
        for alias, (audited, in_mlflow) in found.items():
            gauge.labels(self.name, alias).set(1)
            if self.unaudited.get(alias) != (audited, in_mlflow):
                log.warning(
                    "%s: '%s' was moved to %s outside Champion (MLflow UI or API); still serving %s, as the "
                    "audit history says. Adopt the move with `champion adopt %s %s %s --reason ...`, or set "
                    "the alias back in MLflow.",
                    self.name, alias, version_label(in_mlflow), version_label(audited), self.name, alias,
                    in_mlflow or "none",
                )  # fmt: skip
        self.unaudited = found

    def _load(self, version: str) -> LoadedModel:
        from champion.audit import LoopEvent
        from champion.safety import UnsafeModelError

        try:
            loaded = self._read_version(version)
            if not self._heap_settled:  # the first load, before the worker is ready: off every request
                self._heap_settled = True
                log.info("v%s loaded; the heap settled in %.0f ms", version, settle_heap() * 1000)
            return loaded
        except UnsafeModelError as err:  # the follower keeps what it serves; the refusal goes in the history
            if version not in self._refused:
                self._refused.add(version)
                try:
                    event = LoopEvent(
                        self.name, "refused", str(err), version, {"action": "load", "pid": os.getpid()}
                    )
                    self.registry.audit.record(event)
                except Exception:
                    log.exception("could not audit the refusal of v%s", version)
            raise

    def _on_swap(self, swap: Swap, served: Served) -> None:
        m = self.metrics
        m.swaps.labels(self.name, swap.alias).inc()
        model = served.champion if swap.alias == "champion" else served.challenger
        serving = (swap.to_version, model.format if model is not None else "unknown")
        before = self._serving.get(swap.alias)
        if before is not None and before != serving:
            m.served.labels(self.name, swap.alias, *before).set(0)
        m.served.labels(self.name, swap.alias, *serving).set(1)
        self._serving[swap.alias] = serving

    def log_full_reason(self) -> str | None:
        """Why predictions are refused now: the inference log spool is at its bound (database down long)."""
        log = self.log
        if not log.spool_full:
            return None
        return (
            f"the inference log database has been unreachable long enough to fill the spool "
            f"({log.max_spool_bytes:,} bytes); predictions are refused until it is back: none goes unlogged."
        )

    def not_ready_reason(self) -> str:
        error = self.follower.last_error
        outside = self.unaudited.get("champion")
        if outside is not None and outside[0] is None:
            return (
                f"model '{self.name}' has no champion in the audit history: its 'champion' alias was set to "
                f"v{outside[1]} outside Champion (MLflow UI or API), which is not served until a person "
                f"adopts it: `champion adopt {self.name} champion {outside[1]} --reason ...`."
            )
        return (
            f"model '{self.name}' has no champion loaded yet"
            + (f" ({error})" if error else "")
            + f"; promote a version with `champion promote {self.name} VERSION --reason ...`."
        )

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=f"{name}-{self.name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    # --- shadow ---------------------------------------------------------------------------------------

    def _offer_shadow(self, challenger: LoadedModel, texts: list[str], answers: list[Answer]) -> None:
        try:
            self._shadow.put_nowait((challenger, texts, answers))
        except queue.Full:  # shadow scoring is best effort; the answer never waits for it
            self.metrics.shadow_skipped.labels(self.name).inc(len(texts))

    def _shadow_loop(self) -> None:
        while not (self._closed.is_set() and self._shadow.empty()):
            try:
                challenger, texts, answers = self._shadow.get(timeout=0.2)
            except queue.Empty:
                continue
            started = time.perf_counter()
            try:
                rows = self._forward(challenger, texts, list(range(len(texts))), SHADOW_ARM)
            except Exception:
                log.exception("shadow v%s failed on %d texts", challenger.version, len(texts))
                continue
            latency_ms = (time.perf_counter() - started) * 1000
            now = datetime.now(UTC)
            records = []
            for answer, text, row in zip(answers, texts, rows, strict=True):
                best = int(row.argmax())
                label = challenger.labels[best]
                agrees = label == answer.label
                records.append(
                    PredictionRecord(
                        answer.request_id,
                        now,
                        self.name,
                        challenger.version,
                        SHADOW_ARM,
                        text,
                        label,
                        float(row[best]),
                        latency_ms,
                        agrees,
                        encode_probs(row),
                    )
                )
                self.metrics.agreement.labels(self.name, challenger.version, SHADOW_ARM, str(agrees)).inc()
            try:
                self.log.append(records)
            except SpoolFullError:  # the answers went out already; a shadow copy is best effort
                self.metrics.shadow_skipped.labels(self.name).inc(len(records))

    # --- canary ---------------------------------------------------------------------------------------

    def _count_canary(self, challenger: LoadedModel, failed: bool, agrees: list[bool]) -> None:
        m, n = self.metrics, len(agrees)
        if failed:
            m.errors.labels(self.name, challenger.version, CANARY_ARM, "canary_error").inc(n)
        else:
            m.agreement.labels(self.name, challenger.version, CANARY_ARM, "True").inc(sum(agrees))
            m.agreement.labels(self.name, challenger.version, CANARY_ARM, "False").inc(n - sum(agrees))

    def _hold_canary(self, champion: str, challenger: str, outcomes: list[tuple], client: str | None) -> None:
        """Count a batch's canary outcomes for their client, or keep them until `credit_canary` names it."""
        if client is not None:
            self._credit(self._client_id(client), [(champion, challenger, *o[1:]) for o in outcomes])
            return
        with self._uncredited_lock:
            for request_id, *outcome in outcomes:
                self._uncredited[request_id] = (champion, challenger, *outcome)
            while len(self._uncredited) > _UNCREDITED:
                self._uncredited.popitem(last=False)

    def credit_canary(self, client: str | None, request_ids: list[str]) -> None:
        """The HTTP layer, once it answered one request: its answers came from `client` (the peer address).
        Canary answers that no request claims are never evidence."""
        if not self._uncredited:  # no canary running, or nothing waiting: no lock on the hot path
            return
        with self._uncredited_lock:
            found = [o for rid in request_ids if (o := self._uncredited.pop(rid, None)) is not None]
        if found and client:
            self._credit(self._client_id(client), found)

    def _credit(self, client_id: str, outcomes: list[tuple]) -> None:
        for champion, challenger, failed, agreed, ms in outcomes:
            self.canary.record(champion, challenger, 1, int(failed), int(agreed), ms, client_id)

    def _client_id(self, address: str) -> str:
        """A keyed hash of the client's address: the shared tallies hold no addresses."""
        return hmac.new(self._secret.encode(), address.encode(), hashlib.sha256).hexdigest()[:16]

    def _canary_loop(self) -> None:
        """Every `canary.sync_seconds`: publish this worker's canary stats to the inference log database,
        sum every worker's, and act on a verdict. While the database is down the canary waits (no verdict
        on part of the evidence); requests are answered as usual."""
        down = False
        while not self._closed.wait(self.cfg.traffic.canary.sync_seconds):
            try:
                self._judge_canary()
            except Exception as err:
                if not down:
                    log.warning("canary: the shared tallies are unreachable (%s); the verdict waits.", err)
                down = True
            else:
                down = False

    def _judge_canary(self) -> None:
        mine = self.canary.local()
        if mine is None:
            return
        pair = (mine.champion, mine.challenger)
        # The audit event that made this version challenger: an earlier canary of the same pair (rolled
        # back, then assigned again) is not this one.
        epoch = self.registry.audit.assigned_at(self.name, "challenger", mine.challenger) or 0
        if self._canary_epochs.setdefault(pair, epoch) != epoch:
            self._canary_epochs[pair] = epoch
            self.canary.restart()  # what this worker counted belongs to the earlier canary
            return
        self.log.publish_canary(self.name, epoch, self._worker_id, mine)
        tallies = self.log.read_canary(self.name, mine.champion, mine.challenger, epoch)
        decision = self.canary.judge(combined(mine.champion, mine.challenger, tallies))
        if decision is not None:  # the follower then picks up the alias move
            self._conclude_canary(mine.champion, mine.challenger, decision, epoch)

    def _needs_approval(self, challenger: str, epoch: int) -> bool:
        """`approval: required` in the canary's config, or a challenger that came through an approval (the
        retrain's `approval: required`): a person decides its promotion, not the traffic."""
        if self.cfg.traffic.canary.approval == "required":
            return True
        key = (self.name, challenger, epoch)
        if key not in self._canary_approval:
            event = self.registry.audit.event(epoch) if epoch else None
            self._canary_approval[key] = event is not None and "approval" in event.evidence
        return self._canary_approval[key]

    def _conclude_canary(self, champion: str, challenger: str, decision, epoch: int = 0) -> None:
        from champion.approval import request_canary_promotion
        from champion.registry import conclude_canary

        promote_it = decision.action == "promote"
        try:
            if promote_it and self._needs_approval(challenger, epoch):
                guard = self.cfg.traffic.canary
                outcome = request_canary_promotion(
                    self.registry, self.name, champion, challenger, decision.reason, decision.evidence,
                    guard.approval_hours, epoch, f"canary@{current_actor()}",
                )  # fmt: skip
                log.warning(
                    "canary: %s It waits for a person's approval (`champion approve %s %s`); nothing moved.",
                    decision.reason, self.name, challenger,
                )  # fmt: skip
                self.canary_decisions.append((decision, outcome))
                return
            outcome = conclude_canary(
                self.registry, self.name, champion, challenger, promote_it, decision.reason, decision.evidence
            )
        except Exception:
            log.exception("canary decision for v%s could not be recorded", challenger)
            return
        self.canary_decisions.append((decision, outcome))
        log.warning("canary: %s -> %s", decision.reason, outcome.reason)
        self.follower.sync_now()


SERVED_ALIASES = ("champion", "challenger")


def traffic_secret(home: Path | None = None) -> str:
    """The server's secret: made once in CHAMPION_HOME (mode 0600) and read by every worker after. It salts
    the sticky assignment (so no client can choose keys that land on the canary) and the client hashes."""
    from champion.config import home_secret

    return home_secret(SECRET_FILE, home)


def distinct_challenger(served: Served) -> bool:
    """A challenger that is also the champion adds nothing to route to."""
    return served.challenger is not None and served.challenger.version != served.champion.version


def exit_when_orphaned(cleanup, poll_seconds: float = 0.5, cleanup_seconds: float = 3.0) -> threading.Thread:
    """Exit this process soon after its parent dies: a BentoML worker whose `bentoml serve` was killed
    would otherwise keep the listening socket it inherited, and a restarted server could not bind.

    A daemon thread polls getppid() (a dead parent's children are re-parented); it then runs `cleanup`
    (a flush of the inference log, though its spool already holds every answered record: the next server
    writes what is left) for at most `cleanup_seconds`, and ends the process with os._exit, which skips
    anything that could hang.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        log.error("pid %d: the server process (pid %d) is gone; this worker exits too.", os.getpid(), parent)
        done = threading.Thread(target=cleanup, name="orphan-cleanup", daemon=True)
        done.start()
        done.join(cleanup_seconds)
        os._exit(1)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
