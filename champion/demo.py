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


def run_demo(
    rows: int = 2400,
    epochs: int = 3,
    base: str | None = None,
    config: Path = DEMO_CONFIG,
    traffic_rows: int = 400,
) -> None:
    from champion.registry import connect, promote
    from pipelines.finetune import FinetuneConfig, finetune
    from pipelines.ticketgen import generate_tickets, write_tickets
    from serving.client import start_server
    from serving.config import inference_log_url, load_serve_config
    from serving.inference_log import InferenceLog

    home = champion_home()
    data = write_tickets(home / "data" / "tickets.csv", rows, seed=0)
    print(f"1/6 generated {rows} support tickets -> {data}")

    overrides = [f"data.source={data}", f"train.epochs={epochs}"] + ([f"model.base={base}"] if base else [])
    cfg = load_config(FinetuneConfig, config, overrides)
    print(f"2/6 fine-tuning {cfg.model.base} with {cfg.method} on {cfg.train.device} ({config.name})")
    reg = connect()
    result = finetune(cfg, registry=reg)
    name, version = result.model_name, result.version
    print(
        f"3/6 registered {name} v{version} as '{cfg.registry.alias}' "
        f"(test accuracy {result.metrics['test_accuracy']:.3f}, "
        f"macro-F1 {result.metrics['test_macro_f1']:.3f})"
    )

    decision = promote(reg, name, version, reason="demo: promote the freshly trained challenger")
    state = "promoted" if decision.allowed else "kept the current champion"
    print(f"4/6 {state}: {decision.reason}")

    traffic = generate_tickets(traffic_rows, seed=1)["text"].tolist()
    print(f"5/6 serving {name}@champion with BentoML and sending it {len(traffic)} tickets")
    with start_server(name, config=SERVE_CONFIG) as client:
        answers = client.predict(SAMPLE_TICKETS)
        for i in range(0, len(traffic), 16):
            client.predict(traffic[i : i + 16])
        status = client.reload()
        print(f"    {client.url} serves v{status['champion']} ({status['policy']} policy); answers:")
        for text, answer in zip(SAMPLE_TICKETS, answers, strict=True):
            print(f"      {answer['label']:<22} {answer['score']:.2f}  v{answer['version']}  {text}")
    log = InferenceLog(inference_log_url(load_serve_config(SERVE_CONFIG, name)))
    logged = log.read(name)
    log.close()
    counts = ", ".join(f"v{v}: {n}" for v, n in logged.groupby("model_version").size().items())
    print(f"6/6 the inference log holds {len(logged)} predictions ({counts}), each with its request id")
    print(f"""
Where to look:
  champion models show {name}      versions, aliases, metrics, data hashes
  champion history {name}          who moved which alias, when and why
  champion serve {name}            serve the champion on http://127.0.0.1:3000 (follows alias moves)
  champion predict {name} "text"   label a text with the champion
  champion ui{" " * (len(name) + 16)}the MLflow UI on {tracking_uri()}
  state lives in {home}""")
    reg.close()
