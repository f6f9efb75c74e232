"""Serving benchmark on CPU (not a test). Every figure is measured in this run, on one registered version.

Registers all-MiniLM-L6-v2 with a fresh 19-intent head (three versions, no training: serving speed does not
depend on the weights) in a scratch CHAMPION_HOME, then measures, one server at a time:

1. Ceiling: the raw model forward in one process (`serving.model.load_version`, then `predict_proba`) at
   several batch sizes; its best texts/s is what any server on this machine could at most reach.
2. Ours: `champion serve NAME --config <configs/serve_cpu.yaml with the port set>` (a real `bentoml serve`
   on 127.0.0.1), POST /predict with one support ticket per request.
3. Baseline: `mlflow models serve -m models:/NAME/1 --env-manager local --workers 1` of the same version,
   POST /invocations with `{"inputs": [text]}`.
4. Swaps under load: 16 clients on our service while the champion alias moves 5 times and rolls back once;
   the time from each move to the first answer from the new version, and the requests that failed.
5. Batching: our service at the highest client count with other `batching.max_batch_size` values.

Load: closed-loop clients (the next request goes when the previous one is answered) on keep-alive
connections, all in one asyncio process (aiohttp on uvloop), with a warm-up before each measured period.
Every server and the ceiling process run with pinned torch/OpenMP/MKL threads. CPU use of the load
generator, the server and the whole machine is recorded per level, so other load on the machine shows.
Results are appended to benchmarks/results/serving_cpu.json (every run kept). Run:

    .venv/bin/python -m benchmarks.serving                      # everything, about 10 minutes on 2 cores
    .venv/bin/python -m benchmarks.serving --seconds 3 --skip-mlflow --skip-swap   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, child_json, code_state, machine, module_command

RESULTS = ROOT / "benchmarks" / "results"
SERVE_CONFIG = ROOT / "configs" / "serve_cpu.yaml"
CODE = ("serving", "configs/serve_cpu.yaml")  # what this benchmark measures
NAME = "bench-intents"
VERSIONS = 3
SWAP_CLIENTS = 16
SWAP_STEPS = [  # (action, version, force): 5 moves and 1 rollback; v1 is champion before the first
    ("promote", "2", False),
    ("promote", "3", False),
    ("rollback", "2", False),
    ("promote", "3", False),
    ("promote", "1", True),
    ("promote", "2", False),
]
TICKS = os.sysconf("SC_CLK_TCK")


# --- the registry: three versions of MiniLM with a classification head --------------------------------


def register_versions(count: int) -> list[str]:
    """Log the packaged MiniLM with `count` random 19-intent heads and register them; v1 becomes champion."""
    import mlflow
    import torch

    from champion.registry import CHALLENGER, connect, promote, register_version
    from champion.tracking import ensure_experiment, log_classifier
    from pipelines.model import load_classifier, load_tokenizer, resolve_base_model
    from pipelines.ticketgen import INTENTS

    base, labels = resolve_base_model("all-MiniLM-L6-v2"), list(INTENTS)
    reg = connect()
    tokenizer = load_tokenizer(base)
    mlflow.set_experiment(experiment_id=ensure_experiment("benchmark-serving"))
    versions = []
    for i in range(count):
        torch.manual_seed(100 + i)
        model = load_classifier(base, labels).eval()
        with torch.no_grad():
            model.classifier.bias[i % len(labels)] += 3.0  # versions answer differently, as in the tests
        with mlflow.start_run(run_name=f"bench-{i}"):
            mlflow.log_param("model.max_length", 128)  # the training default; served with the same cap
            info = log_classifier(model, tokenizer, ["where is my order"])
        tags = {"metric.val_macro_f1": str(0.5 + i / 100), "data_sha256": "d" * 64}
        versions.append(register_version(reg, NAME, info.model_uri, tags, CHALLENGER, "benchmark version"))
    promote(reg, NAME, versions[0], reason="benchmark champion")
    reg.close()
    return versions


IN_FLIGHT: dict[str, int | None] = {"value": None}  # --in-flight, for ours_config
SERVE_SET: list[str] = []  # --set key=value on our service's config, for ours_config


def compress_v1(to: str) -> dict[str, Any]:
    """`champion compress` of v1 (judged on generated tickets; the random head's agreement is reported, not
    gated), promoted to champion with --force. `student-onnx-int8` first cuts v1 to the 3-layer student that
    `champion distil` starts from (layers 0, 2, 4, weights copied; not trained further here: its speed does
    not depend on its weights, its quality is what benchmarks.compress measures on banking77), registers it
    as v1's student and compresses that."""
    from champion.registry import connect, promote
    from pipelines.compress import CompressConfig, compress
    from pipelines.ticketgen import write_tickets

    reg = connect()
    data = write_tickets(Path(os.environ["CHAMPION_HOME"]) / "tickets.csv", 600, seed=11)
    source = _cut_student_of_v1(reg) if to == "student-onnx-int8" else "1"
    fmt = to.removeprefix("student-")
    cfg = CompressConfig(to=fmt, data=str(data), budget={"min_rows": 1, "min_agreement": 0.01})
    result = compress(NAME, source, cfg, reg)
    promote(reg, NAME, result.version, reason=f"benchmark: serve the {to} copy", force=True)
    reg.close()
    m = result.measured
    return {"version": result.version, "format": fmt, "variant": to, "source_version": source,
            "agreement_with_source": m["agreement"], "in_process_speedup_batch": m["speedup_batch"],
            "in_process_speedup_single": m["speedup_single"]}  # fmt: skip


def _cut_student_of_v1(reg) -> str:
    import mlflow

    from champion.formats import FORMAT_TAG, SOURCE_TAG, VARIANT_TAG
    from champion.registry import CHALLENGER, register_version
    from champion.tracking import ensure_experiment, log_classifier
    from pipelines.distil import StudentConfig, build_student
    from serving.model import load_version

    teacher = load_version(reg.client, NAME, "1", device="cpu")
    student = build_student(teacher, StudentConfig(keep_layers=[0, 2, 4]), list(teacher.labels)).eval()
    mlflow.set_experiment(experiment_id=ensure_experiment("benchmark-serving"))
    with mlflow.start_run(run_name="bench-student"):
        mlflow.log_param("model.max_length", 128)
        info = log_classifier(student, teacher.tokenizer, ["where is my order"])
    tags = {
        **{
            VARIANT_TAG: "student",
            SOURCE_TAG: "1",
            FORMAT_TAG: "safetensors",
            "student_init": "layers:0,2,4",
        },
        **{"metric.val_macro_f1": "0.5", "data_sha256": "d" * 64},
    }
    return register_version(reg, NAME, info.model_uri, tags, CHALLENGER, "benchmark: v1 cut to 3 layers")


# --- the ceiling: the model forward alone, in one process ------------------------------------------------


def measure_ceiling(
    texts: list[str], batch_sizes: list[int], seconds: float, threads: int, chunk: int = 0
) -> dict:
    """texts/s of `predict_proba` on consecutive batches of `texts`, per batch size.

    With `chunk` (the config's batching.forward_chunk, which the server passes on), batches larger than
    it are measured both ways, whole and in length-sorted chunks; the ceiling is the best of all.
    """
    import torch

    from champion.registry import connect
    from serving.model import load_version

    torch.set_num_threads(threads)
    reg = connect()
    model = load_version(reg.client, NAME, "1", device="cpu")
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "max_tokens": model.max_tokens}
    levels = []
    cases = [(size, 0) for size in batch_sizes] + [(size, chunk) for size in batch_sizes if 0 < chunk < size]
    for size, chunked in cases:  # consecutive texts, as the server's batches take whatever arrives
        batches = ([texts[(k + j) % len(texts)] for j in range(size)] for k in itertools.count(0, size))
        kwargs = {"chunk": chunked} if chunked else {}
        warm_until = time.perf_counter() + min(2.0, seconds / 3)
        while time.perf_counter() < warm_until:
            model.predict_proba(next(batches), **kwargs)
        cpu0, machine0, n, took = time.process_time(), machine_busy(), 0, []
        started = time.perf_counter()
        while (now := time.perf_counter()) - started < seconds:
            model.predict_proba(next(batches), **kwargs)
            took.append(time.perf_counter() - now)
            n += size
        wall = time.perf_counter() - started
        own = (time.process_time() - cpu0) / wall
        busy = (machine_busy() - machine0) / wall
        levels.append(
            {
                "batch_size": size,
                "chunk": chunked,
                "texts_per_s": n / wall,
                "batch_ms_p50": percentile(took, 50) * 1000,
                "batch_ms_p99": percentile(took, 99) * 1000,
                "process_cpu_cores": own,
                "machine_busy_cores": busy,
                "other_load_cores": max(0.0, busy - own),
            }
        )
    out["levels"] = levels
    out["best"] = max(levels, key=lambda x: x["texts_per_s"])
    reg.close()
    return out


# --- CPU accounting from /proc -----------------------------------------------------------------------------


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy since boot (all but idle and iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / TICKS


QUIET = {"limit": 120.0}  # --quiet-wait


def _wait_for_quiet(idle_below: float = 0.3) -> float:
    """Wait (at most --quiet-wait s) until the machine uses under `idle_below` cores; returns its use."""
    deadline = time.monotonic() + QUIET["limit"]
    while True:
        before, started = machine_busy(), time.monotonic()
        time.sleep(1)
        busy = (machine_busy() - before) / (time.monotonic() - started)
        if busy < idle_below or time.monotonic() > deadline:
            if busy >= idle_below:
                print(f"  (the machine stays busy: {busy:.2f} cores in use before this measurement)")
            return busy


def _processes() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, CPU seconds used so far)} for every live process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the name: state ppid ...; utime, stime are 11, 12
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def _tree(root: int, processes: dict[int, tuple[int, float]] | None = None) -> list[int]:
    """`root` and its descendants (BentoML starts its workers in sessions of their own)."""
    processes = processes if processes is not None else _processes()
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, (parent, _) in processes.items() if parent in frontier]
        found += frontier
    return [pid for pid in found if pid in processes]


def _tree_cpu(root: int) -> tuple[float, float]:
    """CPU seconds used so far by `root` and its live descendants: all threads, and main threads only.

    A server's main thread runs its event loop (HTTP, batching, serialisation); the model runs elsewhere.
    """
    processes = _processes()
    tree = _tree(root, processes)
    main = 0.0
    for pid in tree:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            main += (int(fields[11]) + int(fields[12])) / TICKS
    return sum(processes[pid][1] for pid in tree), main


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# --- servers, one at a time, each in its own process group ----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the server (graceful), SIGKILL whatever of its process tree is left after `timeout`."""
    tree = _tree(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    for pid in tree:  # workers in sessions of their own that outlived the arbiter
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def server(command: list[str], env: dict[str, str], ready: str, port: int, log: Path) -> Iterator[int]:
    """Start `command` in a new process group, wait until GET `ready` answers 200; yields its pid."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready}", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command[:6])} did not get ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield proc.pid
    finally:
        _stop(proc)


def server_env(home: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "CHAMPION_HOME": str(home),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "CHAMPION_FEEDBACK_KEY": "benchmark-key",
            # `mlflow models serve` runs `uvicorn` from PATH: the venv's, as an activated venv would
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    for var in ("MLFLOW_TRACKING_URI", "CHAMPION_AUDIT_URL", "CHAMPION_INFERENCE_LOG_URL"):
        env.pop(var, None)
    return env


def _shipped_config() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(SERVE_CONFIG.read_text())


def ours_config(home: Path, port: int, max_batch_size: int | None) -> tuple[Path, dict]:
    """configs/serve_cpu.yaml with only the port (and, when tuning, the batch cap) changed."""
    import yaml

    data = _shipped_config()
    data["port"] = port
    if max_batch_size is not None:
        data["batching"]["max_batch_size"] = max_batch_size
    if IN_FLIGHT["value"] is not None:
        data["batching"]["in_flight"] = IN_FLIGHT["value"]
    if SERVE_SET:
        from champion.config import apply_overrides

        data = apply_overrides(data, SERVE_SET)
    path = home / f"serve-{port}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, data


def ours_command(config: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "champion_cli", "serve", NAME, "--config", str(config), "--port", str(port)]


def _ours_target(port: int, bodies: list[bytes]) -> Target:
    base = f"http://127.0.0.1:{port}"
    return Target(f"{base}/predict", bodies, "X-Model-Version", f"{base}/metrics")


def _mlflow_command(port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/1", "--env-manager",
            "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip


# --- the load generator: closed-loop clients on keep-alive connections, in one event loop ----------------


@dataclass
class Target:
    """Where to send, the pre-encoded request bodies, and which response header names the version."""

    url: str
    bodies: list[bytes]
    version_header: str | None = None
    metrics_url: str | None = None  # our service's Prometheus endpoint: batch sizes and model time


@dataclass
class Load:
    """Every answered (or failed) request: when sent, when done, status (-1: exception), version."""

    sent: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    version: list[str | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, sent: float, done: float, status: int, version: str | None) -> None:
        self.sent.append(sent)
        self.done.append(done)
        self.status.append(status)
        self.version.append(version)


async def _client(session, target: Target, index: int, load: Load, stop: asyncio.Event) -> None:
    k = index * 7919  # each client walks the texts from its own place
    headers = {"Content-Type": "application/json"}
    while not stop.is_set():
        body = target.bodies[k % len(target.bodies)]
        k += 1
        sent = time.time()
        try:
            async with session.post(target.url, data=body, headers=headers) as response:
                await response.read()
                version = response.headers.get(target.version_header) if target.version_header else None
                status = response.status
        except Exception as err:  # a dropped connection or a timeout is a failed request too
            status, version, problem = -1, None, f"{type(err).__name__}: {err}"
            await asyncio.sleep(0.05)  # a server that refuses connections is not hammered in a tight loop
        else:
            problem = f"HTTP {status}"
        load.add(sent, time.time(), status, version)
        if status != 200 and len(load.errors) < 20:
            load.errors.append(problem)


@contextmanager
def _measured(server_pid: int | None) -> Iterator[dict[str, float]]:
    """CPU cores used by this process, the server's processes and the whole machine over the block."""
    out: dict[str, float] = {}
    wall0, own0, machine0 = time.time(), time.process_time(), machine_busy()
    server0 = _tree_cpu(server_pid) if server_pid else (0.0, 0.0)
    out["start"] = wall0
    yield out
    wall = time.time() - wall0
    out["end"] = wall0 + wall
    out["loadgen_cpu_cores"] = (time.process_time() - own0) / wall
    out["machine_busy_cores"] = (machine_busy() - machine0) / wall
    if server_pid:
        server1 = _tree_cpu(server_pid)
        out["server_cpu_cores"] = (server1[0] - server0[0]) / wall
        out["server_main_threads_cpu_cores"] = (server1[1] - server0[1]) / wall
    out["other_load_cores"] = max(
        0.0, out["machine_busy_cores"] - out["loadgen_cpu_cores"] - out.get("server_cpu_cores", 0.0)
    )


async def _run_load(
    target: Target,
    clients: int,
    warmup: float,
    seconds: float,
    server_pid: int | None,
    during: Callable[[Load], Awaitable[Any]] | None = None,
) -> tuple[Load, dict[str, float]]:
    """`clients` closed-loop clients: warm up, then measure for `seconds` (or while `during` runs)."""
    import aiohttp

    load, stop = Load(), asyncio.Event()
    connector = aiohttp.TCPConnector(limit=clients, keepalive_timeout=120)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(_client(session, target, i, load, stop)) for i in range(clients)]
        await asyncio.sleep(warmup)
        before = await asyncio.to_thread(_scrape, target.metrics_url) if target.metrics_url else {}
        with _measured(server_pid) as window:
            if during is None:
                await asyncio.sleep(seconds)
            else:
                window["result"] = await during(load)
        if target.metrics_url:
            window["batching"] = _batching(
                before, await asyncio.to_thread(_scrape, target.metrics_url), window
            )
        stop.set()
        await asyncio.wait(tasks, timeout=130)
    return load, window


BATCH_METRICS = ("champion_batch_size_sum", "champion_batch_size_count", "champion_model_latency_seconds_sum")


def _scrape(url: str) -> dict[str, float]:
    """Our service's batch-size and model-time totals from /metrics (summed over versions and arms)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    totals = dict.fromkeys(BATCH_METRICS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def _batching(before: dict[str, float], after: dict[str, float], window: dict[str, Any]) -> dict[str, float]:
    """What the server's batching did over the window: batch sizes, forward time, how busy the model was."""
    d = {k: after[k] - before[k] for k in BATCH_METRICS}
    batches, texts = d["champion_batch_size_count"], d["champion_batch_size_sum"]
    model_s = d["champion_model_latency_seconds_sum"]
    return {
        "batches": batches,
        "mean_batch_size": texts / batches if batches else 0.0,
        "forward_ms_per_batch": 1000 * model_s / batches if batches else 0.0,
        "model_busy_share": model_s / (window["end"] - window["start"]),
    }


def _summarise(load: Load, window: dict[str, float], clients: int) -> dict[str, Any]:
    start, end = window["start"], window["end"]
    inside = [i for i, d in enumerate(load.done) if start <= d < end]
    ok = [load.done[i] - load.sent[i] for i in inside if load.status[i] == 200]
    return {
        "clients": clients,
        "seconds": end - start,
        "requests": len(inside),
        "req_per_s": len(ok) / (end - start),
        "p50_ms": percentile(ok, 50) * 1000,
        "p90_ms": percentile(ok, 90) * 1000,
        "p99_ms": percentile(ok, 99) * 1000,
        "max_ms": max(ok, default=float("nan")) * 1000,
        "errors": sum(s != 200 for s in load.status),  # over warm-up and measurement
        "error_samples": load.errors[:5],
        **{k: v for k, v in window.items() if k.endswith("_cores") or k == "batching"},
    }


def run_levels(
    target: Target, levels: list[int], warmup: float, seconds: float, server_pid: int, label: str
) -> list[dict[str, Any]]:
    out = []
    for clients in levels:
        busy_before = _wait_for_quiet()
        load, window = asyncio.run(_run_load(target, clients, warmup, seconds, server_pid))
        row = {**_summarise(load, window, clients), "machine_busy_before_cores": busy_before}
        out.append(row)
        print(_row_text(label, row), flush=True)
        time.sleep(1)
    return out


HEADER = (
    f"{'server':14s} {'clients':>7s} {'req/s':>7s} {'p50 ms':>7s} {'p99 ms':>7s} {'errors':>6s} "
    f"{'batch':>5s} {'busy':>5s} {'cpu: server':>11s} {'loop ms/req':>11s} {'loadgen':>7s} {'other':>5s}"
)


def _row_text(label: str, r: dict[str, Any]) -> str:
    """One table row. batch, busy: our server's mean batch size and share of time in the model forward;
    loop ms/req: CPU the server's main thread (its event loop) spent per answered request."""
    b = r.get("batching")
    batch, busy = (f"{b['mean_batch_size']:5.1f}", f"{b['model_busy_share']:5.0%}") if b else ("-", "-")
    loop = 1000 * r.get("server_main_threads_cpu_cores", 0) / r["req_per_s"] if r["req_per_s"] else 0
    return (
        f"{label:14s} {r['clients']:7d} {r['req_per_s']:7.1f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} "
        f"{r['errors']:6d} {batch:>5s} {busy:>5s} {r.get('server_cpu_cores', 0):11.2f} {loop:11.2f} "
        f"{r['loadgen_cpu_cores']:7.2f} {r['other_load_cores']:5.2f}"
    )


# --- swaps under load ---------------------------------------------------------------------------------------


async def _swaps(load: Load, settle: float) -> list[dict[str, Any]]:
    """Move the champion alias per SWAP_STEPS while `load` runs; time each move to its first new answer."""
    from champion.registry import connect, promote, rollback

    reg = await asyncio.to_thread(connect)
    moves: list[dict[str, Any]] = []
    served, previous = "1", None  # the server keeps the replaced champion warm (follow.keep_previous)
    try:
        for action, version, force in SWAP_STEPS:
            await asyncio.sleep(settle)
            seen, asked = len(load.done), time.time()
            if action == "rollback":
                decision = await asyncio.to_thread(rollback, reg, NAME, "benchmark rollback")
            else:
                decision = await asyncio.to_thread(promote, reg, NAME, version, "benchmark", force=force)
            moved = time.time()  # the alias has moved by now; the server notices at its next poll
            if not decision.allowed or decision.target_version != version:
                raise RuntimeError(f"{action} v{version} refused: {decision.reason}")
            first_new = None
            while first_new is None and time.time() < moved + 120:
                await asyncio.sleep(0.05)
                new = (load.done[i] for i in range(seen, len(load.done)) if load.version[i] == version)
                first_new = next(new, None)
            await asyncio.sleep(1)  # answers already under way when the swap happened still come back
            old = [load.done[i] for i in range(seen, len(load.done)) if load.version[i] == served]
            moves.append(
                {
                    "action": action,
                    "from_version": served,
                    "to_version": version,
                    "kind": "warm swap (kept as previous)" if version == previous else "load, then swap",
                    "registry_call_s": moved - asked,
                    "to_first_new_answer_s": None if first_new is None else first_new - moved,
                    "last_old_answer_after_move_s": max(old) - moved if old else None,
                    "at": moved,
                }
            )
            took = "never" if first_new is None else f"{first_new - moved:.2f} s after the alias move"
            print(f"  {action:8s} v{served} -> v{version}: first v{version} answer {took}", flush=True)
            served, previous = version, served
        await asyncio.sleep(settle)
    finally:
        reg.close()
    return moves


def run_swaps(target: Target, server_pid: int, warmup: float, settle: float, poll: float) -> dict[str, Any]:
    """SWAP_CLIENTS clients on our service while the alias moves; swap times and failed requests."""
    _wait_for_quiet()
    load, window = asyncio.run(
        _run_load(target, SWAP_CLIENTS, warmup, 0, server_pid, during=lambda ld: _swaps(ld, settle))
    )
    moves = window.pop("result")
    for move in moves:
        move["failed_within_10s"] = sum(
            1 for d, s in zip(load.done, load.status, strict=True) if s != 200 and 0 <= d - move["at"] < 10
        )
    times = {m["kind"]: [] for m in moves}
    for m in moves:
        times[m["kind"]].append(m["to_first_new_answer_s"])
    row = _summarise(load, window, SWAP_CLIENTS)
    return {
        "clients": SWAP_CLIENTS,
        "poll_seconds": poll,
        "moves": moves,
        "max_to_first_new_answer_s": {
            k: max((t for t in v if t is not None), default=None) for k, v in times.items()
        },
        "failed_requests": row["errors"],
        "error_samples": row["error_samples"],
        "during_swaps": row,
    }


# --- the run --------------------------------------------------------------------------------------------


def _child(task: str, home: Path, threads: int, payload: dict) -> Any:
    """Run `task` in a fresh process with pinned threads and the scratch home; returns its JSON answer."""
    env = server_env(home, threads)
    request = home / f"{task}.json"  # a file: the texts are too long for a command line
    request.write_text(json.dumps(payload))
    return child_json(module_command("benchmarks.serving", "--child", task, str(request)), env, task)


def server_machine(threads: int) -> dict[str, Any]:
    """The machine, with the Python version, the torch threads pinned in each process and the load average."""
    return machine(
        python=platform.python_version(), torch_threads=threads, load_average_at_start=os.getloadavg()
    )


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    ours, base = report.get("ours", {}).get("levels", []), report.get("mlflow", {}).get("levels", [])
    out: dict[str, Any] = {}
    pairs = {r["clients"]: (r, b) for r in ours for b in base if b["clients"] == r["clients"]}
    out["vs_mlflow"] = [
        {
            "clients": c,
            "throughput_ratio": r["req_per_s"] / b["req_per_s"] if b["req_per_s"] else None,
            "p99_ratio": r["p99_ms"] / b["p99_ms"] if b["p99_ms"] else None,
            "met": bool(
                b["req_per_s"] and r["req_per_s"] >= 2 * b["req_per_s"] and r["p99_ms"] <= b["p99_ms"]
            ),
        }
        for c, (r, b) in sorted(pairs.items())
    ]
    ceiling = report.get("ceiling", {}).get("best", {}).get("texts_per_s")
    if ours and ceiling:
        best = max(ours, key=lambda r: r["req_per_s"])
        out["vs_ceiling"] = {
            "ours_best_req_per_s": best["req_per_s"],
            "at_clients": best["clients"],
            "ceiling_texts_per_s": ceiling,
            "ratio": best["req_per_s"] / ceiling,
            "met": best["req_per_s"] >= 0.75 * ceiling,
        }
    variant = report.get("ours_variant", {}).get("levels", [])
    if variant and base:
        out["variant_vs_mlflow_fp32"] = [
            {
                "clients": r["clients"],
                "throughput_ratio": r["req_per_s"] / b["req_per_s"] if b["req_per_s"] else None,
                "met": bool(b["req_per_s"] and r["req_per_s"] >= 4 * b["req_per_s"]),
            }
            for r in variant
            for b in base
            if b["clients"] == r["clients"]
        ]
    top = max(ours, key=lambda r: r["clients"], default=None)
    if top is not None:
        out["errors_at_top"] = {"clients": top["clients"], "errors": top["errors"], "met": top["errors"] == 0}
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _print_report(report: dict[str, Any]) -> None:
    print(f"\n{HEADER}")
    for key in ("ours", "ours_variant", "mlflow"):
        for r in report.get(key, {}).get("levels", []):
            print(_row_text(key, r))
    for r in report.get("tuning", []):
        print(_row_text(f"ours mbs={r['max_batch_size']}", r))
    if "ceiling" in report:
        print(f"\n{'ceiling batch':14s} {'chunk':>5s} {'texts/s':>7s} {'ms/batch':>8s} {'other':>5s}")
        for r in report["ceiling"]["levels"]:
            print(
                f"{r['batch_size']:14d} {r['chunk'] or '-':>5} {r['texts_per_s']:7.1f} "
                f"{r['batch_ms_p50']:8.1f} {r['other_load_cores']:5.2f}"
            )
    t = report["targets"]
    print()
    for v in t.get("vs_mlflow", []):
        print(
            f"ours/mlflow at {v['clients']} clients: throughput x{v['throughput_ratio']:.2f}, p99 "
            f"x{v['p99_ratio']:.2f}; target >= 2x at equal or better p99: {_met(v['met'])}"
        )
    variant_name = report.get("ours_variant", {}).get("variant") or report.get("ours_variant", {}).get(
        "format"
    )
    for v in t.get("variant_vs_mlflow_fp32", []):
        print(
            f"{variant_name} / mlflow fp32 at {v['clients']} clients: throughput "
            f"x{v['throughput_ratio']:.2f}; target >= 4x: {_met(v['met'])}"
        )
    if "vs_ceiling" in t:
        c = t["vs_ceiling"]
        print(
            f"ours/ceiling: {c['ours_best_req_per_s']:.1f} / {c['ceiling_texts_per_s']:.1f} texts/s = "
            f"{c['ratio']:.2f}; target >= 0.75: {_met(c['met'])}"
        )
    if "errors_at_top" in t:
        e = t["errors_at_top"]
        print(f"errors at {e['clients']} clients: {e['errors']}; target 0: {_met(e['met'])}")
    if "swaps" in report:
        s = report["swaps"]
        print(f"swaps under {s['clients']} clients, registry polled every {s['poll_seconds']} s:")
        for m in s["moves"]:
            took = m["to_first_new_answer_s"]
            print(
                f"  {m['action']:8s} v{m['from_version']} -> v{m['to_version']} ({m['kind']}): first "
                f"v{m['to_version']} answer "
                + ("never" if took is None else f"{took:.2f} s after the alias move")
            )
        print(f"  failed requests during the swaps: {s['failed_requests']}")


def _interrupt(signum, frame) -> None:
    """SIGTERM takes the Ctrl-C path, also inside asyncio.run (which cancels its task), so servers stop."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=15, help="measured seconds per client level")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of load before each measurement")
    parser.add_argument("--clients", default="1,8,32,64", help="concurrent client levels")
    parser.add_argument("--ceiling-batches", default="1,8,16,32,64")
    parser.add_argument(
        "--tune-batch-sizes",
        default="16,64",
        help="other batching.max_batch_size values for our service, at the highest client level ('' skips)",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=120, help="wait up to this long for other load to stop, per level"
    )
    parser.add_argument(
        "--variant",
        choices=["int8", "onnx", "onnx-int8", "student-onnx-int8"],
        help="also serve this compressed copy of v1 (champion compress), or of v1 cut to a 3-layer student, "
        "and compare it with mlflow's fp32",
    )
    parser.add_argument(
        "--in-flight", type=int, help="batching.in_flight for our service (default: the config's)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="change our service's config (e.g. access_log=false), recorded with the run",
    )  # fmt: skip
    parser.add_argument("--skip-mlflow", action="store_true")
    parser.add_argument("--skip-swap", action="store_true")
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument("--home", type=Path, help="reuse this scratch CHAMPION_HOME (registered by a run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving_cpu.json", help="results (appended)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, payload = args.child[0], json.loads(Path(args.child[1]).read_text())
        if task == "register":
            print(json.dumps(register_versions(payload["count"])))
        elif task == "compress":
            print(json.dumps(compress_v1(payload["to"])))
        else:
            print(json.dumps(measure_ceiling(**payload)))
        return

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` gets the Ctrl-C path: every server is stopped
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})  # the load generator stays light
    import uvloop

    uvloop.install()
    from pipelines.ticketgen import generate_tickets

    levels = [int(c) for c in args.clients.split(",")]
    threads = _shipped_config()["threads"]  # torch threads of the shipped config, pinned in every process
    QUIET["limit"] = args.quiet_wait
    texts = list(generate_tickets(2000, seed=7)["text"])
    home = args.home or Path(tempfile.mkdtemp(prefix="champion-bench-serving-"))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["CHAMPION_HOME"] = str(home)  # for the in-process promotions of the swap phase
    for var in ("MLFLOW_TRACKING_URI", "CHAMPION_AUDIT_URL"):
        os.environ.pop(var, None)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.serving", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": server_machine(threads),
        "code": code_state(CODE, diff=True),
        "home": str(home),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "request": "one support ticket per request (pipelines.ticketgen, seed 7, 2000 texts)",
        "load_generator": "closed-loop asyncio clients (aiohttp on uvloop), keep-alive, one process",
    }
    if not (home / "mlflow.db").exists():
        print(f"registering {VERSIONS} versions of {NAME} in {home}", flush=True)
        _child("register", home, threads, {"count": VERSIONS})

    if not args.skip_ceiling:
        print("ceiling: raw model forward in one process", flush=True)
        _wait_for_quiet()
        chunk = _shipped_config()["batching"].get("forward_chunk", 0)  # absent before chunking existed
        payload = {"texts": texts, "batch_sizes": [int(b) for b in args.ceiling_batches.split(",")],
                   "seconds": args.seconds, "threads": threads, "chunk": chunk}  # fmt: skip
        report["ceiling"] = _child("ceiling", home, threads, payload)
        for r in report["ceiling"]["levels"]:
            how = f" in chunks of {r['chunk']}" if r["chunk"] else ""
            print(f"  batch {r['batch_size']:3d}{how}: {r['texts_per_s']:7.1f} texts/s", flush=True)

    env = server_env(home, threads)
    bodies = [json.dumps({"texts": [t]}).encode() for t in texts]
    if not args.skip_mlflow:  # right before ours, so that drift in the machine's speed hits both alike
        port = free_port()
        inputs = [json.dumps({"inputs": [t]}).encode() for t in texts]
        target = Target(f"http://127.0.0.1:{port}/invocations", inputs)
        mlflow_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
        print(f"mlflow: {' '.join(_mlflow_command(port)[1:])}", flush=True)
        with server(_mlflow_command(port), mlflow_env, "/ping", port, home / "mlflow.log") as pid:
            report["mlflow"] = {
                "command": " ".join(_mlflow_command(port)),
                "code": code_state(CODE, diff=True),
                "levels": run_levels(target, levels, args.warmup, args.seconds, pid, "mlflow"),
            }

    if args.in_flight:
        IN_FLIGHT["value"] = args.in_flight
    SERVE_SET[:] = args.set
    port = free_port()
    config, data = ours_config(home, port, None)
    changed = ["port", *(s.partition("=")[0] for s in args.set)]
    report["config"] = {"file": str(SERVE_CONFIG.relative_to(ROOT)), "changed": changed, "values": data}
    ours = _ours_target(port, bodies)
    print(f"ours: {' '.join(ours_command(config, port)[1:])}", flush=True)
    with server(ours_command(config, port), env, "/readyz", port, home / "ours.log") as pid:
        report["ours"] = {
            "command": " ".join(ours_command(config, port)),
            "code": code_state(CODE, diff=True),  # per server: others may edit serving/ while a run goes on
            "levels": run_levels(ours, levels, args.warmup, args.seconds, pid, "ours"),
        }
        if not args.skip_swap:
            poll = data["follow"]["poll_seconds"]
            print(f"swaps under {SWAP_CLIENTS} clients (registry polled every {poll} s)", flush=True)
            report["swaps"] = run_swaps(ours, pid, args.warmup, max(3.0, args.seconds / 3), poll)
    if not args.skip_swap:  # serve v1 again for the rest of the run
        from champion.registry import connect, promote

        reg = connect()
        promote(reg, NAME, "1", reason="benchmark: back to v1", force=True)
        reg.close()

    if args.variant:  # the same service and config, serving a compressed copy of v1
        variant = _child("compress", home, threads, {"to": args.variant})
        port = free_port()
        config, _ = ours_config(home, port, None)
        print(f"ours serving v{variant['version']} ({args.variant} of v1)", flush=True)
        with server(ours_command(config, port), env, "/readyz", port, home / "ours-variant.log") as pid:
            report["ours_variant"] = {
                **variant,
                "code": code_state(CODE, diff=True),
                "levels": run_levels(
                    _ours_target(port, bodies), levels, args.warmup, args.seconds, pid, "variant"
                ),
            }
        from champion.registry import connect, promote

        reg = connect()
        promote(reg, NAME, "1", reason="benchmark: back to v1", force=True)
        reg.close()

    report["tuning"] = []
    for size in [int(s) for s in args.tune_batch_sizes.split(",") if s]:
        port = free_port()
        config, _ = ours_config(home, port, size)
        print(f"ours with batching.max_batch_size={size}", flush=True)
        with server(ours_command(config, port), env, "/readyz", port, home / f"ours-{size}.log") as pid:
            label = f"ours mbs={size}"
            for row in run_levels(
                _ours_target(port, bodies), [max(levels)], args.warmup, args.seconds, pid, label
            ):
                report["tuning"].append({"max_batch_size": size, "code": code_state(CODE, diff=True), **row})

    report["targets"] = _targets(report)
    report["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    previous["runs"].append(report)
    args.out.write_text(json.dumps(previous, indent=2))
    _print_report(report)
    print(f"results: {args.out} (run {len(previous['runs'])})")
    if args.home is None:  # three copies of the model; a failed run never gets here and keeps its logs
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; the servers it started have been stopped.", file=sys.stderr)
        raise SystemExit(130) from None
