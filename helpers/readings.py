"""What the blog's hand-written string `[INST] {prompt} [/INST]` became, stack by stack: the hub's fast
tokenizer (a reconstruction) as the May 2024 pipeline called it and as today's does, mistral-common's backend
and its reference; ids compared, tokens shown. Taught in 01_loading."""

from __future__ import annotations

import difflib
import functools

from .prompts import blog_prompt, cached_copy, reference_file, reference_ids, reference_tokenizer


@functools.cache
def hub_fast_tokenizer(*, legacy: bool = False, normalized: bool = False, add_bos_token: bool = True):
    """A reconstruction, offline, of the hub's fast tokenizer for 8x22B (its tokenizer.json).

    transformers' own conversion of the v3 SentencePiece file that mistral-common ships. By default it
    assumes: the control pieces ([INST] = 3, [/INST] = 4, ...) are special added tokens, split out of
    text before the words are tokenised; the non-legacy Metaspace pre-tokenizer (a space only becomes
    "▁" where the text has one); `<s>` added by default. The hub's files changed during 2024
    (ggerganov/llama.cpp#6947, #7969), so the keywords give the variants: `add_bos_token=False`, as the
    hub's tokenizer_config.json said in April 2024 (#6947); `legacy=True`, the normalizer transformers'
    `LlamaConverter` writes for a legacy tokenizer (a "▁" in front of every stretch of text between special
    tokens); `normalized=True`, the special tokens matched after that normalizer, as the tokenizer.json
    quoted in #7969 marks them. Used in 01_loading.
    """
    from tokenizers import AddedToken, normalizers
    from transformers import LlamaTokenizer

    folder = cached_copy(reference_file(32768), "fast-v3", "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), legacy=False, add_bos_token=add_bos_token)
    backend = tokenizer.backend_tokenizer
    if legacy:  # what LlamaConverter.normalizer returns for legacy=True, with no pre-tokenizer
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
    if normalized:
        backend.add_special_tokens(
            [
                AddedToken(t.content, special=True, normalized=True)
                for t in backend.get_added_tokens_decoder().values()
            ]
        )
    return tokenizer


def blog_readings(prompt: str) -> dict[str, list[int]]:
    """What the blog's string `[INST] {prompt} [/INST]` becomes for 8x22B, in four stacks, (a) to (d).
    Taught in 01_loading."""
    text = blog_prompt(prompt)
    return {
        "(a) May 2024 pipeline": hub_fast_tokenizer()(text, add_special_tokens=False)["input_ids"],
        "(b) today's pipeline": hub_fast_tokenizer()(text)["input_ids"],
        "(c) MistralCommonBackend": reference_tokenizer(32768)(text)["input_ids"],
        "(d) mistral-common": reference_ids(prompt, 32768),
    }


def shown_token(token: str) -> str:
    """A token as a picture shows it: its leading space (byte-level "Ġ", SentencePiece "▁") as "␣", a newline as \\n."""
    return token.replace("Ġ", "␣").replace("▁", "␣").replace("Ċ", "\\n").replace("\n", "\\n")


def compare_ids(tokenizer, columns: dict[str, list[int]]) -> str:
    """Id sequences, one line each, then how each differs from the last one (the reference).
    Taught in 01_loading."""

    def pieces(ids, with_ids=False):
        return " ".join(
            f"{t}({i})" if with_ids else t for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids))
        )

    *others, reference = columns
    ref, width = columns[reference], max(map(len, columns)) + 1
    rows = [f"{name:<{width}}{len(ids):>3} ids: {pieces(ids)}" for name, ids in columns.items()]
    for name in others:
        ids, changes = columns[name], []
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ref, ids, autojunk=False).get_opcodes():
            where = f"before {pieces(ref[i1 : i1 + 1], True)}" if i1 < len(ref) else "at the end"
            changes += {
                "delete": [f"drops {pieces(ref[i1:i2], True)}"],
                "insert": [f"adds {pieces(ids[j1:j2], True)} {where}"],
                "replace": [f"spells {pieces(ref[i1:i2], True)} as {pieces(ids[j1:j2], True)}"],
            }.get(op, [])
        rows.append(f"{name} against {reference}: " + ("; ".join(changes) or "identical"))
    return "\n".join(rows)
