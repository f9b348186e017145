"""Who may do what: an ``admin`` changes things, a ``viewer`` sees everything and changes nothing.

The same two roles hold for user accounts (the dashboard, POST /api/v2/login) and API tokens; a
login token carries the role of its user.
"""

from __future__ import annotations

from otad.errors import Forbidden, InvalidInput

ADMIN = "admin"
VIEWER = "viewer"
ROLES = (ADMIN, VIEWER)


def check_role(role: object) -> str:
    if role not in ROLES:
        raise InvalidInput(f"参数无效: role must be one of {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


def require_change(role: str) -> None:
    """Refuse a change to anyone but an admin (3001 没有权限)."""
    if role != ADMIN:
        raise Forbidden(f"没有权限: the {role} role can see but not change; ask an admin")
