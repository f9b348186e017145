"""The dashboard's door: nothing about the fleet before login, the session cookie, CSRF on every
form, the API's login limit, logout."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.dashboard import DashboardClient, csrf_of, log_in


def _anonymous(otad) -> DashboardClient:
    return DashboardClient(otad.url, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)))


async def test_nothing_about_the_fleet_is_shown_before_login(otad):
    await otad.add_device("secret-device-1", 1)
    client = _anonymous(otad)
    try:
        for path in ("/", "/devices", "/devices/secret-device-1", "/packages", "/upgrades", "/campaigns"):
            status, body = await client.get(path)
            assert status == 303, path
            assert "secret-device-1" not in body
        async with client.session.get(otad.url + "/devices") as response:  # followed: the login page
            page = await response.text()
            assert response.url.path == "/login" and response.url.query["next"] == "/devices"
        assert 'for="username"' in page and 'for="password"' in page and ">Log in</button>" in page
        assert "secret-device-1" not in page
        status, _ = await client.get("/events")
        assert status == 401
    finally:
        await client.close()


async def test_login_sets_a_strict_httponly_session_cookie_and_logout_ends_the_session(otad):
    await otad.daemon.services.admins.add_user("adam", "adam-pass")
    client = _anonymous(otad)
    try:
        _, page = await client.get("/login")
        async with client.session.post(otad.url + "/login", allow_redirects=False, headers={"Origin": otad.url},
                                       data={"username": "adam", "password": "adam-pass", "csrf": csrf_of(page)}) as response:
            assert response.status == 303
            cookie = next(c for c in response.headers.getall("Set-Cookie") if c.startswith("otad_session="))
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # plain HTTP here; under HTTPS the cookie is Secure
        status, page = await client.get("/")
        assert status == 200 and "<h1>Overview</h1>" in page and "adam (admin)" in page
        status, _, location = await client.post("/logout", {}, csrf_from="/")
        assert (status, location) == (303, "/login")
        assert (await client.get("/"))[0] == 303
        # the login token behind the session is revoked, not just forgotten by this browser
        assert [t for t in await otad.daemon.services.admins.list_tokens() if t.kind == "login"] == []
    finally:
        await client.close()


async def test_a_form_without_the_sessions_csrf_token_or_from_another_site_changes_nothing(otad):
    client = await log_in(otad)
    try:
        for forged in ("forged", "ünïcode-token"):
            status, body, _ = await client.post("/logout", {"csrf": forged})
            assert status == 403 and "CSRF" in body
        status, body, _ = await client.post("/logout", {}, csrf_from="/", headers={"Origin": "http://evil.example"})
        assert status == 403 and "CSRF" in body
        assert (await client.get("/"))[0] == 200  # still logged in
        # the login form carries its own token: a login posted from another site is refused
        anonymous = _anonymous(otad)
        try:
            for forged in ("x", "ünïcode"):
                status, body, _ = await anonymous.post("/login", {"username": "adam", "password": "adam-pass",
                                                                 "csrf": forged})
                assert status == 403 and "stale" in body
        finally:
            await anonymous.close()
    finally:
        await client.close()


async def test_wrong_passwords_get_the_apis_limit_and_a_plain_message(otad):
    await otad.daemon.services.admins.add_user("adam", "adam-pass")
    client = _anonymous(otad)
    try:
        status, body, _ = await client.post("/login", {"username": "adam", "password": "wrong"}, csrf_from="/login")
        assert status == 401 and "密码错误" in body and "<h1>Log in to otad</h1>" in body
        statuses = [(await client.post("/login", {"username": "adam", "password": "wrong"}, csrf_from="/login"))[0]
                    for _ in range(12)]
        assert statuses[-1] == 429
        # and the limit is the API's own: the JSON login is refused too
        status, body = await otad.request("POST", "/api/v2/login", auth=False,
                                          json={"username": "adam", "password": "adam-pass"})
        assert status == 429
    finally:
        await client.close()


async def test_pages_load_nothing_from_outside_and_forbid_framing(otad):
    client = await log_in(otad)
    try:
        async with client.session.get(otad.url + "/") as response:
            policy = response.headers["Content-Security-Policy"]
            page = await response.text()
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "http://" not in page.replace(otad.url, "") and "https://" not in page
    finally:
        await client.close()


async def test_a_login_form_that_is_huge_or_never_ends_is_refused_and_the_page_keeps_serving(otad):
    """The login form is the one form anyone may send: its body is bounded in size and time."""
    reader, writer = await asyncio.open_connection("127.0.0.1", otad.daemon.http_port)
    try:
        # chunked, no Content-Length: refused before any of it is read
        writer.write(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 400"), status
    finally:
        writer.close()
    client = _anonymous(otad)
    try:
        status, body, _ = await client.post("/login", {"username": "a" * 70_000, "password": "x"}, csrf_from="/login")
        assert status == 413 and "<h1>Log in to otad</h1>" in body
        assert (await client.get("/login"))[0] == 200
    finally:
        await client.close()
