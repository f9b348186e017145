"""Admin access: API tokens (CLI-made or from login) and user accounts."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import timedelta

from otad.errors import Conflict, InvalidInput, MissingInput, NoSuchAccount, NotFound, NotLoggedIn, WrongPassword
from otad.service import credentials
from otad.service.clock import utc_now
from otad.service.validation import is_clean_text
from otad.store import repo
from otad.store.records import TokenRecord

# The original platform's login tokens last 7 days (protocol.md section 2).
LOGIN_TOKEN_LIFETIME = timedelta(days=7)
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"参数无效: {what} must be 1-64 characters of letters, digits and _ . @ -")
    return name


class AdminAuth:
    def __init__(self, now=utc_now) -> None:
        self._now = now

    async def create_token(self, name: str) -> str:
        """Create a named, non-expiring API token and return its secret (shown once)."""
        _check_name(name, "token name")
        secret = credentials.new_secret()
        try:
            await repo.insert_token(name, credentials.hash_secret(secret), "api", None)
        except repo.Duplicate:
            raise Conflict(f"参数无效: a token named '{name}' exists") from None
        return secret

    async def list_tokens(self) -> list[TokenRecord]:
        return await repo.list_tokens("api")

    async def revoke_token(self, name: str) -> None:
        if not await repo.delete_token(name):
            raise NotFound(f"参数无效: no token named '{name}'")

    async def add_user(self, username: str, password: str) -> None:
        _check_name(username, "username")
        if not password:
            raise MissingInput("参数缺失: password")
        if not is_clean_text(password):
            raise InvalidInput("参数无效: the password holds control characters or invalid Unicode")
        hashed = await asyncio.to_thread(credentials.hash_password, password)
        try:
            await repo.insert_user(username, hashed)
        except repo.Duplicate:
            raise Conflict(f"参数无效: user '{username}' exists") from None

    async def login(self, username: object, password: object) -> str:
        """Check a user's password and return ``"Bearer <token>"`` as the original platform does."""
        if not isinstance(username, str) or not isinstance(password, str) or not username or not password:
            raise MissingInput("参数缺失: username and password are required")
        user = await repo.find_user(username) if _NAME.fullmatch(username) else None
        if user is None:
            raise NoSuchAccount()
        if not is_clean_text(password):
            raise WrongPassword()
        if not await asyncio.to_thread(credentials.password_matches, password, user.password_hash):
            raise WrongPassword()
        now = self._now()
        await repo.delete_expired_tokens(now)
        secret = credentials.new_secret()
        name = f"login:{username}:{uuid.uuid4().hex[:12]}"
        await repo.insert_token(name, credentials.hash_secret(secret), "login", now + LOGIN_TOKEN_LIFETIME)
        return f"Bearer {secret}"

    async def check_authorization(self, header: str | None) -> TokenRecord:
        """Accept ``Bearer <token>`` or the bare token; raise NotLoggedIn otherwise."""
        if not header:
            raise NotLoggedIn()
        scheme, _, rest = header.strip().partition(" ")
        secret = rest.strip() if scheme.lower() == "bearer" else header.strip()
        if not secret:
            raise NotLoggedIn()
        token = await repo.find_token(credentials.hash_secret(secret))
        if token is None or (token.expires_at is not None and token.expires_at <= self._now()):
            raise NotLoggedIn()
        return token
