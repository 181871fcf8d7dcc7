"""The ``seqserve`` console script: imports the CLI inside ``main``, so that a Ctrl-C while it loads (numpy, gRPC:
a good part of a second) is the one word "interrupted", not a traceback from deep inside an import. Light to
import, which the frontend processes also gain from: ``multiprocessing``'s spawn imports the console script again
in each of them."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """A Ctrl-C inside the block is held and raised as KeyboardInterrupt when the block ends. Raised where it
    came, during an import, it can land in a callback of the import machinery (a weakref's), where Python prints
    "Exception ignored" with a traceback and drops it: the server then started as if no Ctrl-C had come."""
    interrupted: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        interrupted.append(signum)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        # Started with SIGINT ignored (a background job of a shell script inherits that), the process is stopped by
        # it all the same inside this block and once the server runs (its event loop handles SIGINT): the moments
        # between the two must not be the only ones where it is lost, so those get Python's KeyboardInterrupt too.
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is signal.SIG_IGN else previous)
    if interrupted:
        raise KeyboardInterrupt


def main() -> int:
    try:
        with deferred_interrupt():
            from service.cli import main as cli
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    try:
        return cli()
    except ImportError as error:
        # A Ctrl-C while a command imports a module of its own (serve's preflight imports ONNX Runtime), which
        # the module turned into an ImportError ("initialization failed", from the KeyboardInterrupt).
        if isinstance(error.__cause__, KeyboardInterrupt) or isinstance(error.__context__, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        raise
