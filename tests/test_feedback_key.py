"""The service's ingest key (/feedback and /reload): from CHAMPION_FEEDBACK_KEY or a 0600 file in
CHAMPION_HOME, never printed by `champion serve`; CHAMPION_API_KEY still works for one release."""

from __future__ import annotations

import os

import pytest

from serving.service import _auth_problem

KEY = "the-ingest-key-" + "x" * 20


@pytest.fixture
def no_keys(home, monkeypatch):
    for var in ("CHAMPION_FEEDBACK_KEY", "CHAMPION_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return home


def _with(key: str) -> dict[bytes, bytes]:
    return {b"x-api-key": key.encode()}


def test_the_key_comes_from_the_environment_or_a_private_file(no_keys, monkeypatch):
    status, error = _auth_problem(_with(KEY))
    assert status == 403 and "CHAMPION_FEEDBACK_KEY is not set" in error

    path = no_keys / "keys" / "feedback.key"
    path.parent.mkdir(parents=True)
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    assert _auth_problem(_with(KEY)) is None
    assert _auth_problem({b"authorization": f"Bearer {KEY}".encode()}) is None
    assert _auth_problem(_with("wrong"))[0] == 401

    path.chmod(0o644)  # readable by others: whoever can read it could write labels
    status, error = _auth_problem(_with(KEY))
    assert status == 403 and "key file is refused" in error and KEY not in error

    monkeypatch.setenv("CHAMPION_FEEDBACK_KEY", "from-the-environment")  # the environment wins
    assert _auth_problem(_with("from-the-environment")) is None

    monkeypatch.delenv("CHAMPION_FEEDBACK_KEY")
    path.unlink()
    monkeypatch.setenv("CHAMPION_API_KEY", KEY)  # the old name still opens /feedback, for one release
    assert _auth_problem(_with(KEY)) is None


def test_a_missing_key_is_made_in_a_private_file(no_keys, capsys):
    from serving.config import ensure_feedback_key, feedback_key

    path = ensure_feedback_key()
    assert path == no_keys / "keys" / "feedback.key"
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(path.parent).st_mode & 0o077 == 0
    key, source = feedback_key()
    assert key and source == str(path) and ensure_feedback_key() is None  # made once
    assert key not in capsys.readouterr().out
