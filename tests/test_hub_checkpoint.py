"""The real model's path, as far as a CPU can test it: a tiny random Mixtral laid out as the hub ships
mistralai/Mixtral-8x22B-Instruct-v0.1 (tests/hub_folder.py: the hub's config, bf16 weights under the
per-expert names in shards with their index, the tokenizer files), named by $MIXTRAL_MODEL. The blog's call
and load_pipeline load it, the walkthrough runs on it, the ids it is fed are mistral-common's, the planner
counts its parameters, and quantized, offloaded and expert-cached loading read its layout."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nbformat
import pytest
import torch
from conftest import meta_count
from hub_folder import CHAT_TEMPLATE, as_transformers_names, stored_tensors

from helpers import (
    BLOG_SAMPLING,
    TASKS,
    blog_prompt,
    blog_readings,
    describe,
    generate,
    load_pipeline,
    model_path,
    parameter_count,
)
from helpers.data import MODEL_ENV
from helpers.fitting import Fit
from helpers.loading import check_fits, weight_bytes
from helpers.offload import ExpertFiles, OffloadMeter, layer_caches, placement
from helpers.prompts import chat_ids, reference_ids

ROOT = Path(__file__).resolve().parent.parent


def go_offline(monkeypatch):
    """Nothing here may reach the hub: this process (huggingface_hub read the variable when imported), its children."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    go_offline(monkeypatch)


@pytest.fixture(scope="module")
def stored(hub_mixtral_dir):
    return stored_tensors(hub_mixtral_dir)


@pytest.fixture(scope="module")
def loaded(hub_mixtral_dir):
    """`load_pipeline()` with $MIXTRAL_MODEL naming the folder, as a notebook calls it."""
    with pytest.MonkeyPatch.context() as env:
        go_offline(env)
        env.setenv(MODEL_ENV, str(hub_mixtral_dir))
        yield load_pipeline()


def straddling_layer(folder: Path) -> int:
    """A decoder layer whose experts lie in two shards."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    files = {}
    for name, file in weight_map.items():
        if ".experts." in name:
            files.setdefault(int(name.split(".")[2]), set()).add(file)
    return next(layer for layer, shards in files.items() if len(shards) > 1)


# ---------------------------------------------------------------- the folder is the hub's layout
def test_the_folder_is_laid_out_as_the_hub_ships_it(hub_mixtral_dir, stored):
    config = json.loads((hub_mixtral_dir / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["torch_dtype"], config["rope_theta"], config["sliding_window"]) == ("bfloat16", 1e6, None)
    assert (config["vocab_size"], config["num_local_experts"], config["num_experts_per_tok"]) == (32768, 8, 2)
    index = json.loads((hub_mixtral_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in hub_mixtral_dir.glob("*.safetensors")) == shards
    assert set(stored) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in stored.values())
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert {n.split(".")[-2] for n in stored if ".experts." in n} == {"w1", "w2", "w3"}
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n in stored)  # no fused experts
    assert straddling_layer(hub_mixtral_dir) in range(
        config["num_hidden_layers"]
    )  # the cache test crosses a shard
    for name in (
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        assert (hub_mixtral_dir / name).is_file(), name


# ---------------------------------------------------------------- a) the blog's call, and load_pipeline
def test_the_blogs_call_loads_every_stored_tensor_where_it_belongs(hub_mixtral_dir, stored, monkeypatch):
    from transformers import pipeline

    monkeypatch.setenv(MODEL_ENV, str(hub_mixtral_dir))
    pipe = pipeline("text-generation", model=model_path(), dtype=torch.bfloat16, device_map="auto")
    state = pipe.model.state_dict()
    expected = as_transformers_names(stored, experts=8)
    assert set(state) == set(expected)  # nothing left out, nothing initialised at random
    different = [name for name, t in expected.items() if not torch.equal(state[name], t)]
    assert not different, different[:5]
    assert pipe.model.dtype == torch.bfloat16 and pipe.tokenizer.chat_template == CHAT_TEMPLATE
    prompt_template = blog_prompt(TASKS["jokes"]["prompt"])  # the blog's cell, with fewer tokens
    fed = pipe.preprocess(prompt_template)["input_ids"][0].tolist()
    assert (
        fed == blog_readings(TASKS["jokes"]["prompt"])["(b) today's pipeline"]
    )  # the folder's files, as 01 shows them
    torch.manual_seed(0)
    outputs = pipe(prompt_template, max_new_tokens=8, **BLOG_SAMPLING)
    text = outputs[0]["generated_text"]
    assert text.startswith(prompt_template) and len(text) > len(prompt_template)


def test_load_pipeline_loads_it_from_the_environment(hub_mixtral_dir, loaded):
    assert Path(loaded.model.name_or_path) == hub_mixtral_dir
    assert describe(loaded).startswith(f"local: {hub_mixtral_dir.name} (MixtralForCausalLM, ")
    answer = generate(loaded, TASKS["jokes"]["prompt"], max_new_tokens=8, seed=0)
    assert 0 < answer.new_tokens <= 8 and answer.token_ids


# ---------------------------------------------------------------- c) the ids the model is fed
@pytest.mark.parametrize("task", TASKS)
def test_the_ids_fed_to_the_model_are_mistral_commons(loaded, hub_mixtral_dir, task):
    """What load_pipeline feeds the model (caught at its first forward), and what the folder's own tokenizer
    files make of the prompt with their chat template (the blog's pipeline's tokenizer), are the reference's."""
    from transformers import AutoTokenizer

    prompt, fed = TASKS[task]["prompt"], []
    hook = loaded.model.register_forward_pre_hook(
        lambda _m, args, kwargs: fed.append(kwargs.get("input_ids", args[0] if args else None)),
        with_kwargs=True,
    )
    try:
        generate(loaded, prompt, max_new_tokens=1, seed=0)
    finally:
        hook.remove()
    reference = reference_ids(prompt, 32768)
    assert fed[0].tolist() == [reference]
    assert chat_ids(AutoTokenizer.from_pretrained(hub_mixtral_dir), prompt) == reference


def test_the_folders_chat_template_matches_the_reference_on_longer_chats(hub_mixtral_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hub_mixtral_dir)
    chat = [
        {"role": "user", "content": "Write a poem about silicon."},
        {"role": "assistant", "content": "Silicon dreams in crystal light."},
        {"role": "user", "content": "Now make it rhyme."},
    ]
    for system in (None, "Be brief."):
        assert chat_ids(tokenizer, chat, system) == reference_ids(chat, 32768, system)


# ---------------------------------------------------------------- d) the planner's counts
def test_the_planners_counts_equal_the_model_transformers_builds(hub_mixtral_dir, stored):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hub_mixtral_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counted = parameter_count(config)
    assert {k: v for k, v in counted.items() if k not in ("total", "active")} == meta_count(model)
    assert (
        counted["total"]
        == sum(p.numel() for p in model.parameters())
        == sum(t.numel() for t in stored.values())
    )
    index = json.loads((hub_mixtral_dir / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == counted["total"] * 2  # bf16


# ---------------------------------------------------------------- e) the three ways to fit
def test_int8_weights_load_and_generate(hub_mixtral_dir):
    pipe = load_pipeline(str(hub_mixtral_dir), dtype=torch.float32, fit=Fit.quantized("int8"))
    assert "int8 weights" in describe(pipe)
    assert not any(".experts." in n for n, _ in pipe.model.named_parameters())  # the experts were replaced
    assert 0 < generate(pipe, TASKS["jokes"]["prompt"], max_new_tokens=6, seed=0).new_tokens <= 6


def test_accelerates_budget_puts_part_on_disk_and_generates_the_same(hub_mixtral_dir, tmp_path):
    reference = load_pipeline(str(hub_mixtral_dir), dtype=torch.float32, fast=False)
    # of 19.3 MB in float32: the embeddings and a layer fit, with room kept for the largest module (lm_head)
    pipe = load_pipeline(
        str(hub_mixtral_dir),
        dtype=torch.float32,
        fast=False,
        fit=Fit.budget({"cpu": 18_000_000}, folder=tmp_path / "offload"),
    )
    rows = placement(pipe.model)
    assert {r["device"] for r in rows} == {"cpu", "disk"} and "part offloaded to disk" in describe(pipe)
    ids = torch.tensor([reference_ids(TASKS["jokes"]["prompt"], 32768)])
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
    with OffloadMeter(pipe.model) as meter, torch.no_grad():
        out = pipe.model.generate(ids, **greedy)
        assert torch.equal(out, reference.model.generate(ids, **greedy))
    assert meter.per_token()["from disk"] == sum(r["bytes"] for r in rows if r["device"] == "disk")


def test_the_expert_cache_reads_the_per_expert_shards(hub_mixtral_dir, stored):
    layer = straddling_layer(hub_mixtral_dir)
    files = ExpertFiles(hub_mixtral_dir)
    for expert in range(8):
        gate_up, down = files.fetch(layer, expert)
        name = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        assert torch.equal(gate_up, torch.cat([stored[name + "w1.weight"], stored[name + "w3.weight"]]))
        assert torch.equal(down, stored[name + "w2.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_expert_cache_computes_what_the_model_in_memory_computes(hub_mixtral_dir, dtype):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(hub_mixtral_dir, dtype=dtype).eval()
    reference.set_experts_implementation("eager")  # the loop the cache follows, product for product
    pipe = load_pipeline(str(hub_mixtral_dir), dtype=dtype, fit=Fit.expert_cache(2))
    assert "2 of 8 experts cached per layer" in describe(pipe)
    ids = torch.tensor([reference_ids(TASKS["translation"]["prompt"], 32768)])
    greedy = dict(
        max_new_tokens=8, do_sample=False, pad_token_id=2, output_scores=True, return_dict_in_generate=True
    )
    with OffloadMeter(pipe.model) as meter, torch.no_grad():
        assert torch.equal(pipe.model(ids).logits, reference(ids).logits)  # a prompt pass, with evictions
        got, expected = pipe.model.generate(ids, **greedy), reference.generate(ids, **greedy)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores))
    counts = sum((c.count for c in layer_caches(pipe.model)), Counter())
    one_expert = 3 * 64 * 128 * 2  # w1, w3, w2 of hidden 64 x FFN 128, bf16 as stored
    assert counts["misses"] > 0 and counts["from slow tier"] == counts["misses"] * one_expert
    assert meter.per_token()["from disk"] == pytest.approx(meter.per_token()["misses"] * one_expert)


# ---------------------------------------------------------------- the fit check counts what loads
def test_a_stray_safetensors_file_is_not_counted(hub_mixtral_dir, tmp_path):
    """A folder may hold safetensors the index does not name (Mistral's repositories carry their own
    consolidated format beside the transformers shards): the fit check counts only what loads."""
    folder = tmp_path / "with-stray"
    folder.mkdir()
    for f in hub_mixtral_dir.iterdir():
        (folder / f.name).symlink_to(f)
    shutil.copyfile(hub_mixtral_dir / "model-00001-of-00005.safetensors", folder / "consolidated.safetensors")
    named = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()
    on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert weight_bytes(folder) == sum((folder / f).stat().st_size for f in set(named)) < on_disk
    assert weight_bytes(folder) == weight_bytes(hub_mixtral_dir)
    assert check_fits(folder, torch.float32) == check_fits(hub_mixtral_dir, torch.float32)


# ---------------------------------------------------------------- b) the walkthrough on it
@pytest.mark.walkthrough  # five fresh kernels, their imports most of its 80-100 s; in `make test`, `-m walkthrough` alone
@pytest.mark.numerics  # it loads in the machine's dtype, and what 04 asserts of the samples depends on it
def test_the_walkthrough_runs_on_the_hub_layout(hub_mixtral_dir, tmp_path, monkeypatch):
    """`python -m workshop walkthrough` with $MIXTRAL_MODEL naming the folder: 01-05 run without an error and
    each task prints an answer (that random model's own). 00_setup reads no model setting (it plans the known
    models and sizes the stand-in): nbval runs it, and it is left out here to save a kernel's start."""
    setup = nbformat.read(ROOT / "notebooks" / "00_setup.ipynb", as_version=4)
    code = "".join(c.source for c in setup.cells if c.cell_type == "code")
    assert not any(
        word in code for word in ("model_path(", "load_pipeline(", "pipeline(", MODEL_ENV, "environ")
    )
    monkeypatch.setenv(MODEL_ENV, str(hub_mixtral_dir))
    build = tmp_path / "build"
    done = subprocess.run(
        [sys.executable, "-m", "workshop", "walkthrough", f"--build={build}", "01", "02", "03", "04", "05"],
        cwd=ROOT,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = {
        name: [
            o
            for c in nbformat.read(build / f"{name}.ipynb", as_version=4).cells
            if c.cell_type == "code"
            for o in c.outputs
        ]
        for name in ("01_loading", "02_poem", "03_code", "04_jokes", "05_translation")
    }
    failed = [name for name, out in outputs.items() if any(o.output_type == "error" for o in out)]
    assert not failed, failed
    assert str(hub_mixtral_dir) in json.dumps(outputs["01_loading"])  # model_path(): this folder
    for task in ("02_poem", "03_code", "04_jokes", "05_translation"):
        printed = "".join(o.get("text", "") for o in outputs[task] if o.output_type == "stream")
        assert f"local: {hub_mixtral_dir.name} (MixtralForCausalLM, " in printed, (
            task
        )  # describe(pipe): this model
        text, stats = (
            done.stdout.split(f"===== {task} =====\n", 1)[1].split("\n===== ", 1)[0].rsplit("\n--- ", 1)
        )
        assert text.strip() and int(stats.split()[0]) > 0, (
            task
        )  # the answer's text, then its count of new tokens
