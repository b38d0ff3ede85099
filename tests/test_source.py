"""Reading recipient lists from CSV, Excel and SQLite files, as a user would hand them in."""

import datetime
import os
import sqlite3
import tracemalloc
from pathlib import Path

import openpyxl
import pytest

from batch import source
from batch.errors import SourceError
from batch.source import fingerprint, read_rows


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """Write a file exactly as given, line endings included."""
    path.write_bytes(text.encode(encoding))
    return path


def numbered(path: Path, **options: object) -> list[tuple[int, dict[str, str]]]:
    """Return each row of a list as (number, fields)."""
    return [(row.number, row.fields) for row in read_rows(path, **options)]


def refusal(path: Path, **options: object) -> str:
    """Return the message a list is refused with."""
    with pytest.raises(SourceError) as raised:
        list(read_rows(path, **options))
    return str(raised.value)


def workbook(path: Path, sheets: dict[str, list[list[object]]]) -> Path:
    """Save a workbook whose sheets hold the given rows, starting at row 1."""
    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, rows in sheets.items():
        sheet = book.create_sheet(name)
        for row in rows:
            sheet.append(row)
    book.save(path)
    return path


def database(path: Path, rows: list[tuple[object, ...]]) -> Path:
    """Create a SQLite file with a recipients table holding the given rows."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE recipients (email TEXT, name TEXT, visits INTEGER)")
        db.executemany("INSERT INTO recipients VALUES (?, ?, ?)", rows)
    db.close()
    return path


# CSV


def test_a_comma_separated_csv_yields_its_rows_numbered_by_line(tmp_path):
    path = write(tmp_path / "list.csv", "email,name\nann@example.com,Ann\nbob@example.com,Bob\n")

    assert numbered(path) == [
        (2, {"email": "ann@example.com", "name": "Ann"}),
        (3, {"email": "bob@example.com", "name": "Bob"}),
    ]


def test_a_semicolon_separated_csv_is_read_like_a_comma_one(tmp_path):
    text = "email;name;city\r\nann@example.com;Ann, Jr.;Köln\r\n"
    path = write(tmp_path / "list.csv", text)

    assert numbered(path) == [
        (2, {"email": "ann@example.com", "name": "Ann, Jr.", "city": "Köln"})
    ]


@pytest.mark.parametrize("delimiter", ["\t", "|"])
def test_tab_and_pipe_separated_csvs_are_read_too(tmp_path, delimiter):
    path = write(tmp_path / "list.csv", f"email{delimiter}name\nann@example.com{delimiter}Ann\n")

    assert numbered(path) == [(2, {"email": "ann@example.com", "name": "Ann"})]


def test_a_byte_order_mark_does_not_end_up_in_the_first_column_name(tmp_path):
    path = write(tmp_path / "list.csv", "\ufeffemail;name\nann@example.com;Ann\n")

    assert numbered(path) == [(2, {"email": "ann@example.com", "name": "Ann"})]


def test_values_stay_text_exactly_as_written(tmp_path):
    path = write(
        tmp_path / "list.csv", "email,zip,note,other,n\n ann@example.com ,00123,NA,null,1.0\n"
    )

    fields = numbered(path)[0][1]

    assert fields == {
        "email": " ann@example.com ",
        "zip": "00123",
        "note": "NA",
        "other": "null",
        "n": "1.0",
    }


def test_column_names_are_stripped_of_surrounding_spaces(tmp_path):
    path = write(tmp_path / "list.csv", " email , First Name \nann@example.com,Ann\n")

    assert numbered(path) == [(2, {"email": "ann@example.com", "First Name": "Ann"})]


def test_blank_lines_are_skipped_but_line_numbers_stay_true(tmp_path):
    text = "\nemail,name\nann@example.com,Ann\n\n,\nbob@example.com,Bob\n"
    path = write(tmp_path / "list.csv", text)

    assert [number for number, _ in numbered(path)] == [3, 6]


def test_a_value_over_two_lines_is_numbered_by_its_first_line(tmp_path):
    text = 'email,note\nann@example.com,"line one\nline two"\nbob@example.com,short\n'
    path = write(tmp_path / "list.csv", text)

    assert numbered(path) == [
        (2, {"email": "ann@example.com", "note": "line one\nline two"}),
        (4, {"email": "bob@example.com", "note": "short"}),
    ]


def test_a_short_record_reads_its_missing_cells_as_empty(tmp_path):
    path = write(tmp_path / "list.csv", "email,name,city\nann@example.com\n")

    assert numbered(path) == [(2, {"email": "ann@example.com", "name": "", "city": ""})]


def test_trailing_empty_values_beyond_the_header_are_ignored(tmp_path):
    path = write(tmp_path / "list.csv", "email;name\nann@example.com;Ann;;\n")

    assert numbered(path) == [(2, {"email": "ann@example.com", "name": "Ann"})]


def test_a_record_wider_than_the_header_is_refused_with_its_line(tmp_path):
    path = write(
        tmp_path / "list.csv", "email;name\nann@example.com;Ann\nbob@example.com;Smith;Bob\n"
    )

    assert refusal(path) == (
        f"{path}: line 3: 3 values but the header has 2 columns: "
        "put quotes around values that contain ';'"
    )


def test_a_csv_that_is_not_utf8_is_refused_with_its_line_and_byte(tmp_path):
    path = write(
        tmp_path / "list.csv", "email,name\nann@example.com,Ann\nbob@example.com,Zoé\n", "cp1252"
    )

    assert refusal(path) == (
        f"{path}: line 3: byte 0xe9 at offset 49 is not UTF-8: "
        "save it as UTF-8 (in Excel: 'CSV UTF-8')"
    )


def test_a_csv_with_only_a_header_yields_no_rows(tmp_path):
    path = write(tmp_path / "list.csv", "email,name\n")

    assert list(read_rows(path)) == []


@pytest.mark.parametrize("content", ["", "\n\n", "\ufeff", ",,\n"])
def test_a_csv_without_a_header_is_refused_as_empty(tmp_path, content):
    path = write(tmp_path / "list.csv", content)

    assert refusal(path) == f"{path}: the list is empty: no header row"


def test_duplicate_column_names_are_refused_and_named(tmp_path):
    path = write(tmp_path / "list.csv", "email,name,Email,name \nann@example.com,Ann,a,b\n")

    assert refusal(path) == (
        f"{path}: duplicate column names in the header: name: give each column its own name"
    )


def test_a_hundred_thousand_csv_rows_stream_without_being_held(tmp_path):
    path = tmp_path / "big.csv"
    with path.open("w") as file:
        file.write("email,name,zip\n")
        file.writelines(f"user{i}@example.com,Name {i},{i:05d}\n" for i in range(100_000))

    tracemalloc.start()
    try:
        count = sum(1 for _ in read_rows(path))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # The file is about 3.7 MB and the rows held at once would take about 40 MB.
    assert count == 100_000
    assert path.stat().st_size > 3_000_000
    assert peak_bytes < 1_000_000


# Excel


def test_an_excel_sheet_skips_empty_rows_and_cells_but_keeps_sheet_row_numbers(tmp_path):
    book = openpyxl.Workbook()
    sheet = book.active
    sheet["C3"], sheet["D3"] = "email", "name"
    sheet["C4"], sheet["D4"] = "ann@example.com", "Ann"
    sheet["C7"], sheet["D7"] = "bob@example.com", "Bob"
    book.save(tmp_path / "list.xlsx")

    assert numbered(tmp_path / "list.xlsx") == [
        (4, {"email": "ann@example.com", "name": "Ann"}),
        (7, {"email": "bob@example.com", "name": "Bob"}),
    ]


def test_excel_numbers_dates_and_empty_cells_become_text(tmp_path):
    cells = {  # column: (what the cell holds, the text it reads as)
        "email": ("ann@example.com", "ann@example.com"),
        "zip": ("00123", "00123"),
        "customer": (12.0, "12"),
        "amount": (12.5, "12.5"),
        "joined": (datetime.date(2024, 1, 31), "2024-01-31"),
        "at": (datetime.datetime(2024, 1, 31, 9, 30), "2024-01-31T09:30:00"),
        "vip": (True, "TRUE"),
        "note": (None, ""),
    }
    rows = [list(cells), [cell for cell, _ in cells.values()]]
    path = workbook(tmp_path / "list.xlsx", {"List": rows})

    assert numbered(path) == [(2, {name: text for name, (_, text) in cells.items()})]


def test_a_named_sheet_is_read_instead_of_the_first(tmp_path):
    sheets = {"Old": [["email"], ["old@example.com"]], "New": [["email"], ["new@example.com"]]}
    path = workbook(tmp_path / "list.xlsx", sheets)

    assert numbered(path) == [(2, {"email": "old@example.com"})]
    assert numbered(path, sheet="New") == [(2, {"email": "new@example.com"})]


def test_an_unknown_sheet_is_refused_with_the_names_present(tmp_path):
    path = workbook(tmp_path / "list.xlsx", {"Old": [["email"]], "New": [["email"]]})

    assert (
        refusal(path, sheet="March") == f"{path}: no sheet 'March': the workbook has 'Old', 'New'"
    )


def test_an_empty_sheet_is_refused_as_having_no_header(tmp_path):
    path = workbook(tmp_path / "list.xlsx", {"Empty": []})

    assert refusal(path) == f"{path}: the list is empty: no header row"


def test_a_file_that_is_not_a_workbook_is_refused(tmp_path):
    path = write(tmp_path / "list.xlsx", "email,name\nann@example.com,Ann\n")

    assert refusal(path).startswith(f"{path}: cannot read the workbook: ")


def test_the_openpyxl_fallback_reads_a_workbook_as_calamine_does(tmp_path):
    rows = [[], ["email", "n", "joined"], ["ann@example.com", 7.0, datetime.date(2024, 1, 31)]]
    path = workbook(tmp_path / "list.xlsx", {"List": rows})

    fallback = source._rows_from(path, source._openpyxl_records(path, None))

    assert list(fallback) == list(read_rows(path))


# SQLite


def test_a_sqlite_list_is_read_from_the_recipients_table_by_default(tmp_path):
    path = database(
        tmp_path / "list.db", [("ann@example.com", "Ann", 3), ("bob@example.com", None, 0)]
    )

    assert numbered(path) == [
        (1, {"email": "ann@example.com", "name": "Ann", "visits": "3"}),
        (2, {"email": "bob@example.com", "name": "", "visits": "0"}),
    ]


def test_a_query_chooses_the_rows_and_columns(tmp_path):
    rows = [(f"user{i}@example.com", f"User {i}", i) for i in range(5)]
    path = database(tmp_path / "list.sqlite3", rows)
    query = "SELECT email, visits AS n FROM recipients WHERE visits >= 1 ORDER BY visits"

    result = numbered(path, query=query, chunk_rows=2)

    assert [number for number, _ in result] == [1, 2, 3, 4]
    assert result[-1] == (4, {"email": "user4@example.com", "n": "4"})


def test_a_missing_table_is_refused_with_the_sqlite_message(tmp_path):
    path = tmp_path / "list.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE people (email TEXT)")
    db.close()

    assert refusal(path) == f"{path}: query failed: no such table: recipients"


def test_a_missing_database_is_refused_and_not_created(tmp_path):
    path = tmp_path / "list.db"

    assert refusal(path) == f"{path}: cannot read: No such file or directory"
    assert not path.exists()


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = write(tmp_path / "list.db", "email\nann@example.com\n")

    assert refusal(path) == f"{path}: query failed: file is not a database"


# Any list


def test_an_unsupported_suffix_is_refused_with_the_types_that_work(tmp_path):
    path = write(tmp_path / "list.txt", "email\nann@example.com\n")

    assert refusal(path) == (
        f"{path}: unsupported list type '.txt': use .csv, .xlsx, .db or .sqlite"
    )


def test_a_suffix_is_recognised_whatever_its_case(tmp_path):
    path = write(tmp_path / "LIST.CSV", "email\nann@example.com\n")

    assert numbered(path) == [(2, {"email": "ann@example.com"})]


@pytest.mark.parametrize("name", ["list.csv", "list.xlsx", "list.sqlite"])
def test_a_missing_file_is_refused_at_once(tmp_path, name):
    path = tmp_path / name

    with pytest.raises(SourceError) as raised:
        read_rows(path)

    assert str(raised.value) == f"{path}: cannot read: No such file or directory"


def test_a_directory_is_refused_as_unreadable(tmp_path):
    path = tmp_path / "list.csv"
    path.mkdir()

    assert refusal(path) == f"{path}: cannot read: Is a directory"


def test_a_file_without_read_permission_is_refused(tmp_path):
    path = write(tmp_path / "list.csv", "email\nann@example.com\n")
    path.chmod(0)

    assert refusal_as_unprivileged_user(path) == f"{path}: cannot read: Permission denied"


def refusal_as_unprivileged_user(path: Path) -> str:
    """Read path in a forked child that is not root (root reads any file)."""
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            if os.geteuid() == 0:
                os.setuid(65534)
            os.write(writing, refusal(path).encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading) as pipe:
        text = pipe.read()
    os.waitpid(child, 0)
    return text


def test_a_query_for_a_csv_list_is_refused(tmp_path):
    path = write(tmp_path / "list.csv", "email\nann@example.com\n")

    assert (
        refusal(path, query="SELECT 1") == f"{path}: a query applies only to .db or .sqlite lists"
    )


def test_the_fingerprint_stays_the_same_for_the_same_file_and_options(tmp_path):
    path = write(tmp_path / "list.csv", "email\nann@example.com\n")

    assert fingerprint(path) == fingerprint(path, query=None, sheet=None)
    assert len(fingerprint(path)) == 64


def test_the_fingerprint_changes_with_the_bytes_the_query_or_the_sheet(tmp_path):
    path = write(tmp_path / "list.db", "x" * 3_000_000)
    other = write(tmp_path / "other.db", "x" * 2_999_999 + "y")

    prints = {
        fingerprint(path),
        fingerprint(other),
        fingerprint(path, query="SELECT * FROM recipients"),
        fingerprint(path, sheet="March"),
        fingerprint(path, query="March"),
    }

    assert len(prints) == 5


def test_the_fingerprint_of_a_missing_file_is_refused(tmp_path):
    path = tmp_path / "list.csv"

    with pytest.raises(SourceError) as raised:
        fingerprint(path)

    assert str(raised.value) == f"{path}: cannot read: No such file or directory"
