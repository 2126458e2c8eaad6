"""Why a product that torch.compile writes over int8 weights reads them slowly on some CPUs: inductor's C++ turns each
vector of int8 values into floats, and this measures what that conversion costs here, apart from any product.

    python benchmarks/int8_unpack.py     # writes benchmarks/results/<date>-int8-unpack-<cpu>.md and .json

Two tables, each timing read over 256 MiB or more of distinct data (larger than the caches), best of 5, with torch's
threads as set (OMP_NUM_THREADS):
- conversions: `x.float().sum()` compiled, over one flat buffer of each dtype: GB/s of the dtype read. Summing a float32
  buffer converts nothing, so the gap to it is the conversion's.
- one expert's product (the stand-in's gate_up shape, 3072 x 576, one token): GB/s of weights read, for int8 weights
  by a compiled reduction along each row, along the columns (the weight stored transposed), and with the int8 values
  packed four to an int32 word and taken apart by shifts and masks (no int8 conversion), against bf16 weights by the
  same row reduction and against torch's own int8 kernel (`_weight_int8pack_mm`, bf16 activations). Each product is
  checked against float32 arithmetic on the same values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import machine_name  # noqa: E402
from kernel_bench import cpu_extensions, cpu_kind  # noqa: E402

from helpers.files import atomic_file  # noqa: E402
from helpers.hardware import best_seconds, measure_bandwidth, timing_buffer_bytes  # noqa: E402

N, K = 3072, 576  # the stand-in's gate_up weight of one expert: outputs x inputs
BIAS = 8388608.0 + 128.0  # 2**23 + 128: the float whose low mantissa byte holds a stored uint8 (int8 + 128)


def _unpacked(words, j: int):
    """The j-th byte of each int32 word as the float it stores (int8 + 128 kept as uint8): the byte put into the
    mantissa of 2**23 by bit operations, then the offset taken off; no int8 conversion."""
    import torch

    return (((words >> (8 * j)) & 255) | 0x4B000000).view(torch.float32) - BIAS


def products() -> dict:
    """{name: (bytes per weight, make(q int8 [N, K]) -> held weight, product(x float32 [K], held) -> [N])}."""
    import torch

    def words(q):  # [N, K] int8 -> [N, K/4] int32, four weights (each + 128, as uint8) to a word
        return (q.to(torch.int16) + 128).to(torch.uint8).view(torch.int32)

    def packed(x, w):
        x4 = x.view(-1, 4)  # [K/4, 4]: the inputs the four bytes of each word multiply
        return sum((_unpacked(w, j) * x4[:, j]).sum(-1) for j in range(4))

    return {
        "int8 rows, compiled reduction": (1, lambda q: q, lambda x, q: (q.float() * x).sum(-1)),
        "int8 columns, compiled reduction": (
            1,
            lambda q: q.t().contiguous(),
            lambda x, q: (q.float() * x[:, None]).sum(0),
        ),
        "int8 as int32 words, unpacked by bit operations": (1, words, packed),
        "bf16 rows, compiled reduction": (2, lambda q: q.bfloat16(), lambda x, w: (w.float() * x).sum(-1)),
        "int8 weights, bf16 activations (_weight_int8pack_mm, not compiled)": (
            1,
            lambda q: q,
            lambda x, q: torch.ops.aten._weight_int8pack_mm(
                x.bfloat16()[None], q, torch.ones(N, dtype=torch.bfloat16)
            )[0].float(),
        ),
    }


def measure() -> dict:
    import torch

    total, rows = timing_buffer_bytes(), {"conversions": [], "products": []}
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.bfloat16, torch.float32):
        flat = torch.ones(total // dtype.itemsize, dtype=dtype)
        convert = torch.compile(lambda t: t.float().sum(), dynamic=False)
        convert(flat)
        seconds = best_seconds(lambda: convert(flat), rounds=5)
        rows["conversions"].append(
            dict(dtype=str(dtype).replace("torch.", ""), gb_s=flat.nbytes / seconds / 1e9)
        )
    generator = torch.Generator().manual_seed(0)
    count = total // (N * K)
    q = [torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=generator) for _ in range(count)]
    x = torch.randn(K, generator=generator).bfloat16().float()  # bf16 values: torch's kernel rounds x to bf16
    for name, (size, make, product) in products().items():
        held = [make(w) for w in q]
        run = product if "not compiled" in name else torch.compile(product, dynamic=False)
        expected = (q[0].float() * x).sum(-1)
        error = float((run(x, held[0]) - expected).abs().max() / expected.abs().max())

        def cycle():
            for w in held:
                run(x, w)

        seconds = best_seconds(cycle, rounds=5) / count
        rows["products"].append(
            dict(name=name, gb_s=N * K * size / seconds / 1e9, us=seconds * 1e6, error=error)
        )
    return rows


def markdown(f: dict) -> str:
    lines = [
        f"# int8 and the code torch.compile writes, {f['date']}",
        "",
        f"`python benchmarks/int8_unpack.py` on {f['machine']}, {f['threads']} threads, torch {f['torch']}. Memory read "
        f"bandwidth {f['bandwidth'] / 1e9:.1f} GB/s (helpers.measure_bandwidth); each timing reads "
        f"{f['timing_bytes'] / 2**20:.0f} MiB of distinct data, best of 5.",
        "",
        "## Converting to float32 and summing, compiled (GB/s of the dtype read)",
        "",
        "| dtype | GB/s | share of bandwidth |",
        "|---|---|---|",
        *(
            f"| {r['dtype']} | {r['gb_s']:.1f} | {r['gb_s'] * 1e9 / f['bandwidth']:.0%} |"
            for r in f["conversions"]
        ),
        "",
        f"## One expert's product, {N} x {K}, one token (GB/s of weights read)",
        "",
        "| product | GB/s | share of bandwidth | us per matrix | largest difference from float32, share of the largest output |",
        "|---|---|---|---|---|",
        *(
            f"| {r['name']} | {r['gb_s']:.1f} | {r['gb_s'] * 1e9 / f['bandwidth']:.0%} | {r['us']:.0f} | {r['error']:.1e} |"
            for r in f["products"]
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    import torch

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    found = dict(
        date=datetime.date.today().isoformat(),
        machine=machine_name(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        bandwidth=measure_bandwidth(),
        timing_bytes=timing_buffer_bytes(),
        **measure(),
    )
    text = markdown(found)
    print(text)
    out = ROOT / "benchmarks" / "results" / f"{found['date']}-int8-unpack-{cpu_kind(cpu_extensions())}"
    atomic_file(out.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(found, indent=1)))
    atomic_file(out.with_suffix(".md"), lambda tmp: tmp.write_text(text))
    print(f"wrote {out}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
