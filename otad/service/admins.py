"""Admin access: API tokens (CLI-made or from login) and user accounts.

Passwords are hashed (scrypt, deliberately slow) on a small executor of our own, never asyncio's
default one: that one opens and stats the firmware files being downloaded, and a login flood on
it would stall every download. The login guard refuses guessing before any hash is computed.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from dataclasses import dataclass
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TypeVar

from otad.errors import Conflict, InvalidInput, MissingInput, NoSuchAccount, NotFound, NotLoggedIn, WrongPassword
from otad.service import credentials
from otad.service.clock import utc_now
from otad.service.login_guard import LoginGuard
from otad.service.roles import ADMIN, check_role, require_change
from otad.service.validation import is_clean_text
from otad.model import Duplicate, TokenRecord, UserRecord

# The original platform's login tokens last 7 days (protocol.md section 2).
LOGIN_TOKEN_LIFETIME = timedelta(days=7)
# A username cannot hold ':', so "login:{username}:" names exactly one user's login tokens.
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_LOGIN_TOKEN = "login"
# scrypt releases the GIL and keeps a core busy per worker: leave one core to the event loop.
HASH_WORKERS = min(2, max(1, (os.cpu_count() or 1) - 1))
HASH_THREAD_PREFIX = "otad-password-hash"
T = TypeVar("T")


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"参数无效: {what} must be 1-64 characters of letters, digits and _ . @ -")
    return name


def _check_password(password: str) -> None:
    if not password:
        raise MissingInput("参数缺失: password")
    if not is_clean_text(password):
        raise InvalidInput("参数无效: the password holds control characters or invalid Unicode")


def _login_token_prefix(username: str) -> str:
    return f"{_LOGIN_TOKEN}:{username}:"


@dataclass(frozen=True)
class LoginSession:
    """A successful login: the new login token's secret (shown once), for whom, with which role."""

    secret: str
    username: str
    role: str


def login_token_user(token: TokenRecord) -> str | None:
    """The user a login token was issued to (its name is ``login:{username}:{hex}``), else None."""
    if token.kind != _LOGIN_TOKEN:
        return None
    _, _, rest = token.name.partition(":")
    return rest.rpartition(":")[0] or None


class AdminAuth:
    """API tokens, users and login. Owns the password-hashing executor: call ``close`` at shutdown."""

    def __init__(self, store, now=utc_now, guard: LoginGuard | None = None) -> None:
        self._store = store  # the composition root's otad.store.store.Store
        self._now = now
        self.guard = guard if guard is not None else LoginGuard()
        self._executor: ThreadPoolExecutor | None = None

    async def _hash(self, function: Callable[..., T], *args: str) -> T:
        """Run a password hash on the hashing executor (made on first use)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=HASH_WORKERS, thread_name_prefix=HASH_THREAD_PREFIX)
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def close(self) -> None:
        """Stop the hashing executor; hashes still queued are cancelled (their logins fail)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def create_token(self, name: str, role: str = ADMIN) -> str:
        """Create a named, non-expiring API token of ``role`` and return its secret (shown once)."""
        _check_name(name, "token name")
        check_role(role)
        secret = credentials.new_secret()
        try:
            await self._store.repo.insert_token(name, credentials.hash_secret(secret), "api", None, role)
        except Duplicate:
            raise Conflict(f"参数无效: a token named '{name}' exists") from None
        return secret

    async def list_tokens(self) -> list[TokenRecord]:
        """Every live token: the CLI-made API tokens and the unexpired login tokens."""
        now = self._now()
        return [token for token in await self._store.repo.list_tokens()
                if token.expires_at is None or token.expires_at > now]

    async def revoke_token(self, name: str) -> None:
        if not await self._store.repo.delete_token(name):
            raise NotFound(f"参数无效: no token named '{name}'")

    async def add_user(self, username: str, password: str, role: str = ADMIN) -> None:
        _check_name(username, "username")
        check_role(role)
        _check_password(password)
        hashed = await self._hash(credentials.hash_password, password)
        try:
            await self._store.repo.insert_user(username, hashed, role)
        except Duplicate:
            raise Conflict(f"参数无效: user '{username}' exists") from None

    async def list_users(self) -> list[UserRecord]:
        return await self._store.repo.list_users()

    async def change_password(self, username: str, password: str) -> int:
        """Set a user's password and revoke their login tokens (whoever held the old password may
        hold one); return how many were revoked."""
        _check_password(password)
        hashed = await self._hash(credentials.hash_password, password)
        revoked = await self._store.repo.set_user_password(username, hashed, _login_token_prefix(username))
        if revoked is None:
            raise NotFound(f"参数无效: no user named '{username}'")
        return revoked

    async def delete_user(self, username: str) -> int:
        """Delete a user and revoke their login tokens; return how many were revoked."""
        revoked = await self._store.repo.delete_user(username, _login_token_prefix(username))
        if revoked is None:
            raise NotFound(f"参数无效: no user named '{username}'")
        return revoked

    async def login(self, username: object, password: object, source: str | None = None) -> str:
        """Check a user's password and return ``"Bearer <token>"`` as the original platform does.

        ``source`` is the client's address. Past the guard's limit for it or for the username the
        answer is TooManyRequests, before the database or a hash is touched."""
        return f"Bearer {(await self.log_in(username, password, source)).secret}"

    async def log_in(self, username: object, password: object, source: str | None = None) -> "LoginSession":
        """``login`` for the dashboard: the new login token's secret with its user and role."""
        if not isinstance(username, str) or not isinstance(password, str) or not username or not password:
            raise MissingInput("参数缺失: username and password are required")
        self.guard.admit(source, username)
        user = await self._store.repo.find_user(username) if _NAME.fullmatch(username) else None
        if user is None:
            raise NoSuchAccount()
        if not is_clean_text(password):
            raise WrongPassword()
        if not await self._hash(credentials.password_matches, password, user.password_hash):
            raise WrongPassword()
        self.guard.succeeded(source, username)
        secret = await self._issue_login_token(user)
        return LoginSession(secret=secret, username=username, role=user.role)

    async def _issue_login_token(self, user: UserRecord) -> str:
        username, password_hash = user.username, user.password_hash
        now = self._now()
        await self._store.repo.delete_expired_tokens(now)
        secret = credentials.new_secret()
        name = f"{_login_token_prefix(username)}{uuid.uuid4().hex[:12]}"
        await self._store.repo.insert_token(name, credentials.hash_secret(secret), _LOGIN_TOKEN, now + LOGIN_TOKEN_LIFETIME,
                                            user.role)
        # `otad user delete` / `passwd` (maybe another process) may have run while the password was
        # hashed. They revoke the user's tokens in the same transaction as the change, so a token
        # inserted before it is revoked with it, and one inserted after it sees the change here.
        current = await self._store.repo.find_user(username)
        if current is None or current.password_hash != password_hash:
            await self._store.repo.delete_token(name)
            raise NoSuchAccount() if current is None else WrongPassword()
        return secret

    async def check_authorization(self, header: str | None, change: bool = False) -> TokenRecord:
        """Accept ``Bearer <token>`` or the bare token; raise NotLoggedIn otherwise, and Forbidden
        if ``change`` is asked of a token whose role cannot change anything."""
        if not header:
            raise NotLoggedIn()
        scheme, _, rest = header.strip().partition(" ")
        secret = rest.strip() if scheme.lower() == "bearer" else header.strip()
        return await self.check_secret(secret, change)

    async def check_secret(self, secret: str | None, change: bool = False) -> TokenRecord:
        """The live token whose secret this is (a dashboard session's cookie holds one); raise
        NotLoggedIn for none, Forbidden if ``change`` is asked of a viewer."""
        if not secret:
            raise NotLoggedIn()
        token = await self._store.repo.find_token(credentials.hash_secret(secret))
        if token is None or (token.expires_at is not None and token.expires_at <= self._now()):
            raise NotLoggedIn()
        if change:
            require_change(token.role)
        return token

    async def log_out(self, secret: str) -> None:
        """Revoke the login token whose secret this is (a dashboard logout); nothing if none."""
        token = await self._store.repo.find_token(credentials.hash_secret(secret)) if secret else None
        if token is not None and token.kind == _LOGIN_TOKEN:
            await self._store.repo.delete_token(token.name)
