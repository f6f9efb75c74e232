"""One registered text-generation version (format `causal-lm`, `lora`, `int8` or `gguf`), loaded the way a
server loads it.

`int8` and `gguf` are `champion compress` copies of a version: `int8` is rebuilt with torch's dynamic int8
Linear layers and runs on the CPU; `gguf` (llama.cpp's file) is read by transformers and dequantized to float,
so serving it here saves no memory over its source (it is made for llama.cpp / Ollama; Champion serves it so
the copy a user runs elsewhere can be checked, canaried and monitored like any version).

A `lora` version is an adapter; its base is fetched from the `base/` artifacts of the run its `base_run_id`
tag names, into a cache folder keyed by its `base_sha256` tag under CHAMPION_HOME, and checked there
(allowlist, contents, digest against that tag) before a byte of it is parsed.

The base is held once per process, digest, device and dtype, and every adapter on it is a named adapter of
one shared peft model. peft puts an adapter's layers into the base's own modules: a second
`PeftModel.from_pretrained` on the same base object overwrites the first one's adapter in those modules
(measured: the first version then gives the second's logits). Deep copies would be correct but cost a
base's memory per version, which adapters exist to save. So each version is one `adapter_name` of the
shared model, made active under the base's lock for the length of a forward pass or a generation
(`LoadedLM.active`): adapters change only between requests, never under a running one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from champion.errors import ChampionError
from champion.registry import BASE_ARTIFACTS, BASE_RUN_TAG, BASE_SHA_TAG, SYSTEM_PROMPT_TAG

log = logging.getLogger(__name__)

GENERATION_PREFIX = "generation."
GENERATIVE_FORMATS = ("causal-lm", "lora", "int8", "gguf")  # int8 and gguf: `champion compress` copies
_DTYPES = ("auto", "fp32", "bf16")


@dataclass
class _SharedBase:
    """A base in memory and the peft model its adapters are loaded into (None until the first adapter)."""

    model: Any
    peft: Any = None
    adapters: set[str] = field(default_factory=set)
    lock: threading.RLock = field(default_factory=threading.RLock)


_BASES: dict[tuple[str, str, str], _SharedBase] = {}  # (base_sha256, device, dtype) -> the shared base
_BASES_LOCK = threading.Lock()


@dataclass(frozen=True)
class LoadedLM:
    """A text-generation version in memory: the network (shared with the other adapters of its base), its
    tokenizer (pads on the left), and what the version records about how to use it."""

    name: str
    version: str
    format: str  # causal-lm | lora | int8 | gguf
    model: Any  # the shared peft model of the base (lora) or the version's own causal LM (causal-lm)
    tokenizer: Any
    base_sha256: str
    chat_template: str
    generation: dict[str, Any]  # the defaults the version's `generation.*` tags record (max_new_tokens, ...)
    device: str
    load_seconds: float
    adapter_name: str | None = None  # this version's adapter in `model` (lora)
    lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)
    system_prompt: str = (
        ""  # what the version was trained with; put first when a request has no system message
    )

    @contextlib.contextmanager
    def active(self):
        """The model with this version's adapter active, held for the block: no other version of the same
        base runs (or switches adapters) until it ends."""
        with self.lock:
            if self.adapter_name is not None:
                self.model.set_adapter(self.adapter_name, inference_mode=True)
            yield self.model

    def logits(self, texts: list[str]):
        """The next-token logits of every position (a float32 CPU tensor: texts x tokens x vocabulary)."""
        import torch

        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        with self.active() as model, torch.inference_mode():
            return model(**enc).logits.float().cpu()


def load_generative_version(
    client, name: str, version: str, device: str = "cpu", dtype: str = "auto"
) -> LoadedLM:
    """Load `models:/name/version`, a text-generation version, from its checked files (and, for an adapter,
    its checked base); `device` "auto" is CUDA when there is a GPU, `dtype` "auto" bf16 on CUDA, else fp32."""

    from champion.registry import TEXT_GENERATION
    from champion.safety import files_digest
    from serving.model import checked_folder

    started = time.perf_counter()
    where = f"version {version} of '{name}'"
    device, torch_dtype = _device_and_dtype(device, dtype, where)
    folder, fmt, mv = checked_folder(client, name, str(version), task=TEXT_GENERATION)
    tags = dict(mv.tags)
    if fmt not in GENERATIVE_FORMATS:
        raise ChampionError(
            f"{where} is tagged text-generation but its format is '{fmt}'; a text-generation version is "
            f"one of {', '.join(GENERATIVE_FORMATS)}, so register it again with `champion sft` or "
            "`champion compress`."
        )
    try:
        if fmt != "lora":
            model, tokenizer, device = load_whole_model(fmt, folder, where, device, torch_dtype)
            shared_lock, adapter, base_sha = threading.RLock(), None, tags.get(BASE_SHA_TAG, "")
        else:
            base_sha = tags.get(BASE_SHA_TAG, "")
            shared = _shared_base(client, tags, where, device, torch_dtype)
            adapter = _adapter_name(name, str(version), files_digest(folder))
            with shared.lock:
                if adapter not in shared.adapters:  # a version loaded twice reuses its adapter
                    shared.peft = _put_adapter(shared, folder, adapter)
                    shared.adapters.add(adapter)
            model, shared_lock = shared.peft, shared.lock
            tokenizer = _tokenizer(folder)
    except ChampionError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ChampionError(f"{where} could not be loaded as a causal language model ({err}).") from None
    _pad_left(model, tokenizer)
    return LoadedLM(
        name,
        str(version),
        fmt,
        model,
        tokenizer,
        base_sha,
        tokenizer.chat_template or "",
        generation_defaults(tags),
        device,
        time.perf_counter() - started,
        adapter,
        shared_lock,
        tags.get(SYSTEM_PROMPT_TAG, ""),
    )


def load_whole_model(fmt: str, folder: Path, where: str, device: str, torch_dtype):
    """(model, tokenizer, device) of a checked folder holding a whole causal LM (`causal-lm`, `int8`, `gguf`);
    an `int8` model runs on the CPU whatever `device` says (torch's dynamic int8 kernels are CPU kernels)."""
    from champion.formats import load_causal_lm_files, load_gguf, load_int8

    if fmt == "int8":
        return load_int8(Path(folder)).eval(), _tokenizer(Path(folder)), "cpu"
    load = load_gguf if fmt == "gguf" else load_causal_lm_files
    model, tokenizer = load(folder, where, torch_dtype)
    return model.to(device).eval(), tokenizer, device


def loaded_from_folder(name: str, version: str, fmt: str, folder: Path, tags: dict[str, str]) -> LoadedLM:
    """A whole-model folder (already checked by the caller) as the server would hold it, on the CPU in fp32:
    what `champion compress` measures before it registers the copy."""
    import torch

    started = time.perf_counter()
    where = f"the {fmt} copy of '{name}'"
    model, tokenizer, device = load_whole_model(fmt, folder, where, "cpu", torch.float32)
    _pad_left(model, tokenizer)
    return LoadedLM(
        name,
        version,
        fmt,
        model,
        tokenizer,
        "",
        tokenizer.chat_template or "",
        generation_defaults(tags),
        device,
        time.perf_counter() - started,
        system_prompt=tags.get(SYSTEM_PROMPT_TAG, ""),
    )


def generation_defaults(tags: dict[str, str]) -> dict[str, Any]:
    """The `generation.*` tags as `generate` keyword values: "true"/"false" as booleans, numbers as
    numbers."""
    out: dict[str, Any] = {}
    for key, value in tags.items():
        if not key.startswith(GENERATION_PREFIX) or key == "generation.reference":
            continue
        if value in ("true", "false"):
            out[key[len(GENERATION_PREFIX) :]] = value == "true"
            continue
        for kind in (int, float):
            with contextlib.suppress(ValueError):
                value = kind(value)
                break
        out[key[len(GENERATION_PREFIX) :]] = value
    return out


def shared_bases() -> list[str]:
    """The base digests held in memory by this process (one entry per device and dtype)."""
    with _BASES_LOCK:
        return [sha for sha, _, _ in _BASES]


def forget_bases() -> None:
    """Drop this process's shared bases (and the adapters on them): the next load reads the base again."""
    with _BASES_LOCK:
        _BASES.clear()


def _device_and_dtype(device: str, dtype: str, where: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ChampionError(
            f"{where}: device '{device}' was asked for but no CUDA GPU is visible; use 'cpu'."
        )
    if dtype not in _DTYPES:
        raise ChampionError(f"{where}: dtype '{dtype}' is not one of {', '.join(_DTYPES)}.")
    bf16 = dtype == "bf16" or (dtype == "auto" and device.startswith("cuda"))
    return device, torch.bfloat16 if bf16 else torch.float32


def _shared_base(client, tags: dict[str, str], where: str, device: str, torch_dtype) -> _SharedBase:
    """The base of a `lora` version in memory, loaded once per process, digest, device and dtype."""
    from champion.formats import load_causal_lm_files

    sha, run_id = tags.get(BASE_SHA_TAG), tags.get(BASE_RUN_TAG)
    if not sha or not run_id:
        missing = BASE_SHA_TAG if not sha else BASE_RUN_TAG
        raise ChampionError(
            f"{where} is a LoRA adapter without a '{missing}' tag, so its base cannot be found and checked; "
            "register it again with `champion sft`."
        )
    key = (sha, device, str(torch_dtype).removeprefix("torch."))
    with _BASES_LOCK:
        if key in _BASES:
            return _BASES[key]
        folder = checked_base(client, run_id, sha, where)
        model, _ = load_causal_lm_files(folder, f"the base of {where}", torch_dtype)
        _BASES[key] = _SharedBase(model.to(device).eval())
        log.info("loaded base %s on %s (%s)", sha[:12], device, key[2])
        return _BASES[key]


def checked_base(client, run_id: str, sha: str, where: str) -> Path:
    """The folder of the base `sha` (the `base/` artifacts of run `run_id`), cached under CHAMPION_HOME.

    Downloaded into a temporary folder and moved into the cache only once its files pass the allowlist and
    contents checks and their digest is `sha`; a cached folder is checked again on every call (anyone may
    write the cache) and deleted when it fails. Nothing is parsed as a model here."""
    from champion.config import champion_home
    from champion.safety import UnsafeModelError, check_files, files_digest
    from serving.model import download_checked

    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ChampionError(
            f"{where}: its '{BASE_SHA_TAG}' tag is '{sha}', which is not a sha256; register it again."
        )
    try:
        client.get_run(run_id)
    except Exception:
        raise ChampionError(
            f"{where}: its base run '{run_id}' ({BASE_RUN_TAG} tag) is not in the tracking store, so its "
            "base cannot be loaded; register the adapter again with `champion sft`."
        ) from None
    target = champion_home() / "cache" / "bases" / sha
    target.parent.mkdir(parents=True, exist_ok=True)
    what = f"the base of {where}"

    def check(folder: Path) -> None:
        check_files(folder, "causal-lm", what)
        if files_digest(folder) != sha:
            raise UnsafeModelError(
                f"{where}: the files of its base run '{run_id}' do not have the sha256 its '{BASE_SHA_TAG}' "
                "tag records; they were changed after registration (or the tag was), so it is refused."
            )

    with open(target.with_suffix(".lock"), "a") as lock:  # the workers of one server: one downloads
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            download_checked(f"runs:/{run_id}/{BASE_ARTIFACTS}", target, check, what)
            return target
        try:
            check(target)
        except UnsafeModelError:
            shutil.rmtree(target, ignore_errors=True)
            raise
    return target


def _put_adapter(shared: _SharedBase, folder: Path, adapter: str):
    """The shared peft model with the checked adapter in `folder` loaded under the name `adapter`; the
    adapter config's `base_model_name_or_path` is never followed (peft gets the base as an object)."""
    from peft import PeftModel

    if shared.peft is None:
        return PeftModel.from_pretrained(
            shared.model, str(folder), adapter_name=adapter, is_trainable=False, local_files_only=True
        ).eval()
    shared.peft.load_adapter(str(folder), adapter_name=adapter, is_trainable=False, local_files_only=True)
    return shared.peft


def _adapter_name(name: str, version: str, digest: str) -> str:
    """A peft adapter name per version and files (module names may not hold dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{name}-v{version}-{digest[:12]}")


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    from champion.formats import LOCAL_ONLY

    return AutoTokenizer.from_pretrained(str(folder), **LOCAL_ONLY)


def _pad_left(model, tokenizer) -> None:
    """Generation appends on the right, so batches pad on the left; eos pads where there is no pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
