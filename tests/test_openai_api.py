"""The OpenAI-compatible service of a text-generation model, over a real `champion serve` (BentoML on
loopback) and the official `openai` client: streaming and not, the version on every answer, the inference
log, feedback, metrics, bad input answered 4xx in one sentence, a stream cut by its client, and an alias
move during 8 open streams."""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import http_process
from lm_world import two_versions

NAME = "tiny-replies"
KEY = "test-ingest-key"
ASK = [{"role": "user", "content": "where is my order 123"}]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama_dir):
    """CHAMPION_HOME with two adapters of one tiny base (v1 champion, v2 registered) and a running
    `champion serve` of NAME (text-generation picked from the registry)."""
    import yaml

    root = tmp_path_factory.mktemp("openai")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHAMPION_FEEDBACK_KEY", KEY)
        reg, v1, v2 = two_versions(mp, root, tiny_llama_dir)
        config = root / "serve.yaml"
        config.write_text(
            yaml.safe_dump(
                {"threads": 1, "follow": {"poll_seconds": 0.2},
                 "generation": {"max_tokens": 64, "max_prompt_chars": 4_000, "max_batch": 8}}
            )
        )  # fmt: skip

        def command(port: int) -> list[str]:
            return [sys.executable, "-m", "champion_cli", "serve", NAME, "--config", str(config),
                    "--port", str(port)]  # fmt: skip

        with http_process(
            command, root / "serve.log", timeout=180, ready="/readyz", env=dict(os.environ)
        ) as url:
            yield {"url": url, "reg": reg, "home": root / "home", "v1": v1, "v2": v2,
                   "log": root / "serve.log"}  # fmt: skip
        reg.close()


@pytest.fixture(scope="module")
def client(world):
    from openai import OpenAI

    return OpenAI(base_url=world["url"] + "/v1", api_key="anonymous", max_retries=0, timeout=60)


def _read_log(home: Path, request_id: str, wait: float = 15.0):
    """The inference log's row for `request_id` once the server's writer has shipped it."""
    from serving.inference_log import InferenceLog

    log = InferenceLog(f"sqlite:///{home / 'inference.db'}")
    try:
        deadline = time.monotonic() + wait
        while True:
            rows = log.read(NAME, generated=True)
            found = rows[rows.request_id == request_id] if len(rows) else rows
            if len(found) or time.monotonic() > deadline:
                return found
            time.sleep(0.2)
    finally:
        log.close()


def test_openai_client_answers_streaming_and_not_with_version_usage_and_log(world, client):
    raw = client.chat.completions.with_raw_response.create(
        model=NAME, messages=ASK, max_tokens=6, temperature=0
    )
    answer = raw.parse()
    assert raw.headers["x-model-version"] == world["v1"]
    assert (
        answer.model_extra["version"] == world["v1"] and answer.system_fingerprint == f"{NAME}-v{world['v1']}"
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert 1 <= answer.usage.completion_tokens <= 6 and answer.usage.prompt_tokens > 10
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=f"{NAME}@champion", messages=ASK, max_tokens=6,
                                                 temperature=0, stream=True))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content  # greedy: the same answer either way
    assert {c.model_extra["version"] for c in chunks} == {world["v1"]}
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens

    row = _read_log(world["home"], answer.model_extra["request_id"])
    assert len(row) == 1, "every answer is logged once"
    row = row.iloc[0]
    assert row.output == answer.choices[0].message.content and row.model_version == world["v1"]
    assert (
        row.label == answer.choices[0].finish_reason
        and row.completion_tokens == answer.usage.completion_tokens
    )
    assert json.loads(row.text)[-1] == ASK[-1] and row.ttft_ms > 0 and row.tokens_per_s > 0
    assert row.score < 0  # the mean log-probability of the answer's tokens


def test_seeded_sampling_repeats_and_models_lists_the_served_name(world, client):
    def sample(seed: int) -> str:
        answer = client.chat.completions.create(
            model=NAME, messages=ASK, max_tokens=8, temperature=1.0, top_p=0.9, seed=seed
        )
        return answer.choices[0].message.content

    assert sample(7) == sample(7)
    ids = {m.id for m in client.models.list()}
    assert {NAME, f"{NAME}@champion"} <= ids


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "   "}]}, 400, "messages[0].content"),
        ({"model": "someone-else"}, 404, "model"),
        ({"max_tokens": 10_000}, 400, "max_tokens"),
        ({"tools": [{"type": "function"}]}, 400, "tools"),
        ({"n": 3}, 400, "n"),
        ({"temperature": 5}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x" * 5_000}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 1_000_000}]}, 413, "Content-Length"),
    ],
)
def test_bad_requests_get_a_4xx_with_one_sentence_naming_the_field(world, body, status, param):
    payload = json.dumps({"model": NAME, "messages": ASK, **body}).encode()
    got, answer = _post(world["url"], "/v1/chat/completions", payload)
    assert got == status, answer
    error = answer["error"]
    assert error["param"] == param, error
    assert "\n" not in error["message"] and error["message"].endswith("."), error


def _post(url: str, path: str, payload: bytes, headers: dict | None = None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(
            "POST", path, body=payload, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def test_feedback_takes_a_rating_and_a_correction_with_the_ingest_key_only(world, client):
    answer = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=3, temperature=0)
    request_id = answer.model_extra["request_id"]
    body = json.dumps(
        {"request_id": request_id, "rating": -1, "correction": '{"intent":"track_order"}'}
    ).encode()
    assert _post(world["url"], "/feedback", body)[0] == 401  # no key
    status, reply = _post(world["url"], "/feedback", body, {"X-API-Key": KEY})
    assert status == 200 and reply["recorded"], reply
    bad = json.dumps({"request_id": request_id, "rating": 5}).encode()
    assert _post(world["url"], "/feedback", bad, {"X-API-Key": KEY})[0] == 400
    row = _read_log(world["home"], request_id).iloc[0]
    assert row.rating == -1 and row.correction == '{"intent":"track_order"}'


def test_a_stream_cut_by_its_client_frees_its_row_and_the_log_keeps_the_partial_answer(world, client):
    host, port = world["url"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": NAME, "messages": ASK, "max_tokens": 64, "temperature": 1.0, "seed": 3, "stream": True,
            "stop": ["never-in-a-tiny-vocabulary-xyz"]}  # fmt: skip
    conn.request(
        "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    request_id = response.getheader("x-request-id")
    response.readline()  # the role chunk
    conn.sock.close()  # the client leaves mid-answer
    conn.close()
    deadline = time.monotonic() + 30
    row = _read_log(world["home"], request_id)
    while (not len(row) or row.iloc[0].label != "cancelled") and time.monotonic() < deadline:
        time.sleep(0.3)
        row = _read_log(world["home"], request_id, wait=0)
    assert len(row) and row.iloc[0].label == "cancelled", row
    assert row.iloc[0].completion_tokens < 64
    # the slot is free: a new answer comes back at once
    answer = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=2, temperature=0)
    assert answer.usage.completion_tokens >= 1


def test_metrics_count_tokens_and_time_to_first_token(world, client):
    import urllib.request

    client.chat.completions.create(model=NAME, messages=ASK, max_tokens=3, temperature=0)
    with urllib.request.urlopen(world["url"] + "/metrics", timeout=30) as response:
        text = response.read().decode()
    assert f'champion_tokens_total{{arm="champion",kind="completion",model="{NAME}"' in text
    assert "champion_time_to_first_token_seconds_bucket" in text
    assert "champion_inter_token_latency_seconds_bucket" in text


def test_champion_chat_answers_locally_and_through_the_server_alike(world, capsys):
    from champion_cli.cli import main

    answers = []
    for where in ([], ["--url", world["url"]]):
        assert (
            main(["chat", NAME, "where is my order 123", "--max-tokens", "5", "--temperature", "0", *where])
            == 0
        )
        out = capsys.readouterr()
        assert f"[v{world['v1']} " in out.err
        answers.append(out.out.rstrip("\n"))
    assert answers[0] == answers[1]  # the same prompt, engine and greedy decoding in both places
    assert (
        main(["chat", NAME, "where is my order", "--max-tokens", "2", "--json", "--url", world["url"]]) == 0
    )
    last = json.loads(capsys.readouterr().out)
    assert last["version"] == world["v1"] and last["usage"]["completion_tokens"] <= 2


def test_an_alias_move_during_8_open_streams_breaks_none_and_each_ends_on_its_version(world, client):
    """Runs last in the module: it moves the champion to v2."""
    from champion.registry import promote

    started = threading.Barrier(9, timeout=60)
    results: list[tuple[set[str], str | None, int]] = []
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            versions, finish, pieces = set(), None, 0
            chunks = client.chat.completions.create(
                model=NAME, messages=ASK, max_tokens=48, temperature=1.0, seed=i, stream=True,
                stop=["never-in-a-tiny-vocabulary-xyz"],
            )  # fmt: skip
            for n, chunk in enumerate(chunks):
                versions.add(chunk.model_extra["version"])
                if n == 1:
                    started.wait()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                pieces += 1
            results.append((versions, finish, pieces))
        except BaseException as err:  # asserted below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    started.wait()  # all 8 are answering on v1
    promote(world["reg"], NAME, world["v2"], reason="move during open streams", force=True)
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(results) == 8
    for versions, finish, pieces in results:
        assert versions == {world["v1"]}, versions  # started on v1, finished on v1
        assert finish in ("stop", "length") and pieces >= 3
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answer = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=2, temperature=0)
        if answer.model_extra["version"] == world["v2"]:
            break
        time.sleep(0.3)
    assert answer.model_extra["version"] == world["v2"], "new requests go to the new champion"


def test_wrong_methods_unknown_paths_and_foreign_hosts_get_openai_errors(world):
    host, port = world["url"].removeprefix("http://").split(":")
    cases = [
        ("GET", "/v1/chat/completions", {}, 405),
        ("POST", "/v1/models", {"Content-Type": "application/json"}, 405),
        ("GET", "/v1/completions", {}, 404),
        ("GET", "/v1/models", {"Host": "attacker.example"}, 421),
    ]
    for method, path, headers, status in cases:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request(method, path, body=b"{}" if method == "POST" else None, headers=headers)
        response = conn.getresponse()
        payload = json.loads(response.read())
        assert isinstance(payload["error"], dict), (method, path, response.status, payload)
        error = payload["error"]
        conn.close()
        assert response.status == status, (method, path, error)
        assert error["message"].endswith(".") and "\n" not in error["message"], error
