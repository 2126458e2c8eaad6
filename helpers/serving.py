"""One model for the whole room: `transformers serve` with the stand-in, for `make serve` and 09.

Notebooks reach it (or a vLLM server with the real model) through `backends.Endpoint`: set
MIXTRAL_ENDPOINT (for example http://gpu-node:8000/v1), optionally MIXTRAL_API_KEY and
MIXTRAL_ENDPOINT_MODEL, and `load_pipeline()` connects instead of loading weights."""
from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from .backends import Endpoint, EndpointError
from .data import ENDPOINT_ENV, ENDPOINT_MODEL_ENV, TASKS, whole_number
from .generation import generate_batch
from .hardware import pick_dtype
from .loading import model_path

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

    def peak_mib(self) -> int | None:
        """The server process's peak resident memory so far, in MiB (Linux: /proc), else None."""
        try:
            with open(f"/proc/{self.process.pid}/status") as status:
                return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM"))
        except (OSError, StopIteration):
            return None

    def env(self) -> dict:
        return {ENDPOINT_ENV: self.url, ENDPOINT_MODEL_ENV: self.model}


def start_local_server(model: str | None = None, port: int | None = None, dtype: str | None = None,
                       wait_s: float = 180, host: str = "127.0.0.1", batching: bool = True,
                       cb_blocks: int = 64) -> LocalServer:
    """`transformers serve` on `host` (loopback by default) with the stand-in (or `model`),
    ready when this returns. For a room, host="0.0.0.0" lets other machines connect.
    `batching`: continuous batching (paged attention), so that concurrent requests share each
    decode step; False serves one request at a time. Its KV cache holds `cb_blocks` x 256 tokens:
    left to itself, transformers sizes it at 60% of a CPU machine's RAM."""
    model = model or model_path()
    port = port or free_port()
    dtype = dtype or str(pick_dtype()[0]).replace("torch.", "")
    log = os.path.join(os.path.dirname(model.rstrip("/")) or ".", f"serve-{port}.log")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    cli = os.path.join(os.path.dirname(sys.executable), "transformers")
    process = subprocess.Popen([cli, "serve", "--host", host, "--port", str(port), "--dtype", dtype,
                                "--device", "auto", "--log-level", "warning", model]
                               + (["--continuous-batching", "--cb-num-blocks", str(cb_blocks)] if batching else []),
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
            Endpoint(server.url, model).answer([{"role": "user", "content": "Hi"}], dict(max_new_tokens=1))
            return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise EndpointError(f"transformers serve did not answer within {wait_s:.0f} s; see {log}")


def room_load(endpoint, users=(1, 4, 16, 30), max_new_tokens: int = 24) -> list[dict]:
    """For each room size n: n users send the blog's prompts at once (request i: prompt i mod 4).
    What the server gives in all (tok/s), and what each user waits: first token, whole answer."""
    prompts = [task["prompt"] for task in TASKS.values()]
    rows = []
    for n in users:
        whole_number("users", n, 1)
        started = time.perf_counter()
        answers = generate_batch(endpoint, [prompts[i % len(prompts)] for i in range(n)], max_new_tokens, seed=0)
        seconds, tokens = time.perf_counter() - started, sum(a.new_tokens for a in answers)
        rows.append(dict(users=n, seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds,
                         first_token_mean_s=sum(a.first_token_s for a in answers) / n,
                         first_token_max_s=max(a.first_token_s for a in answers),
                         answer_max_s=max(a.seconds for a in answers), complete=all(a.complete for a in answers)))
    return rows

