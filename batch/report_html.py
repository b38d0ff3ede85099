"""The campaign's report as one HTML page, with a chart of the sending rate over time.

The page stands alone, to be opened, mailed or archived as it is: its style is inline, its
chart is an inline SVG, and it has no script and nothing to fetch. This module works out
what the page shows, down to where each bar of the chart goes; the markup is the template
batch/templates/report.html. Every value from the campaign's files (addresses, the relay's
replies, Message-IDs) is HTML-escaped by the template's autoescape, which no value can skip
by being forgotten: a reply is written by whoever runs the relay, and may hold markup.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import jinja2

from batch.errors import UsageError
from batch.ledger import QUEUED, Status
from batch.sentlog_file import SentLogError

if TYPE_CHECKING:  # batch.report imports this module
    from batch.report import Campaign

TEMPLATE = "report.html"  # in batch/templates/, shipped as package data
# The recipients listed by name, with the text report's titles.
LISTED = ((Status.FAILED, "failed"), (Status.IN_DOUBT, "in doubt"))
MAX_BARS = 120
DAY_S = 86400
# Bar widths, in seconds, from which the narrowest giving at most MAX_BARS bars is taken.
BAR_WIDTHS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, DAY_S)
# The chart's size and margins, in the SVG's own units (it scales to the page's width).
WIDTH, HEIGHT = 760, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 40, 12, 52
PLOT_WIDTH, PLOT_HEIGHT = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
WIDEST_BAR = 40
TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"


@dataclass(frozen=True, slots=True)
class Bar:
    """The settled lines of one stretch of time: one bar of the chart."""

    start_s: int  # seconds since the epoch, UTC
    sent: int
    failed_or_in_doubt: int

    @property
    def total(self) -> int:
        """Count every settled line of the bar."""
        return self.sent + self.failed_or_in_doubt


class CountRow(NamedTuple):
    """One row of the counts table: what is counted, how many, and where that comes from."""

    name: str
    value: int | str
    note: str = ""


class Listed(NamedTuple):
    """The recipients of one status, as the page lists them."""

    status: str  # the section's id, spelled as in the sent-log
    title: str
    total: int
    rows: list[tuple[str, str, str]]  # recipient, Message-ID, reply: the first `show`
    more: int  # how many the rows leave out


# The chart, in the SVG's own units: the template places these and computes nothing.


class Frame(NamedTuple):
    """Where the chart's fixed parts go: the plot's edges, the axes' labels and titles."""

    width: int
    height: int
    left: int
    right: int
    bottom: int
    rate_label_x: int  # the right end of a rate's label
    rate_title_x: int
    rate_title_y: float
    tick_bottom: int  # the lower end of a time's mark
    time_label_y: int
    time_title_x: float
    time_title_y: int


FRAME = Frame(
    width=WIDTH,
    height=HEIGHT,
    left=LEFT,
    right=LEFT + PLOT_WIDTH,
    bottom=TOP + PLOT_HEIGHT,
    rate_label_x=LEFT - 6,
    rate_title_x=14,
    rate_title_y=TOP + PLOT_HEIGHT / 2,
    tick_bottom=TOP + PLOT_HEIGHT + 4,
    time_label_y=TOP + PLOT_HEIGHT + 18,
    time_title_x=LEFT + PLOT_WIDTH / 2,
    time_title_y=HEIGHT - 8,
)


class RateTick(NamedTuple):
    """A rate up the chart's side: the height of its grid line and of its label."""

    y: float
    label_y: float
    label: str  # messages per minute, "2.5"


class TimeTick(NamedTuple):
    """A time along the chart's foot: where its mark is, and what it says."""

    x: float
    label: str


class Shape(NamedTuple):
    """One rectangle of a bar: its sent part, or its failed or in-doubt part."""

    kind: str  # "sent" or "failed-or-in-doubt", the rectangle's class
    x: float
    y: float
    width: float
    height: float


class DrawnBar(NamedTuple):
    """A bar as drawn: the numbers of its tooltip, and its one or two rectangles."""

    start: str
    end: str
    sent: int
    failed_or_in_doubt: int
    rate: str  # settled messages a minute, "0.67"
    shapes: list[Shape]


class Chart(NamedTuple):
    """The sending rate: what the words above the chart say, and what the chart draws."""

    first: str  # when the first bar starts
    until: str  # when the last ends, without its day if that is the first's
    bar_is: str  # how long a bar is, "5 minutes"
    rates: list[RateTick]
    times: list[TimeTick]
    bars: list[DrawnBar]  # only the bars with settled lines


def write(campaign: Campaign, path: Path, *, show: int) -> None:
    """Write the campaign's report page to path."""
    page = render(campaign, show=show, made=datetime.now(UTC))
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{path}: cannot write the HTML report: {error.strerror}") from None


def render(campaign: Campaign, *, show: int, made: datetime) -> str:
    """Render the whole page: counts, the sending rate, then the recipients in trouble."""
    listed = [listed_recipients(campaign, status, title, show) for status, title in LISTED]
    return _template().render(
        name=campaign.folder.name,
        folder=str(campaign.folder),
        made=f"{made:{TIME_FORMAT}}",
        counts=count_rows(campaign),
        chart=rate_chart(campaign),
        frame=FRAME,
        listed=[section for section in listed if section.total],
    )


@functools.cache
def _template() -> jinja2.Template:
    """Compile the page's template, once a process."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("batch", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the render
        trim_blocks=True,  # a line holding only {% ... %} leaves no line on the page
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,
    )
    environment.filters["coord"] = _coord
    return environment.get_template(TEMPLATE)


def _coord(number: float) -> str:
    """Write a position in the chart to a tenth of its unit."""
    return f"{number:.1f}"


# The counts, and the recipients listed by name.


def count_rows(campaign: Campaign) -> list[CountRow]:
    """Count recipients per status with the files they come from, as the text report does."""
    rows = [CountRow("recipients", len(campaign.recipients))]
    rows += [CountRow(status, count) for status, count in campaign.by_status()]
    if campaign.index_problem:
        rows.append(CountRow(QUEUED, "not known", campaign.index_problem))
    refused = "not known yet" if campaign.rejected is None else campaign.rejected
    rows.append(CountRow("refused rows", refused, str(campaign.folder / "rejected.csv")))

    lines = f"{campaign.lines} lines"
    if campaign.unfinished_bytes:
        lines += f" and {campaign.unfinished_bytes} bytes of a line being written"
    rows.append(CountRow("sent-log", lines, str(campaign.folder / "sent-log.csv")))
    return rows


def listed_recipients(campaign: Campaign, status: str, title: str, show: int) -> Listed:
    """List the first `show` recipients of a status with their Message-IDs and replies."""
    listed = campaign.listed(status)
    rows = [(r, s.message_id, s.smtp_reply or s.smtp_code) for r, s in listed[:show]]
    return Listed(status, title, len(listed), rows, len(listed) - len(rows))


# The sending rate.


def rate_chart(campaign: Campaign) -> Chart | None:
    """Lay out the chart of messages settled per minute; None if none is settled yet."""
    bars, width_s = chart_bars(campaign)
    if not bars:
        return None

    first = datetime.fromtimestamp(bars[0].start_s, UTC)
    last = datetime.fromtimestamp(bars[-1].start_s + width_s, UTC)
    until = f"{last:%H:%M:%S}" if last.date() == first.date() else f"{last:%Y-%m-%d %H:%M:%S}"
    ticks = _rate_ticks(max(bar.total for bar in bars) * 60 / width_s)
    drawn = [
        _drawn_bar(i, bar, len(bars), width_s, ticks[-1])
        for i, bar in enumerate(bars)
        if bar.total
    ]
    return Chart(
        f"{first:%Y-%m-%d %H:%M:%S}",
        until,
        _duration(width_s),
        _rate_axis(ticks),
        _time_axis(bars, width_s),
        drawn,
    )


def chart_bars(campaign: Campaign) -> tuple[list[Bar], int]:
    """Group the settled lines into at most MAX_BARS bars; return them and their width."""
    per_second = _per_second(campaign)
    if not per_second:
        return [], 0
    first, last = min(per_second), max(per_second)
    widths = itertools.chain(BAR_WIDTHS_S, itertools.count(2 * DAY_S, DAY_S))
    width_s = next(w for w in widths if last // w - first // w < MAX_BARS)

    # Bars start on round times (a whole minute, say): the first and last may be partly empty.
    starts = range(first // width_s * width_s, last + 1, width_s)
    counts = {start: [0, 0] for start in starts}
    for second, (sent, failed_or_in_doubt) in per_second.items():
        bar = counts[second // width_s * width_s]
        bar[0] += sent
        bar[1] += failed_or_in_doubt
    return [Bar(start, *counts[start]) for start in starts], width_s


def _per_second(campaign: Campaign) -> dict[int, list[int]]:
    """Count the sent, and the failed or in-doubt, lines by second since the epoch."""
    per_second: dict[int, list[int]] = {}
    for (second, status), count in campaign.settled.items():
        try:
            at = int(datetime.fromisoformat(second).replace(tzinfo=UTC).timestamp())
        except ValueError:
            raise SentLogError(
                f"{campaign.folder / 'sent-log.csv'}: a line's timestamp {second!r} "
                "is not a time: the file is damaged"
            ) from None
        column = 0 if status == Status.SENT else 1
        per_second.setdefault(at, [0, 0])[column] += count
    return per_second


def _duration(seconds: int) -> str:
    """Say how long a bar is: "1 second", "5 minutes", "2 days"."""
    number, unit = seconds, "second"
    for unit_s, name in ((DAY_S, "day"), (3600, "hour"), (60, "minute")):
        if seconds % unit_s == 0:
            number, unit = seconds // unit_s, name
            break
    return f"{number} {unit}{'' if number == 1 else 's'}"


def _rate_ticks(highest: float) -> list[float]:
    """Choose about five round rates from 0 up to at least the highest."""
    rough = highest / 5
    magnitude = 10 ** math.floor(math.log10(rough))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= rough)
    return [round(i * step, 9) for i in range(math.ceil(highest / step - 1e-9) + 1)]


def _rate_axis(ticks: list[float]) -> list[RateTick]:
    """Place the rates' grid lines and labels, the highest rate at the plot's top."""
    heights = [_y(tick, ticks[-1]) for tick in ticks]
    return [RateTick(y, y + 4, f"{tick:g}") for tick, y in zip(ticks, heights, strict=True)]


def _time_axis(bars: list[Bar], width_s: int) -> list[TimeTick]:
    """Place about six times along the time axis, at the start of the bars they name."""
    days = {datetime.fromtimestamp(b.start_s, UTC).date() for b in (bars[0], bars[-1])}
    shape = "%H:%M:%S" if width_s < 60 else "%H:%M" if len(days) == 1 else "%m-%d %H:%M"
    return [
        TimeTick(
            LEFT + i * PLOT_WIDTH / len(bars),
            datetime.fromtimestamp(bars[i].start_s, UTC).strftime(shape),
        )
        for i in range(0, len(bars), math.ceil(len(bars) / 6))
    ]


def _drawn_bar(i: int, bar: Bar, count: int, width_s: int, top_rate: float) -> DrawnBar:
    """Place one bar: sent at the bottom, failed or in doubt above, with its numbers."""
    slot = PLOT_WIDTH / count
    width = min(slot * 0.8, WIDEST_BAR)
    x = LEFT + i * slot + (slot - width) / 2

    # A bar is never drawn thinner than a pixel, however few its messages.
    shapes = []
    y = TOP + PLOT_HEIGHT
    for kind, number in (("sent", bar.sent), ("failed-or-in-doubt", bar.failed_or_in_doubt)):
        if number:
            height = max(1.0, PLOT_HEIGHT * number * 60 / width_s / top_rate)
            y -= height
            shapes.append(Shape(kind, x, y, width, height))

    start = datetime.fromtimestamp(bar.start_s, UTC)
    end = datetime.fromtimestamp(bar.start_s + width_s, UTC)
    rate = round(bar.total * 60 / width_s, 2)
    return DrawnBar(
        f"{start:%Y-%m-%d %H:%M:%S}",
        f"{end:%H:%M:%S}",
        bar.sent,
        bar.failed_or_in_doubt,
        f"{rate:g}",
        shapes,
    )


def _y(rate: float, top_rate: float) -> float:
    return TOP + PLOT_HEIGHT * (1 - rate / top_rate)
