"""Fine-tune a Hugging Face encoder for text classification and register it in MLflow.

Reads top to bottom: config -> data -> model -> train -> evaluate -> log -> register.
Run it with `champion finetune configs/minilm_lora_cpu.yaml`, or from a notebook:

    cfg = load_config(FinetuneConfig, "configs/minilm_lora_cpu.yaml")
    result = finetune(cfg)
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import Field, field_validator

from champion import tracking
from champion.config import StrictModel, prepare_environment
from champion.errors import InterruptedRun
from champion.progress import progress_bar
from champion.registry import CHALLENGER, CHAMPION, METRIC_TAG, Registry, connect, register_version
from champion.repair import crash_point, process_tags
from champion.signals import StopRequest, graceful_stop
from monitoring.reference import REFERENCE_TAG
from pipelines import distributed
from pipelines.data import DataConfig, Splits, load_splits, with_extra_training_rows
from pipelines.evaluate import Evaluation, evaluate, log_evaluation
from pipelines.model import (
    LoraConfig,
    MemoryTracker,
    ModelConfig,
    apply_lora,
    count_parameters,
    load_classifier,
    load_registered_classifier,
    load_tokenizer,
    resolve_device,
)

if TYPE_CHECKING:
    import pandas as pd


class TrainConfig(StrictModel):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a bf16-capable GPU
    num_threads: int | None = Field(None, ge=1)  # torch CPU threads; None keeps torch's default
    early_stopping_patience: int | None = Field(None, ge=1)  # epochs without improvement before stopping
    # Picks the best epoch; `champion promote --metric val_<metric>` compares the same number.
    metric: Literal["macro_f1", "accuracy"] = "macro_f1"
    progress: bool = True


class RegistryConfig(StrictModel):
    model_name: str = Field("support-intents", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    experiment: str = "champion-finetune"
    alias: str = CHALLENGER  # the alias the new version gets; promotion to champion is a separate step
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite under CHAMPION_HOME

    @field_validator("alias")
    @classmethod
    def _not_champion(cls, alias: str) -> str:
        if alias == CHAMPION:
            raise ValueError("must not be 'champion': only `champion promote` moves it; use 'challenger'")
        return alias


class FinetuneConfig(StrictModel):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    method: Literal["lora", "full"] = "lora"
    lora: LoraConfig = LoraConfig()  # read only when method is lora
    train: TrainConfig = TrainConfig()
    registry: RegistryConfig = RegistryConfig()


@dataclass
class FinetuneResult:
    run_id: str
    model_name: str
    version: str
    model_uri: str  # models:/NAME/VERSION
    metrics: dict[str, float] = field(default_factory=dict)


def finetune(
    cfg: FinetuneConfig,
    registry: Registry | None = None,
    *,
    splits: Splits | None = None,
    extra_train: pd.DataFrame | None = None,
    init_model: str | None = None,
    tags: dict[str, str] | None = None,
    reason: str | None = None,
    texts: dict[str, str] | None = None,
) -> FinetuneResult:
    """Fine-tune as `cfg` says and register the result under `cfg.registry.alias`.

    The retraining loop also passes `splits` (what `cfg.data` splits into, already loaded and checked),
    `extra_train` (fresh labelled rows added to the training split only;
    their labels may be new), `init_model` (a registered version's model folder to start from instead of
    `cfg.model.base`: its classifier rows are kept by label name), extra version `tags` (lineage) and `texts`
    (text artifacts of the run, path -> content: the rows a retrain added, logged before the version exists).
    """
    prepare_environment()
    import mlflow
    import torch
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup, set_seed

    # Data and model are checked before anything is written to MLflow.
    splits = load_splits(cfg.data) if splits is None else splits
    source_sha256 = splits.sha256  # what cfg.data alone splits into: a retrain checks it again
    if extra_train is not None and len(extra_train):
        splits = with_extra_training_rows(splits, extra_train)
    device = resolve_device(cfg.train.device, cfg.train.precision)
    dist = distributed.setup(device.type, cfg.train.num_threads)  # under torchrun / accelerate launch
    if cfg.train.num_threads and dist is None:
        torch.set_num_threads(cfg.train.num_threads)
    if dist is not None and not dist.main:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"progress": False})})
    set_seed(cfg.train.seed)
    if init_model is None:
        tokenizer = load_tokenizer(cfg.model.base)
        model = load_classifier(cfg.model.base, splits.labels)
    else:
        tokenizer, model = load_registered_classifier(
            init_model, splits.labels, examples=splits.train, max_length=cfg.model.max_length
        )
    if cfg.method == "lora":
        model = apply_lora(model, cfg.lora)
    model.to(device.type)
    trainable, total = count_parameters(model)

    collate = DataCollatorWithPadding(tokenizer)  # dynamic padding: each batch pads to its longest text
    label_ids = {label: i for i, label in enumerate(splits.labels)}
    # Distributed, each rank takes batch_size / world rows per step: the optimiser sees the config's batch.
    per_rank = (
        cfg.train.model_copy(update={"batch_size": max(1, cfg.train.batch_size // dist.world)})
        if dist
        else cfg.train
    )
    train_loader = make_loader(
        splits.train, tokenizer, label_ids, per_rank, cfg.model.max_length, collate, shuffle=True, dist=dist
    )
    val_loader = _loader(splits.validation, tokenizer, label_ids, cfg, collate, shuffle=False)
    test_loader = _loader(splits.test, tokenizer, label_ids, cfg, collate, shuffle=False)

    optimizer = build_optimizer(model, cfg.train)
    steps = len(train_loader) * cfg.train.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(steps * cfg.train.warmup_ratio), steps)
    trained = distributed.wrap(model, dist, device.type)  # `model` itself when run as one process

    if dist is not None and not dist.main:  # the other ranks train in step with rank 0, which records
        try:
            with graceful_stop() as stop:
                _fit(
                    trained, train_loader, val_loader, optimizer, scheduler, device, cfg, splits.labels, stop
                )
        finally:
            distributed.teardown(dist)
        return FinetuneResult("", cfg.registry.model_name, "", "", {})

    reg = registry or connect(cfg.registry.tracking_uri)
    experiment_id = tracking.ensure_experiment(cfg.registry.experiment)
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    config_sha256 = hashlib.sha256(config_yaml.encode()).hexdigest()

    run_name = f"finetune-{cfg.method}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=process_tags()) as run:
        mlflow.log_params(tracking.flatten(cfg.model_dump(mode="json")))
        mlflow.log_params(
            {
                "data.rows_train": len(splits.train),
                "data.rows_fresh_train": 0 if extra_train is None else len(extra_train),
                "data.rows_validation": len(splits.validation),
                "data.rows_test": len(splits.test),
                "data.num_labels": len(splits.labels),
                "params.trainable": trainable,
                "params.total": total,
                "device": device.type,
                "precision": device.precision,
                "distributed.world_size": dist.world if dist else 1,
            }
        )
        lineage = {
            "data_sha256": splits.sha256,  # every row used, fresh ones included
            "source_data_sha256": source_sha256,
            "config_sha256": config_sha256,
            "base_model": cfg.model.base,
            "method": cfg.method,
            **{f"data_file_sha256.{k}": v for k, v in splits.file_sha256.items()},
            **tracking.code_version(),
            **tracking.library_versions(),
        }
        mlflow.set_tags({**lineage, **(tags or {})})
        mlflow.log_text(config_yaml, "config.yaml")
        mlflow.log_dict({"labels": splits.labels}, "labels.json")
        for path, text in (
            texts or {}
        ).items():  # e.g. a retrain's added rows, kept before anything registers
            mlflow.log_text(text, path)

        # Train -> test -> log the model. Ctrl-C or SIGTERM stops at the next safe point, registering nothing.
        try:
            with graceful_stop() as stop:
                fit = _fit(
                    trained, train_loader, val_loader, optimizer, scheduler, device, cfg, splits.labels, stop
                )
                model.load_state_dict(fit.best_state, strict=False)
                test = evaluate(model, test_loader, device, splits.labels)
                metrics = {
                    **fit.best_val.scalars("val"),
                    **test.scalars("test"),
                    "best_epoch": fit.best_epoch,
                    "train_samples_per_second": fit.samples * (dist.world if dist else 1) / fit.seconds,
                    "train_cpu_seconds": fit.cpu_seconds,  # every core of this process: core-seconds
                    "train_peak_memory_mb": fit.memory.peak_mb,
                    "train_memory_growth_mb": fit.memory.growth_mb,
                }
                mlflow.log_metrics(metrics)
                log_evaluation(test, "test")
                stop.check()

                # The model as served: LoRA merged into the base, transformers flavour, safetensors.
                model.eval().to("cpu")
                if cfg.method == "lora":
                    with tempfile.TemporaryDirectory() as tmp:
                        model.save_pretrained(tmp)
                        mlflow.log_artifacts(tmp, "lora_adapter")
                    model = model.merge_and_unload()
                info = tracking.log_classifier(model, tokenizer, example=list(splits.validation["text"][:2]))
                stop.check()
                # What the drift monitor compares production with: held-out rows as this model saw them.
                reference_uri = _log_reference(model, tokenizer, splits, cfg)
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
            "run_id": run.info.run_id,
            REFERENCE_TAG: reference_uri,
            **{METRIC_TAG + k: f"{v:.6f}" for k, v in metrics.items() if k.startswith(("val_", "test_"))},
        }
        version = register_version(
            reg,
            cfg.registry.model_name,
            info.model_uri,
            tags,
            cfg.registry.alias,
            reason=reason or f"fine-tuned ({cfg.method}) in run {run.info.run_id}",
            evidence={k: round(v, 6) for k, v in metrics.items()},
        )
        mlflow.set_tag("registered_version", f"{cfg.registry.model_name}/{version}")
    distributed.teardown(dist)
    return FinetuneResult(
        run.info.run_id,
        cfg.registry.model_name,
        version,
        f"models:/{cfg.registry.model_name}/{version}",
        metrics,
    )


@dataclass
class _Fit:
    best_val: Evaluation
    best_epoch: int
    best_state: dict
    samples: int
    seconds: float  # training steps only, without evaluation
    memory: MemoryTracker
    cpu_seconds: float = 0.0  # CPU time of this process over the training steps (core-seconds)


def _fit(
    model, train_loader, val_loader, optimizer, scheduler, device, cfg: FinetuneConfig, labels, stop
) -> _Fit:
    """Train, evaluating after every epoch; keep the best epoch (and stop early if configured).

    `model` may be DDP-wrapped: it trains; its inner module is evaluated and copied. Only the process that
    holds an MLflow run (rank 0) logs."""
    import mlflow

    net = getattr(model, "module", model)
    log = mlflow.active_run() is not None
    best_val, best_epoch, best_state = None, 0, None
    samples, seconds, cpu_seconds = 0, 0.0, 0.0
    # Memory is measured over the first epoch: it allocates the optimizer state and sees every step's
    # activations; later epochs add only the copy of the best weights.
    memory = MemoryTracker(device.type)
    for epoch in range(1, cfg.train.epochs + 1):
        if hasattr(train_loader.sampler, "set_epoch"):  # a DistributedSampler: a new shuffle each epoch
            train_loader.sampler.set_epoch(epoch)
        started, cpu_started = time.perf_counter(), time.process_time()
        with memory if epoch == 1 else contextlib.nullcontext():
            train_loss, n = _train_epoch(model, train_loader, optimizer, scheduler, device, cfg, epoch, stop)
        epoch_seconds = time.perf_counter() - started
        cpu_seconds += time.process_time() - cpu_started
        seconds += epoch_seconds
        samples += n
        val = evaluate(net, val_loader, device, labels)
        stop.check()
        if log:
            mlflow.log_metrics(
                {"train_loss": train_loss, **val.scalars("val"), **val.per_class_f1("val_f1")}, step=epoch
            )
        if cfg.train.progress:
            print(
                f"epoch {epoch}/{cfg.train.epochs}: train_loss {train_loss:.4f}, "
                f"val_accuracy {val.accuracy:.4f}, val_macro_f1 {val.macro_f1:.4f} "
                f"({n / epoch_seconds:.0f} samples/s)",
                flush=True,
            )
        if best_val is None or getattr(val, cfg.train.metric) > getattr(best_val, cfg.train.metric):
            best_val, best_epoch, best_state = val, epoch, trainable_state(net)
        elif cfg.train.early_stopping_patience and epoch - best_epoch >= cfg.train.early_stopping_patience:
            if cfg.train.progress:
                print(
                    f"early stopping after epoch {epoch}: no val_{cfg.train.metric} gain "
                    f"in {cfg.train.early_stopping_patience} epoch(s)"
                )
            break
    return _Fit(best_val, best_epoch, best_state, samples, seconds, memory, cpu_seconds)


def _log_reference(model, tokenizer, splits, cfg: FinetuneConfig) -> str:
    from serving.model import LoadedModel

    served = LoadedModel(
        cfg.registry.model_name, "", model, tokenizer, tuple(splits.labels), cfg.model.max_length, "cpu", 0.0
    )
    return log_held_out_reference(served, splits, cfg.registry.model_name)


def log_held_out_reference(served, splits: Splits, name: str) -> str:
    """Score the validation and test rows with the final model (a serving LoadedModel) and log them into the
    active run as its monitoring reference; returns the URI for the version's reference tag."""
    import pandas as pd

    from monitoring.reference import build_reference, log_reference

    held_out = pd.concat(
        [splits.validation.assign(split="validation"), splits.test.assign(split="test")], ignore_index=True
    )
    meta = {"model": name, "data_sha256": splits.sha256}
    return log_reference(build_reference(served, held_out, splits.train["text"], meta))


def encode_rows(frame, tokenizer, label_ids: dict[str, int], max_length: int) -> list[dict]:
    """Tokenised, unpadded rows with integer `labels`; a collator pads each batch to its longest row."""
    encoded = tokenizer(list(frame["text"]), truncation=True, max_length=max_length)
    keys = list(encoded.keys())
    return [
        {**{k: encoded[k][i] for k in keys}, "labels": label_ids[label]}
        for i, label in enumerate(frame["label"])
    ]


def make_loader(
    frame,
    tokenizer,
    label_ids: dict[str, int],
    train: TrainConfig,
    max_length: int,
    collate,
    shuffle: bool,
    with_row: bool = False,
    dist: distributed.Dist | None = None,
):
    """Batches of `frame`: shuffled training batches, or evaluation batches in row order. `with_row` adds
    each row's index as `row` (distillation looks up its cached teacher outputs by it); with `dist`, the
    shuffled batches are this rank's shard."""
    import torch
    from torch.utils.data import DataLoader

    rows = encode_rows(frame, tokenizer, label_ids, max_length)
    if with_row:
        for i, row in enumerate(rows):
            row["row"] = i
    shard = distributed.sampler(rows, dist, train.seed) if shuffle else None
    return DataLoader(
        rows,
        batch_size=train.batch_size if shuffle else train.eval_batch_size,
        shuffle=shuffle and shard is None,
        sampler=shard,
        generator=torch.Generator().manual_seed(train.seed),
        collate_fn=collate,
    )


def _loader(frame, tokenizer, label_ids: dict[str, int], cfg: FinetuneConfig, collate, shuffle: bool):
    return make_loader(frame, tokenizer, label_ids, cfg.train, cfg.model.max_length, collate, shuffle)


def build_optimizer(model, train: TrainConfig):
    """AdamW without weight decay on biases and LayerNorm weights (as the HF Trainer does), fused kernels."""
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.learning_rate, fused=True)


def _train_epoch(
    model,
    loader,
    optimizer,
    scheduler,
    device,
    cfg: FinetuneConfig,
    epoch: int,
    stop: StopRequest | None = None,
) -> tuple[float, int]:
    """One pass over `loader`; returns the mean training loss and the number of samples seen."""
    import torch

    model.train()
    total_loss = torch.zeros((), device=device.type)
    seen = 0
    bar = progress_bar(loader, f"epoch {epoch}/{cfg.train.epochs}", disable=not cfg.train.progress)
    for step, batch in enumerate(bar, start=1):
        batch = {k: v.to(device.type, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(
            device.type, dtype=device.autocast_dtype, enabled=device.autocast_dtype is not None
        ):
            loss = model(**batch).loss
        loss.backward()
        # foreach=True: on CPU the default is a per-tensor loop, about 1.5x slower for a full fine-tune
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm, foreach=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        crash_point("finetune:step")  # tests kill the run here (does nothing unless CHAMPION_CRASH_AT says)
        total_loss += loss.detach()
        seen += batch["labels"].shape[0]
        if stop is not None:
            stop.check()
        if step % 20 == 0:  # reading the loss syncs the GPU, so only now and then
            bar.set_postfix(loss=f"{total_loss.item() / step:.4f}")
    return total_loss.item() / max(1, len(loader)), seen


def trainable_state(model) -> dict:
    """A CPU copy of the trainable weights (the best epoch's, kept to restore after training)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in names}
