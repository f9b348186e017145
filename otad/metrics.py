"""Prometheus metrics: one registry per daemon, fed by the adapters, read at ``GET /metrics``.

Counts that live in the database (upgrades by state, campaign progress) are read when scraped,
so they are right after a restart and cost nothing between scrapes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connected_devices = Gauge("otad_mqtt_connected_clients", "MQTT clients connected now", registry=r)
        self.mqtt_messages_in = Counter("otad_mqtt_messages_received", "PUBLISH packets received from clients",
                                        registry=r)
        self.mqtt_messages_out = Counter("otad_mqtt_messages_sent", "PUBLISH packets sent to clients", registry=r)
        self.mqtt_refused = Counter("otad_mqtt_connections_refused", "MQTT connections refused", ["reason"],
                                    registry=r)
        self.http_refused = Counter("otad_http_connections_refused",
                                    "HTTP connections refused or closed to make room, by reason", ["reason"],
                                    registry=r)
        self.upgrades = Gauge("otad_upgrades", "Upgrades by state", ["state"], registry=r)
        self.campaign_devices = Gauge("otad_campaign_upgrades", "Upgrades of each campaign by state",
                                      ["campaign", "state"], registry=r)
        self.bytes_served = Counter("otad_firmware_bytes_served", "Firmware bytes sent to devices", registry=r)
        self.http_latency = Histogram("otad_http_request_duration_seconds", "HTTP request latency by route",
                                      ["route", "method", "status"], registry=r,
                                      buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
        self.mqtt_quota_refusals = Counter("otad_mqtt_quota_refusals",
                                           "MQTT messages or sessions refused, dropped or held back by a quota, "
                                           "by kind (retained, queue, inflight, qos2, sessions)", ["kind"],
                                           registry=r)
        # 1 on the node running the campaign engine and the timeout sweeper (always, with SQLite).
        self.leader = Gauge("otad_leader", "1 if this node leads (runs campaigns and timeouts), else 0", registry=r)
