"""`champion console`: server-rendered pages for the people in the loop, on loopback by default.

One page per model (champion and challenger, the loop's story from the audit history, drift over time,
links to the Evidently reports and MLflow runs, the promotions waiting for approval) and a review page
(one text at a time with the model's best labels, keyboard shortcuts, progress against the day's budget).

Reading needs a login; so does every action, which also needs the session's CSRF token in the form and,
when the browser sends one, an Origin equal to the console's own. The session cookie is HttpOnly and
SameSite=Strict, so another site cannot ride on it. Every account has a role: a labeller reads and answers
reviews, an approver also approves or rejects pending promotions, an admin may do everything. Scripts act
as a person with that person's token (`champion console-token NAME`, sent as `Authorization: Bearer`),
which a browser never sends on its own; the actor is always the credential's account. The service's ingest
key (CHAMPION_FEEDBACK_KEY) is no console credential. Accounts live in CHAMPION_HOME/console-users.json as
scrypt hashes, tokens as sha256 hashes (`champion console-user`, `champion console-token`). A password or
role change ends the account's sessions. Requests naming another Host than the console's are refused, so a
DNS-rebinding page cannot reach it.

    app = create_app()                      # a Starlette app; `champion console` runs it with uvicorn
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from champion.config import redact_uri
from champion.errors import ChampionError

log = logging.getLogger("champion_cli.console")

USERS_FILE = "console-users.json"
KEYS_DIR = "keys"  # under CHAMPION_HOME: console tokens are written here, one 0600 file per account
SESSION_COOKIE = "champion_console"
SESSION_HOURS = 12
ROLES = ("labeller", "approver", "admin")  # each may do what the one before it may, and more
DEFAULT_ROLE = "labeller"  # an account saved before roles existed: the least it could have been meant to be
DECIDERS = ("approver", "admin")  # who may approve or reject a pending promotion
MAX_FAILED_LOGINS = 5  # per (name, client address), within LOCKOUT_SECONDS; then that pair waits
LOCKOUT_SECONDS = 300
MAX_TRACKED_NAMES = 10_000
PASSWORD_CHECKS_AT_ONCE = 2  # scrypt runs, all clients together, off the event loop: 16 MiB and a core each
LOGINS_IN_FLIGHT_PER_CLIENT = 2  # one address's further attempts meanwhile are refused with 429
LOGINS_PER_MINUTE_PER_CLIENT = 20
MAX_BODY_BYTES = 64 * 1024  # a review answer or an approval is a few hundred bytes
STORY_LIMIT = 40
DRIFT_POINTS = 60
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TEMPLATES = Path(__file__).parent / "console_templates"
_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")  # also the token file's name: no path separators


# --- accounts ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Who:
    """Who acts: the account behind a session or a token, with its role."""

    name: str
    role: str


def users_path() -> Path:
    from champion.config import champion_home

    return champion_home() / USERS_FILE


def _hash(password: str, salt: bytes) -> str:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32).hex()


def set_user(name: str, password: str, path: Path | None = None, role: str | None = None) -> str:
    """Create a console account or change its password (and role, when given); returns the role it has.

    A new account is a labeller unless `role` says otherwise; a password change keeps the role. Either ends
    the account's open sessions. The file is written atomically and is readable by its owner only."""
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise ChampionError(
            "NAME: give a login name of 1 to 64 letters, digits or . _ @ + - (no spaces or slashes)."
        )
    if len(password) < 8:
        raise ChampionError("password: use at least 8 characters.")
    if role is not None:
        _check_role(role)
    path = path or users_path()
    users = _read_users(path)
    old = users.get(name, {})
    salt = secrets.token_bytes(16)
    users[name] = {**old, "salt": salt.hex(), "scrypt": _hash(password, salt),
                   "role": role or old.get("role", DEFAULT_ROLE)}  # fmt: skip
    _write_users(path, users)
    return users[name]["role"]


def set_role(name: str, role: str, path: Path | None = None) -> None:
    """Change an existing account's role (its password stays); its open sessions end."""
    _check_role(role)
    path = path or users_path()
    users = _read_users(path)
    if name not in users:
        raise _no_account(name)
    users[name]["role"] = role
    _write_users(path, users)


def new_token(name: str, path: Path | None = None, out: Path | None = None) -> Path:
    """A fresh console token for account `name` (any earlier one stops working), written to a 0600 file.

    Returns the file; the token itself is never printed. Only its sha256 is kept in the accounts file: a
    token is 256 random bits, so a fast hash is enough."""
    from champion.config import champion_home

    path = path or users_path()
    users = _read_users(path)
    if name not in users:
        raise _no_account(name)
    token = "chc_" + secrets.token_urlsafe(32)
    out = out or champion_home() / KEYS_DIR / f"console-{name}.token"
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    out.unlink(missing_ok=True)  # a fresh file: an existing one may have been made readable by others
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    users[name]["token_sha256"] = hashlib.sha256(token.encode()).hexdigest()
    users[name]["token_created"] = datetime.now(UTC).isoformat(timespec="seconds")
    _write_users(path, users)
    return out


def revoke_token(name: str, path: Path | None = None) -> bool:
    """Whether account `name` had a token, which no longer works."""
    path = path or users_path()
    users = _read_users(path)
    had = bool(users.get(name, {}).pop("token_sha256", None))
    users.get(name, {}).pop("token_created", None)
    if had:
        _write_users(path, users)
    return had


def check_password(name: str, password: str, path: Path | None = None) -> bool:
    """Whether `password` is account `name`'s (slow on purpose: run it off the event loop)."""
    user = _read_users(path or users_path()).get(name)
    if user is None:
        _hash(password, b"\0" * 16)  # the same work for an unknown name: no timing hint about who exists
        return False
    return hmac.compare_digest(_hash(password, bytes.fromhex(user["salt"])), user["scrypt"])


def token_owner(token: str, path: Path | None = None) -> Who | None:
    """The account whose console token this is, with its role now; None for any other string."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    found = None
    for name, user in _read_users(path or users_path()).items():
        if hmac.compare_digest(digest, user.get("token_sha256") or ""):
            found = Who(name, role_of(user))
    return found


def role_of_account(name: str, path: Path | None = None) -> str | None:
    """Account `name`'s role, or None when there is no such account."""
    user = _read_users(path or users_path()).get(name)
    return None if user is None else role_of(user)


def role_of(user: dict[str, Any]) -> str:
    role = user.get("role") or DEFAULT_ROLE
    return role if role in ROLES else DEFAULT_ROLE


def may_decide(who: Who) -> str | None:
    """Why `who` may not approve or reject a promotion, or None when they may."""
    if who.role in DECIDERS:
        return None
    return (
        f"{who.name} is a {who.role}: approving or rejecting a promotion needs the approver or admin role "
        f"(an admin runs `champion console-user {who.name} --role approver`)."
    )


def _stamp(user: dict[str, Any]) -> str:
    """Changes whenever the account's password or role does: a session opened before is over."""
    return hashlib.sha256(f"{user['salt']}:{user['scrypt']}:{role_of(user)}".encode()).hexdigest()


def _no_account(name: str) -> ChampionError:
    return ChampionError(f"NAME: no console account '{name}'; create it with `champion console-user {name}`.")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ChampionError(f"--role: '{role}' is not a role; use one of {', '.join(ROLES)}.")


def _read_users(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        users = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ChampionError(
            f"{path}: not valid JSON ({err.msg}); recreate it with `champion console-user`."
        ) from None
    if not isinstance(users, dict) or not all(isinstance(u, dict) for u in users.values()):
        raise ChampionError(f"{path}: not an accounts file; recreate it with `champion console-user`.")
    return users


def _write_users(path: Path, users: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(users, out, indent=2, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


# --- sessions ---------------------------------------------------------------------------------------------


@dataclass
class Session:
    user: str
    csrf: str
    expires: float
    stamp: str = ""  # the account's `_stamp` at login
    role: str = DEFAULT_ROLE


@dataclass
class Sessions:
    """In memory: restarting the console logs everyone out, which is the safe direction.

    Also the login throttles: failures per (name, client address), and attempts per client address."""

    items: dict[str, Session] = field(default_factory=dict)
    failures: dict[str, list[float]] = field(default_factory=dict)
    attempts: dict[str, list[float]] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, user: str, stamp: str = "", role: str = DEFAULT_ROLE) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), time.time() + SESSION_HOURS * 3600, stamp, role)
        with self.lock:
            self.items = {k: s for k, s in self.items.items() if s.expires > time.time()}
            self.items[token] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        with self.lock:
            session = self.items.get(token or "")
        return session if session is not None and session.expires > time.time() else None

    def close(self, token: str | None) -> None:
        with self.lock:
            self.items.pop(token or "", None)

    def locked(self, name: str, client: str = "") -> bool:
        now, key = time.time(), _failure_key(name, client)
        with self.lock:
            recent = [t for t in self.failures.get(key, []) if now - t < LOCKOUT_SECONDS]
            if recent:
                self.failures[key] = recent
            else:
                self.failures.pop(key, None)
        return len(recent) >= MAX_FAILED_LOGINS

    def failed(self, name: str, client: str = "") -> None:
        now = time.time()
        with self.lock:
            if len(self.failures) >= MAX_TRACKED_NAMES:  # guessing at random names must not grow memory
                self.failures = {k: v for k, v in self.failures.items() if now - v[-1] < LOCKOUT_SECONDS}
                while len(self.failures) >= MAX_TRACKED_NAMES:
                    self.failures.pop(next(iter(self.failures)))
            self.failures.setdefault(_failure_key(name, client), []).append(now)

    def admit(self, client: str) -> str | None:
        """Why a login attempt from `client` is refused now, or None (then call `done` after it)."""
        now = time.time()
        with self.lock:
            if len(self.attempts) >= MAX_TRACKED_NAMES:
                self.attempts = {k: v for k, v in self.attempts.items() if now - v[-1] < 60}
                while len(self.attempts) >= MAX_TRACKED_NAMES:
                    self.attempts.pop(next(iter(self.attempts)))
            recent = [t for t in self.attempts.get(client, []) if now - t < 60]
            if len(recent) >= LOGINS_PER_MINUTE_PER_CLIENT:
                return f"too many logins from {client} in the last minute; wait a minute."
            if self.in_flight.get(client, 0) >= LOGINS_IN_FLIGHT_PER_CLIENT:
                return f"too many logins from {client} at once; wait for the one under way."
            self.attempts[client] = [*recent, now]
            self.in_flight[client] = self.in_flight.get(client, 0) + 1
        return None

    def done(self, client: str) -> None:
        with self.lock:
            left = self.in_flight.get(client, 1) - 1
            if left > 0:
                self.in_flight[client] = left
            else:
                self.in_flight.pop(client, None)


def _failure_key(name: str, client: str) -> str:
    return f"{client[:64]}\n{name[:64]}"


# --- what the pages show ----------------------------------------------------------------------------------


def model_page_data(reg, name: str, log_url: str, mlflow_ui: str | None) -> dict[str, Any]:
    """Everything the model page shows, as plain values (the template only lays it out)."""
    from champion.approval import pending_promotions
    from champion.registry import CHALLENGER, CHAMPION, story, unaudited_aliases

    unaudited = unaudited_aliases(reg, name)  # also refuses an unknown model with its sentence
    aliases = reg.audit.aliases(name)  # what the servers serve: the audited moves, not MLflow's alone
    versions = {}
    for alias in (CHAMPION, CHALLENGER):
        if alias in aliases:
            mv = reg.client.get_model_version(name, aliases[alias])
            versions[alias] = {
                "version": str(mv.version),
                "run_id": mv.run_id,
                "run_url": _run_url(reg, mlflow_ui, mv.run_id),
                "version_url": f"{mlflow_ui.rstrip('/')}/#/models/{quote(name)}/versions/{mv.version}"
                if mlflow_ui
                else None,
                "metric": mv.tags.get("metric.val_macro_f1"),
                "variant": mv.tags.get("variant"),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC),
            }
    entries = story(reg, name)[-STORY_LIMIT:][::-1]
    for e in entries:
        run_id = (e.get("evidence") or {}).get("run_id")
        e["run_url"] = _run_url(reg, mlflow_ui, run_id) if run_id else None
        e["when"] = datetime.fromisoformat(e["at"]).strftime("%Y-%m-%d %H:%M:%S")
    checks = sorted(_drift_history(name, log_url), key=lambda c: c["at"], reverse=True)  # newest first
    for c in checks:
        c["when"] = _fmt_at(c["at"])
    return {
        "name": name,
        "aliases": aliases,
        "unaudited": [
            f"MLflow's '{alias}' is on {f'v{there}' if there else 'no version'} but the audit history names "
            f"{f'v{audited}' if audited else 'none'}; servers keep the audited one until a person runs "
            f"`champion adopt {name} {alias} {there or 'none'} --reason ...` or sets it back."
            for alias, (audited, there) in unaudited.items()
        ],
        "versions": versions,
        "story": entries,
        "checks": checks[:15],
        "charts": drift_charts(checks[::-1]),
        "first": _fmt_at(checks[-1]["at"]) if checks else "",
        "last": _fmt_at(checks[0]["at"]) if checks else "",
        "pending": pending_promotions(reg, name),
        "mlflow_ui": mlflow_ui,
    }


def _run_url(reg, mlflow_ui: str | None, run_id: str | None) -> str | None:
    if not mlflow_ui or not run_id:
        return None
    try:
        experiment = reg.client.get_run(run_id).info.experiment_id
    except Exception:  # a run deleted since: no link rather than no page
        return None
    return f"{mlflow_ui.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


def _drift_history(name: str, log_url: str) -> list[dict[str, Any]]:
    """The model's windows of production traffic, newest first: checks of files (`champion drift --file`)
    are left out, as they are from the alarm."""
    from monitoring.store import LOG, DriftStore

    store = DriftStore(_drift_store_url(log_url))
    try:
        return store.history(name, limit=DRIFT_POINTS, source=LOG)
    finally:
        store.close()


def _drift_store_url(log_url: str) -> str:
    return log_url  # where `champion drift` keeps its checks unless a monitor config names another store


CHART_WIDTH, CHART_HEIGHT, CHART_PAD = 300, 110, 6


def drift_charts(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One small SVG-ready chart per check, oldest window first: its statistic, its threshold, and the
    windows where it drifted, each chart on its own labelled scale (nothing clipped), so a person can read
    which check moved. The template draws them without any JavaScript; [] when nothing was checked yet."""
    series: dict[str, dict[str, Any]] = {}
    for i, window in enumerate(checks):
        for c in window["checks"]:
            s = series.setdefault(c["name"], {"name": c["name"], "statistic": c.get("statistic", "")})
            s.setdefault("points", [])
            if c.get("value") is not None:
                threshold = float(c["threshold"]) if c.get("threshold") is not None else None
                s["points"].append((i, float(c["value"]), threshold, bool(c.get("drifted"))))
    return [_chart(series[name], len(checks)) for name in sorted(series)]


def _chart(series: dict[str, Any], windows: int) -> dict[str, Any]:
    points = series["points"]
    values = [v for _, v, _, _ in points] + [t for _, _, t, _ in points if t is not None]
    lo, hi = min(values, default=0.0), max(values, default=1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    lo, hi = lo - (hi - lo) * 0.08, hi + (hi - lo) * 0.08  # a margin: the extremes are drawn, not cut

    def xy(i: int, v: float) -> str:
        x = CHART_PAD + (CHART_WIDTH - 2 * CHART_PAD) * (i / max(windows - 1, 1))
        y = CHART_PAD + (CHART_HEIGHT - 2 * CHART_PAD) * (1 - (v - lo) / (hi - lo))
        return f"{x:.1f},{y:.1f}"

    last = points[-1] if points else None
    return {
        "name": series["name"],
        "statistic": series["statistic"],
        "points": " ".join(xy(i, v) for i, v, _, _ in points),
        "threshold": " ".join(xy(i, t) for i, _, t, _ in points if t is not None),
        "drifted": [dict(zip(("x", "y"), xy(i, v).split(","), strict=True)) for i, v, _, d in points if d],
        "top": _fmt_number(hi),
        "bottom": _fmt_number(lo),
        "last": _fmt_number(last[1]) if last else "—",
        "last_threshold": _fmt_number(last[2]) if last and last[2] is not None else "—",
        "last_drifted": bool(last and last[3]),
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
    }


def _fmt_number(v: float) -> str:
    return f"{v:.3g}"


def _fmt_at(at) -> str:
    return at.strftime("%Y-%m-%d %H:%M") if isinstance(at, datetime) else str(at)[:16]


# --- the app ----------------------------------------------------------------------------------------------


def create_app(
    log_url: str | None = None,
    review_config: str | None = None,
    mlflow_ui: str | None = None,
    users_file: Path | None = None,
    allowed_hosts: list[str] | tuple[str, ...] = LOOPBACK_HOSTS,
):
    """The console as a Starlette app (uvicorn runs it; tests may drive it in-process).

    `allowed_hosts`: the names or addresses the console answers to in the Host header; others get 400."""
    import anyio
    import jinja2
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from champion.config import load_config
    from champion.registry import connect, list_models
    from monitoring.review import ReviewConfig, ReviewQueue
    from serving.config import default_log_url

    log_url = log_url or default_log_url()
    review_cfg = load_config(ReviewConfig, review_config) if review_config else ReviewConfig()
    users = users_file or users_path()
    sessions = Sessions()
    state: dict[str, Any] = {}
    lock = threading.Lock()
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )

    def registry():
        with lock:
            if "reg" not in state:
                state["reg"] = connect()
            return state["reg"]

    def queue() -> ReviewQueue:
        with lock:
            if "queue" not in state:
                state["queue"] = ReviewQueue(log_url)
            return state["queue"]

    def page(request, template: str, status: int = 200, **values) -> Response:
        session = request.state.session
        html = env.get_template(template).render(
            user=session.user if session else None,
            role=session.role if session else None,
            csrf=session.csrf if session else "",
            **values,
        )
        return HTMLResponse(html, status_code=status)

    def refuse(request, status: int, message: str) -> Response:
        message = redact_uri(message)
        if _wants_json(request):
            return JSONResponse({"error": message}, status_code=status)
        return page(request, "error.html", status=status, message=message)

    async def guard(request, mutating: bool) -> tuple[Who | None, Response | None]:
        """Who acts, or the refusal: a session (with its CSRF token and our Origin) or a person's token."""
        if request.headers.get("x-api-key"):
            return None, refuse(request, 401, "X-API-Key is not a console credential (the service's feedback "
                                "key opens nothing here); send a person's token from `champion console-token "
                                "NAME` as Authorization: Bearer.")  # fmt: skip
        if given := _bearer(request.headers.get("authorization", "")):
            who = token_owner(given, users)
            if who is None:
                return None, refuse(request, 401, "Authorization: not a console token; make one with "
                                    "`champion console-token NAME`.")  # fmt: skip
            if request.headers.get("x-champion-actor") not in (None, who.name):
                log.warning("console: X-Champion-Actor ignored; %s's token acts as %s", who.name, who.name)
            return who, None
        session = request.state.session
        if session is None:
            if mutating or _wants_json(request):
                return None, refuse(
                    request, 401, "log in first: this action needs a console login or a console token."
                )
            return None, RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        if mutating:
            if not _same_origin(request):
                return None, refuse(
                    request, 403, "cross-site request refused: the Origin is not this console."
                )
            form = await request.form()
            if not hmac.compare_digest(str(form.get("csrf", "")).encode(), session.csrf.encode()):
                return None, refuse(
                    request, 403, "csrf: the form's token is missing or stale; reload the page."
                )
        return Who(session.user, session.role), None

    async def with_session(request):
        """The request's session, if its account still has the password and role it was opened with."""
        token = request.cookies.get(SESSION_COOKIE)
        session = sessions.get(token)
        if session is not None:
            user = _read_users(users).get(session.user)
            if user is None or not hmac.compare_digest(_stamp(user), session.stamp):
                sessions.close(token)  # the password or role changed, or the account is gone
                session = None
        request.state.session = session

    def endpoint(mutating: bool):
        """A handler `(request, who)` behind the login (and, for actions, the CSRF and Origin checks)."""

        def wrap(handler):
            async def run(request):
                await with_session(request)
                who, refused = await guard(request, mutating)
                return refused or await handler(request, who)

            return run

        return wrap

    # -- login -------------------------------------------------------------------------------------------

    async def login_form(request):
        await with_session(request)
        no_users = not _read_users(users)
        return page(request, "login.html", next=_safe_next(request.query_params.get("next")), error=None,
                    no_users=no_users)  # fmt: skip

    async def login(request):
        await with_session(request)
        if not _same_origin(request):
            return refuse(request, 403, "cross-site request refused: the Origin is not this console.")
        form = await request.form()
        name, password = str(form.get("name", "")).strip(), str(form.get("password", ""))
        target = _safe_next(str(form.get("next", "")))
        client = request.client.host if request.client else ""
        if sessions.locked(name, client):
            wait = f"too many failed logins for {name}; wait {LOCKOUT_SECONDS // 60} minutes."
            return page(request, "login.html", status=429, next=target, no_users=False, error=wait)
        if busy := sessions.admit(client):
            return page(request, "login.html", status=429, next=target, no_users=False, error=busy)
        try:
            if "checks" not in state:  # made on the event loop that uses it
                state["checks"] = anyio.CapacityLimiter(PASSWORD_CHECKS_AT_ONCE)
            # scrypt takes ~0.1 s of a core: in a thread, so /health and other pages go on meanwhile
            ok = bool(name) and await anyio.to_thread.run_sync(
                check_password, name, password, users, limiter=state["checks"]
            )
        finally:
            sessions.done(client)
        account = _read_users(users).get(name) if ok else None
        if account is None:
            sessions.failed(name, client)
            return page(request, "login.html", status=401, next=target, no_users=False,
                        error="name or password is wrong.")  # fmt: skip
        token, _ = sessions.open(name, _stamp(account), role_of(account))
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, token, max_age=SESSION_HOURS * 3600, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https", path="/")  # fmt: skip
        log.info("console: %s (%s) logged in from %s", name, role_of(account), client)
        return response

    @endpoint(mutating=True)
    async def logout(request, _who):
        sessions.close(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- pages -------------------------------------------------------------------------------------------

    @endpoint(mutating=False)
    async def home(request, _who):
        models = await _threaded(lambda: list_models(registry()))
        return page(request, "home.html", models=models)

    @endpoint(mutating=False)
    async def model(request, who):
        name = request.path_params["name"]
        try:
            data = await _threaded(lambda: model_page_data(registry(), name, log_url, mlflow_ui))
        except ChampionError as err:  # not registered
            return refuse(request, 404, str(err))
        return page(request, "model.html", notice=request.query_params.get("notice"),
                    cannot_decide=may_decide(who), **data)  # fmt: skip

    @endpoint(mutating=False)
    async def review(request, _who):
        name = request.path_params["name"]

        def load():
            q = queue()
            return q.next(name), q.progress(name, review_cfg)

        item, progress = await _threaded(load)
        if _wants_json(request):
            return JSONResponse({"item": item.__dict__ if item else None, "progress": progress})
        return page(request, "review.html", name=name, item=item, progress=progress,
                    notice=request.query_params.get("notice"))  # fmt: skip

    @endpoint(mutating=True)
    async def answer(request, who):
        name = request.path_params["name"]
        form = await request.form()
        request_id = str(form.get("request_id", ""))
        skip = form.get("skip") == "1"
        label = str(form.get("new_label") or form.get("label") or "") or None
        try:
            item = await _threaded(lambda: queue().answer(name, request_id, who.name, None if skip else label,
                                                          skip=skip))  # fmt: skip
        except ChampionError as err:
            return refuse(request, 400, str(err))
        if _wants_json(request):
            return JSONResponse(item.__dict__)
        notice = f"{item.status}: {item.answer}" if item.answer else item.status
        return RedirectResponse(f"/models/{quote(name)}/review?notice={quote(notice)}", status_code=303)

    @endpoint(mutating=True)
    async def decide(request, who):
        from champion.approval import approve, reject

        name, verb = request.path_params["name"], request.path_params["verb"]
        if verb not in {"approve", "reject"}:
            return refuse(request, 404, f"POST {request.url.path}: no such action (approve or reject).")
        if refusal := may_decide(who):
            log.warning("console: %s (%s) tried to %s a promotion of %s", who.name, who.role, verb, name)
            return refuse(request, 403, refusal)
        form = await request.form()
        version, reason = str(form.get("version", "")), str(form.get("reason", ""))
        try:
            if verb == "approve":
                moved = await _threaded(lambda: approve(registry(), name, version, reason, actor=who.name))
                notice = (f"approved v{version}: {moved.reason}" if moved.allowed
                          else f"approval moved nothing: {moved.reason}")  # fmt: skip
            else:
                await _threaded(lambda: reject(registry(), name, version, reason, actor=who.name))
                notice = f"rejected v{version}"
        except ChampionError as err:
            return refuse(request, 400, str(err))
        if _wants_json(request):
            return JSONResponse({"notice": notice, "actor": who.name})
        return RedirectResponse(f"/models/{quote(name)}?notice={quote(notice)}", status_code=303)

    @endpoint(mutating=False)
    async def report(request, _who):
        name, check_id = request.path_params["name"], request.path_params["check_id"]

        def fetch() -> str | None:
            run_id = next((c["report_run_id"] for c in _one_check(name, check_id)), None)
            if not run_id:
                return None
            import mlflow

            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="drift/drift.html",
                                                        tracking_uri=registry().tracking_uri)  # fmt: skip
            return Path(local).read_text()

        html = await _threaded(fetch)
        if html is None:
            return refuse(request, 404, f"drift check {check_id} of '{name}' has no Evidently report.")
        # Evidently's page runs its own scripts: sandboxed, it cannot reach the console or its cookie.
        return HTMLResponse(html, headers={"Content-Security-Policy": "sandbox allow-scripts"})

    def _one_check(name: str, check_id: int) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        from monitoring.store import DriftStore, drift_checks

        store = DriftStore(_drift_store_url(log_url))
        try:
            with store.engine.connect() as conn:
                row = conn.execute(
                    sa.select(drift_checks.c.id, drift_checks.c.report_run_id)
                    .where(drift_checks.c.id == check_id, drift_checks.c.model_name == name)
                ).mappings().first()  # fmt: skip
        finally:
            store.close()
        return [dict(row)] if row else []

    async def health(_request):
        return PlainTextResponse("ok")

    async def not_allowed(request, exc):
        await with_session(request)
        return refuse(request, exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware

    routes = [
        Route("/health", health),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", home),
        Route("/models/{name}", model),
        Route("/models/{name}/review", review, methods=["GET"]),
        Route("/models/{name}/review", answer, methods=["POST"]),
        Route("/models/{name}/{verb:str}", decide, methods=["POST"]),
        Route("/models/{name}/drift/{check_id:int}/report", report),
        Mount("/static", StaticFiles(directory=TEMPLATES / "static"), name="static"),
    ]

    def _close() -> None:
        with lock:
            if "reg" in state:
                state.pop("reg").close()
            if "queue" in state:
                state.pop("queue").close()

    @asynccontextmanager
    async def lifespan(_app):
        yield
        _close()

    async def database_down(request, exc):
        request.state.session = None  # the page must not need the accounts file or a database to render
        first = redact_uri((str(exc).strip().splitlines() or [type(exc).__name__])[0][:200])
        log.error("console: %s %s: a database did not answer: %s", request.method, request.url.path, first)
        return refuse(request, 503, f"the registry or the inference log database did not answer ({first}); "
                      "try again in a moment.")  # fmt: skip

    async def broken_setup(request, exc):  # e.g. an accounts file that is not JSON: the sentence says which
        request.state.session = None
        log.error("console: %s %s: %s", request.method, request.url.path, redact_uri(str(exc)))
        return refuse(request, 503, str(exc))

    import sqlalchemy as sa

    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(AllowedHosts, hosts=allowed_hosts),
            Middleware(SecurityHeaders),
            Middleware(BodyLimit),
        ],
        exception_handlers={
            HTTPException: not_allowed,
            sa.exc.OperationalError: database_down,
            ChampionError: broken_setup,
        },
        lifespan=lifespan,
    )
    app.state.close = _close
    app.state.sessions = sessions
    return app


SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'self'; script-src 'self'; style-src 'self'; "
    b"img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"same-origin",
    b"x-frame-options": b"DENY",
    b"cache-control": b"no-store",
}


class SecurityHeaders:
    """Every response gets these headers unless it set its own (the Evidently report sets its CSP)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS.items() if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


class AllowedHosts:
    """Answer 400 to a request whose Host is not one of the console's names (DNS rebinding: a page on
    evil.example whose name now points at 127.0.0.1 sends `Host: evil.example`). /health answers anyone."""

    def __init__(self, app, hosts):
        self.app = app
        self.hosts = {_host_name(h) for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if _host_name(host) in self.hosts:
            return await self.app(scope, receive, send)
        shown = host[:100].encode("ascii", "replace").decode()
        body = (f"Host {shown!r} is not a name of this console; use its address, or start it with "
                "`champion console --allowed-host NAME`.").encode()  # fmt: skip
        await _plain(send, 400, body)


def _host_name(host: str) -> str:
    """`Host` without its port, lower case: `[::1]:8765` -> `::1`, `Example.org:80` -> `example.org`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host  # a bare name, or a bare IPv6 address


class BodyLimit:
    """Refuse request bodies over MAX_BODY_BYTES with 413, whether or not they say their length."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return await _too_large(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _too_large(send)


class _TooLarge(Exception):
    pass


async def _too_large(send) -> None:
    body = f"request body over {MAX_BODY_BYTES // 1024} KiB; the console's forms are far smaller.".encode()
    await _plain(send, 413, body)


async def _plain(send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _threaded(func):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(func)


def _bearer(header: str) -> str:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _wants_json(request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _same_origin(request) -> bool:
    """No Origin (curl, old browsers: the CSRF token still guards) or one equal to this console's."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _safe_next(target: str | None) -> str:
    """Only a path on this console (never //other.site or a scheme) may follow a login."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def serve(
    host: str,
    port: int,
    allowed_hosts: list[str] | None = None,
    trusted_proxies: list[str] | None = None,
    **app_options,
) -> None:
    """Run the console with uvicorn until interrupted.

    It answers to the loopback names, the address it listens on and `allowed_hosts` (the names people
    type in their browser when it is behind a proxy or on another host). X-Forwarded-For and -Proto are
    believed only from `trusted_proxies`: else anyone could name a new client address for each guess and
    walk around the per-client login limits."""
    import uvicorn

    hosts = [*LOOPBACK_HOSTS, *([] if host in {"0.0.0.0", "::", ""} else [host]), *(allowed_hosts or [])]
    app = create_app(allowed_hosts=hosts, **app_options)
    if host not in LOOPBACK_HOSTS:
        log.warning(
            "console: listening on %s; put it behind TLS (else the login cookie is sent in clear)", host
        )
    if host in {"0.0.0.0", "::"} and not allowed_hosts:
        log.warning("console: it answers only to loopback names; add the ones people use with --allowed-host")
    proxies = {"proxy_headers": bool(trusted_proxies), "forwarded_allow_ips": ",".join(trusted_proxies or [])}
    print(f"champion console on http://{_url_host(host)}:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, **proxies)
    finally:
        app.state.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
