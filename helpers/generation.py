"""Generation with the blog's knobs: checked once, then asked of whatever answers (backends.py).

`generate` and `generate_batch` validate the prompt, the knobs and the seed,
and leave the rest to the backend: a model loaded here or a served endpoint, the same call.
"""

from __future__ import annotations

import math

from .answers import Answer
from .backends import as_backend
from .data import BLOG_SAMPLING, whole_number
from .prompts import as_messages


def validate_sampling(
    max_new_tokens: int = 128,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    context_left: int | None = None,
) -> dict:
    """Check the knobs and return them as `generate()` keyword arguments.

    Raises ValueError naming the knob, the value and the allowed range."""

    def bad(knob, value, allowed):
        raise ValueError(f"{knob}={value!r} is not allowed: {allowed}")

    whole_number("max_new_tokens", max_new_tokens, 1)
    if context_left is not None and max_new_tokens > context_left:
        bad(
            "max_new_tokens",
            max_new_tokens,
            f"the prompt leaves room for at most {context_left} new tokens in the model's context",
        )
    if not isinstance(do_sample, bool):
        bad("do_sample", do_sample, "use True (sample) or False (greedy)")
    knobs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
    if not do_sample:
        return knobs  # greedy: the other knobs play no part
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not temperature > 0
        or not math.isfinite(temperature)
    ):  # inf would flatten every distribution to uniform noise
        bad(
            "temperature",
            temperature,
            "with do_sample=True use a finite number > 0 (for greedy, set do_sample=False)",
        )
    whole_number("top_k", top_k, 0, " (0 = no limit)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        bad("top_p", top_p, "use a number in (0, 1] (1 = no limit)")
    return dict(knobs, temperature=float(temperature), top_k=top_k, top_p=float(top_p))


def validate_seed(seed):
    """None (a run that is not repeatable) or a whole number >= 0; else a ValueError that says so."""
    return (
        seed if seed is None else whole_number("seed", seed, 0, " (or None for a run that is not repeatable)")
    )


def sampling(max_new_tokens: int, knobs: dict, room: int | None = None) -> dict:
    """The blog's knobs with the caller's changes, checked: `generate()` keyword arguments."""
    settings = dict(BLOG_SAMPLING, **knobs)
    unknown = set(settings) - set(BLOG_SAMPLING)
    if unknown:
        raise TypeError(
            f"unknown sampling knob(s): {', '.join(sorted(unknown))}; use {', '.join(BLOG_SAMPLING)}"
        )
    return validate_sampling(max_new_tokens, context_left=room, **settings)


def generate(
    pipe,
    prompt,
    max_new_tokens: int = 128,
    seed: int | None = None,
    system: str | None = None,
    on_text=None,
    **knobs,
) -> Answer:
    """An answer to `prompt` from whatever `pipe` is (a loaded pipeline or a served endpoint);
    only the new text. The prompt goes through the tokenizer's own chat template, not the blog's
    hand-written string. `knobs` are do_sample, temperature, top_k, top_p (the blog's when omitted).
    on_text(text so far): called as the answer grows (`print_stream()` prints it).
    Taught in 02_poem."""
    backend = as_backend(pipe)
    messages = as_messages(prompt, system)
    kwargs = sampling(max_new_tokens, knobs, backend.room(messages))
    return backend.answer(messages, kwargs, validate_seed(seed), on_text=on_text)


def print_stream():
    """An `on_text` that prints the answer as it is written (only what is new each time).
    Taught in 02_poem."""
    printed = ""

    def show(text: str) -> None:
        nonlocal printed
        print(text[len(printed) :] if text.startswith(printed) else "\n" + text, end="", flush=True)
        printed = text

    return show


def generate_batch(
    pipe, prompts: list, max_new_tokens: int = 128, seed: int | None = None, **knobs
) -> list[Answer]:
    """Answers to several prompts generated together as one left-padded batch; one prompt repeated gives
    as many samples of it, each its own answer. A decode step reads the shared weights (attention,
    lm_head) once for all sequences, but for an MoE it reads the union of the experts they chose:
    about E * (1 - (1 - K/E)^B) of E per layer at batch B (5.5 of 8 for Mixtral at batch 4;
    sizing.expected_distinct_experts), so a batch costs more bytes per step than one sequence, and
    fewer per token. Each Answer's `seconds` is the batch's time. A server gets them as concurrent
    requests. Taught in 08_performance and 04_jokes."""
    if not prompts or isinstance(prompts, str):
        raise ValueError("prompts: give a list of one or more prompts (for a single prompt use generate)")
    backend = as_backend(pipe)
    chats = [as_messages(p) for p in prompts]
    rooms = [r for r in map(backend.room, chats) if r is not None]
    kwargs = sampling(max_new_tokens, knobs, min(rooms) if rooms else None)
    return backend.answer_batch(chats, kwargs, validate_seed(seed))
