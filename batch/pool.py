"""The worker pool: the launcher's worker processes, started, watched and stopped.

Workers inherit no lock, socket or thread: on Linux and macOS they are forked from a
small server process that imported the worker's code once ("forkserver"), which spares
each of them the half second of imports a fresh interpreter needs; elsewhere they start
fresh ("spawn"). Each opens its own broker connection, relay session and sent-log.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import signal
import time
from typing import Any

from batch.errors import ExitCode
from batch.ledger import worker_name
from batch.sentlog import SentLog
from batch.worker import WorkerSettings, main

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class WorkerPool:
    """A fixed number of worker processes, replaced when one dies."""

    def __init__(self, settings: WorkerSettings, size: int, *, max_restarts: int) -> None:
        self.settings = settings
        self.size = size
        self.max_restarts = max_restarts
        self.context = _context()
        self.stop_event = self.context.Event()
        # Nothing is ever written here: a worker sees end-of-file once the launcher is gone.
        self.lifeline, self._lifeline_end = self.context.Pipe(duplex=False)
        self.processes: dict[int, Any] = {}
        self.started = 0

    def start(self) -> None:
        """Start every worker."""
        self._start_server()
        for _ in range(self.size):
            self._start_one()

    def _start_server(self) -> None:
        """Start the fork server deaf to SIGINT and SIGTERM, which it keeps across exec.

        A Ctrl-C or a stop signal to the whole process group must reach the launcher and
        the workers, which stop in order; a fork server killed by it would make the
        launcher lose track of its workers.
        """
        if self.context.get_start_method() != "forkserver":
            return
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _start_one(self) -> None:
        self.started += 1
        process = self.context.Process(
            target=main,
            args=(self.settings, self.stop_event, self.lifeline),
            name=f"worker-{self.started}",
        )
        process.start()
        self.processes[process.pid] = process

    def check(self, ledger: SentLog) -> ExitCode | None:
        """Replace workers that died; return an exit code if the run cannot go on."""
        for pid, process in list(self.processes.items()):
            if process.exitcode is None:
                continue
            del self.processes[pid]
            if process.exitcode == ExitCode.TEMPFAIL:
                return ExitCode.TEMPFAIL
            in_doubt = settle_claims_of(ledger, pid, "stopped")
            log.critical(
                "%s (pid %d) stopped with code %s; %d recipient(s) it held are in doubt",
                process.name, pid, process.exitcode, len(in_doubt),
            )  # fmt: skip
            if process.exitcode == ExitCode.USAGE:
                return ExitCode.USAGE
            if self.started - self.size >= self.max_restarts:
                log.error("workers keep stopping; giving up")
                return ExitCode.SOFTWARE
            self._start_one()
        return None

    def stop(self, ledger: SentLog, grace_s: float) -> None:
        """Ask every worker to finish its message and leave; kill the ones that do not."""
        self.stop_event.set()
        deadline = time.monotonic() + grace_s
        for pid, process in self.processes.items():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("%s (pid %d) does not stop; killing it", process.name, pid)
                process.kill()
                process.join()
                settle_claims_of(ledger, pid, "was killed")


def _context() -> multiprocessing.context.BaseContext:
    """Pick the cheapest way to start a worker that inherits nothing."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["batch.worker"])
    return context


def settle_claims_of(ledger: SentLog, pid: int, what: str) -> list[str]:
    """Record the open claims of a worker that is gone as in-doubt."""
    return ledger.settle_open_claims(
        f"worker {pid} {what} before the relay's answer was recorded",
        worker=worker_name(pid),
    )
