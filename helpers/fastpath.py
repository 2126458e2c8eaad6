"""The fast path: the fastest correct settings for this hardware, chosen by measuring them on it.

Decoding one token reads every weight it uses once, so its speed is bounded by memory bandwidth
/ bytes read per token (sizing.ceiling). What gets a CPU closer to it is measured here, on this machine,
never assumed: which dtype decodes faster (`measure_dtypes`, once per machine), which kernel reads each
kind of weight fastest for one token (`choose_kernels`: torch.mv, F.linear, F.linear on weights
re-laid column-major, or oneDNN's product on a copy packed into its blocked layout), and which experts
implementation runs a decode step fastest while giving transformers' eager answer (`choose_experts`: the
package's `per_token` loop, which reads only the chosen experts' weights, or transformers' own). `fast_recipe`
says what this machine gets; `load_pipeline` applies it (08_performance measures it).

Shapes: T = tokens, K = experts per token, D = hidden size, I = expert FFN size.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import platform
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from .data import GB
from .decode import use_lean_step
from .experts import register_experts
from .files import atomic_file, cache_root
from .hardware import best_seconds, cpuinfo, dtype_name, system_memory, timing_buffer_bytes
from .sizing import fits

DECODE_TOKENS = 4  # at most this many tokens in a forward: the "per_token" experts loop; more: grouped_mm
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


def packed_copy(weight):
    """A copy of `weight` [N, K] in oneDNN's blocked layout for `_packed`, as inductor's frozen linears hold it."""
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def _stamp(weight) -> tuple:  # what a packed copy was made from: once any of it changes, the copy is stale
    return weight.dtype, weight.device, weight._version


# kernel -> (the layout it reads, the product of one token [1, K] with a weight [N, K])
KERNELS = {
    "F.linear": (None, _linear),
    "torch.mv": (None, _mv),
    "F.linear, column-major": ("column-major", _linear),
    "oneDNN packed": ("packed", _packed),  # a copy beside the weight: its memory twice
}
# {experts module: {attribute: (kernel, a packed copy per expert or None, the weight's _stamp)}}
_EXPERT_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _expert_weights(experts, attribute: str) -> tuple:
    """(product, weights by expert) for one kind of `experts`' weights: the kernel `choose_kernels` measured
    fastest for it, or F.linear on the parameter once its packed copies are stale."""
    kernel, copies, stamp = _EXPERT_KERNELS.get(experts, {}).get(attribute, ("F.linear", None, None))
    weight = getattr(experts, attribute)
    if copies is not None and _stamp(weight) != stamp:
        kernel, copies = "F.linear", None
    return KERNELS[kernel][1], weight if copies is None else copies


def per_token_experts(self, hidden_states, top_k_index, top_k_weights):
    """Experts for decoding: a few tokens, each through its K chosen experts, reading only those
    experts' weights (views of the parameter or its packed copies, no masks), each product by the kernel
    `choose_kernels` measured fastest for it; a token's K outputs summed in eager's order. Longer inputs (a
    prompt) go to grouped_mm."""
    import torch

    if hidden_states.shape[0] > DECODE_TOKENS:
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    gate_up_product, gate_up_weights = _expert_weights(self, "gate_up_proj")
    down_product, down_weights = _expert_weights(self, "down_proj")
    rows = []
    for x, chosen, weights in zip(hidden_states.split(1), top_k_index.tolist(), top_k_weights.tolist()):
        y = None  # [1, D]: eager adds each expert's output to zeros, and 0 + a is a
        for expert, weight in zip(chosen, weights):
            gate, up = gate_up_product(x, gate_up_weights[expert]).chunk(2, dim=-1)  # [1, I] each
            out = down_product(self.act_fn(gate) * up, down_weights[expert]) * weight
            y = out if y is None else y + out
        rows.append(y)
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def column_major(weight):
    """The same tensor (same shape and values), stored column by column in its last two dims."""
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2)


@functools.cache
def kernel_linear():
    """The module class, built on first use so that importing helpers does not import torch."""
    import torch

    class KernelLinear(torch.nn.Linear):
        """An nn.Linear whose decode-sized products go through the kernel measured faster here: torch.mv for
        one token, or oneDNN's on a packed copy of the weight for up to DECODE_TOKENS; the rest through F.linear.
        It holds the very same weight (tied weights stay tied, the state dict is unchanged); once the weight's
        dtype, device or contents change, a packed copy is stale and F.linear answers. No gradient reaches the
        weight through a copy: the package only decodes."""

        def __init__(self, linear, kernel: str):
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight, self.bias, self.kernel = linear.weight, linear.bias, kernel
            self.packed = packed_copy(self.weight) if KERNELS[kernel][0] == "packed" else None
            self.made_for = _stamp(self.weight)

        def forward(self, x):
            flat = x.reshape(-1, self.in_features)
            packed = (
                self.packed is not None
                and _stamp(self.weight) == self.made_for
                and x.dtype == self.weight.dtype
            )
            if not (packed and len(flat) <= DECODE_TOKENS or self.kernel == "torch.mv" and len(flat) == 1):
                return super().forward(x)
            y = KERNELS[self.kernel][1](flat, self.packed if packed else self.weight)
            y = y if self.bias is None else y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)

    return KernelLinear


def _weight_groups(model) -> dict:
    """The weights a decode step reads with a matrix-vector product, grouped by kind:
    {kind: [(module name, module, attribute)]}. Tied weights appear once."""
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
            groups.setdefault(kind, []).append((name, module, attribute))
    return groups


@dataclass
class KindKernels:
    """What `choose_kernels` measured for one kind of weight."""

    gb_s: dict  # {kernel: GB/s of weights it read, one token at a time}
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
        try:  # oneDNN packs bf16 only where the CPU computes it (AVX-512 or AMX); elsewhere the others are measured
            layouts["packed"] = [packed_copy(w) for w in layouts[None]]
        except RuntimeError:
            pass
        x = torch.randn(1, k, dtype=dtype)
        return {
            kernel: count * size / best_seconds(lambda m=layouts[layout]: [product(x, w) for w in m]) / GB
            for kernel, (layout, product) in KERNELS.items()
            if layout in layouts
        }

    return _once_per_machine("kernels", [list(shape), dtype_name(dtype), list(KERNELS)], measure)


def _once_per_machine(name: str, key: list, measure) -> dict:
    """`measure()`'s figures, measured once per CPU model, torch and transformers version, thread count,
    version of this file and `key`, then read from the cache folder (`measured/`); under a lock, so one
    process measures and the others wait for its figures."""
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
        figures = measure()
        atomic_file(path, lambda tmp: tmp.write_text(json.dumps(figures, indent=1)))
    return figures


def choose_kernels(model) -> dict:
    """For each kind of weight, the one-token product each of KERNELS makes with matrices of its shape and
    dtype on this CPU (`_kernel_speeds`: from memory, not a cache; once per machine), and that kind switched to
    the fastest: the weights' own F.linear unless another takes under MARGIN of its time. A re-layout goes
    one tensor at a time, so memory grows by one tensor at most; a packed copy is kept beside the weight (prompts
    and the other experts implementations read the weight), so that kind's memory doubles, and is chosen only
    where the available RAM holds it (`sizing.fits`). Returns {kind: KindKernels}."""
    report = {}
    for kind, members in _weight_groups(model).items():
        params = [getattr(m, a) for _, m, a in members]
        nbytes = sum(p.nbytes for p in params)
        speeds = _kernel_speeds(tuple(params[0].shape[-2:]), params[0].dtype)
        room = fits(nbytes, system_memory()["available"])  # a packed copy: the kind's bytes again
        allowed = {k: v for k, v in speeds.items() if room or KERNELS[k][0] != "packed"}
        best = max(allowed, key=allowed.get)
        chosen = best if speeds["F.linear"] < MARGIN * speeds[best] else "F.linear"
        layout = KERNELS[chosen][0]
        for name, module, attribute in members:
            p = getattr(module, attribute)
            if layout == "column-major":
                p.data = column_major(p.data)
            if p.dim() == 3:
                copies = [packed_copy(w) for w in p] if layout == "packed" else None
                _EXPERT_KERNELS.setdefault(module, {})[attribute] = (chosen, copies, _stamp(p))
            elif chosen == "torch.mv" or layout == "packed":
                model.set_submodule(name, kernel_linear()(module, chosen))
        note = ""
        if layout == "packed":
            note = f"a packed copy of {nbytes / 2**20:.0f} MiB"
        elif not room and KERNELS[max(speeds, key=speeds.get)][0] == "packed":
            note = "no room in RAM for a packed copy"
        report[kind] = KindKernels(speeds, chosen, nbytes, note)
    return report


def choose_experts(model, candidates: tuple, rounds: int = 3) -> dict:
    """Time one decode-shaped forward (one token) with each experts implementation in `candidates`, round by
    round, and switch the model to the fastest whose logits match transformers' eager loop. Returns
    {implementation: best seconds per forward, or None where its answer differed from eager's}."""
    import torch

    if "per_token" in candidates:
        register_experts("per_token", per_token_experts)
    ids = torch.tensor([[model.config.bos_token_id or 1]], device=model.device)
    tolerance = 1e-3 if model.dtype == torch.float32 else 5e-2  # of the largest logit
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


def measure_dtypes(config: dict) -> dict:
    """Which dtype decodes faster on this machine: for each of DTYPES, a model with `config`'s shapes and random
    weights (`_dtype_probe_config`), switched to the fast path as `load_pipeline` would (kernels and experts
    measured), timed over one-token forwards. Measured once per machine and shapes (`_once_per_machine`).
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
            figures[name] = dict(ms=1000 * _time_decode(model), layers=probe.num_hidden_layers)
            del model
        return figures

    return _once_per_machine("dtypes", [probe.to_dict()], measure)


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
    probe: bool  # measure the kernels (CPU, once per machine) and the experts implementations (at load)
    reasons: list = field(default_factory=list)
    kernels: dict = field(default_factory=dict)  # {kind: KindKernels}, filled by apply_recipe
    experts_ms: dict = field(default_factory=dict)  # {implementation: ms per one-token forward, None: wrong}

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
        if self.kernels:
            lines.append("  - kernels measured once per machine, one token, GB/s read (chosen first):")
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
    ]
    if offloaded:
        reasons.append("offloaded by accelerate: weights on other devices are copied in for each forward")
    if experts:  # the experts are replaced: their own implementation, nothing left to choose
        return Recipe(device, dtype, experts, probe=False, reasons=reasons)
    if offloaded:
        return Recipe(device, dtype, "per_token", probe=False, reasons=[*reasons, PER_TOKEN])
    return Recipe(device, dtype, "", probe=True, reasons=[*reasons, MEASURED])  # experts: the winner, at load


PER_TOKEN = (
    "per_token experts while decoding: reads only the chosen experts' weights, skips the masks and index "
    "bookkeeping of eager/grouped_mm (prompts still go through grouped_mm)"
)
MEASURED = (
    "measured here: the kernel that reads each kind of weight fastest for one token (once per machine, kept in "
    "the cache folder's measured/), and at load the experts implementation that runs one token fastest with "
    "eager's answer"
)

LEAN = (
    "one-token steps through decode.lean_forward: the same modules and arithmetic as transformers' forward "
    "(the same logits, bit for bit) with fewer calls around them; prompts, padding and hooks on a layer go "
    "through transformers' own"
)


def apply_recipe(model, recipe: Recipe) -> Recipe:
    """Switch a loaded model to the recipe (in place), measuring what it says to measure, and its one-token
    steps to decode.lean_forward where it applies; the recipe, its figures filled in (`load_pipeline` keeps it
    as `model.load_record.recipe`)."""
    moe = bool(getattr(model.config, "num_local_experts", None))
    if use_lean_step(model):
        recipe.reasons.append(LEAN)
    if recipe.probe and recipe.device == "cpu":
        recipe.kernels = choose_kernels(model)
    if moe and recipe.probe:
        seconds = choose_experts(model, EXPERTS_CANDIDATES)
        recipe.experts_ms = {k: v and 1000 * v for k, v in seconds.items()}
        recipe.experts = model.config._experts_implementation
    elif moe:
        register_experts("per_token", per_token_experts)
        model.set_experts_implementation(recipe.experts)
    return recipe
