import pytest
import torch

import helpers.hardware as hw
from helpers import pick_dtype, torch_build

GiB = 2**30


def test_torch_build_names_the_backend():
    build = torch_build()
    if getattr(torch.version, "hip", None):
        assert build["backend"].startswith("ROCm")
    elif torch.version.cuda:
        assert build["backend"].startswith("CUDA")
    else:
        assert build["backend"] == "CPU only" and build["gpus_visible"] == 0


def test_system_memory_is_sane():
    ram = hw.system_memory()
    assert 0 < ram["available"] <= ram["total"]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is present: models load in bf16 there, whatever the CPU"
)
def test_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.delenv("MIXTRAL_DTYPE", raising=False)
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype()[0] == torch.bfloat16
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    assert pick_dtype()[0] == torch.float32


def test_the_dtype_can_be_forced_either_way(monkeypatch):
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for value, dtype in (
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        (" Float32 ", torch.float32),
        ("float16", torch.float16),
    ):
        monkeypatch.setenv("MIXTRAL_DTYPE", value)
        chosen, reason = pick_dtype()
        assert chosen == dtype and "MIXTRAL_DTYPE" in reason and "would pick float32" in reason
    for value in ("auto", ""):
        monkeypatch.setenv("MIXTRAL_DTYPE", value)
        assert pick_dtype()[0] == torch.float32 and "MIXTRAL_DTYPE" not in pick_dtype()[1]


def test_a_bad_dtype_override_says_what_to_use(monkeypatch):
    monkeypatch.setenv("MIXTRAL_DTYPE", "int8")
    with pytest.raises(ValueError, match=r"MIXTRAL_DTYPE='int8'.*float32, bfloat16, float16, or auto"):
        pick_dtype()
