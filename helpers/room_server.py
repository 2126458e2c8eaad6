"""The room's server: transformers' own OpenAI-compatible app, run in this process behind a thin layer.
`start_local_server` (serving.py) runs it as `python -m helpers.room_server`; clients (the notebooks,
the `openai` package, curl) see the OpenAI API: GET /v1/models, POST /v1/chat/completions, GET /health.

Why a layer, and why this one. `transformers serve` (5.23) lists models by scanning the Hugging Face
cache (HTTP 500 on a machine without one, and what it lists is the cache, not the model served), names
a local model by its folder, passes `max_tokens=-5` through, and also answers /v1/completions,
/v1/responses, /load_model and /reset, so that anyone who reaches the port could load another model
into the room's memory or unload ours. Its command line has no hook for any of this. So we build its
app with its own factory (`build_server`, from the same parts its command line uses) and put a plain
ASGI wrapper, `RoomLayer`, in front: it answers /v1/models itself, checks the key (when one is set)
and each chat request, and passes only chat completions and /health on. Nothing inside transformers
is patched, and its streaming, continuous batching and errors stay its own.

The model is known to transformers by its short name: a local folder is loaded through a link of that
name in a folder of the server's own, so answers, logs and errors say `mixtral-standin`, never the
facilitator's file system.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import signal
import tempfile
import threading
import time

from .data import API_KEY_ENV

ROUTES = "GET /v1/models, POST /v1/chat/completions and GET /health"


class Refused(Exception):
    """A request the layer answers itself, with an OpenAI-shaped error: status, message, the field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "authentication_error" if self.status == 401 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _number(body: dict, key: str, low: float, high: float, allowed: str, low_open: bool = False) -> None:
    value = body.get(key)
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value != value
        or value < low
        or value > high
        or (low_open and value == low)
    ):
        raise Refused(400, f"{key}={value!r} is not allowed: {allowed}", key)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise Refused(
            400,
            f"messages={messages!r} is not allowed: send a non-empty list such as "
            '[{"role": "user", "content": "Hello"}]',
            "messages",
        )
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        parts_ok = isinstance(content, list) and all(
            isinstance(p, dict) and isinstance(p.get("type"), str) for p in content
        )
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not (content is None or isinstance(content, str) or parts_ok)
        ):
            raise Refused(
                400,
                f'messages[{i}] is not a message: use {{"role": "user", "content": "..."}} '
                f'(content a string or a list of {{"type": "text", "text": "..."}})',
                "messages",
            )


def check_chat(body, name: str, context: int, cap: int | None = None) -> dict:
    """A chat request as transformers will get it, or `Refused`: the model must be `name` (or left
    out), the messages a non-empty list, the knobs in OpenAI's ranges, `max_tokens` (and
    `max_completion_tokens`) a whole number within the model's `context`. A room's `cap` cuts longer
    requests to it (and is the default), as the notebooks' client does: the answer then ends with
    finish_reason "length"."""
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object with model and messages")
    model = body.get("model")
    if model not in (None, name):
        raise Refused(
            404,
            f"model {model!r} is not served here: this server serves {name!r} (GET /v1/models lists it)",
            "model",
            "model_not_found",
        )
    _check_messages(body.get("messages"))
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= context
        ):
            raise Refused(
                400,
                f"{key}={value!r} is not allowed: use a whole number from 1 to {context} "
                "(the model's context)",
                key,
            )
    _number(
        body, "temperature", 0, 2, "use a number from 0 to 2 (0 = greedy, 1 = the model's own distribution)"
    )
    _number(body, "top_p", 0, 1, "use a number in (0, 1] (1 = no limit)", low_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise Refused(400, f"seed={seed!r} is not allowed: use a whole number from 0 to 2**63 - 1", "seed")
    if body.get("n") not in (None, 1):
        raise Refused(
            400, f"n={body['n']!r} is not allowed: this server gives one answer per request (n=1)", "n"
        )
    if body.get("stream") not in (None, True, False):
        raise Refused(400, f"stream={body['stream']!r} is not allowed: use true or false", "stream")
    if "generation_config" in body:  # transformers' own field: it would pass max_tokens and the cap by
        raise Refused(
            400,
            "generation_config is not accepted here: use max_tokens, temperature, top_p and seed",
            "generation_config",
        )
    checked = dict(body, model=name)
    if cap is not None:
        limits = [k for k in ("max_tokens", "max_completion_tokens") if checked.get(k) is not None] or [
            "max_tokens"
        ]
        checked.update({k: min(checked.get(k) or cap, cap) for k in limits})
    return checked


async def _send_json(send, status: int, payload: dict, headers: list = ()) -> None:
    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _read_body(receive) -> bytes:
    data, more = b"", True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "the client went away before the request arrived")
        data, more = data + message.get("body", b""), message.get("more_body", False)
    return data


class RoomLayer:
    """An ASGI app in front of transformers': /v1/models, the key, each chat request checked (`check_chat`);
    chat completions and /health go on to `app`, every other route is refused (404)."""

    def __init__(self, app, name: str, context: int, cap: int | None = None, key: str | None = None):
        self.app, self.name, self.context, self.cap, self.key = app, name, context, cap, key
        self.created = int(time.time())

    def card(self) -> dict:
        owner = self.name.split("/")[0] if "/" in self.name else "mixtral-notebooks"
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": owner,
            "max_model_len": self.context,
        }

    def _authorised(self, scope) -> bool:
        given = dict(scope.get("headers", [])).get(b"authorization", b"")
        return self.key is None or hmac.compare_digest(given, f"Bearer {self.key}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["path"], scope["method"]) == ("/health", "GET"):
            return await self.app(scope, receive, send)  # lifespan (load, shutdown) and the readiness check
        path, method = scope["path"], scope["method"]
        try:
            if not self._authorised(scope):
                raise Refused(
                    401,
                    f"this server needs its API key: send the header 'Authorization: Bearer <key>' "
                    f"(openai clients: api_key=...; the notebooks: {API_KEY_ENV})",
                    code="invalid_api_key",
                )
            if method == "GET" and path == "/v1/models":
                return await _send_json(send, 200, {"object": "list", "data": [self.card()]})
            if method == "GET" and path == f"/v1/models/{self.name}":
                return await _send_json(send, 200, self.card())
            if method == "GET" and path.startswith("/v1/models/"):
                raise Refused(
                    404,
                    f"model {path[len('/v1/models/') :]!r} is not served here: this server serves "
                    f"{self.name!r}",
                    "model",
                    "model_not_found",
                )
            if method != "POST" or path != "/v1/chat/completions":
                raise Refused(404, f"{method} {path} is not served here: this server answers {ROUTES}")
            try:
                request = json.loads(await _read_body(receive))
            except ValueError as exc:
                raise Refused(400, f"the body is not valid JSON ({exc})") from None
            data = json.dumps(check_chat(request, self.name, self.context, self.cap)).encode()
        except Refused as refused:
            extra = [(b"www-authenticate", b"Bearer")] if refused.status == 401 else []
            return await _send_json(send, refused.status, refused.body(), extra)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        sent = False

        async def replay():  # the checked body once, then the client's own messages (a disconnect ends a stream)
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}

        await self.app(
            dict(scope, headers=headers + [(b"content-length", str(len(data)).encode())]), replay, send
        )


def transformers_app(model: str, dtype: str, batching: bool, cb_blocks: int):
    """transformers' FastAPI app for `model`, built from the parts its `transformers serve` command line
    uses (chat completions only: the layer refuses the other routes, so their handlers are not built)."""
    from transformers import ContinuousBatchingConfig
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.utils import GenerationState
    from transformers.utils import logging

    logging.set_verbosity_warning()
    manager = ModelManager(
        device="auto", dtype=dtype, continuous_batching=batching, force_model=model
    )  # loads it
    state = GenerationState(
        continuous_batching=batching,
        cb_config=ContinuousBatchingConfig(num_blocks=cb_blocks) if batching else None,
    )
    chat = ChatCompletionHandler(model_manager=manager, generation_state=state)
    return build_server(
        manager,
        chat,
        completion_handler=None,
        response_handler=None,
        transcription_handler=None,
        systemone_handler=None,
        generation_state=state,
    )


def watch_parent(pid: int, every_s: float = 0.5) -> threading.Thread:
    """Stop this server when process `pid`, which started it, has exited (its children then get another
    parent): uvicorn's own shutdown on SIGTERM (before uvicorn runs, SIGTERM ends the process), and if that
    has not ended it within 10 s, an exit. So a notebook kernel or test run that dies leaves no server behind."""

    def watch():
        while os.getppid() == pid:
            time.sleep(every_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        os._exit(1)

    thread = threading.Thread(target=watch, name="watch-parent", daemon=True)
    thread.start()
    return thread


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m helpers.room_server", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a local folder or a hub id already in the Hugging Face cache")
    parser.add_argument(
        "--name", required=True, help="the name clients use (a hub id, or e.g. mixtral-standin)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--one-at-a-time", action="store_true", help="no continuous batching")
    parser.add_argument("--cb-blocks", type=int, default=64, help="KV cache blocks of 256 tokens (batching)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="the room's cap: longer requests are cut"
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process (the one that started the server) exits",
    )
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model) and args.name != args.model:
        parser.error(f"a hub model is served under its hub id: --name {args.model}")
    if args.parent_pid is not None and args.parent_pid <= 0:
        parser.error(
            f"--parent-pid {args.parent_pid}: give the process id of the server's parent "
            "(a whole number >= 1)"
        )
    return args


def room_app(args: argparse.Namespace) -> RoomLayer:
    """The room's app for parsed `args` (`parse`), with the model loaded: transformers' app behind RoomLayer,
    the key from the environment (argv is visible to every user in `ps`)."""
    from transformers import AutoConfig

    served, home = args.model, os.getcwd()
    with tempfile.TemporaryDirectory(prefix="room-server-") as work:  # needed only while the model loads
        if os.path.isdir(args.model):  # transformers reads a relative folder name as a local model
            link = os.path.join(work, args.name)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.abspath(args.model), link)
            os.chdir(work)
            served = args.name
        try:
            context = AutoConfig.from_pretrained(served).max_position_embeddings
            app = transformers_app(
                served, args.dtype, not args.one_at_a_time, args.cb_blocks
            )  # loads it, for good
        finally:
            os.chdir(home)
    return RoomLayer(app, args.name, context, args.max_new_tokens, os.environ.get(API_KEY_ENV) or None)


def main(argv=None) -> None:
    args = parse(argv)
    if args.parent_pid is not None:
        watch_parent(args.parent_pid)  # from the start: a parent that dies while the model loads takes it too
    import uvicorn

    uvicorn.run(room_app(args), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
