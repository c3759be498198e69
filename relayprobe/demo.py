"""`relayprobe demo`: the whole service on loopback, with nothing installed but relayprobe.

Two fake mail servers (one closed, one an open relay) listen on 127.0.0.2 and 127.0.0.3; a
telnet-style caller connects to the service from each of those addresses, and the service
connects back to the caller's port, exactly as it would on the internet.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from relayprobe.config import Endpoint, Settings
from relayprobe.fakemx import FakeMailServer, relays_everything, relays_nothing
from relayprobe.server import ReflectorService

CALLERS = (
    ("127.0.0.2", "a closed mail server", relays_nothing),
    ("127.0.0.3", "an open relay", relays_everything),
)
# Bounds the demo's own caller: the service ends each test far sooner.
CALLER_TIMEOUT = 30.0


async def _start_mail_servers() -> tuple[int, list[FakeMailServer]]:
    """Both fake servers on one port (the service tests one port), each on its own address."""
    for _ in range(20):
        servers = [
            FakeMailServer(hostname=f"mx{n}.demo.test", relay=relay)
            for n, (_, _, relay) in enumerate(CALLERS, 2)
        ]
        port = await servers[0].start(CALLERS[0][0], 0)
        try:
            await servers[1].start(CALLERS[1][0], port)
        except OSError:
            await servers[0].stop()
            continue
        return port, servers
    raise OSError("no free port for the demo mail servers on 127.0.0.2 and 127.0.0.3")


async def telnet_call(service: Endpoint, *, source: str) -> list[str]:
    """Call the service from `source` as `telnet -b source` would and read until it hangs up."""
    reader, writer = await asyncio.open_connection(
        service.host, service.port, local_addr=(source, 0)
    )
    try:
        data = await asyncio.wait_for(reader.read(), CALLER_TIMEOUT)
    finally:
        writer.close()
    return data.decode("utf-8", "replace").splitlines()


async def run_demo(settings: Settings, *, show: Callable[[str], None] = print) -> None:
    port, mail_servers = await _start_mail_servers()
    service = ReflectorService(
        dataclasses.replace(settings, listen=(Endpoint("127.0.0.1", 0),), target_port=port)
    )
    try:
        (endpoint,) = await service.start()
        for source, what, _ in CALLERS:
            command = f"telnet -b {source} {endpoint.host} {endpoint.port}"
            show(f"$ {command}    # {what} listens on {source}:{port}")
            for line in await telnet_call(endpoint, source=source):
                show(line)
            show("Connection closed by foreign host.")
            show("")
    finally:
        await service.shutdown()
        for server in mail_servers:
            await server.stop()
