"""Request ids: UUIDv7 (RFC 9562, section 5.7), unique across restarts and replicas.

A UUIDv7 is 48 bits of Unix time in milliseconds, the version (7), 12 bits of a counter, the
variant (0b10) and 62 random bits. The time makes ids sort in creation order (so database
indexes on them stay compact); the random bits make two servers' ids collide with
probability about n^2 / 2^63. Within one process a counter keeps ids strictly increasing
even when many are made in one millisecond or the clock steps back (RFC 9562, method 1).

The random bits come from ``os.urandom`` (the operating system's entropy, read 4 KB at a
time and dropped in a forked child), not from a seeded stream: DESIGN.md principle 1 keeps
seeded randomness replayable and bans the global RNGs; an id must never repeat after a
restart with the same ``--seed``, which is exactly what a seeded stream would do.

>>> a, b = uuid7(), uuid7()
>>> a < b and a[14] == "7"
True
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_COUNTER_BITS = 12


class _Clock:
    """The last (milliseconds, counter) handed out, so that ids never go backwards, and a
    buffer of OS entropy (one ``os.urandom`` call per 512 ids instead of one per id)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.millis = 0
        self.counter = 0
        self.entropy = b""
        self.used = 0

    def next(self) -> tuple[int, int, int]:
        """(milliseconds, counter, 62 random bits)."""
        now = time.time_ns() // 1_000_000
        with self.lock:
            if now > self.millis:
                self.millis, self.counter = now, 0
            else:  # same millisecond, or the clock stepped back: count on from the last id
                self.counter += 1
                if self.counter >> _COUNTER_BITS:  # 4096 ids in one ms: borrow the next ms
                    self.millis, self.counter = self.millis + 1, 0
            if self.used + 8 > len(self.entropy):
                self.entropy, self.used = os.urandom(8 * 512), 0
            random = int.from_bytes(self.entropy[self.used : self.used + 8], "big") >> 2
            self.used += 8
            return self.millis, self.counter, random


_CLOCK = _Clock()


def _forget_entropy() -> None:  # a forked child must not hand out its parent's random bits
    _CLOCK.entropy, _CLOCK.used = b"", 0


os.register_at_fork(after_in_child=_forget_entropy)


def uuid7_int() -> int:
    """A UUIDv7 as a 128-bit integer."""
    millis, counter, random = _CLOCK.next()
    return (
        (millis & ((1 << 48) - 1)) << 80
        | 0x7 << 76
        | counter << 64
        | 0b10 << 62  # the RFC 4122/9562 variant
        | random
    )


def uuid7() -> str:
    """A new UUIDv7 in the canonical 36-character form, e.g. for a request id."""
    digits = f"{uuid7_int():032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def uuid7_millis(value: str) -> int:
    """The Unix time in milliseconds stored in a UUIDv7 string."""
    return uuid.UUID(value).int >> 80


def made_at(request_id: str) -> float:
    """The Unix time a server-made id (a UUIDv7, or ``UUID/i`` for instance i) was made;
    0 for any other id."""
    try:
        made = uuid.UUID(request_id.split("/", 1)[0])
    except ValueError:
        return 0.0
    return (made.int >> 80) / 1000 if made.version == 7 else 0.0
