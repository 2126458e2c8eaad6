"""Sampling settings and one generation call.

The blog samples every task with the same four knobs; they live here, once.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

BLOG_SAMPLING = dict(
    do_sample=True,    # False = greedy: always the most likely next token
    temperature=0.8,   # divides the logits: 1.0 = no change, < 1.0 = sharper (less random)
    top_k=20,          # sample only among the 20 most likely tokens (0 = no limit)
    top_p=0.95,        # ...and only within the smallest set holding 95% of the probability
)


def validate_sampling(max_new_tokens: int = 128, do_sample: bool = True, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, context_left: int | None = None) -> dict:
    """Check the knobs and return them as `generate()` keyword arguments.

    Raises ValueError naming the knob, the value and the allowed range."""
    def bad(knob, value, allowed):
        raise ValueError(f"{knob}={value!r} is not allowed: {allowed}")

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        bad("max_new_tokens", max_new_tokens, "use a whole number of at least 1")
    if context_left is not None and max_new_tokens > context_left:
        bad("max_new_tokens", max_new_tokens,
            f"the prompt leaves room for at most {context_left} new tokens in the model's context")
    if not isinstance(do_sample, bool):
        bad("do_sample", do_sample, "use True (sample) or False (greedy)")
    knobs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
    if not do_sample:
        return knobs  # greedy: the other knobs play no part
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0
            or not math.isfinite(temperature)):  # inf would flatten every distribution to uniform noise
        bad("temperature", temperature, "with do_sample=True use a finite number > 0 (for greedy, set do_sample=False)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        bad("top_k", top_k, "use a whole number >= 0 (0 = no limit)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        bad("top_p", top_p, "use a number in (0, 1] (1 = no limit)")
    return dict(knobs, temperature=float(temperature), top_k=top_k, top_p=float(top_p))


def validate_seed(seed):
    """None (a run that is not repeatable) or a whole number >= 0; else a ValueError that says so."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed={seed!r} is not allowed: use a whole number >= 0 (or None for a run that is "
                         f"not repeatable)")
    return seed


def context_left(prompt_tokens: int, context: int | None) -> int | None:
    """Tokens the model's context leaves for the answer; a ValueError if the prompt alone fills it."""
    if context is not None and prompt_tokens >= context:
        raise ValueError(f"the prompt is {prompt_tokens} tokens long and the model's context holds {context}: "
                         f"shorten the prompt (or load a model with a longer context)")
    return context - prompt_tokens if context is not None else None


def pad_id(tokenizer) -> int:
    """The padding id generate() needs: the tokenizer's own, else its end-of-sequence id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass
class Answer:
    """What one generation produced: the new text only, and how long it took."""
    text: str
    new_tokens: int
    prompt_tokens: int
    seconds: float
    settings: dict = field(default_factory=dict)
    token_ids: list = field(default_factory=list)
    complete: bool = True   # False: a served answer whose stream was cut (the text is what arrived)
    note: str = ""
    scores: object = field(default=None, repr=False)  # [new, V] float32, with keep_scores=True: after the knobs

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def stats(self) -> str:
        prompt = f" after a {self.prompt_tokens}-token prompt" if self.prompt_tokens else ""
        line = (f"{self.new_tokens} new tokens{prompt} in "
                f"{self.seconds:.1f} s ({self.tokens_per_second:.1f} tok/s, prompt included)")
        if self.settings.get("ignored_by_server"):
            line += f"; ignored by the server: {', '.join(self.settings['ignored_by_server'])}"
        return line if self.complete else f"INCOMPLETE ({self.note}): {line}"

    def __str__(self) -> str:
        return self.text


def generate(pipe, prompt, max_new_tokens: int = 128, seed: int | None = None,
             system: str | None = None, streamer=None, keep_scores: bool = False, **knobs) -> Answer:
    """Generate an answer to `prompt` with the loaded pipeline; return only the new text.

    `knobs` are do_sample, temperature, top_k, top_p (the blog's when omitted). The prompt goes
    through the tokenizer's own chat template, not the blog's hand-written string.
    keep_scores: keep each step's scores after the knobs (`Answer.scores`, for `candidates_per_step`)."""
    import torch

    from .prompts import chat_ids

    from .prompts import as_messages
    from .serving import Endpoint, endpoint_generate

    settings = dict(BLOG_SAMPLING, **knobs)
    unknown = set(settings) - set(BLOG_SAMPLING)
    if unknown:
        raise TypeError(f"unknown sampling knob(s): {', '.join(sorted(unknown))}; "
                        f"use {', '.join(BLOG_SAMPLING)}")
    validate_seed(seed)
    if isinstance(pipe, Endpoint):  # a served model: the same knobs, as an OpenAI request
        if keep_scores:
            raise ValueError("keep_scores=True needs a local model: a served endpoint sends text, not scores")
        return endpoint_generate(pipe, as_messages(prompt, system), validate_sampling(max_new_tokens, **settings), seed)
    model, tokenizer = pipe.model, pipe.tokenizer
    ids = chat_ids(tokenizer, prompt, system)
    room = context_left(len(ids), getattr(model.config, "max_position_embeddings", None))
    kwargs = validate_sampling(max_new_tokens, context_left=room, **settings)
    if seed is not None:
        torch.manual_seed(seed)
    input_ids = torch.tensor([ids], device=model.device)  # [1, T]
    pad = pad_id(tokenizer)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=pad,
                             streamer=streamer, return_dict_in_generate=True, output_scores=keep_scores, **kwargs)
    seconds = time.perf_counter() - started
    scores = torch.stack(out.scores, dim=1)[0].float() if keep_scores else None  # [new, V]
    new = out.sequences[0, len(ids):].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Answer(text=text.strip(), new_tokens=len(new), prompt_tokens=len(ids), seconds=seconds,
                  settings=dict(kwargs, seed=seed), token_ids=new, scores=scores)


def candidates_per_step(answer: Answer) -> list[int]:
    """How many tokens the knobs left to choose from at each step of an answer generated with
    `keep_scores=True`. With top_k=1 that is 1, except where several tokens share the best score:
    transformers' top-k keeps every token tied with the k-th best. Greedy (do_sample=False)
    applies no knobs: there it counts the tokens tied for the highest logit."""
    import torch

    if answer.scores is None:
        raise ValueError("this answer kept no scores: generate it with keep_scores=True")
    scores = answer.scores                                          # [N, V]
    best = scores.max(dim=-1, keepdim=True).values                  # [N, 1]
    greedy = not answer.settings.get("do_sample", True)
    left = scores == best if greedy else torch.isfinite(scores)     # [N, V]
    return left.sum(dim=-1).tolist()


def steps_before_a_tie(answer: Answer) -> int:
    """The steps of an answer before the first one where the knobs left more than one candidate
    (all of them if none did). Sampling with top_k=1 is greedy decoding up to that step."""
    left = candidates_per_step(answer)
    return next((i for i, n in enumerate(left) if n > 1), len(left))


def print_stream(tokenizer):
    """A streamer that prints the answer as it is generated (the prompt is not repeated)."""
    from transformers import TextStreamer
    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate_many(pipe, prompt, samples: int = 3, max_new_tokens: int = 128, seed: int = 0, **knobs) -> list[str]:
    """`samples` sampled answers to one prompt, generated together as one batch (about the cost of
    one answer on a memory-bound machine); seeded, so a run can be repeated."""
    import torch

    from .prompts import chat_ids

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r} is not allowed: use a whole number of at least 1")
    from .serving import Endpoint

    settings = dict(BLOG_SAMPLING, **knobs)
    kwargs = validate_sampling(max_new_tokens, **settings)
    validate_seed(seed)
    if not kwargs["do_sample"] and samples > 1:
        raise ValueError("samples > 1 needs do_sample=True: greedy decoding gives the same answer every time")
    if isinstance(pipe, Endpoint):  # a server batches concurrent requests itself
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(samples) as pool:
            answers = pool.map(lambda i: generate(pipe, prompt, max_new_tokens, seed + i, **knobs), range(samples))
        return [a.text for a in answers]
    ids = chat_ids(pipe.tokenizer, prompt)
    torch.manual_seed(seed)
    input_ids = torch.tensor([ids], device=pipe.model.device)
    pad = pad_id(pipe.tokenizer)
    with torch.no_grad():
        out = pipe.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=pad,
                                  num_return_sequences=samples, **kwargs)  # [samples, T + new]
    return [pipe.tokenizer.decode(row[len(ids):], skip_special_tokens=True).strip() for row in out]


def left_padded(rows: list, pad: int, device="cpu"):
    """Token-id lists of different lengths as one batch, padded on the left so that every row's
    next token comes at the same position: (input_ids [B, T], attention_mask [B, T])."""
    import torch

    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def generate_batch(pipe, prompts: list, max_new_tokens: int = 128, seed: int | None = None, **knobs) -> list[Answer]:
    """Answers to several prompts generated together as one left-padded batch. A decode step reads
    the shared weights (attention, lm_head) once for all sequences, but for an MoE it reads the union
    of the experts they chose: about E * (1 - (1 - K/E)^B) of E per layer at batch B (5.5 of 8 for
    Mixtral at batch 4; speed.expected_distinct_experts), so a batch costs more bytes per step than
    one sequence, and fewer per token. Each Answer's `seconds` is the batch's time."""
    import torch

    from .prompts import chat_ids
    from .serving import Endpoint

    if not prompts or isinstance(prompts, str):
        raise ValueError("prompts: give a list of one or more prompts (for a single prompt use generate)")
    validate_seed(seed)
    if isinstance(pipe, Endpoint):  # a server batches concurrent requests itself
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(lambda p: generate(pipe, p, max_new_tokens, seed, **knobs), prompts))
    model, tokenizer = pipe.model, pipe.tokenizer
    kwargs = validate_sampling(max_new_tokens, **dict(BLOG_SAMPLING, **knobs))
    rows = [chat_ids(tokenizer, p) for p in prompts]
    pad = pad_id(tokenizer)
    input_ids, mask = left_padded(rows, pad, model.device)
    width = input_ids.shape[1]
    if seed is not None:
        torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, pad_token_id=pad, **kwargs)  # [B, T + new]
    seconds = time.perf_counter() - started
    answers = []
    for row, ids in zip(out, rows):
        new = row[width:].tolist()
        if tokenizer.eos_token_id in new:  # finished early: the rest is padding
            new = new[:new.index(tokenizer.eos_token_id) + 1]
        answers.append(Answer(text=tokenizer.decode(new, skip_special_tokens=True).strip(), new_tokens=len(new),
                              prompt_tokens=len(ids), seconds=seconds, settings=dict(kwargs, seed=seed), token_ids=new))
    return answers


def next_token_distribution(pipe, prompt, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                            show: int = 15, answer_prefix: str = "") -> dict:
    """The model's next-token probabilities for `prompt`, and how each knob reshapes them.

    Uses transformers' own warpers, in the order `generate()` applies them (temperature, then
    top-k, then top-p). `answer_prefix` is the start of the answer, already written.
    Returns {stage: [(token, probability), ...]} over the `show` most likely
    tokens of the raw distribution, so every stage is drawn on the same tokens."""
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from .prompts import chat_ids

    validate_sampling(1, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    prefix = pipe.tokenizer(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else []
    ids = torch.tensor([chat_ids(pipe.tokenizer, prompt) + prefix], device=pipe.model.device)
    with torch.no_grad():
        scores = pipe.model(ids).logits[:, -1, :].float()  # [1, V]
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
    tokens = pipe.tokenizer.convert_ids_to_tokens(shown)
    return {name: [(t, p[i].item()) for t, i in zip(tokens, shown)] for name, p in probs.items()}


def draw_distribution(stages: dict, title: str = "Next-token probabilities"):
    """One bar chart per stage, the same tokens on every row."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(3.3 * len(stages), 4), sharey=True)
    top = max(p for rows in stages.values() for _, p in rows)
    for ax, (name, rows) in zip(axes, stages.items()):
        tokens = [t.replace("Ġ", "␣").replace("▁", "␣").replace("Ċ", "\\n") for t, _ in rows]
        ax.barh(range(len(rows)), [p for _, p in rows], color="#4c72b0")
        ax.set_yticks(range(len(rows)), tokens, fontsize=8)
        ax.set_xlim(0, min(1.0, top * 1.1))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("probability")
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
