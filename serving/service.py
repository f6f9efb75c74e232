"""The BentoML service: `bentoml serve serving.service:ChampionService` (what `champion serve` runs).

`build_service(cfg)` makes the service class; BentoML needs the batch cap, latency budget and input limits
when the class is defined, so `ChampionService` is built on first access from the config `champion serve`
wrote (`CHAMPION_SERVE_CONFIG`), not at import.

Endpoints: POST /predict and /predict_proba (adaptive batching), POST /feedback and /reload (API key),
and BentoML's own /healthz, /livez, /readyz and /metrics.
"""

import hmac
import json
import os
import re
import time
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from serving.config import API_KEY_ENV, ServeConfig, config_from_env
from serving.server import Answer, AnswerWithProbabilities

PREDICT_PATHS = ("/predict", "/predict_proba")
MUTATING_PATHS = ("/feedback", "/reload")


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
    Texts = Annotated[list[Text], Field(min_length=1, max_length=limits.max_items)]
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
    )
    class ChampionService:
        def __init__(self) -> None:
            from champion.config import prepare_environment
            from serving.server import ModelServer

            prepare_environment()
            self.server = ModelServer(cfg).start()
            holder["server"] = self.server

        def __is_ready__(self) -> bool:
            return self.server.ready()

        @bentoml.on_shutdown
        def shutdown(self) -> None:
            self.server.close()  # flushes the inference log: graceful shutdown loses no prediction

        @bentoml.api(**batching)
        def predict(self, texts: Texts) -> list[Answer]:
            return self.server.predict(texts)

        @bentoml.api(**batching)
        def predict_proba(self, texts: Texts) -> list[AnswerWithProbabilities]:
            return self.server.predict(texts, probabilities=True)

        @bentoml.api
        async def feedback(
            self,
            request_id: Annotated[str, Field(min_length=1, max_length=64)],
            label: Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_checked_text)],
        ) -> dict:
            from serving.inference_log import UnknownRequestError

            try:
                await to_thread.run_sync(self.server.feedback, request_id, label)
            except UnknownRequestError as err:
                return JSONResponse({"error": str(err), "field": "request_id"}, status_code=404)
            return {"request_id": request_id, "label": label, "recorded": True}

        @bentoml.api
        async def reload(self) -> dict:
            return await to_thread.run_sync(self.server.reload)

    for name in ("predict", "predict_proba"):
        # BentoML picks a response's media type from the output model's JSON schema, which pydantic builds
        # again for every response: a tenth of the event loop's work under load (py-spy). Ours is JSON.
        ChampionService.apis[name].output_spec.media_type = "application/json"
    ChampionService.add_asgi_middleware(ChampionMiddleware, holder=holder, model=cfg.model)
    return ChampionService


class ChampionMiddleware:
    """API key on mutating endpoints; version header, latency metrics and one-sentence errors on the rest."""

    def __init__(self, app, holder: dict[str, Any], model: str):
        self.app, self.holder, self.model = app, holder, model

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path in MUTATING_PATHS:
            problem = _auth_problem(dict(scope.get("headers") or []))
            if problem is not None:
                self._error_metric("unauthorized")
                await _send_json(send, problem[0], {"error": problem[1], "field": "X-API-Key"})
                return
        if path not in PREDICT_PATHS and path not in MUTATING_PATHS:
            await self.app(scope, receive, send)
            return
        if path in PREDICT_PATHS:
            server = self.holder.get("server")
            if server is not None and not server.ready():
                self._error_metric("not_ready")
                await _send_json(send, 503, {"error": server.not_ready_reason(), "field": None})
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
            if status >= 400:
                payload = json.dumps(_one_sentence(status, payload)).encode()
                self._error_metric("bad_request" if status < 500 else "server_error")
            elif path in PREDICT_PATHS:
                headers += self._observe(payload, time.perf_counter() - started)
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({**start_message, "headers": headers})
            await send({"type": "http.response.body", "body": payload})

        await self.app(scope, receive, capture)

    def _observe(self, payload: bytes, seconds: float) -> list[tuple[bytes, bytes]]:
        try:
            items = json.loads(payload)
        except ValueError:
            return []
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


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (0, version)


def _auth_problem(headers: dict[bytes, bytes]) -> tuple[int, str] | None:
    """(status, sentence) when the request may not mutate anything; None when its key is right."""
    expected = os.environ.get(API_KEY_ENV)
    if not expected:
        return (
            403,
            f"{API_KEY_ENV} is not set on the server, so this endpoint is disabled; set it and restart.",
        )
    given = headers.get(b"x-api-key", b"").decode("latin-1")
    if not given:
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        given = token if scheme.lower() == "bearer" else ""
    if not given:
        return 401, "missing API key; send it in the X-API-Key header (or Authorization: Bearer KEY)."
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return 401, f"wrong API key in X-API-Key; use the value of {API_KEY_ENV} on the server."
    return None


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
        first = data["detail"][0]
        field = _field_path(first.get("loc", ()))
        kind, msg = first.get("type", ""), str(first.get("msg", "invalid"))
        if kind == "json_invalid":
            return {"error": "the request body is not valid JSON; send a JSON object.", "field": None}
        if kind == "missing":
            return {"error": f"'{field}' is required; add it to the JSON body.", "field": field}
        msg = re.sub(r"^Value error, ", "", msg)
        more = f" ({len(data['detail']) - 1} more problems)" if len(data["detail"]) > 1 else ""
        return {"error": f"'{field}' {_lower_first(msg)}{more}; fix that value.", "field": field}
    if isinstance(data, dict) and "error" in data:
        return {"error": str(data["error"]), "field": data.get("field")}
    if status >= 500:
        return {"error": "the server failed on this request; see its log.", "field": None}
    return {"error": str(data) or f"HTTP {status}", "field": None}


def _field_path(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


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
