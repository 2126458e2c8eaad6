"""Command line: `python -m workshop walkthrough [--all] [--inplace] [--build=DIR] [names]` | `slides [OUT]` | `bundle [OUT]` |
`stop-kernels` | `screenshots [names]` | `standin [--verify]` | `dtype [--other]` |
`serve [HOST] [PORT] [--one-at-a-time]`."""

import sys
from pathlib import Path


def other_dtype() -> str:
    """The CPU dtype this machine did not pick (float32 or bfloat16): CI runs the numerics-sensitive tests
    again under it, so that the other dtype is exercised on purpose."""
    from helpers.hardware import dtype_name
    from helpers.loading import pick_dtype

    return "float32" if dtype_name(pick_dtype()[0]) == "bfloat16" else "bfloat16"


def main() -> int:
    command, *rest = sys.argv[1:] or ["help"]
    if command == "standin":  # build the stand-in (or check it, --verify), and print where it is
        from helpers.standin import ensure_standin

        print(ensure_standin(full_check="--verify" in rest))
        return 0
    if command == "build-standin":  # what ensure_standin runs, in a process of its own, under its lock
        from .standin_build import build_standin

        build_standin(Path(rest[0]))
        return 0
    if command == "dtype":  # the dtype models load in here, or (--other) the CPU dtype it did not pick
        from helpers.hardware import dtype_name
        from helpers.loading import pick_dtype

        print(other_dtype() if "--other" in rest else dtype_name(pick_dtype()[0]))
        return 0
    if command == "serve":
        from helpers.backends import EndpointError

        from .room import serve_forever

        args = [a for a in rest if not a.startswith("--")]
        try:
            return serve_forever(
                args[0] if args else "127.0.0.1",
                int(args[1]) if len(args) > 1 else 8000,
                batching="--one-at-a-time" not in rest,
            )
        except (ValueError, EndpointError) as exc:  # a bad cap or port, or a server that did not start
            print(f"serve: {exc}", file=sys.stderr)
            return 1
    if command == "walkthrough":
        from .walkthrough import main as walkthrough

        return walkthrough(rest)
    if command == "screenshots":
        from .browser import screenshots

        try:
            for path in screenshots(rest or None):
                print(path)
        except (RuntimeError, ValueError) as exc:
            print(f"screenshots: {exc}", file=sys.stderr)
            return 1
        return 0
    if command == "stop-kernels":
        from .kernels import main as stop_kernels

        return stop_kernels()
    if command in ("slides", "bundle"):
        from . import handouts

        build = handouts.build_slides if command == "slides" else handouts.build_bundle
        try:
            build(rest[0] if rest else None)
        except (RuntimeError, ValueError) as exc:
            print(f"{command}: {exc}", file=sys.stderr)
            return 1
        return 0
    print(__doc__)
    return 0 if command == "help" else 2


if __name__ == "__main__":
    sys.exit(main())
