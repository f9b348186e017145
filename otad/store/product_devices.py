"""How many devices a product has, and its newest device's id: one aggregate, so a reader that
counted the product's devices can tell whether any joined or left since."""

from __future__ import annotations

from tortoise.functions import Count, Max

from otad.store.models import Device


class ProductDevices:
    """A product's device census."""

    async def census(self, product_id: int) -> tuple[int, int]:
        """(devices, highest device id; 0 without devices) of the product. Ids only grow (SQLite
        AUTOINCREMENT), so a device added changes the highest id and one deleted changes the count."""
        rows = await (Device.filter(product_id=product_id).annotate(n=Count("id"), last=Max("id"))
                      .values("n", "last"))
        if not rows:
            return 0, 0
        return rows[0]["n"] or 0, rows[0]["last"] or 0
