"""Signed commands and passive replies (issue 14, docs/signing.md).

``SignedOffers`` is the last ``OfferExtension``: it adds ``sha256`` and ``size`` (when absent), the
expiry ``expires`` (unix seconds), the ``deviceName`` the offer is for, the key id ``kid``, and
``sig``: an ECDSA P-256 signature over ``canonical_form`` of every field but ``sig`` and the
offer's unsigned keys (the passive reply's per-request ``url``). A device holding the public key
can then refuse a forged command, one meant for another device, or one replayed after it expired.

The key itself stays at the edge (``otad.signing_keys``); the service only sees the ``Signer`` port.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from otad.model import PackageRecord
from otad.service.clock import utc_now
from otad.service.offers import Offer

# The first line of every canonical form: says which rules built the rest, so they can change
# later without a device mistaking one form for another.
PREFIX = b"otad-sig-v1\n"
SIG = "sig"
# Integers a JSON parser that keeps numbers as doubles (cJSON, on ESP-IDF) still reads exactly.
_MAX_EXACT = 2**53
_YIELD_EVERY = 200  # signatures between yields to the event loop (about 25 us each)


class SigningKey(Protocol):
    kid: str

    def sign(self, message: bytes) -> bytes:
        """ECDSA P-256 over SHA-256 of ``message``, DER-encoded."""


class Signer(Protocol):
    """Where the signing key comes from (``otad.signing_keys.KeyRing``)."""

    def signing_key(self) -> SigningKey:
        """The key that signs now, from memory: called on the event loop for every batch, so it
        touches no file (the daemon re-reads the key directory in a thread: ``KeyRing.watch``)."""


def canonical_form(fields: Mapping[str, Any], unsigned: frozenset[str] = frozenset()) -> bytes:
    """The bytes that are signed: ``PREFIX``, then one ``name=value`` line per field except ``sig``
    and ``unsigned``, nested objects flattened to dotted names, lines sorted byte-wise by name.

    Values: a string as ``"`` + its UTF-8 with ``\\`` written ``\\\\`` and a line feed written
    ``\\n`` + ``"``; an integer in decimal; ``true``, ``false``, ``null``. Names may not hold
    ``.``, ``=`` or control characters; floats, arrays and empty objects are refused (ValueError):
    otad never sends them, and each would need a rule of its own."""
    lines = sorted((name.encode(), value) for name, value in _flat(fields, unsigned, ""))
    return PREFIX + b"".join(name + b"=" + value + b"\n" for name, value in lines)


def _flat(fields: Mapping[str, Any], unsigned: frozenset[str], prefix: str) -> Iterator[tuple[str, bytes]]:
    for name, value in fields.items():
        if not prefix and (name == SIG or name in unsigned):
            continue
        if not isinstance(name, str) or not name or any(c in ".=" or c < " " or c == "\x7f" for c in name):
            raise ValueError(f"field name {name!r} cannot be signed (empty, or holds '.', '=' or a control character)")
        path = prefix + name
        if isinstance(value, dict):
            if not value:
                raise ValueError(f"field {path!r} is an empty object, which has no canonical form")
            yield from _flat(value, unsigned, path + ".")
        else:
            yield path, _scalar(path, value)


def _scalar(path: str, value: Any) -> bytes:
    if value is None:
        return b"null"
    if value is True or value is False:
        return b"true" if value else b"false"
    if isinstance(value, int):
        if not -_MAX_EXACT < value < _MAX_EXACT:
            raise ValueError(f"field {path!r} = {value} is beyond 2^53")
        return str(value).encode()
    if isinstance(value, str):
        return b'"' + value.replace("\\", "\\\\").replace("\n", "\\n").encode() + b'"'
    raise ValueError(f"field {path!r} is a {type(value).__name__}, which has no canonical form")


class SignedOffers:
    """The ``OfferExtension`` that signs; the composition root adds it after every other one."""

    def __init__(self, signer: Signer, reply_lifetime: float = 3600.0,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self._signer = signer
        self._reply_lifetime = timedelta(seconds=reply_lifetime)
        self._clock = clock

    async def extend(self, package: PackageRecord, offers: list[Offer]) -> None:
        key = self._signer.signing_key()  # once for the batch (one kid across a campaign step), from memory
        now = self._clock()
        for done, offer in enumerate(offers, 1):
            self.sign(key, package, offer, now)
            if done % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # a 100,000-device step must not hold the loop for seconds

    def sign(self, key: SigningKey, package: PackageRecord, offer: Offer, now: datetime) -> None:
        fields = offer.fields
        fields.setdefault("sha256", package.sha256)
        fields.setdefault("size", package.size)
        if offer.expires_at is None:  # a passive reply: rebuilt before then (PassivePins._expiring)
            offer.expires_at = now + self._reply_lifetime
        expires = offer.expires_at if offer.expires_at.tzinfo else offer.expires_at.replace(tzinfo=timezone.utc)
        fields["expires"] = int(expires.timestamp())
        fields["deviceName"] = offer.device_name
        fields["kid"] = key.kid
        fields.pop(SIG, None)
        fields[SIG] = base64.b64encode(key.sign(canonical_form(fields, offer.unsigned))).decode()
