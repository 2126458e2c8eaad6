"""Check the answers instead of calling them "accurate" by eye.

- code: extract the function from the answer, and the edit-distance suite to test it against
  (sandbox.py runs it, never in the notebook's own process);
- translation: chrF against a public-domain English translation;
- jokes: distinct-n and duplicates across several samples.
"""

from __future__ import annotations

import random
import re

from .data import LONGFELLOW

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(answer: str) -> str | None:
    """The Python code in a model's answer: fenced blocks (python first), else an unfenced
    `def` with its indented body. None if there is no code. Taught in 03_code."""
    blocks = [(lang.lower(), body) for lang, body in FENCE.findall(answer)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    untagged = [body for lang, body in blocks if lang == ""]
    chosen = python or untagged
    if chosen:
        return "\n\n".join(b.strip("\n") for b in chosen) + "\n"
    if blocks:  # only blocks tagged as another language
        return None
    lines, code, inside = answer.splitlines(), [], False
    for line in lines:
        if re.match(r"(def|class|import|from)\s", line):
            inside = True
        elif inside and line.strip() and not line.startswith((" ", "\t")):
            inside = False
        if inside:
            code.append(line)
    return "\n".join(code).strip("\n") + "\n" if code else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, replace), the package's own reference: one row of
    the dynamic-programming table at a time."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_distance_cases(random_pairs: int = 20, seed: int = 0) -> list[tuple[str, str, int]]:
    """The classic cases plus seeded random pairs, each with the reference answer. Taught in 03_code."""
    classic = [
        ("horse", "ros"),
        ("intention", "execution"),
        ("", ""),
        ("", "abc"),
        ("abc", ""),
        ("same", "same"),
        ("kitten", "sitting"),
        ("flaw", "lawn"),
        ("a", "b"),
        ("café", "cafe"),
        ("naïve", "naive"),
        ("日本語", "日本"),
        ("🙂🙃", "🙃🙂"),
    ]
    rng = random.Random(seed)
    letters = "abcde"
    pairs = classic + [
        (
            "".join(rng.choices(letters, k=rng.randint(0, 8))),
            "".join(rng.choices(letters, k=rng.randint(0, 8))),
        )
        for _ in range(random_pairs)
    ]
    return [(a, b, edit_distance(a, b)) for a, b in pairs]


def chrf(hypothesis: str, reference: str = LONGFELLOW) -> float:
    """chrF (character n-gram F-score, 0-100) of one translation against one reference.
    Taught in 05_translation."""
    import sacrebleu

    if not isinstance(hypothesis, str):
        raise TypeError(f"chrF scores text, got {type(hypothesis).__name__}")
    return sacrebleu.sentence_chrf(" ".join(hypothesis.split()), [" ".join(reference.split())]).score


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / all n-grams over `texts` (1.0: nothing repeats; near 0: one phrase again and again)."""
    grams = [g for t in texts for g in _ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def duplicate_lines(texts: list[str]) -> int:
    """How many non-empty lines (jokes, mostly) appear more than once across `texts`, counted per extra copy."""
    lines = [" ".join(line.lower().split()) for t in texts for line in t.splitlines() if line.strip()]
    return len(lines) - len(set(lines))


def diversity(texts: list[str]) -> dict:
    """How varied several sampled answers are: distinct 1-, 2- and 3-grams, and repeated lines.
    Taught in 04_jokes."""
    return {
        "samples": len(texts),
        "distinct-1": distinct_n(texts, 1),
        "distinct-2": distinct_n(texts, 2),
        "distinct-3": distinct_n(texts, 3),
        "duplicate lines": duplicate_lines(texts),
    }
