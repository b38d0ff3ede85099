"""Read a recipient list (CSV, Excel or SQLite) as a stream of rows of text.

Nothing here knows about addresses: a row is a number a person can find in the file and the
cells of that row as text, keyed by the column names of the header.
"""

import csv
import datetime
import hashlib
import json
import re
import sqlite3
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from batch.errors import SourceError

KINDS = {
    ".csv": "csv",
    ".xlsx": "xlsx",
    ".db": "sqlite",
    ".sqlite": "sqlite",
    ".sqlite3": "sqlite",
}
DEFAULT_QUERY = "SELECT * FROM recipients"
DELIMITERS = ",;\t|"  # on a tie the earlier one wins, so a plain list stays comma-separated
FINGERPRINT_BLOCK_BYTES = 1024 * 1024
UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")


@dataclass(frozen=True, slots=True)
class Row:
    """One record of a list: the number a person finds it under, and its cells as text."""

    number: int
    fields: dict[str, str]


def read_rows(
    path: Path, *, query: str | None = None, sheet: str | None = None, chunk_rows: int = 50_000
) -> Iterator[Row]:
    """Yield the rows of a recipient list one at a time.

    The type, the options and whether the file can be read are checked at once; problems with
    the content (encoding, header, query) surface as SourceError while iterating. CSV and
    SQLite lists stream in flat memory, chunk_rows rows fetched from SQLite at a time; an
    Excel sheet is loaded whole first (see _calamine_records).
    """
    kind = _kind(path)
    _check_options(path, kind, query, sheet)
    _check_readable(path)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")

    if kind == "csv":
        return _csv_rows(path)
    if kind == "xlsx":
        return _rows_from(path, _excel_records(path, sheet))
    return _sqlite_rows(path, query or DEFAULT_QUERY, chunk_rows)


def fingerprint(path: Path, *, query: str | None = None, sheet: str | None = None) -> str:
    """Return a hex sha256 that changes when the file's bytes, the query or the sheet change."""
    content = hashlib.sha256()
    try:
        with path.open("rb") as file:
            while block := file.read(FINGERPRINT_BLOCK_BYTES):
                content.update(block)
    except OSError as error:
        raise _cannot_read(path, error) from None

    # Hash the three parts as one JSON list, so the query cannot pass for the file's end.
    parts = json.dumps([content.hexdigest(), query, sheet])
    return hashlib.sha256(parts.encode()).hexdigest()


def _kind(path: Path) -> str:
    """Return which reader a list needs, judged by its suffix."""
    suffix = path.suffix.lower()
    if suffix not in KINDS:
        raise SourceError(
            f"{path}: unsupported list type '{suffix}': use .csv, .xlsx, .db or .sqlite"
        )
    return KINDS[suffix]


def _check_options(path: Path, kind: str, query: str | None, sheet: str | None) -> None:
    """Refuse a query for a list that is not a database, or a sheet for one that is not Excel."""
    if query is not None and kind != "sqlite":
        raise SourceError(f"{path}: a query applies only to .db or .sqlite lists")
    if sheet is not None and kind != "xlsx":
        raise SourceError(f"{path}: a sheet applies only to .xlsx lists")


def _check_readable(path: Path) -> None:
    """Refuse a path that is not a non-empty file this process may read."""
    try:
        with path.open("rb") as file:
            first_byte = file.read(1)
    except OSError as error:
        raise _cannot_read(path, error) from None
    if not first_byte:
        raise _empty(path)


def _rows_from(path: Path, records: Iterator[tuple[int, list[str]]]) -> Iterator[Row]:
    """Take the first record as the header and yield every later one as a row."""
    first = next(records, None)
    if first is None:
        raise _empty(path)
    columns = _columns(path, first[1])

    for number, values in records:
        yield Row(number, _fields(columns, values))


def _columns(path: Path, header: Sequence[str]) -> list[tuple[int, str]]:
    """Return (position, name) of each named column; refuse a name used twice."""
    names = [name.strip() for name in header]
    duplicates = sorted(name for name, count in Counter(names).items() if name and count > 1)
    if duplicates:
        raise SourceError(
            f"{path}: duplicate column names in the header: {', '.join(duplicates)}: "
            "give each column its own name"
        )

    # A column without a name cannot be used by a template, so it is left out.
    return [(position, name) for position, name in enumerate(names) if name]


def _fields(columns: list[tuple[int, str]], values: Sequence[str]) -> dict[str, str]:
    """Map each column name to its value in a record; a short record reads as empty cells."""
    return {name: values[i] if i < len(values) else "" for i, name in columns}


def _csv_rows(path: Path) -> Iterator[Row]:
    """Yield the records of a UTF-8 CSV file, numbered by the line each starts on.

    The whole file is checked (encoding, record widths) before the first row comes out, so
    a fault at line 90,000 stops the run before anyone is mailed, not half-way. NOTE: this
    reads the file twice, which costs about 2 s per million rows here.
    """
    for _ in _csv_stream(path):
        pass
    yield from _csv_stream(path)


def _csv_stream(path: Path) -> Iterator[Row]:
    """Read a CSV file's rows in one pass."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            # Strict: a quote left open would swallow the rows below it into one value.
            reader = csv.reader(file, delimiter=_sniff_delimiter(file), strict=True)
            yield from _rows_from(path, _csv_records(path, reader))
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _sniff_delimiter(file: TextIO) -> str:
    """Return the delimiter used most, outside quotes, in the first non-blank line."""
    line = file.readline()
    while line and not line.strip():
        line = file.readline()
    file.seek(0)

    unquoted = re.sub(r'"[^"]*"', "", line)
    best = max(DELIMITERS, key=unquoted.count)
    return best if best in unquoted else ","


def _csv_records(path: Path, reader) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, values) of each non-blank record; refuse one wider than the header."""
    header_width = 0
    start = 1
    delimiter = reader.dialect.delimiter
    try:
        for record in reader:
            if not _is_blank(record):
                header_width = header_width or len(record)
                if not _is_blank(record[header_width:]):
                    raise _too_wide(path, start, len(record), header_width, delimiter)
                if reader.line_num > start and _holds_rows(record, delimiter, header_width):
                    raise SourceError(
                        f"{path}: lines {start} to {reader.line_num} are one record: a value "
                        "there runs over several lines and holds what looks like rows of the "
                        "list, as a quote opened by mistake does; close the quote"
                    )
                yield start, record
            start = reader.line_num + 1
    except csv.Error as error:
        raise SourceError(
            f"{path}: line {start}: cannot parse: {error} (a quote left open?)"
        ) from None


def _holds_rows(record: list[str], delimiter: str, width: int) -> bool:
    """Tell whether a value that runs over several lines holds what looks like rows.

    A value may rightly run over lines (a postal address, or a hostile cell, which the
    recipients' checks refuse on its own), but a later line with an @ and a delimiter
    between each of the header's columns is most likely a row of the list, swallowed by a
    quote that opens in one value and closes in another: strict parsing cannot see that.
    """
    return any(
        "@" in line and line.count(delimiter) >= max(1, width - 1)
        for value in record
        for line in value.splitlines()[1:]
    )


def _too_wide(path: Path, line: int, width: int, header_width: int, delimiter: str) -> SourceError:
    """Describe a record with more values than the header has columns."""
    delimiter = delimiter.replace("\t", "\\t")
    return SourceError(
        f"{path}: line {line}: {width} values but the header has {header_width} columns: "
        f"put quotes around values that contain '{delimiter}'"
    )


def _not_utf8(path: Path) -> SourceError:
    """Describe where a file stops being UTF-8."""
    offset = 0
    with path.open("rb") as file:
        if file.read(2) in UTF16_MARKS:
            return SourceError(
                f"{path}: line 1: the file is UTF-16 (it starts with a UTF-16 byte order "
                "mark), not UTF-8: save it as UTF-8 (in Excel: 'CSV UTF-8')"
            )
        file.seek(0)
        for number, line in enumerate(file, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                where = f"byte 0x{line[error.start]:02x} at offset {offset + error.start}"
                return SourceError(
                    f"{path}: line {number}: {where} is not UTF-8: "
                    "save it as UTF-8 (in Excel: 'CSV UTF-8')"
                )
            offset += len(line)
    return SourceError(f"{path}: not valid UTF-8: save it as UTF-8")


def _excel_records(path: Path, sheet: str | None) -> Iterator[tuple[int, list[str]]]:
    """Yield (sheet row number, values) of each non-empty row of a workbook's sheet."""
    # Imported here: only the launcher reads lists, and workers need not carry calamine.
    try:
        import python_calamine
    except ImportError:  # openpyxl streams too, but about twenty times slower
        return _openpyxl_records(path, sheet)
    return _calamine_records(path, sheet, python_calamine)


def _calamine_records(
    path: Path, sheet: str | None, calamine: Any
) -> Iterator[tuple[int, list[str]]]:
    """Read a sheet with calamine, which is fast but holds the sheet in memory.

    NOTE: calamine loads the whole sheet before the first row (about 0.5 KB a row, so
    about 0.5 GB at Excel's limit of 1,048,576 rows); CSV and SQLite lists stay flat.
    Its iter_rows starts at sheet row 1 even when the data starts lower, which the
    numbering relies on; a test pins it.
    """
    try:
        with calamine.CalamineWorkbook.from_path(str(path)) as book:
            if sheet is not None and sheet not in book.sheet_names:
                raise _no_sheet(path, sheet, book.sheet_names)
            found = book.get_sheet_by_index(0) if sheet is None else book.get_sheet_by_name(sheet)
            yield from _non_empty(enumerate(found.iter_rows(), start=1))
    except calamine.CalamineError as error:
        raise SourceError(f"{path}: cannot read the workbook: {error}") from None


def _openpyxl_records(path: Path, sheet: str | None) -> Iterator[tuple[int, list[str]]]:
    """Read a sheet with openpyxl in read-only mode, which streams the sheet's XML."""
    import openpyxl  # only when calamine is missing: it takes a while to import
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, OSError) as error:
        raise SourceError(f"{path}: cannot read the workbook: {error}") from None

    try:
        if sheet is not None and sheet not in book.sheetnames:
            raise _no_sheet(path, sheet, book.sheetnames)
        found = book.worksheets[0] if sheet is None else book[sheet]
        yield from _non_empty(enumerate(found.iter_rows(min_row=1, values_only=True), start=1))
    finally:
        book.close()


def _no_sheet(path: Path, sheet: str, present: list[str]) -> SourceError:
    """Describe a sheet name the workbook does not have."""
    names = ", ".join(f"'{name}'" for name in present)
    return SourceError(f"{path}: no sheet '{sheet}': the workbook has {names}")


def _non_empty(rows: Iterable[tuple[int, Sequence[object]]]) -> Iterator[tuple[int, list[str]]]:
    """Yield each numbered row as text, skipping rows whose cells are all empty."""
    for number, cells in rows:
        values = [_cell_text(cell) for cell in cells]
        if not _is_blank(values):
            yield number, values


def _sqlite_rows(path: Path, query: str, chunk_rows: int) -> Iterator[Row]:
    """Yield the result rows of a query, numbered from 1, fetching chunk_rows at a time."""
    # Opening read-only means a mistyped path is refused instead of created as a new database.
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as database:
            cursor = database.execute(query)
            if cursor.description is None:
                raise SourceError(f"{path}: query failed: it returns no columns: use a SELECT")
            columns = _columns(path, [column[0] for column in cursor.description])

            number = 0
            while batch := cursor.fetchmany(chunk_rows):
                for cells in batch:
                    number += 1
                    yield Row(number, _fields(columns, [_cell_text(cell) for cell in cells]))
    except sqlite3.Error as error:
        raise SourceError(f"{path}: query failed: {error}") from None


def _cell_text(value: object) -> str:
    """Return a cell as a person would type it: 12.0 as '12', a date as '2024-01-31'."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, datetime.datetime) and value.time() == datetime.time():
        return value.date().isoformat()  # openpyxl reads a date cell as midnight of that day
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, bytes):  # a BLOB that holds text; binary data cannot be mailed anyway
        return value.decode("utf-8", errors="replace")
    return str(value)


def _is_blank(values: Sequence[str]) -> bool:
    """Tell whether every value is empty or only spaces."""
    return not any(value.strip() for value in values)


def _cannot_read(path: Path, error: OSError) -> SourceError:
    """Describe a path the operating system will not let us read."""
    return SourceError(f"{path}: cannot read: {error.strerror or error}")


def _empty(path: Path) -> SourceError:
    """Describe a list without even a header row."""
    return SourceError(f"{path}: the list is empty: no header row")
