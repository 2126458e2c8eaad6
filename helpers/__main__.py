"""Command line: `python -m helpers standin [--verify]` | `dtype [--other]` | `walkthrough [--inplace] [names]`
| `serve [HOST] [PORT]` | `slides [OUT]` | `bundle [OUT]`."""
import sys


def main() -> int:
    command, *rest = sys.argv[1:] or ["help"]
    if command == "standin":
        from .standin import ensure_standin
        print(ensure_standin(full_check="--verify" in rest))
        return 0
    if command == "dtype":  # the dtype models load in here, or (--other) the one the other CPU kind picks
        from .hardware import other_cpu_dtype, pick_dtype
        print(other_cpu_dtype() if "--other" in rest else str(pick_dtype()[0]).replace("torch.", ""))
        return 0
    if command == "walkthrough":
        from .walkthrough import main as walkthrough
        return walkthrough(rest)
    if command == "serve":
        from .serving import serve_forever
        host = rest[0] if rest else "127.0.0.1"
        return serve_forever(host, int(rest[1]) if len(rest) > 1 else 8000)
    if command in ("slides", "bundle"):
        from . import workshop
        build = workshop.build_slides if command == "slides" else workshop.build_bundle
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
