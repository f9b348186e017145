"""Signed commands and passive replies (issue 14, docs/signing.md), checked the way a device would:
``cryptography``'s ECDSA verify over a canonical form rebuilt by this file's own code (``canonical``
below, written from the document, not otad's ``canonical_form``), on messages that came over the
real embedded broker and the real HTTP API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from otad.errors import StartupError
from otad.model import PackageRecord
from otad.service.offers import Offers
from otad.service.signing import SignedOffers, canonical_form
from otad.signing_keys import KeyRing
from tests.conftest import free_port, make_settings, running_otad, start_otad

FIRMWARE = os.urandom(50_000)


# --- the device's side, from docs/signing.md ---

def canonical(fields: dict, unsigned: tuple[str, ...] = ()) -> bytes:
    """docs/signing.md, "The canonical form", reimplemented for the device of these tests."""
    lines: list[bytes] = []

    def add(obj: dict, prefix: str) -> None:
        for name, value in obj.items():
            if prefix == "" and (name == "sig" or name in unsigned):
                continue
            if isinstance(value, dict):
                add(value, prefix + name + ".")
                continue
            if value is None:
                text = "null"
            elif value is True:
                text = "true"
            elif value is False:
                text = "false"
            elif isinstance(value, int):
                text = "%d" % value
            else:
                escaped = "".join("\\\\" if c == "\\" else "\\n" if c == "\n" else c for c in value)
                text = f'"{escaped}"'
            lines.append(f"{prefix}{name}={text}\n".encode())

    add(fields, "")
    return b"otad-sig-v1\n" + b"".join(sorted(lines, key=lambda line: line.split(b"=", 1)[0]))


def refusal(fields: dict, keys: dict[str, ec.EllipticCurvePublicKey], device: str, now: float,
            unsigned: tuple[str, ...] = ()) -> str | None:
    """Why the device refuses the message (None: it accepts it)."""
    public_key = keys.get(fields.get("kid"))
    if public_key is None:
        return "unknown kid"
    try:
        public_key.verify(base64.b64decode(fields["sig"]), canonical(fields, unsigned), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return "bad signature"
    if fields.get("deviceName") != device:
        return "for another device"
    if not isinstance(fields.get("expires"), int) or fields["expires"] <= now:
        return "expired"
    return None


def public_keys(key_dir: Path) -> dict[str, ec.EllipticCurvePublicKey]:
    """What firmware would have baked in: every key `otad key list` calls valid, by `otad key show`."""
    listed = otad_cli(key_dir.parent, "key", "list").stdout.splitlines()
    valid = [line.split("\t")[0] for line in listed if line.split("\t")[1] in ("signing", "valid")]
    return {kid: serialization.load_pem_public_key(otad_cli(key_dir.parent, "key", "show", kid, "--format", "pem")
                                                   .stdout.encode()) for kid in valid}


def otad_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otad", *args, "--data-dir", str(data_dir)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


# --- the canonical form against fixed vectors (docs/signing.md) ---

EXAMPLE_PEM = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEcRJD8Urry8t7Cm8HKSaddOazGLYQ
ZVy3BlftQIde6vTDB7CKBWA/+fXEHtU2CoJc93kV8dgnNiSdBpW8RewYVw==
-----END PUBLIC KEY-----
"""
EXAMPLE_COMMAND = (
    '{"fileName":"5f0c2b8e-6d7a-4f5e-9c1b-2a3d4e5f6a7b.bin","version":"ae3c773e-1b8c-4388-84f1-ef5a1ea602a1",'
    '"md5":"f998981fa0c4e5036540e39b4b4df001",'
    '"sha256":"0886df25eb880ef362d06df98522c608548d5b93bba6790f6e9ac4f68306461e","size":1700,'
    '"expires":1798761600,"deviceName":"dev1","kid":"92e3101b178cae6f",'
    '"sig":"MEQCIGwExe+lVnxIQVmSpTt+Y16dvpFWpfHaDpFW0YLrnyZ3AiBVsZuqmeYd2JiqKKnH+vJf1RabMLytGVvl8/0lf605Jw=="}')
EXAMPLE_CANONICAL = (b'otad-sig-v1\n'
                     b'deviceName="dev1"\n'
                     b'expires=1798761600\n'
                     b'fileName="5f0c2b8e-6d7a-4f5e-9c1b-2a3d4e5f6a7b.bin"\n'
                     b'kid="92e3101b178cae6f"\n'
                     b'md5="f998981fa0c4e5036540e39b4b4df001"\n'
                     b'sha256="0886df25eb880ef362d06df98522c608548d5b93bba6790f6e9ac4f68306461e"\n'
                     b'size=1700\n'
                     b'version="ae3c773e-1b8c-4388-84f1-ef5a1ea602a1"\n')


def test_the_documented_example_command_has_the_documented_canonical_form_and_signature():
    fields = json.loads(EXAMPLE_COMMAND)
    assert canonical_form(fields) == EXAMPLE_CANONICAL
    assert canonical(fields) == EXAMPLE_CANONICAL
    assert hashlib.sha256(EXAMPLE_CANONICAL).hexdigest() == \
        "cf3f16bd0804dceccc2f5f5dc8aaadbfd023197942d487421f1521bddabac244"
    key = serialization.load_pem_public_key(EXAMPLE_PEM)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert hashlib.sha256(der).hexdigest()[:16] == fields["kid"]  # the kid is the key's fingerprint
    assert refusal(fields, {fields["kid"]: key}, "dev1", now=1798761599) is None
    assert refusal(fields, {fields["kid"]: key}, "dev1", now=1798761600) == "expired"
    assert refusal({**fields, "size": 1701}, {fields["kid"]: key}, "dev1", now=0) == "bad signature"


def test_the_rules_vector_nests_escapes_and_types_every_value():
    fields = {"fileName": "a.bin", "description": 'line 1\nC:\\fw "beta"', "url": "http://gw:8080/api/v2/micro/a.bin",
              "force": False, "note": None, "delta": {"size": 10, "base": "1.0"}, "ü": "é"}
    expected = (b'otad-sig-v1\n'
                b'delta.base="1.0"\n'
                b'delta.size=10\n'
                b'description="line 1\\nC:\\\\fw "beta""\n'
                b'fileName="a.bin"\n'
                b'force=false\n'
                b'note=null\n'
                b'\xc3\xbc="\xc3\xa9"\n')
    assert canonical_form(fields, frozenset({"url"})) == expected
    assert canonical(fields, ("url",)) == expected


def test_no_two_messages_share_a_canonical_form():
    # A line feed or an "=" inside a value cannot fake another field; a string is not a number.
    assert canonical_form({"a": 'x"\nb="y'}) != canonical_form({"a": "x", "b": "y"})
    assert canonical_form({"a": "x\\nb"}) != canonical_form({"a": "x\nb"})
    assert canonical_form({"size": "10"}) != canonical_form({"size": 10})
    assert canonical_form({"force": "true"}) != canonical_form({"force": True})
    for bad in ({"a=b": "c"}, {"a.b": 1}, {"a\nb": 1}, {"": 1}, {"x": 1.5}, {"x": [1]}, {"x": {}}, {"x": 2**53}):
        with pytest.raises(ValueError):
            canonical_form(bad)


def _package(**overrides) -> PackageRecord:
    fields = dict(id=1, product_id=7, name="fw", file_name="f.bin", original_name="app.bin", size=len(FIRMWARE),
                  md5=hashlib.md5(FIRMWARE).hexdigest(), sha256=hashlib.sha256(FIRMWARE).hexdigest(), version=None,
                  description=None, created_at=datetime.now(timezone.utc))
    return PackageRecord(**{**fields, **overrides})


class DeltaLike:
    """An extension registered before the signer, as the delta one is: a nested object."""

    async def extend(self, package, offers):
        for offer in offers:
            offer.fields["delta"] = {"fileName": "d.patch", "size": 321, "base": "1.0"}


async def test_the_signature_covers_what_earlier_extensions_added(tmp_path):
    keys = KeyRing(tmp_path / "keys")
    kid = keys.create().kid
    offers = Offers()
    offers.add(DeltaLike())
    offers.add(SignedOffers(keys))
    timeout = datetime.now(timezone.utc) + timedelta(hours=2)
    [command] = await offers.commands(_package(), [("dev1", "v-1", timeout)])
    fields = json.loads(command)
    assert list(fields) == ["fileName", "version", "md5", "delta", "sha256", "size", "expires", "deviceName", "kid",
                            "sig"]
    assert fields["expires"] == int(timeout.timestamp())
    public = {kid: keys.info(kid).public_key}
    assert refusal(fields, public, "dev1", time.time()) is None
    forged = {**fields, "delta": {**fields["delta"], "fileName": "evil.patch"}}
    assert refusal(forged, public, "dev1", time.time()) == "bad signature"


# --- otad key create / show / list / retire ---

def test_key_commands_create_show_list_and_retire(tmp_path):
    data = tmp_path / "data"
    empty = otad_cli(data, "key", "show")
    assert empty.returncode == 1 and "otad key create" in empty.stderr and "Traceback" not in empty.stderr
    created = otad_cli(data, "key", "create")
    assert created.returncode == 0, created.stderr
    first = created.stdout.strip()
    assert f"signing keys in {(data / 'keys').absolute()}" in created.stderr
    assert stat.S_IMODE((data / "keys" / f"{first}.pem").stat().st_mode) == 0o600
    private = serialization.load_pem_private_key((data / "keys" / f"{first}.pem").read_bytes(), None)
    assert isinstance(private.curve, ec.SECP256R1)

    shown = otad_cli(data, "key", "show")
    assert shown.returncode == 0, shown.stderr
    pem = otad_cli(data, "key", "show", "--format", "pem").stdout
    assert pem in shown.stdout and "PRIVATE" not in shown.stdout
    public = serialization.load_pem_public_key(pem.encode())
    assert public.public_numbers() == private.public_key().public_numbers()
    point = otad_cli(data, "key", "show", "--format", "hex").stdout.strip()
    assert bytes.fromhex(point) == public.public_bytes(serialization.Encoding.X962,
                                                       serialization.PublicFormat.UncompressedPoint)
    header = otad_cli(data, "key", "show", first, "--format", "c").stdout
    assert f'otad_key_{first}_kid[] = "{first}";' in header and "-----BEGIN PUBLIC KEY-----\\n" in header
    assert f"0x04, 0x{point[2:4]}" in header

    second = otad_cli(data, "key", "create").stdout.strip()
    assert second != first
    assert _listed(data) == {first: "valid", second: "signing"}
    refused = otad_cli(data, "key", "retire", second)
    assert refused.returncode == 1 and "signing key" in refused.stderr
    assert otad_cli(data, "key", "retire", "nonsense").returncode == 1
    retired = otad_cli(data, "key", "retire", first)
    assert retired.returncode == 0, retired.stderr
    assert _listed(data) == {first: "retired", second: "signing"}
    assert not (data / "keys" / f"{first}.pem").exists()  # its private key is gone
    # Its public key stays showable, for the record.
    assert serialization.load_pem_public_key(otad_cli(data, "key", "show", first, "--format", "pem")
                                             .stdout.encode()).public_numbers() == public.public_numbers()
    assert otad_cli(data, "key", "retire", first).returncode == 1


def _listed(data: Path) -> dict[str, str]:
    result = otad_cli(data, "key", "list")
    assert result.returncode == 0, result.stderr
    return {line.split("\t")[0]: line.split("\t")[1] for line in result.stdout.splitlines()}


def test_a_shared_key_directory_is_used_when_configured(tmp_path):
    shared = tmp_path / "shared-keys"
    result = subprocess.run([sys.executable, "-m", "otad", "key", "create", "--data-dir", str(tmp_path / "a"),
                             "--signing-key-dir", str(shared)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (shared / f"{result.stdout.strip()}.pem").exists() and not (tmp_path / "a" / "keys").exists()
    settings = make_settings(tmp_path / "b", **{"signing.key_dir": str(shared)})
    assert KeyRing(settings.key_dir).signing_key().kid == result.stdout.strip()


# --- the daemon with signing.enabled ---

async def _connected(otad, name: str = "dev1"):
    password = await otad.add_device(name, 7)
    device = otad.device(name, password)
    assert await device.connect() == 0
    assert await device.subscribe(f"/oc/devices/{name}/sys/ota") == [1]
    return device


async def _pushed(otad, device) -> dict:
    status, body = await otad.enable("fw", "dev1")
    assert status == 200, body
    message = await device.next_message()
    return json.loads(message.payload)


async def test_a_device_verifies_the_push_command_and_refuses_a_forged_or_expired_one(tmp_path):
    data = tmp_path / "data"
    assert otad_cli(data, "key", "create").returncode == 0
    keys = public_keys(data / "keys")
    async with running_otad(make_settings(data, **{"signing.enabled": True})) as otad:
        device = await _connected(otad)
        await otad.upload("fw", 7, FIRMWARE)
        command = await _pushed(otad, device)
        await device.close()
    assert list(command)[:3] == ["fileName", "version", "md5"]  # old devices read what they always did
    assert command["sha256"] == hashlib.sha256(FIRMWARE).hexdigest() and command["size"] == len(FIRMWARE)
    assert command["md5"] == hashlib.md5(FIRMWARE).hexdigest()
    assert abs(command["expires"] - (time.time() + 24 * 3600)) < 600  # the upgrade's timeout (default 24 h)
    now = time.time()
    assert refusal(command, keys, "dev1", now) is None
    for name, value in (("md5", "0" * 32), ("sha256", "0" * 64), ("size", 1), ("fileName", "evil.bin"),
                        ("version", "replayed"), ("expires", command["expires"] + 3600)):
        assert refusal({**command, name: value}, keys, "dev1", now) == "bad signature", name
    assert refusal(command, keys, "dev2", now) == "for another device"
    assert refusal(command, keys, "dev1", command["expires"] + 1) == "expired"
    assert refusal({**command, "kid": "0" * 16}, keys, "dev1", now) == "unknown kid"


async def test_a_device_verifies_the_passive_reply_and_its_expiry(tmp_path):
    data = tmp_path / "data"
    assert otad_cli(data, "key", "create").returncode == 0
    keys = public_keys(data / "keys")
    clock = Clock()
    settings = make_settings(data, **{"signing.enabled": True, "signing.reply_lifetime": 600})
    otad = await start_otad(settings, clock)
    try:
        await otad.add_device("dev1", 7)
        await otad.upload("fw", 7, FIRMWARE)
        pin = {"deviceName": "dev1", "name": "fw", "description": "fixes\nand more", "versionName": "1.8"}
        assert (await otad.request("POST", "/api/v2/otaPassive", json=pin))[0] == 200
        reply = await _poll(otad)
        assert list(reply)[:7] == ["fileName", "version", "md5", "description", "sha256", "size", "url"]
        assert reply["expires"] == int(clock.now.timestamp()) + 600
        now = clock.now.timestamp()
        assert refusal(reply, keys, "dev1", now, unsigned=("url",)) is None
        assert refusal({**reply, "url": "http://elsewhere/x"}, keys, "dev1", now, unsigned=("url",)) is None
        assert refusal({**reply, "version": "9.9"}, keys, "dev1", now, unsigned=("url",)) == "bad signature"
        assert refusal({**reply, "description": "fixes"}, keys, "dev1", now, unsigned=("url",)) == "bad signature"
        assert refusal(reply, keys, "dev1", reply["expires"], unsigned=("url",)) == "expired"
        assert await _poll(otad) == reply  # the same until the last minute of its life
        clock.now += timedelta(seconds=541)
        renewed = await _poll(otad)
        assert renewed["expires"] == int(clock.now.timestamp()) + 600 and renewed["sig"] != reply["sig"]
        assert refusal(renewed, keys, "dev1", reply["expires"] + 1, unsigned=("url",)) is None
    finally:
        await otad.stop()


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


async def _poll(otad) -> dict:
    status, body = await otad.request("GET", "/api/v2/otaPassiveEnable", auth=False, params={"deviceName": "dev1"})
    assert status == 200, body
    return body["data"]


async def test_rotation_signs_with_the_new_key_while_the_old_one_still_verifies(tmp_path):
    data = tmp_path / "data"
    old = otad_cli(data, "key", "create").stdout.strip()
    before_rotation = public_keys(data / "keys")
    async with running_otad(make_settings(data, **{"signing.enabled": True})) as otad:
        device = await _connected(otad)
        await otad.upload("fw", 7, FIRMWARE)
        first = await _pushed(otad, device)
        assert first["kid"] == old
        # A running daemon picks up a key made beside it (within signing.key_recheck; here at once).
        new = otad_cli(data, "key", "create").stdout.strip()
        await otad.daemon.signing_keys.reload()
        second = await _pushed(otad, device)
        await device.close()
    assert second["kid"] == new != old
    both = public_keys(data / "keys")
    assert set(both) == {old, new}
    assert refusal(second, both, "dev1", time.time()) is None
    assert refusal(first, both, "dev1", time.time()) is None  # made before, still verifies
    assert refusal(second, before_rotation, "dev1", time.time()) == "unknown kid"  # firmware not updated yet
    assert otad_cli(data, "key", "retire", old).returncode == 0
    assert set(public_keys(data / "keys")) == {new}  # no longer listed as valid


async def test_signing_enabled_without_a_key_refuses_to_start(tmp_path):
    settings = make_settings(tmp_path / "data", **{"signing.enabled": True})
    with pytest.raises(StartupError, match="otad key create"):
        async with running_otad(settings):
            pass
    result = subprocess.run([sys.executable, "-m", "otad", "serve", "--data-dir", str(tmp_path / "cli"),
                             "--signing-enabled", "--http-host", "127.0.0.1", "--http-port", str(free_port()),
                             "--mqtt-host", "127.0.0.1", "--mqtt-port", str(free_port())],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert "otad key create" in result.stderr and "Traceback" not in result.stderr


async def test_signing_disabled_sends_the_seed_command_byte_for_byte(tmp_path):
    data = tmp_path / "data"
    assert otad_cli(data, "key", "create").returncode == 0  # a key lying there changes nothing while off
    async with running_otad(make_settings(data)) as otad:
        device = await _connected(otad)
        _, body = await otad.upload("fw", 7, FIRMWARE)
        status, enabled = await otad.enable("fw", "dev1")
        message = await device.next_message()
        await device.close()
        pin = {"deviceName": "dev1", "name": "fw", "description": "d", "versionName": "1.8"}
        assert (await otad.request("POST", "/api/v2/otaPassive", json=pin))[0] == 200
        reply = await _poll(otad)
    package = body["data"]
    assert message.payload == (f'{{"fileName":"{package["fileName"]}","version":"{enabled["data"][0]["version"]}",'
                               f'"md5":"{package["md5"]}"}}').encode()
    assert list(reply) == ["fileName", "version", "md5", "description", "sha256", "size", "url"]


def test_the_documented_vectors_are_the_ones_tested():
    doc = (Path(__file__).parent.parent / "docs" / "signing.md").read_text()
    assert EXAMPLE_COMMAND in doc and EXAMPLE_CANONICAL.decode() in doc and EXAMPLE_PEM.decode() in doc


async def test_a_real_delta_object_is_covered_by_the_signature(tmp_path):
    from tests.test_delta import NEW, OLD, _build, _device_on, _upload

    data = tmp_path / "data"
    assert otad_cli(data, "key", "create").returncode == 0
    keys = public_keys(data / "keys")
    async with running_otad(make_settings(data, **{"signing.enabled": True})) as otad:
        await _upload(otad, "fw-1.0", OLD, "1.0")
        device = await _device_on(otad, "on-base", "1.0", "fw-1.0")
        new = await _upload(otad, "fw-2.0", NEW, "2.0")
        assert (await _build(otad, new["id"]))[0] == 200
        await otad.enable("fw-2.0", "on-base")
        command = json.loads((await device.next_message()).payload)
        await device.close()
    assert list(command)[:4] == ["fileName", "version", "md5", "delta"] and list(command)[-1] == "sig"
    assert command["sha256"] == hashlib.sha256(NEW).hexdigest()
    now = time.time()
    assert refusal(command, keys, "on-base", now) is None
    for name in ("fileName", "sha256", "size", "base"):
        forged = {**command, "delta": {**command["delta"], name: "1" if name != "size" else 1}}
        assert refusal(forged, keys, "on-base", now) == "bad signature", name
    without = {key: value for key, value in command.items() if key != "delta"}
    assert refusal(without, keys, "on-base", now) == "bad signature"  # the patch cannot be stripped either


async def test_a_restart_signs_the_pending_command_again_with_the_current_key(tmp_path):
    data = tmp_path / "data"
    old = otad_cli(data, "key", "create").stdout.strip()
    async with running_otad(make_settings(data, **{"signing.enabled": True})) as otad:
        password = await otad.add_device("dev1", 7)
        await otad.upload("fw", 7, FIRMWARE)
        assert (await otad.enable("fw", "dev1"))[0] == 200  # the device is offline: the command is kept
        new = otad_cli(data, "key", "create").stdout.strip()
        await otad.restart()
        device = await _subscribed(otad, password)
        command = json.loads((await device.next_message()).payload)
        await device.close()
    assert new != old
    assert_signed_by(command, new, data)


def assert_signed_by(command: dict, kid: str, data: Path) -> None:
    """``command`` (for dev1) carries ``kid`` and verifies with the keys `otad key list` calls valid."""
    assert command["kid"] == kid
    assert refusal(command, public_keys(data / "keys"), "dev1", time.time()) is None


async def test_signing_reads_no_key_file_until_the_key_directory_is_read_again(tmp_path):
    data = tmp_path / "data"
    old = otad_cli(data, "key", "create").stdout.strip()
    settings = make_settings(data, **{"signing.enabled": True, "signing.key_recheck": 3600})
    async with running_otad(settings) as otad:
        device = await _connected(otad)
        await otad.upload("fw", 7, FIRMWARE)
        assert (await _pushed(otad, device))["kid"] == old
        new = KeyRing(data / "keys").create().kid
        # Signing answers from memory: the key file changed on disk, the command did not.
        assert (await _pushed(otad, device))["kid"] == old
        assert (await otad.daemon.signing_keys.reload()).kid == new  # what the daemon's re-read does, in a thread
        command = await _pushed(otad, device)
        await device.close()
    assert new != old
    assert_signed_by(command, new, data)


async def test_the_daemon_reads_the_key_directory_again_by_itself(tmp_path):
    data = tmp_path / "data"
    old = otad_cli(data, "key", "create").stdout.strip()
    settings = make_settings(data, **{"signing.enabled": True, "signing.key_recheck": 0.1})
    async with running_otad(settings) as otad:
        new = otad_cli(data, "key", "create").stdout.strip()
        for _ in range(300):  # a bounded wait: 30 s at most
            if otad.daemon.signing_keys.signing_key().kid == new:
                break
            await asyncio.sleep(0.1)
        device = await _connected(otad)
        await otad.upload("fw", 7, FIRMWARE)
        command = await _pushed(otad, device)
        await device.close()
    assert command["kid"] == new != old


async def _subscribed(otad, password: str):
    device = otad.device("dev1", password)
    assert await device.connect() == 0
    assert await device.subscribe("/oc/devices/dev1/sys/ota") == [1]
    return device
