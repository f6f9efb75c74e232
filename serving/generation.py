"""The generation engine under the OpenAI-compatible service: one worker thread owns the causal LM, batches
the waiting requests and streams each answer token by token.

How it batches (step-level continuous batching): the worker prefills the waiting requests together
(left-padded), then decodes one token per step for every running row with the KV cache. At each step,
requests that arrived since are prefilled and merged into the running batch (the shorter side's cache and
attention mask are padded on the left), and finished rows (eos, a stop string, `max_tokens`, cancelled) are
dropped from the cache, so the batch never carries dead rows. Merging needs plain `DynamicLayer` caches
(full attention, as in Llama, SmolLM2, Qwen); for a model whose cache has other layer kinds (sliding
windows), a new batch starts only when the running one has finished.

A version swap waits until no row is running (new requests wait meanwhile), so an answer that started on
one version finishes on it; every answer's final event names its version.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from champion.errors import ChampionError

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4  # as the OpenAI API
MAX_STOP_CHARS = 128  # each: every new token is checked against every stop string


class InvalidRequest(ChampionError, ValueError):
    """A generation request that cannot be served: one sentence naming the field (`field`) and the fix."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class EngineClosed(ChampionError):
    """The engine was closed: it takes no more requests or swaps."""


@dataclass(frozen=True)
class GenerationRequest:
    """One answer to generate. `prompt_ids` are the token ids of the rendered prompt (chat template applied by
    the caller); `temperature` 0 is greedy (an argmax: no sampler ever sees temperature 0); `seed` makes a
    sampled answer reproducible whatever else is in the batch."""

    prompt_ids: list[int]
    max_tokens: int | None = None  # None: the engine's limit, or what the model's context leaves
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class Delta:
    """New answer text (never part of a stop string, never half a character)."""

    text: str


@dataclass(frozen=True)
class Finish:
    """The last event of every stream. `text` is the whole answer as streamed; `finish_reason` is "stop"
    (eos or a stop string), "length" (`max_tokens`), "cancelled" (the client left, or the engine closed) or
    "error" (`error` says what failed). `completion_tokens` counts every generated token, eos included;
    `ttft_s` runs from `submit` (queueing and prefill included) to the first token; `tokens_per_s` is
    `completion_tokens` over the seconds since `submit`. `version` is None when no token was generated.
    `mean_logprob` is the mean log-probability the model gave its own tokens (None without tokens): a
    label-free signal of how sure it was; `decode_s` runs from the first token to the last."""

    finish_reason: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    tokens_per_s: float
    version: str | None
    error: str | None = None
    mean_logprob: float | None = None
    decode_s: float = 0.0


class Stream:
    """The events of one answer: `Delta`s then one `Finish`. Iterate it (blocking) or `async for` it;
    `cancel()` frees its row at the engine's next step."""

    def __init__(self, request: GenerationRequest, request_id: str):
        self.request = request
        self.request_id = request_id
        self.submitted_at = time.perf_counter()
        self._cancelled = threading.Event()
        self._cond = threading.Condition()
        self._events: collections.deque = collections.deque()
        self._wakers: list[tuple[Any, asyncio.Event]] = []
        self._done: list[Any] = []
        self.finish: Finish | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def add_done_callback(self, fn) -> None:
        """Call `fn(finish)` once the answer has ended, however it ended (at once if it has), on the thread
        that ended it: for what every answer needs (the inference log) whether or not anyone reads it."""
        with self._cond:
            if self.finish is None:
                self._done.append(fn)
                return
        _call_back(fn, self.finish)

    def _put(self, event: Delta | Finish) -> None:
        """Hand `event` to the readers. The done callbacks run before the Finish is handed over: an answer is
        in the inference log before its reader sees it end."""
        if isinstance(event, Finish):
            with self._cond:
                if self.finish is not None:
                    return
                self.finish = event
                done, self._done = self._done, []
            for fn in done:
                _call_back(fn, event)
        with self._cond:
            if not isinstance(event, Finish) and self.finish is not None:
                return
            self._events.append(event)
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, waker in wakers:
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens there any more
                loop.call_soon_threadsafe(waker.set)

    def next_event(self, timeout: float | None = None) -> Delta | Finish:
        """The next event, waiting for it; TimeoutError after `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._events, timeout):
                raise TimeoutError(f"No event from request {self.request_id} within {timeout} s.")
            return self._events.popleft()

    def __iter__(self):
        while True:
            event = self.next_event()
            yield event
            if isinstance(event, Finish):
                return

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        waker = asyncio.Event()
        with self._cond:
            self._wakers.append((loop, waker))
        try:
            while True:
                with self._cond:
                    event = self._events.popleft() if self._events else None
                    if event is None:
                        waker.clear()  # under the lock: a later _put sets it again
                if event is None:
                    await waker.wait()
                    continue
                yield event
                if isinstance(event, Finish):
                    return
        finally:
            with self._cond:
                self._wakers.remove((loop, waker))

    def result(self, timeout: float | None = None) -> Finish:
        """Wait for the end of the answer and return its `Finish` (the deltas are consumed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            event = self.next_event(left)
            if isinstance(event, Finish):
                return event


def _call_back(fn, finish: Finish) -> None:
    try:
        fn(finish)
    except Exception:  # one failing callback must not end the engine's worker or skip the others
        log.exception("a callback on a finished answer failed")


def _check_max_tokens(max_tokens, prompt_tokens: int, limit: int, context: int | None) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequest("max_tokens", f"{max_tokens!r} is not a positive whole number; send 1 or more.")
    if max_tokens > limit:
        raise InvalidRequest(
            "max_tokens", f"{max_tokens} is over this server's limit of {limit}; ask for fewer."
        )
    if context is not None and prompt_tokens + max_tokens > context:
        raise InvalidRequest(
            "max_tokens",
            f"the prompt's {prompt_tokens} tokens plus {max_tokens} new ones exceed the model's context of "
            f"{context}; ask for at most {max(context - prompt_tokens, 0)}.",
        )


def check_request(
    request: GenerationRequest, max_new_tokens_limit: int, max_prompt_tokens: int, context: int | None = None
) -> None:
    """Raise `InvalidRequest` (one sentence naming the field) when `request` is outside the engine's limits.
    `context` is the model's maximum sequence length, when known."""
    prompt = request.prompt_ids
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
        raise InvalidRequest("prompt", "must be a list of token ids.")
    if not prompt:
        raise InvalidRequest("prompt", "is empty; send at least one message with some text.")
    if len(prompt) > max_prompt_tokens:
        raise InvalidRequest(
            "prompt",
            f"{len(prompt)} tokens is over this server's limit of {max_prompt_tokens}; shorten the messages.",
        )
    if context is not None and len(prompt) >= context:
        raise InvalidRequest(
            "prompt", f"{len(prompt)} tokens fill the model's context of {context}; shorten the messages."
        )
    max_tokens = request.max_tokens
    if max_tokens is not None:
        _check_max_tokens(max_tokens, len(prompt), max_new_tokens_limit, context)
    temperature = request.temperature
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 <= temperature <= 2
    ):
        raise InvalidRequest("temperature", f"{temperature!r} is not between 0 and 2; 0 is greedy.")
    top_p = request.top_p
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InvalidRequest("top_p", f"{top_p!r} is not in (0, 1]; send a value above 0 and at most 1.")
    stop = request.stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequest("stop", "must be a list of non-empty strings.")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"{len(stop)} stop strings is over the limit of {MAX_STOP_STRINGS}.")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise InvalidRequest("stop", f"a stop string is over {MAX_STOP_CHARS} characters; shorten it.")
    seed = request.seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise InvalidRequest("seed", f"{seed!r} is not a whole number between 0 and 2**63 - 1.")


# --- text: incremental decoding and stop strings --------------------------------------------------------


def _stop_at(text: str, stops: list[str]) -> int | None:
    """Where the first stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, start: int, stops: list[str]) -> int:
    """How much of `text` may be sent: not a trailing half character (a byte-level token that ends inside a
    UTF-8 sequence decodes to U+FFFD), nor a tail that may be the beginning of a stop string."""
    end = len(text)
    while end > start and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end - start), hold, -1):
            if text.endswith(stop[:k], 0, end):
                hold = k
                break
    return end - hold


# --- the batch ---------------------------------------------------------------------------------------


@dataclass
class _Row:
    stream: Stream
    version: str
    generator: Any
    max_tokens: int
    ids: list[int] = field(default_factory=list)
    sent: int = 0
    first_at: float | None = None
    logprob: float = 0.0  # the sum over `ids`

    @property
    def request(self) -> GenerationRequest:
        return self.stream.request


def _finish(stream: Stream, reason: str, row: _Row | None = None, text: str = "", error: str | None = None):
    now = time.perf_counter()
    ids = tuple(row.ids) if row else ()
    first = row.first_at if row else None
    elapsed = now - stream.submitted_at
    logprob = row.logprob / len(ids) if row and ids else None
    stream._put(
        Finish(
            finish_reason=reason,
            text=text,
            token_ids=ids,
            prompt_tokens=len(stream.request.prompt_ids),
            completion_tokens=len(ids),
            ttft_s=None if first is None else first - stream.submitted_at,
            tokens_per_s=len(ids) / elapsed if ids and elapsed > 0 else 0.0,
            version=row.version if row and ids else None,
            error=error,
            mean_logprob=logprob,
            decode_s=now - first if first is not None else 0.0,
        )
    )


def _left_pad(tensor, n: int):
    """`tensor` [batch, heads, seq, dim] or [batch, seq] with `n` zero positions in front of its sequence."""
    import torch.nn.functional as F

    if n == 0:
        return tensor
    return F.pad(tensor, (0, 0, n, 0)) if tensor.dim() == 4 else F.pad(tensor, (n, 0))


def _mergeable(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


def _merge(cache, mask, new_cache, new_mask):
    """One cache and attention mask of both batches' rows (the running rows first), aligned on the right."""
    import torch

    length = max(mask.shape[1], new_mask.shape[1])
    pad_old, pad_new = length - mask.shape[1], length - new_mask.shape[1]
    for old, new in zip(cache.layers, new_cache.layers, strict=True):
        old.keys = torch.cat([_left_pad(old.keys, pad_old), _left_pad(new.keys, pad_new)])
        old.values = torch.cat([_left_pad(old.values, pad_old), _left_pad(new.values, pad_new)])
    return cache, torch.cat([_left_pad(mask, pad_old), _left_pad(new_mask, pad_new)])


def _keep_rows(cache, mask, keep: list[int], trim: bool):
    """The cache and mask of rows `keep` only; with `trim`, leading positions that are padding in every
    remaining row are cut too."""
    import torch

    index = torch.tensor(keep, device=mask.device)
    cache.batch_select_indices(index)
    mask = mask[index]
    lead = int((mask.cumsum(-1) == 0).sum(-1).min()) if trim else 0
    if lead:
        mask = mask[:, lead:]
        for layer in cache.layers:
            layer.keys = layer.keys[..., lead:, :]
            layer.values = layer.values[..., lead:, :]
    return cache, mask


def _sample(rows: list[_Row], logits) -> list[int]:
    """One token per row: greedy at temperature 0, else temperature and top-p with the row's generator (on the
    CPU, so a seed gives the same answer on any device). Each row's `logprob` gains its token's
    log-probability under the model (before temperature and top-p)."""
    import torch

    greedy = logits.argmax(-1).tolist()
    tokens = _pick(rows, logits, greedy)
    chosen = torch.tensor(tokens, device=logits.device).unsqueeze(-1)
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, chosen).squeeze(-1).tolist()
    for row, logprob in zip(rows, logprobs, strict=True):
        row.logprob += logprob
    return tokens


def _pick(rows: list[_Row], logits, greedy: list[int]) -> list[int]:
    import torch

    tokens = []
    for i, row in enumerate(rows):
        request = row.request
        if request.temperature == 0:
            tokens.append(greedy[i])
            continue
        probs = torch.softmax(logits[i].float().cpu() / request.temperature, dim=-1)
        order = None
        if request.top_p < 1:
            probs, order = probs.sort(descending=True)
            probs[(probs.cumsum(-1) - probs) > request.top_p] = 0  # the smallest set with mass >= top_p
        pick = int(torch.multinomial(probs, 1, generator=row.generator))
        tokens.append(int(order[pick]) if order is not None else pick)
    return tokens


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return ids


def _context_of(model) -> int | None:
    value = getattr(model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


class Engine:
    """Generation for many concurrent requests on one model, by one worker thread that owns the model.

    `submit` validates (raises `InvalidRequest`) and queues a request, returning its `Stream`; `swap` puts
    another version in place between batches; `drain` stops taking requests and lets the worker finish what
    it has; `close` stops the worker and cancels what is still queued. `context`, when given, is entered
    around every forward pass (a LoRA version activates its adapter on a base shared with other versions)."""

    def __init__(
        self,
        model,
        tokenizer,
        version: str,
        max_batch: int = 8,
        max_new_tokens_limit: int = 512,
        max_prompt_tokens: int = 2048,
        context=None,
    ):
        if max_batch < 1:
            raise ChampionError(f"max_batch: {max_batch} must be 1 or more.")
        self.max_batch = max_batch
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_prompt_tokens = max_prompt_tokens
        self._model, self._tokenizer, self._version = model, tokenizer, version
        self._eos = _eos_ids(model, tokenizer)
        self._cond = threading.Condition()
        self._pending: collections.deque[Stream] = collections.deque()
        self._swaps: list[tuple[Any, Any, str, threading.Event]] = []
        self._closed = False
        self._draining = False
        self._running = 0
        self._context = context or contextlib.nullcontext
        self._thread = threading.Thread(target=self._work, name="champion-generate", daemon=True)
        self._thread.start()

    @property
    def version(self) -> str:
        return self._version

    def status(self) -> dict[str, Any]:
        """The version served, rows running and requests waiting (for metrics and health)."""
        with self._cond:
            return {"version": self._version, "running": self._running, "waiting": len(self._pending)}

    def submit(self, request: GenerationRequest) -> Stream:
        """Queue `request` and return its stream; `InvalidRequest` when it is outside the limits."""
        with self._cond:
            context = _context_of(self._model)
        check_request(request, self.max_new_tokens_limit, self.max_prompt_tokens, context)
        stream = Stream(request, request.request_id or uuid.uuid4().hex)
        with self._cond:
            if self._closed or self._draining:
                raise EngineClosed("The generation engine is closed; no more requests are taken.")
            self._pending.append(stream)
            self._cond.notify_all()
        return stream

    def swap(self, model, tokenizer, version: str, timeout: float | None = None) -> None:
        """Serve `version` from now on. Running answers finish on the old version first (new requests wait
        meanwhile); returns when the new model is in place."""
        done = threading.Event()
        with self._cond:
            if self._closed:
                raise EngineClosed("The generation engine is closed; it cannot swap versions.")
            self._swaps.append((model, tokenizer, version, done))
            self._cond.notify_all()
        if not done.wait(timeout):
            raise TimeoutError(f"Version {version} was not in place within {timeout} s.")
        with self._cond:
            if self._version != version and self._closed:
                raise EngineClosed(f"The generation engine closed before version {version} was in place.")

    def drain(self) -> None:
        """Take no more requests; the worker ends once every queued and running answer has finished (a
        version no longer served finishes the answers it started)."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        """True once the worker has ended (closed, or drained with nothing left)."""
        return not self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: queued requests end "cancelled" now, running ones at the next step."""
        with self._cond:
            self._closed = True
            queued, self._pending = list(self._pending), collections.deque()
            swaps, self._swaps = self._swaps, []
            self._cond.notify_all()
        for stream in queued:
            _finish(stream, "cancelled")
        for *_, done in swaps:
            done.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # --- the worker ----------------------------------------------------------------------------------

    def _work(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cond:
                    self._cond.wait_for(
                        lambda: self._pending or self._swaps or self._closed or self._draining
                    )
                    if self._closed or (self._draining and not self._pending):
                        return
                    while self._swaps:  # nothing runs here: between batches
                        model, tokenizer, version, done = self._swaps.pop(0)
                        self._model, self._tokenizer, self._version = model, tokenizer, version
                        self._eos = _eos_ids(model, tokenizer)
                        done.set()
                rows: list[_Row] = []
                try:
                    self._generate(rows)
                except Exception as err:  # a failed forward ends its answers, never the worker
                    log.exception("generation failed")
                    for row in rows:
                        _finish(
                            row.stream,
                            "error",
                            row,
                            self._text(row)[: row.sent],
                            f"{type(err).__name__}: {err}",
                        )
                finally:
                    with self._cond:
                        self._running = 0

    def _admit(self, room: int) -> list[_Row]:
        import torch

        with self._cond:
            if self._closed or self._swaps or room <= 0:
                return []
            streams = []
            while self._pending and len(streams) < room:
                stream = self._pending.popleft()
                if stream.cancelled:
                    _finish(stream, "cancelled")
                else:
                    streams.append(stream)
        rows = []
        context = _context_of(self._model)
        for stream in streams:
            request = stream.request
            seed = secrets.randbits(63) if request.seed is None else request.seed
            room = self.max_new_tokens_limit if context is None else context - len(request.prompt_ids)
            max_tokens = request.max_tokens or min(self.max_new_tokens_limit, room)
            rows.append(_Row(stream, self._version, torch.Generator().manual_seed(seed), max_tokens))
        return rows

    def _prefill(self, rows: list[_Row]):
        import torch

        device = self._model.device
        prompts = [row.request.prompt_ids for row in rows]
        length = max(len(p) for p in prompts)
        pad = self._tokenizer.pad_token_id
        pad = pad if pad is not None else min(self._eos, default=0)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, length - len(prompt) :] = torch.tensor(prompt)
            mask[i, length - len(prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate: positions count real tokens only
        with self._context():
            out = self._model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
            )
        return out.past_key_values, mask, out.logits[:, -1, :]

    def _decode(self, rows: list[_Row], cache, mask):
        import torch

        device = mask.device
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=-1)
        tokens = torch.tensor([[row.ids[-1]] for row in rows], device=device)
        positions = torch.tensor(
            [[len(row.request.prompt_ids) + len(row.ids) - 1] for row in rows], device=device
        )
        with self._context():
            out = self._model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        return out.past_key_values, mask, out.logits[:, -1, :]

    def _text(self, row: _Row) -> str:
        return self._tokenizer.decode(row.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _advance(self, row: _Row, token: int) -> bool:
        """Add `token` to the row's answer and send what can be sent; True when the answer has finished."""
        row.ids.append(token)
        if row.first_at is None:
            row.first_at = time.perf_counter()
        request = row.request
        text = self._text(row)
        cut = _stop_at(text, request.stop) if request.stop else None
        reason = None
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif token in self._eos:
            reason = "stop"
        elif len(row.ids) >= row.max_tokens:
            reason = "length"
        end = len(text) if reason else _safe_end(text, row.sent, request.stop)
        if end > row.sent:
            row.stream._put(Delta(text[row.sent : end]))
            row.sent = end
        if reason:
            _finish(row.stream, reason, row, text[: row.sent])
        return reason is not None

    def _generate(self, rows: list[_Row]) -> None:
        """Run batches until no row is left and none may join (`rows` is the caller's list, kept current so
        that a failure can end the rows in flight)."""
        import torch

        cache = mask = None
        joinable = True
        while True:
            with self._cond:
                closed = self._closed
            live = []
            for i, row in enumerate(rows):
                if closed or row.stream.cancelled:
                    _finish(row.stream, "cancelled", row, self._text(row)[: row.sent])
                else:
                    live.append(i)
            if len(live) < len(rows):
                if live:
                    cache, mask = _keep_rows(cache, mask, live, trim=joinable)
                rows[:] = [rows[i] for i in live]
            running = len(rows)
            rows.extend(self._admit(self.max_batch - running) if joinable or not running else [])
            if not rows:
                return
            logits = None
            if running:
                cache, mask, logits = self._decode(rows[:running], cache, mask)
            if len(rows) > running:
                new_cache, new_mask, new_logits = self._prefill(rows[running:])
                if running:
                    cache, mask = _merge(cache, mask, new_cache, new_mask)
                    logits = torch.cat([logits, new_logits])
                else:
                    cache, mask, logits = new_cache, new_mask, new_logits
                    joinable = _mergeable(cache)
            with self._cond:
                self._running = len(rows)
            tokens = _sample(rows, logits)
            live = [
                i
                for i, (row, token) in enumerate(zip(rows, tokens, strict=True))
                if not self._advance(row, token)
            ]
            if len(live) < len(rows):
                if live:
                    cache, mask = _keep_rows(cache, mask, live, trim=joinable)
                rows[:] = [rows[i] for i in live]
            if not rows:
                cache = mask = None
