"""The aiohttp adapter: thin handlers over the service layer."""
