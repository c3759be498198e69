"""The session core: admission shared by every front door, counting, reporting, links."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress

from relayprobe.fakemx import FakeMailServer, relays_nothing
from relayprobe.frontdoors.core import BUSY, EndReason, RunningTest, SessionCore, Ticket
from relayprobe.operations.config import Endpoint, Settings
from relayprobe.relaytest.events import Event
from relayprobe.reports.result import TestResult
from tests.conftest import StartServer

CALLER = ipaddress.ip_address("127.0.0.1")


def settings(**changes: object) -> Settings:
    base = Settings(listen=(Endpoint("127.0.0.1", 0),), reply_timeout=2.0, motd="")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


async def admit(core: SessionCore, caller: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Ticket:
    ticket = await core.admit(caller, door="test", session_id=core.next_session_id())
    assert isinstance(ticket, Ticket), ticket
    return ticket


async def test_a_page_view_asks_without_using_up_the_rate_limit() -> None:
    core = SessionCore(settings(rate_limit=True, rate_address_interval=60.0))
    for _ in range(3):
        assert await core.admission(CALLER) is None
    await admit(core, CALLER)
    refusal = await core.admission(CALLER)
    assert refusal is not None and refusal.reason == "rate_address"
    assert refusal.retry_after_s is not None and 1 <= refusal.retry_after_s <= 60
    again = await core.admit(CALLER, door="other door", session_id=core.next_session_id())
    assert again == refusal


async def test_access_lists_refuse_without_a_retry() -> None:
    core = SessionCore(settings(allow=("192.0.2.0/24",)))
    refusal = await core.admit(CALLER, door="test", session_id=1)
    assert not isinstance(refusal, Ticket)
    assert (refusal.reason, refusal.retry_after_s) == ("access", None)


async def test_a_test_cancelled_before_its_first_step_is_uncounted_and_refunded(
    start_server: StartServer,
) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing))
    core = SessionCore(settings(target_port=port, max_sessions=1, rate_global=1.0))
    done: list[RunningTest] = []
    running = core.start(await admit(core, CALLER), on_lines=lambda *_: None, on_done=done.append)
    assert await core.admit(CALLER, door="test", session_id=2) == BUSY
    running.stop(EndReason.CLIENT_CLOSED)
    # The task ends, then its done-callback's refund (a task of its own, for a shared limiter).
    for _ in range(4):
        await asyncio.sleep(0)
    assert core.running == {}
    assert [d.end_reason for d in done] == [EndReason.CLIENT_CLOSED]
    # The global token came back: another address may test at once.
    assert isinstance(
        await core.admit(ipaddress.ip_address("127.0.0.2"), door="t", session_id=3), Ticket
    )


async def test_a_stored_result_ends_with_its_link_and_reaches_the_history(
    start_server: StartServer,
) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing))
    stored: list[TestResult] = []
    core = SessionCore(
        settings(target_port=port, public_url="https://relay-test.example", motd="Hello\nthere"),
        on_result=stored.append,
    )
    shown: list[tuple[Event, tuple[str, ...]]] = []
    running = core.start(
        await admit(core, CALLER), on_lines=lambda e, lines: shown.append((e, lines))
    )
    assert running.task is not None
    result = await running.task
    await asyncio.sleep(0)
    assert stored == [result]
    assert result.result_id is not None and len(result.result_id) == 22
    link = f"Full result: https://relay-test.example/results/{result.result_id}"
    lines = [line for _, block in shown for line in block]
    assert lines[:2] == ["Hello", "there"]
    assert lines[-1] == link
    assert list(result.transcript) == lines
    assert result.to_json()["id"] == result.result_id


async def test_without_a_history_there_is_no_id_and_no_link(start_server: StartServer) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing))
    core = SessionCore(settings(target_port=port, public_url="https://relay-test.example"))
    result = await core.run(CALLER, lambda *_: None)
    assert result.result_id is None
    assert not any(line.startswith("Full result:") for line in result.transcript)


async def test_a_failing_test_is_an_internal_error_not_a_crash(
    start_server: StartServer,
) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing))
    core = SessionCore(settings(target_port=port))

    def broken(event: Event, lines: tuple[str, ...]) -> None:
        raise RuntimeError("renderer bug")

    done: list[RunningTest] = []
    running = core.start(await admit(core, CALLER), on_lines=broken, on_done=done.append)
    assert running.task is not None
    await asyncio.wait([running.task])
    await asyncio.sleep(0)
    assert [d.end_reason for d in done] == [EndReason.INTERNAL_ERROR]
    assert core.running == {}


async def test_stop_all_refuses_newcomers_and_stops_every_test(start_server: StartServer) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing, reply_delay=5.0))
    core = SessionCore(settings(target_port=port))
    running = [
        core.start(
            await admit(core, ipaddress.ip_address(f"127.0.0.{n}")), on_lines=lambda *_: None
        )
        for n in (1, 2)
    ]
    tasks = list(core.stop_all(EndReason.SHUTDOWN))
    await asyncio.wait(tasks)
    assert [r.end_reason for r in running] == [EndReason.SHUTDOWN, EndReason.SHUTDOWN]
    assert await core.admit(CALLER, door="test", session_id=9) == BUSY
