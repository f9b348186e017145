"""The topic strings and the per-device rule, for the broker's modules: they live in ``otad.topics``
because the EMQX hooks (``otad.http``, which never imports ``otad.mqtt``) apply the same rule."""

from otad.topics import (DEVICE_ROOT, OTA_CHUNK_REQUEST, OTA_CHUNK_RESPONSE, OTA_COMMAND, OTA_REPORT, OTA_REPORT_REPLY,
                         chunk_requesting_device, is_own_topic, is_server_only, ota_chunk_response_topic,
                         ota_command_topic, ota_report_reply_topic, reporting_device)

__all__ = ["DEVICE_ROOT", "OTA_CHUNK_REQUEST", "OTA_CHUNK_RESPONSE", "OTA_COMMAND", "OTA_REPORT", "OTA_REPORT_REPLY",
           "chunk_requesting_device", "is_own_topic", "is_server_only", "ota_chunk_response_topic",
           "ota_command_topic", "ota_report_reply_topic", "reporting_device"]
