"""The package's compiled step (`load_pipeline(compiled=True)`: decode.graph_step under torch.compile) against the fast
path's lean step, side by side in one process on this machine, and how far its logits stray.

    python benchmarks/compiled_step.py     # writes benchmarks/results/<date>-compiled-step-<cpu>.md and .json
    python benchmarks/compiled_step.py --fit int4 --run e     # int4 weights: <date>e-compiled-step-int4-<cpu>

Both run the same tokens one step at a time after the poem prompt: the loaded model's greedy answer (the lean step,
on a dynamic cache), then the graph on a static cache, teacher-forced. The graph's logits are not the lean step's bit
for bit (its attention runs in float32, its sums in other orders, and compiling rounds again), so they are compared
(top-1 agreement and the largest difference, against the lean step and against one forward over the whole sequence),
not asserted equal. load_pipeline(compiled=True) measures the same over 16 tokens at load; this runs longer.
Then where the compiled step's time goes (`graph_profile`): the same steps under torch.profiler, split into the product
operators (our kernels' and the library's, called from inside the compiled code or around it; a product inductor
computes itself is the compiled code's), the compiled
code's own time (inductor's fused kernels and the Python that calls them), the calls around it (dynamo's guard checks
and wrappers), the other operators, and the time outside any operator.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import machine_name  # noqa: E402
from harness import MATRIX_PRODUCTS  # noqa: E402
from kernel_bench import cpu_extensions, cpu_kind  # noqa: E402

from helpers.data import TASKS  # noqa: E402
from helpers.fastpath import _steps, race_steps  # noqa: E402
from helpers.files import atomic_file  # noqa: E402
from helpers.fitting import Fit  # noqa: E402
from helpers.generation import generate  # noqa: E402
from helpers.hardware import dtype_name, measure_bandwidth  # noqa: E402
from helpers.loading import load_local  # noqa: E402
from helpers.prompts import chat_ids  # noqa: E402
from helpers.sizing import decode_bytes  # noqa: E402
from helpers.standin import ensure_standin  # noqa: E402

AROUND = ("Torch-Compiled Region", "TorchDynamo Cache Lookup", "Pregraph bytecode", "AOTDispatcher")


def part_of(key: str) -> str:
    """The part of the compiled step a profiler event (its name) belongs to: a product operator (harness's list: ours
    and the library's), the compiled code's own time, the calls around it, or another operator."""
    if key in MATRIX_PRODUCTS:
        return "product operators"
    if "CompiledFxGraph" in key:
        return "compiled code"
    return "calls around it" if key.startswith(AROUND) else "other operators"


def graph_profile(model, prompt: list, ids: list) -> tuple[dict, float]:
    """(ms per step by part, ms per step unprofiled) over `ids` teacher-forced after `prompt` on a static cache, the
    model on its compiled step (see the module's docstring); the time outside any operator is the unprofiled steps'
    time less the operators', none where the profiler's own cost makes the operators' add up to more."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    def steps(profiler=None):
        cache = StaticCache(config=model.config, max_cache_len=len(prompt) + len(ids))
        model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        with profiler or contextlib.nullcontext():
            started = time.perf_counter()
            for token in ids:
                model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            return time.perf_counter() - started

    with torch.inference_mode():
        plain = min(steps() for _ in range(2))
        prof = profile(activities=[ProfilerActivity.CPU])
        steps(prof)
    parts = dict.fromkeys(("product operators", "compiled code", "calls around it", "other operators"), 0.0)
    for e in prof.key_averages():
        parts[part_of(e.key)] += e.self_cpu_time_total / 1000 / len(ids)
    if not parts["compiled code"]:
        raise RuntimeError("the profiled steps ran no compiled code: the compiled step did not apply to them")
    parts["outside operators"] = max(0.0, 1000 * plain / len(ids) - sum(parts.values()))
    return parts, 1000 * plain / len(ids)


def measure(tokens: int, fit: str | None = None) -> dict:
    import torch
    from transformers import DynamicCache

    # the fast path in this machine's dtype, as the notebooks load it; quantized where asked
    pipe = load_local(str(ensure_standin()), fit=Fit.quantized(fit) if fit else None, compiled=True)
    model = pipe.model
    kept = model.load_record.recipe.step.get("kept", False)  # the load's own race: generate's step if kept
    prompt = chat_ids(pipe.tokenizer, [{"role": "user", "content": TASKS["poem"]["prompt"]}])
    # the lean step's greedy answer, then the graph over the same tokens
    race = race_steps(model, prompt, tokens)
    assert race is not None, "the compiled step does not apply to this model"
    ids, lean, lean_s, graph, graph_s = (race[k] for k in ("ids", "lean", "lean_s", "graph", "graph_s"))
    with torch.inference_mode():
        reference = model(torch.tensor([prompt + ids])).logits[0, len(prompt) :].float()  # one forward
        _, _, lean_again = _steps(model, prompt, DynamicCache(config=model.config), ids)  # after, as a check
    bandwidth = measure_bandwidth()
    per_weight = model.load_record.bytes_per_parameter  # quantized: as measured
    per_token = decode_bytes(model.config, per_weight)["per_token"]  # the weights a token reads
    parts, plain_ms = graph_profile(model, prompt, ids)  # race_steps left the model on its compiled step
    # as many tokens through the package's generate (greedy): the median gap between two tokens
    times = generate(pipe, TASKS["poem"]["prompt"], max_new_tokens=len(ids) + 1, do_sample=False).token_times
    generate_ms = (
        1000 * statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else None
    )

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
        fit=fit,
        bandwidth_gb_s=bandwidth / 1e9,
        bytes_per_token=per_token,
        decoded=len(ids),
        compile_s=model.load_record.recipe.step["compile_s"],  # at load: race_steps' compile is cached
        graph_ms=graph_ms,
        lean_ms=lean_ms,
        vs_lean=lean_ms / graph_ms,
        graph_share=per_token / (graph_ms / 1000) / bandwidth,
        lean_share=per_token / (lean_ms / 1000) / bandwidth,
        against_lean=compared(graph, lean),
        against_one_forward=compared(graph, reference),
        lean_against_one_forward=compared(lean, reference),
        graph_parts=parts,
        unprofiled_ms=plain_ms,
        generate_ms=generate_ms,
        generated=len(times),
        generate_on_graph=kept,
    )


def markdown(r: dict) -> str:
    def row(name, c):
        return f"| {name} | {c['top1']:.1%} | {c['difference']:.3f} |"

    weights = f", {r['fit']} weights" if r.get("fit") else ""
    parts = r.get("graph_parts") or {}
    total = sum(parts.values())
    over = (
        f" The profiler's own cost: the parts add up to {total:.1f} ms against {r['unprofiled_ms']:.1f} ms for the "
        "same steps unprofiled, so each share is of a longer step."
        if parts and total > r["unprofiled_ms"] * 1.02
        else ""
    )
    on = (
        "the compiled step kept at load"
        if r.get("generate_on_graph")
        else "the lean step: the load did not keep it"
    )
    generated = (
        f"Through the package's `generate` (greedy, {r['generated']} tokens, {on}): {r['generate_ms']:.1f} ms per "
        f"token (the median gap between two tokens, one run), against the compiled step's median {r['graph_ms']:.1f} ms."
        if r.get("generate_ms")
        else ""
    )
    split = [
        "",
        "Where a step of the compiled step goes (the same steps under torch.profiler, each operator's own time; the "
        "time outside any operator from the same steps timed without it):" + over,
        "",
        "| part | ms per step | share |",
        "|---|---|---|",
        *(f"| {k} | {v:.1f} | {v / total:.0%} |" for k, v in parts.items()),
        f"| all | {total:.1f} | 100% |",
        "",
        generated,
    ] if parts else []  # fmt: skip

    return (
        "\n".join(
            [
                f"# The compiled step against the lean step, {r['date']}",
                "",
                f"`python benchmarks/compiled_step.py{' --fit ' + r['fit'] if r.get('fit') else ''}` on {r['machine']}, {r['threads']} threads, torch {r['torch']}: the "
                f"stand-in in {r['dtype']} (this machine's choice){weights}, {r['bytes_per_token'] / 2**20:.0f} MiB read per token, "
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
                *split,
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="decoded positions timed")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--fit", choices=("int8", "int4"), help="quantized weights (default: as loaded)")
    parser.add_argument("--run", default="", help="the day's run letter in the file name (b, c, ...)")
    args = parser.parse_args()
    if args.tokens < 1:
        sys.exit(f"--tokens {args.tokens}: give at least 1 decoded position to time")
    scheme = f"{args.fit}-" if args.fit else ""
    stem = f"{datetime.date.today().isoformat()}{args.run}-compiled-step-{scheme}{cpu_kind(cpu_extensions())}"
    taken = [p.name for p in (Path(args.out) / f"{stem}.json", Path(args.out) / f"{stem}.md") if p.exists()]
    if taken:  # an earlier run's file is never overwritten
        sys.exit(f"{', '.join(taken)} exists in {args.out}: name this run with --run (the day's run letter)")
    result = measure(args.tokens, args.fit)
    atomic_file(Path(args.out) / f"{stem}.json", lambda p: p.write_text(json.dumps(result, indent=1)))
    atomic_file(Path(args.out) / f"{stem}.md", lambda p: p.write_text(markdown(result)))
    print(markdown(result))
