"""Generation with the blog's knobs: checked once, then asked of whatever answers (backends.py).

`generate`, `generate_many` and `generate_batch` validate the prompt, the knobs and the seed,
and leave the rest to the backend: a model loaded here or a served endpoint, the same call.
"""

from __future__ import annotations

import math

from .answers import Answer
from .backends import LocalModel, as_backend
from .data import BLOG_SAMPLING, whole_number
from .prompts import as_messages, chat_ids, shown_token

# What 08 asserts of generate_batch: four prompts as one batch give at least this many times the tokens per second
# in all (whole calls) of the same prompts one at a time (1.8x measured on a 2-core Intel Xeon with AMX)
BATCH_MIN_GAIN = 1.2


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


def generate_scored(pipe, prompt, max_new_tokens: int = 128, seed: int | None = None, **knobs) -> Answer:
    """`generate` on a model loaded here, keeping each step's scores after the knobs (`Answer.scores`,
    [new, V] float32), for `candidates_per_step` and `steps_before_a_tie`. Taught in 06_sampling_lab."""
    backend = as_backend(pipe)
    if not isinstance(backend, LocalModel):
        raise TypeError(
            "generate_scored reads the model's scores: load one here (load_pipeline(model_path()))"
        )
    messages = as_messages(prompt)
    kwargs = sampling(max_new_tokens, knobs, backend.room(messages))
    return backend.run(
        [chat_ids(backend.tokenizer, messages)], kwargs, validate_seed(seed), keep_scores=True
    )[0]


def candidates_per_step(answer: Answer) -> list[int]:
    """How many tokens the knobs left to choose from at each step of an answer generated with
    `generate_scored`. With top_k=1 that is 1, except where several tokens share the best score:
    transformers' top-k keeps every token tied with the k-th best. Greedy (do_sample=False)
    applies no knobs: there it counts the tokens tied for the highest logit. Taught in 06_sampling_lab."""
    import torch

    if answer.scores is None:
        raise ValueError("this answer kept no scores: generate it with generate_scored(...)")
    scores = answer.scores  # [N, V]
    best = scores.max(dim=-1, keepdim=True).values  # [N, 1]
    greedy = not answer.settings.get("do_sample", True)
    left = scores == best if greedy else torch.isfinite(scores)  # [N, V]
    return left.sum(dim=-1).tolist()


def steps_before_a_tie(answer: Answer) -> int:
    """The steps of an answer before the first one where the knobs left more than one candidate
    (all of them if none did). Sampling with top_k=1 is greedy decoding up to that step.
    Taught in 06_sampling_lab."""
    left = candidates_per_step(answer)
    return next((i for i, n in enumerate(left) if n > 1), len(left))


def print_stream():
    """An `on_text` that prints the answer as it is written (only what is new each time).
    Taught in 02_poem."""
    printed = ""

    def show(text: str) -> None:
        nonlocal printed
        print(text[len(printed) :] if text.startswith(printed) else "\n" + text, end="", flush=True)
        printed = text

    return show


def generate_many(
    pipe, prompt, samples: int = 3, max_new_tokens: int = 128, seed: int = 0, **knobs
) -> list[str]:
    """`samples` sampled answers to one prompt, generated together as one batch (about the cost of
    one answer on a memory-bound machine; a server runs them as concurrent requests); seeded.
    Taught in 04_jokes."""
    whole_number("samples", samples, 1)
    backend = as_backend(pipe)
    messages = as_messages(prompt)
    kwargs = sampling(max_new_tokens, knobs, backend.room(messages))
    if not kwargs["do_sample"] and samples > 1:
        raise ValueError("samples > 1 needs do_sample=True: greedy decoding gives the same answer every time")
    return [a.text for a in backend.answer_batch([messages] * samples, kwargs, validate_seed(seed))]


def generate_batch(
    pipe, prompts: list, max_new_tokens: int = 128, seed: int | None = None, **knobs
) -> list[Answer]:
    """Answers to several prompts generated together as one left-padded batch. A decode step reads
    the shared weights (attention, lm_head) once for all sequences, but for an MoE it reads the union
    of the experts they chose: about E * (1 - (1 - K/E)^B) of E per layer at batch B (5.5 of 8 for
    Mixtral at batch 4; sizing.expected_distinct_experts), so a batch costs more bytes per step than
    one sequence, and fewer per token. Each Answer's `seconds` is the batch's time. A server gets
    them as concurrent requests. Taught in 08_performance."""
    if not prompts or isinstance(prompts, str):
        raise ValueError("prompts: give a list of one or more prompts (for a single prompt use generate)")
    backend = as_backend(pipe)
    chats = [as_messages(p) for p in prompts]
    rooms = [r for r in map(backend.room, chats) if r is not None]
    kwargs = sampling(max_new_tokens, knobs, min(rooms) if rooms else None)
    return backend.answer_batch(chats, kwargs, validate_seed(seed))


WARPERS = dict(temperature=1.0, top_k=0, top_p=1.0)  # the knobs that reshape a distribution, and "no change"


def next_token_distribution(pipe, prompt, show: int = 30, answer_prefix: str = "", **knobs) -> dict:
    """The model's next-token probabilities for `prompt`, and how each knob reshapes them.

    Uses transformers' own warpers, in the order `generate()` applies them (temperature, then
    top-k, then top-p); `knobs` are those three (no change where omitted). `answer_prefix` is the start
    of the answer, already written.
    Returns {stage: [(token, probability), ...]} over the `show` most likely tokens of the raw
    distribution, so every stage is drawn on the same tokens (0 where a warper removed one), with
    `.survivors`: {stage: how many tokens of the whole vocabulary can still be drawn}.
    Taught in 06_sampling_lab."""
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    local = as_backend(pipe)
    if not isinstance(local, LocalModel):
        raise TypeError(
            "next_token_distribution reads the model's logits: load one here (load_pipeline(model_path()))"
        )
    unknown = sorted(set(knobs) - set(WARPERS))
    if unknown:
        raise ValueError(
            f"next_token_distribution takes {', '.join(WARPERS)} as knobs, not {', '.join(unknown)}"
        )
    temperature, top_k, top_p = (knobs.get(k, v) for k, v in WARPERS.items())
    validate_sampling(1, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    prefix = local.tokenizer(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else []
    ids = torch.tensor([chat_ids(local.tokenizer, prompt) + prefix], device=local.model.device)
    with torch.no_grad():
        scores = local.model(ids).logits[:, -1, :].float()  # [1, V]
    stages = {"raw (temperature 1)": scores}
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    stages[f"temperature {temperature:g}"] = scores
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    stages[f"+ top_k {top_k}" if top_k else "+ top_k off"] = scores
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    stages[f"+ top_p {top_p:g}" if top_p < 1 else "+ top_p off"] = scores
    probs = {name: torch.softmax(s, dim=-1)[0] for name, s in stages.items()}  # [V] each
    shown = torch.topk(probs["raw (temperature 1)"], show).indices.tolist()
    tokens = local.tokenizer.convert_ids_to_tokens(shown)
    result = Stages({name: [(t, p[i].item()) for t, i in zip(tokens, shown)] for name, p in probs.items()})
    result.survivors = {name: int(torch.isfinite(s).sum()) for name, s in stages.items()}
    return result


class Stages(dict):
    """next_token_distribution's answer: a dict of stages, and `survivors` per stage."""

    survivors: dict


def draw_distribution(stages: dict, title: str = "Next-token probabilities"):
    """One bar chart per stage, the same tokens on every row; a token a warper removed is greyed out,
    its bar at the probability it had before (the stage to its left). Taught in 06_sampling_lab."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(stages), figsize=(3.3 * len(stages), 0.16 * len(next(iter(stages.values()))) + 2), sharey=True
    )
    top, before = max(p for rows in stages.values() for _, p in rows), None
    for ax, (name, rows) in zip(axes, stages.items()):
        tokens = [shown_token(t) for t, _ in rows]
        ghost = [b if p == 0 else 0 for (_, p), (_, b) in zip(rows, before or rows)]
        for i, (_, p) in enumerate(rows):
            if p == 0:
                ax.axhspan(i - 0.5, i + 0.5, color="#ececec", linewidth=0)
        ax.barh(range(len(rows)), ghost, color="#a0a0a0", label="removed")
        ax.barh(range(len(rows)), [p for _, p in rows], color="#4c72b0", label="can be drawn")
        ax.set_yticks(range(len(rows)), tokens, fontsize=7)
        ax.set_xlim(0, min(1.0, top * 1.1))
        left = getattr(stages, "survivors", {}).get(name)
        ax.set_title(name + (f"\n{left:,} tokens left" if left is not None else ""), fontsize=9)
        ax.set_xlabel("probability")
        before = rows
    axes[0].invert_yaxis()
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
