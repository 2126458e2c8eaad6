"""One clock, one tok/s, one generate call: the local model and a served endpoint answer the same call."""

import pytest
import torch
from conftest import tiny_moe

from helpers import generate, generate_batch, load_pipeline
from helpers.answers import Answer, TokenClock, decode_rate
from helpers.backends import LocalModel, as_backend


def test_tok_s_is_decode_after_the_first_token_and_the_warmup():
    times = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # first token at 0.5 s, then one every 0.1 s
    assert decode_rate(times) == pytest.approx(5 / 0.5)
    assert decode_rate(times, warmup=2) == pytest.approx(3 / 0.3)
    assert decode_rate(times, warmup=2, batch=4) == pytest.approx(
        4 * 3 / 0.3
    )  # a step of a batch brings 4 tokens
    assert decode_rate(times[:1]) != decode_rate(times[:1])  # one token: no decode speed (nan)
    answer = Answer("x", 6, 10, 1.2, token_times=times)
    assert answer.first_token_s == 0.5 and answer.tokens_per_second == pytest.approx(10)
    assert "first token after 0.50 s, then 10.0 tok/s" in answer.stats()


def test_the_clock_skips_the_prompt_and_shows_whole_characters():
    class Pieces:
        def decode(self, ids, skip_special_tokens):
            return "".join({1: "a", 2: "\ufffd", 3: "é"}.get(i, "") for i in ids).replace("\ufffdé", "é")

    shown = []
    clock = TokenClock(Pieces(), shown.append)
    clock.put(torch.tensor([[7, 7, 7]]))  # the prompt
    for token in (1, 2, 3):
        clock.put(torch.tensor([token]))
    assert len(clock.times) == 3 and shown == ["a", "aé"]  # "a\ufffd" (half a character) was held back


def test_run_makes_exactly_the_tokens_asked_for():
    model = tiny_moe()
    model.generation_config.eos_token_id = list(range(256))  # half the vocabulary would end it early
    answer = LocalModel(model=model).run(
        [[5, 6, 7, 8, 9]], dict(do_sample=False, max_new_tokens=7, min_new_tokens=7)
    )[0]
    assert answer.new_tokens == 7 and len(answer.token_times) == 7 and answer.tokens_per_second > 0


def test_with_a_server_set_settings_of_how_weights_load_here_are_refused(monkeypatch):
    from helpers.data import ENDPOINT_ENV

    monkeypatch.setenv(ENDPOINT_ENV, "http://127.0.0.1:9/v1")  # refused before any connection is tried
    with pytest.raises(
        ValueError, match=r"dtype=torch.float32: .*load_pipeline\(model_path\(\), dtype=\.\.\.\)"
    ):
        load_pipeline(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^fast=False, device_map='cpu': how weights load here"):
        load_pipeline(fast=False, device_map="cpu")
    with pytest.raises(ValueError, match=r"^compiled=True: how weights load here"):
        load_pipeline(compiled=True)


def test_a_pipeline_becomes_a_local_model_and_anything_else_is_refused(tiny_mixtral_dir):
    pipe = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)
    backend = as_backend(pipe)
    assert isinstance(backend, LocalModel) and as_backend(backend) is backend
    with pytest.raises(TypeError, match="pass what load_pipeline"):
        as_backend("mistralai/Mixtral-8x22B-Instruct-v0.1")


def test_should_stop_ends_the_answer_after_the_current_token(tiny_mixtral_dir):
    backend = as_backend(load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32))
    steps = []
    answer = backend.answer(
        [{"role": "user", "content": "Hi"}],
        dict(do_sample=False, max_new_tokens=50, min_new_tokens=50),
        should_stop=lambda: steps.append(1) or len(steps) >= 3,
    )
    assert answer.new_tokens == 3


def test_generate_batch_gives_each_prompt_its_own_greedy_answer(tiny_mixtral_dir):
    pipe = load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)
    prompts = ["Tell me a joke.", "Translate this sentence into English, please: buongiorno a tutti."]
    together = generate_batch(pipe, prompts, max_new_tokens=8, do_sample=False)
    for prompt, answer in zip(prompts, together):
        alone = generate(pipe, prompt, max_new_tokens=8, do_sample=False)
        assert answer.token_ids == alone.token_ids and answer.prompt_tokens == alone.prompt_tokens
    with pytest.raises(ValueError, match="list of one or more prompts"):
        generate_batch(pipe, "one prompt")
    with pytest.raises(ValueError, match="at most"):  # the longest prompt's room bounds the batch
        generate_batch(pipe, prompts, max_new_tokens=250)


def test_one_model_generate_call_in_helpers():
    """Every answer goes through LocalModel.run: no other `.generate(` call in helpers/."""
    from pathlib import Path
    import re

    calls = [
        (f.name, n)
        for f in Path("helpers").resolve().glob("*.py")
        if f.name != "__init__.py"
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if re.search(r"\.generate\(", line)
    ]
    assert [name for name, _ in calls] == ["backends.py"], calls
