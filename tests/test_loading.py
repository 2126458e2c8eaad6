import json

import pytest
import torch

import helpers.loading as loading
from helpers import KNOWN_MODELS, check_fits, load_pipeline, model_path, placement
from helpers.loading import ModelNotAvailable, ModelTooLarge, resolve_local
from helpers.sizing import mixtral_config


def test_known_configs_are_the_published_ones():
    big = KNOWN_MODELS["mistralai/Mixtral-8x22B-Instruct-v0.1"]
    assert (big["hidden_size"], big["intermediate_size"], big["num_hidden_layers"]) == (6144, 16384, 56)
    assert (big["num_attention_heads"], big["num_key_value_heads"], big["vocab_size"]) == (48, 8, 32768)
    small = KNOWN_MODELS["mistralai/Mixtral-8x7B-Instruct-v0.1"]
    assert (small["hidden_size"], small["intermediate_size"], small["num_hidden_layers"]) == (4096, 14336, 32)
    assert small["vocab_size"] == 32000


def test_unknown_model_name_is_refused():
    with pytest.raises(KeyError, match="unknown model"):
        mixtral_config("mistralai/Mixtral-8x99B")


def test_model_path_reads_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXTRAL_MODEL", str(tmp_path))
    assert model_path() == str(tmp_path)
    monkeypatch.setattr("helpers.loading.ensure_standin", lambda: tmp_path / "standin")
    for unset in ("", "stand-in"):
        monkeypatch.setenv("MIXTRAL_MODEL", unset)
        assert model_path() == str(tmp_path / "standin")


def test_hub_id_not_on_disk_fails_fast_and_says_how_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailable) as err:
        resolve_local("mistralai/Mixtral-8x22B-Instruct-v0.1")
    message = str(err.value)
    assert "mistralai/Mixtral-8x22B-Instruct-v0.1" in message and str(tmp_path) in message
    assert "hf download mistralai/Mixtral-8x22B-Instruct-v0.1" in message and "262 GiB" in message


def test_local_folders_are_checked(tmp_path):
    with pytest.raises(ModelNotAvailable, match="no config.json"):
        resolve_local(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotAvailable, match="no \\*.safetensors"):
        resolve_local(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        )
    )
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotAvailable, match="1 of 2 weight shards are missing"):
        resolve_local(str(tmp_path))
    with pytest.raises(ModelNotAvailable, match="neither an existing folder nor a hub id"):
        resolve_local("./no/such/folder")


def test_too_large_model_is_refused_before_loading(monkeypatch, tiny_mixtral_dir):
    monkeypatch.setattr(loading, "memory_budget", lambda: {"gpu": 0, "cpu": 1000, "total": 1000})
    with pytest.raises(ModelTooLarge) as err:
        check_fits(tiny_mixtral_dir, torch.bfloat16)
    assert "needs about" in str(err.value) and "available RAM" in str(err.value)
    assert "usable" in str(err.value) and "10% kept free" in str(err.value)
    monkeypatch.setattr(loading, "pipeline", None, raising=False)  # nothing past the check may run
    with pytest.raises(ModelTooLarge):
        loading.load_local(str(tiny_mixtral_dir), dtype=torch.float32)


def test_fit_scales_with_dtype(tiny_mixtral_dir):
    fp32 = check_fits(tiny_mixtral_dir, torch.float32)
    assert check_fits(tiny_mixtral_dir, torch.bfloat16) * 2 == fp32


def test_pipeline_uses_the_reference_tokenizer_for_a_mixtral_vocab(tiny_mixtral_dir):
    pipe = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)
    assert type(pipe.tokenizer).__name__ == "MistralCommonBackend"
    rows = placement(pipe.model).by_device()
    assert rows == [
        {
            "device": "cpu",
            "parameters": sum(p.numel() for p in pipe.model.parameters()),
            "bytes": 4 * sum(p.numel() for p in pipe.model.parameters()),
        }
    ]


@pytest.mark.parametrize("forced, dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_the_dtype_override_loads_and_is_shown(tiny_mixtral_dir, monkeypatch, forced, dtype):
    from helpers import describe

    monkeypatch.setenv("MIXTRAL_DTYPE", forced)
    for fast in (True, False):
        pipe = load_pipeline(str(tiny_mixtral_dir), fast=fast)
        assert pipe.model.dtype == dtype
        assert f"MIXTRAL_DTYPE={forced}: {forced} forced" in describe(pipe, detail=True)
    monkeypatch.setenv("MIXTRAL_DTYPE", "fp8")
    with pytest.raises(ValueError, match="MIXTRAL_DTYPE='fp8'"):
        load_pipeline(str(tiny_mixtral_dir))


@pytest.mark.parametrize("text, found", [("{not json", "is not valid JSON"), ("[1, 2]", "holds a list")])
def test_a_damaged_config_is_reported_as_such(tmp_path, text, found):
    (tmp_path / "config.json").write_text(text)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotAvailable, match=found) as err:
        resolve_local(str(tmp_path))
    assert "Download the model again" in str(err.value)
