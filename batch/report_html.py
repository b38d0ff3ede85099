"""The campaign's report as one HTML page, with a chart of the sending rate over time.

The page stands alone, to be opened, mailed or archived as it is: its style is inline, its
chart is an inline SVG, and it has no script and nothing to fetch. Every value from the
campaign's files (addresses, the relay's replies, Message-IDs) is HTML-escaped: a reply is
written by whoever runs the relay, and may hold markup.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from batch.errors import UsageError
from batch.sentlog import QUEUED, SentLogError, Status

if TYPE_CHECKING:  # batch.report imports this module
    from batch.report import Campaign, Standing

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

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d232b; margin: 1.5rem auto;
       max-width: 62rem; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.15rem; margin-top: 2rem; }
.made { color: #555; margin-top: 0; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 0.2rem 0.8rem 0.2rem 0; vertical-align: top; }
.counts td.number { text-align: right; font-variant-numeric: tabular-nums; }
.counts th, .counts td.number { white-space: nowrap; }
.note, .more { color: #555; }
.listed { width: 100%; }
.listed thead th { border-bottom: 1px solid #999; }
.listed td { border-bottom: 1px solid #ddd; overflow-wrap: anywhere; }
.listed td:nth-child(-n+2) { font-family: ui-monospace, monospace; font-size: 0.9em; }
svg.chart { width: 100%; height: auto; max-width: 760px; display: block; }
svg.chart text { font: 12px system-ui, sans-serif; fill: #333; }
svg.chart .grid { stroke: #e3e3e3; }
svg.chart .axis { stroke: #555; }
.sent { fill: #2f6aa8; background: #2f6aa8; }
.failed-or-in-doubt { fill: #d0442c; background: #d0442c; }
.key { display: inline-block; width: 0.8em; height: 0.8em; margin: 0 0.3em 0 1em; }
"""


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


def write(campaign: Campaign, path: Path, *, show: int) -> None:
    """Write the campaign's report page to path."""
    page = render(campaign, show=show, made=datetime.now(UTC))
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{path}: cannot write the HTML report: {error.strerror}") from None


def render(campaign: Campaign, *, show: int, made: datetime) -> str:
    """Render the whole page: counts, the sending rate, then the recipients in trouble."""
    name = escape(campaign.folder.name)
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>campaign {name}: report of {made:{TIME_FORMAT}}</title>",
        f"<style>{STYLE}</style>\n</head>\n<body>",
        f"<h1>campaign {name}</h1>",
        f'<p class="made">report made {made:{TIME_FORMAT}} from '
        f"<code>{escape(str(campaign.folder))}</code></p>",
        counts_table(campaign),
        rate_section(campaign),
    ]
    for status, title in LISTED:
        parts.append(listed_section(status, title, campaign.listed(status), show))
    parts.append("</body>\n</html>\n")
    return "\n".join(part for part in parts if part)


# The counts, and the recipients listed by name.


def counts_table(campaign: Campaign) -> str:
    """Render the counts per status with the files they come from, as the text report does."""
    rows = [_count_row("recipients", len(campaign.recipients))]
    rows += [_count_row(status, count) for status, count in campaign.by_status()]
    if campaign.index_problem:
        rows.append(_count_row(QUEUED, "not known", campaign.index_problem))
    refused = "not known yet" if campaign.rejected is None else campaign.rejected
    rows.append(_count_row("refused rows", refused, str(campaign.folder / "rejected.csv")))

    lines = f"{campaign.lines} lines"
    if campaign.unfinished_bytes:
        lines += f" and {campaign.unfinished_bytes} bytes of a line being written"
    rows.append(_count_row("sent-log", lines, str(campaign.folder / "sent-log.csv")))
    return '<table class="counts">\n' + "\n".join(rows) + "\n</table>"


def _count_row(name: str, value: int | str, note: str = "") -> str:
    return (
        f'<tr><th scope="row">{escape(name)}</th><td class="number">{escape(str(value))}</td>'
        f'<td class="note">{escape(note)}</td></tr>'
    )


def listed_section(status: str, title: str, listed: list[tuple[str, Standing]], show: int) -> str:
    """Render the first `show` recipients of a status with their Message-IDs and replies."""
    if not listed:
        return ""
    rows = [
        f"<tr><td>{escape(recipient)}</td><td>{escape(s.message_id)}</td>"
        f"<td>{escape(s.smtp_reply or s.smtp_code)}</td></tr>"
        for recipient, s in listed[:show]
    ]
    parts = [f'<section id="{escape(status)}">', f"<h2>{title} ({len(listed)})</h2>"]
    if rows:
        parts += [
            '<table class="listed">',
            "<thead><tr><th>recipient</th><th>Message-ID</th><th>reply</th></tr></thead>",
            "<tbody>",
            *rows,
            "</tbody>\n</table>",
        ]
    if len(listed) > show:
        parts.append(
            f'<p class="more">... and {len(listed) - show} more: '
            "<code>--csv FILE</code> lists them all</p>"
        )
    parts.append("</section>")
    return "\n".join(parts)


# The sending rate.


def rate_section(campaign: Campaign) -> str:
    """Render the chart of messages settled per minute, with what it shows in words."""
    parts = ["<h2>sending rate</h2>"]
    bars, width_s = chart_bars(campaign)
    if not bars:
        parts.append("<p>No message has been sent, failed or left in doubt yet.</p>")
        return "\n".join(parts)

    first = datetime.fromtimestamp(bars[0].start_s, UTC)
    last = datetime.fromtimestamp(bars[-1].start_s + width_s, UTC)
    until = f"{last:%H:%M:%S}" if last.date() == first.date() else f"{last:%Y-%m-%d %H:%M:%S}"
    parts.append(
        "<p>Messages sent, failed or left in doubt per minute, "
        f"from {first:%Y-%m-%d %H:%M:%S} to {until} UTC; each bar is {_duration(width_s)}. "
        "Deferred attempts and suppressed recipients are not counted.</p>"
    )
    parts += [
        "<figure>",
        chart(bars, width_s),
        '<figcaption><span class="key sent"></span>sent'
        '<span class="key failed-or-in-doubt"></span>failed or in doubt</figcaption>',
        "</figure>",
    ]
    return "\n".join(parts)


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


def chart(bars: list[Bar], width_s: int) -> str:
    """Draw the bars, stacked sent then failed or in doubt, on labelled axes, as SVG."""
    ticks = _rate_ticks(max(bar.total for bar in bars) * 60 / width_s)
    marks = [
        _bar(i, bar, len(bars), width_s, ticks[-1]) for i, bar in enumerate(bars) if bar.total
    ]
    return "\n".join(
        [
            f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
            'aria-label="messages per minute over time (UTC)">',
            *_rate_axis(ticks),
            *_time_axis(bars, width_s),
            *marks,
            "</svg>",
        ]
    )


def _rate_ticks(highest: float) -> list[float]:
    """Choose about five round rates from 0 up to at least the highest."""
    rough = highest / 5
    magnitude = 10 ** math.floor(math.log10(rough))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= rough)
    return [round(i * step, 9) for i in range(math.ceil(highest / step - 1e-9) + 1)]


def _rate_axis(ticks: list[float]) -> list[str]:
    """Draw the rate's grid lines, their values and the axis' title."""
    lines = []
    for tick in ticks:
        y = _y(tick, ticks[-1])
        lines.append(_line("grid", LEFT, LEFT + PLOT_WIDTH, y, y))
        lines.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    lines.append(
        f'<text transform="translate(14 {TOP + PLOT_HEIGHT / 2}) rotate(-90)" '
        'text-anchor="middle">messages per minute</text>'
    )
    return lines


def _time_axis(bars: list[Bar], width_s: int) -> list[str]:
    """Draw the time axis with about six times along it, and its title."""
    bottom = TOP + PLOT_HEIGHT
    lines = [_line("axis", LEFT, LEFT + PLOT_WIDTH, bottom, bottom)]
    days = {datetime.fromtimestamp(b.start_s, UTC).date() for b in (bars[0], bars[-1])}
    shape = "%H:%M:%S" if width_s < 60 else "%H:%M" if len(days) == 1 else "%m-%d %H:%M"

    for i in range(0, len(bars), math.ceil(len(bars) / 6)):
        x = LEFT + i * PLOT_WIDTH / len(bars)
        label = datetime.fromtimestamp(bars[i].start_s, UTC).strftime(shape)
        lines.append(_line("axis", x, x, bottom, bottom + 4))
        lines.append(f'<text x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">{label}</text>')
    lines.append(
        f'<text x="{LEFT + PLOT_WIDTH / 2}" y="{HEIGHT - 8}" text-anchor="middle">'
        "time (UTC)</text>"
    )
    return lines


def _bar(i: int, bar: Bar, count: int, width_s: int, top_rate: float) -> str:
    """Draw one bar: sent at the bottom, failed or in doubt above, with its numbers."""
    slot = PLOT_WIDTH / count
    width = min(slot * 0.8, WIDEST_BAR)
    x = LEFT + i * slot + (slot - width) / 2
    start = datetime.fromtimestamp(bar.start_s, UTC)
    end = datetime.fromtimestamp(bar.start_s + width_s, UTC)
    rate = bar.total * 60 / width_s
    shapes = [
        f"<title>{start:%Y-%m-%d %H:%M:%S} to {end:%H:%M:%S} UTC: {bar.sent} sent, "
        f"{bar.failed_or_in_doubt} failed or in doubt ({round(rate, 2):g} a minute)</title>"
    ]

    # A bar is never drawn thinner than a pixel, however few its messages.
    y = TOP + PLOT_HEIGHT
    for kind, number in (("sent", bar.sent), ("failed-or-in-doubt", bar.failed_or_in_doubt)):
        if number:
            height = max(1.0, PLOT_HEIGHT * number * 60 / width_s / top_rate)
            y -= height
            shapes.append(
                f'<rect class="{kind}" x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" '
                f'height="{height:.1f}"/>'
            )
    return f'<g class="bar">{"".join(shapes)}</g>'


def _y(rate: float, top_rate: float) -> float:
    return TOP + PLOT_HEIGHT * (1 - rate / top_rate)


def _line(kind: str, x1: float, x2: float, y1: float, y2: float) -> str:
    return f'<line class="{kind}" x1="{x1:.1f}" x2="{x2:.1f}" y1="{y1:.1f}" y2="{y2:.1f}"/>'
