"""`champion console`: server-rendered pages for the people in the loop, on loopback by default.

One page per model (champion and challenger, the loop's story from the audit history, drift over time,
links to the Evidently reports and MLflow runs, the promotions waiting for approval) and a review page
(one text at a time with the model's best labels, keyboard shortcuts, progress against the day's budget).
Who may read and do what, and how a request proves who it is: champion_cli/console_auth.py.

    app = create_app()                      # a Starlette app; `champion console` runs it with uvicorn
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from champion.approval import approve, reject
from champion.config import default_log_url, drift_store_url, load_config, redact_uri
from champion.errors import ChampionError
from champion.registry import connect, list_models
from champion_cli.console_auth import (
    AllowedHosts,
    Auth,
    endpoint,
    load_session,
    login,
    login_form,
    logout,
    may_decide,
    users_path,
    wants_json,
)
from monitoring.config import MonitorConfig
from monitoring.review import ReviewConfig, ReviewQueue

log = logging.getLogger("champion_cli.console")

MAX_BODY_BYTES = 64 * 1024  # a review answer or an approval is a few hundred bytes
STORY_LIMIT = 40
DRIFT_POINTS = 60
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TEMPLATES = Path(__file__).parent / "console_templates"


# --- what the pages show ----------------------------------------------------------------------------------


def model_page_data(reg, name: str, drift_url: str, mlflow_ui: str | None) -> dict[str, Any]:
    """Everything the model page shows, as plain values (the template only lays it out)."""
    from champion.approval import pending_promotions
    from champion.registry import (
        CHALLENGER,
        CHAMPION,
        TASK_TAG,
        TEXT_CLASSIFICATION,
        story,
        unaudited_aliases,
    )

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
                "task": mv.tags.get(TASK_TAG, TEXT_CLASSIFICATION),  # versions from before the tag classify
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC),
            }
    entries = story(reg, name)[-STORY_LIMIT:][::-1]
    for e in entries:
        run_id = (e.get("evidence") or {}).get("run_id")
        e["run_url"] = _run_url(reg, mlflow_ui, run_id) if run_id else None
        e["when"] = datetime.fromisoformat(e["at"]).strftime("%Y-%m-%d %H:%M:%S")
    checks = sorted(_drift_history(name, drift_url), key=lambda c: c["at"], reverse=True)  # newest first
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


def _drift_history(name: str, store_url: str) -> list[dict[str, Any]]:
    """The model's windows of production traffic, newest first: checks of files (`champion drift --file`)
    are left out, as they are from the alarm."""
    from monitoring.store import LOG, DriftStore

    store = DriftStore(store_url)
    try:
        return store.history(name, limit=DRIFT_POINTS, source=LOG)
    finally:
        store.close()


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
    monitor_config: str | None = None,
):
    """The console as a Starlette app (uvicorn runs it; tests may drive it in-process).

    `allowed_hosts`: the names or addresses the console answers to in the Host header; others get 400.
    `monitor_config`: the YAML `champion drift` runs with, so the console reads the drift store it writes."""
    # settings, and the stores opened on first use
    log_url = log_url or default_log_url()
    monitor_cfg = load_config(MonitorConfig, monitor_config) if monitor_config else MonitorConfig()
    drift_url = drift_store_url(monitor_cfg.store_url, log_url)
    review_cfg = load_config(ReviewConfig, review_config) if review_config else ReviewConfig()
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
        if wants_json(request):
            return JSONResponse({"error": message}, status_code=status)
        return page(request, "error.html", status=status, message=message)

    # who may do what: accounts, sessions, CSRF and Origin checks
    auth = Auth(users_file or users_path(), page, refuse)

    # the pages, each behind the login
    @endpoint(auth, mutating=False)
    async def home(request, _who):
        models = await _threaded(lambda: list_models(registry()))
        return page(request, "home.html", models=models)

    @endpoint(auth, mutating=False)
    async def model(request, who):
        name = request.path_params["name"]
        try:
            data = await _threaded(lambda: model_page_data(registry(), name, drift_url, mlflow_ui))
        except ChampionError as err:  # not registered
            return refuse(request, 404, str(err))
        return page(request, "model.html", notice=request.query_params.get("notice"),
                    cannot_decide=may_decide(who), **data)  # fmt: skip

    @endpoint(auth, mutating=False)
    async def review(request, _who):
        name = request.path_params["name"]

        def load():
            q = queue()
            return q.next(name), q.progress(name, review_cfg)

        item, progress = await _threaded(load)
        if wants_json(request):
            return JSONResponse({"item": item.__dict__ if item else None, "progress": progress})
        return page(request, "review.html", name=name, item=item, progress=progress,
                    notice=request.query_params.get("notice"))  # fmt: skip

    @endpoint(auth, mutating=True)
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
        if wants_json(request):
            return JSONResponse(item.__dict__)
        notice = f"{item.status}: {item.answer}" if item.answer else item.status
        return RedirectResponse(f"/models/{quote(name)}/review?notice={quote(notice)}", status_code=303)

    @endpoint(auth, mutating=True)
    async def decide(request, who):
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
        if wants_json(request):
            return JSONResponse({"notice": notice, "actor": who.name})
        return RedirectResponse(f"/models/{quote(name)}?notice={quote(notice)}", status_code=303)

    @endpoint(auth, mutating=False)
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

        store = DriftStore(drift_url)
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

    routes = [
        Route("/health", health),
        Route("/login", partial(login_form, auth), methods=["GET"]),
        Route("/login", partial(login, auth), methods=["POST"]),
        Route("/logout", partial(logout, auth), methods=["POST"]),
        Route("/", home),
        Route("/models/{name}", model),
        Route("/models/{name}/review", review, methods=["GET"]),
        Route("/models/{name}/review", answer, methods=["POST"]),
        Route("/models/{name}/{verb:str}", decide, methods=["POST"]),
        Route("/models/{name}/drift/{check_id:int}/report", report),
        Mount("/static", StaticFiles(directory=TEMPLATES / "static"), name="static"),
    ]

    # the app: its middleware, its answers when something is down, and closing the stores
    async def not_allowed(request, exc):
        load_session(auth, request)
        return refuse(request, exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

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
    app.state.sessions = auth.sessions
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
    await _plain(send, 413, body)


async def _plain(send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _threaded(func):
    return await run_in_threadpool(func)


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
