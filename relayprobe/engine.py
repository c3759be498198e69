"""Run one relay test against one mail server and emit what happens as events.

The engine survives servers that hang up, stall or collect errors: it opens a fresh session
before known error limits bite, reconnects after a lost connection and retries the interrupted
probe once, and bounds every wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from relayprobe import canary
from relayprobe.canary import CanaryRegistry, RegistryFull
from relayprobe.events import (
    Connecting,
    Event,
    Outcome,
    ProbeFinished,
    ProbeStarted,
    Progress,
    Received,
    Relayed,
    Sent,
    Summary,
)
from relayprobe.hostname import banner_hostname
from relayprobe.probes import CLASSIC, Probe, ProbeContext, address_literal, render
from relayprobe.rdns import lookup_ptr
from relayprobe.sanitize import MAX_DISPLAY_CHARS, sanitize_line
from relayprobe.smtpclient import BadReply, Reply, ReplyTimeout, ServerDisconnected, SMTPSession
from relayprobe.verdict import Confirmation, classify, summary_lines, verdict

Emit = Callable[[Event], None]
Checkpoint = Callable[[], Awaitable[None]]
PtrLookup = Callable[..., Coroutine[Any, Any, str | None]]

# More reply lines than this are counted, not shown: a 300-line EHLO says nothing useful.
MAX_REPLY_LINES = 40
# Reply text a test shows in full; past it, only each reply's first line, cut short. This bounds
# what a hostile server's long replies cost to escape, send and keep, whatever their number.
MAX_REPLY_CHARS = 64 * 1024
CUT_REPLY_CHARS = 200
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
    confirm_wait: float = 30.0
    operator: str = "relayprobe"
    """Who runs the test, named in the body of the test messages."""
    notes: tuple[str, ...] = ()
    """Extra `Note:` lines for the summary, from the caller."""


@dataclass(slots=True)
class _TestMessage:
    probe: str
    token: str


class IncompleteTest(Exception):
    """The test cannot go on: no usable session with the server."""


class SessionLost(ConnectionError):
    """The session ended under a probe: EOF, 421, a reply timeout or an unusable reply."""


class UnusableReply(SessionLost):
    """A reply too long to keep or not SMTP at all; the session can't be trusted after it."""


class _RelayTest:
    def __init__(
        self,
        target: str,
        options: RelayTestOptions,
        emit: Emit,
        registry: CanaryRegistry | None,
        checkpoint: Checkpoint | None,
    ) -> None:
        self.target = target
        self.options = options
        self.emit = emit
        self.registry = registry
        self.checkpoint = checkpoint
        self.tokens: dict[str, str] = {}
        self.sent: list[_TestMessage] = []
        self.registry_full = False
        self.session: SMTPSession | None = None
        self.errors = 0
        self.syntax_errors = 0
        self.use_helo = False
        self.banner: str | None = None
        self.banner_name: str | None = None
        self.reply_chars_shown = 0
        self.results: list[ProbeFinished] = []
        self.context: ProbeContext | None = None

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
                    self.context = await self._context(ptr)
                    for probe in self.options.suite:
                        await self._run_probe(probe, self.context)
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
            self._forget_tokens()
            raise
        finally:
            ptr.cancel()
            if self.session is not None:
                self.session.close()
        self._give_up_on_untried_probes(incomplete)
        try:
            confirmation = await self._confirm()
        finally:
            self._forget_tokens()
        notes = self.options.notes
        if self.registry_full:
            notes = (
                *notes,
                "delivery confirmation was off for some probes: too many tests waiting",
            )
        result = verdict(self.results, incomplete=incomplete, confirmation=confirmation)
        summary = Summary(
            target=self.target,
            host=self._host_label(ptr),
            banner=self.banner,
            verdict=result,
            lines=summary_lines(
                self.results,
                banner=self.banner,
                incomplete=incomplete,
                confirmation=confirmation,
                notes=notes,
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
            async with asyncio.timeout(self.options.rdns_timeout):
                name = await asyncio.shield(ptr)
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
            except UnusableReply as exc:
                # A hostile or broken EHLO reply (300 lines, say): HELO's is one line.
                self._drop_session()
                if self.use_helo:
                    raise IncompleteTest(str(exc)) from None
                self.use_helo = True
                self._progress(f"{exc}; reconnecting to use HELO")
            except SessionLost as exc:
                self._drop_session()
                raise IncompleteTest(str(exc)) from None
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
            async with asyncio.timeout(QUIT_TIMEOUT):
                await self._command("QUIT")
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
        await self._checkpoint()
        self.emit(ProbeStarted(probe.name))
        token = self._token_for(probe.name)
        values = context.values(rcpt=canary.local_part(token) if token else "nobody")
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
            self._finish(probe, mail_from, rcpt_to, outcome, reply)
            await self._after_answer(probe.name, mail_from, rcpt_to, token, context, outcome)
            return
        self._finish(probe, mail_from, rcpt_to, Outcome.ERROR, lost)

    async def _exchange(self, mail_from: str, rcpt_to: str) -> tuple[Outcome, str]:
        reply = await self._command(f"MAIL FROM:{mail_from}", lost_on_421=True)
        if 200 <= reply.code < 300:
            reply = await self._command(f"RCPT TO:{rcpt_to}", lost_on_421=True)
        return classify(reply.code), sanitize_line(b" ".join(reply.lines))

    async def _after_answer(
        self,
        name: str,
        mail_from: str,
        rcpt_to: str,
        token: str | None,
        context: ProbeContext,
        outcome: Outcome,
    ) -> None:
        """Send the test message of an accepted probe, then RSET; the probe's answer stands."""
        try:
            if outcome is Outcome.ACCEPTED and token is not None and self.registry is not None:
                message = canary.test_message(
                    token=token,
                    secret=self.registry.message_secret(token),
                    probe_name=name,
                    sender=mail_from,
                    recipient=rcpt_to,
                    operator=self.options.operator,
                    tested_host=context.host,
                    now=datetime.datetime.now(datetime.UTC),
                )
                if await self._send_message(message, token):
                    self.sent.append(_TestMessage(name, token))
            await self._command("RSET")
        except SessionLost as exc:
            self._drop_session()
            self._progress(f"{exc} after the answer to {name}")

    async def _send_message(self, message: bytes, token: str) -> bool:
        """DATA and the test message; True when the server took it."""
        await self._checkpoint()
        reply = await self._command("DATA")
        if reply.code != 354:
            return False
        assert self.session is not None
        lines = message.count(b"\n")
        self.emit(Sent(f"(test message: {lines} lines, token {token})"))
        self.emit(Sent("."))
        reply = await self._exchange_reply(self.session.message(message))
        return 200 <= reply.code < 300

    def _token_for(self, name: str) -> str | None:
        """A fresh token for a probe's recipient, or None when confirmation is off or full."""
        if self.registry is None:
            return None
        token = canary.new_token()
        try:
            self.registry.register(token, ttl=self.options.deadline + self.options.confirm_wait)
        except RegistryFull:
            self.registry_full = True
            return None
        self.tokens[token] = name
        return token

    def _forget_tokens(self) -> None:
        if self.registry is not None and self.tokens:
            self.registry.forget(self.tokens)

    async def _confirm(self) -> Confirmation | None:
        """Wait, bounded, for the test messages the server took to reach the canary sink."""
        if self.registry is None:
            return None
        wait = self.options.confirm_wait
        by_token = {message.token: message.probe for message in self.sent}
        arrived: set[str] = set()
        if by_token:
            self._progress(f"Waiting up to {wait:g} s for relayed test messages ...")
            arrived = await self.registry.wait(
                by_token,
                timeout=wait,
                on_arrival=lambda token, after, source: self.emit(
                    Relayed(by_token[token], after, source)
                ),
            )
        relayed = [message.probe for message in self.sent if message.token in arrived]
        self.results = [
            dataclasses.replace(result, outcome=Outcome.RELAYED)
            if result.name in relayed
            else result
            for result in self.results
        ]
        return Confirmation(sent=tuple(by_token.values()), arrived=tuple(relayed), wait_s=wait)

    def _finish(
        self, probe: Probe, mail_from: str, rcpt_to: str, outcome: Outcome, reply: str
    ) -> None:
        finished = ProbeFinished(probe.name, mail_from, rcpt_to, outcome, reply, probe.form)
        self.results.append(finished)
        self.emit(finished)

    def _give_up_on_untried_probes(self, incomplete: str | None) -> None:
        """When a test stops half-way, the probes it never got to count as errors."""
        if incomplete is None or self.context is None:
            return
        done = {result.name for result in self.results}
        values = self.context.values(rcpt="nobody")
        for probe in self.options.suite:
            if probe.name not in done:
                mail_from, rcpt_to = render(probe.mail_from, values), render(probe.rcpt_to, values)
                self.results.append(
                    ProbeFinished(
                        probe.name, mail_from, rcpt_to, Outcome.ERROR, "not tried", probe.form
                    )
                )

    # Commands

    async def _command(self, line: str, *, lost_on_421: bool = False) -> Reply:
        assert self.session is not None
        self.emit(Sent(line))
        reply = await self._exchange_reply(self.session.command(line.encode("ascii")))
        if lost_on_421 and reply.code == 421:
            raise SessionLost("the server is closing the session (421)")
        return reply

    async def _exchange_reply(self, sending: Coroutine[Any, Any, Reply]) -> Reply:
        """Await a reply, show it and count it against the session's error budget."""
        try:
            reply = await sending
        except ServerDisconnected:
            raise SessionLost("connection closed by the server") from None
        except ReplyTimeout:
            raise SessionLost(f"no reply within {self.options.reply_timeout:g} s") from None
        except BadReply as exc:
            raise UnusableReply(f"unusable reply ({exc})") from None
        self._show(reply)
        if reply.code >= 400:
            self.errors += 1
            if 500 <= reply.code <= 504:
                self.syntax_errors += 1
        return reply

    def _show(self, reply: Reply) -> None:
        in_full = self.reply_chars_shown < MAX_REPLY_CHARS
        shown = reply.lines[:MAX_REPLY_LINES] if in_full else reply.lines[:1]
        limit = MAX_DISPLAY_CHARS if in_full else CUT_REPLY_CHARS
        for line in shown:
            text = sanitize_line(line, limit=limit)
            self.reply_chars_shown += len(text)
            self.emit(Received(text))
        hidden = len(reply.lines) - len(shown)
        if hidden > 0:
            self._progress(f"{hidden} more reply lines not shown")
        if in_full and self.reply_chars_shown >= MAX_REPLY_CHARS:
            self._progress(
                f"Over {MAX_REPLY_CHARS // 1024} KiB of replies shown: from here on only the "
                "first line of each"
            )

    def _progress(self, text: str) -> None:
        self.emit(Progress(text))

    async def _checkpoint(self) -> None:
        if self.checkpoint is not None:
            await self.checkpoint()


async def run_relay_test(
    target: str,
    options: RelayTestOptions,
    emit: Emit,
    *,
    registry: CanaryRegistry | None = None,
    ptr_lookup: PtrLookup = lookup_ptr,
    checkpoint: Checkpoint | None = None,
) -> Summary:
    """Test `target` (an IP address) and return the summary; every step is passed to `emit`.

    With a `registry` (whose canary sink receives mail for the test domain), accepted probes
    send a test message and the test waits for it to arrive. `checkpoint` is awaited before each
    probe and each test message: a front door holds the test there while it finds out whether
    its caller is still listening.
    """
    address = str(ipaddress.ip_address(target))
    return await _RelayTest(address, options, emit, registry, checkpoint).run(ptr_lookup)
