"""otad's MQTT 3.1.1 broker core (embedded in the daemon) and its access rules."""
