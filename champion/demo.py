"""`champion demo`: the loop end to end on generated support tickets, with embedded sqlite stores."""

from __future__ import annotations

from pathlib import Path

from champion.config import champion_home, load_config, tracking_uri

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "minilm_lora_cpu.yaml"
SAMPLE_TICKETS = [
    "hi, my parcel still hasn't shown up and the tracking hasn't moved in 5 days",
    "I was charged twice for the same order, please fix this",
    "forgot my password and the reset email never arrives",
]


def run_demo(rows: int = 2400, epochs: int = 3, base: str | None = None, config: Path = DEMO_CONFIG) -> None:
    import mlflow

    from champion.registry import connect, promote, show_model
    from pipelines.finetune import FinetuneConfig, finetune
    from pipelines.ticketgen import write_tickets

    home = champion_home()
    data = write_tickets(home / "data" / "tickets.csv", rows, seed=0)
    print(f"1/4 generated {rows} support tickets -> {data}")

    overrides = [f"data.source={data}", f"train.epochs={epochs}"] + ([f"model.base={base}"] if base else [])
    cfg = load_config(FinetuneConfig, config, overrides)
    print(f"2/4 fine-tuning {cfg.model.base} with {cfg.method} on {cfg.train.device} ({config.name})")
    reg = connect()
    result = finetune(cfg, registry=reg)
    name, version = result.model_name, result.version
    print(
        f"3/4 registered {name} v{version} as '{cfg.registry.alias}' "
        f"(test accuracy {result.metrics['test_accuracy']:.3f}, "
        f"macro-F1 {result.metrics['test_macro_f1']:.3f})"
    )

    decision = promote(reg, name, version, reason="demo: promote the freshly trained challenger")
    state = "promoted" if decision.allowed else "kept the current champion"
    print(f"4/4 {state}: {decision.reason}")

    champion = show_model(reg, name)["aliases"].get("champion")
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    predictions = model.predict(SAMPLE_TICKETS)
    print(f"\nmodels:/{name}@champion (v{champion}) answers:")
    for text, label, score in zip(SAMPLE_TICKETS, predictions["label"], predictions["score"], strict=True):
        print(f"  {label:<24} {score:.2f}  {text}")
    print(f"""
Where to look:
  champion models show {name}      versions, aliases, metrics, data hashes
  champion history {name}          who moved which alias, when and why
  champion ui                      the MLflow UI on {tracking_uri()}
  state lives in {home}""")
    reg.close()
