"""The review queue: logged predictions chosen for a person to label, within a daily budget.

Beside the inference log (same database, sqlite or PostgreSQL). A selection pass reads the predictions
logged since the last pass and queues, per model and UTC day, at most `daily_budget` of them:

1. **the unbiased sample first**: every prediction whose seeded hash of its request id falls under
   `random_share`, whatever the model said about it (up to `random_budget_share` of the budget; beyond
   that the lowest hashes are kept, which is still a uniform sample). Its labels are the only review labels
   the gate's fresh holdout may use (pipelines/fresh.py);
2. **then the targeted rules, most useful first**: champion/challenger disagreement (shadow and canary
   arms), low confidence (`score < low_confidence`), and predictions made inside a window the drift check
   flagged. Each row records every rule it met and the sample it came from.

A reviewer answers with a label (one of the model's, or a new intent in free text) or skips. A label
becomes an inference-log feedback row with the reviewer as its actor, in the same transaction that marks
the queue row answered: nothing half-written.

    queue = ReviewQueue(log_url)
    queue.select("support-intents", ReviewConfig(daily_budget=200))
    item = queue.next("support-intents")
    queue.answer("support-intents", item.request_id, reviewer="ana", label="card_arrival")
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import Field

from champion.config import StrictModel, default_log_url, drift_store_url
from champion.db import create_tables, engine_for
from champion.errors import ChampionError

log = logging.getLogger(__name__)

RANDOM, TARGETED = "random", "targeted"
PENDING, LABELLED, SKIPPED = "pending", "labelled", "skipped"
RULES = ("random", "disagreement", "low_confidence", "drift_window")
_GAPS_KEPT = 10_000  # ids not yet visible at a pass (a PostgreSQL insert still committing), rechecked once


class ReviewConfig(StrictModel):
    daily_budget: int = Field(200, ge=1, le=1_000_000)  # queued rows per model and UTC day
    random_share: float = Field(0.01, ge=0, le=1)  # of all logged predictions: the unbiased sample
    random_budget_share: float = Field(0.25, ge=0, le=1)  # of the budget the unbiased sample may take
    low_confidence: float = Field(0.5, ge=0, le=1)  # a top-label score below this is worth a look
    disagreement: bool = True  # shadow/canary answers that differ from the champion's
    drift_windows: bool = True  # predictions inside a window the drift check flagged
    top_labels: int = Field(5, ge=1, le=50)  # the model's best guesses shown to the reviewer
    seed: int = 0  # part of the random sample's hash
    drift_store_url: str | None = None  # default: the inference log's database


_metadata = sa.MetaData()
review_items = sa.Table(
    "champion_review_queue",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("prediction_id", sa.Integer, nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("label", sa.String(256), nullable=False),  # what the model answered
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("choices", sa.Text, nullable=False),  # JSON [[label, probability], ...], best first
    sa.Column("sample", sa.String(16), nullable=False),  # random | targeted
    sa.Column("reasons", sa.String(128), nullable=False),  # the rules it met, comma-separated
    sa.Column("priority", sa.Float, nullable=False),
    sa.Column("day", sa.Date, nullable=False),  # the UTC day whose budget it counts against
    sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | labelled | skipped
    sa.Column("answer", sa.String(256)),
    sa.Column("new_intent", sa.Boolean),  # the answer is not one of the model's labels
    sa.Column("reviewer", sa.String(256)),
    sa.Column("reviewed_at", sa.DateTime(timezone=True)),
    sa.UniqueConstraint("model_name", "request_id", name="uq_champion_review_request"),
    sa.Index("ix_champion_review_next", "model_name", "status", "priority"),
    sa.Index("ix_champion_review_day", "model_name", "day"),
)
review_cursor = sa.Table(
    "champion_review_cursor",
    _metadata,
    sa.Column("model_name", sa.String(256), primary_key=True),
    sa.Column("last_id", sa.Integer, nullable=False),  # the newest prediction id a pass has considered
    sa.Column("gaps", sa.Text, nullable=False),  # JSON: ids below it not visible yet
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class ReviewItem:
    id: int
    model_name: str
    request_id: str
    model_version: str
    text: str
    label: str
    score: float
    choices: list[tuple[str, float]]
    sample: str
    reasons: tuple[str, ...]
    priority: float
    status: str = PENDING
    answer: str | None = None
    reviewer: str | None = None


@dataclass
class Selection:
    """What one selection pass did, for the log line, the CLI and the scheduler's history."""

    model_name: str
    considered: int = 0
    queued: dict[str, int] = field(default_factory=dict)  # by sample
    matched: dict[str, int] = field(default_factory=dict)  # by rule, before the budget
    over_budget: dict[str, int] = field(default_factory=dict)  # by sample: matched but not queued
    budget_left: int = 0

    @property
    def reason(self) -> str:
        queued = sum(self.queued.values())
        over = sum(self.over_budget.values())
        tail = f"; {over} more matched past the day's budget" if over else ""
        return (
            f"{queued} of {self.considered} new predictions queued for review "
            f"({self.queued.get(RANDOM, 0)} unbiased sample, {self.queued.get(TARGETED, 0)} targeted){tail}; "
            f"{self.budget_left} left in today's budget."
        )


def in_random_sample(request_id: str, share: float, seed: int = 0) -> float | None:
    """The request's place in the uniform sample (a hash fraction in [0, share)), or None if outside it."""
    digest = hashlib.sha256(f"review\x00{seed}\x00{request_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return u if u < share else None


def targeted_reasons(row: dict[str, Any], cfg: ReviewConfig, in_drift_window: bool) -> list[str]:
    """The targeted rules a logged prediction meets."""
    reasons = []
    if cfg.disagreement and row["arm"] in ("shadow", "canary") and row["agrees"] is False:
        reasons.append("disagreement")
    if row["score"] < cfg.low_confidence:
        reasons.append("low_confidence")
    if cfg.drift_windows and in_drift_window:
        reasons.append("drift_window")
    return reasons


def usefulness(reasons: list[str], score: float) -> float:
    """Targeted rows, most useful first: a disagreement between two models outranks one model's doubt,
    which outranks a drifted window's ordinary answer; within each, the less confident first. In [0, 1)."""
    weight = 0.5 if "disagreement" in reasons else 0.25 if "low_confidence" in reasons else 0.0
    return min(0.999, weight + (1.0 - score) * 0.25 + (0.25 if "drift_window" in reasons else 0.0))


class ReviewQueue:
    """The queue's tables in the inference log's database."""

    def __init__(self, url: str | None = None):
        from serving.inference_log import InferenceLog

        self.url = url or default_log_url()
        self.engine = engine_for(self.url)
        # The predictions and feedback tables, created by the log's own code (its upgrades included).
        InferenceLog(self.url, retention_days=None).engine.dispose()
        create_tables(self.engine, _metadata)

    def close(self) -> None:
        self.engine.dispose()

    # --- selection ------------------------------------------------------------------------------------

    def select(
        self,
        model_name: str,
        cfg: ReviewConfig,
        now: datetime | None = None,
        *,
        labels=None,
        chunk: int = 20_000,
    ) -> Selection:
        """Queue what the predictions logged since the last pass deserve, within today's budget.
        `labels(version)` gives a version's label order (default: read from the registry, once each)."""
        from serving.inference_log import predictions

        now = now or datetime.now(UTC)
        today = now.astimezone(UTC).date()
        result = Selection(model_name)
        labels_of = labels or _VersionLabels(model_name)
        drifted = self._drift_windows(model_name, cfg) if cfg.drift_windows else []
        with self.engine.begin() as conn:
            last_id, gaps = self._cursor(conn, model_name)
            used = self._used(conn, model_name, today)
            random_cap = int(cfg.daily_budget * cfg.random_budget_share)
            p = predictions.c
            columns = [p.id, p.request_id, p.at, p.model_version, p.arm, p.text, p.label, p.score, p.agrees,
                       p.probs]  # fmt: skip
            newest_seen = last_id
            # request_id -> (priority, sample, prediction id, reasons): rows are read a chunk at a time and
            # only this much of each match is kept, so a first pass over millions of rows stays small.
            candidates: dict[str, tuple[float, str, int, list[str]]] = {}

            def consider(batch) -> None:
                nonlocal newest_seen
                for row in batch:
                    newest_seen = max(newest_seen, row["id"])
                    result.considered += 1
                    at = _aware(row["at"]) if drifted else None
                    in_window = any(start <= at <= end for start, end in drifted)
                    u = in_random_sample(row["request_id"], cfg.random_share, cfg.seed)
                    reasons = targeted_reasons(row, cfg, in_window)
                    if u is not None:
                        reasons = ["random", *reasons]
                    for r in reasons:
                        result.matched[r] = result.matched.get(r, 0) + 1
                    if not reasons:
                        continue
                    sample = RANDOM if u is not None else TARGETED
                    # Random rows go first, ordered by their hash (still uniform); targeted by usefulness.
                    priority = 2.0 - u / max(cfg.random_share, 1e-12) if u is not None else usefulness(
                        reasons, row["score"]
                    )  # fmt: skip
                    best = candidates.get(row["request_id"])
                    if best is None or priority > best[0]:
                        candidates[row["request_id"]] = (priority, sample, row["id"], reasons)

            scan = [p.id, p.request_id, p.at, p.arm, p.score, p.agrees]  # what the rules read
            if gaps:
                query = sa.select(*scan).where(p.model_name == model_name, p.id.in_(sorted(gaps)))
                consider(conn.execute(query).mappings().all())
            newest = last_id
            while True:
                batch = conn.execute(
                    sa.select(*scan)
                    .where(p.model_name == model_name, p.id > newest)
                    .order_by(p.id)
                    .limit(chunk)
                ).mappings().all()  # fmt: skip
                consider(batch)
                if len(batch) < chunk:
                    break
                newest = batch[-1]["id"]
            known = self._queued_ids(conn, model_name, list(candidates))
            chosen = []
            for kind, cap in ((RANDOM, random_cap - used[RANDOM]), (TARGETED, None)):
                group = sorted(
                    (c for rid, c in candidates.items() if c[1] == kind and rid not in known),
                    key=lambda c: (-c[0], c[2]),
                )
                room = cfg.daily_budget - used[RANDOM] - used[TARGETED] - sum(1 for c in chosen)
                take = max(0, min(room, len(group), len(group) if cap is None else cap))
                chosen += group[:take]
                result.queued[kind] = take
                result.over_budget[kind] = len(group) - take
            if chosen:
                rows = self._rows(conn, [c[2] for c in chosen], columns)
                items = [(priority, sample, rows[pid], why) for priority, sample, pid, why in chosen]
                conn.execute(
                    review_items.insert(),
                    [_item_row(model_name, c, today, now, labels_of, cfg.top_labels) for c in items],
                )
            newest_id = newest_seen
            present = set(conn.execute(sa.select(p.id).where(p.id > last_id, p.id <= newest_id)).scalars())
            missing = set(range(last_id + 1, newest_id + 1)) - present  # ids of any model, not yet visible
            # A gap a pass ago that is still a gap was a skipped id (a retried batch), not a slow commit.
            self._save_cursor(conn, model_name, newest_id, sorted(missing)[-_GAPS_KEPT:], now)
            result.budget_left = cfg.daily_budget - used[RANDOM] - used[TARGETED] - len(chosen)
        log.info("review %s: %s", model_name, result.reason)
        return result

    def _rows(self, conn, ids: list[int], columns) -> dict[int, Any]:
        """The chosen predictions in full (text, probabilities), a few hundred at a time."""
        from serving.inference_log import predictions

        out = {}
        for i in range(0, len(ids), 500):
            query = sa.select(*columns).where(predictions.c.id.in_(ids[i : i + 500]))
            out.update({row["id"]: row for row in conn.execute(query).mappings()})
        return out

    def _cursor(self, conn, model_name: str) -> tuple[int, set[int]]:
        row = conn.execute(
            sa.select(review_cursor.c.last_id, review_cursor.c.gaps).where(
                review_cursor.c.model_name == model_name
            )
        ).first()
        return (0, set()) if row is None else (row.last_id, set(json.loads(row.gaps)))

    def _save_cursor(self, conn, model_name: str, last_id: int, gaps: list[int], now: datetime) -> None:
        values = {"last_id": last_id, "gaps": json.dumps(gaps), "updated_at": now}
        updated = conn.execute(
            review_cursor.update().where(review_cursor.c.model_name == model_name).values(**values)
        ).rowcount
        if not updated:
            conn.execute(review_cursor.insert().values(model_name=model_name, **values))

    def _used(self, conn, model_name: str, day: date) -> dict[str, int]:
        c = review_items.c
        query = (
            sa.select(c.sample, sa.func.count())
            .where(c.model_name == model_name, c.day == day)
            .group_by(c.sample)
        )
        counts = dict(conn.execute(query).all())
        return {RANDOM: counts.get(RANDOM, 0), TARGETED: counts.get(TARGETED, 0)}

    def _queued_ids(self, conn, model_name: str, request_ids: list[str]) -> set[str]:
        found: set[str] = set()
        c = review_items.c
        for i in range(0, len(request_ids), 500):
            part = request_ids[i : i + 500]
            query = sa.select(c.request_id).where(c.model_name == model_name, c.request_id.in_(part))
            found.update(conn.execute(query).scalars())
        return found

    def _drift_windows(self, model_name: str, cfg: ReviewConfig) -> list[tuple[datetime, datetime]]:
        """The time bounds of the windows the drift check flagged (the last 100 checks)."""
        from monitoring.store import DriftStore

        try:
            store = DriftStore(drift_store_url(cfg.drift_store_url, self.url))
        except sa.exc.SQLAlchemyError as err:
            log.warning("review: the drift history is unreadable (%s); drift windows are not used.", err)
            return []
        try:
            windows = []
            for check in store.history(model_name, limit=100, source="log"):
                first, last = check["window"].get("first_at"), check["window"].get("last_at")
                if check["status"] == "drift" and first and last:
                    windows.append(
                        (_aware(datetime.fromisoformat(first)), _aware(datetime.fromisoformat(last)))
                    )
            return windows
        finally:
            store.close()

    # --- reviewing --------------------------------------------------------------------------------------

    def next(self, model_name: str, skip_ids: tuple[int, ...] = ()) -> ReviewItem | None:
        """The pending item to review now: the highest priority, the oldest first among equals."""
        c = review_items.c
        query = (
            sa.select(review_items)
            .where(c.model_name == model_name, c.status == PENDING)
            .order_by(c.priority.desc(), c.id)
            .limit(1)
        )
        if skip_ids:
            query = query.where(c.id.not_in(list(skip_ids)))
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _item(row)

    def get(self, model_name: str, request_id: str) -> ReviewItem | None:
        c = review_items.c
        query = sa.select(review_items).where(c.model_name == model_name, c.request_id == request_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _item(row)

    def answer(
        self,
        model_name: str,
        request_id: str,
        reviewer: str,
        label: str | None = None,
        *,
        skip: bool = False,
        new_intent: bool = False,
        now: datetime | None = None,
    ) -> ReviewItem:
        """Record a reviewer's answer: a label (becomes feedback, same transaction) or a skip."""
        from serving.inference_log import feedback

        if not reviewer or not reviewer.strip():
            raise ChampionError("reviewer: say who reviewed it (a login or user name).")
        if skip == (label is not None):
            raise ChampionError("answer: give either a label or skip, not both and not neither.")
        if label is not None:
            label = " ".join(label.split())
            if not label or len(label) > 256 or "\x00" in label:
                raise ChampionError("label: give 1 to 256 printable characters (the true intent).")
        now = now or datetime.now(UTC)
        c = review_items.c
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(review_items).where(c.model_name == model_name, c.request_id == request_id)
            ).mappings().first()  # fmt: skip
            if row is None:
                raise ChampionError(
                    f"request_id: {request_id!r} is not in the review queue of {model_name!r}; "
                    "take one from the queue (champion review next)."
                )
            if row["status"] != PENDING:
                raise ChampionError(
                    f"request_id: {request_id!r} was already answered ({row['status']} by "
                    f"{row['reviewer']}); nothing changed."
                )
            values = {"reviewer": reviewer.strip()[:256], "reviewed_at": now}
            if skip:
                values.update(status=SKIPPED)
            else:
                known = {name for name, _ in json.loads(row["choices"])}
                values.update(
                    status=LABELLED, answer=label, new_intent=bool(new_intent or label not in known)
                )
                conn.execute(
                    feedback.insert().values(
                        request_id=request_id, label=label, at=now, actor=values["reviewer"]
                    )
                )
            done = conn.execute(
                review_items.update().where(c.id == row["id"], c.status == PENDING).values(**values)
            ).rowcount
            if not done:  # another reviewer answered it between our read and this write
                raise ChampionError(f"request_id: {request_id!r} was answered by someone else just now.")
        return self.get(model_name, request_id)

    def progress(self, model_name: str, cfg: ReviewConfig, now: datetime | None = None) -> dict[str, int]:
        """Today's numbers: queued, answered (labelled + skipped), pending overall, and the budget."""
        day = (now or datetime.now(UTC)).astimezone(UTC).date()
        c = review_items.c
        with self.engine.connect() as conn:
            today = dict(
                conn.execute(
                    sa.select(c.status, sa.func.count())
                    .where(c.model_name == model_name, c.day == day)
                    .group_by(c.status)
                ).all()
            )
            reviewed_today = conn.execute(
                sa.select(sa.func.count()).where(
                    c.model_name == model_name,
                    c.reviewed_at >= datetime.combine(day, datetime.min.time(), UTC),
                    c.reviewed_at < datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC),
                )
            ).scalar()
            pending = conn.execute(
                sa.select(sa.func.count()).where(c.model_name == model_name, c.status == PENDING)
            ).scalar()
        return {
            "budget": cfg.daily_budget,
            "queued_today": sum(today.values()),
            "reviewed_today": int(reviewed_today or 0),
            "pending": int(pending or 0),
        }

    def samples(self, model_name: str) -> dict[str, str]:
        """request_id -> sample (random | targeted) of every labelled queue row: the fresh split reads it."""
        c = review_items.c
        query = sa.select(c.request_id, c.sample).where(c.model_name == model_name, c.status == LABELLED)
        with self.engine.connect() as conn:
            return dict(conn.execute(query).all())


class _VersionLabels:
    """A version's label order (for its logged probability vectors), read once from the registry."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self._known: dict[str, tuple[str, ...] | None] = {}

    def __call__(self, version: str) -> tuple[str, ...] | None:
        if version not in self._known:
            self._known[version] = version_labels(self.model_name, version)
        return self._known[version]


def version_labels(model_name: str, version: str) -> tuple[str, ...] | None:
    """The labels of a registered version in its logits' order, from its model's config.json."""
    try:
        from champion.registry import connect
        from serving.model import checked_folder

        folder = checked_folder(connect().client, model_name, str(version))[0]  # the server's cache, checked
        for path in sorted(folder.rglob("config.json")):
            id2label = json.loads(path.read_text()).get("id2label")
            if id2label:
                return tuple(str(id2label[str(i)]) for i in range(len(id2label)))
        raise ChampionError("no config.json with id2label among its files")
    except Exception as err:  # the reviewer still sees the model's answer
        log.warning(
            "review: labels of %s v%s unreadable (%s); showing its answer only.", model_name, version, err
        )
        return None


def top_choices(label: str, score: float, probs: bytes | None, labels: tuple[str, ...] | None, k: int):
    """The model's k best labels with their probabilities (just its answer when no vector was logged)."""
    from serving.inference_log import decode_probs

    vector = decode_probs(probs)
    if vector is None or labels is None or len(vector) != len(labels):
        return [[label, round(float(score), 4)]]
    order = vector.argsort()[::-1][:k]
    return [[labels[i], round(float(vector[i]), 4)] for i in order]


def _item_row(model_name, candidate, day, now, labels_of, k) -> dict[str, Any]:
    priority, sample, row, reasons = candidate
    return {
        "model_name": model_name,
        "request_id": row["request_id"],
        "prediction_id": row["id"],
        "model_version": row["model_version"],
        "text": row["text"],
        "label": row["label"],
        "score": float(row["score"]),
        "choices": json.dumps(
            top_choices(row["label"], row["score"], row["probs"], labels_of(row["model_version"]), k)
        ),
        "sample": sample,
        "reasons": ",".join(reasons),
        "priority": float(priority),
        "day": day,
        "queued_at": now,
        "status": PENDING,
    }


def _item(row) -> ReviewItem:
    return ReviewItem(
        id=row["id"],
        model_name=row["model_name"],
        request_id=row["request_id"],
        model_version=row["model_version"],
        text=row["text"],
        label=row["label"],
        score=row["score"],
        choices=[(name, p) for name, p in json.loads(row["choices"])],
        sample=row["sample"],
        reasons=tuple(r for r in row["reasons"].split(",") if r),
        priority=row["priority"],
        status=row["status"],
        answer=row["answer"],
        reviewer=row["reviewer"],
    )


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
