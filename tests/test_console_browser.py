"""The console in a real headless Chromium (Debian's chromium, driven by Playwright), against a real
`champion console` process: log in, review ten texts with the keyboard, approve a pending promotion and
see the history update; a cross-site form post and an unauthenticated post are refused."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import http_process
from test_console import seed_console_data

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it where it can)"
)
PASSWORD = "correct horse battery"


@pytest.fixture
def console_url(registry, home, tmp_path):
    data = seed_console_data(registry, home, texts=12)
    champion = str(Path(sys.executable).parent / "champion")
    subprocess.run([champion, "console-user", "ana", "--role", "approver", "--password-stdin"],
                   input=PASSWORD + "\n", text=True, check=True, capture_output=True)  # fmt: skip
    command = lambda port: [champion, "console", "--port", str(port), "--log-url", data["url"]]  # noqa: E731
    with http_process(command, tmp_path / "console.log", timeout=60) as url:
        yield url, data


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def evil_site(tmp_path):
    """Another origin whose page posts an approval form to the console as soon as it loads."""
    folder = tmp_path / "evil"
    folder.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_log_in_review_ten_texts_with_the_keyboard_and_approve(console_url, browser, evil_site):
    url, data = console_url
    page = browser.new_page()
    errors = []
    # Script errors and CSP violations; a refused request's own status line is expected below.
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)

    page.goto(f"{url}/models/clf")
    assert page.url.startswith(f"{url}/login")  # a login first
    page.fill("#name", "ana")
    page.fill("#password", PASSWORD)
    with page.expect_navigation():
        page.click("#login")
    assert page.url == f"{url}/models/clf"
    assert page.inner_text("#who") == "ana"
    assert page.is_visible(f"#pending-{data['v2']}")
    chart = page.locator("#chart-embedding_drift")  # one small chart per check, its last value written out
    assert chart.is_visible() and "threshold 0.1" in chart.inner_text()

    # Ten texts with the keyboard: labels by digit, one skip, one new intent typed after "n".
    page.click("#review-link")
    seen = []
    keys = ["1", "3", "s", "2", "n", "4", "1", "2", "3", "1"]
    for key in keys:
        # The element exists before the page's key handler is attached; a key pressed in between is lost.
        page.wait_for_load_state("load")
        request_id = page.get_attribute("#item", "data-request-id")
        assert request_id not in seen
        seen.append(request_id)
        with page.expect_navigation():
            if key == "n":
                page.keyboard.press("n")
                assert page.evaluate("document.activeElement.id") == "new-label"
                page.keyboard.type("crypto refund")
                page.keyboard.press("Enter")
            else:
                page.keyboard.press(key)
    assert page.inner_text("#answered") == "10"
    assert page.inner_text("#waiting") == "2"  # 12 queued, 10 answered

    from monitoring.review import ReviewQueue

    queue = ReviewQueue(data["url"])
    answers = [queue.get("clf", rid) for rid in seen]
    queue.close()
    assert [a.status for a in answers].count("skipped") == 1
    assert answers[4].answer == "crypto refund" and all(a.reviewer == "ana" for a in answers)
    assert answers[0].answer == answers[0].choices[0][0]  # "1" chose the first of the model's labels
    assert answers[1].answer == answers[1].choices[2][0]

    # A page on another origin posts an approval with ana's cookie riding along: refused, nothing moves.
    folder, evil = evil_site
    (folder / "index.html").write_text(
        f'<form id="f" method="post" action="{url}/models/clf/approve">'
        f'<input name="version" value="{data["v2"]}"><input name="reason" value="pwned"></form>'
        '<script>document.getElementById("f").submit()</script>'
    )
    with page.expect_navigation(url=f"{url}/models/clf/approve"):
        page.goto(evil)
    assert "cross-site request refused" in page.inner_text("#error")
    page.goto(f"{url}/models/clf")
    assert page.is_visible(f"#pending-{data['v2']}")

    # Without a login at all (a fresh browser context): refused.
    stranger = browser.new_context().new_page()
    response = stranger.request.post(f"{url}/models/clf/approve", form={"version": data["v2"], "reason": "x"})
    assert response.status == 401

    # The approval itself, and the history on the page updates.
    card = page.locator(f"#pending-{data['v2']}")
    card.locator("input.reason").fill("the per-class report looks fine")
    with page.expect_navigation():
        card.locator("button.approve").click()
    assert f"approved v{data['v2']}" in page.inner_text("#notice")
    assert page.inner_text("#champion .big") == f"v{data['v2']}"
    first_row = page.inner_text("#story tbody tr:first-child")
    assert "ana" in first_row and "approved by ana: the per-class report looks fine" in page.inner_text(
        "#story"
    )
    assert page.is_visible("#no-pending")
    assert not errors, errors  # no script or CSP errors in the browser console
