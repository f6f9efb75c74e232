"""The drift job: pick a window, find the served version's reference, check, store, report.

`drift(...)` is what `champion drift` and the scheduler call; `check_drift` in `monitoring.drift` is the
pure part. Reads top to bottom: version -> reference -> window -> describe -> check -> store -> report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from champion.config import default_log_url, drift_store_url, redact_uri
from champion.errors import ChampionError
from monitoring.config import MonitorConfig
from monitoring.drift import DriftDecision, check_drift, describe_window, window_from_frame
from monitoring.store import PERFORMANCE_CHECKS

if TYPE_CHECKING:
    import pandas as pd

    from monitoring.store import AlarmState

EXIT_CODES = {"ok": 0, "drift": 3, "insufficient_data": 4}  # 2 is bad input, as for every command
ALARM_NOTES = {  # what each alarm means, printed beside its state
    "performance": f"By default it starts the scheduled retrain ({', '.join(PERFORMANCE_CHECKS)}).",
    "input": "The inputs changed; alone that starts no retrain unless the retrain job opts in (alarm: any).",
}


@dataclass
class DriftRun:
    decision: DriftDecision
    alarm: AlarmState | None
    check_id: int | None
    report_run_id: str | None
    report_dir: Path | None
    alarms: dict[str, AlarmState] = field(default_factory=dict)  # performance, input, any (= `alarm`)


def drift(
    name: str,
    cfg: MonitorConfig | None = None,
    *,
    version: str | None = None,
    last: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    arms: list[str] | None = None,
    file: str | Path | None = None,
    report_dir: Path | None = None,
    log_url: str | None = None,
    registry=None,
    store: bool = True,
) -> DriftRun:
    from champion.registry import CHAMPION, connect
    from monitoring.reference import load_reference
    from serving.model import load_version

    cfg = cfg or MonitorConfig()
    if last is not None and last < 1:
        raise ChampionError(f"--last: {last} is not a window; give a number of rows of at least 1.")
    if file is not None and (last is not None or since is not None):
        raise ChampionError("--file: a file is the window itself; drop --last and --since.")
    reg = registry or connect()
    version = str(version) if version is not None else _alias(reg, name, CHAMPION)
    if _is_generation(reg, name, version):
        if file is not None:
            raise ChampionError(
                "--file: a text-generation model's drift is read from its inference log; drop --file."
            )
        decision, features, lm_ref = _generation_window(
            reg, name, version, cfg, last, since, until, arms, log_url
        )
        report_run_id = None
        if len(features) and (cfg.report.mlflow or report_dir is not None):
            from monitoring.report import build_lm_report, log_report, write_report

            if cfg.report.mlflow:
                report_run_id = log_report(
                    decision, features, lm_ref, cfg.report.experiment, report_dir, build_lm_report
                )
            else:
                write_report(decision, features, lm_ref, report_dir, build_lm_report)
        return _stored(decision, report_run_id, report_dir, cfg, log_url, "log", store)
    ref = load_reference(reg, name, version)  # before any work: a version without one is a clear error
    model = load_version(reg.client, name, version)

    if file is not None:
        frame, about = _score_file(model, Path(file))
    else:
        frame, about = read_log(name, version, last, since, until, arms, log_url)
    frame, dropped = clean_window(frame)
    about["dropped_rows"] = dropped
    if len(frame) > cfg.max_rows:
        frame = frame.sample(cfg.max_rows, random_state=cfg.calibration.seed).sort_index()
        about["sampled_rows"] = cfg.max_rows
    window = window_from_frame(frame)
    window.sampled_from = about.get("rows_in_window", len(frame))
    if len(frame):
        if "embeddings" in frame.attrs:  # a file scored just now: reuse its forward pass, do not run another
            window.embeddings = frame.attrs["embeddings"][: cfg.checks.embedding.sample_rows]
        window = describe_window(window, model, cfg, cfg.calibration.seed)
    decision = check_drift(window, ref, cfg, model=name, version=version, **about)

    report_run_id = None
    if cfg.report.mlflow and len(frame):
        from monitoring.report import log_report

        report_run_id = log_report(decision, window, ref, cfg.report.experiment, report_dir)
    elif report_dir is not None and len(frame):
        from monitoring.report import write_report

        write_report(decision, window, ref, report_dir)
    return _stored(
        decision, report_run_id, report_dir, cfg, log_url, "file" if file is not None else "log", store
    )


def _stored(
    decision, report_run_id, report_dir, cfg: MonitorConfig, log_url, source: str, store: bool
) -> DriftRun:
    """Record the decision in the drift store (unless `store` is False) and read the alarms after it. A file's
    check is kept apart: only windows of the log (what production saw) move the alarm."""
    check_id, alarms = None, {}
    if store:
        from monitoring.store import DriftStore

        drift_store = DriftStore(drift_store_url(cfg.store_url, log_url))
        try:
            check_id = drift_store.record(decision, report_run_id, source=source)
            alarms = drift_store.alarm_states(decision.model, decision.version, cfg.alarm.k, cfg.alarm.n)
        finally:
            drift_store.close()
    return DriftRun(decision, alarms.get("any"), check_id, report_run_id, report_dir, alarms)


def _is_generation(reg, name: str, version: str) -> bool:
    from champion.registry import TASK_TAG, TEXT_GENERATION

    return reg.client.get_model_version(name, str(version)).tags.get(TASK_TAG) == TEXT_GENERATION


def _generation_window(reg, name, version, cfg: MonitorConfig, last, since, until, arms, log_url):
    """(the decision, the window's features, the reference) for a text-generation version's logged answers."""
    from monitoring.lm_drift import check_generation_drift, load_lm_reference, window_features

    lm_ref = load_lm_reference(reg, name, version)  # before reading the log: a missing reference is clear
    frame, about = read_log(name, version, last, since, until, arms, log_url, generated=True)
    features, partial = window_features(frame)
    about["partial_answers"] = partial  # cancelled or failed: not what the model would have answered
    if len(features) > cfg.max_rows:
        features = features.sample(cfg.max_rows, random_state=cfg.calibration.seed).reset_index(drop=True)
        about["sampled_rows"] = cfg.max_rows
    decision = check_generation_drift(features, lm_ref, cfg, model=name, version=version, **about)
    return decision, features, lm_ref


def _alias(reg, name: str, alias: str) -> str:
    from champion.registry import served_version

    version = served_version(reg, name, alias)
    if version is None:
        raise ChampionError(f"model '{name}' has no {alias}; give --version or promote one first.")
    return version


def read_log(
    name, version, last, since, until, arms, log_url, generated: bool = False
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The window of the inference log (`log_url`, else the default one): the version's rows of `arms`
    between `since` and `until`, the `last` of them if given, and what was read (`generated`: with the
    columns of generated answers)."""
    from serving.inference_log import InferenceLog

    url = log_url or default_log_url()
    try:
        log = InferenceLog(url)
    except Exception as err:
        raise ChampionError(
            f"the inference log at {redact_uri(url)} cannot be read ({_first_line(err)}); is it up?"
        ) from None
    try:
        frame = log.read(
            name,
            since=since,
            until=until,
            arms=arms or ["champion", "canary", "challenger"],
            generated=generated,
        )
    except Exception as err:
        raise ChampionError(
            f"the inference log at {redact_uri(url)} cannot be read ({_first_line(err)}); is it up?"
        ) from None
    finally:
        log.engine.dispose()
    versions = frame["model_version"].value_counts().to_dict() if len(frame) else {}
    frame = frame[frame["model_version"] == str(version)]
    if last is not None:
        frame = frame.tail(last)
    about = {
        "source": "inference_log",
        "last": last,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "other_versions": {v: n for v, n in versions.items() if v != str(version)},
        "rows_in_window": len(frame),
    }
    if len(frame):
        about["first_at"], about["last_at"] = str(frame["at"].iloc[0]), str(frame["at"].iloc[-1])
    return frame.reset_index(drop=True), about


def _score_file(model, path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A file of texts (and optionally true labels) scored by the version, as the server would."""
    import pandas as pd

    from champion.tables import read_table

    raw = read_table(str(path), "auto", "train", "--file")
    if "text" not in raw.columns:
        columns = ", ".join(map(str, raw.columns)) or "none"
        raise ChampionError(
            f"--file: '{path}' has no 'text' column (columns: {columns}); name the column text."
        )
    texts = raw["text"]
    keep = texts.notna() & texts.astype(str).str.strip().ne("")
    raw = raw[keep].reset_index(drop=True)
    seen = model.describe(list(raw["text"].astype(str))) if len(raw) else None
    frame = pd.DataFrame({"text": raw["text"].astype(str)})
    if seen is not None:
        best = seen["probs"].argmax(axis=1)
        frame["label"] = [model.labels[i] for i in best]
        frame["score"] = seen["probs"][np.arange(len(best)), best]
    else:
        frame["label"], frame["score"] = pd.Series(dtype=str), pd.Series(dtype=float)
    if "label" in raw.columns:
        frame["true_label"] = (
            raw["label"]
            .where(raw["label"].notna(), None)
            .map(lambda v: None if v is None else str(v).strip() or None)
        )
    if seen is not None:
        frame.attrs["embeddings"] = seen["embeddings"]
    return frame, {
        "source": "file",
        "file": str(path),
        "rows_in_window": len(frame),
        "dropped_blank": int((~keep).sum()),
    }


def clean_window(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop rows that cannot be judged (no text, no prediction, no confidence); returns how many went."""
    if frame.empty:
        return frame, 0
    ok = frame["text"].notna() & frame["text"].astype(str).str.strip().ne("")
    ok &= frame["label"].notna() & np.isfinite(frame["score"].astype(float))
    embeddings = frame.attrs.get("embeddings")
    out = frame[ok].reset_index(drop=True)
    if embeddings is not None:
        out.attrs["embeddings"] = embeddings[ok.to_numpy()]
    return out, int((~ok).sum())


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def format_decision(run: DriftRun) -> str:
    """What `champion drift` prints: the verdict, each check in one line, the alarm state."""
    d = run.decision
    lines = [f"{d.model} v{d.version}: {d.status.upper()} on {d.rows} rows. {d.reason}"]
    for c in d.checks:
        value = "-" if c.value is None else f"{c.value:.4g}"
        threshold = "-" if c.threshold is None else f"{c.threshold:.4g}"
        mark = "DRIFT" if c.drifted else c.status
        lines.append(f"  {c.name:<19} {c.statistic:<26} {value:>9} / {threshold:<9} {mark:<17} rows={c.rows}")
    if run.alarm is not None:
        lines.append(run.alarm.reason)
        for kind, what in ALARM_NOTES.items():
            if kind in run.alarms:
                lines.append(f"  {run.alarms[kind].reason} {what}")
        if d.window.get("source") == "file":
            lines.append("(a check of a file: stored apart, it never counts toward the alarm)")
    if run.report_run_id:
        lines.append(f"report: MLflow run {run.report_run_id} (artifacts drift/drift.html)")
    return "\n".join(lines)
