"""The few places where otad's raw SQL differs between SQLite and PostgreSQL.

The ORM speaks both; raw statements (report batches, presence) are written once with SQLite's
``?`` placeholders and converted for asyncpg's ``$1, $2, ...`` here."""

from __future__ import annotations

import itertools
import re

from tortoise.backends.base.client import BaseDBAsyncClient

_PLACEHOLDER = re.compile(r"\?")


def is_postgres(conn: BaseDBAsyncClient) -> bool:
    return conn.capabilities.dialect == "postgres"


def sql(conn: BaseDBAsyncClient, query: str) -> str:
    """``query`` with its ``?`` placeholders in ``conn``'s style (none of otad's statements has a
    ``?`` inside a literal)."""
    if not is_postgres(conn):
        return query
    numbers = itertools.count(1)
    return _PLACEHOLDER.sub(lambda _: f"${next(numbers)}", query)
