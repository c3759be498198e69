"""Two `relayprobe serve` processes sharing one Redis and one PostgreSQL, end to end (issue 12).

Replica B's canary sink is the one the open Postfix delivers to (127.0.0.1:2525), replica A's
listens elsewhere: a test run by A is confirmed only if B's sink tells A through Redis. Each
caller connects from its own loopback address, where a real Postfix (or a fake mail server)
answers, so a caller's address says which server was tested.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayprobe.fakemx import FakeMailServer
from relayprobe.operations.config import Endpoint
from relayprobe.relaytest.probes import SUITES
from tests.frontdoors.test_web import CURL, request
from tests.infra import postfix
from tests.infra.command import relayprobe
from tests.infra.haproxy import free_port, haproxy_available, running_haproxy
from tests.infra.replicas import (
    HOST,
    Cluster,
    Replica,
    running_cluster,
    running_replicas,
    shared_servers_unavailable,
)
from tests.infra.skip import skip_or_fail
from tests.operations.test_operations import (
    BY_ADDRESS,
    VERDICT_LINE,
    listed_targets,
    metric,
    probes_received,
    serving_mail,
)

CALL_TIMEOUT_S = 30.0
SAVED_TIMEOUT_S = 10.0
CONFIRM_WAIT_S = 10
# As tests/relaytest/test_postfix.py; loose limits but one test per address a minute.
COMMON = [
    *("--test-domain", postfix.TEST_DOMAIN, "--reply-timeout", "10"),
    *("--confirm-wait", str(CONFIRM_WAIT_S)),
    *("--rate-address-interval", "60", "--rate-prefix-tests", "100", "--rate-global", "1000"),
]
RELAYED = re.compile(r":Relayed: (Quote test|Test \d+) arrived after \d+\.\d s from \S+")
LIVE_AFTER_S = 0.5
FULL_RESULT = re.compile(r"Full result: (?P<base>http://\S+)/results/(?P<id>[A-Za-z0-9_-]+)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Replicas A and B on one Redis and one PostgreSQL; the open Postfix delivers to B's sink."""
    reason = shared_servers_unavailable()
    if reason is not None:
        skip_or_fail(reason)
    a_sink = Endpoint(postfix.SINK_HOST, free_port(postfix.SINK_HOST))
    b_sink = Endpoint(postfix.SINK_HOST, postfix.SINK_PORT)
    options = {
        "a": [*COMMON, "--sink-listen", str(a_sink)],
        # Slow enough that Postfix's deliveries take seconds (no burst past 40 replies), with
        # room for every connection Postfix opens to one destination at once (20).
        "b": [
            *COMMON,
            *("--sink-listen", str(b_sink), "--sink-replies-per-second", "40"),
            *("--sink-max-connections-per-address", "20"),
        ],
    }
    with running_cluster(tmp_path_factory.mktemp("replicas"), options) as started:
        yield started


async def timed_call(endpoint: Endpoint, *, source: str) -> list[tuple[float, str]]:
    """Telnet from `source` until the service hangs up: each line (without its CRLF) and the
    seconds from the start of the call until it was read."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(
        endpoint.host, endpoint.port, local_addr=(source, 0)
    )
    lines = []
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            while line := await reader.readline():
                lines.append((time.monotonic() - started, line.decode().removesuffix("\r\n")))
    finally:
        writer.close()
    return lines


async def call(endpoint: Endpoint, *, source: str) -> list[str]:
    return [line for _, line in await timed_call(endpoint, source=source)]


def counter(replica: Replica, name: str, **labels: str) -> float:
    status, body = replica.get("/metrics")
    assert status == 200, (replica.name, status, body)
    return metric(body, name, **labels)


@pytest.mark.postfix
@pytest.mark.usefixtures("postfix_instances")
async def test_a_relay_delivered_to_the_other_replica_is_confirmed_live(cluster: Cluster) -> None:
    a, b = cluster.replicas
    assert [r.get("/readyz") for r in cluster.replicas] == [(200, "ready")] * 2
    deliveries = {r.name: counter(r, "relayprobe_sink_deliveries_total") for r in cluster.replicas}

    timed = await timed_call(a.telnet, source=postfix.OPEN_HOST)

    lines = [line for _, line in timed]
    assert f"Connecting to {postfix.OPEN_HOST} ..." in lines
    (waiting_from,) = [
        read_at
        for read_at, line in timed
        if line == f":Waiting up to {CONFIRM_WAIT_S} s for relayed test messages ..."
    ]
    relayed = [(read_at, line) for read_at, line in timed if RELAYED.fullmatch(line)]
    assert relayed, lines
    # B's sink is slow: some messages arrive while A waits, and A hears of each through Redis
    # (a look back when the wait begins would miss them), then stops waiting once all are in.
    assert max(read_at for read_at, _ in relayed) - waiting_from >= LIVE_AFTER_S, relayed
    assert timed[-1][0] - waiting_from < CONFIRM_WAIT_S, timed[-1]
    (confirmed,) = [line for line in lines if line.startswith("Relay confirmed: ")]
    assert confirmed.startswith(f"Relay confirmed: {len(relayed)} of {len(relayed)} "), confirmed
    assert FULL_RESULT.fullmatch(lines[-1]), lines[-3:]
    # Every test message went to B's sink; none to A's.
    assert counter(b, "relayprobe_sink_deliveries_total") - deliveries["b"] == len(relayed)
    assert counter(a, "relayprobe_sink_deliveries_total") == deliveries["a"]


@pytest.mark.postfix
@pytest.mark.usefixtures("postfix_instances")
async def test_one_address_is_rate_limited_across_replicas_and_doors(cluster: Cluster) -> None:
    a, b = cluster.replicas
    caller = postfix.CLOSED_HOST
    refused = counter(b, "relayprobe_refusals_total", reason=BY_ADDRESS.reason)

    assert VERDICT_LINE in await call(a.telnet, source=caller)
    telnet_b = await call(b.telnet, source=caller)
    status, headers, body = await request(b.web, CURL, source=caller)

    assert len(telnet_b) == 1, telnet_b
    for line in (telnet_b[0], body.decode().removesuffix("\n")):
        match = re.fullmatch(BY_ADDRESS.pattern, line)
        assert match is not None, line
        assert 1 <= int(match[1]) <= BY_ADDRESS.longest_wait_s
    assert status == 429
    assert 1 <= int(headers["retry-after"]) <= BY_ADDRESS.longest_wait_s
    assert counter(b, "relayprobe_refusals_total", reason=BY_ADDRESS.reason) == refused + 2


async def stored_result(replica: Replica, result_id: str) -> dict[str, object]:
    """The result `result_id` as JSON from `replica`'s web door, once some replica saved it."""
    async with asyncio.timeout(SAVED_TIMEOUT_S):
        while True:
            status, _, body = await request(
                replica.web, f"GET /results/{result_id}.json HTTP/1.1\nHost: relay-test.example"
            )
            if status == 200:
                found: dict[str, object] = json.loads(body)
                return found
            assert status == 404, (status, body)
            await asyncio.sleep(0.05)


@pytest.mark.postfix
@pytest.mark.usefixtures("postfix_instances")
async def test_a_result_made_on_one_replica_opens_on_the_other_and_in_history(
    cluster: Cluster,
) -> None:
    a, b = cluster.replicas
    caller = postfix.TLS_CLOSED_HOST
    lines = await call(a.telnet, source=caller)
    link = FULL_RESULT.fullmatch(lines[-1])
    assert link is not None and link["base"] == a.public_url, lines[-3:]
    result_id = link["id"]

    found = await stored_result(b, result_id)
    assert (found["target"], found["verdict"]) == (caller, "rejected")
    assert found["url"] == f"{b.public_url}/results/{result_id}"
    assert found["transcript"] == lines
    status, headers, page = await request(
        b.web, f"GET /results/{result_id} HTTP/1.1\nHost: relay-test.example"
    )
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert VERDICT_LINE in page.decode()

    database = ("--database-url", cluster.shared.postgres.url)
    listing = await relayprobe("history", *database)
    assert listing.returncode == 0, listing.stderr
    assert caller in listed_targets(listing.stdout)
    shown = await relayprobe("history", "--show", result_id, *database)
    assert shown.returncode == 0, shown.stderr
    assert f"Public ID: {result_id}" in shown.stdout.splitlines()
    assert VERDICT_LINE in shown.stdout.splitlines()


@pytest.mark.haproxy
async def test_haproxy_keeps_each_callers_address_on_both_replicas(
    cluster: Cluster, tmp_path: Path
) -> None:
    reason = haproxy_available()
    if reason is not None:
        skip_or_fail(reason)
    callers = ("127.0.0.7", "127.0.0.8")
    servers = {caller: FakeMailServer() for caller in callers}
    async with serving_mail(servers) as port:
        behind_proxy = [
            *("--proxy-protocol", "--trusted-proxy", "127.0.0.1/32"),
            *("--target-port", str(port), "--reply-timeout", "2", "--no-rate-limit"),
        ]
        options = {
            name: [*behind_proxy, "--sink-listen", str(Endpoint(HOST, free_port(HOST)))]
            for name in ("a", "b")
        }
        # Blocking the loop while they start is harmless: nothing of this test runs meanwhile.
        with running_replicas(tmp_path, options, cluster.shared) as (a, b):
            async with running_haproxy(
                tmp_path, backends=[a.telnet, b.telnet], proxy_version=2
            ) as frontend:
                # HAProxy takes the replicas in turn: a caller's two calls in a row reach both.
                calls = [
                    (caller, await call(frontend, source=caller))
                    for caller in callers
                    for _ in range(2)
                ]
            refused = [counter(r, "relayprobe_refusals_total", reason="proxy") for r in (a, b)]
            tested = {
                r.name: sorted(record["target"] for record in r.log_events("session_start"))
                for r in (a, b)
            }

    for caller, lines in calls:
        assert lines[0] == f"Connecting to {caller} ...", lines
        assert VERDICT_LINE in lines, lines
    assert tested == {"a": sorted(callers), "b": sorted(callers)}
    assert refused == [0, 0]
    for server in servers.values():
        assert probes_received(server) == 2 * len(SUITES["classic"])
