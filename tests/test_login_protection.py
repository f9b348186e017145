"""Login guessing is refused early and cheaply; password hashing never holds up downloads; login
tokens and users are managed from the CLI. Against the real daemon, with real client addresses
(127.0.0.0/8 is all loopback, so a client can send from 127.0.0.2, 127.0.0.3, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import aiohttp
import pytest

from otad.errors import TooManyRequests
from otad.service import credentials
from otad.service.admins import HASH_THREAD_PREFIX, HASH_WORKERS
from otad.service.login_guard import LoginGuard
from tests.conftest import make_settings, start_otad
from tests.helpers import assert_error
from tests.test_cli import otad_cli

LIMIT = 10  # the default http.login_max_failures
WINDOW = 300  # the default http.login_window


@contextlib.asynccontextmanager
async def sources(*addresses: str):
    """One HTTP client per source address."""
    sessions = {address: aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))
                for address in addresses}
    try:
        yield sessions
    finally:
        for session in sessions.values():
            await session.close()


async def login(otad, username: str, password: str, session: aiohttp.ClientSession | None = None):
    """POST /api/v2/login; (status, body, headers)."""
    async with (session or otad.session).post(f"{otad.url}/api/v2/login",
                                              json={"username": username, "password": password}) as response:
        return response.status, await response.json(content_type=None), response.headers


def assert_limited(status: int, body: dict, headers) -> None:
    assert_error(status, body, 429, 999)
    assert 1 <= int(headers["Retry-After"]) <= WINDOW


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """Names of the threads each password check ran on (the real check still runs)."""
    seen: list[str] = []
    real = credentials.password_matches

    def counted(password: str, stored: str) -> bool:
        seen.append(threading.current_thread().name)
        return real(password, stored)

    monkeypatch.setattr(credentials, "password_matches", counted)
    return seen


async def test_a_login_burst_from_one_address_gets_429_before_any_password_is_hashed(otad, hashes):
    await otad.daemon.services.admins.add_user("admin", "s3cret-pass")
    # Concurrent: attempts still being checked count already, or a burst would all get through.
    results = await asyncio.gather(*(login(otad, "admin", f"guess-{i}") for i in range(LIMIT + 5)))
    refused = [result for result in results if result[0] == 429]
    assert len(refused) == 5
    for result in refused:
        assert_limited(*result)
    for status, body, _ in results:
        if status != 429:
            assert_error(status, body, 401, 2003)
    assert len(hashes) == LIMIT
    # Even the right password is refused now, unhashed: the address and the username are both over.
    assert_limited(*await login(otad, "admin", "s3cret-pass"))
    assert len(hashes) == LIMIT
    assert otad.daemon.services.admins.guard.failures(address="127.0.0.1") == LIMIT


async def test_a_burst_for_one_username_is_limited_from_any_address(otad, hashes):
    admins = otad.daemon.services.admins
    await admins.add_user("admin", "s3cret-pass")
    await admins.add_user("bob", "bobs-pass")
    addresses = [f"127.0.0.{i}" for i in range(2, 2 + LIMIT + 2)]
    async with sources(*addresses, "127.0.0.50") as clients:
        for address in addresses[:LIMIT]:
            status, body, _ = await login(otad, "admin", "wrong", clients[address])
            assert_error(status, body, 401, 2003)
        for address in addresses[LIMIT:]:
            assert_limited(*await login(otad, "admin", "wrong", clients[address]))
        assert_limited(*await login(otad, "admin", "s3cret-pass", clients["127.0.0.50"]))
        # The fresh address is not blocked itself: another user logs in from it.
        status, body, _ = await login(otad, "bob", "bobs-pass", clients["127.0.0.50"])
        assert status == 200 and body["data"].startswith("Bearer "), body
    assert len(hashes) == LIMIT + 1
    assert admins.guard.failures(username="admin") == LIMIT


async def test_a_correct_login_for_another_user_works_during_a_flood_from_one_address(otad):
    await otad.daemon.services.admins.add_user("admin", "s3cret-pass")
    await otad.daemon.services.admins.add_user("bob", "bobs-pass")
    async with sources("127.0.0.2") as clients:
        flood = [login(otad, name, "guess", clients["127.0.0.2"]) for name in ["admin"] * 20 + [f"u{i}" for i in range(30)]]
        *flooded, bobs = await asyncio.gather(*flood, login(otad, "bob", "bobs-pass"))
    assert sum(status == 429 for status, _, _ in flooded) == 50 - LIMIT
    status, body, _ = bobs
    assert status == 200, body
    status, body = await otad.request("GET", "/api/v2/otaList", auth=False, headers={"Authorization": body["data"]})
    assert status == 200 and body["success"] is True


async def test_a_successful_login_resets_the_usernames_counter(otad):
    await otad.daemon.services.admins.add_user("bob", "bobs-pass")
    async with sources("127.0.0.2", "127.0.0.3", "127.0.0.4") as clients:
        for _ in range(6):
            assert (await login(otad, "bob", "wrong", clients["127.0.0.2"]))[0] == 401
        assert (await login(otad, "bob", "bobs-pass", clients["127.0.0.3"]))[0] == 200
        # Without the reset, bob would be over the limit at the fifth of these.
        for _ in range(LIMIT - 1):
            status, body, _ = await login(otad, "bob", "wrong", clients["127.0.0.4"])
            assert_error(status, body, 401, 2003)
    assert otad.daemon.services.admins.guard.failures(username="bob") == LIMIT - 1


async def test_unknown_usernames_count_and_the_guard_stays_bounded(otad):
    guard = otad.daemon.services.admins.guard
    addresses = [f"127.0.1.{i}" for i in range(1, 21)]
    async with sources(*addresses) as clients:
        results = await asyncio.gather(*(login(otad, f"nobody-{a}-{i}", "pw", clients[address])
                                         for a, address in enumerate(addresses) for i in range(LIMIT)))
        assert {(status, body["errorCode"]) for status, body, _ in results} == {(401, 2007)}
        assert len(guard) == 20 * LIMIT + 20  # every unknown username and every address counted
        assert_limited(*await login(otad, "nobody-new", "pw", clients[addresses[0]]))

    # Far more distinct usernames (and addresses) than it may keep: the oldest go, the newest stay,
    # and a new name is still limited (a full table must not stop counting).
    for i in range(3 * guard.max_keys):
        guard.admit(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", f"spray-{i}")
    assert len(guard) == 2 * guard.max_keys
    assert guard.failures(username=f"spray-{3 * guard.max_keys - 1}") == 1
    assert guard.failures(username="spray-0") == 0
    for i in range(LIMIT):
        guard.admit(f"192.0.2.{i}", "victim")
    with pytest.raises(TooManyRequests):
        guard.admit("192.0.2.200", "victim")
    assert len(guard) <= 2 * guard.max_keys


def test_failures_expire_after_the_window_and_ipv6_counts_per_prefix():
    now = [1000.0]
    guard = LoginGuard(max_failures=3, window=60, clock=lambda: now[0])
    for host in ("2001:db8::1", "2001:db8::2", "2001:db8::ffff:1"):  # one /64
        guard.admit(host, f"user-{host}")
    with pytest.raises(TooManyRequests) as refused:
        guard.admit("2001:db8::99", "someone")
    assert refused.value.retry_after == 60
    guard.admit("2001:db8:0:1::1", "someone")  # another /64
    now[0] += 30
    with pytest.raises(TooManyRequests) as refused:
        guard.admit("2001:db8::99", "someone")
    assert refused.value.retry_after == 30
    now[0] += 31
    guard.admit("2001:db8::99", "someone")
    assert guard.failures(address="2001:db8::5") == 1


async def test_password_hashing_runs_on_its_own_executor_so_downloads_go_on_during_a_flood(tmp_path, monkeypatch):
    """Every password check is held until released: had they run on asyncio's default executor,
    the flood would take all its threads and the download (which stats and opens the file there)
    could not complete."""
    flood_size = 24  # more than the default executor's threads on a small machine (cpu count + 4)
    instance = await start_otad(make_settings(tmp_path / "data", **{"http.login_max_failures": 100}))
    release = threading.Event()
    entered: list[str] = []
    real = credentials.password_matches

    def held(password: str, stored: str) -> bool:
        entered.append(threading.current_thread().name)
        release.wait(30)
        return real(password, stored)

    try:
        admins = instance.daemon.services.admins
        await admins.add_user("admin", "s3cret-pass")
        firmware = bytes(range(256)) * 4096
        status, body = await instance.upload("fw-1", 1, firmware)
        assert status == 200, body
        monkeypatch.setattr(credentials, "password_matches", held)
        flood = asyncio.gather(*(login(instance, "admin", f"guess-{i}") for i in range(flood_size)))
        # Wait until every attempt of the flood is in: admitted (counted) and waiting for a hash.
        deadline = asyncio.get_running_loop().time() + 10
        while admins.guard.failures(address="127.0.0.1") < flood_size or not entered:
            assert asyncio.get_running_loop().time() < deadline, (admins.guard.failures(address="127.0.0.1"), entered)
            await asyncio.sleep(0.02)

        async def download() -> bytes:
            async with instance.session.get(f"{instance.url}/api/v2/micro/{body['data']['fileName']}") as response:
                assert response.status == 200
                return await response.read()

        assert await asyncio.wait_for(download(), 15) == firmware
        status, listed = await asyncio.wait_for(instance.request("GET", "/api/v2/otaList"), 15)
        assert status == 200 and len(listed["data"]) == 1
        assert not flood.done()
        assert 1 <= len(entered) <= HASH_WORKERS <= 2
        release.set()
        results = await asyncio.wait_for(flood, 30)
        assert {(status, body["errorCode"]) for status, body, _ in results} == {(401, 2003)}
        assert len(entered) == flood_size
        assert all(name.startswith(HASH_THREAD_PREFIX) for name in entered), set(entered)
    finally:
        release.set()
        await instance.stop()


def _token_lines(data_dir) -> dict[str, str]:
    listed = otad_cli(data_dir, "token", "list")
    assert listed.returncode == 0, listed.stderr
    return {line.split("\t")[0]: line for line in listed.stdout.splitlines()}


async def _status_with(otad, bearer: str) -> tuple[int, dict]:
    return await otad.request("GET", "/api/v2/otaList", auth=False, headers={"Authorization": bearer})


async def test_login_tokens_are_listed_with_their_user_and_expiry_and_revocable(otad):
    data_dir = otad.settings.data_dir
    await otad.daemon.services.admins.add_user("alice", "pw-alice-1")
    status, body, _ = await login(otad, "alice", "pw-alice-1")
    assert status == 200, body
    bearer = body["data"]
    assert (await _status_with(otad, bearer))[0] == 200

    lines = await asyncio.to_thread(_token_lines, data_dir)
    [name] = [name for name in lines if name.startswith("login:alice:")]
    kind, role, user, _, expires = lines[name].split("\t")[1:]
    assert (kind, role, user) == ("login", "role admin", "user alice") and expires.startswith("expires 20"), lines[name]
    assert lines["tests"].split("\t")[1:4] == ["api", "role admin", "user -"] and lines["tests"].endswith("expires never")
    assert bearer.split()[1] not in "".join(lines.values())

    revoked = await asyncio.to_thread(otad_cli, data_dir, "token", "revoke", name)
    assert revoked.returncode == 0, revoked.stderr
    assert_error(*await _status_with(otad, bearer), 401, 2001)


async def _bearer(otad, username: str, password: str) -> str:
    status, body, _ = await login(otad, username, password)
    assert status == 200, body
    return body["data"]


async def test_user_passwd_changes_the_password_and_revokes_that_users_login_tokens(otad):
    data_dir = otad.settings.data_dir
    for username in ("alice", "bob"):
        await otad.daemon.services.admins.add_user(username, f"pw-{username}")
    alice_old, bob = await _bearer(otad, "alice", "pw-alice"), await _bearer(otad, "bob", "pw-bob")

    changed = await asyncio.to_thread(otad_cli, data_dir, "user", "passwd", "alice", "--password", "new-pass-2")
    assert changed.returncode == 0 and "revoked 1 login token" in changed.stdout, changed.stderr
    assert_error(*await _status_with(otad, alice_old), 401, 2001)
    assert (await _status_with(otad, bob))[0] == 200
    status, body, _ = await login(otad, "alice", "pw-alice")
    assert_error(status, body, 401, 2003)
    assert (await _status_with(otad, await _bearer(otad, "alice", "new-pass-2")))[0] == 200

    missing = await asyncio.to_thread(otad_cli, data_dir, "user", "passwd", "nobody", "--password", "x-pass")
    assert missing.returncode != 0 and "no user named 'nobody'" in missing.stderr


async def test_user_delete_revokes_exactly_that_users_login_tokens_and_user_list_shows_who_is_left(otad):
    data_dir = otad.settings.data_dir
    for username in ("alice", "bob", "a_c", "abc"):
        await otad.daemon.services.admins.add_user(username, f"pw-{username}")
    bob_tokens = [await _bearer(otad, "bob", "pw-bob") for _ in range(2)]
    alice, abc = await _bearer(otad, "alice", "pw-alice"), await _bearer(otad, "abc", "pw-abc")
    await _bearer(otad, "a_c", "pw-a_c")

    deleted = await asyncio.to_thread(otad_cli, data_dir, "user", "delete", "bob")
    assert deleted.returncode == 0 and "revoked 2 login token" in deleted.stdout, deleted.stderr
    for bearer in bob_tokens:
        assert_error(*await _status_with(otad, bearer), 401, 2001)
    status, body, _ = await login(otad, "bob", "pw-bob")
    assert_error(status, body, 401, 2007)
    # '_' is a LIKE wildcard and LIKE ignores case: deleting a_c must leave abc's token alone.
    assert (await asyncio.to_thread(otad_cli, data_dir, "user", "delete", "a_c")).returncode == 0
    assert (await _status_with(otad, abc))[0] == 200
    assert (await _status_with(otad, alice))[0] == 200

    listed = await asyncio.to_thread(otad_cli, data_dir, "user", "list")
    assert listed.returncode == 0 and listed.stdout.splitlines() == ["abc\tadmin", "alice\tadmin"], listed.stderr
