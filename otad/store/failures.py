"""Storage failures that pass (a full disk, a busy database), told apart from bugs.

The service retries these, answers 507/503 for them and shows them in /healthz; it must not treat
them as bad input or crash on them. Only this module knows how the backends spell them."""

from __future__ import annotations

import errno
import functools
import sqlite3
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import asyncpg
from tortoise.exceptions import OperationalError, TransactionManagementError

from otad.errors import StorageFull, StorageUnavailable

P = ParamSpec("P")
T = TypeVar("T")

_FULL = ("database or disk is full", "no space left")
_PASSING = ("database is locked", "database is busy", "disk i/o error", "unable to open database file")
# PostgreSQL: the server is unreachable, restarting or out of connections; a transaction lost a
# serialization or deadlock race. Each passes; the next attempt may succeed.
_PG_PASSING = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
               asyncpg.TooManyConnectionsError, asyncpg.TransactionRollbackError, asyncpg.AdminShutdownError,
               ConnectionError)


def storage_failure(exc: BaseException) -> StorageUnavailable | None:
    """The passing storage failure ``exc`` stands for, or None if it is something else."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull("database: no space left on the device")
    raised = (exc, exc.__cause__)  # tortoise wraps some of asyncpg's errors in its own
    if any(isinstance(error, asyncpg.DiskFullError) for error in raised):
        return StorageFull("database: no space left on the database server")
    if any(isinstance(error, _PG_PASSING) for error in raised):
        return StorageUnavailable(f"database: {exc}")
    if isinstance(exc, (OperationalError, TransactionManagementError, sqlite3.OperationalError, OSError)):
        text = str(exc).lower()
        if any(marker in text for marker in _FULL):
            return StorageFull("database: no space left on the device")
        if any(marker in text for marker in _PASSING):
            return StorageUnavailable(f"database: {exc}")
    return None


def translate_storage_errors(function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Raise ``StorageFull`` / ``StorageUnavailable`` for passing failures, anything else unchanged."""

    @functools.wraps(function)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await function(*args, **kwargs)
        except StorageUnavailable:
            raise
        except Exception as exc:
            failure = storage_failure(exc)
            if failure is None:
                raise
            raise failure from exc

    return wrapper
