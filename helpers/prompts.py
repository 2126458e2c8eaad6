"""Prompts: the blog's hand-written template, and the ids the model should really see.

The blog wraps each prompt as `[INST] {prompt} [/INST]`. For Mixtral the reference is
Mistral's own `mistral-common` package: its `encode_chat_completion` is what the model was
trained on. We feed the model `tokenizer.apply_chat_template(...)` of the tokenizer that
belongs to it, and test that, for the Mixtral models, it equals the reference id for id.
"""

from __future__ import annotations

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


def cached_copy(source: Path, folder: str, name: str) -> Path:
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
        str(cached_copy(source, version, f"tokenizer.model.{version}"))
    )
