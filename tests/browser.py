"""Driving the dashboard through a real browser: Debian's chromium, headless, by Playwright's async
API in the tests' own event loop (it talks to the browser over a pipe, so the daemon under test
keeps running while a test awaits the page). (tests/dashboard.py drives the forms without one.)

One browser per test module, a fresh context (no cookies) per test. Every request a page makes is
recorded, and a test fails if one went anywhere but the daemon on 127.0.0.1: an edge gateway often
has no internet, so nothing may come from a CDN. Uncaught script errors and refusals by the
Content-Security-Policy fail the test too.

The tests run in one event loop per module (the browser is started once, about a second), so the
module that uses these fixtures marks itself ``pytest.mark.asyncio(loop_scope="module")`` and imports
``otad`` from here: the daemon is still started and stopped for each test, in that loop.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
import pytest_asyncio

from tests.conftest import make_settings, running_otad

# Playwright's own browser download is not reachable from CI; .ci/run installs Debian's chromium.
CHROMIUM_ARGS = ["--no-sandbox"]  # CI runs as root, where chromium's sandbox refuses to start
TIMEOUT_MS = 10_000  # every await on the page is bounded, well under the test's own timeout


def chromium_path() -> str:
    """The chromium to drive. Missing: a failure under CI (the browser tests are the dashboard's
    only check of its script and forms together), a skip with the reason elsewhere."""
    path = os.environ.get("OTAD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    reason = "chromium is not installed (apt-get install chromium; .ci/run does it as root)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and {reason}: the dashboard's browser tests cannot run", pytrace=False)
    pytest.skip(reason)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    path = chromium_path()
    try:
        from playwright.async_api import async_playwright
    except ImportError:  # pragma: no cover - the test extra installs it
        pytest.fail("playwright is not installed: pip install -e '.[test]'", pytrace=False)
    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            await instance.close()


@pytest_asyncio.fixture(loop_scope="module")
async def otad(tmp_path):
    """The real daemon (as tests/conftest.py's ``otad``), started in the module's loop."""
    async with running_otad(make_settings(tmp_path / "data")) as instance:
        yield instance


def _leaves_gateway(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return False
    return parts.hostname != "127.0.0.1"


@dataclass
class Tab:
    """One page in a fresh browser context, with what it did recorded."""

    page: object  # playwright.async_api.Page
    base: str
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base + path

    async def goto(self, path: str):
        response = await self.page.goto(self.url(path))
        assert response is not None and response.status < 400, f"GET {path}: HTTP {response and response.status}"
        return response

    async def log_in(self, otad, username: str = "adam", role: str = "admin", password: str | None = None) -> None:
        """Add the user (unless ``password`` is given: then it exists) and log in through the form
        as a person would: by the labels and the button."""
        if password is None:
            password = f"{username}-pass"
            await otad.daemon.services.admins.add_user(username, password, role=role)
        await self.goto("/login")
        await self.page.get_by_label("Username").fill(username)
        await self.page.get_by_label("Password").fill(password)
        await self.page.get_by_role("button", name="Log in").click()
        await self.page.wait_for_url(self.url("/"))

    async def mark(self) -> None:
        """Leave a mark in the page's window: it survives live updates, not a navigation or reload."""
        await self.page.evaluate("window.__otadMarker = 'still here'")

    async def still_marked(self) -> bool:
        return await self.page.evaluate("window.__otadMarker === 'still here'")

    async def post_without_token(self, path: str, fields: dict[str, str]) -> int:
        """A form POST from the page's own script, same origin and cookie but no CSRF token: what a
        viewer (or an injected script that cannot read the token) could forge. Returns the status."""
        return await self.page.evaluate(
            """async ([path, fields]) => {
                const response = await fetch(path, {method: "POST", body: new URLSearchParams(fields),
                                                     redirect: "manual"});
                return response.status;
            }""", [path, fields])

    def check(self) -> None:
        outside = [url for url in self.requests if _leaves_gateway(url)]
        assert not outside, f"requests leaving the gateway: {outside}"
        assert not self.problems, f"the page had script errors or CSP refusals: {self.problems}"


@pytest_asyncio.fixture(loop_scope="module")
async def tab(browser, otad):
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    recorded = Tab(page=page, base=otad.url)
    context.on("request", lambda request: recorded.requests.append(request.url))
    page.on("pageerror", lambda error: recorded.problems.append(f"script error: {error}"))
    page.on("console", lambda message: recorded.problems.append(f"console: {message.text}")
            if message.type == "error" and "Content Security Policy" in message.text else None)
    # A confirm() dialog (data-confirm forms) is accepted, as the operator would.
    page.on("dialog", lambda dialog: dialog.accept())
    try:
        yield recorded
        recorded.check()
    finally:
        await context.close()
