"""The C verifier of docs/signing.md (mbedTLS and cJSON, what an ESP-IDF device has), compiled from
the document itself and run on real messages from the daemon and on the documented vector."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import make_settings, running_otad
from tests.test_signing import EXAMPLE_COMMAND, EXAMPLE_PEM, FIRMWARE, _connected, _poll, _pushed, otad_cli

HARNESS = r"""
#include <stdio.h>
#include "otad_verify.c"

static char pem[4096], kid[64];
const otad_key_t otad_keys[] = { { kid, pem } };
const size_t otad_key_count = 1;

/* argv: pem-file kid device now skip|- last-version|-; the message on stdin; prints the result */
int main(int argc, char **argv)
{
    static char json[65536];
    if (argc != 7) return 100;
    FILE *f = fopen(argv[1], "r");
    if (!f) return 101;
    pem[fread(pem, 1, sizeof pem - 1, f)] = '\0';
    fclose(f);
    snprintf(kid, sizeof kid, "%s", argv[2]);
    json[fread(json, 1, sizeof json - 1, stdin)] = '\0';
    cJSON *msg = cJSON_Parse(json);
    if (!msg) return 102;
    printf("%d\n", otad_verify(msg, strcmp(argv[5], "-") ? argv[5] : NULL, argv[3], (time_t)atoll(argv[4]),
                               strcmp(argv[6], "-") ? argv[6] : NULL));
    cJSON_Delete(msg);
    return 0;
}
"""
C_RESULTS = {"ok": 0, "bad json": -1, "unknown kid": -2, "bad signature": -3, "for another device": -4, "expired": -5,
             "replayed": -6}


def _c_verifier(tmp_path: Path) -> Path:
    """docs/signing.md's otad_verify.c built with a small main; skipped where there is no compiler
    or no mbedTLS/cJSON headers (.ci/run installs them: there it fails instead)."""
    missing = [what for what in ("/usr/include/mbedtls/pk.h", "/usr/include/cjson/cJSON.h") if not Path(what).exists()]
    if missing or not shutil.which("cc"):
        if os.environ.get("CI"):
            pytest.fail(f"the C verifier needs cc, libmbedtls-dev and libcjson-dev (missing: {missing or 'cc'})")
        pytest.skip("no C compiler or mbedTLS/cJSON headers")
    doc = (Path(__file__).parent.parent / "docs" / "signing.md").read_text()
    source = doc.split("<!-- otad_verify.c: compiled by tests/test_signing_c.py -->\n```c\n", 1)[1].split("\n```", 1)[0]
    (tmp_path / "otad_verify.c").write_text(source)
    (tmp_path / "main.c").write_text(HARNESS)
    binary = tmp_path / "verify"
    built = subprocess.run(["cc", "-Wall", "-Werror", "-I/usr/include/cjson", "-o", str(binary), str(tmp_path / "main.c"),
                            "-lmbedtls", "-lmbedx509", "-lmbedcrypto", "-lcjson", "-lm"],
                           capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return binary


def c_check(binary: Path, pem: Path, kid: str, message: dict | str, device: str, now: float, skip: str | None = None,
            last_version: str | None = None) -> int:
    """otad_verify's answer on ``message`` (a dict, or the JSON text itself)."""
    text = message if isinstance(message, str) else json.dumps(message, ensure_ascii=False)
    result = subprocess.run([str(binary), str(pem), kid, device, str(int(now)), skip or "-", last_version or "-"],
                            input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


async def test_the_c_verifier_of_the_docs_accepts_real_messages_and_refuses_forged_ones(tmp_path):
    binary = _c_verifier(tmp_path)
    data = tmp_path / "data"
    kid = otad_cli(data, "key", "create").stdout.strip()
    pem = tmp_path / "key.pem"
    pem.write_text(otad_cli(data, "key", "show", "--format", "pem").stdout)
    async with running_otad(make_settings(data, **{"signing.enabled": True})) as otad:
        device = await _connected(otad)
        await otad.upload("fw", 7, FIRMWARE)
        command = await _pushed(otad, device)
        await device.close()
        pin = {"deviceName": "dev1", "name": "fw", "description": 'fixes\nC:\\path "quoted" a=b', "versionName": "1.8"}
        assert (await otad.request("POST", "/api/v2/otaPassive", json=pin))[0] == 200
        reply = await _poll(otad)
    now = time.time()
    assert c_check(binary, pem, kid, command, "dev1", now) == C_RESULTS["ok"]
    assert c_check(binary, pem, kid, {**command, "md5": "0" * 32}, "dev1", now) == C_RESULTS["bad signature"]
    assert c_check(binary, pem, kid, command, "dev2", now) == C_RESULTS["for another device"]
    assert c_check(binary, pem, kid, command, "dev1", command["expires"]) == C_RESULTS["expired"]
    assert c_check(binary, pem, kid, command, "dev1", now, last_version=command["version"]) == C_RESULTS["replayed"]
    assert c_check(binary, pem, "0" * 16, command, "dev1", now) == C_RESULTS["unknown kid"]
    # A second "version" before the signed one: a parser keeping the last would verify, one keeping
    # the first would act on the forged one. Refused as JSON, before any signature is looked at.
    twice = '{"version":"forged",' + json.dumps(command)[1:]
    assert c_check(binary, pem, kid, twice, "dev1", now) == C_RESULTS["bad json"]
    assert c_check(binary, pem, kid, json.dumps(command)[:-1] + ',"delta":{"size":1,"size":2}}', "dev1", now) == \
        C_RESULTS["bad json"]
    assert c_check(binary, pem, kid, reply, "dev1", now, skip="url") == C_RESULTS["ok"]
    assert c_check(binary, pem, kid, {**reply, "url": "http://x/y"}, "dev1", now, skip="url") == C_RESULTS["ok"]
    assert c_check(binary, pem, kid, {**reply, "description": "fixes"}, "dev1", now, skip="url") == \
        C_RESULTS["bad signature"]
    assert c_check(binary, pem, kid, reply, "dev1", now) == C_RESULTS["bad signature"]  # url is not signed
    # The fixed vectors too (the example key signed the documented command).
    example = tmp_path / "example.pem"
    example.write_bytes(EXAMPLE_PEM)
    fields = json.loads(EXAMPLE_COMMAND)
    assert c_check(binary, example, fields["kid"], fields, "dev1", 1798761599) == C_RESULTS["ok"]
    assert c_check(binary, example, fields["kid"], {**fields, "size": 1701}, "dev1", 0) == C_RESULTS["bad signature"]
