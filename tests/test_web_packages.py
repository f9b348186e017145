"""The Packages page as an operator sees it: the list, an upload through the page (streamed like
the API's, with or without the script), delete with the "still used" error shown plainly, and a
viewer who sees the list and changes nothing."""

from __future__ import annotations

import hashlib

import aiohttp

from tests.dashboard import csrf_of, log_in
from tests.helpers import assert_nothing_stored

# Over the 64 KiB a small form may have: the page's CSRF token must be read from the first part.
IMAGE = bytes(range(256)) * 1024


def upload_form(csrf: str | None, *, name: str = "fw-2.0", files: int = 1, **fields: str) -> aiohttp.FormData:
    """The upload form as a browser sends it: the hidden CSRF input first, the file last."""
    form = aiohttp.FormData()
    if csrf is not None:
        form.add_field("csrf", csrf)
    for key, value in {"name": name, "productId": "7", "version": "2.0.0", "description": "fixes the radio",
                       **fields}.items():
        form.add_field(key, value)
    for _ in range(files):
        form.add_field("file", IMAGE, filename="fw-2.0.bin", content_type="application/octet-stream")
    return form


async def listed(otad) -> list[dict]:
    status, body = await otad.request("GET", "/api/v2/otaList")
    assert status == 200, body
    return body["data"]


async def test_an_upload_through_the_page_without_the_script_is_stored_and_listed(otad):
    client = await log_in(otad)
    try:
        _, page = await client.get("/packages")
        assert "No package yet" in page
        # Every field labelled, the CSRF input before them all and the file after them.
        for field in ("upload-name", "upload-product", "upload-version", "upload-description", "upload-file"):
            assert f'<label for="{field}">' in page and f'id="{field}"' in page
        form = page[page.index('<form method="post" action="/packages"'):]
        assert form.index('name="csrf"') < form.index('name="name"') < form.index('name="file"')
        assert 'enctype="multipart/form-data"' in form and "data-upload" in form and "data-upload-progress" in form
        status, _, location = await client.post("/packages", upload_form(csrf_of(page)))
        assert (status, location) == (303, "/packages?done=uploaded")
        status, page = await client.get(location)
        assert status == 200 and "The package is uploaded." in page
        md5 = hashlib.md5(IMAGE).hexdigest()
        assert "<th scope=\"row\">fw-2.0</th>" in page and md5 in page and hashlib.sha256(IMAGE).hexdigest() in page
        assert "256.0 KiB" in page and "2.0.0" in page and "fixes the radio" in page
        [package] = await listed(otad)
        assert (package["name"], package["productId"], package["size"]) == ("fw-2.0", 7, len(IMAGE))
        assert package["md5"] == md5
        assert (package["version"], package["description"], package["originalName"]) == ("2.0.0", "fixes the radio",
                                                                                          "fw-2.0.bin")
    finally:
        await client.close()


async def test_the_scripts_upload_sends_the_token_in_a_header(otad):
    client = await log_in(otad)
    try:
        _, page = await client.get("/packages")
        status, _, location = await client.post("/packages", upload_form(None, name="fw-xhr"),
                                                headers={"X-CSRF-Token": csrf_of(page)})
        assert (status, location) == (303, "/packages?done=uploaded")
        assert [p["name"] for p in await listed(otad)] == ["fw-xhr"]
    finally:
        await client.close()


async def test_an_upload_without_the_token_first_or_with_a_second_file_stores_nothing(otad):
    client = await log_in(otad)
    try:
        _, page = await client.get("/packages")
        # the token after the file: not read, so refused before a byte is stored
        late = upload_form(None)
        late.add_field("csrf", csrf_of(page))
        status, body, _ = await client.post("/packages", late)
        assert status == 403 and "CSRF" in body
        status, body, _ = await client.post("/packages", upload_form(csrf_of(page), files=2))
        assert status == 400 and "more than one &#39;file&#39; part" in body
        status, body, _ = await client.post("/packages", upload_form(csrf_of(page), productId="seven"))
        assert status == 400 and "productId must be an integer" in body
        assert_nothing_stored(otad)
    finally:
        await client.close()


async def test_delete_asks_first_refuses_a_pinned_package_plainly_and_deletes_an_unused_one(otad):
    await otad.add_device("dev1", 7)
    pinned = (await otad.upload("fw-pinned", 7, b"pinned"))[1]["data"]
    unused = (await otad.upload("fw-unused", 7, b"unused"))[1]["data"]
    status, body = await otad.request("POST", "/api/v2/otaPassive",
                                      json={"deviceName": "dev1", "name": "fw-pinned", "versionName": "1.8"})
    assert status == 200, body
    client = await log_in(otad)
    try:
        _, page = await client.get("/packages")
        assert 'data-confirm="Delete package fw-pinned?"' in page
        assert 'aria-label="Delete package fw-unused of product 7"' in page
        status, page, _ = await client.post(f"/packages/{pinned['id']}/delete", {}, csrf_from="/packages")
        assert status == 409
        assert ('role="alert">存在依赖关系，无法删除: used by a passive pin; delete or end those first</p>'
                in page)
        status, _, location = await client.post(f"/packages/{unused['id']}/delete", {}, csrf_from="/packages")
        assert (status, location) == (303, "/packages?done=deleted")
        _, page = await client.get(location)
        assert "The package is deleted" in page and "fw-unused" not in page and "fw-pinned" in page
        assert [p["name"] for p in await listed(otad)] == ["fw-pinned"]
    finally:
        await client.close()


async def test_a_viewer_sees_the_packages_and_can_neither_upload_nor_delete(otad):
    package = (await otad.upload("fw-1", 7, b"image"))[1]["data"]
    admin = await log_in(otad, "adam")
    viewer = await log_in(otad, "vera", role="viewer")
    try:
        status, page = await viewer.get("/packages")
        assert status == 200 and "<th scope=\"row\">fw-1</th>" in page and package["md5"] in page
        assert "Upload a package" not in page and "/delete" not in page
        # The viewer's own session token, in the form as a browser would send it: still refused.
        _, admins_page = await admin.get("/packages")
        status, body, _ = await viewer.post("/packages", upload_form(csrf_of(page), name="fw-2"))
        assert status == 403 and "fw-2" not in body
        status, _, _ = await viewer.post(f"/packages/{package['id']}/delete", {}, csrf_from="/packages")
        assert status == 403
        assert [p["name"] for p in await listed(otad)] == ["fw-1"]
        assert otad.db_rows("package") == 1 and len(otad.firmware_files()) == 1
        assert 'action="/packages"' in admins_page  # the admin's page has the form the viewer's lacks
    finally:
        await admin.close()
        await viewer.close()
