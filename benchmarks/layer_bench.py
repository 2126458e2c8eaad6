"""Mixtral-8x22B's real layer dimensions, a few layers deep, random weights: decode time per layer
for each experts implementation, the bandwidth it achieves against the device's, and the full
56-layer model's tokens/s extrapolated to one GPU-equivalent (all 56 layers' reads per token done by one
device), and on a GPU how much of a step it spends running kernels and copies.

    python benchmarks/layer_bench.py                       # on a GPU: bf16, 1 and 3 layers
    python benchmarks/layer_bench.py --scale 0.0625 --device cpu --dtype float32   # a small rehearsal

Writes benchmarks/results/<date>-<device>.md (or --out). No weights are downloaded: the config is
the published one (helpers.data.KNOWN_MODELS) and the weights are random.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "mistralai/Mixtral-8x22B-Instruct-v0.1"
IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm", "per_token")  # per_token: the CPU fast path's loop
PROFILED_STEPS = 8  # decode steps under torch.profiler per row (on a GPU)


def build(layers: int, scale: float, dtype, device):
    """A Mixtral with the 8x22B config, `layers` deep, every width multiplied by `scale`."""
    import torch
    from transformers import MixtralForCausalLM

    from helpers.sizing import mixtral_config

    config = mixtral_config(MODEL)
    config.num_hidden_layers = layers
    if scale != 1:
        config.hidden_size = max(64, int(config.hidden_size * scale) // 64 * 64)
        config.intermediate_size = max(64, int(config.intermediate_size * scale) // 64 * 64)
        config.num_attention_heads = max(1, config.hidden_size // 128)
        config.num_key_value_heads = max(1, config.num_attention_heads // 6)
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    with torch.device(device):
        model = MixtralForCausalLM(config).to(dtype).eval()
    return model


def decoder(model, implementation: str, prompt: int = 32):
    """One decode step at a time (batch 1, KV cache), after a prefill of `prompt` random tokens."""
    import torch
    from transformers import DynamicCache

    model.set_experts_implementation(implementation)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=model.device)
    cache = DynamicCache()
    with torch.no_grad():
        state = [model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)]

    def step() -> None:
        with torch.no_grad():
            out = model(state[0], past_key_values=cache, use_cache=True)
            state[0] = out.logits[:, -1:].argmax(-1)

    return step


def sync_for(model):
    import torch

    return torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)


def warm(model, implementation: str = "eager", seconds: float = 3.0) -> None:
    """Decode steps for `seconds` before timing: by default 3 s in eager on each model before anything, then
    1 s with each implementation before its row. On the H200 the first tens of steps of a fresh process ran
    several times slower than later ones, past a few warm-up steps
    (benchmarks/results/2026-12-04-nvidia-h200.md)."""
    step, sync = decoder(model, implementation), sync_for(model)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        step()
        sync()


def step_seconds(models: dict, implementation: str, tokens: int) -> dict:
    """Median seconds of one decode step for each model (depth -> model), after 3 warm-up steps each. The
    models take turns step by step, so that a slow spell of the machine falls on all of them alike."""
    steps = {depth: decoder(model, implementation) for depth, model in models.items()}
    sync = sync_for(next(iter(models.values())))
    times = {depth: [] for depth in models}
    for i in range(3 + tokens):
        for depth, step in steps.items():
            sync()
            started = time.perf_counter()
            step()
            sync()
            if i >= 3:
                times[depth].append(time.perf_counter() - started)
    return {depth: statistics.median(ts) for depth, ts in times.items()}


def gpu_busy(model, implementation: str, steps: int = PROFILED_STEPS) -> dict:
    """Where one decode step's time goes on a GPU (torch.profiler, GPU activity only, mean of `steps`): the
    time the GPU spent running kernels and copies, and how many it ran. The caller sets it against the step's
    time measured without the profiler; busy well under that means the GPU sits idle between them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step, sync = decoder(model, implementation), sync_for(model)
    for _ in range(3):
        step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync()
    ran = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    busy = sum(e.time_range.elapsed_us() for e in ran) / 1e6 / steps
    return dict(busy_ms=busy * 1e3, kernels_and_copies=len(ran) / steps)


def main(argv=None) -> int:
    import torch

    from helpers.data import GPU_TYPES
    from helpers.experts import register_experts
    from helpers.fastpath import per_token_experts
    from helpers.files import atomic_file
    from helpers.hardware import measure_bandwidth, this_machine
    from helpers.quantize import quantize_model
    from helpers.sizing import decode_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layers",
        type=int,
        nargs=2,
        default=(1, 3),
        help="two depths; their difference gives the per-layer time",
    )
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed per implementation")
    parser.add_argument(
        "--warm",
        type=float,
        default=3.0,
        help="seconds of eager decode steps on each model first; each row then warms for a third of it",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="shrink every width (a rehearsal on a small machine)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--peak-tbs",
        type=float,
        default=None,
        help="the device's peak memory bandwidth (TB/s), if not known by name",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    shallow, deep = sorted(args.layers)
    if shallow < 1 or deep <= shallow:
        parser.error("--layers takes two different depths >= 1, e.g. 1 3")
    if args.tokens < 1:
        parser.error(f"--tokens takes the number of decode steps to time, at least 1 (got {args.tokens})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda, but torch sees no GPU (torch.cuda.is_available() is False); "
            "install the ROCm or CUDA build of torch (README) or pass --device cpu"
        )

    dtype = getattr(torch, args.dtype)
    register_experts("per_token", per_token_experts)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else (platform.processor() or "CPU")
    peak = args.peak_tbs or next(
        (v["bandwidth_tbs"] for k, v in GPU_TYPES.items() if k in name.replace(" ", "")), None
    )
    measured_bw = measure_bandwidth(mib=1024, device=args.device)
    print(
        f"{name}: torch {torch.__version__}, measured read bandwidth {measured_bw / 1e9:.0f} GB/s"
        + (f", datasheet {peak:.2f} TB/s" if peak else ""),
        flush=True,
    )

    rows = []
    models = {}
    for depth in (shallow, deep):
        started = time.perf_counter()
        models[depth] = build(depth, args.scale, dtype, args.device)
        print(f"built {depth} layer(s) in {time.perf_counter() - started:.0f} s", flush=True)
    for model in models.values():
        warm(model, seconds=args.warm)
    config = models[deep].config
    size = dtype.itemsize

    def layer_bytes(
        per_weight: float,
    ) -> float:  # one layer: attention, router, 2 experts, norms, KV (in `size`)
        full = decode_bytes(config, per_weight, context=32 + 3 + args.tokens // 2, kv_bytes=size)
        return (
            full["per_step"]
            - full["parts"]["lm_head"]
            - full["parts"]["embedding rows"]
            - config.hidden_size * per_weight
        ) / deep

    def failed(label: str, error: str) -> None:
        rows.append(dict(implementation=label, error=error[:160]))
        print(f"{label}: failed: {rows[-1]['error']}", flush=True)

    def timed_row(label: str, experts: str, per_weight=lambda: size) -> None:
        """Time both depths with `experts`; `per_weight()` (bytes per weight) runs first, inside the try."""
        try:
            weight_bytes = per_weight()
            for model in models.values():
                warm(model, experts, seconds=args.warm / 3)
            t = step_seconds(models, experts, args.tokens)
        except Exception as exc:  # noqa: BLE001 - one failing (a ROCm build without a kernel) must not hide the others
            return failed(label, f"{type(exc).__name__}: {exc}")
        per_layer = (t[deep] - t[shallow]) / (deep - shallow)
        rest = t[shallow] - shallow * per_layer  # embeddings, final norm, lm_head, sampling
        if per_layer <= 0:  # noise larger than a layer
            ms = ", ".join(f"{t[d] * 1e3:.2f} ms at {d}" for d in (shallow, deep))
            return failed(label, f"the deeper model was not slower ({ms}): rerun")
        bandwidth = layer_bytes(weight_bytes) / per_layer
        # the fixed part (rest) comes out negative when noise outweighs it: no extrapolation then
        full_tok_s = 1 / (56 * per_layer + rest) if rest > 0 else None
        rows.append(
            dict(
                implementation=label,
                per_layer_ms=per_layer * 1e3,
                rest_ms=rest * 1e3,
                bandwidth_gbs=bandwidth / 1e9,
                full_tok_s=full_tok_s,
            )
        )
        if args.device == "cuda":
            try:
                rows[-1]["profile"] = dict(gpu_busy(models[deep], experts), step_ms=t[deep] * 1e3)
            except Exception as exc:  # noqa: BLE001 - a failing profiler (CUPTI, ROCm) must not cost the rows
                rows[-1]["profile_error"] = f"{type(exc).__name__}: {exc}"[:160]
        print(
            f"{label}: {per_layer * 1e3:.3f} ms per layer, {bandwidth / 1e9:.0f} GB/s, full model "
            + (f"{full_tok_s:.1f} tok/s" if full_tok_s else "not extrapolated (noise)"),
            flush=True,
        )

    for implementation in IMPLEMENTATIONS:
        timed_row(implementation, implementation)

    def quantize_int8() -> float:  # int8 weight-only (helpers/quantize.py), the same layers: bytes per weight
        report = [quantize_model(m, "int8") for m in models.values()][0]
        return report["bytes_after"] / report["parameters"]

    timed_row("int8 weights (quantized)", "quantized", quantize_int8)  # last: it replaces the weights

    date = time.strftime("%Y-%m-%d")
    label = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").lower()
    lines = [
        f"# Mixtral-8x22B layers on {name}, {date}",
        "",
        f"torch {torch.__version__} ({this_machine().backend}), "
        f"{args.dtype}, widths x{args.scale}: hidden {config.hidden_size}, FFN {config.intermediate_size}, "
        f"{config.num_local_experts} experts top-{config.num_experts_per_tok}, "
        f"{config.num_attention_heads}/{config.num_key_value_heads} heads; random weights; "
        f"{shallow} and {deep} layers, batch 1, median of {args.tokens} decode steps.",
        "",
        f"Measured read bandwidth (torch sum over 1 GiB): {measured_bw / 1e9:.0f} GB/s"
        + (f"; datasheet peak {peak * 1000:.0f} GB/s." if peak else "."),
        f"Bytes one layer reads per token: {layer_bytes(size) / 2**20:.1f} MiB (in {args.dtype}).",
        "",
        "| experts implementation | ms per layer | achieved GB/s | of measured | of datasheet | full 56 layers, tok/s (one GPU-equivalent) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['implementation']} | failed: {r['error']} | | | | |")
            continue
        of_datasheet = f"{r['bandwidth_gbs'] / (peak * 1000):.0%}" if peak else "n/a"
        full = (
            "n/a: its fixed part came out negative (noise)"
            if r["full_tok_s"] is None
            else f"{r['full_tok_s']:.1f}"
        )
        lines.append(
            f"| {r['implementation']} | {r['per_layer_ms']:.3f} | {r['bandwidth_gbs']:.0f} | "
            f"{r['bandwidth_gbs'] * 1e9 / measured_bw:.0%} | {of_datasheet} | {full} |"
        )
    profiled = [r for r in rows if "profile" in r or "profile_error" in r]
    if profiled:
        lines += [
            "",
            f"One decode step of the {deep}-layer model (embeddings and lm_head included): its median time "
            "without the profiler (timed as above), and the time the GPU spent running kernels and copies "
            f"per step over {PROFILED_STEPS} further steps under torch.profiler (GPU activity only). Busy "
            "well under the step's time means the GPU sat idle between them; the profile does not show the "
            "CPU, so that it was launching the next one is a reading, not a measurement.",
            "",
            "| experts implementation | step ms | GPU busy ms | busy share | kernels and copies per step |",
            "|---|---|---|---|---|",
        ]
        for r in profiled:
            if "profile_error" in r:
                lines.append(f"| {r['implementation']} | profiler failed: {r['profile_error']} | | | |")
                continue
            p = r["profile"]
            lines.append(
                f"| {r['implementation']} | {p['step_ms']:.2f} | {p['busy_ms']:.2f} | "
                f"{p['busy_ms'] / p['step_ms']:.0%} | {p['kernels_and_copies']:.0f} |"
            )
    lines += [
        "",
        "The int8 row reads int8 weights (one bf16 scale per output channel; helpers/quantize.py), so its "
        "achieved GB/s counts int8 bytes. Per-layer time is the difference between the two depths, so embeddings and lm_head cancel out; "
        "the extrapolation adds them back once. One GPU-equivalent: all 56 layers' reads per token done by "
        'one device, which is what device_map="auto" does across GPUs (one at a time).',
    ]
    path = Path(args.out) / f"{date}-{label}.md"
    atomic_file(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
