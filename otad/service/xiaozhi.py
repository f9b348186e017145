"""xiaozhi-esp32 boards: per-product pins, board activation and the board's OTA check (protocol.md
section 3).

A board is a device only once the operator accepted it: an unknown board (or one that names a
device it is not, or a board checking with another Client-Id) is answered with the firmware's own
activation flow. It is shown a code on its screen, and ``otad device activate CODE`` (or
``POST /api/v2/xiaozhi/activate``) accepts it. The code is the proof of possession: only someone who
sees the board's screen knows it. Boards also send an HMAC of the challenge, keyed by a secret
burned into their eFuse; otad holds no per-board keys, so it cannot verify it and does not try.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from otad.errors import InvalidInput, MissingInput, NotFound
from otad.service import credentials
from otad.service.logs import RateLimitedLog
from otad.service.clock import utc_now
from otad.service.delta_bases import BaseImages
from otad.service.validation import check_device_name, parse_int, safe_text
from otad.service.versions import is_newer, parse_dotted
from otad.model import (Accepted, ActivationRecord, BoardClaim, DeltaRecord, DeviceRecord, Inventory, PackageRecord,
                        XiaozhiPinRecord)

log = logging.getLogger(__name__)

# At most this many boards wait for activation; beyond it, the claims that would expire soonest
# make room, so a flood of fake boards costs a bounded table, never a growing one.
PENDING_LIMIT = 1000
# A pending claim lives this long after the board's last check. A waiting board re-checks about
# every 30-40 s (10 activate calls 3 s apart, then a check), so its code stays the same.
PENDING_TTL = timedelta(minutes=10)
# A waiting board's repeated checks refresh its claim at most this often (the rest only read).
_REFRESH_EVERY = timedelta(minutes=1)
CODE_DIGITS = 6  # the board reads the code aloud digit by digit
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a UUID in practice
_CODE = re.compile(r"[0-9]{%d}" % CODE_DIGITS)


@dataclass(frozen=True)
class BoardCheck:
    """What a board sent: its Device-Id, Client-Id and Serial-Number headers and JSON body, and
    where it came from."""

    device_id: str
    body: dict
    remote_addr: str | None
    client_id: str = ""
    serial_number: str | None = None


@dataclass(frozen=True)
class Activation:
    """The ``activation`` object of a check reply, as the firmware reads it."""

    code: str
    challenge: str
    message: str
    timeout_ms: int


@dataclass(frozen=True)
class Offer:
    """The firmware answer: ``package`` is None when the board keeps what it runs. ``activation``
    is set for a board that is not (yet) a device: it gets no firmware and no voice settings."""

    version: str
    package: PackageRecord | None
    force: bool
    activation: Activation | None = None
    delta: DeltaRecord | None = None  # a patch from what the board runs (issue 14): an optional extra


def _text(value: object, limit: int) -> str | None:
    return safe_text(value, limit) if isinstance(value, str) and value else None


def _inventory(check: BoardCheck, now: datetime) -> Inventory:
    body = check.body
    application = body.get("application") if isinstance(body.get("application"), dict) else {}
    board = body.get("board") if isinstance(body.get("board"), dict) else {}
    return Inventory(
        app_version=_text(application.get("version"), 64),
        board_type=_text(board.get("type"), 128),
        board_name=_text(board.get("name"), 128),
        chip=_text(body.get("chip_model_name"), 64),
        elf_sha256=_text(application.get("elf_sha256"), 64),
        remote_addr=_text(check.remote_addr, 64),
        last_check_at=now,
    )


def _identify(device_id: object, client_id: object) -> tuple[str, str]:
    """The board's name (its MAC, lower case) and Client-Id, or InvalidInput."""
    try:
        name = check_device_name(device_id.strip().lower() if isinstance(device_id, str) else device_id)
    except InvalidInput:
        raise InvalidInput("参数无效: Device-Id must be the board's MAC address") from None
    if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id.strip()):
        raise InvalidInput("参数无效: Client-Id must be the board's UUID")
    return name, client_id.strip().lower()


def _reported_version(body: dict) -> str:
    application = body.get("application")
    current = application.get("version") if isinstance(application, dict) else None
    return current if isinstance(current, str) else ""


def _same_version(reported: str, pinned: str) -> bool:
    parsed = parse_dotted(reported)
    return parsed == parse_dotted(pinned) if parsed is not None else reported == pinned


def _new_code() -> str:
    return f"{secrets.randbelow(10 ** CODE_DIGITS):0{CODE_DIGITS}d}"


def _new_challenge() -> str:
    return secrets.token_hex(16)


class XiaozhiBoards:
    def __init__(self, store, default_product_id: int | None, now=utc_now, pending_limit: int | None = None,
                 pending_ttl: timedelta = PENDING_TTL, patches: BaseImages | None = None) -> None:
        self._store = store  # the composition root's otad.store.store.Store
        self._patches = patches  # delta patches a board may be offered (issue 14); None: never one
        self._default_product_id = default_product_id
        self._now = now
        self._pending_limit = PENDING_LIMIT if pending_limit is None else pending_limit
        self._pending_ttl = pending_ttl
        # Opening a claim counts, evicts and inserts; one at a time keeps the count true.
        self._claims = asyncio.Lock()
        self._full = RateLimitedLog(log, "xiaozhi activations full", interval=60.0)

    # --- admin: one pin per product ---

    async def pin(self, body: object) -> XiaozhiPinRecord:
        """``{"otaId","productId","versionName","force"?}``: offer package otaId to the product's boards."""
        if not isinstance(body, dict):
            raise InvalidInput('参数无效: expected {"otaId", "productId", "versionName"}')
        package_id = parse_int(body.get("otaId"), "otaId")
        product_id = parse_int(body.get("productId"), "productId")
        raw_version = body.get("versionName")
        if raw_version is None or raw_version == "":
            raise MissingInput("参数缺失: versionName")
        if parse_dotted(raw_version) is None:
            # Boards compare versions as dotted integers and break on anything else; a JSON number
            # would also lose digits (1.10 reads as 1.1).
            raise InvalidInput('参数无效: versionName must be a string of dotted integers such as "1.9.3", '
                               "because xiaozhi boards compare versions numerically")
        force = body.get("force", False)
        if force not in (True, False, 0, 1):
            raise InvalidInput("参数无效: force must be true or false")
        package = await self._store.repo.find_package_by_id(package_id)
        if package is None or package.product_id != product_id:
            raise InvalidInput(f"参数无效: product {product_id} has no package with id {package_id}")
        return await self._store.repo.save_xiaozhi_pin(product_id, package_id, raw_version, bool(force))

    async def list(self) -> list[XiaozhiPinRecord]:
        return await self._store.repo.list_xiaozhi_pins()

    async def delete(self, raw_id: object) -> None:
        pin_id = parse_int(raw_id, "id")
        if not await self._store.repo.delete_xiaozhi_pin(pin_id):
            raise NotFound(f"参数无效: no xiaozhi pin with id {pin_id}")

    # --- admin: activation ---

    async def accept(self, raw_code: object) -> Accepted:
        """Accept the pending board showing ``raw_code``: it becomes a device bound to its Client-Id."""
        if raw_code is None or raw_code == "":
            raise MissingInput("参数缺失: code")
        code = re.sub(r"\s", "", raw_code) if isinstance(raw_code, str) else ""
        if not _CODE.fullmatch(code):
            raise InvalidInput(f"参数无效: code must be the {CODE_DIGITS} digits the board shows")
        accepted = await self._store.activations.accept(code, now=self._now(),
                                                        password_hash=credentials.hash_secret(credentials.new_secret()))
        if accepted is None:
            raise NotFound(f"参数无效: no board is waiting with code {code} (it may have expired; "
                           "the board shows a new one after its next check)")
        log.info("xiaozhi board %s (client %s) activated as a device of product %d", accepted.device.name,
                 accepted.activation.client_id, accepted.device.product_id)
        return accepted

    async def pending(self) -> list[ActivationRecord]:
        """Boards waiting for activation, oldest first (without their codes: see the module docstring)."""
        return await self._store.activations.list_pending(self._now())

    # --- the board: check and activate ---

    async def check(self, check: BoardCheck) -> Offer:
        """Record what an activated board reported and decide whether to offer it the pinned firmware;
        any other board gets an activation code instead."""
        name, client_id = _identify(check.device_id, check.client_id)
        current = _reported_version(check.body)
        device = await self._store.activations.find_board(name, client_id)
        if device is None:
            return await self._not_a_board(name, client_id, current, check)
        inventory = _inventory(check, self._now())
        await self._store.repo.save_inventory(device.id, inventory)
        return await self._offer(device, current, inventory.elf_sha256)

    async def board_activate(self, device_id: object, client_id: object, body: dict) -> bool:
        """The board's ``POST .../activate``: True once accepted, False while pending."""
        name, client = _identify(device_id, client_id)
        claim = await self._store.activations.find_claim(name, client, self._now())
        if claim is None:
            raise NotFound("参数无效: this board has no pending activation; it gets one with its next check")
        if claim.accepted:
            return True
        challenge = body.get("challenge")
        if isinstance(challenge, str) and challenge != claim.challenge:
            raise InvalidInput("参数无效: not the challenge this board was given; "
                               "it gets a new one with its next check")
        return False

    async def _offer(self, device: DeviceRecord, current: str, elf_sha256: str | None = None) -> Offer:
        keep = Offer(version=current, package=None, force=False)
        pin = await self._store.repo.find_xiaozhi_pin(device.product_id)
        if pin is None:
            return keep
        if pin.force:
            # The firmware takes force == 1 as "new version" whatever it runs: sent to a board that
            # already runs the pinned version, it would reflash on every check.
            if _same_version(current, pin.version_name):
                return keep
        else:
            current_parsed, wanted = parse_dotted(current), parse_dotted(pin.version_name)
            if current_parsed is None or wanted is None or not is_newer(wanted, current_parsed):
                return keep
        log.info("xiaozhi board %s (%s) offered %s", device.name, current or "unknown version", pin.version_name)
        delta = (await self._patches.board_patch(pin.package, current or None, elf_sha256)
                 if self._patches is not None else None)
        return Offer(version=pin.version_name, package=pin.package, force=pin.force, delta=delta)

    async def _not_a_board(self, name: str, client_id: str, current: str, check: BoardCheck) -> Offer:
        """A check from anything but an accepted board under its Client-Id changes nothing: it opens
        (or refreshes) a pending claim, or, with no product to join, gets no answer but its own version."""
        keep = Offer(version=current, package=None, force=False)
        known = await self._store.repo.find_device(name)
        product_id = known.product_id if known is not None else self._default_product_id
        if product_id is None:
            return keep  # boards are not enrolled here (no xiaozhi.default_product_id)
        inventory = _inventory(check, self._now())
        claim = BoardClaim(device_name=name, client_id=client_id, product_id=product_id,
                           serial_number=_text(check.serial_number, 64), remote_addr=inventory.remote_addr,
                           app_version=inventory.app_version, board_type=inventory.board_type)
        async with self._claims:
            now = self._now()
            record = await self._store.activations.open_pending(claim, now=now, expires_at=now + self._pending_ttl,
                                                                refresh_before=now - _REFRESH_EVERY,
                                                                limit=self._pending_limit, new_code=_new_code,
                                                                new_challenge=_new_challenge)
        if record is None:
            self._full.warning("(%d boards wait; the newest from %s not shown a code)", self._pending_limit,
                               inventory.remote_addr)
            return keep  # full: it asks again with its next check
        if record.accepted or record.code is None:
            return keep  # accepted while we looked: its next check is a board's
        log.debug("xiaozhi board %s (client %s) waits for activation", name, client_id)
        return Offer(version=current, package=None, force=False, activation=Activation(
            code=record.code, challenge=record.challenge,
            message=f"激活码 {record.code}\notad device activate {record.code}",
            timeout_ms=int(self._pending_ttl.total_seconds() * 1000)))
