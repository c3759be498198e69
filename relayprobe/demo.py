"""`relayprobe demo`: the whole service on loopback, with nothing installed but relayprobe.

Three fake mail servers listen on one port of three loopback addresses: a closed one, an open
relay that really passes mail on, and a qmail-like one that says 250 to `%` and `!` recipients
but never delivers. A telnet-style caller connects to the service from each address; the
service connects back to the caller's port, as it would on the internet, and confirms relaying
by delivery to its own canary sink, which the open relay's "queue" delivers to.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from relayprobe.app import canary_sink, local_registry
from relayprobe.fakemx import FakeMailServer, relays_everything, relays_like_qmail, relays_nothing
from relayprobe.frontdoors.core import SessionCore
from relayprobe.frontdoors.telnet import ReflectorService
from relayprobe.operations.config import Endpoint, Settings

# Each server's description is the subject of the caption "<description> listens on ADDR:PORT."
CALLERS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("127.0.0.2", "A closed mail server", {"relay": relays_nothing}),
    ("127.0.0.3", "An open relay, which passes mail on,", {"relay": relays_everything}),
    (
        "127.0.0.4",
        "A qmail-like server, which says 250 at RCPT and never delivers,",
        {"relay": relays_like_qmail},
    ),
)
# Bounds the demo's own caller: the service ends each test far sooner.
CALLER_TIMEOUT = 60.0
CONFIRM_WAIT = 3.0


async def _start_mail_servers(sink: Endpoint) -> tuple[int, list[FakeMailServer]]:
    """The fake servers on one port (the service tests one port), each on its own address."""
    for _ in range(20):
        servers = [
            FakeMailServer(
                hostname=f"mx{n}.demo.test",
                forward_to=(sink.host, sink.port)
                if options["relay"] is relays_everything
                else None,
                **options,
            )
            for n, (_, _, options) in enumerate(CALLERS, 2)
        ]
        port = 0
        try:
            for server, (address, _, _) in zip(servers, CALLERS, strict=True):
                port = await server.start(address, port)
        except OSError:
            for server in servers:
                await server.stop()
            continue
        return port, servers
    raise OSError("no port free on all of 127.0.0.2-4 for the demo mail servers")


async def telnet_call(service: Endpoint, *, source: str) -> list[str]:
    """Call the service from `source` as `telnet -b source` would and read until it hangs up."""
    reader, writer = await asyncio.open_connection(
        service.host, service.port, local_addr=(source, 0)
    )
    try:
        async with asyncio.timeout(CALLER_TIMEOUT):
            data = await reader.read()
    finally:
        writer.close()
    return data.decode("utf-8", "replace").splitlines()


async def run_demo(settings: Settings, *, show: Callable[[str], None] = print) -> None:
    settings = dataclasses.replace(
        settings,
        listen=(Endpoint("127.0.0.1", 0),),
        sink_listen=Endpoint("127.0.0.1", 0),
        confirm=True,
        confirm_wait=CONFIRM_WAIT,
        rate_limit=False,
        history=False,
    )
    registry = local_registry(settings)
    async with canary_sink(settings, registry) as sink:
        assert sink is not None
        port, mail_servers = await _start_mail_servers(sink)
        service = ReflectorService(
            SessionCore(dataclasses.replace(settings, target_port=port), registry=registry)
        )
        try:
            (endpoint,) = await service.start()
            for source, what, _ in CALLERS:
                command = f"telnet -b {source} {endpoint.host} {endpoint.port}"
                show(f"$ {command}    # {what} listens on {source}:{port}.")
                for line in await telnet_call(endpoint, source=source):
                    show(line)
                show("Connection closed by foreign host.")
                show("")
        finally:
            await service.shutdown()
            for server in mail_servers:
                await server.stop()
