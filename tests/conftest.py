from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from relayprobe.fakemx import FakeMailServer
from tests.infra import postfix
from tests.infra.browser import Browser, chromium_available, headless_chromium

if TYPE_CHECKING:
    from tests.infra.dataservers import PostgresServer

StartServer = Callable[[FakeMailServer], Coroutine[Any, Any, int]]


def skip_or_fail(reason: str) -> None:
    """Skip where a real server is missing, but never in CI, which must run every test."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


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
    # Here, not at the top: dataservers imports `skip_or_fail` from this module.
    from tests.infra.dataservers import postgres_or_skip

    with postgres_or_skip() as server:
        yield server


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL for one test that stops and starts it."""
    from tests.infra.dataservers import postgres_or_skip

    with postgres_or_skip() as server:
        yield server
