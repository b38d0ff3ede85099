"""Logging for the launcher and its workers: time, level and process on every line."""

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s [%(processName)s %(process)d] %(message)s"


def setup_logging(verbosity: int) -> None:
    """Log INFO and up (DEBUG with -v, WARNING with -q) to standard error."""
    level = logging.INFO - 10 * verbosity
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.DEBUG, min(level, logging.ERROR)))
    # The broker and mailer modules report these libraries' failures in their own words.
    quiet_libraries = logging.CRITICAL if verbosity < 1 else logging.DEBUG
    for library in ("pika", "yagmail"):
        logging.getLogger(library).setLevel(quiet_libraries)
