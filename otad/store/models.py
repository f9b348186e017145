"""Tortoise models: the database schema. Only ``otad.store`` imports these."""

from __future__ import annotations

from tortoise import fields
from tortoise.indexes import Index
from tortoise.models import Model

from otad.model import MAX_VERSION_TEXT


class SchemaVersion(Model):
    """One row: the schema version this database was created or last migrated to."""

    id = fields.IntField(primary_key=True)
    version = fields.IntField()

    class Meta:
        table = "schema_version"


class ApiToken(Model):
    """An admin API token, stored as the sha256 of the secret. Login tokens expire, CLI tokens do not."""

    id = fields.IntField(primary_key=True)
    name = fields.CharField(max_length=128, unique=True)
    token_hash = fields.CharField(max_length=64, unique=True)
    kind = fields.CharField(max_length=16)  # "api" (otad token create) or "login" (POST /api/v2/login)
    role = fields.CharField(max_length=16, default="admin")  # otad.service.roles; a login token: its user's
    expires_at = fields.DatetimeField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "api_token"


class User(Model):
    id = fields.IntField(primary_key=True)
    username = fields.CharField(max_length=128, unique=True)
    password_hash = fields.CharField(max_length=255)
    role = fields.CharField(max_length=16, default="admin")  # otad.service.roles
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "user"


class Device(Model):
    id = fields.IntField(primary_key=True)
    name = fields.CharField(max_length=128, unique=True)
    product_id = fields.BigIntField(db_index=True)
    password_hash = fields.CharField(max_length=64)
    created_at = fields.DatetimeField(auto_now_add=True)
    # What the device last reported about itself (xiaozhi boards on each OTA check).
    app_version = fields.CharField(max_length=64, null=True)
    board_type = fields.CharField(max_length=128, null=True)
    board_name = fields.CharField(max_length=128, null=True)
    chip = fields.CharField(max_length=64, null=True)
    elf_sha256 = fields.CharField(max_length=64, null=True)
    remote_addr = fields.CharField(max_length=64, null=True)
    last_check_at = fields.DatetimeField(null=True)
    # From the device's own reports and its MQTT connection.
    firmware_version = fields.CharField(max_length=MAX_VERSION_TEXT, null=True)
    online = fields.BooleanField(default=False)
    last_seen = fields.DatetimeField(null=True)

    class Meta:
        table = "device"


class Package(Model):
    id = fields.IntField(primary_key=True)
    product_id = fields.BigIntField()
    name = fields.CharField(max_length=255)
    file_name = fields.CharField(max_length=64, unique=True)
    original_name = fields.CharField(max_length=255)
    size = fields.BigIntField()
    md5 = fields.CharField(max_length=32)
    sha256 = fields.CharField(max_length=64)
    version = fields.CharField(max_length=128, null=True)
    description = fields.TextField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "package"
        unique_together = (("product_id", "name"),)


class Upgrade(Model):
    """One enabled upgrade of one device. ``file_name`` and ``md5`` are copied from the package so the
    command a device was sent can be rebuilt exactly, even after a restart."""

    id = fields.IntField(primary_key=True)
    version = fields.CharField(max_length=36, unique=True)
    device = fields.ForeignKeyField("models.Device", related_name="upgrades", on_delete=fields.CASCADE)
    # SET_NULL: deleting a package keeps the history of what devices were told.
    package = fields.ForeignKeyField("models.Package", related_name="upgrades", on_delete=fields.SET_NULL,
                                     null=True)
    file_name = fields.CharField(max_length=64)
    md5 = fields.CharField(max_length=32)
    state = fields.CharField(max_length=16, db_index=True)
    campaign = fields.ForeignKeyField("models.Campaign", related_name="upgrades", on_delete=fields.SET_NULL,
                                      null=True)
    stage = fields.IntField(null=True)  # the campaign stage the device belongs to
    progress = fields.IntField(null=True)
    message = fields.TextField(null=True)
    timeout_at = fields.DatetimeField(null=True, db_index=True)
    finished_at = fields.DatetimeField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)
    # Set by every write that changes the upgrade (a bulk update does not run auto_now).
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "upgrade"
        indexes = (Index(fields=("device_id", "state")), Index(fields=("campaign_id", "state")))


class UpgradeEvent(Model):
    """One entry of an upgrade's timeline: a state change, or a report that did not change it.

    Consecutive reports of the same status from the device are one row: ``count`` of them, from
    ``at`` to ``last_at``, with the latest one's ``detail`` (its progress). Rows that changed nothing
    (``changed`` false) are capped per upgrade; state changes are always kept."""

    id = fields.IntField(primary_key=True)
    upgrade = fields.ForeignKeyField("models.Upgrade", related_name="events", on_delete=fields.CASCADE)
    at = fields.DatetimeField()
    state = fields.CharField(max_length=16)
    source = fields.CharField(max_length=16)  # "server", "device", "download", "timeout", "admin"
    detail = fields.TextField(null=True)  # the device's report as JSON, or why
    changed = fields.BooleanField(default=True)  # this entry moved the upgrade's state
    count = fields.IntField(default=1)
    last_at = fields.DatetimeField(null=True)

    class Meta:
        table = "upgrade_event"
        indexes = (Index(fields=("upgrade_id", "id")),)


class PassivePin(Model):
    """The package one device gets when it polls otaPassiveEnable (one pin per device)."""

    id = fields.IntField(primary_key=True)
    device = fields.OneToOneField("models.Device", related_name="passive_pin", on_delete=fields.CASCADE)
    # RESTRICT: a pinned package cannot be deleted (3002) while a device may still be told to fetch it.
    package = fields.ForeignKeyField("models.Package", related_name="passive_pins", on_delete=fields.RESTRICT)
    version_name = fields.CharField(max_length=128)
    description = fields.TextField(null=True)
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "passive_pin"


class XiaozhiPin(Model):
    """The firmware every xiaozhi board of one product is offered (one pin per product)."""

    id = fields.IntField(primary_key=True)
    product_id = fields.BigIntField(unique=True)
    package = fields.ForeignKeyField("models.Package", related_name="xiaozhi_pins", on_delete=fields.RESTRICT)
    version_name = fields.CharField(max_length=64)
    force = fields.BooleanField(default=False)
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "xiaozhi_pin"


class Campaign(Model):
    """A staged rollout of one package to a product's devices."""

    id = fields.IntField(primary_key=True)
    name = fields.CharField(max_length=255)  # the package name, as otaEnable takes it
    product_id = fields.BigIntField()
    # SET_NULL: a finished or cancelled campaign keeps its history when its package is deleted.
    package = fields.ForeignKeyField("models.Package", related_name="campaigns", on_delete=fields.SET_NULL,
                                     null=True)
    stages = fields.TextField()  # JSON list of cumulative percentages, e.g. [1, 10, 50, 100]
    success_threshold = fields.FloatField()
    failure_threshold = fields.FloatField()
    max_concurrent = fields.IntField()
    notify_rate = fields.FloatField()
    timeout = fields.FloatField()  # seconds each upgrade may take
    state = fields.CharField(max_length=16, db_index=True)  # running, paused, cancelled, finished
    current_stage = fields.IntField(default=0)
    failures_accepted = fields.IntField(default=0)  # failures an admin resumed past
    reason = fields.TextField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "campaign"


class XiaozhiActivation(Model):
    """One xiaozhi board's claim to a name: ``device_name`` (its MAC, the Device-Id header) as seen
    from ``client_id`` (its Client-Id, a UUID kept in the board's flash).

    Pending (``expires_at`` set, ``device`` null): the board was shown ``code`` and waits for the
    operator to accept it. Pending rows are capped and expire. Accepted (``expires_at`` null,
    ``device`` set): the board is that device, bound to that Client-Id; deleting the device deletes
    the binding."""

    id = fields.IntField(primary_key=True)
    device_name = fields.CharField(max_length=64)
    client_id = fields.CharField(max_length=64)
    code = fields.CharField(max_length=16, null=True, unique=True)  # null once accepted
    challenge = fields.CharField(max_length=64)
    product_id = fields.BigIntField()  # the product the board joins when accepted
    serial_number = fields.CharField(max_length=64, null=True)
    remote_addr = fields.CharField(max_length=64, null=True)
    app_version = fields.CharField(max_length=64, null=True)
    board_type = fields.CharField(max_length=128, null=True)
    device = fields.ForeignKeyField("models.Device", related_name="xiaozhi_activations", on_delete=fields.CASCADE,
                                    null=True)
    created_at = fields.DatetimeField()
    seen_at = fields.DatetimeField()
    expires_at = fields.DatetimeField(null=True, db_index=True)
    accepted_at = fields.DatetimeField(null=True)

    class Meta:
        table = "xiaozhi_activation"
        unique_together = (("device_name", "client_id"),)


class DeltaPatch(Model):
    """A detools patch that turns the base package's image into the package's image (issue 14).

    ``base_version`` is the version a device must report to be offered it (the base package's
    version, or the one in its ESP-IDF app descriptor; otad.service.deltas); ``base_elf_sha256``
    the base image's app descriptor ELF hash, which xiaozhi boards report. Deleting either
    package deletes the row (its file is discarded by the package deletion)."""

    id = fields.IntField(primary_key=True)
    package = fields.ForeignKeyField("models.Package", related_name="deltas", on_delete=fields.CASCADE)
    base = fields.ForeignKeyField("models.Package", related_name="deltas_from", on_delete=fields.CASCADE)
    base_version = fields.CharField(max_length=MAX_VERSION_TEXT)
    base_elf_sha256 = fields.CharField(max_length=64, null=True)
    file_name = fields.CharField(max_length=64, unique=True)
    size = fields.BigIntField()
    md5 = fields.CharField(max_length=32)
    sha256 = fields.CharField(max_length=64)
    compression = fields.CharField(max_length=16)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "delta_patch"
        unique_together = (("package_id", "base_id"),)
        indexes = (Index(fields=("package_id", "base_version")),)
