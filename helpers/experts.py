"""The experts' one loop, and transformers' registry of experts implementations.

transformers 5 runs a Mixtral layer's experts through a function chosen by name
(`model.set_experts_implementation(name)`), from a registry the package adds to: "per_token"
(the fast path, fastpath.py), "quantized" (quantize.py) and "expert_cache" (offload.py). Two loops
serve them, both summing in the order of transformers' eager loop, so the sums are the eager loop's,
product for product: `experts_loop`, each chosen expert once over the tokens that chose it (prompts;
the expert cache counts one fetch per expert), and `token_loop`, each of a few tokens through its own K
experts with no index bookkeeping (decoding: "per_token" and "quantized").

Shapes: T tokens, K experts per token, D hidden, t the tokens that chose one expert.
"""

from __future__ import annotations

DECODE_TOKENS = 4  # at most this many tokens in a forward go through `token_loop`; more: per expert


def register_experts(name: str, function) -> None:
    """Make `name` a valid `experts_implementation` for transformers, run by `function`."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if name not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(name, function)


def tokens_by_expert(top_k_index) -> list:
    """[(expert, tokens [t], slots [t])] for each chosen expert, ascending, its rows in the order of
    transformers' eager loop (by slot, then token): the same products, so the same sums."""
    import torch

    chosen: dict[int, list] = {}
    for slot, experts in enumerate(top_k_index.T.tolist()):
        for token, expert in enumerate(experts):
            chosen.setdefault(expert, []).append((token, slot))
    return [(expert, *torch.tensor(chosen[expert]).T) for expert in sorted(chosen)]


def experts_loop(x, top_k_index, top_k_weights, ffn, out):
    """`out` [T, D] plus, for each token, its K experts' `ffn(expert, x[tokens]) -> [t, D]`, each weighted
    by the router, in the eager loop's order (grouped in Python: at decode time a tensor unique/where costs
    more than the products). `x` is what the experts read: the hidden states, or those in the kernels' dtype."""
    for expert, token, slot in tokens_by_expert(top_k_index):  # token, slot: [t] each
        token, slot = token.to(out.device), slot.to(out.device)
        y = ffn(expert, x[token]) * top_k_weights[token, slot, None]  # [t, D]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def token_loop(x, top_k_index, top_k_weights, ffn, dtype):
    """For a few tokens (decoding), [T, D] in `dtype`: each token `x[i]` [1, D] through its K experts,
    `ffn(expert, x[i]) -> [1, D]` in `dtype`, weighted by the router and summed by ascending expert, as the
    eager loop adds them (a Python float weight multiplies as the router's float32 weight does)."""
    import torch

    rows = []
    for row, chosen, weights in zip(x.split(1), top_k_index.tolist(), top_k_weights.tolist()):
        y = None  # eager adds each expert's output to zeros, and 0 + a is a
        for expert, weight in sorted(zip(chosen, weights)):
            out = ffn(expert, row)
            out = (out if out.dtype == dtype else out.to(dtype)) * weight
            y = out if y is None else y + out
        rows.append(y)
    return rows[0] if len(rows) == 1 else torch.cat(rows)
