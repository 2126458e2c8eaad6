"""The benchmark harness behind `make bench`: the configurations with the same load settings share a
process and one load (`by_load`), every other one gets a process of its own; each is timed with the
package's own clock (helpers.backends: tok/s is decode after the first token, here also after `warmup`
more steps), against this machine's bandwidth ceiling (helpers.sizing).

    python benchmarks/harness.py JSON   # one load group, in a process of its own (measure() does this)
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import resource
import subprocess
import sys
import time
import traceback
import unittest.mock
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.answers import TokenClock, decode_rate  # noqa: E402
from helpers.backends import LocalModel  # noqa: E402
from helpers.data import BLOG_SAMPLING, GB, TASKS, GiB, whole_number  # noqa: E402
from helpers.decode import use_lean_step  # noqa: E402
from helpers.fastpath import sampler  # noqa: E402
from helpers.fitting import Fit  # noqa: E402
from helpers.hardware import best_seconds, dtype_name, measure_bandwidth  # noqa: E402
from helpers.loading import load_local, pick_dtype  # noqa: E402
from helpers.offload import OffloadMeter  # noqa: E402
from helpers.prompts import blog_prompt, chat_ids  # noqa: E402
from helpers.sizing import ceiling, decode_bytes  # noqa: E402
from helpers.standin import ensure_standin  # noqa: E402
from workshop.standin_build import load_dense_source  # noqa: E402


@dataclass(frozen=True)
class Config:
    """One way to run the stand-in; the defaults are fp32, transformers' own experts, a dynamic cache."""

    name: str
    pipeline: bool = False  # the blog's pipeline(...) call, text in, text out
    dtype: str | None = "float32"  # None: this machine's choice (loading.pick_dtype)
    experts: str | None = None  # an experts_implementation; None: what the loader set
    fast: bool = False  # load_local(fast=True): the notebooks' fast path
    cache: str | None = None  # cache_implementation, e.g. "static"
    compile: bool = False  # torch.compile the decode step
    graph: bool = False  # load_local(compiled=True): torch.compile's graph raced too for one token's step
    prompts: int = 1  # how many of the blog's prompts
    batch: bool = False  # the prompts as one batch, not one after another
    dense: bool = False  # the dense SmolLM2 the stand-in was built from
    quantize: str | None = None  # load_local(fit=Fit.quantized(...)): "int8" or "int4" weights
    ram_gib: float | None = None  # accelerate's offloading: this much CPU RAM for weights, the rest on disk
    expert_cache: int | None = (
        None  # load_local(fit=Fit.expert_cache(...)): experts kept per layer, the rest on disk
    )
    without: str | None = None  # one of WITHOUT: that part of the fast path switched off
    greedy: bool = False  # the most likely token each step, not the blog's sampling (llama-bench draws none)


NAIVE = "blog pipeline, fp32"
PROFILED_STEPS = 8  # decode steps step_profile runs under the profiler, after the timed runs
CONFIGS = [
    Config(NAIVE, pipeline=True),
    Config("fp32 eager", experts="eager"),
    Config("fp32 grouped_mm", experts="grouped_mm"),
    Config("fp32 batched_mm", experts="batched_mm"),
    Config("bf16 eager", dtype="bfloat16", experts="eager"),
    Config("bf16 grouped_mm", dtype="bfloat16", experts="grouped_mm"),
    Config("bf16 batched_mm", dtype="bfloat16", experts="batched_mm"),
    Config("fp32 static cache", cache="static"),
    Config("fp32 static cache + compile", cache="static", compile=True),
    Config("fast path (this machine's choice)", fast=True, dtype=None),
    Config("fast path, torch.compile's graph raced too", fast=True, dtype=None, graph=True),
    Config("fast path, the lean step only", fast=True, dtype=None, without="step written layer by layer"),
    Config("fast path without the lean step", fast=True, dtype=None, without="lean step"),
    Config("fast path under no_grad, not inference_mode", fast=True, dtype=None, without="inference mode"),
    Config("fast path without the packed copies", fast=True, dtype=None, without="packed copies"),
    Config("fast path in bf16", fast=True, dtype="bfloat16"),
    Config("fast path in fp32", fast=True, dtype="float32"),
    Config("int8 weights (fast path)", fast=True, dtype=None, quantize="int8"),
    Config(
        "int8 weights, bf16 model", fast=True, dtype="bfloat16", quantize="int8"
    ),  # this machine may pick fp32
    Config("int4 weights (fast path)", fast=True, dtype=None, quantize="int4"),
    Config("offloaded by accelerate: 1 GiB in RAM, the rest on disk", ram_gib=1.0),
    Config(
        "expert cache, 2 of 8 per layer (fast path, the rest on disk)", fast=True, dtype=None, expert_cache=2
    ),
    Config(
        "expert cache, 4 of 8 per layer (fast path, the rest on disk)", fast=True, dtype=None, expert_cache=4
    ),
    Config("4 prompts, one at a time (fast path)", fast=True, dtype=None, prompts=4),
    Config("4 prompts, one batch (fast path)", fast=True, dtype=None, prompts=4, batch=True),
    Config("dense SmolLM2 fp32 (the stand-in's source)", dense=True),
]


def matvec_ceiling(kernels: dict, experts_share: float) -> float:
    """Tokens/s if a decode step did nothing but its matrix-vector products, each kind of weight at
    the best speed `choose_kernels` measured for its shape (from memory, not a cache): what the kernels
    allow. `kernels`: {kind: {"gb_s": {kernel: GB/s}, "nbytes": bytes}}; `experts_share` = K / E, the part
    of each expert tensor a token reads."""
    seconds = 0.0
    for kind, measured in kernels.items():
        share = experts_share if kind.startswith("experts.") else 1.0
        seconds += measured["nbytes"] * share / (max(measured["gb_s"].values()) * GB)
    return 1 / seconds


def load_key(config: Config, resolved: bool = False) -> tuple:
    """The settings that decide the model a configuration loads. As named, dtype=None (this machine's choice) is
    a setting of its own even where it picks bfloat16, so that a measured run times the machine's choice and the
    named dtype apart; `resolved` reads None as the dtype this machine picks (the quick run: one load each). The
    blog's pipeline and compiled configurations key on their own name: a process of their own, so that compiled
    code never leaks into another."""
    if config.pipeline or config.compile or config.graph:
        return (config.name,)
    dtype = config.dtype if config.dtype or not resolved else dtype_name(pick_dtype()[0])
    return (dtype, config.fast, config.quantize, config.ram_gib, config.expert_cache, config.dense)


def by_load(configs: list, resolved: bool = False) -> list[list[Config]]:
    """`configs` grouped by `load_key`, each group in the order of its first member: one load per group."""
    groups: dict[tuple, list[Config]] = {}
    for config in configs:
        groups.setdefault(load_key(config, resolved), []).append(config)
    return list(groups.values())


def _peak_memory(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _load(config: Config, device: str):
    """(runner, pipeline or None): the configuration's model, ready to answer encoded prompts."""
    import torch

    dtype = pick_dtype()[0] if config.dtype is None else getattr(torch, config.dtype)
    if config.pipeline:  # the blog's call, word for word
        from transformers import pipeline

        pipe = pipeline("text-generation", model=str(ensure_standin()), dtype=dtype, device_map="auto")
        return LocalModel(pipe), pipe
    if config.dense:
        model, tokenizer = load_dense_source(dtype)
        return LocalModel(model=model.to(device), tokenizer=tokenizer), None
    fit = None  # a configuration names at most one way to fit
    if config.ram_gib:
        fit = Fit.budget({"cpu": f"{config.ram_gib}GiB"})
    elif config.quantize:
        fit = Fit.quantized(config.quantize)
    elif config.expert_cache:
        fit = Fit.expert_cache(config.expert_cache)
    pipe = load_local(str(ensure_standin()), dtype=dtype, fit=fit, fast=config.fast, compiled=config.graph)
    return LocalModel(pipe), None


def _knobs(config: Config) -> dict:
    from transformers import CompileConfig

    knobs = dict(do_sample=False) if config.greedy else dict(BLOG_SAMPLING)
    if config.cache:
        knobs["cache_implementation"] = config.cache
    if config.compile:
        compile_config = CompileConfig(mode="default")
        compile_config._compile_all_devices = True  # transformers compiles only on GPUs unless told
        knobs["compile_config"] = compile_config
    elif config.cache == "static":
        knobs["disable_compile"] = True
    return knobs


MATRIX_PRODUCTS = {
    "aten::mm", "aten::addmm", "aten::mv", "aten::addmv_", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm",
    "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu", "aten::_int_mm",
    "mkldnn::_linear_pointwise",  # the fast path's packed copies
    "mixtral_notebooks::int8_matmul", "mixtral_notebooks::int8_experts",  # our kernels (helpers/quant_ops.cpp)
    "mixtral_notebooks::int4_matmul", "mixtral_notebooks::int4_experts",
    "mixtral_notebooks::dense_matmul", "mixtral_notebooks::dense_experts",
    "mixtral_notebooks::layer_product",  # a product inside our layer operator (helpers/quant_ops.cpp's layer_step)
}  # fmt: skip


def step_profile(runner, ids: list, steps: int = 8, repeats: int = 3) -> dict:
    """Where one decode step's time goes, in ms per step: `steps` greedy steps after the prompt `ids`, run as a
    plain loop of forwards under torch.profiler, operators' own time split into matrix products, attention and
    the other operators; what the step spends outside any operator (Python in the model's code), from the loop
    timed without the profiler; and what `generate` adds around the same forwards (its logits processors,
    stopping checks and cache bookkeeping), from the same steps through the package's generate path timed token by
    token. Those two are differences between timings, and one below zero is reported as zero (the profiler's own
    cost can make the operators' times exceed the unprofiled loop's; two timings differ by their noise). Also the
    operators, dtype conversions and concatenations per step. The prompt but its last token is passed once; every run
    continues from a copy of its cache (the same values, so the same steps): a static cache where the fast path kept a
    step written layer by layer (as generate runs it), whose products our operator reports to the profiler as
    mixtral_notebooks::layer_product and its attention as mixtral_notebooks::layer_attention. 08_performance draws it."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    model = runner.model
    head, last = torch.tensor([ids[:-1]], device=model.device), torch.tensor([ids[-1:]], device=model.device)
    record = getattr(model, "load_record", None)
    kept = record is not None and record.recipe is not None and record.recipe.step.get("kept")
    # the prompt but its last token, once (batched_mm takes most of a second a token): each run continues from a copy
    with torch.inference_mode():
        cache = StaticCache(config=model.config, max_cache_len=len(ids) + steps + 1) if kept else None
        cached = model(head, past_key_values=cache, use_cache=True).past_key_values

    def decode(profiler=None):
        """The prompt's last token (not timed), then `steps` greedy steps: their seconds, under `profiler` if given."""
        cache = copy.deepcopy(cached)
        token = model(last, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        with profiler or contextlib.nullcontext():
            started = time.perf_counter()
            for _ in range(steps):
                out = model(token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            return time.perf_counter() - started

    def generate_decode():  # seconds from the first new token to the last, over `steps` steps
        knobs = dict(do_sample=False, max_new_tokens=steps + 1, min_new_tokens=steps + 1)
        times = runner.run([ids], dict(knobs, past_key_values=copy.deepcopy(cached)))[0].token_times
        return times[-1] - times[0]

    with torch.inference_mode():  # as the package's generate path runs
        decode()  # warm-up
        plain = min(decode() for _ in range(repeats))  # the least disturbed of `repeats` timings
        generated = min(generate_decode() for _ in range(repeats))
        prof = profile(activities=[ProfilerActivity.CPU])
        decode(prof)
    part_of = {key: "matrix products" for key in MATRIX_PRODUCTS}
    ms = {"matrix products": 0.0, "attention": 0.0, "other operators": 0.0}
    counts = {"operators": 0, "conversions": 0, "concatenations": 0}
    for e in prof.key_averages():
        attention = "dot_product" in e.key or e.key == "mixtral_notebooks::layer_attention"
        part = part_of.get(e.key, "attention" if attention else "other operators")
        ms[part] += e.self_cpu_time_total / 1000 / steps
        counts["operators"] += e.count / steps
        counts["conversions"] += e.count / steps if e.key == "aten::_to_copy" else 0
        counts["concatenations"] += e.count / steps if e.key == "aten::cat" else 0
    ms["outside operators"] = max(0.0, 1000 * plain / steps - sum(ms.values()))
    ms["generate's loop"] = max(0.0, 1000 * (generated - plain) / steps)
    return dict(ms=ms, per_step=counts)


# the parts of the fast path a row can switch off
WITHOUT = ("step written layer by layer", "lean step", "inference mode", "packed copies")


@contextlib.contextmanager
def switched_off(part: str | None, model):
    """The package's fast path with one part of it switched off for a row (see WITHOUT), back on after."""
    import torch

    if part is None:
        yield
    elif part in ("step written layer by layer", "lean step"):
        # the lean step for every one-token step (none kept at load: the fast path as it is), or transformers' forward
        # for every step (use_lean_step, use_graph_step bind theirs); either on the dynamic cache, not the static one
        decoder = model.model
        if "forward" not in vars(decoder):
            if part == "lean step":
                raise ValueError("no lean step to switch off: decode.use_lean_step left this model as it was")
            yield  # no step of its own: nothing written layer by layer to switch off
            return
        step = model.load_record.recipe.step
        forward, kept = vars(decoder)["forward"], step.get("kept")
        try:
            if part == "lean step":
                del decoder.forward
            elif kept:
                use_lean_step(model)
            if kept:
                step["kept"] = False
            yield
        finally:
            decoder.forward = forward
            if kept:
                step["kept"] = kept
    elif part == "inference mode":  # LocalModel.run and step_profile under no_grad, as the blog's pipeline
        with unittest.mock.patch.object(torch, "inference_mode", torch.no_grad):
            yield
    elif part == "packed copies":  # the weights' own product where a packed copy was chosen
        from helpers.decode import JOINED
        from helpers.fastpath import _EXPERT_KERNELS, KERNELS

        modules = list(model.modules())
        holders = [
            m
            for m in modules
            if getattr(m, "weight_copy", None) is not None and KERNELS[m.kernel][0] == "packed"
        ]
        copies = [m.weight_copy for m in holders]
        joined = {m: fused for m, fused in JOINED.items() if any(m.q_proj is h for h in holders)}
        experts = {m: dict(_EXPERT_KERNELS[m]) for m in modules if m in _EXPERT_KERNELS}
        for m in holders:
            m.weight_copy = None
        for m in joined:  # q, k and v's packed copy joined (fastpath.join_projections)
            del JOINED[m]
        for m, kernels in experts.items():
            _EXPERT_KERNELS[m] = {
                a: (n, c, s) if KERNELS[n][0] != "packed" else ("F.linear", None, None)
                for a, (n, c, s) in kernels.items()
            }
        try:
            yield
        finally:
            for m, copy in zip(holders, copies):
                m.weight_copy = copy
            JOINED.update(joined)
            _EXPERT_KERNELS.update(experts)
    else:
        raise ValueError(f"without={part!r}: one of {WITHOUT}")


def run_group(
    configs: list, new_tokens: int = 64, warmup: int = 4, seed: int = 0, warm: bool = True
) -> list[dict]:
    """Load the model a group of `by_load` shares once, then time each configuration on it in turn
    (its experts implementation set, a warm-up, the timed runs). Call it in a fresh process (`measure`
    does): compiled code stays the group's, and each row's peak memory is its process's so far.
    warm=False (the quick run) leaves out the warm-up run, except where a configuration compiles there."""
    import torch

    if len({load_key(c, resolved=True) for c in configs}) != 1:
        raise ValueError(f"one load group at a time: {[c.name for c in configs]} load different models")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    runner, pipe = _load(configs[0], device)
    load_s = time.perf_counter() - started
    loaders = getattr(runner.model.config, "_experts_implementation", None)
    rows = []
    for config in configs:
        wanted = config.experts or loaders
        if wanted != getattr(runner.model.config, "_experts_implementation", None):
            runner.model.set_experts_implementation(wanted)
        torch.manual_seed(seed)
        try:
            with switched_off(config.without, runner.model):
                row = _time(config, runner, pipe, device, new_tokens, warmup, warm=warm or config.compile)
        except Exception as err:  # the group's other configurations still run; the traceback goes to stderr
            traceback.print_exc()
            row = {"error": f"{type(err).__name__}: {err}"}
        rows.append(dict(row, load_s=load_s, loaded_with=[c.name for c in configs]))
    return rows


def in_turn(
    config: Config, other, rounds: int, new_tokens: int = 64, warmup: int = 4
) -> list[tuple[dict, object]]:
    """Load `config` once (no pipeline call), then `rounds` times: time it (a warm-up run before the first), then call
    `other()`, another program's timed run, so that each round's two figures are taken one right after the other.
    -> [(our row, what other() returned)] per round."""
    import gc

    import torch

    if config.pipeline:
        raise ValueError(
            f"{config.name}: in_turn times the package's generate path, not the blog's pipeline call"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runner, _ = _load(config, device)
    pairs = []
    for round_ in range(rounds):
        torch.manual_seed(round_)
        ours = _time(config, runner, None, device, new_tokens, warmup, warm=round_ == 0)
        pairs.append((ours, other()))
    del runner
    gc.collect()
    torch._dynamo.reset()  # the next load compiles afresh (dynamo's recompile limit counts one code object's graphs)
    return pairs


def _time(config: Config, runner, pipe, device: str, new_tokens: int, warmup: int, warm: bool = True) -> dict:
    """One configuration's warm-up and timed runs on a loaded model: its row, less the load."""
    import torch

    model, tokenizer = runner.model, runner.tokenizer
    prompts = [TASKS[n]["prompt"] for n in list(TASKS)[: config.prompts]]
    if config.pipeline:
        rows = [tokenizer(blog_prompt(p))["input_ids"] for p in prompts]
    else:
        rows = [chat_ids(tokenizer, p) for p in prompts]
    knobs = dict(_knobs(config), max_new_tokens=new_tokens)
    batches = [rows] if config.batch else [[r] for r in rows]

    def timed(batch, **extra):
        """One run: the blog's pipeline call, or the package's generate path. -> (token times, batch size)"""
        if config.pipeline:
            clock = TokenClock()
            pipe(blog_prompt(prompts[0]), return_full_text=False, streamer=clock, **knobs, **extra)
            return [t - clock.started for t in clock.times]
        stop = extra.pop("stop_after", None)
        steps = itertools.count(1)
        should_stop = (lambda: next(steps) >= stop) if stop else None
        return runner.run(batch, dict(knobs, **extra), should_stop=should_stop)[0].token_times

    warm_started = time.perf_counter()  # same lengths as the timed runs, stopped after a few tokens
    if warm and config.pipeline:
        from transformers import StoppingCriteriaList

        limit = max(map(len, batches[0])) + warmup + 2
        timed(
            batches[0],
            stopping_criteria=StoppingCriteriaList(
                [
                    lambda ids, scores, **_: torch.full(
                        (ids.shape[0],), ids.shape[1] >= limit, dtype=torch.bool
                    )
                ]
            ),
        )
    elif warm:
        timed(batches[0], stop_after=warmup + 2)
    warmup_s = time.perf_counter() - warm_started if warm else None

    runs, wall, meter = [], time.perf_counter(), OffloadMeter(model)
    for batch in batches:
        with meter:
            times = timed(batch, min_new_tokens=new_tokens)
        if len(times) < 2 + warmup:
            raise ValueError(
                f"only {len(times)} tokens came back: ask for more than 1 + warmup ({1 + warmup})"
            )
        runs.append(
            dict(
                ttft_s=times[0],
                decode_tok_s=decode_rate(times, warmup, len(batch)),
                prompt_tokens=max(map(len, batch)),
                batch=len(batch),
            )
        )
    wall = time.perf_counter() - wall
    # where one step's time goes: one sequence in memory, each step its own (no compiled step, most of which runs in
    # inductor's fused code that the profile's split does not sort, our kernel's operators called from inside it; no
    # copies in)
    profiled = config.prompts == 1 and not (
        config.ram_gib or config.expert_cache or config.compile or config.cache or config.graph
    )
    steps, repeats = (PROFILED_STEPS, 3) if warm else (1, 1)  # the quick run proves the profile runs, no more
    step = step_profile(runner, rows[0], steps, repeats) if profiled else None

    context = sum(r["prompt_tokens"] for r in runs) / len(runs) + (1 + warmup + new_tokens) / 2
    element = model.dtype.itemsize
    record = getattr(model, "load_record", None)  # None: the blog's own pipeline call, or the dense model
    per_weight = record.bytes_per_parameter if record is not None else element  # quantized: as measured
    bytes_ = decode_bytes(model.config, per_weight, int(context), runs[0]["batch"], kv_bytes=element)
    tiers = (
        meter.per_token() if config.ram_gib or config.expert_cache else None
    )  # offloaded: measured per tier
    if tiers:  # all of it comes through RAM here (the OS caches the files): that is what the ceiling counts
        bytes_["per_token"] = (
            sum(v for k, v in tiers.items() if k in ("resident", "from RAM", "from disk"))
            + bytes_["parts"]["kv_cache"] / runs[0]["batch"]
        )
    kernels = {kind: asdict(k) for kind, k in record.recipe.kernels.items()} if config.fast else {}
    share = model.config.num_experts_per_tok / model.config.num_local_experts if kernels else None
    return dict(
        asdict(config),
        dtype=dtype_name(model.dtype),
        device=device,
        experts="dense" if config.dense else getattr(model.config, "_experts_implementation", None),
        warmup_s=warmup_s,
        compile_s=warmup_s if config.compile else None,
        ttft_s=sum(r["ttft_s"] for r in runs) / len(runs),
        decode_tok_s=sum(r["decode_tok_s"] for r in runs) / len(runs),
        throughput_tok_s=sum(r["batch"] * new_tokens for r in runs) / wall,
        prompt_tokens=runs[0]["prompt_tokens"],
        new_tokens=new_tokens,
        sequences=len(rows),
        batch=runs[0]["batch"],
        bytes_per_token=bytes_["per_token"],
        peak_memory=_peak_memory(device),
        kernels=kernels,
        matvec_ceiling_tok_s=matvec_ceiling(kernels, share) if kernels else None,
        step=step,
        graph=(dict(record.recipe.step) or None)
        if config.fast
        else None,  # what choose_step measured at load
        tiers=tiers,
    )


def _run_apart(group: list, new_tokens: int, warmup: int, warm: bool = True) -> list[dict]:
    """run_group in a fresh process: a row per configuration, or {"error": the last line it printed} for each."""
    job = json.dumps(
        dict(configs=[asdict(c) for c in group], new_tokens=new_tokens, warmup=warmup, warm=warm)
    )
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run([sys.executable, __file__, job], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return [{"error": (done.stderr.strip().splitlines() or ["(no output)"])[-1]}] * len(group)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _keep(best: dict, config: Config, row: dict, progress) -> None:
    """Keep `row` as `config`'s best round so far, or its first failure; say how it went."""
    if "error" in row:
        best.setdefault(config.name, dict(asdict(config), **row))
        progress(f"    {config.name}: FAILED: {row['error']}")
        return
    progress(
        f"    {config.name}: {row['decode_tok_s']:.1f} tok/s, first token {row['ttft_s']:.2f} s, "
        f"peak memory {row['peak_memory'] / GiB:.1f} GiB"
    )
    kept = best.get(config.name, {})
    row["all_tok_s"] = kept.get("all_tok_s", []) + [row["decode_tok_s"]]
    if row["decode_tok_s"] >= kept.get("decode_tok_s", 0):  # a failed round has no decode_tok_s
        best[config.name] = row
    else:
        kept["all_tok_s"] = row["all_tok_s"]


def sampler_timing(rounds: int = 50) -> dict:
    """What turning one token's logits into the scores a sampled token is drawn from costs with the blog's knobs, for
    the stand-in's vocabulary, best of `rounds`: transformers' warpers against the fast path's sampler, side by side.
    Every row samples with these knobs, the fast path's rows through its sampler, the others (the blog's pipeline
    call included) through transformers' warpers: each row's tok/s holds one of these costs."""
    import torch
    from transformers import AutoConfig

    vocabulary = AutoConfig.from_pretrained(ensure_standin()).vocab_size
    ours = sampler(dict(BLOG_SAMPLING))["logits_processor"][0]
    warpers = ours.warpers  # transformers' own, as generate builds them for these knobs
    logits = torch.randn(1, vocabulary, generator=torch.Generator().manual_seed(0)) * 4
    ids = torch.zeros(1, 1, dtype=torch.long)
    pair = {"transformers": lambda: warpers(ids, logits), "fast path": lambda: ours(ids, logits)}
    ms = {name: 1000 * best_seconds(run, rounds=rounds) for name, run in pair.items()}
    return dict(vocabulary=vocabulary, ms=ms)


def measure(
    configs: list | None = None,
    new_tokens: int = 64,
    warmup: int = 4,
    rounds: int = 1,
    progress=print,
    quick: bool = False,
) -> dict:
    """Run each load group (`by_load`) in a process of its own, side by side, `rounds` times round-robin
    (each configuration keeps its best round: noise only ever slows a run down), with the memory
    bandwidth measured before and after; add each one's ceiling, efficiency and ratio to the blog's path.
    quick=True proves that every configuration runs, at the least cost: the loads this machine makes
    the same are one load (`by_load(resolved=True)`), and there is no warm-up run but where code compiles."""
    import torch

    configs = configs or CONFIGS
    whole_number("rounds", rounds, 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidths = [measure_bandwidth(device=device)]
    progress(f"memory read bandwidth: {bandwidths[0] / GB:.1f} GB/s")
    best: dict[str, dict] = {}
    groups = by_load(configs, resolved=quick)
    for round_ in range(1, rounds + 1):
        for i, group in enumerate(groups, 1):
            progress(
                f"[{i}/{len(groups)}{f', round {round_}/{rounds}' if rounds > 1 else ''}] "
                f"{'; '.join(c.name for c in group)}{' (one load)' if len(group) > 1 else ''} ..."
            )
            for config, row in zip(group, _run_apart(group, new_tokens, warmup, warm=not quick)):
                _keep(best, config, row, progress)
    bandwidths.append(measure_bandwidth(device=device))
    bandwidth, sampler = max(bandwidths), sampler_timing()
    rows = [best[c.name] for c in configs]
    naive = next((r for r in rows if r.get("name") == NAIVE and "error" not in r), None)
    for row in rows:
        if "error" not in row:
            row["ceiling_tok_s"] = ceiling(bandwidth, row["bytes_per_token"])
            row["efficiency"] = row["decode_tok_s"] / row["ceiling_tok_s"]
            row["vs_naive"] = row["decode_tok_s"] / naive["decode_tok_s"] if naive else None
    return dict(
        bandwidths=bandwidths,
        bandwidth=bandwidth,
        device=device,
        new_tokens=new_tokens,
        warmup=warmup,
        rounds=rounds,
        quick=quick,
        rows=rows,
        sampler=sampler,
    )


if __name__ == "__main__":  # one load group, in a process of its own
    job = json.loads(sys.argv[1])
    print(
        json.dumps(
            run_group(
                [Config(**c) for c in job["configs"]], job["new_tokens"], job["warmup"], warm=job["warm"]
            )
        )
    )
