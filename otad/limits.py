"""The open-file limit, and how the daemon shares it between HTTP, MQTT and storage.

Every connection is a file descriptor. Without a budget, a flood of idle HTTP sockets takes the
descriptors that MQTT devices, the database and the firmware files need, and everything fails
with "Too many open files" at once.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Descriptors kept for everything that is not a connection: the database and its WAL, the
# listening sockets, the log, firmware uploads being written, the thread pools.
RESERVE = 64


@dataclass(frozen=True)
class FileBudget:
    limit: int  # the soft open-file limit in force
    http_connections: int
    mqtt_connections: int


@dataclass(frozen=True)
class FileLimit:
    before: int  # the soft limit the process started with
    soft: int  # the soft limit now
    hard: int

    def describe(self) -> str:
        hard = "unlimited" if self.hard == resource.RLIM_INFINITY else str(self.hard)
        return f"open-file limit {self.soft} (was {self.before}; hard limit {hard})"


def raise_open_file_limit() -> FileLimit:
    """Raise the soft open-file limit to the hard one (the most an unprivileged process may have)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    new_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return FileLimit(before=soft, soft=new_soft, hard=hard)


def share(limit: int, http_configured: int, mqtt_configured: int) -> FileBudget:
    """HTTP gets an eighth of what the reserve leaves (or what is configured, up to half), counted
    twice since a download holds the socket and the file; MQTT, where the fleet is, gets the rest
    (or less, if its own limit is lower)."""
    available = max(16, limit - RESERVE)
    http = min(http_configured, available // 2) if http_configured else max(8, available // 8)
    mqtt = max(8, min(mqtt_configured, available - 2 * http))
    return FileBudget(limit=limit, http_connections=http, mqtt_connections=mqtt)
