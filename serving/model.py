"""One registered model version, loaded straight from the MLflow registry and ready to answer batches."""

from __future__ import annotations

import fcntl
import logging
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from champion.errors import ChampionError

log = logging.getLogger(__name__)

# One forward pass at a time per process (see LoadedModel.predict_proba); re-entrant for nested calls.
FORWARD_LOCK = threading.RLock()
# Tokenisation from several threads at once (batching.in_flight > 1): a fast tokenizer re-applies its
# padding and truncation settings on every call, which can fail while another thread encodes
# ("Already borrowed").
TOKENIZE_LOCK = threading.Lock()
_FORWARD_THREAD: dict[str, Any] = {"executor": None}
FORWARD_THREAD_NAME = "champion-forward"


def serve_forwards_from_one_thread(threads: int) -> None:
    """From now on, run every forward pass of this process on one dedicated thread.

    A server's forward passes come from several threads (BentoML's worker pool, the follower's warm-up).
    Each thread that calls torch gets its own OpenMP team. With more OpenMP threads than cores, libgomp
    spins for far less time before sleeping, so the threads sleep and wake between the many small parallel
    regions of a small encoder. Measured on 2 cores: 176 texts/s from one thread against 146 from a second
    thread of the same process, at 1.98 against 1.65 busy cores.
    """
    import torch

    with FORWARD_LOCK:
        if _FORWARD_THREAD["executor"] is None:
            _FORWARD_THREAD["executor"] = ThreadPoolExecutor(
                1,
                thread_name_prefix=FORWARD_THREAD_NAME,
                initializer=torch.set_num_threads,
                initargs=(threads,),
            )


def on_forward_thread(fn):
    """`fn()` on the forward thread when the server set one up, else here under FORWARD_LOCK."""
    executor = _FORWARD_THREAD["executor"]
    if executor is None or threading.current_thread().name.startswith(FORWARD_THREAD_NAME):
        with FORWARD_LOCK:
            return fn()
    return executor.submit(fn).result()


WARMUP_TEXTS = ["warm up", "a slightly longer sentence to warm up the model before it takes traffic"]


@dataclass(frozen=True)
class LoadedModel:
    """A model version in memory: tokenizer, network, its labels and how long texts may be."""

    name: str
    version: str
    model: Any  # a transformers model in eval mode (safetensors, int8) or an ONNX Runtime session (onnx*)
    tokenizer: Any
    labels: tuple[str, ...]
    max_tokens: int
    device: str
    load_seconds: float
    format: str = "safetensors"  # champion.formats.FORMATS

    @property
    def onnx(self) -> bool:
        return self.format.startswith("onnx")

    def predict_proba(self, texts: list[str], chunk: int = 0):
        """Class probabilities, one row per text (a float32 numpy array).

        With `chunk`, texts run in length-sorted groups of that size: on a CPU, small batches of similar
        length beat one large padded batch (measured in benchmarks/serving.py). Every group is tokenised
        first, in the caller's thread; then the forward passes run one batch at a time (on the server's
        forward thread, else under FORWARD_LOCK), so batches of other threads overlap their tokenisation
        and answers with this one's matrix products, never their matrix products with each other (each
        already uses every core it is given).
        """
        import numpy as np

        if not chunk or len(texts) <= chunk:
            groups = [list(range(len(texts)))]
        else:
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            groups = [order[s : s + chunk] for s in range(0, len(order), chunk)]
        encoded = [self._encode([texts[i] for i in group], "np" if self.onnx else "pt") for group in groups]
        rows = on_forward_thread(lambda: [self._probs(enc) for enc in encoded])
        if len(groups) == 1:
            return rows[0]
        out = np.empty((len(texts), rows[0].shape[1]), dtype=rows[0].dtype)
        out[np.concatenate(groups)] = np.concatenate(rows)
        return out

    def _probs(self, enc):
        if self.onnx:
            return _softmax(self._run_onnx(enc, ["logits"])[0])
        import torch

        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            logits = self.model(**enc).logits
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def logits(self, texts: list[str]):
        """The raw scores (float32 numpy, one row per text) before the softmax: what distillation needs."""
        if self.onnx:
            enc = self._encode(texts, "np")
            return on_forward_thread(lambda: self._run_onnx(enc, ["logits"])[0].astype("float32"))
        import torch

        enc = {k: v.to(self.device) for k, v in self._encode(texts, "pt").items()}

        def forward():
            with torch.inference_mode():
                return self.model(**enc).logits.float().cpu().numpy()

        return on_forward_thread(forward)

    def _encode(self, texts: list[str], tensors: str):
        with TOKENIZE_LOCK:
            return self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors=tensors,
                return_token_type_ids=True,
            )

    def _run_onnx(self, enc, outputs: list[str]):
        import numpy as np

        from champion.formats import ONNX_INPUTS

        feed = {k: np.asarray(enc[k], dtype=np.int64) for k in ONNX_INPUTS}
        return self.model.run(outputs, feed)

    def describe(self, texts: list[str], batch_size: int = 32) -> dict[str, Any]:
        """What monitoring needs of `texts`, from the forward pass the server runs.

        Returns float32 arrays: `probs` and `logits` (one row per text), `embeddings` (the encoder's last
        hidden state, mean-pooled over real tokens), and per text `tokens` (count, special tokens included,
        after truncation) and `unk_share` (the share of its word-piece tokens that are the unknown token).
        """
        import numpy as np

        unk = self.tokenizer.unk_token_id
        probs, embeddings, tokens, unk_share, all_logits = [], [], [], [], []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        for start in range(0, len(texts), batch_size):
            enc = self._encode([texts[i] for i in order[start : start + batch_size]], "pt")
            mask = enc["attention_mask"]
            lengths = mask.sum(dim=1)
            unks = ((enc["input_ids"] == unk) & mask.bool()).sum(dim=1) if unk is not None else 0 * lengths
            logits, pooled = on_forward_thread(partial(self._logits_and_pooled, enc))
            all_logits.append(logits)
            probs.append(_softmax(logits))
            embeddings.append(pooled)
            tokens.append(lengths.numpy())
            unk_share.append((unks / (lengths - 2).clamp(min=1)).float().numpy())  # [CLS] and [SEP] aside
        if not texts:
            width = len(self.labels)
            return {"probs": np.zeros((0, width), np.float32), "embeddings": np.zeros((0, 0), np.float32),
                    "tokens": np.zeros(0, np.int64), "unk_share": np.zeros(0, np.float32),
                    "logits": np.zeros((0, width), np.float32)}  # fmt: skip
        back = np.argsort(order)  # rows in the order of `texts` again
        return {
            "probs": np.concatenate(probs)[back],
            "embeddings": np.concatenate(embeddings)[back],
            "tokens": np.concatenate(tokens)[back],
            "unk_share": np.concatenate(unk_share)[back],
            "logits": np.concatenate(all_logits)[back],
        }

    def _logits_and_pooled(self, enc):
        """Logits and the last hidden state mean-pooled over real tokens, as float32 numpy arrays."""
        import numpy as np
        import torch

        if self.onnx:  # the graph's second output is the same masked mean of the last hidden state
            logits, pooled = self._run_onnx({k: v.numpy() for k, v in enc.items()}, ["logits", "pooled"])
            return logits.astype(np.float32), pooled.astype(np.float32)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            out = self.model(**enc, output_hidden_states=True)
        weights = enc["attention_mask"].unsqueeze(-1).to(out.hidden_states[-1].dtype)
        pooled = (out.hidden_states[-1] * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return out.logits.float().cpu().numpy(), pooled.float().cpu().numpy()

    def warm(self) -> None:
        """Run a couple of batches so the first real request does not pay for lazy initialisation."""
        for size in (1, 8):
            self.predict_proba((WARMUP_TEXTS * size)[:size])


def _softmax(logits):
    import numpy as np

    z = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def load_version(client, name: str, version: str, device: str = "auto", max_tokens: int | None = None):
    """Load `models:/name/version` in the format its tags record (no pickle in any of them) and warm it.

    Its files come through `checked_folder` (allowlist, contents, digest) and are read with plain
    transformers / ONNX Runtime calls, never MLflow's loader. `device` applies to safetensors versions; int8
    and ONNX versions run on the CPU (their formats are CPU formats: torch's dynamic int8 kernels, ONNX
    Runtime's CPU provider)."""
    import torch

    from champion.formats import load_transformers
    from champion.registry import TEXT_CLASSIFICATION

    started = time.perf_counter()
    folder, fmt, mv = checked_folder(client, name, str(version), task=TEXT_CLASSIFICATION)
    if max_tokens is None:
        max_tokens = _trained_max_length(client, mv.run_id)
    if fmt != "safetensors":
        loaded = load_variant(name, str(version), fmt, folder, max_tokens)
        loaded.warm()
        object.__setattr__(loaded, "load_seconds", time.perf_counter() - started)
        log.info("loaded %s v%s (%s) in %.2f s", name, version, fmt, loaded.load_seconds)
        return loaded
    kind = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    try:
        model, tokenizer = load_transformers(folder, f"version {version} of '{name}'")
    except ChampionError:
        raise
    except Exception as err:
        raise ChampionError(f"version {version} of '{name}' could not be loaded: {err}") from err
    model = model.to(kind).eval()
    if kind == "cuda" and torch.cuda.is_bf16_supported():
        model = model.to(torch.bfloat16)
    id2label = model.config.id2label
    labels = tuple(str(id2label[i]) for i in range(len(id2label)))
    loaded = LoadedModel(
        name, str(version), model, tokenizer, labels, max_tokens, kind, time.perf_counter() - started
    )
    loaded.warm()
    object.__setattr__(loaded, "load_seconds", time.perf_counter() - started)
    log.info("loaded %s v%s on %s in %.2f s", name, version, kind, loaded.load_seconds)
    return loaded


def checked_folder(client, name: str, version: str, task: str | None = None):
    """(folder, format, model version): the one way to a registered version's files.

    Downloaded once into the local cache, then checked on every call before a byte is parsed as a model:
    only safe file types, no JSON or MLmodel field that names code or a path outside the version, and the
    sha256 recorded at registration (champion/safety.py). A refused folder is deleted from the cache, so no
    later call (or a second version pointing at it) finds its files there. With `task`, a version of another
    task (`task_of`) is refused before anything is downloaded.
    """
    from champion.formats import format_of
    from champion.safety import UnsafeModelError, check_version_folder

    mv = client.get_model_version(name, str(version))
    tags = dict(mv.tags)
    where = f"version {version} of '{name}'"
    if task is not None and task_of(tags) != task:
        raise ChampionError(
            f"{where} is a {task_of(tags)} version; this loader takes only {task} versions, so load it with "
            f"{_TASK_LOADERS.get(task_of(tags), 'the loader of its task')}."
        )
    try:
        fmt = format_of(tags)
    except ChampionError as err:
        raise ChampionError(f"{where} could not be loaded: {err}") from None
    target = _cache_folder(name, str(version), mv.source)
    # The workers of one server load the same version at the same moment: one downloads, the others wait.
    with open(target.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            _download_into(
                name, str(version), target, lambda folder: check_version_folder(folder, fmt, tags, where)
            )
            return target, fmt, mv
        try:
            check_version_folder(target, fmt, tags, where)  # again: the cache is a folder anyone may write
        except UnsafeModelError:
            shutil.rmtree(target, ignore_errors=True)
            raise
    return target, fmt, mv


def _cache_folder(name: str, version: str, source: str) -> Path:
    """Where a version's files are cached, keyed by its source too: a version number freed by a deleted
    version and used again never finds the old files."""
    import hashlib

    from champion.config import champion_home

    key = hashlib.sha256(source.encode()).hexdigest()[:12]
    target = champion_home() / "cache" / "models" / name / f"{version}-{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def task_of(tags: dict[str, str]) -> str:
    """What a version does, from its tags: versions registered before the `task` tag are classifiers."""
    from champion.registry import TASK_TAG, TEXT_CLASSIFICATION

    return tags.get(TASK_TAG, TEXT_CLASSIFICATION)


_TASK_LOADERS = {
    "text-classification": "serving.model.load_version",
    "text-generation": "serving.lm_model.load_generative_version",
}


def _download_into(name: str, version: str, target: Path, check) -> None:
    download_checked(f"models:/{name}/{version}", target, check, f"version {version} of '{name}'")


def download_checked(uri: str, target: Path, check, where: str) -> None:
    """Download `uri` into a temporary folder beside `target`, `check` it there, and only then move it to
    `target`: a refused download is removed with the temporary folder and never becomes a cached
    `.complete` folder."""
    import mlflow

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp))
        except Exception as err:
            raise ChampionError(f"{where} could not be downloaded: {err}") from err
        check(local)
        (local / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        local.rename(target)


def load_variant(name: str, version: str, fmt: str, folder, max_tokens: int) -> LoadedModel:
    """A model stored as `int8` or `onnx`/`onnx-int8` (see champion/formats.py), read from `folder`."""
    import json

    from transformers import AutoTokenizer

    from champion.formats import LOCAL_ONLY, load_int8, onnx_session

    folder = Path(folder)
    try:
        if fmt == "int8":
            model = load_int8(folder)
            tokenizer = AutoTokenizer.from_pretrained(str(folder), **LOCAL_ONLY)
            id2label = model.config.id2label
        else:
            files = folder / "extra_files" if (folder / "extra_files").is_dir() else folder
            graphs = sorted(folder.glob("*.onnx"))
            if not graphs:
                raise ChampionError(f"no .onnx file in {folder}")
            model = onnx_session(graphs[0])
            tokenizer = AutoTokenizer.from_pretrained(str(files), **LOCAL_ONLY)
            config = json.loads((files / "config.json").read_text())
            id2label = {int(k): v for k, v in config["id2label"].items()}
    except ChampionError as err:
        raise ChampionError(f"version {version} of '{name}' ({fmt}) could not be loaded: {err}") from None
    except Exception as err:
        raise ChampionError(f"version {version} of '{name}' ({fmt}) could not be loaded: {err}") from err
    labels = tuple(str(id2label[i]) for i in range(len(id2label)))
    return LoadedModel(name, version, model, tokenizer, labels, max_tokens, "cpu", 0.0, fmt)


def _trained_max_length(client, run_id: str | None, default: int = 128) -> int:
    """Serve with the truncation the version was trained with, so train and serve see the same tokens."""
    if not run_id:
        return default
    try:
        return int(client.get_run(run_id).data.params.get("model.max_length", default))
    except Exception:  # a version registered from outside Champion may have no such run
        return default
