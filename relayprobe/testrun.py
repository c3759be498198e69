"""One relay test with its transcript kept: what `check` runs, and what every admitted caller's
test is. Nothing here admits, counts or logs, so `check` loads none of the service.
"""

from __future__ import annotations

from collections.abc import Callable

from relayprobe.confirmation.canary import CanaryRegistry
from relayprobe.frontdoors.addresses import IPAddress
from relayprobe.operations.config import Settings
from relayprobe.relaytest.engine import Checkpoint, run_relay_test
from relayprobe.relaytest.events import Event, Received, ServiceMessage, Summary
from relayprobe.relaytest.options import RelayTestOptions
from relayprobe.reports.render import MAX_KEPT_CHARS, Transcript
from relayprobe.reports.result import TestResult

OnLines = Callable[[Event, tuple[str, ...]], None]
"""Each event of a test, with its transcript lines (the last block ends with the link)."""


async def run_test(
    settings: Settings,
    target: IPAddress,
    on_lines: OnLines,
    *,
    options: RelayTestOptions | None = None,
    registry: CanaryRegistry | None = None,
    checkpoint: Checkpoint | None = None,
    result_id: str | None = None,
    result_url: str | None = None,
    on_first_reply: Callable[[], None] | None = None,
) -> TestResult:
    """Test `target` (what `check` does, and each admitted caller's test): each event goes to
    `on_lines` with its transcript lines, and a bounded copy of the transcript goes into the
    result, with a `Full result:` link after the summary when there is a `result_url`.
    `on_first_reply` is called when the server first says anything."""
    transcript = Transcript(max_chars=MAX_KEPT_CHARS)
    waiting_for_reply = on_first_reply

    def emit(event: Event) -> None:
        nonlocal waiting_for_reply
        if waiting_for_reply is not None and isinstance(event, Received):
            waiting_for_reply()
            waiting_for_reply = None
        lines = transcript.add(event)
        if isinstance(event, Summary) and result_url is not None:
            link = f"Full result: {result_url}"
            transcript.lines.append(link)
            lines = (*lines, link)
        on_lines(event, lines)

    if settings.motd:
        emit(ServiceMessage(tuple(settings.motd.splitlines())))
    summary = await run_relay_test(
        str(target),
        options or settings.test_options(),
        emit,
        registry=registry,
        checkpoint=checkpoint,
    )
    return TestResult(summary=summary, transcript=tuple(transcript.lines), result_id=result_id)
