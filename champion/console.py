"""`champion console`: server-rendered pages for the people in the loop, on loopback by default.

One page per model (champion and challenger, the loop's story from the audit history, drift over time,
links to the Evidently reports and MLflow runs, the promotions waiting for approval) and a review page
(one text at a time with the model's best labels, keyboard shortcuts, progress against the day's budget).

Reading needs a login; so does every action, which also needs the session's CSRF token in the form and,
when the browser sends one, an Origin equal to the console's own. The session cookie is HttpOnly and
SameSite=Strict, so another site cannot ride on it. Scripts may act with the API key instead
(`X-API-Key` or `Authorization: Bearer`, the value of CHAMPION_API_KEY), which a browser never sends on
its own. Accounts live in CHAMPION_HOME/console-users.json as scrypt hashes (`champion console-user`).

    app = create_app()                      # a Starlette app; `champion console` runs it with uvicorn
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from champion.errors import ChampionError

log = logging.getLogger("champion.console")

USERS_FILE = "console-users.json"
SESSION_COOKIE = "champion_console"
SESSION_HOURS = 12
MAX_FAILED_LOGINS = 5  # per name, within LOCKOUT_SECONDS; then that name waits
LOCKOUT_SECONDS = 300
MAX_TRACKED_NAMES = 10_000
MAX_BODY_BYTES = 64 * 1024  # a review answer or an approval is a few hundred bytes
STORY_LIMIT = 40
DRIFT_POINTS = 60
TEMPLATES = Path(__file__).parent / "console_templates"


# --- accounts ---------------------------------------------------------------------------------------------


def users_path() -> Path:
    from champion.config import champion_home

    return champion_home() / USERS_FILE


def _hash(password: str, salt: bytes) -> str:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32).hex()


def set_user(name: str, password: str, path: Path | None = None) -> None:
    """Create or change a console account (written atomically; the file is readable by its owner only)."""
    name = name.strip()
    if not name or len(name) > 64 or any(ch.isspace() for ch in name):
        raise ChampionError("NAME: give a login name of 1 to 64 characters without spaces.")
    if len(password) < 8:
        raise ChampionError("password: use at least 8 characters.")
    path = path or users_path()
    users = _read_users(path)
    salt = secrets.token_bytes(16)
    users[name] = {"salt": salt.hex(), "scrypt": _hash(password, salt)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(users, out, indent=2, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def check_password(name: str, password: str, path: Path | None = None) -> bool:
    user = _read_users(path or users_path()).get(name)
    if user is None:
        _hash(password, b"\0" * 16)  # the same work for an unknown name: no timing hint about who exists
        return False
    return hmac.compare_digest(_hash(password, bytes.fromhex(user["salt"])), user["scrypt"])


def _read_users(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ChampionError(
            f"{path}: not valid JSON ({err.msg}); recreate it with `champion console-user`."
        ) from None


# --- sessions ---------------------------------------------------------------------------------------------


@dataclass
class Session:
    user: str
    csrf: str
    expires: float


@dataclass
class Sessions:
    """In memory: restarting the console logs everyone out, which is the safe direction."""

    items: dict[str, Session] = field(default_factory=dict)
    failures: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, user: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), time.time() + SESSION_HOURS * 3600)
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

    def locked(self, name: str) -> bool:
        now = time.time()
        with self.lock:
            name = name[:64]
            recent = [t for t in self.failures.get(name, []) if now - t < LOCKOUT_SECONDS]
            if recent:
                self.failures[name] = recent
            else:
                self.failures.pop(name, None)
        return len(recent) >= MAX_FAILED_LOGINS

    def failed(self, name: str) -> None:
        now = time.time()
        with self.lock:
            if len(self.failures) >= MAX_TRACKED_NAMES:  # guessing at random names must not grow memory
                self.failures = {k: v for k, v in self.failures.items() if now - v[-1] < LOCKOUT_SECONDS}
                while len(self.failures) >= MAX_TRACKED_NAMES:
                    self.failures.pop(next(iter(self.failures)))
            self.failures.setdefault(name[:64], []).append(now)


# --- what the pages show ----------------------------------------------------------------------------------


def model_page_data(reg, name: str, log_url: str, mlflow_ui: str | None) -> dict[str, Any]:
    """Everything the model page shows, as plain values (the template only lays it out)."""
    from champion.approval import pending_promotions
    from champion.registry import CHALLENGER, CHAMPION, _registered_model, story

    model = _registered_model(reg, name)
    aliases = {k: str(v) for k, v in model.aliases.items()}
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
    checks = _drift_history(name, log_url)
    for c in checks:
        c["when"] = _fmt_at(c["at"])
    return {
        "name": name,
        "aliases": aliases,
        "versions": versions,
        "story": entries,
        "checks": checks[:15],
        "plot": drift_plot(checks[::-1]),
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
    from monitoring.store import DriftStore

    store = DriftStore(_drift_store_url(log_url))
    try:
        return store.history(name, limit=DRIFT_POINTS)
    finally:
        store.close()


def _drift_store_url(log_url: str) -> str:
    return log_url  # where `champion drift` keeps its checks unless a monitor config names another store


def drift_plot(checks: list[dict[str, Any]], width: int = 720, height: int = 180) -> dict[str, Any]:
    """An SVG-ready plot of each check's statistic over its threshold, oldest first (1.0 = the threshold).

    Returns the series as point strings plus markers for the windows that drifted, so the template draws
    it without any JavaScript; an empty dict when nothing was checked yet."""
    if not checks:
        return {}
    pad, top = 40, 10
    ratios: dict[str, list[tuple[int, float]]] = {}
    for i, check in enumerate(checks):
        for c in check["checks"]:
            if c.get("value") is not None and c.get("threshold"):
                ratios.setdefault(c["name"], []).append((i, float(c["value"]) / float(c["threshold"])))
    peak = max([2.0, *(r for series in ratios.values() for _, r in series)])
    peak = min(peak, 10.0)  # a huge outlier should not flatten everything else

    def xy(i: int, r: float) -> tuple[float, float]:
        x = pad + (width - pad - 10) * (i / max(len(checks) - 1, 1))
        y = top + (height - top - 20) * (1 - min(r, peak) / peak)
        return round(x, 1), round(y, 1)

    colours = ["#2563eb", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be123c"]
    series = [
        {"name": name, "colour": colours[k % len(colours)], "points": " ".join(f"{x},{y}" for x, y in
                                                                               (xy(i, r) for i, r in pts))}
        for k, (name, pts) in enumerate(sorted(ratios.items()))
    ]  # fmt: skip
    drifted = [{"x": xy(i, 0)[0], "at": c["at"]} for i, c in enumerate(checks) if c["status"] == "drift"]
    return {
        "width": width,
        "height": height,
        "series": series,
        "drifted": drifted,
        "threshold_y": xy(0, 1.0)[1],
        "peak": peak,
        "first": _fmt_at(checks[0]["at"]),
        "last": _fmt_at(checks[-1]["at"]),
        "pad": pad,
        "bottom": height - 20,
    }


def _fmt_at(at) -> str:
    return at.strftime("%Y-%m-%d %H:%M") if isinstance(at, datetime) else str(at)[:16]


# --- the app ----------------------------------------------------------------------------------------------


def create_app(
    log_url: str | None = None,
    review_config: str | None = None,
    mlflow_ui: str | None = None,
    users_file: Path | None = None,
):
    """The console as a Starlette app (uvicorn runs it; tests may drive it in-process)."""
    import jinja2
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from champion.config import load_config
    from champion.registry import connect, list_models
    from champion.review import ReviewConfig, ReviewQueue
    from serving.config import API_KEY_ENV, default_log_url

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
            user=session.user if session else None, csrf=session.csrf if session else "", **values
        )
        return HTMLResponse(html, status_code=status)

    def refuse(request, status: int, message: str) -> Response:
        if _wants_json(request):
            return JSONResponse({"error": message}, status_code=status)
        return page(request, "error.html", status=status, message=message)

    async def guard(request, mutating: bool) -> tuple[str | None, Response | None]:
        """Who acts, or the refusal: a session (with its CSRF token and our Origin) or the API key."""
        key = os.environ.get(API_KEY_ENV)
        given = request.headers.get("x-api-key") or _bearer(request.headers.get("authorization", ""))
        if given:
            if key and hmac.compare_digest(given.encode(), key.encode()):
                return request.headers.get("x-champion-actor") or "api-key", None
            return None, refuse(request, 401, f"wrong API key; use the value of {API_KEY_ENV} on the server.")
        session = request.state.session
        if session is None:
            if mutating or _wants_json(request):
                return None, refuse(
                    request, 401, "log in first: this action needs a console login or the API key."
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
        return session.user, None

    async def with_session(request):
        request.state.session = sessions.get(request.cookies.get(SESSION_COOKIE))

    def endpoint(mutating: bool):
        """A handler `(request, actor)` behind the login (and, for actions, the CSRF and Origin checks)."""

        def wrap(handler):
            async def run(request):
                await with_session(request)
                actor, refused = await guard(request, mutating)
                return refused or await handler(request, actor)

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
        if sessions.locked(name):
            wait = f"too many failed logins for {name}; wait {LOCKOUT_SECONDS // 60} minutes."
            return page(request, "login.html", status=429, next=target, no_users=False, error=wait)
        if not name or not check_password(name, password, users):
            sessions.failed(name)
            return page(request, "login.html", status=401, next=target, no_users=False,
                        error="name or password is wrong.")  # fmt: skip
        token, _ = sessions.open(name)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, token, max_age=SESSION_HOURS * 3600, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https", path="/")  # fmt: skip
        log.info("console: %s logged in", name)
        return response

    @endpoint(mutating=True)
    async def logout(request, _actor):
        sessions.close(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- pages -------------------------------------------------------------------------------------------

    @endpoint(mutating=False)
    async def home(request, _actor):
        models = await _threaded(lambda: list_models(registry()))
        return page(request, "home.html", models=models)

    @endpoint(mutating=False)
    async def model(request, _actor):
        name = request.path_params["name"]
        try:
            data = await _threaded(lambda: model_page_data(registry(), name, log_url, mlflow_ui))
        except ChampionError as err:  # not registered
            return refuse(request, 404, str(err))
        return page(request, "model.html", notice=request.query_params.get("notice"), **data)

    @endpoint(mutating=False)
    async def review(request, _actor):
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
    async def answer(request, actor):
        name = request.path_params["name"]
        form = await request.form()
        request_id = str(form.get("request_id", ""))
        skip = form.get("skip") == "1"
        label = str(form.get("new_label") or form.get("label") or "") or None
        try:
            item = await _threaded(lambda: queue().answer(name, request_id, actor, None if skip else label,
                                                          skip=skip))  # fmt: skip
        except ChampionError as err:
            return refuse(request, 400, str(err))
        if _wants_json(request):
            return JSONResponse(item.__dict__)
        notice = f"{item.status}: {item.answer}" if item.answer else item.status
        return RedirectResponse(f"/models/{quote(name)}/review?notice={quote(notice)}", status_code=303)

    @endpoint(mutating=True)
    async def decide(request, actor):
        from champion.approval import approve, reject

        name, verb = request.path_params["name"], request.path_params["verb"]
        if verb not in {"approve", "reject"}:
            return refuse(request, 404, f"POST {request.url.path}: no such action (approve or reject).")
        form = await request.form()
        version, reason = str(form.get("version", "")), str(form.get("reason", ""))
        try:
            if verb == "approve":
                moved = await _threaded(lambda: approve(registry(), name, version, reason, actor=actor))
                notice = (f"approved v{version}: {moved.reason}" if moved.allowed
                          else f"approval moved nothing: {moved.reason}")  # fmt: skip
            else:
                await _threaded(lambda: reject(registry(), name, version, reason, actor=actor))
                notice = f"rejected v{version}"
        except ChampionError as err:
            return refuse(request, 400, str(err))
        if _wants_json(request):
            return JSONResponse({"notice": notice})
        return RedirectResponse(f"/models/{quote(name)}?notice={quote(notice)}", status_code=303)

    @endpoint(mutating=False)
    async def report(request, _actor):
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
        await with_session(request)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        log.error("console: %s %s: a database did not answer: %s", request.method, request.url.path, first)
        return refuse(request, 503, f"the registry or the inference log database did not answer ({first}); "
                      "try again in a moment.")  # fmt: skip

    import sqlalchemy as sa

    app = Starlette(
        routes=routes,
        middleware=[Middleware(SecurityHeaders), Middleware(BodyLimit)],
        exception_handlers={HTTPException: not_allowed, sa.exc.OperationalError: database_down},
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
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
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


def serve(host: str, port: int, **app_options) -> None:
    """Run the console with uvicorn until interrupted."""
    import uvicorn

    app = create_app(**app_options)
    if host not in {"127.0.0.1", "localhost", "::1"}:
        log.warning(
            "console: listening on %s; put it behind TLS (else the login cookie is sent in clear)", host
        )
    print(f"champion console on http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        app.state.close()
