"""The generation engine (serving/generation.py) on a tiny random Llama: batched greedy answers equal
`generate`'s, seeded answers do not depend on the batch, stop strings, limits, joining mid-batch, cancel,
version swaps between batches, close, and one-sentence errors for bad requests."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from pipelines.lm import load_causal_lm
from serving.generation import (
    Delta,
    Engine,
    EngineClosed,
    Finish,
    GenerationRequest,
    InvalidRequest,
    check_request,
)

MESSAGES = [
    "where is my order",
    "i want a refund for my order please, it arrived damaged and late",
    "hi",
    "my card was declined at checkout and now my account is locked",
]
WAIT = 20  # seconds: a hung engine fails the test instead of the suite
_REFERENCES: dict[tuple[int, ...], list[int]] = {}


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    """The tiny Llama with larger random weights: at conftest's small init its greedy answer is one token
    repeated whatever the prompt, which would hide a wrong position or mask."""
    import torch

    model, tokenizer = load_causal_lm(tiny_llama_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    return model, tokenizer


@pytest.fixture
def engine(lm):
    engine = Engine(*lm, version="1", max_batch=8, max_new_tokens_limit=64, max_prompt_tokens=128)
    yield engine
    engine.close()


@pytest.fixture
def forwards(lm):
    """The model's forward passes: `shapes` are their input shapes in order; `actions[n]` runs in the worker
    during the n-th pass (from 1), so that a test acts at a known step however fast the engine is."""
    seen = SimpleNamespace(shapes=[], actions={})

    def hook(module, args, out):
        seen.shapes.append(tuple(args[0].shape))
        if action := seen.actions.pop(len(seen.shapes), None):
            action()

    handle = lm[0].model.embed_tokens.register_forward_hook(hook)
    yield seen
    handle.remove()


def until(condition) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def prompt(lm, message: str) -> list[int]:
    tokenizer = lm[1]
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def reference(lm, ids: list[int], n: int) -> list[int]:
    """`generate`'s greedy answer of `n` tokens alone, up to and with eos (one call per prompt: the first `n`
    tokens of a greedy answer do not depend on how many follow)."""
    import torch

    model, tokenizer = lm
    key = (id(model), *ids)
    if key not in _REFERENCES:
        with torch.inference_mode():
            mask = torch.ones(1, len(ids), dtype=torch.long)
            out = model.generate(torch.tensor([ids]), attention_mask=mask, max_new_tokens=30, do_sample=False)
        _REFERENCES[key] = out[0, len(ids) :].tolist()
    assert n <= 30
    out = _REFERENCES[key][:n]
    eos = tokenizer.eos_token_id
    return out[: out.index(eos) + 1] if eos in out else out


def drain(stream, text: str = "") -> tuple[str, Finish]:
    """The streamed text and the final event (`text`: what was read before); the deltas must add up to the
    final text."""
    while True:
        event = stream.next_event(WAIT)
        if isinstance(event, Finish):
            assert event.text == text
            return text, event
        assert isinstance(event, Delta) and event.text
        text += event.text


def submit_together(engine, requests):
    """Submit `requests` so that the worker sees them all at once (it admits under the same lock)."""
    with engine._cond:
        return [engine.submit(r) for r in requests]


def test_greedy_answers_equal_generate_alone_and_batched_with_prompts_of_other_lengths(lm, engine, forwards):
    prompts = [prompt(lm, m) for m in MESSAGES]
    assert len({len(p) for p in prompts}) == len(prompts)
    expected = [reference(lm, p, 24) for p in prompts]
    text, alone = drain(engine.submit(GenerationRequest(prompts[1], max_tokens=24, temperature=0)))
    assert list(alone.token_ids) == expected[1]
    assert text == lm[1].decode(expected[1], skip_special_tokens=True)
    streams = submit_together(engine, [GenerationRequest(p, max_tokens=24, temperature=0) for p in prompts])
    finishes = [drain(s)[1] for s in streams]
    assert [list(f.token_ids) for f in finishes] == expected
    assert (len(prompts), max(len(p) for p in prompts)) in forwards.shapes  # one left-padded prefill of all
    assert all(f.version == "1" and f.prompt_tokens == len(p) for f, p in zip(finishes, prompts, strict=True))
    assert all(f.ttft_s is not None and f.ttft_s > 0 and f.tokens_per_s > 0 for f in finishes)


def test_a_seeded_sampled_answer_is_the_same_alone_and_in_a_batch(lm, engine):
    prompts = [prompt(lm, m) for m in MESSAGES]
    seeded = GenerationRequest(prompts[0], max_tokens=20, temperature=0.9, top_p=0.8, seed=7)
    alone = drain(engine.submit(seeded))[1]
    others = [GenerationRequest(p, max_tokens=20, temperature=1.0, seed=i) for i, p in enumerate(prompts[1:])]
    batched = [drain(s)[1] for s in submit_together(engine, [*others, seeded])][-1]
    assert alone.token_ids == batched.token_ids and alone.completion_tokens > 0
    other_seed = drain(engine.submit(GenerationRequest(prompts[0], max_tokens=20, temperature=0.9, seed=8)))[
        1
    ]
    assert other_seed.token_ids != alone.token_ids


def test_a_stop_string_ends_the_answer_and_is_not_included(lm, engine):
    ids = prompt(lm, MESSAGES[0])
    full = drain(engine.submit(GenerationRequest(ids, max_tokens=40, temperature=0)))[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    text, finish = drain(
        engine.submit(GenerationRequest(ids, max_tokens=40, temperature=0, stop=["zzzq", stop]))
    )
    assert finish.finish_reason == "stop" and text == full[: full.find(stop)] and stop not in text
    assert finish.completion_tokens < 40


def test_max_tokens_gives_length_and_exact_completion_tokens(lm, engine):
    ids = prompt(lm, MESSAGES[2])
    assert lm[1].eos_token_id not in reference(lm, ids, 9)
    finish = drain(engine.submit(GenerationRequest(ids, max_tokens=9, temperature=0)))[1]
    assert finish.finish_reason == "length" and finish.completion_tokens == len(finish.token_ids) == 9


def test_requests_joining_mid_batch_get_the_greedy_answer(lm, engine, forwards):
    short, long, middle = (prompt(lm, MESSAGES[i]) for i in (2, 1, 0))
    assert len(short) < len(middle) < len(long)
    joined = []

    def join(ids):
        return lambda: joined.append(engine.submit(GenerationRequest(ids, max_tokens=12, temperature=0)))

    forwards.actions[3] = join(long)  # longer than the running cache: the running rows are padded
    forwards.actions[9] = join(middle)  # shorter than the running cache: the new row is padded
    running = engine.submit(GenerationRequest(short, max_tokens=30, temperature=0))
    assert list(drain(running)[1].token_ids) == reference(lm, short, 30)
    assert [list(drain(s)[1].token_ids) for s in joined] == [
        reference(lm, long, 12),
        reference(lm, middle, 12),
    ]
    assert (3, 1) in forwards.shapes  # the three rows were decoded together


def test_cancel_frees_the_row_and_the_others_finish_correctly(lm, engine, forwards):
    prompts = [prompt(lm, m) for m in MESSAGES[:3]]
    streams = submit_together(engine, [GenerationRequest(p, max_tokens=30, temperature=0) for p in prompts])
    forwards.actions[3] = streams[1].cancel  # the longest prompt: the cache loses its leading padding too
    cancelled = streams[1].result(WAIT)
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 3
    for i in (0, 2):
        assert list(drain(streams[i])[1].token_ids) == reference(lm, prompts[i], 30)
    assert forwards.shapes[1:5] == [(3, 1), (3, 1), (2, 1), (2, 1)]  # the batch went on with two rows


def test_a_swap_waits_for_the_running_stream_which_finishes_on_the_old_version(lm, engine, forwards):
    ids = prompt(lm, MESSAGES[0])
    later = {}

    def swap_while_running():
        later["swap"] = threading.Thread(target=engine.swap, args=(*lm, "2"))
        later["swap"].start()
        until(lambda: engine._swaps)  # the swap is asked for; a request from now on waits for it
        later["waiting"] = engine.submit(GenerationRequest(ids, max_tokens=5, temperature=0))

    forwards.actions[3] = swap_while_running
    running = engine.submit(GenerationRequest(ids, max_tokens=30, temperature=0))
    assert running.result(WAIT).version == "1" and running.finish.completion_tokens == 30
    later["swap"].join(WAIT)
    assert not later["swap"].is_alive() and engine.version == "2"
    assert later["waiting"].result(WAIT).version == "2"
    assert forwards.shapes[30] == (1, len(ids))  # the waiting request started after the running one ended
    assert engine.submit(GenerationRequest(ids, max_tokens=3, temperature=0)).result(WAIT).version == "2"


def test_close_ends_queued_and_running_requests_and_refuses_new_ones(lm, forwards):
    engine = Engine(*lm, version="1", max_batch=1, max_new_tokens_limit=64)
    ids = prompt(lm, MESSAGES[0])
    queued, closing = [], threading.Thread(target=engine.close)

    def close_while_running():
        queued.extend(engine.submit(GenerationRequest(ids, max_tokens=5)) for _ in range(3))
        closing.start()
        until(lambda: engine._closed)

    forwards.actions[3] = close_while_running
    running = engine.submit(GenerationRequest(ids, max_tokens=64, temperature=0))
    finish = running.result(WAIT)
    assert finish.finish_reason == "cancelled" and finish.completion_tokens == 3 and finish.version == "1"
    closing.join(WAIT)
    for stream in queued:
        finish = stream.result(WAIT)
        assert (
            finish.finish_reason == "cancelled" and finish.completion_tokens == 0 and finish.version is None
        )
    with pytest.raises(EngineClosed):
        engine.submit(GenerationRequest(ids))
    with pytest.raises(EngineClosed):
        engine.swap(*lm, "2")


def test_a_stream_can_be_read_with_async_for(lm, engine):
    ids = prompt(lm, MESSAGES[3])

    async def read():
        events = [
            event async for event in engine.submit(GenerationRequest(ids, max_tokens=15, temperature=0))
        ]
        return "".join(e.text for e in events[:-1]), events[-1]

    text, finish = asyncio.run(read())
    assert finish.finish_reason == "length" and text == finish.text
    assert list(finish.token_ids) == reference(lm, ids, 15)


def test_a_lora_version_answers_as_its_generate(lm):
    """An sft version is a peft model around the base: the engine drives it like any causal LM."""
    import torch

    from pipelines.lm import lora_for_causal_lm

    base, tokenizer = load_causal_lm(lm[0].name_or_path)
    base.load_state_dict(lm[0].state_dict())
    model = lora_for_causal_lm(base, r=4, alpha=8, dropout=0.0).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:  # zero at init: the adapter would change nothing
                weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    engine = Engine(model, tokenizer, version="sft-1")
    ids = prompt(lm, MESSAGES[0])
    finish = engine.submit(GenerationRequest(ids, max_tokens=12, temperature=0)).result(WAIT)
    engine.close()
    assert list(finish.token_ids) == reference((model, tokenizer), ids, 12) != reference(lm, ids, 12)


def test_a_failed_forward_ends_its_answers_with_an_error_and_the_engine_goes_on(lm, engine, forwards):
    def fail():
        raise RuntimeError("out of memory")

    forwards.actions[2] = fail
    ids = prompt(lm, MESSAGES[0])
    finish = engine.submit(GenerationRequest(ids, max_tokens=10, temperature=0)).result(WAIT)
    assert finish.finish_reason == "error" and finish.error == "RuntimeError: out of memory"
    assert finish.completion_tokens == 1 and engine.status() == {"version": "1", "running": 0, "waiting": 0}
    assert (
        engine.submit(GenerationRequest(ids, max_tokens=4, temperature=0)).result(WAIT).finish_reason
        == "length"
    )


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"max_tokens": 65}, "max_tokens", "over this server's limit of 64"),
        ({"max_tokens": 0}, "max_tokens", "not a positive whole number"),
        ({"prompt_ids": [5] * 129}, "prompt", "129 tokens is over this server's limit of 128"),
        ({"prompt_ids": []}, "prompt", "is empty"),
        ({"top_p": 0.0}, "top_p", "not in (0, 1]"),
        ({"top_p": 1.5}, "top_p", "not in (0, 1]"),
        ({"temperature": -0.1}, "temperature", "not between 0 and 2"),
        ({"temperature": 2.5}, "temperature", "not between 0 and 2"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "over the limit of 4"),
        ({"stop": [""]}, "stop", "non-empty strings"),
        ({"seed": -1}, "seed", "whole number"),
    ],
)
def test_a_bad_request_gets_one_sentence_naming_the_field(change, field, words):
    request = GenerationRequest(**{"prompt_ids": [1, 2, 3], "max_tokens": 8, **change})
    with pytest.raises(InvalidRequest) as caught:
        check_request(request, max_new_tokens_limit=64, max_prompt_tokens=128)
    assert isinstance(caught.value, ValueError) and caught.value.field == field
    message = str(caught.value)
    assert message.startswith(f"{field}: ") and words in message and message.count(". ") == 0


def test_the_engine_checks_requests_against_its_limits_and_the_model_context(lm, engine):
    with pytest.raises(InvalidRequest, match=r"^max_tokens: 65 is over this server's limit of 64"):
        engine.submit(GenerationRequest([1, 2, 3], max_tokens=65))
    wide = Engine(*lm, version="1", max_new_tokens_limit=512)
    with pytest.raises(
        InvalidRequest, match=r"^max_tokens: .* exceed the model's context of 256; ask for at most 56"
    ):
        wide.submit(GenerationRequest([1] * 200, max_tokens=100))
    wide.close()
