"""The one error family the job raises, and the exit codes it ends with."""

from enum import IntEnum


class ExitCode(IntEnum):
    """How a run ended; cron and Task Scheduler act on these numbers."""

    OK = 0  # every recipient was sent
    RECIPIENTS_NOT_SENT = 1  # the run finished, but some recipients failed or are in doubt
    USAGE = 2  # bad command line, configuration, source or template: nothing was sent
    ALREADY_RUNNING = 3  # another run of the same campaign holds its lock
    SOFTWARE = 70  # an unexpected error; the message says where
    TEMPFAIL = 75  # the broker or the relay could not be reached: run again later


class BatchError(Exception):
    """An error the user can act on; its text says where, what and why."""

    exit_code = ExitCode.SOFTWARE


class UsageError(BatchError):
    """The command line or configuration is wrong."""

    exit_code = ExitCode.USAGE


class SourceError(UsageError):
    """The recipient list cannot be read."""


class TemplateError(UsageError):
    """The message template cannot be read or rendered."""


class AlreadyRunning(BatchError):
    """Another run of the same campaign is active."""

    exit_code = ExitCode.ALREADY_RUNNING


class Unavailable(BatchError):
    """The broker or the relay cannot be reached; running again later may work."""

    exit_code = ExitCode.TEMPFAIL
