"""`python -m devstack up|down|status` — what `make up` and `make down` run."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch to up / down / status; a known failure prints one clear message, not a traceback."""
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    parser.add_argument("command", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    from . import local
    from .n8n import N8nError
    from .postgres import PostgresNotFound

    try:
        if args.command == "up":
            return local.up()
        if args.command == "down":
            return local.down()
        return local.status()
    except (local.UpError, PostgresNotFound, N8nError) as exc:
        print(f"make {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
