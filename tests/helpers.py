"""Small helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

FAKE_MODEL = Path("/tmp/champion-test-model")


def fake_model_folder(folder: Path = FAKE_MODEL) -> Path:
    """A folder shaped like a transformers-flavour MLflow model (safe files only), without real weights."""
    if not (folder / "MLmodel").exists():
        (folder / "model").mkdir(parents=True, exist_ok=True)
        (folder / "model" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        (folder / "model" / "config.json").write_text("{}")
        (folder / "MLmodel").write_text(
            "flavors:\n  python_function: {loader_module: mlflow.transformers}\n"
            "  transformers: {model_binary: model}\n"
        )
    return folder


def make_versions(
    reg, name: str, scores: list[float | None], source: str = f"file://{FAKE_MODEL}"
) -> list[str]:
    """Register `name` with one version per score (tagged metric.val_macro_f1), without training anything."""
    from champion.safety import DIGEST_TAG, files_digest

    digest = files_digest(fake_model_folder())  # as registration records it: promote checks the files
    reg.client.create_registered_model(name)
    versions = []
    for score in scores:
        tags = {"data_sha256": "d" * 64, DIGEST_TAG: digest}
        if score is not None:
            tags["metric.val_macro_f1"] = str(score)
        versions.append(str(reg.client.create_model_version(name, source=source, tags=tags).version))
    return versions


@contextmanager
def http_process(
    command: Callable[[int], list[str]],
    log: Path,
    timeout: float = 120,
    ready: str = "/health",
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Start `command(port)` on a free loopback port, wait until GET `ready` answers 200, yield the base URL.

    Output goes to `log` (a pipe nobody reads would fill up and stall the server); the whole process
    group is stopped afterwards.
    """
    proc, url = launch_http(command, log, timeout, ready, env)
    try:
        yield url
    finally:
        stop_process_group(proc)


def launch_http(
    command: Callable[[int], list[str]],
    log: Path,
    timeout: float = 120,
    ready: str = "/health",
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start `command(port)` (a free port unless given) in its own session; return it once `ready` is 200."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command(port), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}{ready}", timeout=2) as response:
                    if response.status == 200:
                        return proc, url
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{command(port)[:4]} did not answer {ready}:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.5)
    except BaseException:
        stop_process_group(proc)
        raise


def stop_process_group(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM the whole group (graceful shutdown), SIGKILL it if it is still there after `timeout`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return proc.wait()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def register_tiny_versions(
    reg, model_dir: Path, labels: list[str], count: int, name: str = "tiny-intents"
) -> list[str]:
    """Register `count` versions of the tiny model, each with its own random head, without training.

    Version i is tagged metric.val_macro_f1 = 0.5 + i/100 (each later one "better") and leans towards
    label i, so versions disagree (random heads on a random encoder would all answer alike). The last
    version is challenger.
    """
    import mlflow
    import torch

    from champion.registry import CHALLENGER, register_version
    from champion.tracking import ensure_experiment, log_classifier
    from pipelines.model import load_classifier, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    mlflow.set_experiment(experiment_id=ensure_experiment("tests"))
    versions = []
    for i in range(count):
        torch.manual_seed(100 + i)
        model = load_classifier(str(model_dir), labels).eval()
        with torch.no_grad():
            model.classifier.bias[i % len(labels)] += 3.0
        with mlflow.start_run(run_name=f"tiny-{i}"):
            mlflow.log_param("model.max_length", 32)
            info = log_classifier(model, tokenizer, ["where is my order"])
        tags = {"metric.val_macro_f1": str(0.5 + i / 100), "data_sha256": "d" * 64}
        versions.append(register_version(reg, name, info.model_uri, tags, CHALLENGER, "test version"))
    return versions


def crash_child(env: dict[str, str], point: str, op: str, args: dict) -> None:
    """Run one registry operation with CHAMPION_CRASH_AT=point, in a forked child (test_crash_safety)."""
    os.environ.update(env)
    os.environ["CHAMPION_CRASH_AT"] = point
    from champion.registry import assign_alias, connect, promote, register_version, rollback

    reg = connect()
    if op == "promote":
        promote(reg, args["name"], args["version"], reason="crash test", force=True)
    elif op == "rollback":
        rollback(reg, args["name"], reason="crash test")
    elif op == "assign":
        assign_alias(reg, args["name"], "challenger", args["version"], reason="crash test")
    elif op == "register":
        register_version(reg, args["name"], args["uri"], {}, "challenger", reason="crash test")
    elif op == "finetune":
        from conftest import tiny_finetune_config

        from pipelines.finetune import finetune

        one_epoch = {"epochs": 1, "batch_size": 16, "learning_rate": 5e-3, "device": "cpu", "progress": False}
        finetune(tiny_finetune_config(Path(args["data"]), Path(args["model"]), train=one_epoch), registry=reg)
    os._exit(0)  # the crash point was not reached
