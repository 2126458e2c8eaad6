"""`make serve`: one model for the whole room, run from a terminal until Ctrl-C."""

from __future__ import annotations

import ipaddress
import os
import signal

from helpers.data import API_KEY_ENV, ENDPOINT_ENV, ENDPOINT_MODEL_ENV, MAX_TOKENS_ENV, whole_number
from helpers.serving import Room, start_local_server

EVERYWHERE = ("0.0.0.0", "::")


def lan_addresses() -> list[tuple[str, str]]:
    """(interface, IPv4 address) of this machine's network interfaces, loopback and link-local left out.
    psutil comes with accelerate."""
    import socket

    import psutil

    return [
        (name, a.address)
        for name, addresses in sorted(psutil.net_if_addrs().items())
        for a in addresses
        if a.family == socket.AF_INET
        and not ipaddress.ip_address(a.address).is_loopback
        and not ipaddress.ip_address(a.address).is_link_local
    ]


def room_cap() -> int | None:
    """$MIXTRAL_MAX_NEW_TOKENS as the server's cap, or None when it is not set."""
    cap = os.environ.get(MAX_TOKENS_ENV, "").strip()
    return (
        whole_number(
            MAX_TOKENS_ENV,
            int(cap) if cap.isdigit() else cap,
            1,
            " (new tokens per answer: the server cuts longer requests to it)",
        )
        if cap
        else None
    )


def room_message(server, host: str, port: int, addresses: list[tuple[str, str]]) -> str:
    """What the facilitator reads once the server is ready: the address(es) to give the room, who can
    use the model, how to limit that, and the lines each laptop sets."""
    key = (
        " with the key."
        if server.api_key
        else f", without a key (set {API_KEY_ENV}=<a secret> to require one)."
    )
    if host in EVERYWHERE:
        where = [(f"http://{address}:{port}/v1", name) for name, address in addresses] or [
            (f"http://<this machine's address>:{port}/v1", "no network interface found")
        ]
        heading = "Give the room this address (one per network interface):"
        reach = (
            f"Anyone who can reach port {port} on any of this machine's networks can use the model{key} To limit"
            f" it, bind to the room's interface only (HOST=<its address>) and close the port to other networks"
            f" with a firewall."
        )
    elif host in ("127.0.0.1", "localhost", "::1"):
        where, heading = [(server.url, "loopback")], "Its address, for this machine only:"
        reach = "HOST=0.0.0.0, or HOST=<the room's interface address>, lets the laptops in."
    else:
        where, heading = (
            [(f"http://{host}:{port}/v1", "the interface HOST names")],
            "Give the room this address:",
        )
        reach = f"Anyone who can reach {host}:{port} can use the model{key}"
    url = where[0][0]
    exports = [f"export {ENDPOINT_ENV}={url}", f"export {ENDPOINT_MODEL_ENV}={server.model}"]
    exports.append(
        f"export {MAX_TOKENS_ENV}={server.max_new_tokens}   # the server cuts longer answers to this"
        if server.max_new_tokens
        else f"export {MAX_TOKENS_ENV}=256   # optional; set before `make serve`, the server enforces it too"
    )
    exports += [f"export {API_KEY_ENV}={server.api_key}"] if server.api_key else []
    lines = [f"\nready: {server.model} on {host}:{port}. {heading}"]
    lines += [f"    {address}   ({name})" for address, name in where]
    lines += [reach, "", "In the notebooks' environment (before `make lab`), set:"] + [
        f"    {e}" for e in exports
    ]
    lines += [
        "",
        f"Any other OpenAI client: base_url {url}, model {server.model!r}"
        + (", api_key the key above." if server.api_key else "; any api_key."),
        f"Check it: curl {url}/models"
        + (f" -H 'Authorization: Bearer {server.api_key}'" if server.api_key else ""),
        "The server answers GET /v1/models, POST /v1/chat/completions and GET /health, nothing else.",
        f"log: {server.log}. Ctrl-C stops the server.",
    ]
    return "\n".join(lines)


def serve_forever(host: str = "127.0.0.1", port: int = 8000, batching: bool = True) -> int:
    """Start the server (continuous batching unless `batching=False`; the cap and the key from
    $MIXTRAL_MAX_NEW_TOKENS and $MIXTRAL_API_KEY), say what to give the room, run until Ctrl-C or `kill`."""

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops the server too, not only Ctrl-C
    cap, key = room_cap(), os.environ.get(API_KEY_ENV, "").strip() or None
    print(f"starting the room's server on {host}:{port} (the model loads first)...", flush=True)
    server = start_local_server(
        batching=batching, room=Room(host=host, port=port, max_new_tokens=cap, api_key=key)
    )
    print(room_message(server, host, port, lan_addresses() if host in EVERYWHERE else []), flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
