"""Signed commands restored after a restart from upgrades an older otad left (docs/signing.md,
review S2 and S3): each checked the way a device would (tests/test_signing.py's ``refusal``)."""

from __future__ import annotations

import json
import time

from tests.conftest import db_query, make_settings, running_otad
from tests.test_signing import FIRMWARE, _subscribed, assert_signed_by, otad_cli


async def _restored_as_left(otad, change: str):
    """dev1, offline, gets an open upgrade of fw; its row is then changed (``change``: an SQL SET
    clause) as an older otad could have left it; otad restarts and dev1 subscribes. The upgrade's
    version and the device."""
    password = await otad.add_device("dev1", 7)
    await otad.upload("fw", 7, FIRMWARE)
    status, enabled = await otad.enable("fw", "dev1")
    assert status == 200, enabled
    version = enabled["data"][0]["version"]
    db_query(otad.settings, f'UPDATE "upgrade" SET {change} WHERE "version" = ?', (version,))
    await otad.restart()
    return version, await _subscribed(otad, password)


async def test_a_restored_upgrade_without_a_timeout_expires_after_the_default_timeout(tmp_path):
    data = tmp_path / "data"
    assert otad_cli(data, "key", "create").returncode == 0
    async with running_otad(make_settings(data, **{"signing.enabled": True})) as otad:
        version, device = await _restored_as_left(otad, '"timeout_at" = NULL')  # from before upgrade timeouts
        command = json.loads((await device.next_message()).payload)
        await device.close()
    assert command["version"] == version
    assert abs(command["expires"] - (time.time() + 24 * 3600)) < 600  # upgrade.timeout, not reply_lifetime (1 h)
    assert_signed_by(command, command["kid"], data)


async def test_a_restored_upgrade_whose_package_is_gone_is_cancelled_not_sent_unsigned(tmp_path):
    data = tmp_path / "data"
    assert otad_cli(data, "key", "create").returncode == 0
    async with running_otad(make_settings(data, **{"signing.enabled": True})) as otad:
        # Its package deleted while it was being enabled (the deletion's SET NULL), or by an older otad.
        orphan, device = await _restored_as_left(otad, '"package_id" = NULL')
        status, enabled = await otad.enable("fw", "dev1")
        assert status == 200, enabled
        first = json.loads((await device.next_message()).payload)  # a kept command would come first
        await device.close()
        state = db_query(otad.settings, 'SELECT "state" FROM "upgrade" WHERE "version" = ?', (orphan,))
    assert first["version"] == enabled["data"][0]["version"] != orphan
    assert_signed_by(first, first["kid"], data)
    assert state == [("cancelled",)]
