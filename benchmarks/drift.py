"""Drift-check benchmark (not a test). Every figure is measured in this run.

1. Detection power on ../shared/data/banking77: all-MiniLM-L6-v2 is fine-tuned (LoRA) on the train split of
   64 of the 77 intents (5,000 of their rows), with its held-out monitoring reference as in production.
   Windows of 200, 500 and 1,000 rows are then drawn, 50 of each:
   - `iid`: the known intents' train-split rows that fine-tuning left unused (never seen by the model or
     its reference, and drawn from the same distribution): the false-alarm rate;
   - `test_split`: the official test split, known intents only. It is NOT the same distribution as the
     train split: its classes are balanced (40 rows each, train: 35-187), its texts are shorter, and the
     model is less accurate on it. The run measures those differences and reports how often the monitor
     flags them, apart from the false alarms;
   - `held_out`: the 13 held-out intents; `mixed_30pct`: iid windows where 30% of the rows are held out.
   Reported: the share of windows whose decision is `drift`, overall and per check.
   Goals: >= 95% detection of held-out-intent drift at 500 rows, <= 1% false alarms per iid window.
2. Scale: inference logs of 10k, 100k and 1M rows (the model's own predictions on banking77 texts, drawn
   with replacement) in sqlite. The drift job (`monitoring.check.drift`, no MLflow report) runs on the whole
   log in a fresh process: wall time and peak memory, with its phases. Its per-column statistics (prediction,
   confidence, estimated accuracy, text length, [UNK] share, unseen texts, with their calibration) are
   timed against a plain numpy/scipy computation of the same statistics and nulls on the same arrays
   (target <= 1.5x); the embedding and text checks on their bounded samples are timed apart.
   Goal: the whole check <= 30 s at 1M rows on 2 cores.

    .venv/bin/python -m benchmarks.drift                 # everything, about 20 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.drift --windows 10 --sizes 10000   # a quick look

Results go to benchmarks/results/drift_cpu.json with the machine and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, child_json, code_state, machine, module_command

DATA = ROOT.parent / "shared" / "data" / "banking77"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "bench-banking77"
HELD_OUT_EVERY = 6  # every 6th intent (sorted) is held out: 13 of 77
TARGETS = {"detection_at_500": 0.95, "false_alarms_per_window": 0.01, "seconds_at_1m": 30.0, "ratio": 1.5}
CODE = ("monitoring", "serving", "benchmarks/drift.py")  # what this benchmark measures


# --- 1: the model, its reference, and the scored pools ------------------------------------------------------


def train(data: Path, home: Path, rows: int, epochs: int, threads: int) -> dict:
    """Fine-tune on the known intents; returns the split of intents and the registered version."""
    import pandas as pd

    from champion.registry import connect, promote
    from pipelines.finetune import FinetuneConfig, finetune

    frame = pd.read_csv(data / "train.csv")
    intents = sorted(frame["category"].unique())
    held_out = intents[::HELD_OUT_EVERY]
    known = [i for i in intents if i not in held_out]
    source = home / "train_known.csv"
    frame[frame["category"].isin(known)].to_csv(source, index=False)
    cfg = FinetuneConfig.model_validate(
        {
            "data": _data_config(source, rows),
            "model": {"base": "all-MiniLM-L6-v2", "max_length": 64},
            "method": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.1, "target_modules": ["query", "key", "value"]},
            "train": {"epochs": epochs, "batch_size": 32, "learning_rate": 2e-3, "device": "cpu",
                      "num_threads": threads, "progress": False, "seed": 0},
            "registry": {"model_name": NAME, "experiment": "benchmark-drift"},
        }
    )  # fmt: skip
    reg = connect()
    started = time.perf_counter()
    result = finetune(cfg, registry=reg)
    promote(reg, NAME, result.version, reason="drift benchmark")
    reg.close()
    return {
        "known": known, "held_out": held_out, "version": result.version,
        "train_seconds": time.perf_counter() - started, "test_accuracy": result.metrics["test_accuracy"],
    }  # fmt: skip


def _data_config(source: Path, rows: int) -> dict:
    return {"source": str(source), "label_column": "category", "max_rows": rows, "seed": 0,
            "validation_size": 0.15, "test_size": 0.15}  # fmt: skip


def unused_train_rows(home: Path, rows: int):
    """The known intents' train-split rows that fine-tuning's stratified `max_rows` cut left out."""
    from pipelines.data import DataConfig, load_labelled, stratified_cut

    cfg = DataConfig.model_validate(_data_config(home / "train_known.csv", rows))
    frame = load_labelled(cfg, cfg.source, "data.source")
    if len(frame) <= rows:
        raise SystemExit(f"--train-rows {rows} uses every known-intent row; leave some out for iid windows")
    return stratified_cut(frame, [rows / len(frame)], cfg.seed)[0]


def pool_shift(pool: dict, labels: list[str], ref) -> dict:
    """How a scored pool differs from the reference: accuracy, label mix, text length, confidence."""
    import numpy as np

    from monitoring import stats

    rows = ref.rows
    truth = np.array(labels, dtype=object)
    return {
        "rows": len(truth),
        "accuracy": float(np.mean(pool["pred"] == truth)),
        "reference_accuracy": float((rows["label"] == rows["pred_label"]).mean()),
        "true_label_mix_js": stats.js_distance(stats.label_counts(truth, ref.labels),
                                               stats.label_counts(rows["label"], ref.labels)),
        "mean_tokens": float(pool["tokens"].mean()),
        "reference_mean_tokens": float(rows["tokens"].mean()),
        "tokens_normed_wasserstein": stats.normed_wasserstein(
            pool["tokens"].astype(float), rows["tokens"].to_numpy(float), float(rows["tokens"].std(ddof=0))),
        "confidence_normed_wasserstein": stats.normed_wasserstein(
            pool["conf"], rows["confidence"].to_numpy(float), float(rows["confidence"].std(ddof=0))),
    }  # fmt: skip


def score_pool(model, texts: list[str]) -> dict:
    """Everything a Window needs, for every text, from one forward pass (as the server would run it)."""
    import numpy as np

    from monitoring.reference import fingerprint

    seen = model.describe(texts)
    best = seen["probs"].argmax(axis=1)
    return {
        "texts": np.array(texts, dtype=object),
        "pred": np.array([model.labels[i] for i in best], dtype=object),
        "conf": seen["probs"][np.arange(len(best)), best].astype(np.float64),
        "tokens": seen["tokens"],
        "unk": seen["unk_share"],
        "fp": fingerprint(texts),
        "emb": seen["embeddings"],
        "probs": seen["probs"],
    }


def _window(pool: dict, idx):
    from monitoring.drift import Window

    emb_idx = idx[:500]  # the job embeds at most checks.embedding.sample_rows rows (500)
    return Window(
        pred_labels=pool["pred"][idx], confidence=pool["conf"][idx], texts=pool["texts"][idx],
        true_labels=None,
        tokens=pool["tokens"][idx], unk_share=pool["unk"][idx], fingerprints=pool["fp"][idx],
        embeddings=pool["emb"][emb_idx], sample_index=None, sampled_from=len(idx),
    )  # fmt: skip


def detection(ref, pools: dict, sizes: list[int], windows: int, iid_windows: int, seed: int = 0) -> dict:
    """Share of windows judged `drift`, per kind and size, overall and per check."""
    import numpy as np

    from monitoring.config import MonitorConfig
    from monitoring.drift import DRIFT, check_drift

    cfg = MonitorConfig()
    rng = np.random.default_rng(seed)
    out: dict = {}
    iid, held = pools["iid"], pools["held_out"]
    for size in sizes:
        for kind in ("iid", "test_split", "held_out", "mixed_30pct"):
            fired: dict[str, int] = {}
            drifted, seconds = 0, 0.0
            count = iid_windows if kind == "iid" else windows
            for _ in range(count):
                if kind in ("iid", "test_split", "held_out"):
                    pool = pools[kind]
                    idx = rng.choice(len(pool["texts"]), size, replace=size > len(pool["texts"]))
                else:
                    n_held = round(0.3 * size)
                    pool = {k: np.concatenate([iid[k], held[k]]) for k in iid}
                    a = rng.choice(len(iid["texts"]), size - n_held, replace=False)
                    b = len(iid["texts"]) + rng.choice(len(held["texts"]), n_held, replace=False)
                    idx = rng.permutation(np.concatenate([a, b]))
                started = time.perf_counter()
                decision = check_drift(_window(pool, idx), ref, cfg)
                seconds += time.perf_counter() - started
                drifted += decision.status == DRIFT
                for c in decision.fired:
                    fired[c.name] = fired.get(c.name, 0) + 1
            out[f"{kind}@{size}"] = {
                "windows": count, "drifted": drifted, "drift_rate": drifted / count,
                "per_check": {k: v / count for k, v in sorted(fired.items())},
                "seconds_per_window": seconds / count,
            }  # fmt: skip
            print(f"  {kind:12s} {size:5d} rows: drift in {drifted}/{count} windows "
                  f"({seconds / count:.2f} s each) {fired}", flush=True)  # fmt: skip
    return out


# --- 2: scale -----------------------------------------------------------------------------------------------


def write_log(url: str, pool: dict, version: str, rows: int, seed: int = 0, first: int = 0) -> float:
    """`rows` predictions of `version` in the inference log, drawn from the scored pool; returns seconds."""
    from datetime import UTC, datetime, timedelta

    import numpy as np
    import sqlalchemy as sa

    from serving.inference_log import InferenceLog, encode_probs, predictions

    log = InferenceLog(url, retention_days=None)
    rng = np.random.default_rng(seed)
    start, started = datetime.now(UTC) - timedelta(days=1), time.perf_counter()
    blobs = [encode_probs(p) for p in pool["probs"]]
    chunk = 50_000
    with log.engine.begin() as conn:
        for base in range(0, rows, chunk):
            idx = rng.integers(0, len(pool["texts"]), min(chunk, rows - base))
            conn.execute(
                sa.insert(predictions),
                [
                    {"request_id": f"r{first + base + i}",
                     "at": start + timedelta(microseconds=first + base + i),
                     "model_name": NAME, "model_version": version, "arm": "champion",
                     "text": pool["texts"][j],
                     "label": pool["pred"][j], "score": float(pool["conf"][j]), "latency_ms": 5.0,
                     "agrees": None, "probs": blobs[j]}
                    for i, j in enumerate(idx)
                ],
            )  # fmt: skip
    log.engine.dispose()
    return time.perf_counter() - started


def run_job_child(home: Path, rows: int) -> dict:
    """The drift job on the whole log, phase by phase (what `drift()` does), in this fresh process."""
    import numpy as np

    from champion.registry import CHAMPION, connect
    from monitoring import drift as d
    from monitoring import stats
    from monitoring.check import clean_window, drift, read_log
    from monitoring.config import MonitorConfig
    from monitoring.reference import load_reference
    from serving.model import load_version

    cfg = MonitorConfig.model_validate({"report": {"mlflow": False}})
    phases: dict[str, float] = {}
    t = time.perf_counter()
    reg = connect()
    version = str(reg.client.get_registered_model(NAME).aliases[CHAMPION])
    ref = load_reference(reg, NAME, version)
    model = load_version(reg.client, NAME, version)
    phases["load_model_and_reference"] = time.perf_counter() - t

    t = time.perf_counter()
    run = drift(NAME, cfg, registry=reg, store=False)
    phases["drift_job_total"] = time.perf_counter() - t
    assert run.decision.rows == rows, run.decision.rows

    # The same again, phase by phase, with the nulls of that run already cached on `ref`... so a fresh copy.
    ref = load_reference(reg, NAME, version)
    t = time.perf_counter()
    frame, _ = read_log(NAME, version, None, None, None, None, None)
    frame, _ = clean_window(frame)
    window = d.window_from_frame(frame)
    phases["read_log"] = time.perf_counter() - t
    t = time.perf_counter()
    window = d.describe_window(window, model, cfg, 0)
    phases["describe_window (tokenise the sample, embed 500 rows)"] = time.perf_counter() - t
    level = cfg.calibration.false_alarm_rate / len(d.CALIBRATED)
    per_check = {}
    for name in d.CALIBRATED:
        t = time.perf_counter()
        d.CHECKS[name](window, ref, cfg, getattr(cfg.checks, name), level)
        per_check[name] = time.perf_counter() - t
    column_checks = [
        "prediction",
        "confidence",
        "estimated_accuracy",
        "text_length",
        "unknown_tokens",
        "unseen_texts",
    ]

    # The plain numpy/scipy computation of the same per-column statistics and nulls, on the same arrays.
    t = time.perf_counter()
    _baseline(window, ref, cfg, stats)
    baseline = time.perf_counter() - t
    ours = sum(per_check[c] for c in column_checks)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rows": rows, "phases_s": phases, "per_check_s": per_check, "column_checks_s": ours,
        "baseline_column_s": baseline, "ratio": ours / baseline, "peak_rss_mb": peak,
        "status": run.decision.status, "np": np.__version__,
    }  # fmt: skip


def _baseline(window, ref, cfg, stats) -> None:
    """Straight numpy/scipy: each statistic on the window, and its null on the same number of resampled
    windows of the same (capped) size, drawn with replacement from the reference."""
    import numpy as np
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import wasserstein_distance
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(0)
    n = min(len(window.texts), cfg.calibration.max_window_rows)
    m, resamples = len(ref), cfg.calibration.resamples
    labels = [*ref.labels, "<unseen>"]
    index = {label: i for i, label in enumerate(labels)}
    ref_codes = np.array([index.get(x, len(labels) - 1) for x in ref.rows["pred_label"]])
    codes = np.array([index.get(x, len(labels) - 1) for x in window.pred_labels])
    ref_conf = ref.rows["confidence"].to_numpy(np.float64)
    ref_tok = ref.rows["tokens"].to_numpy(np.float64)
    ref_unk = ref.rows["unk_share"].to_numpy(np.float64)
    ref_unseen = (~ref.rows["seen_in_training"].to_numpy()).astype(float)
    iso = IsotonicRegression(out_of_bounds="clip").fit(
        ref_conf, (ref.rows["label"] == ref.rows["pred_label"])
    )
    expected = iso.predict(ref_conf)
    k = len(labels)
    jensenshannon(np.bincount(codes, minlength=k), np.bincount(ref_codes, minlength=k), base=2)
    wasserstein_distance(window.confidence, ref_conf)
    wasserstein_distance(window.tokens, ref_tok)
    iso.predict(window.confidence).mean()
    window.unk_share.mean()
    np.isin(window.fingerprints, ref.train_fingerprints).mean()
    for _ in range(resamples):
        w, r = rng.integers(0, m, n), rng.integers(0, m, m)
        jensenshannon(np.bincount(ref_codes[w], minlength=k), np.bincount(ref_codes[r], minlength=k), base=2)
        wasserstein_distance(ref_conf[w], ref_conf[r])
        wasserstein_distance(ref_tok[w], ref_tok[r])
        expected[r].mean() - expected[w].mean()
        ref_unk[w].mean() - ref_unk[r].mean()
        ref_unseen[w].mean() - ref_unseen[r].mean()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.drift",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-rows", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--windows", type=int, default=50)
    parser.add_argument("--iid-windows", type=int, default=200, help="iid windows per size (false alarms)")
    parser.add_argument("--window-sizes", type=int, nargs="+", default=[200, 500, 1000])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--home", type=Path, help="reuse a scratch home (keeps the trained model)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    if args.child:
        print(json.dumps(run_job_child(Path(os.environ["CHAMPION_HOME"]), args.child)))
        return

    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    home = args.home or Path(tempfile.mkdtemp(prefix="champion-drift-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["CHAMPION_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    report: dict = {"machine": machine(), "code": code_state(CODE), "targets": TARGETS,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip

    print("1. fine-tuning on the known intents", flush=True)
    saved = home / "split.json"  # with --home, a model trained by an earlier run is reused
    if saved.exists():
        split = json.loads(saved.read_text())
    else:
        split = train(args.data, home, args.train_rows, args.epochs, args.threads)
        saved.write_text(json.dumps(split))
    print(f"   v{split['version']}: test accuracy {split['test_accuracy']:.3f} "
          f"({split['train_seconds']:.0f} s); held out: {len(split['held_out'])} intents",
          flush=True)  # fmt: skip
    report["model"] = {k: v for k, v in split.items() if k != "known"}

    from champion.registry import connect
    from monitoring.reference import load_reference
    from serving.model import load_version

    reg = connect()
    ref = load_reference(reg, NAME, split["version"])
    model = load_version(reg.client, NAME, split["version"])
    test = pd.read_csv(args.data / "test.csv")
    train_all = pd.read_csv(args.data / "train.csv")
    held_texts = pd.concat([train_all, test])
    unused = unused_train_rows(home, args.train_rows)
    test_known = test[test["category"].isin(split["known"])]
    pools = {
        "iid": score_pool(model, unused["text"].tolist()),
        "test_split": score_pool(model, test_known["text"].tolist()),
        "held_out": score_pool(
            model, held_texts[held_texts["category"].isin(split["held_out"])]["text"].tolist()
        ),
    }
    report["reference_rows"] = len(ref)
    report["pool_rows"] = {k: len(v["texts"]) for k, v in pools.items()}
    report["pool_shift"] = {
        "iid": pool_shift(pools["iid"], unused["label"].tolist(), ref),
        "test_split": pool_shift(pools["test_split"], test_known["category"].tolist(), ref),
    }
    print(f"   reference: {len(ref)} held-out rows; pools: {report['pool_rows']}", flush=True)
    for kind, shift in report["pool_shift"].items():
        print(f"   {kind}: " + ", ".join(f"{k} {v:.3f}" for k, v in shift.items()), flush=True)
    print("2. detection power", flush=True)
    report["detection"] = detection(ref, pools, args.window_sizes, args.windows, args.iid_windows)

    print("3. scale", flush=True)
    report["scale"] = []
    url = f"sqlite:///{home / 'inference.db'}"
    (home / "inference.db").unlink(missing_ok=True)
    all_pool = {
        k: __import__("numpy").concatenate([pools[p][k] for p in ("iid", "test_split", "held_out")])
        for k in pools["iid"]
    }
    written = 0
    for rows in sorted(args.sizes):
        seconds = write_log(url, all_pool, split["version"], rows - written, seed=rows, first=written)
        written = rows
        command = module_command("benchmarks.drift", "--child", str(rows), "--threads", str(args.threads))
        result = child_json(command, {**os.environ}, f"the drift job on {rows:,} rows")
        result["log_write_s"] = seconds
        report["scale"].append(result)
        line = (f"   {rows:>9,} rows: job {result['phases_s']['drift_job_total']:.1f} s, "
                f"peak {result['peak_rss_mb']:.0f} MB; column checks {result['column_checks_s']:.2f} s "
                f"vs numpy/scipy {result['baseline_column_s']:.2f} s ({result['ratio']:.2f}x)")  # fmt: skip
        print(line, flush=True)

    verdicts = _verdicts(report)
    report["verdicts"] = [{"what": w, "measured": m, "target": t, "met": ok} for w, m, t, ok in verdicts]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "drift_cpu.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print()
    for what, measured, target, ok in verdicts:
        print(f"{'met    ' if ok else 'NOT met'}  {what}: {measured:.3f} (target {target})")
    print(f"results: {out} (commit {report['code']['commit'][:7]})")


def _verdicts(report: dict) -> list[tuple[str, float, str, bool]]:
    out = []
    det = report["detection"]
    if "held_out@500" in det:
        rate = det["held_out@500"]["drift_rate"]
        out.append(("held-out-intent windows of 500 detected", rate, f">= {TARGETS['detection_at_500']}",
                    rate >= TARGETS["detection_at_500"]))  # fmt: skip
    for key, value in det.items():
        if key.startswith("iid@"):
            rate = value["drift_rate"]
            goal = TARGETS["false_alarms_per_window"]
            what = f"false alarms per iid window ({key[4:]} rows, {value['windows']} windows)"
            out.append((what, rate, f"<= {goal}", rate <= goal))
    for s in report["scale"]:
        goal = TARGETS["ratio"]
        what = f"column statistics vs numpy/scipy at {s['rows']:,} rows"
        out.append((what, s["ratio"], f"<= {goal}", s["ratio"] <= goal))
        if s["rows"] >= 1_000_000:
            total = s["phases_s"]["drift_job_total"]
            out.append(("whole drift job at 1M rows, seconds", total, f"<= {TARGETS['seconds_at_1m']}",
                        total <= TARGETS["seconds_at_1m"]))  # fmt: skip
    return out


if __name__ == "__main__":
    main()
