"""The fast path gives transformers' own answers: per-token experts, the column-major re-layout,
the recipe applied at load."""

import time
import warnings

import pytest
import torch
from conftest import needs_our_kernel, packs_bf16, tiny_moe

import helpers.decode as decode
import helpers.fastpath as fastpath
from helpers import describe, load_pipeline
from helpers.data import QUANT_KERNEL_ENV
from helpers.decode import use_lean_step
from helpers.experts import register_experts
from helpers.fastpath import (
    DECODE_TOKENS,
    KERNELS,
    apply_recipe,
    choose_experts,
    choose_kernels,
    column_major,
    fast_recipe,
    kernel_linear,
    kernel_router,
    per_token_experts,
)
from helpers.quant_kernel import kernel_unavailable

needs_bf16_packing = pytest.mark.skipif(
    not packs_bf16(), reason="oneDNN packs bf16 only where the CPU computes it (AVX-512 or AMX)"
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
        k.chosen in KERNELS and "F.linear" in k.gb_s and set(k.gb_s) <= set(KERNELS) and k.nbytes > 0
        for k in recipe.kernels.values()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=tolerance, atol=tolerance)
        if dtype == torch.float32:  # bf16 rounds sums taken in another order differently: near-ties may flip
            assert torch.equal(
                model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0), greedy
            )


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)], ids=["float32", "bfloat16"]
)  # bf16: a few of its steps at the tiny model's logits (under 0.5); measured 1e-3 at most
def test_every_kernel_gives_the_eager_answer(monkeypatch, kernel, tokens, dtype, tolerance):
    """Whichever kernel the measurement picks for each kind of weight, the model answers as before: in float32
    to float32's rounding; in bf16 to bf16's, since a kernel may sum in another order (the float32 copy's
    products round once, at the end, where bf16 F.linear may round on the way)."""
    if dtype == torch.bfloat16 and kernel == "oneDNN packed" and not packs_bf16():
        pytest.skip("oneDNN packs bf16 only where the CPU computes it (AVX-512 or AMX)")
    if kernel == "our kernel" and kernel_unavailable():
        pytest.skip(kernel_unavailable())
    if (
        kernel == "F.linear, column-major"
    ):  # as where our kernels are not built: a Mixtral's layers re-laid too
        monkeypatch.setattr(fastpath, "kernel_unavailable", lambda: "not built, for this test")
    model = tiny_moe(seed=4).to(dtype)
    ids = torch.randint(0, 512, (1, tokens))
    with torch.no_grad():
        expected = model(ids).logits
        # every kind measured fastest with `kernel`
        monkeypatch.setattr(
            fastpath, "_kernel_speeds", lambda shape, dtype: {k: 2.0 if k == kernel else 1.0 for k in KERNELS}
        )
        report = choose_kernels(model)
        register_experts("per_token", per_token_experts)
        model.set_experts_implementation("per_token")
        assert {k.chosen for k in report.values()} == {kernel}
        swapped = kernel in (
            "torch.mv",
            "oneDNN packed",
            "float32 copy",
            "our kernel",
        )  # the others: the weight's data, in place
        for module in (model.model.layers[0].self_attn.q_proj, model.lm_head):
            assert isinstance(module, kernel_linear()) == swapped and (not swapped or module.kernel == kernel)
        router = model.model.layers[0].mlp.gate
        assert isinstance(router, kernel_router()) == swapped and (not swapped or router.kernel == kernel)
        torch.testing.assert_close(model(ids).logits, expected, rtol=tolerance, atol=tolerance)


@needs_bf16_packing
def test_a_packed_linear_keeps_its_weight_and_leaves_a_stale_copy_alone():
    """The packed copy sits beside the weight: the state dict is as before, bf16 products agree with F.linear's to
    bf16's rounding, and once the weight's dtype or contents change F.linear answers again."""
    linear = torch.nn.Linear(64, 96).bfloat16()
    packed = kernel_linear()(linear, "oneDNN packed")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert packed.weight is linear.weight and set(packed.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(packed(x), linear(x), rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        packed.weight.mul_(2)  # in place: the copy no longer holds the weight
    assert torch.equal(packed(x), torch.nn.functional.linear(x, packed.weight, packed.bias))
    packed.float()  # the copy is bf16, the weight now float32
    assert torch.equal(packed(x.float()), torch.nn.functional.linear(x.float(), packed.weight, packed.bias))


@pytest.mark.parametrize(
    "kernel",
    [
        "float32 copy",
        pytest.param("oneDNN packed", marks=needs_bf16_packing),
        "torch.mv",
        pytest.param("our kernel", marks=needs_our_kernel),
    ],
)
def test_a_router_with_a_kernel_routes_as_transformers_does(kernel):
    """A router switched to another kernel gives transformers' router outputs: its logits to bf16's rounding, the
    same experts and weights; past DECODE_TOKENS tokens, or once its weight changes, transformers' own forward, bit
    for bit. It stays the same kind of module, so what hooks or sets a router (07's records, top_k) still works."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    own = tiny_moe(seed=8).bfloat16().model.layers[0].mlp.gate
    router = kernel_router()(own, kernel)
    assert isinstance(router, MixtralTopKRouter) and router.weight is own.weight
    assert set(router.state_dict()) == {"weight"}
    torch.manual_seed(0)
    for tokens in (1, 3, DECODE_TOKENS + 2):
        x = torch.randn(tokens, own.hidden_dim, dtype=torch.bfloat16)
        (logits, weights, index), (logits0, weights0, index0) = router(x), own(x)
        torch.testing.assert_close(logits, logits0, rtol=1e-2, atol=1e-2)
        assert torch.equal(index, index0) and torch.allclose(weights, weights0, atol=1e-2)
        if kernel == "torch.mv" and tokens > 1 or tokens > DECODE_TOKENS:
            assert all(map(torch.equal, router(x), own(x)))
    with torch.no_grad():
        # a copy is stale: transformers' forward answers; the others read the weight itself
        own.weight.mul_(2)
    if kernel not in fastpath.IN_PLACE:
        assert all(map(torch.equal, router(x[:1]), own(x[:1])))
    torch.testing.assert_close(router(x[:1])[0], own(x[:1])[0], rtol=1e-2, atol=1e-2)
    router.top_k = 1
    assert router(x[:1])[2].shape == (1, 1)


def test_packed_experts_go_stale_with_their_weights_and_need_room(monkeypatch, tiny_dense):
    """The experts' packed copies answer until their weights change (F.linear on the weights then), a packed
    lm_head stays tied to the embeddings, and where the available RAM would not hold a copy, none is made."""
    monkeypatch.setattr(
        fastpath,
        "_kernel_speeds",
        lambda shape, dtype: {k: 2.0 if k == "oneDNN packed" else 1.0 for k in KERNELS},
    )
    model = tiny_moe(seed=4)
    choose_kernels(model)
    register_experts("per_token", per_token_experts)
    ids = torch.randint(0, 512, (1, 1))
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj.mul_(1.5)  # after packing: the copies are stale
        got = model.set_experts_implementation("per_token") or model(ids).logits
        model.set_experts_implementation("eager")
        torch.testing.assert_close(got, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert fastpath._EXPERT_KERNELS[experts]["gate_up_proj"][1] is not None  # the copies were made
    report = choose_kernels(tiny_dense)
    assert isinstance(tiny_dense.lm_head, kernel_linear()) and report["lm_head"].note.startswith(
        "a packed copy"
    )
    assert tiny_dense.lm_head.weight is tiny_dense.model.embed_tokens.weight
    monkeypatch.setattr(fastpath, "system_memory", lambda: {"total": 2**30, "available": 2**10})
    crowded = tiny_moe(seed=5)
    report = choose_kernels(crowded)
    assert {k.chosen for k in report.values()} == {"F.linear"}
    assert {k.note for k in report.values()} == {"no room in RAM for a packed copy"}
    assert all(
        c is None for _, c, _ in fastpath._EXPERT_KERNELS[crowded.model.layers[0].mlp.experts].values()
    )


@needs_our_kernel
def test_a_mixtrals_layers_stay_as_held_for_our_layer_operator(monkeypatch):
    """Where our kernels are built, a Mixtral's layer weights are not re-laid column by column, however fast that
    measured (our layer operator reads them as held, and the load races it), and the report says why; lm_head, which
    the operator does not read, still is."""
    monkeypatch.setattr(
        fastpath,
        "_kernel_speeds",
        lambda shape, dtype: {"F.linear": 1.0, "torch.mv": 1.05, "F.linear, column-major": 2.0},
    )
    model = tiny_moe(seed=8)
    report = choose_kernels(model)
    assert report["lm_head"].chosen == "F.linear, column-major" and not model.lm_head.weight.is_contiguous()
    layers = {kind: k for kind, k in report.items() if kind != "lm_head"}
    assert {k.chosen for k in layers.values()} == {"F.linear"}
    assert {k.note for k in layers.values()} == {"not re-laid: our layer operator reads it as held"}
    assert decode.native_reads(model, fastpath.experts_on_our_kernel())


def test_a_kernel_must_be_clearly_faster_to_replace_f_linear(monkeypatch, tiny_dense):
    monkeypatch.setattr(
        fastpath,
        "_kernel_speeds",
        lambda shape, dtype: {"F.linear": 1.0, "torch.mv": 1.05, "F.linear, column-major": 0.5},
    )
    assert {k.chosen for k in choose_kernels(tiny_dense).values()} == {"F.linear"}


def test_choose_kernels_reports_every_kind_once_with_tied_weights(tiny_dense):
    report = choose_kernels(tiny_dense)  # lm_head shares its tensor with the embeddings
    assert "lm_head" in report and "embed_tokens" not in report
    assert tiny_dense.lm_head.weight is tiny_dense.model.embed_tokens.weight


def test_kernels_are_timed_from_memory_once_per_machine(monkeypatch, tmp_path):
    """Each kind's kernels are timed on more distinct matrices than the last-level cache holds, once: a second
    model of the same shapes reads the figures the first one measured."""
    monkeypatch.setenv("MIXTRAL_NOTEBOOKS_CACHE", str(tmp_path))
    monkeypatch.setattr(fastpath, "timing_buffer_bytes", lambda: 2**20)
    timed = []
    monkeypatch.setattr(fastpath, "best_seconds", lambda run: timed.append(len(run())) or 1e-3)
    monkeypatch.setattr(fastpath, "cores_busy_elsewhere", lambda run: (run(), 0.0))  # a quiet machine
    first = choose_kernels(tiny_moe(seed=6))
    assert timed and all(n == 2**20 // (first["q_proj"].nbytes // 2) for n in timed[:3])  # 1 MiB of q_proj's
    count = len(timed)
    second = choose_kernels(tiny_moe(seed=7))
    assert len(timed) == count and {k: v.gb_s for k, v in second.items()} == {
        k: v.gb_s for k, v in first.items()
    }
    shapes = {
        tuple(getattr(m, a).shape[-2:])
        for kind in fastpath._weight_groups(tiny_moe()).values()
        for _, m, a in kind
    }
    assert (
        len(list((tmp_path / "measured").glob("kernels-*.json"))) == len(shapes) < len(first)
    )  # q and o share one


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
    assert cpu.probe and cpu.reasons[0] == "bfloat16: measured fastest here" and "measured here" in str(cpu)
    offloaded = fast_recipe(torch.float32, "why", "cpu", offloaded=True)
    assert offloaded.experts == "per_token" and not offloaded.probe and "offloaded" in str(offloaded)
    replaced = fast_recipe(torch.bfloat16, "why", "cpu", experts="quantized")
    assert replaced.experts == "quantized" and replaced.probe == ("kernels",)  # what quantizing left: routers
    cached = fast_recipe(torch.bfloat16, "why", "cpu", experts="expert_cache")
    assert cached.experts == "expert_cache" and not cached.probe
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


@pytest.mark.parametrize("fit", ["none", "int8", "expert cache"])
def test_a_load_changes_on_transformers_modules_only_its_record_the_step_and_the_weights_a_fit_replaces(
    tiny_mixtral_dir, fit
):
    """What the fast path made (the kernels' copies, q, k and v joined, what the step reads) lives in our own modules,
    in the load record or beside transformers' modules (decode.JOINED). On theirs a load sets `load_record` (the
    model) and `forward` (the decoder, whose one-token steps our step takes), and a fit replaces the experts' weights
    as torch registers them (int8: our quantized modules; the expert cache: its slots). Nothing else: no attribute,
    submodule, buffer, parameter or hook more or fewer; a module of theirs that is gone was replaced by one of ours."""
    from transformers import AutoModelForCausalLM

    from helpers import Fit

    parts = ("__dict__", "_modules", "_buffers", "_parameters", "_forward_hooks", "_forward_pre_hooks")

    def theirs(model):  # each of transformers' modules by name: the names each part of it holds
        return {
            n: {p: set(vars(m) if p == "__dict__" else getattr(m, p)) for p in parts}
            for n, m in model.named_modules()
            if type(m).__module__.startswith("transformers.")
        }

    untouched = AutoModelForCausalLM.from_pretrained(
        tiny_mixtral_dir, dtype=torch.bfloat16, device_map="auto"
    )
    before = theirs(untouched)
    fits = {"none": None, "int8": Fit.quantized("int8"), "expert cache": Fit.expert_cache(2)}
    model = load_pipeline(str(tiny_mixtral_dir), dtype=torch.bfloat16, fit=fits[fit]).model
    after = theirs(model)
    assert set(after) <= set(before)
    assert all(
        type(model.get_submodule(n)).__module__.startswith("helpers.") for n in set(before) - set(after)
    )
    changed = {
        (n, p): (after[n][p] - before[n][p], before[n][p] - after[n][p])
        for n in after
        for p in parts
        if after[n][p] != before[n][p]
    }
    expected = {("", "__dict__"): ({"load_record"}, set()), ("model", "__dict__"): ({"forward"}, set())}
    replaced = {
        "int8": ("_modules", {"gate_up_q", "down_q"}),
        "expert cache": ("_buffers", {"cached_gate_up", "cached_down"}),
    }
    if fit in replaced:
        part, names = replaced[fit]
        for i in range(len(model.model.layers)):
            expected[f"model.layers.{i}.mlp.experts", part] = (names, set())
            expected[f"model.layers.{i}.mlp.experts", "_parameters"] = (set(), {"gate_up_proj", "down_proj"})
    assert changed == expected
    if fit == "int8":  # their q, k and v joined into one copy: beside each attention, not on it
        joined = {a for a in decode.JOINED if any(a is m for m in model.modules())}
        assert joined == {layer.self_attn for layer in model.model.layers}


# ---------------------------------------------------------------- the lean decode step
def greedy_logits(model, ids, steps, **extra):
    """The logits of `steps` greedy one-token forwards after the prompt `ids`, through a DynamicCache."""
    with torch.no_grad():
        out = model(ids, use_cache=True, **extra)
        cache, token, logits = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True, **extra)
            token = out.logits[:, -1:].argmax(-1)
            logits.append(out.logits)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 2])
def test_the_lean_step_gives_transformers_logits_bit_for_bit(dtype, batch):
    model = tiny_moe(seed=8).to(dtype)
    register_experts("per_token", per_token_experts)
    model.set_experts_implementation("per_token")
    ids = torch.randint(0, 512, (batch, 7))
    expected = greedy_logits(model, ids, 6)
    calls = []
    model.model.register_forward_hook(lambda *_: calls.append(1))
    assert use_lean_step(model)
    spy = []
    original = decode._plain
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode, "_plain", lambda *a: spy.append(original(*a)) or spy[-1])
        got = greedy_logits(model, ids, 6)
    assert (
        spy == [True] + [False] * 6
    )  # the prompt through transformers' forward, every step through lean_forward
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "weights", [pytest.param("oneDNN packed", marks=needs_bf16_packing), "float32 copy", "int8", "int4"]
)
def test_joined_projections_give_the_same_logits_bit_for_bit(monkeypatch, weights):
    """Where q, k and v are joined into one copy, the lean step's one product gives the logits of their three
    products (transformers' forward, which calls them one by one); a hook on one of them, a projection replaced,
    or a change to a weight after the join, and the three answer one by one, with the logits they give then."""
    from test_quantize import small_mixtral  # widths int4's groups divide

    from helpers.quantize import quantize_model

    model = (small_mixtral(seed=12) if weights.startswith("int") else tiny_moe(seed=12)).bfloat16()
    if weights.startswith("int"):
        quantize_model(model, weights)
    else:
        monkeypatch.setattr(
            fastpath,
            "_kernel_speeds",
            lambda shape, dtype: {k: 2.0 if k == weights else 1.0 for k in KERNELS},
        )
        choose_kernels(model)
        register_experts("per_token", per_token_experts)
        model.set_experts_implementation("per_token")
    assert fastpath.join_projections(model).startswith("one-token steps multiply q, k and v in one product")
    attention = model.model.layers[0].self_attn
    assert all(isinstance(decode.JOINED[layer.self_attn], decode.Fused) for layer in model.model.layers)
    ids = torch.randint(0, 512, (2, 6))

    def transformers_logits(steps):  # every step through transformers' forward: q, k and v one by one
        with monkeypatch.context() as m:
            m.setattr(decode, "_plain", lambda *a: True)
            return greedy_logits(model, ids, steps)

    expected = transformers_logits(5)
    assert use_lean_step(model)
    joined = []
    product = decode.JOINED[attention].product
    monkeypatch.setattr(decode.JOINED[attention], "product", lambda x, c: joined.append(1) or product(x, c))
    assert torch.equal(greedy_logits(model, ids, 5), expected) and len(joined) == 5
    handle = attention.k_proj.register_forward_hook(lambda *_: joined.append("hooked"))
    greedy_logits(model, ids, 1)
    assert joined[5:] == ["hooked"] * 2  # the prompt and the step: k_proj itself, not the joined product
    handle.remove()
    own = attention.v_proj
    attention.v_proj = torch.nn.Sequential(own)  # replaced: the new module answers
    del joined[:]
    assert torch.equal(greedy_logits(model, ids, 2), transformers_logits(2)) and joined == []
    attention.v_proj = own
    with torch.no_grad():  # the joined copy is stale: the projections answer, with the new weight
        (own.packed if weights.startswith("int") else own.weight).mul_(2)
    assert torch.equal(greedy_logits(model, ids, 2), transformers_logits(2)) and joined == []


def test_the_lean_step_steps_aside_for_what_it_does_not_do():
    """Padding, outputs asked for, a hook on a layer: transformers' own forward, and the same answer."""
    model = tiny_moe(seed=9)
    assert use_lean_step(model)
    ids = torch.randint(0, 512, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    seen = []
    original = decode._plain
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode, "_plain", lambda *a: seen.append(original(*a)) or seen[-1])
        with torch.no_grad():
            out = model(ids, attention_mask=mask, use_cache=True)
            model(
                ids[:, :1],
                attention_mask=torch.cat([mask, mask[:, :1]], 1),
                past_key_values=out.past_key_values,
            )
        assert seen[-1] is True  # padding
        greedy_logits(model, ids, 1, output_router_logits=True)
        assert seen[-1] is True
        handle = model.model.layers[1].register_forward_hook(lambda *_: None)
        greedy_logits(model, ids, 1)
        assert seen[-1] is True
        handle.remove()
        greedy_logits(model, ids, 1)
        assert seen[-1] is False


def test_hooks_on_the_modules_the_lean_step_calls_still_fire():
    """Routing records (moe.py) and prefetch hook the routers and norms: the lean step calls those modules."""
    model = tiny_moe(seed=10)
    use_lean_step(model)
    routed, normed = [], []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda m, i, o: routed.append(o[2].tolist()))
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, i: normed.append(1))
    greedy_logits(model, torch.randint(0, 512, (1, 4)), 3)
    assert len(routed) == len(normed) == 2 * 4  # 2 layers, the prompt and 3 steps


def test_the_lean_step_is_not_used_across_devices_or_for_another_architecture(tiny_dense):
    model = tiny_moe(seed=11)
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": "cpu"}
    assert not use_lean_step(model) and "forward" not in vars(model.model)
    assert not use_lean_step(tiny_dense) and "forward" not in vars(
        tiny_dense.model
    )  # a Llama: its own forward


@pytest.mark.parametrize("elsewhere, kept", [(0.0, True), (None, True), (5.0, False)])
def test_figures_measured_while_other_work_held_the_cores_are_not_kept(
    monkeypatch, tmp_path, elsewhere, kept
):
    """Figures taken while other processes kept busy the cores this one needed serve this process only: they
    are not written to measured/, so the next load measures again (and warns); a quiet measurement is kept."""
    monkeypatch.setenv("MIXTRAL_NOTEBOOKS_CACHE", str(tmp_path))
    monkeypatch.setattr(fastpath, "cores_busy_elsewhere", lambda run: (run(), elsewhere))
    monkeypatch.setattr(fastpath, "_BUSY_WARNED", [])
    runs = []

    def measure():
        runs.append(1)
        return {"F.linear": 10.0}

    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert fastpath._once_per_machine("probe", ["a key"], measure) == {"F.linear": 10.0}
        said = any("not kept" in str(w.message) for w in caught)
        assert said == (not kept and not runs[1:])  # said once per process, at the first busy measurement
    assert len(runs) == (1 if kept else 2)  # kept: the second call reads the file
    assert len(list((tmp_path / "measured").glob("probe-*.json"))) == (1 if kept else 0)


# ---------------------------------------------------------------- one token's step as one graph
def counting(calls: list, make_layer=None):
    """A `make_layer` for use_graph_step that runs each layer's step as `make_layer` makes it (default: as
    decode.graph_layer writes it, uncompiled) and counts its calls."""

    def make(decoder, plan):
        layer = (make_layer or decode.graph_layer)(decoder, plan)
        return lambda *args: calls.append(1) or layer(*args)

    return make


def static_greedy(model, ids, steps: int, **extra):
    """generate's greedy answer to `ids` on a static cache: (new tokens, each step's logits [B, steps, V])."""
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, cache_implementation="static",
                             output_logits=True, return_dict_in_generate=True, **extra)  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1)


@pytest.mark.parametrize("experts", ["eager", "per_token"])
def test_the_graph_step_is_transformers_arithmetic(experts):
    """The step written as one function (decode.graph_step), run as it is in float32, gives transformers' tokens and
    logits on a static cache, and runs every step after the prompt. A sign flipped in the rotation, heads grouped
    the wrong way or the experts' weights not renormalized make it fail."""
    model = tiny_moe(seed=12)
    register_experts("per_token", per_token_experts)
    model.set_experts_implementation(experts)
    ids = torch.randint(0, 512, (1, 6))
    expected, expected_logits = static_greedy(model, ids, 8)
    calls = []
    assert decode.use_graph_step(model, counting(calls))
    got, logits = static_greedy(model, ids, 8)
    # the first new token comes from the prompt's forward; then every layer of each step
    assert len(calls) == 7 * len(model.model.layers)
    assert torch.equal(got, expected)
    assert (logits - expected_logits).abs().max() <= 1e-5 * expected_logits.abs().max()


@needs_our_kernel
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_graph_step_multiplies_quantized_weights_by_our_kernel(scheme, monkeypatch):
    """int8 and int4 weights held for our kernel go through the graph by its operators: the same tokens as the
    quantized model's own steps, logits as close as float32's rounding allows; held for torch's kernel, the graph
    does not apply."""
    from helpers.quantize import quantize_model

    ids = torch.randint(0, 512, (1, 6))
    for kernel in ("ours", "torch"):
        monkeypatch.setenv(QUANT_KERNEL_ENV, kernel)
        model = tiny_moe(seed=15, intermediate=64)  # int4's groups of 32 inputs
        quantize_model(model, scheme)
        expected, expected_logits = static_greedy(model, ids, 8)
        calls = []
        assert decode.use_graph_step(model, counting(calls)) == (kernel == "ours")
        if kernel == "ours":
            got, logits = static_greedy(model, ids, 8)
            assert len(calls) == 7 * len(model.model.layers) and torch.equal(got, expected)
            # float32's rounding, which can move an activation's int16 rounding (the kernel's input) by one step:
            # 1/32767 of the token's largest
            assert (logits - expected_logits).abs().max() <= 1e-4 * expected_logits.abs().max()


def dense_on_our_kernel(model, down: bool = True):
    """`model` with every kind of dense weight measured fastest by our kernel (but the experts' down_proj unless
    `down`), on the per_token experts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            fastpath,
            "_kernel_speeds",
            lambda shape, dtype: {k: 2.0 if k == "our kernel" else 1.0 for k in KERNELS},
        )
        choose_kernels(model)
    if not down:
        for layer in model.model.layers:
            kinds = fastpath._EXPERT_KERNELS[layer.mlp.experts]
            kinds["down_proj"] = ("F.linear", None, kinds["down_proj"][2])
    register_experts("per_token", per_token_experts)
    model.set_experts_implementation("per_token")
    return model


@needs_our_kernel
@pytest.mark.parametrize(
    "dtype, down", [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)], ids=str
)
def test_the_graph_step_multiplies_dense_weights_by_our_kernel_where_it_was_chosen(dtype, down):
    """Where the fast path measured our kernel fastest for a kind of dense weight, the graph step multiplies it by
    its operators (dense_matmul, dense_experts, counted by the profiler), and only those kinds (the mapping the
    fast path hands the step, `experts_on_our_kernel`), and gives the lean step's tokens, logits to the dtype's
    rounding (the same products, summed in another order)."""
    from torch.profiler import ProfilerActivity, profile

    model = dense_on_our_kernel(tiny_moe(seed=17).to(dtype), down)
    ids = torch.randint(0, 512, (1, 6))
    expected, expected_logits = static_greedy(model, ids, 8)
    calls = []
    assert decode.use_graph_step(model, counting(calls), fastpath.experts_on_our_kernel())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got, logits = static_greedy(model, ids, 8)
    ran = {e.key: e.count for e in prof.key_averages()}
    layers = len(model.model.layers)
    # 7 steps through the graph (the prompt's forward gives the first token); the prompt's 6 tokens are too many
    # for any kernel of the fast path, so every call of dense_experts is the graph's
    # gate_up, and down where chosen
    assert ran["mixtral_notebooks::dense_experts"] == 7 * layers * (1 + down)
    assert ran["mixtral_notebooks::dense_matmul"] >= 7 * 4 * layers  # q, k, v, o
    assert len(calls) == 7 * layers and torch.equal(got, expected)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (logits - expected_logits).abs().max() <= tolerance * expected_logits.abs().max()


@needs_our_kernel
def test_one_compiled_layer_serves_every_layer_held_alike():
    """The compiler gets one layer's step per way the layers hold their weights, not one per layer: once for the
    layers held alike, once more for the one layer whose down_proj the fast path left off our kernel; each step
    then calls them once per layer and gives the lean step's tokens."""
    model = dense_on_our_kernel(tiny_moe(seed=18))
    kinds = fastpath._EXPERT_KERNELS[model.model.layers[1].mlp.experts]
    kinds["down_proj"] = ("F.linear", None, kinds["down_proj"][2])
    ids = torch.randint(0, 512, (1, 6))
    expected = static_greedy(model, ids, 5)[0]
    made, calls = [], []
    assert decode.use_graph_step(model, lambda *held: made.append(1) or counting(calls)(*held),
                                 fastpath.experts_on_our_kernel())  # fmt: skip
    assert torch.equal(static_greedy(model, ids, 5)[0], expected)
    assert len(made) == 2 and len(calls) == 4 * len(model.model.layers)


def test_the_graph_step_reads_a_weight_replaced_between_sequences():
    """The step reads each layer's tensors at a sequence's first step: a weight replaced after one sequence is the
    one the next sequence is multiplied by (here, as a twin model with the same weight replaced answers)."""
    import copy

    model = tiny_moe(seed=19)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 512, (1, 6))
    calls = []
    assert decode.use_graph_step(model, counting(calls))
    static_greedy(model, ids, 3)
    new = torch.nn.Parameter(torch.randn_like(model.model.layers[0].self_attn.o_proj.weight))
    for m in (model, twin):
        m.model.layers[0].self_attn.o_proj.weight = new
    got, logits = static_greedy(model, ids, 6)
    expected, expected_logits = static_greedy(twin, ids, 6)
    assert torch.equal(got, expected) and len(calls) == (2 + 5) * len(model.model.layers)
    assert (logits - expected_logits).abs().max() <= 1e-5 * expected_logits.abs().max()


def test_the_graph_step_steps_aside_for_what_it_does_not_run():
    """Two sequences, a dynamic cache, a hook on a module it reads (in a layer or outside), router logits asked for,
    experts replaced: the lean step or transformers' own forward, and the same answer."""
    model = tiny_moe(seed=13)
    ids = torch.randint(0, 512, (2, 5))
    expected = static_greedy(model, ids, 3)[0]
    calls = []
    assert decode.use_graph_step(model, counting(calls))
    assert torch.equal(static_greedy(model, ids, 3)[0], expected) and not calls  # two sequences
    greedy_logits(model, ids[:1], 2)  # a dynamic cache: the lean step
    handle = model.model.layers[0].mlp.gate.register_forward_hook(lambda *_: None)
    static_greedy(model, ids[:1], 3)
    handle.remove()
    handle = model.model.embed_tokens.register_forward_hook(lambda *_: None)  # read outside the layers
    static_greedy(model, ids[:1], 3)
    handle.remove()
    static_greedy(model, ids[:1], 3, output_router_logits=True)
    register_experts(
        "replaced", per_token_experts
    )  # as quantized or cached experts are: weights held elsewhere
    model.set_experts_implementation("replaced")
    static_greedy(model, ids[:1], 3)
    assert not calls
    model.set_experts_implementation("eager")
    static_greedy(model, ids[:1], 3)
    assert len(calls) == 2 * len(model.model.layers)


def test_the_graph_step_is_kept_only_where_it_is_faster(monkeypatch):
    """choose_step keeps the graph where its median step takes under MARGIN of the lean step's and its logits agree,
    and otherwise puts the lean step back."""
    model = tiny_moe(seed=14)
    ids = [1, 7, 9]
    slow = lambda *held: lambda *a: time.sleep(0.02) or decode.graph_layer(*held)(*a)  # noqa: E731
    monkeypatch.setattr(fastpath, "step_candidates", lambda model, compiled: {"compiled": slow})
    figures = fastpath.choose_step(model, ids, tokens=4)
    assert not figures["kept"] and figures["graph_ms"] > figures["lean_ms"] and figures["top1"] == 4
    assert model.model.forward.__func__ is decode.lean_forward
    monkeypatch.setattr(fastpath, "step_candidates", lambda model, compiled: {"compiled": decode.graph_layer})
    monkeypatch.setattr(fastpath, "MARGIN", 100.0)  # the graph run as it is: kept whatever the clock says
    figures = fastpath.choose_step(model, ids, tokens=4)
    assert figures["kept"] and figures["difference"] <= 1e-5 and figures["tokens"] == 4
    assert (
        "written layer by layer"
        in fastpath.Recipe("cpu", torch.float32, "eager", (), step=figures).describe()
    )


# ---------------------------------------------------------------- our layer operator (decode.native_layer)
@needs_our_kernel
@pytest.mark.parametrize("held", ["float32", "bfloat16", "int8", "int4"])
def test_our_layer_operator_gives_the_models_tokens(held, monkeypatch):
    """The step by our operator layer_step, one call a layer, gives the tokens of the model's own steps (transformers'
    forward on a static cache), logits to the dtype's and the kernels' rounding; a sign flipped in its rotation, a
    head grouped with the wrong keys or the experts' weights not renormalized make it fail."""
    from helpers.quantize import quantize_model

    monkeypatch.setenv(QUANT_KERNEL_ENV, "ours")
    model = tiny_moe(seed=21, intermediate=64)  # int4's groups of 32 inputs
    if held in ("int8", "int4"):
        quantize_model(model, held)
    else:
        model = model.to(getattr(torch, held))
    ids = torch.randint(0, 512, (1, 6))
    expected, expected_logits = static_greedy(model, ids, 8)
    ours = fastpath.experts_on_our_kernel()
    assert decode.native_reads(model, ours)
    calls = []
    assert decode.use_graph_step(model, counting(calls, decode.native_layer), ours)
    got, logits = static_greedy(model, ids, 8)
    assert len(calls) == 7 * len(model.model.layers) and torch.equal(got, expected)
    # float32: other orders of the same sums; int8 and int4: an activation's int16 rounding moved by one step;
    # bf16: a value rounded to bf16 one place apart
    tolerance = {"float32": 1e-5, "bfloat16": 3e-2}.get(held, 1e-4)
    assert (logits - expected_logits).abs().max() <= tolerance * expected_logits.abs().max()


@needs_our_kernel
@pytest.mark.parametrize("held", ["bfloat16", "int8"])
def test_our_operator_takes_every_layer_in_one_call(held, monkeypatch):
    """Where the layers are our operator's, one call of layers_step takes a step through all of them: the same
    tokens and logits as layer_step's call a layer."""
    from helpers.quantize import quantize_model

    monkeypatch.setenv(QUANT_KERNEL_ENV, "ours")
    model = tiny_moe(seed=24, intermediate=64)
    if held == "int8":
        quantize_model(model, held)
    else:
        model = model.to(torch.bfloat16)
    ids, ours = torch.randint(0, 512, (1, 6)), fastpath.experts_on_our_kernel()
    per_layer = []
    assert decode.use_graph_step(model, counting(per_layer, decode.native_layer), ours)
    expected, expected_logits = static_greedy(model, ids, 6)
    whole = []

    def make_layer(decoder, plan):  # no call a layer, but every layer at once
        raise AssertionError("a layer made one by one")

    def all_layers(decoder, inputs):
        layers = decode.native_layers(decoder, inputs)
        return lambda *args: whole.append(1) or layers(*args)

    make_layer.all_layers = all_layers
    assert decode.use_graph_step(model, make_layer, ours)
    got, logits = static_greedy(model, ids, 6)
    assert len(whole) == 5 and len(per_layer) == 5 * len(model.model.layers)  # the steps after the prompt's
    assert torch.equal(got, expected) and torch.equal(logits, expected_logits)  # the same calls, in one
    assert decode.native_layer.all_layers is decode.native_layers  # what the fast path's race runs


@needs_our_kernel
def test_layers_step_takes_each_layers_own_plan_and_refuses_before_it_writes(monkeypatch):
    """layers_step with a dense layer then an int8 one (9 and 15 tensors) gives what two layer_step calls give, bit for
    bit, caches and lengths too; lists that do not match the plans, or one layer's bad input, are refused before any
    layer writes its cache or advances its length."""
    import copy

    from helpers.quantize import quantize_model

    monkeypatch.setenv(QUANT_KERNEL_ENV, "ours")
    dense = tiny_moe(seed=25, intermediate=64)
    int8 = copy.deepcopy(dense)
    quantize_model(int8, "int8")
    ours = fastpath.experts_on_our_kernel()
    layers = [decode._layers_inputs(m.model, ours)[i] for i, m in enumerate((dense, int8))]
    each = [[*w[0], *(x for held in w[1:] for x in held)] for _, w in layers]
    plans = [[decode._CODES[how] for how in plan] for plan, _ in layers]
    assert [len(t) for t in each] == [9, 15] and plans == [[0] * 6, [8] * 6]
    config, ops = dense.config, fastpath.operators()
    shape, constants = [4, 2, 4, 2], [config.rms_norm_eps, dense.model.layers[0].self_attn.scaling, 1.0]
    h, visible, inv_freq = torch.randn(32), torch.arange(10) <= 3, dense.model.rotary_emb.inv_freq

    def state():  # each layer's length, keys and values, at position 3 of 10
        keys = [torch.randn(1, 2, 10, 8) for _ in range(2)]
        return [torch.tensor(3), torch.tensor(3)], keys, [k + 1 for k in keys]

    lengths, keys, values = state()
    expected = [[t.clone() for t in group] for group in (lengths, keys, values)]
    one = h
    for i in range(2):
        one = ops.layer_step(one, expected[0][i], visible, inv_freq, expected[1][i], expected[2][i],
                             each[i], plans[i], shape, constants)  # fmt: skip
    out = ops.layers_step(h, lengths, visible, inv_freq, keys, values, each[0] + each[1], plans[0] + plans[1],
                          shape, constants)  # fmt: skip
    assert torch.equal(out, one)
    assert all(
        torch.equal(a, b) for got, want in zip((lengths, keys, values), expected) for a, b in zip(got, want)
    )
    assert [int(n) for n in lengths] == [4, 4]
    lengths, keys, values = state()
    before = [[t.clone() for t in group] for group in (lengths, keys, values)]
    tensors, codes = each[0] + each[1], plans[0] + plans[1]
    with pytest.raises(
        ValueError, match="layers_step: .* plan codes: give each layer's length, keys and values"
    ):
        ops.layers_step(h, lengths, visible, inv_freq, keys[:1], values[:1], tensors, codes, shape, constants)
    with pytest.raises(ValueError, match="layers_step: 23 weights where the plans hold 24"):
        ops.layers_step(h, lengths, visible, inv_freq, keys, values, tensors[:-1], codes, shape, constants)
    with pytest.raises(ValueError, match="layers_step: 25 weights where the plans hold 24"):
        ops.layers_step(h, lengths, visible, inv_freq, keys, values, [*tensors, h], codes, shape, constants)
    with pytest.raises(
        IndexError, match="position 10 is past the cache's 10"
    ):  # the second layer's, checked first
        ops.layers_step(h, [lengths[0], torch.tensor(10)], visible, inv_freq, keys, values, tensors, codes,
                        shape, constants)  # fmt: skip
    assert all(
        torch.equal(a, b) for got, want in zip((lengths, keys, values), before) for a, b in zip(got, want)
    )


@needs_our_kernel
def test_our_layer_operator_refuses_what_it_cannot_read():
    """Bad input to layer_step is refused with what was wrong and what to give (not a crash in the kernel), and
    native_reads says no for a dense weight our kernel cannot read in place (a transposed view)."""
    ops = fastpath.operators()
    model = tiny_moe(seed=22)
    layer, config = model.model.layers[0], model.config
    plan, weights = decode._layer_inputs(layer, frozenset())
    tensors = [*weights[0], *(t for held in weights[1:] for t in held)]
    key = torch.zeros(1, 2, 10, 8)
    args = dict(h=torch.randn(32), length=torch.tensor(3), visible=torch.arange(10) <= 3,
                inv_freq=model.model.rotary_emb.inv_freq, key=key, value=key.clone())  # fmt: skip
    shape, constants = [4, 2, 4, 2], [config.rms_norm_eps, layer.self_attn.scaling, 1.0]
    out = ops.layer_step(*args.values(), tensors, [0] * 6, shape, constants)
    assert out.shape == (32,) and int(args["length"]) == 4 and key[0, :, 3].abs().sum() > 0  # written at 3
    with pytest.raises(ValueError, match="plan .*: each product 0 \\(dense\\), 8 \\(int8\\) or 4"):
        ops.layer_step(*args.values(), tensors, [0, 0, 0, 0, 0, 3], shape, constants)
    with pytest.raises(ValueError, match="weights for a plan that holds 9"):
        ops.layer_step(*args.values(), tensors[:-1], [0] * 6, shape, constants)
    with pytest.raises(ValueError, match="o_proj weights .*: give float32 or bfloat16 weights, contiguous"):
        ops.layer_step(
            *args.values(), [*tensors[:6], tensors[6].t(), *tensors[7:]], [0] * 6, shape, constants
        )
    with pytest.raises(ValueError, match="keys .*: give the static cache's"):
        ops.layer_step(*{**args, "key": key.double()}.values(), tensors, [0] * 6, shape, constants)
    with pytest.raises(IndexError, match="position 10 is past the cache's 10"):
        ops.layer_step(*{**args, "length": torch.tensor(10)}.values(), tensors, [0] * 6, shape, constants)
    for bad in (
        [4, 3, 4, 2],
        [4, 0, 4, 2],
        [4, 2, 4, 5],
        [4, 2, 0, 2],
    ):  # heads not in groups; more chosen than held
        with pytest.raises(ValueError, match="give \\[heads, kv heads, experts, experts per token\\]"):
            ops.layer_step(*args.values(), tensors, [0] * 6, bad, constants)
    with pytest.raises(ValueError, match="the head size must be even"):
        odd = torch.zeros(1, 2, 10, 7)
        ops.layer_step(
            *{**args, "key": odd, "value": odd.clone()}.values(), tensors, [0] * 6, shape, constants
        )
    with pytest.raises(
        ValueError, match="h .*: give one token's hidden state \\[D\\], float32 or bfloat16, contiguous"
    ):
        ops.layer_step(*{**args, "h": torch.randn(64)[::2]}.values(), tensors, [0] * 6, shape, constants)
    assert decode.native_reads(model)
    register_experts(
        "replaced", per_token_experts
    )  # experts held elsewhere (an expert cache): not ours to read
    model.set_experts_implementation("replaced")
    assert not decode.native_reads(model)
    model.set_experts_implementation("eager")
    layer.self_attn.o_proj.weight = torch.nn.Parameter(layer.self_attn.o_proj.weight.t().contiguous().t())
    assert not decode.native_reads(model)


def test_our_layer_operator_is_no_candidate_for_a_dense_model(tiny_dense):
    """A model that is not a Mixtral has no step written layer by layer: our operator is no candidate, and choose_step
    answers that none applies instead of failing."""
    assert not decode.native_reads(tiny_dense)
    assert fastpath.choose_step(tiny_dense, [1, 5, 9], tokens=2) == {}  # nothing to race
    assert fastpath.choose_step(tiny_dense, [1, 5, 9], tokens=2, compiled=True) == dict(kept=False, tokens=0)


@needs_our_kernel
def test_choose_step_races_our_operator_and_the_graph(monkeypatch):
    """Where our kernels run, choose_step races our layer operator and torch.compile's graph (here run uncompiled)
    against the lean step, keeps the faster one that agrees (raced first, so the model is switched back to it), and
    describe names what was raced and kept."""
    monkeypatch.setattr(
        fastpath, "compiled_layer", lambda *held: lambda *a: time.sleep(0.01) or decode.graph_layer(*held)(*a)
    )
    ours = []
    monkeypatch.setattr(fastpath, "native_layer", counting(ours, decode.native_layer))
    monkeypatch.setattr(fastpath, "MARGIN", 100.0)  # kept whatever the clock says: the faster of the two
    model = tiny_moe(seed=23)
    figures = fastpath.choose_step(model, [1, 7, 9], tokens=4, compiled=True)
    ours.clear()
    static_greedy(model, torch.tensor([[1, 7, 9]]), 3)
    assert len(ours) == 2 * len(model.model.layers)  # the steps after the prompt's, by our operator
    assert (
        set(figures["candidates"]) == {"ours", "compiled"} and figures["kept"] and figures["step"] == "ours"
    )
    assert figures["candidates"]["ours"]["difference"] <= 1e-5 and figures["candidates"]["ours"]["top1"] == 4
    said = fastpath.Recipe("cpu", torch.float32, "eager", (), step=figures).describe()
    assert "our layer operator" in said and "torch.compile's graph" in said
    assert said.endswith("-> our layer operator, for one sequence at a time")


@pytest.mark.slow
@needs_our_kernel
@pytest.mark.parametrize("scheme", ["int8", "int4", "dense"])
def test_torch_compile_takes_our_kernels_into_one_graph(scheme, monkeypatch):
    """torch.compile(fullgraph=True) traces the int8, int4 and dense steps through our kernels' operators (no graph
    break) and gives the uncompiled graph's tokens."""
    from helpers.quantize import quantize_model

    monkeypatch.setenv(QUANT_KERNEL_ENV, "ours")
    model = tiny_moe(seed=16, intermediate=64)  # int4's groups of 32 inputs
    if scheme == "dense":
        dense_on_our_kernel(model)
    else:
        quantize_model(model, scheme)
    ours = fastpath.experts_on_our_kernel()
    ids = torch.randint(0, 512, (1, 5))
    calls = []
    decode.use_graph_step(model, counting(calls), ours)
    expected, expected_logits = static_greedy(model, ids, 6)
    assert decode.use_graph_step(model, decode.compiled_layer, ours)
    got, logits = static_greedy(model, ids, 6)
    assert torch.equal(got, expected) and len(calls) == 5 * len(model.model.layers)
    assert (logits - expected_logits).abs().max() <= 1e-3 * expected_logits.abs().max()


@pytest.mark.slow
def test_a_compiled_step_is_measured_at_load_and_answers(tiny_mixtral_dir):
    """load_pipeline(compiled=True) compiles the step with torch.compile, measures it against the lean step, says
    so in describe, and the answer comes either way (a tiny model's graph may well lose to its lean step)."""
    from helpers import generate

    pipe = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32, compiled=True)
    figures = pipe.model.load_record.recipe.step
    assert figures["tokens"] == 16 and figures["compile_s"] > 0 and figures["difference"] <= 1e-3
    assert "written layer by layer" in describe(pipe, detail=True)
    answer = generate(pipe, "Hello", max_new_tokens=5, do_sample=False)
    assert answer.new_tokens == 5
    with pytest.raises(ValueError, match="leave fast=True"):
        load_pipeline(str(tiny_mixtral_dir), fast=False, compiled=True)


@needs_our_kernel
def test_every_load_races_our_operator_and_compiles_nothing(monkeypatch, tiny_mixtral_dir):
    """Where our kernels run and read the weights where they are held, load_pipeline races our layer operator against
    the lean step at every load, on the poem's prompt, without torch.compile's graph (raced only where compiled=True);
    describe says what it measured and kept."""
    monkeypatch.setattr(
        fastpath, "compiled_layer", lambda *held: pytest.fail("compiled=False compiled the step")
    )
    pipe = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)
    figures = pipe.model.load_record.recipe.step
    assert set(figures["candidates"]) == {"ours"} and figures["tokens"] == 16 and figures["compile_s"] == 0.0
    assert figures["candidates"]["ours"]["difference"] <= 1e-3
    assert "our layer operator" in describe(pipe, detail=True)
    assert "torch.compile's graph" not in describe(pipe, detail=True)


@needs_our_kernel
def test_a_load_races_without_a_chat_template_and_survives_a_failed_race(monkeypatch, tiny_mixtral_dir):
    """A tokenizer without a chat template races on the poem's plain text; a candidate that fails its race is left out
    with a warning and the load goes on, on the lean step; weights held for torch's int8 kernel leave nothing to race."""
    import helpers.loading as loading
    from helpers import generate
    from helpers.quantize import quantize_model

    plain = loading.reference_tokenizer

    def templateless(vocab):
        tokenizer = plain(vocab)
        tokenizer.chat_template = None
        return tokenizer

    monkeypatch.setattr(loading, "reference_tokenizer", templateless)
    pipe = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)
    assert pipe.model.load_record.recipe.step["tokens"] == 16

    def broken(*held):
        def layer(*args):
            raise RuntimeError("a layer that fails")

        return layer

    monkeypatch.setattr(fastpath, "native_layer", broken)
    with pytest.warns(
        UserWarning, match="our layer operator failed its race at load and is not used: a layer"
    ):
        pipe = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)
    assert pipe.model.load_record.recipe.step == dict(kept=False, tokens=0)
    assert pipe.model.model.forward.__func__ is decode.lean_forward
    assert generate(pipe, "Hello", max_new_tokens=3, do_sample=False).new_tokens == 3
    monkeypatch.setenv(QUANT_KERNEL_ENV, "torch")
    model = tiny_moe(seed=24, intermediate=64)
    quantize_model(model, "int8")
    assert not decode.native_reads(model) and fastpath.step_candidates(model) == {}


def test_one_sequence_decodes_through_the_kept_graph(monkeypatch, tiny_mixtral_dir):
    """Where the graph was kept, generate runs one sequence on a static cache, so through the graph; a batch stays
    on the lean step."""
    from helpers import generate, generate_batch

    pipe = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)
    calls = []
    monkeypatch.setattr(fastpath, "step_candidates", lambda model, compiled: {"compiled": counting(calls)})
    monkeypatch.setattr(fastpath, "MARGIN", 100.0)
    pipe.model.load_record.recipe.step = fastpath.choose_step(pipe.model, [1, 5, 9], tokens=3)
    assert pipe.model.load_record.recipe.step["kept"]
    calls.clear()
    answer = generate(pipe, "Hello", max_new_tokens=6, do_sample=False)
    steps = 5 * len(pipe.model.model.layers)
    assert len(calls) == steps and "cache_implementation" not in answer.settings  # the knobs as asked
    generate_batch(pipe, ["Hello", "Good morning"], max_new_tokens=4, do_sample=False)
    assert len(calls) == steps


# ---------------------------------------------------------------- the fast path's sampler
def transformers_warpers(temperature, top_k, top_p):
    """The warpers generate builds for these knobs, in its order."""
    from transformers.generation import logits_process as lp

    return lp.LogitsProcessorList(
        [lp.TemperatureLogitsWarper(temperature)] * (temperature != 1.0)
        + [lp.TopKLogitsWarper(top_k)] * bool(top_k)
        + [lp.TopPLogitsWarper(top_p)] * (top_p < 1.0)
    )


@pytest.mark.parametrize("temperature", [0.8, 1.0, 1.7])
@pytest.mark.parametrize("top_k", [1, 5, 20, 600])
@pytest.mark.parametrize("top_p", [0.3, 0.95, 1.0])
def test_the_sampler_gives_transformers_scores(temperature, top_k, top_p):
    """The scores generate draws from are transformers' warpers' own, -inf and all, on rows of every spread (a
    top-p reached by one token, by a few, by all k), on rows where scores tie with the k-th, and on rows already
    masked to fewer than k finite scores."""
    generator = torch.Generator().manual_seed(top_k)
    spread = torch.tensor([0.3, 1.0, 3.0, 8.0])[:, None].repeat_interleave(50, 0)  # [200, 1]
    rows = torch.randn(200, 500, generator=generator) * spread
    ties = rows.round()  # many tokens share the k-th score: more than k kept
    masked = rows.masked_fill(
        torch.rand(rows.shape, generator=generator) < 0.99, float("-inf")
    )  # ~5 finite a row
    ids = torch.zeros(len(rows), 1, dtype=torch.long)
    ours, theirs = (
        fastpath.TopKTopP(temperature, top_k, top_p),
        transformers_warpers(temperature, top_k, top_p),
    )
    for scores in (rows, ties, masked):
        assert torch.equal(ours(ids, scores), theirs(ids, scores))


def test_the_sampler_replaces_only_top_k_sampling():
    knobs = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.95)
    fast = fastpath.sampler(knobs)
    assert fast["temperature"] == 1.0 and fast["top_k"] == 0 and fast["top_p"] == 1.0
    assert [type(p) for p in fast["logits_processor"]] == [fastpath.TopKTopP] and knobs["top_k"] == 20
    beams, other = dict(knobs, num_beams=2), dict(knobs, logits_processor=[])
    for plain in (dict(knobs, do_sample=False), dict(knobs, top_k=0), beams, other):
        assert (
            fastpath.sampler(plain) is plain
        )  # beams or another processor: generate's own warpers, in its order


def test_a_seed_samples_the_same_tokens_as_transformers_warpers(monkeypatch, tiny_mixtral_dir):
    """The fast path's sampler draws the tokens transformers' warpers draw, with the same scores kept; the blog's
    plain pipeline keeps transformers' own."""
    import helpers.backends as backends
    from helpers import generate
    from helpers.prompts import chat_ids

    pipe = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)
    plain = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32, fast=False)
    local = backends.as_backend(pipe)
    chat = [chat_ids(local.tokenizer, [{"role": "user", "content": "Hello"}])]
    knobs = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.95)
    answers, calls, call = {}, [], fastpath.TopKTopP.__call__
    monkeypatch.setattr(fastpath.TopKTopP, "__call__", lambda self, *a: calls.append(1) or call(self, *a))
    for name in ("fast", "transformers"):
        if name == "transformers":
            monkeypatch.setattr(backends, "sampler", lambda knobs: knobs)
        answers[name] = [local.run(chat, knobs, seed=seed, keep_scores=True)[0] for seed in range(4)]
    assert len(calls) == 4 * 12  # each new token's scores, by the fast path's sampler, in the fast runs only
    for fast, theirs in zip(answers["fast"], answers["transformers"]):
        assert fast.token_ids == theirs.token_ids and torch.equal(fast.scores, theirs.scores)
        assert fast.settings == dict(knobs, seed=fast.settings["seed"])  # the knobs as asked
    assert len({tuple(a.token_ids) for a in answers["fast"]}) > 1  # seeds that differ sample differently
    monkeypatch.setattr(
        backends, "sampler", lambda knobs: pytest.fail("the blog's path sampled by the fast path")
    )
    generate(plain, "Hello", max_new_tokens=3, seed=0)
