"""The fast path gives transformers' own answers: per-token experts, the column-major re-layout,
the recipe applied at load."""

import pytest
import torch
from conftest import tiny_moe

import helpers.fastpath as fastpath

from helpers import describe, load_pipeline
from helpers.experts import register_experts
from helpers.fastpath import (
    DECODE_TOKENS,
    KERNELS,
    Recipe,
    apply_recipe,
    choose_experts,
    choose_kernels,
    column_major,
    fast_recipe,
    matvec_linear,
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
    recipe = apply_recipe(model, fast_recipe(dtype, "test", "cpu"))
    assert recipe.experts in ("per_token", "grouped_mm", "eager")
    assert model.config._experts_implementation == recipe.experts
    assert set(recipe.experts_ms) == {"per_token", "grouped_mm", "eager"}
    assert set(recipe.kernels) >= {"q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj", "lm_head"}
    assert all(
        k.chosen in KERNELS and set(k.gb_s) == set(KERNELS) and k.nbytes > 0 for k in recipe.kernels.values()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=tolerance, atol=tolerance)
        if dtype == torch.float32:  # bf16 rounds sums taken in another order differently: near-ties may flip
            assert torch.equal(
                model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0), greedy
            )


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("tokens", [1, 3])
def test_every_kernel_gives_the_eager_answer(monkeypatch, kernel, tokens):
    """Whichever kernel the measurement picks for each kind of weight, the model answers as before."""
    model = tiny_moe(seed=4)
    ids = torch.randint(0, 512, (1, tokens))
    with torch.no_grad():
        expected = model(ids).logits
        # every kind measured fastest with `kernel`
        monkeypatch.setattr(
            fastpath, "_kernel_speeds", lambda m, x: {k: 2.0 if k == kernel else 1.0 for k in KERNELS}
        )
        report = choose_kernels(model)
        register_experts("per_token", per_token_experts)
        model.set_experts_implementation("per_token")
        assert {k.chosen for k in report.values()} == {kernel}
        assert isinstance(model.model.layers[0].self_attn.q_proj, matvec_linear()) == (kernel == "torch.mv")
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_kernel_must_be_clearly_faster_to_replace_f_linear(monkeypatch, tiny_dense):
    monkeypatch.setattr(
        fastpath,
        "_kernel_speeds",
        lambda m, x: {"F.linear": 1.0, "torch.mv": 1.05, "F.linear, column-major": 0.5},
    )
    assert {k.chosen for k in choose_kernels(tiny_dense).values()} == {"F.linear"}


def test_choose_kernels_reports_every_kind_once_with_tied_weights(tiny_dense):
    report = choose_kernels(tiny_dense)  # lm_head shares its tensor with the embeddings
    assert "lm_head" in report and "embed_tokens" not in report
    assert tiny_dense.lm_head.weight is tiny_dense.model.embed_tokens.weight


def test_an_experts_implementation_with_another_answer_is_never_chosen(monkeypatch):
    """choose_experts keeps only the implementations that give eager's logits, then the fastest of them."""

    def wrong(self, hidden_states, top_k_index, top_k_weights):
        return hidden_states * 0

    register_experts("wrong", wrong)
    model = tiny_moe(seed=5)
    seconds = choose_experts(model, ("wrong", "per_token", "grouped_mm"))
    assert seconds["wrong"] is None and seconds["per_token"] > 0 and seconds["grouped_mm"] > 0
    fastest = min(("per_token", "grouped_mm"), key=seconds.get)
    assert model.config._experts_implementation == fastest


def test_the_recipe_says_what_it_chose_and_why():
    cpu = fast_recipe(torch.bfloat16, "bfloat16: measured fastest here", "cpu")
    assert (
        cpu.probe and cpu.reasons[0] == "bfloat16: measured fastest here" and "measured at load" in str(cpu)
    )
    offloaded = fast_recipe(torch.float32, "why", "cpu", offloaded=True)
    assert offloaded.experts == "per_token" and not offloaded.probe and "offloaded" in str(offloaded)
    replaced = fast_recipe(torch.bfloat16, "why", "cpu", experts="quantized")
    assert replaced.experts == "quantized" and not replaced.probe
    lines = replaced.describe("why the experts were replaced").splitlines()
    assert lines[1] == "  - why" and lines[2] == "  - why the experts were replaced"


def test_load_pipeline_takes_the_fast_path_unless_told_not_to(tiny_mixtral_dir):
    fast = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)
    plain = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32, fast=False)
    recipe = fast.model.load_record.recipe
    assert fast.model.config._experts_implementation == recipe.experts and recipe.experts_ms[recipe.experts]
    assert "fast path on cpu" in describe(fast, detail=True) and "blog's plain pipeline" in describe(plain)
    assert len(describe(fast).splitlines()) == 1 and "fast path" in describe(fast)
    assert not hasattr(plain.model, "recipe")
