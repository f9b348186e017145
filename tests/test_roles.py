"""Roles: an admin changes things, a viewer sees everything and changes nothing, for API tokens
and for users' login tokens alike (403, errorCode 3001)."""

from __future__ import annotations

import pytest

from otad.errors import InvalidInput
from tests.helpers import assert_error


async def _as(otad, method, path, token, **kwargs):
    return await otad.request(method, path, auth=False, headers={"Authorization": f"Bearer {token}"}, **kwargs)


async def test_a_viewer_token_reads_everything_and_changes_nothing(otad):
    await otad.add_device("dev1", 1)
    assert (await otad.upload("fw", 1, b"image"))[0] == 200
    viewer = await otad.daemon.services.admins.create_token("watcher", role="viewer")

    for path in ("/api/v2/otaList", "/api/v2/devices", "/api/v2/upgrades", "/api/v2/campaigns"):
        status, body = await _as(otad, "GET", path, viewer)
        assert status == 200 and body["success"], (path, body)

    refusals = [
        ("POST", "/api/v2/otaEnable", {"params": {"name": "fw", "deviceName": "dev1"}}),
        ("DELETE", "/api/v2/devices", {"params": {"deviceName": "dev1"}}),
        ("POST", "/api/v2/devices", {"json": {"deviceName": "dev2", "productId": 1}}),
        ("DELETE", "/api/v2/otaDelete", {"params": {"id": "1"}}),
    ]
    for method, path, kwargs in refusals:
        status, body = await _as(otad, method, path, viewer, **kwargs)
        assert_error(status, body, 403, 3001)
        assert "viewer" in body["errorMsg"]
    # nothing changed
    status, body = await otad.request("GET", "/api/v2/devices")
    assert [device["deviceName"] for device in body["data"]] == ["dev1"]
    status, body = await otad.request("GET", "/api/v2/upgrades")
    assert body["data"]["total"] == 0
    assert len((await otad.request("GET", "/api/v2/otaList"))[1]["data"]) == 1


async def test_a_viewer_users_login_token_is_a_viewer_and_an_admins_is_an_admin(otad):
    admins = otad.daemon.services.admins
    await admins.add_user("vera", "vera-pass", role="viewer")
    await admins.add_user("adam", "adam-pass")
    tokens = {}
    for name in ("vera", "adam"):
        status, body = await otad.request("POST", "/api/v2/login", auth=False,
                                          json={"username": name, "password": f"{name}-pass"})
        assert status == 200, body
        tokens[name] = body["data"].removeprefix("Bearer ")

    status, body = await _as(otad, "POST", "/api/v2/devices", tokens["vera"], json={"deviceName": "d", "productId": 1})
    assert_error(status, body, 403, 3001)
    status, body = await _as(otad, "POST", "/api/v2/devices", tokens["adam"], json={"deviceName": "d", "productId": 1})
    assert status == 200, body
    assert [user.role for user in await admins.list_users()] == ["admin", "viewer"]


async def test_an_unknown_role_is_refused(otad):
    admins = otad.daemon.services.admins
    with pytest.raises(InvalidInput, match="role must be one of admin, viewer"):
        await admins.create_token("t", role="root")
    with pytest.raises(InvalidInput, match="role must be one of admin, viewer"):
        await admins.add_user("u", "pw-1234", role="root")
    assert await admins.list_users() == []
    assert [token.name for token in await admins.list_tokens()] == ["tests"]
