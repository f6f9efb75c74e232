"""Evaluate a classifier on a split: accuracy, macro-F1, per-class metrics, confusion matrix."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    macro_f1: float
    labels: list[str]
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support
    confusion: np.ndarray  # rows: true label, columns: predicted label

    def scalars(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_loss": self.loss,
            f"{prefix}_accuracy": self.accuracy,
            f"{prefix}_macro_f1": self.macro_f1,
        }

    def per_class_f1(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}.{_metric_safe(label)}": m["f1"] for label, m in self.per_class.items()}


def _metric_safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", label)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], loss: float = float("nan")
) -> Evaluation:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, average=None, zero_division=0
    )
    present = support > 0  # macro-F1 over the classes that occur in this split
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    return Evaluation(
        loss=float(loss),
        accuracy=float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        labels=labels,
        per_class=per_class,
        confusion=confusion_matrix(y_true, y_pred, labels=ids),
    )


def evaluate(model, loader, device, labels: list[str]) -> Evaluation:
    import torch

    model.eval()
    preds, golds, total_loss, batches = [], [], 0.0, 0
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(device.type) for k, v in batch.items()}
            with torch.autocast(
                device.type, dtype=device.autocast_dtype, enabled=device.autocast_dtype is not None
            ):
                out = model(**batch)
            total_loss += out.loss.item()
            batches += 1
            preds.append(out.logits.argmax(-1).cpu())
            golds.append(batch["labels"].cpu())
    y_pred = torch.cat(preds).numpy()
    y_true = torch.cat(golds).numpy()
    return classification_metrics(y_true, y_pred, labels, total_loss / max(1, batches))


def confusion_figure(evaluation: Evaluation, title: str):
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in notebooks and headless runs
    import matplotlib.pyplot as plt

    n = len(evaluation.labels)
    size = min(4 + n * 0.25, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(evaluation.confusion, cmap="Blues")
    ax.set_xticks(range(n), evaluation.labels, rotation=90, fontsize=max(4, 10 - n // 10))
    ax.set_yticks(range(n), evaluation.labels, fontsize=max(4, 10 - n // 10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: accuracy {evaluation.accuracy:.3f}, macro-F1 {evaluation.macro_f1:.3f}")
    if n <= 30:
        for (i, j), v in np.ndenumerate(evaluation.confusion):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    return fig


def log_evaluation(evaluation: Evaluation, split: str) -> None:
    """Log per-class metrics (JSON and metrics) and the confusion matrix image to the active MLflow run."""
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_metrics(evaluation.per_class_f1(f"{split}_f1"))
    mlflow.log_dict(
        {
            "labels": evaluation.labels,
            "per_class": evaluation.per_class,
            "confusion": evaluation.confusion.tolist(),
        },
        f"{split}_metrics.json",
    )
    fig = confusion_figure(evaluation, split)
    mlflow.log_figure(fig, f"{split}_confusion_matrix.png")
    plt.close(fig)
