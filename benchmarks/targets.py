"""The speed targets, read off committed runs: which are met on the machine those runs measured, by how much, and
what bounds the ones that are missed (the profile of a decode step, the kernels' rates). Every figure it prints
comes from the files it is given; nothing is measured here.

    python benchmarks/targets.py BENCH.json KERNELS.json [PEER.json] > benchmarks/results/<date>-targets-<cpu>.md

BENCH.json: `python benchmarks/bench.py` (build/bench.json); KERNELS.json: `python benchmarks/kernel_bench.py`;
PEER.json: `python benchmarks/peer/peer_bench.py` (llama.cpp on the same stand-in, ours timed in turn with it), when it
was run; an older one without ours beside it is set against BENCH.json's nearest row in bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = "fast path (this machine's choice)"
BLOG = "blog pipeline, fp32"
TARGETS = dict(default=1.5, low_precision=3.0, own_ceiling=0.7, peer=2.0, kernel_share=0.7)


def nearest(ours: list, per_token: float) -> dict:
    """Our fastest configuration among those that read about `per_token` bytes per token (within 5% of the nearest)."""
    gap = min(abs(r["bytes_per_token"] - per_token) for r in ours)
    close = [r for r in ours if abs(r["bytes_per_token"] - per_token) <= gap + 0.05 * per_token]
    return max(close, key=lambda r: r["decode_tok_s"])


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def step_line(row: dict) -> str:
    ms = row["step"]["ms"]
    loop = ms["generate's loop"]
    total = sum(ms.values())
    rest = total - ms["matrix products"]
    return (
        f"{row['name']}: {total:.1f} ms per step, matrix products {ms['matrix products']:.1f} ms, everything else "
        f"{rest:.1f} ms ({rest / total:.0%}; attention {ms['attention']:.1f}, other operators "
        f"{ms['other operators']:.1f}, outside operators {ms['outside operators']:.1f}, generate's loop "
        f"{loop:.1f}); {row['step']['per_step']['operators']:.0f} operators and "
        f"{row['step']['per_step']['conversions']:.0f} dtype conversions per step"
    )


def report(bench: dict, kernels: dict, peer: dict | None, sources: tuple) -> str:
    rows = {r["name"]: r for r in bench["rows"] if "error" not in r}
    default, blog = rows[DEFAULT], rows[BLOG]
    single = [r for r in rows.values() if r["prompts"] == 1]
    low = [r for r in single if r["quantize"] or (r["dtype"] == "bfloat16" and r["fast"])]
    best_low = max(low, key=lambda r: r["vs_naive"])
    lines = [
        f"# Speed targets on {bench['machine']}, {bench['date']}",
        "",
        f"Read off `{sources[0]}` ({bench['rounds']} round(s), {bench['new_tokens']} new tokens per configuration, memory read "
        f"bandwidth {bench['bandwidth'] / 1e9:.1f} GB/s), `{sources[1]}` (memory read bandwidth "
        f"{kernels['bandwidth_gb_s']:.1f} GB/s: the kernels' shares are of this one)"
        + (f" and `{sources[2]}`" if peer else "")
        + " by `benchmarks/targets.py`.",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| the notebooks' default at least {TARGETS['default']}x the blog's path | {default['vs_naive']:.2f}x "
        f"({default['decode_tok_s']:.1f} against {blog['decode_tok_s']:.1f} tok/s, {default['dtype']}) | "
        f"{verdict(default['vs_naive'] >= TARGETS['default'])} |",
        f"| the best low-precision configuration at least {TARGETS['low_precision']}x the blog's path | "
        f"{best_low['vs_naive']:.2f}x ({best_low['name']}) | {verdict(best_low['vs_naive'] >= TARGETS['low_precision'])} |",
        f"| the fast path at least {TARGETS['own_ceiling']:.0%} of its own ceiling | {default['efficiency']:.0%} of "
        f"{default['ceiling_tok_s']:.1f} tok/s | {verdict(default['efficiency'] >= TARGETS['own_ceiling'])} |",
    ]
    # fewer: the kernels of a weight in fewer bytes than float32's, low precision
    shares, fewer = {}, set()
    for k in kernels["rows"]:
        if "failed" not in k:
            shares.setdefault(k["kernel"], []).append(k["share_of_bandwidth"])
            if k["bytes_per_weight"] < 4:
                fewer.add(k["kernel"])
    whole = {name: min(s) for name, s in shares.items() if len(s) == 4}  # both shapes, 1 and 4 tokens
    low = {name: share for name, share in whole.items() if name in fewer}
    best_kernel = max(low, key=low.get)
    lines.append(
        f"| a weight scheme in fewer bytes than float32 read at {TARGETS['kernel_share']:.0%} or more of the "
        f"bandwidth at 1 and 4 tokens | {best_kernel}: {low[best_kernel]:.0%} at its worst shape and token count "
        f"(the kernel alone, as kernel_bench.py times it) | {verdict(low[best_kernel] >= TARGETS['kernel_share'])} |"
    )
    if peer:
        pairs = []
        for p in peer["rows"]:
            if "ours" in p:  # timed in turn with llama.cpp in its run: the median of the rounds' ratios
                pairs.append((p, p["ours"], p["ours"]["ratio"]))
            else:  # an older peer run, llama.cpp alone: ours from the bench run
                ours = nearest(single, p["bytes_per_token"])
                pairs.append((p, ours, p["decode_tok_s"] / ours["decode_tok_s"]))
        worst = max(pairs, key=lambda t: t[2])
        lines.append(
            f"| ours within {TARGETS['peer']}x of llama.cpp at the same bytes per token | worst: llama.cpp "
            f"{worst[0]['type']} {worst[2]:.2f}x ours ({worst[1]['name']}) | {verdict(worst[2] <= TARGETS['peer'])} |"
        )
    else:
        lines.append(
            f"| ours within {TARGETS['peer']}x of llama.cpp at the same bytes per token | not run here | |"
        )
    lines += ["", "## What bounds them", ""]
    lines.append(
        f"- The fast path's matrix products alone, each kind of weight at the best speed measured for its shape "
        f"on this machine, allow {default['matvec_ceiling_tok_s']:.1f} tok/s, "
        f"{default['matvec_ceiling_tok_s'] / default['ceiling_tok_s']:.0%} of its bandwidth ceiling."
    )
    lines += [f"- {step_line(r)}." for r in single if r.get("step")]
    lines += ["", "## Each kernel's worst share of the bandwidth (both expert shapes, 1 and 4 tokens)", ""]
    lines += [f"- {name}: {share:.0%}" for name, share in sorted(whole.items(), key=lambda t: -t[1])]
    part = {name: s for name, s in shares.items() if len(s) < 4}
    lines += [
        f"- {name}: {min(s):.0%} over the {len(s)} of the 4 shape and token counts it was measured at"
        for name, s in part.items()
    ]
    if peer:
        lines += ["", "## llama.cpp against ours at about the same bytes per token", ""]
        lines += [
            f"- llama.cpp {p['type']} ({p['bytes_per_token'] / 2**20:.0f} MiB per token): {p['decode_tok_s']:.1f} tok/s; "
            f"{ours['name']} ({ours['bytes_per_token'] / 2**20:.0f} MiB): {ours['decode_tok_s']:.1f} tok/s; "
            f"llama.cpp {ratio:.2f}x"
            + (
                f" (the median of {len(ours['ratios'])} rounds' ratios, each timed in turn with ours in the peer run: "
                f"{', '.join(f'{r:.2f}' for r in ours['ratios'])})"
                if "ratios" in ours
                else " (ours from the bench run)"
            )
            for p, ours, ratio in pairs
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    bench, kernels = (json.loads(Path(a).read_text()) for a in sys.argv[1:3])
    peer = json.loads(Path(sys.argv[3]).read_text()) if len(sys.argv) == 4 else None
    print(report(bench, kernels, peer, tuple(sys.argv[1:])), end="")
