"""Only formats that cannot run code are promoted and served; files changed after registration are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import fake_model_folder
from test_serving import NAME, TEXTS, versions  # noqa: F401 - the fixture

from champion.errors import ChampionError
from champion.registry import promote
from champion.safety import DIGEST_TAG, UnsafeModelError, check_files, files_digest

CANARY = "champion-pickle-canary"


class _Payload:
    """Unpickling this creates the canary file: proof that the loader ran code from the model."""

    def __init__(self, canary: str):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def _pickle_model(tmp_path: Path, kind: str) -> Path:
    """A model folder whose loading would unpickle `_Payload`."""
    import pickle

    canary = tmp_path / CANARY
    folder = tmp_path / f"evil-{kind}"
    if kind == "pickle-weights":  # looks like a transformers model, weights in a torch pickle
        fake_model_folder(folder)
        (folder / "model" / "model.safetensors").unlink()
        (folder / "model" / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(canary))))
    else:  # an MLflow python_function model: cloudpickled python_model, loaded by mlflow.pyfunc
        folder.mkdir()
        (folder / "python_model.pkl").write_bytes(pickle.dumps(_Payload(str(canary))))
        (folder / "MLmodel").write_text(
            "flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n"
            "    python_model: python_model.pkl\n"
        )
    return folder


def _register_by_hand(registry, folder: Path) -> str:
    return str(registry.client.create_model_version(NAME, source=f"file://{folder}").version)


@pytest.mark.parametrize("kind", ["pickle-weights", "pyfunc"])
def test_a_pickle_model_pointed_at_by_hand_is_never_loaded_and_the_service_keeps_answering(
    registry,
    home,
    versions,  # noqa: F811
    tmp_path,
    kind,
):
    from test_serving import serve_config

    from serving.server import ModelServer

    server = ModelServer(serve_config()).start()
    try:
        server.wait_ready(60)
        evil = _register_by_hand(registry, _pickle_model(tmp_path, kind))
        decision = promote(registry, NAME, evil, reason="by hand", force=True)
        assert not decision.allowed and "refused" in decision.reason
        assert "pickle" in decision.reason or "python_function" in decision.reason

        registry.client.set_registered_model_alias(NAME, "champion", evil)  # around Champion, in MLflow
        status = server.reload()
        assert status["champion"] == versions[0]  # kept (the move is not followed, or the load refused)
        with pytest.raises(UnsafeModelError, match="refused"):
            server._load(evil)  # what the follower runs for a version it would serve
        assert {a.version for a in server.predict(TEXTS)} == {versions[0]}
    finally:
        server.close()
    assert not (tmp_path / CANARY).exists()  # nothing ran
    refusals = [e for e in registry.audit.loop_events(NAME) if e.kind == "refused"]
    assert {e.version for e in refusals} == {evil}  # by promote and by the server, both audited
    assert {e.evidence.get("action") for e in refusals} >= {"promote", "load"}


def test_files_changed_after_registration_are_refused(registry, versions):  # noqa: F811
    import mlflow

    tags = registry.client.get_model_version(NAME, versions[1]).tags
    assert len(tags[DIGEST_TAG]) == 64  # recorded at registration
    source = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{versions[1]}"))
    store = Path(registry.client.get_model_version_download_uri(NAME, versions[1]).removeprefix("file://"))
    assert files_digest(source) == tags[DIGEST_TAG]
    config = store / "model" / "config.json"
    config.write_text(config.read_text().replace('"hidden_act"', '"hidden_act" ', 1))
    decision = promote(registry, NAME, versions[1], reason="tampered", force=True)
    assert not decision.allowed and "sha256 no longer matches" in decision.reason


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: (f / "model" / "x.pkl").write_bytes(b"x"), "'model/x.pkl' is not a safe model file"),
        (lambda f: (f / "code.py").write_text("print(1)"), "'code.py' is not a safe model file"),
        (lambda f: (f / "MLmodel").write_text("flavors:\n  sklearn: {}\n"), r"flavour\(s\) sklearn"),
        (lambda f: (f / "link.json").symlink_to("/etc/passwd"), "symbolic link"),
        (lambda f: (f / "MLmodel").unlink(), "no MLmodel file"),
    ],
)
def test_unsafe_folders_are_refused_with_one_sentence(tmp_path, change, message):
    folder = fake_model_folder(tmp_path / "model")
    check_files(folder, "safetensors", "v9")  # the unchanged folder passes
    change(folder)
    with pytest.raises(UnsafeModelError, match=message) as err:
        check_files(folder, "safetensors", "v9")
    assert isinstance(err.value, ChampionError) and str(err.value).startswith("v9: ")


def _json(folder: Path, rel: str, data) -> None:
    import json

    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _mlmodel(folder: Path, **fields) -> None:
    import yaml

    flavour = {"model_binary": "model", "pipeline_model_type": "BertForSequenceClassification", **fields}
    spec = {"flavors": {"python_function": {"loader_module": "mlflow.transformers"}, "transformers": flavour}}
    (folder / "MLmodel").write_text(yaml.safe_dump(spec))


CONFIG = "model/config.json"
TOKENIZER_CONFIG = "components/tokenizer/tokenizer_config.json"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: _json(f, CONFIG, {"model_type": "bert", "auto_map": {"AutoConfig": "x--m.C"}}),
         r"'model/config\.json' has the field 'auto_map'"),
        (lambda f: _json(f, TOKENIZER_CONFIG, {"deep": [{"auto_map": ["m.T"]}]}),
         r"tokenizer/tokenizer_config\.json' has the field 'deep\[0\]\.auto_map'"),
        (lambda f: _json(f, CONFIG, {"model_type": "evil-arch"}),
         r"'model/config\.json' says model_type: 'evil-arch', which is not a model type transformers knows"),
        (lambda f: _json(f, CONFIG, {"model_type": "bert", "tokenizer_class": "EvilTokenizer"}),
         r"says tokenizer_class: 'EvilTokenizer', which is not a transformers class"),
        (lambda f: _json(f, "processor_config.json", {"processor_class": "evil.Processor"}),
         r"'processor_config\.json' says processor_class: 'evil\.Processor'"),
        (lambda f: _json(f, CONFIG, {"model_type": "bert", "position_embedding_type": "org/repo"}),
         r"says position_embedding_type: 'org/repo', which is neither a transformers class nor a plain"),
        (lambda f: _mlmodel(f, pipeline_model_type="EvilModel"),
         r"'MLmodel' field flavors\.transformers\.pipeline_model_type is 'EvilModel'"),
        (lambda f: _mlmodel(f, tokenizer_type="os.system"),
         r"flavors\.transformers\.tokenizer_type is 'os\.system'"),
        (lambda f: _mlmodel(f, model_binary="../other-version/model"),
         r"'MLmodel' field flavors\.transformers\.model_binary is '\.\./other-version/model'"),
        (lambda f: _mlmodel(f, model_binary="/tmp/elsewhere"),
         r"flavors\.transformers\.model_binary is '/tmp/"),
        (lambda f: _mlmodel(f, components=["tokenizer", "../../x"]), r"flavors\.transformers\.components"),
        (lambda f: _mlmodel(f, peft_adaptor="peft"), r"flavors\.transformers\.peft_adaptor"),
        (lambda f: (f / "broken.json").write_text("{"), r"'broken\.json' is not valid JSON"),
    ],
)  # fmt: skip
def test_fields_that_name_code_or_other_folders_are_refused_with_the_file_and_field(
    tmp_path, change, message
):
    folder = fake_model_folder(tmp_path / "model")
    # What real versions hold passes: plain *_type values, a vocabulary token 'auto_map' (an id), a
    # transformers 4 tokenizer class name, MLflow's own *_type fields.
    config = {"model_type": "bert", "problem_type": "single_label_classification", "classifier_dropout": None}
    _json(folder, CONFIG, {**config, "position_embedding_type": "absolute"})
    _json(folder, "components/tokenizer/tokenizer.json", {"model": {"vocab": {"auto_map": 7, "x_type": 8}}})
    _json(folder, TOKENIZER_CONFIG, {"tokenizer_class": "BertTokenizerFast"})
    _mlmodel(
        folder,
        components=["tokenizer"],
        tokenizer_type="BertTokenizer",
        instance_type="TextClassificationPipeline",
    )
    check_files(folder, "safetensors", "v9")
    change(folder)
    with pytest.raises(UnsafeModelError, match=message) as err:
        check_files(folder, "safetensors", "v9")
    assert str(err.value).startswith("v9: ")


def test_a_version_without_a_digest_needs_the_legacy_flag(tmp_path, monkeypatch):
    from champion.safety import check_digest

    folder = fake_model_folder(tmp_path / "model")
    monkeypatch.delenv("CHAMPION_ALLOW_LEGACY_VERSIONS", raising=False)
    with pytest.raises(
        UnsafeModelError, match="no recorded champion.files_sha256 .*CHAMPION_ALLOW_LEGACY_VERSIONS=1"
    ):
        check_digest(folder, {}, "v9")
    monkeypatch.setenv("CHAMPION_ALLOW_LEGACY_VERSIONS", "1")
    check_digest(folder, {}, "v9")
    with pytest.raises(UnsafeModelError, match="no longer matches"):  # the flag never excuses a wrong digest
        check_digest(folder, {DIGEST_TAG: "0" * 64}, "v9")


@pytest.fixture(scope="module")
def lora_folder(tiny_llama_dir, tmp_path_factory) -> Path:
    """What a generative version holds: a peft LoRA adapter on the tiny Llama, its tokenizer and template."""
    from pipelines.lm import load_causal_lm, lora_for_causal_lm

    model, tokenizer = load_causal_lm(tiny_llama_dir)
    folder = tmp_path_factory.mktemp("lora-version") / "adapter"
    lora_for_causal_lm(model, r=4, alpha=8, dropout=0.0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_causal_lm_folder_and_a_lora_adapter_folder_pass(tiny_llama_dir, lora_folder):
    assert (tiny_llama_dir / "chat_template.jinja").is_file()  # what transformers 5 writes
    check_files(tiny_llama_dir, "causal-lm", "v9")
    assert {p.name for p in lora_folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    check_files(lora_folder, "lora", "v9")
    with pytest.raises(UnsafeModelError, match=r"^v9: it holds no adapter_config\.json"):
        check_files(tiny_llama_dir, "lora", "v9")
    with pytest.raises(UnsafeModelError, match=r"^v9: it has no config\.json beside safetensors weights"):
        check_files(lora_folder, "causal-lm", "v9")


ADAPTER_FLAVOUR = "flavors:\n  transformers:\n    peft_adaptor: "


def _adapter_config(**fields):
    def change(folder: Path) -> None:
        import json

        path = folder / "adapter_config.json"
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, **fields}))

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_adapter_config(auto_mapping={"base_model_class": "Evil", "parent_library": "evil.models"}),
         r"'adapter_config\.json' has the field 'auto_mapping', which makes peft import"),
        (_adapter_config(megatron_config={"x": 1}, megatron_core="evil"),
         r"'adapter_config\.json' has the field 'megatron_config'"),
        (_adapter_config(peft_type="PROMPT_TUNING"),
         r"'adapter_config\.json' says peft_type: 'PROMPT_TUNING'; Champion loads only LoRA adapters"),
        (_adapter_config(task_type="evil.Task"), r"'adapter_config\.json' says task_type: 'evil\.Task'"),
        (_adapter_config(eva_config={"auto_map": {"AutoModel": "x--m.C"}}),
         r"'adapter_config\.json' has the field 'eva_config\.auto_map'"),
        (lambda f: (f / "adapter.py").write_text("print(1)"), r"'adapter\.py' is not a safe model file"),
        (lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"),
         r"'adapter_model\.bin' is not a safe model file"),
        (lambda f: (f / "adapter_model.safetensors").unlink(),
         r"'adapter_config\.json' has no adapter_model\.safetensors beside it"),
        (lambda f: (f / "loader.jinja").write_text("{{ x }}"), r"'loader\.jinja' is not a safe model file"),
        (lambda f: (f / "MLmodel").write_text(f"{ADAPTER_FLAVOUR}../../elsewhere\n"),
         r"'MLmodel' field flavors\.transformers\.peft_adaptor is '\.\./\.\./elsewhere'"),
    ],
)  # fmt: skip
def test_adapter_folders_that_could_run_code_are_refused_naming_file_and_field(
    lora_folder, tmp_path, change, message
):
    import shutil

    folder = shutil.copytree(lora_folder, tmp_path / "adapter")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")  # allowed
    (folder / "MLmodel").write_text(f"{ADAPTER_FLAVOUR}peft\n")  # a path inside the version: allowed
    check_files(folder, "lora", "v9")
    change(folder)
    with pytest.raises(UnsafeModelError, match=message) as err:
        check_files(folder, "lora", "v9")
    assert str(err.value).startswith("v9: ") and "\n" not in str(err.value)


def test_a_pickle_in_a_causal_lm_folder_is_refused(tiny_llama_dir, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "llama")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UnsafeModelError, match=r"^v9: 'pytorch_model\.bin' is not a safe model file"):
        check_files(folder, "causal-lm", "v9")
