"""When the model does not fit: keep part of it in a slower memory, two ways, and count the bytes.

1. accelerate's offloading (`Fit.budget`: budgets per device, a folder for the rest): what `device_map="auto"` does with a model
   larger than the GPUs. Whole modules live in a slower tier (CPU RAM, then disk) and every forward
   copies all of their weights in, all 8 experts of a layer although a token uses 2.
2. An expert cache: everything but the experts stays resident; each layer keeps `per_layer` experts in
   slots of fast memory and fetches the others from the slow tier when the router picks them, into
   the least recently used slot. On a CPU the slow tier is the safetensors file, memory-mapped; on a
   GPU, CPU RAM. An experts implementation, "expert_cache", like the fast path's "per_token"; resizable.
   Each experts module's `LayerCache` is kept in a weak table here (`layer_caches`), not on the module.

`OffloadMeter` counts what each tier gives every forward. Fetching ahead is in prefetch.py; the eviction
policies and their replay over router traces in policies.py. 11_offloading uses them all.
Shapes: E experts, K experts per token, D hidden, I expert FFN, T tokens, C slots per layer.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .data import whole_number
from .experts import experts_loop, register_experts
from .files import weight_files
from .fitting import TIERS
from .planning import map_entry
from .policies import LRU

_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # experts module -> its LayerCache


class LayerCache:
    """One layer's policy over its slots (LRU), `fetch(expert) -> (gate_up [2I, D], down [D, I])` from the
    slow tier, and what it counted: hits, misses, bytes fetched. `prefetch` fetches guessed experts ahead, in
    a background thread; a use waits for the copies still under way."""

    def __init__(self, fetch, capacity: int, tier: str = "disk"):
        self.policy, self.fetch, self.tier = LRU(capacity), fetch, tier
        self.count, self.pending, self.ahead, self.stream = Counter(), [], set(), None

    def _copy(self, experts_module, slot: int, expert: int, stream=None) -> int:
        """One expert from the slow tier into `slot`: its bytes. On a GPU, `stream` is a side stream for copies."""
        import torch

        gate_up, down = self.fetch(expert)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            experts_module.cached_gate_up[slot].copy_(gate_up, non_blocking=True)
            experts_module.cached_down[slot].copy_(down, non_blocking=True)
        return gate_up.nbytes + down.nbytes

    def settle(self) -> None:
        """Wait for the prefetches under way (a use must not read a slot being written)."""
        for job in self.pending:
            self.count["from slow tier"] += job.result()
        if self.pending and self.stream is not None:  # the GPU's compute waits for the copies
            import torch

            torch.cuda.current_stream().wait_stream(self.stream)
        self.pending = []

    def prefetch(self, experts_module, experts, pool, stream=None) -> None:
        """Give each guessed expert that is not resident a slot now (the policy's victim's) and copy it in on
        `pool`'s thread: it is used, or evicted, later. Runs where the guess is made, so the policy is only
        ever touched by one thread."""
        if (
            stream is not None
        ):  # on a GPU, a slot is overwritten only after the work queued so far has read it
            import torch

            stream.wait_stream(torch.cuda.current_stream())
        experts = sorted(
            experts, key=lambda e: e not in self.policy.slots
        )  # the resident first, refreshed: with as
        for expert in experts:  # many slots as guesses, none is evicted
            hit, slot = self.policy.touch(expert)
            if not hit:
                self.ahead.add(expert)
                self.count["prefetched"] += 1
                self.stream = stream
                self.pending.append(pool.submit(self._copy, experts_module, slot, expert, stream))
        self.ahead.intersection_update(
            self.policy.slots
        )  # a guess evicted before its use was fetched for nothing

    def slot(self, experts_module, expert: int) -> int:
        self.settle()
        hit, slot = self.policy.touch(expert)
        self.count["hits" if hit else "misses"] += 1
        if expert in self.ahead:  # used where it was fetched to, unless a miss evicted it since
            self.ahead.discard(expert)
            self.count["prefetch used"] += hit
        if not hit:
            self.count["from slow tier"] += self._copy(experts_module, slot, expert)
        return slot


def cached_experts(self, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop, each expert's weights taken from its cache slot (fetched on a miss)."""
    import torch.nn.functional as F

    def ffn(expert, x):  # [t, D] -> [t, D]
        i = _CACHES[self].slot(self, expert)
        gate, up = F.linear(x, self.cached_gate_up[i]).chunk(2, dim=-1)  # [t, I] each
        return F.linear(self.act_fn(gate) * up, self.cached_down[i])

    return experts_loop(
        hidden_states, top_k_index, top_k_weights, ffn, hidden_states.new_zeros(hidden_states.shape)
    )


class ExpertFiles:
    """The experts in a model folder's safetensors, read one expert at a time (memory-mapped): the
    fused 3-D tensors transformers 5 saves, or the hub's per-expert w1/w3/w2."""

    def __init__(self, folder):
        from safetensors import safe_open

        self.where = {}  # tensor name -> open file
        for name in weight_files(folder):
            handle = safe_open(str(Path(folder) / name), framework="pt")
            self.where.update(dict.fromkeys(handle.keys(), handle))
        if not any(".experts." in k for k in self.where):
            raise ValueError(
                f"no experts in the safetensors of {folder}: expert_cache needs a Mixtral's weights"
            )

    def fetch(self, layer: int, expert: int):
        """(gate_up [2I, D], down [D, I]) of one expert of one layer, as stored."""
        import torch

        fused = f"model.layers.{layer}.mlp.experts."
        if fused + "gate_up_proj" in self.where:
            return tuple(
                self.where[fused + n].get_slice(fused + n)[expert] for n in ("gate_up_proj", "down_proj")
            )
        old = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        w1, w3, w2 = (
            self.where[old + n + ".weight"].get_tensor(old + n + ".weight") for n in ("w1", "w3", "w2")
        )
        return torch.cat([w1, w3]), w2


def _rows(gate_up, down, expert: int):
    return gate_up[expert], down[expert]


def check_cache_size(per_layer, experts_total) -> int:
    """The model's number of experts, if `per_layer` of them can be cached; else a ValueError saying why."""
    if not experts_total:
        raise ValueError("Fit.expert_cache needs a mixture-of-experts model, and this one has no experts")
    whole_number(
        "Fit.expert_cache: per_layer",
        per_layer,
        1,
        f" (experts kept per layer, of {experts_total})",
        maximum=experts_total,
    )
    return experts_total


def _give_slots(experts, per_layer: int, gate_up, down) -> None:  # C slots, empty, like [., 2I, D], [., D, I]
    experts.register_buffer("cached_gate_up", gate_up.new_empty((per_layer, *gate_up.shape[1:])))
    experts.register_buffer("cached_down", down.new_empty((per_layer, *down.shape[1:])))


@dataclass
class ExpertCache:
    """What `offload_experts` set (`model.load_record.cache`): `per_layer` of the `experts` of each layer in
    slots, the others in `tier`. `resize` changes the slots in place (11_offloading: one model, four sizes)."""

    per_layer: int
    experts: int
    tier: str
    model: weakref.ref
    why = property(
        lambda self: (
            f"expert cache: {self.per_layer} of {self.experts} experts per layer in memory, "
            f"the others read from {self.tier} when the router picks them"
        )
    )

    def resize(self, per_layer: int) -> ExpertCache:
        """`per_layer` empty slots in each layer, under the same policy (what they held is fetched again when
        used); the counts go on. A bad size is refused before anything changes."""
        check_cache_size(per_layer, self.experts)
        for m in self.model().modules():
            cache = _CACHES.get(m)
            if cache is not None:
                _give_slots(m, per_layer, m.cached_gate_up, m.cached_down)
                cache.settle()
                cache.ahead.clear()
                cache.policy = type(cache.policy)(per_layer)
        self.per_layer = per_layer  # `describe` reads the size afresh
        return self


def offload_experts(model, per_layer: int, tier: str | None = None) -> ExpertCache:
    """Keep `per_layer` experts of each layer in the model's memory, in slots filled on demand (least
    recently used evicted), the others in `tier`: "disk" (the model folder's safetensors, memory-mapped;
    the default on a CPU) or "ram" (CPU RAM; the default on a GPU). In place; returns what was set."""
    import torch

    experts_total = check_cache_size(per_layer, getattr(model.config, "num_local_experts", None))
    tier = tier or ("disk" if model.device.type == "cpu" else "ram")
    if tier not in TIERS:
        raise ValueError(f"tier={tier!r}: use 'disk' ({TIERS['disk']}) or 'ram' ({TIERS['ram']})")
    files = ExpertFiles(model.name_or_path) if tier == "disk" else None
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()  # [E, 2I, D], [E, D, I]
        if files is not None:
            fetch = functools.partial(files.fetch, i)
        else:
            slow = [w.to("cpu", copy=True) for w in (gate_up, down)]
            if torch.cuda.is_available() and model.device.type == "cuda":
                slow = [w.pin_memory() for w in slow]  # copies to the GPU overlap
            fetch = functools.partial(_rows, *slow)
        del experts.gate_up_proj, experts.down_proj
        _give_slots(experts, per_layer, gate_up, down)
        _CACHES[experts] = LayerCache(fetch, per_layer, tier)
    register_experts("expert_cache", cached_experts)
    model.set_experts_implementation("expert_cache")
    return ExpertCache(per_layer, experts_total, tier, weakref.ref(model))


def layer_caches(model) -> list:
    """Each layer's LayerCache, in layer order (none without an expert cache)."""
    return [_CACHES[m] for m in model.modules() if m in _CACHES]


class _Counted(Mapping):
    """An accelerate hook's weights map that counts the bytes it hands out, by where the loader kept them:
    its `state_dict` (RAM) or its memory-mapped files (disk). Everything else is the map's own."""

    def __init__(self, inner, count: Counter):
        self.inner, self.count = inner, count
        self.loader = getattr(inner, "dataset", inner)  # a PrefixedDataset over accelerate's loader

    def __getitem__(self, key):
        tensor = self.inner[key]
        where = (
            "from RAM" if getattr(self.inner, "prefix", "") + key in self.loader.state_dict else "from disk"
        )
        self.count[where] += tensor.nbytes
        return tensor

    def __contains__(self, key):  # a look, not a load
        return key in self.inner

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


def resident_bytes(model) -> float:
    """What a decode step reads in place: every weight held on the compute device (K of E of the
    experts, one row of an untied embedding), and K experts from each layer's cache slots."""
    c = model.config
    share = c.num_experts_per_tok / c.num_local_experts if getattr(c, "num_local_experts", None) else 1
    total = 0.0
    for name, p in model.named_parameters():  # tied weights come once
        if p.device.type == "meta":
            continue  # offloaded: counted as copied in
        size = p.nbytes
        if p.dim() == 3:
            size *= share
        elif name.endswith("embed_tokens.weight") and not c.tie_word_embeddings:
            size = p.shape[-1] * p.element_size()
        total += size
    for m in model.modules():
        if hasattr(m, "cached_gate_up"):
            total += c.num_experts_per_tok * sum(b[0].nbytes for b in (m.cached_gate_up, m.cached_down))
    return total


def storage_read_bytes() -> int | None:
    """Bytes this process has made the kernel read from storage (Linux /proc/self/io; None elsewhere):
    reads the OS page cache served are not in it."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class OffloadMeter:
    """`with OffloadMeter(model) as meter: generate(...)`, then `meter.per_token()`: bytes each tier
    gave each forward call (the prompt's, then one per new token), counted where they are read.
    Taught in 11_offloading."""

    def __init__(self, model):
        self.model, self.calls, self._undo = model, [], []

    def __enter__(self):
        count = Counter()
        for module in self.model.modules():  # count what accelerate's hooks copy in, where they read it
            hook = getattr(module, "_hf_hook", None)
            weights = getattr(hook, "weights_map", None)
            if hasattr(getattr(weights, "dataset", weights), "index"):  # an offloaded-weights loader
                hook.weights_map = _Counted(weights, count)
                self._undo.append(lambda hook=hook, weights=weights: setattr(hook, "weights_map", weights))
        caches, resident = layer_caches(self.model), resident_bytes(self.model)
        state = dict(
            before=sum((c.count for c in caches), Counter()), storage=storage_read_bytes()
        )  # counted so far

        def after_call(_module, args, kwargs, _output):
            now = count + sum((c.count for c in caches), Counter())
            storage = storage_read_bytes()
            ids = kwargs.get("input_ids", args[0] if args else None)
            row = dict(
                now - state["before"], resident=resident, decode=ids is not None and ids.shape[-1] == 1
            )
            if storage is not None:
                row["storage"] = storage - state["storage"]
            self.calls.append(row)
            state.update(before=now, storage=storage)

        self._undo.append(self.model.register_forward_hook(after_call, with_kwargs=True).remove)
        return self

    def __exit__(self, *exc):
        for undo in self._undo:
            undo()
        self._undo = []

    def per_token(self) -> dict:
        """The mean of each count over the decode steps (the calls with one new token each, batch 1);
        with a cache, its hit rate over those steps too."""
        steps = [row for row in self.calls if row["decode"]]
        if not steps:
            raise ValueError("no decode step was measured: generate at least 2 new tokens inside the `with`")
        keys = ({k for row in steps for k in row} | {"from RAM", "from disk"}) - {"decode"}
        mean = {k: sum(row.get(k, 0) for row in steps) / len(steps) for k in keys}
        if mean.get("hits", 0) + mean.get("misses", 0):
            mean["hit_rate"] = mean.get("hits", 0) / (mean.get("hits", 0) + mean.get("misses", 0))
        if "from slow tier" in mean:
            tier = next((c.tier for c in layer_caches(self.model)), "disk")
            mean["from " + ("disk" if tier == "disk" else "RAM")] = mean.pop("from slow tier")
        return mean


class Placement(list):
    """accelerate's placement of a loaded model, one row per device_map entry, in model order: {"module",
    "device", "parameters", "bytes"}; `by_device()` sums them, `draw()` shows them."""

    def by_device(self) -> list[dict]:
        """Parameters and bytes on each device ("disk" too). Taught in 01_loading."""
        rows: dict[str, dict] = {}
        for entry in self:
            row = rows.setdefault(entry["device"], {"device": entry["device"], "parameters": 0, "bytes": 0})
            row["parameters"] += entry["parameters"]
            row["bytes"] += entry["bytes"]
        return list(rows.values())

    def draw(self, title: str = "Where device_map put each module", ax=None):
        """One bar per module, its height the bytes it holds, coloured by where it lives.
        Taught in 11_offloading."""
        import matplotlib.pyplot as plt

        colours, rows = {"disk": "#c44e52", "cpu": "#4c72b0"}, self
        if ax is None:
            _, ax = plt.subplots(figsize=(10, 3))
        names = [r["module"].replace("model.layers.", "").replace("model.", "") for r in rows]
        names = [name.replace("embed_tokens", "embed") for name in names]
        heights = [r["bytes"] / 2**20 for r in rows]
        ax.bar(range(len(rows)), heights, color=[colours.get(r["device"], "#55a868") for r in rows])
        ax.set_xticks(range(len(rows)), names, rotation=90, fontsize=7)
        ax.set(ylabel="MiB", title=title, xlabel="module (decoder layers by number)")
        labels = {"cpu": "CPU RAM", "disk": "disk (offload_folder)"}
        for device in dict.fromkeys(r["device"] for r in rows):
            ax.bar(0, 0, color=colours.get(device, "#55a868"), label=labels.get(device, f"GPU {device}"))
        ax.legend()
        ax.figure.tight_layout()
        return ax


def placement(model) -> Placement:
    """Where a loaded model's weights live: accelerate's device_map, each entry's parameters and bytes, the device
    as torch names it ("cuda:0" for accelerate's 0) or "disk"; tied weights once. The one count of a loaded
    model's weights by where they live. Taught in 01_loading and 11_offloading."""
    where = getattr(model, "hf_device_map", None) or {"": str(model.device)}
    sizes, counts = Counter(), Counter()
    for entry, p in ((map_entry(where, name), p) for name, p in model.named_parameters()):
        sizes[entry] += p.nbytes
        counts[entry] += p.numel()
    devices = {k: f"cuda:{d}" if isinstance(d, int) else str(d) for k, d in where.items()}
    rows = [dict(module=k or "model", device=devices[k], parameters=counts[k], bytes=sizes[k]) for k in where]
    return Placement(row for row in rows if row["bytes"])
