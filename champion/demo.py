"""`champion demo`: the loop end to end on generated support tickets, with embedded sqlite stores."""

from __future__ import annotations

from pathlib import Path

from champion.config import champion_home, load_config, tracking_uri

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG = CONFIGS / "minilm_lora_cpu.yaml"
SERVE_CONFIG = CONFIGS / "serve_cpu.yaml"
SAMPLE_TICKETS = [
    "hi, my parcel still hasn't shown up and the tracking hasn't moved in 5 days",
    "I was charged twice for the same order, please fix this",
    "forgot my password and the reset email never arrives",
]


HELD_OUT_INTENTS = 4  # the last intents of the generator: never trained on, streamed later as drift


def run_demo(
    rows: int = 2400,
    epochs: int = 3,
    base: str | None = None,
    config: Path = DEMO_CONFIG,
    traffic_rows: int = 400,
) -> None:
    from champion.registry import connect, promote
    from monitoring.config import MonitorConfig
    from monitoring.job import drift, format_decision
    from pipelines.finetune import FinetuneConfig, finetune
    from pipelines.ticketgen import INTENTS, generate_tickets, write_tickets
    from serving.client import start_server
    from serving.config import inference_log_url, load_serve_config
    from serving.inference_log import InferenceLog

    home = champion_home()
    known, held_out = list(INTENTS[:-HELD_OUT_INTENTS]), list(INTENTS[-HELD_OUT_INTENTS:])
    data = write_tickets(home / "data" / "tickets.csv", rows, seed=0, intents=known)
    print(f"1/8 generated {rows} support tickets across {len(known)} intents -> {data}")
    print(f"    ({', '.join(held_out)} are kept back: they arrive later, as drift)")

    overrides = [f"data.source={data}", f"train.epochs={epochs}"] + ([f"model.base={base}"] if base else [])
    cfg = load_config(FinetuneConfig, config, overrides)
    print(f"2/8 fine-tuning {cfg.model.base} with {cfg.method} on {cfg.train.device} ({config.name})")
    reg = connect()
    result = finetune(cfg, registry=reg)
    name, version = result.model_name, result.version
    print(
        f"3/8 registered {name} v{version} as '{cfg.registry.alias}' "
        f"(test accuracy {result.metrics['test_accuracy']:.3f}, "
        f"macro-F1 {result.metrics['test_macro_f1']:.3f}), with its held-out monitoring reference"
    )

    decision = promote(reg, name, version, reason="demo: promote the freshly trained challenger")
    state = "promoted" if decision.allowed else "kept the current champion"
    print(f"4/8 {state}: {decision.reason}")

    normal = generate_tickets(traffic_rows, seed=1, intents=known)["text"].tolist()
    drifted = generate_tickets(traffic_rows, seed=2, intents=known[:8] + held_out, vocabulary_shift=0.6)[
        "text"
    ].tolist()
    monitor = MonitorConfig()
    print(f"5/8 serving {name}@champion with BentoML, sending {len(normal)} tickets like its training data")
    with start_server(name, config=SERVE_CONFIG) as client:
        answers = client.predict(SAMPLE_TICKETS)
        _send(client, normal)
        status = client.reload()
        print(f"    {client.url} serves v{status['champion']} ({status['policy']} policy); answers:")
        for text, answer in zip(SAMPLE_TICKETS, answers, strict=True):
            print(f"      {answer['label']:<22} {answer['score']:.2f}  v{answer['version']}  {text}")
        _wait_logged(name, len(SAMPLE_TICKETS) + len(normal))
        print(f"6/8 drift check on the last {len(normal)} predictions (Evidently report logged to MLflow):")
        print(_indent(format_decision(drift(name, monitor, last=len(normal), registry=reg))))

        print(f"7/8 sending {len(drifted)} drifted tickets (the held-out intents, reworded vocabulary)")
        _send(client, drifted)
        _wait_logged(name, len(SAMPLE_TICKETS) + len(normal) + len(drifted))
        print(_indent(format_decision(drift(name, monitor, last=len(drifted), registry=reg))))
    log = InferenceLog(inference_log_url(load_serve_config(SERVE_CONFIG, name)))
    logged = log.read(name)
    log.close()
    counts = ", ".join(f"v{v}: {n}" for v, n in logged.groupby("model_version").size().items())
    print(
        f"8/8 the inference log holds {len(logged)} predictions ({counts}), each with every class probability"
    )
    print(f"""
Where to look:
  champion models show {name}      versions, aliases, metrics, data hashes
  champion history {name}          who moved which alias, when and why
  champion drift {name} --last 400 a drift check on the latest traffic (exit 0 ok, 3 drift)
  champion serve {name}            serve the champion on http://127.0.0.1:3000 (follows alias moves)
  champion predict {name} "text"   label a text with the champion
  champion ui{" " * (len(name) + 16)}the MLflow UI on {tracking_uri()} (experiment champion-monitoring)
  state lives in {home}""")
    reg.close()


def _send(client, texts: list[str]) -> None:
    for i in range(0, len(texts), 16):
        client.predict(texts[i : i + 16])


def _wait_logged(name: str, count: int, timeout: float = 30.0) -> None:
    """The server writes its log in batches off the request path; wait until this traffic is in it."""
    import time

    from serving.config import default_log_url
    from serving.inference_log import InferenceLog

    log = InferenceLog(default_log_url())
    deadline = time.monotonic() + timeout
    try:
        while len(log.read(name, with_feedback=False)) < count and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        log.engine.dispose()


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())
