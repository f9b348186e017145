"""The OpenAPI document matches the route table, and the daemon serves it."""

from __future__ import annotations

import re

from otad.http import openapi
from otad.http.envelope import API_HANDLERS


def _routes_of(app) -> set[tuple[str, str]]:
    """The API's routes (the dashboard's pages share the application but are not the API)."""
    found = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "*") or route.handler not in app[API_HANDLERS]:
            continue
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        found.add((route.method.lower(), re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", path)))
    return found


async def test_every_route_is_documented_and_nothing_else(otad):
    app = otad.daemon._runner.app
    assert _routes_of(app) == set(openapi.OPERATIONS)


async def test_the_document_is_served_and_marks_public_endpoints(otad):
    async with otad.session.get(f"{otad.url}/api/v2/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    assert document["openapi"].startswith("3.")
    assert document["paths"]["/api/v2/otaPassiveEnable"]["get"]["security"] == []
    assert "security" not in document["paths"]["/api/v2/otaEnable"]["post"]
