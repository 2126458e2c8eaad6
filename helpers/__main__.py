"""Command line: `python -m helpers standin [--verify]` | `dtype [--other]` | `serve [HOST] [PORT]`."""
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
        return serve_forever(rest[0] if rest else "127.0.0.1", int(rest[1]) if len(rest) > 1 else 8000)
    print(__doc__)
    return 0 if command == "help" else 2


if __name__ == "__main__":
    sys.exit(main())
