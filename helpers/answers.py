"""What one generation produced (`Answer`), and the one clock every answer is timed by.

`TokenClock` notes when each new token arrives, and tok/s is always decode speed after the first token
(`decode_rate`): the prompt pass is its own number, time to first token. A local model and a served
endpoint (backends.py) make the same `Answer`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .data import MAX_TOKENS_ENV


def decode_rate(times: list, warmup: int = 0, batch: int = 1) -> float:
    """Tokens/s after the first token (and `warmup` more steps): the one definition of tok/s.
    `times` are the arrival times of each step's tokens; a step of a batch brings `batch` tokens."""
    steps = len(times) - 1 - warmup
    if steps < 1:
        return float("nan")
    return batch * steps / (times[-1] - times[warmup])


class TokenClock:
    """A generate() streamer: when each new token arrives (its first put is the prompt), and, with
    `on_text`, the answer's text so far after each token (batch 1)."""

    def __init__(self, tokenizer=None, on_text=None):
        self.started = time.perf_counter()
        self.times: list[float] = []
        self.ids: list[int] = []
        self.tokenizer, self.on_text = tokenizer, on_text
        self._prompt_seen, self._shown = False, None

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if self.on_text is not None:
            self.ids.extend(value.reshape(-1).tolist())
            self._show(final=False)

    def end(self) -> None:
        if self.on_text is not None and self.ids:
            self._show(final=True)

    def _show(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if (
            final or not text.endswith("\ufffd")
        ) and text != self._shown:  # half a character: wait for the rest
            self._shown = text
            self.on_text(text)


@dataclass
class Answer:
    """What one generation produced: the new text only, and when its tokens came."""

    text: str
    new_tokens: int
    prompt_tokens: int
    seconds: float  # from the call to the last token
    settings: dict = field(default_factory=dict)
    token_ids: list = field(default_factory=list)
    complete: bool = True  # False: a served answer whose stream was cut (the text is what arrived)
    note: str = ""
    scores: object = field(
        default=None, repr=False
    )  # [new, V] float32, from generate_scored: after the knobs
    token_times: list = field(default_factory=list, repr=False)  # seconds from the call to each step

    @property
    def first_token_s(self) -> float:
        """Time to first token: the prompt pass (and, served, the trip to the server)."""
        return self.token_times[0] if self.token_times else float("nan")

    @property
    def tokens_per_second(self) -> float:
        """Decode speed after the first token (`decode_rate`)."""
        return decode_rate(self.token_times)

    def stats(self) -> str:
        prompt = f" after a {self.prompt_tokens}-token prompt" if self.prompt_tokens else ""
        line = (
            f"{self.new_tokens} new tokens{prompt} in {self.seconds:.1f} s (first token after "
            f"{self.first_token_s:.2f} s, then {self.tokens_per_second:.1f} tok/s)"
        )
        if self.settings.get("ignored_by_server"):
            line += f"; ignored by the server: {', '.join(self.settings['ignored_by_server'])}"
        if self.settings.get("capped_at"):
            line += f"; capped at {self.settings['capped_at']} new tokens ({MAX_TOKENS_ENV})"
        return line if self.complete else f"INCOMPLETE ({self.note}): {line}"

    def __str__(self) -> str:
        return self.text

    def candidates_per_step(self) -> list[int]:
        """How many tokens the knobs left to choose from at each step (an answer of `generate_scored`).
        With top_k=1 that is 1, except where several tokens share the best score: transformers' top-k
        keeps every token tied with the k-th best. Greedy (do_sample=False) applies no knobs: there it
        counts the tokens tied for the highest logit. Taught in 06_sampling_lab."""
        import torch

        if self.scores is None:
            raise ValueError("this answer kept no scores: generate it with generate_scored(...)")
        best = self.scores.max(dim=-1, keepdim=True).values  # [N, 1]
        greedy = not self.settings.get("do_sample", True)
        left = self.scores == best if greedy else torch.isfinite(self.scores)  # [N, V]
        return left.sum(dim=-1).tolist()

    def steps_before_a_tie(self) -> int:
        """The steps before the first one where the knobs left more than one candidate (all of them if
        none did). Sampling with top_k=1 is greedy decoding up to that step. Taught in 06_sampling_lab."""
        left = self.candidates_per_step()
        return next((i for i, n in enumerate(left) if n > 1), len(left))
