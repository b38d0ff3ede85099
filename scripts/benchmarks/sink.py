"""Install postfix's smtp-sink when it is missing, and run it as the relay of one bench."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time

from .common import BenchError, run_tool, say, tail
from .settings import APT_TIMEOUT_S, SINK_BACKLOG, SINK_START_TIMEOUT_S, SMTP_SINK


def ensure_smtp_sink() -> None:
    """Install postfix (for smtp-sink) with apt-get when it is missing."""
    if SMTP_SINK.exists():
        return
    say("installing postfix for smtp-sink (apt-get)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "postfix"]):
        result = run_tool([*sudo, *command], timeout_s=APT_TIMEOUT_S, env=env)
        if result.returncode != 0:
            raise BenchError(
                f"{' '.join(command)} failed ({result.returncode}): {tail(result.stdout)}; "
                f"install postfix by hand so that {SMTP_SINK} exists"
            )
    if not SMTP_SINK.exists():
        raise BenchError(f"postfix is installed but {SMTP_SINK} is missing")


class SmtpSink:
    """postfix's smtp-sink on a free local port, stopped when the `with` block ends."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SmtpSink:
        as_nobody = ["-u", "nobody"] if os.geteuid() == 0 else []
        command = [str(SMTP_SINK), *as_nobody, f"127.0.0.1:{self.port}", str(SINK_BACKLOG)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self._wait_until_listening()
        except BaseException:
            self.__exit__()
            raise
        say(f"smtp-sink listening on 127.0.0.1:{self.port} (pid {self.process.pid})")
        return self

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + SINK_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode(errors="replace")
                raise BenchError(f"smtp-sink exited with {self.process.returncode}: {error}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            time.sleep(0.1)
        raise BenchError(f"smtp-sink does not listen after {SINK_START_TIMEOUT_S} s")

    def __exit__(self, *_exc: object) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        say("smtp-sink stopped")


def free_port() -> int:
    """Ask the kernel for a local TCP port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
