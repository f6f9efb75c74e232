"""The formats a registered classifier can be stored and served in, and how each is written and read.

- `safetensors`: the transformers flavour, fp32 weights (what fine-tuning and distillation register).
- `int8`: dynamic int8 quantization in torch (int8 weights, per output channel scales; activations are
  quantized per batch at run time). Stored as plain tensors in a safetensors file and rebuilt on load:
  no pickle, and the quantized modules never go through `torch.save`.
- `onnx` / `onnx-int8`: an ONNX graph (the MLflow onnx flavour) run by ONNX Runtime with its graph
  optimisations on; `onnx-int8` is ONNX Runtime's own dynamic quantization (int8, per channel).
- `causal-lm` / `lora` (generative versions): a whole causal language model in safetensors, or a peft LoRA
  adapter (`adapter_model.safetensors`) put on a base Champion loads itself (`load_causal_lm_files`,
  `load_lora_adapter`). A causal LM's `int8` copy is the same int8 format (its `champion_format.json` says
  `task: text-generation`, so it is rebuilt as a causal LM).
- `gguf` (generative versions): one `model.gguf` (llama.cpp's format, e.g. Q8_0) with the tokenizer's files
  beside it, written by `pipelines/lm_compress.py` for llama.cpp / Ollama; Champion reads it back with
  transformers, which dequantizes it to float (`load_gguf`).

Every format gives the same two outputs the service and the drift monitor need: the logits and the
encoder's last hidden state mean-pooled over real tokens.

Why torch.ao for `int8` and not torchao: on torch 2.13, torchao's `quantize_` is fast only under
`torch.compile` (a 54 s compile per process and a recompile per new shape), and eager it is slower than
fp32 (0.52x at batch 1, measured in ../shared/docs/COMPRESS.md §1b); `torch.ao.quantization.quantize_dynamic`
is deprecated but ships in 2.13, runs eager at 1.7x and needs no compile. Its label agreement is lower, which
is why every variant is gated on its measured agreement with its source before it can be promoted.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

from champion.errors import ChampionError
from champion.safety import ADAPTER_CONFIG, GGUF_FILE, INT8_FILE, transformers_folders

FORMAT_TAG = "format"
VARIANT_TAG = "variant"  # student | int8 | onnx | onnx-int8 | gguf-q8_0
SOURCE_TAG = "source_version"
FORMATS = ("safetensors", "int8", "onnx", "onnx-int8", "causal-lm", "lora", "gguf")
COMPRESSED = ("int8", "onnx", "onnx-int8")
FORMAT_FILE = "champion_format.json"
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_OUTPUTS = ("logits", "pooled")
# Every from_pretrained of a registered version: its own files only, transformers' own classes only.
LOCAL_ONLY = {"local_files_only": True, "trust_remote_code": False}


def format_of(tags: dict[str, str]) -> str:
    """The storage format of a version from its tags; versions from before formats existed are safetensors."""
    fmt = tags.get(FORMAT_TAG, "safetensors")
    if fmt not in FORMATS:
        raise ChampionError(
            f"the version's '{FORMAT_TAG}' tag says '{fmt}', which is none of {', '.join(FORMATS)}."
        )
    return fmt


@contextlib.contextmanager
def _quiet():
    """torch.ao.quantization and the TorchScript ONNX exporter warn that they are deprecated, and the tracer
    that shape checks become constants (true of the padded example it traces); we know."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --- safetensors (the transformers flavour) -----------------------------------------------------------


def load_transformers(folder, where: str):
    """(model, tokenizer) of a checked transformers-flavour folder: transformers' own classes only, from
    local safetensors files, never remote code."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    weights, tokens = transformers_folders(folder, where)
    tokenizer = AutoTokenizer.from_pretrained(str(tokens), **LOCAL_ONLY)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(weights), use_safetensors=True, **LOCAL_ONLY
    )
    return model, tokenizer


# --- causal language models and LoRA adapters -------------------------------------------------------


def load_causal_lm_files(folder, where: str, dtype=None):
    """(model, tokenizer) of a checked causal LM folder (see `champion.safety.check_files` with format
    `causal-lm`): transformers' own classes only, local safetensors files, never remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ChampionError(
            f"{where}: '{folder}' has no config.json, so it is not a transformers model folder."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **LOCAL_ONLY)
    extra = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, **extra, **LOCAL_ONLY)
    return model, tokenizer


def load_gguf(folder, where: str, dtype=None):
    """(model, tokenizer) of a checked `gguf` folder: the weights from its `model.gguf`, dequantized to float
    by transformers (read with the `gguf` package's memory-mapped reader: data, never code), the tokenizer
    from the tokenizer files beside it (the very files its source was served with)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / GGUF_FILE).is_file():
        raise ChampionError(f"{where}: '{folder}' has no {GGUF_FILE}, so it is not a GGUF version.")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **LOCAL_ONLY)
    extra = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_FILE, **extra, **LOCAL_ONLY)
    model.hf_quantizer = None  # the weights are float now; the GGUF "quantizer" only blocks save_pretrained
    return model, tokenizer


def load_lora_adapter(model, folder, where: str, trainable: bool = False):
    """`model` (a base Champion loaded itself) with the checked LoRA adapter in `folder` put on it.

    The adapter config's `base_model_name_or_path` is never followed: peft gets the base as an object."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ChampionError(
            f"{where}: '{folder}' has no {ADAPTER_CONFIG}, so it is not a peft adapter folder."
        )
    return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable, local_files_only=True)


# --- int8 in torch ------------------------------------------------------------------------------------


def _int8_targets(model, skip: tuple[str, ...]) -> dict[str, Any]:
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig

    return {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip)
    }


def quantize_int8(model, skip: tuple[str, ...] = ("classifier",)):
    """A copy of `model` with every nn.Linear (but those named in `skip`) as a dynamic int8 Linear."""
    import copy

    import torch
    from torch.ao.quantization import quantize_dynamic

    with _quiet():
        return quantize_dynamic(copy.deepcopy(model).eval(), _int8_targets(model, skip), dtype=torch.qint8)


def save_int8(quantized, skip: tuple[str, ...], folder: Path, task: str | None = None) -> None:
    """Write a `quantize_int8` model as plain tensors: int8 weights with their per-channel scales and zero
    points, fp32 biases and every other weight as it was, plus the transformers config. A weight tied to one
    already written (a causal LM's output layer and its embeddings) is written once; `task`
    "text-generation" makes `load_int8` rebuild a causal LM."""
    import torch
    from safetensors.torch import save_file
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    tensors: dict[str, torch.Tensor] = {}
    quantized_names = []
    for name, module in quantized.named_modules():
        if isinstance(module, QLinear):
            w = module.weight()
            tensors[f"{name}.weight_int8"] = w.int_repr().contiguous()
            tensors[f"{name}.weight_scale"] = w.q_per_channel_scales().to(torch.float32).contiguous()
            tensors[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().to(torch.int64).contiguous()
            if module.bias() is not None:
                tensors[f"{name}.bias"] = module.bias().detach().contiguous()
            quantized_names.append(name)
    prefixes = tuple(n + "." for n in quantized_names)
    written: set[int] = set()
    for key, value in quantized.state_dict().items():
        if isinstance(value, torch.Tensor) and not key.startswith(prefixes) and not value.is_quantized:
            pointer = value.data_ptr() if value.numel() else None
            if pointer in written:  # tied to a weight written already: the skeleton ties it again on load
                continue
            if pointer is not None:
                written.add(pointer)
            tensors[key] = value.detach().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / INT8_FILE), metadata={"format": "int8", "scheme": "per_channel_affine"})
    quantized.config.save_pretrained(str(folder))
    meta = {"format": "int8", "quantized_modules": quantized_names, "skip": list(skip)}
    if task is not None:
        meta["task"] = task
    (folder / FORMAT_FILE).write_text(json.dumps(meta, indent=2))


def load_int8(folder: Path):
    """Rebuild a `save_int8` model: the architecture from its config, the tensors from its safetensors."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    meta = json.loads((folder / FORMAT_FILE).read_text())
    tensors = load_file(str(folder / INT8_FILE))
    config = AutoConfig.from_pretrained(str(folder), **LOCAL_ONLY)
    causal = meta.get("task") == "text-generation"  # a causal LM's copy (pipelines/lm_compress.py)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    # Built on the CPU (not the meta device): the embeddings' non-persistent buffers are made here.
    skeleton = auto.from_config(config).eval()
    modules = dict(skeleton.named_modules())
    missing = [n for n in meta["quantized_modules"] if n not in modules]
    if missing:
        raise ChampionError(f"the int8 model names modules its config does not have: {missing[:3]}.")
    plain = {
        k: v
        for k, v in tensors.items()
        if not k.endswith(("weight_int8", "weight_scale", "weight_zero_point"))
    }
    for name in meta["quantized_modules"]:
        plain.setdefault(f"{name}.weight", torch.zeros(modules[name].weight.shape))  # replaced below
    result = skeleton.load_state_dict(plain, strict=False)
    tied = _tied_to_loaded(skeleton, plain)
    if result.unexpected_keys or [
        k for k in result.missing_keys if not k.endswith("position_ids") and k not in tied
    ]:
        raise ChampionError(
            f"the int8 weights do not match the model's config (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})."
        )
    model = quantize_int8(skeleton, tuple(meta["skip"]))
    qmodules = dict(model.named_modules())
    for name in meta["quantized_modules"]:
        weight = torch._make_per_channel_quantized_tensor(
            tensors[f"{name}.weight_int8"],
            tensors[f"{name}.weight_scale"].double(),
            tensors[f"{name}.weight_zero_point"],
            0,
        )
        qmodules[name].set_weight_bias(weight, tensors.get(f"{name}.bias"))
    return model.eval()


def _tied_to_loaded(model, loaded: dict) -> set[str]:
    """State-dict keys that share their tensor with a key in `loaded` (tied weights: loaded through it)."""
    by_pointer: dict[int, list[str]] = {}
    for key, value in model.state_dict().items():
        by_pointer.setdefault(value.data_ptr(), []).append(key)
    return {k for keys in by_pointer.values() if any(x in loaded for x in keys) for k in keys}


# --- ONNX ---------------------------------------------------------------------------------------------


def export_onnx(model, tokenizer, path: Path, opset: int = 17) -> Path:
    """Export `model` to ONNX with two outputs: `logits` and `pooled` (last hidden state, masked mean).

    The TorchScript exporter (`dynamo=False`): 1 s, one file, and faster under ONNX Runtime than the
    dynamo exporter's graph (x2.8 against x2.3 at batch 1, ../shared/docs/COMPRESS.md §2). The example
    input is padded, so the traced graph has seen a real attention mask (tests compare it with torch on
    padded batches of other lengths).
    """
    import torch

    class _Outputs(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                output_hidden_states=True,
            )
            hidden = out.hidden_states[-1]
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return out.logits, (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    was_training = model.training
    wrapper = _Outputs(model.float().cpu()).eval()
    example = tokenizer(
        ["a short one", "a slightly longer example sentence so that the first is padded"],
        padding=True,
        return_tensors="pt",
        return_token_type_ids=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {n: {0: "batch", 1: "sequence"} for n in ONNX_INPUTS}
    try:
        with _quiet():
            torch.onnx.export(
                wrapper,
                tuple(example[n] for n in ONNX_INPUTS),
                str(path),
                input_names=list(ONNX_INPUTS),
                output_names=list(ONNX_OUTPUTS),
                opset_version=opset,
                dynamo=False,
                dynamic_axes={**axes, "logits": {0: "batch"}, "pooled": {0: "batch"}},
            )
    finally:
        model.train(was_training)  # the exporter leaves the module in the wrapper's mode
    return path


def quantize_onnx(source: Path, target: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantization, per output channel (92.6 % agreement on a random-ish
    head against 83.2 % per tensor, ../shared/docs/COMPRESS.md §2c)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "Please consider to run pre-processing before quantization"
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    return target


def onnx_session(path: Path, threads: int | None = None):
    """An ONNX Runtime session on the CPU with every graph optimisation on."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
