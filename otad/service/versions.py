"""Firmware version strings as xiaozhi boards compare them: dotted integers, segment by segment."""

from __future__ import annotations

import re

DOTTED = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9}){0,7}")  # ASCII digits only: boards parse with stoi


def parse_dotted(version: object) -> tuple[int, ...] | None:
    """``"1.9.3"`` -> ``(1, 9, 3)``; None for anything a board could not compare."""
    if not isinstance(version, str) or not DOTTED.fullmatch(version):
        return None
    return tuple(int(part) for part in version.split("."))


def is_newer(candidate: tuple[int, ...], current: tuple[int, ...]) -> bool:
    """The board's rule: compare segment by segment; on a tie of the common part the longer wins.

    Python's tuple order is exactly that (``(1, 9) < (1, 9, 0)``).
    """
    return candidate > current
