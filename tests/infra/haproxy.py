"""A real HAProxy in TCP mode for one test, in front of backends that take the PROXY protocol.

`running_haproxy` writes a configuration into a test's directory, runs `haproxy -f CFG -db` in
the foreground on a free loopback port, returns once that port listens and stops HAProxy when
the block ends. Connections go to the backends in turn (round robin). HAProxy checks nothing on
its own (no health checks), so the backends see only the connections a test makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Literal

from relayprobe.operations.config import Endpoint

HAPROXY = Path("/usr/sbin/haproxy")
ProxyVersion = Literal[1, 2]
SERVER_OPTIONS: dict[ProxyVersion, str] = {1: "send-proxy", 2: "send-proxy-v2"}

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
_POLL_S = 0.02
_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp


class HAProxyStartError(RuntimeError):
    """HAProxy exited or did not listen in time; the message carries its output."""


def haproxy_available() -> str | None:
    """Why HAProxy tests must skip, or None when they can run."""
    if not HAPROXY.exists():
        return f"{HAPROXY} is missing (run .ci/system-packages as root)"
    return None


def haproxy_config(
    *, frontend: Endpoint, backends: Sequence[Endpoint], proxy_version: ProxyVersion
) -> str:
    """A TCP-mode configuration relaying `frontend` to `backends` in turn with a PROXY header."""
    return "\n".join(
        [
            "global",
            "    maxconn 256",
            "defaults",
            "    mode tcp",
            "    timeout connect 2s",
            "    timeout client 30s",
            "    timeout server 30s",
            "frontend relay",
            f"    bind {frontend}",
            "    default_backend reflector",
            "backend reflector",
            "    balance roundrobin",
            *(
                f"    server reflector{number} {backend} {SERVER_OPTIONS[proxy_version]}"
                for number, backend in enumerate(backends)
            ),
            "",
        ]
    )


def free_port(host: str) -> int:
    """A TCP port nothing on `host` uses right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def is_listening(endpoint: Endpoint) -> bool:
    """Whether an IPv4 TCP socket listens on `endpoint`, from /proc/net/tcp.

    Connecting would tell too, but HAProxy would pass that connection on to the backend.
    """
    # The kernel prints the address as the host-order number of its network-order bytes.
    address = int.from_bytes(socket.inet_aton(endpoint.host), sys.byteorder)
    local = f"{address:08X}:{endpoint.port:04X}"
    with Path("/proc/net/tcp").open() as table:
        next(table)
        return any(
            fields[1] == local and fields[3] == _TCP_LISTEN
            for fields in (line.split() for line in table)
        )


@contextlib.asynccontextmanager
async def running_haproxy(
    directory: Path,
    *,
    backends: Sequence[Endpoint],
    proxy_version: ProxyVersion,
    host: str = "127.0.0.1",
) -> AsyncIterator[Endpoint]:
    """Run HAProxy relaying to `backends` while in the block; yield the address it listens on."""
    frontend = Endpoint(host, free_port(host))
    config = directory / f"haproxy-v{proxy_version}.cfg"
    config.write_text(
        haproxy_config(frontend=frontend, backends=backends, proxy_version=proxy_version)
    )
    output = directory / f"haproxy-v{proxy_version}.log"
    with output.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            str(HAPROXY),
            "-f",
            str(config),
            "-db",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        await _wait_listening(process, frontend, output)
        yield frontend
    finally:
        await _stop(process)


async def _wait_listening(
    process: asyncio.subprocess.Process, frontend: Endpoint, output: Path
) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not is_listening(frontend):
        if process.returncode is not None:
            raise HAProxyStartError(
                f"haproxy exited {process.returncode}: {output.read_text().strip()}"
            )
        if time.monotonic() >= deadline:
            raise HAProxyStartError(
                f"haproxy did not listen on {frontend} in {_START_TIMEOUT_S:g} s: "
                f"{output.read_text().strip()}"
            )
        await asyncio.sleep(_POLL_S)


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), _STOP_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await asyncio.wait_for(process.wait(), _STOP_TIMEOUT_S)
