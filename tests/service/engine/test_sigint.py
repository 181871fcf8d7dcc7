"""A terminal's Ctrl-C while the engine starts a frontend. The engine used to ignore SIGINT while it forked each
frontend (so that the child would not die of it half-started); a Ctrl-C in that window was lost and the server
kept running (``test_ctrl_c_while_frontends_start_stops_cleanly`` then waited 60 s, now and then, under load).
SIGINT is now blocked, not ignored, in the starting thread only, and stays blocked in the child: also in the
first one, whose start also starts multiprocessing's resource tracker (which unblocked SIGINT behind it)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from service.engine.procs import start_without_sigint
from tests.integration.conftest import ROOT


def test_a_ctrl_c_while_a_frontend_starts_is_not_lost() -> None:
    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))

    class CtrlCWhileStarting:
        def start(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)

    try:
        start_without_sigint(CtrlCWhileStarting())  # type: ignore[arg-type]
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert got == [signal.SIGINT]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this thread's mask is as it was


def _wait(conn: Connection) -> None:
    conn.send(os.getpid())
    conn.recv()  # a KeyboardInterrupt here would end the child with exit code 1


def first_frontend_after_ctrl_c() -> None:
    """In a fresh interpreter, as the engine does it: the first process started (with a Pipe, not a Queue, so the
    resource tracker starts with it), SIGINT sent to it, then told to finish. Prints its exit code."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_wait, args=(child,))
    start_without_sigint(process)
    pid = parent.recv()
    os.kill(pid, signal.SIGINT)  # the terminal's Ctrl-C reaches the whole process group
    time.sleep(0.2)
    parent.send("go")
    process.join(30)
    print(process.exitcode)


def test_the_first_frontend_does_not_die_of_ctrl_c() -> None:
    code = "from tests.service.engine.test_sigint import first_frontend_after_ctrl_c as f; f()"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["0"], done.stderr[-3000:]
