"""Write recipient lists of any size, as CSV or as an Excel workbook."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import openpyxl

from .settings import NAMES

HEADER = ("email", "name")


def recipient_address(i: int) -> str:
    """Return the address of the i-th recipient."""
    return f"reader{i:07d}@example.com"


def recipient_name(i: int) -> str:
    """Return the name of the i-th recipient, accented names included."""
    return f"{NAMES[i % len(NAMES)]} {i}"


def recipient_rows(n: int) -> Iterator[tuple[str, str]]:
    """Yield the address and name of recipients 1 to n."""
    return ((recipient_address(i), recipient_name(i)) for i in range(1, n + 1))


def write_csv(path: Path, n: int) -> None:
    """Write a CSV list of n recipients."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(HEADER)
        writer.writerows(recipient_rows(n))


def write_xlsx(path: Path, n: int) -> None:
    """Write an .xlsx list of n recipients."""
    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet("recipients")
    sheet.append(HEADER)
    for row in recipient_rows(n):
        sheet.append(row)
    book.save(path)
