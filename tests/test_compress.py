"""Compression variants on the tiny model: int8 in torch, ONNX, ONNX int8, gated against their source."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_CORPUS, tiny_finetune_config

from champion_cli.cli import main

NAME = "tiny-intents"
# Trained until it is sure of itself (held-out macro-F1 1.0 at 1 and 2 threads): the shared tiny champion
# (6 epochs at 3e-3, macro-F1 0.3-0.65 depending on torch's thread count) sits so close to its decision
# boundaries that int8 noise flipped 4 of its 32 held-out labels in one CI run and 10 in another probe.
# The real model's agreement is measured in benchmarks/compress.py against the default 99 %.
LEARN = {"method": "full", "train": {"epochs": 20, "learning_rate": 1e-3}}
FAST = {
    "budget": {"min_rows": 20, "min_agreement": 0.9},
    "cost": {"rows": 64, "repeats": 1, "batch_size": 16},
}


@pytest.fixture
def source(registry, tiny_model_dir, tickets_csv):
    from champion.registry import promote
    from pipelines.finetune import finetune

    version = finetune(tiny_finetune_config(tickets_csv, tiny_model_dir, **LEARN), registry=registry).version
    promote(registry, NAME, version, reason="first champion")
    return version


def _cfg(to: str, **changes):
    from pipelines.compress import CompressConfig

    data = {"to": to, **FAST}
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return CompressConfig.model_validate(data)


def _aliases(registry) -> dict[str, str]:
    return {k: str(v) for k, v in registry.client.get_registered_model(NAME).aliases.items()}


def test_each_format_gives_its_sources_labels_and_is_registered_with_lineage(registry, source, home, capsys):
    from champion.formats import format_of
    from monitoring.reference import REFERENCE_TAG, load_reference
    from pipelines.compress import compress
    from serving.model import load_version

    texts = TINY_CORPUS + [f"{t} please, it is urgent" for t in TINY_CORPUS]
    fp32 = load_version(registry.client, NAME, source, device="cpu")
    seen = fp32.describe(texts)
    source_tags = registry.client.get_model_version(NAME, source).tags
    for fmt in ("onnx", "onnx-int8", "int8"):
        result = compress(NAME, source, _cfg(fmt), registry=registry)
        assert result.decision.promote, result.decision.reason
        mv = registry.client.get_model_version(NAME, result.version)
        tags = mv.tags
        assert (tags["variant"], tags["format"], tags["source_version"]) == (fmt, fmt, source)
        assert tags["data_sha256"] == source_tags["data_sha256"]  # lineage to the source's data
        assert float(tags["cost.cpu_seconds_per_1k"]) > 0 and float(tags["cost.per_million"]) > 0
        assert tags["gate.within_budget"] == "true" and float(tags["agreement"]) >= 0.9
        assert _aliases(registry)["candidate"] == result.version
        assert format_of(tags) == fmt

        # Loaded as the service loads it: the source's labels on texts it never saw here.
        variant = load_version(registry.client, NAME, result.version, device="cpu")
        assert variant.format == fmt and variant.labels == fp32.labels
        got = variant.describe(texts)
        agree = np.mean(got["probs"].argmax(1) == seen["probs"].argmax(1))
        if fmt == "onnx":  # the same arithmetic in another runtime
            np.testing.assert_allclose(got["probs"], seen["probs"], atol=1e-4)
            np.testing.assert_allclose(got["embeddings"], seen["embeddings"], atol=1e-4)
        else:
            assert agree >= 0.9, f"{fmt}: {agree:.2f}"
            assert np.abs(got["probs"] - seen["probs"]).max() < 0.2
        assert got["embeddings"].shape == seen["embeddings"].shape
        # The drift monitor's reference of the variant is its own (its encoder's embeddings).
        ref = load_reference(registry, NAME, result.version)
        assert tags[REFERENCE_TAG] != source_tags[REFERENCE_TAG] and len(ref) > 0

    # The source got its own cost tags, measured in the same runs.
    assert "cost.cpu_seconds_per_1k" in registry.client.get_model_version(NAME, source).tags
    # `champion models show` lists each version's kind, format and measured cost.
    capsys.readouterr()
    assert main(["models", "show", NAME]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "FORMAT" in lines[1] and "CPU-S/1K (COST/1M)" in lines[1]
    row = next(line.split() for line in lines[2:] if line.split()[0] == result.version)
    assert (
        row[4:8] == ["int8", "of", f"v{source}", "int8"]
        and row[8] == f"{float(tags['cost.cpu_seconds_per_1k']):.2f}"
    )
    # Nothing pickled anywhere in the store.
    assert not [p for p in home.rglob("*") if p.suffix in {".pkl", ".pickle", ".pt", ".bin"}]


def test_a_variant_outside_its_budget_is_registered_but_promotion_refuses_it(registry, source, capsys):
    from pipelines.compress import compress

    result = compress(NAME, source, _cfg("onnx", budget={"min_rows": 10_000}), registry=registry)
    assert not result.decision.promote
    assert "fewer than the 10000" in result.decision.reason
    assert registry.client.get_model_version(NAME, result.version).tags["gate.within_budget"] == "false"

    assert main(["promote", NAME, result.version, "--reason", "cheaper"]) == 1
    err = capsys.readouterr().err
    assert "outside its quality budget" in err and "10000" in err
    assert _aliases(registry)["champion"] == source
    # --force overrides, audited like any forced promotion.
    assert main(["promote", NAME, result.version, "--reason", "accepted by hand", "--force"]) == 0
    assert _aliases(registry)["champion"] == result.version
    event = registry.audit.events(NAME, "champion")[-1]
    assert event.evidence["forced"] is True and event.evidence["variant"] == "onnx"

    # Bad input is one sentence (exit 2), before anything is built.
    capsys.readouterr()
    assert main(["compress", NAME, result.version, "--to", "int8"]) == 2  # an ONNX copy is no source
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: ") and f"compress its source v{source}" in err and len(err.splitlines()) == 1
    )
    assert main(["compress", NAME, "99", "--to", "int8"]) == 2
    assert "99" in capsys.readouterr().err
    assert main(["compress", NAME, source, "--set", "budget.min_agreement=2"]) == 2
    assert "budget.min_agreement" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", NAME, source, "--to", "fp16"])


def test_compress_promote_moves_the_champion_and_a_variant_of_another_version_is_refused(
    registry, source, tiny_model_dir, tickets_csv, capsys
):
    from pipelines.finetune import finetune

    args = ["compress", NAME, source, "--to", "onnx-int8", "--promote", "--json"]
    args += [f"--set={k}" for k in ("budget.min_rows=20", "budget.min_agreement=0.9", "cost.rows=64")]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["promoted"] is True and out["gate"]["promote"] is True
    assert _aliases(registry)["champion"] == out["version"]
    event = registry.audit.events(NAME, "champion")[-1]
    assert event.to_version == out["version"] and event.evidence["within_budget"] is True

    # The fp32 source may come back (a rollback or a promote), and a variant of some other version may not
    # replace it: it would swap the champion's weights for another model's under a "cheaper copy" label.
    other = finetune(tiny_finetune_config(tickets_csv, tiny_model_dir, **LEARN), registry=registry).version
    args = [
        "compress",
        NAME,
        other,
        "--to",
        "onnx",
        "--json",
        "--set=budget.min_rows=20",
        "--set=cost.rows=64",
    ]
    assert main(args) == 0
    stranger = json.loads(capsys.readouterr().out)["version"]
    assert main(["promote", NAME, stranger, "--reason", "cheaper"]) == 1
    assert f"a variant may replace only its own source: build one from v{source}" in capsys.readouterr().err
