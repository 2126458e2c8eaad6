"""Peer benchmark: llama.cpp's decode speed on the stand-in, at F32, BF16, Q8_0 and Q4_0, beside the bytes each
decoded token reads, so that our decode speed can be set against llama.cpp's at the same bytes per token.

    bash benchmarks/peer/build.sh                 # once: builds llama.cpp's tools into build/peer/
    python benchmarks/peer/peer_bench.py --check  # is the GGUF right? llama.cpp's greedy tokens against transformers'
    python benchmarks/peer/peer_bench.py          # the table, each type in turn with ours (about 8 minutes on 2 cores)

The GGUF files are made on first use in build/peer/: F32 and BF16 by to_gguf.py, Q8_0 and Q4_0 by llama.cpp's own
llama-quantize from the F32 file (what a llama.cpp user would run). Decode speed is llama-bench's `-p 0 -n N`: N
tokens generated one at a time after an empty prompt, averaged over --reps runs. Every llama.cpp process runs under
`nice -n 19`, so a figure taken while the machine is busy is low: the table prints the load average beside it.

Ours beside each type, in the same run: the configuration of benchmarks/harness.py that holds its weights as that
type does (F32: float32; BF16: bfloat16; Q8_0: int8 weights; Q4_0: int4), on the fast path (its one-token step
written layer by layer where the load measured that faster, as make bench's rows), loaded once and timed in turn with llama-bench,
--rounds times: each round's ratio compares two figures taken one right after the other, on a machine whose speed
moves by a fifth or more from one minute to the next. Ours decodes after the poem's prompt (its `make bench` row's
timing), greedily (the most likely token each step: llama-bench's decode draws none from the logits), llama-bench
after an empty prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import CONFIGS, in_turn  # noqa: E402

PEER = ROOT / "build" / "peer"
BIN = PEER / "llama.cpp-build" / "bin"
TYPES = ["f32", "bf16", "q8_0", "q4_0"]
NICE = ["nice", "-n", "19"]
MiB = 2**20
_BY_NAME = {c.name: c for c in CONFIGS}
# ours beside each type: the fast path's configuration whose weights are held as the type's are (its step raced at
# load, as in make bench), decoding greedily (llama-bench's decode draws no token from the logits: it feeds one and
# times llama_decode)
OURS = {
    name: replace(_BY_NAME[config], name=f"{config}, greedy", greedy=True)
    for name, config in {
        "f32": "fast path in fp32",
        "bf16": "fast path in bf16",
        "q8_0": "int8 weights (fast path)",
        "q4_0": "int4 weights (fast path)",
    }.items()
}
# max |logit difference| --check allows; float32 rounding gives ~3e-5 here (transformers in float32 against float64: 5e-5)
TOLERANCE = 1e-3


def standin(model: str | None) -> Path:
    """The stand-in's folder: --model, else the project's own (built if missing)."""
    if model:
        return Path(model)
    sys.path.insert(0, str(ROOT))
    from helpers import ensure_standin

    return ensure_standin()


def gguf_file(type_name: str, threads: int, model: str | None = None) -> Path:
    """build/peer/standin-TYPE.gguf, made if missing."""
    path = PEER / f"standin-{type_name}.gguf"
    if path.is_file():
        return path
    quantize = BIN / "llama-quantize"
    if type_name in ("f32", "bf16") or not quantize.is_file():
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("to_gguf.py")),
            "--type",
            type_name,
            "--out",
            str(path),
            "--model",
            str(standin(model)),
        ]
    else:
        cmd = [
            str(quantize),
            str(gguf_file("f32", threads, model)),
            str(path),
            type_name.upper(),
            str(threads),
        ]
    print("making", path.name, "with", Path(cmd[1] if cmd[0] == sys.executable else cmd[0]).name, flush=True)
    subprocess.run(NICE + cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def bytes_per_token(path: Path) -> int:
    """Weight bytes one decoded token reads: every tensor of every layer, but only k of E experts; the output matrix
    in full (token_embd when the embeddings are tied); and one row of token_embd for the lookup. The KV cache and
    activations are left out: for a short context they are a fraction of a percent of this."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields
    n_expert = int(field["llama.expert_count"].parts[-1][0])
    n_used = int(field["llama.expert_used_count"].parts[-1][0])
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    embd = sizes.pop("token_embd.weight")
    total = sizes.pop("output.weight", embd) + embd // int(field["llama.vocab_size"].parts[-1][0])
    for name, n in sizes.items():
        total += n * n_used // n_expert if "_exps." in name else n
    return total


def llama_bench(path: Path, tokens: int, reps: int, threads: int) -> tuple[float, float]:
    """(mean, standard deviation) of llama-bench's decode tok/s."""
    cmd = [
        str(BIN / "llama-bench"),
        "-m",
        str(path),
        "-p",
        "0",
        "-n",
        str(tokens),
        "-t",
        str(threads),
        "-r",
        str(reps),
        "-o",
        "json",
    ]
    out = subprocess.run(NICE + cmd, check=True, capture_output=True, text=True).stdout
    (row,) = json.loads(out)
    return row["avg_ts"], row["stddev_ts"]


def side_by_side(ours: list[float], peer: list[float]) -> dict:
    """Rounds timed in turn, ours then llama.cpp's (tok/s each): each round's ratio llama.cpp / ours, and the median
    of those ratios, the figure the target reads (a round both took on a slow minute keeps its ratio)."""
    if not ours or len(ours) != len(peer):
        raise ValueError(f"one llama.cpp figure per round of ours: got {len(ours)} of ours and {len(peer)}")
    ratios = [p / o for o, p in zip(ours, peer)]
    return dict(
        rounds=ours,
        peer_rounds=peer,
        ratios=ratios,
        ratio=statistics.median(ratios),
        decode_tok_s=statistics.median(ours),
        peer_tok_s=statistics.median(peer),
    )


def llama_cpp_greedy(
    path: Path, prompt: str, n: int, threads: int
) -> tuple[list[int], list[int], np.ndarray]:
    """(prompt ids, greedy ids, logits of each step) from llama.cpp, through the ctypes bindings that ship in the same
    sdist as the llama.cpp we built (so they match its C API), loaded without their package __init__, which wants
    llama-cpp-python's own dependencies. Greedy here is the argmax of the logits llama.cpp returns."""
    import ctypes
    import importlib
    import types

    sdist = next(PEER.glob("llama_cpp_python-*/llama_cpp"))
    package = types.ModuleType("llama_cpp")
    package.__path__ = [str(sdist)]
    sys.modules["llama_cpp"] = package
    os.environ["LLAMA_CPP_LIB_PATH"] = str(BIN)
    ll = importlib.import_module("llama_cpp.llama_cpp")

    quiet = ll.llama_log_callback(lambda level, text, data: None)  # keep a reference: C holds the pointer
    ll.llama_log_set(quiet, ctypes.c_void_p())
    ll.llama_backend_init()
    model = ll.llama_model_load_from_file(str(path).encode(), ll.llama_model_default_params())
    params = ll.llama_context_default_params()
    params.n_ctx, params.n_batch = 256, 256
    params.n_threads = params.n_threads_batch = threads
    # Like for like with transformers' float32: an F32 KV cache (llama.cpp's default is F16) and no flash attention
    # (its CPU kernel rounds through F16: with it on, logits move by ~1e-2 instead of ~3e-5, the tokens stay the same).
    params.type_k = params.type_v = ll.GGML_TYPE_F32
    params.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = ll.llama_init_from_model(model, params)
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = ll.llama_vocab_n_tokens(vocab)

    text = prompt.encode()
    buf = (ll.llama_token * 256)()
    n_prompt = ll.llama_tokenize(
        vocab, text, len(text), buf, 256, True, False
    )  # add_special (BOS if the file says so)
    prompt_ids = list(buf[:n_prompt])
    feed, ids, logits = prompt_ids, [], []
    for _ in range(n):
        arr = (ll.llama_token * len(feed))(*feed)
        if ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(feed))) != 0:
            raise RuntimeError("llama_decode failed")
        row = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
        logits.append(row)
        ids.append(int(row.argmax()))
        feed = [ids[-1]]
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return prompt_ids, ids, np.stack(logits)


def transformers_greedy(folder: Path, prompt: str, n: int) -> tuple[list[int], list[int], np.ndarray, object]:
    """(prompt ids, greedy ids, logits of each step, tokenizer) from transformers, float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    feed, past, ids, logits = prompt_ids, None, [], []
    with torch.inference_mode():  # a plain loop rather than generate(), which would stop at (or forbid) EOS
        for _ in range(n):
            out = model(feed, past_key_values=past, use_cache=True)
            past, row = out.past_key_values, out.logits[0, -1].float()
            logits.append(row.numpy())
            ids.append(int(row.argmax()))
            feed = torch.tensor([[ids[-1]]])
    return prompt_ids[0].tolist(), ids, np.stack(logits), tokenizer


def check(folder: Path, prompt: str, n: int, threads: int) -> bool:
    """llama.cpp at F32 against transformers at float32: the same prompt ids, the same greedy ids, and logits that
    differ by float32 rounding only (under TOLERANCE). A wrong Q/K permutation or expert order shows as different
    tokens; a subtler slip (a norm's epsilon, rope's base) as logits further apart than rounding explains."""
    path = gguf_file("f32", threads, str(folder))
    l_prompt, l_ids, l_logits = llama_cpp_greedy(path, prompt, n, threads)
    t_prompt, t_ids, t_logits, tokenizer = transformers_greedy(folder, prompt, n)
    same = next((i for i, (a, b) in enumerate(zip(l_ids, t_ids)) if a != b), n)
    print(f"prompt {prompt!r}: ids llama.cpp {l_prompt}, transformers {t_prompt}")
    print(f"llama.cpp    greedy ids {l_ids}\n             {tokenizer.decode(l_ids)!r}")
    print(f"transformers greedy ids {t_ids}\n             {tokenizer.decode(t_ids)!r}")
    diffs = np.abs(l_logits[:same] - t_logits[:same]).max(axis=1) if same else np.array([np.nan])
    scale = np.abs(t_logits).max()
    print(
        f"first {same} of {n} greedy tokens agree; max |logit difference| over them {diffs.max():.2e} "
        f"(logits reach {scale:.1f}; per step: {' '.join(f'{d:.1e}' for d in diffs)})"
    )
    ok = l_prompt == t_prompt and same == n and diffs.max() < TOLERANCE
    print(
        "check:",
        "OK" if ok else "MISMATCH: the conversion is wrong (Q/K permutation? expert order? tokenizer?)",
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--types", nargs="+", choices=TYPES, default=TYPES)
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per llama-bench run (-n)")
    parser.add_argument("--reps", type=int, default=1, help="llama-bench runs averaged in each round (-r)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ours then llama.cpp, per type")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="only the greedy agreement check, no timing")
    parser.add_argument("--model", help="the stand-in's folder (default: helpers.ensure_standin())")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--check-tokens", type=int, default=12)
    parser.add_argument(
        "--json", default=str(PEER / "peer.json"), help="where the table goes as JSON (targets.py reads it)"
    )
    args = parser.parse_args()
    if not (BIN / "llama-bench").is_file():
        print(f"no llama.cpp build in {BIN}: run `bash benchmarks/peer/build.sh` first", file=sys.stderr)
        return 2
    if args.check:
        return 0 if check(standin(args.model), args.prompt, args.check_tokens, args.threads) else 1

    import torch

    torch.set_num_threads(args.threads)  # ours on as many threads as llama-bench's -t
    machine = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), ""
    )
    print(f"# llama.cpp beside ours, {time.strftime('%Y-%m-%d')}, {machine or platform.machine()}\n")
    print(
        f"In turn, {args.rounds} rounds per type: ours ({args.tokens} new tokens, greedy, after the poem's prompt, "
        f"after a warm-up run), then `llama-bench -p 0 -n {args.tokens} -t {args.threads} -r {args.reps}` (decode only); "
        f"{args.threads} threads. Each figure is the median of its rounds; the ratio is the median of the rounds' "
        "ratios.\n"
    )
    print(
        "| llama.cpp | MiB read per token | tok/s (rounds) | ours | MiB read per token | tok/s (rounds) "
        "| llama.cpp / ours (rounds) | load average |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for type_name in args.types:
        path = gguf_file(type_name, args.threads, args.model)
        per_token = bytes_per_token(path)
        config = OURS[type_name]
        pairs = in_turn(
            config,
            lambda: llama_bench(path, args.tokens, args.reps, args.threads)[0],
            args.rounds,
            args.tokens,
        )
        paired = side_by_side([o["decode_tok_s"] for o, _ in pairs], [p for _, p in pairs])
        mine, peer_tok_s = pairs[0][0], paired.pop("peer_tok_s")
        ours = dict(
            paired,
            name=config.name,
            bytes_per_token=mine["bytes_per_token"],
            graph=mine["graph"],  # what choose_step measured at load, and which step it kept
        )
        rows.append(
            dict(
                type=type_name.upper(),
                bytes_per_token=per_token,
                decode_tok_s=peer_tok_s,
                ours=ours,
            )
        )
        print(
            f"| {type_name.upper()} | {per_token / MiB:.0f} | {rows[-1]['decode_tok_s']:.1f} "
            f"({', '.join(f'{p:.1f}' for p in paired['peer_rounds'])}) | {config.name}"
            f"{'' if (ours['graph'] or {}).get('kept') else ' (no step written layer by layer kept: the lean step)'} "
            f"| {ours['bytes_per_token'] / MiB:.0f} | {ours['decode_tok_s']:.1f} "
            f"({', '.join(f'{o:.1f}' for o in paired['rounds'])}) | **{paired['ratio']:.2f}x** "
            f"({', '.join(f'{r:.2f}' for r in paired['ratios'])}) | {os.getloadavg()[0]:.2f} |",
            flush=True,
        )
    Path(args.json).write_text(
        json.dumps(dict(date=time.strftime("%Y-%m-%d"), machine=machine, rows=rows), indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
