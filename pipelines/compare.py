"""Compare two registered versions on the same labelled rows and run the champion/challenger gate.

Reads top to bottom: labelled rows -> both versions score them -> the gate decides -> an MLflow run keeps
the numbers and the comparison plot. `champion compare NAME A B --data FILE` and the retraining loop both
call `compare`; the decision itself is the pure `champion.gate.decide_gate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from champion.errors import ChampionError
from champion.gate import GateConfig, GateDecision, decide_gate
from champion.repair import process_tags

if TYPE_CHECKING:
    import pandas as pd

GATE_EXPERIMENT = "champion-gate"


@dataclass
class Comparison:
    decision: GateDecision
    champion_version: str
    challenger_version: str
    run_id: str | None  # the MLflow evaluation run, when logged


def read_labelled_file(path: str | Path, field: str = "--data") -> pd.DataFrame:
    """A CSV, JSONL or Parquet file with `text` and `label` columns, blank rows dropped (and counted)."""
    from pipelines.data import clean_labelled, read_table

    raw = read_table(str(path), "auto", "train", field)
    missing = [c for c in ("text", "label") if c not in raw.columns]
    if missing:
        columns = ", ".join(map(str, raw.columns)) or "none"
        raise ChampionError(
            f"{field}: '{path}' has no {' or '.join(repr(c) for c in missing)} column (columns: {columns}); "
            "the gate needs a 'text' and a true 'label' for every row."
        )
    return clean_labelled(raw[["text", "label"]], field, str(path))


def holdout_sha256(frame: pd.DataFrame) -> str:
    """The holdout's identity: a sha256 of its (text, label) rows in a canonical order."""
    from pipelines.data import content_sha256

    return content_sha256(frame.sort_values(["text", "label"], kind="stable"))


def predict_labels(model, texts: list[str], batch: int = 64) -> np.ndarray:
    probs = [model.predict_proba(texts[i : i + batch], chunk=16) for i in range(0, len(texts), batch)]
    best = np.concatenate(probs).argmax(axis=1) if texts else np.zeros(0, dtype=int)
    return np.array([model.labels[i] for i in best], dtype=object)


def compare(
    reg,
    name: str,
    champion_version: str,
    challenger_version: str,
    holdout: pd.DataFrame,
    cfg: GateConfig | None = None,
    log_mlflow: bool = True,
    models: dict[str, Any] | None = None,
    **about: Any,
) -> Comparison:
    """Score `holdout` (text, label) with both versions and run the gate; `models` may hold versions
    already loaded (by version string), so a loop does not load the champion twice."""
    from serving.model import load_version

    cfg = cfg or GateConfig()
    champion_version, challenger_version = str(champion_version), str(challenger_version)
    if champion_version == challenger_version:
        raise ChampionError(f"compare: both sides are v{champion_version}; give two different versions.")
    models = dict(models or {})
    from champion.registry import model_version

    for version in (champion_version, challenger_version):  # both exist, before loading either
        if version not in models:
            model_version(reg, name, version)
    for version in (champion_version, challenger_version):
        if version not in models:
            models[version] = load_version(reg.client, name, version)
    texts = holdout["text"].tolist()
    champion_pred = predict_labels(models[champion_version], texts)
    challenger_pred = predict_labels(models[challenger_version], texts)
    decision = decide_gate(
        holdout["label"].to_numpy(dtype=object),
        champion_pred,
        challenger_pred,
        cfg,
        champion_labels=models[champion_version].labels,
        model=name,
        champion_version=champion_version,
        challenger_version=challenger_version,
        holdout_sha256=holdout_sha256(holdout),
        **about,
    )
    run_id = _log_run(decision, name, champion_version, challenger_version) if log_mlflow else None
    if run_id:
        decision.evidence["mlflow_run_id"] = run_id
    return Comparison(decision, champion_version, challenger_version, run_id)


def _log_run(decision: GateDecision, name: str, champion: str, challenger: str) -> str:
    """An MLflow run in the gate experiment holding the decision's numbers and the comparison plot."""
    import matplotlib.pyplot as plt
    import mlflow

    from champion import tracking

    ev = decision.evidence
    experiment_id = tracking.ensure_experiment(GATE_EXPERIMENT)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"gate-v{champion}-v{challenger}", tags=process_tags()
    ) as run:
        mlflow.set_tags(
            {
                "model": name,
                "champion_version": champion,
                "challenger_version": challenger,
                "promote": str(decision.promote).lower(),
                "holdout_sha256": ev.get("holdout_sha256", ""),
            }
        )
        mlflow.log_params(tracking.flatten(ev["config"], "gate."))
        mlflow.log_metrics(
            {
                "rows": ev["rows"],
                "champion_accuracy": ev["champion"]["accuracy"],
                "champion_macro_f1": ev["champion"]["macro_f1"],
                "challenger_accuracy": ev["challenger"]["accuracy"],
                "challenger_macro_f1": ev["challenger"]["macro_f1"],
                "macro_f1_delta": ev["macro_f1_delta"],
                "macro_f1_delta_low": ev["macro_f1_delta_interval"][0],
                "macro_f1_delta_high": ev["macro_f1_delta_interval"][1],
                "accuracy_delta": ev["accuracy_delta"],
                "mcnemar_p_value": ev["mcnemar"]["p_value"],
            }
            if "champion" in ev
            else {"rows": ev["rows"]}
        )
        mlflow.log_dict(decision.to_dict(), "gate/decision.json")
        if "per_class" in ev:
            fig = comparison_figure(decision, champion, challenger)
            mlflow.log_figure(fig, "gate/per_class_f1.png")
            plt.close(fig)
    return run.info.run_id


def comparison_figure(decision: GateDecision, champion: str, challenger: str):
    """Per-class F1 of both versions on the holdout, worst change first, with the verdict in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = decision.evidence
    items = sorted(ev["per_class"].items(), key=lambda kv: kv[1]["change"])
    names = [k for k, _ in items]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, max(3, 0.25 * len(names) + 1.5)))
    ax.barh(y - 0.2, [v["champion"] for _, v in items], 0.4, label=f"champion v{champion}")
    ax.barh(y + 0.2, [v["challenger"] for _, v in items], 0.4, label=f"challenger v{challenger}")
    ax.set_yticks(y, [f"{n} ({ev['per_class'][n]['rows']})" for n in names], fontsize=7)
    ax.set_xlabel("F1 on the fresh holdout (rows per class in brackets)")
    low, high = ev["macro_f1_delta_interval"]
    verdict = "PASS" if decision.promote else "REFUSED"
    ax.set_title(
        f"{verdict}: macro-F1 {ev['challenger']['macro_f1']:.3f} vs {ev['champion']['macro_f1']:.3f}, "
        f"difference {ev['macro_f1_delta']:+.3f} [{low:+.3f}, {high:+.3f}], n={ev['rows']}",
        fontsize=9,
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def format_comparison(comp: Comparison) -> str:
    """What `champion compare` prints."""
    d, ev = comp.decision, comp.decision.evidence
    lines = [f"{'PROMOTE' if d.promote else 'KEEP CHAMPION'}: {d.reason}"]
    if "champion" in ev:
        lines.append(
            f"  champion v{comp.champion_version}:   accuracy {ev['champion']['accuracy']:.4f}  "
            f"macro-F1 {ev['champion']['macro_f1']:.4f}"
        )
        lines.append(
            f"  challenger v{comp.challenger_version}: accuracy {ev['challenger']['accuracy']:.4f}  "
            f"macro-F1 {ev['challenger']['macro_f1']:.4f}"
        )
        m = ev["mcnemar"]
        lines.append(
            f"  McNemar: right only by the challenger on {m['challenger_only_right']} rows, only by the "
            f"champion on {m['champion_only_right']} (p={m['p_value']:.3g})"
        )
        worst = sorted(ev["per_class"].items(), key=lambda kv: kv[1]["change"])[:3]
        lines.append(
            "  largest per-class F1 falls: "
            + ", ".join(f"{k} {v['change']:+.3f} ({v['rows']} rows)" for k, v in worst)
        )
    lines.append(f"  holdout: {ev['rows']} rows, sha256 {ev.get('holdout_sha256', '')[:16]}")
    if comp.run_id:
        lines.append(f"  MLflow run {comp.run_id} (gate/decision.json, gate/per_class_f1.png)")
    return "\n".join(lines)
