import os

import pytest
import torch

import helpers.fastpath as fastpath
import helpers.hardware as hw
from helpers import pick_dtype, this_machine

GiB = 2**30


def test_this_machine_names_the_backend_and_shows_what_it_read():
    machine = this_machine()
    if getattr(torch.version, "hip", None):
        assert machine.backend.startswith("ROCm")
    elif torch.version.cuda:
        assert machine.backend.startswith("CUDA")
    else:
        assert machine.backend == "CPU only" and machine.gpus == ()
    assert 0 < machine.memory_available <= machine.memory_total and machine.last_level_cache >= 2**20
    shown = str(machine).splitlines()
    assert shown[0] == f"torch {torch.__version__} ({machine.backend}), Python {machine.python}"
    assert shown[1].startswith(f"RAM: {machine.memory_total / GiB:.1f} GiB total")
    assert len(shown) == 3 + max(len(machine.gpus), 1)  # one line per GPU, or one saying there is none


def test_a_machine_with_gpus_lists_each_one():
    gpu = {"index": 0, "name": "AMD Instinct MI300X", "total": 192 * GiB, "free": 190 * GiB}
    machine = hw.Machine("2.13.0", "ROCm 7.0", "3.11", (gpu,), 64 * GiB, 60 * GiB, False, 32 * 2**20)
    assert str(machine).splitlines()[2:] == [
        "CPU: bf16 instructions no, largest cache it reports 32 MiB",
        "GPU 0: AMD Instinct MI300X, 192.0 GiB (190.0 GiB free)",
    ]


def test_system_memory_is_sane():
    ram = hw.system_memory()
    assert 0 < ram["available"] <= ram["total"]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is present: models load in bf16 there, whatever the CPU"
)
@pytest.mark.parametrize(
    "float32_ms, bfloat16_ms, chosen",
    [(10.0, 12.5, "float32"), (12.5, 10.0, "bfloat16"), (10.0, 10.5, "bfloat16")],
    ids=["float32 clearly faster", "bfloat16 faster", "a near tie keeps the blog's bf16"],
)
def test_the_cpu_dtype_is_the_one_measured_fastest(monkeypatch, float32_ms, bfloat16_ms, chosen):
    """On a CPU the dtype is the measurement's, whatever the CPU's flags say (a flag held on one CPU kind and
    failed on another); float32 must be clearly faster to replace the blog's bf16; the reason gives the figures."""
    monkeypatch.delenv("MIXTRAL_DTYPE", raising=False)
    figures = {"float32": dict(ms=float32_ms, layers=3), "bfloat16": dict(ms=bfloat16_ms, layers=3)}
    monkeypatch.setattr(fastpath, "measure_dtypes", lambda config: figures)
    for native in (True, False):
        monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: native)
        dtype, reason = pick_dtype()
        assert dtype == getattr(torch, chosen) and reason.startswith(f"{chosen}: ")
        assert f"bfloat16 {bfloat16_ms:.1f} ms, float32 {float32_ms:.1f} ms" in reason


def test_the_dtype_can_be_forced_either_way(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    figures = {"float32": dict(ms=1.0, layers=1), "bfloat16": dict(ms=2.0, layers=1)}
    monkeypatch.setattr(fastpath, "measure_dtypes", lambda config: figures)
    for value, dtype in (
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        (" Float32 ", torch.float32),
        ("float16", torch.float16),
    ):
        monkeypatch.setenv("MIXTRAL_DTYPE", value)
        chosen, reason = pick_dtype()
        assert chosen == dtype and reason.startswith("MIXTRAL_DTYPE=")
    for value in ("auto", ""):
        monkeypatch.setenv("MIXTRAL_DTYPE", value)
        assert pick_dtype()[0] == torch.float32 and "measured here: bfloat16 2.0 ms" in pick_dtype()[1]


def test_a_bad_dtype_override_says_what_to_use(monkeypatch):
    monkeypatch.setenv("MIXTRAL_DTYPE", "int8")
    with pytest.raises(ValueError, match=r"MIXTRAL_DTYPE='int8'.*float32, bfloat16, float16, or auto"):
        pick_dtype()


def test_other_work_is_seen_while_a_measurement_runs():
    """Processes that keep the cores busy while this one waits: cores_busy_elsewhere counts their CPU time."""
    import subprocess
    import sys
    import time

    from helpers.hardware import cores_busy_elsewhere

    count = min(os.cpu_count() or 1, 4)
    spin = "import time\nend = time.time() + 4\nwhile time.time() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        time.sleep(0.5)  # they have started
        result, others = cores_busy_elsewhere(lambda: time.sleep(1.5) or "done")
    finally:
        for spinner in spinners:
            spinner.kill()
    assert result == "done" and others > 0.5 * count, others
    assert cores_busy_elsewhere(lambda: "quick") == (
        "quick",
        None,
    )  # too short to tell apart from the clock's ticks
