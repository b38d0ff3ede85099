"""How far a run is: a bar on a terminal, a log line every few seconds elsewhere.

Both are fed by the sent-log's index, which knows every recipient the loader has noted
and each one's latest status, so they count the whole campaign, earlier runs included.
The launcher calls `tick()` on every turn of its watch loop (about twice a second).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from batch.ledger import Status
from batch.loader import Loader
from batch.logs import ERASE_LINE, SUMMARY_LOGGER, on_terminal
from batch.sentlog import SentLog

log = logging.getLogger(__name__)
summary_log = logging.getLogger(SUMMARY_LOGGER)

DRAW_EVERY_S = 0.4  # the watch loop ticks every 0.5 s: redraw on every tick
LOG_EVERY_S = 5.0
RATE_WINDOW_S = 20.0  # the rate is measured over this much of the recent past
BAR_MAX_WIDTH = 30
DEFAULT_COLUMNS = 80


@dataclass(frozen=True)
class Tally:
    """The campaign's recipients by where they stand now."""

    sent: int
    failed: int
    in_doubt: int
    waiting: int  # queued, claimed or deferred (or in doubt, to be resent: --in-doubt resend)
    total: int
    suppressed: int = 0

    @classmethod
    def of(cls, ledger: SentLog) -> Tally:
        """Count from the sent-log's index."""
        counts = ledger.counts()
        return cls(
            sent=counts[Status.SENT],
            failed=counts[Status.FAILED],
            in_doubt=counts[Status.IN_DOUBT],
            waiting=ledger.remaining(),
            total=sum(counts.values()),
            suppressed=counts[Status.SUPPRESSED],
        )

    @property
    def done(self) -> int:
        """Count the recipients nothing more will be attempted for."""
        return self.total - self.waiting

    def earlier_runs(self) -> str:
        """Say how far earlier runs got, for the start banner; nothing for a new campaign.

        Only the sent-log is read by then: the list's size is known once the loader read it.
        """
        if not self.total:
            return ""
        again = f", {self.waiting} to try again" if self.waiting else ""
        return f"; resuming: {self.done} recipients settled by earlier runs{again}"


class Rate:
    """Recipients settled per second over the last RATE_WINDOW_S seconds."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> float:
        """Note how many are done at monotonic time now; return the recent rate."""
        self.samples.append((now, done))
        while len(self.samples) > 2 and self.samples[1][0] <= now - RATE_WINDOW_S:
            self.samples.popleft()
        then, done_then = self.samples[0]
        return max(0.0, (done - done_then) / (now - then)) if now > then else 0.0


class Progress:
    """Show the campaign's progress on standard error while the launcher watches it."""

    def __init__(self, stream: TextIO, verbosity: int, source: Path) -> None:
        self.stream = stream
        self.bar = verbosity >= 0 and on_terminal(stream)
        self.source = source
        self.started = time.monotonic()
        self.last_shown = self.started
        self.rate = Rate()
        self.drawn = False
        self.list_read = False

    def tick(self, ledger: SentLog, loader: Loader) -> None:
        """Redraw the bar, or log a progress line, when it is time to."""
        self._note_list_read(loader)

        if not self.bar and not log.isEnabledFor(logging.INFO):
            return
        now = time.monotonic()
        first = not self.rate.samples  # measured at once, so that the first line has a rate
        if not first and now - self.last_shown < (DRAW_EVERY_S if self.bar else LOG_EVERY_S):
            return
        self.last_shown = now
        tally = Tally.of(ledger)
        rate = self.rate.add(now, tally.done)
        eta = eta_text(tally.waiting, rate) if loader.counts.done else "?"
        if self.bar:
            self._draw(bar_line(tally, rate, eta, terminal_columns(self.stream)))
            return
        if first:
            return

        reading = "" if loader.counts.done else f"; list: {loader.counts.rows} rows read so far"
        log.info(
            "progress: %d sent, %d failed, %d in doubt, %d waiting, of %d; %.1f/s, ETA %s%s",
            tally.sent, tally.failed, tally.in_doubt, tally.waiting, tally.total, rate, eta,
            reading,
        )  # fmt: skip

    def close(self) -> None:
        """Erase the bar, so that what follows starts on a clean line."""
        if self.drawn:
            self.stream.write(ERASE_LINE)
            self.stream.flush()
            self.drawn = False

    def summary(self, tally: Tally, loader: Loader, folder: Path, finished: bool) -> None:
        """Log the closing summary, which -q keeps."""
        self._note_list_read(loader)  # a run may end before a tick saw the list read
        elapsed = clock(time.monotonic() - self.started)
        refused = (
            f"{loader.counts.rejected} rows refused (see {folder / 'rejected.csv'})"
            if loader.counts.done
            else "rows refused: not known yet, the list was not read to its end"
        )
        summary_log.info(
            "%s %s: %d sent, %d failed, %d in doubt, %d waiting%s; %s%s; sent-log: %s",
            "done in" if finished else "stopped after", elapsed,
            tally.sent, tally.failed, tally.in_doubt, tally.waiting,
            f", {tally.suppressed} suppressed" if tally.suppressed else "", refused,
            held_back(loader), folder / "sent-log.csv",
        )  # fmt: skip

    def _note_list_read(self, loader: Loader) -> None:
        """Log once, when the loader is through, what it made of the list."""
        if not loader.counts.done or self.list_read:
            return
        self.list_read = True
        counts = loader.counts
        log.info(
            "list %s read: %d rows, %d refused, %d settled by an earlier run, %d suppressed, "
            "%d queued now%s",
            self.source, counts.rows, counts.rejected, counts.settled, counts.suppressed,
            counts.published, held_back(loader),
        )  # fmt: skip

    def _draw(self, line: str) -> None:
        # Draw first, then erase what a longer earlier line left: no flicker.
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self.drawn = True


def held_back(loader: Loader) -> str:
    """Say how many recipients --limit left for a later run, if it left any."""
    if loader.limit is None or not loader.counts.done:
        return ""
    return f"; {loader.counts.held} left for a later run by --limit {loader.limit}"


def bar_line(tally: Tally, rate: float, eta: str, columns: int) -> str:
    """Render the bar and the counts in one line narrower than the terminal."""
    share = tally.done / tally.total if tally.total else 0.0
    n = len(str(tally.total))  # numbers keep their width, so the bar does not jump
    counts = (
        f" {share:4.0%} {tally.done:>{n}}/{tally.total}  sent {tally.sent:>{n}}"
        f"  failed {tally.failed}  in doubt {tally.in_doubt}  waiting {tally.waiting:>{n}}"
        f"  {rate:.0f}/s  ETA {eta}"
    )
    # The last column stays empty: a line that fills it wraps on some terminals.
    room = columns - 1
    width = min(BAR_MAX_WIDTH, room - len(counts) - 2)
    if width < 10:
        return counts.strip()[:room]
    filled = round(share * width)
    return "[" + "#" * filled + "." * (width - filled) + "]" + counts


def eta_text(waiting: int, rate: float) -> str:
    """Estimate the time left at the recent rate."""
    if waiting == 0:
        return clock(0)
    return clock(waiting / rate) if rate > 0 else "?"


def clock(seconds: float) -> str:
    """Format a duration as h:mm:ss."""
    minutes, second = divmod(round(seconds), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}:{minute:02d}:{second:02d}"


def terminal_columns(stream: TextIO) -> int:
    """Return the terminal's width, or DEFAULT_COLUMNS if it does not say."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or DEFAULT_COLUMNS
    except (AttributeError, ValueError, OSError):
        return DEFAULT_COLUMNS
