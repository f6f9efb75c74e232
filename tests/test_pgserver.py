"""`make test` on a machine where PostgreSQL is installed but not running: a throwaway cluster for the run."""

from __future__ import annotations

import os
from pathlib import Path

import pgserver
import pytest
from pgserver import INSTALL_HINT, answers, find_binaries, start_throwaway


def test_no_server_and_no_binaries_is_one_sentence_on_how_to_install(monkeypatch):
    monkeypatch.setattr(pgserver, "answers", lambda host, port, timeout=1.0: False)
    monkeypatch.setattr(pgserver, "find_binaries", lambda: None)
    assert pgserver.acquire() == INSTALL_HINT and "apt-get install postgresql" in INSTALL_HINT


@pytest.mark.postgres
def test_a_throwaway_cluster_starts_answers_and_is_removed():
    binaries = find_binaries()
    if binaries is None:
        if os.environ.get("CI") == "true":
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    import psycopg2

    server = start_throwaway(binaries)
    try:
        assert server.port != 5432 and answers(server.host, server.port)
        conn = psycopg2.connect(server.admin_dsn(), connect_timeout=5)
        with conn.cursor() as cur:
            cur.execute("SHOW data_directory")
            data = Path(cur.fetchone()[0])
        conn.close()
        assert data.is_dir() and data.name == "cluster"
    finally:
        server.stop()
    assert not answers(server.host, server.port) and not data.exists()
