"""One model for the whole room: transformers' server with the stand-in (room_server.py), for `make serve` and 09.

Notebooks reach it (or a vLLM server with the real model) through `backends.Endpoint`: set
MIXTRAL_ENDPOINT (for example http://gpu-node:8000/v1), optionally MIXTRAL_API_KEY and
MIXTRAL_ENDPOINT_MODEL, and `load_pipeline()` connects instead of loading weights."""

from __future__ import annotations

import atexit
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .backends import Endpoint, EndpointError
from .data import (
    API_KEY_ENV,
    ENDPOINT_ENV,
    ENDPOINT_MODEL_ENV,
    KNOWN_MODELS,
    MAX_TOKENS_ENV,
    TASKS,
    whole_number,
)
from .files import cache_root
from .generation import generate, generate_batch
from .hardware import dtype_name
from .loading import model_path, pick_dtype
from .standin import standin_dir

STANDIN_NAME = "mixtral-standin"  # what clients call the stand-in: short, and no facilitator's folder in it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalServer:
    process: subprocess.Popen
    url: str
    model: str  # the name clients use: mixtral-standin, or the hub id
    log: str
    api_key: str | None = field(default=None, repr=False)
    max_new_tokens: int | None = None  # the room's cap: the server cuts longer requests to it

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def peak_mib(self) -> int | None:
        """The server process's peak resident memory so far, in MiB (Linux: /proc), else None."""
        try:
            with open(f"/proc/{self.process.pid}/status") as status:
                return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM"))
        except (OSError, StopIteration):
            return None

    def cpu_s(self) -> float | None:
        """CPU seconds the server process has used so far, all its threads together (Linux: /proc), else None.
        Unlike the wall clock, it barely moves when other programs share the machine's cores."""
        try:
            with open(f"/proc/{self.process.pid}/stat") as stat:
                fields = (
                    stat.read().rsplit(")", 1)[1].split()
                )  # after the name: state, ppid, ... utime, stime
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def env(self) -> dict:
        """What a notebook sets to use this server: its address, its model's name, its key and cap if any."""
        return {
            ENDPOINT_ENV: self.url,
            ENDPOINT_MODEL_ENV: self.model,
            **({API_KEY_ENV: self.api_key} if self.api_key else {}),
            **({MAX_TOKENS_ENV: str(self.max_new_tokens)} if self.max_new_tokens else {}),
        }


def served_name(model: str) -> str:
    """The name clients ask for: a hub id as it is; the stand-in `mixtral-standin`; a folder named like a
    known model its hub id (a download of Mixtral-8x22B-Instruct-v0.1 answers as mistralai/...); any other
    folder its own name."""
    if not os.path.isdir(model):
        return model
    folder = Path(model).resolve()
    if folder == standin_dir().resolve():
        return STANDIN_NAME
    known = {hub_id.split("/")[1]: hub_id for hub_id in KNOWN_MODELS}
    return known.get(folder.name, re.sub(r"[^A-Za-z0-9._-]", "-", folder.name))


SERVER_WAIT_S = 180  # how long start_local_server waits for the server's first answer
CB_BLOCKS = 64  # the server's KV cache, in blocks of 256 tokens: left to itself, transformers takes 60% of a CPU's RAM


@dataclass(frozen=True)
class Room:
    """Who can reach a served model and what it allows: the address it listens on (`host`: loopback by default;
    "0.0.0.0" lets other machines connect; `port`: a free one by default), the room's cap on new tokens per
    answer (longer requests are cut to it) and its key (the server answers only requests that carry it,
    Authorization: Bearer <key>). Checked when made."""

    host: str = "127.0.0.1"
    port: int | None = None
    max_new_tokens: int | None = None
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.max_new_tokens is not None:
            whole_number(
                "max_new_tokens", self.max_new_tokens, 1, " (the room's cap on new tokens per answer)"
            )
        key = self.api_key
        if key is not None and (not isinstance(key, str) or not key.strip() or key.strip() != key):
            raise ValueError(
                "api_key must be a non-empty string without spaces around it (or None for no key)"
            )


def start_local_server(
    model: str | None = None, dtype: str | None = None, batching: bool = True, room: Room = Room()
) -> LocalServer:
    """transformers' OpenAI-compatible server (room_server.py) with the stand-in (or `model`), reachable and
    limited as `room` says, ready when this returns; clients ask for `server.model` (`served_name`).
    `batching`: continuous batching (paged attention), so that concurrent requests share each decode step;
    False serves one request at a time. Taught in 09_serving."""
    model = model or model_path()
    model = (
        os.path.abspath(model) if os.path.isdir(model) else model
    )  # the server runs in a folder of its own
    host, port = room.host, room.port or free_port()
    max_new_tokens, api_key = room.max_new_tokens, room.api_key
    dtype = dtype or dtype_name(pick_dtype()[0])
    cache_root().mkdir(parents=True, exist_ok=True)
    log = str(cache_root() / f"serve-{port}.log")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.pop(API_KEY_ENV, None)  # the server's key is `api_key`, never a client's key left in this environment
    if api_key:
        env[API_KEY_ENV] = api_key  # the environment, not argv: every user can read argv with `ps`
    name = served_name(model)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "helpers.room_server",
            model,
            "--name",
            name,
            "--host",
            host,
            "--port",
            str(port),
            "--dtype",
            dtype,
            "--cb-blocks",
            str(CB_BLOCKS),
            "--parent-pid",
            str(os.getpid()),
        ]  # it exits when this process does
        + ([] if batching else ["--one-at-a-time"])
        + (["--max-new-tokens", str(max_new_tokens)] if max_new_tokens else []),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    server = LocalServer(
        process,
        f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/v1",
        name,
        log,
        api_key,
        max_new_tokens,
    )
    atexit.register(server.stop)  # a kernel that exits takes its server with it
    deadline = time.time() + SERVER_WAIT_S
    while time.time() < deadline:
        if process.poll() is not None:
            raise EndpointError(f"the server exited ({process.returncode}); see {log}")
        try:
            urllib.request.urlopen(server.url.replace("/v1", "/health"), timeout=2)
            # the first request starts the batching worker: make one now so the room does not wait
            Endpoint(server.url, name, api_key or "none").answer(
                [{"role": "user", "content": "Hi"}], dict(max_new_tokens=1)
            )
            return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise EndpointError(f"the server did not answer within {SERVER_WAIT_S} s; see {log}")


def _send(endpoint, prompts: list, max_new_tokens: int, one_at_a_time: bool) -> tuple[list, list]:
    """The answers, and when each request was sent (seconds after the first): all at once, or each after
    the previous answer. Request i has seed i either way (as generate_batch gives them)."""
    if not one_at_a_time:
        return generate_batch(endpoint, prompts, max_new_tokens, seed=0), [0.0] * len(prompts)
    answers, sent, started = [], [], time.perf_counter()
    for i, prompt in enumerate(prompts):
        sent.append(time.perf_counter() - started)
        answers.append(generate(endpoint, prompt, max_new_tokens=max_new_tokens, seed=i))
    return answers, sent


def room_load(
    endpoint,
    users=(1, 4, 16, 30),
    max_new_tokens: int = 24,
    one_at_a_time: bool = False,
    server: LocalServer | None = None,
) -> list[dict]:
    """For each room size n: n users send the blog's prompts (request i: prompt i mod 4) at once, or with
    `one_at_a_time` one after another, each user waiting for the previous user's answer: the queue a server
    without batching makes, measured on the same server. What the server gives in all (tok/s), and what
    each user waits from the moment the room sends: first token, whole answer. With `server` (the
    LocalServer behind `endpoint`), also the CPU seconds it spent on the room (`cpu_s`) and `tokens_per_cpu_s`.
    Taught in 09_serving."""
    if server is not None and not isinstance(server, LocalServer):
        raise TypeError(
            f"server: give the LocalServer behind the endpoint (start_local_server), not {server!r}"
        )
    prompts = [task["prompt"] for task in TASKS.values()]
    rows = []
    for n in users:
        whole_number("users", n, 1)
        cpu = server.cpu_s() if server else None
        started = time.perf_counter()
        answers, sent = _send(
            endpoint, [prompts[i % len(prompts)] for i in range(n)], max_new_tokens, one_at_a_time
        )
        seconds, tokens = time.perf_counter() - started, sum(a.new_tokens for a in answers)
        first = [s + a.first_token_s for s, a in zip(sent, answers)]
        row = dict(
            users=n,
            seconds=seconds,
            tokens=tokens,
            tokens_per_s=tokens / seconds,
            first_token_mean_s=sum(first) / n,
            first_token_max_s=max(first),
            answer_max_s=max(s + a.seconds for s, a in zip(sent, answers)),
            complete=all(a.complete for a in answers),
        )
        if cpu is not None:
            spent = server.cpu_s() - cpu
            row.update(cpu_s=spent, tokens_per_cpu_s=tokens / spent if spent > 0 else float("nan"))
        rows.append(row)
    return rows
