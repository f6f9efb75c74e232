"""The BentoML service: `bentoml serve serving.service:ChampionService` (what `champion serve` runs).

`build_service(cfg)` makes the service class; BentoML needs the batch cap, latency budget and input limits
when the class is defined, so `ChampionService` is built on first access from the config `champion serve`
wrote (`CHAMPION_SERVE_CONFIG`), not at import.

Endpoints: POST /predict and /predict_proba (adaptive batching), POST /feedback and /reload (ingest key),
and BentoML's own /healthz, /livez, /readyz and /metrics. The POST endpoints take a JSON body only, sent
as `Content-Type: application/json`, no larger than `limits` allow; a bad request gets a 4xx with
{"error": one sentence, "field": what to fix}, never a 5xx. Requests for any other path are answered 404
before BentoML sees them, and requests whose Host is not one the server answers to get 421 (the probes
excepted): see `allowed_hosts`.
"""

import functools
import hmac
import itertools
import json
import logging
import os
import re
import time
from typing import Annotated, Any, NamedTuple

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from champion.errors import ChampionError
from serving.config import (
    FEEDBACK_KEY_ENV,
    FEEDBACK_KEY_FILE,
    LEGACY_API_KEY_ENV,
    LimitsConfig,
    ServeConfig,
    config_from_env,
    feedback_key,
)
from serving.server import Answer, AnswerWithProbabilities

PREDICT_PATHS = ("/predict", "/predict_proba")
OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")  # a text-generation model's (serving/lm_service.py)
MUTATING_PATHS = ("/feedback", "/reload")
PROBE_PATHS = ("/healthz", "/livez", "/readyz")  # answered whatever the Host: orchestrators probe by IP
ROUTES = frozenset((*PREDICT_PATHS, *MUTATING_PATHS, *PROBE_PATHS, "/metrics", "/", "/docs.json"))
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
OTHER_ROUTE = "other"  # the one path, and metrics label, of every request for a path that is no route
ASKED = "champion.asked_path"  # the scope key keeping the path such a request asked for
# An item of "texts" is a string or a {"text", "key"} object: pydantic checks it as both, and names the
# union's branch in the error's location. Errors saying an item is not the other kind are dropped.
_WRONG_KIND = ("model_type", "string_type")
MAX_HEADER_BYTES = 16 * 1024  # h11's and most proxies' limit; httptools, which uvicorn prefers, has none
_log = logging.getLogger(__name__)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: media types and parameter names


class _Refusal(NamedTuple):
    """A request answered before the app sees it: the status, the field at fault and the sentence."""

    status: int
    field: str
    error: str


_TWO_CONTENT_TYPES = _Refusal(400, "Content-Type", "the request has two Content-Type headers; send one.")
# A POST without it is one a web page can send to any address without asking (a "simple" CORS request).
_NO_CONTENT_TYPE = _Refusal(415, "Content-Type", "the request has no Content-Type; send application/json.")
_NO_HOST = _Refusal(400, "Host", "the request has no Host header; send the name you reached the server by.")
_UNKNOWN_PATH = (
    "there is no such endpoint; the service answers POST /predict, /predict_proba, /feedback, /reload "
    "and GET /healthz, /livez, /readyz, /metrics."
)
_UNKNOWN_OPENAI_PATH = (
    "there is no such endpoint; the service answers POST /v1/chat/completions, /feedback, /reload and GET "
    "/v1/models, /healthz, /livez, /readyz, /metrics."
)
_INCOMPLETE_BODY = _Refusal(400, "body", "the connection closed in the middle of the body; send all of it.")


def _checked_text(text: str) -> str:
    if "\x00" in text:
        raise ValueError("contains a null byte; remove it")
    if not text.strip():
        raise ValueError("is blank; send at least one visible character")
    return text


def build_service(cfg: ServeConfig):
    """A BentoML service class for `cfg`: one `ModelServer` per worker, following the registry."""
    import bentoml
    from anyio import to_thread
    from starlette.responses import JSONResponse

    limits = cfg.limits
    Text = Annotated[
        str, Field(min_length=1, max_length=limits.max_text_chars), AfterValidator(_checked_text)
    ]
    Key = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_checked_text)]

    class Keyed(BaseModel):
        """{"text": ..., "key": "user-42"}: the key keeps one sender on one arm of an A/B test or canary."""

        model_config = ConfigDict(extra="forbid")
        text: Text
        key: Key

    Texts = Annotated[list[Text | Keyed], Field(min_length=1, max_length=limits.max_items)]
    batching = {
        "batchable": True,
        "max_batch_size": cfg.batching.max_batch_size,
        "max_latency_ms": cfg.batching.max_latency_ms,
    }
    holder: dict[str, Any] = {}  # the worker's ModelServer, for the middleware

    @bentoml.service(
        name="champion",
        workers=cfg.workers,
        threads=cfg.batching.in_flight,  # BentoML's limit on sync API calls running at once in a worker
        traffic={"timeout": cfg.timeout_seconds},
        metrics={"enabled": True, "namespace": "bentoml_service"},
        # The request's Content-Type is not logged: BentoML's access log raises on one that is not UTF-8.
        logging={"access": {"enabled": cfg.access_log, "request_content_type": False}},
    )
    class ChampionService:
        def __init__(self) -> None:
            from champion.config import prepare_environment, secure_home
            from serving.server import ModelServer

            prepare_environment()
            secure_home()  # `bentoml serve` started by hand has the shell's umask, not `champion serve`'s
            # exit_with_parent: a worker whose `bentoml serve` was killed exits instead of holding the port.
            self.server = ModelServer(cfg).start(exit_with_parent=True)
            holder["server"] = self.server

        def __is_ready__(self) -> bool:
            return self.server.ready() and self.server.log.writer_alive

        def __is_alive__(self) -> bool:  # a worker whose inference log writer died needs a restart
            return self.server.log.writer_alive

        @bentoml.on_shutdown
        def shutdown(self) -> None:
            self.server.close()  # flushes the inference log: graceful shutdown loses no prediction

        @bentoml.api(**batching)
        def predict(self, texts: Texts) -> list[Answer]:
            return _answer(self.server, texts, probabilities=False)

        @bentoml.api(**batching)
        def predict_proba(self, texts: Texts) -> list[AnswerWithProbabilities]:
            return _answer(self.server, texts, probabilities=True)

        @bentoml.api
        async def feedback(
            self,
            request_id: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_checked_text)],
            label: Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_checked_text)],
        ) -> dict:
            from serving.inference_log import LogUnavailableError, UnknownRequestError

            try:
                await to_thread.run_sync(self.server.feedback, request_id, label)
            except UnknownRequestError as err:
                return JSONResponse({"error": str(err), "field": "request_id"}, status_code=404)
            except LogUnavailableError as err:
                return JSONResponse({"error": str(err), "field": None}, status_code=503)
            return {"request_id": request_id, "label": label, "recorded": True}

        @bentoml.api
        async def reload(self) -> dict:
            return await to_thread.run_sync(self.server.reload)

    for name in ("predict", "predict_proba"):
        # BentoML picks a response's media type from the output model's JSON schema, which pydantic builds
        # again for every response: a tenth of the event loop's work under load (py-spy). Ours is JSON.
        ChampionService.apis[name].output_spec.media_type = "application/json"
    return guard_service(ChampionService, cfg, holder)


def guard_service(service, cfg: ServeConfig, holder: dict[str, Any]):
    """`service` behind ChampionMiddleware (Host, paths, keys, JSON bodies, readiness, one-sentence errors)
    and BentoML's request timers and path metrics fixed; a text-generation service's routes are the OpenAI
    API's (serving/lm_service.py), answered with OpenAI's error object."""
    generative = cfg.task == "text-generation"
    if generative:
        g = cfg.generation
        core = frozenset((*OPENAI_PATHS, *MUTATING_PATHS, *PROBE_PATHS, "/metrics", "/", "/docs.json"))
        predict_paths, max_body = (OPENAI_PATHS[0],), g.max_prompt_chars * 12 + g.max_messages * 256 + 65_536
    else:
        core, predict_paths, max_body = ROUTES, PREDICT_PATHS, _max_body_bytes(cfg.limits)
    routes = core | _static_routes()
    service.add_asgi_middleware(
        ChampionMiddleware,
        holder=holder,
        model=cfg.model,
        max_body=max_body,
        routes=routes,
        allowed_hosts=allowed_hosts(cfg),
        predict_paths=predict_paths,
        buffered=not generative,
    )
    _cancel_request_timers()
    _label_other_paths_once(routes)
    return service


def _cancel_request_timers() -> None:
    """Make BentoML's TimeoutMiddleware cancel its timer when the request is answered.

    BentoML 1.4.39 arms `loop.call_later(timeout, ...)` for every request and never cancels it, so each
    answered request's future, context and tracing span stay alive for `timeout_seconds` (60 s). Under
    load that is hundreds of thousands of live objects: the garbage collector's oldest-generation pass
    then stops the worker for 100-500 ms every few seconds (measured with gc callbacks in this service;
    `opentelemetry` spans and uvloop TimerHandles topped the live objects). The same middleware, with the
    timer cancelled once the request is done; the 504 after `timeout_seconds` is unchanged."""
    import asyncio

    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from starlette.responses import JSONResponse

    if getattr(TimeoutMiddleware, "_champion_cancels_timers", False):
        return

    async def call(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def first_message(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        answer = asyncio.ensure_future(self.app(scope, receive, first_message), loop=loop)
        try:
            await waiter
        except TimeoutError:
            if answer.cancel():
                error = f"Not able to process the request in {self.timeout} seconds"
                await JSONResponse({"error": error}, status_code=504)(scope, receive, send)
        else:
            await answer
        finally:
            timer.cancel()

    TimeoutMiddleware.__call__ = call
    TimeoutMiddleware._champion_cancels_timers = True


def _label_other_paths_once(routes: frozenset[str]) -> None:
    """Make BentoML's HTTP metrics label a request for any path that is not a route as `other`.

    BentoML 1.4.39's traffic metrics middleware, which runs before any middleware of ours, labels every
    request with its raw path: each invented path added series to /metrics for the life of the process
    (150 requests, 3,000 series). Such a request goes on with the path `other`, which ChampionMiddleware
    answers with a 404; the routes keep their own labels."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as Metered

    if getattr(Metered, "_champion_routes", None) is None:
        count = Metered.__call__

        async def call(self, scope, receive, send) -> None:
            if scope["type"] == "http" and scope["path"] not in Metered._champion_routes:
                scope = {**scope, "path": OTHER_ROUTE, "raw_path": OTHER_ROUTE.encode(), ASKED: scope["path"]}
            await count(self, scope, receive, send)

        Metered.__call__ = call
    Metered._champion_routes = routes


def _answer(server, texts: list[str], probabilities: bool):
    """The batch's answers; a full inference log spool refuses the batch with 503 rather than answer
    predictions that could not be logged (serving/inference_log.py)."""
    from bentoml.exceptions import ServiceUnavailable

    from serving.inference_log import LogClosedError, SpoolFullError

    try:
        return server.predict(texts, probabilities=probabilities)
    except (SpoolFullError, LogClosedError) as err:
        raise ServiceUnavailable(str(err)) from None


def _static_routes() -> frozenset[str]:
    """The files of BentoML's API page (/static_content/...): routes too, each with its own metrics label."""
    from pathlib import Path

    from bentoml._internal.server import http_app

    folder = Path(http_app.__file__).parent / "static_content"
    return frozenset(f"/static_content/{p.name}" for p in folder.iterdir() if p.is_file())


def allowed_hosts(cfg: ServeConfig) -> frozenset[str]:
    """The Host names (ports aside) the service answers: loopback, the address it is bound to and
    `cfg.allowed_hosts`; bound to every interface, also this machine's names and addresses."""
    names = {*LOOPBACK_HOSTS, *(_host_name(h.encode()) for h in cfg.allowed_hosts)}
    if cfg.host in ("0.0.0.0", "::", ""):
        names |= _machine_names()
    else:
        names.add(_host_name(f"[{cfg.host}]".encode() if ":" in cfg.host else cfg.host.encode()))
    return frozenset(names)


def _machine_names() -> set[str]:
    import socket

    names = set()
    try:
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.add(name.lower())
            for *_, address in socket.getaddrinfo(name, None):
                names.add(f"[{address[0]}]" if ":" in address[0] else address[0])
    except OSError:  # a name that does not resolve: the loopback names and the configured ones still work
        pass
    return names


def _host_name(value: bytes) -> str:
    """The name in a Host header: lower case, without its port or a trailing dot; [v6] keeps brackets."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text.partition("]")[0] + "]"
    if text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


def _host_refusal(headers, allowed: frozenset[str]) -> _Refusal | None:
    """Why a request is refused for the name it reached the server by (DNS rebinding), or None."""
    if "*" in allowed:
        return None
    hosts = [value for name, value in headers if name == b"host"]
    if not hosts:
        return _NO_HOST
    if len(hosts) > 1:
        return _Refusal(400, "Host", "the request has two Host headers; send one.")
    name = _host_name(hosts[0])
    if name in allowed:
        return None
    error = (
        f"this server does not answer to the host {_shown(name.encode())}; use its address, or add the name "
        "to allowed_hosts in the serve config."
    )
    return _Refusal(421, "Host", error)


def _max_body_bytes(limits: LimitsConfig) -> int:
    """The largest body a valid request can need: every text at its limit, every character escaped as a
    surrogate pair (12 bytes, `\\ud83d\\ude00`), with room for keys and whitespace."""
    return limits.max_items * (limits.max_text_chars * 12 + 16) + 4096


class ChampionMiddleware:
    """API key on mutating endpoints, then the request's headers (JSON only, sizes); version header, latency
    metrics and one-sentence errors on every answer of the service's own endpoints."""

    def __init__(
        self,
        app,
        holder: dict[str, Any],
        model: str,
        max_body: int,
        routes: frozenset[str] = ROUTES,
        allowed_hosts: frozenset[str] = frozenset(("*",)),
        predict_paths: tuple[str, ...] = PREDICT_PATHS,
        buffered: bool = True,
    ):
        self.app, self.holder, self.model, self.max_body = app, holder, model, max_body
        self.routes, self.allowed_hosts = routes, allowed_hosts
        # buffered: the answers of predict_paths are read here for metrics and version headers (/predict);
        # the OpenAI routes stream, and their app sets its own headers and metrics.
        self.predict_paths, self.buffered = predict_paths, buffered

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = scope.get("headers") or []
        if path not in PROBE_PATHS and (refusal := _host_refusal(headers, self.allowed_hosts)):
            await self._refuse(send, path, refusal)
            return
        # Only the service's own routes reach BentoML, whose metrics label every request with its path:
        # any other path is answered here, under one label, so /metrics cannot be grown by inventing paths.
        if path not in self.routes:
            unknown = _UNKNOWN_OPENAI_PATH if self.predict_paths == (OPENAI_PATHS[0],) else _UNKNOWN_PATH
            await self._refuse(send, scope.get(ASKED, path), _Refusal(404, "path", unknown))
            return
        if path not in self.predict_paths and path not in MUTATING_PATHS:
            await self.app(scope, receive, send)
            return
        if path in MUTATING_PATHS:
            problem = _auth_problem(dict(headers))
            if problem is not None:
                self._error_metric("unauthorized")
                await _send_json(send, problem[0], {"error": problem[1], "field": "X-API-Key"})
                return
        if scope["method"] == "POST":  # other methods get BentoML's 405 (and CORS its preflight)
            refusal = _check_head(headers, self.max_body)
            if refusal is None:
                receive, refusal = await _read_body(receive, self.max_body)
            if refusal is not None:
                self._error_metric("bad_request")
                await _send_json(
                    send, refusal.status, _shaped(path, refusal.error, refusal.field, refusal.status)
                )
                return
        if path in self.predict_paths:
            server = self.holder.get("server")
            if server is not None and not server.ready():
                self._error_metric("not_ready")
                await _send_json(send, 503, _shaped(path, server.not_ready_reason(), None, 503))
                return
            if server is not None and (full := server.log_full_reason()):
                self._error_metric("log_full")
                await _send_json(send, 503, _shaped(path, full, None, 503))
                return
            if not self.buffered:
                await self.app(scope, receive, send)
                return
        started = time.perf_counter()
        start_message: dict[str, Any] = {}
        body = bytearray()

        async def capture(message) -> None:
            if message["type"] == "http.response.start":
                start_message.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            status, payload = start_message["status"], bytes(body)
            headers = [(k, v) for k, v in start_message.get("headers", []) if k.lower() != b"content-length"]
            if status == 405:
                error = f"{scope['method']} is not allowed on {path}; send a POST with a JSON body."
                payload = json.dumps({"error": error, "field": None}).encode()
                self._error_metric("bad_request")
            elif status >= 400:
                payload = json.dumps(_one_sentence(status, payload)).encode()
                self._error_metric("bad_request" if status < 500 else "server_error")
            elif path in PREDICT_PATHS:
                headers += self._observe(payload, time.perf_counter() - started, scope.get("client"))
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({**start_message, "headers": headers})
            await send({"type": "http.response.body", "body": payload})

        await self.app(scope, receive, capture)

    def _observe(self, payload: bytes, seconds: float, client) -> list[tuple[bytes, bytes]]:
        try:
            items = json.loads(payload)
        except ValueError:
            return []
        server = self.holder.get("server")
        if server is not None and isinstance(items, list):  # the canary counts evidence per peer address
            ids = [i["request_id"] for i in items if isinstance(i, dict) and "request_id" in i]
            server.credit_canary(client[0] if client else None, ids)
        from serving.metrics import metrics

        pairs = sorted({(i["version"], i["arm"]) for i in items if isinstance(i, dict) and "version" in i})
        for version, arm in pairs:
            metrics().latency.labels(self.model, version, arm).observe(seconds)
        versions = ",".join(sorted({v for v, _ in pairs}, key=_version_key))
        return [
            (b"x-model-version", versions.encode()),
            (b"x-model-name", self.model.encode()),
            (b"x-worker-pid", str(os.getpid()).encode()),  # which worker answered: each follows on its own
        ]

    def _error_metric(self, kind: str) -> None:
        from serving.metrics import metrics

        metrics().errors.labels(self.model, "", "", kind).inc()

    async def _refuse(self, send, path: str, refusal: _Refusal) -> None:
        from serving.metrics import metrics

        route = path if path in self.routes else OTHER_ROUTE
        metrics().routes.labels(route, str(refusal.status)).inc()
        await _send_json(send, refusal.status, _shaped(path, refusal.error, refusal.field, refusal.status))


def _shaped(path: str, error: str, field: str | None, status: int) -> dict[str, Any]:
    """A refusal's body: {"error", "field"}, or OpenAI's error object on the OpenAI routes (its clients read
    `error.message`)."""
    if path.startswith("/v1/"):
        return openai_error(error, field, status)
    return {"error": error, "field": field}


def openai_error(message: str, param: str | None, status: int, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (0, version)


def _auth_problem(headers: dict[bytes, bytes]) -> tuple[int, str] | None:
    """(status, sentence) when the request may not call /feedback or /reload; None when its key is right.

    The key is the ingest key (serving/config.py `feedback_key`); it is no console credential."""
    try:
        expected, source = feedback_key()
    except ChampionError as err:  # a key file others may read: the endpoint stays shut until it is fixed
        _log.error("%s", err)
        return 403, "the server's feedback key file is refused (see its log), so this endpoint is disabled."
    if not expected:
        return (
            403,
            f"{FEEDBACK_KEY_ENV} is not set on the server (nor CHAMPION_HOME/{FEEDBACK_KEY_FILE}), so this "
            "endpoint is disabled; set it and retry.",
        )
    if source == LEGACY_API_KEY_ENV:
        _warn_legacy_key()
    given = headers.get(b"x-api-key", b"").decode("latin-1")
    if not given:
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        given = token if scheme.lower() == "bearer" else ""
    if not given:
        return 401, "missing API key; send it in the X-API-Key header (or Authorization: Bearer KEY)."
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return 401, f"wrong API key in X-API-Key; use the server's {FEEDBACK_KEY_ENV}."
    return None


@functools.cache
def _warn_legacy_key() -> None:
    _log.warning("%s is deprecated for /feedback and /reload; call it %s.", LEGACY_API_KEY_ENV,
                 FEEDBACK_KEY_ENV)  # fmt: skip


def _check_head(headers, max_body: int) -> _Refusal | None:
    """Why a POST to one of the JSON endpoints is refused on its headers alone, or None.

    One pass over the raw header pairs; the usual `application/json` costs one bytes comparison.
    """
    content_type = length = None
    size = 0
    for name, value in headers:
        size += len(name) + len(value)
        if name == b"content-type":
            if content_type is not None:
                return _TWO_CONTENT_TYPES
            content_type = value
        elif name == b"content-length":
            length = value
        elif name == b"content-encoding" and value.lower() != b"identity":
            error = f"Content-Encoding {_shown(value)} is not accepted; send the JSON body uncompressed."
            return _Refusal(415, "Content-Encoding", error)
    if size > MAX_HEADER_BYTES:
        field = max(headers, key=lambda pair: len(pair[1]))[0].decode("latin-1")
        error = f"the request headers are {size} bytes, over {MAX_HEADER_BYTES}; shorten {field}."
        return _Refusal(431, field, error)
    if content_type is None:
        return _NO_CONTENT_TYPE
    if content_type != b"application/json":
        refusal = _media_type_refusal(content_type)
        if refusal is not None:
            return refusal
    if length is None:  # chunked: _read_body counts
        return None
    if not length.isdigit():  # uvicorn refuses these itself; other ASGI servers may not
        return _Refusal(400, "Content-Length", f"Content-Length {_shown(length)} is not a number.")
    if int(length) > max_body:
        error = f"the body is {int(length)} bytes, over the limit of {max_body}; send fewer or shorter texts."
        return _Refusal(413, "Content-Length", error)
    return None


def _media_type_refusal(value: bytes) -> _Refusal | None:
    """None for application/json (in UTF-8 if it names a charset): the endpoints take nothing else."""
    media_type, _, parameters = value.partition(b";")
    media_type = media_type.strip().lower()
    kind, slash, subtype = media_type.partition(b"/")
    if not (slash and _TOKEN.fullmatch(kind) and _TOKEN.fullmatch(subtype)):
        return _Refusal(400, "Content-Type", f"{_shown(value)} is not a media type; send application/json.")
    if media_type != b"application/json":
        error = f"{_shown(media_type)} is not accepted; send a JSON body as application/json."
        return _Refusal(415, "Content-Type", error)
    for parameter in parameters.split(b";"):
        name, equals, given = parameter.strip().partition(b"=")
        if not name and not equals:
            continue  # RFC 9110 allows empty parameters ("application/json;")
        if not (equals and _TOKEN.fullmatch(name)):
            return _Refusal(400, "Content-Type", f"{_shown(value)} has a malformed parameter; drop it.")
        if name.lower() == b"charset" and given.strip(b'"').lower() not in (b"utf-8", b"utf8"):
            return _Refusal(415, "Content-Type", f"charset {_shown(given)} is not accepted; send UTF-8.")
    return None


def _shown(value: bytes) -> str:
    """A header value for an error sentence: printable, and short whatever the client sent."""
    text = value.decode("latin-1")
    return repr(text if len(text) <= 60 else text[:57] + "...")


async def _read_body(receive, max_body: int):
    """(a receive that replays the whole body, None), or (receive, a refusal) when it is too long or the
    client left before sending it all: BentoML would answer that with a 500 and a traceback."""
    messages, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return receive, _INCOMPLETE_BODY  # nobody will read the answer; the access log and metrics will
        messages.append(message)
        size += len(message.get("body", b""))
        if size > max_body:
            error = f"the body is over the limit of {max_body} bytes; send fewer or shorter texts."
            return receive, _Refusal(413, "body", error)
        if not message.get("more_body"):
            break

    async def replay():
        return messages.pop(0) if messages else await receive()

    return replay, None


def _one_sentence(status: int, payload: bytes) -> dict[str, Any]:
    """Turn BentoML's error bodies (pydantic details, lists, bare strings) into {error, field}."""
    try:
        data = json.loads(payload)
    except ValueError:
        data = payload.decode("utf-8", "replace")
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if isinstance(data, dict) and "field" in data and "error" in data:
        return data
    if isinstance(data, dict) and isinstance(data.get("detail"), list) and data["detail"]:
        data["detail"] = _relevant(data["detail"])
        first = data["detail"][0]
        field = _field_path(first.get("loc", ()))
        kind, msg = first.get("type", ""), str(first.get("msg", "invalid"))
        if kind == "json_invalid":
            return {"error": "the request body is not valid JSON; send a JSON object.", "field": None}
        if kind == "missing":
            return {"error": f"'{field}' is required; add it to the JSON body.", "field": field}
        if kind == "model_type" and not first.get("loc"):  # an array, a number, null: not an object
            return {"error": "the request body must be a JSON object of named fields.", "field": "body"}
        msg = re.sub(r"^Value error, ", "", msg)
        more = f" ({len(data['detail']) - 1} more problems)" if len(data["detail"]) > 1 else ""
        fix = "" if ";" in msg else "; fix that value"  # our own validators already name the fix
        return {"error": f"'{field}' {_lower_first(msg)}{more}{fix}.", "field": field}
    if isinstance(data, dict) and "error" in data:
        return {"error": str(data["error"]), "field": data.get("field")}
    if status >= 500:
        return {"error": "the server failed on this request; see its log.", "field": None}
    return {"error": str(data) or f"HTTP {status}", "field": None}


def _field_path(loc) -> str:
    out, after_index = "", False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (after_index and _is_branch(str(part))):  # a union branch is no field of the request
            out += ("." if out else "") + str(part)
        after_index = isinstance(part, int)
    return out or "body"


def _is_branch(part: str) -> bool:
    """pydantic's name for a union branch: a schema description such as 'function-after[...]', 'str', or
    the class name 'Keyed'."""
    return part in ("str", "Keyed") or "[" in part


def _relevant(details: list) -> list:
    """The errors that say what is wrong with an item, without 'it is not the other kind of item'."""
    kept = [d for d in details if not (d.get("type") in _WRONG_KIND and _in_union(d.get("loc", ())))]
    return kept or details


def _in_union(loc) -> bool:
    return any(isinstance(a, int) and _is_branch(str(b)) for a, b in itertools.pairwise(loc))


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


async def _send_json(send, status: int, data: dict[str, Any]) -> None:
    payload = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def __getattr__(name: str):
    """`ChampionService` is built on first access, from the config `champion serve` handed over."""
    if name == "ChampionService":
        service = build_service(config_from_env())
        globals()[name] = service  # BentoML looks the service up among the module's attributes
        return service
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
