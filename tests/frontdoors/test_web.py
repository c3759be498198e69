"""The public web front door on loopback: curl's stream, NDJSON, pages, refusals, hang-ups."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import h11
import pytest

from relayprobe.fakemx import FakeMailServer, relays_like_qmail, relays_nothing
from relayprobe.frontdoors.core import EndReason, SessionCore
from relayprobe.frontdoors.telnet import ReflectorService
from relayprobe.frontdoors.web import WebFrontDoor
from relayprobe.operations.config import Endpoint, Settings
from relayprobe.reports.result import TestResult, new_result_id
from relayprobe.storage.history import HistoryUnavailableError
from tests.conftest import StartServer

Reply = tuple[int, dict[str, str], bytes]
Door = tuple[WebFrontDoor, Endpoint]
StartDoor = Callable[..., Awaitable[Door]]


@pytest.fixture
async def start_door() -> AsyncIterator[StartDoor]:
    started: list[WebFrontDoor] = []

    async def start(
        target_port: int,
        *,
        results: dict[str, dict[str, Any] | Exception] | None = None,
        on_result: Callable[[TestResult], None] | None = None,
        **changes: object,
    ) -> Door:
        base = Settings(
            listen=(Endpoint("127.0.0.1", 0),), reply_timeout=2.0, rate_limit=False, motd=""
        )
        settings = dataclasses.replace(base, target_port=target_port, **changes)  # type: ignore[arg-type]

        async def find(result_id: str) -> dict[str, Any] | None:
            found = (results or {}).get(result_id)
            if isinstance(found, Exception):
                raise found
            return found

        door = WebFrontDoor(SessionCore(settings, on_result=on_result), results=find)
        (endpoint,) = await door.start((Endpoint("127.0.0.1", 0),))
        started.append(door)
        return door, endpoint

    yield start
    for door in started:
        door.core.stop_all(EndReason.SHUTDOWN)
        await door.stop()


async def request(
    endpoint: Endpoint, head: str, *, source: str = "127.0.0.1", body: bytes = b""
) -> Reply:
    """Send `head` (CRLF added) and read the whole response, chunked or not, with h11."""
    reader, writer = await asyncio.open_connection(
        endpoint.host, endpoint.port, local_addr=(source, 0)
    )
    writer.write(head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body)
    client = h11.Connection(h11.CLIENT)
    method = head.split(" ", 1)[0]
    client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    status, headers, data = 0, {}, bytearray()
    async with asyncio.timeout(20):
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await reader.read(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    writer.close()
    return status, headers, bytes(data)


CURL = "GET / HTTP/1.1\nHost: relay-test.example\nUser-Agent: curl/7.88.1\nAccept: */*"
BROWSER = (
    "GET / HTTP/1.1\nHost: relay-test.example\nSec-Fetch-Site: none\nSec-Fetch-Mode: navigate\n"
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
)
POST = (
    "POST /test HTTP/1.1\nHost: relay-test.example\nOrigin: http://relay-test.example\n"
    "Sec-Fetch-Site: same-origin\nAccept: application/x-ndjson\nContent-Length: 0"
)


async def test_curl_gets_the_telnet_transcript_streamed_as_text(
    start_server: StartServer, start_door: StartDoor
) -> None:
    stored: list[TestResult] = []
    port = await start_server(FakeMailServer(relay=relays_like_qmail))
    _, endpoint = await start_door(
        port, public_url="https://relay-test.example", on_result=stored.append, motd="Hi there"
    )
    status, headers, body = await request(endpoint, CURL)
    assert status == 200
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["transfer-encoding"] == "chunked"
    assert headers["x-accel-buffering"] == "no"
    lines = body.decode().splitlines()
    assert lines[:2] == ["Hi there", "Connecting to 127.0.0.1 ..."]
    assert ">>> RCPT TO:<nobody%relaytest.invalid@[127.0.0.1]>" in lines
    assert "System appeared to accept 12 relay attempts" in lines
    (result,) = stored
    assert lines[-1] == f"Full result: https://relay-test.example/results/{result.result_id}"
    assert lines == list(result.transcript)


async def test_ndjson_has_each_line_each_probe_and_the_result_last(
    start_server: StartServer, start_door: StartDoor
) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing))
    _, endpoint = await start_door(port)
    status, headers, body = await request(endpoint, CURL.replace("*/*", "application/x-ndjson"))
    assert (status, headers["content-type"]) == (200, "application/x-ndjson")
    records = [json.loads(line) for line in body.decode().splitlines()]
    assert {record["type"] for record in records} == {"line", "probe", "result"}
    assert records[0] == {"type": "line", "text": "Connecting to 127.0.0.1 ..."}
    probes = [record for record in records if record["type"] == "probe"]
    assert len(probes) == 20 and {p["outcome"] for p in probes} == {"rejected"}
    last = records[-1]
    assert last["type"] == "result"
    assert last["result"]["verdict"] == "rejected"
    assert (last["result"]["id"], last["result"]["url"]) == (None, None)
    shown = [record["text"] for record in records if record["type"] == "line"]
    assert shown == last["result"]["transcript"]


async def test_query_format_ndjson_wins_over_accept(
    start_server: StartServer, start_door: StartDoor
) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing))
    _, endpoint = await start_door(port)
    _, headers, body = await request(endpoint, CURL.replace("GET / ", "GET /?format=ndjson "))
    assert headers["content-type"] == "application/x-ndjson"
    assert json.loads(body.splitlines()[-1])["type"] == "result"


async def test_a_browser_gets_a_page_and_no_test(
    start_server: StartServer, start_door: StartDoor
) -> None:
    mail = FakeMailServer(relay=relays_nothing)
    port = await start_server(mail)
    door, endpoint = await start_door(port)
    status, headers, body = await request(endpoint, BROWSER)
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    nonce = headers["content-security-policy"].split("'nonce-", 1)[1].split("'", 1)[0]
    page = body.decode()
    assert f'nonce="{nonce}"' in page
    assert "127.0.0.1" in page, page
    assert "curl -N http://relay-test.example/" in page
    assert "You can test this address now." in page
    assert mail.commands == []
    assert door.core.metrics.registry.get_sample_value("relayprobe_tests_started_total") == 0


async def test_a_same_origin_post_runs_the_test(
    start_server: StartServer, start_door: StartDoor
) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing))
    _, endpoint = await start_door(port)
    status, _, body = await request(endpoint, POST)
    assert status == 200
    assert json.loads(body.splitlines()[-1])["result"]["verdict"] == "rejected"


@pytest.mark.parametrize(
    "head",
    [
        # <img src="http://relay-test.example/"> on another site
        "GET / HTTP/1.1\nHost: relay-test.example\nSec-Fetch-Site: cross-site\nAccept: image/*",
        # a form or fetch() from another site
        POST.replace("same-origin", "cross-site").replace(
            "Origin: http://relay-test.example", "Origin: https://evil.example"
        ),
        # a sibling host of the same site
        POST.replace("same-origin", "same-site"),
        # neither Origin nor Sec-Fetch-Site
        "POST /test HTTP/1.1\nHost: relay-test.example\nContent-Length: 0",
    ],
)
async def test_cross_site_requests_start_no_test(
    head: str, start_server: StartServer, start_door: StartDoor
) -> None:
    mail = FakeMailServer(relay=relays_nothing)
    port = await start_server(mail)
    _, endpoint = await start_door(port)
    status, _, body = await request(endpoint, head)
    assert status == 403
    assert body.decode().startswith("A request from another site does not start a test")
    assert mail.commands == []


async def test_refusals_are_a_status_and_one_line(
    start_server: StartServer, start_door: StartDoor
) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing))
    _, endpoint = await start_door(port, allow=("192.0.2.0/24",))
    status, headers, body = await request(endpoint, CURL)
    assert (status, body) == (403, b"This service tests only customer networks\n")
    assert "retry-after" not in headers


async def test_telnet_and_web_share_the_rate_limit(
    start_server: StartServer, start_door: StartDoor
) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing))
    door, endpoint = await start_door(port, rate_limit=True, rate_address_interval=60.0)
    telnet = ReflectorService(door.core)
    (telnet_endpoint,) = await telnet.start()
    try:
        reader, writer = await asyncio.open_connection(telnet_endpoint.host, telnet_endpoint.port)
        async with asyncio.timeout(20):
            transcript = await reader.read()
        writer.close()
        assert b"System appeared to reject relay attempts" in transcript
        status, headers, body = await request(endpoint, CURL)
        assert status == 429
        assert 1 <= int(headers["retry-after"]) <= 60
        assert body.decode().startswith("Too many tests from your address; try again in ")
    finally:
        await telnet.shutdown(grace=1.0)


async def test_busy_is_503_with_retry_after(
    start_server: StartServer, start_door: StartDoor
) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing, reply_delay=5.0))
    door, endpoint = await start_door(port, max_sessions=1)
    first = asyncio.create_task(request(endpoint, CURL))
    async with asyncio.timeout(5):
        while not door.core.running:
            await asyncio.sleep(0.01)
    status, headers, body = await request(endpoint, CURL, source="127.0.0.2")
    assert (status, headers["retry-after"]) == (503, "60")
    assert body == b"Too many tests running, try again in a minute\n"
    first.cancel()


async def test_a_client_that_hangs_up_stops_its_test_within_a_second(
    start_server: StartServer, start_door: StartDoor
) -> None:
    mail = FakeMailServer(relay=relays_nothing, reply_delay=0.2)
    port = await start_server(mail)
    door, endpoint = await start_door(port)
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    writer.write(CURL.replace("\n", "\r\n").encode() + b"\r\n\r\n")
    async with asyncio.timeout(5):
        assert b"Connecting to" in await reader.readuntil(b"Connecting to")
        assert door.core.running
    writer.transport.abort()
    async with asyncio.timeout(1.5):
        while door.core.running:
            await asyncio.sleep(0.01)
    commands = len(mail.commands)
    await asyncio.sleep(0.5)
    assert len(mail.commands) <= commands + 1, "the test went on after the hang-up"


async def test_shutdown_tells_a_streaming_client(
    start_server: StartServer, start_door: StartDoor
) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing, reply_delay=0.5))
    door, endpoint = await start_door(port)
    reading = asyncio.create_task(request(endpoint, CURL))
    async with asyncio.timeout(5):
        while not door.core.running:
            await asyncio.sleep(0.01)
    await asyncio.wait(list(door.core.stop_all(EndReason.SHUTDOWN)), timeout=2)
    status, _, body = await reading
    assert status == 200
    assert body.decode().splitlines()[-1] == ":Service shutting down"


async def test_head_runs_no_test(start_server: StartServer, start_door: StartDoor) -> None:
    mail = FakeMailServer(relay=relays_nothing)
    port = await start_server(mail)
    _, endpoint = await start_door(port)
    status, headers, body = await request(endpoint, CURL.replace("GET", "HEAD"))
    assert (status, body, headers["content-type"]) == (200, b"", "text/plain; charset=utf-8")
    assert mail.commands == []


async def test_stored_results_are_pages_and_json_and_404_otherwise(
    start_server: StartServer, start_door: StartDoor
) -> None:
    port = await start_server(FakeMailServer(relay=relays_like_qmail))
    stored: list[TestResult] = []
    _, endpoint = await start_door(port, on_result=stored.append)
    await request(endpoint, CURL)
    (result,) = stored
    assert result.result_id is not None
    results = {result.result_id: result.to_json()}
    _, endpoint = await start_door(port, results=results)
    status, headers, body = await request(
        endpoint, f"GET /results/{result.result_id}.json HTTP/1.1\nHost: x"
    )
    assert (status, headers["content-type"]) == (200, "application/json")
    assert json.loads(body) == {**result.to_json(), "url": None}
    status, headers, body = await request(
        endpoint, f"GET /results/{result.result_id} HTTP/1.1\nHost: x"
    )
    assert status == 200 and "content-security-policy" in headers
    assert b"System appeared to accept 12 relay attempts" in body
    for path in ("/results/unknownunknownunknown1", "/results/x.json", "/metrics", "/healthz"):
        assert (await request(endpoint, f"GET {path} HTTP/1.1\nHost: x"))[0] == 404


async def test_a_result_the_history_cannot_read_now_is_503_with_retry_after(
    start_door: StartDoor,
) -> None:
    result_id = new_result_id()
    unavailable = HistoryUnavailableError("the history is unavailable: connection refused")
    _, endpoint = await start_door(1, results={result_id: unavailable})
    for path in (f"/results/{result_id}", f"/results/{result_id}.json"):
        status, headers, body = await request(endpoint, f"GET {path} HTTP/1.1\nHost: x")
        assert (status, headers["retry-after"]) == (503, "60")
        assert body == b"The result history is unavailable for now, try again in a minute\n"


async def test_x_forwarded_for_from_a_trusted_proxy_names_the_caller(
    start_server: StartServer, start_door: StartDoor
) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing))
    _, endpoint = await start_door(port, trusted_proxy=("127.0.0.0/8",), allow=("127.0.0.9/32",))
    assert (await request(endpoint, CURL))[0] == 403
    status, _, body = await request(endpoint, f"{CURL}\nX-Forwarded-For: 127.0.0.9")
    assert status == 200
    assert body.decode().splitlines()[0] == "Connecting to 127.0.0.9 ..."


async def test_x_forwarded_for_lines_are_read_together_and_an_unreadable_hop_is_400(
    start_server: StartServer, start_door: StartDoor
) -> None:
    """A proxy such as HAProxy (`option forwardfor`) appends a line of its own: the client's
    forged line comes first and must not name the caller."""
    port = await start_server(FakeMailServer(relay=relays_nothing))
    _, endpoint = await start_door(port, trusted_proxy=("127.0.0.1/32",), allow=("127.0.0.8/32",))
    forged = f"{CURL}\nX-Forwarded-For: 127.0.0.9\nX-Forwarded-For: 127.0.0.8"
    status, _, body = await request(endpoint, forged)
    assert status == 200
    assert body.decode().splitlines()[0] == "Connecting to 127.0.0.8 ..."
    status, _, body = await request(endpoint, f"{CURL}\nX-Forwarded-For: 127.0.0.8, unknown")
    assert (status, body) == (400, b"unreadable X-Forwarded-For\n")
