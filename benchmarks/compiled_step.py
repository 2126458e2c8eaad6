"""The package's compiled step (`load_pipeline(compiled=True)`: decode.graph_step under torch.compile) against the fast
path's lean step, side by side in one process on this machine, and how far its logits stray.

    python benchmarks/compiled_step.py     # writes benchmarks/results/<date>-compiled-step-<cpu>.md and .json

Both run the same tokens one step at a time after the poem prompt: the loaded model's greedy answer (the lean step,
on a dynamic cache), then the graph on a static cache, teacher-forced. The graph's logits are not the lean step's bit
for bit (its attention runs in float32, its sums in other orders, and compiling rounds again), so they are compared
(top-1 agreement and the largest difference, against the lean step and against one forward over the whole sequence),
not asserted equal. load_pipeline(compiled=True) measures the same over 16 tokens at load; this runs longer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import machine_name  # noqa: E402
from kernel_bench import cpu_extensions, cpu_kind  # noqa: E402

from helpers.data import TASKS  # noqa: E402
from helpers.fastpath import _steps, race_steps  # noqa: E402
from helpers.files import atomic_file  # noqa: E402
from helpers.hardware import dtype_name, measure_bandwidth  # noqa: E402
from helpers.loading import load_local  # noqa: E402
from helpers.prompts import chat_ids  # noqa: E402
from helpers.sizing import decode_bytes  # noqa: E402
from helpers.standin import ensure_standin  # noqa: E402


def measure(tokens: int) -> dict:
    import torch
    from transformers import DynamicCache

    pipe = load_local(
        str(ensure_standin())
    )  # the fast path in this machine's dtype, as the notebooks load it
    model = pipe.model
    prompt = chat_ids(pipe.tokenizer, [{"role": "user", "content": TASKS["poem"]["prompt"]}])
    # the lean step's greedy answer, then the graph over the same tokens
    race = race_steps(model, prompt, tokens)
    assert race is not None, "the compiled step does not apply to this model"
    ids, lean, lean_s, graph, graph_s = (race[k] for k in ("ids", "lean", "lean_s", "graph", "graph_s"))
    with torch.inference_mode():
        reference = model(torch.tensor([prompt + ids])).logits[0, len(prompt) :].float()  # one forward
        _, _, lean_again = _steps(model, prompt, DynamicCache(config=model.config), ids)  # after, as a check
    bandwidth = measure_bandwidth()
    per_token = decode_bytes(model.config, model.dtype.itemsize)["per_token"]  # the weights a token reads

    def compared(logits, against):
        return dict(
            top1=float((logits.argmax(-1) == against.argmax(-1)).float().mean()),
            difference=float((logits - against).abs().max() / against.abs().max()),
        )

    graph_ms, lean_ms = 1000 * statistics.median(graph_s), 1000 * statistics.median(lean_s + lean_again)
    return dict(
        date=datetime.date.today().isoformat(),
        machine=machine_name(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        dtype=dtype_name(model.dtype),
        bandwidth_gb_s=bandwidth / 1e9,
        bytes_per_token=per_token,
        decoded=len(ids),
        compile_s=race["compile_s"],
        graph_ms=graph_ms,
        lean_ms=lean_ms,
        vs_lean=lean_ms / graph_ms,
        graph_share=per_token / (graph_ms / 1000) / bandwidth,
        lean_share=per_token / (lean_ms / 1000) / bandwidth,
        against_lean=compared(graph, lean),
        against_one_forward=compared(graph, reference),
        lean_against_one_forward=compared(lean, reference),
    )


def markdown(r: dict) -> str:
    def row(name, c):
        return f"| {name} | {c['top1']:.1%} | {c['difference']:.3f} |"

    return (
        "\n".join(
            [
                f"# The compiled step against the lean step, {r['date']}",
                "",
                f"`python benchmarks/compiled_step.py` on {r['machine']}, {r['threads']} threads, torch {r['torch']}: the "
                f"stand-in in {r['dtype']} (this machine's choice), {r['bytes_per_token'] / 2**20:.0f} MiB read per token, "
                f"memory read bandwidth {r['bandwidth_gb_s']:.1f} GB/s. The same {r['decoded']} tokens one step at a time "
                "after the poem prompt; each time is the median step (the lean step's over its two runs, one before the "
                "graph and one after).",
                "",
                "| step | ms per step | tok/s | share of the ceiling |",
                "|---|---|---|---|",
                f"| lean step (the fast path) | {r['lean_ms']:.1f} | {1000 / r['lean_ms']:.1f} | {r['lean_share']:.0%} |",
                f"| compiled step | {r['graph_ms']:.1f} | {1000 / r['graph_ms']:.1f} | {r['graph_share']:.0%} |",
                "",
                f"The graph: {r['vs_lean']:.2f}x the lean step's speed, after {r['compile_s']:.0f} s compiling (inductor's "
                "cache folder holds the result for the next process).",
                "",
                "| logits | same top-1 token | largest difference (share of the largest logit) |",
                "|---|---|---|",
                row("graph against the lean step", r["against_lean"]),
                row("graph against one forward over the whole sequence", r["against_one_forward"]),
                row("lean step against one forward over the whole sequence", r["lean_against_one_forward"]),
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="decoded positions timed")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.tokens < 1:
        sys.exit(f"--tokens {args.tokens}: give at least 1 decoded position to time")
    result = measure(args.tokens)
    stem = f"{result['date']}-compiled-step-{cpu_kind(cpu_extensions())}"
    atomic_file(Path(args.out) / f"{stem}.json", lambda p: p.write_text(json.dumps(result, indent=1)))
    atomic_file(Path(args.out) / f"{stem}.md", lambda p: p.write_text(markdown(result)))
    print(markdown(result))
