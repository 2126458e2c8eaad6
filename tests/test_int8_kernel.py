"""Our int8 kernel (helpers/int8_kernel.c, .py): its products are exact integer arithmetic on the int16-rounded
activations, its layout is the blocks it reads, bad input is refused before C sees it, a machine where it cannot
be built says why and keeps nothing half-written, and the load measures it against torch's and keeps the faster."""

from pathlib import Path

import pytest
import torch

from helpers import int8_kernel, quantize
from helpers.data import INT8_KERNEL_ENV
from helpers.int8_kernel import COLS, ROWS, int8_experts, int8_matmul, kernel_unavailable, relayout
from helpers.quantize import choose_int8_kernel

needs_kernel = pytest.mark.skipif(bool(kernel_unavailable()), reason=kernel_unavailable() or "")


def exact(x, q, scales):
    """What the kernel computes, in float64: each token rounded to int16 with the scale max|x| / 32767 (in
    float32, as the C does), the integer products summed exactly, then the two scales."""
    x = x.float()
    step = x.abs().amax(-1, keepdim=True) / 32767
    step = torch.where(step > 0, step, torch.ones_like(step))
    xq = torch.round(x * (1 / step)).clamp(-32768, 32767).double()
    return (xq @ q.double().T) * step.double() * scales.double()


def test_relayout_puts_each_block_of_4_rows_by_16_inputs_side_by_side():
    q = torch.arange(8 * 32, dtype=torch.int32).reshape(8, 32).to(torch.int8)
    blocks = relayout(q)
    assert blocks.shape == (8 // ROWS, 32 // COLS, ROWS, COLS) and blocks.is_contiguous()
    for i, j, r, c in [(0, 0, 0, 0), (1, 1, 3, 15), (0, 1, 2, 5), (1, 0, 1, 9)]:
        assert blocks[i, j, r, c] == q[ROWS * i + r, COLS * j + c]
    stack = torch.stack([q, -q])  # an expert stack: each expert's matrix laid out alone
    assert torch.equal(relayout(stack)[1], relayout(-q))


@needs_kernel
@pytest.mark.parametrize("shape", [(64, 128), (192, 576), (12, 4112)], ids=str)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 17])
def test_products_are_the_exact_integer_sums(shape, tokens):
    torch.manual_seed(tokens)
    n, k = shape
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = (torch.rand(n) / 50 + 1e-3).bfloat16()
    x = torch.randn(tokens, k) * torch.logspace(-3, 2, tokens)[:, None]  # each token its own range
    got = int8_matmul(x, relayout(q), scales)
    expected = exact(x, q, scales.float())
    assert got.shape == (tokens, n) and got.dtype == torch.float32
    # float32's rounding of the sums and the scales, nothing more
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    # and close to the float product: the int16 rounding of activations is far finer than bf16's
    dense = x.double() @ (q.double() * scales.double()[:, None]).T
    assert float((got.double() - dense).abs().max()) < 1e-3 * float(dense.abs().max())


@needs_kernel
def test_sums_near_int32s_limit_do_not_overflow():
    q, x = (
        torch.full((4, 8192), 127, dtype=torch.int8),
        torch.full((2, 8192), 3.0),
    )  # every product at its most
    got = int8_matmul(x, relayout(q), torch.ones(4).bfloat16())
    assert torch.equal(got, torch.full((2, 4), 127 * 3.0 * 8192))
    assert torch.equal(
        int8_matmul(torch.zeros(1, 8192), relayout(q), torch.ones(4).bfloat16()), torch.zeros(1, 4)
    )


@needs_kernel
def test_bad_input_is_refused_before_the_kernel_reads_it():
    q, scales = relayout(torch.ones(8, 32, dtype=torch.int8)), torch.ones(8).bfloat16()
    for packed, s, x in [
        (q, scales.float(), torch.ones(1, 32)),  # float32 scales
        (q, scales, torch.ones(1, 48)),  # inputs of another width
        (q.float(), scales, torch.ones(1, 32)),  # not int8
        (q.transpose(-1, -2), scales, torch.ones(1, 32)),  # not contiguous
        (
            torch.ones(6, 32, dtype=torch.int8),
            torch.ones(6).bfloat16(),
            torch.ones(1, 32),
        ),  # 6 rows: not blocks
    ]:
        with pytest.raises(ValueError, match="int8_matmul: .* hold them as relayout"):
            int8_matmul(x, packed, s)
    assert int8_matmul(torch.ones(0, 32), q, scales).shape == (0, 8)


@needs_kernel
def test_bf16_inputs_give_the_products_of_their_float32_values():
    torch.manual_seed(2)
    stack = torch.randint(-127, 128, (3, 64, 128), dtype=torch.int8)
    packed, scales = relayout(stack), (torch.rand(3, 64) / 50 + 1e-3).bfloat16()
    x, chosen = torch.randn(2, 128).bfloat16(), torch.tensor([2, 0])
    assert torch.equal(int8_matmul(x, packed[0], scales[0]), int8_matmul(x.float(), packed[0], scales[0]))
    assert torch.equal(
        int8_experts(x, packed, scales, chosen), int8_experts(x.float(), packed, scales, chosen)
    )
    with pytest.raises(
        ValueError, match=r"int8_matmul: inputs \[2, 128\] Half: give \[tokens, inputs\] in float32"
    ):
        int8_matmul(x.half(), packed[0], scales[0])


def test_a_machine_without_a_compiler_says_why_and_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(int8_kernel, "cpuinfo", lambda field: "avx2 fma" if field == "flags" else "a CPU")
    for variable, what in [("CC", "C"), ("CXX", "C++")]:
        with monkeypatch.context() as env:
            env.setenv(variable, "no-such-compiler")
            assert f"no {what} compiler (no-such-compiler) on PATH" in int8_kernel._why_not()
    torch_folder = Path(torch.__file__).parent
    for compilers, source in [(("false", "c++"), "int8_kernel.c"), (("cc", "false"), "int8_ops.cpp")]:
        path = tmp_path / "kernels" / "int8_kernel-test.so"  # compilers that fail, at either step
        assert int8_kernel._build(compilers, torch_folder, path).startswith(f"false could not build {source}")
        assert not [p for p in (tmp_path / "kernels").iterdir() if p.suffix != ".lock"]
    monkeypatch.delenv(INT8_KERNEL_ENV, raising=False)
    monkeypatch.setattr(int8_kernel, "_library", lambda: "false could not build int8_kernel.c: (no message)")
    with pytest.raises(RuntimeError, match="the int8 kernel cannot run here: false could not build"):
        int8_matmul(torch.ones(1, 16), torch.ones(4, 16, dtype=torch.int8), torch.ones(4).bfloat16())
    assert choose_int8_kernel((4, 16), "cpu")["kernel"] == "torch"
    monkeypatch.setenv(INT8_KERNEL_ENV, "ours")
    with pytest.raises(ValueError, match="MIXTRAL_INT8_KERNEL=ours, but our int8 kernel cannot run here"):
        choose_int8_kernel((4, 16), "cpu")


def test_the_load_keeps_the_faster_kernel_and_says_what_it_measured(monkeypatch):
    monkeypatch.delenv(INT8_KERNEL_ENV, raising=False)
    monkeypatch.setattr(int8_kernel, "_library", lambda: "")  # runs here, whatever this CPU is
    for torch_gb_s, chosen in [(10.0, "ours"), (19.0, "torch"), (17.0, "ours")]:  # ours only under 90%
        monkeypatch.setattr(
            quantize, "int8_kernel_speeds", lambda shape, s=torch_gb_s: {"torch": s, "ours": 20.0}
        )
        choice = choose_int8_kernel((3072, 576), "cpu")
        assert choice["kernel"] == chosen and choice["gb_s"] == {"torch": torch_gb_s, "ours": 20.0}
        assert (
            f"measured at [3072, 576], one token: torch's _weight_int8pack_mm {torch_gb_s:.1f} GB/s"
            in choice["why"]
        )
    assert choose_int8_kernel((3072, 576), "cuda")["kernel"] == "torch"  # ours is a CPU kernel
    monkeypatch.setenv(INT8_KERNEL_ENV, "fastest")
    with pytest.raises(
        ValueError, match="MIXTRAL_INT8_KERNEL='fastest' is not an int8 kernel here: use torch or ours"
    ):
        choose_int8_kernel((3072, 576), "cpu")
    monkeypatch.setenv(INT8_KERNEL_ENV, "torch")
    assert choose_int8_kernel((3072, 576), "cpu") == dict(
        kernel="torch", gb_s={}, why="MIXTRAL_INT8_KERNEL=torch: forced"
    )


@needs_kernel
def test_int8_kernel_speeds_times_both_from_memory(monkeypatch):
    monkeypatch.setattr(quantize, "timing_buffer_bytes", lambda: 8 * 2**20)
    monkeypatch.setattr("helpers.fastpath._once_per_machine", lambda name, key, measure: measure())
    speeds = quantize.int8_kernel_speeds((256, 512))
    assert set(speeds) == {"torch", "ours"} and all(v > 0 for v in speeds.values())


@needs_kernel
def test_the_chosen_experts_are_read_in_place_with_the_products_of_each():
    torch.manual_seed(5)
    stack = torch.randint(-127, 128, (4, 32, 64), dtype=torch.int8)
    scales = (torch.rand(4, 32) / 50 + 1e-3).bfloat16()
    packed, chosen = relayout(stack), torch.tensor([3, 0, 3])
    one, each = torch.randn(1, 64), torch.randn(3, 64)
    got = int8_experts(one, packed, scales, chosen)  # one row against every chosen expert
    assert torch.equal(got, torch.cat([int8_matmul(one, packed[e], scales[e]) for e in chosen.tolist()]))
    got = int8_experts(each, packed, scales, chosen)  # a row for each
    assert torch.equal(
        got,
        torch.cat(
            [int8_matmul(each[i : i + 1], packed[e], scales[e]) for i, e in enumerate(chosen.tolist())]
        ),
    )
    with pytest.raises(IndexError, match="int8_experts: an expert index is out of range"):
        int8_experts(one, packed, scales, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="int8_experts: 2 rows of inputs for 3 experts"):
        int8_experts(each[:2], packed, scales, chosen)
    with pytest.raises(ValueError, match="int8_experts: weights .* hold them as relayout"):
        int8_experts(one, packed, scales[:3], chosen)


def test_forcing_our_kernel_on_shapes_it_cannot_take_is_refused(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers.quantize import quantize_model

    config = LlamaConfig(vocab_size=64, hidden_size=40, intermediate_size=80, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    monkeypatch.setenv(INT8_KERNEL_ENV, "ours")
    with pytest.raises(ValueError, match=r"MIXTRAL_INT8_KERNEL=ours, but a weight's shape does not split"):
        quantize_model(LlamaForCausalLM(config), "int8")  # 40 inputs: not a multiple of 16
    monkeypatch.delenv(INT8_KERNEL_ENV)
    report = quantize_model(LlamaForCausalLM(config), "int8")
    assert report["kernel"] == "torch" and "does not split" in report["why"]
