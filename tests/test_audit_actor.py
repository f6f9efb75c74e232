"""Who the audit history names: a person or service account, never a bare uid."""

from __future__ import annotations

import os
import pwd

import pytest

from champion import audit


def _no_terminal() -> str:
    raise OSError(6, "No such device or address")  # what os.getlogin raises under cron or in a container


@pytest.fixture
def no_login(monkeypatch):
    """No CHAMPION_ACTOR, no login terminal, no USER or LOGNAME: a daemon's environment."""
    for key in ("CHAMPION_ACTOR", "USER", "LOGNAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(audit.os, "getlogin", _no_terminal)
    return monkeypatch


def test_champion_actor_wins(monkeypatch):
    monkeypatch.setenv("CHAMPION_ACTOR", "scheduler@ci")
    assert audit.current_actor() == "scheduler@ci"


def test_without_a_terminal_the_actor_is_the_account_name(no_login):
    name = pwd.getpwuid(os.getuid()).pw_name
    assert audit.current_actor() == f"{name}@{os.uname().nodename}"


def _no_passwd_entry(uid: int):
    raise KeyError(f"getpwuid(): uid not found: {uid}")


def test_a_uid_without_passwd_entry_falls_back_to_the_environment(no_login):
    no_login.setattr(audit.pwd, "getpwuid", _no_passwd_entry)
    host = os.uname().nodename
    no_login.setenv("LOGNAME", "svc-logname")
    assert audit.current_actor() == f"svc-logname@{host}"
    no_login.setenv("USER", "svc-user")
    assert audit.current_actor() == f"svc-user@{host}"
    no_login.delenv("USER")
    no_login.delenv("LOGNAME")
    assert audit.current_actor() == f"uid{os.getuid()}@{host}"
