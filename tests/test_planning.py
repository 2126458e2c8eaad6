import re
from pathlib import Path

import pytest

from helpers.data import GPU_TYPES
from helpers.planning import layer_device, plan
from helpers.sizing import decode_bytes, parameter_count

BIG = "mistralai/Mixtral-8x22B-Instruct-v0.1"
SMALL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
GiB = 2**30


@pytest.mark.parametrize("gpu, count, precision, fits, layers", [
    ("MI300X", 8, "bfloat16", True, [7, 8, 8, 8, 8, 8, 8, 1]),
    ("MI300X", 2, "bfloat16", True, [28, 28]),
    ("MI300X", 1, "bfloat16", False, None),
    ("H100", 4, "bfloat16", True, None),
    ("H100", 2, "int4", True, [28, 28]),
    ("A100", 2, "bfloat16", False, None),
])
def test_fit_decisions_and_device_maps(gpu, count, precision, fits, layers):
    p = plan(BIG, gpu=gpu, count=count, precision=precision)
    assert p.fits is fits
    if fits:
        assert sum(p.layers_per_gpu) == 56
        assert all(n > 0 for n in p.layers_per_gpu[:-1])
        if layers:
            assert p.layers_per_gpu == layers
        assert p.ceiling_tensor_parallel == pytest.approx(count * p.ceiling_pipeline)
    else:
        missing = (p.weights_bytes + p.kv_bytes - p.capacity_bytes) / GiB
        assert f"DOES NOT FIT: {missing:.0f} GiB missing. It would fit on" in p.summary()


def test_advice_says_what_would_fit():
    p = plan(BIG, gpu="MI300X", count=1)
    assert "2x MI300X" in p.advice and "int8" in p.advice
    assert p.advice.startswith("It would fit on 2x MI300X")
    assert "needs 263 GiB" in p.summary() and "has 173 GiB usable (10% of each GPU kept free)" in p.summary()


def test_decode_ceiling_is_bandwidth_over_the_bytes_a_token_reads():
    p = plan(BIG, gpu="MI300X", count=2, context=2)  # the planner counts a half-full cache: 1 token
    read = decode_bytes(BIG, 2, context=1)["per_token"]
    assert p.ceiling_pipeline == pytest.approx(5.3e12 / read, rel=1e-9)
    # the active parameters, less the embedding table but its one row: one account of bytes per token
    active = parameter_count(BIG)["active"] - parameter_count(BIG)["embeddings"] + 6144
    assert read == pytest.approx(2 * active + decode_bytes(BIG, 2, context=1)["parts"]["kv_cache"], rel=1e-12)
    int4 = plan(BIG, gpu="MI300X", count=2, context=2, precision="int4")
    assert int4.ceiling_pipeline == pytest.approx(5.3e12 / decode_bytes(BIG, 0.5, context=1, kv_bytes=2)["per_token"])


def test_layer_device_reads_the_most_specific_entry():
    device_map = {"model.embed_tokens": 0, "model.layers.1": 1, "model.layers.10": 2, "": 0}
    assert [layer_device(device_map, i) for i in (0, 1, 10, 11)] == [0, 1, 2, 0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(model="mistralai/Mixtral-8x99B"), "unknown model"),
    (dict(count=0), "whole number >= 1"),
    (dict(count=-2), "whole number >= 1"),
    (dict(gpu="RTX9090"), "unknown GPU"),
    (dict(gpu="mine", gpu_memory_gib=0, bandwidth_tbs=1.0), "must be > 0"),
    (dict(context=65537), "from 1 to 65536 .the model.s maximum"),
    (dict(precision="fp8"), "precision='fp8' is not known"),
])
def test_bad_plans_are_refused(kwargs, message):
    with pytest.raises((ValueError, KeyError), match=message):
        plan(**{"model": BIG, **kwargs})


def test_custom_gpu():
    p = plan(SMALL, gpu="my GPU", count=1, gpu_memory_gib=141, bandwidth_tbs=4.8)
    assert p.fits and p.ceiling_pipeline == pytest.approx(plan(SMALL, gpu="H200", count=1).ceiling_pipeline)
    assert set(GPU_TYPES) >= {"MI300X", "MI250X", "MI250", "H100", "H200", "A100"}


def test_readme_hardware_column_is_the_planners_fewest_gpus():
    """README's model table: the fewest GPUs of each kind that hold each model, as the planner says."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for model in ("mistralai/Mixtral-8x22B-Instruct-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1"):
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{model}`"))
        stated = re.findall(r"(\d+)x (\w+)", row.split("|")[-2])
        assert {g for _, g in stated} == {"MI300X", "H200", "H100", "A100", "MI250X"}
        for count, gpu in stated:
            assert plan(model, gpu=gpu, count=int(count)).fits
            assert int(count) == 1 or not plan(model, gpu=gpu, count=int(count) - 1).fits
