"""Before and after: the fast path's decode, ms per token, for two or more checkouts of this project, each load in a
process of its own, taken in turn round after round (this machine's noise falls on all of them alike).

    git worktree add /tmp/before HEAD~1
    python benchmarks/ab_step.py /tmp/before .            # prints a markdown table; --dtype, --rounds, --tokens
    python benchmarks/ab_step.py /tmp/before . --json rounds.json   # and every round's figures, as JSON

Each process loads the stand-in by `load_pipeline` (the fast path as it would load here, in the dtype given), then
generates --tokens new tokens after the poem's prompt three times greedy and three times with the blog's sampling,
and reports the best of each (noise only ever slows a run down), with the memory bandwidth it measured and the step
its load kept (with the race's figures). The table gives each checkout's best over the rounds and each round's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def child(root: str, dtype: str, tokens: int) -> dict:
    """One checkout's figures, in this process (the checkout at `root` first on the path)."""
    sys.path.insert(0, str(Path(root).resolve()))
    import torch

    from helpers import load_pipeline
    from helpers.backends import as_backend
    from helpers.data import BLOG_SAMPLING, TASKS
    from helpers.hardware import measure_bandwidth
    from helpers.prompts import chat_ids

    pipe = load_pipeline(dtype=getattr(torch, dtype))
    step = pipe.model.load_record.recipe.step
    ids, run = chat_ids(pipe.tokenizer, TASKS["poem"]["prompt"]), as_backend(pipe).run
    run([ids], dict(do_sample=False, max_new_tokens=8), seed=0)  # warm
    best = {}
    for name, knobs in (("greedy", dict(do_sample=False)), ("sampled", dict(BLOG_SAMPLING))) * 3:
        answer = run([ids], dict(knobs, max_new_tokens=tokens, min_new_tokens=tokens), seed=0)[0]
        ms = 1000 * (answer.token_times[-1] - answer.token_times[0]) / (tokens - 1)
        best[name] = min(best.get(name, ms), ms)
    race = {name: c["ms"] for name, c in step.get("candidates", {}).items()}
    return dict(best, step=step.get("step") or "lean", race=race, lean=step.get("lean_ms"),
                bandwidth=measure_bandwidth() / 1e9)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", help="checkouts of this project (two or more)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--json", help="also write every round's figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dtype, args.tokens)))
        return
    if len(args.roots) < 2 or any(not (Path(r) / "helpers" / "__init__.py").is_file() for r in args.roots):
        parser.error("give two or more checkouts of this project (folders holding helpers/)")
    command = [sys.executable, __file__, "--dtype", args.dtype, "--tokens", str(args.tokens), "--child"]
    rounds = {root: [] for root in args.roots}
    for r in range(args.rounds):
        for root in args.roots:
            done = subprocess.run([*command, root], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{root}, round {r + 1}, failed:\n{done.stderr[-2000:]}")
            rounds[root].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {root}: {rounds[root][-1]}", file=sys.stderr, flush=True)
    if args.json:  # helpers imported here, in the parent only: each child imports its own checkout's
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from helpers.files import atomic_file

        atomic_file(
            Path(args.json), lambda tmp: tmp.write_text(json.dumps({"decode_rounds": rounds}, indent=1))
        )
    print(
        f"| checkout | step kept | greedy ms/token | sampled ms/token | each round's sampled ({args.dtype}) |"
    )
    print("|---|---|---|---|---|")
    for root, runs in rounds.items():
        each = ", ".join(f"{x['sampled']:.1f} ({x['bandwidth']:.1f} GB/s)" for x in runs)
        kept = ", ".join(sorted({x["step"] for x in runs}))
        greedy, sampled = min(x["greedy"] for x in runs), min(x["sampled"] for x in runs)
        print(f"| {root} | {kept} | {greedy:.1f} | {sampled:.1f} | {each} |")


if __name__ == "__main__":
    main()
