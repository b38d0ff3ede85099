"""The rate limit: one pace for every worker of a run, however many there are.

A relay account's limit counts the account's messages, not each connection's, so limits
kept per process would multiply with the workers. The workers share one number instead:
the time the next message may start. Each worker takes that slot under a lock, moves the
number on by 1/rate, and waits for its slot. Slots never pile up while nobody sends (a
slot in the past is moved to now), so no stretch of t seconds holds more than
rate * t + 1 messages, whichever workers send them.

The shared number lives in this host's memory: several hosts sending for one relay
account each need their share of the rate (--rate divided by the hosts) until the
limit is kept in the shared store.
"""

from __future__ import annotations

import time
from typing import Any

# The broker takes back a delivery held unacknowledged for 30 minutes (RabbitMQ's default
# consumer timeout); a paced worker holds no more than it can send in this much time.
HELD_AHEAD_S = 300.0


class Throttle:
    """Hand out send slots 1/rate seconds apart, shared by processes."""

    def __init__(self, rate_per_s: float, next_slot: Any) -> None:
        self.interval_s = 1.0 / rate_per_s
        self._next_slot = next_slot  # a multiprocessing.Value("d"), on time.monotonic()'s clock

    @classmethod
    def shared(cls, context: Any, rate_per_s: float) -> Throttle:
        """Make a throttle that worker processes started from `context` can share."""
        return cls(rate_per_s, context.Value("d", 0.0))

    def reserve(self) -> float:
        """Take the next slot; return the seconds to wait for it (0 if it is now)."""
        with self._next_slot.get_lock():
            now = time.monotonic()
            slot = max(now, self._next_slot.value)
            self._next_slot.value = slot + self.interval_s
        return slot - now


def paced_prefetch(prefetch: int, workers: int, rate_per_s: float | None) -> int:
    """Lower the prefetch so that paced workers hold no delivery for long."""
    if rate_per_s is None:
        return prefetch
    return max(1, min(prefetch, int(rate_per_s * HELD_AHEAD_S / workers)))
