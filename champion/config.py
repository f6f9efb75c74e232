"""Shared configuration: strict pydantic models, YAML loading, and where Champion keeps its state."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from champion.errors import ChampionError
from champion.progress import quiet_third_party_bars

OFFLINE_ENV = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",  # also turns off evidently's telemetry
    "BENTOML_DO_NOT_TRACK": "True",
    "TOKENIZERS_PARALLELISM": "false",
}

LOG_URL_ENV = "CHAMPION_INFERENCE_LOG_URL"  # the inference log's URL when no config names one

T = TypeVar("T", bound="StrictModel")


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def champion_home() -> Path:
    """The folder Champion owns for its embedded state (`CHAMPION_HOME`, default `./.champion`)."""
    return Path(os.environ.get("CHAMPION_HOME", ".champion")).expanduser().resolve()


def home_secret(name: str, home: Path | None = None) -> str:
    """A random hex secret kept in CHAMPION_HOME/`name` (mode 0600): made once, then read by every process.
    Processes that start together agree on one: each writes its own candidate and links it into place, which
    is atomic and never overwrites, so the first link wins whole."""
    import secrets
    import uuid

    path = (home or champion_home()) / name
    if not (path.exists() and path.read_text().strip()):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        candidate = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(candidate, path)
        except FileExistsError:
            pass
        finally:
            candidate.unlink()
    return path.read_text().strip()


def secure_home() -> Path:
    """Make what Champion writes private to its user: umask 077 for this process (and the servers and jobs
    it starts), so new files are 0600 and folders 0700. An existing CHAMPION_HOME becomes 0700, and the
    stores at its top level (sqlite files with their journals and locks, spools, keys) lose their group and
    world bits. Called by the entry points (`champion ...`, the server's workers)."""
    os.umask(0o077)
    home = champion_home()  # created 0700 by whichever step first writes there (the umask applies)
    if not home.is_dir():
        return home
    try:  # the stores and keys only: a home pointed at a shared folder keeps the rest as it is
        entries = [home, *(p for p in home.iterdir() if p.name.endswith(_PRIVATE) or p.name in _PRIVATE)]
    except OSError:
        return home
    for path in entries:
        try:
            st = path.lstat()
            if st.st_uid == os.getuid() and st.st_mode & 0o077 and not stat.S_ISLNK(st.st_mode):
                path.chmod(stat.S_IMODE(st.st_mode) & 0o700)
        except OSError:  # vanished, or not ours to change: leave it
            continue
    return home


_PRIVATE = (".db", ".db-wal", ".db-shm", ".db-journal", ".lock", ".spool", ".key", "keys", "spool", "serving")


def redact_uri(text: str) -> str:
    """`text` with the password of every URI in it hidden: `postgresql://bob:***@db/x`, `?password=***`.

    For every error message, log line and MLflow param that may hold a store URI."""
    text = _URI_PASSWORD.sub(r"\1***@", text)
    return _QUERY_SECRET.sub(r"\1***", text)


# user:password@ in a URI's authority (the password may hold '@', so up to the last one before the path)
_URI_PASSWORD = re.compile(r"([a-zA-Z][\w+.-]*://[^\s:/@]*:)[^\s/]*@")
_QUERY_SECRET = re.compile(
    r"([?&](?:password|passwd|pwd|secret|token|api_key|access_token)=)[^&\s#'\"]*", re.I
)


def tracking_uri(override: str | None = None) -> str:
    """MLflow tracking/registry URI: override, then `MLFLOW_TRACKING_URI`, then sqlite in the home."""
    uri = override or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{champion_home() / 'mlflow.db'}"


def artifact_root() -> Path:
    """Where runs store artifacts when the tracking store is the embedded sqlite one."""
    return champion_home() / "artifacts"


def audit_url(override: str | None = None) -> str:
    """SQLAlchemy URL of the audit history: override, then `CHAMPION_AUDIT_URL`, then sqlite in the home."""
    url = override or os.environ.get("CHAMPION_AUDIT_URL")
    if url:
        return url
    return f"sqlite:///{champion_home() / 'audit.db'}"


def default_log_url() -> str:
    """The inference log when no config names one: $CHAMPION_INFERENCE_LOG_URL, else sqlite in the home."""
    return os.environ.get(LOG_URL_ENV) or f"sqlite:///{champion_home() / 'inference.db'}"


def drift_store_url(store_url: str | None = None, log_url: str | None = None) -> str:
    """Where drift checks are kept: the configured store, else beside the inference log (`log_url`, else
    `default_log_url()`)."""
    return store_url or log_url or default_log_url()


def prepare_environment() -> None:
    """Quiet, home-contained defaults for the libraries we drive; an explicit user setting always wins."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("BENTOML_HOME", str(champion_home() / "bentoml"))
    quiet_third_party_bars()  # a log that is not a terminal gets no MLflow / Hugging Face redraws


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{where}'; remove it or fix its spelling."
    if first["type"] == "missing":
        return f"{source}: required key '{where}' is missing; add it."
    return f"{source}: '{where}' {first['msg'].lower()} (got {first.get('input')!r}); fix that value."


def parse_config(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Validate a mapping into `cls`, turning pydantic's report into one sentence about the first problem."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ChampionError(_format_validation_error(err, source)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) on top of a config mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ChampionError(f"override '{item}' is not of the form section.key=value; fix it.")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ChampionError(f"override '{item}': '{part}' is not a section; fix the key.")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(cls: type[T], path: str | os.PathLike[str], overrides: list[str] | None = None) -> T:
    """Read a YAML config into `cls`; every problem is reported as one sentence naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ChampionError(f"config file '{path}' does not exist; pass the path of a YAML config.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:  # PyYAML's own message spans several lines: keep the problem and where
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ChampionError(
            f"config file '{path}' is not valid YAML ({problem}{where}); fix its syntax."
        ) from None
    if not isinstance(data, dict):
        raise ChampionError(f"config file '{path}' must hold a mapping of sections; it holds a {type(data)}.")
    return parse_config(cls, apply_overrides(data, overrides or []), source=str(path))
