"""The Evidently report of a drift check (HTML and JSON), and its logging to MLflow against the version.

Evidently 0.7's `Report` draws the columns side by side with their drift scores. It never gets the
embeddings: its EmbeddingsDrift always fits a t-SNE for the plot, 45 of 46 seconds on 2,000 rows (see
../shared/docs/MONITORING.md); the embedding check's numbers are in `decision.json` instead.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from champion.repair import process_tags
from monitoring.drift import NOT_COMPUTABLE, DriftDecision, Window
from monitoring.reference import Reference

if TYPE_CHECKING:
    import pandas as pd

REPORT_ROWS = 5000  # rows per side in the report; the decision itself uses the whole window


def _frames(window: Window, ref: Reference) -> tuple[pd.DataFrame, pd.DataFrame]:
    import pandas as pd

    rng = np.random.default_rng(0)
    idx = window.sample_index if window.sample_index is not None else np.arange(len(window.texts))
    if len(idx) > REPORT_ROWS:
        idx = np.sort(rng.choice(idx, REPORT_ROWS, replace=False))
    current = pd.DataFrame(
        {
            "text": window.texts[idx],
            "pred_label": window.pred_labels[idx],
            "confidence": window.confidence[idx],
        }
    )
    if window.tokens is not None and window.sample_index is not None:
        position = {row: i for i, row in enumerate(window.sample_index)}
        current["tokens"] = window.tokens[[position[i] for i in idx]].astype(float)
    reference = ref.rows.rename(columns={"label": "true_label"})
    if len(reference) > REPORT_ROWS:
        reference = reference.sample(REPORT_ROWS, random_state=0)
    reference = reference.assign(tokens=reference["tokens"].astype(float))
    columns = [c for c in ("text", "pred_label", "confidence", "tokens") if c in current]
    return current[columns].reset_index(drop=True), reference[columns].reset_index(drop=True)


def build_report(decision: DriftDecision, window: Window, ref: Reference):
    """An Evidently snapshot with one ValueDrift per column, at the thresholds the decision used."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    current, reference = _frames(window, ref)
    checks = {c.name: c for c in decision.checks}
    metrics = []
    text = checks.get("text_content")
    if text is not None and text.status != NOT_COMPUTABLE and text.threshold is not None:
        metrics.append(ValueDrift(column="text", method="abs_text_content_drift", threshold=text.threshold))
    else:  # Evidently's vectorizer raises on this window's vocabulary: leave the text column out
        current, reference = current.drop(columns="text"), reference.drop(columns="text")
    metrics.append(
        ValueDrift(
            column="pred_label", method="jensenshannon", threshold=_threshold(checks, "prediction", 0.1)
        )
    )
    metrics.append(
        ValueDrift(column="confidence", method="wasserstein", threshold=_threshold(checks, "confidence", 0.1))
    )
    numerical = ["confidence"]
    if "tokens" in current:
        metrics.append(
            ValueDrift(
                column="tokens", method="wasserstein", threshold=_threshold(checks, "text_length", 0.1)
            )
        )
        numerical.append("tokens")
    definition = DataDefinition(
        text_columns=["text"] if "text" in current else [],
        categorical_columns=["pred_label"],
        numerical_columns=numerical,
    )
    report = Report(metrics, include_tests=True)
    return report.run(
        Dataset.from_pandas(current, data_definition=definition),  # current first, reference second
        Dataset.from_pandas(reference, data_definition=definition),
    )


def build_lm_report(decision: DriftDecision, window: pd.DataFrame, ref):
    """The same for a text-generation model's window (`monitoring.lm_drift.window_features`) and reference:
    prompt and answer token counts, the answers' mean log-probability, whether each is JSON, its intent."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    checks = {c.name: c for c in decision.checks}
    columns = {"prompt_tokens": ("prompt_length", "wasserstein"),
               "completion_tokens": ("answer_length", "wasserstein"),
               "logprob": ("answer_logprob", "wasserstein"), "intent": ("intent_mix", "jensenshannon"),
               "valid_json": ("valid_json", "jensenshannon")}  # fmt: skip

    def frame(rows: pd.DataFrame) -> pd.DataFrame:
        out = rows[list(columns)].copy()
        out["valid_json"] = out["valid_json"].map({True: "json", False: "not json"})
        out["intent"] = out["intent"].replace("", "(none)")
        return out.head(REPORT_ROWS).reset_index(drop=True)

    metrics = [ValueDrift(column=c, method=method, threshold=_threshold(checks, check, 0.1))
               for c, (check, method) in columns.items()]  # fmt: skip
    definition = DataDefinition(
        categorical_columns=["intent", "valid_json"],
        numerical_columns=["prompt_tokens", "completion_tokens", "logprob"],
    )
    report = Report(metrics, include_tests=True)
    return report.run(
        Dataset.from_pandas(frame(window), data_definition=definition),
        Dataset.from_pandas(frame(ref.rows), data_definition=definition),
    )


def _threshold(checks, name: str, default: float) -> float:
    check = checks.get(name)
    return float(check.threshold) if check is not None and check.threshold is not None else default


def write_report(decision: DriftDecision, window, ref, folder: Path, build=None) -> Path:
    """drift.html and drift.json (Evidently) and decision.json (ours) in `folder`; `build` makes the report
    (`build_report`, or `build_lm_report` for a text-generation model)."""
    folder.mkdir(parents=True, exist_ok=True)
    snapshot = (build or build_report)(decision, window, ref)
    snapshot.save_html(str(folder / "drift.html"))
    snapshot.save_json(str(folder / "drift.json"))
    (folder / "decision.json").write_text(json.dumps(decision.to_dict(), indent=2, default=str))
    return folder


def log_report(
    decision: DriftDecision, window, ref, experiment: str, folder: Path | None = None, build=None
) -> str:
    """One MLflow run in `experiment` with the report, the statistics as metrics, and tags; returns its id."""
    import mlflow

    from champion import tracking

    experiment_id = tracking.ensure_experiment(experiment)
    tags = {
        "model": decision.model,
        "version": decision.version,
        "status": decision.status,
        "kind": "drift_check",
        **{
            f"window.{k}": str(v)
            for k, v in decision.window.items()
            if k in ("since", "until", "last", "source")
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = write_report(decision, window, ref, folder or Path(tmp), build)
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"drift-{decision.model}-v{decision.version}",
            tags=process_tags(),
        ) as run:
            mlflow.set_tags(tags)
            metrics = {"rows": decision.rows}
            for c in decision.checks:
                if c.value is not None:
                    metrics[f"{c.name}.value"] = c.value
                if c.threshold is not None:
                    metrics[f"{c.name}.threshold"] = c.threshold
            mlflow.log_metrics(metrics)
            mlflow.log_artifacts(str(out), "drift")
    return run.info.run_id
