"""Compress a registered text-generation version: int8 in torch, or a GGUF file (Q8_0) that llama.cpp and
Ollama run, registered as a version of its own.

Reads top to bottom: source -> held-out rows -> merged weights (a LoRA adapter folded into its base) -> build
the copy -> load it as the service would -> both answer the same held-out rows greedily, batch by batch in
turns (timed) -> gate -> log -> register. Run it with `champion compress NAME VERSION --to gguf-q8_0`, or
from a notebook:

    result = compress_lm("support-replies", "3", LMCompressConfig(to="gguf-q8_0"))

The copy is gated on the share of held-out rows whose parsed intent is the one its source's greedy answer
gives (`budget.min_agreement`, 99 % by default); one outside the budget is still registered, tagged with the
refusal, and `champion promote` refuses it. Cost per 1,000 generated tokens goes on the copy and its source.

The GGUF follows llama.cpp's `convert_hf_to_gguf.py` for a llama-architecture model (SmolLM2, Llama): its
tensor names, the rotary permutation of the query and key weights, the `llama.*` hyper-parameters, and a
byte-level BPE tokenizer (`tokenizer.ggml.model` "gpt2", its tokens, types and merges, special ids, the chat
template, and the pre-tokenizer named by the same fingerprint llama.cpp uses).
"""

from __future__ import annotations

import gc
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from champion.config import StrictModel, prepare_environment
from champion.errors import ChampionError
from champion.formats import FORMAT_TAG, SOURCE_TAG, VARIANT_TAG, format_of
from champion.gate import GateDecision, VariantBudget, decide_variant
from champion.repair import process_tags
from champion.safety import GGUF_FILE, INT8_FILE

if TYPE_CHECKING:
    import pandas as pd

    from serving.lm_model import LoadedLM

# As pipelines/compress.py (which dispatches text-generation versions here, so this module may not import it):
CANDIDATE = "candidate"  # the alias a new copy waits under until someone promotes it
COST_TAG = "cost."  # cost.cpu_seconds_per_1k_tokens, cost.per_1k_tokens, cost.tokens_per_s, ...
LM_TARGETS = ("int8", "gguf-q8_0")
STORED_AS = {"int8": "int8", "gguf-q8_0": "gguf"}  # `--to` -> the version's format tag
GGUF_TYPES = {"gguf-q8_0": "Q8_0"}
GGUF_QUANT_TAG = "gguf.quantization"
REFERENCE_TAG = "generation.reference"  # as pipelines/sft.py: the held-out prompts, answers and scores
MIB = 2**20
INVALID = "<no intent>"  # the parsed intent of an answer that is not a JSON object with an intent
# llama.cpp's fingerprint of a BPE pre-tokenizer: sha256 of str(token ids) of this text
# (convert_hf_to_gguf.py, get_vocab_base_pre), and the names llama.cpp gives the two SmolLM2 may have.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# Hugging Face Llama names -> llama.cpp's (blk.N.* per layer).
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


class LMCompressConfig(StrictModel):
    to: Literal["int8", "gguf-q8_0"] = "gguf-q8_0"
    data: str | None = (
        None  # support-replies rows (CSV/JSONL/Parquet); default: the source's held-out test rows
    )
    max_rows: int | None = Field(None, ge=1)  # held-out rows answered by each model (generation is slow)
    int8_skip: list[str] = Field(
        default_factory=lambda: ["lm_head"]
    )  # nn.Linear kept in fp32: SmolLM2's output layer is its embedding matrix, tied
    threads: int | None = Field(None, ge=1)  # torch threads; default: torch's
    batch_size: int = Field(8, ge=1)  # prompts generated together, as the service batches them
    max_new_tokens: int | None = Field(None, ge=1)  # default: the version's generation.max_new_tokens
    price_per_core_hour: float = Field(0.04, ge=0)  # in your currency; 0.04 is about an on-demand vCPU hour
    budget: VariantBudget = VariantBudget()
    promote: bool = False  # promote to champion at once if within budget and the source is the champion
    experiment: str = "champion-compress"


@dataclass
class LMCompressResult:
    name: str
    source_version: str
    version: str
    format: str
    decision: GateDecision
    measured: dict[str, Any] = field(default_factory=dict)
    promoted: bool = False


def compress_lm(
    name: str, version: str, cfg: LMCompressConfig | None = None, registry=None
) -> LMCompressResult:
    """Build `cfg.to` from the text-generation version `name` v`version`, measure it against its source on
    held-out rows and register it under the alias `candidate`."""
    prepare_environment()
    import mlflow
    import torch

    from champion import tracking
    from champion.registry import (
        SYSTEM_PROMPT_TAG,
        TASK_TAG,
        TEXT_GENERATION,
        connect,
        model_version,
        promote,
        register_version,
    )
    from champion.safety import check_files
    from serving.lm_model import load_generative_version, loaded_from_folder

    cfg = cfg or LMCompressConfig()
    reg = registry or connect()
    version = str(version)
    source_tags = dict(model_version(reg, name, version).tags)
    if source_tags.get(VARIANT_TAG) or format_of(source_tags) not in ("causal-lm", "lora"):
        raise ChampionError(
            f"v{version} of '{name}' is already a {format_of(source_tags)} copy; compress its source "
            f"v{source_tags.get(SOURCE_TAG, '?')} (the version `champion sft` registered) instead."
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = held_out_reply_rows(name, version, source_tags, cfg.data, cfg.max_rows)
    max_new_tokens = cfg.max_new_tokens or int(source_tags.get("generation.max_new_tokens", 96))
    fmt = STORED_AS[cfg.to]

    with tempfile.TemporaryDirectory(prefix="champion-lm-compress-") as tmp:
        # The merged weights, written as the copy; then freed before both models are loaded to answer.
        merged, tokenizer = merged_causal_lm(reg.client, name, version, source_tags)
        folder = Path(tmp) / "model"
        built = build_lm_variant(
            merged, tokenizer, cfg.to, folder, tuple(cfg.int8_skip), f"{name}-v{version}"
        )
        source_bytes = parameter_bytes(merged)
        del merged
        gc.collect()
        check_files(folder, fmt, f"the {cfg.to} copy of v{version}")  # what registration will check again

        # Read back through the service's loader: what is measured is what serves.
        source = load_generative_version(reg.client, name, version, device="cpu", dtype="fp32")
        rss_before = _rss_bytes()
        variant = loaded_from_folder(name, "new", fmt, folder, source_tags)
        measured, table = measure_lm_pair(source, variant, rows, max_new_tokens, cfg.batch_size)
        measured["memory"] = {
            "source_parameter_bytes": source_bytes,
            "variant_file_bytes": _weights_bytes(folder, fmt),
            "variant_parameter_bytes": parameter_bytes(variant.model),  # as loaded (a GGUF: dequantized)
            "variant_load_rss_bytes": max(0, _rss_bytes() - rss_before),  # the load's peak stays resident
        }
        measured["llama_cpp"] = llama_cpp_speed(
            folder / GGUF_FILE, rows, variant, max_new_tokens, cfg.threads
        )
        measured.update(kind=cfg.to, format=fmt, **built)
        decision = decide_variant(cfg.to, measured, cfg.budget)

        experiment_id = tracking.ensure_experiment(cfg.experiment)
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=f"compress-{cfg.to}-v{version}", tags=process_tags()
        ) as run:
            mlflow.log_params({**tracking.flatten(cfg.model_dump(mode="json"), "compress."),
                               "source": f"{name}/{version}", "max_new_tokens": max_new_tokens})  # fmt: skip
            mlflow.log_metrics(flat_metrics(measured))
            mlflow.log_dict(decision.to_dict(), "gate/decision.json")
            mlflow.log_table(table, "reference/held_out.json")  # the copy's own answers: its reference
            lineage = {
                VARIANT_TAG: cfg.to,
                SOURCE_TAG: version,
                FORMAT_TAG: fmt,
                TASK_TAG: TEXT_GENERATION,
                **{k: v for k, v in source_tags.items() if k.startswith(("data_sha256", "data_file_sha256"))},
                **tracking.code_version(),
                **tracking.library_versions(("torch", "transformers", "gguf", "mlflow", "champion")),
            }
            mlflow.set_tags(lineage)
            model_uri = _log_files(folder, run.info.run_id, fmt)

    tags = {
        **lineage,
        **{k: v for k, v in source_tags.items() if k.startswith("generation.") and k != REFERENCE_TAG},
        SYSTEM_PROMPT_TAG: source_tags.get(SYSTEM_PROMPT_TAG, ""),
        REFERENCE_TAG: f"runs:/{run.info.run_id}/reference/held_out.json",
        "run_id": run.info.run_id,
        **({GGUF_QUANT_TAG: GGUF_TYPES[cfg.to], "gguf.pre_tokenizer": built["pre_tokenizer"]} if fmt == "gguf"
           else {}),
        **gate_tags(decision),
        **lm_metric_tags(measured),
        **lm_cost_tags(measured["variant_speed"], cfg.price_per_core_hour),
    }  # fmt: skip
    new_version = register_version(
        reg,
        name,
        model_uri,
        tags,
        CANDIDATE,
        reason=f"{cfg.to} copy of v{version} (run {run.info.run_id}); {decision.reason}",
        evidence={"gate": decision.evidence},
    )
    for key, value in lm_cost_tags(measured["source_speed"], cfg.price_per_core_hour).items():
        reg.client.set_model_version_tag(name, version, key, value)  # measured in the same run

    promoted = False
    if cfg.promote and decision.promote:
        promoted = promote(reg, name, new_version, reason=f"compress --promote: {decision.reason}").allowed
    return LMCompressResult(name, version, new_version, cfg.to, decision, measured, promoted)


# --- the rows ---------------------------------------------------------------------------------------------


def held_out_reply_rows(
    name: str, version: str, tags: dict[str, str], data: str | None, max_rows: int | None
) -> pd.DataFrame:
    """Support-reply rows (the bitext columns) both models answer: `data`, else the test rows of the version's
    held-out reference (`generation.reference`, never trained on), all its rows if it has no test split."""
    import mlflow
    import pandas as pd

    from pipelines.chat import load_reply_rows

    if data is not None:
        rows = load_reply_rows(data)
    else:
        uri = tags.get(REFERENCE_TAG)
        if not uri:
            raise ChampionError(
                f"--data: v{version} of '{name}' has no held-out rows on record ({REFERENCE_TAG} tag) to "
                "judge a copy on; pass --data FILE with support-reply rows it never trained on."
            )
        table = mlflow.artifacts.load_dict(uri)
        frame = pd.DataFrame(table["data"], columns=table["columns"])
        test = frame[frame["split"] == "test"] if "split" in frame else frame
        rows = reference_rows(test if len(test) else frame)
    rows = rows.head(max_rows) if max_rows else rows
    if rows.empty:
        raise ChampionError("--data: there are no held-out rows to answer; pass --data FILE with rows.")
    return rows.reset_index(drop=True)


def reference_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The bitext columns (instruction, intent, category, entity, response) of a held-out reference table,
    read back from each row's reference answer."""
    import pandas as pd

    out = []
    for message, reference in zip(table["message"], table["reference"], strict=True):
        answer = json.loads(reference)
        entities = answer.get("entities") or {}
        entity_type, entity_value = next(iter(entities.items()), ("", ""))
        out.append(
            {
                "instruction": message,
                "intent": answer.get("intent", ""),
                "category": answer.get("category", ""),
                "entity_type": entity_type,
                "entity_value": str(entity_value),
                "response": answer.get("reply", ""),
            }
        )
    return pd.DataFrame(out)


# --- the merged weights and the copy ----------------------------------------------------------------------


def merged_causal_lm(client, name: str, version: str, tags: dict[str, str]):
    """(fp32 CPU model, tokenizer) of a text-generation version with its LoRA adapter folded into a private
    copy of its checked base (the served, shared base is never touched); a `causal-lm` version as it is."""
    import torch
    from transformers import AutoTokenizer

    from champion.formats import LOCAL_ONLY, load_causal_lm_files, load_lora_adapter
    from champion.registry import BASE_RUN_TAG, BASE_SHA_TAG, TEXT_GENERATION
    from serving.lm_model import checked_base
    from serving.model import checked_folder

    where = f"version {version} of '{name}'"
    folder, fmt, _ = checked_folder(client, name, version, task=TEXT_GENERATION)
    if fmt == "causal-lm":
        model, tokenizer = load_causal_lm_files(folder, where, torch.float32)
        return model.eval(), tokenizer
    if not tags.get(BASE_SHA_TAG) or not tags.get(BASE_RUN_TAG):
        raise ChampionError(
            f"{where} is a LoRA adapter without its '{BASE_SHA_TAG}' / '{BASE_RUN_TAG}' tags, so its base "
            "cannot be found to merge it into; register it again with `champion sft`."
        )
    base = checked_base(client, tags[BASE_RUN_TAG], tags[BASE_SHA_TAG], where)
    model, _ = load_causal_lm_files(base, f"the base of {where}", torch.float32)
    model = load_lora_adapter(model, folder, where).merge_and_unload().eval()
    return model, AutoTokenizer.from_pretrained(str(folder), **LOCAL_ONLY)


def build_lm_variant(model, tokenizer, to: str, folder: Path, int8_skip: tuple[str, ...], label: str) -> dict:
    """Write `model` as `to` into `folder`, with the tokenizer's files beside it; returns what was chosen
    (the GGUF's pre-tokenizer name)."""
    from champion.formats import quantize_int8, save_int8
    from champion.registry import TEXT_GENERATION

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    if to == "int8":
        save_int8(quantize_int8(model, int8_skip), int8_skip, folder, task=TEXT_GENERATION)
        return {}
    return {"pre_tokenizer": write_gguf(model, tokenizer, folder / GGUF_FILE, GGUF_TYPES[to], label)}


def write_gguf(model, tokenizer, path: Path, quantization: str = "Q8_0", label: str = "model") -> str:
    """`model` (a Hugging Face Llama, fp32) as a GGUF file llama.cpp loads: 2-D weights quantized to
    `quantization` (norms stay F32), the `llama.*` hyper-parameters and the tokenizer. Returns the name of
    the pre-tokenizer written."""
    import gguf

    config = model.config
    _check_llama(config)
    qtype = gguf.GGMLQuantizationType[quantization]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(label)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{quantization}", gguf.LlamaFileType.ALL_F32))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pre = _write_tokenizer(writer, tokenizer, config.vocab_size)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:  # llama.cpp uses token_embd when there is no output.weight
            continue
        target = gguf_tensor_name(key)
        if target is None:
            raise ChampionError(
                f"--to: the model has a weight '{key}' that llama.cpp's llama architecture has no place for; "
                "only plain Llama-architecture models (SmolLM2, Llama) are written as GGUF."
            )
        data = tensor.detach().float().cpu().numpy()
        if key.endswith("q_proj.weight"):
            data = permute_rotary(data, heads, heads)
        elif key.endswith("k_proj.weight"):
            data = permute_rotary(data, heads, kv_heads)
        if qtype == gguf.GGMLQuantizationType.F32:  # unquantized: the exact weights (tests compare them)
            writer.add_tensor(target, np.ascontiguousarray(data, dtype=np.float32))
        elif data.ndim == 2 and data.shape[-1] % block == 0:
            writer.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(target, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pre


def gguf_tensor_name(key: str) -> str | None:
    """llama.cpp's name for a Hugging Face Llama weight, or None where it has none."""
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    parts = key.split(".", 3)
    if (
        len(parts) == 4
        and parts[:2] == ["model", "layers"]
        and parts[2].isdigit()
        and parts[3] in _LAYER_NAMES
    ):
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    return None


def permute_rotary(weights: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """Hugging Face's rotary layout (halves) as llama.cpp's (interleaved pairs), as convert_hf_to_gguf."""
    if kv_heads != heads:
        heads = kv_heads
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _check_llama(config) -> None:
    if getattr(config, "model_type", None) != "llama":
        raise ChampionError(
            f"--to gguf-q8_0: the model is a '{getattr(config, 'model_type', '?')}'; Champion writes GGUF "
            "for Llama-architecture models (SmolLM2, Llama) only, so compress it with --to int8."
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ChampionError(
            "--to gguf-q8_0: the model's attention or MLP layers have biases, which plain Llama GGUF files "
            "do not hold; compress it with --to int8."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        raise ChampionError(
            f"--to gguf-q8_0: the model uses '{rope.get('rope_type') or rope.get('type')}' rotary scaling, "
            "which Champion does not write into GGUF yet; compress it with --to int8."
        )


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> str:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" vocabulary: every id's token and type, the merges,
    the special ids, whether a BOS is added, the chat template. Returns the pre-tokenizer name."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if (backend.get("model") or {}).get("type") != "BPE":
        raise ChampionError(
            "--to gguf-q8_0: the tokenizer is not a byte-level BPE tokenizer, the one kind Champion writes "
            "into GGUF; compress it with --to int8."
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ChampionError(
            f"--to gguf-q8_0: the tokenizer has ids up to {max(vocab.values())}, beyond the model's "
            f"{vocab_size} embeddings; the version's tokenizer and model do not match."
        )
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    pre = pre_tokenizer_name(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return pre


def pre_tokenizer_name(tokenizer) -> str:
    """The name llama.cpp gives this tokenizer's pre-tokenizer (its fingerprint, as convert_hf_to_gguf.py
    computes it); "default" for one it does not know (llama.cpp then splits text its default way)."""
    fingerprint = hashlib.sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    return _KNOWN_PRE.get(fingerprint, "default")


def parameter_bytes(model) -> int:
    """Bytes of a model's weights in memory, a tied weight counted once; a dynamic int8 layer's packed
    weight counts one byte per value."""
    seen, total = set(), 0
    stack = list(model.state_dict().values())
    while stack:
        value = stack.pop()
        if isinstance(value, tuple | list):  # torch.ao's packed params: (int8 weight, fp32 bias)
            stack.extend(value)
        elif hasattr(value, "data_ptr") and value.numel() and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            total += value.numel() * value.element_size()
    return total


# --- measure ----------------------------------------------------------------------------------------------


def measure_lm_pair(source: LoadedLM, variant: LoadedLM, rows: pd.DataFrame, max_new_tokens: int,
                    batch_size: int) -> tuple[dict[str, Any], pd.DataFrame]:  # fmt: skip
    """Both models answer every row greedily, batch by batch in turns (so a noisy neighbour slows both
    alike); quality against the rows' references, intent agreement with the source, tokens/s and
    CPU-seconds per 1,000 generated tokens. Returns the figures and the per-row table (the copy's answers
    scored, with its source's beside them)."""
    from pipelines.chat import prompt_text
    from pipelines.generation_eval import per_row, score_answers

    messages = rows["instruction"].astype(str).tolist()
    answers: dict[str, list[str]] = {"source": [], "variant": []}
    timing = {side: {"tokens": 0, "wall": 0.0, "cpu": 0.0} for side in answers}
    greedy_answers(variant, messages[:1], 2)  # warm the copy's kernels once, untimed
    for start in range(0, len(messages), batch_size):
        batch = messages[start : start + batch_size]
        for side, lm in (("source", source), ("variant", variant)):
            wall, cpu = time.perf_counter(), time.process_time()
            got, tokens = greedy_answers(lm, batch, max_new_tokens)
            timing[side]["wall"] += time.perf_counter() - wall
            timing[side]["cpu"] += time.process_time() - cpu
            timing[side]["tokens"] += tokens
            answers[side] += got
    intents = {side: [parsed_intent(a) for a in answers[side]] for side in answers}
    truth = rows["intent"].astype(str).tolist()
    speed = {side: _speed(timing[side], batch_size) for side in answers}
    table = per_row(answers["variant"], rows).assign(
        split="test",
        prompt=[prompt_text(variant.tokenizer, m) for m in messages],
        source_answer=answers["source"],
    )
    measured = {
        "task": "text-generation",
        "rows": len(messages),
        "agreement": float(
            np.mean([a == b for a, b in zip(intents["source"], intents["variant"], strict=True)])
        ),
        "identical_answers": float(
            np.mean([a == b for a, b in zip(answers["source"], answers["variant"], strict=True)])
        ),
        "source": {**score_answers(answers["source"], rows), **_intent_quality(truth, intents["source"])},
        "variant": {**score_answers(answers["variant"], rows), **_intent_quality(truth, intents["variant"])},
        "source_speed": speed["source"],
        "variant_speed": speed["variant"],
        "speedup": speed["variant"]["tokens_per_s"] / max(speed["source"]["tokens_per_s"], 1e-9),
        "max_new_tokens": max_new_tokens,
    }
    return measured, table


def greedy_answers(lm: LoadedLM, messages: list[str], max_new_tokens: int) -> tuple[list[str], int]:
    """Greedy answers to `messages` in one left-padded batch, and how many tokens were generated (each
    answer up to and including its end token)."""
    import torch

    from pipelines.chat import prompt_text

    tokenizer = lm.tokenizer
    prompts = [prompt_text(tokenizer, m) for m in messages]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    with lm.active() as model, torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new = out[:, enc["input_ids"].shape[1] :].cpu()
    return tokenizer.batch_decode(new, skip_special_tokens=True), generated_tokens(
        new, tokenizer.eos_token_id
    )


def generated_tokens(new, eos: int | None) -> int:
    """Tokens generated per row up to and including the first end token (the rest is padding)."""
    total = 0
    for row in new.tolist():
        total += row.index(eos) + 1 if eos is not None and eos in row else len(row)
    return total


def parsed_intent(answer: str) -> str:
    from pipelines.chat import parse_answer

    parsed = parse_answer(answer)
    intent = parsed.get("intent") if parsed else None
    return intent if isinstance(intent, str) else INVALID


def _intent_quality(truth: list[str], predicted: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 of the parsed intents against the rows' intents (an answer without one counts as
    its own wrong label)."""
    from pipelines.evaluate import classification_metrics

    labels = sorted(set(truth) | set(predicted))
    index = {label: i for i, label in enumerate(labels)}
    scored = classification_metrics(
        np.array([index[t] for t in truth]), np.array([index[p] for p in predicted]), labels
    )
    return {"accuracy": scored.accuracy, "macro_f1": scored.macro_f1}


def gate_tags(decision: GateDecision) -> dict[str, str]:
    return {"gate.within_budget": str(decision.promote).lower(), "gate.reason": decision.reason[:4000]}


def _speed(timing: dict[str, float], batch_size: int) -> dict[str, float]:
    tokens = max(1, int(timing["tokens"]))
    return {
        "tokens": tokens,
        "tokens_per_s": tokens / max(timing["wall"], 1e-9),
        "cpu_seconds_per_1k_tokens": 1000 * timing["cpu"] / tokens,
        "batch_size": batch_size,
    }


def llama_cpp_speed(path: Path, rows: pd.DataFrame, variant: LoadedLM, max_new_tokens: int,
                    threads: int | None) -> dict[str, Any] | None:  # fmt: skip
    """Tokens/s of the GGUF under llama.cpp (one prompt at a time), when llama-cpp-python (the `bench` extra)
    is installed; None otherwise (the GGUF's figures are then those of its transformers reload)."""
    import importlib.util

    if not path.is_file() or importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama  # optional: the `bench` extra

    from pipelines.chat import prompt_text

    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=threads, verbose=False)
    tokens, started = 0, time.perf_counter()
    for message in rows["instruction"].astype(str).tolist():
        prompt = prompt_text(variant.tokenizer, message)
        out = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0)
        tokens += int(out["usage"]["completion_tokens"])
    return {
        "tokens": tokens,
        "tokens_per_s": tokens / max(time.perf_counter() - started, 1e-9),
        "batch_size": 1,
    }


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _weights_bytes(folder: Path, fmt: str) -> int:
    return (folder / (GGUF_FILE if fmt == "gguf" else INT8_FILE)).stat().st_size


# --- record -----------------------------------------------------------------------------------------------


def lm_cost_tags(speed: dict[str, float], price_per_core_hour: float) -> dict[str, str]:
    """Version tags: CPU-seconds per 1,000 generated tokens and, at the price, the cost per 1,000 tokens."""
    per_1k = speed["cpu_seconds_per_1k_tokens"] / 3600 * price_per_core_hour
    return {
        COST_TAG + "cpu_seconds_per_1k_tokens": f"{speed['cpu_seconds_per_1k_tokens']:.4f}",
        COST_TAG + "per_1k_tokens": f"{per_1k:.8f}",
        COST_TAG + "price_per_core_hour": f"{price_per_core_hour:g}",
        COST_TAG + "tokens_per_s": f"{speed['tokens_per_s']:.1f}",
        COST_TAG + "batch_size": str(int(speed["batch_size"])),
    }


def lm_metric_tags(measured: dict[str, Any]) -> dict[str, str]:
    """The copy's held-out scores beside its source's, both measured here on the same rows."""
    from champion.registry import METRIC_TAG

    keys = ("intent_accuracy", "exact_match", "valid_json", "entity_f1", "macro_f1")
    return {
        **{METRIC_TAG + f"heldout_{k}": f"{measured['variant'][k]:.6f}" for k in keys},
        **{f"source.heldout_{k}": f"{measured['source'][k]:.6f}" for k in keys},
        "agreement": f"{measured['agreement']:.6f}",
        "identical_answers": f"{measured['identical_answers']:.6f}",
        "heldout_rows": str(measured["rows"]),
        "memory.variant_file_bytes": str(measured["memory"]["variant_file_bytes"]),
        "memory.source_parameter_bytes": str(measured["memory"]["source_parameter_bytes"]),
        "memory.variant_parameter_bytes": str(measured["memory"]["variant_parameter_bytes"]),
    }


def flat_metrics(measured: dict[str, Any]) -> dict[str, float]:
    out = {"rows": measured["rows"], "agreement": measured["agreement"], "speedup": measured["speedup"],
           "identical_answers": measured["identical_answers"]}  # fmt: skip
    for side in ("source", "variant"):
        out.update({f"{side}_{k}": float(v) for k, v in measured[side].items()})
        out.update({f"{side}_{k}": float(v) for k, v in measured[f"{side}_speed"].items()})
    out.update({f"memory_{k}": float(v) for k, v in measured["memory"].items()})
    if measured.get("llama_cpp"):
        out["llama_cpp_tokens_per_s"] = float(measured["llama_cpp"]["tokens_per_s"])
    return out


def _log_files(folder: Path, run_id: str, fmt: str) -> str:
    """Log the copy's files into the active run as a logged model of no flavour; returns its URI."""
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    model = mlflow.initialize_logged_model(name="model", source_run_id=run_id, model_type=f"champion-{fmt}")
    try:
        get_artifact_repository(model.artifact_location).log_artifacts(str(folder))
    except BaseException:
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(model.model_id, "READY")
    return f"models:/{model.model_id}"


def summary_lines(result: LMCompressResult) -> list[str]:
    """What `champion compress` prints for a text-generation version."""
    m = result.measured
    src, var, mem = m["source_speed"], m["variant_speed"], m["memory"]
    verdict = "within budget" if result.decision.promote else "REFUSED"
    reload = "transformers reload, dequantized" if m["format"] == "gguf" else "torch int8"
    lines = [
        f"registered {result.name} v{result.version} ({result.format} of v{result.source_version}) as "
        f"'candidate': {verdict}",
        f"  intent agreement {m['agreement']:.2%} on {m['rows']} held-out rows (identical answers "
        f"{m['identical_answers']:.2%}); exact match {m['variant']['exact_match']:.4f} (source "
        f"{m['source']['exact_match']:.4f})",
        f"  {var['tokens_per_s']:.1f} tokens/s at batch {var['batch_size']} ({reload}; source "
        f"{src['tokens_per_s']:.1f}); CPU-seconds per 1,000 tokens {var['cpu_seconds_per_1k_tokens']:.2f} "
        f"(source {src['cpu_seconds_per_1k_tokens']:.2f})",
        f"  weights file {mem['variant_file_bytes'] / MIB:.1f} MiB, in memory "
        f"{mem['variant_parameter_bytes'] / MIB:.1f} MiB (source {mem['source_parameter_bytes'] / MIB:.1f} "
        f"MiB in fp32); process memory +{mem['variant_load_rss_bytes'] / MIB:.0f} MiB after loading",
    ]
    if m.get("llama_cpp"):
        lines.append(f"  llama.cpp: {m['llama_cpp']['tokens_per_s']:.1f} tokens/s, one prompt at a time")
    if result.promoted:
        lines.append(f"  promoted to champion (champion history {result.name})")
    elif result.decision.promote:
        lines.append(f'  next: champion promote {result.name} {result.version} --reason "..."')
    return lines
