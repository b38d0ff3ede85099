"""The rate limit: one pace for every worker of a run, however many there are.

A relay account's limit counts the account's messages, not each connection's, so limits
kept per process would multiply with the workers. The workers share one number instead:
the time the next message may start, kept in a small file of the campaign's folder. Each
worker takes that slot under the file's lock, moves the number on by 1/rate, and waits
for its slot. Slots never pile up while nobody sends (a slot in the past is moved to
now), so no stretch of t seconds holds more than rate * t + 1 messages, whichever
workers send them.

The lock is the operating system's file lock, which a killed worker cannot leave held.
The number is on `time.monotonic()`'s clock, which all processes of a machine share and
which restarts with the machine: the launcher starts the schedule afresh on every run.
It holds on one host: several hosts sending through one relay account each need their
share of the rate (--rate divided by the hosts) until the schedule lives in a shared store.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

from batch.locking import file_lock

SLOT = struct.Struct("d")  # the next slot, in time.monotonic() seconds
# The broker takes back a delivery held unacknowledged for 30 minutes (RabbitMQ's default
# consumer timeout); a paced worker holds no more than it can send in this much time.
HELD_AHEAD_S = 300.0
# A lone worker holds each delivery for about 1/rate: a slower rate would outlast the
# broker's consumer timeout (30 minutes) with room to spare for the send itself.
SLOWEST_RATE_PER_S = 3 / 3600


def start_schedule(path: Path) -> Path:
    """Create or reset a run's schedule file: the first slot is now."""
    path.write_bytes(SLOT.pack(0.0))
    return path


class Throttle:
    """Hand out send slots 1/rate seconds apart, shared through a schedule file."""

    def __init__(self, path: Path, rate_per_s: float) -> None:
        self.interval_s = 1.0 / rate_per_s
        self._fd = os.open(path, os.O_RDWR)
        self._lock = file_lock(path, self._fd)

    def reserve(self) -> float:
        """Take the next slot; return the seconds to wait for it (0 if it is now)."""
        with self._lock:
            os.lseek(self._fd, 0, os.SEEK_SET)
            raw = os.read(self._fd, SLOT.size)
            now = time.monotonic()
            slot = max(now, SLOT.unpack(raw)[0] if len(raw) == SLOT.size else now)
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.write(self._fd, SLOT.pack(slot + self.interval_s))
        return slot - now

    def close(self) -> None:
        """Close the schedule file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def paced_prefetch(prefetch: int, workers: int, rate_per_s: float | None) -> int:
    """Lower the prefetch so that paced workers hold no delivery for long."""
    if rate_per_s is None:
        return prefetch
    return max(1, min(prefetch, int(rate_per_s * HELD_AHEAD_S / workers)))


def paced_workers(workers: int, rate_per_s: float | None) -> int:
    """Lower the number of workers so that none waits for its slot past HELD_AHEAD_S.

    Every worker holds a delivery while it waits, and with n workers the wait is n/rate:
    more workers than rate * HELD_AHEAD_S add nothing but deliveries held too long.
    """
    if rate_per_s is None:
        return workers
    return max(1, min(workers, int(rate_per_s * HELD_AHEAD_S)))
