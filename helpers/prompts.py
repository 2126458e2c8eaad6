"""Prompts: the blog's hand-written template, and the ids the model should really see.

The blog wraps each prompt as `[INST] {prompt} [/INST]`. For Mixtral the reference is
Mistral's own `mistral-common` package: its `encode_chat_completion` is what the model was
trained on. We feed the model `tokenizer.apply_chat_template(...)` of the tokenizer that
belongs to it, and test that, for the Mixtral models, it equals the reference id for id.
"""

from __future__ import annotations

import difflib
import functools
import shutil
from pathlib import Path

from .data import BLOG_TEMPLATE, REFERENCE_TOKENIZERS
from .files import atomic_file, cache_root


def blog_prompt(prompt: str) -> str:
    """The blog's literal prompt string, exactly as its cells build it. Taught in 01_loading."""
    return BLOG_TEMPLATE.format(prompt=prompt)


def as_messages(prompt, system: str | None = None) -> list[dict]:
    """A chat: a prompt string becomes one user turn; a list of messages passes through."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (bytes, bytearray)):
        raise TypeError(
            f"prompt is {type(prompt).__name__}, not text: decode it first, "
            f"for example prompt.decode('utf-8')"
        )
    elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        messages = [dict(m) for m in prompt]
    else:
        raise TypeError(
            f"prompt={prompt!r:.60}: give the prompt as text (a str), or a chat as a list of "
            f"{{'role': ..., 'content': ...}} messages"
        )
    if system:
        messages.insert(0, {"role": "system", "content": system})
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs a role (system/user/assistant) and text content, got {m!r}")
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise ValueError("the prompt is empty: give the model something to answer")
    return messages


def chat_ids(tokenizer, prompt, system: str | None = None) -> list[int]:
    """The ids to feed the model: the loaded tokenizer's own chat template, ready for the answer.
    Taught in 01_loading."""
    messages = as_messages(prompt, system)
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)


def turn_starts(tokenizer, prompt: str) -> dict[str, int]:
    """Where each part of a one-turn chat starts, in ids: the template's own text (for some models a
    default system prompt), the user's words, the answer. The user's words start where two one-letter prompts differ.
    Taught in 07_inside_the_moe."""
    one, other = chat_ids(tokenizer, "a"), chat_ids(tokenizer, "Z")
    user = next(i for i, (a, b) in enumerate(zip(one, other)) if a != b)
    return {"chat template": 0, "user's words": user, "answer": len(chat_ids(tokenizer, prompt))}


def reference_file(vocab_size: int) -> Path:
    """The tokenizer file that mistral-common ships for a Mixtral with this vocabulary."""
    import mistral_common

    if vocab_size not in REFERENCE_TOKENIZERS:
        raise KeyError(f"no mistral-common reference tokenizer for vocab size {vocab_size}")
    return Path(mistral_common.__file__).parent / "data" / REFERENCE_TOKENIZERS[vocab_size]


def reference_ids(prompt, vocab_size: int, system: str | None = None) -> list[int]:
    """mistral-common's `encode_chat_completion`: the ids Mistral's own stack would feed.
    Taught in 01_loading."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer = MistralTokenizer.from_file(str(reference_file(vocab_size)))
    request = ChatCompletionRequest(messages=as_messages(prompt, system))
    return tokenizer.encode_chat_completion(request).tokens


def _cached_copy(source: Path, folder: str, name: str) -> Path:
    """A cache folder holding `source` as `name`: transformers loads tokenizers from folders."""
    target = cache_root() / "tokenizers" / folder / name
    if not target.is_file():
        atomic_file(target, lambda tmp: shutil.copyfile(source, tmp))
    return target.parent


def reference_tokenizer(vocab_size: int):
    """transformers' mistral-common backend over the shipped file (offline), for the pipeline.
    Taught in 01_loading."""
    from transformers import MistralCommonBackend

    source = reference_file(vocab_size)
    version = source.name.rsplit(".", 1)[-1]  # v1, v3
    return MistralCommonBackend.from_pretrained(
        str(_cached_copy(source, version, f"tokenizer.model.{version}"))
    )


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

    folder = _cached_copy(reference_file(32768), "fast-v3", "tokenizer.model")
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
