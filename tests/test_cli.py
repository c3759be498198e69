"""`relayprobe check` as a script sees it: exit status, last line and JSON, against fakes.

An accepted probe is not an open relay until its test message arrives (the qmail case), so
`check` has an exit status of its own for "accepted, not proven".
"""

from __future__ import annotations

import asyncio
import json
import sys

from relayprobe.cli import EXIT_BY_VERDICT
from relayprobe.fakemx import FakeMailServer, relays_everything, relays_like_qmail, relays_nothing
from tests.conftest import StartServer
from tests.infra.haproxy import free_port

FORMS_NOTE = (
    "Note: the 12 accepted recipients use address forms (%-hack, bang path, quoted local part, "
    "source route, two @ signs) that qmail and some other servers accept and then bounce; only "
    "delivery proves relaying"
)


async def check(port: int, *options: str, target: str = "127.0.0.1") -> tuple[int, list[str]]:
    """Run `relayprobe check TARGET --port PORT ...`; its exit status and output lines."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relayprobe", "check", target, "--port", str(port)),
        *("--reply-timeout", "10", *options),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    assert err == b"", err
    return process.returncode, out.decode().splitlines()


def test_each_verdict_has_its_own_exit_status() -> None:
    assert EXIT_BY_VERDICT == {"rejected": 0, "relayed": 1, "incomplete": 3, "accepted": 4}


async def test_closed_server_exits_0(start_server: StartServer) -> None:
    status, lines = await check(await start_server(FakeMailServer(relay=relays_nothing)))
    assert status == 0
    assert lines[-1] == "Note: every relay attempt was refused: not an open relay to these probes"


async def test_qmail_case_without_confirmation_is_not_called_open(
    start_server: StartServer,
) -> None:
    status, lines = await check(await start_server(FakeMailServer(relay=relays_like_qmail)))
    assert status == 4
    assert lines[-3] == "System appeared to accept 12 relay attempts"
    assert lines[-2] == (
        "Note: delivery confirmation is off: no canary sink configured; to prove relaying, run "
        "one (--sink-listen ADDR:PORT) and point the MX of relaytest.invalid at it"
    )
    assert lines[-1] == f"{FORMS_NOTE}, and delivery confirmation is off"


async def test_qmail_case_with_confirmation_is_accepted_not_proven(
    start_server: StartServer,
) -> None:
    port = await start_server(FakeMailServer(relay=relays_like_qmail))
    sink = f"127.0.0.1:{free_port('127.0.0.1')}"
    status, lines = await check(port, "--sink-listen", sink, "--confirm-wait", "0.5", "--json")
    assert status == 4
    result = json.loads("\n".join(lines))
    assert (result["verdict"], result["proven"], result["accepted"]) == ("accepted", False, 12)
    assert (
        result["summary"][-2]
        == "Relay not confirmed: none of 12 test messages arrived within 0.5 s"
    )
    assert result["summary"][-1] == f"{FORMS_NOTE}, and no test message arrived"
    forms = {probe["name"]: probe["form"] for probe in result["probes"]}
    assert (forms["Test 1"], forms["Test 8"], forms["Test 17"]) == ("plain", "%-hack", "bang path")


async def test_open_relay_proven_by_delivery_exits_1(start_server: StartServer) -> None:
    sink_port = free_port("127.0.0.1")
    relay = FakeMailServer(relay=relays_everything, forward_to=("127.0.0.1", sink_port))
    port = await start_server(relay)
    status, lines = await check(
        port, "--sink-listen", f"127.0.0.1:{sink_port}", "--confirm-wait", "10", "--json"
    )
    assert status == 1
    result = json.loads("\n".join(lines))
    assert (result["verdict"], result["proven"]) == ("relayed", True)
    assert result["summary"][-2] == "Relay confirmed: 20 of 20 test messages arrived (" + (
        ", ".join(["Quote test", *(f"Test {n}" for n in range(1, 20))]) + ")"
    )
    assert result["summary"][-1].startswith("Note: this is an open relay")


async def test_unreachable_server_is_incomplete_exit_3() -> None:
    status, lines = await check(free_port("127.0.0.1"))
    assert status == 3
    assert lines[-3:] == [
        "Test incomplete: connection refused",
        "Note: delivery confirmation is off: no canary sink configured; to prove relaying, run "
        "one (--sink-listen ADDR:PORT) and point the MX of relaytest.invalid at it",
        "Note: the test did not finish, so it says nothing yet about relaying",
    ]


# What a command may not load: the service's parts. Importing is deterministic, so this holds
# on any machine; benchmarks/startup.py measures what it saves.
SERVICE_MODULES = (
    "aiosmtpd",
    "prometheus_client",
    "h11",
    "redis",
    "psycopg",
    "sqlite3",
    "relayprobe.app",
    "relayprobe.confirmation.sink",
    "relayprobe.operations.metrics",
    "relayprobe.frontdoors.httpserver",
    "relayprobe.frontdoors.telnet",
)
_LOADED_BY = """
import json, sys
from relayprobe.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exc:
    status = exc.code
print(json.dumps([status, sorted(sys.modules)]), file=sys.stderr)
"""


async def modules_loaded_by(*argv: str) -> tuple[int, set[str]]:
    """Run the command in a fresh interpreter: its exit status and every module it loaded."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", _LOADED_BY, *argv),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, err = await process.communicate()
    status, modules = json.loads(err.decode().splitlines()[-1])
    return status, set(modules)


def loaded(modules: set[str], packages: tuple[str, ...]) -> set[str]:
    return {name for name in modules if name.split(".")[0] in packages or name in packages}


async def test_check_loads_none_of_the_service(start_server: StartServer) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing))
    status, modules = await modules_loaded_by("check", "127.0.0.1", "--port", str(port))
    assert status == 0
    assert "relayprobe.relaytest.engine" in modules  # the test did run
    assert {
        m for m in modules if m in SERVICE_MODULES or m.split(".")[0] in SERVICE_MODULES
    } == set()
    assert loaded(modules, ("dns", "cryptography")) == set()  # no PTR of loopback, no TLS


async def test_help_loads_no_network_code() -> None:
    status, modules = await modules_loaded_by("--help")
    assert status == 0
    assert loaded(modules, ("asyncio", "aiosmtplib", "structlog", *SERVICE_MODULES)) == set()
