"""mqtt.provisioning = mosquitto-dynsec: device accounts on mosquitto 2 through its dynamic-security
plugin, driven over ``$CONTROL/dynamic-security/v1`` (https://mosquitto.org/documentation/dynamic-security/).

Each device gets a client (username = device name, the password otad just generated) and a role
of its own, ``otad-device-NAME``, that lets it use only ``/oc/devices/NAME/#`` and never publish
on the topics only otad publishes on (its command, the replies to its reports, its firmware
chunks). A role per device because mosquitto 2.0's dynsec ACLs match topics literally: no ``%u``
substitution.

otad's own account (``mqtt.external_url``) needs the ACLs in ``OTAD_ACCOUNT_ACLS`` plus the
dynsec admin role that ``mosquitto_ctrl dynsec init`` creates (or ``$CONTROL/dynamic-security/#``).

The requests go over a connection of their own (clean session, a random client id), not otad's
persistent one, so an answer never waits in a session for a process that has gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterable

from otad.mqtt.client import BrokerAddress, ClientConnection, Message
from otad.mqtt.external import CHUNK_SUBSCRIPTION, REPORT_SUBSCRIPTION
from otad.mqtt.topics import DEVICE_ROOT, OTA_CHUNK_REQUEST, OTA_CHUNK_RESPONSE, OTA_COMMAND, OTA_REPORT, OTA_REPORT_REPLY
from otad.service.ports import ProvisioningFailed

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
_BATCH = 100  # commands per control message: a few kB each way
_ALL_DEVICES = DEVICE_ROOT.format(device="+")

# What otad's own account must be allowed (besides $CONTROL/dynamic-security/#): publish commands
# and replies, receive every device's reports through the shared subscription; the same for firmware
# chunks (docs/chunks.md): requests in, chunks out.
OTAD_ACCOUNT_ACLS = [
    {"acltype": "publishClientSend", "topic": OTA_COMMAND.format(device="+"), "allow": True},
    {"acltype": "publishClientSend", "topic": OTA_REPORT_REPLY.format(device="+"), "allow": True},
    {"acltype": "subscribePattern", "topic": OTA_REPORT.format(device="+"), "allow": True},
    {"acltype": "subscribePattern", "topic": REPORT_SUBSCRIPTION, "allow": True},
    {"acltype": "publishClientReceive", "topic": OTA_REPORT.format(device="+"), "allow": True},
    {"acltype": "publishClientSend", "topic": OTA_CHUNK_RESPONSE.format(device="+"), "allow": True},
    {"acltype": "subscribePattern", "topic": OTA_CHUNK_REQUEST.format(device="+"), "allow": True},
    {"acltype": "subscribePattern", "topic": CHUNK_SUBSCRIPTION, "allow": True},
    {"acltype": "publishClientReceive", "topic": OTA_CHUNK_REQUEST.format(device="+"), "allow": True},
]


def device_role(name: str) -> str:
    return f"otad-device-{name}"


def device_acls(name: str) -> list[dict]:
    """The device's own topics, and nobody else's; the server-only topics denied first."""
    root = DEVICE_ROOT.format(device=name) + "/#"
    denied = [{"acltype": "publishClientSend", "topic": topic.format(device=name), "allow": False, "priority": 10}
              for topic in (OTA_COMMAND, OTA_REPORT_REPLY, OTA_CHUNK_RESPONSE)]
    return denied + [{"acltype": kind, "topic": root, "allow": True, "priority": 0}
                     for kind in ("publishClientSend", "publishClientReceive", "subscribePattern",
                                  "unsubscribePattern")]


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class DynsecProvisioner:
    """``DeviceCredentials`` on mosquitto's dynamic-security plugin. The connection opens on first
    use and is opened again after it drops."""

    def __init__(self, external_url: str, timeout: float = 10.0) -> None:
        self._address = BrokerAddress.from_url(external_url)
        self._timeout = timeout
        self._connection: ClientConnection | None = None
        self._lock = asyncio.Lock()
        self._answers: dict[str, asyncio.Future[dict]] = {}

    async def _open(self) -> ClientConnection:
        async with self._lock:
            if self._connection is not None and self._connection.is_open:
                return self._connection
            where = self._address.describe()
            try:
                connection = await ClientConnection.open(
                    self._address, f"otad-dynsec-{uuid.uuid4().hex[:12]}", clean_session=True, keepalive=60,
                    on_message=self._answered, timeout=self._timeout)
            except Exception as exc:
                raise ProvisioningFailed(f"失败: cannot reach the MQTT broker {where} to provision devices: "
                                         f"{exc or type(exc).__name__}") from None
            try:
                codes = await asyncio.wait_for(connection.subscribe([(RESPONSE_TOPIC, 1)]), self._timeout)
            except Exception as exc:
                connection.abort()
                raise ProvisioningFailed(f"失败: MQTT broker {where}: {exc or type(exc).__name__}") from None
            if codes[0] == 0x80:
                await connection.close()
                raise ProvisioningFailed(f"失败: the account of mqtt.external_url may not use {CONTROL_TOPIC} on "
                                         f"{where} (give it the dynsec admin role)")
            self._connection = connection
            return connection

    def _answered(self, message: Message) -> None:
        message.ack()
        try:
            responses = json.loads(message.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("an unreadable dynamic-security response: %r", message.payload[:200])
            return
        for response in responses:
            future = self._answers.get(str(response.get("correlationData")))
            if future is not None and not future.done():
                future.set_result(response)

    async def _execute(self, commands: list[dict]) -> list[dict]:
        """Send ``commands`` in one control message; the plugin's answer to each, in order."""
        connection = await self._open()
        loop = asyncio.get_running_loop()
        tags = [uuid.uuid4().hex for _ in commands]
        futures = [loop.create_future() for _ in commands]
        self._answers.update(zip(tags, futures))
        body = json.dumps({"commands": [{**command, "correlationData": tag}
                                        for command, tag in zip(commands, tags)]}).encode()
        try:
            await asyncio.wait_for(connection.publish(CONTROL_TOPIC, body, qos=1), self._timeout)
            return await asyncio.wait_for(asyncio.gather(*futures), self._timeout)
        except (TimeoutError, ConnectionError) as exc:
            connection.abort()
            raise ProvisioningFailed(f"失败: no answer from the dynamic-security plugin of {self._address.describe()} "
                                     f"({exc or type(exc).__name__}); is it loaded?") from None
        finally:
            for tag in tags:
                self._answers.pop(tag, None)

    async def _run(self, commands: list[dict], tolerated: tuple[str, ...] = ()) -> list[dict]:
        """Execute; an error other than ``tolerated`` ones is ProvisioningFailed naming it."""
        answers = await self._execute(commands)
        for command, answer in zip(commands, answers):
            error = answer.get("error")
            if error and not any(word in error for word in tolerated):
                who = command.get("username") or command.get("rolename")
                raise ProvisioningFailed(f"失败: mosquitto-dynsec {command['command']} {who}: {error}")
        return answers

    async def provision(self, devices: list[tuple[str, str]]) -> None:
        """Give each (name, password) a broker account with its role; an existing account gets the
        new password (a reset, or a device added again)."""
        for chunk in _chunks(devices, _BATCH // 2):
            commands = []
            for name, password in chunk:
                commands.append({"command": "createRole", "rolename": device_role(name), "acls": device_acls(name)})
                commands.append({"command": "createClient", "username": name, "password": password,
                                 "roles": [{"rolename": device_role(name)}]})
            answers = await self._run(commands, tolerated=("already exists",))
            existing = [pair for pair, answer in zip(chunk, answers[1::2]) if answer.get("error")]
            if existing:
                # A reset (or a device added again): modifyClient sets the password and the role list
                # in one command (addClientRole of a role the client has is an "Internal error" in 2.0).
                await self._run([{"command": "modifyClient", "username": name, "password": password,
                                  "roles": [{"rolename": device_role(name)}]} for name, password in existing])
        if devices:
            log.info("mosquitto-dynsec: provisioned %d device account(s)", len(devices))

    async def revoke(self, name: str) -> None:
        """Delete the device's account (mosquitto disconnects it) and its role; gone already is fine."""
        await self._run([{"command": "deleteClient", "username": name},
                         {"command": "deleteRole", "rolename": device_role(name)}], tolerated=("not found",))
        log.info("mosquitto-dynsec: removed the account of device %s", name)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
