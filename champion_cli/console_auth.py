"""Who may use the console, and who a request is: accounts and roles, sessions, CSRF tokens, the Origin and
Host checks, logging in and out.

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

    auth = Auth(users_path(), page, refuse)          # the console's accounts file and how it answers
    @endpoint(auth, mutating=True)                   # a handler (request, who) behind these checks
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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
from starlette.responses import PlainTextResponse, RedirectResponse

from champion.config import champion_home
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
_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")  # also the token file's name: no path separators


# --- accounts ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Who:
    """Who acts: the account behind a session or a token, with its role."""

    name: str
    role: str


def users_path() -> Path:
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


# --- requests ---------------------------------------------------------------------------------------------


@dataclass
class Auth:
    """What the checks of every request need: the accounts file, the open sessions, and how the console
    answers (`page(request, template, status=200, **values)`, `refuse(request, status, sentence)`)."""

    users: Path
    page: Callable[..., Any]
    refuse: Callable[[Any, int, str], Any]
    sessions: Sessions = field(default_factory=Sessions)
    password_checks: anyio.CapacityLimiter | None = None  # made on the event loop that uses it


def load_session(auth: Auth, request) -> None:
    """Set `request.state.session`: the request's session, if its account still has the password and role it
    was opened with, else None."""
    token = request.cookies.get(SESSION_COOKIE)
    session = auth.sessions.get(token)
    if session is not None:
        user = _read_users(auth.users).get(session.user)
        if user is None or not hmac.compare_digest(_stamp(user), session.stamp):
            auth.sessions.close(token)  # the password or role changed, or the account is gone
            session = None
    request.state.session = session


async def who_acts(auth: Auth, request, mutating: bool) -> tuple[Who | None, Any]:
    """Who acts, or the refusal: a session (with its CSRF token and our Origin) or a person's token."""
    load_session(auth, request)
    refuse = auth.refuse
    if request.headers.get("x-api-key"):
        return None, refuse(request, 401, "X-API-Key is not a console credential (the service's feedback "
                            "key opens nothing here); send a person's token from `champion console-token "
                            "NAME` as Authorization: Bearer.")  # fmt: skip
    if given := _bearer(request.headers.get("authorization", "")):
        who = token_owner(given, auth.users)
        if who is None:
            return None, refuse(request, 401, "Authorization: not a console token; make one with "
                                "`champion console-token NAME`.")  # fmt: skip
        if request.headers.get("x-champion-actor") not in (None, who.name):
            log.warning("console: X-Champion-Actor ignored; %s's token acts as %s", who.name, who.name)
        return who, None
    session = request.state.session
    if session is None:
        if mutating or wants_json(request):
            return None, refuse(
                request, 401, "log in first: this action needs a console login or a console token."
            )
        return None, RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
    if mutating:
        if not _same_origin(request):
            return None, refuse(request, 403, "cross-site request refused: the Origin is not this console.")
        form = await request.form()
        if not hmac.compare_digest(str(form.get("csrf", "")).encode(), session.csrf.encode()):
            return None, refuse(request, 403, "csrf: the form's token is missing or stale; reload the page.")
    return Who(session.user, session.role), None


def endpoint(auth: Auth, mutating: bool):
    """A handler `(request, who)` behind the login (and, for actions, the CSRF and Origin checks)."""

    def wrap(handler):
        async def run(request):
            who, refused = await who_acts(auth, request, mutating)
            return refused or await handler(request, who)

        return run

    return wrap


async def login_form(auth: Auth, request):
    """GET /login."""
    load_session(auth, request)
    return auth.page(request, "login.html", next=_safe_next(request.query_params.get("next")), error=None,
                     no_users=not _read_users(auth.users))  # fmt: skip


async def login(auth: Auth, request):
    """POST /login: a session cookie for the right name and password, within the throttles."""
    load_session(auth, request)
    if not _same_origin(request):
        return auth.refuse(request, 403, "cross-site request refused: the Origin is not this console.")
    form = await request.form()
    name, password = str(form.get("name", "")).strip(), str(form.get("password", ""))
    target = _safe_next(str(form.get("next", "")))
    client = request.client.host if request.client else ""
    if auth.sessions.locked(name, client):
        wait = f"too many failed logins for {name}; wait {LOCKOUT_SECONDS // 60} minutes."
        return auth.page(request, "login.html", status=429, next=target, no_users=False, error=wait)
    if busy := auth.sessions.admit(client):
        return auth.page(request, "login.html", status=429, next=target, no_users=False, error=busy)
    try:
        if auth.password_checks is None:
            auth.password_checks = anyio.CapacityLimiter(PASSWORD_CHECKS_AT_ONCE)
        # scrypt takes ~0.1 s of a core: in a thread, so /health and other pages go on meanwhile
        ok = bool(name) and await anyio.to_thread.run_sync(
            check_password, name, password, auth.users, limiter=auth.password_checks
        )
    finally:
        auth.sessions.done(client)
    account = _read_users(auth.users).get(name) if ok else None
    if account is None:
        auth.sessions.failed(name, client)
        return auth.page(request, "login.html", status=401, next=target, no_users=False,
                         error="name or password is wrong.")  # fmt: skip
    token, _ = auth.sessions.open(name, _stamp(account), role_of(account))
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(SESSION_COOKIE, token, max_age=SESSION_HOURS * 3600, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/")  # fmt: skip
    log.info("console: %s (%s) logged in from %s", name, role_of(account), client)
    return response


async def logout(auth: Auth, request):
    """POST /logout: an action like any other (a session and its CSRF token, or a token)."""
    _who, refused = await who_acts(auth, request, mutating=True)
    if refused:
        return refused
    auth.sessions.close(request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def wants_json(request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _bearer(header: str) -> str:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


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
                "`champion console --allowed-host NAME`.")  # fmt: skip
        await PlainTextResponse(body, status_code=400)(scope, receive, send)


def _host_name(host: str) -> str:
    """`Host` without its port, lower case: `[::1]:8765` -> `::1`, `Example.org:80` -> `example.org`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host  # a bare name, or a bare IPv6 address
