"""Approval before promotion: with `approval: required`, a version that passed the gate waits as a pending
promotion with its evidence until a person approves or rejects it, or it expires.

The pending promotions live in the audit database beside the alias history. Approving performs the move
the retrain would have made (champion directly, or challenger for the canary), through the same guarded
registry operation: if the champion changed since the gate compared against it, the approval is void and
nothing moves. Every request, approval, rejection and expiry is a step of `champion history`.

    pending = pending_promotions(reg, "support-intents")
    approve(reg, "support-intents", "7", reason="checked the per-class report", actor="ana")
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from champion.audit import LoopEvent, current_actor
from champion.db import create_tables
from champion.errors import ChampionError

PENDING, APPROVED, REJECTED, EXPIRED, VOID = "pending", "approved", "rejected", "expired", "void"
DECIDING = "deciding"  # claimed by one person's approval while its move runs; nobody else can decide it
AFTER_CANARY = "after_canary"  # a canary that held its guardrails, waiting for a person to promote it
STALE_CLAIM = timedelta(minutes=5)  # a claim this old belongs to a process that died mid-approval

_metadata = sa.MetaData()
pending_table = sa.Table(
    "champion_pending_promotions",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(256), nullable=False, index=True),
    sa.Column("version", sa.String(32), nullable=False),
    # direct (champion) | canary (challenger) | after_canary (a passed canary's champion, challenger retired)
    sa.Column("target", sa.String(16), nullable=False),
    sa.Column("compared_with", sa.String(32)),  # the champion the gate compared against
    sa.Column("gate_reason", sa.Text, nullable=False),
    sa.Column("evidence", sa.Text, nullable=False),  # JSON
    sa.Column("requested_by", sa.String(256), nullable=False),
    sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("decided_by", sa.String(256)),
    sa.Column("decided_at", sa.DateTime(timezone=True)),
    sa.Column("decision_reason", sa.Text),
)


@dataclass(frozen=True)
class PendingPromotion:
    id: int
    model_name: str
    version: str
    target: str
    compared_with: str | None
    gate_reason: str
    evidence: dict[str, Any]
    requested_by: str
    requested_at: datetime
    expires_at: datetime
    status: str
    decided_by: str | None = None
    decision_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in self.__dict__.items()}


_PREPARED: weakref.WeakSet = weakref.WeakSet()  # engines whose pending-promotions table exists


def _tables(reg) -> sa.Engine:
    engine = reg.audit.engine
    if engine not in _PREPARED:
        create_tables(engine, _metadata)
        _PREPARED.add(engine)
    return engine


def request_approval(
    reg,
    name: str,
    version: str,
    target: Literal["direct", "canary", "after_canary"],
    compared_with: str | None,
    gate_reason: str,
    evidence: dict[str, Any],
    hours: float,
    actor: str | None = None,
    now: datetime | None = None,
) -> PendingPromotion:
    """Record a gate pass as waiting for a person; an older pending promotion of the model is superseded."""
    now, actor = now or datetime.now(UTC), actor or current_actor()
    engine = _tables(reg)
    c = pending_table.c
    with engine.begin() as conn:
        conn.execute(
            pending_table.update()
            .where(c.model_name == name, c.status == PENDING)
            .values(status=VOID, decided_by=actor, decided_at=now,
                    decision_reason=f"superseded by v{version}, which passed the gate later")
        )  # fmt: skip
        new_id = conn.execute(
            pending_table.insert().values(
                model_name=name, version=str(version), target=target, compared_with=compared_with,
                gate_reason=gate_reason, evidence=json.dumps(evidence, sort_keys=True, default=str),
                requested_by=actor, requested_at=now, expires_at=now + timedelta(hours=hours), status=PENDING,
            )
        ).inserted_primary_key[0]  # fmt: skip
    item = _get(engine, int(new_id))
    _story(reg, item, "approval_requested",
           f"v{version} passed the gate and waits for approval until {item.expires_at:%Y-%m-%d %H:%M} UTC",
           actor)  # fmt: skip
    return item


def request_canary_promotion(
    reg,
    name: str,
    champion: str,
    challenger: str,
    reason: str,
    evidence: dict[str, Any],
    hours: float,
    epoch: int,
    actor: str | None = None,
) -> PendingPromotion:
    """A canary that held its guardrails under `approval: required`: its promotion waits for a person.
    Filed once per canary (`epoch`, the audit event that made the version challenger), whichever of the
    server's workers reaches the verdict first and however often it restarts."""
    for item in recent(reg, name):
        same = item.evidence.get("canary_epoch") == epoch
        if item.target == AFTER_CANARY and item.version == str(challenger) and same:
            return item
    evidence = {**evidence, "canary_epoch": epoch}
    return request_approval(reg, name, challenger, AFTER_CANARY, champion, reason, evidence, hours, actor)


def pending_promotions(reg, name: str | None = None, now: datetime | None = None) -> list[PendingPromotion]:
    """Promotions waiting for a person, oldest first (expired ones are marked so first)."""
    expire(reg, name, now)
    c = pending_table.c
    query = sa.select(pending_table).where(c.status == PENDING).order_by(c.id)
    if name is not None:
        query = query.where(c.model_name == name)
    with _tables(reg).connect() as conn:
        return [_item(r) for r in conn.execute(query).mappings()]


def recent(reg, name: str, limit: int = 20) -> list[PendingPromotion]:
    c = pending_table.c
    query = sa.select(pending_table).where(c.model_name == name).order_by(c.id.desc()).limit(limit)
    with _tables(reg).connect() as conn:
        return [_item(r) for r in conn.execute(query).mappings()]


def expire(reg, name: str | None = None, now: datetime | None = None) -> list[PendingPromotion]:
    """Mark pending promotions past their time as expired (audited); returns them."""
    now = now or datetime.now(UTC)
    _recover_stale_claims(reg, name, now)
    engine = _tables(reg)
    c = pending_table.c
    query = sa.select(pending_table).where(c.status == PENDING, c.expires_at <= now)
    if name is not None:
        query = query.where(c.model_name == name)
    gone = []
    with engine.begin() as conn:
        for row in conn.execute(query).mappings().all():
            reason = f"nobody approved it by {_aware(row['expires_at']):%Y-%m-%d %H:%M} UTC"
            done = conn.execute(
                pending_table.update().where(c.id == row["id"], c.status == PENDING)
                .values(status=EXPIRED, decided_by="champion", decided_at=now, decision_reason=reason)
            ).rowcount  # fmt: skip
            if done:
                gone.append(_item({**row, "status": EXPIRED, "decision_reason": reason}))
    for item in gone:
        _story(
            reg, item, "approval_expired", f"the promotion of v{item.version} expired: {item.decision_reason}"
        )
    return gone


def approve(reg, name: str, version: str, reason: str, actor: str | None = None, now=None):
    """Approve a pending promotion and make its move; returns the registry Decision of that move.

    The promotion is claimed first (one UPDATE, so of two people approving at once exactly one goes on),
    then moved, then marked approved (or void when the champion changed since the gate compared)."""
    from champion.registry import assign_challenger_on_gate, promote_after_canary, promote_on_gate

    actor = actor or current_actor()
    item = _claim(reg, name, version, reason, actor, now, DECIDING)
    approval = {
        "approved_by": actor,
        "reason": reason,
        "requested_by": item.requested_by,
        "requested_at": item.requested_at.isoformat(),
        "pending_id": item.id,
    }
    evidence = {**item.evidence, "approval": approval}
    move = {"canary": assign_challenger_on_gate, AFTER_CANARY: promote_after_canary}.get(
        item.target, promote_on_gate
    )
    try:
        moved = move(reg, name, item.version, item.compared_with, item.gate_reason, evidence,
                     reason=f"approved by {actor}: {reason}", actor=actor)  # fmt: skip
    except BaseException:
        _settle(reg, item.id, DECIDING, PENDING, None, None, None)  # nothing moved: it waits again
        raise
    status, why = (APPROVED, reason) if moved.allowed else (VOID, moved.reason)
    _settle(reg, item.id, DECIDING, status, actor, why, now)
    if not moved.allowed:
        summary = f"{actor}'s approval of v{item.version} moved nothing: {moved.reason}"
    elif item.target == "canary":
        summary = f"{actor} approved v{item.version} ({reason}); it is the challenger for the canary"
    else:
        summary = f"{actor} approved v{item.version} ({reason}); it is the champion"
    _story(reg, _get(_tables(reg), item.id), "approval", summary, actor)
    return moved


def reject(reg, name: str, version: str, reason: str, actor: str | None = None, now=None) -> PendingPromotion:
    """Reject a pending promotion: nothing moves, and the version stays registered."""
    actor = actor or current_actor()
    item = _claim(reg, name, version, reason, actor, now, REJECTED)
    _story(reg, item, "approval_rejected", f"{actor} rejected v{item.version}: {reason}", actor)
    return item


def _claim(reg, name: str, version: str, reason: str, actor: str, now, status: str) -> PendingPromotion:
    """Check a person's decision and take the pending promotion into `status` in one conditional UPDATE."""
    if not reason or not reason.strip():
        raise ChampionError("--reason: say why (it is kept in the audit history).")
    now = now or datetime.now(UTC)
    expire(reg, name, now)
    c = pending_table.c
    engine = _tables(reg)
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(pending_table).where(c.model_name == name, c.version == str(version))
            .order_by(c.id.desc()).limit(1)
        ).mappings().first()  # fmt: skip
    if row is None:
        raise ChampionError(
            f"VERSION: v{version} of '{name}' has no promotion waiting for approval; "
            f"see `champion pending {name}`."
        )
    item = _item(row)
    if item.status != PENDING:
        raise _decided(item)
    if actor == item.requested_by:
        raise ChampionError(
            f"the promotion of v{version} was requested by {actor}; a second person must decide it "
            "(set CHAMPION_ACTOR or log in as someone else)."
        )
    with engine.begin() as conn:
        won = conn.execute(
            pending_table.update().where(c.id == item.id, c.status == PENDING)
            .values(status=status, decided_by=actor, decided_at=now, decision_reason=reason.strip())
        ).rowcount  # fmt: skip
    if not won:
        raise _decided(_get(engine, item.id))
    return _get(engine, item.id)


def _decided(item: PendingPromotion) -> ChampionError:
    by = f" by {item.decided_by}" if item.decided_by else ""
    state = "being approved" if item.status == DECIDING else f"already {item.status}"
    return ChampionError(
        f"VERSION: the promotion of v{item.version} is {state}{by} ({item.decision_reason}); nothing changed."
    )


def _settle(reg, pending_id: int, was: str, status: str, actor, reason, now) -> None:
    c = pending_table.c
    values = {"status": status, "decided_by": actor, "decision_reason": reason,
              "decided_at": None if status == PENDING else now or datetime.now(UTC)}  # fmt: skip
    with _tables(reg).begin() as conn:
        conn.execute(pending_table.update().where(c.id == pending_id, c.status == was).values(**values))


def _recover_stale_claims(reg, name: str | None, now: datetime) -> None:
    """An approval whose process died between its claim and its end: settled from the registry's aliases
    (the alias points at the version: approved; else it waits again)."""
    from champion.registry import CHALLENGER, CHAMPION

    c = pending_table.c
    query = sa.select(pending_table).where(c.status == DECIDING, c.decided_at <= now - STALE_CLAIM)
    if name is not None:
        query = query.where(c.model_name == name)
    with _tables(reg).connect() as conn:
        stale = [_item(r) for r in conn.execute(query).mappings().all()]
    for item in stale:
        alias = CHALLENGER if item.target == "canary" else CHAMPION
        moved = reg.audit.aliases(item.model_name).get(alias) == item.version  # the history, not MLflow
        if moved:
            _settle(reg, item.id, DECIDING, APPROVED, item.decided_by, item.decision_reason, now)
        else:
            _settle(reg, item.id, DECIDING, PENDING, None, None, None)
        what = "its move had happened: approved" if moved else "nothing had moved: it waits again"
        _story(reg, _get(_tables(reg), item.id), "approval_recovered",
               f"the approval of v{item.version} by {item.decided_by} was cut off; {what}")  # fmt: skip


def _story(reg, item: PendingPromotion, kind: str, summary: str, actor: str | None = None) -> None:
    evidence = {"pending_id": item.id, "target": item.target, "status": item.status}
    reg.audit.record(LoopEvent(item.model_name, kind, summary, item.version, evidence, actor or ""))


def _get(engine, pending_id: int) -> PendingPromotion:
    with engine.connect() as conn:
        row = conn.execute(sa.select(pending_table).where(pending_table.c.id == pending_id)).mappings().one()
    return _item(row)


def _item(row) -> PendingPromotion:
    return PendingPromotion(
        id=row["id"],
        model_name=row["model_name"],
        version=row["version"],
        target=row["target"],
        compared_with=row["compared_with"],
        gate_reason=row["gate_reason"],
        evidence=json.loads(row["evidence"]),
        requested_by=row["requested_by"],
        requested_at=_aware(row["requested_at"]),
        expires_at=_aware(row["expires_at"]),
        status=row["status"],
        decided_by=row["decided_by"],
        decision_reason=row["decision_reason"],
    )


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
