from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import pytest

from relayprobe.fakemx import FakeMailServer
from tests.infra import postfix
from tests.infra.browser import Browser, chromium_available, headless_chromium
from tests.infra.dataservers import PostgresServer, RedisServer, postgres_or_skip, redis_or_skip
from tests.infra.skip import skip_or_fail

StartServer = Callable[[FakeMailServer], Coroutine[Any, Any, int]]


@pytest.fixture(scope="session")
def postfix_instances() -> Iterator[None]:
    """The Postfix instances of tests/infra/postfix.sh (postfix.HOSTS), stopped afterwards."""
    reason = postfix.postfix_available()
    if reason is not None:
        skip_or_fail(reason)
    already_running = postfix.all_answer()
    postfix.ensure_started()
    yield
    if not already_running:
        postfix.stop()


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Headless Debian Chromium, fenced to loopback (tests/infra/browser.py)."""
    reason = chromium_available()
    if reason is not None:
        skip_or_fail(reason)
    with headless_chromium() as started:
        yield started


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start fake mail servers on 127.0.0.1 random ports; stop them after the test."""
    started: list[FakeMailServer] = []

    async def start(server: FakeMailServer) -> int:
        started.append(server)
        return await server.start()

    yield start
    for server in started:
        await server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL for the session; a test that needs a clean one takes a database of its
    own (tests/storage/conftest.py) or starts its own."""
    with postgres_or_skip() as server:
        yield server


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL for one test that stops and starts it."""
    with postgres_or_skip() as server:
        yield server


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for a module: its tests use keys of their own or empty it first, and a
    test that stops it starts it again."""
    with redis_or_skip() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server for one test that stops or pauses it."""
    with redis_or_skip() as server:
        yield server
