import pytest
import torch

from helpers import (
    BLOG_SAMPLING,
    generate,
    generate_scored,
    load_pipeline,
)
from helpers.answers import Answer
from helpers.generation import validate_sampling


def test_blog_defaults_live_in_one_place():
    assert BLOG_SAMPLING == dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.95)


def test_valid_knobs_pass_through():
    assert validate_sampling(512, **BLOG_SAMPLING) == dict(max_new_tokens=512, **BLOG_SAMPLING)


def test_greedy_drops_the_sampling_knobs():
    assert validate_sampling(8, do_sample=False, temperature=0.0, top_k=-3) == dict(
        max_new_tokens=8, do_sample=False
    )


@pytest.mark.parametrize(
    "knobs, knob, hint",
    [
        (dict(temperature=0.0), "temperature", "> 0"),
        (dict(temperature=-1), "temperature", "do_sample=False"),
        (dict(top_p=0.0), "top_p", "(0, 1]"),
        (dict(top_p=1.5), "top_p", "(0, 1]"),
        (dict(top_k=-1), "top_k", ">= 0"),
        (dict(top_k=2.5), "top_k", "whole number"),
        (dict(max_new_tokens=0), "max_new_tokens", "whole number >= 1"),
        (dict(max_new_tokens=10.0), "max_new_tokens", "whole number"),
        (dict(max_new_tokens=300, context_left=200), "max_new_tokens", "at most 200"),
        (dict(do_sample="yes"), "do_sample", "True"),
    ],
)
def test_bad_knobs_name_knob_value_and_range(knobs, knob, hint):
    with pytest.raises(ValueError) as err:
        validate_sampling(**{"max_new_tokens": 16, **BLOG_SAMPLING, **knobs})
    message = str(err.value)
    assert message.startswith(f"{knob}=") and hint in message


@pytest.fixture(scope="module")
def tiny_pipe(tiny_mixtral_dir):
    return load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)


def test_generate_returns_only_new_text_and_counts(tiny_pipe):
    answer = generate(tiny_pipe, "Tell me some jokes about semiconductors.", max_new_tokens=12, seed=1)
    assert 1 <= answer.new_tokens <= 12
    assert answer.prompt_tokens == 13  # <s>[INST] + 11 prompt tokens + [/INST]
    assert "semiconductors" not in answer.text
    assert answer.settings == dict(max_new_tokens=12, seed=1, **BLOG_SAMPLING)
    assert "tok/s" in answer.stats()


def test_seed_makes_sampling_repeatable(tiny_pipe):
    runs = [
        generate(tiny_pipe, "Hello", max_new_tokens=16, seed=seed, temperature=1.5, top_k=0)
        for seed in (7, 7, 8)
    ]
    assert runs[0].text == runs[1].text
    assert runs[0].text != runs[2].text


def test_generate_rejects_bad_input_before_running(tiny_pipe):
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_pipe, "   ")
    with pytest.raises(ValueError, match="at most"):
        generate(tiny_pipe, "Hello", max_new_tokens=1000)  # tiny model: 256-token context
    with pytest.raises(TypeError, match="unknown sampling knob"):
        generate(tiny_pipe, "Hello", temprature=0.5)


def test_candidates_count_ties_after_the_knobs():
    inf = float("inf")
    scores = torch.tensor([[3.0, 1.0, -inf], [2.0, 2.0, -inf], [5.0, -inf, -inf]])  # [N, V] after top_k=1
    sampled = Answer("", 3, 1, 1.0, settings=dict(do_sample=True), token_ids=[0, 1, 0], scores=scores)
    assert sampled.candidates_per_step() == [2, 2, 1] and sampled.steps_before_a_tie() == 0
    raw = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0, 1.0], [5.0, 4.0, 0.0]])  # greedy: ties for the best logit
    greedy = Answer("", 3, 1, 1.0, settings=dict(do_sample=False), token_ids=[0, 0, 0], scores=raw)
    assert greedy.candidates_per_step() == [1, 2, 1] and greedy.steps_before_a_tie() == 1
    with pytest.raises(ValueError, match=r"generate_scored\(...\)"):
        Answer("", 1, 1, 1.0).candidates_per_step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_top_k_1_is_greedy_up_to_ties(tiny_mixtral_dir, dtype):
    pipe = load_pipeline(str(tiny_mixtral_dir), dtype=dtype)
    greedy = generate_scored(pipe, "Hello there", max_new_tokens=24, do_sample=False)
    plain = generate(pipe, "Hello there", max_new_tokens=24, do_sample=False)
    assert plain.scores is None and plain.token_ids == greedy.token_ids  # the same answer, without the scores
    assert greedy.scores.shape == (greedy.new_tokens, pipe.model.config.vocab_size)
    assert greedy.token_ids == greedy.scores.argmax(-1).tolist()  # greedy takes the first best token
    for seed in (1, 2, 3):
        sampled = generate_scored(pipe, "Hello there", max_new_tokens=24, seed=seed, top_k=1)
        left, same = sampled.candidates_per_step(), sampled.steps_before_a_tie()
        assert all(n == 1 for n in left[:same]) and (same == len(left) or left[same] > 1)  # the first tie
        assert sampled.token_ids[:same] == greedy.token_ids[:same]
        kept = torch.isfinite(sampled.scores)  # every token taken was one the knobs left
        assert all(kept[i, t] for i, t in enumerate(sampled.token_ids))


# ---------------------------------------------------------------- bad input, refused at the door with what to do
@pytest.mark.parametrize(
    "prompt, message",
    [
        (None, "give the prompt as text"),
        (b"Tell me a joke", "prompt is bytes, not text: decode it first"),
        (42, "give the prompt as text"),
        ([{"role": "user", "content": "hi"}, "hello"], "give the prompt as text"),
    ],
)
def test_a_prompt_that_is_not_text_says_so(tiny_pipe, prompt, message):
    with pytest.raises(TypeError, match=message):
        generate(tiny_pipe, prompt, max_new_tokens=2)


@pytest.mark.parametrize("seed", [-1, "0", 1.5, True])
def test_a_seed_must_be_a_whole_number_from_zero(tiny_pipe, seed):
    from helpers.generation import generate_batch

    for call in (
        lambda: generate(tiny_pipe, "Hello", max_new_tokens=2, seed=seed),
        lambda: generate_batch(tiny_pipe, ["Hello"], max_new_tokens=2, seed=seed),
    ):
        with pytest.raises(ValueError, match=r"seed=.* is not allowed: use a whole number >= 0"):
            call()


@pytest.mark.parametrize("temperature", [float("inf"), float("nan")])
def test_temperature_must_be_finite(temperature):
    with pytest.raises(ValueError, match="temperature=.*finite number > 0"):
        validate_sampling(8, temperature=temperature)


def test_a_prompt_longer_than_the_context_says_how_long_each_is(tiny_pipe):
    long_prompt = "word " * 400  # the tiny model's context holds 256 tokens
    with pytest.raises(
        ValueError, match=r"the prompt is \d+ tokens long and the model's context holds 256: shorten"
    ):
        generate(tiny_pipe, long_prompt, max_new_tokens=2)


def test_the_distribution_counts_what_each_warper_leaves(standin_tokenizer):
    """06's plots: every stage on the same tokens, 0 where a warper removed one, and the survivors counted
    over the whole vocabulary (top-k leaves k, top-p at most that)."""
    from conftest import tiny_llama

    from helpers import next_token_distribution
    from helpers.backends import LocalModel

    pipe = LocalModel(model=tiny_llama(), tokenizer=standin_tokenizer)
    stages = next_token_distribution(pipe, "Tell me a joke.", temperature=0.8, top_k=20, top_p=0.5)
    raw, warm, top_k, top_p = stages.values()
    assert len(raw) == 30 and [t for t, _ in raw] == [t for t, _ in top_p]
    assert list(stages.survivors.values())[:3] == [49152, 49152, 20]
    assert 1 <= stages.survivors["+ top_p 0.5"] <= 20
    assert (
        sum(p > 0 for _, p in top_k) == 20 and sum(p > 0 for _, p in top_p) == stages.survivors["+ top_p 0.5"]
    )
    assert len(stages.draw().axes) == 4  # one panel per stage
    with pytest.raises(ValueError, match="takes temperature, top_k, top_p as knobs, not seed"):
        next_token_distribution(pipe, "Tell me a joke.", seed=3)
