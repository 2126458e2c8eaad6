"""How fast decoding runs, how fast it could run, and the fastest correct settings for this hardware.

Decoding one token reads every weight it uses once, so at batch 1 its speed is bounded by
    ceiling (tok/s) = memory bandwidth (bytes/s) / bytes read per token.
The helpers here measure both sides on this machine, time `generate()` token by token, and pick
the settings that get closest to the ceiling (`fast_recipe`, applied by `load_pipeline`).

Shapes: T = tokens, K = experts per token, D = hidden size, I = expert FFN size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

GB = 1e9
DECODE_TOKENS = 4   # at most this many tokens in a forward: the "per_token" experts loop; more: grouped_mm


# ---------------------------------------------------------------- the two sides of the ceiling
def measure_bandwidth(mib: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Memory read bandwidth in bytes/s as torch sees it (all its threads): the best of `repeats`
    sums over a float32 buffer far larger than the caches."""
    import torch

    if isinstance(mib, bool) or not isinstance(mib, int) or mib < 64:
        raise ValueError(f"mib={mib!r}: use a whole number of MiB >= 64, so the buffer does not fit in the caches")
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    x.sum()
    sync()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        x.sum()
        sync()
        best = min(best, time.perf_counter() - started)
    return x.numel() * 4 / best


def expected_distinct_experts(experts: int, per_token: int, batch: int) -> float:
    """Experts one layer reads in a decode step of `batch` tokens, if each token picks `per_token`
    of `experts` uniformly at random: E * (1 - (1 - K/E)^batch)."""
    return experts * (1 - (1 - per_token / experts) ** batch)


def decode_bytes(config, dtype_bytes: float, context: int = 0, batch: int = 1,
                 experts_read: float | None = None) -> dict:
    """Bytes read from memory by one decode step, by component, and per generated token.

    `config` is a Mixtral or Llama config; `context` the tokens already in the KV cache (each
    sequence); `experts_read` the distinct experts per layer the step reads (default: the
    expected number under uniform routing, exactly K at batch 1)."""
    for name, value in (("dtype_bytes", dtype_bytes), ("batch", batch)):
        if isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name}={value!r}: use a positive number")
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"context={context!r}: use a whole number of tokens >= 0")
    D, L = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or D // heads
    I = config.intermediate_size
    experts = getattr(config, "num_local_experts", None)
    params = {
        "attention": L * (D * heads * head_dim * 2 + D * kv_heads * head_dim * 2),  # q, o; k, v
        "norms": (2 * L + 1) * D,
        "lm_head": config.vocab_size * D,
        "embedding rows": batch * D,
    }
    if experts:  # MoE: the router, and only the experts the step's tokens picked
        if experts_read is None:
            experts_read = expected_distinct_experts(experts, config.num_experts_per_tok, batch)
        params["router"] = L * experts * D
        params["experts"] = L * experts_read * 3 * D * I  # gate, up, down per expert read
    else:
        params["mlp"] = L * 3 * D * I
    parts = {name: n * dtype_bytes for name, n in params.items()}
    parts["kv_cache"] = batch * context * 2 * L * kv_heads * head_dim * dtype_bytes
    step = sum(parts.values())
    return {"parts": parts, "per_step": step, "per_token": step / batch}


def ceiling(bandwidth: float, bytes_per_token: float) -> float:
    """The most tokens/s that memory can feed: every byte read once, at the measured bandwidth."""
    if not bandwidth > 0 or not bytes_per_token > 0:
        raise ValueError("bandwidth and bytes_per_token must be positive")
    return bandwidth / bytes_per_token


# ---------------------------------------------------------------- timing generate() token by token
class TokenClock:
    """A generate() streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> bool:
        """Note the time of a new token; False for the first call, which carries the prompt."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return False
        self.times.append(time.perf_counter())
        return True

    def end(self):
        pass

    def summary(self, warmup: int, batch: int = 1) -> dict:
        """Time to first token, and tokens/s after the first token and `warmup` more steps."""
        steps = len(self.times) - 1 - warmup
        if steps < 1:
            raise ValueError(f"only {len(self.times)} tokens came back: ask for more than 1 + warmup ({1 + warmup})")
        return {"ttft_s": self.times[0] - self.started, "steps": len(self.times),
                "decode_tok_s": batch * steps / (self.times[-1] - self.times[warmup])}


def timed_generate(model, input_ids, new_tokens: int, warmup: int = 4, attention_mask=None, **knobs) -> dict:
    """generate() exactly `new_tokens` tokens (EOS does not end it early) and time it."""
    import torch

    clock = TokenClock()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask if attention_mask is not None
                             else torch.ones_like(input_ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             streamer=clock, **knobs)
    return dict(clock.summary(warmup, batch=input_ids.shape[0]), output=out)


# ---------------------------------------------------------------- the fast path
def per_token_experts(self, hidden_states, top_k_index, top_k_weights):
    """Experts for decoding: a few tokens, each through its K chosen experts, reading only those
    experts' weights (views, no copies, no masks). Longer inputs (a prompt) go to grouped_mm."""
    import torch.nn.functional as F
    from transformers.integrations.moe import grouped_mm_experts_forward

    if hidden_states.shape[0] > DECODE_TOKENS:
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    out = hidden_states.new_zeros(hidden_states.shape)                      # [T, D]
    for t, (chosen, weights) in enumerate(zip(top_k_index.tolist(), top_k_weights.tolist())):
        x = hidden_states[t:t + 1]                                          # [1, D]
        for expert, weight in zip(chosen, weights):
            gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)  # [1, I] each
            out[t:t + 1] += F.linear(self.act_fn(gate) * up, self.down_proj[expert]) * weight
    return out


def register_experts() -> None:
    """Make "per_token" a valid `experts_implementation` for transformers."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if "per_token" not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register("per_token", per_token_experts)


def column_major(weight):
    """The same tensor (same shape and values), stored column by column in its last two dims."""
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2)


def _weight_groups(model) -> dict:
    """The weights a decode step reads with a matrix-vector product, grouped by kind:
    {kind: [(module, attribute, expert-or-None)]}. Tied weights appear once."""
    groups, seen = {}, set()
    for name, module in model.named_modules():
        for attribute in ("weight", "gate_up_proj", "down_proj"):
            p = getattr(module, attribute, None)
            if p is None or not hasattr(p, "dim") or p.dim() not in (2, 3) or id(p) in seen:
                continue
            if p.dim() == 2 and not (name.endswith("_proj") or name.endswith("lm_head")):
                continue  # embeddings and routers: a row lookup, or too small to matter
            seen.add(id(p))
            kind = name.split(".")[-1] + ("." + attribute if p.dim() == 3 else "")
            groups.setdefault(kind, []).append((module, attribute))
    return groups


def _gemv_seconds(weights, x) -> float:
    """Best-of-3 time of one F.linear(x, w) pass over all `weights` (a pass reads them once)."""
    import torch.nn.functional as F

    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for w in weights:
            F.linear(x, w)
        best = min(best, time.perf_counter() - started)
    return best


def choose_layouts(model, sample_bytes: int = 128 * 2**20) -> dict:
    """For each kind of weight, time a decode step's matrix-vector products with the weights as
    stored (row-major) and column-major, on this machine, and re-lay the kinds that read faster.
    Each kind is timed on up to `sample_bytes` of its matrices (more than the caches hold), then
    re-laid one tensor at a time, so memory grows by one tensor at most.
    Returns {kind: (row-major GB/s, column-major GB/s, chosen, bytes of that kind)}."""
    import torch

    report = {}
    with torch.no_grad():
        for kind, members in _weight_groups(model).items():
            params = [getattr(m, a) for m, a in members]
            rows = [w for p in params for w in (p if p.dim() == 3 else [p])]   # each [out, in]
            nbytes = sum(w.numel() * w.element_size() for w in rows)
            sample, size = [], 0
            for w in rows:
                sample.append(w)
                size += w.numel() * w.element_size()
                if size >= sample_bytes:
                    break
            x = torch.randn(1, rows[0].shape[-1], dtype=rows[0].dtype, device=rows[0].device)
            row_s = _gemv_seconds(sample, x)
            columns = [column_major(w) for w in sample]
            col_s = _gemv_seconds(columns, x)
            del columns
            chosen = "column-major" if col_s < 0.9 * row_s else "row-major"
            if chosen == "column-major":
                for p in params:
                    p.data = column_major(p.data)
            report[kind] = (size / row_s / GB, size / col_s / GB, chosen, nbytes)
    return report


def matvec_ceiling(layouts: dict, experts_share: float) -> float:
    """Tokens/s if a decode step did nothing but its matrix-vector products, each kind of weight at
    the best speed `choose_layouts` measured for it: what the kernels allow, below the memory's
    ceiling. `experts_share` = K / E, the part of each expert tensor a token reads."""
    seconds = 0.0
    for kind, (row_gbs, col_gbs, _, nbytes) in layouts.items():
        share = experts_share if kind.startswith("experts.") else 1.0
        seconds += nbytes * share / (max(row_gbs, col_gbs) * GB)
    return 1 / seconds


@dataclass
class Recipe:
    """The settings the notebooks run with, and why."""
    device: str
    dtype: object
    experts: str                 # experts_implementation
    relayout: bool               # re-lay weights column-major where measured faster (CPU)
    reasons: list = field(default_factory=list)
    layouts: dict = field(default_factory=dict)  # filled by apply_recipe

    def __str__(self) -> str:
        lines = [f"fast path on {self.device}: dtype {str(self.dtype).replace('torch.', '')}, "
                 f"experts {self.experts!r}, column-major re-layout {'probed' if self.relayout else 'off'}"]
        lines += [f"  - {r}" for r in self.reasons]
        moved = [k for k, v in self.layouts.items() if v[2] == "column-major"]
        if self.layouts:
            lines.append(f"  - re-laid column-major (faster here): {', '.join(moved) or 'none'}")
        return "\n".join(lines)


def fast_recipe(device: str | None = None) -> Recipe:
    """The fastest configuration that is correct on this hardware, as measured by `make bench`."""
    import torch

    from .hardware import pick_dtype
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, why_dtype = pick_dtype()
    batching = ("several prompts at once: generate_batch runs them as one padded batch, reading the "
                "weights once per step for all of them")
    if device != "cpu":
        return Recipe(device, dtype, "grouped_mm", relayout=False, reasons=[
            why_dtype, "grouped_mm: transformers' default, one grouped GEMM over all experts on the GPU", batching])
    return Recipe(device, dtype, "per_token", relayout=True, reasons=[
        why_dtype,
        "per_token experts while decoding: reads only the chosen experts' weights, skips the masks "
        "and index bookkeeping of eager/grouped_mm (prompts still go through grouped_mm)",
        "weights whose matrix-vector product reads faster column-major on this CPU are re-laid once at load",
        batching])


def apply_recipe(model, recipe: Recipe) -> Recipe:
    """Switch a loaded model to the recipe's experts implementation and layouts (in place)."""
    if model.dtype != recipe.dtype:
        recipe.reasons[0] = f"dtype {str(model.dtype).replace('torch.', '')}: chosen by the caller ({recipe.reasons[0]} otherwise)"
        recipe.dtype = model.dtype
    if getattr(model.config, "num_local_experts", None):
        register_experts()
        model.set_experts_implementation(recipe.experts)
    if recipe.relayout:
        recipe.layouts = choose_layouts(model)
    model.recipe = recipe
    return recipe


# ---------------------------------------------------------------- the benchmark: one configuration per process
NAIVE = "blog pipeline, fp32"
CONFIGS = [  # name, then how it differs from: the stand-in, fp32, transformers' default experts, dynamic cache
    dict(name=NAIVE, pipeline=True),
    dict(name="fp32 eager", experts="eager"),
    dict(name="fp32 grouped_mm", experts="grouped_mm"),
    dict(name="fp32 batched_mm", experts="batched_mm"),
    dict(name="bf16 eager", dtype="bfloat16", experts="eager"),
    dict(name="bf16 grouped_mm", dtype="bfloat16", experts="grouped_mm"),
    dict(name="bf16 batched_mm", dtype="bfloat16", experts="batched_mm"),
    dict(name="fp32 static cache", cache="static"),
    dict(name="fp32 static cache + compile", cache="static", compile=True),
    dict(name="fast path (this machine's choice)", fast=True, dtype=None),
    dict(name="fast path in bf16", fast=True, dtype="bfloat16"),
    dict(name="4 prompts, one at a time (fast path)", fast=True, dtype=None, prompts=4),
    dict(name="4 prompts, one batch (fast path)", fast=True, dtype=None, prompts=4, batch=True),
    dict(name="dense SmolLM2 fp32 (the stand-in's source)", dense=True),
]


class StopAfter:
    """A stopping criterion: end generate() after `n` new tokens (used for warm-up runs)."""

    def __init__(self, prompt_length: int, n: int):
        self.limit = prompt_length + n

    def __call__(self, input_ids, scores, **kwargs):
        import torch
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.limit, dtype=torch.bool,
                          device=input_ids.device)


def _peak_memory(device: str) -> int:
    import resource

    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_config(spec: dict, new_tokens: int = 64, warmup: int = 4, seed: int = 0) -> dict:
    """Load one configuration and time it: load, warm-up (compile) and the timed generate().
    Call it in a fresh process (`measure` does), so peak memory and compiled code are its own."""
    import torch
    from transformers import CompileConfig, StoppingCriteriaList

    from .generation import BLOG_SAMPLING, left_padded, pad_id
    from .hardware import pick_dtype
    from .prompts import TASKS, blog_prompt, chat_ids
    from .standin import ensure_standin, load_dense_source

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.get("dtype"):
        dtype = getattr(torch, spec["dtype"])
    elif "dtype" in spec:  # dtype=None: this machine's choice
        dtype = pick_dtype()[0]
    else:
        dtype = torch.float32
    started = time.perf_counter()
    if spec.get("pipeline"):  # the blog's call, word for word, fp32 on a CPU without native bf16
        from transformers import pipeline
        pipe = pipeline("text-generation", model=str(ensure_standin()), dtype=dtype, device_map="auto")
        model, tokenizer = pipe.model, pipe.tokenizer
    elif spec.get("dense"):
        model, tokenizer = load_dense_source(dtype)
        model.to(device)
    else:
        from .models import load_pipeline
        pipe = load_pipeline(str(ensure_standin()), dtype=dtype, local=True, fast=bool(spec.get("fast")))
        model, tokenizer = pipe.model, pipe.tokenizer
        if spec.get("experts"):
            model.set_experts_implementation(spec["experts"])
    layouts = model.recipe.layouts if spec.get("fast") else {}
    load_s = time.perf_counter() - started

    names = list(TASKS)[:spec.get("prompts", 1)]
    if spec.get("pipeline"):
        rows = [tokenizer(blog_prompt(TASKS[n]["prompt"]))["input_ids"] for n in names]
    else:
        rows = [chat_ids(tokenizer, TASKS[n]["prompt"]) for n in names]
    knobs = dict(BLOG_SAMPLING, pad_token_id=pad_id(tokenizer))
    if spec.get("cache"):
        knobs["cache_implementation"] = spec["cache"]
    if spec.get("compile"):
        config = CompileConfig(mode="default")
        config._compile_all_devices = True  # transformers compiles only on GPUs unless told
        knobs["compile_config"] = config
    elif spec.get("cache") == "static":
        knobs["disable_compile"] = True
    batches = [rows] if spec.get("batch") else [[r] for r in rows]

    def tensors(batch):
        return left_padded(batch, knobs["pad_token_id"], device)

    def run(ids, mask, **extra):
        if spec.get("pipeline"):  # through the pipeline, as the blog calls it (text in, text out)
            return pipe(blog_prompt(TASKS[names[0]]["prompt"]), return_full_text=False, max_new_tokens=new_tokens,
                        **knobs, **extra)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, **knobs, **extra)

    ids, mask = tensors(batches[0])  # warm-up: same lengths as the timed run, stopped after a few tokens
    warm_started = time.perf_counter()
    run(ids, mask, stopping_criteria=StoppingCriteriaList([StopAfter(ids.shape[1], warmup + 2)]))
    warmup_s = time.perf_counter() - warm_started

    runs, wall = [], time.perf_counter()
    for batch in batches:
        ids, mask = tensors(batch)
        clock = TokenClock()
        run(ids, mask, min_new_tokens=new_tokens, streamer=clock)
        runs.append(dict(clock.summary(warmup, batch=ids.shape[0]), prompt_tokens=ids.shape[1], batch=ids.shape[0]))
    wall = time.perf_counter() - wall

    context = sum(r["prompt_tokens"] for r in runs) / len(runs) + (1 + warmup + new_tokens) / 2
    batch = runs[0]["batch"]
    bytes_ = decode_bytes(model.config, torch.tensor([], dtype=model.dtype).element_size(), int(context), batch)
    return dict(spec, dtype=str(model.dtype).replace("torch.", ""), device=device,
                experts=getattr(model.config, "_experts_implementation", None) if not spec.get("dense") else "dense",
                load_s=load_s, warmup_s=warmup_s, compile_s=warmup_s if spec.get("compile") else None,
                ttft_s=sum(r["ttft_s"] for r in runs) / len(runs),
                decode_tok_s=sum(r["decode_tok_s"] for r in runs) / len(runs),
                throughput_tok_s=sum(r["batch"] * new_tokens for r in runs) / wall,
                prompt_tokens=runs[0]["prompt_tokens"], new_tokens=new_tokens, sequences=len(rows), batch=batch,
                bytes_per_token=bytes_["per_token"], peak_memory=_peak_memory(device),
                layouts=layouts, matvec_ceiling_tok_s=matvec_ceiling(
                    layouts, model.config.num_experts_per_tok / model.config.num_local_experts) if layouts else None)


def measure(configs: list | None = None, new_tokens: int = 64, warmup: int = 4, rounds: int = 1,
            progress=print) -> dict:
    """Run each configuration in its own process, side by side, `rounds` times round-robin (each
    keeps its best round: noise only ever slows a run down), with the memory bandwidth measured
    before and after; add each one's ceiling, efficiency and ratio to the blog's path."""
    import json
    import os
    import subprocess
    import sys

    import torch
    configs = configs or CONFIGS
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r}: use a whole number >= 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidths = [measure_bandwidth(device=device)]
    progress(f"memory read bandwidth: {bandwidths[0] / GB:.1f} GB/s")
    best: dict[str, dict] = {}
    for round_ in range(1, rounds + 1):
        for i, spec in enumerate(configs, 1):
            progress(f"[{i}/{len(configs)}{f', round {round_}/{rounds}' if rounds > 1 else ''}] {spec['name']} ...")
            job = json.dumps(dict(spec=spec, new_tokens=new_tokens, warmup=warmup))
            env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
            done = subprocess.run([sys.executable, "-m", "helpers.speed", job], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                best.setdefault(spec["name"], dict(spec, error=last))
                progress(f"    FAILED: {last}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            progress(f"    {row['decode_tok_s']:.1f} tok/s, first token {row['ttft_s']:.2f} s, "
                     f"peak memory {row['peak_memory'] / 2**30:.1f} GiB")
            kept = best.get(spec["name"], {})
            row["all_tok_s"] = kept.get("all_tok_s", []) + [row["decode_tok_s"]]
            if row["decode_tok_s"] >= kept.get("decode_tok_s", 0):  # a failed round has no decode_tok_s
                best[spec["name"]] = row
            else:
                kept["all_tok_s"] = row["all_tok_s"]
    bandwidths.append(measure_bandwidth(device=device))
    bandwidth = max(bandwidths)
    rows = [best[c["name"]] for c in configs]
    naive = next((r for r in rows if r.get("name") == NAIVE and "error" not in r), None)
    for row in rows:
        if "error" in row:
            continue
        row["ceiling_tok_s"] = ceiling(bandwidth, row["bytes_per_token"])
        row["efficiency"] = row["decode_tok_s"] / row["ceiling_tok_s"]
        row["vs_naive"] = row["decode_tok_s"] / naive["decode_tok_s"] if naive else None
    return dict(bandwidths=bandwidths, bandwidth=bandwidth, device=device, new_tokens=new_tokens,
                warmup=warmup, rounds=rounds, rows=rows)


def write_report(path, write) -> None:
    """Write a report through `write(temporary path)`, then rename it into place: never a
    half-written file, even if the benchmark is interrupted."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def bench_table(result: dict) -> str:
    """The measurements as a markdown table, one row per configuration."""
    head = ("| configuration | dtype | experts | load s | first token s | decode tok/s | ceiling tok/s "
            "| efficiency | vs blog's path | peak memory GiB |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |||||||||")
            continue
        compile_note = f" (+{r['compile_s']:.0f} s compile)" if r.get("compile_s") else ""
        batch_note = f", {r['sequences']} prompts" + (" batched" if r["batch"] > 1 else " in turn") if r["sequences"] > 1 else ""
        spread = (f" ({min(r['all_tok_s']):.1f}-{max(r['all_tok_s']):.1f})" if len(r.get("all_tok_s", [])) > 1 else "")
        lines.append(
            f"| {r['name']} | {r['dtype']} | {r['experts']}{batch_note} | {r['load_s']:.1f}{compile_note} | {r['ttft_s']:.2f} "
            f"| {r['decode_tok_s']:.1f}{spread} | {r['ceiling_tok_s']:.1f} | {r['efficiency']:.0%} "
            f"| {r['vs_naive']:.2f}x | {r['peak_memory'] / 2**30:.1f} |")
    return "\n".join(lines)


def bench_summary(result: dict) -> str:
    """What the numbers say, in sentences: the ceiling, the fast path against the blog's path."""
    rows = {r["name"]: r for r in result["rows"] if "error" not in r}
    lines = [f"{result.get('rounds', 1)} round(s); each configuration's best round is shown"
             + (" (the range of its rounds in brackets)" if result.get("rounds", 1) > 1 else ""),
             f"memory read bandwidth {result['bandwidth'] / GB:.1f} GB/s (best of "
             f"{', '.join(f'{b / GB:.1f}' for b in result['bandwidths'])} measured before and after)"]
    fast = rows.get("fast path (this machine's choice)")
    naive = rows.get(NAIVE)
    if fast and naive:
        lines.append(f"fast path: {fast['decode_tok_s']:.1f} tok/s = {fast['vs_naive']:.2f}x the blog's path "
                     f"({naive['decode_tok_s']:.1f} tok/s), {fast['efficiency']:.0%} of the {fast['ceiling_tok_s']:.1f} "
                     f"tok/s bandwidth ceiling for {fast['bytes_per_token'] / 2**20:.0f} MiB read per token")
        if fast.get("matvec_ceiling_tok_s"):
            lines.append(f"the matrix-vector kernels alone, at the best speed measured for each weight shape here, "
                         f"allow {fast['matvec_ceiling_tok_s']:.1f} tok/s "
                         f"({fast['matvec_ceiling_tok_s'] / fast['ceiling_tok_s']:.0%} of the bandwidth ceiling)")
    one, many = rows.get("4 prompts, one at a time (fast path)"), rows.get("4 prompts, one batch (fast path)")
    if one and many:
        lines.append(f"four prompts as one batch: {many['throughput_tok_s']:.1f} tok/s in all against "
                     f"{one['throughput_tok_s']:.1f} one at a time ({many['throughput_tok_s'] / one['throughput_tok_s']:.2f}x)")
    dense = rows.get("dense SmolLM2 fp32 (the stand-in's source)")
    moe = rows.get("fp32 grouped_mm")
    if dense and moe:
        lines.append(f"the MoE decodes at {moe['decode_tok_s'] / dense['decode_tok_s']:.2f}x its dense source's speed "
                     f"for {moe['bytes_per_token'] / dense['bytes_per_token']:.2f}x the bytes per token")
    return "\n".join(lines)


def draw_bench(result: dict, title: str | None = None):
    """Horizontal bars: decode tok/s per configuration, each with its bandwidth ceiling marked."""
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.4))
    names = [r["name"] for r in rows][::-1]
    speeds = [r["decode_tok_s"] for r in rows][::-1]
    ceilings = [r["ceiling_tok_s"] for r in rows][::-1]
    colors = ["tab:gray" if r["name"] == NAIVE else "tab:green" if r.get("fast") else "tab:blue" for r in rows][::-1]
    ax.barh(names, speeds, color=colors)
    ax.scatter(ceilings, names, marker="|", s=300, color="black", label="bandwidth ceiling")
    for y, (v, c) in enumerate(zip(speeds, ceilings)):
        ax.text(v, y, f" {v:.1f} ({v / c:.0%})", va="center", fontsize=8)
    ax.set_xlabel("decode tokens/s (after the first token); in brackets: share of the ceiling")
    ax.set_title(title or f"Decode speed against the memory-bandwidth ceiling ({result['device']}, "
                 f"{result['bandwidth'] / GB:.0f} GB/s)\ngrey: the blog's path; green: the fast path", fontsize=11)
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


if __name__ == "__main__":  # one configuration, in a process of its own: `python -m helpers.speed JSON`
    import json
    import sys
    job = json.loads(sys.argv[1])
    print(json.dumps(run_config(job["spec"], job["new_tokens"], job["warmup"])))
