"""The pager under every paged table: page X of Y, and links to the pages beside it that keep
the table's filters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode


@dataclass(frozen=True)
class Pager:
    page: int
    pages: int
    total: int
    prev_link: str | None
    next_link: str | None


def pager(path: str, params: Mapping[str, str], number: int, size: int, total: int) -> Pager:
    """Page ``number`` of ``total`` items, ``size`` a page; the links keep ``params``."""
    pages = max(1, -(-total // size))

    def link(to: int) -> str:
        return f"{path}?{urlencode({**params, 'page': str(to)})}"

    return Pager(page=number, pages=pages, total=total, prev_link=link(number - 1) if number > 1 else None,
                 next_link=link(number + 1) if number < pages else None)
