"""Every MQTT topic string otad uses, and the per-device topic rule."""

from __future__ import annotations

DEVICE_ROOT = "/oc/devices/{device}"
OTA_COMMAND = DEVICE_ROOT + "/sys/ota"


def ota_command_topic(device_name: str) -> str:
    return OTA_COMMAND.format(device=device_name)


def is_own_topic(device_name: str, topic_or_filter: str) -> bool:
    """True when a topic or subscription filter lies inside ``/oc/devices/{device_name}/#``.

    Device names contain no ``/``, ``+`` or ``#``, so a prefix test is exact: ``/oc/#``, ``#`` and
    ``/oc/devices/+/sys/ota`` all fail it, while wildcards below the device's own root pass.
    """
    root = DEVICE_ROOT.format(device=device_name)
    return topic_or_filter == root or topic_or_filter.startswith(root + "/")
