"""Configs: every shipped YAML validates; unknown keys and bad values are one clear sentence."""

from __future__ import annotations

from pathlib import Path

import pytest

from champion.config import load_config
from champion.errors import ChampionError
from pipelines.finetune import FinetuneConfig

ALL_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
OTHER = ("serve_", "monitor", "schedule", "retrain", "review", "minilm_distil", "minilm_int8", "smollm2_sft",
         "lm_gate", "safety_suite", "lm_retrain")  # fmt: skip
CONFIGS = [p for p in ALL_CONFIGS if not p.name.startswith(OTHER)]
SERVE_CONFIGS = [p for p in ALL_CONFIGS if p.name.startswith("serve_")]


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {
        "minilm_lora_cpu.yaml",
        "minilm_full_cpu.yaml",
        "minilm_lora_gpu.yaml",
    }
    assert {p.name for p in SERVE_CONFIGS} >= {"serve_cpu.yaml", "serve_canary.yaml"}


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_shipped_serve_config_validates_and_names_its_command(path):
    from serving.config import load_serve_config

    name = "support-replies" if "slm" in path.name else "support-intents"  # the demos' model names
    cfg = load_serve_config(path, name)
    assert cfg.model == name and cfg.threads * cfg.workers <= 2  # sized for the 2-core default
    first = path.read_text().splitlines()[0]
    assert first == f"# champion serve {name} --config configs/{path.name}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("traffic: {policy: blue-green}\n", "'traffic.policy' input should be 'champion', 'ab', 'shadow' or"),
        ("traffic: {canary: {share: 1.5}}\n", "'traffic.canary.share' input should be less than 1"),
        ("batching: {max_latency_ms: 90000}\n", "must not exceed timeout_seconds"),
        ("follow: {poll: 1}\n", "unknown key 'follow.poll'"),
    ],
)
def test_bad_serve_config_is_one_sentence(tmp_path, text, message):
    from serving.config import load_serve_config

    with pytest.raises(ChampionError, match=message):
        load_serve_config(_write(tmp_path, text), "m")


def test_serve_config_needs_a_model_name():
    from serving.config import load_serve_config

    with pytest.raises(ChampionError, match="model: name the registered model"):
        load_serve_config(None)


def test_shipped_monitor_config_validates_names_its_command_and_sets_every_check():
    from monitoring.config import MonitorConfig

    path = ALL_CONFIGS[0].parent / "monitor.yaml"
    cfg = load_config(MonitorConfig, path)
    assert (
        path.read_text()
        .splitlines()[0]
        .startswith("# champion drift support-intents --config configs/monitor.yaml")
    )
    import yaml

    written = yaml.safe_load(path.read_text())
    assert set(written["checks"]) == set(MonitorConfig.model_fields["checks"].annotation.model_fields)
    assert cfg.calibration.false_alarm_rate == 0.01


def test_shipped_review_config_validates_and_names_its_command():
    from monitoring.review import ReviewConfig

    path = ALL_CONFIGS[0].parent / "review.yaml"
    cfg = load_config(ReviewConfig, path)
    assert path.read_text().splitlines()[0].startswith("# champion review select support-intents --config ")
    assert cfg.daily_budget == 200 and 0 < cfg.random_share < 1


def test_bad_monitor_config_is_one_sentence(tmp_path):
    from monitoring.config import MonitorConfig

    with pytest.raises(ChampionError, match="unknown key 'checks.drift_score'"):
        load_config(MonitorConfig, _write(tmp_path, "checks: {drift_score: {min_rows: 3}}\n"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates_and_names_its_command(path):
    cfg = load_config(FinetuneConfig, path)
    assert cfg.model.base == "all-MiniLM-L6-v2"
    assert cfg.method in path.name
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"champion finetune configs/{path.name}" in first


def test_shipped_distil_and_compress_configs_validate_and_name_their_command(tmp_path):
    from pipelines.compress import CompressConfig
    from pipelines.distil import DistilConfig

    configs = ALL_CONFIGS[0].parent
    distil = load_config(DistilConfig, configs / "minilm_distil_l3_cpu.yaml")
    assert distil.student.keep_layers == [0, 2, 4] and distil.budget.min_f1_ratio == 0.97
    assert DistilConfig.model_validate({"teacher": 3}).teacher == "3"  # `teacher=3` parses as a number
    first = (configs / "minilm_distil_l3_cpu.yaml").read_text().splitlines()[0]
    assert first == "# champion distil configs/minilm_distil_l3_cpu.yaml"
    compress = load_config(CompressConfig, configs / "minilm_int8.yaml")
    assert compress.budget.min_agreement == 0.99
    first = (configs / "minilm_int8.yaml").read_text().splitlines()[0]
    assert first.startswith("# champion compress ") and "--config configs/minilm_int8.yaml" in first
    with pytest.raises(ChampionError, match="unknown key 'student.layers'"):
        load_config(DistilConfig, _write(tmp_path, "student: {layers: 3}\n"))


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("data: {source: x.csv}\ntrain: {epoch: 3}\n", [], "unknown key 'train.epoch'; remove it"),
        ("data: {source: x.csv}\nmodle: {}\n", [], "unknown key 'modle'"),
        ("train: {epochs: 3}\n", [], "required key 'data' is missing"),
        ("data: {source: x.csv}\ntrain: {epochs: 0}\n", [], "'train.epochs' input should be greater"),
        ("data: {source: x.csv}\nmethod: qlora\n", [], "'method' input should be 'lora' or 'full'"),
        ("data: {source: x.csv}\n", ["train.lr=1"], "unknown key 'train.lr'"),
        ("data: {source: x.csv}\n", ["train.epochs"], "not of the form section.key=value"),
        ("data: [unclosed\n", [], "is not valid YAML"),
        ("- a\n- b\n", [], "must hold a mapping"),
        (
            "data: {source: x.csv}\nregistry: {alias: champion}\n",
            [],
            "'registry.alias' value error, must not be",
        ),
        ("data: {source: x.csv, validation_size: 0.5, test_size: 0.45}\n", [], "must stay below 0.9"),
    ],
)
def test_bad_config_is_one_clear_sentence(tmp_path, text, overrides, message):
    with pytest.raises(ChampionError, match=message) as err:
        load_config(FinetuneConfig, _write(tmp_path, text), overrides)
    assert "\n" not in str(err.value)


def test_overrides_apply_with_yaml_types(tmp_path):
    cfg = load_config(
        FinetuneConfig,
        _write(tmp_path, "data: {source: x.csv}\n"),
        ["train.epochs=7", "lora.target_modules=[query, key]", "train.num_threads=null"],
    )
    assert (
        cfg.train.epochs == 7
        and cfg.lora.target_modules == ["query", "key"]
        and cfg.train.num_threads is None
    )


def test_missing_config_file(tmp_path):
    with pytest.raises(ChampionError, match="config file '.*nope.yaml' does not exist"):
        load_config(FinetuneConfig, tmp_path / "nope.yaml")


def test_shipped_retrain_config_validates_and_names_its_command():
    from pipelines.retrain import RetrainConfig

    path = Path(__file__).resolve().parent.parent / "configs" / "retrain.yaml"
    cfg = load_config(RetrainConfig, path)
    assert cfg.model_name == "support-intents" and cfg.promotion == "direct" and cfg.gate.margin == 0.0
    assert (
        path.read_text().splitlines()[0] == "# champion retrain support-intents --config configs/retrain.yaml"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("promotion: sideways\n", "'promotion' input should be 'direct', 'canary' or 'none'"),
        ("gate: {confidence: 1.5}\n", "'gate.confidence' input should be less than 1"),
        ("fresh: {holdout_share: 0}\n", "'fresh.holdout_share' input should be greater than 0"),
        ("fresh: {holdout: 0.3}\n", "unknown key 'fresh.holdout'"),
    ],
)
def test_bad_retrain_config_is_one_sentence(tmp_path, text, message):
    from pipelines.retrain import RetrainConfig

    with pytest.raises(ChampionError, match=message):
        load_config(RetrainConfig, _write(tmp_path, text))


def test_shipped_generative_gate_config_and_safety_cases_validate():
    from champion.config import load_config
    from pipelines.lm_gate import LMGateConfig
    from pipelines.safety_suite import load_suite

    configs = ALL_CONFIGS[0].parent
    path = configs / "lm_gate.yaml"
    assert (
        path.read_text().startswith("# champion compare support-replies 1 2 ")
        and "--config configs/lm_gate.yaml" in (path.read_text().splitlines()[0])
    )
    cfg = load_config(LMGateConfig, str(path))
    assert cfg.gate.metric == "intent_accuracy" and cfg.gate.floors == {"valid_json": 0.9}
    own = load_suite([str(configs / "safety_suite.yaml")], built_in=False)
    assert [c.id for c in own] == ["injection-discount-code", "personal-iban"]
    assert (
        len(load_suite(cfg.suite)) == len(load_suite()) + 2
    )  # the config's suite path resolves from the root
