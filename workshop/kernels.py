"""Free the memory of finished notebooks: shut down the kernels of the Jupyter servers this user runs.

Each open notebook keeps its own kernel, and each kernel keeps its own copy of the model (one to three
GiB with the stand-in, see docs/workshop.md). `python -m workshop stop-kernels` (`make stop-kernels`)
does what JupyterLab's Kernel > Shut Down All Kernels does, from a terminal, for every server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def running_servers() -> list[dict]:
    """The Jupyter servers this user runs on this machine (their url and token), as jupyter lists them."""
    from jupyter_server.serverapp import list_running_servers

    return list(list_running_servers())


def stop_kernels(servers: list[dict] | None = None) -> list[str]:
    """Shut down every kernel of every server; returns what was stopped, one line each."""
    stopped = []
    for server in running_servers() if servers is None else servers:
        api = server["url"].rstrip("/") + "/api/kernels"
        headers = {"Authorization": f"token {server.get('token', '')}"}
        with urllib.request.urlopen(urllib.request.Request(api, headers=headers), timeout=10) as answer:
            kernels = json.load(answer)
        for kernel in kernels:
            request = urllib.request.Request(f"{api}/{kernel['id']}", method="DELETE", headers=headers)
            urllib.request.urlopen(request, timeout=30).close()
            stopped.append(f"{server['url']}: kernel {kernel['id']} ({kernel.get('name', '?')})")
    return stopped


def main() -> int:
    try:
        stopped = stop_kernels()
    except (
        urllib.error.HTTPError
    ) as exc:  # a server without a token refuses API calls from outside the browser
        print(
            f"stop-kernels: a Jupyter server refused ({exc.code} {exc.reason}); use JupyterLab's "
            f"Kernel > Shut Down All Kernels there"
        )
        return 1
    except OSError as exc:
        print(f"stop-kernels: could not reach a Jupyter server ({exc}); is `make lab` running?")
        return 1
    print("\n".join(stopped) if stopped else "no kernel was running")
    return 0
