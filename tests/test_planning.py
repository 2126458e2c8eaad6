import re
from pathlib import Path

import pytest

from helpers.data import GPU_TYPES
from helpers.planning import layer_device, plan
from helpers.sizing import as_config, decode_bytes, parameter_count

BIG = "mistralai/Mixtral-8x22B-Instruct-v0.1"
SMALL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
GiB = 2**30


@pytest.mark.parametrize(
    "gpu, count, precision, fits, layers",
    [
        ("MI300X", 8, "bfloat16", True, [7, 8, 8, 8, 8, 8, 8, 1]),
        ("MI300X", 2, "bfloat16", True, [28, 28]),
        ("MI300X", 1, "bfloat16", False, None),
        ("H100", 4, "bfloat16", True, None),
        ("H100", 2, "int4", True, [28, 28]),
        ("A100", 2, "bfloat16", False, None),
    ],
)
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
    assert int4.ceiling_pipeline == pytest.approx(
        5.3e12 / decode_bytes(BIG, 0.5, context=1, kv_bytes=2)["per_token"]
    )


def test_layer_device_reads_the_most_specific_entry():
    device_map = {"model.embed_tokens": 0, "model.layers.1": 1, "model.layers.10": 2, "": 0}
    assert [layer_device(device_map, i) for i in (0, 1, 10, 11)] == [0, 1, 2, 0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model="mistralai/Mixtral-8x99B"), "unknown model"),
        (dict(count=0), "whole number >= 1"),
        (dict(count=-2), "whole number >= 1"),
        (dict(gpu="RTX9090"), "unknown GPU"),
        (dict(gpu=dict(name="mine", memory_gib=0, bandwidth_tbs=1.0)), "must be > 0"),
        (dict(gpu=dict(name="mine", memory_gib=80)), "unknown GPU 'mine'.* or a dict such as"),
        (dict(context=65537), "from 1 to 65536 .the model.s maximum"),
        (dict(precision="fp8"), "precision='fp8' is not known"),
    ],
)
def test_bad_plans_are_refused(kwargs, message):
    with pytest.raises((ValueError, KeyError), match=message):
        plan(**{"model": BIG, **kwargs})


def test_custom_gpu():
    p = plan(SMALL, gpu=dict(name="my GPU", memory_gib=141, bandwidth_tbs=4.8), count=1)
    assert p.gpu == "my GPU"
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


# ---------------------------------------------------------------- expert parallelism against tensor parallelism
@pytest.mark.parametrize("experts, per_token, gpus", [(8, 2, 8), (8, 2, 4), (8, 2, 2), (8, 3, 4), (16, 2, 8)])
def test_remote_gpus_is_the_enumerated_mean(experts, per_token, gpus):
    """Every home GPU against every set of chosen experts: the GPUs other than home that hold one of them."""
    from itertools import combinations

    from helpers.planning import remote_gpus

    per_gpu = experts // gpus
    counts = [
        len({e // per_gpu for e in chosen} - {home})
        for home in range(gpus)
        for chosen in combinations(range(experts), per_token)
    ]
    assert remote_gpus(experts, per_token, gpus) == pytest.approx(sum(counts) / len(counts))


def ring_allreduce(vectors: list) -> tuple[list, int]:
    """A ring all-reduce done by hand: reduce-scatter, then all-gather, each N - 1 steps in which every GPU
    sends one of N chunks to the next. -> (each GPU's result, values each GPU sent)."""
    n, size = len(vectors), len(vectors[0])
    bounds = [(i * size // n, (i + 1) * size // n) for i in range(n)]
    data = [list(v) for v in vectors]
    sent = 0
    for phase in ("reduce", "gather"):
        for step in range(n - 1):
            moves = []
            for gpu in range(n):
                chunk = (gpu - step + (0 if phase == "reduce" else 1)) % n
                lo, hi = bounds[chunk]
                moves.append(((gpu + 1) % n, chunk, data[gpu][lo:hi]))
            for to, chunk, values in moves:
                lo, hi = bounds[chunk]
                data[to][lo:hi] = (
                    [a + b for a, b in zip(data[to][lo:hi], values)] if phase == "reduce" else values
                )
            sent += bounds[0][1] - bounds[0][0]
    return data, sent


def test_tensor_parallel_links_carry_two_ring_all_reduces_per_layer():
    from helpers.planning import parallel_step

    gpus, values = 8, 64
    results, sent = ring_allreduce([[gpu * 100 + i for i in range(values)] for gpu in range(gpus)])
    assert all(
        r == [sum(g * 100 + i for g in range(gpus)) for i in range(values)] for r in results
    )  # it is one
    assert sent == 2 * (gpus - 1) * values // gpus
    config = as_config(SMALL)
    for batch in (1, 4):
        step = parallel_step(plan(SMALL, gpu="H100", count=gpus), batch=batch)
        message = batch * config.hidden_size  # values per all-reduce; bf16: 2 bytes each
        assert step["link_bytes"] == pytest.approx(config.num_hidden_layers * 2 * 2 * sent / values * message)
        assert step["link_s"] == pytest.approx(step["link_bytes"] / 450e9)


def test_expert_parallel_reads_and_sends():
    from helpers.planning import parallel_step, remote_gpus

    config = as_config(BIG)
    L, D = config.num_hidden_layers, config.hidden_size
    one_expert_all_layers = parameter_count(BIG)["experts"] * 2 / 8
    node = plan(
        BIG, gpu="MI300X", count=8
    )  # 4,096 tokens of context: each cache half full, as the plan counts
    tensor, expert, data = (
        parallel_step(node, batch=1, scheme=s) for s in ("tensor", "expert", "expert, data")
    )
    assert tensor["read_bytes"] * 8 == pytest.approx(
        decode_bytes(BIG, 2, context=2048)["per_step"]
    )  # all split
    assert expert["read_bytes"] - tensor["read_bytes"] == pytest.approx(one_expert_all_layers * (1 - 2 / 8))
    assert expert["link_bytes"] == tensor["link_bytes"]
    assert data["link_bytes"] == pytest.approx(
        L * 2 * remote_gpus(8, 2, 8) * D * 2
    )  # one sequence, its two experts
    assert tensor["moved_per_token_layer"] / data["moved_per_token_layer"] == pytest.approx(
        4 * 7 / (2 * 1.75)
    )
    assert tensor["seconds"] < expert["seconds"] < data["seconds"]  # at batch 1
    wide = [parallel_step(node, batch=64, scheme=s) for s in ("tensor", "expert")]
    assert wide[1]["read_bytes"] / wide[0]["read_bytes"] == pytest.approx(
        1, abs=1e-3
    )  # nearly every expert chosen
    ninth = parallel_step(node, batch=9, scheme="expert, data")
    assert ninth["link_bytes"] == 2 * data["link_bytes"]  # the busiest GPU: ceil(9 / 8) = 2 sequences


@pytest.mark.parametrize(
    "gpus, kwargs, message",
    [
        (("MI300X", 3), {}, "do not split evenly over 3 GPUs"),
        (("A100", 8), {}, "8x A100: GPU-to-GPU link rates are known for MI300X, H100"),
        (("MI300X", 8), dict(scheme="pipeline"), "use one of 'tensor', 'expert', 'expert, data'"),
        (("MI300X", 8), dict(batch=0), "batch"),
    ],
)
def test_parallel_step_refuses_what_it_cannot_work_out(gpus, kwargs, message):
    from helpers.planning import parallel_step

    with pytest.raises(ValueError, match=re.escape(message)):
        parallel_step(plan(BIG, gpu=gpus[0], count=gpus[1]), **kwargs)
    with pytest.raises(
        TypeError, match=re.escape('parallel_step(plan("mistralai/Mixtral-8x22B-Instruct-v0.1", gpu=')
    ):
        parallel_step(BIG)  # a model's name, not a plan of the GPUs
