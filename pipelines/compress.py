"""Compress a registered version: int8 in torch, ONNX, or ONNX int8, registered as a version of its own.

Reads top to bottom: source -> held-out rows -> build the variant -> load it as the service would ->
measure quality and speed against the source in the same process -> gate -> log -> register.
Run it with `champion compress NAME VERSION --to onnx-int8`, or from a notebook:

    result = compress("support-intents", "3", CompressConfig(to="onnx-int8"))

The variant is gated on its label agreement with its source (default 99 %, `budget.min_agreement`); one
outside the budget is still registered, tagged with the refusal, and `champion promote` refuses it.

A text-generation version (`champion sft`) goes to `pipelines/lm_compress.py`: int8 or a GGUF (`gguf-q8_0`),
judged on the intents its answers give.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from champion.config import StrictModel, prepare_environment
from champion.errors import ChampionError
from champion.formats import FORMAT_TAG, SOURCE_TAG, VARIANT_TAG, format_of
from champion.gate import GateDecision, VariantBudget, decide_variant
from champion.repair import process_tags

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.lm_compress import LMCompressResult
    from serving.model import LoadedModel

CANDIDATE = "candidate"  # the alias a new variant waits under until someone promotes it
COST_TAG = "cost."  # cost.cpu_seconds_per_1k, cost.per_million, cost.batch_size, ...


class CostConfig(StrictModel):
    batch_size: int = Field(32, ge=1)  # the service's batch size: cost is measured at it
    price_per_core_hour: float = Field(0.04, ge=0)  # in your currency; 0.04 is about an on-demand vCPU hour
    rows: int = Field(512, ge=32)  # texts timed per measurement
    repeats: int = Field(3, ge=1)


class CompressConfig(StrictModel):
    to: Literal["int8", "onnx", "onnx-int8", "gguf-q8_0"] = "onnx-int8"  # gguf-q8_0: text generation only
    data: str | None = None  # labelled CSV/JSONL/Parquet; default: the source's held-out reference rows
    int8_skip: list[str] = Field(
        default_factory=lambda: ["classifier"]
    )  # nn.Linear modules (by name or suffix) kept in fp32 for int8 (a causal LM keeps its lm_head)
    max_rows: int | None = Field(None, ge=1)  # text generation: held-out rows answered (generation is slow)
    threads: int | None = Field(None, ge=1)  # torch and ONNX Runtime threads; default: torch's
    budget: VariantBudget = VariantBudget()
    cost: CostConfig = CostConfig()
    promote: bool = False  # promote to champion at once if within budget and the source is the champion
    experiment: str = "champion-compress"


@dataclass
class CompressResult:
    name: str
    source_version: str
    version: str
    format: str
    decision: GateDecision
    measured: dict[str, Any] = field(default_factory=dict)
    promoted: bool = False


def compress(
    name: str, version: str, cfg: CompressConfig | None = None, registry=None
) -> CompressResult | LMCompressResult:
    """Build `cfg.to` from `name` v`version`, measure it against its source and register it (a
    text-generation version through `pipelines.lm_compress.compress_lm`)."""
    prepare_environment()
    import mlflow
    import torch

    from champion import tracking
    from champion.registry import TEXT_GENERATION, connect, model_version, promote, register_version
    from monitoring.reference import REFERENCE_TAG
    from serving.model import load_variant, load_version, task_of

    cfg = cfg or CompressConfig()
    reg = registry or connect()
    version = str(version)
    source_mv = model_version(reg, name, version)
    source_tags = dict(source_mv.tags)
    if task_of(source_tags) == TEXT_GENERATION:
        return compress_text_generation(name, version, cfg, reg)
    if cfg.to == "gguf-q8_0":
        raise ChampionError(
            f"--to gguf-q8_0 is llama.cpp's format for text-generation versions, and v{version} of '{name}' "
            "is a classifier; compress it to int8, onnx or onnx-int8."
        )
    if format_of(source_tags) != "safetensors":
        raise ChampionError(
            f"v{version} of '{name}' is already a {format_of(source_tags)} variant; compress its source "
            f"v{source_tags.get(SOURCE_TAG, '?')} (the fp32 safetensors version) instead."
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # The source, loaded as the service loads it, and the rows both are judged on.
    source = load_version(reg.client, name, version, device="cpu")
    held_out = held_out_rows(reg, name, version, cfg.data)

    with tempfile.TemporaryDirectory() as tmp:
        # Build the variant and read it back through the service's loader: what is measured is what serves.
        folder = build_variant(source, cfg.to, Path(tmp) / "model", tuple(cfg.int8_skip))
        variant = load_variant(name, "new", cfg.to, folder, source.max_tokens)
        variant.warm()
        measured = measure_pair(source, variant, held_out, cfg.cost)
        decision = decide_variant(cfg.to, measured, cfg.budget)

        experiment_id = tracking.ensure_experiment(cfg.experiment)
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=f"compress-{cfg.to}-v{version}", tags=process_tags()
        ) as run:
            mlflow.log_params(
                {
                    **tracking.flatten(cfg.model_dump(mode="json"), "compress."),
                    "model.max_length": source.max_tokens,
                    "source": f"{name}/{version}",
                }
            )
            mlflow.log_metrics(_flat_metrics(measured))
            mlflow.log_dict(decision.to_dict(), "gate/decision.json")
            lineage = {
                VARIANT_TAG: cfg.to,
                SOURCE_TAG: version,
                FORMAT_TAG: cfg.to,
                **{k: v for k, v in source_tags.items() if k.startswith(("data_sha256", "data_file_sha256"))},
                **tracking.code_version(),
                **tracking.library_versions(("torch", "onnx", "onnxruntime", "mlflow", "champion")),
            }
            mlflow.set_tags(lineage)
            model_uri = _log_variant(cfg.to, folder, run.info.run_id, source)
            reference_uri = _log_variant_reference(reg, name, version, variant)

    tags = {
        **lineage,
        "run_id": run.info.run_id,
        **({REFERENCE_TAG: reference_uri} if reference_uri else {}),
        **gate_tags(decision),
        **variant_metric_tags(source_tags, measured),
        **cost_tags(measured["variant_speed"], cfg.cost),
    }
    new_version = register_version(
        reg,
        name,
        model_uri,
        tags,
        CANDIDATE,
        reason=f"{cfg.to} variant of v{version} (run {run.info.run_id}); {decision.reason}",
        evidence={"gate": decision.evidence},
    )
    for key, value in cost_tags(measured["source_speed"], cfg.cost).items():  # measured in the same run
        reg.client.set_model_version_tag(name, version, key, value)

    promoted = False
    if cfg.promote and decision.promote:
        moved = promote(reg, name, new_version, reason=f"compress --promote: {decision.reason}")
        promoted = moved.allowed
    return CompressResult(name, version, new_version, cfg.to, decision, measured, promoted)


def compress_text_generation(name: str, version: str, cfg: CompressConfig, registry) -> LMCompressResult:
    """`compress` of a text-generation version (pipelines/lm_compress.py), from the same settings: `to` is
    gguf-q8_0 unless set, an LM's int8 keeps its output layer in fp32 whatever `int8_skip` says, and cost is
    measured at `cost.batch_size` prompts generated together (8 unless set)."""
    from pipelines.lm_compress import LMCompressConfig, compress_lm

    to = cfg.to if "to" in cfg.model_fields_set else "gguf-q8_0"  # onnx-int8, the default, is not for LMs
    if to not in ("int8", "gguf-q8_0"):
        raise ChampionError(
            f"--to {to}: v{version} of '{name}' is a text-generation version, which compresses to int8 "
            "or gguf-q8_0 (ONNX export of a generating model is not supported)."
        )
    skip = sorted({"lm_head", *(s for s in cfg.int8_skip if s != "classifier")})
    lm_cfg = LMCompressConfig(
        to=to,
        data=cfg.data,
        max_rows=cfg.max_rows,
        int8_skip=skip,
        threads=cfg.threads,
        batch_size=cfg.cost.batch_size if "batch_size" in cfg.cost.model_fields_set else 8,
        price_per_core_hour=cfg.cost.price_per_core_hour,
        budget=cfg.budget,
        promote=cfg.promote,
        experiment=cfg.experiment,
    )
    return compress_lm(name, version, lm_cfg, registry=registry)


# --- the steps ----------------------------------------------------------------------------------------


def held_out_rows(reg, name: str, version: str, data: str | None) -> pd.DataFrame:
    """Labelled rows (text, label) the variant and its source are both scored on.

    Default: the test rows of the source's monitoring reference (its held-out rows, never trained on);
    all of its held-out rows if it has no test split.
    """
    from monitoring.reference import load_reference
    from pipelines.compare import read_labelled_file

    if data is not None:
        return read_labelled_file(data, "--data")
    try:
        rows = load_reference(reg, name, version).rows
    except ChampionError as err:
        raise ChampionError(
            f"--data: v{version} of '{name}' has no held-out rows on record to judge a variant on ({err}); "
            "pass --data FILE with labelled rows it never trained on."
        ) from None
    test = rows[rows["split"] == "test"]
    chosen = test if len(test) else rows
    return chosen[["text", "label"]].reset_index(drop=True)


def build_variant(source: LoadedModel, fmt: str, folder: Path, int8_skip: tuple[str, ...] = ()) -> Path:
    """Write `source` as `fmt` into `folder` (with its tokenizer and config); returns the folder."""
    from champion.formats import export_onnx, quantize_int8, quantize_onnx, save_int8

    folder.mkdir(parents=True, exist_ok=True)
    source.tokenizer.save_pretrained(str(folder))
    if fmt == "int8":
        save_int8(quantize_int8(source.model, int8_skip), int8_skip, folder)
        return folder
    source.model.config.save_pretrained(str(folder))
    graph = export_onnx(source.model, source.tokenizer, folder / "model.onnx")
    if fmt == "onnx-int8":
        quantized = quantize_onnx(graph, folder / "model.int8.onnx")
        graph.unlink()
        quantized.rename(graph)
    return folder


def measure_pair(source: LoadedModel, variant: LoadedModel, rows: pd.DataFrame, cost: CostConfig) -> dict:
    """Quality of both on the same rows, and the speed of both timed alternately in this process."""
    from pipelines.compare import predict_labels

    texts = rows["text"].astype(str).tolist()
    truth = rows["label"].astype(str).to_numpy(dtype=object)
    source_pred = predict_labels(source, texts)
    variant_pred = predict_labels(variant, texts)
    source_speed, variant_speed = measure_speeds([source, variant], texts, cost)
    return {
        "rows": len(texts),
        "agreement": float(np.mean(source_pred == variant_pred)) if texts else 0.0,
        "source": quality(truth, source_pred),
        "variant": quality(truth, variant_pred),
        "source_speed": source_speed,
        "variant_speed": variant_speed,
        "speedup_batch": variant_speed["rows_per_s"] / source_speed["rows_per_s"],
        "speedup_single": source_speed["single_ms_p50"] / variant_speed["single_ms_p50"],
    }


def quality(truth, predicted) -> dict[str, float]:
    from pipelines.evaluate import classification_metrics

    labels = sorted(set(truth) | set(predicted))
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[t] for t in truth], dtype=int)
    p = np.array([index[t] for t in predicted], dtype=int)
    evaluation = classification_metrics(y, p, labels)
    return {"accuracy": evaluation.accuracy, "macro_f1": evaluation.macro_f1}


def measure_speeds(models: list[LoadedModel], texts: list[str], cost: CostConfig) -> list[dict[str, float]]:
    """Per model: single-text latency (p50, ms), rows/s at `cost.batch_size`, and CPU-seconds per 1,000
    predictions at that batch size (all threads of this process count). Models take turns, `cost.repeats`
    times, so a noisy neighbour slows all of them alike; medians are reported."""
    pool = (texts * (cost.rows // max(1, len(texts)) + 1))[: cost.rows] if texts else ["warm up"] * cost.rows
    singles = pool[:32]
    batches = [pool[i : i + cost.batch_size] for i in range(0, len(pool), cost.batch_size)]
    runs: list[dict[str, list[float]]] = [{"single": [], "wall": [], "cpu": []} for _ in models]
    for _ in range(cost.repeats):
        for model, run in zip(models, runs, strict=True):
            for text in singles[:4]:  # warm the shapes of this round
                model.predict_proba([text])
            for text in singles:
                started = time.perf_counter()
                model.predict_proba([text])
                run["single"].append(time.perf_counter() - started)
            wall, cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                model.predict_proba(batch)
            run["wall"].append(time.perf_counter() - wall)
            run["cpu"].append(time.process_time() - cpu)
    out = []
    for run in runs:
        wall, cpu = statistics.median(run["wall"]), statistics.median(run["cpu"])
        out.append(
            {
                "single_ms_p50": 1000 * statistics.median(run["single"]),
                "rows_per_s": len(pool) / wall,
                "cpu_seconds_per_1k": 1000 * cpu / len(pool),
                "batch_size": cost.batch_size,
            }
        )
    return out


def cost_tags(speed: dict[str, float], cost: CostConfig) -> dict[str, str]:
    """Version tags: CPU-seconds per 1,000 predictions and, at the configured price, cost per million."""
    per_million = speed["cpu_seconds_per_1k"] * 1000 / 3600 * cost.price_per_core_hour
    return {
        COST_TAG + "cpu_seconds_per_1k": f"{speed['cpu_seconds_per_1k']:.4f}",
        COST_TAG + "per_million": f"{per_million:.4f}",
        COST_TAG + "price_per_core_hour": f"{cost.price_per_core_hour:g}",
        COST_TAG + "batch_size": str(int(speed["batch_size"])),
        COST_TAG + "rows_per_s": f"{speed['rows_per_s']:.1f}",
        COST_TAG + "single_ms_p50": f"{speed['single_ms_p50']:.2f}",
    }


def gate_tags(decision: GateDecision) -> dict[str, str]:
    return {"gate.within_budget": str(decision.promote).lower(), "gate.reason": decision.reason[:4000]}


def variant_metric_tags(source_tags: dict[str, str], measured: dict) -> dict[str, str]:
    """The variant's held-out metrics beside its source's, both measured here on the same rows."""
    from champion.registry import METRIC_TAG

    tags = {
        METRIC_TAG + "heldout_accuracy": f"{measured['variant']['accuracy']:.6f}",
        METRIC_TAG + "heldout_macro_f1": f"{measured['variant']['macro_f1']:.6f}",
        "source.heldout_accuracy": f"{measured['source']['accuracy']:.6f}",
        "source.heldout_macro_f1": f"{measured['source']['macro_f1']:.6f}",
        "agreement": f"{measured['agreement']:.6f}",
        "heldout_rows": str(measured["rows"]),
    }
    return tags


def _flat_metrics(measured: dict) -> dict[str, float]:
    out = {"rows": measured["rows"], "agreement": measured["agreement"]}
    for side in ("source", "variant"):
        out.update({f"{side}_{k}": v for k, v in measured[side].items()})
        out.update({f"{side}_{k}": v for k, v in measured[f"{side}_speed"].items()})
    out.update(speedup_batch=measured["speedup_batch"], speedup_single=measured["speedup_single"])
    return out


def _log_variant(fmt: str, folder: Path, run_id: str, source: LoadedModel) -> str:
    """Log the variant into the active run; returns the URI to register."""
    import mlflow

    if fmt == "int8":  # plain files (safetensors, config, tokenizer) as a logged model of no flavour
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        model = mlflow.initialize_logged_model(name="model", source_run_id=run_id, model_type="champion-int8")
        try:
            get_artifact_repository(model.artifact_location).log_artifacts(str(folder))
        except BaseException:
            mlflow.finalize_logged_model(model.model_id, "FAILED")
            raise
        mlflow.finalize_logged_model(model.model_id, "READY")
        return f"models:/{model.model_id}"
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from champion.formats import ONNX_INPUTS

    graph = onnx.load(str(folder / "model.onnx"))
    hidden = int(source.model.config.hidden_size)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1), n) for n in ONNX_INPUTS]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, len(source.labels)), "logits"),
                TensorSpec(np.dtype(np.float32), (-1, hidden), "pooled"),
            ]
        ),
    )
    extra = [str(p) for p in sorted(folder.iterdir()) if p.suffix != ".onnx" and p.is_file()]
    info = mlflow.onnx.log_model(
        graph,
        name="model",
        signature=signature,
        extra_files=extra,
        onnx_execution_providers=["CPUExecutionProvider"],
        pip_requirements=[f"onnxruntime=={_version_of('onnxruntime')}", f"onnx=={_version_of('onnx')}"],
    )
    return info.model_uri


def _version_of(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)


def _log_variant_reference(reg, name: str, version: str, variant: LoadedModel) -> str | None:
    """The drift monitor's reference for the variant: the source's held-out rows as the variant sees them
    (its own embeddings and confidences), with the source's training fingerprints."""
    from monitoring.reference import build_reference, load_reference, log_reference

    try:
        source_ref = load_reference(reg, name, version)
    except ChampionError:
        return None
    rows = source_ref.rows[["text", "label", "split"]]
    ref = build_reference(variant, rows, None, meta={"model": name, "source_version": version})
    ref.rows["seen_in_training"] = source_ref.rows["seen_in_training"].to_numpy()
    return log_reference(dataclasses.replace(ref, train_fingerprints=source_ref.train_fingerprints))
