"""The support-reply task as a chat: the system prompt, the JSON answer, and its tokens for training.

A row (from `load_reply_rows` or `pipelines.replygen`) becomes one user message and one compact JSON
answer `{"intent", "category", "entities", "reply"}`. Prompts are rendered with the tokenizer's own chat
template, so training and generation see the same text.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from champion.errors import ChampionError
from champion.tables import read_table

SYSTEM_PROMPT = (
    "You are a customer-support assistant. Answer with one compact JSON object with the keys intent, "
    "category, entities and reply, and nothing else."
)
ANSWER_KEYS = ("intent", "category", "entities", "reply")
NEEDED_COLUMNS = ("instruction", "intent", "category", "entity_type", "entity_value", "response")
IGNORE_INDEX = -100  # the label torch's cross-entropy skips


def target(row: Mapping[str, Any]) -> dict[str, Any]:
    """The answer a row asks for: intent, category, {entity_type: entity_value} or {}, and the reply."""
    entity_type = _text(row.get("entity_type"))
    entities = {entity_type: _text(row.get("entity_value"))} if entity_type else {}
    return {
        "intent": _text(row["intent"]),
        "category": _text(row["category"]),
        "entities": entities,
        "reply": _text(row["response"]),
    }


def target_json(row: Mapping[str, Any]) -> str:
    """`target(row)` as compact JSON, keys in `ANSWER_KEYS` order."""
    return json.dumps(target(row), separators=(",", ":"), ensure_ascii=False)


def chat_messages(message: str) -> list[dict[str, str]]:
    """The system prompt and the customer's message, as chat messages."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": message}]


def prompt_text(tokenizer: Any, message: str) -> str:
    """The generation prompt for `message`: the tokenizer's chat template up to the assistant's turn."""
    _check_chat_tokenizer(tokenizer)
    return tokenizer.apply_chat_template(chat_messages(message), add_generation_prompt=True, tokenize=False)


def encode_for_training(tokenizer: Any, message: str, answer: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of prompt + answer + end-of-turn token, with labels -100 on every prompt token.

    The prompt and the answer are tokenized separately (the template's text already holds its special
    tokens). Truncation keeps the whole prompt and cuts the answer's end to fit `max_length` (the end token
    goes first). A row whose prompt leaves no room for one answer token gives an empty dict: drop it.
    """
    _check_chat_tokenizer(tokenizer)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length!r}; raise max_length.")
    prompt_ids = tokenizer(prompt_text(tokenizer, message), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1:
        return {}
    answer_ids = answer_ids[:room]
    return {
        "input_ids": prompt_ids + answer_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(answer_ids)),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


def parse_answer(text: str) -> dict[str, Any] | None:
    """The first JSON object in `text` (surrounding whitespace or an end token are fine), or None."""
    from serving.lm_server import first_json_object

    return first_json_object(text)


def load_reply_rows(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Rows of a support-replies table (CSV, JSONL or Parquet); entity fields "" where there is no entity.

    A CSV is read as text, so an order id like "00123" keeps its zeros; offsets become nullable Int64.
    """
    source = Path(path)
    if source.suffix.lower() == ".csv" and source.is_file():
        try:
            frame = pd.read_csv(source, dtype=str, keep_default_na=False)
        except (ValueError, pd.errors.ParserError, OSError) as err:
            raise ChampionError(
                f"data.source: '{source}' could not be read as csv ({err}); fix the file."
            ) from None
    else:
        frame = read_table(str(source))
    missing = [column for column in NEEDED_COLUMNS if column not in frame.columns]
    if missing:
        raise ChampionError(
            f"'{source}' has no column '{missing[0]}'; add it (a support-replies table needs the columns "
            f"{', '.join(NEEDED_COLUMNS)})."
        )
    frame = frame.copy()
    for column in ("entity_type", "entity_value"):
        frame[column] = [_text(value) for value in frame[column]]
    for column in ("start_offset", "end_offset"):
        if column in frame.columns:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")  # "" -> <NA>
    return frame


def _check_chat_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ChampionError(
            "The base model's tokenizer has no chat template; use an instruct or chat model (its "
            "tokenizer_config.json has a chat_template) or set tokenizer.chat_template to a Jinja template."
        )
    if tokenizer.eos_token_id is None:
        raise ChampionError(
            "The base model's tokenizer has no end-of-sequence token; set tokenizer.eos_token to the token "
            "that ends an assistant turn (e.g. <|im_end|>)."
        )


def _text(value: Any) -> str:
    """A cell as text; None, NaN and <NA> become ""."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)
