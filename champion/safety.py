"""Only model formats that cannot run code are registered, promoted and served.

A model version is accepted when every file in it is on an allowlist of data formats (safetensors, ONNX,
JSON, YAML, plain text) and its MLmodel names only the flavours Champion loads without executing anything
from the files: transformers (weights in safetensors), ONNX, and Champion's own int8 format. A pickle
(`.pkl`, `.pt`, `.bin`, ...), an MLflow `python_function` model with its own loader or code, or any other
file is refused before a byte of it is deserialised: the class of the pickle-loading CVEs in MLflow and
BentoML (CVE-2024-2912, CVE-2025-27520).

At registration the sha256 of every file is recorded in one digest (the version tag `champion.files_sha256`);
before the service loads a version, and before `champion promote` moves the alias to it, the files are
hashed again and a mismatch (a file changed after registration) is refused. A version without that tag is
refused too (deleting the tag would turn tamper detection off), unless CHAMPION_ALLOW_LEGACY_VERSIONS=1 lets
versions registered before digests existed through.

Allowed files are not enough: a `config.json` with an `auto_map` ("<folder or hub repo>--module.Class")
makes transformers import Python from outside the version, and an MLmodel whose `pipeline_model_type` is not
a transformers class makes MLflow load with `trust_remote_code=True`. So every JSON file and the MLmodel are
read as data and refused when a field could name code or a path outside the version (`check_contents`);
Champion then loads with plain transformers calls (`trust_remote_code=False`, local files only), never
through MLflow.

A causal language model (format `causal-lm`: config, `generation_config.json`, tokenizer, a chat template in
`chat_template.jinja`, weights in safetensors) and a peft LoRA adapter (format `lora`: `adapter_config.json`,
`adapter_model.safetensors`) are data in the same way. An adapter's config must say `peft_type: LORA` and name
no class or module to import (`auto_mapping`, `megatron_config`); its `base_model_name_or_path` is a label,
never loaded from it by Champion (the base is loaded by Champion and the adapter put on it).

A `gguf` version (llama.cpp's file format, written by `champion compress --to gguf-q8_0`) is one `model.gguf`,
tensors and typed key-value metadata that transformers reads as data with the `gguf` package, beside the
tokenizer's JSON files. `.gguf` is allowed in a `gguf` version only, and only as that one file; like every
version, its digest is checked before a byte of it is parsed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from champion.errors import ChampionError

DIGEST_TAG = "champion.files_sha256"
SAFE_SUFFIXES = frozenset({".safetensors", ".onnx", ".json", ".yaml", ".yml", ".txt", ".md"})
SAFE_NAMES = frozenset({"MLmodel", "registered_model_meta"})  # MLflow's own YAML files
# Not part of the digest: MLflow writes it into the model's folder when the version is registered.
UNHASHED = frozenset({"registered_model_meta", ".complete"})
_LOADERS = {
    "safetensors": "mlflow.transformers",
    "onnx": "mlflow.onnx",
    "onnx-int8": "mlflow.onnx",
    "causal-lm": "mlflow.transformers",
    "lora": "mlflow.transformers",
}
GENERATIVE = ("causal-lm", "lora")  # a whole causal LM; a LoRA adapter on a base named beside it
TEMPLATE_NAME = "chat_template.jinja"  # transformers 5 writes the chat template here, beside tokenizer_config
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# adapter_config.json fields that make peft import a module or class named in them when the adapter loads.
_ADAPTER_CODE_FIELDS = ("auto_mapping", "megatron_config")
LEGACY_ENV = "CHAMPION_ALLOW_LEGACY_VERSIONS"
INT8_FILE = "model.int8.safetensors"  # Champion's int8 format (champion/formats.py): the file a version needs
GGUF_FILE = "model.gguf"  # a `gguf` version's one model file (tensors and metadata, no code)
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
# Fields whose value transformers looks up as a class by name (AutoTokenizer, AutoProcessor, ...).
_CLASS_FIELDS = frozenset(
    {"feature_extractor_type", "image_processor_type", "video_processor_type", "processor_type"}
    | {"tokenizer_type"}
)
_PLAIN = re.compile(r"[a-z0-9][a-z0-9_\-]*")  # "absolute", "single_label_classification": no module, no path
_PATH_FIELDS = ("model_binary", "data", "model_path")  # MLmodel fields that name a file or folder to load
_COMPONENTS = frozenset({"tokenizer", "feature_extractor", "image_processor", "processor"})


class UnsafeModelError(ChampionError):
    """A model version whose files or flavour could run code when loaded, or whose files changed."""


def check_files(folder: str | Path, fmt: str, where: str) -> None:
    """Refuse (UnsafeModelError, one sentence) a model folder that is not made only of safe data files, or
    whose JSON files or MLmodel name code or a path outside it (see `check_contents`)."""
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise UnsafeModelError(
                f"{where}: '{rel}' is a symbolic link; model files must be plain files, so it is refused."
            )
        if path.name in SAFE_NAMES or path.name in UNHASHED or path.suffix.lower() in SAFE_SUFFIXES:
            continue
        if _is_chat_template(path):  # a Jinja template transformers renders in its sandbox: text, not code
            continue
        if fmt.startswith("onnx") and path.suffix.lower() == ".data":  # an ONNX graph's external tensors:
            continue  # raw bytes that ONNX Runtime maps, never unpickled
        if fmt == "gguf" and rel == GGUF_FILE:  # tensors and typed metadata, memory-mapped as data
            continue
        raise UnsafeModelError(
            f"{where}: '{rel}' is not a safe model file (allowed: {', '.join(sorted(SAFE_SUFFIXES))}); a "
            "pickle or code file could run on load, so this version is refused."
        )
    check_contents(folder, where)
    _check_flavours(folder, fmt, where)


def check_contents(folder: str | Path, where: str) -> None:
    """Refuse a folder whose JSON files could make transformers import code or read another folder: an
    `auto_map` anywhere, an unknown `model_type`, a `*_class` / `*_type` that is neither a transformers class
    nor a plain value. The files are read as JSON data only; nothing is imported."""
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*.json") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, RecursionError):
            raise UnsafeModelError(
                f"{where}: '{rel}' is not valid JSON, so what it would configure cannot be checked; refused."
            ) from None
        reason = adapter_refusal(data) if path.name == ADAPTER_CONFIG else json_refusal(data)
        if reason:
            raise UnsafeModelError(f"{where}: '{rel}' {reason}")


def _is_chat_template(path: Path) -> bool:
    """transformers 5's chat template files: `chat_template.jinja` and `additional_chat_templates/*.jinja`."""
    return path.name == TEMPLATE_NAME or (
        path.suffix.lower() == ".jinja" and path.parent.name == "additional_chat_templates"
    )


def adapter_refusal(data: Any) -> str | None:
    """Why a peft `adapter_config.json` could run code or is not a LoRA adapter (a phrase), or None.

    `peft_type` and `task_type` are peft's own enum values (upper case), checked against peft's lists;
    `base_model_name_or_path` is only a label (Champion loads the base itself)."""
    if not isinstance(data, dict):
        return "is not a JSON object, so it is not a peft adapter config; refused."
    if data.get("peft_type") != "LORA":
        return (
            f"says peft_type: {data.get('peft_type')!r}; Champion loads only LoRA adapters (peft_type "
            "'LORA'), so this version is refused."
        )
    for key in _ADAPTER_CODE_FIELDS:
        if data.get(key) is not None:
            return (
                f"has the field '{key}', which makes peft import a module or class named there when the "
                "adapter loads, so this version is refused; Champion loads only plain LoRA adapters."
            )
    task = data.get("task_type")
    if task is not None and task not in _peft_task_types():
        return (
            f"says task_type: {task!r}, which is not a peft task type "
            f"({', '.join(sorted(_peft_task_types()))}); refused."
        )
    rest = {k: v for k, v in data.items() if k not in ("peft_type", "task_type", "base_model_name_or_path")}
    return json_refusal(rest)


@functools.cache
def _peft_task_types() -> frozenset[str]:
    from peft import TaskType  # heavy: only when an adapter is checked

    return frozenset(t.value for t in TaskType)


def json_refusal(data: Any) -> str | None:
    """Why a model's JSON document could run or fetch code (a phrase to follow its file name), or None."""
    for field, key, value in _fields(data):
        if key in ("auto_map", "auto_mapping") and not isinstance(value, int | float | bool | type(None)):
            return (
                f"has the field '{field}', which makes transformers import Python code named there "
                "(possibly from outside the version), so this version is refused; Champion loads only "
                "transformers' own classes."
            )
        if not isinstance(value, str):
            continue
        if key == "model_type" and value not in _model_types():
            return (
                f"says {field}: '{value}', which is not a model type transformers knows; only transformers' "
                "own architectures are loaded, so this version is refused."
            )
        if (key.endswith("_class") or key in _CLASS_FIELDS) and not is_transformers_class(value):
            return (
                f"says {field}: '{value}', which is not a transformers class; only transformers' own classes "
                "are loaded, so this version is refused."
            )
        if key.endswith("_type") and not (_PLAIN.fullmatch(value) or is_transformers_class(value)):
            return (
                f"says {field}: '{value}', which is neither a transformers class nor a plain value (a "
                "module, path or repository name could load code); refused."
            )
    return None


def _fields(data: Any, prefix: str = ""):
    """(dotted field name, key, value) for every key of every object in a JSON document, at any depth."""
    stack = [(prefix, data)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                field = f"{where}.{key}" if where else str(key)
                yield field, str(key), value
                stack.append((field, value))
        elif isinstance(node, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(node) if _nested(item))


def _nested(value: Any) -> bool:
    return isinstance(value, dict | list)


@functools.cache
def _transformers_names() -> frozenset[str]:
    import transformers  # heavy: only when a folder is checked, never at import

    return frozenset(dir(transformers))  # the lazy module lists its classes without importing them


@functools.cache
def _model_types() -> frozenset[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return frozenset(CONFIG_MAPPING_NAMES)


def is_transformers_class(name: str) -> bool:
    """Whether `name` is a class transformers exports (a `...Fast` tokenizer of transformers 4 included)."""
    names = _transformers_names()
    return name in names or (name.endswith("Fast") and name[: -len("Fast")] in names)


def _inside(value: Any) -> bool:
    """Whether an MLmodel path field is a relative path that stays inside the version's folder."""
    if not isinstance(value, str) or not value or "\\" in value or ":" in value:
        return False
    path = PurePosixPath(value)
    return not path.is_absolute() and ".." not in path.parts


def _check_flavours(folder: Path, fmt: str, where: str) -> None:
    mlmodel = folder / "MLmodel"
    if fmt in GENERATIVE:
        _check_generative(folder, fmt, where)
        if not mlmodel.is_file():  # a model folder or Champion's own layout: no MLmodel needed
            return
    if fmt == "gguf" and not mlmodel.is_file():  # written by Champion: a flavourless logged model
        gguf = folder / GGUF_FILE
        if not gguf.is_file():
            raise UnsafeModelError(f"{where}: a gguf version needs its {GGUF_FILE}; refused.")
        with open(gguf, "rb") as fh:  # four bytes, compared: nothing is parsed here
            if fh.read(4) != GGUF_MAGIC:
                raise UnsafeModelError(f"{where}: its {GGUF_FILE} is not a GGUF file; refused.")
        return
    if fmt == "int8" and not mlmodel.is_file():  # Champion's own format: a flavourless logged model
        if not (folder / INT8_FILE).is_file():
            raise UnsafeModelError(f"{where}: an int8 version needs its {INT8_FILE}; refused.")
        return
    if not mlmodel.is_file():
        raise UnsafeModelError(
            f"{where}: there is no MLmodel file, so its flavour cannot be checked and it is refused."
        )
    try:
        spec = yaml.safe_load(mlmodel.read_text()) or {}
    except yaml.YAMLError as err:
        raise UnsafeModelError(
            f"{where}: its MLmodel file is not valid YAML ({err}), so it is refused."
        ) from None
    flavours = spec.get("flavors") or {}
    transformers = {"transformers"}
    allowed = {"onnx": {"onnx"}, "onnx-int8": {"onnx"}, "int8": set()}.get(fmt, transformers)
    unexpected = set(flavours) - allowed - {"python_function"}
    if unexpected:
        raise UnsafeModelError(
            f"{where}: its MLmodel names the flavour(s) {', '.join(sorted(unexpected))}, which Champion "
            f"does not load (a {fmt} version may have only {', '.join(sorted(allowed)) or 'none'}): refused."
        )
    pyfunc = flavours.get("python_function")
    if pyfunc is not None:
        loader = pyfunc.get("loader_module")
        if loader != _LOADERS.get(fmt) or pyfunc.get("code") or pyfunc.get("python_model"):
            raise UnsafeModelError(
                f"{where}: it is a python_function model with loader '{loader}' and its own code; such a "
                "model runs code from its files when loaded, so it is refused."
            )
    paths = (*_PATH_FIELDS, "peft_adaptor") if fmt in GENERATIVE else _PATH_FIELDS
    for flavour, fields in flavours.items():
        for key in paths:
            if isinstance(fields, dict) and key in fields and not _inside(fields[key]):
                raise UnsafeModelError(
                    f"{where}: 'MLmodel' field flavors.{flavour}.{key} is '{fields[key]}', which is not a "
                    "relative path inside the version; a model is loaded only from its own files: refused."
                )
    if fmt in GENERATIVE or fmt == "safetensors":
        flavour = flavours.get("transformers") or {}
        if reason := transformers_flavour_refusal(flavour, generative=fmt in GENERATIVE):
            raise UnsafeModelError(f"{where}: 'MLmodel' {reason}")
    if fmt == "safetensors":
        weights, _ = transformers_folders(folder, where)
        if not any(weights.glob("*.safetensors")):
            raise UnsafeModelError(f"{where}: its weights are not in safetensors files; refused.")


def transformers_flavour_refusal(flavour: dict[str, Any], generative: bool = False) -> str | None:
    """Why an MLmodel's transformers flavour could run code or load from elsewhere (a phrase), or None.

    MLflow's own loader passes `trust_remote_code=True` when a `*_type` is not a transformers class; Champion
    never uses that loader, and refuses such a flavour all the same. `source_model_name` is only a label for
    Champion (the weights must be in `model_binary`), so a local path or hub name there is left as it is.
    A `generative` version's weights or adapter are found by `_check_generative`, not through this flavour
    (an adapter's base is Champion's to load), so `peft_adaptor` and `model_binary` are not required here."""
    if flavour.get("code"):
        return "field flavors.transformers.code lists code files; refused."
    if flavour.get("peft_adaptor") and not generative:
        return (
            "field flavors.transformers.peft_adaptor is set: the base weights would come from the hub, not "
            "the version; register the merged model instead."
        )
    for key, value in sorted(flavour.items()):
        if key.endswith("_type") and value is not None and not is_transformers_class(str(value)):
            return (
                f"field flavors.transformers.{key} is '{value}', which is not a transformers class (MLflow "
                "would load such a model with trust_remote_code); refused."
            )
    components = flavour.get("components") or []
    if not isinstance(components, list) or not set(components) <= _COMPONENTS:
        return (
            f"field flavors.transformers.components is {components!r}; only "
            f"{', '.join(sorted(_COMPONENTS))} are components a version may carry, so it is refused."
        )
    if "model_binary" not in flavour and not generative:
        return "has no field flavors.transformers.model_binary: the weights are not in the version; refused."
    return None


def _check_generative(folder: Path, fmt: str, where: str) -> None:
    """A `lora` version holds adapters (each `adapter_config.json` beside its `adapter_model.safetensors`);
    a `causal-lm` version holds a model config beside safetensors weights."""
    adapters = sorted(p for p in folder.rglob(ADAPTER_CONFIG) if p.is_file())
    for config in adapters:
        if not (config.parent / ADAPTER_WEIGHTS).is_file():
            rel = config.relative_to(folder).as_posix()
            raise UnsafeModelError(
                f"{where}: '{rel}' has no {ADAPTER_WEIGHTS} beside it; a LoRA adapter's weights must be in "
                "safetensors, so this version is refused."
            )
    if fmt == "lora" and not adapters:
        raise UnsafeModelError(
            f"{where}: it holds no {ADAPTER_CONFIG}, so it is not a LoRA adapter; refused."
        )
    if fmt == "causal-lm" and not any(
        any(c.parent.glob("*.safetensors")) for c in folder.rglob("config.json") if c.is_file()
    ):
        raise UnsafeModelError(
            f"{where}: it has no config.json beside safetensors weights, so it is not a causal language "
            "model Champion can load; refused."
        )


def transformers_folders(folder: str | Path, where: str) -> tuple[Path, Path]:
    """(weights folder, tokenizer folder) of a transformers-flavour version, inside `folder`.

    From the MLmodel's `model_binary` and `components` when there is one (MLflow writes `model/` and
    `components/tokenizer/`), else the same default layout; a path leading outside `folder` is refused."""
    root = Path(folder).resolve()
    binary, components = "model", ["tokenizer"]
    if (root / "MLmodel").is_file():
        try:
            spec = yaml.safe_load((root / "MLmodel").read_text()) or {}
            flavour = spec.get("flavors", {})["transformers"]
            binary, components = flavour.get("model_binary", binary), flavour.get("components") or []
        except (yaml.YAMLError, AttributeError, KeyError, TypeError):
            raise UnsafeModelError(f"{where}: its MLmodel has no transformers flavour; refused.") from None
    weights = (root / str(binary)).resolve() if _inside(binary) else None
    if weights is None or not weights.is_relative_to(root) or not (weights / "config.json").is_file():
        raise UnsafeModelError(
            f"{where}: 'MLmodel' field flavors.transformers.model_binary ('{binary}') is not a folder with a "
            "config.json inside the version; refused."
        )
    tokens = (root / "components" / "tokenizer").resolve()
    if "tokenizer" not in components or not tokens.is_dir():
        tokens = weights  # a version saved with its tokenizer beside the weights
    return weights, tokens


def legacy_versions_allowed() -> bool:
    """Whether versions without a recorded digest may load (CHAMPION_ALLOW_LEGACY_VERSIONS=1)."""
    return os.environ.get(LEGACY_ENV, "").strip() == "1"


def files_digest(folder: str | Path) -> str:
    """One sha256 over every file's relative path and sha256, in path order."""
    folder = Path(folder)
    outer = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in UNHASHED):
        inner = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                inner.update(block)
        outer.update(f"{path.relative_to(folder).as_posix()}\t{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def check_digest(folder: str | Path, tags: dict[str, str], where: str) -> None:
    """Refuse files that changed since registration, and a version with no recorded digest (its files could
    have been changed without a trace) unless legacy versions are allowed."""
    recorded = tags.get(DIGEST_TAG)
    if recorded is None:
        if legacy_versions_allowed():
            return
        raise UnsafeModelError(
            f"{where}: it has no recorded {DIGEST_TAG} tag, so a change to its files could not be detected; "
            f"register it again with Champion, or set {LEGACY_ENV}=1 to load versions registered before "
            "Champion recorded digests."
        )
    if files_digest(folder) != recorded:
        raise UnsafeModelError(
            f"{where}: its files' sha256 no longer matches the one recorded at registration; they were "
            "changed afterwards, so this version is refused."
        )


def check_version_folder(folder: str | Path, fmt: str, tags: dict[str, str], where: str) -> None:
    """Everything checked before a registered version's files are read as a model: the allowlist, the
    contents of its JSON files and MLmodel, and the digest recorded at registration."""
    check_files(folder, fmt, where)
    check_digest(folder, tags, where)
