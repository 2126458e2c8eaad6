"""One decode step without the framework around it (08_performance).

transformers runs every forward through its general machinery: output recorders, mask building, the
attention-function registry, `rotate_half`'s slices and concatenation, keyword arguments handed down
four levels, for every layer of every token. When the fast path decodes one token per sequence with
nothing to mask, `lean_forward` does the same arithmetic with fewer calls: it calls the same modules
(norms, projections, the MoE block with its router and experts, so hooks on them still fire: routing
records, prefetch, quantized or cached experts), in the same order and dtype, and gives transformers'
logits bit for bit (tests/test_fastpath.py). Where the fast path or quantization has joined an attention's
q, k and v weights into one copy (`Fused`), one product gives all three unless one of them is hooked. Anything
else (a prompt, padding, hooks on a layer, outputs asked for, a sliding window, training) goes through
transformers' own forward, unchanged.

Shapes: B sequences, d head size.
"""

from __future__ import annotations

import types

_ASKED = ("output_attentions", "output_hidden_states", "output_router_logits")
_RECORDERS = "transformers.utils.output_capturing"  # its hooks record only while outputs are asked for


def _hooked(module) -> bool:
    """Whether anything but transformers' output recorders hooks `module` (accelerate's too)."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return hasattr(module, "_hf_hook") or any(getattr(h, "__module__", None) != _RECORDERS for h in hooks)


class Fused:
    """q, k and v's products as one: `product(x, copy)` [B, D] -> [B, sum(sizes)] on one `copy` of the three weights
    joined (or None where the product does not apply), while the attention still holds these very `modules` and each
    one's `stamp(module)` is what it was when the copy was made; None otherwise (the projections answer one by one)."""

    def __init__(self, modules, copy, product, stamp, sizes: list):
        self.modules, self.copy, self.product = tuple(modules), copy, product
        self.stamp, self.sizes, self.made_for = stamp, sizes, [stamp(m) for m in modules]

    def __call__(self, x, modules):
        same = all(a is b for a, b in zip(modules, self.modules))
        fresh = same and [self.stamp(m) for m in modules] == self.made_for
        return self.product(x, self.copy) if fresh else None


def _rotate(x, cos, sin_signed):
    """transformers' `x * cos + rotate_half(x) * sin`: the halves swapped in one concatenation, the sign
    folded into `sin_signed` (= [-sin1, sin2]); the same products and sums, so the same bits."""
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), -1) * sin_signed


def _plain(decoder, input_ids, attention_mask, past_key_values, kwargs) -> bool:
    """Whether this forward needs transformers' own: anything but one token per sequence, after a prompt,
    with nothing to mask, record or hook."""
    from transformers.cache_utils import DynamicCache

    return (
        input_ids is None
        or kwargs.get("inputs_embeds") is not None
        or input_ids.shape[1] != 1
        or type(past_key_values) is not DynamicCache
        or not past_key_values.get_seq_length()
        or any(kwargs.get(k, getattr(decoder.config, k, False)) for k in _ASKED)
        or decoder.training
        or decoder.config._attn_implementation != "sdpa"
        or (attention_mask is not None and not bool(attention_mask.all()))
        or any(_hooked(m) for m in decoder._lean_wrapped)
    )


def lean_forward(
    self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs
):
    """A Mixtral decoder's forward for one token per sequence (see the module's docstring); bound to the
    decoder by `use_lean_step`, so `self` is the decoder (a MixtralModel)."""
    import torch
    import torch.nn.functional as F
    from transformers.modeling_outputs import MoeModelOutputWithPast

    if _plain(self, input_ids, attention_mask, past_key_values, kwargs):
        return type(self).forward(self, input_ids, attention_mask, position_ids, past_key_values, **kwargs)
    h = self.embed_tokens(input_ids)  # [B, 1, D]
    B = h.shape[0]
    if position_ids is None:
        position_ids = torch.full((B, 1), past_key_values.get_seq_length(), device=h.device)
    cos, sin = self.rotary_emb(h, position_ids)  # [B, 1, d] each
    half = sin.shape[-1] // 2
    cos, sin = cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, None]  # [B, 1, 1, d]
    for i, layer in enumerate(self.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)  # one product for the three, unless hooked
        fused = None if any(map(_hooked, projections)) else getattr(attn, "qkv", None)
        qkv = fused(x.view(B, -1), projections) if fused is not None else None  # [B, q + k + v], or None
        parts = qkv.split(fused.sizes, -1) if qkv is not None else (p(x) for p in projections)
        q, k, v = (t.view(B, 1, -1, attn.head_dim).transpose(1, 2) for t in parts)
        k, v = past_key_values.update(_rotate(k, cos, sin), v, i)
        a = F.scaled_dot_product_attention(
            _rotate(q, cos, sin), k, v, scale=attn.scaling, enable_gqa=attn.num_key_value_groups > 1
        )
        h = h + attn.o_proj(a.transpose(1, 2).reshape(B, 1, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return MoeModelOutputWithPast(last_hidden_state=self.norm(h), past_key_values=past_key_values)


def use_lean_step(model) -> bool:
    """Switch `model` (a loaded MixtralForCausalLM) to `lean_forward` for its one-token steps, in place; False
    (nothing changed) for another architecture (its layers may hold more than this step calls: q/k norms, biases),
    a sliding window, or a model that accelerate spreads over devices."""
    decoder = getattr(model, "model", None)
    if getattr(model.config, "model_type", None) != "mixtral" or decoder is None:
        return False
    if model.config.sliding_window is not None:
        return False  # its steps need a mask once the cache is longer than the window
    if len(set(getattr(model, "hf_device_map", {"": None}).values())) > 1:
        return False  # accelerate moves activations between devices in hooks on each layer
    decoder._lean_wrapped = [m for layer in decoder.layers for m in (layer, layer.self_attn)]
    decoder.forward = types.MethodType(lean_forward, decoder)
    return True
