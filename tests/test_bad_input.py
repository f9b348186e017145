"""Bad input gets a clear error in the envelope, the right status, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.conftest import eventually, make_settings, start_otad
from tests.helpers import ENVELOPE_KEYS, assert_error, assert_nothing_stored

async def test_admin_endpoints_need_a_valid_token(otad):
    for method, path in (("GET", "/api/v2/otaList"), ("POST", "/api/v2/otaEnable"), ("DELETE", "/api/v2/otaDelete"),
                         ("GET", "/api/v2/devices"), ("POST", "/api/v2/otaUpload")):
        status, body = await otad.request(method, path, auth=False)
        assert_error(status, body, 401, 2001)
        status, body = await otad.request(method, path, auth=False, headers={"Authorization": "Bearer nope"})
        assert_error(status, body, 401, 2001)


async def test_bare_token_and_bearer_token_are_both_accepted(otad):
    for header in (otad.token, f"Bearer {otad.token}"):
        status, body = await otad.request("GET", "/api/v2/otaList", auth=False, headers={"Authorization": header})
        assert status == 200 and body["success"] is True


async def test_upload_without_parameters_is_refused_before_reading(otad):
    status, body = await otad.upload("", 1, b"x")
    assert_error(status, body, 400, 1004)
    form = aiohttp.FormData()
    form.add_field("file", b"x", filename="a.bin")
    status, body = await otad.request("POST", "/api/v2/otaUpload", params={"name": "fw"}, data=form)
    assert_error(status, body, 400, 1004)
    status, body = await otad.upload("fw", "seven", b"x")
    assert_error(status, body, 400, 1003)
    assert_nothing_stored(otad)


async def test_empty_file_is_refused_and_nothing_is_kept(otad):
    status, body = await otad.upload("fw", 1, b"")
    assert_error(status, body, 400, 1004)
    assert_nothing_stored(otad)


async def test_upload_without_file_field_is_refused(otad):
    form = aiohttp.FormData()
    form.add_field("other", b"data", filename="a.bin")
    status, body = await otad.request("POST", "/api/v2/otaUpload", params={"name": "fw", "productId": "1"}, data=form)
    assert_error(status, body, 400, 1004)
    status, body = await otad.request("POST", "/api/v2/otaUpload", params={"name": "fw", "productId": "1"},
                                      data=b"raw bytes")
    assert_error(status, body, 400, 1004)
    assert_nothing_stored(otad)


async def test_duplicate_name_in_a_product_is_refused(otad):
    status, body = await otad.upload("fw", 1, b"first")
    assert status == 200
    files = otad.firmware_files()
    status, body = await otad.upload("fw", 1, b"second")
    assert_error(status, body, 409, 1001)
    assert otad.db_rows("package") == 1 and otad.firmware_files() == files
    status, _ = await otad.upload("fw", 2, b"other product, same name")
    assert status == 200


async def test_upload_over_the_limit_is_refused_and_nothing_is_kept(tmp_path):
    small = await start_otad(make_settings(tmp_path / "d", **{"http.max_upload_size": "64KiB"}))
    try:
        status, body = await small.upload("fw", 1, b"x" * (64 * 1024 + 1))
        assert_error(status, body, 413, 1001)
        assert_nothing_stored(small)
        # Exactly at the limit is fine, and the daemon kept serving.
        status, body = await small.upload("fw", 1, b"x" * (64 * 1024))
        assert status == 200 and body["data"]["size"] == 64 * 1024
    finally:
        await small.stop()


async def test_streamed_upload_over_the_limit_without_content_length(tmp_path):
    small = await start_otad(make_settings(tmp_path / "d", **{"http.max_upload_size": "64KiB"}))

    async def body():
        yield b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n\r\n"
        for _ in range(40):
            yield b"y" * 4096
        yield b"\r\n--B--\r\n"

    try:
        status, reply = await small.request(
            "POST", "/api/v2/otaUpload", params={"name": "fw", "productId": "1"}, data=body(),
            headers={"Content-Type": "multipart/form-data; boundary=B"})
        assert_error(status, reply, 413, 1001)
        assert_nothing_stored(small)
    finally:
        await small.stop()


async def test_enable_needs_an_existing_device_and_package(otad):
    status, body = await otad.enable("fw", "ghost")
    assert_error(status, body, 404, 1001)
    await otad.add_device("dev1", 1)
    status, body = await otad.enable("fw", "dev1")
    assert_error(status, body, 404, 1001)
    await otad.upload("fw", 2, b"another product's package")
    status, body = await otad.enable("fw", "dev1")
    assert_error(status, body, 404, 1001)
    status, body = await otad.request("POST", "/api/v2/otaEnable", params={"deviceName": "dev1"})
    assert_error(status, body, 400, 1004)
    assert otad.db_rows("upgrade") == 0


async def test_bulk_device_registration_is_all_or_nothing(otad):
    items = [{"deviceName": f"gw-{i}", "productId": 5} for i in range(500)]
    status, body = await otad.request("POST", "/api/v2/devices", json=items)
    assert status == 200 and len(body["data"]) == 500
    assert len({entry["password"] for entry in body["data"]}) == 500

    clash = [{"deviceName": "new-1", "productId": 5}, {"deviceName": "gw-7", "productId": 5}]
    status, body = await otad.request("POST", "/api/v2/devices", json=clash)
    assert_error(status, body, 409, 1001)
    assert "gw-7" in body["errorMsg"]
    for bad in ([{"deviceName": "a/b", "productId": 1}], [{"deviceName": "x", "productId": "one"}],
                [{"deviceName": "x"}], [{"deviceName": "#", "productId": 1}], ["x"], []):
        status, body = await otad.request("POST", "/api/v2/devices", json=bad)
        assert status == 400 and body["success"] is False, bad
    assert otad.db_rows("device") == 500
    status, body = await otad.request("GET", "/api/v2/devices")
    assert len(body["data"]) == 500 and "password" not in body["data"][0]


async def test_malformed_json_is_a_clear_error(otad):
    status, body = await otad.request("POST", "/api/v2/devices", data=b"{not json",
                                      headers={"Content-Type": "application/json"})
    assert_error(status, body, 400, 1001)
    status, body = await otad.request("POST", "/api/v2/login", auth=False, data=b"\xff\xfe")
    assert_error(status, body, 400, 1001)


async def test_unknown_route_and_method_answer_in_the_envelope(otad):
    status, body = await otad.request("GET", "/api/v2/nothing-here")
    assert_error(status, body, 404, 1001)
    status, body = await otad.request("PUT", "/api/v2/otaList")
    assert_error(status, body, 405, 1001)


@pytest.mark.parametrize("username,password,code", [("admin", "wrong", 2003), ("nobody", "pw", 2007)])
async def test_login_failures(otad, username, password, code):
    await otad.daemon.services.admins.add_user("admin", "s3cret-pass")
    status, body = await otad.request("POST", "/api/v2/login", auth=False,
                                      json={"username": username, "password": password})
    assert_error(status, body, 401, code)


async def test_login_returns_a_bearer_token_that_works(otad):
    await otad.daemon.services.admins.add_user("admin", "s3cret-pass")
    status, body = await otad.request("POST", "/api/v2/login", auth=False,
                                      json={"username": "admin", "password": "s3cret-pass"})
    assert status == 200 and body["data"].startswith("Bearer ")
    status, body = await otad.request("GET", "/api/v2/otaList", auth=False, headers={"Authorization": body["data"]})
    assert status == 200 and body["success"] is True


async def test_always_http_200_keeps_the_originals_behaviour(tmp_path):
    legacy = await start_otad(make_settings(tmp_path / "d", **{"api.always_http_200": True}))
    try:
        status, body = await legacy.request("GET", "/api/v2/otaList", auth=False)
        assert_error(status, body, 200, 2001)
        status, body = await legacy.enable("fw", "ghost")
        assert_error(status, body, 200, 1001)
    finally:
        await legacy.stop()


async def test_delete_unknown_things(otad):
    status, body = await otad.request("DELETE", "/api/v2/otaDelete", params={"id": "999"})
    assert_error(status, body, 404, 1001)
    status, body = await otad.request("DELETE", "/api/v2/otaDelete", params={"id": "abc"})
    assert_error(status, body, 400, 1003)
    status, body = await otad.request("DELETE", "/api/v2/devices", params={"deviceName": "ghost"})
    assert_error(status, body, 404, 1001)


async def test_client_vanishing_mid_upload_leaves_nothing(otad):
    reader, writer = await asyncio.open_connection("127.0.0.1", otad.daemon.http_port)
    head = (f"POST /api/v2/otaUpload?name=fw&productId=1 HTTP/1.1\r\nHost: x\r\nAuthorization: {otad.token}\r\n"
            "Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 10000000\r\n\r\n"
            '--B\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n')
    writer.write(head.encode() + b"z" * 3_000_000)
    await writer.drain()
    await eventually(lambda: otad.firmware_files() != [])  # the partial upload is being written
    writer.close()
    await eventually(lambda: otad.firmware_files() == [])
    assert otad.db_rows("package") == 0
    status, _ = await otad.upload("fw", 1, b"the daemon still serves")
    assert status == 200


async def test_upload_cut_off_before_the_closing_boundary_is_refused(otad):
    """A truncated body must never become a shorter firmware that devices would flash."""
    for size in (100, 70_000, 2_500_000):
        head = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n')
        status, body = await otad.request("POST", "/api/v2/otaUpload", params={"name": f"fw{size}", "productId": "1"},
                                          data=head + b"t" * size,
                                          headers={"Content-Type": "multipart/form-data; boundary=B"})
        assert status == 400 and body["errorCode"] == 1001, (size, body)
    assert_nothing_stored(otad)


@pytest.mark.parametrize("body", [
    {"deviceName": "d1", "productId": 99999999999999999999999},
    {"deviceName": "d1", "productId": "١٢"},      # Arabic-Indic digits are not an integer here
    {"deviceName": "d\ud800", "productId": 1},
])
async def test_out_of_range_and_non_ascii_values_are_400(otad, body):
    status, reply = await otad.request("POST", "/api/v2/devices", data=json.dumps(body).encode(),
                                       headers={"Content-Type": "application/json"})
    assert status == 400 and reply["success"] is False, reply
    assert otad.db_rows("device") == 0


async def test_unstorable_text_and_odd_bodies_are_400_not_500(otad):
    await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"x")
    raw = b'{"deviceName":"dev1","name":"fw","versionName":"1.0","description":"\\ud800"}'
    status, body = await otad.request("POST", "/api/v2/otaPassive", data=raw, headers={"Content-Type": "application/json"})
    assert_error(status, body, 400, 1001)
    status, body = await otad.request("POST", "/api/v2/login", auth=False, data=b'{"username":"\\ud800","password":"x"}',
                                      headers={"Content-Type": "application/json"})
    assert status == 401 and body["errorCode"] == 2007
    status, body = await otad.request("POST", "/api/v2/login", auth=False, data=b'{}',
                                      headers={"Content-Type": "application/json; charset=bogus"})
    assert_error(status, body, 400, 1001)
    status, body = await otad.request("POST", "/api/v2/login", auth=False, data=b"[" * 60_000,
                                      headers={"Content-Type": "application/json"})
    assert_error(status, body, 400, 1001)
    status, body = await otad.request("POST", "/api/v2/login", auth=False, data=b"[" * 100_000,
                                      headers={"Content-Type": "application/json"})
    assert_error(status, body, 413, 1001)  # login bodies are small


async def test_upload_with_a_non_utf8_file_name_is_kept_with_a_safe_name(otad):
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="fw\xff\xfe.bin"\r\n\r\n'
    status, body = await otad.request("POST", "/api/v2/otaUpload", params={"name": "fw", "productId": "1"},
                                      data=head + b"data\r\n--B--\r\n",
                                      headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert status == 200, body
    assert body["data"]["size"] == 4 and body["data"]["fileName"].endswith(".bin")
