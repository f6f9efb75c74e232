"""Who may do what in the console (issue 24): the service's ingest key opens nothing here, accounts have
roles and only approvers decide, a script's token acts as its account whatever header it sends, a password
or role change ends sessions, logins cannot stall the console or lock another client's user out, a foreign
Host is refused, and the drift view shows production windows only."""

from __future__ import annotations

import re
import stat
import threading
import time
from pathlib import Path

import pytest
from test_console import seed_console_data

from champion.approval import pending_promotions
from champion.registry import connect, story
from champion_cli.cli import main
from champion_cli.console import create_app
from champion_cli.console_auth import set_user

KEY = "feedback-key-" + "k" * 20
PASSWORD = "correct horse battery"
BASE = "http://127.0.0.1:8765"


@pytest.fixture
def app(registry, home, monkeypatch):
    """The seeded console (clf: v1 champion, v2 waiting for approval) with accounts in CHAMPION_HOME made
    the way they were before roles existed: ana and bob, both therefore labellers. The ingest key is set under
    its new name and its old one."""
    data = seed_console_data(registry, home)
    set_user("ana", PASSWORD)
    set_user("bob", "bob's long password")
    monkeypatch.setenv("CHAMPION_FEEDBACK_KEY", KEY)
    monkeypatch.setenv("CHAMPION_API_KEY", KEY)
    app = create_app(log_url=data["url"])
    app.data = data
    yield app
    app.state.close()


@pytest.fixture
def bare_app(home):
    """The console with ana's account and no model: enough for logins and Host names."""
    set_user("ana", PASSWORD)
    app = create_app(log_url=f"sqlite:///{home / 'inference.db'}")
    app.data = {"url": f"sqlite:///{home / 'inference.db'}"}
    yield app
    app.state.close()


def _client(app, address: str = "10.0.0.1", base_url: str = BASE):
    from starlette.testclient import TestClient

    return TestClient(app, base_url=base_url, client=(address, 50000))


def _login(client, name="ana", password=PASSWORD, next_page="/models/clf"):
    response = client.post("/login", data={"name": name, "password": password, "next": next_page})
    assert response.status_code == 200 and response.url.path == next_page, response.text
    return re.search(r'name="csrf" value="([^"]+)"', response.text).group(1)


def _token(name: str, capsys) -> str:
    """A console token made as a person makes one: the CLI writes it to a 0600 file and prints the path."""
    capsys.readouterr()
    assert main(["console-token", name]) == 0
    out = capsys.readouterr().out
    path = Path(re.search(r"written to (\S+) ", out).group(1))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert token and token not in out  # the path is printed, never the token
    return token


def _nothing_moved(data) -> None:
    reg = connect()
    assert [p.version for p in pending_promotions(reg, "clf")] == [data["v2"]]
    assert str(reg.client.get_registered_model("clf").aliases["champion"]) == data["v1"]
    reg.close()


def test_the_feedback_key_opens_nothing_in_the_console(app):
    data = app.data
    form = {"version": data["v2"], "reason": "ship it"}
    with _client(app) as client:
        for headers in (
            {"X-API-Key": KEY, "X-Champion-Actor": "release-bot"},
            {"X-API-Key": KEY},
            {"Authorization": f"Bearer {KEY}", "X-Champion-Actor": "ana"},
        ):
            refused = client.post("/models/clf/approve", data=form,
                                  headers={**headers, "Accept": "application/json"})  # fmt: skip
            assert refused.status_code == 401, (headers, refused.text)
            assert "console" in refused.json()["error"]
        page = client.get("/models/clf", headers={"X-API-Key": KEY, "Accept": "application/json"})
        assert page.status_code == 401
    _nothing_moved(data)


def test_a_labeller_cannot_approve_by_login_or_token(app, capsys):
    data = app.data
    with _client(app) as client:
        csrf = _login(client)  # ana's account predates roles: a labeller
        page = client.get("/models/clf").text
        assert f'id="pending-{data["v2"]}"' in page and 'class="approve"' not in page
        assert "needs the approver or admin role" in page and 'id="role">(labeller)' in page
        refused = client.post(
            "/models/clf/approve", data={"csrf": csrf, "version": data["v2"], "reason": "ok"}
        )
        assert refused.status_code == 403 and "ana is a labeller" in refused.text
        rejected = client.post(
            "/models/clf/reject", data={"csrf": csrf, "version": data["v2"], "reason": "no"}
        )
        assert rejected.status_code == 403
        review = client.post("/models/clf/review", data={"csrf": csrf, "request_id": "q00", "label": "a"})
        assert review.status_code == 200 and "labelled: a" in review.text  # the job a labeller has

    token = _token("ana", capsys)
    with _client(app, "10.0.0.2") as script:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        refused = script.post(
            "/models/clf/approve", data={"version": data["v2"], "reason": "ok"}, headers=headers
        )
        assert refused.status_code == 403 and "needs the approver or admin role" in refused.json()["error"]
    _nothing_moved(data)


def test_an_approvers_token_acts_as_its_account_whatever_header_says(app, capsys):
    data = app.data
    assert main(["console-user", "bob", "--role", "approver"]) == 0  # an existing account: its role only
    token = _token("bob", capsys)
    with _client(app) as script:
        headers = {
            "Authorization": f"Bearer {token}",
            "X-Champion-Actor": "the-ceo",
            "Accept": "application/json",
        }
        wrong = script.post("/models/clf/approve", data={"version": data["v2"], "reason": "ok"},
                            headers={**headers, "Authorization": "Bearer chc_not-a-token"})  # fmt: skip
        assert wrong.status_code == 401
        done = script.post("/models/clf/approve", data={"version": data["v2"], "reason": "per-class ok"},
                           headers=headers)  # fmt: skip
        assert done.status_code == 200, done.text
        assert done.json()["actor"] == "bob"
    reg = connect()
    assert str(reg.client.get_registered_model("clf").aliases["champion"]) == data["v2"]
    event = reg.audit.events("clf", "champion")[-1]
    assert event.actor == "bob" and event.reason == "approved by bob: per-class ok"
    assert story(reg, "clf")[-1]["actor"] == "bob"
    reg.close()

    assert main(["console-token", "bob", "--revoke"]) == 0
    with _client(app) as script:
        gone = script.post("/models/clf/reject", data={"version": data["v2"], "reason": "x"}, headers=headers)
        assert gone.status_code == 401


def test_an_approver_decides_with_a_login(app):
    data = app.data
    set_user("carol", "carol's long password", role="approver")
    with _client(app) as client:
        csrf = _login(client, "carol", "carol's long password")
        assert 'class="approve"' in client.get("/models/clf").text
        rejected = client.post(
            "/models/clf/reject", data={"csrf": csrf, "version": data["v2"], "reason": "no"}
        )
        assert rejected.status_code == 200 and f"rejected v{data['v2']}" in rejected.text


def test_a_password_or_role_change_ends_the_accounts_sessions(app, capsys):
    with _client(app) as client, _client(app, "10.0.0.3") as other:
        _login(client)
        _login(other, "bob", "bob's long password")
        assert client.get("/models/clf", follow_redirects=False).status_code == 200
        set_user("ana", "a brand new password")  # what `champion console-user ana` does
        ended = client.get("/models/clf", follow_redirects=False)
        assert ended.status_code == 303 and ended.headers["location"].startswith("/login")
        assert other.get("/models/clf", follow_redirects=False).status_code == 200  # bob's is untouched
        _login(client, "ana", "a brand new password")
        assert main(["console-user", "ana", "--role", "approver"]) == 0
        assert client.get("/models/clf", follow_redirects=False).status_code == 303  # a role change too


def test_five_wrong_passwords_from_one_client_do_not_lock_the_user_out_elsewhere(bare_app, home, tmp_path):
    """Against a real `champion console`: the lockout is per (name, client address); a guesser cannot dodge
    it by naming a new address in X-Forwarded-For, which is believed only from a --trusted-proxy."""
    import sys

    import httpx
    from helpers import http_process

    champion = str(Path(sys.executable).parent / "champion")
    command = lambda port: [champion, "console", "--port", str(port), "--log-url", bare_app.data["url"]]  # noqa: E731
    with http_process(command, tmp_path / "console.log", timeout=60) as url:
        with httpx.Client(base_url=url) as attacker:
            for i in range(5):
                spoofed = {"X-Forwarded-For": f"198.51.100.{i}"}
                wrong = attacker.post("/login", data={"name": "ana", "password": "guess"}, headers=spoofed)
                assert wrong.status_code == 401
            locked = attacker.post("/login", data={"name": "ana", "password": PASSWORD},
                                   headers={"X-Forwarded-For": "198.51.100.99"})  # fmt: skip
            assert locked.status_code == 429 and "too many failed logins" in locked.text
        elsewhere = httpx.HTTPTransport(local_address="127.0.0.2")  # the real user, from another address
        with httpx.Client(base_url=url, transport=elsewhere) as ana:
            ok = ana.post("/login", data={"name": "ana", "password": PASSWORD})
            assert ok.status_code == 303 and "champion_console" in ok.cookies


def test_one_client_cannot_run_many_password_checks(monkeypatch):
    import champion_cli.console_auth as console_auth

    monkeypatch.setattr(console_auth, "LOGINS_PER_MINUTE_PER_CLIENT", 3)
    sessions = console_auth.Sessions()
    assert sessions.admit("a") is None and sessions.admit("a") is None
    assert "at once" in sessions.admit("a")  # two in flight already
    assert sessions.admit("b") is None  # another client is not held up
    sessions.done("a")
    assert sessions.admit("a") is None
    sessions.done("a")
    assert "in the last minute" in sessions.admit("a")


def test_forty_failed_logins_do_not_stall_the_console(bare_app):
    """Forty anonymous logins from forty addresses at once, against a real uvicorn: /health and a page still
    answer at once, as the password checks run off the event loop."""
    import httpx
    import uvicorn

    from serving.client import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(bare_app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    statuses, barrier = [], threading.Barrier(41)

    def attack(i: int) -> None:
        transport = httpx.HTTPTransport(local_address=f"127.0.1.{i + 1}")
        with httpx.Client(transport=transport, timeout=60) as c:
            barrier.wait()
            statuses.append(c.post(f"{url}/login", data={"name": f"nobody-{i}", "password": "x"}).status_code)

    attackers = [threading.Thread(target=attack, args=(i,)) for i in range(40)]
    try:
        for t in attackers:
            t.start()
        waits = []
        with httpx.Client(timeout=60) as probe:
            barrier.wait()
            time.sleep(0.05)  # the logins are in: their password checks are running now
            while any(t.is_alive() for t in attackers) or not waits:
                started = time.perf_counter()
                assert probe.get(f"{url}/health").text == "ok"
                waits.append(time.perf_counter() - started)
                time.sleep(0.02)
        for t in attackers:
            t.join(60)
    finally:
        server.should_exit = True
        thread.join(10)
    assert max(waits) < 1.0, (
        f"/health waited {max(waits):.2f} s behind the logins"
    )  # scrypt on the loop: 2+ s
    assert sorted(statuses) == [401] * 40


def test_a_foreign_host_is_refused(bare_app):
    app = bare_app
    with _client(app, base_url="http://evil.example:8765") as rebound:
        page = rebound.get("/login")
        assert (
            page.status_code == 400 and "Host 'evil.example:8765' is not a name of this console" in page.text
        )
        assert rebound.post("/login", data={"name": "ana", "password": PASSWORD}).status_code == 400
        assert rebound.get("/health").text == "ok"  # probes may use any name
    for base in ("http://localhost:8765", "http://[::1]:8765", BASE):
        with _client(app, base_url=base) as local:
            assert local.get("/login").status_code == 200
    named = create_app(log_url=app.data["url"], allowed_hosts=["console.internal"])
    with _client(named, base_url="https://console.internal") as client:
        assert client.get("/login").status_code == 200
    with _client(named) as client:
        assert client.get("/login").status_code == 400  # only the names given
    named.state.close()


def test_the_drift_view_shows_production_windows_only_one_chart_per_check(app):
    """`champion drift --file` results stay off the page; each check gets its own chart and scale, so the
    one that moved can be read (the old plot clipped at ×10 and shared three colours among nine lines)."""
    from datetime import UTC, datetime, timedelta

    from monitoring.drift import CheckResult, DriftDecision
    from monitoring.store import DriftStore

    store = DriftStore(app.data["url"])
    at = (datetime.now(UTC) - timedelta(minutes=30)).isoformat()
    what_if = [
        CheckResult("embedding_drift", "domain classifier ROC AUC", 0.99, 0.1, True, 50, "drift", "what-if"),
        CheckResult("text_length", "Wasserstein distance", 40.0, 0.5, True, 50, "drift", "what-if"),
    ]
    store.record(DriftDecision("drift", "clf", app.data["v1"], 50, what_if, {"file": "what-if.csv"}, at),
                 source="file")  # fmt: skip
    store.close()
    with _client(app) as client:
        _login(client)
        html = client.get("/models/clf").text
    assert "what-if" not in html and "0.99" not in html  # the file's window is not on the page
    assert 'id="chart-text_length"' not in html  # a check only the file had: no chart for it
    charts = re.findall(r'<figure class="chart[^"]*" id="chart-([^"]+)"', html)
    assert charts == ["embedding_drift"]  # the seeded production windows: one check, one chart
    assert html.count('class="drifted"') == 1  # the one production window where it drifted
    assert "Production windows only" in html


def test_an_error_shows_a_store_uri_without_its_password(app, monkeypatch):
    import champion.registry as registry_module
    from champion.errors import ChampionError

    def missing(_reg, name):
        raise ChampionError(f"model '{name}' is not in the registry at postgresql://bob:s3cret@db/mlflow.")

    with _client(app) as client:
        _login(client)
        monkeypatch.setattr(registry_module, "registered_model", missing)
        page = client.get("/models/other")
    assert (
        page.status_code == 404
        and "postgresql://bob:***@db/mlflow" in page.text
        and "s3cret" not in page.text
    )


def test_the_pages_show_the_aliases_as_the_registry_has_them(app):
    """A model without a challenger (every model after a canary promotion retires it) is listed, not a 500."""
    with _client(app) as client:
        _login(client, next_page="/")
        home = client.get("/")
        model = client.get("/models/clf").text
    row = re.search(r"<tr>\s*<td><a href=\"/models/clf\">clf</a></td>(.*?)</tr>", home.text, re.S).group(1)
    assert home.status_code == 200 and re.findall(r"<td>([^<]*)</td>", row)[:2] == [f"v{app.data['v1']}", "—"]
    challenger = model[model.index('id="challenger"') :]
    assert re.search(r'<p class="big">([^<]*)</p>', challenger).group(1) == "—"
