import pytest
import torch

# Notebooks whose results depend on the dtype models load in: CI runs them again in the other
# CPU kind's dtype (MIXTRAL_DTYPE), with the tests marked `numerics`.
NUMERICS_NOTEBOOKS = {
    "07_inside_the_moe.ipynb",
}  # 07: its MoE layer by hand, to the dtype's rounding (06 loads float32 on every machine)


# `make test` and `make test-slow` run in two workers, each taking a file at a time (nbval runs a notebook's cells
# in one kernel). Two things keep both workers busy to the end: what is listed below goes first, the longest first
# (worker-seconds measured under each target; the rest follows in collection order), and each exercise answer is a
# unit of its own, since each runs in a fresh interpreter of its own. A test named alone (file::test) moves its
# file only where that test is selected. The order changes when tests finish, never what they check.
LONGEST_FIRST = [
    # make test-slow
    "tests/test_bench.py::test_bench_quick_runs_every_configuration",
    "notebooks/10_quantization.ipynb",
    "tests/test_workshop.py::test_bundle_installs_offline_and_runs_a_notebook",
    "notebooks/11_offloading.ipynb",
    "notebooks/08_performance.ipynb",
    "notebooks/09_serving.ipynb",
    "notebooks/06_sampling_lab.ipynb",
    "tests/test_solutions.py",
    # make test
    "tests/test_hub_checkpoint.py",
    "tests/test_serving.py",
    "notebooks/02_poem.ipynb",
    "notebooks/04_jokes.ipynb",
    "tests/test_standin.py",
    "notebooks/03_code.ipynb",
    "tests/test_browser.py",
]
EACH_ITEM_APART = {"tests/test_solutions.py"}


# `make test` is the blog's walkthrough and everything fast; `make test-slow` is the rest, marked `slow`: here our
# own notebooks (06 on) under nbval and their exercise answers; the two end-to-end checks carry the mark in their
# files. CI runs both (.ci/run), so nothing is checked less; `make test` alone is the quick check (times: README).
FIRST_SLOW_NOTEBOOK = 6


def is_slow_notebook(stem: str) -> bool:
    """A notebook's (or its answers') stem, `06_sampling_lab`: ours, from 06 on. `02-05_tasks` is the blog's."""
    number = stem.split("_", 1)[0]
    return number.isdigit() and int(number) >= FIRST_SLOW_NOTEBOOK


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in NUMERICS_NOTEBOOKS:
            item.add_marker(pytest.mark.numerics)
        stem = (
            item.path.stem
            if item.path.suffix == ".ipynb"
            else item.callspec.id
            if item.path.name == "test_solutions.py" and hasattr(item, "callspec")
            else ""
        )
        if is_slow_notebook(stem):  # a notebook of ours, or one of its exercise answers
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def first(item):
        return rank.get(item.nodeid, rank.get(item.nodeid.split("::", 1)[0], len(rank)))

    items.sort(key=first)  # stable: cells keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with each item of EACH_ITEM_APART a unit of its own, in collection order."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesAndApartItems(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return nodeid if file in EACH_ITEM_APART else file

    config.option.loadscopereorder = (
        False  # the order of pytest_collection_modifyitems, not the count of items
    )
    return FilesAndApartItems(config, log)


def _our_kernel_unavailable() -> str:
    from helpers.quant_kernel import kernel_unavailable

    return kernel_unavailable()


# tests of our C kernels (helpers/quant_kernel.c): skipped, with the reason, where they cannot be built
needs_our_kernel = pytest.mark.skipif(bool(_our_kernel_unavailable()), reason=_our_kernel_unavailable() or "")


def packs_bf16() -> bool:
    """Whether oneDNN packs a bf16 weight on this CPU: only where the CPU computes bf16 (AVX-512 or AMX); the
    fast path and kernel_bench then measure the other kernels."""
    from helpers.fastpath import packed_copy

    try:
        packed_copy(torch.zeros(16, 16, dtype=torch.bfloat16))
        return True
    except RuntimeError:
        return False


@pytest.fixture(scope="session")
def standin_tokenizer():
    from transformers import AutoTokenizer

    from helpers import ensure_standin

    return AutoTokenizer.from_pretrained(str(ensure_standin()))


def tiny_llama(vocab_size=49152, seed=0):
    """A dense Llama the shape of SmolLM2 in miniature (hidden 32, 2 layers, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_moe(seed=0, experts=4, k=2, intermediate=48):
    """A tiny random Mixtral (hidden 32, 2 layers, `experts` experts, top-`k`, FFN `intermediate`: 64 for int4's
    groups of 32), untied lm_head."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=k,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return MixtralForCausalLM(config).eval()


@pytest.fixture
def tiny_dense():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory):
    """A tiny random Mixtral with the 8x22B vocabulary, saved as safetensors."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=32768,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    path = tmp_path_factory.mktemp("tiny-mixtral")
    MixtralForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hub_mixtral_dir(tmp_path_factory):
    """A tiny random Mixtral laid out as the hub ships Mixtral-8x22B-Instruct-v0.1 (tests/hub_folder.py):
    the hub's config, bf16 per-expert weights in shards with their index, the tokenizer files."""
    from hub_folder import build_hub_folder

    return build_hub_folder(tmp_path_factory.mktemp("hub") / "Mixtral-8x22B-Instruct-v0.1")


def meta_count(model):
    """Every parameter of a model built on the meta device, by component name."""
    parts = {}
    for name, p in model.named_parameters():
        kind = (
            "embeddings"
            if "embed_tokens" in name
            else "attention"
            if "self_attn" in name
            else "experts"
            if ".experts." in name
            else "router"
            if ".mlp.gate." in name
            else "mlp"
            if ".mlp." in name
            else "norms"
            if "norm" in name
            else "lm_head"
        )
        parts[kind] = parts.get(kind, 0) + p.numel()
    return parts
