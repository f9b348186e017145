"""SQLite databases made by otad before tortoise's migrations: schema versions 1 to 4 in the one-row
``schema_version`` table, each brought to 4 by the steps here (then ``database`` records them as
having applied the initial tortoise migration, which is version 4). Frozen: later changes are
tortoise migrations in ``otad/store/migrations``."""

from __future__ import annotations

import logging
from pathlib import Path

from tortoise.transactions import in_transaction

from otad.store.models import SchemaVersion
from otad.store.transactions import shielded

log = logging.getLogger(__name__)

# The last version of this numbering; fresh databases say it too (schema_version is kept).
SCHEMA_VERSION = 4
# version -> SQL statements that bring a database of version-1 up to version.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # Timeline entries fold repeated reports (count, last_at) and say whether they changed the
    # state; indexes for the per-upgrade timeline, a device's open upgrade and a campaign's states.
    2: (
        'ALTER TABLE "upgrade_event" ADD "changed" INT NOT NULL DEFAULT 1',
        'ALTER TABLE "upgrade_event" ADD "count" INT NOT NULL DEFAULT 1',
        'ALTER TABLE "upgrade_event" ADD "last_at" TIMESTAMP',
        'CREATE INDEX IF NOT EXISTS "idx_upgrade_eve_upgrade_50b992" ON "upgrade_event" ("upgrade_id", "id")',
        'CREATE INDEX IF NOT EXISTS "idx_upgrade_device__d530d0" ON "upgrade" ("device_id", "state")',
        'CREATE INDEX IF NOT EXISTS "idx_upgrade_campaig_31bb25" ON "upgrade" ("campaign_id", "state")',
        # Entries before this version did not say: the first of each state is taken as its change,
        # later ones (late or repeated reports) as notes, which the timeline cap applies to.
        'UPDATE "upgrade_event" SET "changed" = 0 WHERE "id" NOT IN '
        '(SELECT MIN("id") FROM "upgrade_event" GROUP BY "upgrade_id", "state")',
    ),
    # xiaozhi boards activate before they become devices: pending claims (capped, expiring) and
    # accepted ones (bound to one Client-Id). As generate_schemas creates them on a fresh database.
    3: (
        """CREATE TABLE IF NOT EXISTS "xiaozhi_activation" (
    "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    "device_name" VARCHAR(64) NOT NULL,
    "client_id" VARCHAR(64) NOT NULL,
    "code" VARCHAR(16) UNIQUE,
    "challenge" VARCHAR(64) NOT NULL,
    "product_id" BIGINT NOT NULL,
    "serial_number" VARCHAR(64),
    "remote_addr" VARCHAR(64),
    "app_version" VARCHAR(64),
    "board_type" VARCHAR(128),
    "created_at" TIMESTAMP NOT NULL,
    "seen_at" TIMESTAMP NOT NULL,
    "expires_at" TIMESTAMP,
    "accepted_at" TIMESTAMP,
    "device_id" INT REFERENCES "device" ("id") ON DELETE CASCADE,
    CONSTRAINT "uid_xiaozhi_act_device__266a46" UNIQUE ("device_name", "client_id")
)""",
        'CREATE INDEX IF NOT EXISTS "idx_xiaozhi_act_expires_14ad51" ON "xiaozhi_activation" ("expires_at")',
        # Boards registered before activation existed keep working: each is accepted, bound to the
        # first Client-Id it checks in with (an empty client_id; see activations.find_board).
        'INSERT INTO "xiaozhi_activation" ("device_name", "client_id", "code", "challenge", "product_id", '
        '"device_id", "created_at", "seen_at", "expires_at", "accepted_at") '
        'SELECT "name", \'\', NULL, \'\', "product_id", "id", "last_check_at", "last_check_at", NULL, "last_check_at" '
        'FROM "device" WHERE "last_check_at" IS NOT NULL',
    ),
    # Roles: every account and token made before them could change everything, and still can.
    4: (
        'ALTER TABLE "user" ADD "role" VARCHAR(16) NOT NULL DEFAULT \'admin\'',
        'ALTER TABLE "api_token" ADD "role" VARCHAR(16) NOT NULL DEFAULT \'admin\'',
    ),
}



@shielded
async def migrate_to_last(path: Path) -> None:
    """Bring a database of version 1 to 3 up to SCHEMA_VERSION; refuse one newer than that."""
    row = await SchemaVersion.first()
    current = row.version if row else SCHEMA_VERSION
    if current > SCHEMA_VERSION:
        raise RuntimeError(f"database {path} has schema version {current}, newer than this otad "
                           f"understands ({SCHEMA_VERSION}); upgrade otad")
    if row is None:
        await SchemaVersion.create(id=1, version=SCHEMA_VERSION)
        return
    for version in range(current + 1, SCHEMA_VERSION + 1):
        log.info("migrating database schema to version %d", version)
        # One transaction per version, its number included: a crash or a full disk halfway
        # leaves the database at the version before, to be migrated again (SQLite's DDL is
        # transactional).
        async with in_transaction() as conn:
            for statement in _MIGRATIONS[version]:
                await conn.execute_query(statement)
            await conn.execute_query('UPDATE "schema_version" SET "version" = ? WHERE "id" = 1', [version])
