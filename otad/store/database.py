"""Opening and closing the database (SQLite in the data dir, or PostgreSQL at ``database.url``), and
bringing its schema up to date with tortoise's migrations (``otad/store/migrations``) at start.

After a model change: ``tortoise -c otad.store.database.TORTOISE_ORM makemigrations`` writes the
next migration; every otad applies it when it opens the database.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator
from pathlib import Path

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.backends.base.config_generator import expand_db_url
from tortoise.context import TortoiseContext
from tortoise.migrations.executor import MigrationExecutor, MigrationTarget
from tortoise.migrations.operations import CreateModel

from otad.store import legacy_schema, transactions
from otad.store.dialect import is_postgres
from otad.store.models import SchemaVersion

APP = "models"
INITIAL_MIGRATION = "0001_initial"  # the schema of legacy version 4
# Nodes starting together on one PostgreSQL database migrate one at a time (a session advisory lock).
_MIGRATION_LOCK = 0x07AD_0001


def _apps(connection_name: str) -> dict:
    return {APP: {"models": ["otad.store.models"], "default_connection": connection_name,
                  "migrations": "otad.store.migrations"}}


def tortoise_config(connection: dict | str, name: str = "sqlite") -> dict:
    # Named after the engine: tortoise caches each model's statements per connection name for the
    # whole process, so a process that opens SQLite and then PostgreSQL (the tests) must not
    # reuse a name, or the second gets the first one's dialect.
    return {"connections": {name: connection}, "apps": _apps(name)}


# For tortoise's CLI (makemigrations, sqlmigrate): the models, on a scratch database.
TORTOISE_ORM = tortoise_config("sqlite://:memory:")


class Database:
    """Owns one Tortoise context bound to one SQLite file, or to the PostgreSQL database at ``url``.

    Tortoise 1.x keeps its state per async context; entering ours in the task that starts the daemon
    makes every task created from it (HTTP handlers, broker callbacks) see the same connections.
    """

    def __init__(self, path: Path, url: str = "") -> None:
        self.path = path
        self.url = url
        self._context: TortoiseContext | None = None

    async def open(self) -> None:
        self._context = TortoiseContext()
        self._context.__enter__()
        name = "postgres" if self.url else "sqlite"
        await self._context.init(config=tortoise_config(self._connection(), name))
        connection = self._context.connections.get(name)
        async with _one_at_a_time(connection):
            await self._migrate(connection)

    def _connection(self) -> dict:
        if self.url:
            # asyncpg; the URL's query may set the pool (?minsize=&maxsize=) and ssl.
            return expand_db_url(self.url)
        return {
            "engine": "tortoise.backends.sqlite",
            # WAL lets the CLI's admin commands write while the daemon runs; busy_timeout makes
            # a writer wait for the other's lock instead of failing at once. synchronous=FULL
            # fsyncs the WAL at every commit: a PUBACK or a 200 promises the write survives a
            # power cut, not just a crash (commits are batched where it matters: reports).
            "credentials": {"file_path": str(self.path), "journal_mode": "WAL", "busy_timeout": 5000,
                            "synchronous": "FULL"},
        }

    async def _migrate(self, connection: BaseDBAsyncClient) -> None:
        executor = MigrationExecutor(connection, _apps(connection.connection_name))
        if await _legacy_sqlite(connection):
            # Made by an otad before tortoise's migrations: its own steps bring it to version 4
            # (tables it never had first, as it always did), which is what the initial migration
            # creates, so that one is only recorded as applied.
            before = await _sqlite_tables(connection)
            await self._context.generate_schemas(safe=True)
            await legacy_schema.migrate_to_last(self.path)
            # generate_schemas made today's tables; those of later migrations go again (empty, just
            # made) so those migrations create them, as on any other database.
            for table in await _sqlite_tables(connection) - before - _initial_tables():
                await connection.execute_script(f'DROP TABLE "{table}"')
            await executor.migrate([MigrationTarget(app_label=APP, name=INITIAL_MIGRATION)], fake=True)
        await executor.migrate()
        if not await SchemaVersion.exists():
            # Kept for the health probe's write and for an older otad opening this database.
            await SchemaVersion.create(id=1, version=legacy_schema.SCHEMA_VERSION)

    async def close(self) -> None:
        if self._context is None:
            return
        context, self._context = self._context, None
        await transactions.drain()  # writes whose callers were cancelled (a stopping daemon's tasks) end first
        await context.close_connections()
        try:
            context.__exit__(None, None, None)
        except ValueError:
            pass  # closed from another task than the one that opened it: nothing to restore there


async def _sqlite_tables(connection: BaseDBAsyncClient) -> set[str]:
    _, rows = await connection.execute_query("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {row["name"] for row in rows}


def _initial_tables() -> set[str]:
    """The tables the initial migration creates (what legacy version 4 had)."""
    initial = importlib.import_module(f"otad.store.migrations.{INITIAL_MIGRATION}")
    return {operation.options["table"] for operation in initial.Migration.operations
            if isinstance(operation, CreateModel)}


async def _legacy_sqlite(connection: BaseDBAsyncClient) -> bool:
    """A SQLite database with otad's old ``schema_version`` table below version 4, or at 4 with no
    record of the initial tortoise migration (also one whose legacy steps were interrupted: they
    run again)."""
    if is_postgres(connection):
        return False  # PostgreSQL came with tortoise's migrations: no database predates them
    tables = {row["name"] for row in await connection.execute_query_dict(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('schema_version', 'tortoise_migrations')")}
    if "schema_version" not in tables:
        return False
    version = await connection.execute_query_dict('SELECT "version" FROM "schema_version" WHERE "id" = 1')
    if not version or version[0]["version"] != legacy_schema.SCHEMA_VERSION or "tortoise_migrations" not in tables:
        return True
    rows = await connection.execute_query_dict(
        'SELECT 1 FROM "tortoise_migrations" WHERE "app" = ? AND "name" = ?', [APP, INITIAL_MIGRATION])
    return not rows


@contextlib.asynccontextmanager
async def _one_at_a_time(connection: BaseDBAsyncClient) -> AsyncIterator[None]:
    """PostgreSQL: hold the migration lock on one pooled connection for the block. SQLite: its
    write lock already serialises two otads on one file (the daemon and an admin command)."""
    if not is_postgres(connection):
        yield
        return
    async with connection.acquire_connection() as raw:
        await raw.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            yield
        finally:
            await raw.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
