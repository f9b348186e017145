"""Persistence: tortoise models, the database lifecycle and repository functions."""
