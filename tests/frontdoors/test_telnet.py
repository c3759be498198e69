"""The telnet reflector end to end on loopback, against fake mail servers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from relayprobe.confirmation.canary import InMemoryRegistry
from relayprobe.fakemx import FakeMailServer, SessionState, relays_everything, relays_nothing
from relayprobe.frontdoors.addresses import peer_address
from relayprobe.frontdoors.core import BUSY, SessionCore
from relayprobe.frontdoors.telnet import (
    CALLER_SEND_BUFFER,
    ReflectorService,
    TelnetSession,
)
from relayprobe.frontdoors.telnetcodec import DO, IAC, IP, NO_OPERATION, TIMING_MARK
from relayprobe.operations.config import Endpoint, Settings
from tests.conftest import StartServer
from tests.infra.haproxy import free_port

Service = Callable[..., Awaitable[tuple[ReflectorService, Endpoint]]]
NO_SINK_NOTE = (
    "Note: delivery confirmation is off: no canary sink configured; to prove relaying, run one "
    "(--sink-listen ADDR:PORT) and point the MX of relaytest.invalid at it"
)


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    started: list[ReflectorService] = []

    async def start(
        target_port: int, *, registry: InMemoryRegistry | None = None, **changes: object
    ) -> tuple[ReflectorService, Endpoint]:
        changes = {
            "listen": (Endpoint("127.0.0.1", 0),),
            "reply_timeout": 2.0,
            "rate_limit": False,
            **changes,
        }
        settings = dataclasses.replace(Settings(), target_port=target_port, **changes)  # type: ignore[arg-type]
        service = ReflectorService(SessionCore(settings, registry=registry))
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
    assert str(peer_address("::ffff:192.0.2.4")) == "192.0.2.4"
    assert str(peer_address("2001:db8::4")) == "2001:db8::4"
    assert str(peer_address("192.0.2.4")) == "192.0.2.4"


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
    assert lines[-5:] == [
        "Tested host banner: 220 mx.fake.test ESMTP fake",
        "System appeared to reject relay attempts",
        NO_SINK_NOTE,
        "Note: every relay attempt was refused: not an open relay to these probes",
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


async def _largest_output_until_ended(svc: ReflectorService, *, seconds: float) -> int:
    """The most output the service held unsent for its callers, until they are gone."""
    largest = 0
    for _ in range(round(seconds * 100)):
        await asyncio.sleep(0.01)
        for session in svc.sessions.values():
            if session.transport is not None:
                largest = max(largest, session.transport.get_write_buffer_size())
        if not svc.sessions:
            break
    return largest


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
    largest = await _largest_output_until_ended(svc, seconds=2.0)
    assert not svc.sessions, "the stuck session should have been ended"
    assert largest <= svc.settings.caller_output_bytes + 16 * 1024
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
    listener = await asyncio.get_running_loop().create_server(lambda: TelnetSession(svc), sock=sock)
    try:
        lines = await call(Endpoint("127.0.0.1", sock.getsockname()[1]), source="127.0.0.6")
    finally:
        listener.close()
        await mail.stop()
    assert lines[0] == "Connecting to 127.0.0.6 ..."
    assert "System appeared to reject relay attempts" in lines


# Hostile and careless callers (each of these failed before the hardening that added it)


class _FakeTransport(asyncio.Transport):
    """Just enough of a transport to drive a TelnetSession's callbacks in any order."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__()
        self.peer = peer
        self.written = bytearray()
        self.closing = False
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": self.peer}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False


def active_sessions(svc: ReflectorService) -> float:
    return svc.metrics.registry.get_sample_value("relayprobe_active_sessions") or 0.0


@pytest.mark.parametrize("hang_up", ["connection_lost", "eof_received", "interrupt"])
async def test_caller_gone_before_its_test_started_frees_its_slot(
    start_server: StartServer, service: Service, hang_up: str
) -> None:
    """A port scanner's connect-and-close: the task is cancelled before its first step."""
    mail = FakeMailServer()
    svc, endpoint = await service(await start_server(mail), max_sessions=3)
    for number in range(10):
        session = TelnetSession(svc)
        session.connection_made(_FakeTransport(("127.0.0.9", 40000 + number)))
        if hang_up == "interrupt":
            session.data_received(bytes([IAC, IP]))
        if hang_up == "eof_received":
            session.eof_received()
        session.connection_lost(None)
    await asyncio.sleep(0.05)
    assert svc.sessions == {}
    assert not svc.tasks
    assert active_sessions(svc) == 0
    assert "System appeared to reject relay attempts" in await call(endpoint)


async def test_connect_and_close_from_many_addresses_leaks_nothing(
    start_server: StartServer, service: Service
) -> None:
    svc, endpoint = await service(await start_server(FakeMailServer()), max_sessions=3)
    for number in range(30):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((f"127.0.{number // 250 + 20}.{number % 250 + 1}", 0))
        with contextlib.suppress(BlockingIOError):
            sock.connect((endpoint.host, endpoint.port))
        if number % 2:  # a reset, as nmap's SYN scan and `nc -z` with linger 0 leave it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if not svc.sessions:
            break
    assert svc.sessions == {}
    assert active_sessions(svc) == 0
    assert "System appeared to reject relay attempts" in await call(endpoint)


async def _half_closed_call(
    endpoint: Endpoint,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    writer.write_eof()  # what `nc -N` and `echo | nc -N` do
    return reader, writer


async def test_half_closed_caller_gets_the_whole_transcript(
    start_server: StartServer, service: Service
) -> None:
    _, endpoint = await service(await start_server(FakeMailServer()))
    reader, writer = await _half_closed_call(endpoint)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    lines = data.replace(NO_OPERATION, b"").decode().split("\r\n")
    assert lines[0] == "Connecting to 127.0.0.1 ..."
    assert sum(line.startswith(":Relay test: #") for line in lines) == 20
    assert lines[-4:-1] == [
        "System appeared to reject relay attempts",
        NO_SINK_NOTE,
        "Note: every relay attempt was refused: not an open relay to these probes",
    ]


async def test_hang_up_after_half_close_stops_the_test_within_a_second(
    start_server: StartServer, service: Service
) -> None:
    mail = FakeMailServer(reply_delay=0.1)
    _, endpoint = await service(await start_server(mail))
    reader, writer = await _half_closed_call(endpoint)
    await asyncio.wait_for(reader.readuntil(b":Relay test: #Test 2\r\n"), 5)
    mail.closed.clear()
    writer.close()
    left = time.monotonic()
    await asyncio.wait_for(mail.closed.wait(), 1.0)
    assert time.monotonic() - left < 1.0
    assert mail.commands[-1] == b"QUIT"
    assert sum(command.startswith(b"MAIL") for command in mail.commands) <= 4


class _NeverDelivers(FakeMailServer):
    """Says 250 to every probe and keeps the test messages: the test waits for them in vain."""

    def __init__(self) -> None:
        super().__init__(relay=relays_everything)


@pytest.mark.parametrize("half_closed", [False, True], ids=["hang-up", "half-close, hang-up"])
async def test_hang_up_while_waiting_for_test_messages_ends_within_a_second(
    start_server: StartServer, service: Service, half_closed: bool
) -> None:
    port = await start_server(_NeverDelivers())
    svc, endpoint = await service(port, registry=InMemoryRegistry(), confirm_wait=20.0)
    if half_closed:
        reader, writer = await _half_closed_call(endpoint)
    else:
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    await asyncio.wait_for(reader.readuntil(b":Waiting up to 20 s for relayed test"), 10)
    await asyncio.sleep(0.3)  # the test is silent now
    writer.close()
    left = time.monotonic()
    while svc.sessions and time.monotonic() - left < 2:
        await asyncio.sleep(0.01)
    assert not svc.sessions
    assert time.monotonic() - left < 1.0


async def test_telnet_byte_flood_is_cut_off_and_others_are_served(
    start_server: StartServer, service: Service
) -> None:
    mail = FakeMailServer(reply_delay=0.05)
    _, endpoint = await service(await start_server(mail))
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    flood = bytes([IAC, IAC]) * 32 * 1024
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            for _ in range(16):  # 1 MiB at most; the service stops reading long before
                writer.write(flood)
                await writer.drain()
    notice = await asyncio.wait_for(reader.readuntil(b"hang up to stop\r\n"), 5)
    assert b":Ignoring your input from now on (over 16384 bytes); hang up to stop" in notice
    assert "System appeared to reject relay attempts" in await call(endpoint)
    writer.close()


async def test_timing_mark_replies_count_against_the_output_cap(
    start_server: StartServer, service: Service
) -> None:
    cap = 64 * 1024
    svc, endpoint = await service(
        await start_server(FakeMailServer(reply_delay=0.2)),
        caller_input_bytes=1_000_000,
        caller_input_rate=1_000_000.0,
        caller_output_bytes=cap,
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((endpoint.host, endpoint.port))
    sock.setblocking(False)
    ask = bytes([IAC, DO, TIMING_MARK]) * 100_000  # asks for 300 KB of replies, never read
    sending = asyncio.create_task(asyncio.get_running_loop().sock_sendall(sock, ask))
    largest = await _largest_output_until_ended(svc, seconds=1.0)
    sending.cancel()
    sock.close()
    assert not svc.sessions, "a caller that asks for replies and never reads them is cut off"
    assert largest <= cap + 16 * 1024


def _send_queue(svc: ReflectorService) -> int:
    """Bytes the kernel holds unacknowledged for the service's callers, all together."""
    total = 0
    for session in svc.sessions.values():
        if session.transport is not None:
            fileno = session.transport.get_extra_info("socket").fileno()
            total += struct.unpack("i", fcntl.ioctl(fileno, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return total


async def test_non_reading_caller_pins_little_kernel_memory(
    start_server: StartServer, service: Service
) -> None:
    """Before: the kernel grew the caller's send buffer to megabytes, under our output cap."""
    svc, endpoint = await service(await start_server(Verbose()))
    _, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    largest = 0
    for _ in range(300):
        await asyncio.sleep(0.01)
        largest = max(largest, _send_queue(svc))
        if not svc.sessions:
            break
    assert largest <= 2 * CALLER_SEND_BUFFER + 64 * 1024
    writer.close()


async def test_non_reading_caller_is_reset_after_the_write_timeout(
    start_server: StartServer, service: Service
) -> None:
    """Output the kernel still held after the test was abandoned with the socket (before)."""
    svc, endpoint = await service(
        await start_server(FakeMailServer(hostname="mx." + "x" * 200 + ".test")),
        caller_write_timeout=1.0,
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect((endpoint.host, endpoint.port))
    for _ in range(200):
        await asyncio.sleep(0.02)
        if not svc.sessions:
            break
    assert not svc.sessions
    await asyncio.sleep(2.5)  # the write timeout, and the kernel's next window probe
    sock.settimeout(2)
    with pytest.raises(ConnectionResetError):
        while sock.recv(65536):
            pass
    sock.close()


async def test_callers_that_leave_at_once_do_not_use_up_the_global_rate(
    start_server: StartServer, service: Service
) -> None:
    """Before: each connect-and-close spent a global token, and everyone else was refused."""
    svc, endpoint = await service(
        await start_server(FakeMailServer()), rate_limit=True, rate_global=0.1
    )
    for number in range(5):
        session = TelnetSession(svc)
        session.connection_made(_FakeTransport((f"127.0.{100 + number}.1", 40000)))
        session.connection_lost(None)
    await asyncio.sleep(0.05)
    assert "System appeared to reject relay attempts" in await call(endpoint)
    # A test that did run keeps its token: the next caller waits.
    assert (await call(endpoint, source="127.0.0.8"))[0].startswith("Too many tests from everyone")


async def test_a_hang_up_lets_at_most_one_more_command_out(
    start_server: StartServer, service: Service
) -> None:
    """Before: a FIN was re-checked only 0.25 s later, and DATA followed RCPT for nobody."""
    mail = FakeMailServer(relay=relays_everything, reply_delay=0.2)
    _, endpoint = await service(await start_server(mail), registry=InMemoryRegistry())
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    # Hang up while the server thinks over an accepted probe's RCPT: its DATA would follow.
    await asyncio.wait_for(reader.readuntil(b">>> RCPT TO:<nobody-"), 10)
    mail.closed.clear()
    at_hang_up = len(mail.commands)
    writer.close()
    await asyncio.wait_for(mail.closed.wait(), 1.0)
    after = [command for command in mail.commands[at_hang_up:] if command not in (b"QUIT", b"RSET")]
    assert len(after) <= 1, after
    assert mail.commands[-1] == b"QUIT"
