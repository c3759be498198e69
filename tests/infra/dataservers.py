"""Real Redis and PostgreSQL servers for one test session: loopback, throwaway data, stopped after.

Debian's `redis-server` and `postgresql` packages (installed by .ci/system-packages) provide the
binaries; no system service is used. Each server gets a free 127.0.0.1 port and a data directory
of its own under a temporary directory. `RedisServer.pause`/`resume` stop and continue the
process (SIGSTOP/SIGCONT), for tests of a server that hangs; `stop`/`start` for one that is down.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.infra.skip import skip_or_fail

REDIS_SERVER = Path("/usr/bin/redis-server")
_POSTGRES_ROOT = Path("/usr/lib/postgresql")
_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {_START_TIMEOUT_S:g} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_STOP_TIMEOUT_S)


def _postgres_bin() -> Path | None:
    versions = sorted(_POSTGRES_ROOT.glob("*/bin/postgres"))
    return versions[-1].parent if versions else None


def redis_available() -> str | None:
    return None if REDIS_SERVER.exists() else f"{REDIS_SERVER} is missing (run .ci/system-packages)"


def postgres_available() -> str | None:
    if _postgres_bin() is None:
        return "PostgreSQL is not installed (run .ci/system-packages)"
    return None


@dataclass
class RedisServer:
    """A redis-server on 127.0.0.1, nothing saved to disk."""

    directory: Path
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(REDIS_SERVER),
                *("--bind", "127.0.0.1", "--port", str(self.port)),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
                *("--enable-debug-command", "local", "--loglevel", "warning"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_listening(self.port, self.process, "redis-server")

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
            _stop(self.process)
            self.process = None

    def pause(self) -> None:
        """The server hangs: connections stay open, nothing is answered."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)


@dataclass
class PostgresServer:
    """A PostgreSQL cluster on 127.0.0.1, run as the `postgres` user; database `relayprobe`."""

    directory: Path
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://relayprobe@127.0.0.1:{self.port}/relayprobe"

    def _as_postgres(self, *command: str) -> list[str]:
        # PostgreSQL refuses to run as root.
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)

    def initialise(self) -> None:
        binaries = _postgres_bin()
        assert binaries is not None
        data = self.directory / "data"
        data.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
            shutil.chown(data, "postgres")
        subprocess.run(
            self._as_postgres(
                str(binaries / "initdb"),
                "-D",
                str(data),
                "-U",
                "relayprobe",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ),
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        binaries = _postgres_bin()
        assert binaries is not None
        self.process = subprocess.Popen(
            self._as_postgres(
                str(binaries / "postgres"),
                "-D",
                str(self.directory / "data"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.directory),
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_listening(self.port, self.process, "postgres")
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            created = subprocess.run(
                self._as_postgres(
                    str(binaries / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "relayprobe",
                    "relayprobe",
                ),
                capture_output=True,
                timeout=30,
            )
            if created.returncode == 0 or b"already exists" in created.stderr:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"createdb failed: {created.stderr.decode(errors='replace')}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop as an outage does, with clients connected: a fast shutdown (SIGINT to the
        postmaster) ends their sessions at once. SIGTERM through runuser would ask for a smart
        one, which waits for every client to leave; runuser then kills the server after 2 s,
        and it cannot start again."""
        if self.process is None:
            return
        pid_file = self.directory / "data" / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError, ProcessLookupError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(_STOP_TIMEOUT_S)
        _stop(self.process)
        self.process = None


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="relayprobe-redis-") as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    with tempfile.TemporaryDirectory(prefix="relayprobe-pg-") as directory:
        server = PostgresServer(Path(directory))
        server.initialise()
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def redis_or_skip() -> Iterator[RedisServer]:
    """`running_redis`, or the test skips (fails under CI) where redis-server is missing."""
    reason = redis_available()
    if reason is not None:
        skip_or_fail(reason)
    with running_redis() as server:
        yield server


@contextlib.contextmanager
def postgres_or_skip() -> Iterator[PostgresServer]:
    """`running_postgres`, or the test skips (fails under CI) where PostgreSQL is missing."""
    reason = postgres_available()
    if reason is not None:
        skip_or_fail(reason)
    with running_postgres() as server:
        yield server
