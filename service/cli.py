"""``seqserve``: run the server, or call it.

    seqserve serve [--host H] [--port P] [--metrics-port M] [--http-port R] [--models DIR] [--device auto|cpu|cuda]
                   [--workers N] [--engines K] [--watch-models [SECONDS]] [--load-model NAME ...] [--plugin MODULE]
                   [--ready-file F]
    seqserve check [the same settings flags] [--json]    (settings, keys, TLS, models, session store; no serving)
    seqserve classify "a fine film" "a dull one"          (or - : one text per line from stdin)
    seqserve complete "ROMEO:" --max-chars 200 [--temperature 0.8] [--top-k 5] [--seed 1]
    seqserve suggest < typed.txt                         (a session: each line appended, continuations printed)
    seqserve forecast --csv ETTh1.csv [--rows 96] [--quantiles] [--plot forecast.png]
    seqserve traces trace.json [--json]                  (Triton-format trace files summed up per model)

Every serve option but --ready-file also comes from a ``SEQSERVE_*`` env var (the flags win), and every other
setting only from one (README: the settings tables). Client commands take ``--target``
(env SEQSERVE_TARGET, default 127.0.0.1:50051), ``--api-key`` (env SEQSERVE_API_KEY) and, for a TLS server,
``--tls-ca`` (env SEQSERVE_TLS_CA), with ``--tls-cert``/``--tls-key`` for mTLS (env SEQSERVE_TLS_CLIENT_CERT,
SEQSERVE_TLS_CLIENT_KEY).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

import service.grpc_logging  # noqa: F401  (before gRPC is imported)
from service.argtypes import INT32_MAX, INT64_MAX, Parser, count, names, real
from service.client import ApiError, Client
from service.entry import deferred_interrupt
from service.plots import plot_forecast, plot_path
from service.settings import SECRET_SETTINGS, Settings, misspelt
from service.tables import History, TableError, next_times, read_history

log = logging.getLogger("seqserve")
CONVERT = "convert it first, e.g. iconv -f latin1 -t utf-8"  # (what to do with text that is not UTF-8)


# --- serve -------------------------------------------------------------------------------------------------


# The settings `serve` takes as flags (the rest come from SEQSERVE_* variables only).
SERVE_FLAGS = {
    "host": "--host", "port": "--port", "metrics_port": "--metrics-port", "models": "--models", "device": "--device",
    "watch_models_seconds": "--watch-models", "workers": "--workers", "engines": "--engines",
    "plugins": "--plugin",
    "load_models": "--load-model", "http_port": "--http-port", "exit_on_error": "--exit-on-error",
}  # fmt: skip
ORT_MISSING = (
    "ONNX Runtime is not installed: pip install 'seqserve[cpu]', or 'seqserve[cuda]' on an NVIDIA GPU host (one of "
    "the two, never both)"
)


def _settings(args: argparse.Namespace) -> Settings:
    flags = {name: getattr(args, flag.removeprefix("--").replace("-", "_")) for name, flag in SERVE_FLAGS.items()}
    return Settings(**{k: v for k, v in flags.items() if v is not None})  # env < flags (a flag not given is None)


def _write_ready_file(path: Path, grpc_port: int, metrics_port: int | None, http_port: int | None = None) -> None:
    """Atomically (write + rename), so a reader polling for the file never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    info: dict[str, int | None] = {"grpc_port": grpc_port, "metrics_port": metrics_port}
    if http_port is not None:  # (the KServe REST port, when one is served)
        info["http_port"] = http_port
    tmp.write_text(json.dumps(info), encoding="utf-8")
    tmp.replace(path)


async def _serve(settings: Settings, ready_file: Path | None) -> None:
    from service.core.aio import stop_on_signals

    stop = asyncio.Event()  # first: a signal from here on stops the server once it has started, never mid-start
    stop_on_signals(stop, settings.grace_seconds)
    from service.api.server import Server
    from service.logs import summary

    server = Server(settings)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    log.info("%s", summary(settings, 1))
    log.info("serving gRPC on %s:%d, metrics on %s:%s", settings.host, server.port, settings.host, server.metrics_port)
    if ready_file is not None:
        _write_ready_file(ready_file, server.port, server.metrics_port, server.http_port)
    await stop.wait()
    log.info("signal received: draining (grace %.1fs)", settings.grace_seconds)
    await server.stop(settings.grace_seconds)
    log.info("seqserve stopped")


def _need_onnxruntime() -> None:
    if importlib.util.find_spec("onnxruntime") is None:
        raise RuntimeError(ORT_MISSING)


def cmd_serve(args: argparse.Namespace) -> int:
    _need_onnxruntime()
    with deferred_interrupt():  # (a Ctrl-C here is "interrupted" once the imports are done, never lost in one)
        from service.core.aio import run, server_gc
        from service.engine.procs import serve, worker_count
        from service.logs import configure
        from service.preflight import refuse_unservable

    settings = _settings(args)
    refuse_unservable(settings)  # (a bad host or device: one line, before any process starts)
    configure(settings)
    for name, meant in misspelt(os.environ):
        log.warning("%s is not a setting and is ignored; did you mean %s?", name, meant)
    server_gc()
    if worker_count(settings) > 1:  # N frontend processes + this one as the engine
        return run(serve(settings, args.ready_file), settings.event_loop)
    if settings.engines > 1:
        log.warning("engines=%d is ignored: one worker (one available core) serves everything in one process",
                    settings.engines)  # fmt: skip
    run(_serve(settings, args.ready_file), settings.event_loop)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """``seqserve check``: ``service.preflight`` with serve's settings; 0 when nothing failed."""
    _need_onnxruntime()
    with deferred_interrupt():
        from service.core.aio import run
        from service.preflight import check, report

    settings = _settings(args)
    logging.basicConfig(level=logging.CRITICAL)  # the findings say it all: no log lines from the loading itself
    found = run(check(settings))
    if args.json:
        for f in found:
            print(json.dumps(f.as_dict()))
    else:
        print(report(found))
    return 0 if all(f.ok for f in found) else 1


# --- client commands -----------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.target,
        api_key=args.api_key,
        timeout=args.timeout,
        retries=args.retries,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls=args.tls,
    )


def cmd_classify(args: argparse.Namespace) -> int:
    """Texts from the command line, or one per line from stdin for ``-`` (blank lines skipped), sent ``--batch``
    at a time; each answer is printed as its batch comes back, in the order of the texts."""
    texts = [t for arg in args.texts for t in (_stdin_lines() if arg == "-" else [arg])]
    if not texts:
        print("error: no texts: stdin held only blank lines", file=sys.stderr)
        return 1
    with _client(args) as c:
        for start in range(0, len(texts), args.batch):
            batch = texts[start : start + args.batch]
            try:
                results = c.classify(batch, model=args.model)
            except ApiError as err:
                if start == 0 and _unreachable(err, args):
                    raise  # main says what to check
                where = f"texts {start + 1}-{start + len(batch)} of {len(texts)}" if len(texts) > len(batch) else ""
                print(f"error: {where}{': ' if where else ''}{err.code.name}: {err.message}", file=sys.stderr)
                return 1
            for text, r in zip(batch, results, strict=True):
                probs = " ".join(f"{lab}={p:.3f}" for lab, p in zip(r.labels, r.probabilities, strict=True))
                print(f"{r.label}\t{probs}\t{text}")
            sys.stdout.flush()
    return 0


def _stdin_lines() -> list[str]:
    """The non-blank lines of standard input, read as UTF-8: a line that is not is named before anything is sent
    (it failed as "'utf-8' codec can't encode character '\\udce9'", after the lines before it were read)."""
    lines = []
    source = getattr(sys.stdin, "buffer", sys.stdin)  # (the bytes under a text stream; a StringIO is text already)
    for n, raw in enumerate(source, start=1):
        try:
            text = raw if isinstance(raw, str) else raw.decode("utf-8-sig" if n == 1 else "utf-8")
            line = text.rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"standard input, line {n}: not UTF-8 text ({e.reason} at byte {e.start} of the line); {CONVERT}"
            ) from None
        if line.strip():
            lines.append(line)
    return lines


def cmd_complete(args: argparse.Namespace) -> int:
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # (bytes the shell passed that are not UTF-8 reach argv as lone surrogates)
        at = len(args.prompt[: e.start].encode("utf-8", "surrogateescape"))
        raise ValueError(f"the prompt is not UTF-8 text (byte {at} is not); {CONVERT}") from None
    with _client(args) as c:
        chunks = c.complete(
            args.prompt,
            model=args.model,
            max_chars=args.max_chars,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop or (),
        )
        first = next(chunks, None)  # a refused call fails here, before the prompt is echoed to stdout
        sys.stdout.write(args.prompt)
        for chunk in itertools.chain([first] if first is not None else [], chunks):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            if chunk.finish_reason:
                print(f"\n[finish: {chunk.finish_reason}]", file=sys.stderr)
        sys.stdout.write("\n")
    return 0


def cmd_suggest(args: argparse.Namespace) -> int:
    """A typing session from the shell: each stdin line is text typed since the previous one (``--newline``: with
    its line break), appended to one server-side session (only the new text runs); each answer is printed as it
    comes: the characters the session holds, then the continuations, JSON-quoted, with their log-probabilities.
    A line the model cannot read (a character outside its vocabulary, a line that is not UTF-8, one over the
    server's max_chars_per_text) is reported and skipped (the session is as it was), and the run goes on, then
    exits 1 saying how many were skipped; a refusal of the options (``-n`` or ``--max-chars`` past the server's
    limits) stops it at the first line. The session is deleted at the end (Ctrl-C too)."""
    skipped = 0
    with _client(args) as c, c.session(args.model or "charlm") as s:
        print(f"(session {s.id} on {s.model}/{s.version}; deleted at the end)", file=sys.stderr)
        for number, line in enumerate(_typed_lines(), start=1):
            if isinstance(line, UnicodeDecodeError):
                e = line
                print(
                    f"error: standard input, line {number}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                    f"line); {CONVERT} (line skipped)",
                    file=sys.stderr,
                    flush=True,
                )
                skipped += 1
                continue
            typed = line if args.newline else line.rstrip("\r\n")
            if not typed:
                continue
            try:
                result = c.suggest_once(s.id, typed, n=args.n, max_chars=args.max_chars, beam=not args.greedy)
            except ApiError as err:
                if err.code.name != "INVALID_ARGUMENT" or not err.message.startswith("appended"):
                    raise  # (not this line's fault: every line would be refused the same)
                print(f"error: {err.code.name}: {err.message} (line skipped)", file=sys.stderr, flush=True)
                skipped += 1
                continue
            shown = "\t".join(f"{json.dumps(x.text, ensure_ascii=False)} {x.logprob:.2f}" for x in result.suggestions)
            print(f"{result.steps}\t{shown}", flush=True)
    if skipped:
        print(f"error: {skipped} line{'s' if skipped > 1 else ''} skipped (above)", file=sys.stderr)
        return 1
    return 0


def _typed_lines() -> Iterator[str | UnicodeDecodeError]:
    """Standard input's lines as they come, read as UTF-8 (a BOM before the first is dropped); a line that is not
    UTF-8 comes as its decoding error (read as text, it failed the whole run on its first call: "'utf-8' codec
    can't encode character '\\udcff'", after the lines before it)."""
    source = getattr(sys.stdin, "buffer", sys.stdin)  # (the bytes under a text stream; a StringIO is text already)
    for number, raw in enumerate(source, start=1):
        try:
            yield raw if isinstance(raw, str) else raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            yield e


_CELL = re.compile(r"history\[(\d+)\]\[(\d+)\]")
_TOO_MANY = re.compile(r"history has (\d+) rows; send 1 to (\d+) rows \(max_forecast_rows\)")
_TOO_FEW = re.compile(r"history has (\d+) rows; model (\S+) needs at least window=(\d+) rows")


def _named_by_csv(err: ApiError, args: argparse.Namespace, sent: History) -> ApiError:
    """A refusal of what this command sent, said of where the user wrote it: the API's ``columns`` as the CSV's
    header or ``--columns``; a value at ``history[r][c]`` as its file line and column; a row count as ``--rows``."""
    if err.code.name != "INVALID_ARGUMENT":
        return err
    message = err.message
    if message.startswith("columns "):
        source = "--columns" if args.columns else f"the header of {args.csv}"
        message = source + message[len("columns") :]
        lacked = message.partition(" lacks ")[2].partition(": model ")[0]  # 'A', 'B'
        text = [c for c in sent.left_out if repr(c) in lacked.split(", ")]
        if text:  # (a column the file has, left out as text)
            one = len(text) == 1
            which = ("column " if one else "columns ") + ", ".join(map(repr, text))
            holds = "holds text, not numbers, and was" if one else "hold text, not numbers, and were"
            message += f"; {which} of {args.csv} {holds} left out"
    elif (cell := _CELL.match(message)) and int(cell.group(2)) < len(sent.columns):
        row, name = int(cell.group(1)), sent.columns[int(cell.group(2))]  # (c: the index in the columns sent)
        rest = message[cell.end() :].removeprefix(f" (column {name!r})")
        message = f"{args.csv}: line {sent.first_line + row}, column {name!r}{rest}"  # (the header is line 1)
    elif many := _TOO_MANY.fullmatch(message):
        limit = int(many.group(2))
        message = (
            f"{_rows_sent(args, sent)}; the server takes at most {limit} (max_forecast_rows): pass --rows {limit} "
            "or fewer"
        )
    elif few := _TOO_FEW.fullmatch(message):
        model, window = few.group(2), int(few.group(3))
        fix = f"pass --rows {window} or more" if len(sent.rows) == args.rows else f"use a file of {window} rows or more"
        message = f"{_rows_sent(args, sent)}; model {model} needs at least window={window} rows: {fix}"
    else:
        return err
    return ApiError(err.code, message, err.reason, err.request_id, err.retry_after)


def _rows_sent(args: argparse.Namespace, sent: History) -> str:
    n = len(sent.rows)
    return f"--rows {args.rows} sends {n} rows of {args.csv}" + ("" if n == args.rows else " (all the file has)")


def cmd_forecast(args: argparse.Namespace) -> int:
    plot = None if args.plot is None else plot_path(args.plot)  # a bad format or folder fails before the call
    sent = read_history(args.csv, args.rows, args.columns.split(",") if args.columns else None)
    columns, history = sent.columns, sent.rows
    if sent.left_out:
        print(f"(columns of text, not numbers, left out: {', '.join(map(repr, sent.left_out))})", file=sys.stderr)
    with _client(args) as c:
        try:
            result = c.forecast(history, model=args.model, columns=columns)  # by name: the CSV's order may differ
        except ApiError as err:
            raise _named_by_csv(err, args, sent) from None
    horizon = len(result.point)
    head, steps = "step", [str(h) for h in range(1, horizon + 1)]
    try:  # each row's time when the file's last rows step evenly (their time column continued)
        found = next_times(sent, horizon)
    except TableError as err:
        print(f"(forecast steps numbered: {err})", file=sys.stderr)
    else:
        if found is not None:
            head, steps = found
    names, rows = list(result.columns), result.point.tolist()
    if args.quantiles:  # each column, then its p10, p50, p90
        levels = [f"_p{round(100 * q)}" for q in result.quantile_levels]
        names = [name + suffix for name in result.columns for suffix in ("", *levels)]
        rows = [
            [v for j in range(len(result.columns)) for v in (result.point[h, j], *result.quantiles[:, h, j])]
            for h in range(horizon)
        ]
    print(head + "\t" + "\t".join(names))
    for when, row in zip(steps, rows, strict=True):
        print(f"{when}\t" + "\t".join(f"{v:.4f}" for v in row))
    if plot is not None:
        plot_forecast(plot, columns, history, result)
        print(f"plot written to {plot}", file=sys.stderr)
    return 0


# --- parser ------------------------------------------------------------------------------------------------


def _add_serve_flags(s: argparse.ArgumentParser) -> None:
    """The settings flags of ``serve`` (``SERVE_FLAGS``), which ``check`` takes too."""
    s.add_argument("--host", help="interface to bind (env SEQSERVE_HOST; default 127.0.0.1)")
    s.add_argument("--port", type=int, help="gRPC port, 0 = free port (env SEQSERVE_PORT; default 50051)")
    s.add_argument(
        "--metrics-port", type=int, help="HTTP metrics port, 0 = free (env SEQSERVE_METRICS_PORT; default 8002)"
    )
    s.add_argument(
        "--http-port", type=int, help="KServe v2 REST port, 0 = free (env SEQSERVE_HTTP_PORT; default: no REST)"
    )
    s.add_argument("--models", type=Path, help="model repository (env SEQSERVE_MODELS; default models)")
    s.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="execution device (env SEQSERVE_DEVICE; default auto: CUDA when available)",
    )
    s.add_argument(
        "--watch-models",
        type=float,
        nargs="?",
        const=5.0,
        metavar="SECONDS",
        help="poll the repository every SECONDS (default 5): new versions load, removed ones unload, changed "
        "weights reload (env SEQSERVE_WATCH_MODELS_SECONDS)",
    )
    s.add_argument(
        "--load-model",
        action="append",
        metavar="NAME",
        help="load only this model at start (repeat for more; the others load on request, RepositoryModelLoad; "
        "env SEQSERVE_LOAD_MODELS, comma-separated; default: every model)",
    )
    s.add_argument(
        "--exit-on-error",
        action="store_const",
        const=True,
        help="exit 1 at start when a model version fails to load (or --models is no folder), naming it (Triton's "
        "--exit-on-error; env SEQSERVE_EXIT_ON_ERROR; default: serve the others)",
    )
    s.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="gRPC frontend processes sharing the port, plus one engine process (env SEQSERVE_WORKERS; "
        "0 = one per core; 1 = everything in this one process)",
    )
    s.add_argument(
        "--engines",
        type=int,
        metavar="K",
        help="with --workers N > 1: engine processes, each owning a share of the sessions and sequences and running "
        "its own batches (env SEQSERVE_ENGINES; default 1)",
    )
    s.add_argument(
        "--plugin",
        action="append",
        metavar="MODULE",
        help="import MODULE at start (registers tasks or stores; env SEQSERVE_PLUGINS, comma-separated)",
    )


def cmd_traces(args: argparse.Namespace) -> int:
    from service.core.traces import summarize

    entries = []
    for path in args.files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a trace file ({err})") from None
        if not isinstance(data, list) or not all(isinstance(e, dict) and "id" in e for e in data):
            raise ValueError(f"{path}: not a trace file (a JSON array of objects with an id, as the server writes)")
        entries += data
    rows = summarize(entries)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:
        print("no request traces with timestamps in these files (trace_level TIMESTAMPS writes them)")
        return 0
    head = ["model", "version", "traces", "runs", "request_us", "queue_us", "input_us", "infer_us", "output_us"]
    head += ["other_us", "request_p50_us", "request_p99_us"]
    print(" ".join(f"{h:>12}" for h in head))
    for row in rows:
        print(" ".join(f"{row[h]:>12}" for h in head))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="seqserve", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC server (+ HTTP /metrics)")
    _add_serve_flags(s)
    s.add_argument(
        "--ready-file", type=Path, help='write {"grpc_port":..,"metrics_port":..[,"http_port":..]} here once serving'
    )
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser(
        "check",
        help="check what serve would set up (settings, host, ports, API keys, TLS, plugins, device, every model, the "
        "session store) without serving; exit 1 if any part fails",
    )
    _add_serve_flags(k)
    k.add_argument("--json", action="store_true", help="one JSON object per check instead of the table")
    k.set_defaults(func=cmd_check)

    def client_parser(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--target", default=os.environ.get("SEQSERVE_TARGET", "127.0.0.1:50051"), help="host:port")
        c.add_argument("--api-key", default=os.environ.get("SEQSERVE_API_KEY"), help="sent as Bearer token")
        c.add_argument("--timeout", type=real(0, above=True), default=60.0, help="deadline per call in seconds")
        c.add_argument(
            "--retries",
            type=count(0, 100),
            default=0,
            help="send a call the server refused before running it (busy, rate quota) again after the wait it "
            "names, up to N times within --timeout",
        )
        env = os.environ.get
        c.add_argument("--tls", action="store_true", help="TLS with the system's CA roots (implied by --tls-*)")
        c.add_argument("--tls-ca", default=env("SEQSERVE_TLS_CA"), help="PEM CA that signed the server's certificate")
        c.add_argument("--tls-cert", default=env("SEQSERVE_TLS_CLIENT_CERT"), help="PEM client certificate (mTLS)")
        c.add_argument("--tls-key", default=env("SEQSERVE_TLS_CLIENT_KEY"), help="PEM key of --tls-cert (mTLS)")
        c.add_argument("--model", default="", help="model name (default: the service's default model)")
        return c

    t = sub.add_parser(
        "traces",
        help="sum up trace files (Triton's trace extension, SEQSERVE_TRACE_FILE): per model version, the mean "
        "request's time in the queue and in its runs' input, infer and output parts, and the median and 99th "
        "percentile of the whole request, in microseconds",
    )
    t.add_argument("files", nargs="+", type=Path, help="trace files (numbered ones of one run together)")
    t.add_argument("--json", action="store_true", help="one JSON object per model version instead of the table")
    t.set_defaults(func=cmd_traces)

    c = client_parser("classify", "classify texts by sentiment")
    c.add_argument("texts", nargs="+", help="texts to classify; - reads them from stdin, one per line")
    c.add_argument(
        "--batch",
        type=count(1),
        default=64,
        help="texts per request (default 64; the server's MAX_TEXTS_PER_REQUEST bounds it, 256 by default)",
    )
    c.set_defaults(func=cmd_classify)

    c = client_parser("complete", "stream a completion from the char LM")
    c.add_argument("prompt")
    c.add_argument("--max-chars", type=count(1, INT32_MAX), default=200)
    c.add_argument("--temperature", type=real(0), help="0 = greedy (default 1.0)")
    c.add_argument("--top-k", type=count(0, INT32_MAX), default=0)
    c.add_argument("--seed", type=count(-INT64_MAX - 1, INT64_MAX))
    c.add_argument("--stop", action="append", help="stop string (repeatable)")
    c.set_defaults(func=cmd_complete)

    c = client_parser("suggest", "type into a char-LM session from stdin, line by line: continuations per line")
    c.add_argument("-n", type=count(1), default=3, help="continuations per line, the beam's width (default 3)")
    c.add_argument("--max-chars", type=count(1, INT32_MAX), default=10, help="characters per continuation")
    c.add_argument("--greedy", action="store_true", help="the n likeliest next characters, each continued greedily")
    c.add_argument("--newline", action="store_true", help="each line is typed with its line break")
    c.set_defaults(func=cmd_suggest)

    c = client_parser("forecast", "forecast from the last rows of a CSV")
    c.add_argument(
        "--csv",
        type=Path,
        required=True,
        help="CSV with a header; its columns of numbers are the features (a time column "
        "and columns of text are left out)",
    )
    c.add_argument(
        "--columns",
        type=names,
        help="comma-separated columns to send, with their names: the server takes the model's columns by name, in "
        "any order (default: every column but the time column)",
    )
    c.add_argument("--rows", type=count(1), default=96, help="history rows to send (the last ones)")
    c.add_argument(
        "--plot",
        type=Path,
        help="write an image (PNG, or as the name's suffix says: .pdf, .svg, ...): history, "
        "forecast and the p10-p90 band",
    )
    c.add_argument(
        "--quantiles", action="store_true", help="print each column's p10, p50 and p90 beside its point forecast"
    )
    c.set_defaults(func=cmd_forecast)
    return p


def _settings_problems(err: ValidationError) -> str:
    """Pydantic's report on one line: each setting, where it comes from and what it takes."""
    problems = []
    for e in err.errors():
        name = ".".join(str(part) for part in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if not name:  # a check across settings (TLS files come in pairs, ...): its message names them
            problems.append(msg)
            continue
        source = f"{SERVE_FLAGS[name]} or " if name in SERVE_FLAGS else ""
        problems.append(f"setting {name} ({source}SEQSERVE_{name.upper()}): {msg}{_got(name, msg, e.get('input'))}")
    return "; ".join(problems)


def _got(name: str, msg: str, value: object) -> str:
    """What a setting's error adds about the value given: nothing when the message says it already, never a
    secret's value (API keys, the signing key), and the session store's URL without its password."""
    if name in SECRET_SETTINGS:
        return ", got (not shown: a secret)"
    if re.search(r"\bgot\b", msg):  # (the setting's own check named it: "...; got 'newest', got 'newest'")
        return ""
    if name == "session_store" and isinstance(value, str):
        from service.core.sessions import redact

        value = redact(value)
    return f", got {value!r}"


def _unreachable(err: ApiError, args: argparse.Namespace | None) -> str:
    """What to check when a client command found no server at its target (gRPC's own UNAVAILABLE, not a server's
    answer such as a model that is loading)."""
    target = getattr(args, "target", None)
    text = err.message.lower()
    if err.code.name != "UNAVAILABLE" or not target or "failed to connect" not in text:
        return ""
    if any(word in text for word in ("socket closed", "handshake", "ssl", "tls")):
        # A server answered and closed the connection: a plaintext client at a TLS port, a TLS client at a
        # plaintext one, or a client without the certificate an mTLS server asks for (not a missing server).
        tls = any(getattr(args, flag, None) for flag in ("tls", "tls_ca", "tls_cert"))
        fix = (
            "if it serves plaintext, leave out --tls/--tls-ca; if it asks for a client certificate (mTLS), pass "
            "--tls-cert and --tls-key; if its certificate is signed by another CA, pass that CA as --tls-ca"
            if tls
            else "if it serves TLS, pass --tls-ca CA (and --tls-cert/--tls-key where it asks for client "
            "certificates: mTLS), or env SEQSERVE_TLS_CA"
        )
        return f"\na server at {target} closed the connection during the TLS handshake or before it: {fix}"
    return f"\nno server answers at {target}: start one (seqserve serve) or point --target (env SEQSERVE_TARGET) at it"


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except ApiError as err:
        print(f"error: {err.code.name}: {err.message}{_unreachable(err, args)}", file=sys.stderr)
    except ValidationError as err:  # a setting out of range, from a flag or its SEQSERVE_* variable
        print(f"error: {_settings_problems(err)}", file=sys.stderr)
    except BrokenPipeError:  # the reader stopped early (`| head`): quiet, as other Unix tools end on SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush must not fail again)
        return 141  # 128 + SIGPIPE, what a shell reports for a tool that SIGPIPE ended
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
