"""`make bench`: decode speed of the stand-in in each configuration, side by side in one run,
against this machine's memory-bandwidth ceiling. Figures and ratios, never pass/fail.

    python benchmarks/bench.py            # 64 new tokens per configuration (about 10 minutes on 2 cores)
    python benchmarks/bench.py --quick    # proves every configuration runs: 8 new tokens, fewer loads, no warm-up run
    python benchmarks/bench.py --only fast --only blog   # configurations whose name contains a word
    python benchmarks/bench.py --rounds 3   # every configuration 3 times, round-robin: best of 3, and the range
    python benchmarks/bench.py --notebooks --tokens 24 --out build/bench-notebooks   # the run 08 and 10 share

Writes build/bench.json, build/bench.md and build/bench.png.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import CONFIGS, NAIVE, measure  # noqa: E402

from helpers.data import GB, GiB  # noqa: E402
from helpers.fastpath import KERNELS, STEP_NAMES  # noqa: E402
from helpers.files import atomic_file  # noqa: E402
from helpers.hardware import cpu_has_native_bf16, cpuinfo, dtype_name, gpus  # noqa: E402
from helpers.loading import pick_dtype  # noqa: E402

REUSE_S = 3600  # --notebooks reuses a run with the same key that finished less than an hour ago


def notebook_configs() -> list:
    """The configurations 08 and 10 show, in one run they share: the blog's path, the fast path in this machine's
    dtype and in the other one, with the lean step only (no step written layer by layer), its four prompts one at a
    time and batched (08), int8 and int4 weights (10)."""
    import torch

    other = "fast path in " + ("fp32" if pick_dtype()[0] == torch.bfloat16 else "bf16")
    wanted = (
        NAIVE,
        "fast path (this machine's choice)",
        other,
        "fast path, the lean step only",
        "4 prompts, one at a time (fast path)",
        "4 prompts, one batch (fast path)",
        "int8 weights (fast path)",
        "int4 weights (fast path)",
    )
    return [c for c in CONFIGS if c.name in wanted]


def run_key(configs: list, tokens: int, warmup: int, rounds: int) -> str:
    """What makes two runs the same: the configurations, the settings, the machine, the dtype it picks (or
    MIXTRAL_DTYPE names), torch's threads, the library versions and the code that measures (benchmarks/ and
    helpers/, byte for byte)."""
    import torch
    import transformers

    code = hashlib.sha256()
    for path in sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "helpers").glob("*.py")]):
        code.update(path.name.encode() + path.read_bytes())
    return json.dumps(
        dict(
            configs=[c.name for c in configs],
            tokens=tokens,
            warmup=warmup,
            rounds=rounds,
            machine=machine_name(),
            dtype=dtype_name(pick_dtype()[0]),
            threads=torch.get_num_threads(),
            versions=[torch.__version__, transformers.__version__],
            code=code.hexdigest()[:16],
        )
    )


def reusable(out: Path, key: str) -> dict | None:
    """The result in `out` if it has `key` and finished less than REUSE_S ago, else None."""
    try:
        result = json.loads((out / "bench.json").read_text())
    except (OSError, ValueError):
        return None
    fresh = time.time() - result.get("finished", 0) < REUSE_S
    return (
        result
        if result.get("key") == key and fresh and all("error" not in r for r in result["rows"])
        else None
    )


def machine_name() -> str:
    """What ran the benchmark, for its results file: the CPU's model name (Linux's /proc/cpuinfo; elsewhere what
    platform says), its architecture, cores and whether it computes bf16 natively, and any GPU."""
    name = cpuinfo("model name") or platform.processor() or "an unnamed CPU"
    cpu = f"{name} ({platform.machine()}, {os.cpu_count()} cores, native bf16: {'yes' if cpu_has_native_bf16() else 'no'})"
    return "; ".join([cpu, *(f"GPU {g['index']}: {g['name']}" for g in gpus())])


def bench_table(result: dict) -> str:
    """The measurements as a markdown table, one row per configuration."""
    head = (
        "| configuration | dtype | experts | load s | first token s | decode tok/s | ceiling tok/s "
        "| efficiency | vs blog's path | peak memory GiB |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |||||||||")
            continue
        compile_note = f" (+{r['compile_s']:.0f} s compile)" if r.get("compile_s") else ""
        batch_note = (
            f", {r['sequences']} prompts" + (" batched" if r["batch"] > 1 else " in turn")
            if r["sequences"] > 1
            else ""
        )
        spread = (
            f" ({min(r['all_tok_s']):.1f}-{max(r['all_tok_s']):.1f})"
            if len(r.get("all_tok_s", [])) > 1
            else ""
        )
        ratio = f"{r['vs_naive']:.2f}x" if r.get("vs_naive") else "-"  # without the blog's row, no ratio
        load = f"{r['load_s']:.1f}" if r.get("loaded_with", [r["name"]])[0] == r["name"] else "shared"
        lines.append(
            f"| {r['name']} | {r['dtype']} | {r['experts']}{batch_note} | {load}{compile_note} | {r['ttft_s']:.2f} "
            f"| {r['decode_tok_s']:.1f}{spread} | {r['ceiling_tok_s']:.1f} | {r['efficiency']:.0%} "
            f"| {ratio} | {r['peak_memory'] / GiB:.1f} |"
        )
    return "\n".join(lines)


def bench_summary(result: dict) -> str:
    """What the numbers say, in sentences: the ceiling, the fast path against the blog's path."""
    rows = {r["name"]: r for r in result["rows"] if "error" not in r}
    lines = (
        [
            "quick run: it proves that every configuration runs (no warm-up run, few tokens, one load where this "
            "machine's choice of dtype is also named); its figures are not measurements of speed"
        ]
        if result.get("quick")
        else []
    )
    lines += [
        f"{result.get('rounds', 1)} round(s); each configuration's best round is shown"
        + (" (the range of its rounds in brackets)" if result.get("rounds", 1) > 1 else ""),
        f"memory read bandwidth {result['bandwidth'] / GB:.1f} GB/s (best of "
        f"{', '.join(f'{b / GB:.1f}' for b in result['bandwidths'])} measured before and after)",
    ]
    shared = [
        r["loaded_with"]
        for r in result["rows"]
        if len(r.get("loaded_with", [])) > 1 and r["loaded_with"][0] == r["name"]
    ]
    if shared:
        lines.append(
            "one process and one load for the configurations with the same load settings (the load time is on "
            'the first of each; "shared" on the others): ' + "; ".join(", ".join(g) for g in shared)
        )
    fast = rows.get("fast path (this machine's choice)")
    naive = rows.get(NAIVE)
    if fast and naive:
        lines.append(
            f"fast path: {fast['decode_tok_s']:.1f} tok/s = {fast['vs_naive']:.2f}x the blog's path "
            f"({naive['decode_tok_s']:.1f} tok/s), {fast['efficiency']:.0%} of the {fast['ceiling_tok_s']:.1f} "
            f"tok/s bandwidth ceiling for {fast['bytes_per_token'] / 2**20:.0f} MiB read per token"
        )
        if fast.get("matvec_ceiling_tok_s"):
            lines.append(
                f"the matrix-vector kernels alone, at the best speed measured for each weight shape here, "
                f"allow {fast['matvec_ceiling_tok_s']:.1f} tok/s "
                f"({fast['matvec_ceiling_tok_s'] / fast['ceiling_tok_s']:.0%} of the bandwidth ceiling)"
            )
    for part, name in (
        ("the step written layer by layer", "fast path, the lean step only"),
        ("the lean step", "fast path without the lean step"),
        ("inference_mode", "fast path under no_grad, not inference_mode"),
        ("the packed copies", "fast path without the packed copies"),
    ):
        off = rows.get(name)
        if (
            off
            and fast
            and name.endswith("packed copies")
            and not any(KERNELS[k["chosen"]][0] == "packed" for k in fast["kernels"].values())
        ):
            lines.append(
                f"{part}: none chosen on this machine, so the row without them is the fast path again"
            )
            continue
        if off and fast and name.endswith("lean step only") and not (fast.get("graph") or {}).get("kept"):
            lines.append(
                f"{part}: none kept at load on this machine, so the row with the lean step only is the fast path again"
            )
            continue
        # with our operator kept, the lean step's own gain is the row with it only against the row without it
        lean_only = rows.get("fast path, the lean step only")
        graph = (fast or {}).get("graph") or {}
        kept = bool(name.endswith("without the lean step") and lean_only and graph.get("kept"))
        on, who = (lean_only, "the fast path with the lean step only") if kept else (fast, "the fast path")
        if on and off and off.get("step") and on.get("step"):
            lines.append(
                f"{part}: {who} decodes at {on['decode_tok_s'] / off['decode_tok_s']:.2f}x its speed "
                f"without it ({on['decode_tok_s']:.1f} against {off['decode_tok_s']:.1f} tok/s; "
                f"{sum(on['step']['ms'].values()):.1f} against {sum(off['step']['ms'].values()):.1f} ms per profiled step, "
                f"{on['step']['per_step']['operators']:.0f} against {off['step']['per_step']['operators']:.0f} "
                f"operators)"
            )
    for label, graph in (
        ("the fast path's", fast),
        ("with torch.compile's graph raced too,", rows.get("fast path, torch.compile's graph raced too")),
        ("int8 weights,", rows.get("int8 weights (fast path)")),
        ("int4 weights,", rows.get("int4 weights (fast path)")),
    ):
        if not (graph and graph.get("graph") and graph["graph"].get("tokens") and naive):
            continue  # no row, or a model whose steps no step written layer by layer can take
        g = graph["graph"]
        # a run before our layer operator raced only torch.compile's graph
        candidates = g.get("candidates") or {"compiled": dict(ms=g["graph_ms"], ready_s=g["compile_s"])}
        raced = ", ".join(
            f"{STEP_NAMES[n]} {c['ms']:.1f}"
            + (f" after {c['ready_s']:.0f} s compiling" if n == "compiled" else "")
            for n, c in candidates.items()
        )
        lines.append(
            f"{label} one token's step raced at load, ms a step: the lean step {g['lean_ms']:.1f}, {raced}; "
            + (f"kept: {STEP_NAMES[g.get('step', 'compiled')]}" if g["kept"] else "none kept: the lean step")
            + f" ({graph['decode_tok_s']:.1f} tok/s = {graph['vs_naive']:.2f}x the blog's path, "
            f"{graph['efficiency']:.0%} of its ceiling)"
        )
    if sampler := result.get("sampler"):
        ms = sampler["ms"]
        lines.append(
            f"choosing a sampled token with the blog's knobs ({sampler['vocabulary']:,} logits; every row samples with "
            "them, the fast path's rows through its sampler, the others through transformers' warpers, so each row's "
            f"tok/s holds one of these): transformers' warpers {ms['transformers']:.2f} ms, the fast path's sampler "
            f"{ms['fast path']:.2f} ms ({ms['transformers'] / ms['fast path']:.1f}x)"
        )
    for scheme in ("int8", "int4"):
        quantized = rows.get(f"{scheme} weights (fast path)")
        if quantized and naive:
            lines.append(
                f"{scheme} weights: {quantized['decode_tok_s']:.1f} tok/s = {quantized['vs_naive']:.2f}x the blog's path"
                + (f", {quantized['decode_tok_s'] / fast['decode_tok_s']:.2f}x the fast path" if fast else "")
                + f", for {quantized['bytes_per_token'] / 2**20:.0f} MiB read per token "
                f"({naive['bytes_per_token'] / quantized['bytes_per_token']:.1f}x fewer than the blog's path): "
                f"{quantized['efficiency']:.0%} of its {quantized['ceiling_tok_s']:.0f} tok/s ceiling"
            )
    for name, row in rows.items():
        tiers, mib = row.get("tiers"), 2**20
        if not tiers:
            continue
        base, label = (naive, "the blog's path") if row.get("ram_gib") else (fast, "the fast path")
        against = (
            f" = {row['decode_tok_s'] / base['decode_tok_s']:.2f}x {label} all in memory" if base else ""
        )
        lines.append(
            f"{name}: {row['decode_tok_s']:.1f} tok/s{against}; per token {tiers.get('resident', 0) / mib:.0f} MiB read "
            f"in place, {tiers.get('from disk', 0) / mib:.0f} MiB from disk"
            + (f" (hit rate {tiers['hit_rate']:.0%})" if "hit_rate" in tiers else "")
            + (
                f", of which the storage device gave {tiers['storage'] / mib:.0f} MiB (the OS page cache the rest)"
                if tiers.get("storage") is not None
                else ""
            )
        )
    one, many = rows.get("4 prompts, one at a time (fast path)"), rows.get("4 prompts, one batch (fast path)")
    if one and many:
        lines.append(
            f"four prompts as one batch: {many['throughput_tok_s']:.1f} tok/s in all over the whole call (prompt pass included) against "
            f"{one['throughput_tok_s']:.1f} one at a time ({many['throughput_tok_s'] / one['throughput_tok_s']:.2f}x)"
        )
    dense = rows.get("dense SmolLM2 fp32 (the stand-in's source)")
    moe = rows.get("fp32 grouped_mm")
    if dense and moe:
        lines.append(
            f"the MoE decodes at {moe['decode_tok_s'] / dense['decode_tok_s']:.2f}x its dense source's speed "
            f"for {moe['bytes_per_token'] / dense['bytes_per_token']:.2f}x the bytes per token"
        )
    return "\n".join(lines)


def draw_bench(result: dict, title: str | None = None):
    """Horizontal bars: decode tok/s per configuration, each with its bandwidth ceiling marked."""
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.4))
    names = [r["name"] for r in rows][::-1]
    speeds = [r["decode_tok_s"] for r in rows][::-1]
    ceilings = [r["ceiling_tok_s"] for r in rows][::-1]
    colors = [
        "tab:gray" if r["name"] == NAIVE else "tab:green" if r.get("fast") else "tab:blue" for r in rows
    ][::-1]
    ax.barh(names, speeds, color=colors)
    ax.scatter(ceilings, names, marker="|", s=300, color="black", label="bandwidth ceiling")
    for y, (v, c) in enumerate(zip(speeds, ceilings)):
        ax.text(v, y, f" {v:.1f} ({v / c:.0%})", va="center", fontsize=8)
    ax.set_xlabel("decode tokens/s (after the first token); in brackets: share of the ceiling")
    ax.set_title(
        title
        or f"Decode speed against the memory-bandwidth ceiling ({result['device']}, "
        f"{result['bandwidth'] / GB:.0f} GB/s)\ngrey: the blog's path; green: the fast path",
        fontsize=11,
    )
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="to prove every configuration runs: 8 new tokens, 2 warm-up "
        "steps, no warm-up run (but where code compiles), one load where this machine's dtype is named",
    )
    parser.add_argument("--tokens", type=int, default=64, help="new tokens timed per configuration")
    parser.add_argument(
        "--warmup", type=int, default=4, help="decode steps after the first token left out of tok/s"
    )
    parser.add_argument(
        "--only", action="append", default=[], help="run configurations whose name contains this"
    )
    parser.add_argument(
        "--notebooks",
        action="store_true",
        help="the configurations 08 and 10 show, in one run they "
        "share: a run in --out with the same configurations, settings, machine and code, finished less "
        "than an hour ago, is shown again instead of measured again (a run in progress is waited for)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every configuration this many times, round-robin; keep each one's best",
    )
    parser.add_argument("--out", default=str(ROOT / "build"), help="folder for bench.json, .md, .png")
    args = parser.parse_args(argv)
    tokens, warmup = (8, 2) if args.quick else (args.tokens, args.warmup)
    if tokens < 2 + warmup:
        parser.error(f"--tokens must be at least {2 + warmup}")
    if args.notebooks and (args.only or args.quick):
        parser.error("--notebooks names its own configurations: leave out --only and --quick")
    configs = (
        notebook_configs()
        if args.notebooks
        else [c for c in CONFIGS if not args.only or any(o.lower() in c.name.lower() for o in args.only)]
    )
    if not configs:
        parser.error(f"no configuration matches {args.only}; names: " + "; ".join(c.name for c in CONFIGS))
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    out = Path(args.out)
    if not args.notebooks:
        return run(args, configs, tokens, warmup, out)
    out.mkdir(parents=True, exist_ok=True)
    key = run_key(configs, tokens, warmup, args.rounds)
    with open(out / ".lock", "w") as lock:  # a second notebook running this at the same time waits here
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("another notebook is running this benchmark: waiting for its results", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        result = reusable(out, key)
        if result is None:
            (out / "bench.json").unlink(
                missing_ok=True
            )  # a run that fails leaves no older results to be read as its own
            return run(args, configs, tokens, warmup, out, key=key)
    print(
        f"the same configurations, settings, machine and code were measured at {time.strftime('%H:%M', time.localtime(result['finished']))} "
        f"(less than an hour ago), in {result['seconds']:.0f} s: their results, in {out}, are shown again "
        f"(delete {out / 'bench.json'} to measure again)\n\n{bench_table(result)}\n\n{bench_summary(result)}"
    )
    return 0


def run(args, configs: list, tokens: int, warmup: int, out: Path, key: str | None = None) -> int:
    """Measure `configs`, print the table and write bench.json, .md and .png to `out`: 0 if every one ran."""
    started = time.perf_counter()
    result = measure(
        configs,
        new_tokens=tokens,
        warmup=warmup,
        rounds=args.rounds,
        progress=lambda m: print(m, flush=True),
        quick=args.quick,
    )
    result.update(
        machine=machine_name(),
        key=key,
        finished=time.time(),
        date=time.strftime("%Y-%m-%d"),
        seconds=time.perf_counter() - started,
    )
    table, summary = bench_table(result), bench_summary(result)
    print("\n" + table + "\n\n" + summary)

    for name, text in (
        ("bench.json", json.dumps(result, indent=1)),
        (
            "bench.md",
            f"# make bench, {result['date']}\n\n{result['machine']}\n\n{table}\n\n"
            + "\n".join(f"- {line}" for line in summary.splitlines())
            + "\n",
        ),
    ):
        atomic_file(out / name, lambda tmp: tmp.write_text(text))
    figure = draw_bench(result)
    atomic_file(out / "bench.png", lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    print(f"\nwrote {out}/bench.json, bench.md, bench.png in {result['seconds']:.0f} s")
    return 0 if all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
