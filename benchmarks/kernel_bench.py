"""How fast each candidate kernel reads a decode step's weights on this machine: one and four tokens through
matrices of the stand-in's expert shapes, cycling over more distinct matrices than the caches hold (twice the
last-level cache, at least 256 MiB), so the weights come from memory as a decode step's do. Winners and losers
both go into the results file, with the share of this machine's measured memory bandwidth each one reads at.

    python benchmarks/kernel_bench.py                 # writes benchmarks/results/<date>-kernels-<cpu>.md and .json
    python benchmarks/kernel_bench.py --only int8     # the candidates whose name contains a word

The candidates: float32 and bf16 through F.linear and torch.mv (bf16 also re-laid column-major), or packed once
into oneDNN's layout (float32 also into MKL's); int8 weights through torch's weight-only kernel (bf16 activations)
and, with int8 activations quantized per token, through torch._int_mm (which wants more than 16 rows: the tokens
are padded to 17); int8 and bf16 as a reduction that torch.compile generates; int4 through torch's weight-only CPU kernel; inductor's CPU GEMM templates
(torch.compile with max-autotune and frozen weights) on bf16 and weight-only int8 linears; and torchao's CPU
layouts when torchao is installed (it is not a dependency: `.venv/bin/pip install torchao==0.18.0`). A candidate
that fails is recorded with its error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.fastpath import KERNELS, packed_copy  # noqa: E402
from helpers.files import atomic_file  # noqa: E402
from helpers.hardware import best_seconds, cpuinfo, measure_bandwidth, timing_buffer_bytes  # noqa: E402
from helpers.quantize import _int8, quantized_linear  # noqa: E402

SHAPES = {"gate_up": (3072, 576), "down": (576, 1536)}  # the stand-in's experts: [2I, D] and [D, I]
TOKENS = (1, 4)


def _int8_rows(w):
    """Symmetric int8 per output row, rounded as the package rounds: (q [N, K] int8, scale [N] float32)."""
    q, scale = _int8(w[None])
    return q[0], scale[0].float()


def cpu_extensions() -> list:
    """The bf16 and int8 instruction sets this CPU reports that the kernels' speeds depend on."""
    return [
        f for f in ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni") if f in cpuinfo("flags").split()
    ]


def cpu_kind(flags: list) -> str:
    """The CPU kind a results file is named after: amx, avx512-bf16 or no-bf16."""
    return "amx" if "amx_bf16" in flags else "avx512-bf16" if "avx512_bf16" in flags else "no-bf16"


def candidates() -> dict:
    """{name: (bytes per weight, build(weight fp32 [N, K]) -> held, run(held, x fp32 [T, K]))}."""
    import torch
    import torch.nn.functional as F

    linear = quantized_linear()
    packed = KERNELS["oneDNN packed"][1]

    def int_mm(held, x):  # int8 activations, one scale per token; _int_mm needs more than 16 rows
        q, scale = held
        xs = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
        xq = torch.zeros(17, x.shape[1], dtype=torch.int8)
        xq[: len(x)] = (x / xs).round().to(torch.int8)
        return torch._int_mm(xq, q.t())[: len(x)] * xs * scale

    reduce8 = torch.compile(lambda x, q, s: (q.float()[None] * x[:, None]).sum(-1) * s, dynamic=False)
    reduce16 = torch.compile(lambda x, w: (w.float()[None] * x[:, None]).sum(-1), dynamic=False)

    def mv_rows(w, x):
        return torch.stack([torch.mv(w, row) for row in x])

    found = {
        "float32 F.linear": (4, lambda w: w, lambda w, x: F.linear(x, w)),
        "float32 torch.mv": (4, lambda w: w, mv_rows),
        "bf16 F.linear": (2, lambda w: w.bfloat16(), lambda w, x: F.linear(x.bfloat16(), w)),
        "bf16 torch.mv": (2, lambda w: w.bfloat16(), lambda w, x: mv_rows(w, x.bfloat16())),
        "bf16 F.linear, column-major": (
            2,
            lambda w: w.bfloat16().t().contiguous().t(),
            lambda w, x: F.linear(x.bfloat16(), w),
        ),
        "bf16 reduction by torch.compile": (2, lambda w: w.bfloat16(), lambda w, x: reduce16(x, w)),
        # the weights as the model holds them, read in place by our own C kernel (helpers/quant_kernel.c), float32
        # sums: the fast path's candidate "our kernel"
        "float32, our quant_kernel.c": (4, lambda w: w, lambda w, x: KERNELS["our kernel"][1](x, w)),
        "bf16, our quant_kernel.c": (
            2,
            lambda w: w.bfloat16(),
            lambda w, x: KERNELS["our kernel"][1](x.bfloat16(), w),
        ),
        "int8 weights, bf16 activations (_weight_int8pack_mm)": (
            1,
            lambda w: linear(w, "int8"),
            lambda m, x: m(x.bfloat16()),
        ),
        "int8 weights and activations (_int_mm, 17 rows)": (1, _int8_rows, int_mm),
        # the same int8 values and scales, re-laid in blocks for our own C kernel (helpers/quant_kernel.c)
        "int8 weights, int16 activations (our quant_kernel.c)": (
            1,
            lambda w: linear(w, "int8", "ours"),
            lambda m, x: m(x),
        ),
        "int8 reduction by torch.compile": (1, _int8_rows, lambda h, x: reduce8(x, *h)),
        "int4 weights, bf16 activations (_weight_int4pack_mm_for_cpu)": (
            0.5,
            lambda w: linear(w, "int4"),
            lambda m, x: m(x.bfloat16()),
        ),
        # the same int4 values, scales and zeros, re-laid in blocks for our own C kernel
        "int4 weights, int16 activations (our quant_kernel.c)": (
            0.5,
            lambda w: linear(w, "int4", "ours"),
            lambda m, x: m(x),
        ),
        # the weight re-laid once by the library for its own kernel, as inductor's frozen linears do, but called
        # eagerly: oneDNN's blocked layout (the fast path's own packing and product, helpers.fastpath), and MKL's
        # packed float32 GEMM (which also takes the weight itself)
        "float32 oneDNN packed (mkldnn._linear_pointwise)": (4, packed_copy, lambda h, x: packed(x, h)),
        "bf16 oneDNN packed (mkldnn._linear_pointwise)": (
            2,
            lambda w: packed_copy(w.bfloat16()),
            lambda h, x: packed(x.bfloat16(), h),
        ),
    }
    if torch._C.has_mkl:
        found["float32 MKL packed (mkl._mkl_linear)"] = (
            4,
            lambda w: (torch.ops.mkl._mkl_reorder_linear_weight(w, 1), w),
            lambda h, x: torch.ops.mkl._mkl_linear(x, h[0], h[1], None, len(x)),
        )
    return found


def compiled_candidates(shape: tuple, total: int) -> dict:
    """Inductor's CPU GEMM templates and torchao's layouts need the weights inside a module: one module of as
    many linears as fill `total` bytes, applied one after another to the same input (each its own weights),
    compiled whole. {name: (bytes per weight, build(count) -> callable(x) returning `count` products)}."""
    import torch

    N, K = shape

    class Stack(torch.nn.Module):
        def __init__(self, dtype, count):
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.Linear(K, N, bias=False, dtype=dtype) for _ in range(count)
            )

        def forward(self, x):
            return [layer(x) for layer in self.layers]

    def inductor(dtype, woq_int8: bool):
        def build(count):
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            module = Stack(dtype, count).eval()
            if (
                woq_int8
            ):  # the pattern inductor matches for weight-only int8: int8 weight, dequantized, matmul
                module = WeightOnlyInt8Stack(module)
            return torch.compile(module, mode="max-autotune", dynamic=False)

        return build

    class WeightOnlyInt8Stack(torch.nn.Module):
        def __init__(self, stack):
            super().__init__()
            for i, layer in enumerate(stack.layers):
                q, scale = _int8_rows(layer.weight.float())
                self.register_buffer(f"q{i}", q)
                self.register_buffer(f"s{i}", scale.bfloat16())
            self.count = len(stack.layers)

        def forward(self, x):
            return [
                torch.nn.functional.linear(x, getattr(self, f"q{i}").to(x.dtype)) * getattr(self, f"s{i}")
                for i in range(self.count)
            ]

    def torchao(config_name: str, make_config):
        def build(count):
            from torchao.quantization import quantize_

            module = Stack(torch.bfloat16, count).eval()
            quantize_(module, make_config())
            return torch.compile(module, dynamic=False)

        return build

    found = {
        "bf16, inductor max-autotune, frozen": (2, inductor(torch.bfloat16, False)),
        "int8 weight-only, inductor max-autotune, frozen": (1, inductor(torch.bfloat16, True)),
    }
    try:
        import torchao.quantization as ao
    except ImportError:
        return found
    found["torchao Int8WeightOnlyConfig, compiled"] = (
        1,
        torchao("int8wo", lambda: ao.Int8WeightOnlyConfig()),
    )
    found["torchao Int8DynamicActivationInt8WeightConfig, compiled"] = (
        1,
        torchao("int8dq", lambda: ao.Int8DynamicActivationInt8WeightConfig()),
    )
    return found


def time_one(bytes_per_weight, build, run, shape, tokens, total) -> dict:
    import torch

    N, K = shape
    count = max(1, math.ceil(total / (N * K * bytes_per_weight)))
    held = [build(torch.randn(N, K)) for _ in range(count)]
    x = torch.randn(tokens, K)
    started = time.perf_counter()
    run(held[0], x)  # the first call compiles, where there is anything to compile
    first = time.perf_counter() - started
    seconds = best_seconds(lambda: [run(h, x) for h in held], rounds=5) / count
    return dict(
        gb_s=N * K * bytes_per_weight / seconds / 1e9, us=seconds * 1e6, matrices=count, first_call_s=first
    )


def time_module(bytes_per_weight, build, shape, tokens, total) -> dict:
    import torch

    N, K = shape
    count = max(1, math.ceil(total / (N * K * bytes_per_weight)))
    started = time.perf_counter()
    module = build(count)
    x = torch.randn(tokens, K, dtype=torch.bfloat16)
    with torch.no_grad():
        module(x)  # compiles
        first = time.perf_counter() - started
        seconds = best_seconds(lambda: module(x), rounds=5) / count
    return dict(
        gb_s=N * K * bytes_per_weight / seconds / 1e9, us=seconds * 1e6, matrices=count, first_call_s=first
    )


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="candidates whose name contains this")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--compiled", help=argparse.SUPPRESS)  # one compiled candidate, in a child process,
    parser.add_argument("--shape", default="gate_up", help=argparse.SUPPRESS)  # at this shape
    parser.add_argument("--tokens", type=int, default=1, help=argparse.SUPPRESS)  # and this many tokens
    args = parser.parse_args()
    if args.compiled:
        shape = SHAPES[args.shape]
        size, build = compiled_candidates(shape, timing_buffer_bytes())[args.compiled]
        print(json.dumps(time_module(size, build, shape, args.tokens, timing_buffer_bytes())))
        return 0
    total = timing_buffer_bytes()
    bandwidth = measure_bandwidth()
    machine = cpuinfo("model name") or platform.processor() or platform.machine()
    flags = cpu_extensions()
    print(
        f"{machine}, {torch.get_num_threads()} threads, {', '.join(flags) or 'no bf16/int8 extensions'}; "
        f"memory read {bandwidth / 1e9:.1f} GB/s; {total / 2**20:.0f} MiB of weights per timing",
        flush=True,
    )
    rows = []
    for tokens in TOKENS:
        for shape_name, shape in SHAPES.items():
            plain = candidates()
            for name, (size, build, run) in plain.items():
                if args.only and not any(o in name for o in args.only):
                    continue
                rows.append(
                    _measured(
                        name,
                        shape_name,
                        shape,
                        tokens,
                        size,
                        bandwidth,
                        lambda: time_one(size, build, run, shape, tokens, total),
                    )
                )
            # whole-module candidates compile for minutes and keep their frozen weights: each in a process of its own
            for name in compiled_candidates(shape, total):
                if args.only and not any(o in name for o in args.only):
                    continue
                rows.append(_apart(name, shape_name, shape, tokens, bandwidth))
    stamp = datetime.date.today().isoformat()
    kind = cpu_kind(flags)
    out = Path(args.out)
    figures = dict(
        date=stamp,
        machine=machine,
        flags=flags,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        bandwidth_gb_s=bandwidth / 1e9,
        buffer_mib=total / 2**20,
        rows=rows,
    )
    atomic_file(out / f"{stamp}-kernels-{kind}.json", lambda p: p.write_text(json.dumps(figures, indent=1)))
    atomic_file(out / f"{stamp}-kernels-{kind}.md", lambda p: p.write_text(markdown(figures)))
    print(markdown(figures))
    return 0


def _apart(name, shape_name, shape, tokens, bandwidth) -> dict:
    """A compiled candidate timed in a child process; its row, or the failure."""
    import subprocess

    def timing():
        done = subprocess.run(
            [sys.executable, __file__, "--compiled", name, "--shape", shape_name, "--tokens", str(tokens)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if done.returncode != 0:
            raise RuntimeError(
                done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            )
        return json.loads(done.stdout.strip().splitlines()[-1])

    size = compiled_candidates(shape, 0)[name][0]
    return _measured(name, shape_name, shape, tokens, size, bandwidth, timing)


def _measured(name, shape_name, shape, tokens, size, bandwidth, timing) -> dict:
    row = dict(kernel=name, shape=f"{shape_name} {shape[0]}x{shape[1]}", tokens=tokens, bytes_per_weight=size)
    try:
        row.update(timing())
        row["share_of_bandwidth"] = row["gb_s"] * 1e9 / bandwidth
        print(
            f"  {name:<60} {row['shape']:<18} {tokens} token(s): {row['gb_s']:5.1f} GB/s "
            f"({row['share_of_bandwidth']:.0%})",
            flush=True,
        )
    except Exception as exc:  # noqa: BLE001 - a candidate that fails is a result too
        row["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(f"  {name:<60} {row['shape']:<18} {tokens} token(s): failed, {row['failed']}", flush=True)
    return row


def markdown(f: dict) -> str:
    lines = [
        f"# Kernels at decode shapes, {f['date']}",
        "",
        f"`python benchmarks/kernel_bench.py` on {f['machine']} ({', '.join(f['flags']) or 'no bf16/int8 extensions'}), "
        f"{f['threads']} threads, torch {f['torch']}. Memory read bandwidth {f['bandwidth_gb_s']:.1f} GB/s "
        f"(helpers.measure_bandwidth); each timing cycles over {f['buffer_mib']:.0f} MiB of distinct weights; best of 5.",
        "GB/s counts the weight bytes each kernel reads (scales excluded); the share is of the measured bandwidth.",
        "",
        "| kernel | shape | tokens | GB/s | share of bandwidth | us per matrix | first call s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in f["rows"]:
        if "failed" in r:
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['tokens']} | failed: {r['failed']} | | | |")
        else:
            lines.append(
                f"| {r['kernel']} | {r['shape']} | {r['tokens']} | {r['gb_s']:.1f} | "
                f"{r['share_of_bandwidth']:.0%} | {r['us']:.0f} | {r['first_call_s']:.1f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
