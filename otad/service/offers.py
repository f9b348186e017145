"""What a device is told to install: the push command and the passive reply, built in one place.

Every offer starts with the seed's keys in the seed's order (``fileName``, ``version``, ``md5``):
devices in the field parse exactly those. Optional features (a delta patch from the version the
device runs, a signature) add keys after them through ``OfferExtension``s, applied in the order
they were added: one that signs must come last, so it covers what the others added.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from otad.model import PackageRecord, PassivePinRecord

# Where the passive reply's download URL goes: the transport fills it in per request (its base may
# come from the request's Host header), so no extension may rely on its value.
URL = "url"


def ota_command(file_name: str, version: str, md5: str, extra: dict[str, Any] | None = None) -> bytes:
    """The command devices already parse: compact JSON, the seed's keys first in exactly this order,
    then any extra keys (old devices ignore them)."""
    fields: dict[str, Any] = {"fileName": file_name, "version": version, "md5": md5}
    if extra:
        fields.update((key, value) for key, value in extra.items() if key not in fields)
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Offer:
    """One device's offer being built: ``fields`` in the order they go out.

    ``expires_at``: until when the offer may be acted on (a push command: its upgrade's timeout; a
    passive reply: None, an extension that needs an expiry chooses one); ``current_version``: what the
    device reported it runs, when the transport knows it better than the registry (a xiaozhi check)."""

    device_name: str
    fields: dict[str, Any]
    expires_at: datetime | None = None
    current_version: str | None = None
    unsigned: frozenset[str] = field(default_factory=frozenset)  # keys a signature must leave out (a per-request URL)


class OfferExtension(Protocol):
    async def extend(self, package: PackageRecord, offers: list[Offer]) -> None:
        """Add keys to each offer of ``package`` (one call for a whole campaign step: batch the lookups)."""


class Offers:
    def __init__(self) -> None:
        self._extensions: list[OfferExtension] = []

    def add(self, extension: OfferExtension) -> None:
        self._extensions.append(extension)

    async def extend(self, package: PackageRecord, offers: list[Offer]) -> list[Offer]:
        for extension in self._extensions:
            await extension.extend(package, offers)
        return offers

    async def commands(self, package: PackageRecord, upgrades: list[tuple[str, str, datetime | None]]) -> list[bytes]:
        """The push command of each (device name, upgrade version, timeout) for ``package``."""
        offers = [Offer(device, {"fileName": package.file_name, "version": version, "md5": package.md5},
                        expires_at=timeout_at) for device, version, timeout_at in upgrades]
        await self.extend(package, offers)
        return [ota_command(package.file_name, offer.fields["version"], package.md5, offer.fields) for offer in offers]

    async def passive(self, pin: PassivePinRecord, current_version: str | None = None) -> Offer:
        """The passive reply for ``pin``: the seed's keys, then what the reply always had (description,
        sha256, size, the download ``url``), then the extensions' keys. ``current_version``: what the
        device reported it runs, when the caller knows it."""
        package = pin.package
        offer = Offer(pin.device_name, {"fileName": package.file_name, "version": pin.version_name, "md5": package.md5,
                                        "description": pin.description, "sha256": package.sha256,
                                        "size": package.size, URL: None},
                      current_version=current_version, unsigned=frozenset({URL}))
        await self.extend(package, [offer])
        return offer
