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
    logging.getLogger("pika").setLevel(logging.WARNING if level <= logging.INFO else level)
    logging.getLogger("yagmail").setLevel(logging.WARNING)
