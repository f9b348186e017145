"""The store object: every database operation the service uses, grouped by what it touches.

The composition root builds one ``Store`` after the database is open and hands it to
``build_services``; each use case keeps it as ``self._store``. The service imports no module of
``otad.store`` (tests/test_layering.py), so what it may do to the database is what this offers.
"""

from __future__ import annotations

from otad.store.activations import Activations
from otad.store.deltas import Deltas
from otad.store.device_passwords import DevicePasswords
from otad.store.fleet import FleetQueries
from otad.store.product_devices import ProductDevices
from otad.store.report_writes import ReportWriter
from otad.store.repo import Repo
from otad.store.rollouts import Rollouts


class Store:
    """One of each group of operations; they share the one database tortoise has open."""

    def __init__(self) -> None:
        self.repo = Repo()  # accounts, devices, packages, pins, presence, the health probes
        self.rollouts = Rollouts()  # upgrades with their timelines, campaigns
        self.activations = Activations(self.repo)  # xiaozhi board claims
        self.fleet = FleetQueries()  # the dashboard's counts and pages
        self.report_writes = ReportWriter()  # device reports applied in batches
        self.product_devices = ProductDevices()  # a product's device census
        self.device_passwords = DevicePasswords()  # password hashes replaced together
        self.deltas = Deltas()  # delta patches between a product's packages (issue 14)
