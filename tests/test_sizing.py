"""The one account of parameters and bytes (helpers.sizing), held equal to the models' own tensors:
counted on the meta device, in a real KV cache, and by hand; and the one fit check."""

import itertools

import pytest
import torch
from conftest import meta_count, tiny_moe

import helpers.hardware as hw
from helpers.sizing import (
    ceiling,
    decode_bytes,
    expected_distinct_experts,
    fit_report,
    fits,
    kv_bytes_per_token,
    memory_table,
    mixtral_config,
    parameter_count,
    usable,
)

BIG = "mistralai/Mixtral-8x22B-Instruct-v0.1"
SMALL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
GiB = 2**30


def by_hand(h, f, layers, heads, kv_heads, vocab, experts=8, top_k=2):
    """Mixtral's parameters from its config, written out independently of the helpers."""
    head_dim = h // heads
    attention = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2  # q, o + k, v
    expert = 3 * h * f  # w1, w2, w3
    per_layer = attention + experts * expert + experts * h + 2 * h
    total = layers * per_layer + 2 * vocab * h + h
    active = total - layers * (experts - top_k) * expert
    return total, active


def test_parameter_count_matches_the_arithmetic():
    for name, args in [(BIG, (6144, 16384, 56, 48, 8, 32768)), (SMALL, (4096, 14336, 32, 32, 8, 32000))]:
        parts = parameter_count(name)
        assert (parts["total"], parts["active"]) == by_hand(*args)
        assert parts["embeddings"] == parts["lm_head"] == args[5] * args[0]
        assert parts["router"] == args[2] * 8 * args[0]
    assert (
        parameter_count(BIG)["total"] == 140_630_071_296 and parameter_count(BIG)["active"] == 39_161_468_928
    )
    assert (
        parameter_count(SMALL)["total"] == 46_702_792_704
        and parameter_count(SMALL)["active"] == 12_879_925_248
    )


def test_kv_cache_per_token():
    assert kv_bytes_per_token(BIG) == 2 * 56 * 8 * 128 * 2  # K and V, layers, KV heads, head dim, bf16
    assert kv_bytes_per_token(SMALL, "float32") == 2 * 32 * 8 * 128 * 4


def test_memory_table_precisions():
    rows = {r["precision"]: r for r in memory_table(BIG, context=65536)}
    assert round(rows["bfloat16"]["weights_GiB"]) == 262
    assert rows["int4"]["weights_GiB"] == pytest.approx(rows["bfloat16"]["weights_GiB"] / 4)
    assert rows["bfloat16"]["kv_cache_GiB"] == pytest.approx(14.0)  # 224 KiB x 64 Ki tokens
    assert rows["int8"]["kv_cache_GiB"] == rows["bfloat16"]["kv_cache_GiB"]


def independent_count(config):
    """Count by instantiating the model on the meta device: no memory, no weights."""
    from transformers import MixtralForCausalLM

    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    expert = (
        sum(p.numel() for p in model.model.layers[0].mlp.experts.parameters()) // config.num_local_experts
    )
    active = (
        total - config.num_hidden_layers * (config.num_local_experts - config.num_experts_per_tok) * expert
    )
    return total, active


@pytest.mark.parametrize(
    "name, total_b, active_b",
    [
        ("mistralai/Mixtral-8x22B-Instruct-v0.1", 140.6, 39.2),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", 46.7, 12.9),
    ],
)
def test_parameter_counts_from_the_real_configs(name, total_b, active_b):
    config = mixtral_config(name)
    counts = parameter_count(config)
    assert (counts["total"], counts["active"]) == independent_count(config)
    assert round(counts["total"] / 1e9, 1) == total_b and round(counts["active"] / 1e9, 1) == active_b


def numel(model, pick) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if pick(name))


def test_decode_bytes_match_the_models_own_tensors():
    model = tiny_moe()
    c = model.config
    parts = decode_bytes(c, dtype_bytes=4)["parts"]
    assert parts["attention"] == 4 * numel(model, lambda n: "self_attn" in n)
    assert parts["router"] == 4 * numel(model, lambda n: ".mlp.gate." in n)
    assert (
        parts["experts"]
        == 4 * numel(model, lambda n: ".experts." in n) * c.num_experts_per_tok / c.num_local_experts
    )
    assert parts["lm_head"] == 4 * numel(model, lambda n: "lm_head" in n)
    assert parts["norms"] == 4 * numel(model, lambda n: "norm" in n)
    assert parts["embedding rows"] == 4 * c.hidden_size
    assert parts["kv_cache"] == 0


def test_kv_cache_bytes_match_a_real_cache():
    from transformers import DynamicCache

    model = tiny_moe()
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, 512, (3, 17)), past_key_values=cache, use_cache=True)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert decode_bytes(model.config, 4, context=17, batch=3)["parts"]["kv_cache"] == held


def test_dense_models_read_their_whole_mlp(tiny_dense):
    parts = decode_bytes(tiny_dense.config, dtype_bytes=2)["parts"]
    assert parts["mlp"] == 2 * numel(tiny_dense, lambda n: ".mlp." in n)
    assert "experts" not in parts and "router" not in parts


def test_bytes_per_token_divide_the_step_over_the_batch():
    config = tiny_moe().config
    one, four = decode_bytes(config, 2, batch=1), decode_bytes(config, 2, batch=4, experts_read=4)
    assert four["per_token"] == four["per_step"] / 4
    assert four["per_token"] < one["per_token"]  # the weights are shared by the batch


def test_expected_distinct_experts_is_exact():
    assert expected_distinct_experts(8, 2, 1) == 2
    # every way two tokens can each pick 2 of 4 experts: the mean size of the union
    pairs = list(itertools.combinations(range(4), 2))
    mean = sum(len(set(a) | set(b)) for a in pairs for b in pairs) / len(pairs) ** 2
    assert expected_distinct_experts(4, 2, 2) == pytest.approx(mean)
    assert expected_distinct_experts(8, 2, 1000) == pytest.approx(8)


def test_mixtral_8x22b_reads_a_quarter_of_its_experts_per_token():
    config = mixtral_config("mistralai/Mixtral-8x22B-Instruct-v0.1")
    parts = decode_bytes(config, dtype_bytes=2)["parts"]
    active = parameter_count(config)["active"]
    weights = sum(v for k, v in parts.items() if k not in ("kv_cache", "embedding rows"))
    assert weights == pytest.approx(2 * (active - config.vocab_size * config.hidden_size), rel=1e-9)


def test_ceiling_arithmetic():
    assert ceiling(100e9, 1e9) == 100
    assert ceiling(4.8e12, 2 * 39.16e9) == pytest.approx(61.3, abs=0.1)
    with pytest.raises(ValueError, match="positive"):
        ceiling(0, 1)
    with pytest.raises(ValueError, match="context"):
        decode_bytes(tiny_moe().config, 2, context=-1)


def test_fit_report_verdicts(monkeypatch):
    monkeypatch.setattr(hw, "gpus", lambda: [{"total": 80 * GiB, "free": 80 * GiB}] * 4)
    monkeypatch.setattr(hw, "system_memory", lambda: {"total": 64 * GiB, "available": 60 * GiB})
    rows = {
        r["model"]: r["verdict"] for r in fit_report({"small": 87 * GiB, "big": 262 * GiB, "huge": 400 * GiB})
    }
    assert rows["small"] == "fits on the GPUs"
    assert rows["big"] == "fits on the GPUs"  # 262 * 1.1 = 288 <= 320
    assert rows["huge"] == "does not fit: needs 400.0 GiB, has 345.6 GiB usable (10% of 384.0 GiB kept free)"


def test_fit_report_without_gpus(monkeypatch):
    monkeypatch.setattr(hw, "gpus", lambda: [])
    monkeypatch.setattr(hw, "system_memory", lambda: {"total": 24 * GiB, "available": 20 * GiB})
    # one decimal, as this_machine() prints the RAM
    rows = fit_report({"stand-in": 1.3 * GiB, "8x22B": 262 * GiB})
    assert rows[0]["verdict"] == "fits in RAM (CPU only)"
    assert (
        rows[1]["verdict"] == "does not fit: needs 262.0 GiB, has 21.6 GiB usable (10% of 24.0 GiB kept free)"
    )


@pytest.mark.parametrize("which", [BIG, SMALL, "stand-in", "tiny dense"])
def test_every_component_equals_a_meta_device_count(which, tiny_dense):
    """The planner, the benchmark and the notebooks count with parameter_count: it must match the
    parameters transformers itself creates, component by component."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from helpers import ensure_standin

    config = {
        "stand-in": lambda: AutoConfig.from_pretrained(ensure_standin()),
        "tiny dense": lambda: tiny_dense.config,
    }.get(which, lambda: mixtral_config(which))()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counted = parameter_count(config)
    expected = meta_count(model)
    expected.setdefault("lm_head", 0)  # tied to the embeddings: no parameter of its own
    assert {k: v for k, v in counted.items() if k not in ("total", "active")} == expected
    assert counted["total"] == sum(p.numel() for p in model.parameters())


def test_one_margin_for_every_fit():
    assert usable(100 * GiB) == pytest.approx(90 * GiB)
    assert fits(90 * GiB, 100 * GiB) and not fits(90.1 * GiB, 100 * GiB)


def test_the_guides_batching_numbers_are_computed():
    """docs/workshop.md quotes what a room of 30 gets from 8x MI300X: the same arithmetic as 08, section 6."""
    import re
    from pathlib import Path

    from helpers.data import GPU_TYPES

    guide = (Path(__file__).resolve().parent.parent / "docs" / "workshop.md").read_text()
    each, alone = map(int, re.search(r"about (\d+) tok/s at the ceiling, not (\d+)", guide).groups())
    bandwidth = 8 * GPU_TYPES["MI300X"]["bandwidth_tbs"] * 1e12
    assert round(bandwidth / decode_bytes(BIG, 2, context=2048, batch=30)["per_step"]) == each
    assert round(bandwidth / decode_bytes(BIG, 2, context=2048)["per_step"]) == alone
    assert round(expected_distinct_experts(8, 2, 4), 1) == 5.5 and expected_distinct_experts(8, 2, 16) > 7.9
