"""The support-reply task: generated rows, the chat prompt and JSON answer, training tokens, and scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from champion.errors import ChampionError
from champion.tables import read_table
from pipelines import replygen
from pipelines.chat import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    chat_messages,
    encode_for_training,
    load_reply_rows,
    parse_answer,
    prompt_text,
    target,
    target_json,
)
from pipelines.generation_eval import per_row, rouge_l, score_answers
from pipelines.replygen import INTENTS, REPLY_COLUMNS, generate_replies, write_replies

BITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "bitext" / "support_replies.csv"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _chat_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer trained on generated rows, with ChatML special tokens (under a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rows = generate_replies(120, seed=5)
    corpus = [SYSTEM_PROMPT, *rows["instruction"], *(target_json(row) for _, row in rows.iterrows())]
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def chat_tokenizer():
    return _chat_tokenizer()


# --- the generator -----------------------------------------------------------------------------------


def test_generator_is_deterministic_and_varied() -> None:
    first = generate_replies(300, seed=3)
    pd.testing.assert_frame_equal(first, generate_replies(300, seed=3))
    assert not first.equals(generate_replies(300, seed=4))
    assert list(first.columns) == list(REPLY_COLUMNS)
    assert set(first["intent"]) == set(INTENTS) and len(INTENTS) >= 10
    assert first["category"].nunique() >= 4
    assert (first.groupby("intent")["category"].nunique() == 1).all()
    assert first["instruction"].nunique() >= 0.9 * len(first)
    with_entity = first["entity_type"] != ""
    assert 0.2 < with_entity.mean() < 0.8
    assert first.loc[with_entity, "entity_type"].nunique() >= 5
    tags = "".join(first["tags"])
    assert all(letter in tags for letter in "BPQLZIK")


def test_entity_values_sit_at_their_offsets() -> None:
    frame = generate_replies(400, seed=1)
    for row in frame.itertuples():
        if row.entity_type:
            assert row.instruction[row.start_offset : row.end_offset] == row.entity_value
            assert row.entity_value in row.response
        else:
            assert row.entity_value == "" and pd.isna(row.start_offset) and pd.isna(row.end_offset)


def test_every_template_entity_has_a_reply() -> None:
    for intent, (_, templates, replies) in replygen._INTENTS.items():
        assert "" in replies, intent
        for template in templates:
            slots = replygen._SLOT_RE.findall(template)
            assert len(slots) <= 1 and all(slot in replies for slot in slots), (intent, template)


def test_intents_argument_selects_and_refuses_unknown_names() -> None:
    frame = generate_replies(20, seed=0, intents=["track_order", "complaint"])
    assert set(frame["intent"]) == {"track_order", "complaint"}
    with pytest.raises(ValueError, match="unknown names \\['nope'\\]"):
        generate_replies(5, intents=["nope"])
    with pytest.raises(ValueError, match="positive integer"):
        generate_replies(0)


def test_written_replies_load_back_unchanged(tmp_path) -> None:
    path = write_replies(tmp_path / "replies.csv", 60, seed=2)
    pd.testing.assert_frame_equal(load_reply_rows(path), generate_replies(60, seed=2))
    assert len(read_table(str(path))) == 60
    with pytest.raises(ValueError, match="CSV only"):
        write_replies(tmp_path / "replies.parquet", 5)


# --- prompt and answer -------------------------------------------------------------------------------


def test_target_json_is_compact_and_round_trips() -> None:
    frame = generate_replies(50, seed=7)
    for _, row in frame.iterrows():
        text = target_json(row)
        assert list(json.loads(text)) == ["intent", "category", "entities", "reply"]
        assert ": " not in text.split('"reply"')[0]  # compact separators before the free text
        assert parse_answer(text) == target(row)
        assert parse_answer(f"  \n{text}<|im_end|>\n") == target(row)
    entity_row = frame[frame["entity_type"] != ""].iloc[0]
    assert target(entity_row)["entities"] == {entity_row["entity_type"]: entity_row["entity_value"]}
    assert target(frame[frame["entity_type"] == ""].iloc[0])["entities"] == {}


def test_parse_answer_takes_the_first_object_or_none() -> None:
    assert parse_answer('Sure! {oops} then {"intent": "x"} and {"intent": "y"}') == {"intent": "x"}
    for text in ["", "no json here", '{"intent": "x"', "[1, 2]", '"just a string"']:
        assert parse_answer(text) is None


def test_prompt_uses_the_tokenizers_own_template(chat_tokenizer) -> None:
    text = prompt_text(chat_tokenizer, "where is my order?")
    assert text == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nwhere is my order?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert [m["role"] for m in chat_messages("hi")] == ["system", "user"]


def test_training_labels_mask_exactly_the_prompt(chat_tokenizer) -> None:
    message, answer = "cancel order 12345 pls", '{"intent":"cancel_order","entities":{}}'
    encoded = encode_for_training(chat_tokenizer, message, answer, max_length=512)
    prompt_ids = chat_tokenizer(prompt_text(chat_tokenizer, message), add_special_tokens=False)["input_ids"]
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert IGNORE_INDEX not in labels[len(prompt_ids) :]
    assert labels[len(prompt_ids) :] == ids[len(prompt_ids) :]
    assert chat_tokenizer.decode(labels[len(prompt_ids) :]) == answer + "<|im_end|>"
    assert encoded["attention_mask"] == [1] * len(ids)


def test_training_truncation_keeps_the_prompt_and_drops_rows_without_answer(chat_tokenizer) -> None:
    message, answer = "where is my refund", '{"intent":"refund_status","category":"REFUND"}'
    n_prompt = len(
        chat_tokenizer(prompt_text(chat_tokenizer, message), add_special_tokens=False)["input_ids"]
    )
    cut = encode_for_training(chat_tokenizer, message, answer, max_length=n_prompt + 3)
    assert len(cut["input_ids"]) == n_prompt + 3
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 3
    assert chat_tokenizer.eos_token_id not in cut["labels"]
    assert encode_for_training(chat_tokenizer, message, answer, max_length=n_prompt) == {}


def test_a_tokenizer_without_chat_template_is_refused() -> None:
    plain = _chat_tokenizer(chat_template=None)
    with pytest.raises(ChampionError, match="no chat template; use an instruct or chat model"):
        prompt_text(plain, "hi")
    with pytest.raises(ChampionError, match="no chat template"):
        encode_for_training(plain, "hi", "{}", max_length=64)


# --- scores ------------------------------------------------------------------------------------------


def _rows() -> pd.DataFrame:
    return pd.DataFrame(
        [
            ("cancel order 123", "cancel_order", "ORDER", "order_id", "123", "We cancelled order 123."),
            ("where is my parcel", "track_order", "ORDER", "", "", "It is on its way."),
            ("refund $5.00", "get_refund", "REFUND", "refund_amount", "$5.00", "Refund started."),
            (
                "reset a@b.c",
                "reset_password",
                "ACCOUNT",
                "account_email",
                "a@b.c",
                "the cat is on the mat today",
            ),
        ],
        columns=["instruction", "intent", "category", "entity_type", "entity_value", "response"],
    )


def _answer(intent: str, category: str, entities: dict, reply: str) -> str:
    return json.dumps({"intent": intent, "category": category, "entities": entities, "reply": reply})


def test_rouge_l_of_two_known_sentences() -> None:
    # LCS "the cat on the mat" = 5 tokens; P = 5/6, R = 5/7, F1 = 2PR/(P+R) = 10/13.
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat today") == pytest.approx(10 / 13)
    assert rouge_l("same words", "Same, words!") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("abc", "xyz") == 0.0


def test_score_answers_on_hand_made_answers() -> None:
    rows = _rows()
    answers = [
        target_json(rows.iloc[0]) + "<|im_end|>",  # all right
        "I think you want to track an order.",  # not JSON
        _answer("refund_status", "REFUND", {"refund_amount": "$5.00"}, "Refund started."),  # wrong intent
        _answer("reset_password", "ACCOUNT", {"account_email": "x@y.z"}, "The cat sat on the mat."),  # entity
    ]

    def embed(texts: list[str]) -> np.ndarray:
        return np.array([[1.0, 0.0] if "cat" in text.lower() else [0.0, 1.0] for text in texts])

    scores = score_answers(answers, rows, embed=embed)
    assert scores == pytest.approx(
        {
            "valid_json": 3 / 4,
            "intent_accuracy": 2 / 4,
            "category_accuracy": 3 / 4,
            "entity_f1": 2 * 2 / (2 * 2 + 1 + 1),  # TP 2 (rows 0, 2), FP 1 and FN 1 (row 3)
            "exact_match": 1 / 4,
            "reply_rouge_l": (1 + 0 + 1 + 10 / 13) / 4,
            "reply_similarity": 3 / 4,  # the unparsed answer has no reply: 0
            "rows": 4.0,
        }
    )
    assert "reply_similarity" not in score_answers(answers, rows)
    table = per_row(answers, rows)
    assert list(table["valid_json"]) == [True, False, True, True]
    assert list(table["exact_match"]) == [True, False, False, False]
    assert table.loc[0, "reference"] == target_json(rows.iloc[0])


def test_entity_scores_ignore_case_and_define_the_empty_case() -> None:
    rows = _rows().iloc[[1]]
    assert score_answers([_answer("track_order", "ORDER", {}, "x")], rows)["entity_f1"] == 1.0
    rows = _rows().iloc[[0]].assign(entity_type="account_type", entity_value="Platinum")
    answer = _answer("cancel_order", "ORDER", {"account_type": "platinum"}, "We cancelled order 123.")
    assert score_answers([answer], rows)["exact_match"] == 1.0
    with pytest.raises(ValueError, match="one answer per row"):
        score_answers([], rows)


# --- the bitext file ---------------------------------------------------------------------------------


def test_load_reply_rows_names_a_missing_column(tmp_path) -> None:
    path = tmp_path / "bad.csv"
    _rows().drop(columns=["response"]).to_csv(path, index=False)
    with pytest.raises(ChampionError, match="has no column 'response'; add it"):
        load_reply_rows(path)


@pytest.mark.skipif(not BITEXT.is_file(), reason=f"{BITEXT} is absent (the shared bitext data set)")
def test_load_reply_rows_reads_the_bitext_file() -> None:
    rows = load_reply_rows(BITEXT)
    assert len(rows) == len(read_table(str(BITEXT))) > 5000
    assert rows["intent"].nunique() == 24
    with_entity = rows[rows["entity_type"] != ""]
    assert (rows.loc[rows["entity_type"] == "", "entity_value"] == "").all()
    assert len(with_entity) > 2000
    for row in with_entity.itertuples():
        found = row.instruction[row.start_offset : row.end_offset]
        # The file writes some values normalised: "Platinum" for "platinum", "4587345" for "00004587345".
        assert found.casefold().lstrip("0") == row.entity_value.casefold().lstrip("0"), row
    assert parse_answer(target_json(rows.iloc[0])) == target(rows.iloc[0])
