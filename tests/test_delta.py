"""Delta updates (issue 14): detools patches between a product's packages, built through the API, the
CLI or in the background, applied with detools to the base bytes, offered to the devices that run
the base (push command, passive reply, xiaozhi check) and deleted with their packages."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import random
import struct

import detools

from tests.conftest import make_settings, running_otad
from tests.helpers import assert_error
from tests.test_client_cli import run_cli
from tests.test_lifecycle import COMMAND, REPLY, _report
from tests.test_xiaozhi import MAC, activate_board, board_body, board_headers

PRODUCT = 5


def esp_image(version: str, code: bytes, elf_sha256: bytes = b"\x11" * 32) -> bytes:
    """An ESP-IDF-like app image: image header (0xE9), a segment header, the app descriptor
    (version, ELF hash), then ``code``."""
    header = bytes([0xE9, 3, 2, 0x20]) + b"\0" * 20
    desc = struct.pack("<III", 0xABCD5432, 0, 0) + b"\0" * 4 + version.encode().ljust(32, b"\0")
    desc += b"xiaozhi".ljust(32, b"\0") + b"10:00:00".ljust(16, b"\0") + b"Jun  1 2025".ljust(16, b"\0")
    desc += b"v5.4".ljust(32, b"\0") + elf_sha256 + b"\0" * 80
    return header + struct.pack("<II", 0x3F400020, len(desc)) + desc + code


def firmware_pair(size: int = 96 * 1024, seed: int = 1) -> tuple[bytes, bytes]:
    """Code-like bytes and a new version of it: a few patched words, an inserted function (the
    rest shifts), a changed string table."""
    rng = random.Random(seed)
    words = [rng.choice([0x00000000, 0x4000_0000 + rng.randrange(4096) * 4, rng.getrandbits(32)])
             for _ in range(size // 4)]
    old = struct.pack(f"<{len(words)}I", *words) + b"strings: version 1.0 built by ci\0" * 64
    new_words = list(words)
    for _ in range(40):
        index = rng.randrange(len(new_words))
        new_words[index] ^= 0x1000
    cut = len(new_words) // 3
    new_words[cut:cut] = [rng.getrandbits(32) for _ in range(300)]  # a new function
    new = struct.pack(f"<{len(new_words)}I", *new_words) + b"strings: version 2.0 built by ci\0" * 64
    return old, new


OLD, NEW = firmware_pair()


def applied(base: bytes, patch: bytes) -> bytes:
    out = io.BytesIO()
    detools.apply_patch(io.BytesIO(base), io.BytesIO(patch), out)
    return out.getvalue()


async def _upload(otad, name: str, content: bytes, version: str | None = "1.0", product_id: int = PRODUCT) -> dict:
    params = {"version": version} if version else {}
    status, body = await otad.upload(name, product_id, content, **params)
    assert status == 200, body
    return body["data"]


async def _build(otad, package_id, base=None):
    params = {"id": str(package_id), **({"base": str(base)} if base is not None else {})}
    return await otad.request("POST", "/api/v2/otaDelta", params=params)


async def _download(otad, file_name: str) -> bytes:
    async with otad.session.get(f"{otad.url}/api/v2/micro/{file_name}") as response:
        assert response.status == 200
        return await response.read()


async def _device_on(otad, name: str, version: str, base_package: str):
    """A real MQTT device that installed ``base_package`` and reported running ``version``."""
    password = await otad.add_device(name, PRODUCT)
    device = otad.device(name, password)
    assert await device.connect() == 0
    assert await device.subscribe(COMMAND.format(name)) == [1]
    assert await device.subscribe(REPLY.format(name)) == [1]
    status, body = await otad.enable(base_package, name)
    assert status == 200, body
    command = json.loads((await device.next_message()).payload)
    reply = await _report(device, name, version=command["version"], status="updated", currentVersion=version)
    assert reply["accepted"] is True
    return device


async def test_a_patch_built_through_the_api_rebuilds_the_new_image_exactly(otad):
    base = await _upload(otad, "fw-1.0", OLD, "1.0")
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    status, body = await _build(otad, new["id"])
    assert status == 200, body
    [outcome] = body["data"]
    patch = outcome["patch"]
    assert (outcome["baseOtaId"], outcome["base"], patch["otaId"], patch["compression"]) == (
        base["id"], "1.0", new["id"], "heatshrink")
    patch_bytes = await _download(otad, patch["fileName"])
    assert len(patch_bytes) == patch["size"] < len(NEW) // 4
    assert hashlib.sha256(patch_bytes).hexdigest() == patch["sha256"]
    assert hashlib.md5(patch_bytes).hexdigest() == patch["md5"]
    assert hashlib.sha256(applied(OLD, patch_bytes)).hexdigest() == hashlib.sha256(NEW).hexdigest()
    # What esp_delta_ota's detools C code takes: sequential, heatshrink with window 8 / lookahead 7.
    kind, info = detools.patch_info(io.BytesIO(patch_bytes))
    assert (kind, info[1], info[2]) == ("sequential", "heatshrink", {"window-sz2": 8, "lookahead-sz2": 7})
    _, listed = await otad.request("GET", "/api/v2/otaDelta", params={"id": str(new["id"])})
    assert [p["fileName"] for p in listed["data"]] == [patch["fileName"]]
    assert otad.db_rows("delta_patch") == 1


async def test_a_device_on_the_base_version_gets_the_delta_after_the_seed_keys(otad):
    await _upload(otad, "fw-1.0", OLD, "1.0")
    on_base = await _device_on(otad, "on-base", "1.0", "fw-1.0")
    elsewhere = await _device_on(otad, "elsewhere", "0.9", "fw-1.0")
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    [outcome] = (await _build(otad, new["id"]))[1]["data"]
    patch = outcome["patch"]

    await otad.enable("fw-2.0", "on-base")
    command = json.loads((await on_base.next_message()).payload)
    assert list(command)[:3] == ["fileName", "version", "md5"]
    assert (command["fileName"], command["md5"]) == (new["fileName"], new["md5"])
    assert command["delta"] == {"fileName": patch["fileName"], "md5": patch["md5"], "sha256": patch["sha256"],
                                "size": patch["size"], "base": "1.0"}
    assert applied(OLD, await _download(otad, command["delta"]["fileName"])) == NEW

    await otad.enable("fw-2.0", "elsewhere")
    other = json.loads((await elsewhere.next_message()).payload)
    assert list(other)[:3] == ["fileName", "version", "md5"] and "delta" not in other
    for device in (on_base, elsewhere):
        await device.close()


async def test_the_passive_reply_carries_the_delta_for_the_base_version_only(otad):
    await _upload(otad, "fw-1.0", OLD, "1.0")
    on_base = await _device_on(otad, "on-base", "1.0", "fw-1.0")
    elsewhere = await _device_on(otad, "elsewhere", "3.1", "fw-1.0")
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    [outcome] = (await _build(otad, new["id"]))[1]["data"]
    for name in ("on-base", "elsewhere"):
        status, body = await otad.request("POST", "/api/v2/otaPassive", json={
            "deviceName": name, "name": "fw-2.0", "description": "d", "versionName": "2.0"})
        assert status == 200, body
    _, body = await otad.request("GET", "/api/v2/otaPassiveEnable", auth=False, params={"deviceName": "on-base"})
    data = body["data"]
    assert list(data)[:3] == ["fileName", "version", "md5"]
    assert (data["fileName"], data["version"], data["md5"]) == (new["fileName"], "2.0", new["md5"])
    assert data["delta"]["fileName"] == outcome["patch"]["fileName"] and data["delta"]["base"] == "1.0"
    _, body = await otad.request("GET", "/api/v2/otaPassiveEnable", auth=False, params={"deviceName": "elsewhere"})
    assert "delta" not in body["data"] and body["data"]["fileName"] == new["fileName"]
    for device in (on_base, elsewhere):
        await device.close()


async def test_a_cached_passive_reply_gains_the_delta_once_the_patch_is_built(otad):
    await _upload(otad, "fw-1.0", OLD, "1.0")
    device = await _device_on(otad, "on-base", "1.0", "fw-1.0")
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    await otad.request("POST", "/api/v2/otaPassive", json={"deviceName": "on-base", "name": "fw-2.0",
                                                            "description": "d", "versionName": "2.0"})
    _, before = await otad.request("GET", "/api/v2/otaPassiveEnable", auth=False, params={"deviceName": "on-base"})
    assert "delta" not in before["data"]
    await _build(otad, new["id"])
    _, after = await otad.request("GET", "/api/v2/otaPassiveEnable", auth=False, params={"deviceName": "on-base"})
    assert after["data"]["delta"]["base"] == "1.0"
    await device.close()


async def test_the_cli_builds_patches_from_the_latest_earlier_packages(otad):
    await _upload(otad, "fw-1.0", OLD, "1.0")
    middle = await _upload(otad, "fw-1.5", OLD[:-100] + b"1.5", "1.5")
    await _upload(otad, "unversioned", OLD + b"x", None)
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    result = await asyncio.to_thread(run_cli, otad, "package", "delta", str(new["id"]), "--json")
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)
    assert [(o["base"], o["patch"] is not None) for o in outcomes] == [(None, False), ("1.5", True), ("1.0", True)]
    assert "no version" in outcomes[0]["note"]
    for outcome, base in zip(outcomes[1:], (middle["id"], middle["id"] - 1)):
        assert outcome["baseOtaId"] == base
    text = await asyncio.to_thread(run_cli, otad, "package", "delta", str(new["id"]), "--base", str(middle["id"]))
    assert text.returncode == 0, text.stderr
    assert f"from package {middle['id']} (1.5): " in text.stdout
    assert otad.db_rows("delta_patch") == 2  # built again from 1.5: replaced, not added
    failed = await asyncio.to_thread(run_cli, otad, "package", "delta", "999")
    assert failed.returncode == 1 and "no package with id 999" in failed.stderr


async def test_auto_mode_builds_in_the_background_after_the_upload_answered(tmp_path):
    old, new_image = firmware_pair(size=2 * 1024**2, seed=7)  # big enough to take a while to build
    async with running_otad(make_settings(tmp_path / "data", **{"firmware.auto_delta": True})) as otad:
        await _upload(otad, "fw-1.0", old, "1.0")
        new = await _upload(otad, "fw-2.0", new_image, "2.0")
        assert otad.db_rows("delta_patch") == 0  # the upload answered before the patch existed
        for _ in range(400):
            _, listed = await otad.request("GET", "/api/v2/otaDelta", params={"id": str(new["id"])})
            if listed["data"]:
                break
            await asyncio.sleep(0.1)
        [patch] = listed["data"]
        assert patch["base"] == "1.0"
        assert applied(old, await _download(otad, patch["fileName"])) == new_image


async def test_deleting_a_package_deletes_its_patches_and_those_from_it(otad):
    first = await _upload(otad, "fw-1.0", OLD, "1.0")
    second = await _upload(otad, "fw-2.0", NEW, "2.0")
    third = await _upload(otad, "fw-3.0", NEW + b"three", "3.0")
    await _build(otad, second["id"])
    await _build(otad, third["id"], base=second["id"])
    _, listed = await otad.request("GET", "/api/v2/otaDelta")
    files = [p["fileName"] for p in listed["data"]]
    assert len(files) == 2 and set(files) <= set(otad.firmware_files())

    status, _ = await otad.request("DELETE", "/api/v2/otaDelete", params={"id": str(second["id"])})
    assert status == 200
    assert otad.db_rows("delta_patch") == 0  # its own (from 1.0) and the one from it (to 3.0)
    assert not set(files) & set(otad.firmware_files())
    assert sorted(otad.firmware_files()) == sorted([first["fileName"], third["fileName"]])
    async with otad.session.get(f"{otad.url}/api/v2/micro/{files[0]}") as response:
        assert response.status == 404


async def test_patches_survive_a_restart(otad):
    await _upload(otad, "fw-1.0", OLD, "1.0")
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    [outcome] = (await _build(otad, new["id"]))[1]["data"]
    await otad.restart()  # the start sweeps files no row references: patches are referenced
    assert outcome["patch"]["fileName"] in otad.firmware_files()


async def test_bad_input_gets_the_envelope_error(otad):
    status, body = await _build(otad, 999)
    assert_error(status, body, 404, 1001)
    status, body = await otad.request("POST", "/api/v2/otaDelta")
    assert_error(status, body, 400, 1004)
    status, body = await otad.request("POST", "/api/v2/otaDelta", params={"id": "x"})
    assert_error(status, body, 400, 1003)
    first = await _upload(otad, "fw-1.0", OLD, "1.0")
    status, body = await _build(otad, first["id"])
    assert_error(status, body, 400, 1001)
    assert "no package before" in body["errorMsg"]
    status, body = await _build(otad, first["id"], base=first["id"])
    assert_error(status, body, 400, 1001)
    unversioned = await _upload(otad, "plain", OLD + b"!", None)
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    status, body = await _build(otad, new["id"], base=unversioned["id"])
    assert_error(status, body, 400, 1001)
    other = await _upload(otad, "other-product", OLD, "1.0", product_id=PRODUCT + 1)
    status, body = await _build(otad, new["id"], base=other["id"])
    assert_error(status, body, 400, 1001)
    status, body = await _build(otad, new["id"], base=12345)
    assert_error(status, body, 404, 1001)
    assert otad.db_rows("delta_patch") == 0


async def _board_check(otad, version: str, elf: str):
    body = board_body(version=version)
    body["application"]["elf_sha256"] = elf
    async with otad.session.post(otad.url + "/xiaozhi/ota/", json=body, headers=board_headers(version=version)) as r:
        assert r.status == 200
        return (await r.json())["firmware"]


async def test_a_xiaozhi_board_is_offered_the_delta_by_version_or_by_elf_hash(otad):
    await otad.add_device(MAC, 9)
    await activate_board(otad)
    elf = bytes(range(32))
    # The base has no package version: its app descriptor says 1.9.2 and gives its ELF hash.
    base = await _upload(otad, "xiaozhi-1.9.2", esp_image("1.9.2", OLD, elf), None, product_id=9)
    new = await _upload(otad, "xiaozhi-1.9.3", esp_image("1.9.3", NEW), "1.9.3", product_id=9)
    [outcome] = (await _build(otad, new["id"]))[1]["data"]
    assert (outcome["baseOtaId"], outcome["base"]) == (base["id"], "1.9.2")
    await otad.request("POST", "/api/v2/xiaozhi/otaPassive", json={"otaId": new["id"], "productId": 9,
                                                                    "versionName": "1.9.3"})
    firmware = await _board_check(otad, "1.9.2", "")  # no ELF hash given: matched by its version
    assert firmware["version"] == "1.9.3" and firmware["url"].endswith(new["fileName"])
    assert firmware["delta"]["fileName"] == outcome["patch"]["fileName"] and firmware["delta"]["base"] == "1.9.2"
    # Version 1.9.2, but the board says it runs another build than the base: no patch for it.
    other_build = await _board_check(otad, "1.9.2", "ab" * 32)
    assert other_build == {"version": "1.9.3", "url": firmware["url"]}
    assert (await _board_check(otad, "1.9.2", elf.hex().upper()))["delta"] == firmware["delta"]
    patch = await _download(otad, firmware["delta"]["fileName"])
    assert applied(esp_image("1.9.2", OLD, elf), patch) == esp_image("1.9.3", NEW)
    by_elf = await _board_check(otad, "1.9.1", elf.hex())
    assert by_elf["delta"]["fileName"] == outcome["patch"]["fileName"]
    plain = await _board_check(otad, "1.9.1", "cd" * 32)
    assert plain == {"version": "1.9.3", "url": firmware["url"]}  # an old board sees what it always did


async def test_no_patch_is_offered_for_a_version_that_names_two_images(otad):
    """A rebuilt "1.0" (other bytes, same version string): a device on "1.0" may run either, and a
    patch applied to the other image would write garbage, so no device on "1.0" gets one."""
    first = await _upload(otad, "fw-1.0", OLD, "1.0")
    device = await _device_on(otad, "on-1.0", "1.0", "fw-1.0")
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    [outcome] = (await _build(otad, new["id"], base=first["id"]))[1]["data"]
    assert outcome["patch"] is not None
    rebuilt = await _upload(otad, "fw-1.0-rebuilt", OLD[:-64] + b"r" * 64, "1.0")

    await otad.enable("fw-2.0", "on-1.0")
    command = json.loads((await device.next_message()).payload)
    assert command["fileName"] == new["fileName"] and "delta" not in command
    await otad.request("POST", "/api/v2/otaPassive", json={"deviceName": "on-1.0", "name": "fw-2.0",
                                                            "description": "d", "versionName": "2.0"})
    _, reply = await otad.request("GET", "/api/v2/otaPassiveEnable", auth=False, params={"deviceName": "on-1.0"})
    assert reply["data"]["fileName"] == new["fileName"] and "delta" not in reply["data"]
    # Nor is one built from either of them.
    status, body = await _build(otad, new["id"], base=rebuilt["id"])
    assert_error(status, body, 400, 1001)
    assert "version 1.0" in body["errorMsg"]
    _, body = await _build(otad, new["id"])
    [again] = body["data"]  # the earlier package only (the rebuilt one came after fw-2.0)
    assert (again["baseOtaId"], again["patch"]) == (first["id"], None) and "differ" in again["note"]
    await device.close()


async def test_no_patch_is_built_from_a_base_with_the_targets_version(otad):
    base = await _upload(otad, "fw-2.0-rc", OLD, "2.0")
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    status, body = await _build(otad, new["id"], base=base["id"])
    assert_error(status, body, 400, 1001)
    assert "version of package" in body["errorMsg"]
    [outcome] = (await _build(otad, new["id"]))[1]["data"]
    assert outcome["patch"] is None and "may run either" in outcome["note"]
    assert otad.db_rows("delta_patch") == 0


async def _pin_and_poll(otad, device_name: str, package: str | None = None) -> dict:
    if package is not None:
        status, body = await otad.request("POST", "/api/v2/otaPassive", json={
            "deviceName": device_name, "name": package, "description": "d", "versionName": "2.0"})
        assert status == 200, body
    status, body = await otad.request("GET", "/api/v2/otaPassiveEnable", auth=False,
                                      params={"deviceName": device_name})
    assert status == 200, body
    return body["data"]


async def test_a_cached_passive_reply_drops_the_delta_once_the_device_reports_another_version(otad):
    await _upload(otad, "fw-1.0", OLD, "1.0")
    await _upload(otad, "fw-1.5", OLD[:-100] + b"1.5", "1.5")
    device = await _device_on(otad, "moving", "1.0", "fw-1.0")
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    await _build(otad, new["id"], base=1)
    assert (await _pin_and_poll(otad, "moving", "fw-2.0"))["delta"]["base"] == "1.0"
    assert (await _pin_and_poll(otad, "moving"))["delta"]["base"] == "1.0"  # cached
    status, body = await otad.enable("fw-1.5", "moving")  # the device moves on to 1.5 meanwhile
    assert status == 200, body
    command = json.loads((await device.next_message()).payload)
    reply = await _report(device, "moving", version=command["version"], status="updated", currentVersion="1.5")
    assert reply["accepted"] is True
    reply = await _pin_and_poll(otad, "moving")
    assert reply["fileName"] == new["fileName"] and "delta" not in reply  # the patch is from 1.0
    await device.close()


async def test_deleting_the_base_package_drops_the_delta_from_cached_passive_replies(otad):
    base = await _upload(otad, "fw-1.0", OLD, "1.0")
    device = await _device_on(otad, "on-base", "1.0", "fw-1.0")
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    await _build(otad, new["id"])
    patch_file = (await _pin_and_poll(otad, "on-base", "fw-2.0"))["delta"]["fileName"]
    status, _ = await otad.request("DELETE", "/api/v2/otaDelete", params={"id": str(base["id"])})
    assert status == 200
    reply = await _pin_and_poll(otad, "on-base")
    assert reply["fileName"] == new["fileName"] and "delta" not in reply
    async with otad.session.get(f"{otad.url}/api/v2/micro/{patch_file}") as response:
        assert response.status == 404
    await device.close()


async def test_building_again_without_naming_the_base_keeps_the_patch_built_before(otad):
    await _upload(otad, "fw-1.0", OLD, "1.0")
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    [first] = (await _build(otad, new["id"]))[1]["data"]
    [again] = (await _build(otad, new["id"]))[1]["data"]  # as auto mode after an on-demand build
    assert again["patch"]["fileName"] == first["patch"]["fileName"] and "built before" in again["note"]
    [named] = (await _build(otad, new["id"], base=first["baseOtaId"]))[1]["data"]
    assert named["patch"]["fileName"] != first["patch"]["fileName"]  # a base named: built again
    assert otad.db_rows("delta_patch") == 1


async def test_downloads_of_names_that_are_no_patch_do_not_query_the_patches(otad, caplog):
    """Anyone may ask for any well-formed name: after the first, those are answered from the set
    of patch names (the database client logs each query it sends)."""
    await _upload(otad, "fw-1.0", OLD, "1.0")
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    [outcome] = (await _build(otad, new["id"]))[1]["data"]
    with caplog.at_level(logging.DEBUG, logger="tortoise.db_client"):
        for index in range(20):
            async with otad.session.get(f"{otad.url}/api/v2/micro/{index:08x}-0000-4000-8000-000000000000.patch") as r:
                assert r.status == 404
        assert await _download(otad, outcome["patch"]["fileName"])  # a patch is still found
    queries = [r.getMessage() for r in caplog.records if "delta_patch" in r.getMessage()]
    assert 1 <= len(queries) <= 3, queries
