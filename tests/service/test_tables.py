"""service/tables.py: a time-series CSV read with one exact error line per problem (shared by both CLIs)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pytest

from service.tables import TableError, next_times, parse_frequency, read_history, read_table, step_name


def _write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _error(path: Path, **kwargs: object) -> str:
    with pytest.raises(TableError) as e:
        read_table(path, **kwargs)  # type: ignore[arg-type]
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    return msg.removeprefix(f"{path}: ")


def test_reads_columns_times_and_frequency(tmp_path: Path) -> None:
    p = _write(tmp_path, "date,A,B\n2016-07-01 00:00:00,1,2\n2016-07-01 00:15:00,3,4\n2016-07-01 00:30:00,5,6\n")
    t = read_table(p)
    assert (t.time_column, t.columns, t.frequency, t.rows) == ("date", ["A", "B"], "15min", 3)
    np.testing.assert_array_equal(t.values, [[1, 2], [3, 4], [5, 6]])
    assert t.times is not None and t.times[1] == dt.datetime(2016, 7, 1, 0, 15)
    assert read_table(p, columns=["B"]).values[:, 0].tolist() == [2, 4, 6]


def test_quoted_months_crlf_and_bom(tmp_path: Path) -> None:
    """The AirPassengers layout: quoted header and YYYY-MM months, CRLF, no final newline (+ a BOM here)."""
    p = tmp_path / "air.csv"
    p.write_bytes(b'\xef\xbb\xbf"Month","Passengers"\r\n"1949-01",112\r\n"1949-02",118\r\n"1949-03",132')
    t = read_table(p)
    assert (t.time_column, t.columns, t.frequency) == ("Month", ["Passengers"], "MS")
    assert t.values[:, 0].tolist() == [112, 118, 132]


def test_no_time_column(tmp_path: Path) -> None:
    t = read_table(_write(tmp_path, "x,y\n1,2\n3,4\n"))
    assert t.time_column is None and t.times is None and t.frequency is None and t.columns == ["x", "y"]


def test_missing_file_and_column(tmp_path: Path) -> None:
    assert _error(tmp_path / "nope.csv") == "file not found"
    p = _write(tmp_path, "date,A,B\n2016-07-01,1,2\n")
    assert _error(p, columns=["A", "C"]) == "no column 'C'; the header has ['date', 'A', 'B']"
    assert _error(p, time_column="when") == "no time column 'when'; the header has ['date', 'A', 'B']"
    assert _error(_write(tmp_path, "date,A\n", "h.csv")) == "a header but no data rows"
    assert _error(_write(tmp_path, "A,A\n1,2\n", "d.csv")) == "line 1: column 'A' appears twice"


def test_non_numeric_cell_names_row_and_column(tmp_path: Path) -> None:
    p = _write(tmp_path, "date,A,OT\n2016-07-01,1,2\n2016-07-02,3,n/a\n")
    assert _error(p) == "line 3, column 'OT': 'n/a' is not a number"
    p = _write(tmp_path, "date,A,OT\n2016-07-01,1,2\n2016-07-02,,4\n")
    assert _error(p) == "line 3, column 'A': empty cell (missing value)"
    p = _write(tmp_path, "date,A,OT\n2016-07-01,1,2\n2016-07-02,inf,4\n")
    assert _error(p) == "line 3, column 'A': 'inf' is not a finite number"
    p = _write(tmp_path, "date,A\n2016-07-01,1\n2016-07-02\n")
    assert _error(p) == "line 3: 1 fields, the header has 2"
    p = _write(tmp_path, "date,A\n2016-07-01,1\n\n2016-07-02,2\n")
    assert _error(p) == "line 3 is blank; remove it (only blank lines at the end are skipped)"
    p = _write(tmp_path, 'date,A\n2016-07-01,"1,000"\n')
    assert (
        _error(p)
        == "line 2, column 'A': '1,000' is not a number (a comma inside a number is not read: write 1000 or 1.5)"
    )
    p = _write(tmp_path, "date,A,,B\n2016-07-01,1,2,3\n")
    assert _error(p) == "line 1: column 3 has no name; every column needs one in the header"


@pytest.mark.parametrize("sep", ["\t", ";"])
def test_tab_or_semicolon_separated_when_the_header_has_no_comma(tmp_path: Path, sep: str) -> None:
    rows = ["date", "A", "B"], ["2016-07-01 00:00", "1", "2.5"], ["2016-07-01 01:00", "3", "4"]
    t = read_table(_write(tmp_path, "".join(sep.join(r) + "\n" for r in rows)))
    assert (t.time_column, t.columns, t.frequency) == ("date", ["A", "B"], "1h")
    np.testing.assert_array_equal(t.values, [[1, 2.5], [3, 4]])
    # a decimal comma, common in such files, is named as the problem
    p = _write(tmp_path, f"date{sep}A\n2016-07-01{sep}1,5\n", "comma.csv")
    assert (
        _error(p)
        == "line 2, column 'A': '1,5' is not a number (a comma inside a number is not read: write 1000 or 1.5)"
    )


def test_timestamps_duplicates_disorder_gaps(tmp_path: Path) -> None:
    rows = ["2016-07-01 00:00:00", "2016-07-01 01:00:00", "2016-07-01 01:00:00"]
    p = _write(tmp_path, "date,A\n" + "".join(f"{r},{i}\n" for i, r in enumerate(rows)))
    assert _error(p) == "line 4: duplicate timestamp 2016-07-01 01:00:00 (first on line 3)"
    rows = ["2016-07-01 02:00:00", "2016-07-01 01:00:00"]
    p = _write(tmp_path, "date,A\n" + "".join(f"{r},{i}\n" for i, r in enumerate(rows)))
    assert _error(p) == (
        "line 3: timestamp 2016-07-01 01:00:00 is earlier than the one before it (2016-07-01 02:00:00); "
        "sort the rows by time"
    )
    rows = ["2016-07-01 00:00:00", "2016-07-01 01:00:00", "2016-07-01 02:00:00", "2016-07-01 05:00:00"]
    p = _write(tmp_path, "date,A\n" + "".join(f"{r},{i}\n" for i, r in enumerate(rows)))
    assert _error(p) == (
        "line 5: gap of 3h between 2016-07-01 02:00:00 and 2016-07-01 05:00:00; the rows step by 1h "
        "(fill or interpolate the missing rows first)"
    )
    assert _error(p, frequency="3h").startswith("line 3: irregular step of 1h between")
    p = _write(tmp_path, "date,A\n2016-07-01,1\nyesterday,2\n")
    assert _error(p, time_column="date") == (
        "line 3, column 'date': cannot read 'yesterday' as a timestamp (use e.g. 2016-07-01 00:15:00, 2016-07-01 "
        "or 1949-01)"
    )


def test_frequency_names() -> None:
    assert [step_name(dt.timedelta(minutes=15)), step_name(dt.timedelta(hours=1)), step_name(1)] == [
        "15min",
        "1h",
        "MS",
    ]
    assert parse_frequency("15min") == dt.timedelta(minutes=15) and parse_frequency("MS") == 1
    with pytest.raises(TableError, match="'weekly' is not a frequency"):
        parse_frequency("weekly")


def test_read_history_takes_the_last_rows_and_ignores_timestamps(tmp_path: Path) -> None:
    p = _write(tmp_path, "date,A,B\n2016-07-01,1,2\n2016-07-01,3,4\n2016-07-01,5,6\n")  # duplicates: not checked
    history = read_history(p, 2)
    columns, rows = history.columns, history.rows
    assert columns == ["A", "B"] and rows.dtype == np.float32 and rows.tolist() == [[3, 4], [5, 6]]


def test_calendar_series_with_utc_offsets_or_month_ends_are_regular(tmp_path: Path) -> None:
    """Daily and monthly rows at local midnight with UTC offsets (a pandas tz-aware index) step 23 h or 25 h in UTC
    at a daylight-saving change, and month-end dates step 28-31 days: all were refused as gaps or irregular steps.
    An hourly series with offsets is still checked in UTC (where its steps are regular), and a real gap in a
    daily series with offsets is still one."""
    import zoneinfo

    paris = zoneinfo.ZoneInfo("Europe/Paris")
    days = [dt.datetime(2021, 3, 20, tzinfo=paris) + dt.timedelta(days=i) for i in range(20)]  # DST on 03-28
    p = _write(tmp_path, "date,A\n" + "".join(f"{d.isoformat(sep=' ')},{i}\n" for i, d in enumerate(days)))
    assert read_table(p).frequency == "1D"
    months = [dt.datetime(2020 + i // 12, i % 12 + 1, 1, tzinfo=paris) for i in range(30)]
    p = _write(tmp_path, "date,A\n" + "".join(f"{m.isoformat(sep=' ')},{i}\n" for i, m in enumerate(months)))
    assert read_table(p).frequency == "MS"
    ends = [
        (dt.date(2020 + i // 12, i % 12 + 2, 1) if i % 12 < 11 else dt.date(2021 + i // 12, 1, 1)) for i in range(30)
    ]
    ends = [e - dt.timedelta(days=1) for e in ends]  # 2020-01-31, 2020-02-29, ...
    p = _write(tmp_path, "date,A\n" + "".join(f"{e},{i}\n" for i, e in enumerate(ends)))
    assert read_table(p).frequency == "MS"
    hours = [dt.datetime(2021, 3, 28, tzinfo=dt.UTC) + dt.timedelta(hours=i) for i in range(6)]
    p = _write(
        tmp_path, "date,A\n" + "".join(f"{h.astimezone(paris).isoformat(sep=' ')},{i}\n" for i, h in enumerate(hours))
    )
    assert read_table(p).frequency == "1h"
    gap = days[:5] + days[6:]
    p = _write(tmp_path, "date,A\n" + "".join(f"{d.isoformat(sep=' ')},{i}\n" for i, d in enumerate(gap)))
    assert _error(p).startswith("line 7: gap of 2D between 2021-03-24 00:00:00+01:00 and 2021-03-26")


def test_columns_asked_for_wrongly_are_named(tmp_path: Path) -> None:
    """--columns naming the time column, or one column twice, is refused saying so (not "'2016-07-01' is not a
    number", not silently)."""
    p = _write(tmp_path, "date,A,B\n2016-07-01,1,2\n2016-07-02,3,4\n")
    assert _error(p, columns=["date", "A"]) == "column 'date' is the time column; it cannot also be a numeric column"
    assert _error(p, columns=["A", "A"]) == "column 'A' is asked for twice"


def test_a_row_with_too_many_fields_is_named(tmp_path: Path) -> None:
    """A stray trailing comma (an extra field) is refused like a missing one."""
    p = _write(tmp_path, "date,A\n2016-07-01,1\n2016-07-02,2,9\n")
    assert _error(p) == "line 3: 3 fields, the header has 2"


def test_several_blank_lines_at_the_end_are_skipped(tmp_path: Path) -> None:
    """Every trailing blank line is skipped, not only the last (the one before it was refused as a blank row)."""
    p = _write(tmp_path, "date,A\n2016-07-01,1\n2016-07-02,2\n\n\n\n")
    assert read_table(p).values[:, 0].tolist() == [1, 2]


def test_a_zero_frequency_is_refused() -> None:
    """--freq 0h is not a step."""
    with pytest.raises(TableError, match="'0h' is not a frequency"):
        parse_frequency("0h")


def test_next_times_continue_the_last_rows_as_the_file_writes_them(tmp_path: Path) -> None:
    """What ``seqserve forecast`` prints beside each forecast row: the times after the file's last row, at the
    step of the rows sent, in the file's own form."""
    monthly = _write(tmp_path, "Month,P\n" + "".join(f"1960-{m:02d},{m}\n" for m in range(1, 13)), "m.csv")
    assert next_times(read_history(monthly, 12), 3) == ("Month", ["1961-01", "1961-02", "1961-03"])
    quarterly = _write(tmp_path, "date,P\n2020-01-31,1\n2020-04-30,2\n2020-07-31,3\n2020-10-31,4\n", "q.csv")
    assert next_times(read_history(quarterly, 4), 2) == (
        "date",
        ["2021-01-31", "2021-04-30"],
    )  # month ends stay month ends
    hourly = "date,A\n" + "".join(f"2016-07-01 {h:02d}:00:00,{h}\n" for h in range(22, 24))
    assert next_times(read_history(_write(tmp_path, hourly, "h.csv"), 2), 3) == (
        "date",
        ["2016-07-02 00:00:00", "2016-07-02 01:00:00", "2016-07-02 02:00:00"],
    )
    iso = _write(tmp_path, "ts,A\n2016-07-01T00:15:00,1\n2016-07-01T00:30:00,2\n", "t.csv")
    assert next_times(read_history(iso, 2), 1) == ("ts", ["2016-07-01T00:45:00"])
    daily = _write(tmp_path, "day,A\n2024-02-28,1\n2024-02-29,2\n", "d.csv")
    assert next_times(read_history(daily, 2), 2) == ("day", ["2024-03-01", "2024-03-02"])
    # only the rows sent must step evenly: a gap before them does not matter
    gap = _write(tmp_path, "date,A\n2016-01-01,0\n2016-01-05,1\n2016-01-06,2\n2016-01-07,3\n", "g.csv")
    assert next_times(read_history(gap, 3), 1) == ("date", ["2016-01-08"])


@pytest.mark.parametrize(
    ("stamps", "want"),
    [
        (["2018-06-26T18:00", "2018-06-26T19:00"], ["2018-06-26T20:00", "2018-06-26T21:00"]),  # no seconds
        (["2018-06-26 18:00", "2018-06-26 19:00"], ["2018-06-26 20:00", "2018-06-26 21:00"]),
        (["2018-06-26T18:00:00", "2018-06-26T19:00:00"], ["2018-06-26T20:00:00", "2018-06-26T21:00:00"]),
        (
            ["2018-06-26 18:00:00.000", "2018-06-26 18:00:00.250"],
            ["2018-06-26 18:00:00.500", "2018-06-26 18:00:00.750"],
        ),
        (
            ["2018-06-26 18:00:00+02:00", "2018-06-26 19:00:00+02:00"],
            ["2018-06-26 20:00:00+02:00", "2018-06-26 21:00:00+02:00"],
        ),
        (["2018-06-26T18:00Z", "2018-06-26T19:00Z"], ["2018-06-26T20:00Z", "2018-06-26T21:00Z"]),
        (["2018-06-26T18:00-0500", "2018-06-26T19:00-0500"], ["2018-06-26T20:00-0500", "2018-06-26T21:00-0500"]),
        (
            ["2018-06-26T18:00", "2018-06-26T18:00:30"],
            ["2018-06-26T18:01:00", "2018-06-26T18:01:30"],
        ),  # the last's form
        (["2018-06-25", "2018-06-26"], ["2018-06-27", "2018-06-28"]),
    ],
)
def test_next_times_are_written_in_the_files_own_form(tmp_path: Path, stamps: list[str], want: list[str]) -> None:
    """The README's "written as the file writes it": a file writing 2018-06-26T19:00 (no seconds), or with a UTC
    offset, got 2018-06-26T20:00:00 (seconds added) or no times at all ("UTC offsets are not continued")."""
    path = _write(tmp_path, "date,A\n" + "".join(f"{s},{i}\n" for i, s in enumerate(stamps)))
    assert next_times(read_history(path, 2), 2) == ("date", want)


def test_next_times_with_utc_offsets_continue_the_wall_clock_or_utc_at_the_last_offset(tmp_path: Path) -> None:
    """Days at local midnight step by one day on the wall clock through a daylight-saving change (23 h in UTC),
    hours by one hour in UTC (two on the wall clock); both continue at the last row's offset."""
    import zoneinfo

    paris = zoneinfo.ZoneInfo("Europe/Paris")
    days = [dt.datetime(2021, 3, 27, tzinfo=paris) + dt.timedelta(days=i) for i in range(3)]  # DST on 03-28
    path = _write(tmp_path, "date,A\n" + "".join(f"{d.isoformat()},{i}\n" for i, d in enumerate(days)), "d.csv")
    assert next_times(read_history(path, 3), 2) == ("date", ["2021-03-30T00:00:00+02:00", "2021-03-31T00:00:00+02:00"])
    hours = [(dt.datetime(2021, 3, 28, tzinfo=dt.UTC) + dt.timedelta(hours=i)).astimezone(paris) for i in range(3)]
    path = _write(tmp_path, "date,A\n" + "".join(f"{h.isoformat(sep=' ')},{i}\n" for i, h in enumerate(hours)), "h.csv")
    assert next_times(read_history(path, 3), 2) == ("date", ["2021-03-28 05:00:00+02:00", "2021-03-28 06:00:00+02:00"])


def test_rows_newest_first_are_refused_saying_to_sort_them(tmp_path: Path) -> None:
    """A file written newest first (a common export) was forecast from its oldest rows, in reverse, with a note
    that they "do not step by one constant step". Rows out of order otherwise are still read (their times are not
    continued)."""
    newest_first = "date,A\n" + "".join(f"2016-01-{d:02d},{d}\n" for d in range(9, 0, -1))
    path = _write(tmp_path, newest_first, "desc.csv")
    for rows in (4, 1, 20):  # (one row: the last two lines tell)
        with pytest.raises(TableError) as e:
            read_history(path, rows)
        first = max(2, 11 - max(rows, 2))
        assert str(e.value) == (
            f"{path}: the rows run newest first (column 'date': 2016-01-{11 - first:02d} on line {first}, 2016-01-01 "
            "on line 10); the forecast continues from the last rows: sort the file by 'date', oldest first"
        )
    shuffled = _write(tmp_path, "date,A\n2016-01-03,0\n2016-01-01,1\n2016-01-02,2\n", "mixed.csv")
    assert read_history(shuffled, 3).rows.tolist() == [[0], [1], [2]]
    months = _write(tmp_path, "Month,A\n1949-03,0\n1949-02,1\n1949-01,2\n", "m.csv")
    with pytest.raises(TableError, match=r"newest first .* sort the file by 'Month', oldest first"):
        read_history(months, 3)


def test_the_client_leaves_out_columns_of_text_and_still_refuses_a_bad_cell_in_a_column_of_numbers(
    tmp_path: Path,
) -> None:
    """``seqserve forecast --csv`` takes "numeric columns" as the features: a column of text (a station's name)
    stopped it ("'A' is not a number"). It is left out, and named; a column of numbers with a cell that is not
    one, or numbers written with a comma or a currency sign, are still refused at their line. Training still
    reads every column."""
    p = _write(tmp_path, "date,A,station,B\n2016-07-01,1,north,2\n2016-07-02,3,,4\n2016-07-03,5,south,6\n")
    history = read_history(p, 2)
    assert (
        history.columns == ["A", "B"] and history.left_out == ("station",) and history.rows.tolist() == [[3, 4], [5, 6]]
    )
    assert _error(p) == "line 2, column 'station': 'north' is not a number"  # (training: every column)
    with pytest.raises(TableError, match=re.escape("line 2, column 'station': 'north' is not a number")):
        read_history(p, 2, ["A", "station"])  # asked for by name: read
    cases = {
        "date,A,B\n2016-07-01,1,x\n2016-07-02,2,3\n": "line 2, column 'B': 'x' is not a number",
        'date,A,B\n2016-07-01,1,"1,5"\n2016-07-02,2,"2,5"\n': "line 2, column 'B': '1,5' is not a number (a comma",
        "date,A,B\n2016-07-01,1,$1200\n2016-07-02,2,$900\n": "line 2, column 'B': '$1200' is not a number",
        "date,A,B\n2016-07-01,1,12%\n2016-07-02,2,13%\n": "line 2, column 'B': '12%' is not a number",
        "date,A,B\n2016-07-01,1,\n2016-07-02,2,\n": "line 2, column 'B': empty cell",  # (empty: not text)
        "date,A,B\n2016-07-01,x,y\n2016-07-02,z,w\n": "no numeric columns ('A', 'B': text, not numbers)",
    }
    for i, (text, says) in enumerate(cases.items()):
        with pytest.raises(TableError, match=re.escape(says)):
            read_history(_write(tmp_path, text, f"c{i}.csv"), 2)


def test_next_times_say_why_they_cannot_continue(tmp_path: Path) -> None:
    assert (
        next_times(read_history(_write(tmp_path, "A,B\n1,2\n3,4\n"), 2), 3) is None
    )  # no time column: steps are numbered
    cases = {
        "date,A\n2016-01-01,0\n2016-01-05,1\n2016-01-06,2\n": "the last 3 rows do not step by one constant step",
        "date,A\n2016-01-02,0\n2016-01-03,1\n2016-01-01,2\n": "the last 3 rows do not step by one constant step",
        "date,A\n2016-01-01,0\n2016-01-01,1\n": "the last 2 rows do not step by one constant step",
        "date,A\n2016-01-01,0\n": "one row has no step to continue",
        "date,A\n2016-01-01T00:00:00+01:00,0\n2016-01-02T00:00:00,1\n": (
            "2016-01-02T00:00:00 on line 3 has no UTC offset, 2016-01-01T00:00:00+01:00 on line 2 has one; write every "
            "timestamp with one, or none"
        ),
        "date,A\n2016-01-01,0\n2016-13-01,1\n": "line 3, column 'date': cannot read '2016-13-01' as a timestamp",
    }
    for i, (text, says) in enumerate(cases.items()):
        path = _write(tmp_path, text, f"bad{i}.csv")
        with pytest.raises(TableError, match=re.escape(says)):
            next_times(read_history(path, 5), 2)
