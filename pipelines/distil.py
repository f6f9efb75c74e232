"""Distil a registered teacher into a smaller student and register the student with lineage to its teacher.

Reads top to bottom like finetune.py, and shares its functions: teacher -> the rows it was trained on ->
teacher logits (computed once, cached) -> student (the teacher cut to fewer layers, DistilBERT-style, or
another encoder with the same tokenizer) -> train on KL(soft teacher) + cross-entropy (+ optional pooled
hidden-state matching) -> evaluate student and teacher on the same held-out rows -> gate -> log -> register.
Run it with `champion distil configs/minilm_distil_l3_cpu.yaml`, or from a notebook:

    cfg = load_config(DistilConfig, "configs/minilm_distil_l3_cpu.yaml")
    result = distil(cfg)

The student is gated against its teacher (default: at least 97 % of the teacher's macro-F1 on the same
held-out rows); one outside the budget is registered, tagged with the refusal, and cannot be promoted.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import yaml
from pydantic import Field, field_validator

from champion import tracking
from champion.config import StrictModel, prepare_environment
from champion.errors import ChampionError, InterruptedRun
from champion.formats import FORMAT_TAG, SOURCE_TAG, VARIANT_TAG, format_of
from champion.gate import GateDecision, VariantBudget, decide_variant
from champion.progress import progress_bar
from champion.repair import process_tags
from champion.signals import graceful_stop
from pipelines import distributed
from pipelines.compress import CANDIDATE, CostConfig, cost_tags, gate_tags, measure_pair
from pipelines.evaluate import evaluate, log_evaluation
from pipelines.finetune import (
    TrainConfig,
    build_optimizer,
    log_held_out_reference,
    make_loader,
    trainable_state,
)
from pipelines.model import MemoryTracker, count_parameters, resolve_device

if TYPE_CHECKING:
    from pipelines.data import Splits
    from serving.model import LoadedModel


class StudentConfig(StrictModel):
    # layers: the teacher with only `keep_layers` of its encoder layers (weights copied, DistilBERT-style);
    # base: a fresh classifier on `base`, another encoder with the teacher's tokenizer.
    init: Literal["layers", "base"] = "layers"
    keep_layers: list[int] | None = None  # default: every other layer, from the first (0, 2, 4 of 6)
    base: str | None = None  # for init=base: a folder, a hub id, or paraphrase-MiniLM-L3-v2 (packaged)


class LossConfig(StrictModel):
    temperature: float = Field(2.0, gt=0)  # softens both distributions in the KL term
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the KL term; 1 - alpha goes to cross-entropy
    hidden_weight: float = Field(0.0, ge=0)  # weight of matching the teacher's pooled last hidden state


class DistilConfig(StrictModel):
    model_name: str = Field("support-intents", min_length=1)
    teacher: str = "champion"  # an alias or a version number of `model_name`

    @field_validator("teacher", mode="before")
    @classmethod
    def _version_number(cls, value):
        return str(value) if isinstance(value, int) else value  # `teacher=3` on the command line

    data: str | None = None  # train on this file instead of the teacher's recorded one (same columns)
    student: StudentConfig = StudentConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig(epochs=4, learning_rate=1e-4, warmup_ratio=0.1)
    budget: VariantBudget = VariantBudget()
    cost: CostConfig = CostConfig()
    promote: bool = False  # promote to champion at once if within budget and the teacher is the champion
    experiment: str = "champion-distil"


@dataclass
class DistilResult:
    name: str
    teacher_version: str
    version: str
    run_id: str
    decision: GateDecision
    metrics: dict[str, float] = field(default_factory=dict)
    promoted: bool = False


def distil(cfg: DistilConfig, registry=None) -> DistilResult:
    """Train a student of `cfg.teacher` on the teacher's own training split and register it."""
    prepare_environment()
    import mlflow
    import torch
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup, set_seed

    from champion.registry import METRIC_TAG, connect, model_version, promote, register_version
    from monitoring.reference import REFERENCE_TAG
    from pipelines.retrain import RetrainConfig, champion_recipe
    from serving.model import LoadedModel, load_version

    reg = registry or connect()
    name = cfg.model_name
    teacher_version = _resolve(reg, name, cfg.teacher)
    teacher_tags = dict(model_version(reg, name, teacher_version).tags)
    if format_of(teacher_tags) != "safetensors":
        raise ChampionError(
            f"teacher: v{teacher_version} of '{name}' is a {format_of(teacher_tags)} variant; distil from "
            f"its fp32 source v{teacher_tags.get(SOURCE_TAG, '?')} instead."
        )

    # The teacher's recipe and the rows it was trained on: its data file plus the fresh rows a retrain added,
    # rebuilt from its lineage and checked against the hashes recorded with it (or `data`, split alike).
    recipe, splits = champion_recipe(
        reg, name, teacher_version, RetrainConfig(model_name=name, data=cfg.data), purpose="distillation"
    )
    max_length = recipe.model.max_length
    device = resolve_device(cfg.train.device, cfg.train.precision)
    dist = distributed.setup(device.type, cfg.train.num_threads)  # under torchrun / accelerate launch
    if cfg.train.num_threads and dist is None:
        torch.set_num_threads(cfg.train.num_threads)
    if dist is not None and not dist.main:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"progress": False})})
    set_seed(cfg.train.seed)
    teacher = load_version(reg.client, name, teacher_version, device="cpu", max_tokens=max_length)
    if list(teacher.labels) != splits.labels:
        raise ChampionError(
            f"teacher: v{teacher_version} predicts {len(teacher.labels)} labels but its data has "
            f"{len(splits.labels)}; distil from a version trained on this data."
        )

    # The student, and the teacher's logits and pooled embeddings of every training row (computed once,
    # cached on disk).
    student = build_student(teacher, cfg.student, splits.labels).to(device.type)
    if dist is not None and not dist.main:
        distributed.barrier(dist)  # rank 0 computes the teacher's outputs once; the others read its cache
    soft = teacher_outputs(teacher, splits, progress=cfg.train.progress)
    if dist is not None and dist.main:
        distributed.barrier(dist)
    if cfg.loss.hidden_weight > 0 and student.config.hidden_size != soft["pooled"].shape[1]:
        raise ChampionError(
            f"loss.hidden_weight: the student's hidden size {student.config.hidden_size} is not the "
            f"teacher's {soft['pooled'].shape[1]}, so their hidden states cannot be matched; set it to 0."
        )
    trainable, total = count_parameters(student)
    tokenizer = teacher.tokenizer
    collate = DataCollatorWithPadding(tokenizer)
    label_ids = {label: i for i, label in enumerate(splits.labels)}
    loader = partial(make_loader, tokenizer=tokenizer, label_ids=label_ids, train=cfg.train,
                     max_length=max_length, collate=collate)  # fmt: skip
    per_rank = (
        cfg.train.model_copy(update={"batch_size": max(1, cfg.train.batch_size // dist.world)})
        if dist
        else cfg.train
    )
    train_loader = loader(splits.train, shuffle=True, with_row=True, train=per_rank, dist=dist)
    val_loader = loader(splits.validation, shuffle=False)
    test_loader = loader(splits.test, shuffle=False)
    optimizer = build_optimizer(student, cfg.train)
    steps = len(train_loader) * cfg.train.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(steps * cfg.train.warmup_ratio), steps)
    trained = distributed.wrap(student, dist, device.type)  # `student` itself when run as one process
    if dist is not None and not dist.main:  # the other ranks train in step with rank 0, which records
        try:
            with graceful_stop() as stop:
                _fit(trained, train_loader, val_loader, optimizer, scheduler, device, cfg, soft, splits, stop)
        finally:
            distributed.teardown(dist)
        return DistilResult(name, teacher_version, "", "", GateDecision(False, "not rank 0"), {})

    experiment_id = tracking.ensure_experiment(cfg.experiment)
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"distil-v{teacher_version}", tags=process_tags()
    ) as run:
        mlflow.log_params(tracking.flatten(cfg.model_dump(mode="json")))
        mlflow.log_params(
            {
                "model.max_length": max_length,
                "teacher_version": teacher_version,
                "student.layers": student.config.num_hidden_layers,
                "params.trainable": trainable,
                "params.total": total,
                "data.rows_train": len(splits.train),
                "device": device.type,
                "distributed.world_size": dist.world if dist else 1,
            }
        )
        lineage = {
            VARIANT_TAG: "student",
            SOURCE_TAG: teacher_version,
            FORMAT_TAG: "safetensors",
            "method": "distil",
            "base_model": f"{name}/{teacher_version} (teacher)",
            "student_init": student_init(teacher, cfg.student),
            "data_sha256": splits.sha256,
            "source_data_sha256": splits.sha256,
            "config_sha256": hashlib.sha256(config_yaml.encode()).hexdigest(),
            **{f"data_file_sha256.{k}": v for k, v in splits.file_sha256.items()},
            **tracking.code_version(),
            **tracking.library_versions(),
        }
        mlflow.set_tags(lineage)
        mlflow.log_text(config_yaml, "config.yaml")
        mlflow.log_text(
            yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), "teacher_config.yaml"
        )
        mlflow.log_dict({"labels": splits.labels}, "labels.json")

        try:
            with graceful_stop() as stop:
                fit = _fit(
                    trained, train_loader, val_loader, optimizer, scheduler, device, cfg, soft, splits, stop
                )
                student.load_state_dict(fit["best_state"], strict=False)
                test = evaluate(student, test_loader, device, splits.labels)
                log_evaluation(test, "test")
                student.eval().to("cpu")
                served = LoadedModel(
                    name, "student", student, tokenizer, teacher.labels, max_length, "cpu", 0.0
                )

                # Student and teacher on the same held-out rows, and their speed in this process.
                measured = measure_pair(teacher, served, splits.test, cfg.cost)
                decision = decide_variant("student", measured, cfg.budget)
                metrics = {
                    **fit["best_val"].scalars("val"),
                    **test.scalars("test"),
                    "best_epoch": fit["best_epoch"],
                    "train_samples_per_second": fit["samples"] * (dist.world if dist else 1) / fit["seconds"],
                    "train_cpu_seconds": fit["cpu_seconds"],
                    "train_peak_memory_mb": fit["memory"].peak_mb,
                    "teacher_logits_seconds": soft["seconds"],
                    "teacher_test_macro_f1": measured["source"]["macro_f1"],
                    "teacher_test_accuracy": measured["source"]["accuracy"],
                    "agreement": measured["agreement"],
                    "speedup_batch": measured["speedup_batch"],
                    "speedup_single": measured["speedup_single"],
                }
                mlflow.log_metrics(metrics)
                mlflow.log_dict(decision.to_dict(), "gate/decision.json")
                stop.check()
                info = tracking.log_classifier(student, tokenizer, example=list(splits.test["text"][:2]))
                stop.check()
                reference_uri = log_held_out_reference(served, splits, name)
                stop.check()
        except KeyboardInterrupt:
            mlflow.end_run(status="KILLED")
            distributed.teardown(dist)
            raise InterruptedRun(
                f"the distillation was interrupted before registration; nothing was registered (MLflow run "
                f"{run.info.run_id} is marked KILLED)."
            ) from None

        tags = {
            **lineage,
            "run_id": run.info.run_id,
            REFERENCE_TAG: reference_uri,
            **{METRIC_TAG + k: f"{v:.6f}" for k, v in metrics.items() if k.startswith(("val_", "test_"))},
            "source.test_macro_f1": f"{measured['source']['macro_f1']:.6f}",
            "source.test_accuracy": f"{measured['source']['accuracy']:.6f}",
            **gate_tags(decision),
            **cost_tags(measured["variant_speed"], cfg.cost),
        }
        version = register_version(
            reg,
            name,
            info.model_uri,
            tags,
            CANDIDATE,
            reason=f"distilled from v{teacher_version} in run {run.info.run_id}; {decision.reason}",
            evidence={"gate": decision.evidence},
        )
        mlflow.set_tag("registered_version", f"{name}/{version}")
    distributed.teardown(dist)
    for key, value in cost_tags(measured["source_speed"], cfg.cost).items():
        reg.client.set_model_version_tag(name, teacher_version, key, value)
    promoted = False
    if cfg.promote and decision.promote:
        promoted = promote(reg, name, version, reason=f"distil --promote: {decision.reason}").allowed
    return DistilResult(name, teacher_version, version, run.info.run_id, decision, metrics, promoted)


# --- the steps ----------------------------------------------------------------------------------------


def _resolve(reg, name: str, teacher: str) -> str:
    from champion.registry import registered_model

    if teacher.isdigit():
        return teacher
    registered_model(reg, name)  # an unknown model gets its own sentence
    aliases = reg.audit.aliases(name)  # what the loop approved, not an alias set only in MLflow
    if teacher not in aliases:
        raise ChampionError(
            f"teacher: '{name}' has no alias '{teacher}' (it has {', '.join(sorted(aliases)) or 'none'}); "
            "name a version number or an alias it has."
        )
    return aliases[teacher]


def teacher_outputs(teacher: LoadedModel, splits: Splits, progress: bool = False) -> dict:
    """The teacher's logits and pooled last hidden states for every training row, in row order.

    Computed once per (teacher, training rows) and kept under CHAMPION_HOME/cache/teacher, so a second
    student of the same teacher (another temperature, another size) skips the teacher's forward passes.
    """
    from champion.config import champion_home
    from pipelines.data import content_sha256

    key = content_sha256(splits.train)[:16]
    folder = champion_home() / "cache" / "teacher" / teacher.name / teacher.version / key
    if (folder / "logits.npy").exists() and (folder / "pooled.npy").exists():
        return {
            "logits": np.load(folder / "logits.npy"),
            "pooled": np.load(folder / "pooled.npy"),
            "seconds": 0.0,
        }
    texts = splits.train["text"].astype(str).tolist()
    started = time.perf_counter()
    logits, pooled = [], []
    step = 128
    for start in progress_bar(range(0, len(texts), step), "teacher logits", disable=not progress):
        seen = teacher.describe(texts[start : start + step], batch_size=32)  # one forward pass for both
        logits.append(seen["logits"])
        pooled.append(seen["embeddings"])
    out = {"logits": np.concatenate(logits), "pooled": np.concatenate(pooled)}
    folder.mkdir(parents=True, exist_ok=True)
    for key_, value in out.items():
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".npy", delete=False) as tmp:
            np.save(tmp, value.astype(np.float32))
        Path(tmp.name).replace(folder / f"{key_}.npy")  # a reader never sees half a file
    return {**out, "seconds": time.perf_counter() - started}


def build_student(teacher: LoadedModel, cfg: StudentConfig, labels: list[str]):
    """The student network: the teacher cut to `keep_layers` (weights copied), or a fresh head on `base`."""
    import copy

    import torch

    from pipelines.model import load_classifier, load_tokenizer

    if cfg.init == "base":
        if not cfg.base:
            raise ChampionError("student.base: init=base needs an encoder to start from; set student.base.")
        vocab, teacher_vocab = load_tokenizer(cfg.base).get_vocab(), teacher.tokenizer.get_vocab()
        if vocab != teacher_vocab:
            differ = sum(1 for token, i in vocab.items() if teacher_vocab.get(token) != i)
            raise ChampionError(
                f"student.base: '{cfg.base}' reads text with another tokenizer than the teacher's "
                f"({len(vocab)} tokens against {len(teacher_vocab)}, {differ} of them different), so "
                "it cannot learn from the teacher's logits; pick an encoder with the teacher's "
                "vocabulary, or init: layers."
            )
        return _smaller(
            load_classifier(cfg.base, labels), source=teacher.model, what=f"student.base: '{cfg.base}'"
        )
    source = teacher.model
    layers = source.base_model.encoder.layer
    keep = kept_layers(len(layers), cfg)
    if not keep or any(i < 0 or i >= len(layers) for i in keep) or len(set(keep)) != len(keep):
        raise ChampionError(
            f"student.keep_layers: {keep} must name distinct layers of the teacher's 0..{len(layers) - 1}; "
            "e.g. [0, 2, 4]."
        )
    student = copy.deepcopy(source).float()
    student.base_model.encoder.layer = torch.nn.ModuleList(
        [student.base_model.encoder.layer[i] for i in keep]
    )
    student.config.num_hidden_layers = len(keep)
    for i, layer in enumerate(student.base_model.encoder.layer):  # attention caches index by position
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    return _smaller(student, source=source, what=f"student.keep_layers: {keep}")


def kept_layers(teacher_layers: int, cfg: StudentConfig) -> list[int]:
    return cfg.keep_layers if cfg.keep_layers is not None else list(range(0, teacher_layers, 2))


def student_init(teacher: LoadedModel, cfg: StudentConfig) -> str:
    """Where the student started, for its tags: `layers:0,2,4` of the teacher, or `base:NAME`."""
    if cfg.init == "base":
        return f"base:{cfg.base}"
    return "layers:" + ",".join(map(str, kept_layers(teacher.model.config.num_hidden_layers, cfg)))


def _smaller(student, source, what: str):
    """`student`, if it has fewer parameters than its teacher: a student as large serves no cheaper."""
    (_, size), (_, teacher_size) = count_parameters(student), count_parameters(source)
    if size >= teacher_size:
        raise ChampionError(
            f"{what} gives a student of {size:,} parameters, not fewer than the teacher's {teacher_size:,}; "
            "keep fewer layers (student.keep_layers) or start from a smaller student.base."
        )
    return student.train()


def distillation_loss(student_out, labels, teacher_logits, teacher_pooled, mask, loss: LossConfig):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels) (+ hidden_weight * pooled MSE)."""
    import torch.nn.functional as F

    t = loss.temperature
    logits = student_out.logits.float()
    kl = F.kl_div(
        F.log_softmax(logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1), reduction="batchmean",
        log_target=True,
    ) * (t * t)  # fmt: skip
    ce = F.cross_entropy(logits, labels)
    total = loss.alpha * kl + (1 - loss.alpha) * ce
    if loss.hidden_weight > 0:
        hidden = student_out.hidden_states[-1].float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        total = total + loss.hidden_weight * F.mse_loss(pooled, teacher_pooled)
    return total, kl.detach(), ce.detach()


def _fit(
    student, train_loader, val_loader, optimizer, scheduler, device, cfg: DistilConfig, soft, splits, stop
):
    """Train, evaluating after every epoch; keep the best epoch by `cfg.train.metric`."""
    import mlflow
    import torch

    net = getattr(student, "module", student)  # `student` may be DDP-wrapped: it trains, `net` is evaluated
    log = mlflow.active_run() is not None  # only rank 0 holds a run
    teacher_logits = torch.from_numpy(soft["logits"])
    teacher_pooled = torch.from_numpy(soft["pooled"])
    best_val, best_epoch, best_state = None, 0, None
    samples, seconds, cpu_seconds = 0, 0.0, 0.0
    memory = MemoryTracker(device.type)
    for epoch in range(1, cfg.train.epochs + 1):
        student.train()
        if hasattr(train_loader.sampler, "set_epoch"):  # a DistributedSampler: a new shuffle each epoch
            train_loader.sampler.set_epoch(epoch)
        started, cpu_started = time.perf_counter(), time.process_time()
        totals = torch.zeros(3)
        bar = progress_bar(train_loader, f"distil {epoch}/{cfg.train.epochs}", disable=not cfg.train.progress)
        with memory if epoch == 1 else contextlib.nullcontext():
            for batch in bar:
                rows = batch.pop("row")
                labels = batch.pop("labels").to(device.type)
                batch = {k: v.to(device.type) for k, v in batch.items()}
                with torch.autocast(
                    device.type, dtype=device.autocast_dtype, enabled=device.autocast_dtype is not None
                ):
                    out = student(**batch, output_hidden_states=cfg.loss.hidden_weight > 0)
                loss, kl, ce = distillation_loss(
                    out,
                    labels,
                    teacher_logits[rows].to(device.type),
                    teacher_pooled[rows].to(device.type),
                    batch["attention_mask"],
                    cfg.loss,
                )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm, foreach=True)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                totals += torch.stack([loss.detach().cpu(), kl.cpu(), ce.cpu()]) * len(rows)
                samples += len(rows)
                stop.check()
        seconds += time.perf_counter() - started
        cpu_seconds += time.process_time() - cpu_started
        val = evaluate(net, val_loader, device, splits.labels)
        n = max(
            1, len(train_loader.sampler) if train_loader.sampler is not None else len(train_loader.dataset)
        )
        loss_, kl_, ce_ = (totals / n).tolist()
        if log:
            mlflow.log_metrics(
                {"train_loss": loss_, "train_kl": kl_, "train_ce": ce_, **val.scalars("val")}, step=epoch
            )
        if cfg.train.progress:
            print(
                f"epoch {epoch}/{cfg.train.epochs}: loss {loss_:.4f} (kl {kl_:.4f}, ce {ce_:.4f}), "
                f"val_accuracy {val.accuracy:.4f}, val_macro_f1 {val.macro_f1:.4f}",
                flush=True,
            )
        if best_val is None or getattr(val, cfg.train.metric) > getattr(best_val, cfg.train.metric):
            best_val, best_epoch, best_state = val, epoch, trainable_state(net)
        elif cfg.train.early_stopping_patience and epoch - best_epoch >= cfg.train.early_stopping_patience:
            break
        stop.check()
    return {
        "best_val": best_val,
        "best_epoch": best_epoch,
        "best_state": best_state,
        "samples": samples,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "memory": memory,
    }
