"""Command line: `python -m workshop walkthrough [--all] [--inplace] [names]` | `slides [OUT]` | `bundle [OUT]` |
`stop-kernels` | `screenshots [names]`."""
import sys


def main() -> int:
    command, *rest = sys.argv[1:] or ["help"]
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
