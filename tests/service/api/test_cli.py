"""The ``seqserve`` CLI: ``serve`` as a real subprocess (ready file, env + flags, SIGTERM -> exit 0), and the
client subcommands against it (in-process through ``main()``, plus once through the console script)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from service.entry import deferred_interrupt
from tests.conftest import stopped_within

SEQSERVE = Path(sys.executable).parent / "seqserve"
COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]


class ServeProcess:
    def __init__(self, models: Path, workdir: Path, *args: str, **env: str) -> None:
        self.ready_file = workdir / "ready.json"
        self.log_path = workdir / "serve.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")} | env
        cmd = [str(SEQSERVE), "serve", "--port", "0", "--metrics-port", "0", "--models", str(models), *args]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--ready-file", str(self.ready_file)], stdout=log, stderr=log, env=environ
            )
        deadline = time.monotonic() + 120
        while not self.ready_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"seqserve serve did not become ready:\n{self.log()}")
            time.sleep(0.1)
        self.ports: dict[str, int] = json.loads(self.ready_file.read_text())
        self.target = f"127.0.0.1:{self.ports['grpc_port']}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def serve(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    # SEQSERVE_PORT in the environment is overridden by --port 0; SEQSERVE_GRACE_SECONDS is read from it.
    # SEQSERVE_WOKERS: a typo, warned about; SEQSERVE_SERVICE_HOST: what Kubernetes' service links inject, left alone.
    env = {"SEQSERVE_PORT": "1", "SEQSERVE_GRACE_SECONDS": "3", "SEQSERVE_WOKERS": "7", "SEQSERVE_SERVICE_HOST": "x"}
    p = ServeProcess(tiny_models, tmp_path_factory.mktemp("serve"), **env)
    yield p
    p.terminate()


def test_ready_file_and_logged_addresses(serve: ServeProcess) -> None:
    assert serve.ports["grpc_port"] > 0 and serve.ports["metrics_port"] > 0
    assert f"127.0.0.1:{serve.ports['grpc_port']}" in serve.log()


def test_start_up_is_summed_up_in_one_line_and_lines_name_their_process(serve: ServeProcess) -> None:
    """Nothing said the version, the session store or whether authentication was on; with --workers N the lines
    of the frontends and the engine could not be told apart (and each frontend logged its private metrics port as
    if it were the server's)."""
    log = serve.log()
    assert "seqserve 0.1.0: " in log and "session store memory://, auth none" in log and "TLS off" in log
    if "frontends + the engine" in log:
        assert "INFO [frontend-1] service.api.server: gRPC listening" in log
        assert log.count("metrics/health HTTP on") == 1  # the engine's; the frontends' are private


def test_a_misspelt_setting_is_named_at_start(serve: ServeProcess) -> None:
    """pydantic-settings ignores unknown variables: SEQSERVE_WOKERS=7 left the default worker count, silently."""
    log = serve.log()
    assert "SEQSERVE_WOKERS is not a setting and is ignored; did you mean SEQSERVE_WORKERS?" in log
    assert "SEQSERVE_SERVICE_HOST" not in log


def test_classify(serve: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", "--target", serve.target, "a good fun film", "a terrible boring movie"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, ["a good fun film", "a terrible boring movie"], strict=True):
        label, probs, echoed = line.split("\t")
        assert label in ("negative", "positive") and "negative=" in probs and echoed == text


def test_complete_streams_to_stdout(serve: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["complete", "ROMEO:", "--target", serve.target, "--max-chars", "30", "--temperature", "0", "--seed", "1"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ROMEO:") and out.endswith("\n")
    assert len(out) == len("ROMEO:") + 30 + 1  # prompt, 30 generated characters, final newline
    assert "[finish: length]" in err


def test_classify_reads_texts_from_stdin_in_batches(
    serve: ServeProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``seqserve classify - < reviews.txt``: one text per line (blank lines skipped), sent --batch at a time, the
    answers in the texts' order and as one call gives them; a refused batch is named by its texts' positions,
    after the answers of the batches before it."""
    import io

    texts = ["a good fun film", "a terrible boring movie", "fine", "dull and long", "a warm story"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join([*texts[:2], "", "  ", *texts[2:]]) + "\n"))
    assert main(["classify", "--target", serve.target, "--batch", "2", "-"]) == 0
    batched = capsys.readouterr().out.splitlines()
    assert main(["classify", "--target", serve.target, *texts]) == 0
    assert batched == capsys.readouterr().out.splitlines() and [line.split("\t")[2] for line in batched] == texts
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join([*texts[:3], "x" * 5000, texts[4]]) + "\n"))
    assert main(["classify", "--target", serve.target, "--batch", "2", "-"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == batched[:2]
    assert err.startswith("error: texts 3-4 of 5: INVALID_ARGUMENT: texts[1] has 5000 characters")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n \n"))
    assert main(["classify", "--target", serve.target, "-"]) == 1
    assert capsys.readouterr().err == "error: no texts: stdin held only blank lines\n"
    # Bytes as a pipe gives them: UTF-8 (a byte-order mark first is no text), and a Latin-1 line named before any
    # call (it failed as "'utf-8' codec can't encode character '\\udce9'", naming no line).
    piped = "\ufeff" + "\n".join(texts[:2]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped.encode()), errors="surrogateescape"))
    assert main(["classify", "--target", serve.target, "-"]) == 0
    assert capsys.readouterr().out.splitlines() == batched[:2]
    latin = b"great movie\n\nbad \xe9 latin1\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(latin), errors="surrogateescape"))
    assert main(["classify", "--target", serve.target, "-"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "error: standard input, line 3: not UTF-8 text (invalid continuation byte at byte 4 of the line); convert "
        "it first, e.g. iconv -f latin1 -t utf-8\n"
    )


def test_suggest_types_stdin_lines_into_one_session(
    serve: ServeProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``seqserve suggest``: each line is appended to one session and answered as the same calls through the
    client answer them; a line the model cannot read is reported and skipped, the session as it was, and the run
    exits 1 saying so; the session is gone afterwards."""
    import io

    from service.client import ApiError, Client

    monkeypatch.setattr(sys, "stdin", io.StringIO("To be\n\n, or n\n\u4e2d\not\n"))
    assert main(["suggest", "--target", serve.target, "-n", "2", "--max-chars", "4"]) == 1
    out, err = capsys.readouterr()
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == ["5", "11", "13"]  # characters the session holds after each line
    with Client(serve.target) as c, c.session("charlm") as s:
        for row, typed in zip(rows, ["To be", ", or n", "ot"], strict=True):
            want = c.suggest_once(s.id, typed, n=2, max_chars=4)
            assert row[1:] == [f"{json.dumps(x.text)} {x.logprob:.2f}" for x in want.suggestions]
    lines = err.splitlines()
    assert lines[0].startswith("(session ") and lines[0].endswith("; deleted at the end)")
    assert lines[1].startswith("error: INVALID_ARGUMENT: appended: character '中'") and lines[1].endswith(
        "(line skipped)"
    )
    assert lines[2:] == ["error: 1 line skipped (above)"]
    with Client(serve.target) as c, pytest.raises(ApiError) as gone:
        c.get_session(lines[0].split()[1])
    assert gone.value.code.name == "NOT_FOUND"


def test_suggest_skips_a_line_that_is_not_utf8_and_stops_at_options_the_server_refuses(
    serve: ServeProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stdin line that is not UTF-8 stopped the run ("'utf-8' codec can't encode character '\\udcff'...", exit 1,
    the later lines dropped): it is skipped as a line the model cannot read is. ``-n 11`` (past the server's
    max_suggestions) was refused for every line, each "skipped", and the run exited 0: it stops at the first."""
    import io

    piped = b"To be\n\xff or\n" + "\U0001f600\n, or n\n".encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped), errors="surrogateescape"))
    assert main(["suggest", "--target", serve.target, "-n", "1", "--max-chars", "2"]) == 1
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == ["5", "11"]
    assert err.splitlines()[1:] == [
        "error: standard input, line 2: not UTF-8 text (invalid start byte at byte 0 of the line); convert it "
        "first, e.g. iconv -f latin1 -t utf-8 (line skipped)",
        "error: INVALID_ARGUMENT: appended: character '\U0001f600' is not in the model's vocabulary of 96 "
        "characters; remove or replace it (line skipped)",
        "error: 2 lines skipped (above)",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("To be\n, or n\n"))
    assert main(["suggest", "--target", serve.target, "-n", "11"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[1:] == [
        "error: INVALID_ARGUMENT: n must be between 1 and 10 (max_suggestions); got 11"
    ]


def test_a_refused_completion_prints_only_its_error(serve: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    """The prompt used to be echoed before the call failed, gluing it to the error ('ROMEOerror: ...')."""
    assert main(["complete", "ROMEO:", "--target", serve.target, "--top-k", "1000"]) == 1
    out, err = capsys.readouterr()
    assert (
        out == "" and err.startswith("error: INVALID_ARGUMENT: top_k must be between 0 and ") and err.count("\n") == 1
    )


def test_a_prompt_that_is_not_utf8_is_named_before_the_call(
    serve: ServeProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bytes that are not UTF-8 reach argv as lone surrogates; protobuf's "'utf-8' codec can't encode character
    '\\udcff' in position 6: surrogates not allowed" was printed as the error."""
    prompt = b"ROMEO:\xff".decode("utf-8", "surrogateescape")  # what Python makes of such an argument
    assert main(["complete", prompt, "--target", serve.target]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "error: the prompt is not UTF-8 text (byte 6 is not); convert it first, e.g. iconv -f latin1 -t utf-8\n"
    )


def test_forecast_reads_a_csv_by_its_header(
    serve: ServeProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CSV whose columns are in another order than the model's, with one more column, forecasts exactly as the
    model's own order (the columns go by name); before, its values went in the CSV's order, a wrong forecast
    without a word. One that lacks a model column is refused, naming it and where it is missing (the CSV's header,
    or --columns)."""
    rng = np.random.default_rng(1)
    values = 10 + rng.normal(0, 1, (30, 7))
    order, extra = [6, 0, 3, 1, 5, 2, 4], rng.normal(0, 1, 30)

    def write(name: str, cols: list[str], table: np.ndarray) -> str:
        lines = ["date," + ",".join(cols)] + [
            f"2016-07-{1 + t // 24:02d} {t % 24:02d}:00:00," + ",".join(f"{v:.4f}" for v in row)
            for t, row in enumerate(table)
        ]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        return str(tmp_path / name)

    plain = write("plain.csv", COLUMNS, values)
    shuffled = write("shuffled.csv", [COLUMNS[i] for i in order] + ["humidity"], np.c_[values[:, order], extra])
    lacking = write("lacking.csv", [COLUMNS[i] for i in order[:-1]], values[:, order[:-1]])
    assert main(["forecast", "--target", serve.target, "--csv", plain, "--rows", "24"]) == 0
    want = capsys.readouterr().out
    assert main(["forecast", "--target", serve.target, "--csv", shuffled, "--rows", "24"]) == 0
    assert capsys.readouterr().out == want
    assert main(["forecast", "--target", serve.target, "--csv", lacking, "--rows", "24"]) == 1
    assert f"INVALID_ARGUMENT: the header of {lacking} lacks 'LUFL': model forecaster" in capsys.readouterr().err
    # Picked with --columns, the refusal names the flag (the API's own word, "columns", is neither).
    assert main(["forecast", "--target", serve.target, "--csv", shuffled, "--columns", "OT,HUFL"]) == 1
    assert "INVALID_ARGUMENT: --columns lacks 'HULL', 'MUFL'" in capsys.readouterr().err


def _ett_csv(path: Path, rows: int, seed: int = 0) -> list[str]:
    """An hourly ETTh1-like CSV of ``rows`` data rows from 2016-07-01 00:00; returns its lines (header first)."""
    rng = np.random.default_rng(seed)
    start = dt.datetime(2016, 7, 1)
    lines = ["date," + ",".join(COLUMNS)] + [
        f"{start + dt.timedelta(hours=t)}," + ",".join(f"{v:.3f}" for v in 10 + rng.normal(0, 1, 7))
        for t in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return lines


def test_a_value_or_row_count_the_server_refuses_names_its_file_line_or_rows(
    serve: ServeProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server names a value it refuses by its place in what was sent (history[r][c]) and a row count as
    such: said of the file's line and column, and of --rows (they named neither, the user had to count)."""
    path = tmp_path / "far.csv"
    lines = _ett_csv(path, 40)
    lines[30] = lines[30].rsplit(",", 1)[0] + ",1e30"  # line 31 of the file, OT: far outside the training data
    path.write_text("\n".join(lines) + "\n")
    for extra in ([], ["--columns", "OT,HUFL,HULL,MUFL,MULL,LUFL,LULL"]):  # (OT first: sent as column 0)
        assert main(["forecast", "--target", serve.target, "--csv", str(path), "--rows", "24", *extra]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1
        assert err.startswith(f"error: INVALID_ARGUMENT: {path}: line 31, column 'OT' is 1.0000000150474662e+30: ")
    short = tmp_path / "short.csv"
    _ett_csv(short, 20)
    assert main(["forecast", "--target", serve.target, "--csv", str(short), "--rows", "10"]) == 1
    assert capsys.readouterr().err == (
        f"error: INVALID_ARGUMENT: --rows 10 sends 10 rows of {short}; model forecaster/1 needs at least window=24 "
        "rows: pass --rows 24 or more\n"
    )
    assert main(["forecast", "--target", serve.target, "--csv", str(short), "--rows", "50"]) == 1
    assert capsys.readouterr().err.endswith(
        f"--rows 50 sends 20 rows of {short} (all the file has); model forecaster/1 needs at least window=24 rows: "
        "use a file of 24 rows or more\n"
    )
    long = tmp_path / "long.csv"
    _ett_csv(long, 10_001)
    assert main(["forecast", "--target", serve.target, "--csv", str(long), "--rows", "20000"]) == 1
    assert capsys.readouterr().err == (
        f"error: INVALID_ARGUMENT: --rows 20000 sends 10001 rows of {long} (all the file has); the server takes at "
        "most 10000 (max_forecast_rows): pass --rows 10000 or fewer\n"
    )


def test_a_csv_newest_first_is_refused_before_the_call(
    serve: ServeProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows newest first were forecast from the file's oldest rows, reversed, exit 0 and a note that they "do not
    step by one constant step"; they are refused, saying to sort the file."""
    path = tmp_path / "desc.csv"
    lines = _ett_csv(path, 30)
    path.write_text("\n".join([lines[0], *lines[:0:-1]]) + "\n")
    assert main(["forecast", "--target", serve.target, "--csv", str(path), "--rows", "24"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"error: {path}: the rows run newest first (column 'date': 2016-07-01 23:00:00 on line 8, 2016-07-01 "
        "00:00:00 on line 31); the forecast continues from the last rows: sort the file by 'date', oldest first\n"
    )


def test_a_column_of_text_is_left_out_with_a_note(
    serve: ServeProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ "numeric columns are the features": a column of text stopped the command ("line 2, column 'station': 'A' is
    not a number"); it is left out, named on stderr, and the forecast is the file's without it. A model column
    of text is refused saying why it is missing."""
    plain, text = tmp_path / "plain.csv", tmp_path / "station.csv"
    lines = _ett_csv(plain, 30)
    text.write_text("\n".join([lines[0] + ",station", *(line + ",A" for line in lines[1:])]) + "\n")
    assert main(["forecast", "--target", serve.target, "--csv", str(plain), "--rows", "24"]) == 0
    want = capsys.readouterr().out
    assert main(["forecast", "--target", serve.target, "--csv", str(text), "--rows", "24"]) == 0
    out, err = capsys.readouterr()
    assert out == want and err == "(columns of text, not numbers, left out: 'station')\n"
    ot = tmp_path / "ot.csv"
    ot.write_text("\n".join([lines[0], *(line.rsplit(",", 1)[0] + ",hot" for line in lines[1:])]) + "\n")
    assert main(["forecast", "--target", serve.target, "--csv", str(ot), "--rows", "24"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"(columns of text, not numbers, left out: 'OT')\nerror: INVALID_ARGUMENT: the header of {ot} "
    )
    assert err.endswith(f"; column 'OT' of {ot} holds text, not numbers, and was left out\n") and err.count("\n") == 2


def test_forecast_from_csv_with_plot(serve: ServeProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path, png = tmp_path / "ett.csv", tmp_path / "forecast.png"
    rng = np.random.default_rng(0)
    lines = ["date," + ",".join(COLUMNS)]
    for t in range(40):  # hourly from 2016-07-01 00:00 to 2016-07-02 15:00
        values = 10 + 3 * np.sin(t / 5) + rng.normal(0, 0.3, 7)
        lines.append(f"2016-07-{1 + t // 24:02d} {t % 24:02d}:00:00," + ",".join(f"{v:.3f}" for v in values))
    csv_path.write_text("\n".join(lines) + "\n")
    assert main(["forecast", "--target", serve.target, "--csv", str(csv_path), "--rows", "24", "--plot", str(png)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split("\t") == ["date", *COLUMNS]  # each row's time: the file's next hours
    last = dt.datetime(2016, 7, 2, 15)
    assert [r.split("\t")[0] for r in rows[1:]] == [str(last + dt.timedelta(hours=k)) for k in range(1, 13)]
    assert len(rows) == 1 + 12  # header + tiny horizon
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A name without a suffix gets .png (the message named a file that did not exist); one matplotlib cannot write
    # is refused before the forecast is asked for (it failed after printing it).
    bare = tmp_path / "plot"
    assert (
        main(["forecast", "--target", serve.target, "--csv", str(csv_path), "--rows", "24", "--plot", str(bare)]) == 0
    )
    out, err = capsys.readouterr()
    assert err.strip() == f"plot written to {bare}.png" and (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    odd = [
        "forecast",
        "--target",
        serve.target,
        "--csv",
        str(csv_path),
        "--rows",
        "24",
        "--plot",
        str(tmp_path / "p.xyz"),
    ]
    assert main(odd) == 1
    out, err = capsys.readouterr()
    assert out == "" and "'.xyz' is not an image format; use one of" in err and err.count("\n") == 1


def test_a_plot_that_cannot_be_written_there_is_refused_before_the_forecast(
    serve: ServeProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--plot in a folder that does not exist failed after the forecast was printed, with a bare "[Errno 2] No such
    file or directory"; it is refused first, in one line naming --plot and what to do."""
    csv_path = tmp_path / "ett.csv"
    _ett_csv(csv_path, 30)
    cases = {
        tmp_path / "nosuch" / "f.png": f"folder {tmp_path / 'nosuch'} does not exist; create it, or name a file in a",
        csv_path / "f.png": f"{csv_path} is a file, not a folder; name a file in a folder",
        tmp_path / "figs.png": f"{tmp_path / 'figs.png'} is a folder; name an image file, e.g. ",
    }
    (tmp_path / "figs.png").mkdir()
    if os.geteuid() != 0:  # (root writes anywhere)
        (tmp_path / "ro").mkdir(mode=0o555)
        cases[tmp_path / "ro" / "f.png"] = f"folder {tmp_path / 'ro'} is not writable; name a file in a folder you"
    for plot, says in cases.items():
        argv = ["forecast", "--target", serve.target, "--csv", str(csv_path), "--rows", "24", "--plot", str(plot)]
        assert main(argv) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"error: --plot {plot}: {says}") and err.count("\n") == 1


def test_forecast_prints_quantiles_and_numbers_steps_it_cannot_date(
    serve: ServeProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quantiles prints each column's p10, p50 and p90 beside it (what the server answered); rows whose times do
    not step evenly are forecast all the same, with numbered steps and a note saying why."""
    from service.client import Client

    rng = np.random.default_rng(2)
    values = 10 + rng.normal(0, 1, (30, 7))
    stamps = [f"2016-07-{1 + t // 24:02d} {t % 24:02d}:00:00" for t in range(30)]
    stamps[-5] = stamps[-5].replace(":00:00", ":30:00")  # one row off the hour
    lines = ["date," + ",".join(COLUMNS)] + [
        f"{s}," + ",".join(f"{v:.4f}" for v in row) for s, row in zip(stamps, values, strict=True)
    ]
    path = tmp_path / "odd.csv"
    path.write_text("\n".join(lines) + "\n")
    assert main(["forecast", "--target", serve.target, "--csv", str(path), "--rows", "24", "--quantiles"]) == 0
    out, err = capsys.readouterr()
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows[0] == ["step", *[f"{c}{s}" for c in COLUMNS for s in ("", "_p10", "_p50", "_p90")]]
    assert [r[0] for r in rows[1:]] == [str(h) for h in range(1, 13)]
    assert (
        err == f"(forecast steps numbered: {path}: column 'date': the last 24 rows do not step by one constant step)\n"
    )
    with Client(serve.target) as c:
        want = c.forecast(values[-24:].astype(np.float32), columns=COLUMNS)
    got = np.asarray([[float(v) for v in r[1:]] for r in rows[1:]]).reshape(12, 7, 4)
    np.testing.assert_allclose(got[..., 0], want.point, atol=1e-4)
    np.testing.assert_allclose(np.moveaxis(got[..., 1:], -1, 0), want.quantiles, atol=1e-4)


def test_a_reader_that_stops_early_ends_the_cli_quietly(serve: ServeProcess) -> None:
    """`seqserve complete ... | head -c 10`: the pipe closes under the CLI, which ends as Unix tools do on
    SIGPIPE (status 141, nothing on stderr), not with "error: [Errno 32] Broken pipe"."""
    cmd = [str(SEQSERVE), "complete", "ROMEO:", "--target", serve.target, "--max-chars", "200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first character
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == ""


def test_errors_print_one_line_and_exit_non_zero(serve: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", "--target", serve.target, "--model", "nosuch", "text"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: NOT_FOUND: ") and "nosuch" in err and "\n" not in err
    assert main(["forecast", "--target", serve.target, "--csv", "/nonexistent.csv"]) == 1
    assert "/nonexistent.csv" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["classify", "x"], ["complete", "x"], ["suggest"]])
def test_unreachable_server_says_what_to_check(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """gRPC's own text ("failed to connect to all addresses") is followed by the target it tried and the two ways
    to fix it."""
    assert main([*argv, "--target", "127.0.0.1:1", "--timeout", "5"]) == 1
    first, hint = capsys.readouterr().err.strip().split("\n")
    assert first.startswith("error: UNAVAILABLE: ") and "failed to connect" in first
    assert hint == (
        "no server answers at 127.0.0.1:1: start one (seqserve serve) or point --target (env SEQSERVE_TARGET) at it"
    )


def test_console_script_with_api_key(tiny_models: Path, tmp_path: Path) -> None:
    server = ServeProcess(tiny_models, tmp_path, SEQSERVE_API_KEY="k1-0123456789abcdef")
    try:
        cmd = [str(SEQSERVE), "classify", "--target", server.target, "good"]
        denied = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "SEQSERVE_API_KEY": ""}
        )
        assert denied.returncode == 1 and denied.stderr.startswith("error: UNAUTHENTICATED: ")
        ok = subprocess.run([*cmd, "--api-key", "k1-0123456789abcdef"], capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.split("\t")[0] in ("negative", "positive")
    finally:
        assert server.terminate() == 0, server.log()
    assert "stopped" in server.log()


def test_serve_without_onnx_runtime_says_which_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Neither `seqserve[cpu]` nor `seqserve[cuda]` installed: one line that names both, nothing started."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    ready = tmp_path / "ready.json"
    assert main(["serve", "--port", "0", "--models", str(tmp_path), "--ready-file", str(ready)]) == 1
    err = capsys.readouterr().err
    assert "ONNX Runtime is not installed" in err and "seqserve[cpu]" in err and "seqserve[cuda]" in err
    assert not ready.exists()


def test_a_setting_out_of_range_is_one_line_naming_its_flag_and_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: pydantic's four-line report; now each bad setting, where it comes from and what it takes. Nothing
    starts (the settings are checked before any port is bound)."""
    monkeypatch.setenv("SEQSERVE_MAX_BATCH_SIZE", "0")
    assert main(["serve", "--port", "70000", "--workers", "-1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "setting port (--port or SEQSERVE_PORT): Input should be less than or equal to 65535, got 70000" in err
    assert "setting workers (--workers or SEQSERVE_WORKERS): Input should be greater than or equal to 0, got -1" in err
    assert "setting max_batch_size (SEQSERVE_MAX_BATCH_SIZE): Input should be greater than or equal to 1" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["forecast", "--csv", "h.csv", "--rows", "0"], "argument --rows: must be >= 1, got 0"),
        (["forecast", "--csv", "h.csv", "--columns", "a,"], "argument --columns: expected comma-separated"),
        (["classify", "--timeout", "-1", "x"], "argument --timeout: must be > 0, got -1"),
        (["classify", "--retries", "-1", "x"], "argument --retries: must be in [0, 100], got -1"),
        (["complete", "x", "--max-chars", "0"], "argument --max-chars: must be in [1, 2147483647], got 0"),
        # beyond the protobuf field: was protobuf's bare "Value out of range: 3000000000", naming no option
        (["complete", "x", "--max-chars", "3000000000"], "argument --max-chars: must be in [1, 2147483647]"),
        (
            ["complete", "x", "--seed", str(2**70)],
            "argument --seed: must be in [-9223372036854775808, 9223372036854775807]",
        ),
        (["complete", "x", "--temperature", "-0.5"], "argument --temperature: must be >= 0, got -0.5"),
    ],
)
def test_client_commands_refuse_bad_numbers_before_calling(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """--rows 0 used to send every row of the file and --rows -3 all but the first three (a negative slice)."""
    with pytest.raises(SystemExit) as e:
        main([*argv, "--target", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1  # one line, no usage block


def test_a_check_across_settings_and_a_secret_setting_print_no_values(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A check over several settings has no single value to show; a too-short signing key is refused without
    printing the key (pydantic's own report would have)."""
    monkeypatch.setenv("SEQSERVE_TLS_CERT", "/etc/hostname")
    assert main(["serve"]) == 1
    assert (
        capsys.readouterr().err
        == "error: tls_cert and tls_key go together: set both (SEQSERVE_TLS_CERT, SEQSERVE_TLS_KEY)\n"
    )
    monkeypatch.delenv("SEQSERVE_TLS_CERT")
    monkeypatch.setenv("SEQSERVE_SESSION_SIGNING_KEY", "hunter2-short")
    assert main(["serve"]) == 1
    err = capsys.readouterr().err
    assert "setting session_signing_key (SEQSERVE_SESSION_SIGNING_KEY): session_signing_key must have at least" in err
    assert "hunter2" not in err and err.endswith("got (not shown: a secret)\n")
    monkeypatch.delenv("SEQSERVE_SESSION_SIGNING_KEY")


@pytest.mark.parametrize(
    ("env", "printed"),
    [
        ({"SEQSERVE_INLINE_BATCH_TOKENS": "-1"}, "Input should be greater than or equal to 0, got '-1'"),
        ({"SEQSERVE_PAD_SPLIT_TOKENS": "-1"}, "Input should be greater than or equal to 0, got '-1'"),
        ({"SEQSERVE_VERSION_POLICY": "newest"}, '({"latest": {"num_versions": 1}}); got \'newest\''),
    ],
)
def test_a_settings_error_shows_the_value_once_and_only_a_secrets_value_is_hidden(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str], printed: str
) -> None:
    """(A numeric setting named with "tokens" printed "got (not shown: a secret)"; a setting whose own check names
    the value printed it twice: "got 'newest', got 'newest'".)"""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve"]) == 1
    assert capsys.readouterr().err.endswith(f"{printed}\n")


def test_a_settings_error_on_the_session_store_hides_its_password() -> None:
    from service.cli import _got

    assert _got("session_store", "bad", "redis://app:hunter2@h:6379/0") == ", got 'redis://app:***@h:6379/0'"
    assert _got("api_keys", "bad", "alice:0123456789abcdef") == ", got (not shown: a secret)"


def test_a_smaller_message_limit_takes_the_large_request_threshold_down_with_it() -> None:
    from service.settings import Settings

    assert Settings(max_message_bytes=512 * 1024).large_request_bytes == 512 * 1024
    assert Settings().large_request_bytes == 1024 * 1024


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"SEQSERVE_LARGE_REQUEST_BYTES": "33554432"}, "no request would count against max_large_bytes_in_flight"),
        ({"SEQSERVE_QUOTA_REQUEST_BURST": "5"}, "quota_request_burst is set but quota_requests_per_second is 0"),
    ],
)
def test_settings_that_would_switch_a_limit_off_silently_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str], words: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"SEQSERVE_SESSION_TTL_SECONDS": "inf"}, "session_ttl_seconds (SEQSERVE_SESSION_TTL_SECONDS): Input should"),
        ({"SEQSERVE_SESSION_MAX_TTL_SECONDS": "1e12"}, "Input should be less than or equal to 315360000"),
        ({"SEQSERVE_SEQUENCE_IDLE_SECONDS": "nan"}, "setting sequence_idle_seconds (SEQSERVE_SEQUENCE_IDLE_SECONDS)"),
        ({"SEQSERVE_MAX_BATCH_DELAY_MS": "1e400"}, "setting max_batch_delay_ms (SEQSERVE_MAX_BATCH_DELAY_MS)"),
    ],
)
def test_durations_are_finite_and_bounded_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str], words: str
) -> None:
    """inf or 1e12 passed start-up, then every Sessions.Create (a Timestamp overflow) or KServe ModelConfig
    (int(inf)) failed INTERNAL."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1, err


@pytest.mark.parametrize("after", [0.15, 0.4])
def test_ctrl_c_while_the_cli_loads_is_not_a_traceback(tiny_models: Path, tmp_path: Path, after: float) -> None:
    """The console script imported the whole CLI (numpy, gRPC) before any handler existed: a Ctrl-C in the first
    half second printed a KeyboardInterrupt traceback from inside an import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    cmd = [str(SEQSERVE), "serve", "--port", "0", "--metrics-port", "0", "--models", str(tiny_models)]
    proc = subprocess.Popen([*cmd, "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    out, _ = stopped_within(proc, 60, "the server")
    text = out.decode(errors="replace")
    assert "Traceback" not in text, text
    # never lost: before, one landing in the import machinery was "Exception ignored" and the server started
    lines = text.strip().splitlines()
    assert (proc.returncode, lines[-1]) in {(130, "interrupted"), (1, "interrupted")} or (
        proc.returncode == 0 and lines[-1].endswith("seqserve stopped")
    ), text


def test_after_the_imports_a_sigint_ignored_at_start_interrupts_as_it_does_before_and_once_serving() -> None:
    """A server started with SIGINT ignored (a background job of a script: how CI's nohup run started the test
    above, which then waited 60 s for a server that had ignored its Ctrl-C) stops on SIGINT during its imports
    (``deferred_interrupt``) and once its loop handles signals, and so must it in between."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_interrupt():
            assert signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.default_int_handler)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        mine = signal.getsignal(signal.SIGINT)
        with deferred_interrupt():
            pass
        assert signal.getsignal(signal.SIGINT) is mine  # any other handler comes back as it was
    finally:
        signal.signal(signal.SIGINT, before)


def test_serve_flags_override_the_environment_and_a_bare_watch_models_polls_every_5_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--watch-models`` without a value means 5 s (the help says so), a value is taken as given, and a flag wins
    over its SEQSERVE_* variable while an absent flag leaves the variable in force."""
    from service.cli import _settings, build_parser

    monkeypatch.setenv("SEQSERVE_WATCH_MODELS_SECONDS", "30")
    monkeypatch.setenv("SEQSERVE_WORKERS", "3")
    parser = build_parser()
    bare = _settings(parser.parse_args(["serve", "--watch-models"]))
    assert bare.watch_models_seconds == 5.0 and bare.workers == 3
    assert _settings(parser.parse_args(["serve", "--watch-models", "0.5"])).watch_models_seconds == 0.5
    assert _settings(parser.parse_args(["serve"])).watch_models_seconds == 30.0


def test_load_model_flags_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--load-model`` repeats, one name each; SEQSERVE_LOAD_MODELS is comma-separated; the flags win."""
    from service.cli import _settings, build_parser

    parser = build_parser()
    assert _settings(parser.parse_args(["serve"])).load_models == []  # every model
    monkeypatch.setenv("SEQSERVE_LOAD_MODELS", "charlm, sentiment")
    assert _settings(parser.parse_args(["serve"])).load_models == ["charlm", "sentiment"]
    flags = parser.parse_args(["serve", "--load-model", "forecaster", "--load-model", "charlm"])
    assert _settings(flags).load_models == ["forecaster", "charlm"]


def test_exit_on_error_flag_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--exit-on-error`` (Triton's flag) sets EXIT_ON_ERROR; without it the variable decides (off by default)."""
    from service.cli import _settings, build_parser

    parser = build_parser()
    assert _settings(parser.parse_args(["serve"])).exit_on_error is False
    assert _settings(parser.parse_args(["serve", "--exit-on-error"])).exit_on_error is True
    monkeypatch.setenv("SEQSERVE_EXIT_ON_ERROR", "true")
    assert _settings(parser.parse_args(["serve"])).exit_on_error is True


def test_workers_1_serves_everything_in_one_process(tiny_models: Path, tmp_path: Path) -> None:
    """--workers 1 is the documented single-process layout: no engine/frontend split (no child processes, no
    engine link in between), said so in the start-up line and in the ready file."""
    p = ServeProcess(tiny_models, tmp_path, "--workers", "1")
    try:
        assert set(p.ports) == {"grpc_port", "metrics_port"}  # the multi-process ready file adds engine_pid, ...
        assert ": one process, models " in p.log() and "frontends + the engine" not in p.log()
        children = Path(f"/proc/{p.proc.pid}/task/{p.proc.pid}/children").read_text().split()
        assert children == []
    finally:
        assert p.terminate() == 0


def test_http_port_serves_kserve_rest_and_names_it_in_the_ready_file(tiny_models: Path, tmp_path: Path) -> None:
    """``serve --http-port 0``: a free port for KServe v2 REST, in the ready file; SIGTERM still exits 0."""
    import json
    import urllib.request

    p = ServeProcess(tiny_models, tmp_path, "--workers", "1", "--http-port", "0")
    try:
        port = p.ports["http_port"]
        assert set(p.ports) == {"grpc_port", "metrics_port", "http_port"} and port not in (p.ports["grpc_port"], 0)
        body = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["a fine film"]}]}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/models/sentiment/infer", json.dumps(body).encode()
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            assert json.loads(r.read())["outputs"][0]["data"][0] in ("positive", "negative")
        assert "KServe v2 REST on 127.0.0.1:" in p.log()
    finally:
        assert p.terminate() == 0


def test_sigterm_lets_a_running_stream_finish_in_one_process(tiny_models: Path, tmp_path: Path) -> None:
    """--workers 1: SIGTERM drains (SEQSERVE_GRACE_SECONDS): a Complete already streaming gets all its characters
    and its finish reason, then the process exits 0."""
    from service.client import Client

    p = ServeProcess(tiny_models, tmp_path, "--workers", "1", SEQSERVE_GRACE_SECONDS="20")
    try:
        with Client(p.target, timeout=60) as c:
            chunks = c.complete("ROMEO:", max_chars=2000, seed=1)
            got = [next(chunks)]
            p.proc.send_signal(signal.SIGTERM)
            got += list(chunks)
        assert len(got) == 2000 and got[-1].finish_reason == "length"
    finally:
        assert p.terminate() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_signal_while_draining_says_so(tiny_models: Path, tmp_path: Path, workers: str) -> None:
    """A second SIGTERM or Ctrl-C while the server drained did nothing visible: the drain goes on (in-flight calls
    keep their grace), and the log says so and how to stop at once."""
    from service.client import Client

    p = ServeProcess(tiny_models, tmp_path, "--workers", workers, SEQSERVE_GRACE_SECONDS="20")
    release = threading.Event()

    def events() -> Iterator[str]:
        yield "To be"
        release.wait(30)  # the stream stays open: it holds the drain

    def logged(text: str) -> bool:
        deadline = time.monotonic() + 15
        while text not in p.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    try:
        with Client(p.target, timeout=60) as c:
            results = c.suggest(c.create_session("charlm").id, events())
            assert next(results).steps == 5
            p.proc.send_signal(signal.SIGTERM)
            assert logged("draining")
            p.proc.send_signal(signal.SIGINT)
            assert logged("SIGINT received again: still draining (calls in flight get up to 20s, GRACE_SECONDS); "
                          "SIGKILL stops the server at once")  # fmt: skip
            release.set()
            assert list(results) == []  # the stream ended normally
    finally:
        release.set()
        assert p.terminate() == 0


def test_a_commands_help_opens_with_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    """Each command's --help says first what ``seqserve --help`` lists for it (argparse leaves it out by default)."""
    with pytest.raises(SystemExit) as e:
        main(["forecast", "--help"])
    assert e.value.code == 0
    assert "\nforecast from the last rows of a CSV\n" in capsys.readouterr().out


def test_serve_on_a_host_that_is_not_this_machine_says_to_set_the_host(
    tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """192.0.2.1 (RFC 5737, documentation only) is no address of this machine: gRPC's bind said "Failed to bind to
    address" and the hint after it was "port in use? set SEQSERVE_PORT"."""
    from service.api.server import check_host

    check_host("127.0.0.1")  # (this machine's: no error)
    check_host("localhost")
    args = ["serve", "--models", str(tiny_models), "--host", "192.0.2.1", "--port", "0", "--metrics-port", "0"]
    assert main(args) == 1
    assert capsys.readouterr().err == (
        "error: host '192.0.2.1' is not an address of this machine: set --host (SEQSERVE_HOST) to an address of this "
        "machine (127.0.0.1 for this machine only, 0.0.0.0 for all)\n"
    )
