"""The fast path gives transformers' own answers: per-token experts, the column-major re-layout,
the recipe applied at load."""

import pytest
import torch
from conftest import tiny_moe

from helpers import describe, load_pipeline
from helpers.experts import register_experts
from helpers.fastpath import (
    DECODE_TOKENS,
    Recipe,
    apply_recipe,
    choose_layouts,
    column_major,
    fast_recipe,
    per_token_experts,
)


# ---------------------------------------------------------------- the fast path gives the same answers
@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["float32", "bfloat16"]
)
@pytest.mark.parametrize("tokens", [1, 2, DECODE_TOKENS + 3])
def test_per_token_experts_equal_eager(tokens, dtype, tolerance):
    register_experts("per_token", per_token_experts)
    model = tiny_moe(seed=1).to(dtype)
    ids = torch.randint(0, 512, (1, tokens))
    with torch.no_grad():
        model.set_experts_implementation("eager")
        expected = model(ids).logits
        model.set_experts_implementation("per_token")
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_column_major_keeps_shape_and_values():
    w = torch.randn(6, 4)
    c = column_major(w)
    assert c.shape == w.shape and torch.equal(c, w) and c.t().is_contiguous() and not c.is_contiguous()


@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["float32", "bfloat16"]
)
def test_apply_recipe_keeps_the_answer(dtype, tolerance):
    model = tiny_moe(seed=2).to(dtype)
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    recipe = apply_recipe(model, Recipe("cpu", dtype, "per_token", relayout=True, reasons=["test"]))
    assert model.config._experts_implementation == "per_token" and not hasattr(model, "recipe")
    assert set(recipe.layouts) >= {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "experts.gate_up_proj",
        "experts.down_proj",
        "lm_head",
    }
    assert all(v[2] in ("row-major", "column-major") and v[3] > 0 for v in recipe.layouts.values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=tolerance, atol=tolerance)
        if dtype == torch.float32:  # bf16 rounds sums taken in another order differently: near-ties may flip
            assert torch.equal(
                model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0), greedy
            )


def test_choose_layouts_reports_every_kind_once_with_tied_weights(tiny_dense):
    report = choose_layouts(tiny_dense)  # lm_head shares its tensor with the embeddings
    assert "lm_head" in report and "embed_tokens" not in report
    assert tiny_dense.lm_head.weight is tiny_dense.model.embed_tokens.weight


def test_the_recipe_says_what_it_chose_and_why():
    cpu = fast_recipe("cpu")
    assert cpu.experts == "per_token" and cpu.relayout and len(cpu.reasons) == 4
    gpu = fast_recipe("cuda")
    assert gpu.experts == "grouped_mm" and not gpu.relayout
    assert "per_token" in str(cpu) and "dtype" in str(cpu)
    caller = fast_recipe("cpu", dtype=torch.float16)  # a dtype the machine would not pick: said so, first
    assert caller.dtype == torch.float16 and caller.reasons[0].startswith(
        "dtype float16: chosen by the caller ("
    )
    replaced = fast_recipe("cpu", experts="quantized")
    assert replaced.experts == "quantized" and not replaced.relayout
    lines = replaced.describe("why the experts were replaced").splitlines()
    assert lines[1] == f"  - {replaced.reasons[0]}" and lines[2] == "  - why the experts were replaced"


def test_load_pipeline_takes_the_fast_path_unless_told_not_to(tiny_mixtral_dir):
    fast = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)
    plain = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32, fast=False)
    assert fast.model.config._experts_implementation == "per_token"
    assert "fast path on cpu" in describe(fast, detail=True) and "blog's plain pipeline" in describe(plain)
    assert len(describe(fast).splitlines()) == 1 and "fast path" in describe(fast)
    assert not hasattr(plain.model, "recipe")
