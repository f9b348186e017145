"""The amqtt adapter. Every amqtt import in otad lives in this package."""
