import pytest
import torch

from helpers import load_pipeline
from helpers.moe import (RouterTrace, chance_stickiness, cost_experiment, expert_load, experts_read_per_step,
                         route_softmax_topk_renorm, route_topk_then_softmax,
                         stickiness, step_unions, trace_generation)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_mixtral_dir):
    return load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)


def test_trace_records_every_token_at_every_layer(tiny_pipe):
    answer, trace, tokens = trace_generation(tiny_pipe, "Tell me some jokes.", max_new_tokens=6, seed=0,
                                             do_sample=False)
    config = tiny_pipe.model.config
    T = answer.prompt_tokens + answer.new_tokens - 1  # the last new token is never fed back
    assert trace.experts.shape == (T, config.num_hidden_layers, config.num_experts_per_tok)
    assert trace.weights.shape == trace.experts.shape
    assert trace.logits.shape == (T, config.num_hidden_layers, config.num_local_experts)
    assert len(tokens) == T and tokens[1] == "[INST]"
    assert torch.allclose(trace.weights.sum(-1), torch.ones(T, config.num_hidden_layers), atol=1e-5)
    # the recorded choice is the model's own: the top-2 of its router logits
    assert torch.equal(trace.experts, trace.logits.topk(2, dim=-1).indices)
    # decode steps went through the KV cache: one call per new token after the prefill
    assert len(trace.calls) == answer.new_tokens


def test_trace_hooks_are_removed(tiny_pipe):
    with RouterTrace(tiny_pipe.model) as trace:
        tiny_pipe.model(torch.tensor([[1, 5, 9]]))
    tiny_pipe.model(torch.tensor([[1, 5, 9]]))
    assert len(trace.calls) == 1


def test_routing_on_a_fixed_input_is_the_routers_argmax(tiny_pipe):
    ids = torch.tensor([[1, 3, 100, 200, 300, 4]])
    with RouterTrace(tiny_pipe.model) as trace:
        tiny_pipe.model(ids)
    hidden = tiny_pipe.model.model.embed_tokens(ids)
    # layer 0's router sees the post-attention-norm input: check it by hand with a second hook
    seen = {}
    handle = tiny_pipe.model.model.layers[0].mlp.gate.register_forward_hook(
        lambda m, inp, out: seen.update(x=inp[0]))  # returns None: the output is left alone
    try:
        tiny_pipe.model(ids)
    finally:
        handle.remove()
    logits = seen["x"].reshape(-1, hidden.shape[-1]) @ tiny_pipe.model.model.layers[0].mlp.gate.weight.T
    assert torch.equal(trace.experts[:, 0], logits.topk(2, dim=-1).indices)


def test_loads_and_stickiness():
    experts = torch.tensor([[[0, 1]], [[0, 2]], [[1, 0]], [[1, 3]]])  # [T=4, L=1, K=2]
    load = expert_load(experts, 4)
    assert torch.allclose(load, torch.tensor([[3.0, 3.0, 1.0, 1.0]]) / 8)
    assert stickiness(experts).tolist() == [pytest.approx(2 / 3)]  # first choices 0, 0, 1, 1
    assert torch.allclose(chance_stickiness(load), (load ** 2).sum(-1))


def test_two_ways_to_route_give_the_same_weights():
    logits = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0)) * 3
    for k in (1, 2, 4):
        w_ref, i_ref = route_topk_then_softmax(logits, k)
        w_hf, i_hf = route_softmax_topk_renorm(logits, k)
        assert torch.equal(i_ref, i_hf)
        assert torch.allclose(w_ref, w_hf, atol=1e-6)


def test_transformers_router_matches_both(tiny_pipe):
    router = tiny_pipe.model.model.layers[0].mlp.gate
    x = torch.randn(50, tiny_pipe.model.config.hidden_size)
    logits, weights, indices = router(x)
    w_ref, i_ref = route_topk_then_softmax(logits, 2)
    assert torch.equal(indices, i_ref) and torch.allclose(weights, w_ref, atol=1e-6)


def test_experts_per_token_knob(tiny_pipe):
    model = tiny_pipe.model
    ids = torch.tensor([[1, 3, 100, 200, 4]])
    from helpers import experts_per_token
    for k in (1, 2, 4):
        with experts_per_token(model, k), RouterTrace(model) as trace:
            model(ids)
        assert trace.experts.shape[-1] == k
    for bad in (5, 0, 2.0):
        with pytest.raises(ValueError, match="from 1 to 4"):
            with experts_per_token(model, bad):
                pass
    assert model.config.num_experts_per_tok == 2


def test_experts_per_token_restores_the_model_even_on_an_error(tiny_pipe):
    from helpers import experts_per_token
    model = tiny_pipe.model
    with experts_per_token(model, 4):
        assert model.config.num_experts_per_tok == 4 and all(layer.mlp.top_k == 4 for layer in model.model.layers)
    assert model.config.num_experts_per_tok == 2 and all(layer.mlp.gate.top_k == 2 for layer in model.model.layers)
    with pytest.raises(RuntimeError, match="inside"):
        with experts_per_token(model, 1):
            raise RuntimeError("inside the block")
    assert model.config.num_experts_per_tok == 2


def test_a_batch_step_reads_the_union_of_its_tokens_experts(tiny_pipe):
    prompts = ["Tell me a joke.", "Hi", "Translate: buongiorno a tutti.", "Write a poem."]
    with RouterTrace(tiny_pipe.model) as trace:
        from helpers import generate_batch
        generate_batch(tiny_pipe, prompts, max_new_tokens=5, do_sample=False)
    read = step_unions(trace)                                       # [S, L]
    prompt_rows = trace.calls[0][0][0].shape[0]                     # the prompt pass: 4 x padded length
    steps = trace.experts[prompt_rows:].reshape(-1, 4, *trace.experts.shape[1:])  # [S, B, L, K]
    for s in range(steps.shape[0]):
        for layer in range(steps.shape[2]):
            assert read[s, layer] == len(set(steps[s, :, layer].flatten().tolist()))  # the union, counted again
    assert read.shape == (4, 2) and (read >= 2).all() and (read <= 4).all()  # K <= union <= E (4 experts here)
    alone = experts_read_per_step(tiny_pipe, prompts[:1], max_new_tokens=5)
    assert (alone == 2).all()  # one sequence reads exactly its K experts per layer


def test_cost_experiment_builds_the_three_models():
    rows = cost_experiment(hidden=64, intermediate=128, layers=2, new_tokens=2)
    moe, dense_total, dense_active = (r["parameters"] for r in rows)
    assert abs(moe - dense_total) / moe < 0.01  # same memory (the router is the difference)
    assert dense_active < dense_total / 2
    assert all(r["tokens_per_s"] > 0 for r in rows)
