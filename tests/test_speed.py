"""The ceiling's arithmetic, the fast path's equivalence to transformers' own paths, the timing
helpers, and the benchmark run end to end in its quick mode (no timing assertions)."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import describe, load_pipeline
from helpers.speed import (DECODE_TOKENS, Recipe, TokenClock, apply_recipe, ceiling, choose_layouts,
                           column_major, decode_bytes, expected_distinct_experts, fast_recipe, matvec_ceiling,
                           register_experts, timed_generate)

ROOT = Path(__file__).resolve().parent.parent


def tiny_moe(seed=0, experts=4, k=2):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                           num_experts_per_tok=k, max_position_embeddings=128, tie_word_embeddings=False)
    return MixtralForCausalLM(config).eval()


def numel(model, pick) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if pick(name))


# ---------------------------------------------------------------- bytes per token, counted from the model itself
def test_decode_bytes_match_the_models_own_tensors():
    model = tiny_moe()
    c = model.config
    parts = decode_bytes(c, dtype_bytes=4)["parts"]
    assert parts["attention"] == 4 * numel(model, lambda n: "self_attn" in n)
    assert parts["router"] == 4 * numel(model, lambda n: ".mlp.gate." in n)
    assert parts["experts"] == 4 * numel(model, lambda n: ".experts." in n) * c.num_experts_per_tok / c.num_local_experts
    assert parts["lm_head"] == 4 * numel(model, lambda n: "lm_head" in n)
    assert parts["norms"] == 4 * numel(model, lambda n: "norm" in n)
    assert parts["embedding rows"] == 4 * c.hidden_size
    assert parts["kv_cache"] == 0


def test_kv_cache_bytes_match_a_real_cache():
    from transformers import DynamicCache

    model = tiny_moe()
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, 512, (3, 17)), past_key_values=cache, use_cache=True)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert decode_bytes(model.config, 4, context=17, batch=3)["parts"]["kv_cache"] == held


def test_dense_models_read_their_whole_mlp(tiny_dense):
    parts = decode_bytes(tiny_dense.config, dtype_bytes=2)["parts"]
    assert parts["mlp"] == 2 * numel(tiny_dense, lambda n: ".mlp." in n)
    assert "experts" not in parts and "router" not in parts


def test_bytes_per_token_divide_the_step_over_the_batch():
    config = tiny_moe().config
    one, four = decode_bytes(config, 2, batch=1), decode_bytes(config, 2, batch=4, experts_read=4)
    assert four["per_token"] == four["per_step"] / 4
    assert four["per_token"] < one["per_token"]  # the weights are shared by the batch


def test_expected_distinct_experts_is_exact():
    assert expected_distinct_experts(8, 2, 1) == 2
    # every way two tokens can each pick 2 of 4 experts: the mean size of the union
    pairs = list(itertools.combinations(range(4), 2))
    mean = sum(len(set(a) | set(b)) for a in pairs for b in pairs) / len(pairs) ** 2
    assert expected_distinct_experts(4, 2, 2) == pytest.approx(mean)
    assert expected_distinct_experts(8, 2, 1000) == pytest.approx(8)


def test_mixtral_8x22b_reads_a_quarter_of_its_experts_per_token():
    from helpers import mixtral_config, parameter_count

    config = mixtral_config("mistralai/Mixtral-8x22B-Instruct-v0.1")
    parts = decode_bytes(config, dtype_bytes=2)["parts"]
    active = parameter_count(config)["active"]
    weights = sum(v for k, v in parts.items() if k not in ("kv_cache", "embedding rows"))
    assert weights == pytest.approx(2 * (active - config.vocab_size * config.hidden_size), rel=1e-9)


def test_ceiling_arithmetic():
    assert ceiling(100e9, 1e9) == 100
    assert ceiling(4.8e12, 2 * 39.16e9) == pytest.approx(61.3, abs=0.1)
    with pytest.raises(ValueError, match="positive"):
        ceiling(0, 1)
    with pytest.raises(ValueError, match="context"):
        decode_bytes(tiny_moe().config, 2, context=-1)


def test_matvec_ceiling_adds_the_time_of_each_kind():
    layouts = {"q_proj": (10.0, 5.0, "row-major", 1e9), "experts.gate_up_proj": (5.0, 20.0, "column-major", 4e9)}
    # 1 GB at 10 GB/s + a quarter of 4 GB at 20 GB/s = 0.15 s per token
    assert matvec_ceiling(layouts, experts_share=0.25) == pytest.approx(1 / 0.15)


# ---------------------------------------------------------------- the fast path gives the same answers
@pytest.mark.numerics
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("tokens", [1, 2, DECODE_TOKENS + 3])
def test_per_token_experts_equal_eager(tokens, dtype, tolerance):
    register_experts()
    model = tiny_moe(seed=1).to(dtype)
    ids = torch.randint(0, 512, (1, tokens))
    with torch.no_grad():
        model.set_experts_implementation("eager")
        expected = model(ids).logits
        model.set_experts_implementation("per_token")
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_column_major_keeps_shape_and_values():
    w = torch.randn(6, 4)
    c = column_major(w)
    assert c.shape == w.shape and torch.equal(c, w) and c.t().is_contiguous() and not c.is_contiguous()


@pytest.mark.numerics
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["float32", "bfloat16"])
def test_apply_recipe_keeps_the_answer(dtype, tolerance):
    model = tiny_moe(seed=2).to(dtype)
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    recipe = apply_recipe(model, Recipe("cpu", dtype, "per_token", relayout=True, reasons=["test"]))
    assert model.config._experts_implementation == "per_token" and model.recipe is recipe
    assert set(recipe.layouts) >= {"q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj",
                                   "experts.down_proj", "lm_head"}
    assert all(v[2] in ("row-major", "column-major") and v[3] > 0 for v in recipe.layouts.values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=tolerance, atol=tolerance)
        if dtype == torch.float32:  # bf16 rounds sums taken in another order differently: near-ties may flip
            assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0), greedy)


def test_choose_layouts_reports_every_kind_once_with_tied_weights(tiny_dense):
    report = choose_layouts(tiny_dense)  # lm_head shares its tensor with the embeddings
    assert "lm_head" in report and "embed_tokens" not in report
    assert tiny_dense.lm_head.weight is tiny_dense.model.embed_tokens.weight


def test_the_recipe_says_what_it_chose_and_why():
    cpu = fast_recipe("cpu")
    assert cpu.experts == "per_token" and cpu.relayout and len(cpu.reasons) == 4
    gpu = fast_recipe("cuda")
    assert gpu.experts == "grouped_mm" and not gpu.relayout
    assert "per_token" in str(cpu) and "dtype" in str(cpu)


def test_load_pipeline_takes_the_fast_path_unless_told_not_to(tiny_mixtral_dir):
    fast = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)
    plain = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32, fast=False)
    assert fast.model.config._experts_implementation == "per_token"
    assert "fast path on cpu" in describe(fast) and "blog's plain pipeline" in describe(plain)
    assert not hasattr(plain.model, "recipe")


# ---------------------------------------------------------------- timing
def test_token_clock_excludes_the_first_token_and_the_warmup():
    clock = TokenClock()
    clock.started = 0.0
    clock.put("prompt")
    clock.times = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # first token at 0.5 s, then one every 0.1 s
    summary = clock.summary(warmup=2)
    assert summary["ttft_s"] == 0.5
    assert summary["decode_tok_s"] == pytest.approx(3 / 0.3)
    with pytest.raises(ValueError, match="ask for more"):
        clock.summary(warmup=5)


def test_timed_generate_makes_exactly_the_tokens_asked_for():
    model = tiny_moe()
    model.generation_config.eos_token_id = list(range(256))  # half the vocabulary would end it early
    ids = torch.randint(0, 512, (1, 5))
    run = timed_generate(model, ids, new_tokens=7, warmup=2, do_sample=False, pad_token_id=0)
    assert run["output"].shape == (1, 12) and run["steps"] == 7 and run["decode_tok_s"] > 0


def test_measure_refuses_zero_rounds():
    from helpers.speed import measure
    with pytest.raises(ValueError, match="rounds"):
        measure([], rounds=0)


# ---------------------------------------------------------------- the benchmark, quick mode, every configuration
@pytest.mark.slow  # every configuration in a fresh process, about 5 minutes: make test-slow and CI run it
def test_bench_quick_runs_every_configuration(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    from helpers.speed import CONFIGS, NAIVE
    assert [r["name"] for r in result["rows"]] == [c["name"] for c in CONFIGS]
    for row in result["rows"]:
        assert row["decode_tok_s"] > 0 and 0 < row["efficiency"] < 1.5, row
        assert row["bytes_per_token"] > 0 and row["peak_memory"] > 0
    naive = next(r for r in result["rows"] if r["name"] == NAIVE)
    assert naive["vs_naive"] == 1 and naive["experts"] == "grouped_mm" and naive["dtype"] == "float32"
    md = (tmp_path / "bench.md").read_text()
    assert "| configuration |" in md and "bandwidth" in md
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- the GPU check, rehearsed on the CPU
def test_layer_bench_rehearsal_writes_its_report(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "layer_bench.py"), "--device", "cpu",
                           "--scale", "0.03", "--dtype", "float32", "--tokens", "4", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = next(tmp_path.glob("*.md")).read_text()
    for implementation in ("eager", "grouped_mm", "batched_mm", "per_token"):
        assert f"| {implementation} |" in report
    assert "hidden 128" in report and "full 56 layers" in report


def test_gpu_check_refuses_clearly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/gpu_check.sh itself")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**__import__("os").environ, "PY": sys.executable})
    assert done.returncode == 2 and "torch sees no GPU" in done.stderr


def test_generate_batch_gives_each_prompt_its_own_greedy_answer(tiny_mixtral_dir):
    from helpers import generate
    from helpers.generation import generate_batch

    pipe = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)
    prompts = ["Tell me a joke.", "Translate this sentence into English, please: buongiorno a tutti."]
    together = generate_batch(pipe, prompts, max_new_tokens=8, do_sample=False)
    for prompt, answer in zip(prompts, together):
        alone = generate(pipe, prompt, max_new_tokens=8, do_sample=False)
        assert answer.token_ids == alone.token_ids and answer.prompt_tokens == alone.prompt_tokens
    with pytest.raises(ValueError, match="list of one or more prompts"):
        generate_batch(pipe, "one prompt")
