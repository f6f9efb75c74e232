"""Shared fixtures: an isolated CHAMPION_HOME per test, a tiny random BERT built here, generated data."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Offline and quiet, before any test imports transformers or mlflow.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "BENTOML_DO_NOT_TRACK": "True",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)
# prometheus_client picks its multiprocess mode when first imported; `bentoml serve` sets this itself (B2).
# A folder of its own for each process that loads this file (pytest and each xdist worker): /metrics sums
# every file in the folder, so in a shared one the other worker's servers' series would come and go.
_OWN_PROMETHEUS_DIR = "CHAMPION_TESTS_PROMETHEUS_DIR"  # the folder this file made (a worker inherits it)
if os.environ.get("PROMETHEUS_MULTIPROC_DIR") in (None, os.environ.get(_OWN_PROMETHEUS_DIR)):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[_OWN_PROMETHEUS_DIR] = tempfile.mkdtemp(
        prefix="champion-prometheus-"
    )
    _PID = os.getpid()
    atexit.register(  # not in a forked child, which runs this process's atexit handlers too
        lambda folder=os.environ[_OWN_PROMETHEUS_DIR]: os.getpid() == _PID and shutil.rmtree(folder, True)
    )

# The slowest files first: `--dist loadfile` hands files out in collection order, so the longest run beside
# the rest instead of last. xdist's default "loadscope reorder" (the files with the most tests first) would
# put these one-, two- and three-test files last whatever the collection order: it is turned off.
SLOWEST_FIRST = (
    "test_demo.py",
    "test_integration_minilm.py",
    "test_serving_crash.py",
    "test_notebooks.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's option (--no-loadscope-reorder)
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def _migrated_sqlite_template():
    """A new embedded MLflow database gets its tables as a copy of one migrated once per worker.

    MLflow builds every new sqlite store by running all its schema migrations (2-3 s on two busy cores,
    over 10 s on a loaded machine), and most tests start from an empty CHAMPION_HOME. The copy (sqlite's
    backup of the database this very MLflow migrated) is the same database, tables, rows and schema version.
    In this process only: servers and notebooks started by tests still migrate their own stores."""
    import sqlite3

    import mlflow.store.db.utils as db_utils
    import sqlalchemy
    from mlflow.store.model_registry import sqlalchemy_store as registry_store

    migrate = db_utils._initialize_tables
    folder = Path(tempfile.mkdtemp(prefix="champion-mlflow-template-"))
    template = folder / "mlflow.db"

    def initialize(engine) -> None:
        if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
            return migrate(engine)
        if not template.exists():
            built = sqlalchemy.create_engine(f"sqlite:///{folder / 'building.db'}")
            migrate(built)
            built.dispose()
            (folder / "building.db").rename(template)
        source = sqlite3.connect(template)
        try:
            with engine.connect() as conn:
                source.backup(conn.connection.driver_connection)
        finally:
            source.close()

    db_utils._initialize_tables = registry_store._initialize_tables = initialize
    yield
    db_utils._initialize_tables = registry_store._initialize_tables = migrate
    shutil.rmtree(folder, ignore_errors=True)


TINY_INTENTS = ["track_order", "reset_password", "card_declined", "invoice_request"]
TINY_CORPUS = [
    "where is my order",
    "i want a refund for my order",
    "my card was declined at checkout",
    "please reset my password",
    "my account is locked",
    "cancel my subscription please",
    "the package arrived damaged",
    "i received the wrong item",
    "update my payment method",
    "send me an invoice",
    "my delivery is late",
    "the promo code does not work",
    "close my account",
    "change my shipping address",
    "track my package",
    "dispute a charge on my bill",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT encoder and a WordPiece tokenizer trained on a few sentences."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from pipelines.ticketgen import generate_tickets

    out = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = TINY_CORPUS + list(generate_tickets(400, seed=1)["text"])
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    fast.save_pretrained(out)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)  # the same tiny encoder in every session, so its tests do not vary run to run
    BertModel(config).save_pretrained(out)
    return out


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty CHAMPION_HOME with the embedded sqlite stores; shared-store variables cleared."""
    path = tmp_path / "home"
    monkeypatch.setenv("CHAMPION_HOME", str(path))
    monkeypatch.setenv("CHAMPION_ACTOR", "pytest")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CHAMPION_AUDIT_URL", raising=False)
    return path


@pytest.fixture
def registry(home):
    from champion.registry import connect

    reg = connect()
    yield reg
    reg.close()


@pytest.fixture
def tickets_csv(tmp_path) -> Path:
    from pipelines.ticketgen import write_tickets

    # Four intents with distinct vocabulary: a tiny random model learns them in a few epochs.
    return write_tickets(tmp_path / "tickets.csv", 320, seed=3, intents=TINY_INTENTS)


def tiny_finetune_config(data: Path, model_dir: Path, /, **sections):
    """A FinetuneConfig that trains the tiny model in a few seconds; keyword sections override defaults."""
    from pipelines.finetune import FinetuneConfig

    base = {
        "data": {"source": str(data), "seed": 0},
        "model": {"base": str(model_dir), "max_length": 32},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "learning_rate": 5e-3,
            "device": "cpu",
            "progress": False,
            "seed": 0,
        },
        "registry": {"model_name": "tiny-intents", "experiment": "tests"},
    }
    for key, value in sections.items():
        base[key] = (
            {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return FinetuneConfig.model_validate(base)


@pytest.fixture(scope="session")
def pg_server():
    """The PostgreSQL server of this session: 127.0.0.1:5432, else a throwaway one (tests/pgserver.py)."""
    from pgserver import acquire

    server = acquire()
    if isinstance(server, str):
        if os.environ.get("CI") == "true":  # CI must never pass without the PostgreSQL tests
            pytest.fail(server)
        pytest.skip(server)
    yield server
    if server.stop is not None:
        server.stop()


@pytest.fixture
def pg_url(pg_server):
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    import uuid

    import psycopg2

    name = f"champion_test_{uuid.uuid4().hex[:10]}"
    try:
        conn = psycopg2.connect(pg_server.admin_dsn(), connect_timeout=5)
    except psycopg2.OperationalError as err:
        pytest.fail(f"PostgreSQL on {pg_server.host}:{pg_server.port} is not reachable ({err}).")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield pg_server.url(name)
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture
def tiny_champion(registry, tiny_model_dir, tickets_csv) -> str:
    """v1 of tiny-intents: the tiny model fully fine-tuned on the four tiny intents, promoted to champion."""
    from champion.registry import promote
    from pipelines.finetune import finetune

    learn = {"method": "full", "train": {"epochs": 6, "learning_rate": 3e-3}}
    version = finetune(tiny_finetune_config(tickets_csv, tiny_model_dir, **learn), registry=registry).version
    promote(registry, "tiny-intents", version, reason="first champion")
    return version


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_urls(request, home) -> tuple[str, str]:
    """(tracking URI, audit URL): both in one PostgreSQL database, or the embedded sqlite files."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        return url, url
    return f"sqlite:///{home / 'mlflow.db'}", f"sqlite:///{home / 'audit.db'}"


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random Llama (4 heads, 2 KV heads, tied embeddings like SmolLM2) and a byte-level
    BPE tokenizer trained on a few sentences, with a ChatML chat template; eos and pad are `<|im_end|>`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        *TINY_CORPUS,
        '{"intent": "track_order", "category": "ORDER", "entities": {"order_number": "A-1234"}}',
        '{"intent": "reset_password", "category": "ACCOUNT", "entities": {}, "reply": "I can help."}',
        "system user assistant",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=256,
        chat_template=CHATML_TEMPLATE,
    ).save_pretrained(out)
    ids = {s: tok.token_to_id(s) for s in specials}
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|im_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)  # the same tiny model in every session
    LlamaForCausalLM(config).save_pretrained(out)
    return out
