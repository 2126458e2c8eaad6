"""`make serve`: one model for the whole room, run from a terminal until Ctrl-C."""
from __future__ import annotations

import signal
import socket

from helpers.data import ENDPOINT_ENV, ENDPOINT_MODEL_ENV, MAX_TOKENS_ENV
from helpers.serving import start_local_server


def serve_forever(host: str = "127.0.0.1", port: int = 8000, batching: bool = True) -> int:
    """Start the server (continuous batching unless `batching=False`), say what to set in the
    notebooks, run until Ctrl-C or `kill`."""
    def interrupt(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops the server too, not only Ctrl-C
    print(f"starting transformers serve with the stand-in on {host}:{port} (the model loads first)...", flush=True)
    server = start_local_server(port=port, host=host, batching=batching)
    where = socket.gethostname() if host in ("0.0.0.0", "::") else "127.0.0.1"
    print(f"\nready. In the notebooks' environment (before `make lab`), set:\n"
          f"    export {ENDPOINT_ENV}=http://{where}:{port}/v1\n    export {ENDPOINT_MODEL_ENV}={server.model}\n"
          f"    export {MAX_TOKENS_ENV}=256   # optional: the room's cap on new tokens per answer\n"
          f"log: {server.log}. Ctrl-C stops the server.", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
