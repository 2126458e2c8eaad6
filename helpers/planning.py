"""Plan the hardware before the download: will a model fit on these GPUs, where would
device_map="auto" put its layers, and how fast could it decode there.

Counts come from sizing.py; the placement is accelerate's own, run on the meta device (the real
configs, no weights)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field

from . import hardware
from .data import DTYPE_BYTES, GPU_TYPES, LINK_GTS, RESERVED, GiB, whole_number
from .sizing import (
    as_config,
    ceiling,
    chance_hit_rate,
    decode_bytes,
    dtype_bytes,
    expert_bytes,
    fits,
    footprint,
    kv_precision,
    parameter_count,
    usable,
)


@dataclass
class Plan:
    model: str
    gpu: str
    count: int
    precision: str
    context: int
    weights_bytes: int
    kv_bytes: int
    capacity_bytes: int  # usable memory over all GPUs (sizing.usable: RESERVED kept free)
    fits: bool
    device_map: dict = field(default_factory=dict)  # module -> GPU index, from accelerate
    layers_per_gpu: list = field(default_factory=list)
    ceiling_pipeline: float = 0.0  # tok/s at batch 1 with device_map="auto" (one GPU at a time)
    ceiling_tensor_parallel: float = 0.0  # tok/s at batch 1 if all GPUs read at once (vLLM)
    advice: str = ""
    config: object = field(default=None, repr=False, compare=False)  # the model's config, for parallel_step

    @property
    def label(self) -> str:
        """ "8x MI300X"; for a card with two dies, the dies the system shows as GPUs: "8x MI250X GCD"."""
        return f"{self.count}x {gpu_name(self.gpu)}"

    def summary(self) -> str:
        need, has = (self.weights_bytes + self.kv_bytes) / GiB, self.capacity_bytes / GiB
        head = (
            f"{self.model} in {self.precision}, {self.context} tokens of context, on {self.label}: "
            f"needs {need:.0f} GiB (weights {self.weights_bytes / GiB:.0f} + KV cache {self.kv_bytes / GiB:.1f}), "
            f"has {has:.0f} GiB usable ({RESERVED:.0%} of each GPU kept free)"
        )
        if not self.fits:
            return f"{head}. DOES NOT FIT: {need - has:.0f} GiB missing. {self.advice}"
        return (
            f"{head}. Fits, {has - need:.0f} GiB to spare: layers per GPU {self.layers_per_gpu}. Decode ceiling "
            f'at batch 1: {self.ceiling_pipeline:.0f} tok/s with device_map="auto", '
            f"{self.ceiling_tensor_parallel:.0f} tok/s with tensor parallelism."
            + (f" {self.advice}" if self.advice else "")
        )

    def draw(self, ax=None):
        """The GPUs as bars, filled by the layers device_map="auto" gave each one. Taught in 00_setup."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * self.count))
        per_gpu = self.capacity_bytes / self.count / GiB
        layer = (self.weights_bytes / GiB) / max(1, sum(self.layers_per_gpu)) if self.layers_per_gpu else 0
        need_each = (self.weights_bytes + self.kv_bytes) / self.count / GiB
        for i in range(self.count):
            n = self.layers_per_gpu[i] if self.layers_per_gpu else 0
            if not self.fits:  # what each GPU would have to hold, spilling past its memory
                ax.barh(i, need_each, color="#c44e52", alpha=0.5, hatch="//")
            ax.barh(i, per_gpu, color="#eeeeee", edgecolor="#999999", alpha=0.8 if not self.fits else 1)
            ax.barh(i, n * layer, color="#4c72b0")
            ax.barh(i, self.kv_bytes / self.count / GiB, left=n * layer, color="#dd8452")
            label = f"{n} layers" if self.fits else f"needs {need_each:.0f} GiB"
            ax.text(max(per_gpu, need_each if not self.fits else 0) * 1.01, i, label, va="center", fontsize=8)
        ax.set_yticks(range(self.count), [f"{self.gpu} {i}" for i in range(self.count)])
        ax.invert_yaxis()
        ax.set_xlabel(
            "GiB (grey: usable memory, blue: decoder layers, orange: KV cache, red: what does not fit)"
        )
        verdict = "fits" if self.fits else "does not fit"
        ax.set_title(
            f"{self.model.split('/')[-1]}, {self.precision}, {self.context} ctx: {verdict} on {self.label}"
        )
        return ax


def gpu_name(gpu: str) -> str:
    return f"{gpu} {GPU_TYPES[gpu]['unit']}" if "unit" in GPU_TYPES.get(gpu, {}) else gpu


def plan(
    model: str = "mistralai/Mixtral-8x22B-Instruct-v0.1",
    gpu: str | dict = "MI300X",
    count: int = 8,
    precision: str = "bfloat16",
    context: int = 4096,
) -> Plan:
    """Will `model` fit on `count` GPUs of type `gpu`, and where would device_map="auto" put it?

    `gpu` is a key of GPU_TYPES, or any GPU as a dict in GPU_TYPES' form with a name, e.g.
    {"name": "my GPU", "memory_gib": 141, "bandwidth_tbs": 4.8} (the GPUs this machine has). Taught in 00_setup."""
    config = as_config(model)
    whole_number("count", count, 1, " (the number of GPUs)")
    spec = dict(gpu) if isinstance(gpu, dict) else dict(GPU_TYPES.get(gpu, {}))
    gpu = spec.pop("name", "a GPU") if isinstance(gpu, dict) else gpu
    if "memory_gib" not in spec or "bandwidth_tbs" not in spec:
        raise ValueError(
            f"unknown GPU {gpu!r}: use one of {', '.join(GPU_TYPES)}, or a dict such as "
            f"{{'name': 'my GPU', 'memory_gib': 141, 'bandwidth_tbs': 4.8}}"
        )
    if not spec["memory_gib"] > 0 or not spec["bandwidth_tbs"] > 0:
        raise ValueError(f"GPU memory and bandwidth must be > 0, got {spec}")
    whole_number(
        "context", context, 1, " (the model's maximum, in tokens)", maximum=config.max_position_embeddings
    )
    size, cost = dtype_bytes(precision), footprint(config, precision, context)
    weights, kv = cost["weights"], cost["kv"]
    per_gpu = int(usable(spec["memory_gib"] * GiB))
    capacity = per_gpu * count
    name = model if isinstance(model, str) else "model"
    fits = weights + kv <= capacity
    result = Plan(name, gpu, count, precision, context, weights, kv, capacity, fits, config=config)
    if not result.fits:
        more = -(-(weights + kv) // per_gpu)
        lower = [p for p, s in DTYPE_BYTES.items() if s < size and weights / size * s + kv <= capacity]
        result.advice = (
            f"It would fit on {more}x {gpu_name(gpu)}"
            + (f", or in {lower[0]} on these {count}" if lower else "")
            + "."
        )
        return result
    result.device_map = auto_device_map(config, count, per_gpu - kv // count, precision)
    devices = [layer_device(result.device_map, i) for i in range(config.num_hidden_layers)]
    result.layers_per_gpu = [devices.count(i) for i in range(count)]
    result.ceiling_pipeline = ceiling(spec["bandwidth_tbs"] * 1e12, cost["per_token"])
    result.ceiling_tensor_parallel = count * result.ceiling_pipeline
    return result


@contextlib.contextmanager
def _meta_mixtral(config, precision: str):
    """(a Mixtral of `config` on the meta device, the torch dtype accelerate sizes it in, the budgets' scale),
    accelerate's warning that the planned GPUs are not on this machine silenced. accelerate sizes per torch
    dtype, so int4 is planned as int8 with doubled budgets (the same proportions)."""
    import torch
    from transformers import MixtralForCausalLM

    with torch.device("meta"):
        net = MixtralForCausalLM(config)
    quiet = logging.getLogger("accelerate.utils.modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield (
            net,
            getattr(torch, "int8" if precision == "int4" else precision),
            2 if precision == "int4" else 1,
        )
    finally:
        quiet.setLevel(level)


NO_SPLIT = ["MixtralDecoderLayer"]


def auto_device_map(config, count: int, budget_per_gpu: int, precision: str) -> dict:
    """What transformers' device_map="auto" would do on `count` GPUs with `budget_per_gpu` bytes each
    for the weights: accelerate's own balancing and placement, on the meta device."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    with _meta_mixtral(config, precision) as (net, dtype, scale):
        budget = {i: budget_per_gpu * scale for i in range(count)}
        budget = get_balanced_memory(net, max_memory=budget, no_split_module_classes=NO_SPLIT, dtype=dtype)
        return infer_auto_device_map(net, max_memory=budget, dtype=dtype, no_split_module_classes=NO_SPLIT)


def bytes_past_one_gpu(config, budget: int, precision: str) -> float:
    """The bytes of weights device_map="auto" puts in CPU RAM next to one GPU with `budget` bytes for them."""
    from accelerate.utils import compute_module_sizes, infer_auto_device_map

    with _meta_mixtral(config, precision) as (net, dtype, scale):
        placed = infer_auto_device_map(
            net, max_memory={0: budget * scale, "cpu": 2**60}, dtype=dtype, no_split_module_classes=NO_SPLIT
        )
        sizes = compute_module_sizes(net, dtype=dtype)
        return sum(sizes[k] for k, d in placed.items() if d == "cpu") / scale


def link_bandwidth(link: str) -> float:
    """Bytes/s one way over a host link of LINK_GTS (PCIe x16: GT/s x 16 lanes x 128/130 / 8 bits)."""
    if link not in LINK_GTS:
        raise ValueError(f"link={link!r}: use one of {', '.join(LINK_GTS)}")
    return LINK_GTS[link] * 16 * 128 / 130 / 8 * 1e9


def offload_plan(
    model: str,
    gpu: str,
    link: str = "PCIe 4.0 x16",
    precision: str = "bfloat16",
    context: int = 4096,
    hit_rate=None,
) -> dict:
    """Batch-1 decode speed, estimated from the datasheets, on ONE GPU of GPU_TYPES for a model that may not
    fit on it, two ways:
    device_map="auto" (accelerate puts the layers that do not fit in CPU RAM and copies them in, whole,
    for every token) and an expert cache (all but the experts on the GPU, as many experts per layer as
    the rest of its memory holds; a token fetches its experts that are not cached). `hit_rate`: the
    share of expert uses found in the cache, a number or a function of experts cached per layer
    (default: what uniformly random routing would give, `chance_hit_rate`). Per token, time = bytes the GPU reads /
    its bandwidth + bytes over the link / the link's (peak rates, which real transfers do not reach, and no
    overlap of the copy with compute, which real engines have: an estimate, not a bound either way).
    11_offloading, section 3, draws them with `draw_offload_plans`."""
    config, size = as_config(model), dtype_bytes(precision)
    if gpu not in GPU_TYPES:
        raise ValueError(f"unknown GPU {gpu!r}: use one of {', '.join(GPU_TYPES)}")
    gpu_bw, link_bw = GPU_TYPES[gpu]["bandwidth_tbs"] * 1e12, link_bandwidth(link)
    parts, L, E, K = (
        parameter_count(config),
        config.num_hidden_layers,
        config.num_local_experts,
        config.num_experts_per_tok,
    )
    expert = expert_bytes(config, size)  # one expert of one layer
    cost, memory = footprint(config, precision, context), GPU_TYPES[gpu]["memory_gib"] * GiB
    weights, kv, read = cost["weights"], cost["kv"], cost["per_token"]  # read: what the GPU reads per token
    budget, resident = usable(memory), weights - parts["experts"] * size + kv  # resident: all but the experts
    row = dict(
        model=model.split("/")[-1],
        gpu=gpu,
        memory_gib=GPU_TYPES[gpu]["memory_gib"],
        link=link,
        link_gt_s=LINK_GTS[link],  # per lane
        link_gb_s=link_bw / 1e9,  # each way
        precision=precision,
        weights_gib=weights / GiB,
        fits=fits(weights + kv, memory),
        expert_gib=expert / GiB,
    )
    if row["fits"]:
        return dict(
            row,
            cached_per_layer=E,
            hit_rate=1.0,
            cache_bus_gb=0.0,
            auto_bus_gb=0.0,
            cache_tok_s=ceiling(gpu_bw, read),
            auto_tok_s=ceiling(gpu_bw, read),
        )
    in_ram = _bytes_left_in_ram(model, int(budget - kv), precision)
    row.update(auto_bus_gb=in_ram / 1e9, auto_tok_s=1 / (read / gpu_bw + in_ram / link_bw))
    per_layer = min(E, int((budget - resident) // expert // L)) if budget > resident else 0
    if per_layer < 1:  # each layer needs a slot to compute in
        return dict(row, cached_per_layer=0, hit_rate=None, cache_bus_gb=None, cache_tok_s=None)
    hit = (
        hit_rate(per_layer)
        if callable(hit_rate)
        else chance_hit_rate(per_layer, E, K)
        if hit_rate is None
        else hit_rate
    )
    bus = L * K * (1 - hit) * expert
    return dict(
        row,
        cached_per_layer=per_layer,
        hit_rate=hit,
        cache_bus_gb=bus / 1e9,
        cache_tok_s=1 / (read / gpu_bw + bus / link_bw),
    )


# Three ways to spread an MoE over the GPUs of one node (08_performance, section 5), as vLLM names them.
SCHEMES = {
    "tensor": "tensor parallel: every weight split over all GPUs (vLLM: --tensor-parallel-size N)",
    "expert": "expert parallel, attention split: whole experts per GPU (vLLM: --tensor-parallel-size N "
    "--enable-expert-parallel)",
    "expert, data": "expert parallel, attention replicated: whole experts per GPU, each GPU its own sequences "
    "(vLLM: --data-parallel-size N --enable-expert-parallel)",
}


def remote_gpus(experts: int, per_token: int, gpus: int) -> float:
    """GPUs other than a token's own that hold at least one of its `per_token` experts, on average, when the
    `experts` are spread evenly (experts / gpus each) and a token picks `per_token` distinct ones at random:
    (gpus - 1) x P(a given GPU holds one) = (gpus - 1) x (1 - C(E - E/N, K) / C(E, K)). Its hidden state goes to
    each of them (dispatch), and their results come back (combine)."""
    return (gpus - 1) * (1 - math.comb(experts - experts // gpus, per_token) / math.comb(experts, per_token))


def parallel_step(setup: Plan, batch: int = 1, scheme: str = "tensor") -> dict:
    """One decode step of `batch` sequences on the GPUs of `setup`, a `plan(model, gpu, count, precision, context)`
    (each KV cache half full, context // 2 tokens, as the plan counts; a GPU of GPU_TYPES with a peer_link_gbs),
    one of SCHEMES: what the GPU that sets the pace reads from its memory and sends over its links (it receives as
    much), and the time of each at the published rates (GPU_TYPES), added with no overlap: a ceiling's kind of
    estimate, with no per-exchange latency. peer_link_gbs is all of a GPU's links at once; a GPU that sends to few
    peers uses few of them, so its link time is understated.
    - tensor: each GPU reads 1/N of everything the step reads; two ring all-reduces per layer (after attention
      and after the experts) of the step's hidden states, each GPU sending 2 (N-1)/N of them.
    - expert: attention split as in tensor; whole experts, E/N per GPU: the busiest GPU reads its E/N experts in every
      layer (exact where E = N, one expert per GPU, since some token chose it; an upper bound otherwise). The
      experts' all-gather and reduce-scatter move an all-reduce's bytes, so the links carry what tensor's do.
    - expert, data: each GPU holds every shared weight and its ceil(B/N) sequences (their KV cache), and sends each
      token's hidden state to the GPUs that hold its experts and the results back (all-to-all): 2 x remote_gpus
      hidden states per token per layer.
    `moved_per_token_layer`: bytes over all links, all GPUs together, per token per layer; `exchanges`: the link
    exchanges in one step (two per layer, each with a start-up latency that is not counted).
    Taught in 08_performance."""
    if not isinstance(setup, Plan):
        raise TypeError(
            f"parallel_step takes a plan of the GPUs, not a {type(setup).__name__}: "
            'parallel_step(plan("mistralai/Mixtral-8x22B-Instruct-v0.1", gpu="MI300X", count=8))'
        )
    c, precision, context = setup.config, setup.precision, setup.context // 2  # a generation's average
    size, count, gpu = dtype_bytes(precision), setup.count, setup.gpu
    whole_number("batch", batch, 1, " (sequences decoded together)")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}: use one of {', '.join(map(repr, SCHEMES))}")
    linked = [name for name, spec in GPU_TYPES.items() if "peer_link_gbs" in spec]
    if gpu not in linked:
        raise ValueError(
            f"{setup.label}: GPU-to-GPU link rates are known for {', '.join(linked)} (GPU_TYPES)"
        )
    E, K, L, D, N = c.num_local_experts, c.num_experts_per_tok, c.num_hidden_layers, c.hidden_size, count
    if E % N:
        raise ValueError(f"{E} experts do not split evenly over {N} GPUs: use a count that divides {E}")
    kv = dtype_bytes(kv_precision(precision))
    every_expert = parameter_count(c)["experts"] * size
    if scheme == "expert, data":
        mine = -(-batch // N)  # the busiest GPU's sequences
        own = decode_bytes(c, size, context, mine, kv_bytes=kv)["parts"]
        read = sum(v for k, v in own.items() if k != "experts") + every_expert / N
        moved = 2 * remote_gpus(E, K, N) * D * size
        sent = L * mine * moved
    else:
        step = decode_bytes(c, size, context, batch, kv_bytes=kv)["parts"]
        experts = every_expert if scheme == "expert" else step["experts"]
        read = (sum(v for k, v in step.items() if k != "experts") + experts) / N
        sent = (
            L * 2 * (2 * (N - 1) / N * batch * D * size)
        )  # two ring all-reduces of batch x D values per layer
        moved = sent * N / L / batch
    exchanges = (
        2 * L
    )  # per step: an all-reduce after attention and one after the experts; or dispatch and combine
    read_s, link_s = (
        read / (GPU_TYPES[gpu]["bandwidth_tbs"] * 1e12),
        sent / (GPU_TYPES[gpu]["peer_link_gbs"] * 1e9),
    )
    return dict(
        scheme=scheme,
        how=SCHEMES[scheme],
        gpu=gpu,
        count=N,
        batch=batch,
        read_bytes=read,
        link_bytes=sent,
        read_s=read_s,
        link_s=link_s,
        seconds=read_s + link_s,
        tok_s=batch / (read_s + link_s),
        moved_per_token_layer=moved,
        exchanges=exchanges,
    )


@functools.lru_cache(maxsize=64)
def _bytes_left_in_ram(model: str, budget: int, precision: str) -> float:
    """What device_map="auto" leaves in CPU RAM with one GPU of `budget` bytes (the same for every link)."""
    return bytes_past_one_gpu(as_config(model), budget, precision)


def draw_offload_plans(
    rows: list, title: str = "One GPU, the model bigger than it: decode speed at batch 1, estimated"
):
    """Bars per GPU: device_map="auto" against the expert cache, for each link; one panel per model
    and precision; a cross where the route cannot run (not even one expert per layer fits).
    Taught in 11_offloading."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = list(dict.fromkeys((r["model"], r["precision"]) for r in rows))
    links = list(dict.fromkeys(r["link"] for r in rows))
    bars = [(route, link) for route in ("auto", "cache") for link in links]
    colours = ("#c44e52", "#dd8452", "#4c72b0", "#55a868")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        mine = [r for r in rows if (r["model"], r["precision"]) == panel]
        gpus = list(dict.fromkeys(r["gpu"] for r in mine))
        for i, gpu in enumerate(gpus):
            for j, (route, link) in enumerate(bars):
                r = next(r for r in mine if r["gpu"] == gpu and r["link"] == link)
                x, speed = i + (j - 1.5) * 0.2, r[f"{route}_tok_s"]
                if speed is None:
                    ax.scatter(x, 0.05, marker="x", color=colours[j])
                else:
                    ax.bar(x, speed, 0.2, color=colours[j])
        ax.set_xticks(
            range(len(gpus)), [f"{r['gpu']}\n{r['memory_gib']} GB" for r in mine if r["link"] == links[0]]
        )
        ax.set_yscale("log")
        ax.set_title(f"{panel[0]}, {panel[1]}", fontsize=9)
    axes[0][0].set_ylabel("decode, tok/s (estimate, log)")
    names = {"auto": 'device_map="auto"', "cache": "expert cache"}
    fig.legend(
        [Patch(color=c) for c in colours],
        [f"{names[route]}, {link}" for route, link in bars],
        loc="lower center",
        ncol=4,
        fontsize=8,
    )
    fig.suptitle(f"{title} (x: not even one expert per layer fits)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def map_entry(device_map: dict, name: str) -> str:
    """The device_map key that places module or parameter `name`: the most specific one that holds it."""
    return max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)


def layer_device(device_map: dict, layer: int):
    """The device of decoder layer `layer`."""
    return device_map[map_entry(device_map, f"model.layers.{layer}")]


def plan_for_this_machine(
    model: str = "mistralai/Mixtral-8x22B-Instruct-v0.1", precision: str = "bfloat16", context: int = 4096
) -> Plan | None:
    """The plan for the GPUs torch sees here (None without GPUs). The bandwidth comes from
    GPU_TYPES when the device name contains a known type, else 2 TB/s is assumed and said.
    Taught in 00_setup."""
    found = hardware.gpus()
    if not found:
        return None
    name = found[0]["name"]
    known = next((t for t in GPU_TYPES if t in name.replace(" ", "")), None)
    result = plan(
        model,
        gpu=dict(
            name=name,
            memory_gib=found[0]["total"] / GiB,
            bandwidth_tbs=GPU_TYPES[known]["bandwidth_tbs"] if known else 2.0,
        ),
        count=len(found),
        precision=precision,
        context=context,
    )
    if not known:
        result.advice += " (bandwidth of this GPU unknown: 2 TB/s assumed for the ceilings)"
    return result
