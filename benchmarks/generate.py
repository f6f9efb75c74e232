"""Generation benchmark on CPU (not a test): tokens/s and time to first token (TTFT) of one small causal LM at
1, 4 and 16 concurrent streams, on four stacks, all measured in this run on the same weights.

Registers SmolLM2-135M-Instruct after a very short LoRA SFT run (`pipelines.sft.sft`, merged: format
causal-lm) in a scratch CHAMPION_HOME and promotes it to champion, then measures, one stack at a time:

(a) ceiling: the raw batched generate loop in one process on that version (`load_generative_version`, then
    one left-padded batch of N prompts through `model.generate`); TTFT is when the batch's first token comes
    out (a streamer), tokens/s is generated tokens over the wall time. `raw prefill` is one forward pass of
    the batch's prompts alone (the best of 5, logits of the last position only): what TTFT is judged against.
(b) Champion: `champion serve NAME` (a real `bentoml serve` on 127.0.0.1), N concurrent streams through the
    official `openai` client (AsyncOpenAI, stream=True); TTFT is the time to the first content chunk.
(c) `mlflow models serve` of the same weights logged with MLflow's transformers flavour (task llm/v1/chat),
    `--env-manager local --workers 1`, N concurrent POST /invocations (aiohttp); it cannot stream, so TTFT
    is the time to the whole answer. Greedy: no temperature is sent (its pyfunc refuses 0), and the logged
    model's generation config says do_sample false (transformers' pipeline samples at 0.7 otherwise).
(d) llama.cpp (`llama-cpp-python`, where it is installed) on GGUF exports of the same weights (f32, and
    q8_0 as users run it; `export_gguf`), in one process. Its `Llama` answers one request at a time (as its
    own server does), so N concurrent requests queue for it and each TTFT includes the wait; it reuses the
    KV cache of the prefix a prompt shares with the previous one (the system prompt), as users get it.

Every stack gets the same chat prompts (generated support messages from pipelines.replygen with the task's
system prompt, rendered by the chat template), the same max_tokens, greedy decoding, fp32 (llama.cpp: the
GGUF's types), the same torch/OpenMP threads. At N streams each of N closed-loop clients sends
ceil(min_requests / N) requests one after another; request k of a level always carries message k, so the
answers of every stack are compared with the ceiling's (`same` column). CPU use of the whole machine is
recorded per level, so other load shows. Results are appended to benchmarks/results/generate-cpu.json and the
latest run is written as benchmarks/results/generate-cpu.md. On 2 cores shared with other jobs (load average
9-15, 1 thread per process) the measurements took 11.5 min and the preparation about 10 (SFT run, MLflow
copy, two GGUF exports; reused with --home). Run:

    .venv/bin/python -m benchmarks.generate                 # 1, 4, 16 streams, every stack
    .venv/bin/python -m benchmarks.generate --home /tmp/gh  # keep (and next time reuse) the prepared model
    .venv/bin/python -m benchmarks.generate --quick         # 1 and 4 streams, 24 tokens, f32 GGUF only
    .venv/bin/python -m benchmarks.generate --streams 16 --only ceiling,champion
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, child_json, code_state, machine, module_command
from benchmarks.serving import free_port, machine_busy, percentile, server, server_env

RESULTS = ROOT / "benchmarks" / "results"
CODE = ("serving", "pipelines/lm.py", "benchmarks/generate.py")  # what this benchmark measures
NAME = "bench-replies"
STACKS = ("ceiling", "champion", "mlflow", "llama.cpp")
GGUF_TYPES = ("f32", "f16", "q8_0")
ANSWER = "answer: "  # how a child's JSON line starts
PREPARED = "prepared.json"  # in the scratch home: what `prepare` made, so that --home reuses it


# --- the model: one short SFT run, registered merged; the same weights for MLflow and as GGUF --------------


def prepare(payload: dict[str, Any]) -> dict[str, Any]:
    """Register the version: a short SFT run, merged, promoted to champion."""
    import torch

    from champion.registry import connect, promote
    from pipelines.sft import SFTConfig, sft

    threads = payload["threads"]
    torch.set_num_threads(threads)
    cfg = SFTConfig.model_validate(
        {
            "data": {"generate": 64, "max_eval_rows": 2, "seed": 3},  # a few steps: speed needs no quality
            "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "precision": "fp32",
                      "num_threads": threads, "progress": False},
            "generation": {"max_new_tokens": 8},
            "eval": {"reply_similarity": False, "samples": 0},
            "registry": {"model_name": NAME, "experiment": "benchmark-generate", "merge": True},
        }
    )  # fmt: skip
    started = time.perf_counter()
    result = sft(cfg)
    reg = connect()
    promote(reg, NAME, result.version, reason="benchmark champion")
    reg.close()
    return {"version": result.version, "sft_seconds": time.perf_counter() - started}


def log_for_mlflow(payload: dict[str, Any]) -> dict[str, Any]:
    """The registered version's weights logged again with MLflow's transformers flavour (llm/v1/chat)."""
    import mlflow
    import torch
    import transformers

    from champion.registry import connect
    from champion.tracking import ensure_experiment
    from serving.lm_model import load_generative_version

    reg = connect()
    lm = load_generative_version(reg.client, NAME, payload["version"], device="cpu", dtype="fp32")
    reg.close()
    # transformers' text-generation pipeline samples (temperature 0.7) unless the model's generation config
    # says otherwise, and the pyfunc takes no do_sample from a request: greedy is set here, as a user would.
    lm.model.generation_config.do_sample = False
    mlflow.set_experiment(experiment_id=ensure_experiment("benchmark-generate"))
    with mlflow.start_run(run_name="mlflow-transformers"):
        info = mlflow.transformers.log_model(
            transformers_model={"model": lm.model, "tokenizer": lm.tokenizer},
            name="model",
            task="llm/v1/chat",
            pip_requirements=[f"transformers=={transformers.__version__}", f"torch=={torch.__version__}"],
        )
    return {"uri": info.model_uri}


def write_gguf(payload: dict[str, Any]) -> dict[str, Any]:
    """The registered version as a GGUF file of `payload["kind"]`, in the scratch home."""
    from champion.registry import connect
    from pipelines.lm import packaged_gguf
    from serving.lm_model import load_generative_version

    reg = connect()
    lm = load_generative_version(reg.client, NAME, payload["version"], device="cpu", dtype="fp32")
    reg.close()
    path = Path(os.environ["CHAMPION_HOME"]) / f"{NAME}-v{payload['version']}-{payload['kind']}.gguf"
    started = time.perf_counter()
    export_gguf(lm.model, lm.tokenizer, packaged_gguf(), path, payload["kind"])
    return {"path": str(path), "mb": path.stat().st_size / 1e6, "seconds": time.perf_counter() - started}


def export_gguf(model, tokenizer, source: Path, out: Path, kind: str) -> None:
    """Write `model` (a Llama-architecture causal LM in memory) as a llama.cpp GGUF file of `kind` (f32, f16
    or q8_0 for the 2-D weights; norms stay f32). The metadata (tokenizer, merges, hyper-parameters) is
    copied from the packaged SmolLM2 GGUF `source`; the chat template, eos and pad ids come from
    `tokenizer`, and no BOS is added (the transformers tokenizer adds none), so llama.cpp sees the same
    prompt tokens. q and k rows are permuted into llama.cpp's rotary layout, as its converter does."""
    import gguf
    import numpy as np

    qtype = {"f32": None, "f16": None, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]  # fmt: skip
    config = model.config
    overrides = {
        "tokenizer.chat_template": tokenizer.chat_template,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id,
        "tokenizer.ggml.add_bos_token": False,
        "general.name": out.stem,
    }
    skip = ("general.architecture", "general.file_type", "general.quantization_version")
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(out, arch="llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = overrides.get(key, field.contents())
        if value is not None:
            writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_file_type(file_type)
    if qtype is not None:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"export_gguf: no GGUF name for the tensor '{hf_name}' (not a Llama model?).")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _rotary_rows(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _rotary_rows(data, kv_heads)
        if data.ndim == 1 or kind == "f32":
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        elif kind == "f16":
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rotary_rows(weight, heads: int):
    """transformers' q/k rows (halves of each head's rotary pairs) in llama.cpp's interleaved order."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def messages_for(count: int) -> list[list[dict[str, str]]]:
    """`count` chat requests: the task's system prompt and one generated support message each."""
    from pipelines.chat import chat_messages
    from pipelines.replygen import generate_replies

    return [chat_messages(text) for text in generate_replies(count, seed=11)["instruction"]]


# --- what every stack answers with -------------------------------------------------------------------------


@dataclass
class Answer:
    """One request: its message index, when it was sent, when its first token and its end came (seconds on
    one clock), its tokens, its text, and an error if it failed."""

    index: int
    sent: float
    first: float | None
    done: float
    completion_tokens: int
    prompt_tokens: int | None
    text: str
    finish: str | None = None
    error: str | None = None


def _plan(streams: int, min_requests: int) -> int:
    """Requests per client at `streams` concurrent clients: at least `min_requests` in all."""
    return max(1, math.ceil(min_requests / streams))


def _summarise(stack: str, streams: int, answers: list[Answer], wall: float, busy: float) -> dict[str, Any]:
    ok = [a for a in answers if a.error is None]
    ttft = [a.first - a.sent for a in ok if a.first is not None]
    tokens = sum(a.completion_tokens for a in ok)
    return {
        "stack": stack,
        "streams": streams,
        "requests": len(answers),
        "errors": len(answers) - len(ok),
        "error_samples": sorted({a.error for a in answers if a.error})[:3],
        "completion_tokens": tokens,
        "prompt_tokens_mean": (
            sum(a.prompt_tokens for a in ok if a.prompt_tokens) / len(ok)
            if ok and ok[0].prompt_tokens
            else None
        ),
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
        "request_p50_s": percentile([a.done - a.sent for a in ok], 50),
        "finish_reasons": {r: sum(a.finish == r for a in ok) for r in sorted({str(a.finish) for a in ok})},
        "machine_busy_cores": busy,
        "answers": {str(a.index): a.text for a in ok},
    }


async def _level(one: Callable[[int], Awaitable[Answer]], streams: int, per_client: int) -> tuple:
    """`streams` closed-loop clients, each sending `per_client` requests in turn; (answers, wall, busy)."""

    async def client(i: int) -> list[Answer]:
        return [await one(r * streams + i) for r in range(per_client)]

    busy0, started = machine_busy(), time.perf_counter()
    done = await asyncio.gather(*(client(i) for i in range(streams)))
    wall = time.perf_counter() - started
    return [a for answers in done for a in answers], wall, (machine_busy() - busy0) / wall


def _threaded_levels(stack: str, one: Callable[[int], Answer], levels: list[int], min_requests: int) -> list:
    """`_level` for a blocking `one`, each client a thread (an in-process stack)."""

    async def run(streams: int) -> tuple:
        return await _level(lambda k: asyncio.to_thread(one, k), streams, _plan(streams, min_requests))

    out = []
    for streams in levels:
        out.append(_summarise(stack, streams, *asyncio.run(run(streams))))
    return out


# --- (a) the ceiling: model.generate on left-padded batches, in this process ------------------------------


class _FirstToken:
    """A generate streamer that notes when the first new token comes out (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.at = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def measure_ceiling(payload: dict[str, Any]) -> dict[str, Any]:
    import torch

    from champion.registry import connect
    from serving.lm_model import load_generative_version

    torch.set_num_threads(payload["threads"])
    reg = connect()
    lm = load_generative_version(reg.client, NAME, payload["version"], device="cpu", dtype="fp32")
    reg.close()
    model, tok = lm.model, lm.tokenizer
    prompts = [
        tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in payload["messages"]
    ]
    max_tokens, eos = payload["max_tokens"], _eos_ids(model, tok)

    def batch(indices: list[int]):
        return tok([prompts[k % len(prompts)] for k in indices], return_tensors="pt", padding=True)

    def prefill_ms(enc) -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            model(**enc, use_cache=True, logits_to_keep=1)  # the next token's logits only, as generate
            return (time.perf_counter() - started) * 1000

    def generate(indices: list[int]) -> list[Answer]:
        enc, streamer = batch(indices), _FirstToken()
        sent = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
        done, width = time.perf_counter(), enc["input_ids"].shape[1]
        answers = []
        for row, k in enumerate(indices):
            ids = out[row, width:].tolist()
            n = next(
                (i + 1 for i, t in enumerate(ids) if t in eos), len(ids)
            )  # eos counted, as a server does
            finish = "stop" if ids and ids[n - 1] in eos else "length"
            text = tok.decode(ids[:n], skip_special_tokens=True)
            prompt = int(enc["attention_mask"][row].sum())
            answers.append(Answer(k, sent, streamer.at, done, n, prompt, text, finish))
        return answers

    generate([0])  # warm-up
    levels, prefill = [], {}
    for streams in payload["levels"]:
        prefill_ms(batch(list(range(streams))))  # warm-up at this width
        prefill[streams] = min(prefill_ms(batch(list(range(streams)))) for _ in range(5))  # its own cost
        answers, busy0, started = [], machine_busy(), time.perf_counter()
        for r in range(_plan(streams, payload["min_requests"])):  # one batch of `streams` prompts per round
            answers += generate([r * streams + i for i in range(streams)])
        wall = time.perf_counter() - started
        row = _summarise("ceiling", streams, answers, wall, (machine_busy() - busy0) / wall)
        row["raw_prefill_ms"] = prefill[streams]
        levels.append(row)
    return {"torch_threads": torch.get_num_threads(), "levels": levels, "raw_prefill_ms": prefill}


def _eos_ids(model, tok) -> set[int]:
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return found | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


# --- (d) llama.cpp: llama-cpp-python's Llama on a GGUF file, one request at a time -----------------------


def measure_llama(payload: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp

    threads = payload["threads"]
    llm = llama_cpp.Llama(
        payload["path"], n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, seed=0,
        verbose=False,
    )  # fmt: skip
    lock = threading.Lock()  # `Llama` holds one sequence: requests take turns, as in llama_cpp.server
    messages, max_tokens = payload["messages"], payload["max_tokens"]

    def one(k: int) -> Answer:
        sent = time.perf_counter()
        first, parts, finish = None, [], None
        with lock:
            stream = llm.create_chat_completion(
                messages=messages[k % len(messages)], max_tokens=max_tokens, temperature=0.0, stream=True
            )
            for chunk in stream:
                choice = chunk["choices"][0]
                text = choice["delta"].get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)  # one chunk per token (llama-cpp-python streams token by token)
                finish = choice.get("finish_reason") or finish
        return Answer(k, sent, first, time.perf_counter(), len(parts), None, "".join(parts), finish)

    one(0)  # warm-up
    levels = _threaded_levels(f"llama.cpp {payload['kind']}", one, payload["levels"], payload["min_requests"])
    return {"llama_cpp_python": llama_cpp.__version__, "kind": payload["kind"], "levels": levels}


# --- (b) Champion's service and (c) mlflow models serve, over HTTP from this process ----------------------


def measure_champion(port: int, payload: dict[str, Any]) -> dict[str, Any]:
    import openai

    messages, max_tokens = payload["messages"], payload["max_tokens"]
    extra = {"stream_options": {"include_usage": True}}  # dropped if the service refuses it

    async def run() -> list[dict[str, Any]]:
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="benchmark", max_retries=0, timeout=600
        )

        async def one(k: int) -> Answer:
            sent = time.perf_counter()
            first, parts, usage, finish = None, [], None, None
            try:
                stream = await client.chat.completions.create(
                    model=NAME, messages=messages[k % len(messages)], max_tokens=max_tokens, temperature=0,
                    stream=True, **extra,
                )  # fmt: skip
                async for chunk in stream:
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            first = first or time.perf_counter()
                            parts.append(choice.delta.content)
                        finish = choice.finish_reason or finish
            except openai.OpenAIError as err:
                return Answer(
                    k, sent, None, time.perf_counter(), 0, None, "", None, f"{type(err).__name__}: {err}"
                )
            tokens = usage.completion_tokens if usage else len(parts)  # without usage: one chunk per token
            return Answer(k, sent, first, time.perf_counter(), tokens, usage.prompt_tokens if usage else None,
                          "".join(parts), finish)  # fmt: skip

        try:
            await one(0)  # warm-up, and is stream_options taken?
        except openai.BadRequestError:
            extra.clear()
        warm = await one(0)
        if warm.error:
            raise RuntimeError(f"Champion's service did not answer: {warm.error}")
        out = []
        for streams in payload["levels"]:
            row = _summarise(
                "champion", streams, *await _level(one, streams, _plan(streams, payload["min_requests"]))
            )
            row["usage"] = bool(extra)
            out.append(row)
        await client.close()
        return out

    return {"levels": asyncio.run(run())}


def measure_mlflow(port: int, payload: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    messages, max_tokens = payload["messages"], payload["max_tokens"]
    url = f"http://127.0.0.1:{port}/invocations"

    async def run() -> list[dict[str, Any]]:
        timeout = aiohttp.ClientTimeout(total=1800)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=64)
        ) as session:

            async def one(k: int) -> Answer:
                sent = time.perf_counter()
                body = {
                    "messages": messages[k % len(messages)],
                    "max_tokens": max_tokens,
                }  # greedy: no temperature
                try:
                    async with session.post(url, json=body) as response:
                        status, raw = response.status, await response.text()
                except (TimeoutError, aiohttp.ClientError) as err:
                    return Answer(k, sent, None, time.perf_counter(), 0, None, "", None, type(err).__name__)
                done = time.perf_counter()
                try:
                    answer = json.loads(raw) if status == 200 else None
                except ValueError:
                    answer = None
                if answer is None:
                    return Answer(k, sent, None, done, 0, None, "", None, f"HTTP {status}: {raw[:200]}")
                completion = answer[0] if isinstance(answer, list) else answer  # one chat.completion
                usage, choice = completion.get("usage") or {}, completion["choices"][0]
                tokens, prompt = usage.get("completion_tokens", 0), usage.get("prompt_tokens")
                text = choice["message"]["content"]
                return Answer(k, sent, done, done, tokens, prompt, text, choice.get("finish_reason"))

            warm = await one(0)
            if warm.error:
                raise RuntimeError(f"mlflow models serve did not answer: {warm.error}")
            out = []
            for streams in payload["levels"]:
                answers = await _level(one, streams, _plan(streams, payload["min_requests"]))
                out.append(_summarise("mlflow", streams, *answers))
            return out

    return {"levels": asyncio.run(run())}


def champion_command(port: int, config: Path) -> list[str]:
    return [sys.executable, "-m", "champion_cli", "serve", NAME, "--config", str(config), "--port", str(port)]


def mlflow_command(uri: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip


# --- the report ---------------------------------------------------------------------------------------------

HEADER = (
    f"{'stack':16s} {'streams':>7s} {'tokens/s':>8s} {'x ceil':>6s} {'TTFT p50':>8s} {'p99 ms':>7s} "
    f"{'prefill':>7s} {'reqs':>4s} {'tokens':>6s} {'same':>5s} {'busy':>4s}"
)


def _row_text(r: dict[str, Any]) -> str:
    ratio = r.get("x_ceiling")
    same = r.get("same_as_ceiling")
    prefill = r.get("raw_prefill_ms")
    return (
        f"{r['stack']:16s} {r['streams']:7d} {r['tokens_per_s']:8.1f} "
        f"{'-' if ratio is None else f'{ratio:.2f}':>6s} {r['ttft_p50_ms']:8.0f} {r['ttft_p99_ms']:7.0f} "
        f"{'-' if prefill is None else f'{prefill:.0f}':>7s} {r['requests']:4d} {r['completion_tokens']:6d} "
        f"{'-' if same is None else f'{same:.0%}':>5s} {r['machine_busy_cores']:4.1f}"
        + (f"  errors {r['errors']}: {r['error_samples']}" if r["errors"] else "")
    )


def _compare(report: dict[str, Any]) -> None:
    """Each row's tokens/s and answers against the ceiling's at the same streams."""
    ceiling = {r["streams"]: r for r in report["stacks"].get("ceiling", {}).get("levels", [])}
    for stack in report["stacks"].values():
        for r in stack.get("levels", []):
            base = ceiling.get(r["streams"])
            if base is None:
                continue
            r["x_ceiling"] = r["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
            shared = [k for k in r["answers"] if k in base["answers"]]
            r["same_as_ceiling"] = (
                sum(r["answers"][k].strip() == base["answers"][k].strip() for k in shared) / len(shared)
                if shared
                else None
            )


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals: Champion >= 0.7x the ceiling's tokens/s and >= 3x mlflow's at the most streams, and
    its TTFT p50 at 1 stream within 20 ms of the raw prefill."""
    levels = {k: {r["streams"]: r for r in v.get("levels", [])} for k, v in report["stacks"].items()}
    ours, ceiling, mlflow = (levels.get(k, {}) for k in ("champion", "ceiling", "mlflow"))
    out = []
    if ours and ceiling:
        top = max(set(ours) & set(ceiling), default=None)
        if top is not None:
            ratio = ours[top]["tokens_per_s"] / ceiling[top]["tokens_per_s"]
            out.append({"goal": f"Champion tokens/s >= 0.7x the ceiling's at {top} streams", "value": ratio,
                        "text": f"x{ratio:.2f}", "met": ratio >= 0.7})  # fmt: skip
        if 1 in ours and 1 in ceiling:
            gap = ours[1]["ttft_p50_ms"] - ceiling[1]["raw_prefill_ms"]
            out.append({"goal": "Champion TTFT p50 at 1 stream within 20 ms of the raw prefill", "value": gap,
                        "text": f"{ours[1]['ttft_p50_ms']:.0f} ms vs {ceiling[1]['raw_prefill_ms']:.0f} ms "
                        f"({gap:+.0f} ms)", "met": gap <= 20})  # fmt: skip
    if ours and mlflow:
        top = max(set(ours) & set(mlflow), default=None)
        if top is not None and mlflow[top]["tokens_per_s"]:
            ratio = ours[top]["tokens_per_s"] / mlflow[top]["tokens_per_s"]
            goal = f"Champion tokens/s >= 3x mlflow models serve at {top} streams"
            out.append({"goal": goal, "value": ratio, "text": f"x{ratio:.2f}", "met": ratio >= 3})
    return out


def _table(report: dict[str, Any]) -> list[str]:
    lines = [HEADER]
    for stack in report["stacks"].values():
        lines += [_row_text(r) for r in stack.get("levels", [])]
    lines.append("")
    for t in report["targets"]:
        lines.append(f"{t['goal']}: {t['text']}: {'met' if t['met'] else 'NOT met'}")
    for stack, why in report["skipped"].items():
        lines.append(f"{stack}: not measured: {why}")
    for stack, why in report.get("failed", {}).items():
        lines.append(f"{stack}: FAILED: {why.splitlines()[0][:300]}")
    return lines


def _markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    return "\n".join(
        [
            "# Generation benchmark (latest run of `python -m benchmarks.generate`)",
            "",
            f"`{report['command']}` at {report['started']}, commit {report['code']['commit'][:12]}"
            + (" with uncommitted changes in what it measures" if report["code"]["uncommitted"] else "")
            + f"; {m['cpus']} CPUs ({m['cpu_model']}), torch {m['torch']}, {report['threads']} threads per "
            f"process; load average {' '.join(f'{x:.1f}' for x in m['load_average_at_start'])} at the start. "
            f"{report['note']}",
            "",
            "Versions: "
            + ", ".join(f"{k} {v or 'not installed'}" for k, v in report["versions"].items())
            + ".",
            "",
            f"Model: {NAME} v{report['prepared'].get('version')} (SmolLM2-135M-Instruct after a short "
            f"LoRA SFT, merged), fp32; {report['max_tokens']} new tokens at most, greedy; prompts: "
            "generated support messages with the task's system prompt. TTFT: first content token "
            "(ceiling: first token of the batch; mlflow: the whole answer, it cannot stream); prefill: one "
            "forward pass of the prompts alone; same: answers identical to the ceiling's for the same "
            "message; busy: cores in use on the whole machine. llama.cpp: llama-cpp-python's `Llama` "
            "answers one request at a time (a queued request's TTFT includes its wait) and reuses the KV "
            "cache of the prompt prefix it shares with the previous request (the system prompt).",
            "",
            "```",
            *_table(report),
            "```",
            "",
            "Every run is kept in generate-cpu.json.",
            "",
        ]
    )


# --- the run --------------------------------------------------------------------------------------------


def _child(task: str, home: Path, threads: int, payload: dict) -> Any:
    """Run `task` in a fresh process with pinned threads and the scratch home; returns its JSON answer."""
    request = home / f"{task}.json"  # a file: the messages are too long for a command line
    request.write_text(json.dumps({**payload, "threads": threads}))
    return child_json(module_command("benchmarks.generate", "--child", task, str(request)),
                      server_env(home, threads), task, ANSWER)  # fmt: skip


def _installed(module: str) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec(module) is None else module


def _versions() -> dict[str, str | None]:
    """The versions of the stacks' packages (None: not installed)."""
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for dist in ("torch", "transformers", "mlflow", "bentoml", "openai", "llama-cpp-python"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _interrupt(signum, frame) -> None:
    """SIGTERM takes the Ctrl-C path, so the servers it started are stopped."""
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--streams", default="1,4,16", help="concurrent stream levels")
    parser.add_argument("--max-tokens", type=int, default=48, help="new tokens per answer at most")
    parser.add_argument("--min-requests", type=int, default=4, help="requests per level at least")
    parser.add_argument("--only", default=",".join(STACKS), help=f"stacks to measure, of {','.join(STACKS)}")
    parser.add_argument(
        "--gguf", default="f32,q8_0", help=f"GGUF types for llama.cpp, of {','.join(GGUF_TYPES)}"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch / llama.cpp threads")
    parser.add_argument("--quick", action="store_true", help="--streams 1,4 --max-tokens 24 --gguf f32")
    parser.add_argument(
        "--serve-config", type=Path, help="a config for `champion serve` (default: its defaults, --threads)"
    )
    parser.add_argument("--home", type=Path, help="reuse this scratch CHAMPION_HOME (prepared by a run)")
    parser.add_argument("--note", default="", help="free text saved with the run (e.g. 'quiet machine')")
    parser.add_argument("--out", type=Path, default=RESULTS / "generate-cpu.json", help="results (appended)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, payload = args.child[0], json.loads(Path(args.child[1]).read_text())
        tasks = {"prepare": prepare, "mlflow": log_for_mlflow, "gguf": write_gguf, "ceiling": measure_ceiling,
                 "llama": measure_llama}  # fmt: skip
        print(ANSWER + json.dumps(tasks[task](payload)))
        return
    if args.quick:
        args.streams, args.max_tokens, args.gguf = "1,4", 24, "f32"
    levels = [int(s) for s in args.streams.split(",")]
    only = [s for s in args.only.split(",") if s]
    kinds = [k for k in args.gguf.split(",") if k]
    for value, allowed, flag in ((only, STACKS, "--only"), (kinds, GGUF_TYPES, "--gguf")):
        if bad := [v for v in value if v not in allowed]:
            parser.error(f"{flag}: {', '.join(bad)} is not one of {', '.join(allowed)}.")
    if min(levels) < 1:
        parser.error("--streams: every level must be 1 or more.")

    signal.signal(signal.SIGTERM, _interrupt)
    home = args.home or Path(tempfile.mkdtemp(prefix="champion-bench-generate-"))
    home.mkdir(parents=True, exist_ok=True)
    for var in ("MLFLOW_TRACKING_URI", "CHAMPION_AUDIT_URL", "CHAMPION_INFERENCE_LOG_URL"):
        os.environ.pop(var, None)
    messages = messages_for(max(levels) * _plan(max(levels), args.min_requests))
    payload = {"messages": messages, "max_tokens": args.max_tokens, "min_requests": args.min_requests,
               "levels": levels}  # fmt: skip
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.generate", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(load_average_at_start=os.getloadavg()),
        "versions": _versions(),
        "code": code_state(CODE),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "min_requests": args.min_requests,
        "note": args.note,
        "stacks": {},
        "skipped": {},
    }
    prepared_file = home / PREPARED
    if prepared_file.exists():
        prepared = json.loads(prepared_file.read_text())
    else:
        print(f"registering {NAME} in {home}: a short SFT run", flush=True)
        prepared = {**_child("prepare", home, args.threads, {}), "gguf": {}}
        prepared_file.write_text(json.dumps(prepared))
    payload["version"] = prepared["version"]
    if "mlflow" in only and "mlflow_uri" not in prepared:
        print(f"logging v{prepared['version']} with MLflow's transformers flavour", flush=True)
        prepared["mlflow_uri"] = _child("mlflow", home, args.threads, {"version": prepared["version"]})["uri"]
    llama = "llama.cpp" in only and _installed("llama_cpp")
    for kind in kinds if llama else []:
        if kind not in prepared["gguf"]:
            print(f"exporting v{prepared['version']} to GGUF ({kind})", flush=True)
            prepared["gguf"][kind] = _child(
                "gguf", home, args.threads, {"version": prepared["version"], "kind": kind}
            )
    prepared_file.write_text(json.dumps(prepared))
    report["prepared"] = prepared
    env = server_env(home, args.threads)

    def champion() -> dict[str, Any]:
        port, config = free_port(), args.serve_config or home / "serve.yaml"
        if args.serve_config is None:  # the service's defaults, with the threads every stack gets
            config.write_text(f"threads: {args.threads}\n")
        command = champion_command(port, config)
        with server(command, env, "/readyz", port, home / "champion.log"):
            return {"command": " ".join(command), **measure_champion(port, payload)}

    def mlflow_serve() -> dict[str, Any]:
        port = free_port()
        command = mlflow_command(prepared["mlflow_uri"], port)
        # Its 60 s request timeout would fail the requests queued behind others at 16 streams.
        mlflow_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
                      "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "1800"}  # fmt: skip
        with server(command, mlflow_env, "/ping", port, home / "mlflow.log"):
            return {"command": " ".join(command), "request_timeout_s": 1800, **measure_mlflow(port, payload)}

    def llama_cpp(kind: str) -> dict[str, Any]:
        gguf = prepared["gguf"][kind]
        result = _child("llama", home, args.threads, {**payload, "path": gguf["path"], "kind": kind})
        return {**result, "gguf_mb": gguf["mb"]}

    runs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if "ceiling" in only:
        runs.append(("ceiling", lambda: _child("ceiling", home, args.threads, payload)))
    if "champion" in only and not _installed("openai"):
        report["skipped"]["champion"] = "the openai client is not installed (pip install openai)"
    elif "champion" in only:
        runs.append(("champion", champion))
    if "mlflow" in only:
        runs.append(("mlflow", mlflow_serve))
    if "llama.cpp" in only and not llama:
        report["skipped"]["llama.cpp"] = "llama-cpp-python is not installed (pip install llama-cpp-python)"
    runs += [(f"llama.cpp {kind}", lambda kind=kind: llama_cpp(kind)) for kind in (kinds if llama else [])]
    report["failed"] = {}
    print(HEADER, flush=True)
    for key, run in runs:
        try:
            report["stacks"][key] = result = run()
        except Exception as err:  # one stack that failed leaves the others' figures
            report["failed"][key] = f"{type(err).__name__}: {err}"[-3000:]
            print(f"{key} failed: {report['failed'][key]}", file=sys.stderr, flush=True)
            continue
        for row in result["levels"]:
            print(_row_text(row), flush=True)

    _compare(report)
    report["targets"] = _targets(report)
    report["load_average_at_end"] = os.getloadavg()
    print("\n" + "\n".join(_table(report)))
    print(f"results: {args.out} (run {_save(report, args.out)}), {args.out.with_suffix('.md')}")
    if args.home is None:  # the registered model, its MLflow copy and the GGUF files
        shutil.rmtree(home, ignore_errors=True)


def _save(report: dict[str, Any], out: Path) -> int:
    """Append `report` to the runs in `out` and write it as the .md beside it; returns its run number."""
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    out.write_text(json.dumps({"runs": [*runs, report]}, indent=2))
    out.with_suffix(".md").write_text(_markdown(report))
    return len(runs) + 1


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # servers are stopped by their context managers on the way out
        raise SystemExit("interrupted; the servers it started have been stopped.") from None
