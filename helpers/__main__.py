"""Command line: `python -m helpers standin [--verify]` | `dtype [--other]` | `serve [HOST] [PORT] [--one-at-a-time]`."""
import sys

from .hardware import other_cpu_dtype, pick_dtype
from .serving import serve_forever
from .standin import ensure_standin


def main() -> int:
    command, *rest = sys.argv[1:] or ["help"]
    if command == "standin":
        print(ensure_standin(full_check="--verify" in rest))
        return 0
    if command == "dtype":  # the dtype models load in here, or (--other) the one the other CPU kind picks
        print(other_cpu_dtype() if "--other" in rest else str(pick_dtype()[0]).replace("torch.", ""))
        return 0
    if command == "serve":
        args = [a for a in rest if not a.startswith("--")]
        return serve_forever(args[0] if args else "127.0.0.1", int(args[1]) if len(args) > 1 else 8000,
                             batching="--one-at-a-time" not in rest)
    print(__doc__)
    return 0 if command == "help" else 2


if __name__ == "__main__":
    sys.exit(main())
