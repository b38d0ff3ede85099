"""Logging for the launcher and its workers: time, level and process on every line.

On a terminal each line first erases the line it starts on, where the launcher may have
drawn its progress bar: a log line from any process never lands in the middle of the bar.
The launcher redraws the bar at its next tick.
"""

import logging
import os
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)-7s [%(processName)s %(process)d] %(message)s"
ERASE_LINE = "\r\x1b[K"  # back to the start of the line, and erase it (ANSI)
# The closing summary goes through this logger, which -q does not silence.
SUMMARY_LOGGER = "batch.summary"


def on_terminal(stream: TextIO) -> bool:
    """Tell whether stream is a terminal that understands the ANSI erase sequence."""
    # NOTE: a Windows console needs its VT mode switched on for ANSI; it gets plain lines.
    if os.name != "posix" or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineHandler(logging.StreamHandler):
    """Write each record on a line of its own, erasing a progress bar first."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.erase = ERASE_LINE if on_terminal(stream) else ""

    def format(self, record: logging.LogRecord) -> str:
        return self.erase + super().format(record)


def setup_logging(verbosity: int) -> None:
    """Log INFO and up (DEBUG with -v, WARNING with -q) and the summary to standard error."""
    level = logging.INFO - 10 * verbosity
    handler = LineHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.DEBUG, min(level, logging.ERROR)))
    # A cron user asking for quiet still wants the one line that says how the run ended.
    logging.getLogger(SUMMARY_LOGGER).setLevel(logging.INFO)
    # The broker and mailer modules report these libraries' failures in their own words.
    quiet_libraries = logging.CRITICAL if verbosity < 1 else logging.DEBUG
    for library in ("pika", "yagmail"):
        logging.getLogger(library).setLevel(quiet_libraries)
