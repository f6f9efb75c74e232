"""The BentoML service's HTTP surface, in-process through its ASGI app (starlette's TestClient)."""

from __future__ import annotations

import pytest
from conftest import TINY_INTENTS
from helpers import register_tiny_versions
from test_serving import NAME, TEXTS, serve_config

from champion.registry import promote

KEY = "test-key-not-a-secret"


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model_dir):
    """One app for the module: BentoML registers its HTTP metrics once per process."""
    import time

    from starlette.testclient import TestClient

    from champion.registry import connect
    from serving.service import build_service

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHAMPION_HOME", str(tmp_path_factory.mktemp("service-app") / "home"))
        mp.setenv("CHAMPION_ACTOR", "pytest")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("CHAMPION_AUDIT_URL", raising=False)
        mp.setenv("CHAMPION_FEEDBACK_KEY", KEY)
        registry = connect()
        versions = register_tiny_versions(registry, tiny_model_dir, TINY_INTENTS, 2)
        promote(registry, NAME, versions[0], reason="first")
        service = build_service(serve_config(limits={"max_text_chars": 50, "max_items": 4}))
        app = service.to_asgi()
        with TestClient(app=app, base_url="http://127.0.0.1:3000", raise_server_exceptions=False) as c:
            deadline = time.monotonic() + 60
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the service never became ready"
                time.sleep(0.05)
            c.registry = registry
            yield c
        registry.close()


def test_predict_answers_with_version_header_and_request_ids(client):
    r = client.post("/predict", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [set(item) for item in body] == [{"request_id", "label", "score", "model", "version", "arm"}] * 4
    assert r.headers["x-model-version"] == "1" and r.headers["x-model-name"] == NAME
    assert len({item["request_id"] for item in body}) == 4
    r = client.post("/predict_proba", json={"texts": TEXTS[:1]})
    probs = r.json()[0]["probabilities"]
    assert set(probs) == set(TINY_INTENTS) and abs(sum(probs.values()) - 1) < 1e-5


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"texts": []}, "texts", "at least 1 item"),
        ({"texts": ["ok"] * 5}, "texts", "at most 4 items"),
        ({"texts": [""]}, "texts[0]", "at least 1 character"),
        ({"texts": ["ok", "   "]}, "texts[1]", "is blank"),
        ({"texts": ["x" * 51]}, "texts[0]", "at most 50 characters"),
        ({"texts": ["ok", 3]}, "texts[1]", "valid string"),
        ({"texts": "where is my order"}, "texts", "valid array"),
        ({"texts": ["bad \x00 byte"]}, "texts[0]", "null byte"),
        ({"text": ["hello"]}, "texts", "required"),
        ({"texts": [{"text": "hi", "key": ""}]}, "texts[0].key", "at least 1 character"),
        ({"texts": ["ok", {"text": "   ", "key": "u1"}]}, "texts[1].text", "is blank"),
        ({"texts": [{"text": "hi", "user": "u1"}]}, "texts[0].key", "required"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(client, body, field, words):
    r = client.post("/predict", json=body)
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["field"] == field and words in error["error"], error
    assert client.post("/predict", json={"texts": ["still up"]}).status_code == 200


def test_invalid_json_is_a_400(client):
    r = client.post(
        "/predict", content=b'{"texts": ["unclosed"', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"], r.text


def test_feedback_needs_the_api_key_and_a_known_request(client):
    request_id = client.post("/predict", json={"texts": TEXTS[:1]}).json()[0]["request_id"]
    body = {"request_id": request_id, "label": "track_order"}
    r = client.post("/feedback", json=body)
    assert r.status_code == 401 and r.json()["field"] == "X-API-Key"
    r = client.post("/feedback", json=body, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401 and "wrong API key" in r.json()["error"]
    r = client.post("/feedback", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["recorded"] is True
    r = client.post("/feedback", json={"request_id": "nope", "label": "x"}, headers={"X-API-Key": KEY})
    assert r.status_code == 404 and r.json()["field"] == "request_id" and "nope" in r.json()["error"]
    r = client.post("/feedback", json={"request_id": request_id}, headers={"X-API-Key": KEY})
    assert r.status_code == 400 and r.json()["field"] == "label"
    bad = {"request_id": request_id, "label": "nul\x00"}  # PostgreSQL cannot store it: refuse up front
    r = client.post("/feedback", json=bad, headers={"X-API-Key": KEY})
    assert r.status_code == 400 and r.json()["field"] == "label" and "null byte" in r.json()["error"]


def test_mutating_endpoints_are_off_without_a_server_key(client, monkeypatch):
    monkeypatch.delenv("CHAMPION_FEEDBACK_KEY")  # read per request: no restart needed to lock the endpoints
    r = client.post("/reload", json={}, headers={"X-API-Key": KEY})
    assert r.status_code == 403 and "is not set on the server" in r.json()["error"]


def test_reload_switches_to_the_new_champion_at_once(client):
    registry = client.registry
    promote(registry, NAME, "2", reason="better")
    r = client.post("/reload", json={}, headers={"X-API-Key": KEY})
    assert r.status_code == 200 and r.json()["champion"] == "2" and r.json()["previous"] == "1"
    assert client.post("/predict", json={"texts": TEXTS}).headers["x-model-version"] == "2"


def test_health_and_metrics_are_labelled_by_version_and_arm(client):
    for path in ("/healthz", "/livez", "/readyz"):
        assert client.get(path).status_code == 200
    client.post("/predict", json={"texts": TEXTS})
    client.post("/predict", json={"texts": []})
    text = client.get("/metrics").text
    assert f'champion_requests_total{{arm="champion",model="{NAME}",version="1"}}' in text
    assert "champion_request_latency_seconds_bucket" in text and "champion_batch_size_bucket" in text
    assert "champion_predicted_class_total" in text and "champion_confidence_bucket" in text
    assert 'kind="bad_request"' in text


def test_pickle_bodies_are_refused(client):
    pickle = {"Content-Type": "application/vnd.bentoml+pickle"}
    r = client.post("/predict", content=b"\x80\x04N.", headers=pickle)
    assert r.status_code == 415 and r.json()["error"], r.text


def test_an_answered_request_leaves_nothing_alive_and_the_heap_is_frozen_after_a_load(client):
    """BentoML's request timeout timer is cancelled once the request is answered (before, each one kept the
    request's future, context and span alive for timeout_seconds), and the loaded worker froze its heap."""
    import asyncio
    import gc

    def live_futures() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.Future))

    assert client.post("/predict", json={"texts": TEXTS[:1]}).status_code == 200
    before = live_futures()
    for _ in range(40):
        assert client.post("/predict", json={"texts": TEXTS[:1]}).status_code == 200
    assert live_futures() - before < 10  # 40 or more while the timers lived on
    assert gc.get_freeze_count() > 10_000  # serving.server.settle_heap() ran after the version loaded


def test_the_request_timeout_still_answers_504():
    import asyncio

    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from serving.service import _cancel_request_timers

    _cancel_request_timers()

    async def slow(scope, receive, send):
        await asyncio.sleep(5)

    async def run() -> list[dict]:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
        await TimeoutMiddleware(slow, timeout=0.05)(scope, receive, send)
        return sent

    sent = asyncio.run(run())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 504
    assert b"Not able to process the request in 0.05 seconds" in sent[1]["body"]


def _metrics_series(client) -> tuple[set[str], int]:
    """(series: name and labels of each sample line, bytes) of /metrics: what invented paths must not grow."""
    text = client.get("/metrics").text
    samples = (line for line in text.splitlines() if line and not line.startswith("#"))
    return {line.rsplit(" ", 1)[0] for line in samples}, len(text)


def test_metrics_stay_flat_under_a_thousand_random_paths(client):
    import random

    # One "other" request first, and one /metrics: their series exist from now on, in any order of tests.
    for path in ("/nope", "/predict/../x", "/metrics"):
        client.get(path)
    series, size = _metrics_series(client)
    rng = random.Random(24)
    methods = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")
    for i in range(1000):
        path = f"/{i}" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_/.%") for _ in range(12))
        r = client.request(rng.choice(methods), path)
        assert r.status_code in (404, 405), (path, r.status_code)
    r = client.get("/static_content/does-not-exist.js")
    assert r.status_code == 404 and r.json()["field"] == "path" and "no such endpoint" in r.json()["error"]
    after, after_size = _metrics_series(client)
    assert after == series, f"invented paths changed the /metrics series: +{after - series} -{series - after}"
    assert after_size - size < 200  # the counters' digits only
    assert 'champion_http_requests_total{route="other",status="404"}' in client.get("/metrics").text
    assert client.get("/docs.json").status_code == 200  # BentoML's own pages are still served


@pytest.mark.parametrize("path", ["/predict", "/predict_proba", "/feedback", "/reload"])
def test_a_post_without_content_type_is_a_415(client, path):
    import json

    body = {"texts": ["where is my order"]} if path.startswith("/predict") else {}
    r = client.post(path, content=json.dumps(body).encode(), headers={"X-API-Key": KEY})
    assert r.status_code == 415, r.text
    assert r.json() == {
        "error": "the request has no Content-Type; send application/json.",
        "field": "Content-Type",
    }
    r = client.post(path, json=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code not in (400, 415), r.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:3000", "127.0.0.1.evil.example", "10.9.8.7"])
def test_a_foreign_host_is_refused_with_421_except_on_the_probes(client, host):
    headers = {"Host": host}
    for path in ("/predict", "/metrics", "/docs.json", "/nope"):
        r = client.request(
            "POST" if path == "/predict" else "GET", path, json={"texts": TEXTS}, headers=headers
        )
        assert r.status_code == 421, (path, r.text)
        assert r.json()["field"] == "Host" and "allowed_hosts" in r.json()["error"]
    for path in ("/healthz", "/livez", "/readyz"):  # kubelet probes by pod IP
        assert client.get(path, headers=headers).status_code == 200
    for good in ("localhost", "LOCALHOST:8080", "127.0.0.1", "[::1]:3000", "localhost."):
        r = client.post("/predict", json={"texts": TEXTS[:1]}, headers={"Host": good})
        assert r.status_code == 200, (good, r.text)


def test_allowed_hosts_default_to_loopback_and_the_bound_address():
    from serving.config import ServeConfig
    from serving.service import allowed_hosts

    assert allowed_hosts(ServeConfig()) == {"127.0.0.1", "localhost", "[::1]"}
    assert "10.1.2.3" in allowed_hosts(ServeConfig(host="10.1.2.3"))
    assert "[fe80::1]" in allowed_hosts(ServeConfig(host="fe80::1"))
    assert "api.example.com" in allowed_hosts(ServeConfig(allowed_hosts=["API.example.com"]))
    import socket

    assert socket.gethostname().lower() in allowed_hosts(ServeConfig(host="0.0.0.0"))
    from champion.config import parse_config
    from champion.errors import ChampionError

    with pytest.raises(ChampionError, match="allowed_hosts"):
        parse_config(ServeConfig, {"allowed_hosts": ["https://api.example.com:443"]})


def test_health_fails_when_the_inference_log_writer_died(client):
    """The writer catches and retries what it can; should it still die, the probes say so (restart me)."""
    from serving.service import ChampionMiddleware

    layer = client.app.middleware_stack  # the middlewares wrap one another through `.app`
    while not isinstance(layer, ChampionMiddleware):
        layer = layer.app
    log = layer.holder["server"].log
    assert client.get("/livez").status_code == 200 and client.get("/readyz").status_code == 200
    log._writer_died = "RuntimeError: simulated"
    try:
        assert client.get("/livez").status_code == 503
        assert client.get("/readyz").status_code == 503
        assert "predictions stay in" in log.writer_problem
    finally:
        log._writer_died = None
    assert client.get("/readyz").status_code == 200
