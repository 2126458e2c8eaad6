"""Weight-only int8 and int4 (helpers/quantize.py): what is quantized, how close it stays, the knob and
its refusals. int8's quality on the stand-in over the shipped text is asserted where it is measured,
in 10_quantization, which nbval re-executes."""

from types import SimpleNamespace

import pytest
import torch

from helpers import Fit, describe, load_pipeline, parameter_count
from helpers.data import ENDPOINT_ENV, QUANT_KERNEL_ENV
from helpers.experts import token_loop
from helpers.quantize import (
    GROUP,
    check_scheme,
    compare_logits,
    kernel_speeds,
    quantize_model,
    quantized_experts,
    quantized_linear,
)
from helpers.quant_kernel import relayout8


def small_mixtral(seed=0):
    """A random Mixtral whose widths int4's groups divide (hidden 128, FFN 192), tied lm_head like the stand-in's."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return MixtralForCausalLM(config).eval()


# ---------------------------------------------------------------- one quantized matrix
# each scheme by each of its kernels on purpose: which one a load takes is measured, and differs by CPU kind
KERNELS = [("int8", "torch"), ("int8", "ours"), ("int4", "torch"), ("int4", "ours")]


@pytest.mark.parametrize("scheme, kernel", KERNELS)
def test_a_quantized_matrix_multiplies_like_its_rounded_weights(scheme, kernel):
    torch.manual_seed(0)
    w, x = torch.randn(256, 192), torch.randn(3, 192)
    layer = quantized_linear()(w, scheme, kernel)
    if scheme == "int8":  # the rounded weights, rebuilt from the int8 values and their scales
        values = quantized_linear()(w, scheme).packed  # ours holds the same values, re-laid in blocks
        if kernel == "ours":
            assert torch.equal(layer.packed, relayout8(values)) and layer.input_dtype == torch.float32
        rebuilt = values.float() * layer.scales.float()[:, None]
        step = w.abs().amax(1, keepdim=True) / 127
    else:  # int4 is packed for the kernel: rebuild it by multiplying the identity
        rebuilt = layer(torch.eye(192)).T.float()
        step = (w.reshape(256, -1, GROUP).amax(-1) - w.reshape(256, -1, GROUP).amin(-1)).repeat_interleave(
            GROUP, 1
        ) / 15
    # each weight lands within half a step of itself, give or take bf16's rounding (scales, the kernel's output)
    assert ((rebuilt - w).abs() <= step * (0.5 + 2**-8) + rebuilt.abs() * 2**-8).all()
    expected = x.bfloat16().float() @ rebuilt.T
    torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))
    assert layer(x).dtype == torch.float32 and layer(x.bfloat16()).dtype == torch.bfloat16


def test_int4_refuses_shapes_its_kernel_cannot_take():
    for shape, kernel, words in [
        ((16, GROUP + 8), "torch", f"int4 needs inputs in groups of {GROUP}"),  # inputs not in whole groups
        ((16, GROUP + 8), "ours", f"int4 needs inputs in groups of {GROUP}"),
        ((8, GROUP), "torch", "torch's int4 kernel needs outputs in multiples of 16"),  # ours takes them
    ]:
        with pytest.raises(ValueError, match=words + ".*Fit.quantized\\('int8'\\)"):
            quantized_linear()(torch.randn(*shape), "int4", kernel)
    assert quantized_linear()(torch.randn(8, GROUP), "int4", "ours").packed.shape == (2, 1, 4, 16)


def test_kernel_speeds_times_each_kernel_and_skips_int4_where_groups_do_not_fit(monkeypatch):
    from helpers import quantize

    monkeypatch.setattr(
        quantize, "kernel_unavailable", lambda: ""
    )  # our kernel's row, wherever it runs or not
    zeros = lambda x, q, s: torch.zeros(len(x), 4 * q.shape[-4])  # noqa: E731
    monkeypatch.setattr(quantize, "operators", lambda: SimpleNamespace(int8_matmul=zeros, int4_matmul=zeros))
    speeds = kernel_speeds(n=256, k=128, repeats=2, total=2**20)
    assert list(speeds) == [
        "fp32 F.linear",
        "bf16 F.linear",
        "int8, fp32 activations",
        "int8, bf16 activations",
        "int8, our kernel",
        "int4, bf16 activations",
        "int4, our kernel",
    ]
    assert all(s["microseconds"] > 0 and s["gb_s"] > 0 for s in speeds.values())
    # each kind cycles over enough distinct matrices to fill the buffer: 1 MiB of 128 KiB fp32 matrices is 8 of them;
    # the bytes count the scales (int8: one fp32 or bf16 per row of 128, 1.031 or 1.016 bytes a weight; int4: 0.625
    # with a scale and a zero per 32), so int4 needs 52 matrices of 20 KiB, not 64 of 16 KiB
    assert [s["matrices"] for s in speeds.values()] == [8, 16, 32, 32, 32, 52, 52]
    assert [s["mib"] for s in speeds.values()][:2] == [1, 1] and all(
        1 < s["mib"] < 1.04 for s in list(speeds.values())[2:]
    )
    speeds = kernel_speeds(n=64, k=48, repeats=1, total=2**16)
    assert "int4, bf16 activations" not in speeds and "int8, our kernel" in speeds  # 48 = 3 x 16, 64 = 16 x 4
    assert "int8, our kernel" not in kernel_speeds(
        n=64, k=40, repeats=1, total=2**16
    )  # our blocks: 16 inputs


def test_kernel_speeds_reads_more_than_the_last_level_cache_by_default(monkeypatch):
    from helpers import quantize
    from helpers.hardware import last_level_cache_bytes

    assert last_level_cache_bytes() >= 2**20  # this machine reports one, or the 32 MiB default
    assert quantize.timing_buffer_bytes() >= max(2 * last_level_cache_bytes(), 256 * 2**20)
    monkeypatch.setattr(
        quantize, "timing_buffer_bytes", lambda: 2**18
    )  # the default is used when none is given
    assert all(0.25 <= s["mib"] < 0.26 for s in kernel_speeds(n=64, k=64, repeats=1).values())


# ---------------------------------------------------------------- a whole model
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("scheme, kernel", KERNELS)
def test_quantize_model_covers_every_matrix_a_token_reads(scheme, kernel, dtype, monkeypatch):
    monkeypatch.setenv(QUANT_KERNEL_ENV, kernel)
    agreement = 0.95 if scheme == "int8" else 0.6
    model = small_mixtral().to(dtype)
    reference = small_mixtral().to(dtype)
    report = quantize_model(model, scheme)
    assert report["kernel"] == kernel and all(
        m.kernel == kernel for m in model.modules() if hasattr(m, "packed")
    )
    counts = parameter_count(model.config)
    # attention, every expert and lm_head (tied: the embeddings' size); embeddings, norms and routers stay
    assert report["parameters"] == counts["attention"] + counts["experts"] + counts["embeddings"]
    left = {n for n, p in model.named_parameters()}
    assert not any("proj" in n or "lm_head" in n for n in left), left
    assert model.config._experts_implementation == "quantized" and not hasattr(model, "quantized")
    assert report["bytes_after"] < report["bytes_before"] * (0.3 if dtype == torch.float32 else 0.6)
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():  # prompt-length and decode-length inputs both go through the quantized experts
        got, expected = model(ids).logits, reference(ids).logits
        same = (got.argmax(-1) == expected.argmax(-1)).float().mean()
        out = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert same >= agreement, f"{scheme}: top-1 agreement {same:.2f} with the unquantized model"
    assert out.shape == (1, 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("scheme, kernel", KERNELS)
def test_decoding_takes_the_token_loop_with_the_expert_loops_sums(scheme, kernel, dtype, monkeypatch):
    from helpers import quantize

    monkeypatch.setenv(QUANT_KERNEL_ENV, kernel)
    model = small_mixtral(seed=3).to(dtype)
    quantize_model(model, scheme)
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(2, 128, dtype=dtype)
    index = torch.tensor([[3, 1], [0, 2]])  # each expert one token: the same products in both loops
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    called = []
    monkeypatch.setattr(quantize, "token_loop", lambda *a: called.append(1) or token_loop(*a))
    with torch.no_grad():
        got = quantized_experts(experts, x, index, weights)
        monkeypatch.setattr(quantize, "DECODE_TOKENS", 1)  # 2 tokens now take experts_loop
        expected = quantized_experts(experts, x, index, weights)
    assert called == [1] and got.dtype == dtype and torch.equal(got, expected)


def test_compare_logits_counts_windows_and_is_zero_for_the_same_model():
    model, other = small_mixtral(), small_mixtral()
    with torch.no_grad():
        other.lm_head.weight.add_(0.5 * torch.randn_like(other.lm_head.weight))
    ids = torch.randint(0, 512, (301,)).tolist()
    result = compare_logits(model, {"same": model, "other": other}, ids, window=128)
    same = result["same"]
    assert same["tokens"] == 300 and same["top1_agreement"] == 1.0 and abs(same["mean_kl"]) < 1e-6
    assert same["perplexity_reference"] == same["perplexity_candidate"] > 1
    assert (
        result["other"]["mean_kl"] > 1e-3
        and result["other"]["perplexity_reference"] == same["perplexity_reference"]
    )
    assert (
        compare_logits(model, {"other": other}, ids, window=128)["other"] == result["other"]
    )  # one pass, same sums


# ---------------------------------------------------------------- the knob and its refusals
def test_the_knob_loads_quantized_and_describe_says_so(tiny_mixtral_dir):
    pipe = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32, fit=Fit.quantized("int8"))
    record = pipe.model.load_record
    assert record.quantized["scheme"] == "int8" and record.fit == Fit.quantized("int8")
    assert (
        record.bytes_per_parameter == record.quantized["bytes_after"] / record.quantized["parameters"] < 1.1
    )
    assert "int8 weights" in describe(pipe)
    assert "int8: 8-bit weights" in describe(pipe, detail=True) and "experts 'quantized'" in describe(
        pipe, detail=True
    )


def test_the_knob_refuses_what_it_cannot_do(tiny_mixtral_dir, monkeypatch):
    with pytest.raises(
        ValueError,
        match=r"Fit.quantized\('int2'\): not a weight scheme here; use "
        r"Fit.quantized\('int8'\) or Fit.quantized\('int4'\)",
    ):
        Fit.quantized("int2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="on GPUs load with transformers' quantization_config"):
        load_pipeline(str(tiny_mixtral_dir), fit=Fit.quantized("int8"))
    monkeypatch.undo()
    check_scheme("int8", "cuda")  # the GPU check's layer timing may
    with pytest.raises(ValueError, match="int4 uses torch's CPU kernel"):
        check_scheme("int4", "cuda")
    with pytest.raises(ValueError, match="scheme='int2' is not a weight scheme here"):
        check_scheme("int2", "cpu")
    monkeypatch.setenv(ENDPOINT_ENV, "http://127.0.0.1:9/v1")
    with pytest.raises(
        ValueError, match=r"Set that on the server.*load_pipeline\(model_path\(\), fit=\.\.\.\)"
    ):
        load_pipeline(fit=Fit.quantized("int8"))
