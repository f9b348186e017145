"""Device reports applied in batches: what a batch needs to read, and its writes in one transaction.

One report used to cost four or five round trips; a burst after a campaign's notifications is
tens of thousands of reports. Here a batch of reports is three reads and a handful of statements,
each covering every row of the batch (bench/report_ingest.py has the figures).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tortoise.transactions import in_transaction

from otad.store.dialect import is_postgres, sql
from otad.store.failures import translate_storage_errors
from otad.store.models import Upgrade
from otad.store.transactions import shielded
from otad.model import ReportTarget, ReportWrites, UpgradeWrite

# Rows per statement: SQLite allows 32,766 bound values per statement; 7 per row stays far below.
_ROWS_PER_STATEMENT = 500


@shielded
async def _write(writes: ReportWrites) -> None:
    async with in_transaction() as conn:
        await _update_upgrades(conn, writes.upgrades)
        if writes.new_events:
            await conn.execute_many(sql(
                conn, 'INSERT INTO "upgrade_event" ("upgrade_id", "at", "state", "source", "detail", "changed", '
                '"count", "last_at") VALUES (?, ?, ?, ?, ?, ?, ?, ?)'),
                [[e.upgrade_id, e.at, e.state, e.source, e.detail, e.changed, e.count, e.last_at]
                 for e in writes.new_events])
        if writes.folded:
            await conn.execute_many(sql(
                conn, 'UPDATE "upgrade_event" SET "count" = "count" + ?, "last_at" = ?, "detail" = ? WHERE "id" = ?'),
                [[f.added, f.last_at, f.detail, f.event_id] for f in writes.folded.values()])
        if writes.trims:
            await conn.execute_many(sql(
                conn, 'DELETE FROM "upgrade_event" WHERE "id" IN (SELECT "id" FROM "upgrade_event" '
                'WHERE "upgrade_id" = ? AND NOT "changed" ORDER BY "id" LIMIT ?)'),
                [[upgrade_id, excess] for upgrade_id, excess in writes.trims])
        if writes.firmware:
            await conn.execute_many(sql(conn, 'UPDATE "device" SET "firmware_version" = ? WHERE "id" = ?'),
                                    [[version, device_id] for device_id, version in writes.firmware.items()])


# The compare-and-set of a batch's upgrades, from a table of (id, from_state, to_state, ...) rows.
_SET_UPGRADES = ('UPDATE "upgrade" SET "state" = v.to_state, '
                 '"progress" = COALESCE(v.progress, "upgrade"."progress"), '
                 '"message" = COALESCE(v.message, "upgrade"."message"), '
                 '"finished_at" = COALESCE(v.finished_at, "upgrade"."finished_at"), '
                 '"updated_at" = v.updated_at '
                 'FROM {rows} WHERE "upgrade"."id" = v.id AND "upgrade"."state" = v.from_state')
_COLUMNS = "id, from_state, to_state, progress, message, finished_at, updated_at"
# PostgreSQL: one statement for the whole batch, each column an array (typed: bare parameters in
# VALUES would be text). SQLite has no arrays: a VALUES table per chunk.
_PG_ROWS = ('unnest($1::int[], $2::text[], $3::text[], $4::int[], $5::text[], $6::timestamptz[], '
            f'$7::timestamptz[]) AS v({_COLUMNS})')


async def _update_upgrades(conn, upgrades: list[UpgradeWrite]) -> None:
    """Move each upgrade from the state it was read in, or raise _LostRace and write nothing."""
    if not upgrades:
        return
    if is_postgres(conn):
        columns = [[w.id for w in upgrades], [w.from_state for w in upgrades], [w.to_state for w in upgrades],
                   [w.progress for w in upgrades], [w.message for w in upgrades],
                   [w.finished_at for w in upgrades], [w.updated_at for w in upgrades]]
        changed, _ = await conn.execute_query(_SET_UPGRADES.format(rows=_PG_ROWS), columns)
        if changed != len(upgrades):
            raise _LostRace
        return
    for chunk in _chunks(upgrades):
        rows = ", ".join("(?, ?, ?, ?, ?, ?, ?)" for _ in chunk)
        values: list = []
        for w in chunk:
            values += [w.id, w.from_state, w.to_state, w.progress, w.message, w.finished_at, w.updated_at]
        changed, _ = await conn.execute_query(f"WITH v({_COLUMNS}) AS (VALUES {rows}) "
                                              + _SET_UPGRADES.format(rows="v"), values)
        if changed != len(chunk):
            raise _LostRace


class _LostRace(Exception):
    pass


def _chunks(items: Sequence) -> Iterable[Sequence]:
    for start in range(0, len(items), _ROWS_PER_STATEMENT):
        yield items[start:start + _ROWS_PER_STATEMENT]


class ReportWriter:
    """Device reports applied in batches."""

    @translate_storage_errors
    async def load_report_targets(self, versions: Iterable[str]) -> dict[str, ReportTarget]:
        """The upgrades named by ``versions`` (those that exist), each with its last timeline entry
        and how many entries it keeps that changed nothing: one query per chunk of the batch."""
        wanted = list(set(versions))
        targets: dict[str, ReportTarget] = {}
        conn = Upgrade._meta.db  # the store's one connection, SQLite or PostgreSQL
        for chunk in _chunks(wanted):
            rows = await conn.execute_query_dict(sql(
                conn, 'SELECT u."id", u."version", u."device_id", d."name" AS device_name, u."state", u."progress", '
                'u."campaign_id", e."id" AS last_id, e."state" AS last_state, e."source" AS last_source, '
                '(SELECT COUNT(*) FROM "upgrade_event" n WHERE n."upgrade_id" = u."id" AND NOT n."changed") AS notes '
                'FROM "upgrade" u JOIN "device" d ON d."id" = u."device_id" '
                'LEFT JOIN "upgrade_event" e ON e."id" = '
                '(SELECT MAX(m."id") FROM "upgrade_event" m WHERE m."upgrade_id" = u."id") '
                f'WHERE u."version" IN ({", ".join("?" for _ in chunk)})'), list(chunk))
            for row in rows:
                targets[row["version"]] = ReportTarget(
                    id=row["id"], version=row["version"], device_id=row["device_id"], device_name=row["device_name"],
                    state=row["state"], progress=row["progress"], campaign_id=row["campaign_id"],
                    last_event_id=row["last_id"], last_event_state=row["last_state"],
                    last_event_source=row["last_source"], notes=row["notes"])
        return targets

    @translate_storage_errors
    async def apply_report_writes(self, writes: ReportWrites) -> bool:
        """Write a batch in one transaction. Each upgrade moves only from the state it was read in
        (compare-and-set, counted): if another writer moved any of them meanwhile, nothing is written
        and this returns False, for the caller to read again and re-plan."""
        try:
            await _write(writes)
        except _LostRace:
            return False
        return True
