import pytest
import torch

from helpers import load_pipeline
from helpers.moe import (
    NextLayerGuess,
    RouterTrace,
    busiest_expert,
    cost_experiment,
    experts_read_per_step,
    prefetch_recall,
    route_softmax_topk_renorm,
    route_topk_then_softmax,
    step_unions,
    trace_generation,
)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_mixtral_dir):
    return load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)


def test_trace_records_every_token_at_every_layer(tiny_pipe):
    trace = trace_generation(tiny_pipe, "Tell me some jokes.", max_new_tokens=6, seed=0, do_sample=False)
    answer, tokens = trace.answer, trace.tokens
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
        lambda m, inp, out: seen.update(x=inp[0])
    )  # returns None: the output is left alone
    try:
        tiny_pipe.model(ids)
    finally:
        handle.remove()
    logits = seen["x"].reshape(-1, hidden.shape[-1]) @ tiny_pipe.model.model.layers[0].mlp.gate.weight.T
    assert torch.equal(trace.experts[:, 0], logits.topk(2, dim=-1).indices)


def hand_built(experts, num_experts: int) -> RouterTrace:
    """A trace of one forward call holding `experts` [T, L, K] (weights and logits of the right shapes)."""
    T, L, K = experts.shape
    layer = [(experts[:, i], torch.full((T, K), 1 / K), torch.zeros(T, num_experts)) for i in range(L)]
    return RouterTrace(model=None, calls=[layer])


def test_loads_and_stickiness():
    trace = hand_built(torch.tensor([[[0, 1]], [[0, 2]], [[1, 0]], [[1, 3]]]), 4)  # [T=4, L=1, K=2]
    load = trace.load()
    assert torch.allclose(load, torch.tensor([[3.0, 3.0, 1.0, 1.0]]) / 8)
    assert trace.stickiness().tolist() == [pytest.approx(2 / 3)]  # first choices 0, 0, 1, 1
    assert torch.allclose(trace.chance_stickiness(), (load**2).sum(-1))


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
        assert model.config.num_experts_per_tok == 4 and all(
            layer.mlp.top_k == 4 for layer in model.model.layers
        )
    assert model.config.num_experts_per_tok == 2 and all(
        layer.mlp.gate.top_k == 2 for layer in model.model.layers
    )
    with pytest.raises(RuntimeError, match="inside"):
        with experts_per_token(model, 1):
            raise RuntimeError("inside the block")
    assert model.config.num_experts_per_tok == 2


def test_a_batch_step_reads_the_union_of_its_tokens_experts(tiny_pipe):
    prompts = ["Tell me a joke.", "Hi", "Translate: buongiorno a tutti.", "Write a poem."]
    with RouterTrace(tiny_pipe.model) as trace:
        from helpers import generate_batch

        generate_batch(tiny_pipe, prompts, max_new_tokens=5, do_sample=False)
    read = step_unions(trace)  # [S, L]
    prompt_rows = trace.calls[0][0][0].shape[0]  # the prompt pass: 4 x padded length
    steps = trace.experts[prompt_rows:].reshape(-1, 4, *trace.experts.shape[1:])  # [S, B, L, K]
    for s in range(steps.shape[0]):
        for layer in range(steps.shape[2]):
            assert read[s, layer] == len(
                set(steps[s, :, layer].flatten().tolist())
            )  # the union, counted again
    assert (
        read.shape == (4, 2) and (read >= 2).all() and (read <= 4).all()
    )  # K <= union <= E (4 experts here)
    alone = experts_read_per_step(tiny_pipe, prompts[:1], max_new_tokens=5)
    assert (alone == 2).all()  # one sequence reads exactly its K experts per layer


def test_cost_experiment_builds_the_three_models():
    rows = cost_experiment(hidden=64, intermediate=128, layers=2, new_tokens=2)
    moe, dense_total, dense_active = (r["parameters"] for r in rows)
    assert abs(moe - dense_total) / moe < 0.01  # same memory (the router is the difference)
    assert dense_active < dense_total / 2
    assert all(r["tokens_per_s"] > 0 for r in rows)


# ---------------------------------------------------------------- guessing the next layer's experts (prefetch)
class Recorded:
    def __init__(self, calls):
        self.calls = calls


def test_prefetch_recall_counts_the_true_experts_among_the_first_guesses():
    # 2 layers, 2 experts a token; a prompt call (left out) and two decode steps; guesses are for layer 1
    trace = Recorded(
        [
            [(torch.tensor([[0, 1]]), None, None), (torch.tensor([[7, 7]]), None, None)],
            [(torch.tensor([[0, 1]]), None, None), (torch.tensor([[2, 3]]), None, None)],
            [(torch.tensor([[0, 1]]), None, None), (torch.tensor([[4, 5]]), None, None)],
        ]
    )
    guess = Recorded(
        [[torch.tensor([[7, 6, 5, 4]])], [torch.tensor([[3, 0, 2, 1]])], [torch.tensor([[1, 2, 6, 4]])]]
    )
    recall = prefetch_recall([(guess, trace)], counts=(1, 2, 3, 4))
    # step 1 finds 3 among 1 guess, 2 and 3 among 3; step 2 finds nothing among 3, 4 among 4
    assert {g: r.tolist() for g, r in recall.items()} == {1: [0.25], 2: [0.25], 3: [0.5], 4: [0.75]}
    with pytest.raises(ValueError, match="2 guessed calls against 3 traced"):
        prefetch_recall([(Recorded(guess.calls[:2]), trace)])


def test_the_guess_is_the_next_router_when_a_layer_changes_nothing(tiny_mixtral_dir):
    """With attention and experts writing nothing to the residual stream, and every layer's norm and router the
    same, the state layer l's experts get is the state layer l+1's router sees: every guess of 2 is right."""
    pipe = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)
    layers = pipe.model.model.layers
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            layer.mlp.gate.weight.copy_(layers[0].mlp.gate.weight)
            layer.post_attention_layernorm.weight.copy_(layers[0].post_attention_layernorm.weight)
    with NextLayerGuess(pipe.model) as guess:
        trace = trace_generation(pipe, "Tell me some jokes.", max_new_tokens=5, seed=0, do_sample=False)
    assert len(guess.calls) == len(trace.calls) == 5 and not guess._hooks
    assert guess.calls[1][0].shape == (1, 4)  # one token, 4 guesses (of 4 experts), for layer 1 of 2
    assert [r.tolist() for r in prefetch_recall([(guess, trace)]).values()] == [[1.0], [1.0], [1.0]]


def test_every_layer_but_the_last_guesses_once_per_call():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=5,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=6,
        )
    ).eval()
    with torch.no_grad(), NextLayerGuess(model, most=3) as guess, RouterTrace(model) as trace:
        model(torch.tensor([[1, 5, 9]]))
        model(torch.tensor([[1, 5, 9, 11]]))
    assert len(guess.calls) == len(trace.calls) == 2 and [len(call) for call in guess.calls] == [4, 4]
    assert [tuple(g.shape) for g in guess.calls[1]] == [
        (4, 3)
    ] * 4  # layers 2-5 guessed, 4 tokens, 3 guesses each


def test_recall_grows_with_the_guesses_and_is_whole_with_all_experts(tiny_pipe):
    with NextLayerGuess(tiny_pipe.model) as guess:
        trace = trace_generation(tiny_pipe, "Tell me some jokes.", max_new_tokens=8, seed=0, do_sample=False)
    recall = prefetch_recall([(guess, trace)], counts=(1, 2, 3, 4))
    assert all(((0 <= r) & (r <= 1)).all() for r in recall.values())
    assert (
        all((recall[g] <= recall[g + 1]).all() for g in (1, 2, 3)) and (recall[4] == 1).all()
    )  # 4 experts in all


def test_busiest_expert_on_a_hand_built_trace():
    trace = torch.tensor([[[0, 1]], [[0, 2]], [[0, 3]], [[1, 2]]])  # 4 tokens, 1 layer, top-2 of 4 experts
    assert busiest_expert(trace, batch=4, num_experts=4) == pytest.approx(3 / 2)  # expert 0: 3 tokens, mean 2
    assert busiest_expert(trace, batch=1, num_experts=4) == pytest.approx(1 / 0.5)  # one token: 1 against 0.5
    even = torch.tensor([[[0, 1]], [[2, 3]]])
    assert busiest_expert(even, batch=2, num_experts=4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at most the 4 tokens traced"):
        busiest_expert(trace, batch=5, num_experts=4)
    assert hand_built(trace, 4).busiest_expert(4) == pytest.approx(3 / 2)  # the trace's own routing


def test_the_chance_busiest_expert_is_uniform_routings():
    trace = hand_built(torch.tensor([0, 1]).expand(64, 2, 2), 8)  # every token on experts 0 and 1
    draws = torch.rand(64, 2, 8, generator=torch.Generator().manual_seed(0)).topk(2, dim=-1).indices
    assert trace.chance_busiest_expert(16) == busiest_expert(draws, 16, 8)  # seeded: the same draw each time
    assert 1 < trace.chance_busiest_expert(16) < trace.busiest_expert(16) == pytest.approx(4.0)


def test_a_trace_draws_its_routing_with_the_chats_parts(tiny_pipe):
    import matplotlib

    matplotlib.use("Agg")
    trace = trace_generation(tiny_pipe, "Tell me some jokes.", max_new_tokens=3, seed=0, do_sample=False)
    assert list(trace.marks) == ["chat template", "user's words", "answer"]
    ax = trace.draw("routing")
    assert [t.get_text().strip() for t in ax.texts] == list(trace.marks)  # a label where each part starts
    assert len(ax.get_yticklabels()) == len(trace.tokens) == trace.experts.shape[0]
