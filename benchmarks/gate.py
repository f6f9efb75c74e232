"""Champion/challenger gate benchmark (not a test): how often `champion.gate.decide_gate` promotes a
challenger that is no better, and how often one that is better. Every figure is measured in this run.

The population is real: the official banking77 test split, restricted to the 64 intents the drift
benchmark's model was fine-tuned on (2,560 rows), with that model's predictions (all-MiniLM-L6-v2, LoRA;
trained by benchmarks.drift's `train`, or reused from `--home DIR` when DIR/split.json exists).
Challengers are built from the champion's real errors:
- `null_shuffled`: within each true class, the champion's predictions are permuted among its rows (a
  model of the very same per-class quality, wrong on different rows): population macro-F1 difference 0;
- `null_swapped`: within each true class, half of the champion's errors are corrected and as many of its
  correct rows get those wrong labels instead (per-class accuracy and F1 unchanged): difference 0;
- `better_2pt`, `better_5pt`: a random subset of the champion's errors is fixed (the true label) until
  the population macro-F1 is 0.02 / 0.05 above the champion's;
- `better_2pt_shuffled`: the same +0.02 fix applied to `null_shuffled` (a better challenger that also
  disagrees with the champion on many rows, as an independently trained model would).
For each holdout size, seeded holdouts are drawn from the population without replacement (the same rows
for every kind) and decide_gate runs with the default GateConfig (bootstrap resamples lowered, see
--resamples). Reported: the promotion rate per size and kind with its 95% Clopper-Pearson interval, how
the refusals split (interval, per-class floor), and the mean time per decision.
Goal: a no-better challenger is promoted in <= 5% of holdouts at the default margin.

    .venv/bin/python -m benchmarks.gate [--home DIR] [--holdouts 200] [--sizes 300 1000] [--loop]

With --loop it also runs the whole loop (`make demo`'s defaults, in a scratch home) and records the wall
time from the drift alarm to the service answering from the new version.

Results go to benchmarks/results/gate_cpu.json with the machine and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, child_json, code_state, machine

DATA = ROOT.parent / "shared" / "data" / "banking77"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "bench-banking77"
KINDS = ("null_shuffled", "null_swapped", "better_2pt", "better_5pt", "better_2pt_shuffled")
NULLS = ("null_shuffled", "null_swapped")
TARGET_NULL_RATE = 0.05

# --- the population: the real model's predictions on the known intents' test rows -------------------------


def model_split(args) -> dict:
    """The drift benchmark's model: reused from `--home` when its split.json exists, else trained there."""
    saved = args.home / "split.json"
    if saved.exists():
        return json.loads(saved.read_text())
    from benchmarks.drift import train

    print("   no split.json there: fine-tuning (benchmarks.drift's train)", flush=True)
    split = train(args.data, args.home, args.train_rows, args.epochs, args.threads)
    saved.write_text(json.dumps(split))
    return split


def predict_population(data: Path, split: dict) -> tuple[np.ndarray, np.ndarray]:
    """True labels and the registered model's predicted labels for the test split's known-intent rows."""
    import pandas as pd

    from champion.registry import connect
    from serving.model import load_version

    test = pd.read_csv(data / "test.csv")
    test = test[test["category"].isin(split["known"])]
    reg = connect()
    model = load_version(reg.client, NAME, split["version"])
    reg.close()
    probs = model.predict_proba(test["text"].tolist(), chunk=32)
    pred = np.array([model.labels[i] for i in probs.argmax(axis=1)], dtype=object)
    return test["category"].to_numpy(dtype=object), pred


def macro_f1(y: np.ndarray, p: np.ndarray) -> float:
    """Macro-F1 over the classes of the true labels, as the gate computes it."""
    f1 = [2 * np.sum((y == c) & (p == c)) / (np.sum(y == c) + np.sum(p == c)) for c in np.unique(y)]
    return float(np.mean(f1))


# --- the challengers ----------------------------------------------------------------------------------------


def shuffled_within_class(y: np.ndarray, p: np.ndarray, rng) -> np.ndarray:
    """The champion's predictions permuted among the rows of each true class: every class keeps its hits
    and the labels it wrongly predicts, so every per-class F1 is unchanged; the wrong rows move."""
    q = p.copy()
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        q[rows] = p[rng.permutation(rows)]
    return q


def swapped_within_class(y: np.ndarray, p: np.ndarray, rng, share: float = 0.5) -> np.ndarray:
    """In each true class, k = share of its errors are corrected and k of its correct rows take over those
    wrong labels (a swap of predictions between two rows of the class): per-class F1 is unchanged."""
    q = p.copy()
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        wrong, right = rows[p[rows] != c], rows[p[rows] == c]
        k = min(int(share * len(wrong)), len(right))
        fix, brk = rng.choice(wrong, k, replace=False), rng.choice(right, k, replace=False)
        q[fix], q[brk] = p[brk], p[fix]
    return q


def fix_errors(y: np.ndarray, p: np.ndarray, gain: float, rng) -> np.ndarray:
    """Errors of `p`, in random order, set to the true label until macro-F1 is `gain` above p's."""
    base, q = macro_f1(y, p), p.copy()
    for i in rng.permutation(np.flatnonzero(p != y)):
        q[i] = y[i]
        if macro_f1(y, q) - base >= gain:
            return q
    raise SystemExit(f"fixing every error does not gain {gain} of macro-F1")


def build_challengers(y: np.ndarray, p: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shuffled = shuffled_within_class(y, p, rng)
    return {
        "null_shuffled": shuffled,
        "null_swapped": swapped_within_class(y, p, rng),
        "better_2pt": fix_errors(y, p, 0.02, rng),
        "better_5pt": fix_errors(y, p, 0.05, rng),
        "better_2pt_shuffled": fix_errors(y, shuffled, 0.02, rng),
    }


# --- the simulation -----------------------------------------------------------------------------------------


def clopper_pearson(k: int, n: int) -> list[float]:
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return [float(ci.low), float(ci.high)]


def _refusal(reason: str) -> str:
    for start, what in (("passed", "promoted"), ("refused: the challenger", "interval"),
                        ("refused: class", "class_floor"), ("refused: McNemar", "mcnemar")):  # fmt: skip
        if reason.startswith(start):
            return what
    return "too_few_rows"


def simulate(y, p, challengers: dict, sizes: list[int], holdouts: int, cfg, seed: int) -> dict:
    """Promotion rate per holdout size and challenger kind; every kind is judged on the same holdouts."""
    from champion.gate import decide_gate

    out: dict = {}
    for size in sizes:
        rng = np.random.default_rng([seed, size])
        draws = [rng.choice(len(y), size, replace=False) for _ in range(holdouts)]
        out[str(size)] = {}
        for kind, q in challengers.items():
            outcomes: dict[str, int] = {}
            interval_passed, deltas, seconds = 0, [], 0.0
            for idx in draws:
                started = time.perf_counter()
                decision = decide_gate(y[idx], p[idx], q[idx], cfg)
                seconds += time.perf_counter() - started
                what = _refusal(decision.reason)
                outcomes[what] = outcomes.get(what, 0) + 1
                interval_passed += decision.evidence["macro_f1_delta_interval"][0] > cfg.margin
                deltas.append(decision.evidence["macro_f1_delta"])
            promoted = outcomes.get("promoted", 0)
            out[str(size)][kind] = {
                "holdouts": holdouts, "promoted": promoted, "rate": promoted / holdouts,
                "ci95_clopper_pearson": clopper_pearson(promoted, holdouts),
                "interval_test_passed": interval_passed, "outcomes": dict(sorted(outcomes.items())),
                "holdout_macro_f1_delta_mean": float(np.mean(deltas)),
                "holdout_macro_f1_delta_sd": float(np.std(deltas)),
                "seconds_per_decision": seconds / holdouts,
            }  # fmt: skip
            r = out[str(size)][kind]
            print(f"  {size:5d}  {kind:20s} {promoted:4d}/{holdouts:<4d} {r['rate']:6.3f}  "
                  f"[{r['ci95_clopper_pearson'][0]:.3f}, {r['ci95_clopper_pearson'][1]:.3f}]  "
                  f"{interval_passed / holdouts:8.3f}  {r['holdout_macro_f1_delta_mean']:+.4f} "
                  f"± {r['holdout_macro_f1_delta_sd']:.4f}  {r['seconds_per_decision']:.3f}  "
                  f"{r['outcomes']}", flush=True)  # fmt: skip
    return out


def run_loop() -> dict:
    """`champion demo` (the defaults of `make demo`) in a scratch home, in a child process so its torch and
    server do not share this one's; its summary holds the loop's timings."""
    code = "import json, os; from champion_cli.demo import run_demo; print('LOOP ' + json.dumps(run_demo()))"
    with tempfile.TemporaryDirectory(prefix="champion-gate-loop-") as home:
        env = {**os.environ, "CHAMPION_HOME": home}
        started = time.perf_counter()
        summary = child_json([sys.executable, "-c", code], env, "the demo", prefix="LOOP ")
        wall = time.perf_counter() - started
    return {**summary, "demo_wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--home", type=Path, help="reuse a scratch home (keeps the trained model)")
    parser.add_argument("--holdouts", type=int, default=200, help="holdouts drawn per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-rows", type=int, default=5000, help="only when training")
    parser.add_argument("--epochs", type=int, default=3, help="only when training")
    parser.add_argument("--loop", action="store_true", help="also time the whole loop (runs the demo)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    args.home = args.home or Path(tempfile.mkdtemp(prefix="champion-gate-bench-"))
    args.home.mkdir(parents=True, exist_ok=True)
    os.environ["CHAMPION_HOME"] = str(args.home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    from champion.gate import GateConfig

    cfg = GateConfig(resamples=args.resamples)
    report: dict = {"machine": machine(), "code": code_state(("benchmarks/gate.py", "champion/gate.py")),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    report["config"] = {
        "gate": cfg.model_dump(mode="json"),
        "gate_default_resamples": GateConfig().resamples,
        "note": f"default GateConfig except resamples={args.resamples} (for speed)",
        "holdouts": args.holdouts, "sizes": args.sizes, "seed": args.seed, "home": str(args.home),
    }  # fmt: skip

    print("1. the model and its predictions on the population", flush=True)
    split = model_split(args)
    y, p = predict_population(args.data, split)
    base_f1 = macro_f1(y, p)
    report["model"] = {
        "name": NAME, "version": split["version"], "known_intents": len(split["known"]),
        "population": "banking77 test split, known intents", "population_rows": len(y),
        "population_accuracy": float(np.mean(p == y)), "population_macro_f1": base_f1,
    }  # fmt: skip
    print(f"   v{split['version']}: {len(y)} rows, accuracy {np.mean(p == y):.4f}, "
          f"macro-F1 {base_f1:.4f}", flush=True)  # fmt: skip

    print("2. the challengers (population figures)", flush=True)
    challengers = build_challengers(y, p, args.seed)
    report["challengers"] = {}
    for kind, q in challengers.items():
        f1, acc = macro_f1(y, q), float(np.mean(q == y))
        row = {
            "population_accuracy": acc, "population_macro_f1": f1, "macro_f1_delta": f1 - base_f1,
            "accuracy_delta": acc - report["model"]["population_accuracy"],
            "rows_differing_from_champion": int(np.sum(q != p)),
        }  # fmt: skip
        report["challengers"][kind] = row
        print(f"   {kind:20s} macro-F1 delta {row['macro_f1_delta']:+.6f}, accuracy delta "
              f"{row['accuracy_delta']:+.4f}, {row['rows_differing_from_champion']} rows differ",
              flush=True)  # fmt: skip

    print(f"3. the gate on {args.holdouts} holdouts per size (resamples={args.resamples})", flush=True)
    print("   size  kind                 promoted  rate   95% CI (C-P)     interval  holdout delta"
          "       s/decision  outcomes", flush=True)  # fmt: skip
    report["rates"] = simulate(y, p, challengers, args.sizes, args.holdouts, cfg, args.seed)
    every = [r["seconds_per_decision"] for s in report["rates"].values() for r in s.values()]
    report["mean_seconds_per_decision"] = float(np.mean(every))

    verdicts = []
    for size, per_kind in report["rates"].items():
        for kind in NULLS:
            rate = per_kind[kind]["rate"]
            what = f"{kind} challenger promoted ({size} rows, {per_kind[kind]['holdouts']} holdouts)"
            verdicts.append((what, rate, f"<= {TARGET_NULL_RATE}", rate <= TARGET_NULL_RATE))
    if args.loop:
        print("4. the whole loop (`champion demo` in a scratch home): from the drift alarm to the service "
              "answering from the new version", flush=True)  # fmt: skip
        report["loop"] = run_loop()
        print(f"   {report['loop']}", flush=True)
    report["verdicts"] = [{"what": w, "measured": m, "target": t, "met": ok} for w, m, t, ok in verdicts]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "gate_cpu.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print()
    print(f"mean time per decision: {report['mean_seconds_per_decision']:.3f} s")
    for what, measured, target, ok in verdicts:
        print(f"{'met    ' if ok else 'NOT met'}  {what}: {measured:.3f} (target {target})")
    print(f"results: {out} (commit {report['code']['commit'][:7]})")


if __name__ == "__main__":
    main()
