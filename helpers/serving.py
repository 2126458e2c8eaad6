"""One model for the whole room: the same `generate` and panel against an OpenAI-compatible server.

Set MIXTRAL_ENDPOINT (for example http://gpu-node:8000/v1), optionally MIXTRAL_API_KEY and
MIXTRAL_ENDPOINT_MODEL, and `load_pipeline()` returns an `Endpoint` instead of loading weights.
`start_local_server()` runs `transformers serve` with the stand-in on loopback (make serve)."""
from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

ENDPOINT_ENV, KEY_ENV, MODEL_ENV = "MIXTRAL_ENDPOINT", "MIXTRAL_API_KEY", "MIXTRAL_ENDPOINT_MODEL"


class EndpointError(RuntimeError):
    """The server could not answer; the message says why and what to check."""


@dataclass
class Endpoint:
    base_url: str
    model: str
    api_key: str = "none"
    timeout: float = 300.0
    refused: set = field(default_factory=set)  # knobs this server rejected; sent no more

    @classmethod
    def from_env(cls) -> "Endpoint":
        url = os.environ.get(ENDPOINT_ENV, "").strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise EndpointError(f"{ENDPOINT_ENV}={url!r} is not a URL: use for example http://gpu-node:8000/v1")
        endpoint = cls(url, os.environ.get(MODEL_ENV, "").strip(), os.environ.get(KEY_ENV, "none") or "none")
        if not endpoint.model:
            endpoint.model = endpoint.served_models()[0]
        return endpoint

    def __repr__(self) -> str:
        return f"Endpoint({self.base_url}, model={self.model!r})"

    def _client(self, timeout=None):
        import openai
        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=timeout or self.timeout,
                             max_retries=0)

    def served_models(self) -> list[str]:
        try:
            models = [m.id for m in self._client(timeout=10).models.list().data]
        except Exception as exc:  # noqa: BLE001 - explained below
            raise EndpointError(f"could not list the models of {self.base_url} ({_reason(exc, self)}); "
                                f"set {MODEL_ENV} to the model name the server serves") from None
        if not models:
            raise EndpointError(f"{self.base_url} serves no model; set {MODEL_ENV}")
        return models

    def request(self, max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=None):
        """The knobs as an OpenAI request, and the knobs the server will not see."""
        body, extra, ignored = {"max_tokens": max_new_tokens}, {}, []
        if do_sample:
            body.update(temperature=temperature, top_p=top_p)
            if top_k:
                extra["top_k"] = top_k  # not in the OpenAI API; vLLM accepts it, some servers refuse it
        else:
            body.update(temperature=0.0)  # greedy, in OpenAI terms
        if seed is not None:
            body["seed"] = seed
        for knob in list(extra):
            if knob in self.refused:
                ignored.append(knob)
                extra.pop(knob)
        for knob in list(body):
            if knob in self.refused:
                ignored.append(knob)
                body.pop(knob)
        if extra:
            body["extra_body"] = extra
        return body, ignored

    def stream(self, messages, knobs: dict, on_text=None, should_stop=None):
        """Stream an answer; returns (text, chunks, complete, note, ignored knobs, first-token time)."""
        body, ignored = self.request(**knobs)
        try:
            response = self._client().chat.completions.create(model=self.model, messages=messages, stream=True, **body)
        except Exception as exc:  # noqa: BLE001
            refused = _refused_fields(exc)
            sent = set(body) | set(body.get("extra_body", {}))
            if refused & sent:  # the server named knobs it does not take: drop them, try again
                self.refused |= refused
                return self.stream(messages, knobs, on_text, should_stop)
            raise EndpointError(_reason(exc, self)) from None
        text, chunks, first, complete, note = "", 0, None, True, ""
        try:
            for chunk in response:
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    first = first or time.perf_counter()
                    text += piece
                    chunks += 1
                    if on_text:
                        on_text(text)
                if should_stop and should_stop():
                    response.close()
                    note = "stopped"
                    break
        except Exception as exc:  # noqa: BLE001 - a stream cut mid-answer keeps what arrived
            if not chunks:
                raise EndpointError(_reason(exc, self)) from None
            complete, note = False, f"the stream was cut after {chunks} chunks ({_reason(exc, self)})"
        return text, chunks, complete, note, ignored, first


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
        return f"{url} refused the API key: set {KEY_ENV} to the key the server expects"
    if isinstance(exc, openai.NotFoundError):
        detail = str(getattr(exc, "body", "") or "")
        if "model" in detail.lower():
            return f"{url} does not serve model {endpoint.model!r}: {detail[:200]}"
        return f"{url} has no chat endpoint (HTTP 404): the URL usually ends in /v1"
    if isinstance(exc, openai.APIStatusError):
        detail = exc.body.get("detail", exc.body) if isinstance(exc.body, dict) else exc.body
        if endpoint.model in str(detail) or "model" in str(detail).lower():
            return f"the server does not serve model {endpoint.model!r}: {str(detail)[:200]}"
        return f"HTTP {exc.status_code} from {url}: {str(detail)[:200]}"
    return f"{type(exc).__name__}: {exc}"


def endpoint_generate(endpoint: Endpoint, messages, knobs: dict, seed=None):
    from .generation import Answer
    started = time.perf_counter()
    text, chunks, complete, note, ignored, _ = endpoint.stream(messages, dict(knobs, seed=seed))
    settings = dict(knobs, seed=seed, ignored_by_server=ignored)
    return Answer(text=text.strip(), new_tokens=chunks, prompt_tokens=0, seconds=time.perf_counter() - started,
                  settings=settings, complete=complete, note=note)


# ---------------------------------------------------------------- a local server for the room

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalServer:
    process: subprocess.Popen
    url: str
    model: str
    log: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def env(self) -> dict:
        return {ENDPOINT_ENV: self.url, MODEL_ENV: self.model}


def start_local_server(model: str | None = None, port: int | None = None, dtype: str | None = None,
                       wait_s: float = 180, host: str = "127.0.0.1") -> LocalServer:
    """`transformers serve` on `host` (loopback by default) with the stand-in (or `model`),
    ready when this returns. For a room, host="0.0.0.0" lets other machines connect."""
    from .hardware import pick_dtype
    from .models import model_path
    model = model or model_path()
    port = port or free_port()
    dtype = dtype or str(pick_dtype()[0]).replace("torch.", "")
    log = os.path.join(os.path.dirname(model.rstrip("/")) or ".", f"serve-{port}.log")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    cli = os.path.join(os.path.dirname(sys.executable), "transformers")
    process = subprocess.Popen([cli, "serve", "--host", host, "--port", str(port), "--dtype", dtype,
                                "--device", "auto", "--log-level", "warning", model],
                               stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = LocalServer(process, f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/v1", model, log)
    atexit.register(server.stop)  # a kernel that exits takes its server with it
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise EndpointError(f"transformers serve exited ({process.returncode}); see {log}")
        try:
            urllib.request.urlopen(server.url.replace("/v1", "/health"), timeout=2)
            # the model loads with the first request: make one now so the room does not wait
            Endpoint(server.url, model).stream([{"role": "user", "content": "Hi"}], dict(max_new_tokens=1))
            return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise EndpointError(f"transformers serve did not answer within {wait_s:.0f} s; see {log}")


def serve_forever(host: str = "127.0.0.1", port: int = 8000) -> int:
    """`make serve`: start the server, say what to set in the notebooks, run until Ctrl-C."""
    def interrupt(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops the server too, not only Ctrl-C
    print(f"starting transformers serve with the stand-in on {host}:{port} (the model loads first)...", flush=True)
    server = start_local_server(port=port, host=host)
    where = socket.gethostname() if host in ("0.0.0.0", "::") else "127.0.0.1"
    print(f"\nready. In the notebooks' environment (before `make lab`), set:\n"
          f"    export {ENDPOINT_ENV}=http://{where}:{port}/v1\n    export {MODEL_ENV}={server.model}\n"
          f"log: {server.log}. Ctrl-C stops the server.", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
