"""Who may connect to the embedded broker, and which topics each client may use."""

from __future__ import annotations

import logging
from enum import StrEnum

from otad.mqtt.topics import is_own_topic, is_server_only
from otad.service.devices import DeviceRegistry

log = logging.getLogger(__name__)


class Verdict(StrEnum):
    DEVICE = "device"        # a registered device, confined to its own topics
    ANONYMOUS = "anonymous"  # lab mode only: no credentials, no topic limits
    REFUSED = "refused"


class CertificateLogin:
    """Stands in a CONNECT's password on the client-certificate listener: the client's verified
    certificate names ``device``. Built only by otad from the TLS session, never from packet bytes."""

    __slots__ = ("device",)

    def __init__(self, device: str) -> None:
        self.device = device


class AccessPolicy:
    def __init__(self, devices: DeviceRegistry, allow_anonymous: bool) -> None:
        self._devices = devices
        self._allow_anonymous = allow_anonymous

    async def authenticate(self, username: str | None, password: str | bytes | CertificateLogin | None) -> Verdict:
        if isinstance(password, CertificateLogin):
            # The certificate's CN is the device name; a different username is refused, not tried.
            if username and username == password.device and await self._devices.is_registered(username):
                return Verdict.DEVICE
            return Verdict.REFUSED
        if not username:
            if self._allow_anonymous and password is None:
                return Verdict.ANONYMOUS
            return Verdict.REFUSED
        if await self._devices.check_mqtt_login(username, password):
            return Verdict.DEVICE
        return Verdict.REFUSED

    @staticmethod
    def may_use(verdict: Verdict | None, username: str | None, topic: str) -> bool:
        """Subscribe, publish and receive share one rule: a device only ever touches its own topics."""
        if verdict == Verdict.ANONYMOUS:
            return True
        return verdict == Verdict.DEVICE and bool(username) and is_own_topic(username, topic)

    @classmethod
    def may_publish(cls, verdict: Verdict | None, username: str | None, topic: str) -> bool:
        """Publishing (and wills) additionally excludes the device's server-only topics."""
        if verdict == Verdict.DEVICE and username and is_server_only(username, topic):
            return False
        return cls.may_use(verdict, username, topic)
