"""The fast path: the fastest correct settings for this hardware, chosen by measuring them on it.

Decoding one token reads every weight it uses once, so its speed is bounded by memory bandwidth
/ bytes read per token (sizing.ceiling). What gets a CPU closer to it is measured here, on this machine,
never assumed: which dtype decodes faster (`measure_dtypes`, once per machine), which kernel reads each
kind of weight fastest for one token (`choose_kernels`: torch.mv, F.linear, F.linear on weights
re-laid column-major, oneDNN's product on a copy packed into its blocked layout, F.linear on a float32
copy, which wins where a bf16 product's fixed cost outweighs reading a tiny matrix: the routers, or our C kernel
on the weight as held, quant_kernel.c's dense_matmul, which a layer's step calls too), and which experts
implementation runs a decode step fastest while giving transformers' eager answer (`choose_experts`: the
package's `per_token` loop, which reads only the chosen experts' weights, or transformers' own), and whether one
token's step written layer by layer, by our C++ layer operator or, where asked (`load_pipeline(compiled=True)`),
torch.compile's graph, beats the lean step (`choose_step`). `fast_recipe` says what this machine gets;
`load_pipeline` applies it (08_performance measures it).

Shapes: T = tokens, K = experts per token, D = hidden size, I = expert FFN size.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from .data import BLOG_SAMPLING, GB
from .decode import (
    JOINED,
    Fused,
    _ours_reads,
    compiled_layer,
    native_layer,
    native_may_run,
    native_reads,
    use_graph_step,
    use_lean_step,
)
from .experts import DECODE_TOKENS, register_experts, token_loop
from .files import atomic_file, cache_root
from .hardware import (
    best_seconds,
    cores_busy_elsewhere,
    cpuinfo,
    dtype_name,
    system_memory,
    timing_buffer_bytes,
)
from .quant_kernel import kernel_unavailable, operators, source_digest
from .sizing import fits

MARGIN = 0.9  # a kernel replaces F.linear, or float32 replaces bf16, only in under 90% of its time
DTYPES = ("float32", "bfloat16")  # the CPU's candidates: float16 has no fast CPU kernels


def _mv(x, w):  # [1, K] x [N, K] -> [1, N]
    import torch

    return torch.mv(w, x[0])[None]


def _linear(x, w):
    import torch.nn.functional as F

    return F.linear(x, w)


def _packed(x, w):  # [T, K] x a weight [N, K] packed by `packed_copy` -> [T, N]
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _float32(x, w):  # [T, K] x a float32 copy of a weight [N, K] -> [T, N] in x's dtype (its rounding)
    import torch.nn.functional as F

    return F.linear(x.float(), w).to(x.dtype)


@functools.cache
def _dense_matmul():  # our kernel's operator, looked up once: products run on every token
    return operators().dense_matmul


def _ours(x, w):  # [T, K] x a float32 or bf16 weight [N, K], read in place by quant_kernel.c -> x's dtype
    return _dense_matmul()(x, w)


def packed_copy(weight):
    """A copy of `weight` [N, K] in oneDNN's blocked layout for `_packed`, as inductor's frozen linears hold it."""
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def _stamp(weight) -> tuple:  # what a copy was made from: once any of it changes, the copy is stale (changes
    return weight.dtype, weight.device, weight._version, weight.data_ptr()  # through .data bump no _version)


# kernel -> (the layout it reads, the product of one token [1, K] with a weight [N, K])
KERNELS = {
    "F.linear": (None, _linear),
    "torch.mv": (None, _mv),
    "F.linear, column-major": ("column-major", _linear),
    "oneDNN packed": ("packed", _packed),  # a copy beside the weight: its memory twice
    "float32 copy": ("float32", _float32),  # a copy beside a bf16 weight: its memory three times
    # quant_kernel.c, where it builds here (x86-64 Linux with AVX2 and FMA, a C and C++ compiler)
    "our kernel": (None, _ours),
}
# read the weight itself, through a module of ours (KernelLinear, KernelRouter)
IN_PLACE = ("torch.mv", "our kernel")
COPIES = {
    "packed": packed_copy,
    "float32": lambda w: w.detach().float(),
}  # layouts held as a copy beside the weight
# {experts module: {attribute: (kernel, a copy per expert (packed, float32) or None, the weight's _stamp)}}
_EXPERT_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _expert_weights(experts, attribute: str) -> tuple:
    """(product, weights by expert) for one kind of `experts`' weights: the kernel `choose_kernels` measured
    fastest for it, or F.linear on the parameter once its copies are stale."""
    kernel, copies, stamp = _EXPERT_KERNELS.get(experts, {}).get(attribute, ("F.linear", None, None))
    weight = getattr(experts, attribute)
    if copies is not None and _stamp(weight) != stamp:
        kernel, copies = "F.linear", None
    if kernel == "our kernel" and not _ours_reads(weight):
        kernel = "F.linear"
    return KERNELS[kernel][1], weight if copies is None else copies


def _kernel_product(module, flat):
    """`flat` [T, K] times `module.weight` by `module.kernel` where it applies (one token for torch.mv; up to
    DECODE_TOKENS for a copy, fresh, or for our kernel, on a contiguous weight; the input of the weight's dtype);
    None where the module's own product must answer."""
    weight, copy = module.weight, module.weight_copy
    if flat.dtype != weight.dtype or len(flat) > DECODE_TOKENS:
        return None
    if copy is not None:
        return KERNELS[module.kernel][1](flat, copy) if _stamp(weight) == module.made_for else None
    if module.kernel == "our kernel" and _ours_reads(weight):
        return _ours(flat, weight)
    return _mv(flat, weight) if module.kernel == "torch.mv" and len(flat) == 1 else None


def _take_weight(module, source, kernel: str) -> None:
    """`module` multiplies `source`'s very weight (tied weights stay tied, the state dict is unchanged) by `kernel`,
    holding the copy its layout needs beside it, unregistered."""
    module.weight, module.kernel = source.weight, kernel
    layout = KERNELS[kernel][0]
    module.weight_copy = COPIES[layout](module.weight) if layout in COPIES else None
    module.made_for = _stamp(module.weight)


def per_token_experts(self, hidden_states, top_k_index, top_k_weights):
    """Experts for decoding: `token_loop`, each of a few tokens through its K chosen experts, reading only
    those experts' weights (views of the parameter or its copies, no masks), each product by the
    kernel `choose_kernels` measured fastest for it. Longer inputs (a prompt) go to grouped_mm."""
    if hidden_states.shape[0] > DECODE_TOKENS:
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    gate_up_product, gate_up_weights = _expert_weights(self, "gate_up_proj")
    down_product, down_weights = _expert_weights(self, "down_proj")

    def ffn(expert, x):  # [1, D] -> [1, D]
        gate, up = gate_up_product(x, gate_up_weights[expert]).chunk(2, dim=-1)  # [1, I] each
        return down_product(self.act_fn(gate) * up, down_weights[expert])

    return token_loop(hidden_states, top_k_index, top_k_weights, ffn, hidden_states.dtype)


def column_major(weight):
    """The same tensor (same shape and values), stored column by column in its last two dims."""
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2)


@functools.cache
def kernel_linear():
    """The module class, built on first use so that importing helpers does not import torch."""
    import torch

    class KernelLinear(torch.nn.Linear):
        """An nn.Linear whose decode-sized products go through the kernel measured faster here (`_kernel_product`):
        torch.mv for one token, our kernel on the weight itself or a product on a copy of the weight (packed,
        float32) for up to DECODE_TOKENS; the rest through F.linear. Once the weight's dtype, device or contents
        change, a copy is stale and F.linear answers. No gradient reaches the weight through a copy or our kernel:
        the package only decodes."""

        def __init__(self, linear, kernel: str):
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.bias = linear.bias
            _take_weight(self, linear, kernel)

        def forward(self, x):
            y = _kernel_product(self, x.reshape(-1, self.in_features))
            if y is None:
                return super().forward(x)
            y = y if self.bias is None else y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)

    return KernelLinear


@functools.cache
def kernel_router():
    """The router's module class with its logits by a measured kernel, built on first use (imports torch)."""
    import torch
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    class KernelRouter(MixtralTopKRouter):
        """A Mixtral router whose decode-sized logits go through the kernel measured faster here (`_kernel_product`),
        then its own arithmetic: softmax in float32 over the logits, the top_k, their weights summing to 1. Anything
        else goes through transformers' forward. Holds the very same weight, as KernelLinear does."""

        def __init__(self, router, kernel: str):
            torch.nn.Module.__init__(self)
            self.top_k, self.num_experts = router.top_k, router.num_experts
            self.hidden_dim = router.hidden_dim
            _take_weight(self, router, kernel)

        def forward(self, hidden_states):
            x = hidden_states.reshape(-1, self.hidden_dim)  # [T, D]
            logits = _kernel_product(self, x)  # [T, E]
            if logits is None:
                return super().forward(hidden_states)
            top, index = torch.softmax(logits.float(), dim=-1).topk(self.top_k, dim=-1)  # [T, top_k] each
            return logits, top / top.sum(dim=-1, keepdim=True), index

    return KernelRouter


def _is_router(module) -> bool:
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    return isinstance(module, MixtralTopKRouter)


def _weight_groups(model) -> dict:
    """The weights a decode step reads with a matrix-vector product, grouped by kind:
    {kind: [(module name, module, attribute)]}. Tied weights appear once."""
    groups, seen = {}, set()
    for name, module in model.named_modules():
        for attribute in ("weight", "gate_up_proj", "down_proj"):
            p = getattr(module, attribute, None)
            if p is None or not hasattr(p, "dim") or p.dim() not in (2, 3) or id(p) in seen:
                continue
            if p.dim() == 2 and not (name.endswith(("_proj", "lm_head")) or _is_router(module)):
                continue  # embeddings: a row lookup
            seen.add(id(p))
            kind = name.split(".")[-1] + ("." + attribute if p.dim() == 3 else "")
            groups.setdefault(kind, []).append((name, module, attribute))
    return groups


@dataclass
class KindKernels:
    """What `choose_kernels` measured for one kind of weight."""

    gb_s: dict  # {kernel: the kind's weight bytes over a one-token product's time, GB/s}
    chosen: str
    nbytes: int  # bytes of this kind in the model
    note: str = ""  # what the choice costs, or why the fastest was not chosen


def _kernel_speeds(shape: tuple, dtype) -> dict:
    """{kernel: GB/s} of one-token products with [N, K] = `shape` matrices of `dtype` on this CPU: as many
    distinct ones (at most 8,192) as fill `timing_buffer_bytes()`, more than the last-level cache holds, so
    they come from memory as a decode step's weights do; best of 3 passes. Measured once per machine
    (`_once_per_machine`)."""
    import torch

    def measure():
        n, k = shape
        size = n * k * torch.empty(0, dtype=dtype).element_size()
        count = max(1, min(8192, math.ceil(timing_buffer_bytes() / size)))
        flat = torch.full((count * n * k,), 0.01, dtype=dtype)  # the values do not change a product's time
        layouts = {None: flat.view(count, n, k), "column-major": flat.view(count, k, n).transpose(-1, -2)}
        if dtype != torch.float32:  # a float32 weight is its own float32 copy: F.linear's figure
            layouts["float32"] = flat.float().view(count, n, k)
        try:  # oneDNN packs bf16 only where the CPU computes it (AVX-512 or AMX); elsewhere the others are measured
            layouts["packed"] = [packed_copy(w) for w in layouts[None]]
        except RuntimeError:
            pass
        x = torch.randn(1, k, dtype=dtype)
        return {
            kernel: count * size / best_seconds(lambda m=layouts[layout]: [product(x, w) for w in m]) / GB
            for kernel, (layout, product) in KERNELS.items()
            if layout in layouts and (kernel != "our kernel" or ours)
        }

    ours = not kernel_unavailable()  # where it cannot build, the others are measured
    key = [list(shape), dtype_name(dtype), list(KERNELS), ours and source_digest()]
    return _once_per_machine("kernels", key, measure)


_BUSY_WARNED: list = []  # the figures this process measured on a busy machine and said so, at most one


def _once_per_machine(name: str, key: list, measure) -> dict:
    """`measure()`'s figures, measured once per CPU model, torch and transformers version, thread count,
    version of this file and `key`, then read from the cache folder (`measured/`); under a lock, so one
    process measures and the others wait for its figures. Figures taken while other work kept busy more cores
    than this process's threads left it (`cores_busy_elsewhere`, with a quarter of a core to spare) serve this
    process only: they are not kept, and the next load measures again."""
    import torch
    import transformers

    machine = [
        cpuinfo("model name") or platform.processor(),
        torch.__version__,
        transformers.__version__,
        torch.get_num_threads(),
        hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12],
    ]
    digest = hashlib.sha256(json.dumps([machine, key], sort_keys=True, default=str).encode()).hexdigest()
    path = cache_root() / "measured" / f"{name}-{digest[:16]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return json.loads(path.read_text())
        figures, elsewhere = cores_busy_elsewhere(measure)
        cores, threads = os.cpu_count() or 1, torch.get_num_threads()
        if elsewhere is not None and elsewhere > cores - threads + 0.25:
            if not _BUSY_WARNED:  # once per process: a busy machine is busy for every kind
                _BUSY_WARNED.append(name)
                warnings.warn(
                    f"the {name} figures were measured while other work kept {elsewhere:.1f} of this machine's "
                    f"{cores} cores busy ({threads} threads here): they serve this process and are not kept, nor are "
                    "any others measured as busy in it; load again on a quiet machine to measure and keep them",
                    stacklevel=2,
                )
            return figures
        atomic_file(path, lambda tmp: tmp.write_text(json.dumps(figures, indent=1)))
    return figures


def choose_kernels(model) -> dict:
    """For each kind of weight, the one-token product each of KERNELS makes with matrices of its shape and
    dtype on this CPU (`_kernel_speeds`: from memory, not a cache; once per machine), and that kind switched to
    the fastest: the weights' own F.linear unless another takes under MARGIN of its time. A re-layout goes
    one tensor at a time, so memory grows by one tensor at most; a copy (packed, float32) is kept beside the
    weight (prompts and the other experts implementations read the weight), so that kind's memory grows by the
    copy's bytes, and is chosen only where the available RAM holds it (`sizing.fits`). A Mixtral's layers are not
    re-laid where our kernels are built: our layer operator reads them where they are held, and the load races it
    (`choose_step`). Returns {kind: KindKernels}."""
    report, stepped = {}, native_may_run(model) and not kernel_unavailable()
    for kind, members in _weight_groups(model).items():
        params = [getattr(m, a) for _, m, a in members]
        nbytes = sum(p.nbytes for p in params)
        copy_bytes = {"packed": nbytes, "float32": nbytes * 4 // params[0].element_size()}
        available = system_memory()["available"]
        room = {layout: fits(b, available) for layout, b in copy_bytes.items()}
        speeds = _kernel_speeds(tuple(params[0].shape[-2:]), params[0].dtype)
        held = stepped and kind != "lm_head"  # read in place by our layer operator
        allowed = {
            k: v
            for k, v in speeds.items()
            if room.get(KERNELS[k][0], True) and not (held and KERNELS[k][0] == "column-major")
        }
        best = max(allowed, key=allowed.get)
        chosen = best if speeds["F.linear"] < MARGIN * speeds[best] else "F.linear"
        layout = KERNELS[chosen][0]
        for name, module, attribute in members:
            p = getattr(module, attribute)
            if layout == "column-major":
                p.data = column_major(p.data)
            if p.dim() == 3:
                copies = [COPIES[layout](w) for w in p] if layout in COPIES else None
                _EXPERT_KERNELS.setdefault(module, {})[attribute] = (chosen, copies, _stamp(p))
            elif chosen in IN_PLACE or layout in COPIES:
                swapped = (kernel_router() if _is_router(module) else kernel_linear())(module, chosen)
                model.set_submodule(name, swapped)
        note = ""
        fastest = KERNELS[max(speeds, key=speeds.get)][0]
        if layout in COPIES:
            note = f"a {layout} copy of {copy_bytes[layout] / 2**20:.1f} MiB"
        elif not room.get(fastest, True):
            note = f"no room in RAM for a {fastest} copy"
        elif held and fastest == "column-major":
            note = "not re-laid: our layer operator reads it as held"
        report[kind] = KindKernels(speeds, chosen, nbytes, note)
    return report


def _joined_product(kernel: str, dtype, x, copy):
    """[B, D] by q, k and v's joined copy [q + k + v, D], where the kernel applies (else None)."""
    return KERNELS[kernel][1](x, copy) if x.dtype == dtype and len(x) <= DECODE_TOKENS else None


def _weight_stamp(module) -> tuple:
    return _stamp(module.weight)


def join_projections(model) -> str:
    """Each attention whose q, k and v went to one kernel on a copy (packed, float32) without biases, or were quantized
    (their class's `join`), given one copy of the three weights joined (`decode.Fused`: the lean step's one product
    for the three) where the available RAM holds it, beside their own. Returns what it cost, or "" where none was."""
    import torch

    joined, available = 0, system_memory()["available"]  # read once: each copy made takes from it
    for attention in [m for m in model.modules() if hasattr(m, "q_proj")]:
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        kind = type(projections[0])
        if hasattr(kind, "join"):  # quantized: their buffers joined by their own class
            size = sum(b.nbytes for p in projections for b in p.buffers())
            if {type(p) for p in projections} == {kind} and fits(size, available - joined):
                JOINED[attention], joined = kind.join(projections), joined + size
            continue
        kernels = {
            getattr(p, "weight_copy", None) is not None and p.bias is None and p.kernel for p in projections
        }
        if len(kernels) > 1 or not all(kernels):
            continue
        kernel, weights = kernels.pop(), [p.weight.detach() for p in projections]
        layout = KERNELS[kernel][0]
        size = sum(w.nbytes for w in weights) * (4 // weights[0].element_size() if layout == "float32" else 1)
        if fits(size, available - joined):
            copy = COPIES[layout](torch.cat(weights))  # [q + k + v, D]
            product = functools.partial(_joined_product, kernel, weights[0].dtype)
            sizes = [p.out_features for p in projections]
            JOINED[attention], joined = Fused(projections, copy, product, _weight_stamp, sizes), joined + size
    if not joined:
        return ""
    return f"one-token steps multiply q, k and v in one product: a copy of the three joined, {joined / 2**20:.1f} MiB"


class TopKTopP:
    """transformers' temperature, top-k and top-p warpers as one logits processor that sorts only the k candidates
    (their top-p sorts the whole vocabulary, after top-k has left k of it). Its scores are theirs, the scaled logits
    where a token is kept and -inf elsewhere (scores tied with the k-th kept too, as theirs), so a seed draws the same
    tokens; where their choice rests on their sort's order among equal scores (a tie across the top-p cut), their
    warpers decide. Alike but for rounding: probabilities summed over k values, not the vocabulary, can move a cut that
    falls within rounding of 1 - top_p."""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        from transformers.generation import logits_process as lp

        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.warpers = lp.LogitsProcessorList(  # transformers' own, as generate builds them for these knobs
            [lp.TemperatureLogitsWarper(temperature)] * (temperature != 1.0)
            + [lp.TopKLogitsWarper(top_k), *[lp.TopPLogitsWarper(top_p)] * (top_p < 1)]
        )

    def __call__(self, input_ids, logits):  # logits [B, V] float32
        import torch

        scores = logits / self.temperature if self.temperature != 1.0 else logits
        values, index = torch.topk(scores, min(self.top_k, scores.shape[-1]))  # [B, k], descending
        kept = (scores >= values[:, -1:]).sum(-1, keepdim=True)  # [B, 1]: ties with the k-th are kept too
        if int(kept.max()) > values.shape[-1]:  # the ties too, then -inf past each row's own
            values, index = torch.topk(scores, int(kept.max()))
            past = torch.arange(values.shape[-1], device=kept.device) >= kept
            values = values.masked_fill(past, float("-inf"))
        tied = False  # top-p as their warper decides it, ascending, over the candidates only
        if self.top_p < 1.0:
            ascending = values.flip(-1)
            dropped = ascending.softmax(-1).cumsum(-1) <= 1 - self.top_p  # a prefix: the least likely
            dropped[:, -1] = False  # the most likely token always stays
            cut = dropped[:, :-1] & ~dropped[:, 1:]  # the last dropped, before the first kept
            tied = bool((cut & (ascending[:, :-1] == ascending[:, 1:])).any())
            values = values.masked_fill(dropped.flip(-1), float("-inf"))
        if tied:
            return self.warpers(input_ids, logits)
        return torch.full_like(scores, float("-inf")).scatter_(-1, index, values)


def sampler(knobs: dict) -> dict:
    """`generate` keyword arguments for `knobs` with transformers' temperature, top-k and top-p warpers replaced by one
    `TopKTopP` where sampling with a top-k and nothing else (beams, other processors: generate's own); else `knobs`."""
    other = set(knobs) - {*BLOG_SAMPLING, "max_new_tokens", "min_new_tokens"}  # beams, another processor
    if not knobs.get("do_sample") or not knobs.get("top_k") or other:
        return knobs  # greedy; no top-k (top-p over the whole vocabulary: nothing to save); or more asked
    keep = TopKTopP(knobs.get("temperature", 1.0), knobs["top_k"], knobs.get("top_p", 1.0))
    return dict(knobs, temperature=1.0, top_k=0, top_p=1.0, logits_processor=[keep])


def _tolerance(dtype) -> float:
    """How far another implementation's logits may stray from the reference's, as a share of its largest logit."""
    import torch

    return 1e-3 if dtype == torch.float32 else 5e-2


def _steps(model, prompt: list, cache, tokens) -> tuple:
    """`prompt` into `cache`, then one step at a time: each of `tokens` (a list), or as many greedy ones (a count).
    Returns (the tokens fed, each step's last logits [steps, V], seconds per step)."""
    import torch

    fed, logits, seconds = [], [], []
    out = model(torch.tensor([prompt], device=model.device), past_key_values=cache, use_cache=True)
    for token in tokens if isinstance(tokens, list) else range(tokens):
        fed.append(token if isinstance(tokens, list) else int(out.logits[0, -1].argmax()))
        started = time.perf_counter()
        out = model(torch.tensor([fed[-1:]], device=model.device), past_key_values=cache, use_cache=True)
        seconds.append(time.perf_counter() - started)
        logits.append(out.logits[0, -1].float())
    return fed, torch.stack(logits), seconds


def experts_on_our_kernel() -> dict:
    """{experts module: the names of its weights `choose_kernels` gave our kernel}, for a layer's step."""
    return {
        e: [a for a, held in kinds.items() if held[0] == "our kernel"] for e, kinds in _EXPERT_KERNELS.items()
    }


def race_steps(model, prompt: list, tokens: int, make_layer=compiled_layer) -> dict | None:
    """`tokens` greedy steps after `prompt` by the lean step, then the same by the step written layer by layer with
    `make_layer` (decode.compiled_layer or native_layer) on a static cache: {ids, lean, graph (logits), lean_s, graph_s,
    compile_s (its first step: compiling, where it compiles)}, the model left on that step; None where it does not
    apply."""
    import torch
    from transformers import DynamicCache, StaticCache

    with torch.inference_mode():  # as the package's generate call runs
        ids, lean, lean_s = _steps(model, prompt, DynamicCache(config=model.config), tokens)
        started = time.perf_counter()
        if not use_graph_step(model, make_layer, experts_on_our_kernel()):
            return None
        length = len(prompt) + len(ids)
        _steps(model, prompt, StaticCache(config=model.config, max_cache_len=length), ids[:1])
        compile_s = time.perf_counter() - started
        _, graph, graph_s = _steps(model, prompt, StaticCache(config=model.config, max_cache_len=length), ids)
    return dict(ids=ids, lean=lean, lean_s=lean_s, graph=graph, graph_s=graph_s, compile_s=compile_s)


STEP_NAMES = {"ours": "our layer operator", "compiled": "torch.compile's graph"}


def step_candidates(model, compiled: bool = False) -> dict:
    """The ways to write one token's step layer by layer that can run `model` here: our operator (decode.native_layer)
    where our kernels are built and read its weights, and where asked torch.compile's graph (decode.compiled_layer)."""
    # native_reads first: no kernel build where the operator cannot run
    ours = native_reads(model, experts_on_our_kernel()) and not kernel_unavailable()
    return {**({"ours": native_layer} if ours else {}), **({"compiled": compiled_layer} if compiled else {})}


def choose_step(model, prompt: list, tokens: int = 16, compiled: bool = False) -> dict:
    """Race each of `step_candidates(model, compiled)` against the lean step over the same `tokens` steps
    (`race_steps`) and keep the fastest whose median step takes under MARGIN of the lean step's and whose logits stay
    within the experts' tolerance; else the lean step. Returns the figures (`Recipe.step`): the lean step's median
    (over every race), the kept step's (or, where none is kept, the fastest's) median, top-1 agreement and largest
    difference, each candidate's, and the compile time; {} where none can run here, {kept: False, tokens: 0} where
    none could take this model's steps."""
    raced = step_candidates(model, compiled)
    if not raced:
        return {}
    candidates, lean_s = {}, []
    for name, make_layer in raced.items():
        try:
            race = race_steps(model, prompt, tokens, make_layer)
        except Exception as err:  # the lean step still answers: the load goes on without this candidate
            use_lean_step(model)
            warnings.warn(f"{STEP_NAMES[name]} failed its race at load and is not used: {err}", stacklevel=2)
            continue
        if race is None:
            continue
        lean, graph = race["lean"], race["graph"]
        candidates[name] = dict(
            label=STEP_NAMES[name],
            ms=1000 * median(race["graph_s"]),
            difference=float((graph - lean).abs().max() / lean.abs().max()),
            top1=int((graph.argmax(-1) == lean.argmax(-1)).sum()),
            ready_s=race["compile_s"],
            make_layer=make_layer,
        )
        lean_s += race["lean_s"]
    if not candidates:
        return dict(kept=False, tokens=0)
    lean_ms = 1000 * median(lean_s)
    good = [
        n
        for n, c in candidates.items()
        if c["ms"] < MARGIN * lean_ms and c["difference"] <= _tolerance(model.dtype)
    ]
    best = min(good or candidates, key=lambda n: candidates[n]["ms"])
    # the model is on the last candidate raced: switch it to the best, or back to the lean step
    if not good:
        use_lean_step(model)
    elif best != list(candidates)[-1]:
        use_graph_step(model, candidates[best]["make_layer"], experts_on_our_kernel())
    figures = {n: {k: v for k, v in c.items() if k != "make_layer"} for n, c in candidates.items()}
    chosen = figures[best]
    return dict(
        lean_ms=lean_ms,
        graph_ms=chosen["ms"],
        compile_s=figures.get("compiled", {}).get("ready_s", 0.0),
        tokens=tokens,
        top1=chosen["top1"],
        difference=chosen["difference"],
        kept=bool(good),
        step=best,
        candidates=figures,
    )


def choose_experts(model, candidates: tuple, rounds: int = 3) -> dict:
    """Time one decode-shaped forward (one token) with each experts implementation in `candidates`, round by
    round, and switch the model to the fastest whose logits match transformers' eager loop. Returns
    {implementation: best seconds per forward, or None where its answer differed from eager's}."""
    import torch

    if "per_token" in candidates:
        register_experts("per_token", per_token_experts)
    ids = torch.tensor([[model.config.bos_token_id or 1]], device=model.device)
    tolerance = _tolerance(model.dtype)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else None
    times = {}
    with torch.inference_mode():  # as the package's generate call runs
        model.set_experts_implementation("eager")
        reference = model(ids).logits.float()
        for name in candidates:
            model.set_experts_implementation(name)
            error = (model(ids).logits.float() - reference).abs().max() / reference.abs().max()
            if error <= tolerance:
                times[name] = []
        for _ in range(rounds):
            for name, taken in times.items():
                model.set_experts_implementation(name)
                taken.append(best_seconds(lambda: model(ids), rounds=1, sync=sync))
    seconds = {name: min(times[name]) if name in times else None for name in candidates}
    model.set_experts_implementation(min(times, key=lambda n: min(times[n])))
    return seconds


def _dtype_probe_config(config: dict):
    """A config with `config`'s shapes and enough layers (at most the model's own) that their float32 weights fill
    twice `timing_buffer_bytes()` (four times the last-level cache); one token reads its K experts' share of them."""
    from transformers import AutoConfig

    settings = {
        k: v for k, v in config.items() if k not in ("architectures", "dtype", "torch_dtype", "model_type")
    }
    probe = AutoConfig.for_model(config["model_type"], **settings)
    D, I, E = probe.hidden_size, probe.intermediate_size, getattr(probe, "num_local_experts", 1)
    layer = 4 * (4 * D * D + E * 3 * D * I)  # float32 bytes of one layer, a bound on its attention
    probe.num_hidden_layers = max(
        1, min(probe.num_hidden_layers, math.ceil(2 * timing_buffer_bytes() / layer))
    )
    return probe


def _time_decode(model, rounds: int = 5) -> float:
    """Best seconds of a one-token forward, a different token each time (so different experts)."""
    import torch

    tokens = torch.randint(0, model.config.vocab_size, (rounds, 1, 1))
    with torch.inference_mode():  # as the package's generate call runs
        return min(best_seconds(lambda t=t: model(t), rounds=1) for t in tokens)


def _step_ms(model) -> float:
    """ms of one decode step as the fast path takes it: the median step of the one `choose_step` keeps (or of the lean
    step), 8 greedy steps after 8 tokens; where no step written layer by layer can run, the best one-token forward."""
    step = choose_step(model, list(range(1, 9)), tokens=8)
    if step.get("tokens"):
        return step["graph_ms"] if step["kept"] else step["lean_ms"]
    return 1000 * _time_decode(model)


def measure_dtypes(config: dict) -> dict:
    """Which dtype decodes faster on this machine: for each of DTYPES, a model with `config`'s shapes and random
    weights (`_dtype_probe_config`), switched to the fast path as `load_pipeline` would (kernels, experts and step
    measured), timed over one-token steps (`_step_ms`). Measured once per machine and shapes (`_once_per_machine`).
    Returns {dtype: {"ms": per token, "layers": timed}}."""
    import torch
    from transformers import AutoModelForCausalLM

    probe = _dtype_probe_config(config)

    def measure():
        figures = {}
        torch.manual_seed(0)
        for name in DTYPES:
            model = AutoModelForCausalLM.from_config(probe, dtype=getattr(torch, name)).eval()
            apply_recipe(model, fast_recipe(model.dtype, "measured", "cpu"))
            figures[name] = dict(ms=_step_ms(model), layers=probe.num_hidden_layers)
            del model
        return figures

    return _once_per_machine(
        "dtypes", [probe.to_dict(), not kernel_unavailable() and source_digest()], measure
    )


def measured_dtype(config: dict) -> tuple:
    """On a CPU, the dtype to decode a model with `config` in, measured here (`measure_dtypes`), and why: float32
    where it decodes a token in under MARGIN of bf16's time, else the blog's bf16 (a near tie is within the noise,
    and bf16 holds the model in half the memory). Returns (torch dtype, reason with the figures)."""
    import torch

    f = measure_dtypes(config)
    f32, b16 = f["float32"]["ms"], f["bfloat16"]["ms"]
    chosen = "float32" if f32 < MARGIN * b16 else "bfloat16"
    share = f"{MARGIN:.0%}"
    why = (
        f"a token takes under {share} of bfloat16's time"
        if chosen == "float32"
        else f"the blog's dtype, kept unless float32 takes under {share} of its time"
    )
    return getattr(torch, chosen), (
        f"{chosen}: {why}; measured here: bfloat16 {b16:.1f} ms, float32 {f32:.1f} ms for one token through "
        f"{f[chosen]['layers']} layers of this model's shapes (random weights, the fast path on)"
    )


EXPERTS_CANDIDATES = ("per_token", "grouped_mm", "eager")


@dataclass
class Recipe:
    """The settings the notebooks run with, and why (`reasons[0]`: why this dtype). What is measured
    (`probe`) fills `kernels` and `experts_ms`, and `experts` becomes the implementation that won."""

    device: str
    dtype: object
    experts: str  # experts_implementation: the fit's own, or the candidates' winner once applied ("" before)
    probe: tuple  # what to measure: "kernels" (CPU, once per machine), "experts" (implementations, at load)
    reasons: list = field(default_factory=list)
    kernels: dict = field(default_factory=dict)  # {kind: KindKernels}, filled by apply_recipe
    experts_ms: dict = field(default_factory=dict)  # {implementation: ms per one-token forward, None: wrong}
    # the figures of the step written layer by layer (`choose_step`), where a candidate could run
    step: dict = field(default_factory=dict)

    def describe(self, fit_reason: str | None = None) -> str:
        """The settings, the reasons and what was measured, with `fit_reason` (why the experts were replaced)
        after the dtype's."""
        reasons = [*self.reasons[:1], *([fit_reason] if fit_reason else []), *self.reasons[1:]]
        experts = (
            repr(self.experts) if self.experts else f"chosen at load among {', '.join(EXPERTS_CANDIDATES)}"
        )
        lines = [f"fast path on {self.device}: dtype {dtype_name(self.dtype)}, experts {experts}"]
        lines += [f"  - {r}" for r in reasons]
        if self.experts_ms:
            timed = ", ".join(
                f"{k} {'answer differs from eager' if v is None else f'{v:.1f} ms'}"
                for k, v in self.experts_ms.items()
            )
            lines.append(
                f"  - experts measured at load, one token through the model: {timed} -> {self.experts}"
            )
        if self.step and not self.step["tokens"]:
            lines.append("  - one token's step written layer by layer: none can take this model's steps here")
        elif self.step:
            s = self.step
            each = "; ".join(
                f"{c['label']} {c['ms']:.1f} ms"
                + (f" (after {c['ready_s']:.0f} s compiling)" if n == "compiled" else "")
                + f", the same top-1 on {c['top1']} of {s['tokens']}, logits within {c['difference']:.3f} of the largest"
                for n, c in s["candidates"].items()
            )
            kept = (
                f"{s['candidates'][s['step']]['label']}, for one sequence at a time"
                if s["kept"]
                else "the lean step"
            )
            lines.append(
                f"  - one token's step written layer by layer, measured at load over {s['tokens']} tokens: lean step "
                f"{s['lean_ms']:.1f} ms; {each} -> {kept}"
            )
        if self.kernels:
            lines.append("  - kernels measured once per machine, one token, GB/s of weights (chosen first):")
            for kind, k in self.kernels.items():
                rest = "  ".join(f"{n} {v:.1f}" for n, v in k.gb_s.items() if n != k.chosen)
                note = f"; {k.note}" if k.note else ""
                lines.append(f"      {kind:<22} {k.chosen} {k.gb_s[k.chosen]:.1f}   ({rest}{note})")
        return "\n".join(lines)

    __str__ = describe


def fast_recipe(
    dtype, dtype_reason: str, device: str | None = None, experts: str | None = None, offloaded: bool = False
) -> Recipe:
    """What the fast path will do with a model loaded in `dtype` (for `dtype_reason`), before measuring. Taught
    in 08_performance. `experts`: the implementation that a fit put in ("quantized", "expert_cache"), kept;
    `offloaded`: accelerate holds part of the weights elsewhere and copies them in for each forward (nothing
    is timed then: each forward would time the copies)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    reasons = [
        dtype_reason,
        "several prompts at once: generate_batch runs them as one padded batch; each step reads the "
        "shared weights once for all of them, and the union of the experts they chose",
        SAMPLER,
    ]
    if offloaded:
        reasons.append("offloaded by accelerate: weights on other devices are copied in for each forward")
    if experts == "quantized" and device == "cpu":  # experts replaced; left in the model's dtype: the routers
        return Recipe(device, dtype, experts, probe=("kernels",), reasons=[*reasons, MEASURED_LEFT])
    if experts:  # the experts are replaced: their own implementation, nothing left to choose
        return Recipe(device, dtype, experts, probe=(), reasons=reasons)
    if offloaded:
        return Recipe(device, dtype, "per_token", probe=(), reasons=[*reasons, PER_TOKEN])
    return Recipe(device, dtype, "", ("kernels", "experts"), [*reasons, MEASURED])  # experts: chosen at load


SAMPLER = (
    "sampling with a top-k: temperature, top-k and top-p as one processor that sorts only the k candidates "
    "(TopKTopP), transformers' scores but for rounding at the top-p cut, so a seed gives the same tokens"
)
PER_TOKEN = (
    "per_token experts while decoding: reads only the chosen experts' weights, skips the masks and index "
    "bookkeeping of eager/grouped_mm (prompts still go through grouped_mm)"
)
MEASURED = (
    "measured here: the kernel that reads each kind of weight fastest for one token (once per machine, kept in "
    "the cache folder's measured/), and at load the experts implementation that runs one token fastest with "
    "eager's answer"
)
MEASURED_LEFT = (
    "measured here: the kernel that reads each kind of weight left unquantized fastest for one token (once per "
    "machine, kept in the cache folder's measured/)"
)

LEAN = (
    "one-token steps through decode.lean_forward: the same modules and arithmetic as transformers' forward "
    "(the same logits, bit for bit) with fewer calls around them, q, k and v in one product where their weights "
    "were joined; prompts, padding and hooks on a layer go through transformers' own"
)


def apply_recipe(model, recipe: Recipe) -> Recipe:
    """Switch a loaded model to the recipe (in place), measuring what it says to measure, and its one-token
    steps to decode.lean_forward where it applies; the recipe, its figures filled in (`load_pipeline` keeps it
    as `model.load_record.recipe`)."""
    moe, lean = bool(getattr(model.config, "num_local_experts", None)), use_lean_step(model)
    if lean:
        recipe.reasons.append(LEAN)
    if "kernels" in recipe.probe and recipe.device == "cpu":
        recipe.kernels = choose_kernels(model)
        joined = lean and join_projections(model)  # only the lean step multiplies them together
        recipe.reasons += [joined] if joined else []
    if moe and "experts" in recipe.probe:
        seconds = choose_experts(model, EXPERTS_CANDIDATES)
        recipe.experts_ms = {k: v and 1000 * v for k, v in seconds.items()}
        recipe.experts = model.config._experts_implementation
    elif moe:
        register_experts("per_token", per_token_experts)
        model.set_experts_implementation(recipe.experts)
    return recipe
