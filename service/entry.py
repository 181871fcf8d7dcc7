"""The ``seqserve`` console script: imports the CLI inside ``main``, so that a Ctrl-C while it loads (numpy, gRPC:
a good part of a second) is the one word "interrupted", not a traceback from deep inside an import. Light to
import, which the frontend processes also gain from: ``multiprocessing``'s spawn imports the console script again
in each of them."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from service.cli import main as cli
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return cli()
