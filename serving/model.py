"""One registered model version, loaded straight from the MLflow registry and ready to answer batches."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from champion.errors import ChampionError

log = logging.getLogger(__name__)

WARMUP_TEXTS = ["warm up", "a slightly longer sentence to warm up the model before it takes traffic"]


@dataclass(frozen=True)
class LoadedModel:
    """A model version in memory: tokenizer, network, its labels and how long texts may be."""

    name: str
    version: str
    model: Any  # transformers PreTrainedModel, eval mode
    tokenizer: Any
    labels: tuple[str, ...]
    max_tokens: int
    device: str
    load_seconds: float

    def predict_proba(self, texts: list[str], chunk: int = 0):
        """Class probabilities, one row per text (a float32 numpy array).

        With `chunk`, texts run in length-sorted groups of that size: on a CPU, small batches of similar
        length beat one large padded batch (measured in benchmarks/serving.py).
        """
        import numpy as np

        if not chunk or len(texts) <= chunk:
            return self._forward(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        rows = np.concatenate([self._forward([texts[i] for i in order[s : s + chunk]])
                               for s in range(0, len(order), chunk)])  # fmt: skip
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def _forward(self, texts: list[str]):
        import torch

        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            logits = self.model(**enc).logits
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def describe(self, texts: list[str], batch_size: int = 32) -> dict[str, Any]:
        """What monitoring needs of `texts`, from the forward pass the server runs.

        Returns float32 arrays: `probs` (one row per text), `embeddings` (the encoder's last hidden state,
        mean-pooled over real tokens), and per text `tokens` (count, special tokens included, after
        truncation) and `unk_share` (the share of its word-piece tokens that are the unknown token).
        """
        import numpy as np
        import torch

        unk = self.tokenizer.unk_token_id
        probs, embeddings, tokens, unk_share = [], [], [], []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                [texts[i] for i in order[start : start + batch_size]],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            mask = enc["attention_mask"]
            lengths = mask.sum(dim=1)
            unks = ((enc["input_ids"] == unk) & mask.bool()).sum(dim=1) if unk is not None else 0 * lengths
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode():
                out = self.model(**enc, output_hidden_states=True)
            weights = enc["attention_mask"].unsqueeze(-1).to(out.hidden_states[-1].dtype)
            pooled = (out.hidden_states[-1] * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
            probs.append(torch.softmax(out.logits.float(), dim=-1).cpu().numpy())
            embeddings.append(pooled.float().cpu().numpy())
            tokens.append(lengths.numpy())
            unk_share.append((unks / (lengths - 2).clamp(min=1)).float().numpy())  # [CLS] and [SEP] aside
        if not texts:
            width = len(self.labels)
            return {"probs": np.zeros((0, width), np.float32), "embeddings": np.zeros((0, 0), np.float32),
                    "tokens": np.zeros(0, np.int64), "unk_share": np.zeros(0, np.float32)}  # fmt: skip
        back = np.argsort(order)  # rows in the order of `texts` again
        return {
            "probs": np.concatenate(probs)[back],
            "embeddings": np.concatenate(embeddings)[back],
            "tokens": np.concatenate(tokens)[back],
            "unk_share": np.concatenate(unk_share)[back],
        }

    def warm(self) -> None:
        """Run a couple of batches so the first real request does not pay for lazy initialisation."""
        for size in (1, 8):
            self.predict_proba((WARMUP_TEXTS * size)[:size])


def load_version(client, name: str, version: str, device: str = "auto", max_tokens: int | None = None):
    """Load `models:/name/version` with the transformers flavour (safetensors; no pickle) and warm it."""
    import mlflow
    import torch

    started = time.perf_counter()
    mv = client.get_model_version(name, str(version))
    if max_tokens is None:
        max_tokens = _trained_max_length(client, mv.run_id)
    kind = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    flavor_log = logging.getLogger("mlflow.transformers")
    level = flavor_log.level
    flavor_log.setLevel(logging.ERROR)  # offline it warns about the hub's model card; irrelevant here
    try:
        parts = mlflow.transformers.load_model(f"models:/{name}/{version}", return_type="components")
    except Exception as err:
        raise ChampionError(f"version {version} of '{name}' could not be loaded: {err}") from err
    finally:
        flavor_log.setLevel(level)
    model = parts["model"].to(kind).eval()
    if kind == "cuda" and torch.cuda.is_bf16_supported():
        model = model.to(torch.bfloat16)
    id2label = model.config.id2label
    labels = tuple(str(id2label[i]) for i in range(len(id2label)))
    loaded = LoadedModel(
        name, str(version), model, parts["tokenizer"], labels, max_tokens, kind, time.perf_counter() - started
    )
    loaded.warm()
    object.__setattr__(loaded, "load_seconds", time.perf_counter() - started)
    log.info("loaded %s v%s on %s in %.2f s", name, version, kind, loaded.load_seconds)
    return loaded


def _trained_max_length(client, run_id: str | None, default: int = 128) -> int:
    """Serve with the truncation the version was trained with, so train and serve see the same tokens."""
    if not run_id:
        return default
    try:
        return int(client.get_run(run_id).data.params.get("model.max_length", default))
    except Exception:  # a version registered from outside Champion may have no such run
        return default
