"""Distillation on the tiny model: the loss falls, only the student learns, lineage, the budget, the cache."""

from __future__ import annotations

import pytest

from champion.errors import ChampionError
from champion_cli.cli import main

NAME = "tiny-intents"


def _cfg(**changes):
    from pipelines.distil import DistilConfig

    data = {
        "model_name": NAME,
        "train": {"epochs": 4, "learning_rate": 3e-3, "batch_size": 16, "progress": False, "device": "cpu"},
        "loss": {"temperature": 2.0, "alpha": 0.7, "hidden_weight": 0.1},
        "budget": {"min_rows": 20, "min_f1_ratio": 0.5},
        "cost": {"rows": 64, "repeats": 1, "batch_size": 16},
    }
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return DistilConfig.model_validate(data)


def test_one_distillation_step_moves_the_student_and_never_the_teacher(registry, tiny_champion):
    import torch

    from pipelines.distil import LossConfig, StudentConfig, build_student, distillation_loss
    from serving.model import load_version

    teacher = load_version(registry.client, NAME, tiny_champion, device="cpu")
    before_teacher = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    student = build_student(teacher, StudentConfig(keep_layers=[1]), list(teacher.labels))
    assert student.config.num_hidden_layers == 1 and len(student.bert.encoder.layer) == 1
    # The kept layer's weights are the teacher's layer 1, copied (not shared).
    kept = student.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(kept, teacher.model.bert.encoder.layer[1].attention.self.query.weight)
    assert kept.data_ptr() != teacher.model.bert.encoder.layer[1].attention.self.query.weight.data_ptr()

    texts = ["where is my order", "refund my money please", "my card was charged twice", "reset password"]
    enc = teacher.tokenizer(texts, padding=True, return_tensors="pt")
    teacher_logits = torch.from_numpy(teacher.logits(texts))
    teacher_pooled = torch.from_numpy(teacher.describe(texts)["embeddings"])
    labels = teacher_logits.argmax(-1)
    student.eval()  # no dropout: the loss of a fixed batch then falls step by step
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    before_student = {k: v.clone() for k, v in student.state_dict().items()}
    losses = []
    for _ in range(15):
        out = student(**enc, output_hidden_states=True)
        loss, _, _ = distillation_loss(
            out, labels, teacher_logits, teacher_pooled, enc["attention_mask"], LossConfig(hidden_weight=0.5)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0] and losses[1] < losses[0], losses
    assert any(not torch.equal(before_student[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(before_teacher[k], v) for k, v in teacher.model.state_dict().items())


def test_distil_registers_a_student_with_lineage_beside_its_teacher(registry, tiny_champion, capsys):
    from mlflow import MlflowClient

    from pipelines.distil import distil

    result = distil(_cfg(), registry=registry)
    assert result.teacher_version == tiny_champion
    tags = registry.client.get_model_version(NAME, result.version).tags
    assert tags["variant"] == "student" and tags["source_version"] == tiny_champion
    assert tags["format"] == "safetensors" and tags["method"] == "distil"
    teacher_tags = registry.client.get_model_version(NAME, tiny_champion).tags
    assert tags["data_sha256"] == teacher_tags["data_sha256"]  # trained and tested on the teacher's splits
    # The student's held-out metrics beside the teacher's, on the same rows.
    assert float(tags["source.test_macro_f1"]) == pytest.approx(
        float(teacher_tags["metric.test_macro_f1"]), abs=1e-4
    )
    assert "metric.test_macro_f1" in tags and tags["gate.within_budget"] == "true"
    assert float(tags["cost.cpu_seconds_per_1k"]) > 0 and "cost.cpu_seconds_per_1k" in teacher_tags
    # The distillation loss fell over the epochs.
    history = [m.value for m in MlflowClient().get_metric_history(result.run_id, "train_loss")]
    assert len(history) == 4 and history[-1] < history[0]
    # The student loads and serves like any version, with the teacher's labels.
    from serving.model import load_version

    student = load_version(registry.client, NAME, result.version, device="cpu")
    teacher = load_version(registry.client, NAME, tiny_champion, device="cpu")
    assert student.labels == teacher.labels and student.model.config.num_hidden_layers == 1

    # A second student of the same teacher reuses the cached teacher outputs; this one is judged outside
    # its budget: registered all the same, tagged with the refusal, and `champion promote` refuses it.
    again = distil(
        _cfg(loss={"temperature": 4.0}, budget={"min_rows": 10_000}, train={"epochs": 1}), registry=registry
    )
    assert again.metrics["teacher_logits_seconds"] == 0.0 and result.metrics["teacher_logits_seconds"] > 0
    assert not again.decision.promote and "fewer than the 10000" in again.decision.reason
    assert registry.client.get_model_version(NAME, again.version).tags["gate.within_budget"] == "false"
    assert main(["promote", NAME, again.version, "--reason", "smaller"]) == 1
    assert "outside its quality budget" in capsys.readouterr().err
    assert main(["promote", NAME, result.version, "--reason", "smaller, within budget"]) == 0
    assert str(registry.client.get_registered_model(NAME).aliases["champion"]) == result.version


def test_distil_bad_input_is_one_sentence(registry, tiny_champion, tmp_path, capsys):
    from pipelines.distil import distil

    with pytest.raises(ChampionError, match=r"student.keep_layers: \[5\] must name distinct layers"):
        distil(_cfg(student={"keep_layers": [5]}), registry=registry)
    with pytest.raises(ChampionError, match="has no alias 'gold'"):
        distil(_cfg(teacher="gold"), registry=registry)
    config = tmp_path / "distil.yaml"
    config.write_text("model_name: tiny-intents\nloss:\n  temperature: -1\n")
    capsys.readouterr()
    assert main(["distil", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "loss.temperature" in err and len(err.splitlines()) == 1


def test_a_student_must_be_smaller_and_read_the_teachers_tokens(registry, tiny_champion, tiny_model_dir):
    from pipelines.distil import distil

    # All of the teacher's layers, or a base as large as the teacher: no cheaper to serve, refused.
    with pytest.raises(
        ChampionError, match=r"student.keep_layers: \[0, 1\] gives a student of [\d,]+ parameters"
    ):
        distil(_cfg(student={"keep_layers": [0, 1]}), registry=registry)
    with pytest.raises(ChampionError, match="not fewer than the teacher's"):
        distil(_cfg(student={"init": "base", "base": str(tiny_model_dir)}), registry=registry)
    # The packaged paraphrase-MiniLM-L3-v2 reads MiniLM's 30,522-token vocabulary, not the tiny teacher's.
    with pytest.raises(
        ChampionError, match=r"another tokenizer than the teacher's \(30522 tokens against \d+"
    ):
        distil(_cfg(student={"init": "base", "base": "paraphrase-MiniLM-L3-v2"}), registry=registry)
    assert [str(mv.version) for mv in registry.client.search_model_versions(f"name='{NAME}'")] == [
        tiny_champion
    ]
