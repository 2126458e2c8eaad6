"""Fewer bytes per token: weight-only int8 and int4 for every matrix a decode step reads.

Decoding waits on memory, so reading 1 byte (int8) or about half a byte (int4) per weight instead of
4 (fp32) raises the bandwidth ceiling by as much. transformers 5 keeps a Mixtral's experts as 3-D
parameters (`experts.gate_up_proj` [E, 2I, D], `experts.down_proj` [E, D, I]); tools that quantize
`nn.Linear` modules skip them silently, and they hold most of the bytes. Here attention's projections,
both expert stacks and lm_head are quantized (embedding rows, norms and routers stay: a lookup, or
tiny), and multiplied by CPU kernels: torch's own, fed bf16 activations (with fp32 activations its
int8 kernel is much slower: 10_quantization times both and asserts more than twice), or our own
(quant_kernel.py: the same values, scales and zeros, int16 activations); `choose_kernel` measures both at load:
  int8: `_weight_int8pack_mm`, one scale per output channel (w = q * scale)
  int4: `_weight_int4pack_mm_for_cpu`, groups of GROUP inputs with a scale and a zero each
An attention's quantized q, k and v can be joined into one copy (`QuantizedLinear.join`, which the fast path
calls) for decode.lean_forward's one product for the three (the same values, so the same logits).

Shapes: T = tokens, N = outputs, K = inputs, E = experts, G = GROUP.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

from .data import GB, QUANT_KERNEL_ENV
from .decode import Fused, native_may_run
from .experts import DECODE_TOKENS, experts_loop, register_experts, token_loop
from .fitting import GROUP, QUANT_KERNELS, WEIGHT_SCHEMES
from .hardware import best_seconds, timing_buffer_bytes
from .quant_kernel import (
    COLS,
    ROWS,
    fits,
    kernel_unavailable,
    operators,
    relayout4,
    relayout8,
    source_digest,
)

# Genesis 1-4 in the King James Version (1611, public domain), as Debian's bible-kjv-text 4.38 prints it
# (`bible gen1:1-4:26`), verse numbers dropped: the text quality is measured on
QUALITY_TEXT = Path(__file__).with_name("genesis_kjv.txt")


def _int8(stack):
    """[E, N, K] float -> (int8 [E, N, K], bf16 scales [E, N]); rounded with the scales as stored."""
    import torch

    scale = (stack.abs().amax(-1).clamp(min=1e-12) / 127).bfloat16()  # [E, N]
    return (stack / scale.float()[..., None]).round().clamp(-127, 127).to(torch.int8), scale


def _int4_values(stack):
    """[E, N, K] float -> (q [E, N, K] int32 in 0..15, scales and zeros [E, N, K/G], bf16 values as floats)."""
    import torch

    E, N, K = stack.shape
    if K % GROUP:
        raise ValueError(
            f"int4 needs inputs in groups of {GROUP}, and a weight is {N} x {K}: use Fit.quantized('int8') for "
            f"this model"
        )
    groups = stack.reshape(E, N, K // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)  # [E, N, K/G]
    scale = ((high - low) / 15).clamp(min=1e-12).bfloat16().float()
    zero = (low + 8 * scale).bfloat16().float()  # the kernel computes (q - 8) * scale + zero
    q = (
        ((groups - zero[..., None]) / scale[..., None] + 8)
        .round()
        .clamp(0, 15)
        .to(torch.int32)
        .reshape(E, N, K)
    )
    return q, scale, zero


def _int4(stack):
    """[E, N, K] float -> (packed [E, N, K/2] uint8, bf16 scales and zeros [E, K/G, N, 2]), as torch's kernel
    reads them."""
    import torch

    if stack.shape[1] % 16:
        raise ValueError(
            f"torch's int4 kernel needs outputs in multiples of 16, and a weight is {stack.shape[1]} x "
            f"{stack.shape[2]}: use Fit.quantized('int8') for this model"
        )
    q, scale, zero = _int4_values(stack)
    packed = torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(m, 2) for m in q])
    return packed, torch.stack([scale, zero], -1).transpose(1, 2).contiguous().bfloat16()


def _bf16_product(scheme: str, x, weight):
    """x [T, K] times a quantized weight [N, K] (`weight`: its packed values and scales) by torch's kernel, which
    takes bf16 activations -> [T, N] in x's dtype; no conversion where x is bf16 already."""
    import torch

    packed, scales = weight
    flat = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
    if scheme == "int8":
        y = torch.ops.aten._weight_int8pack_mm(flat, packed, scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, GROUP, scales)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _own_product(matmul, x, weight):
    """x [T, K] times weights held for our kernel, by its operator `matmul` -> [T, N] in x's dtype."""
    y = matmul(x, *weight)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _product(scheme: str, kernel: str):
    if kernel == "ours":  # its operator looked up once: forward runs on every token
        return functools.partial(_own_product, getattr(operators(), f"{scheme}_matmul"))
    return functools.partial(_bf16_product, scheme)


def _pack(stack, scheme: str, kernel: str) -> tuple:
    """[E, N, K] float -> (packed, scales) as `kernel`'s product for `scheme` reads them."""
    if kernel == "torch":
        return (_int8 if scheme == "int8" else _int4)(stack)
    if scheme == "int8":  # the same values and scales, the values laid out for quant_kernel.c
        q, scales = _int8(stack)
        return relayout8(q), scales
    return relayout4(*_int4_values(stack))


@functools.cache
def quantized_linear():
    """The module class, built on first use so that importing helpers does not import torch."""
    import torch

    class QuantizedLinear(torch.nn.Module):
        """x @ W.T for a quantized W [N, K], or for one expert of a stack [E, N, K]."""

        def __init__(self, weight, scheme: str, kernel: str = "torch"):
            super().__init__()
            self.scheme, self.shape, self.kernel = scheme, tuple(weight.shape), kernel
            self.product = _product(scheme, kernel)  # chosen once: forward runs on every token
            stack = weight.detach().float().reshape(-1, *weight.shape[-2:]).contiguous()  # [E, N, K]
            packed, scales = _pack(stack, scheme, kernel)
            # what the experts are fed (quantized_experts converts the hidden states once for all of them): ours
            # returns float32 for float32, so that the experts' sums stay in float32 as the graph's do
            self.input_dtype = torch.float32 if kernel == "ours" else torch.bfloat16
            one = weight.dim() == 2
            self.register_buffer("packed", packed[0] if one else packed)
            self.register_buffer("scales", scales[0] if one else scales)

        def forward(self, x, expert: int | None = None):
            packed = self.packed if expert is None else self.packed[expert]
            scales = self.scales if expert is None else self.scales[expert]
            # [T, K]; a decode step calls nothing else
            flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            y = self.product(flat, (packed, scales))
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])  # [.., N]

        def graph_product(self, x, chosen=None):
            """For decode.graph_step, where the kernel is ours: x [T, K] times the weight -> [T, N] float32, or,
            for a stack, row i of x (or its one row) times expert `chosen[i]` -> [len(chosen), N] float32."""
            ops = torch.ops.mixtral_notebooks  # registered: ours was built before it was chosen
            if chosen is None:
                return getattr(ops, f"{self.scheme}_matmul")(x, self.packed, self.scales)
            return getattr(ops, f"{self.scheme}_experts")(x, self.packed, self.scales, chosen)

        @staticmethod
        def join(projections: list):
            """One product for an attention's quantized q, k and v (decode.Fused, for the lean step; fastpath's
            join_projections): their quantized weights joined along the outputs, the very values, so the same products."""
            scheme, kernel = projections[0].scheme, projections[0].kernel
            packed = torch.cat([p.packed for p in projections])
            # torch's int4 holds its scales [K/G, N, 2]; the others' start with N
            scales = torch.cat(
                [p.scales for p in projections], dim=int(scheme == "int4" and kernel == "torch")
            )
            product = _product(scheme, kernel)
            return Fused(
                projections, (packed, scales), product, _buffers_stamp, [p.shape[0] for p in projections]
            )

        def extra_repr(self) -> str:
            return f"{self.scheme}, weight {list(self.shape)}, {QUANT_KERNELS[self.kernel][self.scheme]}"

    return QuantizedLinear


def quantized_experts(self, hidden_states, top_k_index, top_k_weights):
    """The experts of a quantized model, each expert's products by the quantized kernels: `token_loop` for
    a few tokens (decoding), `experts_loop` for more; the same sums either way."""
    import torch

    def ffn(expert, x):  # [t, D] -> [t, D] in the hidden states' dtype, so both loops weight the same values
        gate, up = self.gate_up_q(x, expert).chunk(2, dim=-1)  # [t, I] each
        return self.down_q(self.act_fn(gate) * up, expert).to(hidden_states.dtype)

    x = hidden_states.to(self.gate_up_q.input_dtype)  # [T, D], the kernels' input
    if len(x) <= DECODE_TOKENS:
        return token_loop(x, top_k_index, top_k_weights, ffn, hidden_states.dtype)
    return experts_loop(x, top_k_index, top_k_weights, ffn, torch.zeros_like(hidden_states))


def _buffers_stamp(module) -> tuple:  # what a joined copy was made from
    return tuple((b._version, b.data_ptr()) for b in (module.packed, module.scales))


def check_scheme(scheme, device: str) -> None:
    """A ValueError that says what to do, unless `scheme` has kernels on `device` here: int8 on CPUs and GPUs
    (torch ships its kernel for CUDA too: the GPU check times it), int4 on CPUs only."""
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(
            f"scheme={scheme!r} is not a weight scheme here; use {' or '.join(map(repr, WEIGHT_SCHEMES))}"
        )
    if device != "cpu" and scheme == "int4":
        raise ValueError(
            f"int4 uses torch's CPU kernel, and the model is on {device}: on GPUs load with "
            f"transformers' quantization_config instead (10_quantization shows how)"
        )


def kernel_gb_s(scheme: str, shape: tuple) -> dict:
    """{kernel: GB/s} of one-token products with `scheme` weights [N, K] = `shape` by each of its kernels that runs
    here (QUANT_KERNELS), both fed one bf16 token, over as many distinct copies as fill `timing_buffer_bytes()` (so
    they come from memory, as a decode step's do); the bytes are each kernel's values and scales; best of 3
    passes, measured once per machine."""
    from .fastpath import _once_per_machine

    def measure():
        import torch

        stack = torch.randn(1, *shape)  # [1, N, K]: one matrix, held as each kernel holds it
        ours = fits(shape, scheme) and not kernel_unavailable()
        held = {kernel: _pack(stack, scheme, kernel) for kernel in ("torch", "ours")[: 1 + ours]}
        x, speeds = torch.randn(1, shape[-1]).bfloat16(), {}
        for kernel, weight in held.items():
            size = sum(t.nbytes for t in weight)
            count = max(1, min(8192, math.ceil(timing_buffer_bytes() / size)))
            packed, scales = (t.expand(count, *t.shape[1:]).clone() for t in weight)
            product = _product(scheme, kernel)
            seconds = best_seconds(lambda: [product(x, one) for one in zip(packed, scales)])
            speeds[kernel] = count * size / seconds / GB
        return speeds

    return _once_per_machine(f"{scheme}-kernels", [list(shape), source_digest()], measure)


def choose_kernel(scheme: str, shape: tuple, device: str, stepped: bool = False) -> dict:
    """Which kernel multiplies a model's `scheme` weights, whose most bytes are [N, K] = `shape` matrices, and
    why: {"kernel", "gb_s" (what was measured), "why"}. $MIXTRAL_QUANT_KERNEL where set; on a GPU torch's; on a
    CPU ours where it runs here and takes these shapes, and `kernel_gb_s` finds torch's under MARGIN of its
    speed, or where the model's one-token step can be our layer operator (`stepped`, a Mixtral), which calls ours
    and which the load races against the lean step (fastpath.choose_step) instead."""
    from .fastpath import MARGIN

    forced = os.environ.get(QUANT_KERNEL_ENV, "").strip().lower()
    if forced and forced not in QUANT_KERNELS:
        raise ValueError(
            f"{QUANT_KERNEL_ENV}={forced!r} is not a kernel here: use {' or '.join(QUANT_KERNELS)}, or unset it "
            f"to take the faster one measured"
        )
    unavailable = "it runs on CPUs only" if device != "cpu" else kernel_unavailable()
    if not unavailable and not fits(shape, scheme):
        blocks = f"{ROWS} rows by {COLS if scheme == 'int8' else GROUP} inputs"
        unavailable = f"a weight's shape does not split into its {scheme} blocks ({blocks})"
    if forced == "ours" and unavailable:
        raise ValueError(f"{QUANT_KERNEL_ENV}=ours, but our {scheme} kernel cannot run here: {unavailable}")
    if forced:
        return dict(kernel=forced, gb_s={}, why=f"{QUANT_KERNEL_ENV}={forced}: forced")
    if unavailable:
        return dict(kernel="torch", gb_s={}, why=f"our {scheme} kernel is not used: {unavailable}")
    speeds = kernel_gb_s(scheme, shape)
    faster = "ours" if speeds["torch"] < MARGIN * speeds.get("ours", 0) else "torch"
    figures = ", ".join(f"{QUANT_KERNELS[name][scheme]} {gb_s:.1f} GB/s" for name, gb_s in speeds.items())
    why = f"measured at {list(shape)}, one token: {figures}"
    if stepped and faster == "torch":
        why += "; ours all the same, as our layer operator calls it, and the load races that step"
    return dict(kernel="ours" if stepped else faster, gb_s=speeds, why=why)


def _quantizable(model) -> list:
    """[(owner, attribute, weight, new name or None)] for every matrix quantize_model replaces."""
    import torch

    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ):
            found.append(
                (model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1], module.weight, None)
            )
        elif hasattr(module, "gate_up_proj") and getattr(module.gate_up_proj, "dim", lambda: 0)() == 3:
            found.append((module, "gate_up_proj", module.gate_up_proj, "gate_up_q"))
            found.append((module, "down_proj", module.down_proj, "down_q"))
    # tied to the embeddings: those stay, for row lookups
    return [*found, (model, "lm_head", model.lm_head.weight, None)]


def quantize_model(model, scheme: str) -> dict:
    """Quantize `model` in place (a Mixtral or dense Llama on the CPU) and switch its experts to
    `quantized_experts`. Returns {"scheme", "parameters", "bytes_before", "bytes_after", "kernel", "why"} for
    what changed and which kernel multiplies (`load_pipeline(fit=Fit.quantized(...))` keeps it as
    `model.load_record.quantized`)."""
    import torch

    check_scheme(scheme, model.device.type)
    targets = _quantizable(model)
    report = dict(scheme=scheme, parameters=0, bytes_before=0, bytes_after=0, kernel="torch", why="", gb_s={})
    by_shape: dict = {}
    for _, _, weight, _ in targets:
        by_shape[tuple(weight.shape[-2:])] = by_shape.get(tuple(weight.shape[-2:]), 0) + weight.numel()
    # the shape holding the most weights is timed; one that does not split into our blocks rules ours out
    odd = [shape for shape in by_shape if not fits(shape, scheme)]
    stepped = native_may_run(model)  # its step: our layer operator's to take
    shape = odd[0] if odd else max(by_shape, key=by_shape.get)
    choice = choose_kernel(scheme, shape, model.device.type, stepped)
    report.update(kernel=choice["kernel"], why=choice["why"], gb_s=choice["gb_s"])
    Quantized = quantized_linear()
    with torch.no_grad():
        for owner, attribute, weight, new_name in targets:
            quantized = Quantized(weight, scheme, report["kernel"])
            report["parameters"] += weight.numel()
            report["bytes_before"] += weight.nbytes
            report["bytes_after"] += sum(b.nbytes for b in quantized.buffers())
            if new_name:
                delattr(owner, attribute)
            setattr(owner, new_name or attribute, quantized)
        for p in model.parameters():  # what stays gets memory of its own, so the weights file can be unmapped
            p.data = p.data.clone()
    register_experts("quantized", quantized_experts)
    if getattr(model.config, "num_local_experts", None):
        model.set_experts_implementation("quantized")
    return report


def compare_logits(reference, candidates: dict, ids: list, window: int = 512) -> dict:
    """For each of `candidates` ({name: model}), teacher-forced over `ids` in windows of `window` tokens:
    how often its top-1 next token is the reference's, the mean KL(reference || candidate) per token,
    and both perplexities. The reference runs once per window, however many candidates there are.
    Taught in 10_quantization."""
    import torch

    sums = {
        name: dict(tokens=0, agree=0, kl=0.0, nll_reference=0.0, nll_candidate=0.0) for name in candidates
    }
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window + 1]])  # [1, W + 1]
            inputs, targets = chunk[:, :-1], chunk[0, 1:]
            ref = torch.log_softmax(reference(input_ids=inputs).logits[0].float(), -1)  # [W, V]
            for name, model in candidates.items():
                cand, s = (
                    torch.log_softmax(model(input_ids=inputs).logits[0].float(), -1),
                    sums[name],
                )  # [W, V]
                s["tokens"] += len(targets)
                s["agree"] += int((ref.argmax(-1) == cand.argmax(-1)).sum())
                s["kl"] += float((ref.exp() * (ref - cand)).sum())
                s["nll_reference"] -= float(ref.gather(1, targets[:, None]).sum())
                s["nll_candidate"] -= float(cand.gather(1, targets[:, None]).sum())
    return {
        name: dict(
            tokens=s["tokens"],
            top1_agreement=s["agree"] / s["tokens"],
            mean_kl=s["kl"] / s["tokens"],
            perplexity_reference=math.exp(s["nll_reference"] / s["tokens"]),
            perplexity_candidate=math.exp(s["nll_candidate"] / s["tokens"]),
        )
        for name, s in sums.items()
    }


def kernel_speeds(n: int = 3072, k: int = 576, repeats: int = 3, total: int | None = None) -> dict:
    """GB/s of weights that matrix-vector products [1, K] x [N, K].T read on this machine: F.linear in fp32
    and bf16, torch's int8 kernel fed fp32 or bf16 activations, torch's int4 kernel, and ours for each where they
    run. Each kind cycles over as many distinct [N, K] matrices as fill `total` bytes (default: twice the last-level cache, at least 256 MiB), so the
    weights come from memory, as a decode step's do, not from a cache; best of 3 x `repeats` passes.
    Taught in 10_quantization."""
    import torch
    import torch.nn.functional as F

    total = total or timing_buffer_bytes()
    x, x16, linear = torch.randn(1, k), torch.randn(1, k).bfloat16(), quantized_linear()

    def int8_fp32_activations(w):  # the fp32 kernel wants fp32 scales: converted once, not timed
        m = linear(w, "int8")
        return m.packed, m.scales.float()

    kinds = {
        "fp32 F.linear": (4, lambda w: w, lambda m: F.linear(x, m)),
        "bf16 F.linear": (2, lambda w: w.bfloat16(), lambda m: F.linear(x16, m)),
        # bytes per weight count the scales the kernel reads too: int8 one per row of k (fp32 or bf16),
        # int4 a bf16 scale and zero per GROUP inputs
        "int8, fp32 activations": (
            1 + 4 / k,
            int8_fp32_activations,
            lambda m: torch.ops.aten._weight_int8pack_mm(x, *m),
        ),
        "int8, bf16 activations": (1 + 2 / k, lambda w: linear(w, "int8"), lambda m: m(x16)),
    }
    if fits((n, k), "int8") and not kernel_unavailable():
        kinds["int8, our kernel"] = (1 + 2 / k, lambda w: linear(w, "int8", "ours"), lambda m: m(x16))
    if k % GROUP == 0 == n % 16:
        kinds["int4, bf16 activations"] = (0.5 + 4 / GROUP, lambda w: linear(w, "int4"), lambda m: m(x16))
    if fits((n, k), "int4") and not kernel_unavailable():
        kinds["int4, our kernel"] = (0.5 + 4 / GROUP, lambda w: linear(w, "int4", "ours"), lambda m: m(x16))
    speeds = {}
    for name, (size, build, run) in kinds.items():
        count = max(1, math.ceil(total / (n * k * size)))
        matrices = [build(torch.randn(n, k)) for _ in range(count)]
        best = best_seconds(lambda ms=matrices: [run(m) for m in ms], repeats=repeats) / count
        speeds[name] = dict(
            microseconds=best * 1e6,
            gb_s=n * k * size / best / 1e9,
            matrices=count,
            mib=count * n * k * size / 2**20,
        )
        del matrices
    return speeds
