"""otad: an all-in-one OTA update daemon for edge gateways."""

__version__ = "0.1.0"
