"""Only model formats that cannot run code are registered, promoted and served.

A model version is accepted when every file in it is on an allowlist of data formats (safetensors, ONNX,
JSON, YAML, plain text) and its MLmodel names only the flavours Champion loads without executing anything
from the files: transformers (weights in safetensors), ONNX, and Champion's own int8 format. A pickle
(`.pkl`, `.pt`, `.bin`, ...), an MLflow `python_function` model with its own loader or code, or any other
file is refused before a byte of it is deserialised: the class of the pickle-loading CVEs in MLflow and
BentoML (CVE-2024-2912, CVE-2025-27520).

At registration the sha256 of every file is recorded in one digest (the version tag `champion.files_sha256`);
before the service loads a version, and before `champion promote` moves the alias to it, the files are
hashed again and a mismatch (a file changed after registration) is refused.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import yaml

from champion.errors import ChampionError

log = logging.getLogger(__name__)

DIGEST_TAG = "champion.files_sha256"
SAFE_SUFFIXES = frozenset({".safetensors", ".onnx", ".json", ".yaml", ".yml", ".txt", ".md"})
SAFE_NAMES = frozenset({"MLmodel", "registered_model_meta"})  # MLflow's own YAML files
# Not part of the digest: MLflow writes it into the model's folder when the version is registered.
UNHASHED = frozenset({"registered_model_meta", ".complete"})
_LOADERS = {"safetensors": "mlflow.transformers", "onnx": "mlflow.onnx", "onnx-int8": "mlflow.onnx"}


class UnsafeModelError(ChampionError):
    """A model version whose files or flavour could run code when loaded, or whose files changed."""


def check_files(folder: str | Path, fmt: str, where: str) -> None:
    """Refuse (UnsafeModelError, one sentence) a model folder that is not made only of safe data files."""
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise UnsafeModelError(
                f"{where}: '{rel}' is a symbolic link; model files must be plain files, so it is refused."
            )
        if path.name in SAFE_NAMES or path.name in UNHASHED or path.suffix.lower() in SAFE_SUFFIXES:
            continue
        if fmt.startswith("onnx") and path.suffix.lower() == ".data":  # an ONNX graph's external tensors:
            continue  # raw bytes that ONNX Runtime maps, never unpickled
        raise UnsafeModelError(
            f"{where}: '{rel}' is not a safe model file (allowed: {', '.join(sorted(SAFE_SUFFIXES))}); a "
            "pickle or code file could run on load, so this version is refused."
        )
    _check_flavours(folder, fmt, where)


def _check_flavours(folder: Path, fmt: str, where: str) -> None:
    mlmodel = folder / "MLmodel"
    if fmt == "int8" and not mlmodel.is_file():  # Champion's own format: a flavourless logged model
        from champion.formats import INT8_FILE

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
    allowed = {"safetensors": {"transformers"}, "onnx": {"onnx"}, "onnx-int8": {"onnx"}, "int8": set()}[fmt]
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
    if fmt == "safetensors":
        transformers = flavours.get("transformers") or {}
        if transformers.get("code"):
            raise UnsafeModelError(f"{where}: its transformers flavour carries code files; refused.")
        weights = folder / str(transformers.get("model_binary") or "model")
        if not any(weights.glob("*.safetensors")):
            raise UnsafeModelError(f"{where}: its weights are not in safetensors files; refused.")


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
    """Refuse files that changed since registration; a version registered before digests were recorded is
    let through with a warning in the log (its files are still checked against the allowlist)."""
    recorded = tags.get(DIGEST_TAG)
    if recorded is None:
        log.warning("%s has no recorded %s (registered before Champion recorded one).", where, DIGEST_TAG)
        return
    if files_digest(folder) != recorded:
        raise UnsafeModelError(
            f"{where}: its files' sha256 no longer matches the one recorded at registration; they were "
            "changed afterwards, so this version is refused."
        )


def check_version_folder(folder: str | Path, fmt: str, tags: dict[str, str], where: str) -> None:
    """Everything the service and promotion check before a version is trusted."""
    check_files(folder, fmt, where)
    check_digest(folder, tags, where)
