"""What answers: a model loaded here, or a served endpoint, behind one call.

Both answer `backend.answer(messages, knobs, seed, on_text, should_stop) -> Answer` and
`backend.answer_batch(chats, knobs, seed) -> [Answer]`, so `generate`, the panel and the
notebooks never ask which one they hold. `load_local` loads weights (loading.py), `connect`
reaches a server, and `load_pipeline` picks one from the environment ($MIXTRAL_ENDPOINT).
What they answer, and its one clock, is in answers.py.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from .answers import Answer, TokenClock

from .data import API_KEY_ENV, ENDPOINT_ENV, ENDPOINT_MODEL_ENV, MAX_TOKENS_ENV, whole_number
from .fastpath import sampler
from .hardware import dtype_name
from .loading import load_local
from .prompts import chat_ids


def left_padded(rows: list, pad: int, device="cpu"):
    """Token-id lists of different lengths as one batch, padded on the left so that every row's
    next token comes at the same position: (input_ids [B, T], attention_mask [B, T])."""
    import torch

    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


class LocalModel:
    """A loaded transformers pipeline (or a bare model), answering like a served endpoint.
    `run` holds the package's one `model.generate` call."""

    def __init__(self, pipe=None, model=None, tokenizer=None):
        self.pipe = pipe
        self.model = model if model is not None else pipe.model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(pipe, "tokenizer", None)

    def pad_id(self) -> int:
        """The padding id generate() needs: the tokenizer's own, else its end-of-sequence id."""
        t = self.tokenizer
        if t is None:  # a bare model: its own end-of-sequence id
            eos = self.model.generation_config.eos_token_id
            return (eos[0] if isinstance(eos, list) else eos) or 0
        return t.pad_token_id if t.pad_token_id is not None else t.eos_token_id

    def room(self, messages) -> int | None:
        """Tokens the model's context leaves for the answer; a ValueError if the prompt alone fills it."""
        length = len(chat_ids(self.tokenizer, messages))
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context is not None and length >= context:
            raise ValueError(
                f"the prompt is {length} tokens long and the model's context holds {context}: "
                f"shorten the prompt (or load a model with a longer context)"
            )
        return context - length if context is not None else None

    def answer(self, messages, knobs: dict, seed=None, on_text=None, should_stop=None) -> Answer:
        return self.run([chat_ids(self.tokenizer, messages)], knobs, seed, on_text, should_stop)[0]

    def answer_batch(self, chats: list, knobs: dict, seed=None) -> list[Answer]:
        return self.run([chat_ids(self.tokenizer, m) for m in chats], knobs, seed)

    def run(
        self, rows: list, knobs: dict, seed=None, on_text=None, should_stop=None, keep_scores=False
    ) -> list[Answer]:
        """Encoded prompts in, Answers out: pad, seed, generate (the one call), split the new tokens."""
        import torch
        from transformers import StoppingCriteriaList

        pad = self.pad_id()
        input_ids, mask = left_padded(rows, pad, self.model.device)  # [B, T]
        clock = TokenClock(self.tokenizer, on_text if len(rows) == 1 else None)
        stop = (
            StoppingCriteriaList(
                [
                    lambda ids, scores, **_: torch.full(  # end after this token once should_stop()
                        (ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=ids.device
                    )
                ]
            )
            if should_stop
            else None
        )
        record = getattr(self.model, "load_record", None)
        recipe = record.recipe if record is not None else None  # None: the blog's pipeline, run as it is
        # one sequence, a layer-by-layer step kept: the static cache it runs on (decode.use_graph_step)
        kept = recipe is not None and recipe.step.get("kept") and len(rows) == 1
        cache = {"cache_implementation": "static"} if kept and "past_key_values" not in knobs else {}
        to_generate = sampler(knobs) if recipe is not None else knobs  # the fast path's sampler
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():  # no version counters or view tracking (make bench: against no_grad)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                pad_token_id=pad,
                streamer=clock,
                stopping_criteria=stop,
                return_dict_in_generate=True,
                output_scores=keep_scores,
                **(cache | to_generate),  # a cache the caller names wins
            )
        seconds = time.perf_counter() - clock.started
        times = [t - clock.started for t in clock.times]
        scores = torch.stack(out.scores, dim=1).float() if keep_scores else None  # [B, new, V]
        answers, eos = [], getattr(self.tokenizer, "eos_token_id", None)
        for i, ids in enumerate(rows):
            new = out.sequences[i, input_ids.shape[1] :].tolist()
            if len(rows) > 1 and eos in new:  # finished early: the rest is padding
                new = new[: new.index(eos) + 1]
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip() if self.tokenizer else ""
            answers.append(
                Answer(
                    text=text,
                    new_tokens=len(new),
                    prompt_tokens=len(ids),
                    seconds=seconds,
                    settings=dict(knobs, seed=seed),
                    token_ids=new,
                    token_times=times,
                    scores=scores[i] if scores is not None else None,
                )
            )
        return answers

    def describe(self, detail: bool = False) -> str:
        m, record = self.model, getattr(self.model, "load_record", None)  # None: a pipeline made elsewhere
        recipe = record.recipe if record is not None else None
        name = str(getattr(m, "name_or_path", "") or "").rstrip("/").split("/")[-1] or type(m).__name__
        weights = record.weights() if record is not None else ""
        if not weights and any(d == "disk" for d in (getattr(m, "hf_device_map", None) or {}).values()):
            weights = ", part offloaded to disk"
        line = f"local: {name} ({type(m).__name__}, {dtype_name(m.dtype)}{weights}, on {m.device}), " + (
            "the notebooks' fast path" if recipe is not None else "the blog's plain pipeline"
        )
        if not detail:
            return line + (" (08_performance explains it)" if recipe is not None else "")
        if recipe is not None:
            return f"{line}\n{recipe.describe(record.fit_reason())}"
        return line + (f"\n  - dtype: {record.dtype_reason}" if record is not None else "")


class EndpointError(RuntimeError):
    """The server could not answer; the message says why and what to check. Taught in 09_serving."""


@dataclass
class Endpoint:
    """An OpenAI-compatible server (vLLM, `transformers serve`), answering like a local model.
    Taught in 09_serving."""

    base_url: str
    model: str
    api_key: str = "none"
    timeout: float = 300.0
    refused: set = field(default_factory=set)  # knobs this server rejected; sent no more
    max_new_tokens: int | None = None  # a room's cap: longer requests are cut to it, and the answer says so

    def __repr__(self) -> str:
        return f"Endpoint({self.base_url}, model={self.model!r})"

    def _client(self, timeout=None):
        import openai

        return openai.OpenAI(
            base_url=self.base_url, api_key=self.api_key, timeout=timeout or self.timeout, max_retries=0
        )

    def served_models(self) -> list[str]:
        try:
            models = [m.id for m in self._client(timeout=10).models.list().data]
        except Exception as exc:  # noqa: BLE001 - explained below
            raise EndpointError(
                f"could not list the models of {self.base_url} ({_reason(exc, self)}); "
                f"set {ENDPOINT_MODEL_ENV} to the model name the server serves"
            ) from None
        if not models:
            raise EndpointError(f"{self.base_url} serves no model; set {ENDPOINT_MODEL_ENV}")
        return models

    def request(self, max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=None):
        """The knobs as an OpenAI request, and the knobs the server will not see."""
        body = {"max_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0}  # 0: greedy
        if do_sample:
            body["top_p"] = top_p
        if seed is not None:
            body["seed"] = seed
        extra = {"top_k": top_k} if do_sample and top_k else {}  # not in the OpenAI API; vLLM takes it
        ignored = sorted(k for k in (*body, *extra) if k in self.refused)
        body = {k: v for k, v in body.items() if k not in self.refused}
        extra = {k: v for k, v in extra.items() if k not in self.refused}
        return (dict(body, extra_body=extra) if extra else body), ignored

    def room(self, messages) -> None:
        return None  # the server counts the prompt

    def answer(self, messages, knobs: dict, seed=None, on_text=None, should_stop=None) -> Answer:
        """Stream an answer; a stream cut mid-answer keeps what arrived (complete=False, and why)."""
        cap = (
            self.max_new_tokens
            if self.max_new_tokens and knobs["max_new_tokens"] > self.max_new_tokens
            else None
        )
        body, ignored = self.request(**dict(knobs, max_new_tokens=cap or knobs["max_new_tokens"]), seed=seed)
        started = time.perf_counter()
        try:
            response = self._client().chat.completions.create(
                model=self.model, messages=messages, stream=True, **body
            )
        except Exception as exc:  # noqa: BLE001
            refused = _refused_fields(exc)
            if refused & (
                set(body) | set(body.get("extra_body", {}))
            ):  # knobs it does not take: drop them, retry
                self.refused |= refused
                return self.answer(messages, knobs, seed, on_text, should_stop)
            raise EndpointError(_reason(exc, self)) from None
        text, times, complete, note = "", [], True, ""
        try:
            for chunk in response:
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    times.append(time.perf_counter() - started)
                    text += piece
                    if on_text:
                        on_text(text)
                if should_stop and should_stop():
                    response.close()
                    note = "stopped"
                    break
        except Exception as exc:  # noqa: BLE001 - a stream cut mid-answer keeps what arrived
            if not times:
                raise EndpointError(_reason(exc, self)) from None
            complete, note = False, f"the stream was cut after {len(times)} chunks ({_reason(exc, self)})"
        return Answer(
            text=text.strip(),
            new_tokens=len(times),
            prompt_tokens=0,
            seconds=time.perf_counter() - started,
            settings=dict(knobs, seed=seed, ignored_by_server=ignored, capped_at=cap),
            complete=complete,
            note=note,
            token_times=times,
        )

    def answer_batch(self, chats: list, knobs: dict, seed=None) -> list[Answer]:
        """Concurrent requests, one per chat (the server batches them); request i gets seed + i."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(chats)) as pool:
            return list(
                pool.map(
                    lambda i: self.answer(chats[i], knobs, None if seed is None else seed + i),
                    range(len(chats)),
                )
            )

    def describe(self, detail: bool = False) -> str:
        return f"served: {self.model} at {self.base_url}"


def _refused_fields(exc) -> set:
    body = str(getattr(exc, "body", "") or exc)
    found = re.search(r"Unexpected fields in the request: \{([^}]*)\}", body)
    return {f.strip(" '\"") for f in found.group(1).split(",")} if found else set()


def _reason(exc, endpoint) -> str:
    """A plain sentence for what went wrong, with what to check."""
    import openai

    url = endpoint.base_url
    if isinstance(exc, openai.APITimeoutError):
        return f"no answer from {url} within {endpoint.timeout:g} s: the server is busy or stuck"
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot reach {url}: is the server running, and is {ENDPOINT_ENV} right?"
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return f"{url} refused the API key: set {API_KEY_ENV} to the key the server expects"
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        detail = str(body.get("message", body.get("detail", exc.body)))
        if "message" in body:  # an OpenAI-shaped error names the field it refuses
            about_model = exc.param == "model" or exc.code == "model_not_found"
        else:
            about_model = "model" in detail.lower() or bool(endpoint.model) and endpoint.model in detail
        if about_model:
            return f"{url} does not serve model {endpoint.model!r}: {detail[:200]}"
        if isinstance(exc, openai.NotFoundError):
            return f"{url} has no chat endpoint (HTTP 404): the URL usually ends in /v1"
        return f"HTTP {exc.status_code} from {url}: {detail[:200]}"
    return f"{type(exc).__name__}: {exc}"


def connect(url: str | None = None, model: str | None = None, api_key: str | None = None) -> Endpoint:
    """An Endpoint for a served model: `url` or $MIXTRAL_ENDPOINT; the model named, or the first it serves."""
    url = (url or os.environ.get(ENDPOINT_ENV, "")).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise EndpointError(f"{ENDPOINT_ENV}={url!r} is not a URL: use for example http://gpu-node:8000/v1")
    cap = os.environ.get(MAX_TOKENS_ENV, "").strip()
    endpoint = Endpoint(
        url,
        model or os.environ.get(ENDPOINT_MODEL_ENV, "").strip(),
        api_key or os.environ.get(API_KEY_ENV, "none") or "none",
        max_new_tokens=whole_number(
            MAX_TOKENS_ENV, int(cap) if cap.isdigit() else cap, 1, " (new tokens per served answer)"
        )
        if cap
        else None,
    )
    if not endpoint.model:
        endpoint.model = endpoint.served_models()[0]
    return endpoint


def load_pipeline(
    name: str | None = None,
    dtype=None,
    fit=None,
    fast: bool = True,
    device_map="auto",
    compiled: bool = False,
):
    """What the notebooks call: with $MIXTRAL_ENDPOINT set and no `name`, `connect()` to that server (settings of
    how weights load here refused); else `load_local(name, dtype, fit, fast, device_map, compiled)`, the blog's
    pipeline call (`fit`: None, Fit.quantized / .budget / .expert_cache). `generate`, `describe` and the panel take either. To look inside
    the model, name it: `load_pipeline(model_path())`. Taught in 02_poem; 01_loading shows the blog's own call."""
    if name is None and os.environ.get(ENDPOINT_ENV, "").strip():
        here = dict(
            fit=(fit, None),
            dtype=(dtype, None),
            fast=(fast, True),
            device_map=(device_map, "auto"),
            compiled=(compiled, False),
        )
        if asked := [k for k, (v, plain) in here.items() if v != plain]:
            raise ValueError(
                f"{', '.join(f'{k}={here[k][0]!r}' for k in asked)}: how weights load here, and {ENDPOINT_ENV} names "
                f"a server. Set that on the server, or load here: load_pipeline(model_path(), {'=..., '.join(asked)}=...)"
            )
        return connect()
    return load_local(name, dtype=dtype, fit=fit, fast=fast, device_map=device_map, compiled=compiled)


def as_backend(pipe):
    """Anything that answers (an Endpoint, a LocalModel) as it is; a loaded pipeline as a LocalModel."""
    if hasattr(pipe, "answer"):
        return pipe
    if hasattr(pipe, "model") and hasattr(pipe, "tokenizer"):
        return LocalModel(pipe)
    raise TypeError(f"{type(pipe).__name__} does not answer prompts: pass what load_pipeline() returned")


def describe(pipe, detail: bool = False) -> str:
    """One line on what answers: a served endpoint, or the local model, its dtype and device;
    `detail=True` adds the fast path's settings and why this machine gets them. Taught in 02_poem."""
    return as_backend(pipe).describe(detail)
