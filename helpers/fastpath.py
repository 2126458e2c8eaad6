"""The fast path: the fastest correct settings for this hardware, applied once at load.

Decoding one token reads every weight it uses once, so its speed is bounded by memory bandwidth
/ bytes read per token (sizing.ceiling). On a CPU two things get closer to it: experts that read
only the chosen experts' weights (`per_token`, plugged into transformers' experts registry), and
weights re-laid column-major where this CPU's matrix-vector product reads them faster.
`fast_recipe` says what this machine gets; `load_pipeline` applies it (08_performance measures it).

Shapes: T = tokens, K = experts per token, D = hidden size, I = expert FFN size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .data import GB
from .experts import register_experts
from .hardware import best_seconds, dtype_name, pick_dtype

DECODE_TOKENS = 4  # at most this many tokens in a forward: the "per_token" experts loop; more: grouped_mm


def per_token_experts(self, hidden_states, top_k_index, top_k_weights):
    """Experts for decoding: a few tokens, each through its K chosen experts, reading only those
    experts' weights (views, no copies, no masks). Longer inputs (a prompt) go to grouped_mm."""
    import torch.nn.functional as F
    from transformers.integrations.moe import grouped_mm_experts_forward

    if hidden_states.shape[0] > DECODE_TOKENS:
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    out = hidden_states.new_zeros(hidden_states.shape)  # [T, D]
    for t, (chosen, weights) in enumerate(zip(top_k_index.tolist(), top_k_weights.tolist())):
        x = hidden_states[t : t + 1]  # [1, D]
        for expert, weight in zip(chosen, weights):
            gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)  # [1, I] each
            out[t : t + 1] += F.linear(self.act_fn(gate) * up, self.down_proj[expert]) * weight
    return out


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

    def one_pass():
        for w in weights:
            F.linear(x, w)

    return best_seconds(one_pass)


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
            rows = [w for p in params for w in (p if p.dim() == 3 else [p])]  # each [out, in]
            nbytes = sum(w.nbytes for w in rows)
            sample, size = [], 0
            for w in rows:
                sample.append(w)
                size += w.nbytes
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


@dataclass
class Recipe:
    """The settings the notebooks run with, and why (`reasons[0]`: why this dtype)."""

    device: str
    dtype: object
    experts: str  # experts_implementation
    relayout: bool  # re-lay weights column-major where measured faster (CPU)
    reasons: list = field(default_factory=list)
    layouts: dict = field(default_factory=dict)  # filled by apply_recipe

    def describe(self, fit_reason: str | None = None) -> str:
        """The settings and the reasons, with `fit_reason` (why the experts were replaced) after the dtype's."""
        reasons = [*self.reasons[:1], *([fit_reason] if fit_reason else []), *self.reasons[1:]]
        lines = [
            f"fast path on {self.device}: dtype {dtype_name(self.dtype)}, "
            f"experts {self.experts!r}, column-major re-layout {'probed' if self.relayout else 'off'}"
        ]
        lines += [f"  - {r}" for r in reasons]
        moved = [k for k, v in self.layouts.items() if v[2] == "column-major"]
        if self.layouts:
            lines.append(f"  - re-laid column-major (faster here): {', '.join(moved) or 'none'}")
        return "\n".join(lines)

    __str__ = describe


def fast_recipe(
    device: str | None = None, dtype=None, experts: str | None = None, offloaded: bool = False
) -> Recipe:
    """The fastest configuration that is correct on this hardware, as measured by `make bench`. Taught in
    08_performance. `dtype`: the dtype the caller loaded (None: this machine's choice); `experts`: the
    implementation of experts that a fit replaced ("quantized", "expert_cache"); `offloaded`: accelerate
    holds part of the weights elsewhere and copies them in for each forward."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    picked, why_dtype = pick_dtype()
    if dtype is not None and dtype != picked:
        why_dtype = f"dtype {dtype_name(dtype)}: chosen by the caller ({why_dtype} otherwise)"
    dtype = picked if dtype is None else dtype
    batching = (
        "several prompts at once: generate_batch runs them as one padded batch; each step reads the "
        "shared weights once for all of them, and the union of the experts they chose"
    )
    offload = (
        ["offloaded by accelerate: weights on other devices are copied in for each forward"]
        if offloaded
        else []
    )
    if experts:  # the experts are replaced: their own implementation, nothing left to re-lay
        return Recipe(device, dtype, experts, relayout=False, reasons=[why_dtype, batching, *offload])
    if device != "cpu":
        return Recipe(
            device,
            dtype,
            "grouped_mm",
            relayout=False,
            reasons=[
                why_dtype,
                "grouped_mm: transformers' default, one grouped GEMM over all experts on the GPU",
                batching,
                *offload,
            ],
        )
    return Recipe(
        device,
        dtype,
        "per_token",
        relayout=not offloaded,
        reasons=[  # offloaded: loaded afresh, not re-laid
            why_dtype,
            "per_token experts while decoding: reads only the chosen experts' weights, skips the masks "
            "and index bookkeeping of eager/grouped_mm (prompts still go through grouped_mm)",
            "weights whose matrix-vector product reads faster column-major on this CPU are re-laid once at load",
            batching,
            *offload,
        ],
    )


def apply_recipe(model, recipe: Recipe) -> Recipe:
    """Switch a loaded model to the recipe's experts implementation and layouts (in place); the recipe,
    its layouts filled in (`load_pipeline` keeps it as `model.load_record.recipe`)."""
    if getattr(model.config, "num_local_experts", None):
        register_experts("per_token", per_token_experts)
        model.set_experts_implementation(recipe.experts)
    if recipe.relayout:
        recipe.layouts = choose_layouts(model)
    return recipe
