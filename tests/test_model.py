"""Base-model resolution and device selection."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from champion.errors import ChampionError
from pipelines.model import resolve_base_model, resolve_device


def test_packaged_minilm_resolves_offline():
    path = Path(resolve_base_model("all-MiniLM-L6-v2"))
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert resolve_base_model("sentence-transformers/all-MiniLM-L6-v2") == str(path)


def test_packaged_paraphrase_l3_converts_once_to_a_bert_that_matches_its_onnx_graph(home):
    """The ONNX-only package becomes a transformers folder whose mean-pooled output is the graph's own."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from pipelines.model import _packaged_l3_onnx

    folder = Path(resolve_base_model("paraphrase-MiniLM-L3-v2"))
    assert folder.parent == home / "models" and (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind
    started = time.perf_counter()
    assert resolve_base_model("sentence-transformers/paraphrase-MiniLM-L3-v2") == str(folder)
    assert time.perf_counter() - started < 0.5  # converted once, then found

    tokenizer, encoder = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    texts = ["my card was declined at the shop", "how do I top up with apple pay?", "refund?"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    graph = ort.InferenceSession(str(_packaged_l3_onnx()), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
    (expected,) = graph.run(["461"], feeds)  # the graph's mean-pooled sentence embedding
    assert np.abs(expected - pooled).max() < 1e-4 and np.abs(expected).max() > 0.1
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=5)
    assert classifier.config.num_hidden_layers == 3 and classifier.config.vocab_size == 30522


def test_local_folder_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    assert resolve_base_model("my-model") == str(tmp_path / "my-model")
    assert resolve_base_model("org/some-model") == "org/some-model"  # left for from_pretrained (online users)


def test_device_choice_on_a_cpu_machine():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    device = resolve_device("auto", "auto")
    assert device.type == "cpu" and device.precision == "fp32"
    with pytest.raises(ChampionError, match="train.device: 'cuda' was asked for but no CUDA GPU is visible"):
        resolve_device("cuda", "auto")
    with pytest.raises(ChampionError, match="train.precision: bf16"):
        resolve_device("cpu", "bf16")


def test_memory_tracker_sees_a_transient_peak():
    import torch

    from pipelines.model import MemoryTracker, _rss_mb

    before = _rss_mb()
    with MemoryTracker("cpu") as memory:
        block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched so it is resident
        time.sleep(0.1)  # let the sampler see it
        del block
        time.sleep(0.05)
        after_free = _rss_mb()
    # The baseline is what was resident on entry, not zero and not the peak.
    assert abs(memory.baseline_mb - before) < 32
    # The 256 MiB block was seen though freed before the block ended (a reading at exit alone misses it).
    assert 240 < memory.growth_mb < 320, memory.growth_mb
    assert memory.peak_mb - after_free > 200, (memory.peak_mb, after_free)


def test_memory_tracker_reports_no_growth_when_nothing_is_allocated():
    from pipelines.model import MemoryTracker

    with MemoryTracker("cpu") as memory:
        time.sleep(0.05)
    assert memory.baseline_mb > 0 and 0 <= memory.growth_mb < 16, (memory.baseline_mb, memory.growth_mb)


def test_a_registered_head_is_kept_by_label_name_and_new_labels_are_imprinted(tiny_model_dir, tmp_path):
    """Starting a retrain from a version: its trained rows follow their labels into the new order, and a
    new label's row starts from its examples (its logit leads on them), not from noise."""
    import pandas as pd
    import torch

    from pipelines.model import load_classifier, load_registered_classifier, load_tokenizer

    old_labels = ["card_declined", "reset_password", "track_order"]
    torch.manual_seed(0)
    old = load_classifier(str(tiny_model_dir), old_labels)
    with torch.no_grad():
        old.classifier.weight *= 50  # trained rows are far larger than a fresh head's
    folder = tmp_path / "version"
    old.save_pretrained(folder / "model")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(folder / "components" / "tokenizer")

    labels = ["invoice_request", "track_order", "card_declined", "reset_password"]  # a new one, reordered
    examples = pd.DataFrame(
        {"text": ["send me an invoice", "i need the invoice for my order", "invoice please",
                  "where is my order", "my card was declined", "reset my password"],
         "label": ["invoice_request"] * 3 + ["track_order", "card_declined", "reset_password"]}
    )  # fmt: skip
    tokenizer, model = load_registered_classifier(str(folder), labels, examples=examples)
    assert model.config.id2label == dict(enumerate(labels)) and model.classifier.out_features == 4
    for i, label in enumerate(labels[1:], start=1):
        j = old_labels.index(label)
        assert torch.equal(model.classifier.weight[i], old.classifier.weight[j]), label
    scale = old.classifier.weight.detach().norm(dim=1).mean()
    assert float(model.classifier.weight[0].detach().norm()) == pytest.approx(float(scale), rel=1e-4)
    model.eval()
    with torch.no_grad():
        enc = tokenizer(list(examples["text"][:3]), padding=True, return_tensors="pt")
        logits = model(**enc).logits
        enc_others = tokenizer(list(examples["text"][3:]), padding=True, return_tensors="pt")
        others = model(**enc_others).logits
    assert logits[:, 0].mean() > others[:, 0].mean()  # the imprinted row prefers its own examples
    # Without examples the new row is freshly initialised: small, as a new head's rows are.
    _, plain = load_registered_classifier(str(folder), labels)
    assert float(plain.classifier.weight[0].detach().norm()) < 0.5 * float(scale)


def test_a_registered_folder_that_names_code_is_refused_before_it_is_read(tiny_model_dir, tmp_path):
    """`init: champion` starts from the version's files: an auto_map there is refused, never imported."""
    import json

    from champion.safety import UnsafeModelError
    from pipelines.model import load_classifier, load_registered_classifier, load_tokenizer

    folder = tmp_path / "version"
    load_classifier(str(tiny_model_dir), ["a", "b"]).save_pretrained(folder / "model")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(folder / "components" / "tokenizer")
    config = folder / "model" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "auto_map": {"AutoConfig": "x--m.C"}}))
    with pytest.raises(UnsafeModelError, match=r"'model/config\.json' has the field 'auto_map'"):
        load_registered_classifier(str(folder), ["a", "b"])
