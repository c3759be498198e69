from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from relayprobe.fakemx import FakeMailServer

StartServer = Callable[[FakeMailServer], Coroutine[Any, Any, int]]


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
