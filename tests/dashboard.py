"""Driving the dashboard over HTTP as a browser would, without one: a cookie jar, the login
form, and each form's CSRF token taken from the page it is on. (tests/browser.py drives the
real browser.)"""

from __future__ import annotations

import re
from dataclasses import dataclass

import aiohttp

_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


@dataclass
class DashboardClient:
    url: str
    session: aiohttp.ClientSession

    async def get(self, path: str, **kwargs) -> tuple[int, str]:
        async with self.session.get(self.url + path, allow_redirects=False, **kwargs) as response:
            return response.status, await response.text()

    async def post(self, path: str, data: dict | aiohttp.FormData, *, csrf_from: str | None = None,
                   **kwargs) -> tuple[int, str, str | None]:
        """Send a form as the browser would from the page at ``csrf_from`` (default: ``path``),
        with that page's CSRF token and Origin; return (status, body, Location)."""
        if isinstance(data, dict) and "csrf" not in data:
            _, page = await self.get(csrf_from or path)
            data = {**data, "csrf": csrf_of(page)}
        headers = {"Origin": self.url, **kwargs.pop("headers", {})}
        async with self.session.post(self.url + path, data=data, headers=headers, allow_redirects=False,
                                     **kwargs) as response:
            return response.status, await response.text(), response.headers.get("Location")

    async def close(self) -> None:
        await self.session.close()


async def log_in(otad, username: str = "adam", role: str = "admin", password: str | None = None) -> DashboardClient:
    """Add the user (unless ``password`` is given: then it exists) and log in through the form."""
    if password is None:
        password = f"{username}-pass"
        await otad.daemon.services.admins.add_user(username, password, role=role)
    # 127.0.0.1 cookies: aiohttp's jar refuses cookies for IP addresses unless told otherwise.
    client = DashboardClient(otad.url, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)))
    status, _, location = await client.post("/login", {"username": username, "password": password, "next": "/"})
    assert (status, location) == (303, "/"), f"login failed: HTTP {status}"
    return client
