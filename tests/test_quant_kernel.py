"""Our int8 and int4 kernels (helpers/quant_kernel.c, quant_ops.cpp, quant_kernel.py): their products are exact
integer arithmetic on the int16-rounded activations, their layouts are the blocks they read, bad input is refused
before C sees it, a machine where they cannot be built says why and keeps nothing half-written, and the load
measures them against torch's and keeps the faster."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_our_kernel

from helpers import quant_kernel, quantize
from helpers.data import QUANT_KERNEL_ENV
from helpers.hardware import cpuinfo
from helpers.quant_kernel import COLS, GROUP, ROWS, operators, relayout4, relayout8
from helpers.quantize import _int4_values, choose_kernel

SCHEMES = ["int8", "int4"]
# what quant_kernel.c needs for its 512-bit loops (its WIDE): AVX-512 F and BW, and VNNI
AVX512_VNNI = {"avx512f", "avx512bw", "avx512_vnni"} <= set(cpuinfo("flags").split())


def weights(scheme: str, n: int, k: int, experts: int = 1):
    """Random weights [E, N, K] of `scheme`: (their float values, packed, scales) as our kernel holds them."""
    if scheme == "int8":
        q = torch.randint(-127, 128, (experts, n, k), dtype=torch.int8)
        scales = (torch.rand(experts, n) / 50 + 1e-3).bfloat16()
        return q.double() * scales.double()[..., None], relayout8(q), scales
    q, scale, zero = _int4_values(torch.randn(experts, n, k))
    values = ((q - 8) * scale.repeat_interleave(GROUP, -1) + zero.repeat_interleave(GROUP, -1)).double()
    return (values, *relayout4(q, scale.bfloat16(), zero.bfloat16()))


def exact(x, values):
    """What the kernels compute, in float64: each token rounded to int16 with the scale max|x| / 32767 (in float32,
    as the C does), times the weights' exact values."""
    x = x.float()
    step = x.abs().amax(-1, keepdim=True) / 32767
    step = torch.where(step > 0, step, torch.ones_like(step))
    xq = torch.round(x * (1 / step)).clamp(-32768, 32767).double()
    return (xq @ values.T) * step.double()


def test_relayout8_puts_each_block_of_4_rows_by_16_inputs_side_by_side():
    q = torch.arange(8 * 32, dtype=torch.int32).reshape(8, 32).to(torch.int8)
    blocks = relayout8(q)
    assert blocks.shape == (8 // ROWS, 32 // COLS, ROWS, COLS) and blocks.is_contiguous()
    for i, j, r, c in [(0, 0, 0, 0), (1, 1, 3, 15), (0, 1, 2, 5), (1, 0, 1, 9)]:
        assert blocks[i, j, r, c] == q[ROWS * i + r, COLS * j + c]
    stack = torch.stack([q, -q])  # an expert stack: each expert's matrix laid out alone
    assert torch.equal(relayout8(stack)[1], relayout8(-q))


def test_relayout4_puts_two_inputs_in_a_byte_and_each_blocks_scales_beside_it():
    q = torch.randint(0, 16, (8, 64))
    scale, zero = torch.rand(8, 2).bfloat16(), torch.rand(8, 2).bfloat16()
    packed, held = relayout4(q, scale, zero)
    assert packed.shape == (2, 2, ROWS, 16) and packed.dtype == torch.uint8 and held.shape == (2, 2, 2, ROWS)
    for i, g, r, j in [(0, 0, 0, 0), (1, 1, 3, 15), (0, 1, 2, 5), (1, 0, 1, 9)]:
        row, column = ROWS * i + r, GROUP * g + j
        assert packed[i, g, r, j] == q[row, column] + 16 * q[row, column + 16]
        assert held[i, g, 0, r] == scale[row, g] and held[i, g, 1, r] == zero[row, g]
    stack, stack_held = relayout4(
        torch.stack([q, 15 - q]), torch.stack([scale, zero]), torch.stack([zero, scale])
    )
    assert torch.equal(stack[1], relayout4(15 - q, zero, scale)[0]) and torch.equal(stack_held[0], held)


@needs_our_kernel
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    "shape", [(64, 128), (192, 576), (12, 4128)], ids=str
)  # 4128: past int8's 4096 chunk
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 17])
def test_products_are_the_exact_integer_sums(scheme, shape, tokens):
    torch.manual_seed(tokens)
    values, packed, scales = weights(scheme, *shape)
    x = torch.randn(tokens, shape[1]) * torch.logspace(-3, 2, tokens)[:, None]  # each token its own range
    got = getattr(operators(), f"{scheme}_matmul")(x, packed[0], scales[0])
    expected = exact(x, values[0])
    assert got.shape == (tokens, shape[0]) and got.dtype == torch.float32
    # float32's rounding of the sums and the scales, nothing more
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    # and close to the float product: the int16 rounding of activations is far finer than bf16's
    dense = x.double() @ values[0].T
    assert float((got.double() - dense).abs().max()) < 1e-3 * float(dense.abs().max())


@needs_our_kernel
def test_sums_near_int32s_limit_do_not_overflow():
    q, x = (
        torch.full((4, 8192), 127, dtype=torch.int8),
        torch.full((2, 8192), 3.0),
    )  # every product at its most
    ops = operators()
    got = ops.int8_matmul(x, relayout8(q), torch.ones(4).bfloat16())
    assert torch.equal(got, torch.full((2, 4), 127 * 3.0 * 8192))
    assert torch.equal(
        ops.int8_matmul(torch.zeros(1, 8192), relayout8(q), torch.ones(4).bfloat16()), torch.zeros(1, 4)
    )
    # int4: every value 15 against inputs at int16's most, each group's sum exact before its scale
    ones = torch.ones(4, 8192 // GROUP).bfloat16()
    got = ops.int4_matmul(x, *relayout4(torch.full((4, 8192), 15), ones, ones))  # w = (15 - 8) * 1 + 1
    torch.testing.assert_close(got, torch.full((2, 4), 8 * 3.0 * 8192), rtol=1e-6, atol=0)


@needs_our_kernel
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bf16_inputs_give_the_products_of_their_float32_values(scheme):
    torch.manual_seed(2)
    _, packed, scales = weights(scheme, 64, 128, experts=3)
    x, chosen, ops = torch.randn(2, 128).bfloat16(), torch.tensor([2, 0]), operators()
    matmul, experts = getattr(ops, f"{scheme}_matmul"), getattr(ops, f"{scheme}_experts")
    assert torch.equal(matmul(x, packed[0], scales[0]), matmul(x.float(), packed[0], scales[0]))
    assert torch.equal(experts(x, packed, scales, chosen), experts(x.float(), packed, scales, chosen))
    with pytest.raises(
        ValueError, match=rf"{scheme}_matmul: inputs \[2, 128\] float16: give \[tokens, inputs\]"
    ):
        matmul(x.half(), packed[0], scales[0])


@needs_our_kernel
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bad_input_is_refused_before_the_kernel_reads_it(scheme):
    _, packed, scales = weights(scheme, 8, 64)
    packed, scales, x = packed[0], scales[0], torch.ones(1, 64)
    matmul = getattr(operators(), f"{scheme}_matmul")
    for p, s, inputs in [
        (packed, scales.float(), x),  # float32 scales
        (packed, scales, torch.ones(1, 96)),  # inputs of another width
        (packed.float(), scales, x),  # not the kernel's integers
        (packed.transpose(-1, -2), scales, x),  # not contiguous
        (packed.reshape(-1, 64), scales, x),  # not laid out in blocks
        (packed, scales[:1], x),  # scales for fewer rows
    ]:
        with pytest.raises(
            ValueError, match=rf"{scheme}_matmul: weights .* hold them as relayout{scheme[-1]}"
        ):
            matmul(inputs, p, s)
    assert matmul(torch.ones(0, 64), packed, scales).shape == (0, 8)


def test_a_machine_without_a_compiler_says_why_and_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(quant_kernel, "cpuinfo", lambda field: "avx2 fma" if field == "flags" else "a CPU")
    for variable, what in [("CC", "C"), ("CXX", "C++")]:
        with monkeypatch.context() as env:
            env.setenv(variable, "no-such-compiler")
            assert f"no {what} compiler (no-such-compiler) on PATH" in quant_kernel._why_not()
    torch_folder = Path(torch.__file__).parent
    for compilers, source in [(("false", "c++"), "quant_kernel.c"), (("cc", "false"), "quant_ops.cpp")]:
        path = tmp_path / "kernels" / "quant_kernel-test.so"  # compilers that fail, at either step
        assert quant_kernel._build(compilers, torch_folder, path).startswith(
            f"false could not build {source}"
        )
        assert not [p for p in (tmp_path / "kernels").iterdir() if p.suffix != ".lock"]
    monkeypatch.delenv(QUANT_KERNEL_ENV, raising=False)
    monkeypatch.setattr(
        quant_kernel, "_library", lambda: "false could not build quant_kernel.c: (no message)"
    )
    with pytest.raises(RuntimeError, match="our kernels cannot run here: false could not build"):
        operators()
    for scheme in SCHEMES:
        assert choose_kernel(scheme, (4, 32), "cpu")["kernel"] == "torch"
    monkeypatch.setenv(QUANT_KERNEL_ENV, "ours")
    with pytest.raises(
        ValueError, match="MIXTRAL_QUANT_KERNEL=ours, but our int4 kernel cannot run here: false"
    ):
        choose_kernel("int4", (4, 32), "cpu")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_load_keeps_the_faster_kernel_and_says_what_it_measured(scheme, monkeypatch):
    monkeypatch.delenv(QUANT_KERNEL_ENV, raising=False)
    monkeypatch.setattr(quant_kernel, "_library", lambda: "")  # runs here, whatever this CPU is
    torch_name = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu"}[scheme]
    for torch_gb_s, chosen in [(10.0, "ours"), (19.0, "torch"), (17.0, "ours")]:  # ours only under 90%
        monkeypatch.setattr(
            quantize, "kernel_gb_s", lambda _, shape, s=torch_gb_s: {"torch": s, "ours": 20.0}
        )
        choice = choose_kernel(scheme, (3072, 576), "cpu")
        assert choice["kernel"] == chosen and choice["gb_s"] == {"torch": torch_gb_s, "ours": 20.0}
        assert choice["why"] == (
            f"measured at [3072, 576], one token: torch's {torch_name} {torch_gb_s:.1f} GB/s, our quant_kernel.c "
            f"20.0 GB/s"
        )
    # a Mixtral's step can be our layer operator, which calls ours: ours, the load racing that step instead
    monkeypatch.setattr(quantize, "kernel_gb_s", lambda _, shape: {"torch": 25.0, "ours": 20.0})
    stepped = choose_kernel(scheme, (3072, 576), "cpu", stepped=True)
    assert stepped["kernel"] == "ours" and stepped["why"].endswith(
        "; ours all the same, as our layer operator calls it, and the load races that step"
    )
    assert choose_kernel(scheme, (3072, 576), "cuda", stepped=True)["kernel"] == "torch"  # ours: CPUs only
    monkeypatch.setenv(QUANT_KERNEL_ENV, "fastest")
    with pytest.raises(
        ValueError, match="MIXTRAL_QUANT_KERNEL='fastest' is not a kernel here: use torch or ours"
    ):
        choose_kernel(scheme, (3072, 576), "cpu")
    monkeypatch.setenv(QUANT_KERNEL_ENV, "torch")
    assert choose_kernel(scheme, (3072, 576), "cpu") == dict(
        kernel="torch", gb_s={}, why="MIXTRAL_QUANT_KERNEL=torch: forced"
    )


@needs_our_kernel
@pytest.mark.parametrize("scheme", SCHEMES)
def test_kernel_gb_s_times_both_from_memory(scheme, monkeypatch):
    monkeypatch.setattr(quantize, "timing_buffer_bytes", lambda: 8 * 2**20)
    monkeypatch.setattr("helpers.fastpath._once_per_machine", lambda name, key, measure: measure())
    speeds = quantize.kernel_gb_s(scheme, (256, 512))
    assert set(speeds) == {"torch", "ours"} and all(v > 0 for v in speeds.values())


@needs_our_kernel
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_chosen_experts_are_read_in_place_with_the_products_of_each(scheme):
    torch.manual_seed(5)
    _, packed, scales = weights(scheme, 32, 64, experts=4)
    chosen, ops = torch.tensor([3, 0, 3]), operators()
    matmul, experts = getattr(ops, f"{scheme}_matmul"), getattr(ops, f"{scheme}_experts")
    one, each = torch.randn(1, 64), torch.randn(3, 64)
    got = experts(one, packed, scales, chosen)  # one row against every chosen expert
    assert torch.equal(got, torch.cat([matmul(one, packed[e], scales[e]) for e in chosen.tolist()]))
    got = experts(each, packed, scales, chosen)  # a row for each
    expected = [matmul(each[i : i + 1], packed[e], scales[e]) for i, e in enumerate(chosen.tolist())]
    assert torch.equal(got, torch.cat(expected))
    with pytest.raises(IndexError, match=f"{scheme}_experts: an expert index is out of range"):
        experts(one, packed, scales, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match=f"{scheme}_experts: 2 rows of inputs for 3 experts"):
        experts(each[:2], packed, scales, chosen)
    with pytest.raises(ValueError, match=f"{scheme}_experts: weights .* hold them as relayout"):
        experts(one, packed, scales[:3], chosen)


def test_forcing_our_kernel_on_shapes_it_cannot_take_is_refused(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers.quantize import quantize_model

    config = LlamaConfig(vocab_size=64, hidden_size=40, intermediate_size=80, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    monkeypatch.setenv(QUANT_KERNEL_ENV, "ours")
    with pytest.raises(ValueError, match=r"MIXTRAL_QUANT_KERNEL=ours, but our int8 kernel .* does not split"):
        quantize_model(LlamaForCausalLM(config), "int8")  # 40 inputs: not a multiple of 16
    monkeypatch.delenv(QUANT_KERNEL_ENV)
    report = quantize_model(LlamaForCausalLM(config), "int8")
    assert report["kernel"] == "torch" and "does not split" in report["why"]


DENSE = [torch.float32, torch.bfloat16]


@needs_our_kernel
@pytest.mark.parametrize("weight_dtype", DENSE, ids=str)
@pytest.mark.parametrize("input_dtype", DENSE, ids=str)
@pytest.mark.parametrize(
    "shape", [(8, 64), (7, 19), (96, 576), (3, 5), (5, 50)], ids=str
)  # rows past 4, inputs past 8, 16 and 32 (a step of AVX2's and of AVX-512's loop)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5])
def test_dense_products_are_float32_sums_of_the_weights_as_held(weight_dtype, input_dtype, shape, tokens):
    """Dense weights read in place: the products of the values as held (bf16 is exact in float32), summed in
    float32, in the inputs' dtype (bf16 rounded once, at the end, as torch rounds)."""
    torch.manual_seed(tokens + shape[1])
    w = torch.randn(shape).to(weight_dtype)
    x = (torch.randn(tokens, shape[1]) * torch.logspace(-2, 2, tokens)[:, None]).to(input_dtype)
    got = operators().dense_matmul(x, w)
    expected = x.double() @ w.double().T
    assert got.shape == (tokens, shape[0]) and got.dtype == input_dtype
    # float32's rounding of the sums, and in bf16 one rounding of the result (half a step of its 8 bits)
    sums = (x.double().abs() @ w.double().abs().T) * 2**-23 * shape[1] ** 0.5
    rounding = expected.abs() * 2**-8 if input_dtype == torch.bfloat16 else 0
    assert ((got.double() - expected).abs() <= (sums + rounding) * 1.01).all()


@needs_our_kernel
def test_dense_bf16_results_round_as_torch_rounds():
    """The bf16 result is the float32 sum rounded to nearest even, as `.to(torch.bfloat16)` rounds a finite value:
    bit for bit; a tie goes to the even neighbour, past float32's largest is infinity, a NaN stays one."""
    torch.manual_seed(3)
    w, x = torch.randn(64, 256).bfloat16(), torch.randn(3, 256)
    ops = operators()
    assert torch.equal(
        ops.dense_matmul(x.bfloat16(), w), ops.dense_matmul(x.bfloat16().float(), w).bfloat16()
    )
    one = torch.ones(1, 2)  # x [1, 2] against w [[1, 1]]: the sum of x's two values, rounded once
    for pair, expected in [
        ((1.0, 2**-8), 1.0),  # halfway between 1 and 1 + 2^-7: to 1, whose last bit is 0
        ((1 + 2**-7, 2**-8), 1 + 2**-6),  # halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up
        ((3e38, 3e38), float("inf")),  # past float32's largest, summed in float32
    ]:
        got = ops.dense_matmul(torch.tensor([pair]).bfloat16(), one)
        assert got.dtype == torch.bfloat16 and got.item() == expected, (pair, got.item())
    assert ops.dense_matmul(torch.tensor([[float("nan"), 1.0]]).bfloat16(), one).isnan().all()


@needs_our_kernel
@pytest.mark.parametrize("weight_dtype", DENSE, ids=str)
def test_dense_experts_are_read_in_place_and_bad_input_is_refused(weight_dtype):
    torch.manual_seed(6)
    stack, ops = torch.randn(4, 12, 40).to(weight_dtype), operators()
    chosen, one, each = torch.tensor([2, 0, 3]), torch.randn(1, 40).bfloat16(), torch.randn(3, 40).bfloat16()
    got = ops.dense_experts(one, stack, chosen)
    assert torch.equal(got, torch.cat([ops.dense_matmul(one, stack[e]) for e in chosen.tolist()]))
    got = ops.dense_experts(each, stack, chosen)
    expected = [ops.dense_matmul(each[i : i + 1], stack[e]) for i, e in enumerate(chosen.tolist())]
    assert torch.equal(got, torch.cat(expected))
    for wrong in ([-1], [4]):
        with pytest.raises(IndexError, match="dense_experts: an expert index is out of range"):
            ops.dense_experts(one, stack, torch.tensor(wrong))
    with pytest.raises(
        ValueError, match=r"dense_experts: chosen experts \[3\] float32: give integer indices"
    ):
        ops.dense_experts(one, stack, chosen.float())
    with pytest.raises(ValueError, match="dense_experts: 2 rows of inputs for 3 experts"):
        ops.dense_experts(each[:2], stack, chosen)
    w = stack[0]
    for weight, inputs in [
        (w.transpose(0, 1), torch.ones(1, 12)),  # not contiguous
        (w.half(), one),  # not float32 or bf16
        (w, torch.ones(1, 41)),  # inputs of another width
        (stack, one),  # a stack where one matrix was asked for
    ]:
        with pytest.raises(
            ValueError, match="dense_matmul: weights .* float32 or bfloat16 weights, contiguous"
        ):
            ops.dense_matmul(inputs, weight)
    with pytest.raises(ValueError, match=r"dense_matmul: inputs \[1, 40\] int64"):
        ops.dense_matmul(torch.ones(1, 40, dtype=torch.long), w)
    assert ops.dense_matmul(torch.ones(0, 40), w).shape == (0, 12)


@needs_our_kernel
def test_the_kernels_take_as_many_tokens_a_pass_as_their_instruction_set_allows(monkeypatch):
    """4 tokens a pass over a block where built with AVX-512 and VNNI (32 vector registers), 2 with AVX2; the build
    follows MIXTRAL_KERNEL_ISA, and a value it does not know is refused with the ones it does."""
    avx2 = "-mno-avx512f" in quant_kernel._flags()
    assert operators().tokens_per_pass() == (4 if AVX512_VNNI and not avx2 else 2)
    monkeypatch.setenv("MIXTRAL_KERNEL_ISA", " AVX2 ")
    assert quant_kernel._flags()[-1] == "-mno-avx512f"
    monkeypatch.setenv("MIXTRAL_KERNEL_ISA", "avx3")
    with pytest.raises(
        ValueError, match="MIXTRAL_KERNEL_ISA='avx3': give one of native, avx2, or leave it unset"
    ):
        quant_kernel._flags()


@pytest.mark.slow
@needs_our_kernel
def test_the_avx2_kernels_pass_the_same_tests_on_a_cpu_with_avx512():
    """A CPU with AVX-512 and VNNI runs the 512-bit loops, which the tests above checked; CPUs without it run the
    AVX2 ones. Built here too (MIXTRAL_KERNEL_ISA=avx2: a library of their own in the cache folder), they pass the
    same tests of the products, in a process of their own (a process registers one library's operators)."""
    if not AVX512_VNNI:
        pytest.skip("this CPU has no AVX-512 with VNNI: the tests above ran the AVX2 kernels")
    # the products' tests, and the one that checks that the AVX2 loops ran (2 tokens a pass)
    picked = "products or overflow or bf16_inputs or bad_input or chosen_experts or dense or tokens_a_pass"
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-m", "not slow", "-k", picked, "-n", "0"]
    # not one of this run's workers
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    done = subprocess.run(
        command,
        env=env | {"MIXTRAL_KERNEL_ISA": "avx2"},
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    said = done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0 and " passed" in summary and "skipped" not in summary, said
