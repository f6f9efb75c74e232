"""Talk to a running `champion serve`, or start one in the background (notebooks, the demo, tests)."""

from __future__ import annotations

import atexit
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from champion.errors import ChampionError
from serving.config import API_KEY_ENV, feedback_key

KEYED_ROUTES = ("/feedback", "/reload")  # the only routes that take the ingest key; predictions need none
_LAST = ("usage", "version", "request_id", "arm", "json_valid")  # kept from a stream's last chunk


@dataclass
class ServeClient:
    """A client of one server. The key (default: the ingest key from the environment or its 0600 file) is
    sent to /feedback and /reload only, and no request follows a redirect: a redirect to another host
    would otherwise carry the request, key included, wherever the server (or whoever answers) points it."""

    url: str
    api_key: str | None = None
    timeout: float = 60.0

    def predict(self, texts: list[str], probabilities: bool = False) -> list[dict[str, Any]]:
        return self._post("/predict_proba" if probabilities else "/predict", {"texts": texts})

    def feedback(self, request_id: str, label: str) -> dict[str, Any]:
        return self._post("/feedback", {"request_id": request_id, "label": label})

    def chat(
        self, model: str, messages: list[dict[str, str]], **params: Any
    ) -> Iterator[str | dict[str, Any]]:
        """Stream an answer from the OpenAI-compatible API (a text-generation model): yields each piece of
        text, then the last chunk (a dict with `finish_reason`, `usage`, `version` and `request_id`)."""
        body = {"model": model, "messages": messages, "stream": True, **params}
        request = self._request("/v1/chat/completions", body)
        with self._open(request, "/v1/chat/completions") as response:
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ChampionError(f"{self.url} stopped the answer: {event['error'].get('message')}")
                choice = (event.get("choices") or [{}])[0]
                if choice.get("finish_reason"):
                    yield {"finish_reason": choice["finish_reason"], **{k: event.get(k) for k in _LAST}}
                elif text := choice.get("delta", {}).get("content"):
                    yield text

    def rate(
        self, request_id: str, rating: int | None = None, correction: str | None = None
    ) -> dict[str, Any]:
        """Feedback on a generated answer: a rating (-1, 0 or 1) and/or the answer it should have given."""
        body = {"request_id": request_id, "rating": rating, "correction": correction}
        return self._post("/feedback", {k: v for k, v in body.items() if v is not None})

    def reload(self) -> dict[str, Any]:
        """What the server follows now, after checking the registry at once."""
        return self._post("/reload", {})

    def ready(self) -> bool:
        try:
            with _OPENER.open(self.url + "/readyz", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def _post(self, route: str, body: dict[str, Any]) -> Any:
        with self._open(self._request(route, body), route) as response:
            return json.loads(response.read())

    def _request(self, route: str, body: dict[str, Any]) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        if route in KEYED_ROUTES:
            key = self.api_key or feedback_key()[0]
            if key:
                headers["X-API-Key"] = key
        return urllib.request.Request(self.url + route, data=json.dumps(body).encode(), headers=headers)

    @contextmanager
    def _open(self, request: urllib.request.Request, route: str):
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                yield response
        except _Redirected as err:
            raise ChampionError(str(err)) from None
        except urllib.error.HTTPError as err:
            try:
                detail = json.loads(err.read() or b"{}").get("error", err.reason)
            except ValueError:
                detail = err.reason
            if isinstance(detail, dict):  # OpenAI's error object (/v1 routes)
                detail = detail.get("message", detail)
            raise ChampionError(f"{self.url}{route} answered {err.code}: {detail}") from None
        except urllib.error.URLError as err:
            raise ChampionError(
                f"no server answers at {self.url} ({err.reason}); start one with `champion serve`."
            ) from None


class _Redirected(urllib.error.URLError):
    pass


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: a `champion serve` never sends one, and following it would resend the body
    (and, to /feedback and /reload, the key) to a place nobody chose."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise _Redirected(
            f"{req.full_url} answered {code} with a redirect to {newurl}; the client does not follow "
            "redirects, so pass the server's own address with --url."
        )


_OPENER = urllib.request.build_opener(_NoRedirects())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def start_server(
    name: str,
    config: str | os.PathLike[str] | None = None,
    port: int | None = None,
    log: str | os.PathLike[str] | None = None,
    timeout: float = 180.0,
) -> Iterator[ServeClient]:
    """Run `champion serve NAME` in the background until the block ends; yields a client once it is ready.

    The server is stopped with SIGTERM (a graceful shutdown: its inference log is flushed).
    """
    from champion.config import champion_home

    env = dict(os.environ)
    env.setdefault(API_KEY_ENV, secrets.token_urlsafe(24))  # so this client may call /reload and /feedback
    # A port picked here is free only until someone binds it: BentoML's process manager picks its own
    # control port the same way, and now and then gets the same number. Then try another (ours only).
    attempts = 1 if port else 3
    for attempt in range(attempts):
        chosen = port or free_port()
        log_path = Path(log) if log else champion_home() / "serving" / f"{name}-{chosen}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "champion_cli", "serve", name, "--port", str(chosen)]
        if config:
            command += ["--config", str(config)]
        with open(log_path, "w") as out:
            proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        client = ServeClient(f"http://127.0.0.1:{chosen}", api_key=env[API_KEY_ENV])
        atexit.register(_stop, proc)  # a notebook kernel that dies mid-way still stops its server
        try:
            _wait_ready(client, proc, name, log_path, timeout)
            break
        except ChampionError:
            atexit.unregister(_stop)
            _stop(proc)
            if attempt + 1 == attempts or "Address already in use" not in log_path.read_text():
                raise
    try:
        yield client
    finally:
        atexit.unregister(_stop)
        _stop(proc)


def _wait_ready(
    client: ServeClient, proc: subprocess.Popen, name: str, log_path: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not client.ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ChampionError(
                f"`champion serve {name}` did not become ready; its log ({log_path}) ends with:\n"
                + log_path.read_text()[-2000:]
            )
        time.sleep(0.25)


def _stop(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
