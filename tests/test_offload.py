"""Offloading (offload.py, planning.offload_plan): the expert cache computes what the model in memory
computes, its LRU and its counts are what the router's choices imply, accelerate's disk tier is counted
byte for byte, and the arithmetic for the real models holds together."""

from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from helpers.backends import describe, load_pipeline
from helpers.data import ENDPOINT_ENV, GPU_TYPES, GiB
from helpers.experts import tokens_by_expert
from helpers.fitting import Fit
from helpers.loading import ModelTooLarge
from helpers.moe import RouterTrace
from helpers.offload import ExpertFiles, OffloadMeter, layer_caches, offload_experts, placement
from helpers.planning import link_bandwidth, offload_plan, plan
from helpers.policies import LFU, LRU, Belady, hit_rates
from helpers.prefetch import Prefetch
from helpers.sizing import chance_hit_rate, parameter_count, usable


@pytest.fixture(scope="module")
def moe_dir(tiny_mixtral_dir):
    """A tiny random Mixtral whose 4 experts differ (the stand-in's are copies of one FFN), as safetensors."""
    return tiny_mixtral_dir


def load(path, dtype=torch.float32, experts="eager"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.set_experts_implementation(experts)
    return model


# ---------------------------------------------------------------- the LRU and the order of the work
def test_lru_evicts_the_least_recently_used_expert():
    lru = LRU(2)
    assert [lru.touch(e) for e in (1, 2, 1, 3, 2)] == [
        (False, 0),
        (False, 1),
        (True, 0),
        (False, 1),
        (False, 0),
    ]
    assert list(lru.slots) == [3, 2]  # 1 was the least recently used when 2 came back


def test_lfu_evicts_the_least_often_used_expert_and_the_least_recent_of_a_tie():
    lfu = LFU(2)
    assert [lfu.touch(e)[0] for e in (1, 1, 2, 3, 2, 1)] == [False, True, False, False, False, True]
    # 3 evicted 2 (one use against 1's two), then 2 evicted 3 (one use against two); least recent first
    assert list(lfu.slots) == [2, 1] and lfu.uses == Counter({1: 3, 2: 2, 3: 1})
    tie = LFU(2)
    assert [tie.touch(e) for e in (1, 2, 3)] == [
        (False, 0),
        (False, 1),
        (False, 0),
    ]  # a tie: 1, the least recent, goes
    assert list(tie.slots) == [2, 3]


def best_hits(uses, capacity):
    """The most hits any eviction choices give, by trying them all: what Belady's policy must equal."""

    def search(i, cached):
        if i == len(uses):
            return 0
        if uses[i] in cached:
            return 1 + search(i + 1, cached)
        if len(cached) < capacity:
            return search(i + 1, cached | {uses[i]})
        return max(search(i + 1, cached - {victim} | {uses[i]}) for victim in cached)

    return search(0, frozenset())


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_the_best_any_eviction_choices_give(seed):
    g = torch.Generator().manual_seed(seed)
    uses = torch.randint(0, 5, (12,), generator=g).tolist()
    for capacity in (1, 2, 3):
        caches = {"Belady": Belady(capacity, uses), "LRU": LRU(capacity), "LFU": LFU(capacity)}
        hits = {name: sum(cache.touch(e)[0] for e in uses) for name, cache in caches.items()}
        assert hits["Belady"] == best_hits(uses, capacity) >= max(hits["LRU"], hits["LFU"]), (
            uses,
            capacity,
            hits,
        )


def test_belady_refuses_a_use_its_future_does_not_hold():
    with pytest.raises(ValueError, match="use 0 is expert 1"):
        Belady(2, [1, 2]).touch(3)


def test_replays_compare_the_policies_and_refuse_an_unknown_one():
    g = torch.Generator().manual_seed(1)

    class Trace:  # 3 layers x 40 steps, each 2 distinct experts of 8, from a skewed choice
        calls = [
            [
                (
                    torch.multinomial(torch.tensor([8.0, 4, 2, 1, 1, 1, 1, 1]), 2, generator=g)[None],
                    None,
                    None,
                )
                for _ in range(3)
            ]
            for _ in range(40)
        ]

    rates = {p: hit_rates([Trace()], policy=p) for p in ("LRU", "LFU", "Belady")}
    assert all(rates["Belady"][c] >= max(rates["LRU"][c], rates["LFU"][c]) for c in range(1, 9))
    # with a slot for every expert, no policy evicts: only first uses miss; with 4, the oracle wins more
    assert (
        rates["Belady"][8] == rates["LRU"][8] == rates["LFU"][8] < 1 and rates["Belady"][4] > rates["LRU"][4]
    )
    with pytest.raises(ValueError, match="policy='MRU': use one of LRU, LFU, Belady"):
        hit_rates([Trace()], policy="MRU")


def test_tokens_by_expert_follows_the_eager_loop():
    groups = tokens_by_expert(
        torch.tensor([[1, 0], [0, 2]])
    )  # token 0 chose 1 then 0; token 1 chose 0 then 2
    assert [(e, t.tolist(), s.tolist()) for e, t, s in groups] == [
        (0, [1, 0], [0, 1]),
        (1, [0], [0]),
        (2, [1], [1]),
    ]


def test_hit_rates_replay_a_trace():
    class Trace:  # one layer: a prompt pass touching experts 0 and 1, then two decode steps
        calls = [
            [(torch.tensor([[0, 1]]), None, None)],
            [(torch.tensor([[1, 0]]), None, None)],
            [(torch.tensor([[2, 1]]), None, None)],
        ]

    assert hit_rates([Trace()], [1, 2, 3], num_experts=3) == {1: 0.25, 2: 0.75, 3: 0.75}


def test_chance_is_what_lru_finds_under_uniform_routing():
    g = torch.Generator().manual_seed(0)

    class Uniform:  # 8 layers x 600 steps, each token 2 distinct experts of 8 drawn uniformly
        calls = [
            [(torch.randperm(8, generator=g)[:2][None], None, None) for _ in range(8)] for _ in range(600)
        ]

    replayed = hit_rates([Uniform()])
    for (
        cached,
        rate,
    ) in replayed.items():  # fewer slots than picks: a token's picks evict each other, less than that
        assert (
            rate == pytest.approx(chance_hit_rate(cached, 8, 2), abs=0.02)
            if cached >= 2
            else rate < chance_hit_rate(cached, 8, 2)
        ), cached
    assert (
        chance_hit_rate(1, 8, 2) == 1 / 16 and chance_hit_rate(8, 8, 2) == 1
    )  # one slot: the pair evicts itself


# ---------------------------------------------------------------- the cache computes what memory computes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("per_layer, tier", [(1, "disk"), (2, "disk"), (3, "ram")])
def test_the_cache_returns_the_logits_of_the_model_in_memory(moe_dir, dtype, per_layer, tier):
    reference, cached = load(moe_dir, dtype), load(moe_dir, dtype)
    offload_experts(cached, per_layer, tier)
    assert not any(".experts." in n for n, _ in cached.named_parameters())  # only the slots hold experts now
    ids = torch.randint(0, 32768, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, reference(ids).logits)  # the prompt pass, with evictions
        greedy = dict(
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
        got, expected = cached.generate(ids[:, :6], **greedy), reference.generate(ids[:, :6], **greedy)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores))
    counts = sum((c.count for c in layer_caches(cached)), start=Counter())
    assert counts["misses"] > 0 and counts["hits"] + counts["misses"] > 0


def test_the_cache_matches_transformers_default_experts_too(moe_dir):
    reference, cached = load(moe_dir, experts="grouped_mm"), load(moe_dir)
    offload_experts(cached, 2)
    ids = torch.randint(0, 32768, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_its_counts_are_what_the_routers_chose(moe_dir):
    model = load(moe_dir)
    offload_experts(model, 2)
    with RouterTrace(model) as trace, OffloadMeter(model) as meter, torch.no_grad():
        model.generate(torch.tensor([[5, 9, 200, 31, 7]]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    measured = meter.per_token()
    assert measured["hit_rate"] == pytest.approx(hit_rates([trace], [2], num_experts=4)[2])
    with OffloadMeter(model) as again, torch.no_grad():  # a second meter counts its own calls only
        model.generate(torch.tensor([[5, 9, 200, 31, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    prompt = again.calls[0]
    assert (
        not prompt["decode"] and 0 < prompt.get("hits", 0) + prompt.get("misses", 0) <= 2 * 4
    )  # 2 layers, 4 experts
    one_expert = 3 * 32 * 64 * 4  # gate, up, down of hidden 32 x FFN 64, float32 as stored
    assert measured["from disk"] == pytest.approx(measured["misses"] * one_expert)
    assert measured["hits"] + measured["misses"] == 2 * 2  # 2 layers x 2 distinct experts per decode step


def test_a_resized_cache_starts_empty_and_computes_what_memory_computes(moe_dir):
    reference, cached = load(moe_dir), load(moe_dir)
    cache = offload_experts(cached, 4)
    ids = torch.randint(0, 32768, (1, 24), generator=torch.Generator().manual_seed(0))
    with OffloadMeter(cached) as meter, torch.no_grad():  # one meter open around every resize
        for resize_to in (
            None,
            None,
            4,
            2,
            3,
            1,
        ):  # two passes as loaded, then the same size again, and others
            if resize_to:
                assert cache.resize(resize_to) is cache and cache.per_layer == resize_to
                assert all(not c.policy.slots for c in layer_caches(cached))
            assert torch.equal(cached(ids).logits, reference(ids).logits)
            assert all(
                m.mlp.experts.cached_gate_up.shape[0] == m.mlp.experts.cached_down.shape[0] == cache.per_layer
                for m in cached.model.layers
            )
    first, again, resized = meter.calls[:3]
    assert (
        not first.get("hits") and first["misses"] == again["hits"] and not again.get("misses")
    )  # all 4 slots: kept
    assert resized.get("hits", 0) == 0 and resized["misses"] == first["misses"]  # resized to 4: fetched again
    assert len(meter.calls) == 6 and all(row["misses"] > 0 for row in meter.calls[3:])


def test_a_resized_cache_counts_what_the_routers_chose(moe_dir):
    model = load(moe_dir)
    cache = offload_experts(model, 2)
    one_expert = 3 * 32 * 64 * 4  # gate, up, down of hidden 32 x FFN 64, float32 as stored
    for per_layer in (3, 1, 2):
        cache.resize(per_layer)
        with RouterTrace(model) as trace, OffloadMeter(model) as meter, torch.no_grad():
            model.generate(
                torch.tensor([[5, 9, 200, 31, 7]]), max_new_tokens=12, do_sample=False, pad_token_id=0
            )
        live = meter.per_token()
        assert live["hit_rate"] == pytest.approx(hit_rates([trace], [per_layer], num_experts=4)[per_layer])
        assert live["from disk"] == pytest.approx(live["misses"] * one_expert)


def test_a_bad_size_is_refused_and_changes_nothing(moe_dir):
    reference, cached = load(moe_dir), load(moe_dir)
    cache = offload_experts(cached, 2)
    for bad in (0, 5, "3", True, None, 2.0):
        with pytest.raises(
            ValueError, match=r"Fit.expert_cache: per_layer=.* is not allowed: use a whole number from 1 to 4"
        ):
            cache.resize(bad)
    assert cache.per_layer == 2 and all(
        m.mlp.experts.cached_gate_up.shape[0] == 2 for m in cached.model.layers
    )
    assert all(c.policy.capacity == 2 for c in layer_caches(cached))
    ids = torch.tensor([[5, 9, 200, 31, 7, 11, 90]])
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, reference(ids).logits)


# ---------------------------------------------------------------- prefetch: the next layer's experts fetched ahead
@pytest.mark.parametrize(
    "per_layer, tier, threads", [(1, "disk", 1), (2, "disk", 1), (3, "ram", 1), (2, "disk", 0)]
)
def test_prefetch_computes_what_memory_computes(moe_dir, per_layer, tier, threads):
    reference, cached = load(moe_dir), load(moe_dir)
    offload_experts(cached, per_layer, tier)
    ids = torch.randint(0, 32768, (1, 6), generator=torch.Generator().manual_seed(2))
    greedy = dict(
        max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        expected = reference.generate(ids, **greedy)
        with Prefetch(cached, most=2, threads=threads):
            got = cached.generate(ids, **greedy)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores))
    first, second = layer_caches(cached)
    assert first.count["prefetched"] == 0 and second.count["prefetched"] > 0  # layer 0 has no layer before it
    assert not first.pending and not second.pending  # every copy settled
    assert not any(
        layer.post_attention_layernorm._forward_pre_hooks for layer in cached.model.layers
    )  # hooks gone


def test_a_perfect_guess_leaves_no_decode_miss_where_it_guesses(moe_dir):
    model = load(moe_dir)
    cache = offload_experts(model, 2)
    prompt, greedy = (
        torch.tensor([[5, 9, 200, 31, 7]]),
        dict(max_new_tokens=12, do_sample=False, pad_token_id=0),
    )
    with RouterTrace(model) as trace, torch.no_grad():
        model.generate(prompt, **greedy)
    cache.resize(2)  # empty again
    second = layer_caches(model)[1]
    before = Counter(second.count)
    with Prefetch(model, trace=trace), torch.no_grad():
        model.generate(prompt, **greedy)
    counted = second.count - before
    cold = len(
        set(trace.calls[0][1][0].flatten().tolist())
    )  # the prompt pass's experts in layer 1, all misses
    assert (
        counted["misses"] == cold and counted["hits"] == 11 * 2
    )  # 11 decode steps, 2 experts each: all found
    assert counted["prefetch used"] == counted["prefetched"] > 0  # and every prefetch was used


def test_prefetch_in_line_makes_the_same_copies_as_the_thread(moe_dir):
    model = load(moe_dir)
    cache = offload_experts(model, 2)
    prompt, greedy = (
        torch.tensor([[5, 9, 200, 31, 7]]),
        dict(max_new_tokens=12, do_sample=False, pad_token_id=0),
    )
    counted = []
    for threads in (1, 0):
        cache.resize(2)
        with Prefetch(model, most=3, threads=threads), OffloadMeter(model) as meter, torch.no_grad():
            model.generate(prompt, **greedy)
        counted.append({k: v for k, v in meter.per_token().items() if k != "storage"})
    assert counted[0] == counted[1] and counted[0]["prefetched"] > 0


def test_a_guess_evicted_before_its_use_is_not_counted_as_used():
    from concurrent.futures import ThreadPoolExecutor

    from helpers.offload import LayerCache

    class Slots:  # one slot of a 2 x 2 expert
        cached_gate_up, cached_down = torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)

    cache = LayerCache(lambda e: (torch.full((2, 2), float(e)), torch.full((2, 2), float(e))), capacity=1)
    with ThreadPoolExecutor(1) as pool:
        cache.prefetch(Slots, [3], pool)
        cache.slot(Slots, 5)  # a miss: evicts the guess
        cache.slot(Slots, 3)  # the guess, fetched again on demand
    assert cache.count["prefetched"] == 1 and cache.count["prefetch used"] == 0 and cache.count["misses"] == 2
    assert torch.equal(Slots.cached_gate_up[0], torch.full((2, 2), 3.0))


def test_prefetch_refuses_what_it_cannot_do(moe_dir):
    with pytest.raises(ValueError, match="needs a model with an expert cache"):
        Prefetch(load(moe_dir))
    model = load(moe_dir)
    offload_experts(model, 2)
    with pytest.raises(ValueError, match=r"threads=2 is not allowed: use a whole number from 0 to 1"):
        Prefetch(model, threads=2)


def test_the_hub_layout_is_read_expert_by_expert(tmp_path, moe_dir):
    model = load(moe_dir)
    state = {}
    for i, layer in enumerate(model.model.layers):
        gate_up, down = layer.mlp.experts.gate_up_proj.detach(), layer.mlp.experts.down_proj.detach()
        for e in range(4):
            prefix = f"model.layers.{i}.block_sparse_moe.experts.{e}."
            state.update(
                {
                    prefix + "w1.weight": gate_up[e, :64].clone(),
                    prefix + "w3.weight": gate_up[e, 64:].clone(),
                    prefix + "w2.weight": down[e].clone(),
                }
            )
    save_file(state, tmp_path / "model.safetensors")
    fused, legacy = ExpertFiles(moe_dir), ExpertFiles(tmp_path)
    for layer, expert in ((0, 0), (1, 3)):
        assert all(torch.equal(a, b) for a, b in zip(fused.fetch(layer, expert), legacy.fetch(layer, expert)))


# ---------------------------------------------------------------- the knob, and what it refuses
def test_the_knob_loads_a_cached_model_and_says_so(moe_dir):
    pipe = load_pipeline(str(moe_dir), dtype=torch.float32, fit=Fit.expert_cache(2))
    assert pipe.model.config._experts_implementation == "expert_cache"
    record = pipe.model.load_record
    assert (
        record.fit == Fit.expert_cache(2)
        and record.cache.per_layer == 2
        and record.recipe.experts == "expert_cache"
    )
    assert not hasattr(pipe.model, "expert_cache")  # the record is the one thing set on the model
    assert "2 of 4 experts cached per layer" in describe(pipe)
    assert "the others read from disk" in describe(pipe, detail=True)
    record.cache.resize(3)  # what it says follows the size, the fast path's reasons included
    assert "3 of 4 experts cached per layer" in describe(pipe)
    assert "3 of 4 experts per layer in memory" in describe(pipe, detail=True) and "2 of 4" not in describe(
        pipe, detail=True
    )


def test_the_knobs_refuse_what_they_cannot_do(moe_dir, tmp_path, monkeypatch):
    for bad in (0, "2", True):
        with pytest.raises(
            ValueError, match=r"Fit.expert_cache: per_layer=.* is not allowed: use a whole number >= 1"
        ):
            Fit.expert_cache(bad)
    with pytest.raises(
        ValueError, match=r"Fit.expert_cache: per_layer=5 is not allowed: use a whole number from 1 to 4"
    ):
        load_pipeline(str(moe_dir), fit=Fit.expert_cache(5))  # the model has 4 experts per layer
    with pytest.raises(ValueError, match=r"Fit.expert_cache\(tier='ssd'\): use 'disk'"):
        Fit.expert_cache(2, tier="ssd")
    for bad in (2, "int8", {"cpu": "1GiB"}, (Fit.expert_cache(2), Fit.budget({"cpu": "1GiB"}))):
        with pytest.raises(
            ValueError, match=r"is not a way to fit a model: use None .*Fit.quantized\('int8'\)"
        ):
            load_pipeline(str(moe_dir), fit=bad)
    for bad in ("1GiB", {}):
        with pytest.raises(ValueError, match="give a budget per device"):
            Fit.budget(bad)
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        offload_experts(type("Dense", (), {"config": type("C", (), {})()})(), 2)
    with pytest.raises(ValueError, match="no experts in the safetensors"):
        (tmp_path / "model.safetensors").write_bytes(b"")
        save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
        ExpertFiles(tmp_path)
    monkeypatch.setenv("MIXTRAL_NOTEBOOKS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("shutil.disk_usage", lambda _: type("U", (), {"free": 10})())
    with pytest.raises(ModelTooLarge, match="has 0.0 GiB free"):
        load_pipeline(str(moe_dir), fit=Fit.budget({"cpu": "1GiB"}, folder=tmp_path / "off"))
    with pytest.raises(ModelTooLarge, match="has 0.0 GiB free"):  # and no temporary folder is left behind
        load_pipeline(str(moe_dir), fit=Fit.budget({"cpu": "1GiB"}))
    assert not any((tmp_path / "cache" / "offload").iterdir())
    monkeypatch.setenv(ENDPOINT_ENV, "http://127.0.0.1:9/v1")
    with pytest.raises(
        ValueError, match=r"fit=CachedExperts\(per_layer=2, tier=None\): how weights load here"
    ):
        load_pipeline(fit=Fit.expert_cache(2))


# ---------------------------------------------------------------- accelerate's offloading, counted
def test_accelerate_reads_whole_layers_from_disk_every_token(moe_dir, tmp_path):
    reference = load_pipeline(str(moe_dir), dtype=torch.float32, fast=False)
    pipe = load_pipeline(
        str(moe_dir),
        dtype=torch.float32,
        fast=False,
        fit=Fit.budget({"cpu": 8_500_000}, folder=tmp_path / "off"),
    )
    rows = placement(pipe.model)
    on_disk = sum(r["bytes"] for r in rows if r["device"] == "disk")
    assert {r["device"] for r in rows} == {"cpu", "disk"} and on_disk > 0, rows
    by_device = {r["device"]: r for r in rows.by_device()}  # the same count, summed by device
    assert by_device["disk"]["bytes"] == on_disk and sum(r["parameters"] for r in rows) == sum(
        p.numel() for p in pipe.model.parameters()
    )
    assert "part offloaded to disk" in describe(pipe)
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with OffloadMeter(pipe.model) as meter, torch.no_grad():
        out = pipe.model.generate(ids, **greedy)
    assert torch.equal(out, reference.model.generate(ids, **greedy))
    assert (
        meter.per_token()["from disk"] == on_disk
    )  # every weight of every module on disk, all experts, per token


def test_a_temporary_offload_folder_goes_with_its_model(moe_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXTRAL_NOTEBOOKS_CACHE", str(tmp_path))
    pipe = load_pipeline(str(moe_dir), dtype=torch.float32, fast=False, fit=Fit.budget({"cpu": 8_500_000}))
    assert pipe.model.load_record.folder is not None and pipe.model.load_record.recipe is None
    folders = list((tmp_path / "offload").iterdir())
    assert len(folders) == 1 and any(folders[0].iterdir())
    del pipe
    import gc

    gc.collect()
    assert not folders[0].exists()
    with pytest.raises(Exception):  # a load that fails leaves no folder either
        load_pipeline(
            str(moe_dir),
            dtype=torch.float32,
            fast=False,
            fit=Fit.budget({"cpu": 8_500_000}),
            device_map="nowhere",
        )
    assert not any((tmp_path / "offload").iterdir())


# ---------------------------------------------------------------- the arithmetic for the real models
BIG, SMALL = "mistralai/Mixtral-8x22B-Instruct-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1"


def test_a_pcie_link_carries_what_its_lanes_carry():
    assert link_bandwidth("PCIe 4.0 x16") == pytest.approx(31.5e9, rel=1e-3)
    assert link_bandwidth("PCIe 5.0 x16") == 2 * link_bandwidth("PCIe 4.0 x16")
    row = offload_plan(BIG, "W7900", "PCIe 5.0 x16")  # a plan says which link it assumed, and its rate
    assert (row["link_gt_s"], row["link_gb_s"]) == (32, link_bandwidth("PCIe 5.0 x16") / 1e9)
    with pytest.raises(ValueError, match="use one of PCIe 4.0 x16, PCIe 5.0 x16"):
        link_bandwidth("NVLink")


def test_what_fits_needs_no_link_and_matches_the_planner():
    row = offload_plan(SMALL, "A100", precision="int4")
    assert row["fits"] and row["cache_tok_s"] == row["auto_tok_s"] == pytest.approx(
        plan(SMALL, "A100", 1, "int4").ceiling_pipeline
    )


def test_the_cache_holds_what_memory_allows_and_moves_only_misses():
    row = offload_plan(SMALL, "A100", "PCIe 4.0 x16")  # 8x7B bf16 does not fit in 80 GB
    parts, L = parameter_count(SMALL), 32
    expert = parts["experts"] / (L * 8) * 2
    resident = (parts["total"] - parts["experts"]) * 2 + 32 * 2 * 8 * 128 * 2 * 4096
    c = row["cached_per_layer"]
    assert resident + c * L * expert <= usable(80 * GiB) < resident + (c + 1) * L * expert
    hit = (c / 8 + (c - 1) / 7) / 2  # chance, unless told
    assert row["hit_rate"] == pytest.approx(hit)
    assert row["cache_bus_gb"] * 1e9 == pytest.approx(L * 2 * (1 - hit) * expert)
    told = offload_plan(SMALL, "A100", "PCIe 4.0 x16", hit_rate=lambda n: 0.9)
    assert told["cache_bus_gb"] == pytest.approx(row["cache_bus_gb"] * 0.1 / (1 - hit))
    assert told["cache_tok_s"] > row["cache_tok_s"] > row["auto_tok_s"]
    # device_map="auto" leaves in RAM what the GPU cannot take, and copies it in for every token
    assert parts["total"] * 2 - usable(80 * GiB) <= row["auto_bus_gb"] * 1e9 < parts["total"] * 2


def test_a_gpu_with_no_room_for_one_expert_per_layer_cannot_cache():
    row = offload_plan(BIG, "RX 7900 XTX")
    assert row["cached_per_layer"] == 0 and row["cache_tok_s"] is None and row["auto_tok_s"] > 0
    assert offload_plan(BIG, "RX 7900 XTX", precision="int4")["cached_per_layer"] >= 1
    with pytest.raises(ValueError, match="unknown GPU 'T4'"):
        offload_plan(BIG, "T4")
    assert set(GPU_TYPES) >= {"RX 7900 XTX", "W7900"}
