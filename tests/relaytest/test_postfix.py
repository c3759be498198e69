"""The relay test against real Postfix instances on loopback (tests/infra/postfix.sh).

127.0.0.2 is a stock Debian Postfix (closed: relaying deferred with 454); 127.0.0.3 has
mynetworks = 0.0.0.0/0 (open) and hands mail for relaytest.invalid to 127.0.0.1:2525, where the
confirmation tests run relayprobe's canary sink.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from relayprobe.app import Application, canary_sink, local_registry
from relayprobe.operations.config import Endpoint, Settings
from relayprobe.relaytest.engine import run_relay_test
from relayprobe.relaytest.events import Event, Outcome, Relayed
from relayprobe.reports.render import Transcript
from tests.infra import postfix
from tests.infra.haproxy import free_port
from tests.infra.skip import skip_or_fail
from tests.test_cli import check

pytestmark = pytest.mark.usefixtures("postfix_instances")

SETTINGS = Settings(reply_timeout=10.0, test_domain=postfix.TEST_DOMAIN, confirm=False)
SINK = Endpoint(postfix.SINK_HOST, postfix.SINK_PORT)


async def relay_test(
    target: str, settings: Settings = SETTINGS
) -> tuple[Transcript, list[Event], float]:
    transcript = Transcript()
    events: list[Event] = []

    def emit(event: Event) -> None:
        events.append(event)
        transcript.add(event)

    registry = local_registry(settings)
    started = time.monotonic()
    async with canary_sink(settings, registry):
        await run_relay_test(target, settings.test_options(), emit, registry=registry)
    return transcript, events, time.monotonic() - started


async def test_stock_postfix_rejects_every_probe_without_hitting_its_error_limit() -> None:
    marker = postfix.log_marker()
    transcript, _, duration = await relay_test(postfix.CLOSED_HOST)
    summary = transcript.summary
    assert summary is not None
    assert [probe.name for probe in summary.probes] == [
        "Quote test",
        *(f"Test {n}" for n in range(1, 20)),
    ]
    assert Outcome.ERROR not in {probe.outcome for probe in summary.probes}
    assert Outcome.ACCEPTED not in {probe.outcome for probe in summary.probes}
    assert summary.verdict == "rejected"
    assert transcript.lines[-5:-2] == [
        "Tested host banner: 220 closed.relayprobe.test ESMTP Postfix (Debian/GNU)",
        "System appeared to reject relay attempts",
        # Test 12's stray quote is a syntax error (501); relaying is deferred (454).
        "Note: 19 probes were deferred with a 4xx reply, a temporary refusal (Quote test, "
        + ", ".join(f"Test {n}" for n in range(1, 20) if n != 12)
        + ")",
    ]
    assert summary.probes[12].reply.startswith("501 5.1.3 Bad recipient address syntax")
    assert "Relay access denied" in summary.probes[1].reply
    assert postfix.error_limit_hits(marker)["closed"] == postfix.NO_HITS
    # Under 1 s on loopback when the machine is quiet; the tarpit alone would cost 10 s or more.
    assert duration < 5.0


async def test_open_postfix_accepts_relay_attempts_without_hitting_its_error_limit() -> None:
    marker = postfix.log_marker()
    transcript, _, _ = await relay_test(postfix.OPEN_HOST)
    summary = transcript.summary
    assert summary is not None
    accepted = [probe.name for probe in summary.probes if probe.outcome is Outcome.ACCEPTED]
    assert "Test 1" in accepted and "Test 19" in accepted
    assert Outcome.ERROR not in {probe.outcome for probe in summary.probes}
    assert summary.verdict == "accepted"
    assert f"System appeared to accept {len(accepted)} relay attempts" in transcript.lines
    assert postfix.error_limit_hits(marker)["open"] == postfix.NO_HITS


async def test_open_postfix_relay_is_confirmed_by_delivery_to_the_sink() -> None:
    settings = dataclasses.replace(SETTINGS, confirm=True, sink_listen=SINK, confirm_wait=20.0)
    transcript, events, _ = await relay_test(postfix.OPEN_HOST, settings)
    summary = transcript.summary
    assert summary is not None
    relayed = [probe.name for probe in summary.probes if probe.outcome is Outcome.RELAYED]
    arrived = [event.name for event in events if isinstance(event, Relayed)]
    assert relayed and sorted(relayed) == sorted(arrived)
    assert summary.verdict == "relayed"
    confirmed = [line for line in transcript.lines if line.startswith("Relay confirmed: ")]
    assert len(confirmed) == 1
    assert f"{len(relayed)} of " in confirmed[0]
    assert ":Waiting up to 20 s for relayed test messages ..." in transcript.lines
    assert any(line.startswith(">>> RCPT TO:<nobody-") for line in transcript.lines)


async def test_check_calls_open_postfix_open_only_with_proof() -> None:
    """Exit 4 (accepted, not proven) without the sink; 1 once the test messages arrive."""
    options = ("--test-domain", postfix.TEST_DOMAIN)
    status, lines = await check(25, *options, target=postfix.OPEN_HOST)
    assert status == 4
    assert lines[-1].startswith("Note: the server accepted 19 relay attempts at RCPT; only ")
    assert lines[-1].endswith("delivery proves relaying, and delivery confirmation is off")
    status, lines = await check(
        25,
        *options,
        "--sink-listen",
        str(SINK),
        "--confirm-wait",
        "20",
        "--json",
        target=postfix.OPEN_HOST,
    )
    assert status == 1
    result = json.loads("\n".join(lines))
    assert (result["verdict"], result["proven"]) == ("relayed", True)
    assert result["summary"][-1].startswith("Note: this is an open relay")


@pytest.mark.parametrize(
    ("source", "verdict_line"),
    [
        (postfix.CLOSED_HOST, "System appeared to reject relay attempts"),
        (postfix.OPEN_HOST, "Relay confirmed: "),
    ],
    ids=["closed", "open"],
)
async def test_real_telnet_client_sees_the_live_transcript(source: str, verdict_line: str) -> None:
    if shutil.which("telnet") is None:
        skip_or_fail("Debian's telnet is not installed (run .ci/system-packages as root)")
    settings = dataclasses.replace(
        SETTINGS,
        listen=(Endpoint("127.0.0.1", 0),),
        confirm=True,
        sink_listen=SINK,
        confirm_wait=20.0,
    )
    app = Application(settings)
    await app.start()
    try:
        endpoint = app.listening[0]
        # netkit telnet hangs up when its standard input ends: keep a pipe open to it.
        telnet = await asyncio.create_subprocess_exec(
            "telnet",
            "-b",
            source,
            endpoint.host,
            str(endpoint.port),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert telnet.stdout is not None
        output = await asyncio.wait_for(telnet.stdout.read(), 60)
        await telnet.wait()
    finally:
        await app.shutdown()
    lines = output.decode().splitlines()
    assert f"Connecting to {source} ..." in lines
    assert sum(line.startswith(":Relay test: #") for line in lines) == 20
    assert any(line.startswith(verdict_line) for line in lines), lines[-8:]


@pytest.mark.parametrize(
    ("source", "verdict"),
    [(postfix.CLOSED_HOST, "rejected"), (postfix.OPEN_HOST, "relayed")],
    ids=["closed", "open"],
)
async def test_curl_streams_the_transcript_and_its_link_opens_the_result(
    source: str, verdict: str, tmp_path: Path
) -> None:
    if shutil.which("curl") is None:
        skip_or_fail("curl is not installed")
    web = Endpoint("127.0.0.1", free_port("127.0.0.1"))
    settings = dataclasses.replace(
        SETTINGS,
        listen=(Endpoint("127.0.0.1", 0),),
        web_listen=(web,),
        public_url=f"http://{web}",
        confirm=True,
        sink_listen=SINK,
        confirm_wait=20.0,
        history=True,
        state_dir=str(tmp_path),
    )
    app = Application(settings)
    await app.start()
    try:
        curl = await asyncio.create_subprocess_exec(
            *("curl", "-sN", "--interface", source, f"http://{web}/"),
            stdout=asyncio.subprocess.PIPE,
        )
        assert curl.stdout is not None
        async with asyncio.timeout(60):
            first = await curl.stdout.readline()
            # Streamed: the first line is here long before the test ends.
            assert first == f"Connecting to {source} ...\n".encode()
            assert app.core.running
            output = first + await curl.stdout.read()
            await curl.wait()
        lines = output.decode().splitlines()
        link = lines[-1].removeprefix("Full result: ")
        assert link.startswith(f"http://{web}/results/")
        assert sum(line.startswith(":Relay test: #") for line in lines) == 20
        # The history is written on its own thread: the link works once it has been.
        async with asyncio.timeout(20):
            while True:
                fetch = await asyncio.create_subprocess_exec(
                    "curl", "-sf", f"{link}.json", stdout=asyncio.subprocess.PIPE
                )
                document, _ = await fetch.communicate()
                if fetch.returncode == 0:
                    break
                await asyncio.sleep(0.1)
    finally:
        await app.shutdown()
    result = json.loads(document)
    assert result["verdict"] == verdict
    assert result["target"] == source
    assert result["transcript"] == lines
    assert result["id"] == link.rpartition("/")[2]


# STARTTLS against Postfix that requires it (127.0.0.4) and one that only offers it (127.0.0.5)


async def test_tls_requiring_postfix_is_tested_and_confirmed_over_tls() -> None:
    marker = postfix.log_marker()
    settings = dataclasses.replace(SETTINGS, confirm=True, sink_listen=SINK, confirm_wait=20.0)
    transcript, _, _ = await relay_test(postfix.TLS_OPEN_HOST, settings)
    summary = transcript.summary
    assert summary is not None
    assert summary.verdict == "relayed"
    start = transcript.lines.index(">>> STARTTLS")
    assert transcript.lines[start - 1] == "<<< 530 5.7.0 Must issue a STARTTLS command first"
    assert transcript.lines[start + 1].startswith("<<< 220 2.0.0 Ready to start TLS")
    assert re.fullmatch(
        r":TLS 1\.[23], \S+, certificate CN=tls-open\.relayprobe\.test, self-signed, "
        r"expires \d{4}-\d\d-\d\d",
        transcript.lines[start + 2],
    )
    assert transcript.lines[start + 3] == ">>> EHLO relayprobe.invalid"
    assert all(probe.tls for probe in summary.probes)
    assert summary.tls.required and summary.tls.used is not None
    assert any(line.startswith("Relay confirmed: ") for line in transcript.lines)
    assert "System appeared to reject relay attempts" not in transcript.lines
    assert postfix.error_limit_hits(marker)["tls-open"] == postfix.NO_HITS


async def test_tls_requiring_postfix_with_tls_off_is_incomplete_not_rejected() -> None:
    settings = dataclasses.replace(SETTINGS, starttls="never")
    transcript, _, _ = await relay_test(postfix.TLS_OPEN_HOST, settings)
    summary = transcript.summary
    assert summary is not None
    assert summary.verdict == "incomplete"
    assert (
        "Test incomplete: the server requires STARTTLS (530) and TLS is off (--starttls never)"
        in transcript.lines
    )
    assert ">>> STARTTLS" not in transcript.lines


@pytest.mark.parametrize("starttls", ["auto", "always"])
async def test_postfix_offering_tls_is_closed_either_way(starttls: str) -> None:
    settings = dataclasses.replace(SETTINGS, starttls=starttls)
    transcript, _, _ = await relay_test(postfix.TLS_CLOSED_HOST, settings)
    summary = transcript.summary
    assert summary is not None
    assert summary.verdict == "rejected"
    assert "System appeared to reject relay attempts" in transcript.lines
    assert summary.tls.offered and not summary.tls.required
    over_tls = starttls == "always"
    assert (">>> STARTTLS" in transcript.lines) is over_tls
    assert all(probe.tls is over_tls for probe in summary.probes)


async def test_check_json_reports_the_tls_used() -> None:
    status, lines = await check(
        25, "--test-domain", postfix.TEST_DOMAIN, "--json", target=postfix.TLS_OPEN_HOST
    )
    assert status == 4  # accepted over TLS; without the sink, not proven
    tls = json.loads("\n".join(lines))["tls"]
    assert (tls["offered"], tls["required"], tls["used"]) == (True, True, True)
    assert tls["version"] in ("TLS 1.2", "TLS 1.3")
    assert tls["certificate"]["subject"] == f"CN={postfix.TLS_OPEN_HOSTNAME}"
    assert tls["certificate"]["self_signed"] is True
