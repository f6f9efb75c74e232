"""Prometheus metrics of the model server, labelled by model version and traffic arm.

Plain `prometheus_client` (BentoML's own wrapper is deprecated); `bentoml serve` runs it in multiprocess
mode, so gauges say how their values from several workers combine. Created on first use, not at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class Metrics:
    requests: object
    errors: object
    latency: object
    model_latency: object
    batch_size: object
    predicted: object
    confidence: object
    agreement: object
    swaps: object
    served: object
    unaudited: object
    log_pending: object
    log_behind: object
    log_database_up: object
    log_writer_up: object
    log_writer_errors: object
    shadow_skipped: object
    routes: object
    tokens: object
    generations: object
    ttft: object
    inter_token: object


@cache
def metrics() -> Metrics:
    from prometheus_client import Counter, Gauge, Histogram

    mv = ["model", "version", "arm"]
    return Metrics(
        requests=Counter("champion_requests", "Predictions answered", mv),
        errors=Counter(
            "champion_errors", "Failed or rejected requests, by kind", [*mv, "kind"]
        ),  # kind: bad_request | unauthorized | not_ready | model_error | canary_error
        latency=Histogram(
            "champion_request_latency_seconds", "End-to-end HTTP latency", mv, buckets=LATENCY_BUCKETS
        ),
        model_latency=Histogram(
            "champion_model_latency_seconds", "Forward pass per batch", mv, buckets=LATENCY_BUCKETS
        ),
        batch_size=Histogram("champion_batch_size", "Texts per model batch", mv, buckets=BATCH_BUCKETS),
        predicted=Counter("champion_predicted_class", "Predicted labels", [*mv, "label"]),
        confidence=Histogram(
            "champion_confidence", "Score of the predicted label", mv, buckets=CONFIDENCE_BUCKETS
        ),
        agreement=Counter(
            "champion_agreement", "Shadow/canary answers compared with the champion's", [*mv, "agrees"]
        ),
        swaps=Counter("champion_swaps", "Times an alias moved to another loaded version", ["model", "alias"]),
        served=Gauge(
            "champion_served_version",
            "1 for the version each alias is served by, with its format (safetensors, int8, onnx, onnx-int8)",
            ["model", "alias", "version", "format"],
            multiprocess_mode="livemax",
        ),
        unaudited=Gauge(
            "champion_alias_unaudited",
            "1 while MLflow shows the alias on another version than the audit history (moved outside "
            "Champion, not adopted); the audited version is served meanwhile",
            ["model", "alias"],
            multiprocess_mode="livemax",
        ),
        log_pending=Gauge(
            "champion_inference_log_pending",
            "Predictions waiting to be written to the inference log",
            ["model"],
            multiprocess_mode="livesum",
        ),
        log_behind=Gauge(
            "champion_inference_log_behind_seconds",
            "Age of the oldest prediction not yet written to the inference log database (0: none waits)",
            ["model"],
            multiprocess_mode="livemax",
        ),
        log_database_up=Gauge(
            "champion_inference_log_database_up",
            "0 while the inference log database refuses writes (predictions wait in the spool)",
            ["model"],
            multiprocess_mode="livemin",
        ),
        log_writer_up=Gauge(
            "champion_inference_log_writer_up",
            "0 once a worker's inference log writer thread has died (readiness and liveness fail with it)",
            multiprocess_mode="livemin",
        ),
        log_writer_errors=Counter(
            "champion_inference_log_writer_errors",
            "Failures the inference log writer caught, logged and retried after a pause",
        ),
        routes=Counter(
            "champion_http_requests",
            "HTTP requests by route; every path that is none of the service's routes counts as 'other'",
            ["route", "status"],
        ),
        shadow_skipped=Counter(
            "champion_shadow_skipped", "Shadow copies skipped because the shadow queue was full", ["model"]
        ),
        tokens=Counter(
            "champion_tokens", "Tokens of generated answers: prompt (in) and completion (out)", [*mv, "kind"]
        ),
        generations=Counter(
            "champion_generations",
            "Generated answers by how they ended: stop, length, cancelled (the client left), error",
            [*mv, "finish_reason"],
        ),
        ttft=Histogram(
            "champion_time_to_first_token_seconds",
            "From the request to its first generated token (queueing and prefill included)",
            mv,
            buckets=TTFT_BUCKETS,
        ),
        inter_token=Histogram(
            "champion_inter_token_latency_seconds",
            "Mean time between the tokens of one answer, after the first",
            mv,
            buckets=ITL_BUCKETS,
        ),
    )
