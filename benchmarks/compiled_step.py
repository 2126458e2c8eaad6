"""A candidate for the whole decode step: one one-token step of the stand-in written out as one function and compiled
by torch.compile into one graph (no Python between its operators), against the package's fast path, side by side in
one process on this machine.

    python benchmarks/compiled_step.py     # writes benchmarks/results/<date>-compiled-step-<cpu>.md and .json

The experts' products are written as `(gate_up[chosen] * x).sum(-1)`, which inductor can compute as one reduction
that indexes the expert tensor, reading only the chosen experts' weights (run eagerly, the index makes a copy; the
script does not inspect the generated code). The KV cache is static (positions past the current one masked), so one
graph serves every step. Two variants: the attention's projections and lm_head written as reductions too
("reductions"), or as matrix products that inductor hands to its library ("library products"); the router's product
and the attention's own products are the same in both. It is an experiment, not part of the package. Its logits are
not the loaded model's bit for bit (its attention runs in float32, its sums in other orders, and compiling changes
the rounding again), so they are compared over the same tokens (teacher-forced: the top-1 agreement and the largest
logit difference), not asserted equal.
"""

from __future__ import annotations

import argparse
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
from helpers.files import atomic_file  # noqa: E402
from helpers.hardware import measure_bandwidth  # noqa: E402
from helpers.loading import load_local  # noqa: E402
from helpers.data import TASKS  # noqa: E402
from helpers.prompts import chat_ids  # noqa: E402
from helpers.sizing import decode_bytes  # noqa: E402
from helpers.standin import ensure_standin  # noqa: E402
from kernel_bench import cpu_extensions, cpu_kind  # noqa: E402


def make_step(model, length: int, reductions: bool):
    """step(token [1], position (0-d), k_cache, v_cache) -> logits [1, V] for a Mixtral `model` (transformers'),
    with a static cache of `length` positions per layer: [L, KV heads, length, head size] each."""
    import torch
    import torch.nn.functional as F

    cfg, m = model.config, model.model
    attention = m.layers[0].self_attn
    H, KV, d, eps = cfg.num_attention_heads, cfg.num_key_value_heads, attention.head_dim, cfg.rms_norm_eps
    dtype, top_k = m.embed_tokens.weight.dtype, cfg.num_experts_per_tok
    embed, norm, head = m.embed_tokens.weight.detach(), m.norm.weight.detach(), model.lm_head.weight.detach()
    inv_freq, scale = m.rotary_emb.inv_freq.detach().float(), attention.scaling
    layers = [
        dict(
            ln1=lay.input_layernorm.weight.detach(),
            ln2=lay.post_attention_layernorm.weight.detach(),
            qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().contiguous(),
            o=a.o_proj.weight.detach(),
            router=lay.mlp.gate.weight.detach(),
            gate_up=lay.mlp.experts.gate_up_proj.detach(),
            down=lay.mlp.experts.down_proj.detach(),
        )
        for lay in m.layers
        for a in [lay.self_attn]
    ]

    def rms(x, w):  # transformers' MixtralRMSNorm
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def product(x, w):  # x [1, in] @ w [out, in].T
        return (w[None] * x[:, None, :]).sum(-1) if reductions else x @ w.T

    def rotate(x, cos, sin):  # x [heads, d]
        half = d // 2
        return x * cos + torch.cat((-x[:, half:], x[:, :half]), -1) * sin

    def step(token, position, k_cache, v_cache):
        h = embed[token]  # [1, D]
        angles = position.float() * inv_freq
        angles = torch.cat((angles, angles), -1)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        visible = torch.arange(length) <= position
        for i, p in enumerate(layers):
            qkv = product(rms(h, p["ln1"]), p["qkv"])[0]
            q, k, v = qkv.split([H * d, KV * d, KV * d])
            q, k, v = rotate(q.view(H, d), cos, sin), rotate(k.view(KV, d), cos, sin), v.view(KV, d)
            k_cache[i].index_copy_(1, position[None], k[:, None])
            v_cache[i].index_copy_(1, position[None], v[:, None])
            s = torch.einsum("gqd,gtd->gqt", q.view(KV, H // KV, d).float(), k_cache[i].float()) * scale
            a = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
            a = torch.einsum("gqt,gtd->gqd", a, v_cache[i].float()).to(dtype).reshape(1, H * d)
            h = h + product(a, p["o"])
            x = rms(h, p["ln2"])
            weights, chosen = torch.topk(torch.softmax((x @ p["router"].T).float(), -1), top_k, -1)
            weights, chosen = (weights / weights.sum(-1, keepdim=True))[0], chosen[0]
            gate_up = (p["gate_up"][chosen] * x[:, None, :]).sum(-1)  # [K, 2I]: only the chosen experts
            gate, up = gate_up.chunk(2, -1)
            y = (p["down"][chosen] * (F.silu(gate) * up)[:, None, :]).sum(-1)  # [K, D]
            h = h + (y * weights[:, None].to(dtype)).sum(0, keepdim=True)
        return product(rms(h, norm), head)

    return step


def run_step(step, model, ids: list, length: int) -> tuple:
    """Every position of `ids` through `step`, one token at a time: (logits [len(ids), V], seconds per step)."""
    import torch

    cfg, d = model.config, model.model.layers[0].self_attn.head_dim
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, length, d)
    k_cache = torch.zeros(shape, dtype=model.dtype)
    v_cache = torch.zeros_like(k_cache)
    logits, seconds = [], []
    with torch.inference_mode():
        for position, token in enumerate(ids):
            started = time.perf_counter()
            logits.append(step(torch.tensor([token]), torch.tensor(position), k_cache, v_cache)[0].float())
            seconds.append(time.perf_counter() - started)
    return torch.stack(logits), seconds


def fast_path_seconds(pipe, ids: list, prompt: int) -> list:
    """The package's fast path over the same tokens: the prompt pass, then one token at a time, seconds per step."""
    import torch

    model, seconds = pipe.model, []
    with torch.inference_mode():
        cache = model(torch.tensor([ids[:prompt]]), use_cache=True).past_key_values
        for token in ids[prompt:]:
            started = time.perf_counter()
            model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            seconds.append(time.perf_counter() - started)
    return seconds


def measure(tokens: int) -> dict:
    import torch

    path = str(ensure_standin())
    pipe = load_local(path, dtype=torch.bfloat16)  # the fast path, as the notebooks load it, in bf16
    model = pipe.model
    prompt = chat_ids(pipe.tokenizer, [{"role": "user", "content": TASKS["poem"]["prompt"]}])
    with torch.inference_mode():  # the loaded model's greedy answer: the tokens every path is fed
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False, top_k=None,
                             top_p=None, temperature=None)[0].tolist()  # fmt: skip
        reference = model(torch.tensor([ids])).logits[0].float()
    length = len(ids) + 1
    bandwidth = measure_bandwidth()
    per_token = decode_bytes(model.config, 2)["per_token"]  # the weights a token reads, in bf16 (no KV cache)
    rows = []
    for name, reductions in (("reductions", True), ("library products", False)):
        step = make_step(model, length, reductions)
        started = time.perf_counter()
        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        run_step(compiled, model, ids[:2], length)
        compile_s = time.perf_counter() - started
        run_step(compiled, model, ids, length)  # warm
        logits, seconds = run_step(compiled, model, ids, length)
        fast = fast_path_seconds(pipe, ids, len(prompt))  # the fast path right after, on the same tokens
        ours, theirs = statistics.median(seconds[len(prompt) :]), statistics.median(fast)
        rows.append(
            dict(
                variant=name,
                compile_s=compile_s,
                step_ms=1000 * ours,
                fast_path_ms=1000 * theirs,
                tok_s=1 / ours,
                fast_path_tok_s=1 / theirs,
                vs_fast_path=theirs / ours,
                share_of_ceiling=per_token / ours / bandwidth,
                top1_agreement=float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
                max_logit_difference=float((logits - reference).abs().max() / reference.abs().max()),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return dict(
        date=datetime.date.today().isoformat(),
        machine=machine_name(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        bandwidth_gb_s=bandwidth / 1e9,
        bytes_per_token=per_token,
        positions=len(ids),
        decoded=len(ids) - len(prompt),
        rows=rows,
    )


def markdown(result: dict) -> str:
    lines = [
        f"# One compiled decode step against the fast path, {result['date']}",
        "",
        f"`python benchmarks/compiled_step.py` on {result['machine']}, {result['threads']} threads, torch "
        f"{result['torch']}: the stand-in in bf16, {result['bytes_per_token'] / 2**20:.0f} MiB read per token, memory "
        f"read bandwidth {result['bandwidth_gb_s']:.1f} GB/s. Each step's time is the median over the "
        f"{result['decoded']} decoded positions of the loaded model's greedy answer to the poem prompt; the fast "
        "path ran the same tokens right after each variant, in the same process. The ceiling is the bandwidth over "
        "the weights a token reads. Agreement is teacher-forced over all "
        f"{result['positions']} positions (the prompt's too), against the loaded model's bf16 logits from one "
        "forward over the whole sequence (the fast path's settings; a many-token forward goes through transformers' "
        "own); the logit difference is a share of the largest logit.",
        "",
        "| variant | compile s | ms per step | tok/s | fast path ms | fast path tok/s | vs the fast path | "
        "share of the ceiling | the fast path's share | top-1 agreement | largest logit difference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_token, bandwidth = result["bytes_per_token"], result["bandwidth_gb_s"] * 1e9
    lines += [
        f"| {r['variant']} | {r['compile_s']:.0f} | {r['step_ms']:.1f} | {r['tok_s']:.1f} | {r['fast_path_ms']:.1f} | "
        f"{r['fast_path_tok_s']:.1f} | {r['vs_fast_path']:.2f}x | {r['share_of_ceiling']:.0%} | "
        f"{r['fast_path_tok_s'] * per_token / bandwidth:.0%} | {r['top1_agreement']:.1%} | "
        f"{r['max_logit_difference']:.3f} |"
        for r in result["rows"]
    ]
    return "\n".join(lines) + "\n"


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
