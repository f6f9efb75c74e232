"""The language-model server's logic, free of HTTP: one generation engine per version, routing, the log.

`serving/lm_service.py` wraps one `LMServer` per BentoML worker and speaks the OpenAI API over it. The server
follows the registry as the classifier server does (the same `ModelServer` machinery: audit history, swaps,
refusals); what differs is what a version is in memory (`ServedLM`: the loaded version and its own `Engine`)
and the request path:

- `chat` renders the conversation with the version's chat template (its recorded system prompt first when
  the request has none), picks the arm (champion; A/B share to the challenger; shadow copies), and submits
  it to that version's engine. The stream is that version's to the end: an alias move sends the next
  request elsewhere and the old version finishes what it started before its engine stops (`drain`).
- Every answer is logged when it ends, however it ends (a client that leaves mid-stream cancels it and the
  partial answer is logged with label "cancelled"), from the engine's thread: no reader is needed for it.
- A canary's answers are compared with the champion's answer to the same conversation (generated once the
  canary's has ended, never sent to anyone): they agree when both name the same intent in their JSON, or,
  when neither answer is JSON, when their texts are the same. Each comparison is evidence for the canary's
  guardrails, counted per client (the connection's address) as for a classifier, with the canary's time to
  first token as its latency and an answer that ended in an error as a failure.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from champion.errors import ChampionError
from serving.config import ServeConfig
from serving.follower import Served
from serving.generation import Engine, Finish, GenerationRequest, InvalidRequest, Stream
from serving.inference_log import InferenceLog, PredictionRecord, SpoolFullError
from serving.server import ModelServer, NotReadyError, distinct_challenger
from serving.traffic import CANARY_ARM, CHALLENGER_ARM, CHAMPION_ARM, SHADOW_ARM, choose_arms

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system
SERVED_ALIASES = ("champion", "challenger")
_WARMUP = [{"role": "user", "content": "hello"}]


class Busy(ChampionError):
    """More answers wait for a version than `generation.max_waiting`: refused now (503), not queued."""


@dataclass(frozen=True)
class ServedLM:
    """A text-generation version in memory with the engine that answers for it (and only it)."""

    lm: Any  # serving.lm_model.LoadedLM
    engine: Engine

    @property
    def version(self) -> str:
        return self.lm.version

    @property
    def format(self) -> str:
        return self.lm.format

    @property
    def load_seconds(self) -> float:
        return self.lm.load_seconds


@dataclass(frozen=True)
class ChatParams:
    """One chat request, checked by the caller's schema (types) and here (limits, roles, the model)."""

    messages: list[dict[str, str]]
    max_tokens: int | None = None
    temperature: float | None = None  # None: the version's recorded setting (greedy for `champion sft`)
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    json_object: bool = False  # response_format {"type": "json_object"}
    user: str | None = None  # keeps one user on one arm of an A/B test
    alias: str | None = None  # NAME@alias: champion, or challenger while one is served


@dataclass(frozen=True)
class ChatCall:
    """A submitted answer: its stream, the version and arm answering, and what was asked (for the log)."""

    stream: Stream
    model: ServedLM
    arm: str
    conversation: str  # the messages as JSON, as logged
    created: int  # unix seconds, OpenAI's `created`

    @property
    def request_id(self) -> str:
        return self.stream.request_id

    @property
    def version(self) -> str:
        return self.model.version


class LMServer(ModelServer):
    """One worker's state for a text-generation model: the follower, one engine per loaded version, the
    inference log, shadow copies and the canary's comparisons."""

    def __init__(self, cfg: ServeConfig, registry=None, inference_log: InferenceLog | None = None):
        super().__init__(cfg, registry=registry, inference_log=inference_log)
        self._engines: dict[str, Engine] = {}  # version -> its engine, drained when no alias serves it
        self._engines_lock = threading.Lock()
        self._shadows = threading.BoundedSemaphore(cfg.traffic.shadow_queue)

    # --- loading --------------------------------------------------------------------------------------

    def _prepare_forwards(self) -> None:
        pass  # each version's engine runs its forwards from its own thread

    def _read_version(self, version: str) -> ServedLM:
        from serving.lm_model import load_generative_version

        g = self.cfg.generation
        lm = load_generative_version(self.registry.client, self.name, version, self.cfg.device, g.dtype)
        engine = Engine(
            lm.model,
            lm.tokenizer,
            lm.version,
            max_batch=g.max_batch,
            max_new_tokens_limit=g.max_tokens,
            max_prompt_tokens=g.max_prompt_tokens,
            context=lm.active,
        )
        served = ServedLM(lm, engine)
        # One short answer before the version takes traffic: the first request does not pay for warm-up.
        engine.submit(GenerationRequest(render_prompt(lm, _WARMUP), max_tokens=2, temperature=0)).result(120)
        with self._engines_lock:
            old = self._engines.get(lm.version)
            self._engines[lm.version] = engine
        if old is not None:
            old.drain()
        return served

    def _on_swap(self, swap, served: Served) -> None:
        super()._on_swap(swap, served)
        keep = set(served.loaded())
        with self._engines_lock:
            retired = [v for v in self._engines if v not in keep]
            engines = [self._engines.pop(v) for v in retired]
        for version, engine in zip(retired, engines, strict=True):
            log.info("%s: v%s is no longer served; its engine ends after its running answers", self.name,
                     version)  # fmt: skip
            engine.drain()

    def close(self, timeout: float = 30.0) -> int:
        """Stop taking answers, let the running ones finish (up to `timeout`), then close as the classifier
        server does: the log is flushed after the last answer was logged."""
        with self._engines_lock:
            engines = list(self._engines.values())
        for engine in engines:
            engine.drain()
        deadline = time.monotonic() + timeout
        while any(not e.finished for e in engines) and time.monotonic() < deadline:
            time.sleep(0.05)
        for engine in engines:
            engine.close(timeout=2.0)  # what is still running ends "cancelled" and is logged so
        return super().close(timeout)

    # --- the request path -----------------------------------------------------------------------------

    def predict(self, texts: list, probabilities: bool = False, client: str | None = None):
        raise ChampionError(
            f"'{self.name}' is a text-generation model; call POST /v1/chat/completions, not /predict."
        )

    def models(self) -> list[dict[str, Any]]:
        """What `/v1/models` lists: the name (routed by the traffic policy) and each served alias."""
        served = self.follower.served
        challenger = served.challenger if _distinct_lm(served) else None
        out = []
        for alias, model in (
            ("", served.champion),
            ("champion", served.champion),
            ("challenger", challenger),
        ):
            if model is not None:
                name = f"{self.name}@{alias}" if alias else self.name
                out.append({"id": name, "version": model.version, "format": model.format})
        return out

    def pick(self, params: ChatParams) -> tuple[ServedLM, str]:
        """(the version that answers, its arm): NAME@alias pins one; otherwise the traffic policy decides."""
        served = self.follower.served
        champion = served.champion
        if champion is None:
            raise NotReadyError(self.not_ready_reason())
        challenger = served.challenger if _distinct_lm(served) else None
        if params.alias == "champion":
            return champion, CHAMPION_ARM
        if params.alias == "challenger":
            if challenger is None:
                raise InvalidRequest(
                    "model",
                    f"'{self.name}@challenger' is not served now (no challenger, or the traffic policy is "
                    f"'{self.cfg.traffic.policy}'); ask for '{self.name}'.",
                )
            return challenger, CHALLENGER_ARM
        salt = f"{self._secret}:{challenger.version}" if challenger is not None else ""
        keys = [params.user] if params.user else None
        arm = choose_arms(self.cfg.traffic, 1, challenger is not None, self._rng, keys, salt)[0]
        return (challenger, arm) if arm in (CHALLENGER_ARM, CANARY_ARM) else (champion, CHAMPION_ARM)

    def chat(self, params: ChatParams, client: str | None = None) -> ChatCall:
        """Submit one answer; `InvalidRequest` (one sentence, its field) when the request is outside the
        limits, `NotReadyError` before a champion is loaded, `SpoolFullError` while the log refuses.
        `client` (the connection's address) is the canary's unit of evidence: without one, a canary answer
        is never evidence."""
        if reason := self.log_full_reason():
            raise SpoolFullError(reason)
        check_messages(params.messages, self.cfg)
        model, arm = self.pick(params)
        waiting = model.engine.status()["waiting"]
        if waiting >= self.cfg.generation.max_waiting:
            raise Busy(f"{waiting} answers are already waiting for v{model.version}; retry in a few seconds.")
        call = self._submit(model, arm, params)
        if self.cfg.traffic.policy == "shadow" and arm == CHAMPION_ARM:
            call.stream.add_done_callback(lambda finish: self._shadow_copy(call, params, finish))
        if arm == CANARY_ARM and client:
            call.stream.add_done_callback(lambda finish: self._canary_reference(call, params, finish, client))
        return call

    def _submit(
        self,
        model: ServedLM,
        arm: str,
        params: ChatParams,
        compare_to: str | None = None,
        request_id: str | None = None,
    ) -> ChatCall:
        """Submit to `model`'s engine; the answer is logged when it ends (`agrees`: is it `compare_to`). A
        shadow copy has its champion answer's request id (the log's key is request id and arm)."""
        stream = model.engine.submit(generation_request(model.lm, params, request_id or uuid.uuid4().hex))
        call = ChatCall(stream, model, arm, _conversation(params.messages), int(time.time()))
        stream.add_done_callback(
            lambda finish: self._finished(
                call, finish, None if compare_to is None else finish.text == compare_to
            )
        )
        return call

    def feedback_answer(self, request_id: str, rating: int | None, correction: str | None) -> None:
        self.log.add_feedback(request_id, "", rating=rating, correction=correction)

    # --- after an answer ------------------------------------------------------------------------------

    def _finished(self, call: ChatCall, finish: Finish, agrees: bool | None = None) -> None:
        """Log and count one ended answer (on the engine's thread)."""
        version, arm, m = call.version, call.arm, self.metrics
        record = PredictionRecord(
            call.request_id,
            datetime.now(UTC),
            self.name,
            version,
            arm,
            call.conversation,
            finish.finish_reason,
            finish.mean_logprob if finish.mean_logprob is not None else 0.0,
            (time.perf_counter() - call.stream.submitted_at) * 1000,
            agrees,
            None,
            output=_storable(finish.text),
            prompt_tokens=finish.prompt_tokens,
            completion_tokens=finish.completion_tokens,
            ttft_ms=None if finish.ttft_s is None else finish.ttft_s * 1000,
            tokens_per_s=finish.tokens_per_s,
        )
        try:
            self.log.append([record])
        except Exception as err:  # the answer went out; the gap is loud in the log and the metrics
            log.error("answer %s could not be logged: %s", call.request_id, err)
            m.errors.labels(self.name, version, arm, "log_error").inc()
        m.requests.labels(self.name, version, arm).inc()
        m.generations.labels(self.name, version, arm, finish.finish_reason).inc()
        m.tokens.labels(self.name, version, arm, "prompt").inc(finish.prompt_tokens)
        m.tokens.labels(self.name, version, arm, "completion").inc(finish.completion_tokens)
        if finish.ttft_s is not None:
            m.ttft.labels(self.name, version, arm).observe(finish.ttft_s)
        if finish.completion_tokens > 1:
            m.inter_token.labels(self.name, version, arm).observe(
                finish.decode_s / (finish.completion_tokens - 1)
            )
        if finish.finish_reason == "error":
            m.errors.labels(self.name, version, arm, "model_error").inc()
        m.log_pending.labels(self.name).set(self.log.pending)

    def _shadow_copy(self, call: ChatCall, params: ChatParams, finish: Finish) -> None:
        """The same conversation to the challenger, after the champion's answer ended; logged as `shadow`
        with `agrees` = the same text. Best effort: skipped (and counted) when `shadow_queue` are running."""
        served = self.follower.served
        if finish.finish_reason not in ("stop", "length") or not _distinct_lm(served):
            return
        if not self._shadows.acquire(blocking=False):
            self.metrics.shadow_skipped.labels(self.name).inc()
            return
        try:  # greedy: the comparison is of what each version answers, not of two samples
            copy = replace(params, temperature=0.0, seed=0)
            shadow = self._submit(served.challenger, SHADOW_ARM, copy, finish.text, call.request_id)
        except Exception:
            self._shadows.release()
            log.exception("shadow copy for %s failed", call.request_id)
            return
        shadow.stream.add_done_callback(lambda _: self._shadows.release())

    def _canary_reference(self, call: ChatCall, params: ChatParams, finish: Finish, client: str) -> None:
        """The champion answers the canary's conversation with the same settings (never sent to anyone); when
        it ends, the pair is one canary outcome for `client`. Best effort under `shadow_queue` like a shadow
        copy (a skipped comparison is no evidence either way); a failed canary answer needs no comparison."""
        champion = self.follower.served.champion
        if finish.finish_reason == "cancelled" or champion is None or champion.version == call.version:
            return
        ttft_ms = (finish.ttft_s or 0.0) * 1000
        if finish.finish_reason == "error":
            self._count_lm_canary(call.version, failed=True, agreed=False)
            self._hold_canary(
                champion.version, call.version, [(call.request_id, True, False, ttft_ms)], client
            )
            return
        if not self._shadows.acquire(blocking=False):
            self.metrics.shadow_skipped.labels(self.name).inc()
            return
        try:
            request = generation_request(champion.lm, params, uuid.uuid4().hex)
            reference = champion.engine.submit(request)
        except Exception:
            self._shadows.release()
            log.exception("canary comparison for %s failed", call.request_id)
            return

        def compare(theirs: Finish) -> None:
            self._shadows.release()
            if theirs.finish_reason not in ("stop", "length"):
                return  # the champion could not answer: no evidence about the canary
            agreed = same_answer(finish.text, theirs.text)
            self._count_lm_canary(call.version, failed=False, agreed=agreed)
            outcome = (call.request_id, False, agreed, ttft_ms)
            self._hold_canary(champion.version, call.version, [outcome], client)

        reference.add_done_callback(compare)

    def _count_lm_canary(self, version: str, failed: bool, agreed: bool) -> None:
        m = self.metrics
        if failed:
            m.errors.labels(self.name, version, CANARY_ARM, "canary_error").inc()
        else:
            m.agreement.labels(self.name, version, CANARY_ARM, str(agreed)).inc()


def first_json_object(text: str) -> dict | None:
    """The first JSON object in `text` (surrounding words or an end token are fine), or None. The one reader
    of a generated JSON answer: the gate's scores, the drift checks and the canary's agreement use it."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def answer_intent(text: str) -> str | None:
    """The `intent` of the first JSON object in `text`, or None when there is none (or it names none)."""
    intent = (first_json_object(text) or {}).get("intent")
    return intent if isinstance(intent, str) else None


def same_answer(a: str, b: str) -> bool:
    """Do two answers agree: the same intent when either names one in JSON, else the same text (whitespace
    and case aside)? An answer with an intent never agrees with one without."""
    intents = answer_intent(a), answer_intent(b)
    if intents != (None, None):
        return intents[0] == intents[1]
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def _distinct_lm(served: Served) -> bool:
    return served.champion is not None and distinct_challenger(served)


def generation_request(lm, params: ChatParams, request_id: str | None = None) -> GenerationRequest:
    """What the engine generates for `params` on version `lm`: its prompt, and the version's recorded
    settings where the request names none (`champion sft` records greedy decoding and max_new_tokens)."""
    temperature = params.temperature
    if temperature is None:
        temperature = 1.0 if lm.generation.get("do_sample", False) else 0.0
    return GenerationRequest(
        render_prompt(lm, params.messages),
        max_tokens=params.max_tokens or lm.generation.get("max_new_tokens") or None,
        temperature=temperature,
        top_p=params.top_p,
        stop=list(params.stop),
        seed=params.seed,
        request_id=request_id,
    )


def render_prompt(lm, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of `messages` under the version's chat template, up to the assistant's turn; the
    version's recorded system prompt comes first when the conversation has no system message. A message
    holding one of the tokenizer's control tokens (`<|im_start|>`, ...) is refused: the template's text is
    tokenized whole, so it would become a real turn boundary (a user writing the system's turn)."""
    controls = _control_tokens(lm.tokenizer)
    for i, message in enumerate(messages):
        found = next((t for t in controls if t in message["content"]), None)
        if found is not None:
            raise InvalidRequest(
                f"messages[{i}].content", f"contains the model's control token {found!r}; remove it."
            )
    messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                for m in messages]  # fmt: skip
    if lm.system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": lm.system_prompt}, *messages]
    text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def _control_tokens(tokenizer) -> tuple[str, ...]:
    cached = getattr(tokenizer, "_champion_controls", None)
    if cached is None:
        found = set(tokenizer.all_special_tokens)
        found |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        cached = tuple(sorted(t for t in found if t))
        tokenizer._champion_controls = cached
    return cached


def check_messages(messages: list[dict[str, str]], cfg: ServeConfig) -> None:
    """`InvalidRequest` naming the message at fault: none, too many, an unknown role, blank, a null byte, or
    over the server's characters limit altogether."""
    g = cfg.generation
    if not messages:
        raise InvalidRequest("messages", "is empty; send at least one message with role 'user'.")
    if len(messages) > g.max_messages:
        raise InvalidRequest(
            "messages",
            f"{len(messages)} messages is over this server's limit of {g.max_messages}; send fewer.",
        )
    total = 0
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role",
                f"'{role}' is not one of {', '.join(ROLES)}; tool calls are not served.",
            )
        if not isinstance(content, str) or not content.strip():
            raise InvalidRequest(f"messages[{i}].content", "is blank; send some text.")
        if "\x00" in content:
            raise InvalidRequest(f"messages[{i}].content", "contains a null byte; remove it.")
        total += len(content)
    if total > g.max_prompt_chars:
        raise InvalidRequest(
            "messages",
            f"the messages hold {total:,} characters, over this server's limit of {g.max_prompt_chars:,}; "
            "shorten them.",
        )
    if not any(m["role"] == "user" for m in messages):
        raise InvalidRequest("messages", "has no message with role 'user'; add the user's message.")


def _conversation(messages: list[dict[str, str]]) -> str:
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False,
                      separators=(",", ":"))  # fmt: skip


def _storable(text: str) -> str:
    """Generated text as the log can keep it (PostgreSQL refuses NUL characters)."""
    return text.replace("\x00", "\ufffd")
