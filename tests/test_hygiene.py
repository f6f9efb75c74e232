"""Credentials and state kept to their owner: no key printed or sent where it is not needed, no password of
a store URI shown, CHAMPION_HOME private, and model names quoted in MLflow's filters."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from champion_cli.cli import main

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-pw-24"


@pytest.fixture(autouse=True)
def _keep_umask():
    """main() sets the process umask to 077; give the next tests the one they had."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


# --- keys -------------------------------------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    """Records each request's path and headers; answers as `self.server.answer(path)` says."""

    def do_POST(self):
        self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, headers, body = self.server.answer(self.path)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _recorder(answer) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen, server.answer = [], answer
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_port}"


def test_predict_url_sends_no_key_and_follows_no_redirect(home, monkeypatch, capsys):
    for var in ("CHAMPION_API_KEY", "CHAMPION_FEEDBACK_KEY"):
        monkeypatch.setenv(var, "ingest-key-never-sent")
    answer = json.dumps([{"label": "track_order", "score": 0.9, "version": "1"}]).encode()
    good = _recorder(lambda path: (200, {"Content-Type": "application/json"}, answer))
    elsewhere = _recorder(lambda path: (200, {"Content-Type": "application/json"}, answer))
    moved = _recorder(
        lambda path: (307, {"Location": f"http://localhost:{elsewhere.server_port}{path}"}, b"")
    )
    try:
        assert main(["predict", "support", "where is my order", "--url", _url(good)]) == 0
        assert "track_order" in capsys.readouterr().out
        ((path, headers),) = good.seen
        assert path == "/predict" and not {"x-api-key", "authorization"} & {h.lower() for h in headers}

        code = main(["predict", "support", "hello", "--url", _url(moved)])
        err = capsys.readouterr().err
        assert code == 2 and "does not follow redirects" in err, err
        assert elsewhere.seen == []  # neither the text nor any key went to the other host
    finally:
        for server in (good, elsewhere, moved):
            server.shutdown()
            server.server_close()


def test_the_client_sends_the_ingest_key_to_feedback_only(home, monkeypatch):
    from serving.client import ServeClient

    for var in ("CHAMPION_API_KEY", "CHAMPION_FEEDBACK_KEY"):
        monkeypatch.setenv(var, "ingest-key")
    ok = _recorder(lambda path: (200, {"Content-Type": "application/json"}, b"{}"))
    try:
        client = ServeClient(_url(ok))
        client.feedback("r1", "track_order")
        client.predict(["hi"])
        (feedback_headers, predict_headers) = [headers for _, headers in ok.seen]
        assert feedback_headers.get("x-api-key") == "ingest-key"
        assert "x-api-key" not in predict_headers
    finally:
        ok.shutdown()
        ok.server_close()


def test_champion_serve_prints_no_key(home, monkeypatch, capsys):
    for var in ("CHAMPION_API_KEY", "CHAMPION_FEEDBACK_KEY"):
        monkeypatch.delenv(var, raising=False)
    started = {}

    def execve(path, argv, env):
        started.update(argv=argv, env=env)

    monkeypatch.setattr(os, "execve", execve)
    assert main(["serve", "support", "--port", "3999"]) == 0
    out = capsys.readouterr()
    keys = [v for k, v in started["env"].items() if "KEY" in k and k.startswith("CHAMPION")]
    keys += [p.read_text().strip() for p in home.rglob("*.key")]
    assert keys, "the server was started with no key at all: nothing to check"
    for key in keys:
        assert key not in out.out + out.err and key not in " ".join(started["argv"])


# --- store URIs -------------------------------------------------------------------------------------


def test_a_store_password_is_shown_nowhere(home, monkeypatch, capsys):
    import socket
    import traceback

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://bob:{PASSWORD}@127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    try:
        assert main(["models", "list"]) != 0
    except Exception:  # what the interpreter prints for an exception main() lets through
        print(traceback.format_exc(), file=sys.stderr)
    err = capsys.readouterr().err
    assert "127.0.0.1" in err and PASSWORD not in err, err[-2000:]

    started = {}
    monkeypatch.setattr(os, "execv", lambda path, argv: started.update(argv=argv, env=dict(os.environ)))
    monkeypatch.setattr(os, "execve", lambda path, argv, env: started.update(argv=argv, env=env))
    pg = f"postgresql://bob:{PASSWORD}@db.internal/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pg)
    main(["ui"])
    out = capsys.readouterr().out
    assert PASSWORD not in " ".join(started["argv"]), started["argv"]  # what `ps` shows every user
    assert started["env"]["MLFLOW_BACKEND_STORE_URI"] == pg and PASSWORD not in out

    from champion.config import redact_uri
    from champion.tracking import flatten

    params = flatten({"registry": {"tracking_uri": pg}, "fresh": {"log_url": pg + "?password=" + PASSWORD}})
    assert PASSWORD not in json.dumps(params) and params["registry.tracking_uri"].startswith(
        "postgresql://bob:"
    )
    assert redact_uri(f"at postgresql://bob:{PASSWORD}@db/x and ok") == "at postgresql://bob:***@db/x and ok"


# --- CHAMPION_HOME ----------------------------------------------------------------------------------

TINY_FLOW = r"""
import os, sys, uuid
from datetime import UTC, datetime
os.umask(0o022)  # what a shell usually has
from champion_cli.cli import main
main(["models", "list"])  # creates the registry and the audit history
sys.path.insert(0, "tests")
from helpers import register_tiny_versions
from champion.registry import connect, promote
from serving.inference_log import InferenceLog, PredictionRecord
reg = connect()
(version,) = register_tiny_versions(reg, sys.argv[1], ["a", "b"], 1)
promote(reg, "tiny-intents", version, reason="first")
log = InferenceLog(f"sqlite:///{os.environ['CHAMPION_HOME']}/inference.db").start()
now = datetime.now(UTC)
log.append([PredictionRecord(uuid.uuid4().hex, now, "tiny-intents", "1", "champion", "hi", "a", 0.9, 1.0)])
log.flush()
log.close()
reg.close()
"""


def test_a_fresh_champion_home_is_private_after_a_tiny_flow(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    env = {**os.environ, "CHAMPION_HOME": str(home), "CHAMPION_ACTOR": "pytest"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("CHAMPION_AUDIT_URL", None)
    run = subprocess.run(
        [sys.executable, "-c", TINY_FLOW, str(tiny_model_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    paths = [home, *home.rglob("*")]
    assert any(p.name == "mlflow.db" for p in paths) and any(p.name == "inference.db" for p in paths)
    shared = [f"{p.relative_to(tmp_path)} {stat.filemode(p.lstat().st_mode)}" for p in paths
              if not p.is_symlink() and p.lstat().st_mode & 0o077]  # fmt: skip
    assert not shared, shared


def test_an_existing_home_is_tightened_by_the_next_command(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    (home / "audit.db").write_text("")
    (home / "audit.db").chmod(0o644)
    monkeypatch.setenv("CHAMPION_HOME", str(home))
    main(["models", "list"])
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "audit.db").stat().st_mode) == 0o600


# --- model names ------------------------------------------------------------------------------------


def test_a_model_name_with_a_quote_lists_and_shows(registry, tmp_path, capsys):
    from champion.registry import list_models, show_model

    for name in ("it's", 'say "hi"', "plain"):
        registry.client.create_registered_model(name)
        registry.client.create_model_version(name, (tmp_path / "m").as_uri())
    assert [(m["name"], m["latest"]) for m in list_models(registry)] == [
        ("it's", "1"),
        ("plain", "1"),
        ('say "hi"', "1"),
    ]
    assert [v["version"] for v in show_model(registry, "it's")["versions"]] == ["1"]
    assert main(["models", "show", "it's", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "it's"
