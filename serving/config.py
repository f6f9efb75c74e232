"""The model server's one typed config: which model, how to batch, follow the registry, route and log."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from champion.config import StrictModel, champion_home, default_log_url, load_config, parse_config
from champion.errors import ChampionError

CONFIG_ENV = "CHAMPION_SERVE_CONFIG"  # how `champion serve` hands the resolved config to `bentoml serve`
# The ingest key: the service's /feedback (and /reload), nothing else; it grants nothing in the console.
FEEDBACK_KEY_ENV = "CHAMPION_FEEDBACK_KEY"
FEEDBACK_KEY_FILE = "keys/feedback.key"  # under CHAMPION_HOME, read when the environment has no key; 0600
LEGACY_API_KEY_ENV = "CHAMPION_API_KEY"  # the ingest key's deprecated name, read for one more release
API_KEY_ENV = FEEDBACK_KEY_ENV  # the variable `champion serve` and the client pass the key in
HostName = Annotated[str, Field(pattern=r"^(\*|[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])$")]  # no port, no scheme


class BatchingConfig(StrictModel):
    max_batch_size: int = Field(32, ge=1, le=1024)  # MiniLM on 2 CPU cores: 32 short texts take ~60 ms
    max_latency_ms: int = Field(10_000, ge=10)  # a hard budget in BentoML: past it requests get 503 (B1)
    forward_chunk: int = Field(8, ge=0)  # a batch runs as length-sorted groups this big (0: one group)
    # Batches in flight per worker. With 2, one batch is tokenised and another answered while a third is in
    # the forward pass (one forward at a time: serving/model.py FORWARD_LOCK).
    in_flight: int = Field(1, ge=1, le=8)


class LimitsConfig(StrictModel):
    max_text_chars: int = Field(2_000, ge=1)
    max_items: int = Field(64, ge=1)  # texts per request


class GenerationServeConfig(StrictModel):
    """Limits and batching of a text-generation version's service (the OpenAI-compatible API)."""

    max_batch: int = Field(16, ge=1, le=256)  # answers decoded together, per served version
    max_tokens: int = Field(512, ge=1, le=32_768)  # the most new tokens a request may ask for
    max_prompt_tokens: int = Field(2_048, ge=1)  # the rendered conversation, chat template included
    max_prompt_chars: int = Field(32_000, ge=1)  # all messages' text together
    max_messages: int = Field(64, ge=1)
    max_waiting: int = Field(256, ge=1)  # answers queued per version; beyond it 503 with Retry-After
    # response_format {"type": "json_object"}: an answer that is not a JSON object is generated again
    # (sampled, another seed) up to this many times; a streamed answer is validated only (it was sent).
    json_retries: int = Field(2, ge=0, le=5)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU


class FollowConfig(StrictModel):
    # Each poll reads the audit history's newest event id (one indexed query); the aliases are read again
    # (from the history, and from MLflow to compare) only when it changed, or every `full_check_seconds`.
    poll_seconds: float = Field(1.0, gt=0, le=3600)  # how often each worker checks for alias moves
    full_check_seconds: float = Field(15.0, gt=0, le=86400)  # MLflow UI / API moves are flagged this late
    keep_previous: bool = True  # the replaced champion stays loaded, so a rollback swaps instantly
    retry_failed_seconds: float = Field(60.0, ge=0)  # a version that failed to load is retried this late


class CanaryConfig(StrictModel):
    share: float = Field(0.1, gt=0, lt=1)  # of requests answered by the challenger
    min_requests: int = Field(200, ge=1)  # canary answers (counted as below) before a promotion
    max_error_rate: float = Field(0.01, ge=0, le=1)
    # challenger model latency per text (a batch's time / its texts); for a text-generation model, its time to
    # first token
    max_p99_ms: float = Field(1_000.0, gt=0)
    # share of canary answers equal to the champion's: the same label (a classifier); the same intent read
    # from the JSON answer, or the same text when neither answer is JSON (a text-generation model)
    min_agreement: float = Field(0.8, ge=0, le=1)
    min_requests_to_fail: int = Field(20, ge=1)  # evidence needed before a breach rolls the canary back
    # Evidence is counted per client (the peer address of the connection): no verdict either way before
    # this many distinct clients were answered by the canary, and one client counts for at most
    # `max_per_client` answers, so whoever sends a thousand requests weighs as much as one who sent a few.
    min_clients: int = Field(20, ge=1, le=5_000)
    max_per_client: int = Field(20, ge=1)
    min_seconds: float = Field(600.0, ge=0)  # the canary runs at least this long before it may promote
    # required: a canary that held its guardrails files a pending promotion for a second person (`champion
    # approve`) instead of promoting. A challenger that itself came through an approval always waits so.
    approval: Literal["none", "required"] = "none"
    approval_hours: float = Field(72.0, gt=0)  # an unapproved canary promotion expires after this long
    # Each worker publishes its counts to the inference log database this often and judges the guardrails
    # on the sum of every worker's: the verdict comes at most this late.
    sync_seconds: float = Field(1.0, gt=0, le=300)


class TrafficConfig(StrictModel):
    policy: Literal["champion", "ab", "shadow", "canary"] = "champion"
    challenger_weight: float = Field(0.1, gt=0, lt=1)  # A/B: share of requests answered by the challenger
    shadow_queue: int = Field(1_000, ge=1)  # shadow copies waiting; beyond it copies are skipped and counted
    canary: CanaryConfig = CanaryConfig()


class LogConfig(StrictModel):
    url: str | None = None  # SQLAlchemy URL; default $CHAMPION_INFERENCE_LOG_URL, else sqlite in the home
    # Every answered prediction is first written to a local spool (one write per batch), so a killed
    # server loses none; the writer ships it to the database. When the database is down the spool grows;
    # at `spool_max_mb` predictions are refused with 503 rather than answered without a log record.
    spool_dir: str | None = None  # default: beside a sqlite log file, else $CHAMPION_HOME/spool/<database>
    spool_max_mb: float = Field(1024.0, gt=0)  # ~1.7M predictions at ~600 bytes each
    batch_size: int = Field(256, ge=1)
    flush_seconds: float = Field(0.5, gt=0)
    retention_days: float | None = Field(30.0, gt=0)


class ServeConfig(StrictModel):
    model: str = ""  # registered model name; `champion serve NAME` fills it
    # What the model does: `champion serve` reads it from the registry (the champion's `task` tag) when auto.
    # text-classification serves /predict; text-generation the OpenAI-compatible /v1/chat/completions.
    task: Literal["auto", "text-classification", "text-generation"] = "auto"
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else the embedded sqlite store
    host: str = "127.0.0.1"
    # Host header names answered besides loopback (127.0.0.1, localhost, [::1]) and `host`; a server bound
    # to 0.0.0.0 or :: also answers this machine's name and addresses (a pod's IP, for kubelet and
    # Prometheus). Add the name clients use behind a proxy or load balancer; "*" turns the check off.
    # Other names get 421: a web page that rebinds its DNS to this server cannot reach it.
    allowed_hosts: list[HostName] = Field(default_factory=list)
    port: int = Field(3000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)  # each worker loads the model and follows the registry on its own
    threads: int = Field(2, ge=1, le=256)  # torch threads per worker; workers × threads ≤ cores
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_tokens: int | None = Field(None, ge=8, le=512)  # default: the max_length the version was trained with
    timeout_seconds: int = Field(60, ge=1)
    # BentoML's access log line per request: about a tenth of the event loop's work under load. Errors are
    # logged either way, and /metrics counts every request.
    access_log: bool = True
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    generation: GenerationServeConfig = GenerationServeConfig()
    follow: FollowConfig = FollowConfig()
    traffic: TrafficConfig = TrafficConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _latency_fits_timeout(self) -> ServeConfig:
        if self.batching.max_latency_ms > self.timeout_seconds * 1000:
            raise ValueError(
                f"batching.max_latency_ms ({self.batching.max_latency_ms}) must not exceed "
                f"timeout_seconds ({self.timeout_seconds} s)"
            )
        return self


def feedback_key() -> tuple[str | None, str]:
    """The ingest key and where it came from: $CHAMPION_FEEDBACK_KEY, else CHAMPION_HOME/keys/feedback.key,
    else the deprecated $CHAMPION_API_KEY; (None, "") when none is set.

    Read on every call, so a new key takes effect without a restart. A key file that others may read is
    refused: whoever can read it can write feedback labels, which teach the retrains."""
    if key := os.environ.get(FEEDBACK_KEY_ENV):
        return key, FEEDBACK_KEY_ENV
    path = champion_home() / FEEDBACK_KEY_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        fd = None
    except OSError as err:
        raise ChampionError(f"{path}: cannot be read ({err.strerror}); recreate it, mode 0600.") from None
    if fd is not None:
        with os.fdopen(fd) as file:
            if os.fstat(file.fileno()).st_mode & 0o077:
                raise ChampionError(
                    f"{path}: readable by group or others, so the key is refused; run `chmod 600 {path}`."
                )
            key = file.read().strip()
        if key:
            return key, str(path)
    if key := os.environ.get(LEGACY_API_KEY_ENV):
        return key, LEGACY_API_KEY_ENV
    return None, ""


def ensure_feedback_key() -> Path | None:
    """Write a new ingest key to CHAMPION_HOME/keys/feedback.key (0600) when none is set; its path, or None.

    The key itself is never printed: whoever needs it reads the file."""
    if feedback_key()[0]:
        return None
    path = champion_home() / FEEDBACK_KEY_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    return path


def inference_log_url(cfg: ServeConfig) -> str:
    return cfg.log.url or default_log_url()


def load_serve_config(path: str | os.PathLike[str] | None, model: str | None = None, **fields) -> ServeConfig:
    """The YAML at `path` (or the defaults), with the model name and any top-level fields filled in."""
    cfg = load_config(ServeConfig, path) if path else ServeConfig()
    data = cfg.model_dump()
    data.update({k: v for k, v in fields.items() if v is not None})
    if model:
        data["model"] = model
    cfg = parse_config(ServeConfig, data, source=str(path or "serve config"))
    if not cfg.model:
        raise ChampionError(
            "model: name the registered model to serve, e.g. `champion serve support-intents`."
        )
    return cfg


def config_from_env() -> ServeConfig:
    """The config `champion serve` wrote for the `bentoml serve` workers it starts."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ChampionError(
            f"{CONFIG_ENV} is not set; start the service with `champion serve NAME`, which sets it."
        )
    data = json.loads(Path(path).read_text())
    return parse_config(ServeConfig, data, source=path)


def write_config(cfg: ServeConfig) -> Path:
    """Write the resolved config where the server workers read it; returns the file."""
    folder = champion_home() / "serving"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cfg.model}-{cfg.port}.json"
    path.write_text(cfg.model_dump_json(indent=2))
    return path
