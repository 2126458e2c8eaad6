"""What the sampling knobs do to the model's choices: one next-token distribution, stage by stage, and
how many candidates each step of an answer had left. Taught in 06_sampling_lab."""

from __future__ import annotations

from .answers import Answer
from .backends import LocalModel, as_backend
from .generation import sampling, validate_sampling, validate_seed
from .prompts import as_messages, chat_ids
from .readings import shown_token


def generate_scored(pipe, prompt, max_new_tokens: int = 128, seed: int | None = None, **knobs) -> Answer:
    """`generate` on a model loaded here, keeping each step's scores after the knobs (`Answer.scores`,
    [new, V] float32), for `Answer.candidates_per_step` and `Answer.steps_before_a_tie`.
    Taught in 06_sampling_lab."""
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


WARPERS = dict(temperature=1.0, top_k=0, top_p=1.0)  # the knobs that reshape a distribution, and "no change"


def next_token_distribution(pipe, prompt, show: int = 30, answer_prefix: str = "", **knobs) -> dict:
    """The model's next-token probabilities for `prompt`, and how each knob reshapes them.

    Uses transformers' own warpers, in the order `generate()` applies them (temperature, then
    top-k, then top-p); `knobs` are those three (no change where omitted). `answer_prefix` is the start
    of the answer, already written.
    Returns {stage: [(token, probability), ...]} over the `show` most likely tokens of the raw
    distribution, so every stage is drawn on the same tokens (0 where a warper removed one), with
    `.survivors`: {stage: how many tokens of the whole vocabulary can still be drawn}; `.draw()` shows them.
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

    def draw(self, title: str = "Next-token probabilities"):
        """One bar chart per stage, the same tokens on every row; a token a warper removed is greyed out,
        its bar at the probability it had before (the stage to its left). Taught in 06_sampling_lab."""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(
            1, len(self), figsize=(3.3 * len(self), 0.16 * len(next(iter(self.values()))) + 2), sharey=True
        )
        top, before = max(p for rows in self.values() for _, p in rows), None
        for ax, (name, rows) in zip(axes, self.items()):
            tokens = [shown_token(t) for t, _ in rows]
            ghost = [b if p == 0 else 0 for (_, p), (_, b) in zip(rows, before or rows)]
            for i, (_, p) in enumerate(rows):
                if p == 0:
                    ax.axhspan(i - 0.5, i + 0.5, color="#ececec", linewidth=0)
            ax.barh(range(len(rows)), ghost, color="#a0a0a0", label="removed")
            ax.barh(range(len(rows)), [p for _, p in rows], color="#4c72b0", label="can be drawn")
            ax.set_yticks(range(len(rows)), tokens, fontsize=7)
            ax.set_xlim(0, min(1.0, top * 1.1))
            left = getattr(self, "survivors", {}).get(name)
            ax.set_title(name + (f"\n{left:,} tokens left" if left is not None else ""), fontsize=9)
            ax.set_xlabel("probability")
            before = rows
        axes[0].invert_yaxis()
        axes[-1].legend(loc="lower right", fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        return fig
