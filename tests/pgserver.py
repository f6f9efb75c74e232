"""The PostgreSQL server the `postgres` tests use: the one on 127.0.0.1:5432, else a throwaway cluster.

`make test` must work on a machine where PostgreSQL is installed but not running. When nothing answers on
127.0.0.1:5432 and the server binaries exist, a cluster is made in a temporary folder on a free port for
this test session and stopped afterwards. With no binaries the PostgreSQL tests are skipped with one line
saying how to install them, except under CI=true, where they fail: CI must never pass without them.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = (
    "PostgreSQL is not running on 127.0.0.1:5432 and no server binaries (initdb, pg_ctl) were found; "
    "install them (Debian: `apt-get install postgresql`) or start a server there to run these tests."
)


@dataclass
class PgServer:
    host: str
    port: int
    user: str = "postgres"
    stop: object = None  # a callable for a throwaway cluster, None for the machine's own server
    ctl: object = None  # a throwaway cluster's `pg_ctl ACTION` (stop, start), for outage tests

    def admin_dsn(self, dbname: str = "postgres") -> str:
        return f"dbname={dbname} user={self.user} host={self.host} port={self.port}"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{dbname}"


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def find_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/*/bin (newest)."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_major, reverse=True):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def _major(folder: str) -> int:
    try:
        return int(Path(folder).parent.name)
    except ValueError:
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_throwaway(binaries: Path) -> PgServer:
    """initdb + pg_ctl start in a temporary folder, trust auth on loopback; as `postgres` when we are root."""
    data = Path(tempfile.mkdtemp(prefix="champion-pg-"))
    port = _free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            raise RuntimeError("running as root, and `runuser` is missing to start PostgreSQL as postgres")
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, text=True, timeout=120)

    cluster = data / "cluster"
    run(str(binaries / "initdb"), "-D", str(cluster), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={data}"
    run(str(binaries / "pg_ctl"), "-D", str(cluster), "-o", options, "-l", str(data / "log"), "-w", "start")
    deadline = time.monotonic() + 30
    while not answers("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.2)

    def ctl(action: str) -> None:
        extra = ["-o", options, "-l", str(data / "log")] if action == "start" else ["-m", "fast"]
        run(str(binaries / "pg_ctl"), "-D", str(cluster), *extra, "-w", action)

    def stop() -> None:
        subprocess.run(
            [*as_user, str(binaries / "pg_ctl"), "-D", str(cluster), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(data, ignore_errors=True)

    return PgServer("127.0.0.1", port, stop=stop, ctl=ctl)


def acquire() -> PgServer | str:
    """The server to test against, or the sentence that says why there is none."""
    if answers("127.0.0.1", 5432):
        return PgServer("127.0.0.1", 5432)
    binaries = find_binaries()
    if binaries is None:
        return INSTALL_HINT
    try:
        return start_throwaway(binaries)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        return f"nothing answers on 127.0.0.1:5432 and a throwaway PostgreSQL failed to start: {detail}"
