"""Hold the results table's rows, and print them aligned or write them as Markdown."""

from __future__ import annotations

from dataclasses import dataclass

from .profiling import Profile

COLUMNS = ("measurement", "size", "result", "compared with", "baseline", "ratio")
RIGHT_ALIGNED = {1, 2, 4, 5}  # the columns of numbers, by position


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    measurement: str
    size: int
    result: str
    compared_with: str = ""
    baseline: str = ""
    ratio: str = ""


@dataclass(frozen=True)
class Figure:
    """A measured value, named as the table's "compared with" column names it."""

    name: str
    value: float
    unit: str
    style: str = ",.0f"

    def __str__(self) -> str:
        return f"{self.value:{self.style}} {self.unit}"


def make_row(n: int, figure: Figure, against: Figure | None = None, title: str = "") -> Row:
    """A table row: a figure, and the baseline it is compared with with their ratio."""
    if against is None:
        return Row(title or figure.name, n, str(figure))
    ratio = f"{figure.value / against.value:.2f}"
    return Row(title or figure.name, n, str(figure), against.name, str(against), ratio)


def cells(row: Row) -> list[str]:
    """Return a row's cells as text, in the order of COLUMNS."""
    return [
        row.measurement,
        f"{row.size:,}",
        row.result,
        row.compared_with,
        row.baseline,
        row.ratio,
    ]


def render_table(rows: list[Row]) -> str:
    """Lay the rows out in aligned columns, numbers to the right."""
    table = [list(COLUMNS), *(cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    out = []
    for line in table:
        out.append(
            "  ".join(
                cell.rjust(width) if i in RIGHT_ALIGNED else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
    out.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(out)


def render_markdown(machine: dict[str, str], rows: list[Row], profile: Profile) -> str:
    """The same results as Markdown, with the machine they were measured on."""
    out = ["# massmail benchmark", "", "| machine | |", "|---|---|"]
    out += [f"| {key} | {value} |" for key, value in machine.items()]
    alignment = ("---:" if i in RIGHT_ALIGNED else "---" for i in range(len(COLUMNS)))
    out += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(alignment) + "|"]
    out += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    if profile.total:
        out += ["", profile.heading() + ":", "", "| share | frame |", "|---:|---|"]
        out += [f"| {pct} | `{label}` |" for pct, label in profile.lines()]
    return "\n".join(out) + "\n"
