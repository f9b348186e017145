"""The EMQX hooks (mqtt.provisioning = http-hooks): real HTTP calls in the bodies EMQX 5's HTTP
authenticator and authorizer send with the templates of docs/emqx.md, against otad's HTTP app on a
real port, its services on a real SQLite database.

No broker is started: in this mode otad's MQTT side is its client of EMQX, which these endpoints
do not touch; what EMQX does with the answers is EMQX's.
"""

from __future__ import annotations

import contextlib

import aiohttp
from aiohttp import web

from otad.composition import admin_services
from otad.http.app import create_app
from otad.http.observe import RequestObserver
from otad.metrics import Metrics
from tests.conftest import free_port, make_settings

SECRET = "s3cr3t-from-emqx-conf"
OWN_URL = "mqtt://otad:own%20pass@127.0.0.1:1883"  # otad's account on the broker, %-encoded as in a URL


@contextlib.asynccontextmanager
async def hooks_server(tmp_path, **flags):
    """otad's HTTP app in http-hooks mode on a free port; yields (base URL, services)."""
    settings = make_settings(tmp_path / "data", **{"mqtt.mode": "external", "mqtt.external_url": OWN_URL,
                                                   "mqtt.provisioning": "http-hooks", **flags})

    async def healthy() -> dict[str, bool | str]:
        return {"database": True}

    async with admin_services(settings) as services:
        app = create_app(services, settings, RequestObserver(Metrics()), Metrics(), healthy)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        try:
            yield f"http://127.0.0.1:{port}", services
        finally:
            await runner.cleanup()


async def _call(session, url: str, body, secret: str | None = SECRET):
    """POST as EMQX does: a JSON body from the template, the secret in the configured header."""
    headers = {"X-Otad-Hook-Secret": secret} if secret is not None else {}
    async with session.post(url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as response:
        return response.status, await response.json(content_type=None)


async def test_devices_log_in_with_their_otad_password_and_use_only_their_own_topics(tmp_path):
    async with hooks_server(tmp_path, **{"mqtt.hook_secret": SECRET}) as (base, services), \
            aiohttp.ClientSession() as session:
        [dev1, _dev2] = await services.devices.add([{"deviceName": "dev-1", "productId": 1},
                                                     {"deviceName": "dev-2", "productId": 1}])
        auth, acl = f"{base}/api/v2/emqx/auth", f"{base}/api/v2/emqx/acl"

        def login(username, password):
            return {"username": username, "password": password, "clientid": f"{username}-client"}

        assert await _call(session, auth, login("dev-1", dev1.password)) == (200, {"result": "allow", "is_superuser": False})
        assert await _call(session, auth, login("dev-1", "wrong")) == (200, {"result": "deny", "is_superuser": False})
        assert await _call(session, auth, login("nobody", dev1.password)) == (200, {"result": "deny", "is_superuser": False})
        assert (await _call(session, auth, login("dev-1", None)))[1]["result"] == "deny"  # no password sent
        assert (await _call(session, auth, login("otad", "own pass")))[1]["result"] == "allow"
        assert (await _call(session, auth, login("otad", "wrong")))[1]["result"] == "deny"

        def access(username, topic, action):
            return {"username": username, "clientid": f"{username}-client", "topic": topic, "action": action}

        async def verdict(username, topic, action):
            status, body = await _call(session, acl, access(username, topic, action))
            assert status == 200
            return body["result"]

        assert await verdict("dev-1", "/oc/devices/dev-1/sys/ota", "subscribe") == "allow"
        assert await verdict("dev-1", "/oc/devices/dev-1/#", "subscribe") == "allow"
        assert await verdict("dev-1", "/oc/devices/dev-1/sys/ota/report", "publish") == "allow"
        assert await verdict("dev-1", "/oc/devices/dev-2/sys/ota", "subscribe") == "deny"
        assert await verdict("dev-1", "/oc/devices/dev-2/sys/ota/report", "publish") == "deny"
        assert await verdict("dev-1", "/oc/devices/+/sys/ota", "subscribe") == "deny"
        assert await verdict("dev-1", "#", "subscribe") == "deny"
        # Only otad publishes a device's command and the replies to its reports.
        assert await verdict("dev-1", "/oc/devices/dev-1/sys/ota", "publish") == "deny"
        assert await verdict("dev-1", "/oc/devices/dev-1/sys/ota/report_reply", "publish") == "deny"
        assert await verdict("otad", "/oc/devices/dev-2/sys/ota", "publish") == "allow"
        assert await verdict("otad", "$share/otad//oc/devices/+/sys/ota/report", "subscribe") == "allow"

        await services.devices.delete("dev-1")  # EMQX keeps the session; its topics go with the device
        assert await verdict("dev-1", "/oc/devices/dev-1/sys/ota/report", "publish") == "deny"
        assert (await _call(session, auth, login("dev-1", dev1.password)))[1]["result"] == "deny"


async def test_hook_calls_without_the_secret_are_refused(tmp_path):
    async with hooks_server(tmp_path, **{"mqtt.hook_secret": SECRET}) as (base, services), \
            aiohttp.ClientSession() as session:
        [device] = await services.devices.add({"deviceName": "dev-1", "productId": 1})
        body = {"username": "dev-1", "password": device.password, "clientid": "c"}
        for secret in (None, "", "not-the-secret"):
            status, answer = await _call(session, f"{base}/api/v2/emqx/auth", body, secret=secret)
            assert status == 403 and answer["errorCode"] == 3001, answer
            status, _ = await _call(session, f"{base}/api/v2/emqx/acl",
                                    {"username": "dev-1", "topic": "/oc/devices/dev-1/x", "action": "publish"}, secret)
            assert status == 403
        # Bounded bodies, and anything but an object is refused before it is looked at.
        status, _ = await _call(session, f"{base}/api/v2/emqx/auth", {"username": "x" * 70_000})
        assert status == 413
        status, _ = await _call(session, f"{base}/api/v2/emqx/auth", ["dev-1"])
        assert status == 400


async def test_without_a_secret_the_hooks_answer_this_machine_only(tmp_path):
    async with hooks_server(tmp_path) as (base, services), aiohttp.ClientSession() as session:
        [device] = await services.devices.add({"deviceName": "dev-1", "productId": 1})
        body = {"username": "dev-1", "password": device.password, "clientid": "c"}
        assert await _call(session, f"{base}/api/v2/emqx/auth", body, secret=None) == (
            200, {"result": "allow", "is_superuser": False})  # from 127.0.0.1
        # From another address (here 127.0.0.2, still this machine's loopback, standing in for another host).
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=connector) as elsewhere:
            status, answer = await _call(elsewhere, f"{base}/api/v2/emqx/auth", body, secret=None)
        assert status == 403 and "127.0.0.1" in answer["errorMsg"]


async def test_the_hooks_are_not_served_in_other_modes(otad):
    status, _ = await otad.request("POST", "/api/v2/emqx/auth", auth=False, json={"username": "a", "password": "b"})
    assert status == 404
