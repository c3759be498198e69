"""The telnet reflector end to end on loopback, against fake mail servers."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from relayprobe.config import Endpoint, Settings
from relayprobe.fakemx import FakeMailServer, SessionState, relays_nothing
from relayprobe.server import (
    BUSY,
    MAX_OUTPUT_BYTES,
    ReflectorService,
    TelnetSession,
    target_address,
)
from relayprobe.telnet import IAC, IP

from .conftest import StartServer
from .infra.haproxy import free_port

Service = Callable[..., Awaitable[tuple[ReflectorService, Endpoint]]]


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    started: list[ReflectorService] = []

    async def start(target_port: int, **changes: object) -> tuple[ReflectorService, Endpoint]:
        listen = changes.pop("listen", (Endpoint("127.0.0.1", 0),))
        settings = dataclasses.replace(
            Settings(),
            listen=listen,
            target_port=target_port,
            reply_timeout=2.0,
            rate_limit=False,
            **changes,  # type: ignore[arg-type]
        )
        service = ReflectorService(settings)
        (endpoint, *_) = await service.start()
        started.append(service)
        return service, endpoint

    yield start
    for service in started:
        await service.shutdown(grace=1.0)


async def call(endpoint: Endpoint, *, source: str = "127.0.0.1") -> list[str]:
    reader, writer = await asyncio.open_connection(
        endpoint.host, endpoint.port, local_addr=(source, 0)
    )
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data.decode().split("\r\n")


def test_ipv4_mapped_peer_is_tested_as_ipv4() -> None:
    assert target_address("::ffff:192.0.2.4") == "192.0.2.4"
    assert target_address("2001:db8::4") == "2001:db8::4"
    assert target_address("192.0.2.4") == "192.0.2.4"


async def test_caller_gets_the_full_transcript_of_their_own_address(
    start_server: StartServer, service: Service
) -> None:
    mail = FakeMailServer(relay=relays_nothing)
    port = await mail.start("127.0.0.5")
    try:
        _, endpoint = await service(port, motd="Welcome to the ISP relay test")
        lines = await call(endpoint, source="127.0.0.5")
    finally:
        await mail.stop()
    assert lines[:3] == [
        "Welcome to the ISP relay test",
        "Connecting to 127.0.0.5 ...",
        "<<< 220 mx.fake.test ESMTP fake",
    ]
    assert lines[-4:] == [
        "Tested host banner: 220 mx.fake.test ESMTP fake",
        "System appeared to reject relay attempts",
        "Note: delivery confirmation is off: no canary sink configured (sink_listen)",
        "",
    ]
    assert sum(line.startswith(":Relay test: #") for line in lines) == 20


async def test_transcript_streams_live(start_server: StartServer, service: Service) -> None:
    mail = FakeMailServer(reply_delay=0.05)
    _, endpoint = await service(await start_server(mail))
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    first = await asyncio.wait_for(reader.readuntil(b":Relay test: #Quote test\r\n"), 5)
    # The suite needs about 60 replies at 50 ms each: most are still to come.
    assert mail.commands.count(b"RSET") < 5
    assert b"Connecting to 127.0.0.1 ..." in first
    rest = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert b"\r\nSystem appeared to reject relay attempts\r\n" in rest


async def _hang_up_mid_test(endpoint: Endpoint, mail: FakeMailServer, *, interrupt: bool) -> float:
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    await asyncio.wait_for(reader.readuntil(b":Relay test: #Test 2\r\n"), 5)
    mail.closed.clear()
    if interrupt:
        writer.write(bytes([IAC, IP]))
        await writer.drain()
    else:
        writer.close()
    left = time.monotonic()
    await asyncio.wait_for(mail.closed.wait(), 1.0)
    if interrupt:
        await asyncio.wait_for(reader.read(), 1.0)  # the service hung up
        writer.close()
    return time.monotonic() - left


@pytest.mark.parametrize("interrupt", [False, True], ids=["hang-up", "ctrl-c"])
async def test_caller_leaving_stops_the_test_within_a_second(
    start_server: StartServer, service: Service, interrupt: bool
) -> None:
    mail = FakeMailServer(reply_delay=0.1)
    svc, endpoint = await service(await start_server(mail))
    assert await _hang_up_mid_test(endpoint, mail, interrupt=interrupt) < 1.0
    assert mail.commands[-1] == b"QUIT"
    await asyncio.sleep(0.05)
    assert svc.sessions == {}
    assert not svc.tasks


class Verbose(FakeMailServer):
    """Every reply is 40 lines of 1,000 bytes that all need escaping: lots of output."""

    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        reply = super().reply(line, session)
        if reply is None or line.startswith(b"QUIT"):
            return reply
        code = reply[:3]
        filler = b"\x1b" * 190
        return b"\r\n".join(code + b"-" + filler for _ in range(39)) + b"\r\n" + reply


async def test_slow_reader_is_ended_and_others_keep_streaming(
    start_server: StartServer, service: Service
) -> None:
    port = await start_server(Verbose())
    svc, endpoint = await service(port)
    _, stuck_writer = await asyncio.open_connection(endpoint.host, endpoint.port, limit=1024)
    # Keep our receive window tiny so the service's output piles up on its side.
    stuck_writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    largest = 0
    for _ in range(200):
        await asyncio.sleep(0.01)
        for session in svc.sessions.values():
            if session.transport is not None:
                largest = max(largest, session.transport.get_write_buffer_size())
        if not svc.sessions:
            break
    assert not svc.sessions, "the stuck session should have been ended"
    assert largest <= MAX_OUTPUT_BYTES + 16 * 1024
    other = await call(endpoint)
    assert "System appeared to reject relay attempts" in other
    stuck_writer.close()


async def test_session_cap_refuses_without_connecting_out(
    start_server: StartServer, service: Service
) -> None:
    mail = FakeMailServer(reply_delay=0.2)
    _, endpoint = await service(await start_server(mail), max_sessions=1)
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    await asyncio.wait_for(reader.readuntil(b"<<< 220"), 5)
    assert await call(endpoint) == [BUSY.message, ""]
    assert mail.sessions == 1
    writer.close()


async def test_ipv6_listener_connects_back_to_ipv6_caller(service: Service) -> None:
    mail = FakeMailServer(relay=relays_nothing)
    try:
        port = await mail.start("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        _, endpoint = await service(port, listen=(Endpoint("::1", 0),))
        lines = await call(endpoint, source="::1")
    finally:
        await mail.stop()
    assert lines[0] == "Connecting to ::1 ..."
    assert ">>> MAIL FROM:<spamtest@[IPv6:::1]>" in lines
    assert "System appeared to reject relay attempts" in lines


def _relayprobe(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "relayprobe", *args],
        capture_output=True,
        text=True,
        timeout=30,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "127.0.0.1"], "--listen: expected ADDR:PORT, got '127.0.0.1'"),
        (["--listen", "::1:23"], "--listen: write IPv6 addresses in brackets"),
        (["--listen", "127.0.0.1:70000"], "--listen: port 70000 is out of range 1-65535"),
        (["--reply-timeout", "-1"], "--reply-timeout: expected a number of seconds above 0"),
        (["--max-sessions", "0"], "--max-sessions: expected a whole number of at least 1"),
        (
            ["--config", "/nonexistent.toml"],
            "config file /nonexistent.toml: No such file or directory",
        ),
    ],
)
def test_bad_serve_input_gives_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = _relayprobe("serve", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert message in result.stderr


def test_unknown_config_key_and_env_variable(tmp_path: object) -> None:
    config = tmp_path / "relayprobe.toml"  # type: ignore[operator]
    config.write_text('reply_timeout = 5\nlisten_on = ["0.0.0.0:23"]\n')
    result = _relayprobe("serve", "--config", str(config), "--check-config")
    assert result.returncode == 2
    assert "unknown key 'listen_on'" in result.stderr
    env = {**os.environ, "RELAYPROBE_REPLY_TIMEOUT": "soon"}
    result = _relayprobe("serve", "--check-config", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "relayprobe serve: RELAYPROBE_REPLY_TIMEOUT: expected a number, got 'soon'"
    )


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv")
def test_privileged_port_without_permission_says_how_to_fix_it() -> None:
    drop = ["setpriv", "--bounding-set", "-net_bind_service", "--"]
    result = subprocess.run(
        [
            *drop,
            sys.executable,
            "-m",
            "relayprobe",
            "serve",
            "--listen",
            "127.0.0.1:23",
            "--no-history",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "permission denied" in result.stderr
    assert "CAP_NET_BIND_SERVICE" in result.stderr


async def test_sigterm_tells_callers_and_quits_their_smtp_sessions(
    start_server: StartServer,
) -> None:
    mail = FakeMailServer(reply_delay=0.1)
    port = await start_server(mail)
    listen_port = free_port("127.0.0.1")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayprobe",
        "serve",
        "--listen",
        f"127.0.0.1:{listen_port}",
        "--target-port",
        str(port),
        "--log-format",
        "json",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(100):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", listen_port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(reader.readuntil(b":Relay test: #Test 1\r\n"), 5)
        process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(reader.read(), 5)
        assert b":Service shutting down\r\n" in rest
        assert await asyncio.wait_for(process.wait(), 5) == 0
        await asyncio.wait_for(mail.closed.wait(), 2)
        assert mail.commands[-1] == b"QUIT"
        assert process.stderr is not None
        logs = (await process.stderr.read()).decode()
        assert '"event": "session_end"' in logs
        assert '"reason": "service shutting down"' in logs
        writer.close()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_ipv4_mapped_caller_is_tested_at_its_ipv4_address(service: Service) -> None:
    mail = FakeMailServer(relay=relays_nothing)
    port = await mail.start("127.0.0.6")
    svc, _ = await service(port)
    # A dual-stack IPv6 socket sees an IPv4 caller as ::ffff:127.0.0.6.
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind(("::ffff:127.0.0.1", 0))
    except OSError:
        sock.close()
        await mail.stop()
        pytest.skip("no dual-stack sockets here")
    listener = await asyncio.get_running_loop().create_server(
        lambda: TelnetSession(svc, 99), sock=sock
    )
    try:
        lines = await call(Endpoint("127.0.0.1", sock.getsockname()[1]), source="127.0.0.6")
    finally:
        listener.close()
        await mail.stop()
    assert lines[0] == "Connecting to 127.0.0.6 ..."
    assert "System appeared to reject relay attempts" in lines
