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

`graph_step` goes further, for one sequence on a static cache: layer by layer, made one of two ways. `graph_layer`
writes one layer's step as one function that torch.compile turns into one graph (`compiled_layer`), with no Python
between its operators and the experts' products written to read only the chosen experts' weights; `native_layer`
computes the same in one call of our C++ operator layer_step, the products by our kernels, with no dispatch between
its parts. Layers that hold their weights alike share one made function, called once per layer with that layer's
tensors: compiling traces one layer, not all of them (torch's tutorials call this regional compilation), at the cost
of a call per layer; the embedding, the loop over the layers and the final norm run as they are (our operator loops in
C++: `native_layers` takes every layer in one call of layers_step). It calls no module (a hook on one it reads makes it
step aside) and is not bit for bit: the fast path races our operator against the lean step at every load (the graph
too where asked) and keeps the fastest, its logits within a tolerance (fastpath.choose_step).

Shapes: B sequences, d head size, L positions of a static cache.
"""

from __future__ import annotations

import types
import weakref

_ASKED = ("output_attentions", "output_hidden_states", "output_router_logits")
_RECORDERS = "transformers.utils.output_capturing"  # its hooks record only while outputs are asked for
JOINED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention -> its q, k, v joined (`Fused`)


def _hooked(module) -> bool:
    """Whether anything but transformers' output recorders hooks `module` (accelerate's too)."""
    # _hf_hook (accelerate's) in __dict__: hasattr's miss raises inside nn.Module.__getattr__, ~400 times a token
    if not (module._forward_hooks or module._forward_pre_hooks):  # most modules, at every step: at once
        return "_hf_hook" in module.__dict__
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return "_hf_hook" in module.__dict__ or any(getattr(h, "__module__", None) != _RECORDERS for h in hooks)


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
        or any(_hooked(m) for layer in decoder.layers for m in (layer, layer.self_attn))
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
        fused = None if any(map(_hooked, projections)) else JOINED.get(attn)
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
    decoder.forward = types.MethodType(lean_forward, decoder)
    return True


def _rms(x, weight, eps: float):
    """transformers' MixtralRMSNorm: in float32, back to x's dtype, times the weight."""
    import torch

    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _ours_reads(weight) -> bool:
    """Whether our kernel reads `weight` where it is held: contiguous, in CPU memory (re-laid or moved since: not)."""
    return weight.is_contiguous() and weight.device.type == "cpu"


def _held(module) -> tuple:
    """How a layer's step multiplies by `module`'s weight: (how, tensors). int8 and int4 weights held for our
    kernels (quantize.py) by its operators; a dense weight the fast path measured our kernel fastest for by its dense
    operator; any other as a multiply and a sum that inductor computes as one reduction."""
    if hasattr(module, "graph_product"):  # quantized for our kernel (use_graph_step checks)
        return module.scheme, (module.packed, module.scales)
    if getattr(module, "kernel", None) == "our kernel" and _ours_reads(module.weight):
        return "dense", (module.weight,)
    return "reduce", (module.weight,)


def _stack_held(weights, ours: bool) -> tuple:
    """The same for a stack of experts' weights [E, N, D], `ours` where the fast path gave the stack our kernel."""
    return ("dense" if ours and _ours_reads(weights) else "reduce"), (weights,)


def _layer_inputs(layer, ours: frozenset) -> tuple:
    """One decoder layer's weights for `graph_layer`: (plan, tensors): the plan says how each product is made (the
    same for every layer whose weights are held alike, so one compiled function serves them all)."""
    a, moe = layer.self_attn, layer.mlp
    held = [_held(p) for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)]
    if hasattr(moe.experts, "gate_up_q"):  # quantized experts, by our kernel
        held += [_held(moe.experts.gate_up_q), _held(moe.experts.down_q)]
    else:
        held += [_stack_held(getattr(moe.experts, n), n in ours) for n in ("gate_up_proj", "down_proj")]
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight, moe.gate.weight)
    return tuple(how for how, _ in held), (norms, *(tensors for _, tensors in held))


def _layers_inputs(decoder, ours: dict | None) -> list:
    """`_layer_inputs` of each of `decoder`'s layers, `ours` as `graph_step` takes it."""
    return [_layer_inputs(m, frozenset((ours or {}).get(m.mlp.experts, ()))) for m in decoder.layers]


def graph_layer(decoder, plan: tuple):
    """layer(h [D], length, visible [L] (bool), inv_freq, key, value [1, KV, L, d], weights) -> h [D]: one token
    through one layer of `decoder` (a MixtralModel), written as one function for torch.compile (`plan` and `weights` from
    `_layer_inputs`), on a static cache (the layer's keys and values, written at its `length`, which it advances by one).
    Each product but the router's is a multiply and a sum, `(w[chosen] * x).sum(-1)` for the experts, written so
    that inductor can compute it as one reduction over only the chosen experts' weights (not checked in the
    generated code), or our kernel's operator where the plan says so (opaque to the compiler, a library kernel to
    it; quantized experts in float32, as quantized_experts computes them); the router's tiny product is the
    library's, as transformers' is, so that near ties route the same way."""
    import torch
    import torch.nn.functional as F

    cfg, attention = decoder.config, decoder.layers[0].self_attn  # constants only: the layer reads no module
    H, KV, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_experts_per_tok
    eps = cfg.rms_norm_eps
    d, scaling, dtype = attention.head_dim, attention.scaling, decoder.embed_tokens.weight.dtype
    attention_scaling = decoder.rotary_emb.attention_scaling
    ops = torch.ops.mixtral_notebooks  # where a weight is ours, the fast path registered it

    # x [D] (or [K, D] for the chosen experts) times the weight `held` (tensors) -> [N] or [K, N]
    def product(how, held, x, chosen=None):
        if how in ("int8", "int4"):
            if chosen is None:
                return getattr(ops, f"{how}_matmul")(x[None], *held)[0].to(dtype)
            return getattr(ops, f"{how}_experts")(x if x.dim() == 2 else x[None], *held, chosen)  # float32
        if how == "dense":
            if chosen is None:
                return ops.dense_matmul(x[None], held[0])[0]
            return ops.dense_experts(x if x.dim() == 2 else x[None], held[0], chosen)
        if chosen is None:
            return (held[0] * x).sum(-1)
        return (held[0][chosen] * (x[:, None, :] if x.dim() == 2 else x)).sum(-1)

    def rotate(x, cos, sin):  # x [heads, d]
        return x * cos + torch.cat((-x[:, d // 2 :], x[:, : d // 2]), -1) * sin

    def layer(h, length, visible, inv_freq, key, value, weights):
        # held: each product's tensors, in the plan's order
        (norm1, norm2, router), held = weights[0], weights[1:]
        angles = length.float() * inv_freq.float()
        angles = torch.cat((angles, angles), -1)
        cos, sin = (angles.cos() * attention_scaling).to(dtype), (angles.sin() * attention_scaling).to(dtype)
        x = _rms(h, norm1, eps)
        q, k, v = (product(plan[j], held[j], x) for j in range(3))
        q, k, v = rotate(q.view(H, d), cos, sin), rotate(k.view(KV, d), cos, sin), v.view(KV, d)
        key[0].index_copy_(1, length[None], k[:, None])
        value[0].index_copy_(1, length[None], v[:, None])
        length.add_(1)
        s = torch.einsum("gqd,gtd->gqt", q.view(KV, H // KV, d).float(), key[0].float()) * scaling
        s = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)  # [KV, H / KV, L]
        o = torch.einsum("gqt,gtd->gqd", s, value[0].float()).to(dtype).reshape(H * d)
        h = h + product(plan[3], held[3], o)
        x = _rms(h, norm2, eps)
        logits = (x @ router.T).float()  # the library's product, as the router's F.linear
        weights, chosen = torch.topk(torch.softmax(logits, -1), K)
        weights = weights / weights.sum()  # [K]: the chosen experts' weights, summing to 1
        gate, up = product(plan[4], held[4], x, chosen).chunk(2, -1)  # [K, I] each
        y = product(plan[5], held[5], F.silu(gate) * up, chosen).to(dtype)  # [K, D]
        return h + (y * weights[:, None].to(dtype)).sum(0)

    return layer


def compiled_layer(decoder, plan: tuple):
    """`graph_layer` compiled by torch.compile into one graph (inductor's code; our kernels' operators inside it)."""
    import torch

    return torch.compile(graph_layer(decoder, plan), fullgraph=True)


_CODES = {"dense": 0, "reduce": 0, "int8": 8, "int4": 4}  # how layer_step names each way to make a product


def _operator_settings(decoder) -> tuple:
    """What our layer operators take besides tensors: shape [heads, KV heads, experts, experts per token] and
    constants [eps, scaling, attention scaling]."""
    cfg = decoder.config
    shape = [cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_local_experts, cfg.num_experts_per_tok]
    scalings = [decoder.layers[0].self_attn.scaling, decoder.rotary_emb.attention_scaling]
    return shape, [cfg.rms_norm_eps, *scalings]


def native_layer(decoder, plan: tuple):
    """What `graph_layer` computes (the same arguments and result), by our operator layer_step (quant_ops.cpp) in one
    call with nothing between its parts: norms, rotary angles, attention and router in plain loops over one token's
    few thousand values, each product by our kernels (a dense weight by our dense kernel, whichever kernel the fast path
    chose for it elsewhere), each value rounded to the model's dtype where graph_layer's compiled graph rounds it (once
    after each fused part, not after each operator); its sums run in other orders, so its logits are within a tolerance
    of the lean step's, not bit for bit. It needs our kernels (`native_reads`)."""
    import torch

    run, codes = torch.ops.mixtral_notebooks.layer_step, [_CODES[how] for how in plan]
    shape, constants = _operator_settings(decoder)

    def layer(h, length, visible, inv_freq, key, value, weights):
        tensors = [t for part in weights for t in part]  # the norms' and router's, then each product's
        return run(h, length, visible, inv_freq, key, value, tensors, codes, shape, constants)

    return layer


def native_layers(decoder, inputs: list):
    """layers(h, lengths, visible, inv_freq, keys, values) -> h: every layer of `decoder` as `native_layer` computes it,
    in one call of our operator layers_step, each layer with its plan and tensors from `inputs` (`_layers_inputs`):
    no Python between two layers (graph_step uses it where its layers are native_layer's)."""
    import torch

    run, codes = torch.ops.mixtral_notebooks.layers_step, [_CODES[how] for plan, _ in inputs for how in plan]
    tensors = [t for _, weights in inputs for part in weights for t in part]  # layer after layer
    shape, constants = _operator_settings(decoder)

    def layers(h, lengths, visible, inv_freq, keys, values):
        return run(h, lengths, visible, inv_freq, keys, values, tensors, codes, shape, constants)

    return layers


native_layer.all_layers = native_layers  # graph_step's one call for every layer


def native_may_run(model) -> bool:
    """Whether our layer operator could take `model`'s one-token steps, its weights held as loaded: a Mixtral with no
    sliding window, on one device, the CPU, in float32 or bf16 (the fast path and quantize_model keep such a model's
    layers readable for it; `native_reads` checks the weights as they are)."""
    import torch

    config, devices = model.config, set(getattr(model, "hf_device_map", {"": None}).values())
    return (
        getattr(config, "model_type", None) == "mixtral"
        and getattr(config, "sliding_window", None) is None
        and len(devices) <= 1
        and model.device.type == "cpu"
        and model.dtype in (torch.float32, torch.bfloat16)
    )


def native_reads(model, ours: dict | None = None) -> bool:
    """Whether `native_layer` can run `model`'s layers where our kernels are built (quant_kernel.kernel_unavailable):
    one `native_may_run` allows, its experts' weights held as loaded or quantized for our kernels (not cached
    elsewhere, not held for torch's), and every dense weight of its layers one our dense kernel reads in place."""
    held_as_loaded = (*_PLAIN_EXPERTS, "quantized")
    if not native_may_run(model) or model.config._experts_implementation not in held_as_loaded:
        return False
    if any(getattr(m, "kernel", "ours") != "ours" for m in model.modules() if hasattr(m, "packed")):
        return False
    return all(
        _ours_reads(tensors[0])
        for plan, (_, *held) in _layers_inputs(model.model, ours)
        for how, tensors in zip(plan, held)
        if how in ("dense", "reduce")
    )


def graph_step(decoder, make_layer, ours: dict | None = None):
    """step(token [1], visible [L] (bool), keys, values, lengths) -> the decoder's last hidden state [1, D]: one
    token through `decoder` (a MixtralModel) on a static cache (each layer's keys and values [1, KV, L, d], written at
    its `lengths[i]`), each layer by `make_layer(decoder, plan)` (`compiled_layer`, `native_layer`): made once for all
    the layers whose weights are held alike, then called for each with its own tensors, read from the modules at the
    first step on a new cache (generate makes one for each call): a weight replaced between two calls is read then
    (made again only where it changes how its product is made), one replaced during a call is not. Where the fast path
    gave a stack of experts' weights our kernel, `ours` says so ({experts module: the names of its weights}). Where
    `make_layer` has `all_layers(decoder, inputs)` (native_layer: native_layers), that one call takes every layer."""
    made: dict = {}  # plan -> the layer made for it
    read: dict = {}  # the cache whose first step read the modules, and what it read: (plan, weights) per layer
    whole = getattr(make_layer, "all_layers", None)

    def step(token, visible, keys, values, lengths):
        if read.get("cache") is not keys[0]:
            inputs = _layers_inputs(decoder, ours)
            read.update(cache=keys[0], inputs=inputs, layers=whole and whole(decoder, inputs))
        h = decoder.embed_tokens.weight[token][0]  # [D]: one token, so every vector here is 1-d
        inv_freq = decoder.rotary_emb.inv_freq
        if read["layers"]:  # every layer in one call
            h = read["layers"](h, lengths, visible, inv_freq, keys, values)
        else:
            for i, (plan, weights) in enumerate(read["inputs"]):
                if plan not in made:
                    made[plan] = make_layer(decoder, plan)
                h = made[plan](h, lengths[i], visible, inv_freq, keys[i], values[i], weights)
        return _rms(h, decoder.norm.weight, decoder.config.rms_norm_eps)[None]

    return step


_PLAIN_EXPERTS = ("eager", "grouped_mm", "batched_mm", "per_token")  # their weights held as loaded


def _graph_applies(decoder, input_ids, attention_mask, past_key_values, kwargs, held: tuple) -> bool:
    """Whether this forward is one token of one sequence on a filled static cache, with nothing asked for, hooked
    (`held[0]`: what the step reads), masked but the positions past it, or replaced in the experts (`held[1]`)."""
    import torch
    from transformers.cache_utils import StaticCache, StaticLayer

    return (
        input_ids is not None
        and tuple(input_ids.shape) == (1, 1)
        and kwargs.get("inputs_embeds") is None
        and type(past_key_values) is StaticCache
        and all(type(c) is StaticLayer and c.is_initialized for c in past_key_values.layers)
        and not any(kwargs.get(k, getattr(decoder.config, k, False)) for k in _ASKED)
        and not decoder.training
        and (attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4))
        and decoder.config._experts_implementation in held[1]
        and not any(_hooked(m) for m in held[0])
    )


def use_graph_step(model, make_layer, ours: dict | None = None) -> bool:
    """Switch `model`'s one-token steps on a static cache to `graph_step(decoder, make_layer, ours)` (`make_layer`:
    `compiled_layer`, `native_layer` where `native_reads`), in place: the step of one sequence, anything else
    through `lean_forward` or transformers' own. False (nothing changed) where the lean step does not apply
    (`use_lean_step`) or quantized weights are held for torch's kernels, which the step cannot call."""
    import torch

    # quantized weights go through the graph only by our kernels (operators it can call)
    quantized = [m for m in model.modules() if hasattr(m, "packed")]
    if any(getattr(m, "kernel", None) != "ours" for m in quantized) or not use_lean_step(model):
        return False
    decoder = model.model
    reads = [m for layer in decoder.layers for m in layer.modules()]
    reads += [decoder.norm, decoder.embed_tokens, decoder.rotary_emb]
    held = (reads, (*_PLAIN_EXPERTS, *(("quantized",) if quantized else ())))
    step = graph_step(decoder, make_layer, ours)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        from transformers.modeling_outputs import MoeModelOutputWithPast

        if not _graph_applies(self, input_ids, attention_mask, past_key_values, kwargs, held):
            return lean_forward(self, input_ids, attention_mask, position_ids, past_key_values, **kwargs)
        cache = past_key_values.layers
        lengths = [c.cumulative_length for c in cache]
        visible = (
            attention_mask[0, 0, 0]
            if attention_mask is not None
            else torch.arange(cache[0].max_cache_len, device=lengths[0].device) <= lengths[0]
        )
        keys, values = [c.keys for c in cache], [c.values for c in cache]
        for t in (visible, *keys, *values):  # one graph for every cache length
            if (dim := 0 if t.dim() == 1 else 2) not in getattr(t, "_dynamo_dynamic_indices", ()):
                torch._dynamo.mark_dynamic(t, dim)
        h = step(input_ids[0], visible, keys, values, lengths)
        return MoeModelOutputWithPast(last_hidden_state=h[None], past_key_values=past_key_values)

    decoder.forward = types.MethodType(forward, decoder)
    return True
