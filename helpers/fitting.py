"""How a model is made to fit, said once, and what the loader loaded, said once.

`load_pipeline(fit=...)` takes one of three small values, or None for the blog's weights as they are:
`Fit.quantized("int8")` (fewer bits per weight, 10_quantization), `Fit.budget({"cpu": "8GiB"})`
(accelerate keeps what goes past the budgets on disk, 11_offloading) or `Fit.expert_cache(2)` (a few
experts of each layer in memory, the others fetched when the router picks them, 11_offloading).

`LoadRecord` is what the loader says it did: the dtype and why, the fit, what quantizing measured,
the expert cache, the fast path's recipe. It is the one attribute the package sets on a transformers
object (`model.load_record`); `describe`, the benchmark and the notebooks read it there.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from .data import GiB, whole_number

GROUP = 32  # int4: one scale and one zero per GROUP inputs
WEIGHT_SCHEMES = {
    "int8": "8-bit weights, a scale per output channel",
    "int4": f"4-bit weights, a scale and a zero per {GROUP} inputs",
}
# each scheme's kernels (quantize.choose_kernel picks one at load), as `describe` names them
QUANT_KERNELS = {
    "torch": {"int8": "torch's _weight_int8pack_mm", "int4": "torch's _weight_int4pack_mm_for_cpu"},
    "ours": {"int8": "our quant_kernel.c", "int4": "our quant_kernel.c"},
}
TIERS = {"disk": "the model folder's safetensors, memory-mapped", "ram": "CPU RAM"}


@dataclass(frozen=True)
class Quantized:
    """Weight-only quantization on the CPU: `scheme` is "int8" or "int4" (WEIGHT_SCHEMES)."""

    scheme: str

    def __post_init__(self):
        if self.scheme not in WEIGHT_SCHEMES:
            raise ValueError(
                f"Fit.quantized({self.scheme!r}): not a weight scheme here; use "
                f"{' or '.join(f'Fit.quantized({s!r})' for s in WEIGHT_SCHEMES)}"
            )


@dataclass(frozen=True)
class Budget:
    """accelerate's budget per device ({0: "20GiB", "cpu": "64GiB"}); what goes past it is kept in `folder`
    (None: a temporary folder that the loaded model owns and that goes with it)."""

    max_memory: dict
    folder: str | Path | None = None

    def __post_init__(self):
        if not isinstance(self.max_memory, dict) or not self.max_memory:
            raise ValueError(
                f"Fit.budget({self.max_memory!r}): give a budget per device, "
                f"e.g. Fit.budget({{'cpu': '1GiB'}}) or Fit.budget({{0: '20GiB', 'cpu': '64GiB'}})"
            )


@dataclass(frozen=True)
class CachedExperts:
    """`per_layer` experts of each layer kept in the model's memory, the others read from `tier`:
    "disk" (the default on a CPU) or "ram" (the default on a GPU)."""

    per_layer: int
    tier: str | None = None

    def __post_init__(self):
        whole_number("Fit.expert_cache: per_layer", self.per_layer, 1)
        if self.tier is not None and self.tier not in TIERS:
            raise ValueError(
                f"Fit.expert_cache(tier={self.tier!r}): use 'disk' ({TIERS['disk']}) or 'ram' ({TIERS['ram']})"
            )


class Fit:
    """The ways to make a model fit where it would not, one at a time: `load_pipeline(fit=Fit.quantized("int8"))`,
    `fit=Fit.budget({"cpu": "8GiB"})` or `fit=Fit.expert_cache(2)`. Taught in 10_quantization and 11_offloading."""

    quantized = Quantized
    budget = Budget
    expert_cache = CachedExperts


def check_fit(fit) -> None:
    """A ValueError that says what to use, unless `fit` is None or one of Fit's values."""
    if fit is not None and not isinstance(fit, (Quantized, Budget, CachedExperts)):
        raise ValueError(
            f"fit={fit!r} is not a way to fit a model: use None (the weights as they are), "
            f"Fit.quantized('int8'), Fit.budget({{'cpu': '8GiB'}}) or Fit.expert_cache(2)"
        )


@dataclass
class LoadRecord:
    """What `load_pipeline` loaded, as `model.load_record`."""

    dtype: object  # the torch dtype the weights were loaded in
    dtype_reason: str  # why this dtype: this machine's measured choice, $MIXTRAL_DTYPE, or the caller
    fit: Quantized | Budget | CachedExperts | None = None
    quantized: dict | None = None  # quantize_model's report: scheme, parameters, bytes before and after
    cache: object = None  # offload.ExpertCache: the slots of each layer, resizable
    recipe: object = None  # fastpath.Recipe when the fast path is on, else None (the blog's plain pipeline)
    folder: tempfile.TemporaryDirectory | None = None  # a Budget's temporary folder: removed with the model

    @property
    def bytes_per_parameter(self) -> float:
        """What one weight costs in memory: the dtype's size, or what quantizing measured (scales included)."""
        if self.quantized:
            return self.quantized["bytes_after"] / self.quantized["parameters"]
        return self.dtype.itemsize

    def weights(self) -> str:
        """A few words on how the weights are held, for `describe`'s line ("" for the blog's weights)."""
        if self.quantized:
            return f", {self.quantized['scheme']} weights"
        if self.cache is not None:
            return f", {self.cache.per_layer} of {self.cache.experts} experts cached per layer"
        return ""

    def fit_reason(self) -> str | None:
        """Why the experts run as they do, when the fit replaced them (the cache's follows its size)."""
        if self.quantized:
            q = self.quantized
            return (
                f"{q['scheme']}: {WEIGHT_SCHEMES[q['scheme']]}, experts and lm_head included "
                f"({q['bytes_before'] / GiB:.2f} -> {q['bytes_after'] / GiB:.2f} GiB)"
                + f"; multiplied by {QUANT_KERNELS[q['kernel']][q['scheme']]} ({q['why']})"
            )
        return self.cache.why if self.cache is not None else None
