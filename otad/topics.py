"""Every MQTT topic string otad uses, and the per-device topic rule: one neutral module, since the
embedded broker (otad.mqtt) and the EMQX hooks (otad.http.hook_routes) apply the same rule."""

from __future__ import annotations

DEVICE_ROOT = "/oc/devices/{device}"
OTA_COMMAND = DEVICE_ROOT + "/sys/ota"
OTA_REPORT = DEVICE_ROOT + "/sys/ota/report"
OTA_REPORT_REPLY = DEVICE_ROOT + "/sys/ota/report_reply"
_ROOT_PREFIX, _REPORT_SUFFIX = DEVICE_ROOT.split("{device}")[0], OTA_REPORT.split("{device}")[1]


def ota_command_topic(device_name: str) -> str:
    return OTA_COMMAND.format(device=device_name)


def is_own_topic(device_name: str, topic_or_filter: str) -> bool:
    """True when a topic or subscription filter lies inside ``/oc/devices/{device_name}/#``.

    Device names contain no ``/``, ``+`` or ``#``, so a prefix test is exact: ``/oc/#``, ``#`` and
    ``/oc/devices/+/sys/ota`` all fail it, while wildcards below the device's own root pass.
    """
    root = DEVICE_ROOT.format(device=device_name)
    return topic_or_filter == root or topic_or_filter.startswith(root + "/")


def ota_report_reply_topic(device_name: str) -> str:
    return OTA_REPORT_REPLY.format(device=device_name)


def reporting_device(topic: str) -> str | None:
    """The device name when ``topic`` is a device's OTA report topic, else None."""
    if topic.startswith(_ROOT_PREFIX) and topic.endswith(_REPORT_SUFFIX):
        name = topic[len(_ROOT_PREFIX):-len(_REPORT_SUFFIX)]
        if name and "/" not in name:
            return name
    return None


def is_server_only(device_name: str, topic: str) -> bool:
    """Topics inside a device's root that only otad publishes on: its OTA command and the replies to
    its reports. A device publishing (or retaining, or leaving a will) there could erase or forge
    its own pending command while its upgrade stays open."""
    return topic in (OTA_COMMAND.format(device=device_name), OTA_REPORT_REPLY.format(device=device_name))
