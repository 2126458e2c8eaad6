import pytest
import torch

import helpers.hardware as hw
from helpers import fit_report, pick_dtype, torch_build

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


def test_dtype_follows_the_cpu(monkeypatch):
    if torch.cuda.is_available():
        return
    monkeypatch.delenv("MIXTRAL_DTYPE", raising=False)
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype()[0] == torch.bfloat16
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    assert pick_dtype()[0] == torch.float32


def test_fit_report_verdicts(monkeypatch):
    monkeypatch.setattr(hw, "gpus", lambda: [{"total": 80 * GiB, "free": 80 * GiB}] * 4)
    monkeypatch.setattr(hw, "system_memory", lambda: {"total": 64 * GiB, "available": 60 * GiB})
    rows = {r["model"]: r["verdict"] for r in fit_report(
        {"small": 87 * GiB, "big": 262 * GiB, "huge": 400 * GiB})}
    assert rows["small"] == "fits on the GPUs"
    assert rows["big"] == "fits on the GPUs"  # 262 * 1.1 = 288 <= 320
    assert rows["huge"].startswith("does not fit: short by")


def test_fit_report_without_gpus(monkeypatch):
    monkeypatch.setattr(hw, "gpus", lambda: [])
    monkeypatch.setattr(hw, "system_memory", lambda: {"total": 24 * GiB, "available": 20 * GiB})
    rows = fit_report({"stand-in": 1.3 * GiB, "8x22B": 262 * GiB})
    assert rows[0]["verdict"] == "fits in RAM (CPU only)"
    assert rows[1]["verdict"] == "does not fit: short by 267 GiB"


def test_the_dtype_can_be_forced_either_way(monkeypatch):
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for value, dtype in (("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), (" Float32 ", torch.float32),
                         ("float16", torch.float16)):
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


def test_the_other_cpu_kind(monkeypatch):
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: True)
    assert hw.other_cpu_dtype() == "float32"
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    assert hw.other_cpu_dtype() == "bfloat16"
