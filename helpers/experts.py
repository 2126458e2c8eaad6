"""The experts' one loop, and transformers' registry of experts implementations.

transformers 5 runs a Mixtral layer's experts through a function chosen by name
(`model.set_experts_implementation(name)`), from a registry the package adds to: "per_token"
(the fast path, fastpath.py), "quantized" (quantize.py) and "expert_cache" (offload.py). The last
two share `experts_loop`: each chosen expert once, over the tokens that chose it, in the order of
transformers' eager loop, so the sums are the eager loop's, product for product.

Shapes: T tokens, K experts per token, D hidden, t the tokens that chose one expert.
"""

from __future__ import annotations


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
