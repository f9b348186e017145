"""Every MQTT topic string otad uses, and the per-device topic rule: one neutral module, since the
embedded broker (otad.mqtt) and the EMQX hooks (otad.http.hook_routes) apply the same rule."""

from __future__ import annotations

DEVICE_ROOT = "/oc/devices/{device}"
OTA_COMMAND = DEVICE_ROOT + "/sys/ota"
OTA_REPORT = DEVICE_ROOT + "/sys/ota/report"
OTA_REPORT_REPLY = DEVICE_ROOT + "/sys/ota/report_reply"
# Firmware over MQTT in chunks (docs/chunks.md): the device asks on the first, otad answers on the second.
OTA_CHUNK_REQUEST = DEVICE_ROOT + "/sys/ota/chunk/request"
OTA_CHUNK_RESPONSE = DEVICE_ROOT + "/sys/ota/chunk/response"
_ROOT_PREFIX, _REPORT_SUFFIX = DEVICE_ROOT.split("{device}")[0], OTA_REPORT.split("{device}")[1]
_CHUNK_REQUEST_SUFFIX = OTA_CHUNK_REQUEST.split("{device}")[1]


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


def _device_of(topic: str, suffix: str) -> str | None:
    if topic.startswith(_ROOT_PREFIX) and topic.endswith(suffix):
        name = topic[len(_ROOT_PREFIX):-len(suffix)]
        if name and "/" not in name:
            return name
    return None


def reporting_device(topic: str) -> str | None:
    """The device name when ``topic`` is a device's OTA report topic, else None."""
    return _device_of(topic, _REPORT_SUFFIX)


def chunk_requesting_device(topic: str) -> str | None:
    """The device name when ``topic`` is a device's firmware chunk request topic, else None."""
    return _device_of(topic, _CHUNK_REQUEST_SUFFIX)


def ota_chunk_response_topic(device_name: str) -> str:
    return OTA_CHUNK_RESPONSE.format(device=device_name)


def is_server_only(device_name: str, topic: str) -> bool:
    """Topics inside a device's root that only otad publishes on: its OTA command, the replies to
    its reports and its firmware chunks. A device publishing (or retaining, or leaving a will) there
    could erase or forge its own pending command while its upgrade stays open, or forge bytes."""
    return topic in (OTA_COMMAND.format(device=device_name), OTA_REPORT_REPLY.format(device=device_name),
                     OTA_CHUNK_RESPONSE.format(device=device_name))
