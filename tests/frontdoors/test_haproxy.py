"""The PROXY protocol end to end: a real HAProxy in front of the service, and forged headers.

Through HAProxy the service's TCP peer is always 127.0.0.1, while the caller connects from
127.0.0.7: only a service that believes the header connects back to the caller's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relayprobe.app import Application
from relayprobe.fakemx import FakeMailServer
from relayprobe.frontdoors.proxyproto import V2_SIGNATURE
from relayprobe.operations.config import Endpoint
from tests.infra.haproxy import ProxyVersion, haproxy_available, running_haproxy
from tests.infra.skip import skip_or_fail
from tests.operations.test_operations import (
    ACCESS_LINE,
    TIMEOUT_S,
    VERDICT_LINE,
    call,
    exposition,
    metric,
    probes_received,
    running_app,
    serving_mail,
    suite_size,
)

CALLER = "127.0.0.7"
PROXY = "127.0.0.1"
BEHIND_PROXY = {"proxy_protocol": True, "trusted_proxy": ("127.0.0.1/32",)}
VERSIONS = pytest.mark.parametrize("version", [1, 2], ids=["send-proxy", "send-proxy-v2"])


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    """Everything a test starts, stopped in reverse order afterwards."""
    async with contextlib.AsyncExitStack() as stack:
        yield stack


@pytest.fixture
def haproxy(tmp_path: Path, stack: contextlib.AsyncExitStack) -> HAProxyStarter:
    reason = haproxy_available()
    if reason is not None:
        skip_or_fail(reason)
    return HAProxyStarter(tmp_path, stack)


class HAProxyStarter:
    def __init__(self, directory: Path, stack: contextlib.AsyncExitStack) -> None:
        self.directory = directory
        self.stack = stack

    async def __call__(self, app: Application, version: ProxyVersion) -> Endpoint:
        """Start HAProxy in front of `app`; return where callers connect."""
        return await self.stack.enter_async_context(
            running_haproxy(self.directory, backends=app.listening[:1], proxy_version=version)
        )


# Through a real HAProxy


@pytest.mark.haproxy
@VERSIONS
async def test_caller_behind_haproxy_is_tested_at_its_own_address(
    stack: contextlib.AsyncExitStack, haproxy: HAProxyStarter, version: ProxyVersion
) -> None:
    mail = FakeMailServer()
    port = await stack.enter_async_context(serving_mail({CALLER: mail}))
    app = await stack.enter_async_context(running_app(target_port=port, **BEHIND_PROXY))
    frontend = await haproxy(app, version)

    lines = await call(frontend, source=CALLER)

    assert lines[0] == f"Connecting to {CALLER} ..."
    assert VERDICT_LINE in lines
    assert probes_received(mail) == suite_size(app)
    metrics = exposition(app)
    assert metric(metrics, "relayprobe_tests_finished_total", verdict="rejected") == 1
    assert metric(metrics, "relayprobe_refusals_total", reason="proxy") == 0


@pytest.mark.haproxy
@VERSIONS
async def test_header_sent_by_a_caller_through_haproxy_is_ignored(
    stack: contextlib.AsyncExitStack, haproxy: HAProxyStarter, version: ProxyVersion
) -> None:
    named = "127.0.0.9"
    caller_mail, named_mail = FakeMailServer(), FakeMailServer()
    port = await stack.enter_async_context(serving_mail({CALLER: caller_mail, named: named_mail}))
    app = await stack.enter_async_context(running_app(target_port=port, **BEHIND_PROXY))
    frontend = await haproxy(app, version)

    forged = f"PROXY TCP4 {named} {PROXY} 40000 23\r\n".encode()
    lines = await call(frontend, source=CALLER, send=forged)

    assert lines[0] == f"Connecting to {CALLER} ..."
    assert VERDICT_LINE in lines
    assert probes_received(caller_mail) == suite_size(app)
    assert named_mail.sessions == 0


@pytest.mark.haproxy
async def test_admission_judges_the_caller_not_the_proxy(
    stack: contextlib.AsyncExitStack, haproxy: HAProxyStarter
) -> None:
    neighbour, denied = "127.0.0.6", "127.0.0.8"
    servers = {address: FakeMailServer() for address in (CALLER, neighbour, denied)}
    port = await stack.enter_async_context(serving_mail(servers))
    # One test per address a minute: a limit keyed on the proxy would refuse the second caller.
    app = await stack.enter_async_context(
        running_app(
            target_port=port,
            deny=(f"{denied}/32",),
            rate_limit=True,
            rate_address_interval=60.0,
            rate_prefix_tests=100,
            rate_global=1000.0,
            **BEHIND_PROXY,
        )
    )
    frontend = await haproxy(app, 2)

    assert VERDICT_LINE in await call(frontend, source=CALLER)
    assert VERDICT_LINE in await call(frontend, source=neighbour)
    assert await call(frontend, source=denied) == [ACCESS_LINE, ""]
    assert servers[denied].sessions == 0
    assert metric(exposition(app), "relayprobe_refusals_total", reason="access") == 1


# Straight to the service, without HAProxy


async def hang_up_output(endpoint: Endpoint, *, send: bytes) -> tuple[bytes, float]:
    """Connect from 127.0.0.1 and send `send`; what the service wrote and when it hung up."""
    started = time.monotonic()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(endpoint.host, endpoint.port, local_addr=(PROXY, 0)), TIMEOUT_S
    )
    try:
        writer.write(send)
        output = await asyncio.wait_for(reader.read(), TIMEOUT_S)
    except ConnectionResetError:  # the service aborts connections it cannot believe
        output = b""
    finally:
        writer.close()
    return output, time.monotonic() - started


async def assert_nothing_connected_out(app: Application, servers: list[FakeMailServer]) -> None:
    # Were the caller admitted, its test would be connecting out by now.
    await asyncio.sleep(0.2)
    assert [server.sessions for server in servers] == [0] * len(servers)
    metrics = exposition(app)
    assert metric(metrics, "relayprobe_tests_started_total") == 0
    assert metric(metrics, "relayprobe_refusals_total", reason="proxy") == 1


async def test_header_from_an_untrusted_peer_is_refused(stack: contextlib.AsyncExitStack) -> None:
    named, peer = FakeMailServer(), FakeMailServer()
    port = await stack.enter_async_context(serving_mail({CALLER: named, PROXY: peer}))
    app = await stack.enter_async_context(
        running_app(target_port=port, proxy_protocol=True, trusted_proxy=("127.0.0.9/32",))
    )

    forged = f"PROXY TCP4 {CALLER} {PROXY} 40000 23\r\n".encode()
    output, _ = await hang_up_output(app.listening[0], send=forged)

    assert output == b""
    await assert_nothing_connected_out(app, [named, peer])


@pytest.mark.parametrize(
    "header",
    [
        f"PROXY TCP4 {CALLER} {PROXY} 99999 23\r\n".encode(),
        b"PROXY TCP4 mail.example 127.0.0.1 40000 23\r\n",
        f"PROXY TCP4 {CALLER} {PROXY} 40000 23\n".encode(),
        b"EHLO client.example\r\n",
        # Version 1 in the version nibble of a v2 header.
        V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),
    ],
    ids=["port-out-of-range", "name-not-address", "no-cr", "no-header", "v2-bad-version"],
)
async def test_malformed_header_from_a_trusted_peer_is_refused(
    stack: contextlib.AsyncExitStack, header: bytes
) -> None:
    named, peer = FakeMailServer(), FakeMailServer()
    port = await stack.enter_async_context(serving_mail({CALLER: named, PROXY: peer}))
    app = await stack.enter_async_context(running_app(target_port=port, **BEHIND_PROXY))

    output, _ = await hang_up_output(app.listening[0], send=header)

    assert output == b""
    await assert_nothing_connected_out(app, [named, peer])


@pytest.mark.parametrize(
    "header",
    [
        # Byte for byte what HAProxy 2.6 sends for `send-proxy-v2 check check-send-proxy`.
        V2_SIGNATURE + b"\x20\x00\x00\x00",
        b"PROXY UNKNOWN\r\n",
    ],
    ids=["v2-local", "v1-unknown"],
)
async def test_header_naming_no_caller_tests_nobody(
    stack: contextlib.AsyncExitStack, header: bytes
) -> None:
    peer = FakeMailServer()
    port = await stack.enter_async_context(serving_mail({PROXY: peer}))
    app = await stack.enter_async_context(running_app(target_port=port, **BEHIND_PROXY))

    await hang_up_output(app.listening[0], send=header)

    await asyncio.sleep(0.2)
    assert peer.sessions == 0
    assert metric(exposition(app), "relayprobe_tests_started_total") == 0


async def test_no_header_in_time_is_refused(stack: contextlib.AsyncExitStack) -> None:
    peer = FakeMailServer()
    port = await stack.enter_async_context(serving_mail({PROXY: peer}))
    app = await stack.enter_async_context(
        running_app(target_port=port, proxy_timeout=0.3, **BEHIND_PROXY)
    )

    output, waited = await hang_up_output(app.listening[0], send=b"")

    assert output == b""
    assert 0.3 <= waited < 2.0
    await assert_nothing_connected_out(app, [peer])
