"""`make bench`: decode speed of the stand-in in each configuration, side by side in one run,
against this machine's memory-bandwidth ceiling. Figures and ratios, never pass/fail.

    python benchmarks/bench.py            # 64 new tokens per configuration (about 10 minutes on 2 cores)
    python benchmarks/bench.py --quick    # 8 new tokens: proves every configuration runs
    python benchmarks/bench.py --only fast --only blog   # configurations whose name contains a word
    python benchmarks/bench.py --rounds 3   # every configuration 3 times, round-robin: best of 3, and the range

Writes build/bench.json, build/bench.md and build/bench.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.speed import CONFIGS, bench_summary, bench_table, draw_bench, measure, write_report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 new tokens, 2 warm-up: to prove it runs")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens timed per configuration")
    parser.add_argument("--only", action="append", default=[], help="run configurations whose name contains this")
    parser.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, round-robin; keep each one's best")
    parser.add_argument("--out", default=str(ROOT / "build"), help="folder for bench.json, .md, .png")
    args = parser.parse_args(argv)
    tokens, warmup = (8, 2) if args.quick else (args.tokens, 4)
    if tokens < 2 + warmup:
        parser.error(f"--tokens must be at least {2 + warmup}")
    configs = [c for c in CONFIGS if not args.only or any(o.lower() in c["name"].lower() for o in args.only)]
    if not configs:
        parser.error(f"no configuration matches {args.only}; names: " + "; ".join(c["name"] for c in CONFIGS))

    started = time.perf_counter()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    result = measure(configs, new_tokens=tokens, warmup=warmup, rounds=args.rounds, progress=lambda m: print(m, flush=True))
    result.update(machine=f"{platform.machine()}, {platform.processor() or 'cpu'}", quick=args.quick,
                  date=time.strftime("%Y-%m-%d"), seconds=time.perf_counter() - started)
    table, summary = bench_table(result), bench_summary(result)
    print("\n" + table + "\n\n" + summary)

    out = Path(args.out)
    for name, text in (("bench.json", json.dumps(result, indent=1)),
                       ("bench.md", f"# make bench, {result['date']}\n\n{table}\n\n" +
                        "\n".join(f"- {line}" for line in summary.splitlines()) + "\n")):
        write_report(out / name, lambda tmp: tmp.write_text(text))
    figure = draw_bench(result)
    write_report(out / "bench.png", lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    print(f"\nwrote {out}/bench.json, bench.md, bench.png in {result['seconds']:.0f} s")
    return 0 if all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
