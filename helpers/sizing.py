"""The one account of parameters and bytes: per component, per token, in the KV cache; the
memory-bandwidth ceiling; and the one check of whether something fits (one margin, `RESERVED`).

The planner (00, 07), the fast path's report, the benchmark and the notebooks all count with
`parameter_count` and `decode_bytes`; a test holds them equal to a count of a model's own tensors.
Shapes: D = hidden size, I = expert FFN size, L = layers, E = experts, K = experts per token."""

from __future__ import annotations

from . import hardware
from .data import DTYPE_BYTES, KNOWN_MODELS, RESERVED, GiB, whole_number


def mixtral_config(name: str):
    """A transformers MixtralConfig for a known model, built offline from KNOWN_MODELS."""
    from transformers import MixtralConfig

    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    values = dict(KNOWN_MODELS[name])
    values["rope_parameters"] = {"rope_type": "default", "rope_theta": values.pop("rope_theta")}
    return MixtralConfig(**values)


def as_config(model):
    """A config from a known model's name, or the config (or model) itself."""
    if isinstance(model, str):
        return mixtral_config(model)
    return getattr(model, "config", model)


def dtype_bytes(precision: str) -> float:
    """Bytes per parameter of a precision name (float32, bfloat16, float16, int8, int4)."""
    if precision not in DTYPE_BYTES:
        raise ValueError(f"precision={precision!r} is not known; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[precision]


def parameter_count(model) -> dict:
    """Parameters per component of a Mixtral (or dense Llama) config, by arithmetic, then the
    total and the active count (what one token reads: K of E experts). Attention, embeddings and
    norms are shared by all experts; only the feed-forward is multiplied. Taught in 00_setup."""
    c = as_config(model)
    D, L = c.hidden_size, c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or D // c.num_attention_heads
    experts = getattr(c, "num_local_experts", None)
    parts = {
        "embeddings": c.vocab_size * D,
        "attention": L * D * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads),
    }  # q, o; k, v
    ffn = L * 3 * D * c.intermediate_size  # gate, up, down
    if experts:
        parts.update(experts=experts * ffn, router=L * experts * D)
    else:
        parts["mlp"] = ffn
    parts["norms"] = (2 * L + 1) * D
    parts["lm_head"] = 0 if c.tie_word_embeddings else c.vocab_size * D
    parts["total"] = sum(parts.values())
    if experts:  # a token reads K of the E experts
        parts["active"] = (
            parts["total"] - parts["experts"] + parts["experts"] * c.num_experts_per_tok // experts
        )
    else:
        parts["active"] = parts["total"]
    return parts


def expert_bytes(model, bytes_per_parameter: float) -> float:
    """Bytes of one expert of one layer (gate, up and down) at `bytes_per_parameter`: what an expert cache
    moves per miss. Taught in 11_offloading."""
    c = as_config(model)
    return 3 * c.hidden_size * c.intermediate_size * bytes_per_parameter


def kv_values_per_token(model) -> int:
    """K and V, every layer, every KV head: the values one token of context adds to the cache."""
    c = as_config(model)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim


def kv_bytes_per_token(model, precision: str = "bfloat16") -> int:
    """What one token of context costs in the KV cache, in `precision`. Taught in 07_inside_the_moe."""
    return int(kv_values_per_token(model) * dtype_bytes(precision))


def expected_distinct_experts(experts: int, per_token: int, batch: int) -> float:
    """Experts one layer reads in a decode step of `batch` tokens, if each token picks `per_token`
    of `experts` uniformly at random: E * (1 - (1 - K/E)^batch). Taught in 08_performance."""
    return experts * (1 - (1 - per_token / experts) ** batch)


def chance_hit_rate(cached: int, experts: int, per_token: int) -> float:
    """The share of expert uses an LRU cache of `cached` experts per layer finds, if each token picks
    `per_token` distinct experts of `experts` uniformly at random: the cache then holds any expert with
    chance cached / experts, and the j-th pick of a token finds (cached - j) of the (experts - j) left.
    With fewer slots than picks, a token's own picks evict each other and the LRU finds less.
    Taught in 11_offloading."""
    return sum(max(cached - j, 0) / (experts - j) for j in range(per_token)) / per_token


def decode_bytes(
    model,
    dtype_bytes: float,
    context: int = 0,
    batch: int = 1,
    experts_read: float | None = None,
    kv_bytes: float | None = None,
) -> dict:
    """Bytes read from memory by one decode step of `batch` sequences, by component, and per token.

    `context`: tokens already in each sequence's KV cache, `kv_bytes` bytes per cached value (default
    `dtype_bytes`); `experts_read`: distinct experts per layer the step reads (default: the expected
    union under uniform routing, `expected_distinct_experts`: exactly K at batch 1, nearly all E from 16).
    Taught in 08_performance."""
    if isinstance(dtype_bytes, bool) or not dtype_bytes > 0:
        raise ValueError(f"dtype_bytes={dtype_bytes!r}: use a positive number")
    whole_number("batch", batch, 1)
    whole_number("context", context, 0, " tokens")
    c = as_config(model)
    params = parameter_count(c)
    reads = {
        "attention": params["attention"],
        "norms": params["norms"],
        "lm_head": params["lm_head"] or params["embeddings"],
        "embedding rows": batch * c.hidden_size,
    }
    experts = getattr(c, "num_local_experts", None)
    if experts:  # MoE: the router, and only the experts the step's tokens picked
        if experts_read is None:
            experts_read = expected_distinct_experts(experts, c.num_experts_per_tok, batch)
        reads.update(router=params["router"], experts=params["experts"] * experts_read / experts)
    else:
        reads["mlp"] = params["mlp"]
    parts = {name: n * dtype_bytes for name, n in reads.items()}
    parts["kv_cache"] = batch * context * kv_values_per_token(c) * (kv_bytes or dtype_bytes)
    step = sum(parts.values())
    return {"parts": parts, "per_step": step, "per_token": step / batch}


def kv_precision(precision: str) -> str:
    """The KV cache's precision for weights in `precision`: int weights keep the cache in bfloat16."""
    return precision if dtype_bytes(precision) >= 2 else "bfloat16"


def footprint(model, precision: str, context: int) -> dict:
    """Serving `model` in `precision` with `context` tokens of context: bytes of weights, of the full
    KV cache, and read by one decode token at batch 1 with the cache half full (a generation's average)."""
    c, size, kv = as_config(model), dtype_bytes(precision), kv_precision(precision)
    return dict(
        weights=int(parameter_count(c)["total"] * size),
        kv=kv_bytes_per_token(c, kv) * context,
        per_token=decode_bytes(c, size, context // 2, kv_bytes=dtype_bytes(kv))["per_token"],
    )


def ceiling(bandwidth: float, bytes_per_token: float) -> float:
    """The most tokens/s that memory can feed: every byte read once, at the measured bandwidth.
    Taught in 08_performance."""
    if not bandwidth > 0 or not bytes_per_token > 0:
        raise ValueError("bandwidth and bytes_per_token must be positive")
    return bandwidth / bytes_per_token


def usable(capacity_bytes: float) -> float:
    """What a memory of `capacity_bytes` can hold once `RESERVED` is kept free."""
    return capacity_bytes * (1 - RESERVED)


def fits(need_bytes: float, capacity_bytes: float) -> bool:
    """The one fit check: `need_bytes` within `usable(capacity_bytes)`."""
    return need_bytes <= usable(capacity_bytes)


def fit_verdict(need: float, gpu_total: float, ram: float) -> str:
    """Where weights of `need` bytes fit: on the GPUs, in GPUs + RAM (offloaded), or not at all."""
    if gpu_total and fits(need, gpu_total):
        return "fits on the GPUs"
    if fits(need, gpu_total + ram):
        return "fits only with CPU offload (slow)" if gpu_total else "fits in RAM (CPU only)"
    return (
        f"does not fit: needs {need / GiB:.1f} GiB, has {usable(gpu_total + ram) / GiB:.1f} GiB usable "
        f"({RESERVED:.0%} of {(gpu_total + ram) / GiB:.1f} GiB kept free)"
    )


def memory_table(model, context: int = 4096, batch: int = 1) -> list[dict]:
    """Weights and KV cache in GiB for each precision (KV cache kept in bf16 for the int types).
    Taught in 07_inside_the_moe."""
    parts = parameter_count(model)
    rows = []
    for precision, size in DTYPE_BYTES.items():
        rows.append(
            {
                "precision": precision,
                "weights_GiB": parts["total"] * size / GiB,
                "active_GiB_per_token": parts["active"] * size / GiB,
                "kv_cache_GiB": kv_bytes_per_token(model, kv_precision(precision)) * context * batch / GiB,
            }
        )
    return rows


def fit_report(models: dict[str, int]) -> list[dict]:
    """For {name: bytes of weights}, whether they fit on this machine's GPUs alone, with CPU offload, or not.
    Taught in 00_setup."""
    gpu_total = sum(g["total"] for g in hardware.gpus())
    ram = hardware.system_memory()["total"]
    return [
        {"model": name, "weights_GiB": round(need / GiB, 1), "verdict": fit_verdict(need, gpu_total, ram)}
        for name, need in models.items()
    ]
