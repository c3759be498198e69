"""Run one relay test against one mail server and emit what happens as events.

The engine survives servers that hang up, stall or collect errors: it opens a fresh session
before known error limits bite, reconnects after a lost connection and retries the interrupted
probe once, and bounds every wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from relayprobe.events import (
    Connecting,
    Event,
    Outcome,
    ProbeFinished,
    ProbeStarted,
    Progress,
    Received,
    Sent,
    Summary,
)
from relayprobe.hostname import banner_hostname
from relayprobe.probes import CLASSIC, Probe, ProbeContext, address_literal, render
from relayprobe.rdns import lookup_ptr
from relayprobe.sanitize import sanitize_line
from relayprobe.smtpclient import BadReply, Reply, ReplyTimeout, ServerDisconnected, SMTPSession
from relayprobe.verdict import classify, summary_lines, verdict

Emit = Callable[[Event], None]
PtrLookup = Callable[..., Coroutine[Any, Any, str | None]]

# More reply lines than this are counted, not shown: a 300-line EHLO says nothing useful.
MAX_REPLY_LINES = 40
# Enough for a QUIT at the end, short enough not to hold up the summary.
QUIT_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayTestOptions:
    port: int = 25
    suite: tuple[Probe, ...] = CLASSIC
    helo_name: str = "relayprobe.invalid"
    test_domain: str = "relaytest.invalid"
    foreign_domain: str = "example.net"
    connect_timeout: float = 10.0
    reply_timeout: float = 30.0
    deadline: float = 300.0
    rdns_timeout: float = 2.0
    # Stock Postfix slows down after 10 errors and drops at 20; Exim drops after 3 syntax errors.
    max_errors_per_session: int = 8
    max_syntax_errors_per_session: int = 2


class IncompleteTest(Exception):
    """The test cannot go on: no usable session with the server."""


class SessionLost(ConnectionError):
    """The session ended under a probe: EOF, 421, a reply timeout or an unusable reply."""


class _RelayTest:
    def __init__(self, target: str, options: RelayTestOptions, emit: Emit) -> None:
        self.target = target
        self.options = options
        self.emit = emit
        self.session: SMTPSession | None = None
        self.errors = 0
        self.syntax_errors = 0
        self.use_helo = False
        self.banner: str | None = None
        self.banner_name: str | None = None
        self.results: list[ProbeFinished] = []

    async def run(self, ptr_lookup: PtrLookup) -> Summary:
        started_at = time.time()
        started = time.monotonic()
        self.emit(Connecting(self.target, self.options.port))
        ptr = asyncio.create_task(ptr_lookup(self.target, timeout=self.options.rdns_timeout))
        incomplete: str | None = None
        try:
            async with asyncio.timeout(self.options.deadline) as deadline:
                try:
                    await self._open_session()
                    context = await self._context(ptr)
                    for probe in self.options.suite:
                        await self._run_probe(probe, context)
                    await self._quit()
                except IncompleteTest as exc:
                    incomplete = str(exc)
        except TimeoutError:
            if not deadline.expired():
                raise
            incomplete = f"test deadline of {self.options.deadline:g} s reached"
        except asyncio.CancelledError:
            if self.session is not None:
                self.session.send_quit_and_close()
            raise
        finally:
            ptr.cancel()
            if self.session is not None:
                self.session.close()
        self._give_up_on_untried_probes(incomplete)
        result = verdict(self.results, incomplete=incomplete, confirmation=None)
        summary = Summary(
            target=self.target,
            host=self._host_label(ptr),
            banner=self.banner,
            verdict=result,
            lines=summary_lines(
                self.results, banner=self.banner, incomplete=incomplete, confirmation=None
            ),
            probes=tuple(self.results),
            started_at=started_at,
            duration_s=time.monotonic() - started,
        )
        self.emit(summary)
        return summary

    def _host_label(self, ptr: asyncio.Task[str | None]) -> str:
        name = ptr.result() if ptr.done() and not ptr.cancelled() and not ptr.exception() else None
        return name or self.banner_name or self.target

    async def _context(self, ptr: asyncio.Task[str | None]) -> ProbeContext:
        try:
            name = await asyncio.wait_for(asyncio.shield(ptr), self.options.rdns_timeout)
        except TimeoutError:
            name = None
        literal = address_literal(self.target)
        return ProbeContext(
            host=name or self.banner_name or literal,
            ip=literal,
            dom=self.options.test_domain,
            foreign=self.options.foreign_domain,
        )

    # Sessions

    async def _open_session(self) -> None:
        """Connect, read the greeting and say EHLO (or HELO); raise IncompleteTest if we can't."""
        for _ in range(2):
            session = SMTPSession(
                helo_name=self.options.helo_name, reply_timeout=self.options.reply_timeout
            )
            greeting = await self._connect(session)
            self._show(greeting)
            if not 200 <= greeting.code < 300:
                session.close()
                raise IncompleteTest(
                    f"server refused the session: {sanitize_line(greeting.lines[0])}"
                )
            if self.banner is None:
                self.banner = sanitize_line(greeting.lines[0])
                self.banner_name = banner_hostname(greeting.lines[0])
            self.session, self.errors, self.syntax_errors = session, 0, 0
            try:
                await self._greet()
                return
            except SessionLost as exc:
                self._drop_session()
                if self.use_helo or "unusable reply" not in str(exc):
                    raise IncompleteTest(str(exc)) from None
                self.use_helo = True
                self._progress(f"{exc}; reconnecting to use HELO")
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _connect(self, session: SMTPSession) -> Reply:
        options = self.options
        try:
            return await session.connect(
                self.target, options.port, connect_timeout=options.connect_timeout
            )
        except ConnectionRefusedError:
            reason = "connection refused"
        except ReplyTimeout:
            reason = f"no greeting within {options.reply_timeout:g} s"
        except TimeoutError:
            reason = f"no connection within {options.connect_timeout:g} s"
        except ServerDisconnected:
            reason = "connection closed before the greeting"
        except BadReply as exc:
            reason = f"unusable greeting: {exc}"
        except OSError as exc:
            reason = f"cannot connect: {exc.strerror or exc}"
        session.close()
        raise IncompleteTest(reason)

    async def _greet(self) -> None:
        helo_name = self.options.helo_name
        if not self.use_helo:
            reply = await self._command(f"EHLO {helo_name}")
            if 200 <= reply.code < 300:
                return
            if reply.code < 500:
                raise SessionLost(f"EHLO refused: {sanitize_line(reply.lines[0])}")
            self.use_helo = True
        reply = await self._command(f"HELO {helo_name}")
        if not 200 <= reply.code < 300:
            raise SessionLost(f"HELO refused: {sanitize_line(reply.lines[0])}")

    async def _reconnect(self) -> None:
        self._progress(f"Reconnecting to {self.target} ...")
        try:
            await self._open_session()
        except IncompleteTest as exc:
            raise IncompleteTest(f"cannot reconnect: {exc}") from None

    async def _quit(self) -> None:
        if self.session is None:
            return
        with contextlib.suppress(SessionLost, TimeoutError):
            await asyncio.wait_for(self._command("QUIT"), QUIT_TIMEOUT)
        self._drop_session()

    def _drop_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def _near_error_limit(self) -> bool:
        return (
            self.errors >= self.options.max_errors_per_session
            or self.syntax_errors >= self.options.max_syntax_errors_per_session
        )

    # Probes

    async def _run_probe(self, probe: Probe, context: ProbeContext) -> None:
        self.emit(ProbeStarted(probe.name))
        values = context.values(rcpt="nobody")
        mail_from = render(probe.mail_from, values)
        rcpt_to = render(probe.rcpt_to, values)
        lost = ""
        for attempt in (1, 2):
            if self.session is not None and self._near_error_limit():
                self._progress("Opening a fresh session before the server's error limit")
                await self._quit()
            if self.session is None:
                await self._reconnect()
            try:
                outcome, reply = await self._exchange(mail_from, rcpt_to)
            except SessionLost as exc:
                self._drop_session()
                lost = str(exc)
                then = "retrying on a fresh session" if attempt == 1 else "giving up on this probe"
                self._progress(f"{lost} during {probe.name}; {then}")
                continue
            self._finish(probe.name, mail_from, rcpt_to, outcome, reply)
            return
        self._finish(probe.name, mail_from, rcpt_to, Outcome.ERROR, lost)

    async def _exchange(self, mail_from: str, rcpt_to: str) -> tuple[Outcome, str]:
        reply = await self._command(f"MAIL FROM:{mail_from}", lost_on_421=True)
        if 200 <= reply.code < 300:
            reply = await self._command(f"RCPT TO:{rcpt_to}", lost_on_421=True)
        result = classify(reply.code), sanitize_line(b" ".join(reply.lines))
        try:
            await self._command("RSET")
        except SessionLost as exc:
            # The probe's answer stands; the next probe reconnects.
            self._drop_session()
            self._progress(f"{exc} after RSET")
        return result

    def _finish(
        self, name: str, mail_from: str, rcpt_to: str, outcome: Outcome, reply: str
    ) -> None:
        finished = ProbeFinished(name, mail_from, rcpt_to, outcome, reply)
        self.results.append(finished)
        self.emit(finished)

    def _give_up_on_untried_probes(self, incomplete: str | None) -> None:
        done = {result.name for result in self.results}
        if incomplete is None or not self.results:
            return
        for probe in self.options.suite:
            if probe.name not in done:
                self.results.append(
                    ProbeFinished(
                        probe.name, probe.mail_from, probe.rcpt_to, Outcome.ERROR, "not tried"
                    )
                )

    # Commands

    async def _command(self, line: str, *, lost_on_421: bool = False) -> Reply:
        assert self.session is not None
        self.emit(Sent(line))
        try:
            reply = await self.session.command(line.encode("ascii"))
        except ServerDisconnected:
            raise SessionLost("connection closed by the server") from None
        except ReplyTimeout:
            raise SessionLost(f"no reply within {self.options.reply_timeout:g} s") from None
        except BadReply as exc:
            raise SessionLost(f"unusable reply ({exc})") from None
        self._show(reply)
        if reply.code >= 400:
            self.errors += 1
            if 500 <= reply.code <= 504:
                self.syntax_errors += 1
        if lost_on_421 and reply.code == 421:
            raise SessionLost("the server is closing the session (421)")
        return reply

    def _show(self, reply: Reply) -> None:
        for line in reply.lines[:MAX_REPLY_LINES]:
            self.emit(Received(sanitize_line(line)))
        hidden = len(reply.lines) - MAX_REPLY_LINES
        if hidden > 0:
            self._progress(f"{hidden} more reply lines not shown")

    def _progress(self, text: str) -> None:
        self.emit(Progress(text))


async def run_relay_test(
    target: str, options: RelayTestOptions, emit: Emit, *, ptr_lookup: PtrLookup = lookup_ptr
) -> Summary:
    """Test `target` (an IP address) and return the summary; every step is passed to `emit`."""
    address = str(ipaddress.ip_address(target))
    return await _RelayTest(address, options, emit).run(ptr_lookup)
