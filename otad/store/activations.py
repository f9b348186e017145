"""xiaozhi board activations: pending claims (capped, expiring) and accepted bindings of a board's
name to its Client-Id. Only this module touches the ``xiaozhi_activation`` table."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from tortoise.expressions import Q
from tortoise.transactions import in_transaction

from otad.store.repo import Repo
from otad.store.failures import translate_storage_errors
from otad.store.models import Device, XiaozhiActivation
from otad.store.transactions import shielded
from otad.model import Accepted, ActivationRecord, BoardClaim, DeviceRecord


def _record(row: XiaozhiActivation, existing_device: bool = False) -> ActivationRecord:
    return ActivationRecord(
        id=row.id, device_name=row.device_name, client_id=row.client_id, code=row.code, challenge=row.challenge,
        product_id=row.product_id, serial_number=row.serial_number, remote_addr=row.remote_addr,
        app_version=row.app_version, board_type=row.board_type, created_at=row.created_at, seen_at=row.seen_at,
        expires_at=row.expires_at, accepted_at=row.accepted_at, existing_device=existing_device)


def _details(claim: BoardClaim) -> dict:
    return {"product_id": claim.product_id, "serial_number": claim.serial_number, "remote_addr": claim.remote_addr,
            "app_version": claim.app_version, "board_type": claim.board_type}


class Activations:
    """xiaozhi board activations."""

    def __init__(self, repo: Repo) -> None:
        self._repo = repo  # to read the device an accept made

    async def find_board(self, device_name: str, client_id: str) -> DeviceRecord | None:
        """The device this board is, if it was accepted under this very Client-Id."""
        row = await XiaozhiActivation.get_or_none(device_name=device_name, client_id=client_id,
                                                  expires_at__isnull=True, device_id__isnull=False)
        if row is None:
            # A board from before activation (migration 3) is bound to the first Client-Id it sends.
            legacy = await XiaozhiActivation.filter(device_name=device_name, client_id="", expires_at__isnull=True,
                                                    device_id__isnull=False).update(client_id=client_id)
            if not legacy:
                return None
            row = await XiaozhiActivation.get(device_name=device_name, client_id=client_id)
        device = await self._repo.find_device(device_name)
        return device if device is not None and device.id == row.device_id else None

    @translate_storage_errors
    @shielded
    async def open_pending(self, claim: BoardClaim, *, now: datetime, expires_at: datetime, refresh_before: datetime,
                           limit: int, new_code: Callable[[], str], new_challenge: Callable[[], str]
                           ) -> ActivationRecord | None:
        """The board's pending activation, refreshed (same code, later expiry; only if last seen before
        ``refresh_before``, so repeated checks cost no write) or new. Before a new one, expired claims
        are dropped; if ``limit`` pending claims remain, there is none (None) until one expires.

        The caller serialises calls (one daemon opens claims; the CLI only accepts them), so the count
        read here is not raced by another insert."""
        async with in_transaction():
            row = await XiaozhiActivation.get_or_none(Q(expires_at__isnull=True) | Q(expires_at__gte=now),
                                                      device_name=claim.device_name, client_id=claim.client_id)
            if row is not None and row.expires_at is None:
                return _record(row)  # accepted since the caller looked: the next check finds the board
            if row is not None:
                if await XiaozhiActivation.filter(id=row.id, seen_at__lt=refresh_before).update(
                        seen_at=now, expires_at=expires_at, **_details(claim)):
                    row = await XiaozhiActivation.get(id=row.id)
                return _record(row)
            await XiaozhiActivation.filter(expires_at__lt=now).delete()
            if await XiaozhiActivation.filter(expires_at__isnull=False).count() >= limit:
                # Full: the boards already waiting keep their codes (evicting them would let a flood
                # of fake boards change a real board's code before the operator can type it).
                return None
            code = new_code()
            while await XiaozhiActivation.exists(code=code):
                code = new_code()
            row = await XiaozhiActivation.create(
                device_name=claim.device_name, client_id=claim.client_id, code=code, challenge=new_challenge(),
                created_at=now, seen_at=now, expires_at=expires_at, **_details(claim))
            return _record(row)

    async def find_claim(self, device_name: str, client_id: str, now: datetime) -> ActivationRecord | None:
        """The board's live claim under this Client-Id: pending and not expired, or accepted."""
        row = await XiaozhiActivation.get_or_none(Q(expires_at__isnull=True) | Q(expires_at__gte=now),
                                                  device_name=device_name, client_id=client_id)
        return _record(row) if row else None

    async def list_pending(self, now: datetime) -> list[ActivationRecord]:
        """Live pending claims, oldest first, each saying whether its name is already a device's."""
        rows = await XiaozhiActivation.filter(expires_at__gte=now).order_by("created_at", "id")
        names = set(await Device.filter(name__in=list({row.device_name for row in rows})).values_list("name", flat=True))
        return [_record(row, row.device_name in names) for row in rows]

    @translate_storage_errors
    @shielded
    async def accept(self, code: str, *, now: datetime, password_hash: str) -> Accepted | None:
        """Accept the live pending claim shown ``code``: the board's name becomes (or already is) a
        device, bound to the claim's Client-Id; every other claim to that name is dropped. None if no
        live claim has that code."""
        async with in_transaction():
            # Locked (PostgreSQL): of two accepts of one code, the second waits and then finds none.
            row = await XiaozhiActivation.filter(code=code, expires_at__gte=now).select_for_update().first()
            if row is None:
                return None
            device = await Device.get_or_none(name=row.device_name)
            created = device is None
            if created:
                device = await Device.create(name=row.device_name, product_id=row.product_id, password_hash=password_hash)
            await XiaozhiActivation.filter(device_name=row.device_name).exclude(id=row.id).delete()
            await XiaozhiActivation.filter(id=row.id).update(code=None, expires_at=None, accepted_at=now,
                                                             device_id=device.id)
            row = await XiaozhiActivation.get(id=row.id)
            record = await self._repo.find_device(row.device_name)
            assert record is not None  # written above, in this transaction
            return Accepted(activation=_record(row), device=record, created_device=created)
