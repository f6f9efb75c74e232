"""The web console in-process (Starlette's test client): logins, CSRF and Origin checks, the pages' content,
approvals and reviews through it. tests/test_console_access.py: credentials, roles, throttles, Host names;
tests/test_console_browser.py drives it in Chromium."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from helpers import make_versions

from champion.approval import pending_promotions, request_approval
from champion.registry import promote, story

LABELS = ("track_order", "reset_password", "card_declined", "invoice_request")


def seed_console_data(registry, home, texts: int = 12) -> dict:
    """clf: v1 champion, v2 waiting for approval (asked by the scheduler), `texts` predictions queued for
    review, and two drift checks (one drifted) in the inference log's database."""
    from monitoring.drift import CheckResult, DriftDecision
    from monitoring.review import ReviewConfig, ReviewQueue
    from monitoring.store import DriftStore
    from serving.inference_log import InferenceLog, PredictionRecord, encode_probs

    v1, v2 = make_versions(registry, "clf", [0.8, 0.9])
    promote(registry, "clf", v1, reason="first release")
    request_approval(registry, "clf", v2, "direct", v1, "beats the champion on 400 fresh rows", {"gate": {}},
                     hours=24, actor="scheduler")  # fmt: skip
    url = f"sqlite:///{home / 'inference.db'}"
    now = datetime.now(UTC)
    log = InferenceLog(url).start()
    records = []
    for i in range(texts):
        score = 0.3 + i / 100
        probs = np.array([score, 0.5 - i / 200, 0.1, 0.1 + i / 200])
        text = f"customer text number {i} <b>not bold</b>"
        at = now - timedelta(minutes=5)
        records.append(PredictionRecord(f"q{i:02d}", at, "clf", v1, "champion", text, LABELS[0], score, 1.0,
                                        None, encode_probs(probs)))  # fmt: skip
    log.append(records)
    log.flush()
    log.close()
    queue = ReviewQueue(url)
    queue.select("clf", ReviewConfig(random_share=0.0, drift_windows=False), labels=lambda _v: LABELS)
    queue.close()
    store = DriftStore(url)
    for hours, status in ((3, "ok"), (2, "drift"), (1, "ok")):
        value = 0.3 if status == "drift" else 0.05
        check = CheckResult("embedding_drift", "domain classifier ROC AUC", value, 0.1, status == "drift",
                            200, status, f"{status} in that window")  # fmt: skip
        at = (now - timedelta(hours=hours)).isoformat()
        store.record(DriftDecision(status, "clf", v1, 200, [check], {}, at))
    store.close()
    return {"v1": v1, "v2": v2, "url": url}


@pytest.fixture
def console(registry, home, tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    from champion_cli.console import create_app
    from champion_cli.console_auth import set_user

    data = seed_console_data(registry, home)
    users = tmp_path / "users.json"
    set_user("ana", "correct horse battery", users, role="approver")
    set_user("scheduler", "the scheduler's pass", users, role="approver")
    app = create_app(log_url=data["url"], users_file=users)
    with TestClient(app, base_url="http://127.0.0.1:8765") as client:
        client.data = data
        yield client


def _login(client, name="ana", password="correct horse battery"):
    response = client.post("/login", data={"name": name, "password": password, "next": "/models/clf"})
    assert response.status_code == 200 and response.url.path == "/models/clf", response.text
    return re.search(r'name="csrf" value="([^"]+)"', response.text).group(1)


def test_pages_need_a_login_and_a_wrong_password_is_refused(console):
    assert console.get("/models/clf", follow_redirects=False).headers["location"] == "/login?next=/models/clf"
    assert console.get("/health").text == "ok"
    wrong = console.post("/login", data={"name": "ana", "password": "nope nope"})
    assert wrong.status_code == 401 and "name or password is wrong" in wrong.text
    assert "champion_console" not in console.cookies
    evil = console.post("/login", data={"name": "ana", "password": "x", "next": "//evil.example/"},
                        follow_redirects=False)  # fmt: skip
    assert evil.status_code == 401
    form = {"name": "ana", "password": "correct horse battery", "next": "//evil.example"}
    ok = console.post("/login", data=form, follow_redirects=False)
    assert ok.headers["location"] == "/"  # never off-site after a login
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_repeated_failed_logins_lock_the_name(console):
    for _ in range(5):
        assert console.post("/login", data={"name": "ana", "password": "guess guess"}).status_code == 401
    locked = console.post("/login", data={"name": "ana", "password": "correct horse battery"})
    assert locked.status_code == 429 and "too many failed logins" in locked.text


def test_the_model_page_shows_aliases_story_drift_and_pending(console):
    _login(console)
    page = console.get("/models/clf")
    assert page.status_code == 200
    html = page.text
    assert 'id="champion"' in html and f"v{console.data['v1']}" in html
    assert '<p class="task" id="champion-task">text-classification</p>' in html  # no task tag: a classifier
    assert f'id="pending-{console.data["v2"]}"' in html and "asked by scheduler" in html
    assert "<polyline" in html and html.count('class="drifted"') == 1  # one drifted window on the plot
    assert "first release" in html  # the story, from the audit history
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert console.get("/models/nope").status_code == 404


def test_cross_site_and_tokenless_posts_are_refused_and_change_nothing(console):
    csrf = _login(console)
    v2 = console.data["v2"]
    form = {"csrf": csrf, "version": v2, "reason": "ok"}
    evil = console.post("/models/clf/approve", data=form, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "cross-site" in evil.text
    tokenless = console.post("/models/clf/approve", data={"version": v2, "reason": "ok"})
    assert tokenless.status_code == 403 and "csrf" in tokenless.text
    console.cookies.clear()
    anonymous = console.post("/models/clf/approve", data=form)
    assert anonymous.status_code == 401
    wrong_key = console.post("/models/clf/approve", data=form, headers={"X-API-Key": "nope"})
    assert wrong_key.status_code == 401
    assert [p.version for p in pending_promotions(_registry())] == [v2]  # nothing moved


def _registry():
    from champion.registry import connect

    return connect()


def test_approval_through_the_console_is_four_eyes_and_audited(console):
    v1, v2 = console.data["v1"], console.data["v2"]
    csrf = _login(console, "scheduler", "the scheduler's pass")
    own = console.post("/models/clf/approve", data={"csrf": csrf, "version": v2, "reason": "mine"})
    assert own.status_code == 400 and "a second person must decide" in own.text
    console.post("/logout", data={"csrf": csrf})
    csrf = _login(console)
    empty = console.post("/models/clf/approve", data={"csrf": csrf, "version": v2, "reason": ""})
    assert empty.status_code == 400 and "--reason" in empty.text
    done = console.post("/models/clf/approve", data={"csrf": csrf, "version": v2, "reason": "per-class ok"})
    assert done.status_code == 200 and f"approved v{v2}" in done.text
    reg = _registry()
    assert str(reg.client.get_registered_model("clf").aliases["champion"]) == v2
    assert story(reg, "clf")[-1]["reason"] == f"ana approved v{v2} (per-class ok); it is the champion"
    assert f"v{v1} → v{v2}" in done.text  # the story on the page, updated


def test_reviewing_through_the_console_labels_skips_and_names_new_intents(console):
    from monitoring.review import ReviewConfig, ReviewQueue

    csrf = _login(console)
    page = console.get("/models/clf/review")
    first = re.search(r'data-request-id="([^"]+)"', page.text).group(1)
    assert first == "q00"  # the least confident first
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page.text  # customer text is escaped
    assert 'data-key="1"' in page.text and "<kbd>s</kbd>" in page.text
    labelled = console.post(
        "/models/clf/review", data={"csrf": csrf, "request_id": first, "label": LABELS[2]}
    )
    assert "labelled: card_declined" in labelled.text
    second = re.search(r'data-request-id="([^"]+)"', labelled.text).group(1)
    assert second != first
    skipped = console.post("/models/clf/review", data={"csrf": csrf, "request_id": second, "skip": "1"})
    assert "skipped" in skipped.text
    third = re.search(r'data-request-id="([^"]+)"', skipped.text).group(1)
    new = console.post("/models/clf/review", data={"csrf": csrf, "request_id": third, "label": LABELS[0],
                                                   "new_label": "crypto refund"})  # fmt: skip
    assert "labelled: crypto refund" in new.text
    again = console.post("/models/clf/review", data={"csrf": csrf, "request_id": first, "label": LABELS[1]})
    assert again.status_code == 400 and "already answered" in again.text
    queue = ReviewQueue(console.data["url"])
    assert (queue.get("clf", first).reviewer, queue.get("clf", third).answer) == ("ana", "crypto refund")
    assert queue.progress("clf", ReviewConfig())["reviewed_today"] == 3
    queue.close()


def test_an_evidently_report_is_served_sandboxed_from_its_mlflow_run(console):
    from monitoring.drift import CheckResult, DriftDecision
    from monitoring.store import DriftStore

    reg = _registry()
    run = reg.client.create_run(reg.client.create_experiment("console-test"))
    reg.client.log_text(run.info.run_id, "<html><script>alert(1)</script>an Evidently report</html>",
                        "drift/drift.html")  # fmt: skip
    store = DriftStore(console.data["url"])
    check = CheckResult(
        "embedding_drift", "domain classifier ROC AUC", 0.3, 0.1, True, 200, "drift", "drifted"
    )
    check_id = store.record(DriftDecision("drift", "clf", console.data["v1"], 200, [check]), run.info.run_id)
    store.close()
    _login(console)
    assert f"/models/clf/drift/{check_id}/report" in console.get("/models/clf").text
    report = console.get(f"/models/clf/drift/{check_id}/report")
    assert report.status_code == 200 and "an Evidently report" in report.text
    assert report.headers["content-security-policy"] == "sandbox allow-scripts"
    assert console.get("/models/clf/drift/1/report").status_code == 404  # a check without a report
    assert console.get(f"/models/other/drift/{check_id}/report").status_code == 404  # not this model's


def test_hostile_requests_get_a_clear_4xx(console):
    csrf = _login(console)
    huge = console.post(
        "/models/clf/review", data={"csrf": csrf, "request_id": "q00", "label": "x" * 100_000}
    )
    assert huge.status_code == 413 and "request body over 64 KiB" in huge.text

    def chunks():
        for _ in range(100):
            yield b"label=" + b"x" * 1024

    unsized = console.post("/models/clf/review", content=chunks(),
                           headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert unsized.status_code == 413
    long_label = console.post(
        "/models/clf/review", data={"csrf": csrf, "request_id": "q00", "label": "x" * 300}
    )
    assert long_label.status_code == 400 and "label: give 1 to 256" in long_label.text
    unknown = console.post("/models/clf/review", data={"csrf": csrf, "request_id": "nope", "label": "a"})
    assert unknown.status_code == 400 and "not in the review queue" in unknown.text
    assert console.post("/models/clf/promote", data={"csrf": csrf}).status_code == 404
    assert console.delete("/models/clf").status_code == 405
    assert console.get("/static/../console.py").status_code == 404
    assert console.get("/models/clf/drift/abc/report").status_code == 404


def test_guessing_many_names_keeps_the_lockout_table_bounded(monkeypatch):
    import champion_cli.console_auth as console_auth

    monkeypatch.setattr(console_auth, "MAX_TRACKED_NAMES", 50)
    sessions = console_auth.Sessions()
    for i in range(500):
        sessions.failed(f"name-{i}" + "x" * 1000)
    assert len(sessions.failures) <= 50 and all(len(k) <= 129 for k in sessions.failures)  # address, name


def test_a_database_that_does_not_answer_is_a_503_with_a_sentence(registry, tmp_path):
    from starlette.testclient import TestClient

    from champion_cli.console import create_app
    from champion_cli.console_auth import set_user

    users = tmp_path / "users.json"
    set_user("ana", "correct horse battery", users)
    app = create_app(
        log_url="postgresql+psycopg2://nobody@127.0.0.1:1/none?connect_timeout=2", users_file=users
    )
    with TestClient(app, base_url="http://127.0.0.1:8765") as client:
        client.post("/login", data={"name": "ana", "password": "correct horse battery"})
        page = client.get("/models/clf/review")
    assert (
        page.status_code == 503 and "the registry or the inference log database did not answer" in page.text
    )


def test_a_separate_drift_store_from_the_monitor_config_is_the_one_shown(registry, home, tmp_path):
    """`champion drift` with a monitor config whose store_url names its own database keeps its checks there;
    the console given that config shows those windows (before, it read the log's database and showed none)."""
    from starlette.testclient import TestClient

    from champion_cli.console import create_app
    from champion_cli.console_auth import set_user
    from monitoring.drift import CheckResult, DriftDecision
    from monitoring.store import DriftStore

    data = seed_console_data(registry, home)
    drift_url = f"sqlite:///{tmp_path / 'drift.db'}"
    store = DriftStore(drift_url)
    check = CheckResult("embedding_drift", "domain classifier ROC AUC", 0.4, 0.1, True, 200, "drift", "moved")
    for hours in (2, 1):
        at = (datetime.now(UTC) - timedelta(hours=hours)).isoformat()
        store.record(DriftDecision("drift", "clf", data["v1"], 200, [check], {}, at))
    store.close()
    monitor = tmp_path / "monitor.yaml"
    monitor.write_text(f"store_url: {drift_url}\n")
    users = tmp_path / "users.json"
    set_user("ana", "correct horse battery", users, role="approver")
    pages = {}
    for label, options in (("log", {}), ("monitor", {"monitor_config": str(monitor)})):
        app = create_app(log_url=data["url"], users_file=users, **options)
        with TestClient(app, base_url="http://127.0.0.1:8765") as client:
            _login(client)
            pages[label] = client.get("/models/clf").text
    assert pages["log"].count('class="drifted"') == 1  # the log database's three windows, one drifted
    assert pages["monitor"].count('class="drifted"') == 2  # the separate store's two drifted windows
