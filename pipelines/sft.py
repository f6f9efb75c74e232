"""LoRA supervised fine-tuning of a small causal LM (message -> JSON answer) and its registration in MLflow.

Reads top to bottom: config -> data -> base model -> LoRA -> train (evaluating each epoch) -> test -> log ->
register. Run it with `champion sft configs/smollm2_sft_cpu.yaml`, or from a notebook:

    cfg = load_config(SFTConfig, "configs/smollm2_sft_cpu.yaml")
    result = sft(cfg)

A version is the adapter (adapter_config.json + adapter_model.safetensors) and the tokenizer, tagged with the
sha256 of its base and the id of the `champion-bases` run that holds the base's files (logged once per
digest), so several versions share one base; `registry.merge: true` registers a merged full model instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, model_validator

from champion import tracking
from champion.config import StrictModel, prepare_environment
from champion.errors import ChampionError, InterruptedRun
from champion.formats import FORMAT_TAG
from champion.progress import progress_bar
from champion.registry import (
    BASE_ARTIFACTS,
    BASE_RUN_TAG,
    BASE_SHA_TAG,
    METRIC_TAG,
    SYSTEM_PROMPT_TAG,
    TASK_TAG,
    TEXT_GENERATION,
    Registry,
    connect,
    register_version,
)
from champion.repair import crash_point, process_tags
from champion.safety import files_digest
from champion.signals import StopRequest, graceful_stop
from champion.tables import content_sha256, file_sha256
from pipelines import distributed
from pipelines.chat import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    encode_for_training,
    load_reply_rows,
    prompt_text,
    target_json,
)
from pipelines.data import stratified_cut
from pipelines.finetune import RegistryConfig, build_optimizer
from pipelines.generation_eval import per_row, score_answers
from pipelines.lm import load_causal_lm, lora_for_causal_lm, resolve_base
from pipelines.model import Device, count_parameters, resolve_device
from pipelines.replygen import write_replies

if TYPE_CHECKING:
    import pandas as pd

ADAPTER_FORMAT = "lora"  # the `format` of an adapter version: its base is in the base_run_id run
MERGED_FORMAT = "causal-lm"  # ... and of a merged one: a whole causal LM
BASE_EXPERIMENT = "champion-bases"
REFERENCE_TAG = "generation.reference"  # the held-out prompts, outputs and scores (a table artifact)


class SFTDataConfig(StrictModel):
    # Exactly one of: a CSV/JSONL/Parquet file in the bitext schema, or a number of rows to generate.
    source: str | None = None  # e.g. ../shared/data/bitext/support_replies.csv
    generate: int | None = Field(None, ge=1)  # rows made by pipelines/replygen.py (3 per intent at least)
    validation_size: float = Field(0.1, gt=0, lt=1)
    test_size: float = Field(0.1, gt=0, lt=1)
    seed: int = 42
    max_rows: int | None = Field(None, gt=0)  # stratified subsample of the data, for quick runs
    max_eval_rows: int | None = Field(64, ge=1)  # held-out rows generated per evaluation: generation is slow

    @model_validator(mode="after")
    def _one_source(self) -> SFTDataConfig:
        if (self.source is None) == (self.generate is None):
            raise ValueError("set exactly one of data.source (a file) and data.generate (a row count)")
        if self.validation_size + self.test_size >= 0.9:
            raise ValueError("validation_size + test_size must stay below 0.9 to leave rows for training")
        return self


class SFTModelConfig(StrictModel):
    base: str = "smollm2-135m-instruct"  # a local folder, the packaged SmolLM2, or a hub id (online users)
    max_length: int = Field(192, ge=16, le=8192)  # prompt + answer tokens; longer rows are truncated


class SFTLoraConfig(StrictModel):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )  # every linear layer of a Llama block


class SFTTrainConfig(StrictModel):
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimiser step
    eval_batch_size: int = Field(16, ge=1)  # prompts generated together (left-padded)
    learning_rate: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on a bf16-capable GPU, fp32 on CPU; bf16 on CPU pays on CPUs with AVX512-BF16.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    num_threads: int | None = Field(None, ge=1)  # torch CPU threads; None keeps torch's default
    progress: bool = True


class SFTGenerationConfig(StrictModel):
    max_new_tokens: int = Field(96, ge=1, le=4096)  # greedy decoding; recorded with the version


class SFTEvalConfig(StrictModel):
    reply_similarity: bool = False  # MiniLM cosine of reply and reference (loads the packaged encoder)
    samples: int = Field(8, ge=0)  # rows of the per-epoch sample table of inputs and outputs


class SFTRegistryConfig(RegistryConfig):
    model_name: str = Field("support-replies", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    experiment: str = "champion-sft"
    merge: bool = False  # register the LoRA merged into a full model (no shared base) instead of the adapter


class SFTConfig(StrictModel):
    data: SFTDataConfig
    model: SFTModelConfig = SFTModelConfig()
    lora: SFTLoraConfig = SFTLoraConfig()
    train: SFTTrainConfig = SFTTrainConfig()
    generation: SFTGenerationConfig = SFTGenerationConfig()
    eval: SFTEvalConfig = SFTEvalConfig()
    registry: SFTRegistryConfig = SFTRegistryConfig()


@dataclass(frozen=True)
class ReplySplits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    sha256: str  # of the (message, target JSON) rows the model sees, in split order
    file_sha256: dict[str, str]


@dataclass
class SFTResult:
    run_id: str
    model_name: str
    version: str
    model_uri: str  # models:/NAME/VERSION
    metrics: dict[str, float] = field(default_factory=dict)
    base_run_id: str = ""  # empty for a merged version
    model: Any = field(default=None, repr=False)  # the trained model in memory (CPU, eval; merged if asked)
    tokenizer: Any = field(default=None, repr=False)


def sft(
    cfg: SFTConfig,
    registry: Registry | None = None,
    *,
    extra_train: pd.DataFrame | None = None,
    init_adapter: Path | None = None,
    tags: dict[str, str] | None = None,
    reason: str | None = None,
    texts: dict[str, str] | None = None,
) -> SFTResult:
    """Fine-tune `cfg.model.base` with LoRA as `cfg` says; register the result under `cfg.registry.alias`.

    The retraining loop (pipelines/lm_retrain.py) also passes `extra_train` (fresh reply rows added to the
    training split only), `init_adapter` (a registered adapter's checked folder on the same base, trained on
    instead of a new LoRA), extra version `tags` (lineage), the registration's `reason` and `texts` (text
    artifacts of the run, path -> content, logged before the version exists)."""
    prepare_environment()
    import mlflow
    import torch
    from transformers import get_linear_schedule_with_warmup, set_seed

    # Data and base are checked before anything is written to MLflow.
    splits = load_reply_splits(cfg.data)
    if extra_train is not None and len(extra_train):
        splits = with_extra_rows(splits, extra_train)
    base_folder = resolve_base(cfg.model.base)
    device = train_device(cfg.train)
    dist = distributed.setup(device.type, cfg.train.num_threads)  # under torchrun / accelerate launch
    if cfg.train.num_threads and dist is None:
        torch.set_num_threads(cfg.train.num_threads)
    if dist is not None and not dist.main:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"progress": False})})
    set_seed(cfg.train.seed)
    model, tokenizer = load_causal_lm(base_folder, device="cpu", dtype="fp32")
    if init_adapter is not None:  # go on training a registered adapter (its folder checked by the caller)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        model = lora_for_causal_lm(
            model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, list(cfg.lora.target_modules)
        )
    model.to(device.type)
    trainable, total = count_parameters(model)

    # Distributed, each rank takes batch_size / world rows per step: the optimiser sees the config's batch.
    per_rank = max(1, cfg.train.batch_size // dist.world) if dist else cfg.train.batch_size
    train_rows = encode_rows(splits.train, tokenizer, cfg.model.max_length)
    if not train_rows:
        raise ChampionError(
            f"model.max_length: {cfg.model.max_length} tokens do not hold even the prompt of any training "
            "row; raise model.max_length."
        )
    train_loader = sft_loader(train_rows, tokenizer, per_rank, shuffle=True, seed=cfg.train.seed, dist=dist)
    val_rows = encode_rows(eval_rows(splits.validation, cfg), tokenizer, cfg.model.max_length)
    val_loader = sft_loader(val_rows, tokenizer, cfg.train.eval_batch_size, shuffle=False)

    optimizer = build_optimizer(model, cfg.train)
    steps = math.ceil(len(train_loader) / cfg.train.grad_accum) * cfg.train.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(steps * cfg.train.warmup_ratio), steps)
    trained = distributed.wrap(model, dist, device.type)  # `model` itself when run as one process

    if dist is not None and not dist.main:  # the other ranks train in step with rank 0, which records
        try:
            with graceful_stop() as stop:
                for epoch in range(1, cfg.train.epochs + 1):
                    train_loader.sampler.set_epoch(epoch)
                    _train_epoch(trained, train_loader, optimizer, scheduler, device, cfg, epoch, stop)
        finally:
            distributed.teardown(dist)
        return SFTResult("", cfg.registry.model_name, "", "", {})

    reg = registry or connect(cfg.registry.tracking_uri)
    if cfg.registry.merge:
        base_sha256, base_run_id = files_digest(base_folder), ""
    else:  # the base once per digest, for every server that puts an adapter of it on the base
        base_sha256, base_run_id = log_base(base_folder, cfg.model.base)
    embed = minilm_embed() if cfg.eval.reply_similarity else None
    experiment_id = tracking.ensure_experiment(cfg.registry.experiment)
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    generation = {"max_new_tokens": cfg.generation.max_new_tokens, "do_sample": False}

    with mlflow.start_run(experiment_id=experiment_id, run_name="sft-lora", tags=process_tags()) as run:
        mlflow.log_params(tracking.flatten(cfg.model_dump(mode="json")))
        mlflow.log_params(
            {
                "data.rows_train": len(splits.train),
                "data.rows_validation": len(splits.validation),
                "data.rows_test": len(splits.test),
                "params.trainable": trainable,
                "params.total": total,
                "device": device.type,
                "precision": device.precision,
                "distributed.world_size": dist.world if dist else 1,
            }
        )
        lineage = {
            "data_sha256": splits.sha256,
            "config_sha256": hashlib.sha256(config_yaml.encode()).hexdigest(),
            "base_model": cfg.model.base,
            BASE_SHA_TAG: base_sha256,
            "method": "lora",
            "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
            **{f"data_file_sha256.{k}": v for k, v in splits.file_sha256.items()},
            **tracking.code_version(),
            **tracking.library_versions(),
        }
        mlflow.set_tags({**lineage, **(tags or {})})
        mlflow.log_text(config_yaml, "config.yaml")
        mlflow.log_text(tokenizer.chat_template or "", "chat_template.jinja")
        for path, text in (texts or {}).items():
            mlflow.log_text(text, path)
        mlflow.log_dict(generation, "generation.json")

        # Train with an evaluation per epoch -> test -> held-out reference. Ctrl-C or SIGTERM stops at the
        # next safe point, registering nothing.
        try:
            with graceful_stop() as stop:
                fit = _fit(
                    trained,
                    tokenizer,
                    train_loader,
                    val_loader,
                    optimizer,
                    scheduler,
                    device,
                    cfg,
                    splits,
                    embed,
                    stop,
                )
                net = getattr(trained, "module", trained)
                test_rows = eval_rows(splits.test, cfg)
                test_answers = generate_answers(net, tokenizer, list(test_rows["instruction"]), cfg, device)
                metrics = {
                    **{f"val_{k}": v for k, v in fit.val.items()},
                    **{f"test_{k}": v for k, v in score_answers(test_answers, test_rows, embed).items()},
                    "train_samples_per_second": fit.samples * (dist.world if dist else 1) / fit.seconds,
                }
                mlflow.log_metrics(metrics)
                stop.check()
                reference = _held_out_table(
                    tokenizer,
                    [(eval_rows(splits.validation, cfg), fit.val_answers, "validation"),
                     (test_rows, test_answers, "test")],
                )  # fmt: skip
                mlflow.log_table(reference, "reference/held_out.json")
                reference_uri = f"runs:/{run.info.run_id}/reference/held_out.json"

                net = net.eval().to("cpu")
                if cfg.registry.merge:  # LoRA folded into the base weights: one plain causal LM
                    net = net.merge_and_unload()
                model_uri, fmt = _log_version_files(net, tokenizer, cfg, run.info.run_id)
                stop.check()
        except KeyboardInterrupt:
            mlflow.end_run(status="KILLED")
            distributed.teardown(dist)
            raise InterruptedRun(
                f"the run was interrupted before registration; nothing was registered and the aliases are "
                f"unchanged (MLflow run {run.info.run_id} is marked KILLED)."
            ) from None

        # Register and point the alias at it: all or nothing, and a Ctrl-C waits until it is done.
        tags = {
            **lineage,
            **(tags or {}),
            TASK_TAG: TEXT_GENERATION,
            FORMAT_TAG: fmt,
            SYSTEM_PROMPT_TAG: SYSTEM_PROMPT,
            "run_id": run.info.run_id,
            REFERENCE_TAG: reference_uri,
            **({BASE_RUN_TAG: base_run_id} if base_run_id else {}),
            **{f"generation.{k}": str(v).lower() for k, v in generation.items()},
            **{
                METRIC_TAG + k: f"{v:.6f}"
                for k, v in metrics.items()
                if k.startswith(("val_", "test_")) and not k.endswith("_rows")
            },
        }
        version = register_version(
            reg,
            cfg.registry.model_name,
            model_uri,
            tags,
            cfg.registry.alias,
            reason=reason
            or f"fine-tuned (LoRA SFT{', merged' if cfg.registry.merge else ''}) in run {run.info.run_id}",
            evidence={k: round(v, 6) for k, v in metrics.items()},
        )
        mlflow.set_tag("registered_version", f"{cfg.registry.model_name}/{version}")
    distributed.teardown(dist)
    return SFTResult(
        run.info.run_id,
        cfg.registry.model_name,
        version,
        f"models:/{cfg.registry.model_name}/{version}",
        metrics,
        base_run_id,
        net,
        tokenizer,
    )


# --- data -----------------------------------------------------------------------------------------------


def load_reply_splits(cfg: SFTDataConfig) -> ReplySplits:
    """The reply rows (from `cfg.source`, or generated) in seeded train / validation / test splits,
    stratified by intent."""
    files: dict[str, str] = {}
    if cfg.generate is not None:  # read back as a file is, so generated and shipped data load alike
        with tempfile.TemporaryDirectory(prefix="champion-sft-data-") as tmp:
            frame = load_reply_rows(write_replies(Path(tmp) / "replies.csv", cfg.generate, seed=cfg.seed))
    else:
        frame = load_reply_rows(Path(cfg.source).expanduser())
        files["source"] = file_sha256(Path(cfg.source).expanduser())
    by_intent = frame.assign(label=frame["intent"].astype(str))
    if cfg.max_rows is not None and len(by_intent) > cfg.max_rows:
        by_intent = stratified_cut(by_intent, [cfg.max_rows / len(by_intent)], cfg.seed)[1]
    counts = by_intent["label"].value_counts()
    if counts.min() < 3:
        field_name = "data.generate" if cfg.generate is not None else "data.source"
        raise ChampionError(
            f"{field_name}: intent '{counts.idxmin()}' has only {int(counts.min())} row(s) but needs at "
            "least 3 to appear in every split; add rows for it or drop it."
        )
    parts = stratified_cut(by_intent, [cfg.validation_size, cfg.test_size], cfg.seed)
    train, validation, test = (p.drop(columns="label") for p in parts)
    seen = [_as_seen(p) for p in (train, validation, test)]
    return ReplySplits(train, validation, test, content_sha256(*seen), files)


def with_extra_rows(splits: ReplySplits, extra: pd.DataFrame) -> ReplySplits:
    """`splits` with `extra` reply rows after its training rows; the hash covers what the model now sees."""
    import pandas as pd

    train = pd.concat([splits.train, extra[list(splits.train.columns.intersection(extra.columns))]],
                      ignore_index=True)  # fmt: skip
    seen = [_as_seen(p) for p in (train, splits.validation, splits.test)]
    return ReplySplits(train, splits.validation, splits.test, content_sha256(*seen), splits.file_sha256)


def _as_seen(frame: pd.DataFrame) -> pd.DataFrame:
    """(text, label) = (message, target JSON): what the model sees, for the data hash."""
    import pandas as pd

    answers = [target_json(row) for row in frame.to_dict("records")]
    return pd.DataFrame({"text": frame["instruction"].astype(str), "label": answers})


def eval_rows(frame: pd.DataFrame, cfg: SFTConfig) -> pd.DataFrame:
    limit = cfg.data.max_eval_rows
    return frame if limit is None else frame.head(limit).reset_index(drop=True)


def encode_rows(frame: pd.DataFrame, tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Each row as the chat template renders it, with labels -100 on the prompt (loss on the answer only);
    a row whose prompt alone fills `max_length` is left out."""
    rows = []
    for row in frame.to_dict("records"):
        encoded = encode_for_training(tokenizer, str(row["instruction"]), target_json(row), max_length)
        if not encoded:  # the prompt alone fills max_length: nothing of the answer to learn from
            continue
        rows.append({k: list(map(int, encoded[k])) for k in ("input_ids", "attention_mask", "labels")})
    return rows


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict:
    """Right-padded tensors: padding has attention 0 and label -100, so the loss never sees it."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        for key in batch:
            batch[key][i, :n] = torch.tensor(row[key], dtype=torch.long)
    return batch


def sft_loader(rows, tokenizer, batch_size: int, shuffle: bool, seed: int = 0, dist=None):
    """Batches of encoded rows: shuffled (this rank's shard under DDP) for training, in order otherwise."""
    import torch
    from torch.utils.data import DataLoader

    shard = distributed.sampler(rows, dist, seed) if shuffle else None
    return DataLoader(
        rows,
        batch_size=batch_size,
        shuffle=shuffle and shard is None,
        sampler=shard,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id),
    )


# --- base -----------------------------------------------------------------------------------------------


def log_base(folder: Path, spec: str) -> tuple[str, str]:
    """(sha256, run id) of the base's files (checked by `load_causal_lm`) as the artifacts of a run in the
    `champion-bases` experiment, logged only when no finished run there has the same digest yet."""
    import mlflow

    digest = files_digest(folder)
    client = mlflow.MlflowClient()
    experiment_id = tracking.ensure_experiment(BASE_EXPERIMENT)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{BASE_SHA_TAG} = '{digest}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if found:
        return digest, found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"base-{Path(spec).name}",
        tags={BASE_SHA_TAG: digest, "base_model": spec, TASK_TAG: TEXT_GENERATION, **process_tags()},
    )
    try:
        client.log_artifacts(run.info.run_id, str(folder), BASE_ARTIFACTS)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return digest, run.info.run_id


def train_device(train: SFTTrainConfig) -> Device:
    import torch

    if train.precision == "bf16" and resolve_device(train.device, "fp32").type == "cpu":
        return Device("cpu", torch.bfloat16)  # bf16 autocast on CPU: asked for explicitly
    return resolve_device(train.device, train.precision)


# --- train and evaluate ---------------------------------------------------------------------------------


@dataclass
class _Fit:
    val: dict[str, float]  # the last epoch's validation scores (and loss)
    val_answers: list[str]
    train_loss: float
    samples: int
    seconds: float  # training steps only, without evaluation


def _fit(
    model,
    tokenizer,
    train_loader,
    val_loader,
    optimizer,
    scheduler,
    device,
    cfg: SFTConfig,
    splits,
    embed,
    stop,
) -> _Fit:
    """Train for `cfg.train.epochs`, scoring generated answers on validation rows after each epoch; the last
    epoch's weights are the result. `model` may be DDP-wrapped; only rank 0 calls this."""
    import mlflow

    net = getattr(model, "module", model)
    rows = eval_rows(splits.validation, cfg)
    samples, seconds = 0, 0.0
    for epoch in range(1, cfg.train.epochs + 1):
        if hasattr(train_loader.sampler, "set_epoch"):  # a DistributedSampler: a new shuffle each epoch
            train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        train_loss, n = _train_epoch(model, train_loader, optimizer, scheduler, device, cfg, epoch, stop)
        epoch_seconds = time.perf_counter() - started
        seconds += epoch_seconds
        samples += n
        answers = generate_answers(net, tokenizer, list(rows["instruction"]), cfg, device)
        val = {**score_answers(answers, rows, embed), "loss": validation_loss(net, val_loader, device)}
        stop.check()
        mlflow.log_metrics({"train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()}}, step=epoch)
        if cfg.eval.samples:
            sample = rows.head(cfg.eval.samples)
            mlflow.log_table(
                {"input": list(sample["instruction"]), "output": answers[: len(sample)],
                 "reference": [target_json(r) for r in sample.to_dict("records")]},
                f"samples/epoch_{epoch}.json",
            )  # fmt: skip
        if cfg.train.progress:
            print(
                f"epoch {epoch}/{cfg.train.epochs}: train_loss {train_loss:.4f}, val_loss {val['loss']:.4f}, "
                f"val_valid_json {val['valid_json']:.3f}, val_intent_accuracy {val['intent_accuracy']:.3f} "
                f"({n / epoch_seconds:.1f} samples/s)",
                flush=True,
            )
    return _Fit(val, answers, train_loss, samples, seconds)


def _train_epoch(
    model, loader, optimizer, scheduler, device, cfg: SFTConfig, epoch: int, stop: StopRequest | None = None
) -> tuple[float, int]:
    """One pass over `loader` (an optimiser step every `grad_accum` batches); returns the mean loss and the
    number of rows seen."""
    import torch

    model.train()
    total_loss = torch.zeros((), device=device.type)
    seen, accum = 0, cfg.train.grad_accum
    bar = progress_bar(loader, f"epoch {epoch}/{cfg.train.epochs}", disable=not cfg.train.progress)
    for step, batch in enumerate(bar, start=1):
        batch = {k: v.to(device.type, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(
            device.type, dtype=device.autocast_dtype, enabled=device.autocast_dtype is not None
        ):
            loss = model(**batch).loss  # the model shifts labels; -100 (prompt, padding) is skipped
        (loss / accum).backward()
        if step % accum == 0 or step == len(loader):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm, foreach=True)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        crash_point("sft:step")  # tests kill the run here (does nothing unless CHAMPION_CRASH_AT says)
        total_loss += loss.detach()
        seen += batch["labels"].shape[0]
        if stop is not None:
            stop.check()
        if step % 10 == 0:  # reading the loss syncs the GPU, so only now and then
            bar.set_postfix(loss=f"{total_loss.item() / step:.4f}")
    return total_loss.item() / max(1, len(loader)), seen


def validation_loss(model, loader, device: Device) -> float:
    """Mean loss on the answer tokens of `loader`'s rows."""
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device.type) for k, v in batch.items()}
            with torch.autocast(
                device.type, dtype=device.autocast_dtype, enabled=device.autocast_dtype is not None
            ):
                losses.append(float(model(**batch).loss))
    return sum(losses) / max(1, len(losses))


def generate_answers(model, tokenizer, messages: list[str], cfg: SFTConfig, device: Device) -> list[str]:
    """Greedy answers to `messages`, generated in left-padded batches of `cfg.train.eval_batch_size`."""
    import torch

    model.eval()
    answers: list[str] = []
    size = cfg.train.eval_batch_size
    for start in range(0, len(messages), size):
        prompts = [prompt_text(tokenizer, m) for m in messages[start : start + size]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device.type)
        with (
            torch.no_grad(),
            torch.autocast(
                device.type, dtype=device.autocast_dtype, enabled=device.autocast_dtype is not None
            ),
        ):
            out = model.generate(
                **enc,
                max_new_tokens=cfg.generation.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def _held_out_table(tokenizer, parts) -> pd.DataFrame:
    """Prompts, outputs, references and per-row scores of the held-out rows: the monitoring reference."""
    import pandas as pd

    return pd.concat(
        [
            per_row(answers, rows).assign(
                split=split, prompt=[prompt_text(tokenizer, m) for m in rows["instruction"]]
            )
            for rows, answers, split in parts
        ],
        ignore_index=True,
    )


# --- log the version ------------------------------------------------------------------------------------


def _log_version_files(model, tokenizer, cfg: SFTConfig, run_id: str) -> tuple[str, str]:
    """Log the version's files into the active run as a logged model of no flavour (Champion loads them
    itself); returns (the URI to register, the format tag): the adapter, or the merged model (`model` is
    then already merged)."""
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with tempfile.TemporaryDirectory(prefix="champion-sft-") as tmp:
        folder = Path(tmp)
        if cfg.registry.merge:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            fmt = MERGED_FORMAT
        else:
            save_adapter(model, tokenizer, folder, cfg.model.base)
            fmt = ADAPTER_FORMAT
        logged = mlflow.initialize_logged_model(
            name="model", source_run_id=run_id, model_type=f"champion-{fmt}"
        )
        try:
            get_artifact_repository(logged.artifact_location).log_artifacts(tmp)
        except BaseException:
            mlflow.finalize_logged_model(logged.model_id, "FAILED")
            raise
        mlflow.finalize_logged_model(logged.model_id, "READY")
    return f"models:/{logged.model_id}", fmt


def save_adapter(model, tokenizer, folder: Path, base: str) -> Path:
    """adapter_config.json + adapter_model.safetensors + the tokenizer's files in `folder`; the adapter
    config names the base by `base` (the config's spec), never by a local path."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty model card
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def minilm_embed():
    """Sentence vectors from the packaged MiniLM encoder, for reply similarity."""
    from sentence_transformers import SentenceTransformer

    from pipelines.model import resolve_base_model

    encoder = SentenceTransformer(resolve_base_model("all-MiniLM-L6-v2"), device="cpu")
    return lambda texts: encoder.encode(list(texts), normalize_embeddings=True)
