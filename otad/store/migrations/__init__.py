"""Tortoise migrations of otad's schema, applied in order at start (``otad.store.database``).
0001_initial is legacy schema version 4; write the next with
``tortoise -c otad.store.database.TORTOISE_ORM makemigrations``."""
