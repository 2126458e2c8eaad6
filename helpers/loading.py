"""Which model runs, whether it fits, and loading it the way the blog does.

`model_path()` reads $MIXTRAL_MODEL (a hub id or a local folder); without it, the stand-in.
`load_local()` is the blog's `pipeline("text-generation", ...)` call, after three checks
that turn deep library errors into plain ones: are the weights on disk, do they fit in this
machine's memory (or in the way `fit=` says), and which tokenizer gives the reference prompt ids.
What it loaded is `model.load_record` (fitting.LoadRecord).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .data import DTYPE_BYTES, KNOWN_MODELS, MODEL_ENV, REFERENCE_TOKENIZERS, RESERVED, TASKS, GiB
from .fastpath import apply_recipe, choose_step, fast_recipe, measured_dtype
from .files import cache_root, weight_files
from .fitting import Budget, CachedExperts, LoadRecord, Quantized, check_fit
from .hardware import dtype_name, forced_dtype, gpu_dtype, memory_budget
from .offload import check_cache_size, offload_experts
from .prompts import chat_ids, reference_tokenizer
from .quantize import quantize_model
from .sizing import fits, parameter_count, usable
from .standin import ensure_standin

STANDIN = "stand-in"


class ModelNotAvailable(RuntimeError):
    """The model's weights are not on this machine."""


class ModelTooLarge(MemoryError):
    """The model would not fit in this machine's memory."""


def model_path() -> str:
    """The blog's `model_path`: $MIXTRAL_MODEL if set, else the stand-in's local folder.
    Taught in 01_loading."""
    chosen = os.environ.get(MODEL_ENV, "").strip()
    if chosen and chosen != STANDIN:
        return chosen
    return str(ensure_standin())


def resolve_local(name: str) -> Path:
    """The local folder that holds `name` (a folder, or a hub id already downloaded).

    Never touches the network: a hub id is looked up in the local Hugging Face cache only."""
    path = Path(name).expanduser()
    if path.is_dir():
        read_config(path)
        _check_weights_present(path, name)
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotAvailable(
            f"{MODEL_ENV}={name!r} is neither an existing folder nor a hub id (owner/name)."
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        size = (
            f"{parameter_count(name)['total'] * 2 / GiB:.0f} GiB in bf16"
            if name in KNOWN_MODELS
            else "the size of its safetensors files"
        )
        raise ModelNotAvailable(
            f"The weights of {name} are not on this machine (looked in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE}) and these notebooks never download them. On a machine with "
            f"network access run:\n    hf download {name} --local-dir /data/{name.split('/')[-1]}\n"
            f"(about {size}), copy the folder here, then set "
            f"{MODEL_ENV}=/data/{name.split('/')[-1]}. Leave {MODEL_ENV} unset to use the stand-in."
        ) from None
    read_config(path)
    _check_weights_present(path, name)
    return path


def pick_dtype(name: str | None = None) -> tuple:
    """The dtype the model `name` (default: `model_path()`) loads in, and why: $MIXTRAL_DTYPE when set; on a GPU,
    the GPU's (bf16, or float16 without it); on a CPU, the one measured to decode this model's shapes fastest
    here (fastpath.measured_dtype, once per machine). Returns (torch dtype, reason). Taught in 00_setup."""
    return _dtype(lambda: read_config(resolve_local(name or model_path())))


def _dtype(config) -> tuple:
    """pick_dtype's rule; `config()` is read only where the dtype is measured (a CPU, nothing forced)."""
    return forced_dtype() or gpu_dtype() or measured_dtype(config())


def read_config(path) -> dict:
    """A model folder's config.json as a dict. A missing file, or one that is not a JSON object
    (a damaged or partial download), is refused with what to do."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotAvailable(f"{path} is a folder but holds no config.json: it is not a model folder.")
    try:
        config = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelNotAvailable(
            f"{path / 'config.json'} is not valid JSON ({err}): the download is damaged. "
            f"Download the model again (`hf download`)."
        ) from None
    if not isinstance(config, dict):
        raise ModelNotAvailable(
            f"{path / 'config.json'} holds a {type(config).__name__}, not a model config: "
            f"the download is damaged. Download the model again (`hf download`)."
        )
    return config


def _check_weights_present(path: Path, name: str) -> None:
    shards = weight_files(path)
    if not shards:
        raise ModelNotAvailable(f"{name}: no *.safetensors weights in {path} (only safetensors are loaded).")
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise ModelNotAvailable(
            f"{name}: {len(missing)} of {len(shards)} weight shards are missing in {path} "
            f"(first: {missing[0]}); the download is incomplete. Finish it with `hf download`."
        )


def weight_bytes(path: Path) -> int:
    """Bytes of the weights a model folder loads: the files its index names (`weight_files`), no stray file beside them.
    Taught in 00_setup."""
    return sum((Path(path) / name).stat().st_size for name in weight_files(path))


def stored_dtype_bytes(path: Path) -> float:
    config = read_config(path)
    return DTYPE_BYTES.get(config.get("dtype") or config.get("torch_dtype") or "float32", 4)


def check_fits(path, dtype) -> int:
    """Bytes the weights need in `dtype`; raises ModelTooLarge, with the numbers, if they exceed
    what device_map="auto" can use here (free GPU memory plus available RAM, `RESERVED` kept free).
    Taught in 01_loading."""
    path = Path(path)
    need = int(weight_bytes(path) / stored_dtype_bytes(path) * dtype.itemsize)
    budget = memory_budget()
    if not fits(need, budget["total"]):
        raise ModelTooLarge(
            f"{path.name} needs about {need / GiB:.1f} GiB in {dtype_name(dtype)}, but this machine "
            f"has {usable(budget['total']) / GiB:.1f} GiB usable ({budget['gpu'] / GiB:.1f} GiB free on GPUs and "
            f"{budget['cpu'] / GiB:.1f} GiB of available RAM, {RESERVED:.0%} kept free). Use a machine with more GPU "
            f"memory (see 00_setup for what fits where), or leave {MODEL_ENV} unset for the stand-in."
        )
    return need


def load_local(
    name: str | None = None,
    dtype=None,
    fit=None,
    fast: bool = True,
    device_map="auto",
    compiled: bool = False,
):
    """The blog's `pipeline("text-generation", model=..., dtype=..., device_map="auto")`, after
    checking that the weights are here and fit, with the reference tokenizer for a Mixtral.

    name: a local folder or a downloaded hub id (default: `model_path()`).
    dtype: None picks what this machine decodes fastest, or what $MIXTRAL_DTYPE says.
    fit: None (the weights as they are) or one of `Fit`'s values: `Fit.quantized("int8")`,
    `Fit.budget({"cpu": "8GiB"})`, `Fit.expert_cache(2)` (fitting.py; 10_quantization, 11_offloading).
    fast: switch the loaded model to this hardware's fastest correct settings (fastpath.fast_recipe,
    shown by `describe`); False keeps the blog's plain pipeline.
    compiled: the fast path races one token's step written layer by layer by our C++ layer operator (where our kernels
    run) against the lean step at load, and keeps it for one sequence where its step takes under 90% of the lean
    step's (fastpath.choose_step; 08_performance); True races torch.compile's graph of the layers too
    (decode.graph_step; `describe` says how long compiling took).
    What was loaded, and how, is `pipe.model.load_record`."""
    import torch
    from transformers import pipeline

    check_fit(fit)
    if compiled and not fast:
        raise ValueError("compiled=True compiles the fast path's step: leave fast=True, or compiled=False")
    if isinstance(fit, Quantized) and torch.cuda.is_available():
        raise ValueError(
            f"Fit.quantized({fit.scheme!r}) uses CPU kernels, and the model would run on a GPU: "
            f"on GPUs load with transformers' quantization_config instead (10_quantization shows how)"
        )
    path = resolve_local(name or model_path())
    config = read_config(path)
    record = (
        LoadRecord(*_dtype(lambda: config), fit)  # the config read above, not read again
        if dtype is None
        else LoadRecord(dtype, "chosen by the caller", fit)
    )
    if isinstance(fit, CachedExperts):
        check_cache_size(fit.per_layer, config.get("num_local_experts"))
    extra = offload_arguments(fit, path, record) if isinstance(fit, Budget) else {}
    if not isinstance(fit, Budget):  # what passes a budget goes to disk: nothing to check
        check_fits(path, record.dtype)
    tokenizer = None
    if config.get("model_type") == "mixtral" and config.get("vocab_size") in REFERENCE_TOKENIZERS:
        tokenizer = reference_tokenizer(config["vocab_size"])
    try:
        pipe = pipeline(
            "text-generation",
            model=str(path),
            tokenizer=tokenizer,
            dtype=record.dtype,
            device_map=device_map,
            model_kwargs=extra,
        )
    except BaseException:
        if record.folder is not None:  # nothing left behind by a load that failed
            record.folder.cleanup()
        raise
    model = pipe.model
    if isinstance(fit, Quantized):
        record.quantized = quantize_model(model, fit.scheme)
    if isinstance(fit, CachedExperts):
        record.cache = offload_experts(model, fit.per_layer, fit.tier)
    if fast:
        replaced = "quantized" if isinstance(fit, Quantized) else "expert_cache" if record.cache else None
        recipe = fast_recipe(
            record.dtype, record.dtype_reason, model.device.type, replaced, isinstance(fit, Budget)
        )
        record.recipe = apply_recipe(model, recipe)
        tokenizer, poem = pipe.tokenizer, TASKS["poem"]["prompt"]
        if tokenizer is not None:  # raced on the poem's prompt, as a chat where the tokenizer has one
            chat = getattr(tokenizer, "chat_template", None)
            prompt = chat_ids(tokenizer, poem) if chat else tokenizer(poem)["input_ids"]
            record.recipe.step = choose_step(model, prompt, compiled=compiled)  # {}: nothing to race
    model.load_record = record
    return pipe


def offload_arguments(budget: Budget, path: Path, record: LoadRecord) -> dict:
    """accelerate's max_memory and offload_folder for `budget`: its folder, or a temporary one under the cache
    that `record` (so the model) owns, on a disk with room for the whole model."""
    temporary = budget.folder is None
    folder = cache_root() / "offload" if temporary else Path(budget.folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    free, need = shutil.disk_usage(folder).free, weight_bytes(path)
    if not fits(need, free):
        raise ModelTooLarge(
            f"the offload folder {folder} has {free / GiB:.1f} GiB free and the model's weights take "
            f"{need / GiB:.1f} GiB: choose a folder on a disk with more room, "
            f"Fit.budget(..., folder=...)"
        )
    if temporary:  # removed when the model goes (a killed process leaves it: the cache's offload/ folder)
        record.folder = tempfile.TemporaryDirectory(prefix="offload-", dir=folder)
        folder = Path(record.folder.name)
    return dict(max_memory=budget.max_memory, offload_folder=str(folder))
