"""A correction while typing: what ``SuggestRequest.backspace`` (``SEQSERVE_UNDO_CHARS``) saves a typing client.

A user who mistypes presses backspace and types again. Without backspace a session cannot step back: the client
resets it and sends its whole text again (O(prefix)). With ``UNDO_CHARS`` the server starts from a checkpoint
and feeds the few characters kept since it (fewer than 2x UNDO_CHARS). Each row types into one session over one
open ``Suggest`` stream (n=1, one character of lookahead, as ``make bench``'s keystroke table) at a text of the
given length and measures three events, back to back in each repeat:

- ``keystroke``: one character appended (the plain session step, for scale);
- ``backspace``: the last character taken back and another typed in its place (``backspace=1``, one event);
- ``reset``: the same correction without backspace: ``reset`` with the whole corrected text.

The server runs with ``SEQSERVE_UNDO_CHARS`` (32 by default) and without the prefix cache (whose entries would
otherwise serve the reset's repeated text), its default worker count, on ``charlm``.

    python -m bench.undo [--models models] [--repeats 50] [--prefixes 256 1024 4000] [--undo-chars 32]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import cli
from bench.launch import serve
from bench.run import TEXT, TypingStream
from service.client import Client


def row(client: Client, n: int, repeats: int, warmup: int = 3) -> dict[str, Any]:
    times: dict[str, list[float]] = {"keystroke": [], "backspace": [], "reset": []}
    with client.session("charlm") as s:
        typing = TypingStream(client, s.id)
        text = TEXT[:n]
        typing.step(text)
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            typing.step("e")  # a character typed
            t1 = time.perf_counter()
            typing.step("a", backspace=1)  # ... taken back, another in its place: one event
            t2 = time.perf_counter()
            text = text + "a"
            typing.step(text, reset=True)  # the same correction without backspace: the whole text again
            t3 = time.perf_counter()
            if i >= warmup:
                times["keystroke"].append(t1 - t0)
                times["backspace"].append(t2 - t1)
                times["reset"].append(t3 - t2)
        steps = client.get_session(s.id).steps
        typing.close()
    assert steps == len(text), (steps, len(text))  # every event did what it says
    return {"prefix_chars": n} | {k: cli.percentiles(v) for k, v in times.items()}


def run(models: Path, prefixes: list[int], repeats: int, undo_chars: int = 32) -> dict[str, Any]:
    env = {"SEQSERVE_UNDO_CHARS": str(undo_chars), "SEQSERVE_PREFIX_CACHE_BYTES": "0"}
    with serve(models, env) as server, Client(server.target, timeout=120) as client:
        rows = [row(client, n, repeats) for n in prefixes]
    return {"undo_chars": undo_chars, "repeats": repeats, "rows": rows}


def print_table(r: dict[str, Any]) -> None:
    print(f"\nA correction while typing (charlm, UNDO_CHARS={r['undo_chars']}; p50 / p99 ms):")
    print(f"{'text chars':>12} {'keystroke':>17} {'backspace + char':>17} {'reset + whole text':>19} {'saves':>7}")
    for x in r["rows"]:
        k, b, z = x["keystroke"], x["backspace"], x["reset"]
        kept = f"{k['p50_ms']:>7.2f} / {k['p99_ms']:>6.2f} {b['p50_ms']:>7.2f} / {b['p99_ms']:>6.2f}"
        again = f"{z['p50_ms']:>8.2f} / {z['p99_ms']:>7.2f}"
        print(f"{x['prefix_chars']:>12} {kept} {again} {z['p50_ms'] / b['p50_ms']:>6.1f}x")


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "undo.json")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--prefixes", type=int, nargs="+", default=[256, 1024, 4000])
    ap.add_argument("--undo-chars", type=int, default=32)
    args = ap.parse_args(argv)
    result = run(args.models, args.prefixes, args.repeats, args.undo_chars)
    cli.write_json(args.out, result)
    print_table(result)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
