"""The service's sense of time: one function, so a test can hand the daemon another clock."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
