"""The OpenAI-compatible service of a text-generation model: what `champion serve NAME` runs for one.

`build_lm_service(cfg)` makes the BentoML service class (one `LMServer` per worker, following the registry)
with the OpenAI API mounted at /v1 as a plain ASGI app:

- POST /v1/chat/completions: `model` is the registered name (the traffic policy picks the version) or
  NAME@champion / NAME@challenger; `stream: true` answers with server-sent events token by token, else one
  JSON answer. `max_tokens` (or `max_completion_tokens`), `temperature` (0 is greedy; omitted: the version's
  recorded setting), `top_p`, `stop`, `seed` and `response_format: {"type": "json_object"}` are honoured.
  JSON mode is validated and retried, not constrained: an answer that is not a JSON object is generated again
  (sampled, another seed) up to `generation.json_retries` times, and a streamed one, already sent, is only
  validated. Every answer carries `usage`, its version (`x-model-version` header, `version` field,
  `system_fingerprint`) and request id (`x-request-id`, `request_id`; `/feedback` takes it).
- GET /v1/models lists the name and the served aliases.
- POST /feedback (ingest key): {"request_id", "rating": -1|0|1, "correction": "the answer it should have
  given"}; POST /reload (ingest key).

Bad requests get a 4xx with OpenAI's error object ({"error": {"message": one sentence, "param": the field,
"type": "invalid_request_error"}}); the service's guards in `serving/service.py` (Host, Content-Type, body
size, readiness) answer the same shape on /v1 paths.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from serving.config import ServeConfig, config_from_env
from serving.service import guard_service, openai_error

CHAT_PATH, MODELS_PATH = "/v1/chat/completions", "/v1/models"
OPENAI_ROUTES = (CHAT_PATH, MODELS_PATH)
_UNSUPPORTED = {  # fields OpenAI clients may send with a value this server cannot honour
    "n": (1, "only one choice is generated; drop 'n' or send 1"),
    "logprobs": (False, "token log-probabilities are not returned; drop 'logprobs'"),
    "presence_penalty": (0, "penalties are not applied; drop 'presence_penalty' or send 0"),
    "frequency_penalty": (0, "penalties are not applied; drop 'frequency_penalty' or send 0"),
}


def _no_null(text: str) -> str:
    if "\x00" in text:
        raise ValueError("contains a null byte; remove it")
    return text


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Annotated[str, AfterValidator(_no_null)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: Annotated[str, AfterValidator(_no_null)] | list[_Part]
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object"]


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatBody(BaseModel):
    """The body of POST /v1/chat/completions: OpenAI's fields this server honours; any other is refused by
    name rather than ignored (a client asking for tools must not get an answer that silently has none)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = Field(min_length=1, max_length=512)
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    response_format: _ResponseFormat | None = None
    stream_options: _StreamOptions | None = None
    user: str | None = Field(None, min_length=1, max_length=256)
    n: int | None = None
    logprobs: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class RequestError(Exception):
    """A request answered with a 4xx: its status, the field at fault and one sentence."""

    def __init__(self, status: int, param: str | None, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.message, self.code = status, param, message, code


def chat_params(body: ChatBody, name: str):
    """The server's `ChatParams` for a checked body; `RequestError` for a value this server cannot honour."""
    from serving.lm_server import ChatParams

    alias = _alias(body.model, name)
    for field_name, (allowed, fix) in _UNSUPPORTED.items():
        value = getattr(body, field_name)
        if value is not None and value != allowed:
            raise RequestError(400, field_name, f"'{field_name}' is {value!r}: {fix}.")
    if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
        raise RequestError(
            400, "max_tokens", "'max_tokens' and 'max_completion_tokens' differ; send one of them."
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return ChatParams(
        messages=[{"role": m.role, "content": m.text()} for m in body.messages],
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        seed=body.seed,
        json_object=body.response_format is not None and body.response_format.type == "json_object",
        user=body.user,
        alias=alias,
    )


def _alias(model: str, name: str) -> str | None:
    asked, at, alias = model.partition("@")
    if asked == name and (not at or alias in ("champion", "challenger")):
        return alias or None
    raise RequestError(
        404,
        "model",
        f"the model {model[:100]!r} is not served here; ask for '{name}' (or '{name}@champion', "
        f"'{name}@challenger').",
        code="model_not_found",
    )


def validation_error(err: ValidationError) -> RequestError:
    """The first problem of a body that does not fit its schema, as one sentence naming the field."""
    first = err.errors(include_url=False)[0]
    loc = [str(part) for part in first.get("loc", ()) if not _is_branch(part)]
    field = _dotted(loc)
    kind, msg = first.get("type", ""), str(first.get("msg", "is invalid"))
    if kind == "json_invalid":
        return RequestError(400, None, "the request body is not valid JSON; send a JSON object.")
    if kind == "model_type" and not loc:
        return RequestError(400, None, "the request body must be a JSON object of named fields.")
    if kind == "extra_forbidden":
        return RequestError(400, field, f"'{field}' is not supported by this server; remove it.")
    if kind == "missing":
        return RequestError(400, field, f"'{field}' is required; add it.")
    msg = msg.removeprefix("Value error, ")
    fix = "" if ";" in msg else "; fix that value"
    return RequestError(400, field, f"'{field}' {msg[:1].lower()}{msg[1:]}{fix}.")


def _is_branch(part) -> bool:
    """pydantic's name for a union branch (`str`, `list[_Part]`, `function-after[...]`): no field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "list", "_Part"))


def _dotted(loc: list[str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else ("." if out else "") + part
    return out or "body"


# --- the /v1 app ------------------------------------------------------------------------------------------


def openai_app(holder: dict[str, Any], cfg: ServeConfig):
    """The ASGI app mounted at /v1: chat completions and models, over the worker's `LMServer` in `holder`."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def chat_completions(request):
        if request.method != "POST":
            return _error(_wrong_method(request.method, CHAT_PATH, "POST a JSON body"))
        server = holder["server"]
        peer = request.scope.get("client")
        client = peer[0] if peer else None  # the canary's unit of evidence, as for /predict
        try:
            try:
                body = ChatBody.model_validate_json(await request.body())
            except ValidationError as err:
                raise validation_error(err) from None
            params = chat_params(body, server.name)
            call = _submit(server, params, client)
        except RequestError as err:
            return _error(err)
        headers = _headers(call)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                _events(call, server.name, include_usage, params.json_object),
                media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache"},
            )
        finish = await _finish_of(call)
        for attempt in range(cfg.generation.json_retries if params.json_object else 0):
            if finish.finish_reason not in ("stop", "length") or _json_object(finish.text):
                break
            again = _submit(server, _resampled(params, attempt), client)
            call, finish = again, await _finish_of(again)
        if finish.finish_reason in ("error", "cancelled"):
            return _error(_failed(finish))
        answer = _completion(call, finish, server.name)
        if params.json_object:
            answer["json_valid"] = _json_object(finish.text)
        return JSONResponse(answer, headers=_headers(call))

    async def models(request):
        if request.method != "GET":
            return _error(_wrong_method(request.method, MODELS_PATH, "GET it"))
        server = holder["server"]
        now = int(time.time())
        data = [{"id": m["id"], "object": "model", "created": now, "owned_by": "champion", **m}
                for m in server.models()]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    return Starlette(
        routes=[
            Route("/chat/completions", chat_completions, methods=_METHODS),
            Route("/models", models, methods=_METHODS),
        ]
    )


_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]  # each route answers the wrong ones itself


def _wrong_method(method: str, path: str, fix: str) -> RequestError:
    return RequestError(405, None, f"{method} is not allowed on {path}; {fix}.")


def _submit(server, params, client: str | None = None):
    """`server.chat(params, client)`; its refusals as `RequestError`s (4xx: the request; 503: the server)."""
    from serving.generation import EngineClosed, InvalidRequest
    from serving.inference_log import LogClosedError, SpoolFullError
    from serving.lm_server import Busy
    from serving.server import NotReadyError

    try:
        return server.chat(params, client)
    except InvalidRequest as err:
        status = 404 if err.field == "model" else 400
        raise RequestError(status, err.field, str(err).partition(": ")[2] or str(err)) from None
    except (NotReadyError, SpoolFullError, LogClosedError, EngineClosed, Busy) as err:
        raise RequestError(503, None, str(err)) from None


def _resampled(params, attempt: int):
    from dataclasses import replace

    seed = (params.seed or 0) + attempt + 1
    return replace(params, temperature=max(params.temperature or 0.0, 0.7), seed=seed)


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


async def _finish_of(call):
    """The answer's end; a request abandoned meanwhile (BentoML's timeout) cancels its generation."""
    from serving.generation import Finish

    try:
        async for event in call.stream:
            if isinstance(event, Finish):
                return event
    finally:
        if call.stream.finish is None:
            call.stream.cancel()
    raise RuntimeError("a stream ended without its Finish event")  # Stream always ends with one


def _failed(finish) -> RequestError:
    if finish.finish_reason == "cancelled":
        return RequestError(
            503, None, "the server is shutting down and cancelled this answer; send it again."
        )
    return RequestError(500, None, "the model failed on this request; see the server's log.")


def _headers(call) -> dict[str, str]:
    return {
        "x-request-id": call.request_id,
        "x-model-version": call.version,
        "x-model-arm": call.arm,
    }


def _common(call, name: str, kind: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{call.request_id}",
        "object": kind,
        "created": call.created,
        "model": name,
        "system_fingerprint": f"{name}-v{call.version}",
        "version": call.version,
        "arm": call.arm,
        "request_id": call.request_id,
    }


def _usage(finish) -> dict[str, int]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def _completion(call, finish, name: str) -> dict[str, Any]:
    return {
        **_common(call, name, "chat.completion"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": finish.text},
                "finish_reason": finish.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(finish),
    }


async def _events(call, name: str, include_usage: bool, json_object: bool):
    """The answer as server-sent events: a role chunk, a chunk per piece of text, the finish chunk (with
    usage), a usage-only chunk when asked, then [DONE]. A client that leaves cancels the answer: the engine
    frees its row at the next step, and the partial answer is logged as "cancelled"."""
    from serving.generation import Delta

    head = _common(call, name, "chat.completion.chunk")

    def chunk(delta: dict | None, finish_reason=None, **extra) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                             "logprobs": None}]  # fmt: skip
        return _sse({**head, "choices": choices, **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        finish = None
        async for event in call.stream:
            if isinstance(event, Delta):
                yield chunk({"content": event.text})
            else:
                finish = event
        if finish.finish_reason in ("error", "cancelled"):
            err = _failed(finish)
            yield _sse(openai_error(err.message, None, err.status))
        else:
            extra = {"usage": _usage(finish)}
            if json_object:
                extra["json_valid"] = _json_object(finish.text)
            yield chunk({}, finish.finish_reason, **extra)
            if include_usage:
                yield chunk(None, usage=_usage(finish))
        yield b"data: [DONE]\n\n"
    finally:
        if call.stream.finish is None:  # the client left: free the engine's row
            call.stream.cancel()


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _error(err: RequestError):
    from starlette.responses import JSONResponse

    headers = {"retry-after": "2"} if err.status == 503 else None
    return JSONResponse(
        openai_error(err.message, err.param, err.status, err.code), status_code=err.status, headers=headers
    )


# --- the BentoML service ----------------------------------------------------------------------------------


def build_lm_service(cfg: ServeConfig):
    """A BentoML service class for a text-generation model: one `LMServer` per worker, /v1 mounted."""
    import bentoml
    from anyio import to_thread
    from starlette.responses import JSONResponse

    holder: dict[str, Any] = {}

    @bentoml.service(
        name="champion-lm",
        workers=cfg.workers,
        traffic={"timeout": cfg.timeout_seconds},
        metrics={"enabled": True, "namespace": "bentoml_service"},
        logging={"access": {"enabled": cfg.access_log, "request_content_type": False}},
    )
    class ChampionLMService:
        def __init__(self) -> None:
            from champion.config import prepare_environment, secure_home
            from serving.lm_server import LMServer

            prepare_environment()
            secure_home()
            self.server = LMServer(cfg).start(exit_with_parent=True)
            holder["server"] = self.server

        def __is_ready__(self) -> bool:
            return self.server.ready() and self.server.log.writer_alive

        def __is_alive__(self) -> bool:
            return self.server.log.writer_alive

        @bentoml.on_shutdown
        def shutdown(self) -> None:
            self.server.close()  # running answers finish (or end cancelled) and are logged first

        @bentoml.api
        async def feedback(
            self,
            request_id: Annotated[str, Field(min_length=1, max_length=64)],
            rating: Literal[-1, 0, 1] | None = None,
            correction: Annotated[str | None, Field(min_length=1, max_length=100_000)] = None,
        ) -> dict:
            from serving.inference_log import LogUnavailableError, UnknownRequestError

            if rating is None and correction is None:
                error = "send a 'rating' (-1, 0 or 1) or a 'correction' (the answer it should have given)."
                return JSONResponse({"error": error, "field": "rating"}, status_code=400)
            if correction is not None and "\x00" in correction:
                return JSONResponse(
                    {"error": "'correction' contains a null byte; remove it.", "field": "correction"},
                    status_code=400,
                )
            try:
                await to_thread.run_sync(self.server.feedback_answer, request_id, rating, correction)
            except UnknownRequestError as err:
                return JSONResponse({"error": str(err), "field": "request_id"}, status_code=404)
            except LogUnavailableError as err:
                return JSONResponse({"error": str(err), "field": None}, status_code=503)
            return {"request_id": request_id, "rating": rating, "recorded": True}

        @bentoml.api
        async def reload(self) -> dict:
            return await to_thread.run_sync(self.server.reload)

    ChampionLMService.mount_asgi_app(openai_app(holder, cfg), path="/v1")
    return guard_service(ChampionLMService, cfg, holder)


def __getattr__(name: str):
    """`ChampionLMService` is built on first access, from the config `champion serve` handed over."""
    if name == "ChampionLMService":
        service = build_lm_service(config_from_env())
        globals()[name] = service  # BentoML looks the service up among the module's attributes
        return service
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
