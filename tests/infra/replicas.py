"""`relayprobe serve` replicas as separate processes, sharing one Redis and one PostgreSQL.

`running_replicas` starts one `serve` per name (`python -m relayprobe`, without RELAYPROBE_*
variables), each with the caller's options and its own telnet door, web door and operators'
endpoint on free loopback ports, `--public-url` naming its web door and JSON logs in
`replica-NAME.log`; it returns once every /readyz answers 200 (a replica that exits or is not
ready in time fails with its output) and kills them when the block ends. `shared_servers`
starts the Redis and PostgreSQL they share; `running_cluster` both servers and the replicas.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayprobe.operations.config import Endpoint
from tests.infra.command import environment
from tests.infra.dataservers import (
    PostgresServer,
    RedisServer,
    postgres_available,
    redis_available,
    running_postgres,
    running_redis,
)
from tests.infra.haproxy import free_port

HOST = "127.0.0.1"
READY_TIMEOUT_S = 30.0
_POLL_S = 0.05
_HTTP_TIMEOUT_S = 2.0
_KILL_TIMEOUT_S = 10.0
# Only loopback is asked: no proxy from the environment may take the request elsewhere.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ReplicaStartError(RuntimeError):
    """A replica exited or was not ready in time; the message carries its output."""


@dataclass(frozen=True)
class Replica:
    name: str
    telnet: Endpoint
    web: Endpoint
    http: Endpoint
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def public_url(self) -> str:
        return f"http://{self.web}"

    def get(self, path: str) -> tuple[int | None, str]:
        """GET `path` on the operators' endpoint: status and body; None if nothing answers."""
        try:
            with _DIRECT.open(f"http://{self.http}{path}", timeout=_HTTP_TIMEOUT_S) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return None, ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log records of `event`, in order (other output is skipped)."""
        records = []
        for line in self.output().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    records.append(record)
        return records


@dataclass(frozen=True)
class SharedServers:
    redis: RedisServer
    postgres: PostgresServer

    def options(self) -> list[str]:
        return ["--redis-url", self.redis.url, "--database-url", self.postgres.url]


def shared_servers_unavailable() -> str | None:
    """Why replica tests must skip, or None when Redis and PostgreSQL can be started."""
    return redis_available() or postgres_available()


@contextlib.contextmanager
def shared_servers() -> Iterator[SharedServers]:
    """A Redis and a PostgreSQL on loopback while in the block."""
    with running_redis() as redis, running_postgres() as postgres:
        yield SharedServers(redis, postgres)


def _launch(directory: Path, name: str, options: Sequence[str]) -> Replica:
    telnet, web, http = (Endpoint(HOST, free_port(HOST)) for _ in range(3))
    log = directory / f"replica-{name}.log"
    argv = [
        *(sys.executable, "-m", "relayprobe", "serve"),
        *("--listen", str(telnet), "--web-listen", str(web), "--http-listen", str(http)),
        *("--public-url", f"http://{web}", "--log-format", "json"),
        *("--state-dir", str(directory / f"state-{name}")),
        *options,
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=environment(),
        )
    return Replica(name, telnet, web, http, log, process)


def _wait_ready(replica: Replica) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while replica.get("/readyz")[0] != 200:
        if replica.process.poll() is not None:
            raise ReplicaStartError(
                f"replica {replica.name} exited {replica.process.returncode}: {replica.output()}"
            )
        if time.monotonic() >= deadline:
            raise ReplicaStartError(
                f"replica {replica.name} was not ready within {READY_TIMEOUT_S:g} s: "
                f"{replica.output()}"
            )
        time.sleep(_POLL_S)


def _kill(replica: Replica) -> None:
    if replica.process.poll() is None:
        replica.process.kill()
        replica.process.wait(_KILL_TIMEOUT_S)


@contextlib.contextmanager
def running_replicas(
    directory: Path,
    options: Mapping[str, Sequence[str]],
    shared: SharedServers | None = None,
) -> Iterator[tuple[Replica, ...]]:
    """A replica per name in `options`, started together (on `shared`'s Redis and PostgreSQL
    when given), all ready while in the block."""
    common = [] if shared is None else shared.options()
    replicas: list[Replica] = []
    try:
        for name, own in options.items():
            replicas.append(_launch(directory, name, [*common, *own]))
        for replica in replicas:
            _wait_ready(replica)
        yield tuple(replicas)
    finally:
        for replica in replicas:
            _kill(replica)


@dataclass(frozen=True)
class Cluster:
    shared: SharedServers
    replicas: tuple[Replica, ...]


@contextlib.contextmanager
def running_cluster(directory: Path, options: Mapping[str, Sequence[str]]) -> Iterator[Cluster]:
    """A Redis, a PostgreSQL and a replica per name in `options` sharing them."""
    with shared_servers() as shared, running_replicas(directory, options, shared) as replicas:
        yield Cluster(shared, replicas)
