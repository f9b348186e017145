"""Failed logins counted per source address and per username, so that guessing is refused early.

A login is refused (``TooManyRequests``, HTTP 429 with Retry-After) once an address or a username
has ``max_failures`` failed attempts within ``window`` seconds, before any password is hashed, so
a flood costs a dictionary lookup instead of an scrypt. Memory is bounded: each of the two tables
keeps at most ``max_keys`` entries, dropping the least recently used, and entries expire.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from otad.errors import TooManyRequests

DEFAULT_MAX_FAILURES = 10
DEFAULT_WINDOW = 300.0  # seconds
# Per table. An entry is a short key and two numbers, so 10,000 of each is about a few MB at most.
DEFAULT_MAX_KEYS = 10_000
# Usernames longer than this are invalid anyway; the key need not hold a megabyte an attacker sent.
_MAX_KEY_LENGTH = 128


@dataclass
class _Entry:
    failures: int
    since: float  # when the window of these failures began


class _Counter:
    """One bounded table of failure counts: an LRU of entries that expire ``window`` s after their
    first failure."""

    def __init__(self, window: float, max_keys: int, clock: Callable[[], float]) -> None:
        self._window = window
        self._max_keys = max_keys
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def current(self, key: str) -> _Entry | None:
        """The key's live entry (marked recently used), or None; an expired one is dropped."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry.since >= self._window:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def add(self, key: str, amount: int) -> None:
        entry = self.current(key)
        if entry is None:
            if amount <= 0:
                return
            self._drop_expired()
            self._entries[key] = _Entry(amount, self._clock())
            while len(self._entries) > self._max_keys:
                self._entries.popitem(last=False)
            return
        entry.failures += amount
        if entry.failures <= 0:
            del self._entries[key]

    def reset(self, key: str) -> None:
        self._entries.pop(key, None)

    def retry_after(self, entry: _Entry) -> float:
        return entry.since + self._window - self._clock()

    def _drop_expired(self) -> None:
        # The least recently used come first; stop at the first live one (amortised O(1)).
        now = self._clock()
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.since < self._window:
                return
            del self._entries[key]


def address_key(address: str | None) -> str:
    """The bucket an address counts in: IPv6 by /64 (one host usually owns the whole prefix),
    IPv4-mapped IPv6 as the IPv4 address, anything unparsable as given."""
    if not address:
        return "unknown"
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:_MAX_KEY_LENGTH]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


class LoginGuard:
    """Counts failed logins per source address and per username; refuses the ones past the limit."""

    def __init__(self, max_failures: int = DEFAULT_MAX_FAILURES, window: float = DEFAULT_WINDOW,
                 max_keys: int = DEFAULT_MAX_KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self._addresses = _Counter(window, max_keys, clock)
        self._usernames = _Counter(window, max_keys, clock)

    def __len__(self) -> int:
        """How many addresses and usernames are tracked; never more than ``2 * max_keys``."""
        return len(self._addresses) + len(self._usernames)

    def admit(self, address: str | None, username: str) -> None:
        """Raise ``TooManyRequests`` if the address or the username is over the limit; otherwise
        count this attempt as a failure in advance, so that concurrent attempts are limited too
        (call ``succeeded`` when it turns out right)."""
        address, username = address_key(address), username[:_MAX_KEY_LENGTH]
        waits = [counter.retry_after(entry) for counter, key in ((self._addresses, address), (self._usernames, username))
                 if (entry := counter.current(key)) is not None and entry.failures >= self.max_failures]
        if waits:
            raise TooManyRequests(retry_after=max(1, math.ceil(max(waits))))
        self._addresses.add(address, 1)
        self._usernames.add(username, 1)

    def succeeded(self, address: str | None, username: str) -> None:
        """The admitted attempt was right: it no longer counts for the address, and the username
        starts afresh. The address's other failures stay (a valid account must not wipe them)."""
        self._addresses.add(address_key(address), -1)
        self._usernames.reset(username[:_MAX_KEY_LENGTH])

    def failures(self, *, address: str | None = None, username: str | None = None) -> int:
        """Failed (or in-flight) attempts counted now for an address or a username."""
        if address is not None:
            entry = self._addresses.current(address_key(address))
        elif username is not None:
            entry = self._usernames.current(username[:_MAX_KEY_LENGTH])
        else:
            raise ValueError("give an address or a username")
        return entry.failures if entry else 0
