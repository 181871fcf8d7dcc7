"""A time-series CSV as numbers: header, optional timestamp column, numeric columns, one error line per problem.
Fields are separated by commas, or by tabs or semicolons when the header line has no comma.

Shared by ``seqserve forecast --csv`` and ``seqserve-train forecast`` (numpy and the standard library only, no
torch), so a client reads a file exactly as training did. Every problem raises ``TableError`` naming the file and,
where there is one, the line (1-based, the header is line 1) and the column:

    ETTm1.csv: line 7, column 'OT': 'n/a' is not a number
    sales.csv: line 40: duplicate timestamp 2021-03-01 00:00:00 (first on line 39)
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

DELIMITERS = (",", "\t", ";")  # tried in this order on the header line
TIME_NAMES = ("date", "datetime", "time", "timestamp", "ds", "month", "period")
_YEAR_MONTH = re.compile(r"^(\d{4})-(\d{1,2})$")
_FIXED_UNITS = (("D", 86400), ("h", 3600), ("min", 60), ("s", 1))  # largest unit that divides the step
Float32 = npt.NDArray[np.float32]
_FREQ = re.compile(r"^(\d*)\s*(D|h|min|s|MS)$")


class TableError(ValueError):
    """A missing or malformed table; ``str(err)`` is one line naming the file and the problem."""


@dataclass(frozen=True)
class Table:
    path: Path
    columns: list[str]  # the numeric columns read, in file order (or the order asked for)
    values: npt.NDArray[np.float64]  # (rows, len(columns))
    time_column: str | None = None
    times: list[dt.datetime] | None = None
    frequency: str | None = None  # e.g. "15min", "1h", "MS" (calendar months); None without timestamps
    time_texts: list[str] | None = None  # the time column's cells as written (also when not checked)
    left_out: tuple[str, ...] = ()  # columns of text, not read (``skip_text``)

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])


_OFFSET = re.compile(r"(?:[+-]\d\d:?\d\d|Z)$")


def parse_time(text: str) -> dt.datetime:
    """ISO 8601 dates and date-times (``2016-07-01 00:15:00``, ``2016-07-01``) and ``YYYY-MM`` months."""
    m = _YEAR_MONTH.match(text)
    if m:
        return dt.datetime(int(m.group(1)), int(m.group(2)), 1)
    t = dt.datetime.fromisoformat(text)
    return t.replace(tzinfo=None) if t.tzinfo is None else t.astimezone(dt.UTC).replace(tzinfo=None)


def _month_end(t: dt.datetime) -> bool:
    return (t + dt.timedelta(days=1)).month != t.month


def _months(a: dt.datetime, b: dt.datetime) -> int | None:
    """Whole calendar months from ``a`` to ``b`` when both sit on the same day and time of month, or both on the
    last day of their month (month-end dates: 01-31, 02-29, 03-31, ...) at the same time, else None."""
    same_day = a.day == b.day or (_month_end(a) and _month_end(b))
    if not same_day or a.time() != b.time():
        return None
    return (b.year - a.year) * 12 + b.month - a.month


def _wall_clock(text: str) -> dt.datetime:
    """A timestamp's local wall-clock time (its UTC offset dropped, not applied)."""
    return parse_time(text) if _YEAR_MONTH.match(text) else dt.datetime.fromisoformat(text).replace(tzinfo=None)


def step_name(step: dt.timedelta | int) -> str:
    """A fixed step as ``15min``/``1h``/``1D``; an int is a number of calendar months (``MS``, ``3MS``)."""
    if isinstance(step, int):
        return "MS" if step == 1 else f"{step}MS"
    seconds = int(step.total_seconds())
    for unit, size in _FIXED_UNITS:
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    raise AssertionError("unreachable: every whole number of seconds has a unit")


def parse_frequency(text: str) -> dt.timedelta | int:
    """``15min`` -> timedelta(minutes=15); ``MS`` / ``3MS`` -> 1 / 3 calendar months."""
    m = _FREQ.match(text.strip())
    if not m or (m.group(1) and int(m.group(1)) < 1):
        raise TableError(
            f"--freq: {text!r} is not a frequency; use e.g. 15min, 1h, 1D, MS (calendar months), auto or irregular"
        )
    n, unit = int(m.group(1) or 1), m.group(2)
    if unit == "MS":
        return n
    return dt.timedelta(seconds=n * dict(_FIXED_UNITS)[unit])


def _step(a: dt.datetime, b: dt.datetime) -> dt.timedelta | int:
    months = _months(a, b)
    return months if months is not None and months > 0 and (b - a).days >= 28 else b - a


def _expected(steps: list[dt.timedelta | int], frequency: str | None) -> dt.timedelta | int:
    """The step the rows must follow: the given frequency, else the most common step."""
    return parse_frequency(frequency) if frequency not in (None, "auto") else Counter(steps).most_common(1)[0][0]


IRREGULAR = "irregular"  # --freq: timestamps that increase by steps of any size (business days, event times)


def check_times(path: Path, times: list[dt.datetime], texts: list[str], frequency: str | None) -> str | None:
    """Timestamps must increase by one constant step (given, or the most common one): no duplicates, no
    disorder, no gaps. Returns the step's name. ``frequency`` ``irregular``: increasing is enough (data with
    weekend gaps could not be read at all)."""
    first: dict[dt.datetime, int] = {}
    for i, t in enumerate(times):
        if t in first:
            raise TableError(f"{path}: line {i + 2}: duplicate timestamp {texts[i]} (first on line {first[t] + 2})")
        first[t] = i
        if i and t < times[i - 1]:
            raise TableError(
                f"{path}: line {i + 2}: timestamp {texts[i]} is earlier than the one before it ({texts[i - 1]}); "
                "sort the rows by time"
            )
    if frequency == IRREGULAR:
        return IRREGULAR
    if len(times) < 2:
        return None
    steps = [_step(a, b) for a, b in itertools.pairwise(times)]
    want = _expected(steps, frequency)
    if any(s != want for s in steps) and any(_OFFSET.search(t) for t in texts):
        # Timestamps with UTC offsets (as pandas writes a tz-aware index): daily or monthly rows sit at local
        # midnight, so in UTC a daylight-saving change makes a 23 h or 25 h step. Their local wall clock is regular.
        wall = [_step(a, b) for a, b in itertools.pairwise(_wall_clock(t) for t in texts)]
        wall_step = _expected(wall, frequency)
        if all(s == wall_step for s in wall):
            return step_name(wall_step)
    for i, s in enumerate(steps):
        if s != want:
            kind = "gap" if _seconds(s) > _seconds(want) else "irregular step"
            raise TableError(
                f"{path}: line {i + 3}: {kind} of {step_name(s)} between {texts[i]} and {texts[i + 1]}; the rows "
                f"step by {step_name(want)} (fill or interpolate the missing rows first)"
            )
    return step_name(want)


def _seconds(step: dt.timedelta | int) -> float:
    return step * 30.44 * 86400 if isinstance(step, int) else step.total_seconds()


def _is_time(cell: str) -> bool:
    try:
        parse_time(cell.strip())
    except ValueError:
        return False
    return True


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _detect_time_column(header: list[str], first_row: list[str]) -> str | None:
    """A column named like a timestamp (``date``, ``ds``, ...) unless its first cell is a number and no timestamp
    (a ``month`` of 1..12 or a ``time`` in elapsed seconds is data), else the first column whose first cell is a
    timestamp and not a number."""
    for name, cell in zip(header, first_row, strict=False):
        if name.strip().lower() in TIME_NAMES and (_is_time(cell) or not _is_number(cell)):
            return name  # (20160701 is a number and an ISO date: a date)
    return next(
        (name for name, cell in zip(header, first_row, strict=False) if not _is_number(cell) and _is_time(cell)), None
    )


def read_table(
    path: Path,
    *,
    time_column: str | None = "auto",
    columns: Sequence[str] | None = None,
    frequency: str | None = "auto",
    check_time: bool = True,
    skip_text: bool = False,
) -> Table:
    """Reads ``path``. ``time_column``: a name, ``"auto"`` (detect) or None (no timestamps); ``columns``: the
    numeric columns to read (default: every column but the time column); ``frequency``: the step the timestamps
    must follow, ``"auto"`` = the most common step; ``check_time=False`` only sets the time column aside;
    ``skip_text``: without ``columns``, leave out a column none of whose cells reads as a number (a station's
    name, a category; ``Table.left_out``), where a column of numbers with a cell that is not one is still refused."""
    table = _read_rows(path)
    header, body = table[0], table[1:]
    if time_column == "auto":
        time_column = _detect_time_column(header, body[0])
    elif time_column is not None and time_column not in header:
        raise TableError(f"{path}: no time column {time_column!r}; the header has {header}")
    names = [c for c in header if c != time_column] if columns is None else list(columns)
    missing = [c for c in names if c not in header]
    if missing:
        raise TableError(f"{path}: no column {missing[0]!r}; the header has {header}")
    if time_column is not None and time_column in names:
        raise TableError(f"{path}: column {time_column!r} is the time column; it cannot also be a numeric column")
    left_out: tuple[str, ...] = ()
    if skip_text and columns is None:
        left_out = tuple(c for c in names if _text_column(row[header.index(c)] for row in body))
        names = [c for c in names if c not in left_out]
        if not names and left_out:
            raise TableError(f"{path}: no numeric columns ({', '.join(map(repr, left_out))}: text, not numbers)")
    if not names:
        raise TableError(f"{path}: no numeric columns (the header has only {header})")
    if len(set(names)) != len(names):
        raise TableError(f"{path}: column {Counter(names).most_common(1)[0][0]!r} is asked for twice")
    idx = [header.index(c) for c in names]
    values = np.empty((len(body), len(names)), dtype=np.float64)
    for r, row in enumerate(body):
        for j, (c, name) in enumerate(zip(idx, names, strict=True)):
            values[r, j] = _number(path, r + 2, name, row[c])
    times, freq, texts = None, None, None
    if time_column is not None:
        t = header.index(time_column)
        texts = [row[t].strip() for row in body]
        if check_time:
            times = [_time(path, r + 2, time_column, s) for r, s in enumerate(texts)]
            freq = check_times(path, times, texts, frequency)
    return Table(path, names, values, time_column, times, freq, texts, left_out)


def _text_column(cells: Iterable[str]) -> bool:
    """Some cell holds text and none reads as a number, not even one written with a currency sign, a percent sign
    or separators (``$1,200``, ``12%``, ``1,5``: a column of numbers written so is refused naming the cell)."""
    seen = False
    for cell in cells:
        text = cell.strip()
        if not text:
            continue
        seen = True
        if _is_number(text) or _is_number(_DECORATION.sub("", text)):
            return False
    return seen


_DECORATION = re.compile(r"[\s$€£¥%',_]")


def _read_rows(path: Path) -> list[list[str]]:
    if not path.exists():
        raise TableError(f"{path}: file not found")
    if not path.is_file():
        raise TableError(f"{path}: not a regular file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            text = f.read()
        delimiter = _delimiter(text.partition("\n")[0])
        table = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except UnicodeDecodeError as e:
        raise TableError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except (OSError, csv.Error) as e:
        raise TableError(f"{path}: cannot read as CSV: {e}") from None
    while table and not any(cell.strip() for cell in table[-1]):
        table.pop()  # trailing blank lines
    if not table:
        raise TableError(f"{path}: file is empty")
    header = [h.strip() for h in table[0]]
    unnamed = [i for i, h in enumerate(header, start=1) if not h]
    if unnamed:
        raise TableError(f"{path}: line 1: column {unnamed[0]} has no name; every column needs one in the header")
    if len(set(header)) != len(header):
        raise TableError(f"{path}: line 1: column {Counter(header).most_common(1)[0][0]!r} appears twice")
    if len(table) < 2:
        raise TableError(f"{path}: a header but no data rows")
    for n, row in enumerate(table[1:], start=2):
        if len(row) != len(header):
            if not any(cell.strip() for cell in row):
                raise TableError(f"{path}: line {n} is blank; remove it (only blank lines at the end are skipped)")
            raise TableError(f"{path}: line {n}: {len(row)} fields, the header has {len(header)}")
    return [header, *table[1:]]


def _delimiter(header: str) -> str:
    """The header line decides: commas, else tabs, else semicolons (spreadsheets in many locales write those)."""
    return next((d for d in DELIMITERS if d in header), ",")


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _number(path: Path, line: int, column: str, cell: str) -> float:
    text = cell.strip()
    if not text:
        raise TableError(f"{path}: line {line}, column {column!r}: empty cell (missing value)")
    try:
        v = float(text)
    except ValueError:
        hint = (
            " (a comma inside a number is not read: write 1000 or 1.5)" if re.fullmatch(r"[-+]?\d+,\d+", text) else ""
        )
        raise TableError(f"{path}: line {line}, column {column!r}: {text[:40]!r} is not a number{hint}") from None
    if not np.isfinite(v):
        raise TableError(f"{path}: line {line}, column {column!r}: {text!r} is not a finite number")
    if abs(v) > FLOAT32_MAX:
        raise TableError(
            f"{path}: line {line}, column {column!r}: {text[:40]!r} is beyond float32's range (+-{FLOAT32_MAX:.3g}), "
            "in which models compute; rescale the column"
        )
    return v


def _time(path: Path, line: int, column: str, text: str) -> dt.datetime:
    try:
        return parse_time(text)
    except ValueError:
        raise TableError(
            f"{path}: line {line}, column {column!r}: cannot read {text[:40]!r} as a timestamp "
            "(use e.g. 2016-07-01 00:15:00, 2016-07-01 or 1949-01)"
        ) from None


@dataclass(frozen=True)
class History:
    """What a client sends from a CSV: the last rows of its numeric ``columns`` as float32 ``(rows, features)``,
    and the time column's name and cells of those rows (``times``, as written; None without one), the first of
    them on file line ``first_line``; ``left_out``: columns of text, not sent (only without ``columns``)."""

    path: Path
    columns: list[str]
    rows: Float32
    time_column: str | None
    times: list[str] | None
    first_line: int
    left_out: tuple[str, ...] = ()


def read_history(path: Path, rows: int, columns: Sequence[str] | None = None) -> History:
    """The client's view: ``columns`` (default: every column but a detected time column and columns of text) and
    the last ``rows`` rows, with training's checks on the numbers (timestamps are not checked: the server forecasts
    from the rows as sent; only rows newest first are refused, whose last rows are the oldest)."""
    table = read_table(path, columns=columns, check_time=False, skip_text=True)
    kept = table.values[-rows:]
    times = None if table.time_texts is None else table.time_texts[-rows:]
    first_line = table.rows - len(kept) + 2
    if table.time_column is not None and table.time_texts is not None:
        _oldest_first(path, table.time_column, table.time_texts[-max(rows, 2) :], table.rows - max(rows, 2) + 2)
    return History(path, table.columns, kept.astype(np.float32), table.time_column, times, first_line, table.left_out)


def _oldest_first(path: Path, column: str, texts: list[str], first_line: int) -> None:
    """Refuses rows whose times fall from each one to the next (a file written newest first, as many exports are):
    the rows sent, the file's last ones, would be its oldest, in reverse. Other disorder, gaps and times that do
    not read are left to ``next_times`` (the forecast does not need them)."""
    try:
        times = [parse_time(t) for t in texts]
    except ValueError:
        return
    if len(times) >= 2 and all(a > b for a, b in itertools.pairwise(times)):
        first_line = max(first_line, 2)
        raise TableError(
            f"{path}: the rows run newest first (column {column!r}: {texts[0]} on line {first_line}, {texts[-1]} on "
            f"line {first_line + len(texts) - 1}); the forecast continues from the last rows: sort the file by "
            f"{column!r}, oldest first"
        )


def next_times(history: History, horizon: int) -> tuple[str, list[str]] | None:
    """The time column's name and the ``horizon`` timestamps after ``history``'s last row, stepping as its rows
    step, written as the file writes its last one (``1961-01``, ``2018-06-27``, ``2018-06-26 20:00:00``,
    ``2018-06-26T20:00``, ``2018-06-26T20:00:00+02:00``): the times a forecast from those rows is for. Rows with
    UTC offsets continue at the last one's offset (a daylight-saving change after it is not known), by their local
    wall clock where it steps evenly (days, months at local midnight), else by UTC (hours through such a change).
    None when the file has no time column; TableError saying why when those rows do not step evenly (the forecast
    itself does not need them to)."""
    path, column, texts = history.path, history.time_column, history.times
    if column is None or texts is None:
        return None
    times = [_time(path, history.first_line + i, column, t) for i, t in enumerate(texts)]  # (UTC when offset)
    if len(times) < 2:
        raise TableError(f"{path}: one row has no step to continue")
    offset = [bool(_OFFSET.search(t)) for t in texts]
    if any(offset) and not all(offset):
        i, line = offset.index(not offset[0]), history.first_line
        has, other = ("no", "has one") if offset[0] else ("a", "has none")
        raise TableError(
            f"{path}: column {column!r}: {texts[i]} on line {line + i} has {has} UTC offset, {texts[0]} on line {line} "
            f"{other}; write every timestamp with one, or none"
        )
    wall = [_wall_clock(t) for t in texts] if offset[0] else times
    future = _continued(wall, horizon)  # local wall clock (the same as UTC without offsets)
    if future is None and offset[0]:
        utc = _continued(times, horizon)
        future = None if utc is None else [t + (wall[-1] - times[-1]) for t in utc]  # at the last row's offset
    if future is None:
        raise TableError(f"{path}: column {column!r}: the last {len(times)} rows do not step by one constant step")
    written = texts[-1]
    if _YEAR_MONTH.match(written):
        return column, [f"{t.year:04d}-{t.month:02d}" for t in future]
    form = _ISO_FORM.fullmatch(written)
    if form is None:  # another ISO form (20160701, ...): ISO 8601 as Python writes it
        sep = "T" if "T" in written else " "
        return column, [t.date().isoformat() if len(written) == 10 else t.isoformat(sep=sep) for t in future]
    return column, [_written_as(t, form) for t in future]


# An ISO date or date-time's parts: date, separator, hours, minutes, seconds, fraction, UTC offset.
_ISO_FORM = re.compile(
    r"(\d{4}-\d{2}-\d{2})(?:([T ])(\d{2}):(\d{2})(?::(\d{2})(?:([.,])(\d+))?)?(Z|[+-]\d{2}:?\d{2})?)?"
)


def _written_as(t: dt.datetime, form: re.Match[str]) -> str:
    """``t`` (wall clock) in the form of the timestamp ``form`` matched: its separator, its precision (more where
    ``t`` needs it: a time on a date-only file, seconds on one written to the minute) and its UTC offset as written."""
    _, sep, _, _, seconds, point, fraction, offset = form.groups()
    if sep is None and t.time() == dt.time():
        return t.date().isoformat()
    text = f"{t.date().isoformat()}{sep or ' '}{t.hour:02d}:{t.minute:02d}"
    if seconds is not None or t.second or t.microsecond:
        text += f":{t.second:02d}"
    if fraction is not None or t.microsecond:
        digits = f"{t.microsecond:06d}"
        text += (point or ".") + digits[: max(len(fraction or ""), len(digits.rstrip("0")))]
    return text + (offset or "")


def _continued(times: list[dt.datetime], horizon: int) -> list[dt.datetime] | None:
    """The ``horizon`` times after ``times``, at their one constant step (calendar months: the same day of the
    month, or the month's last day); None when they do not step by one constant, positive step."""
    steps = {_step(a, b) for a, b in itertools.pairwise(times)}
    if len(steps) != 1 or not _seconds(next(iter(steps))) > 0:
        return None
    step, last = steps.pop(), times[-1]
    if not isinstance(step, int):
        return [last + k * step for k in range(1, horizon + 1)]
    month_end = _month_end(last)
    future = []
    for k in range(1, horizon + 1):
        year, month = divmod(last.year * 12 + last.month - 1 + k * step, 12)
        first = last.replace(year=year, month=month + 1, day=1)
        end = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1) - dt.timedelta(days=1)
        future.append(end if month_end or last.day > end.day else first.replace(day=last.day))
    return future
