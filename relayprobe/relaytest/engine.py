"""Run one relay test against one mail server and emit what happens as events.

The engine survives servers that hang up, stall or collect errors: it opens a fresh session
before known error limits bite, reconnects after a lost connection and retries the interrupted
probe once, and bounds every wait.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from relayprobe.confirmation import canary
from relayprobe.confirmation.canary import CanaryRegistry
from relayprobe.confirmation.confirmer import Confirmer
from relayprobe.relaytest.budget import ErrorBudget
from relayprobe.relaytest.conversation import Conversation, IncompleteTest, SessionLost
from relayprobe.relaytest.events import (
    Connecting,
    Event,
    Note,
    Outcome,
    ProbeFinished,
    ProbeStarted,
    RelayTestEnded,
    Summary,
    TlsDemanded,
)
from relayprobe.relaytest.opener import SessionOpener, TlsUnavailable
from relayprobe.relaytest.options import RelayTestOptions
from relayprobe.relaytest.probes import Probe, ProbeContext, address_literal, render
from relayprobe.relaytest.rdns import lookup_ptr
from relayprobe.relaytest.sanitize import sanitize_line
from relayprobe.relaytest.smtpclient import Reply
from relayprobe.relaytest.summary import TRANSCRIPT_ONLY, summarize
from relayprobe.relaytest.verdict import asks_for_tls, classify

Emit = Callable[[Event], None]
Checkpoint = Callable[[], Awaitable[None]]
PtrLookup = Callable[..., Coroutine[Any, Any, str | None]]


class TlsRequired(Exception):
    """The server refused MAIL or RCPT until STARTTLS."""

    def __init__(self, reply: Reply, *, in_transaction: bool) -> None:
        super().__init__(f"TLS required ({reply.code})")
        self.reply = reply
        self.in_transaction = in_transaction


class _RelayTest:
    """The probe loop of one test; sessions, confirmation and the summary are delegated."""

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
        self._emit_outside = emit
        self.facts: list[Event] = []
        """The events the summary is folded from (not `TRANSCRIPT_ONLY`)."""
        self.checkpoint = checkpoint
        self.confirmer = (
            None
            if registry is None
            else Confirmer(
                registry,
                token_ttl=options.deadline + options.confirm_wait,
                wait_s=options.confirm_wait,
                operator=options.operator,
                emit=self.emit,
            )
        )
        self.talk = Conversation(
            emit=self.emit,
            reply_timeout=options.reply_timeout,
            budget=ErrorBudget(
                max_errors=options.max_errors_per_session,
                max_syntax_errors=options.max_syntax_errors_per_session,
            ),
        )
        self.opener = SessionOpener(
            self.talk,
            target,
            port=options.port,
            helo_name=options.helo_name,
            connect_timeout=options.connect_timeout,
            reply_timeout=options.reply_timeout,
            starttls=options.starttls,
        )
        self.finished: set[str] = set()
        self.context: ProbeContext | None = None

    def emit(self, event: Event) -> None:
        """Pass `event` on, and keep it if the summary is folded from it.

        The transcript's own events (three in four) are not kept: under load a test holds on to
        what it keeps for seconds, and every object kept that long is one more for the garbage
        collector to walk, again and again.
        """
        if type(event) not in TRANSCRIPT_ONLY:
            self.facts.append(event)
        self._emit_outside(event)

    async def run(self, ptr_lookup: PtrLookup) -> Summary:
        started_at = time.time()
        started = time.monotonic()
        self.emit(Connecting(self.target, self.options.port))
        ptr = asyncio.create_task(ptr_lookup(self.target, timeout=self.options.rdns_timeout))
        incomplete: str | None = None
        try:
            async with asyncio.timeout(self.options.deadline) as deadline:
                try:
                    await self.opener.open()
                    self.context = await self._context(ptr)
                    for probe in self.options.suite:
                        await self._run_probe(probe, self.context)
                    await self.talk.quit()
                except IncompleteTest as exc:
                    incomplete = str(exc)
        except TimeoutError:
            if not deadline.expired():
                raise
            incomplete = f"test deadline of {self.options.deadline:g} s reached"
        except asyncio.CancelledError:
            if self.talk.session is not None:
                self.talk.session.send_quit_and_close()
            if self.confirmer is not None:
                await self.confirmer.forget()
            raise
        finally:
            ptr.cancel()
            self.talk.drop()
        self._give_up_on_untried_probes(incomplete)
        if self.confirmer is not None:
            try:
                await self.confirmer.wait()
            finally:
                await self.confirmer.forget()
            if self.confirmer.registry_full:
                self.emit(
                    Note("delivery confirmation was off for some probes: too many tests waiting")
                )
            if self.confirmer.registry_unavailable:
                self.emit(Note("delivery confirmation unavailable: registry unreachable"))
        self.emit(
            RelayTestEnded(
                incomplete=incomplete,
                host=self._host_label(ptr),
                started_at=started_at,
                duration_s=time.monotonic() - started,
            )
        )
        summary = summarize(self.facts, notes=self.options.notes, starttls=self.options.starttls)
        self.emit(summary)
        return summary

    def _host_label(self, ptr: asyncio.Task[str | None]) -> str:
        name = ptr.result() if ptr.done() and not ptr.cancelled() and not ptr.exception() else None
        return name or self.opener.banner_name or self.target

    async def _context(self, ptr: asyncio.Task[str | None]) -> ProbeContext:
        try:
            async with asyncio.timeout(self.options.rdns_timeout):
                name = await asyncio.shield(ptr)
        except TimeoutError:
            name = None
        literal = address_literal(self.target)
        return ProbeContext(
            host=name or self.opener.banner_name or literal,
            ip=literal,
            dom=self.options.test_domain,
            foreign=self.options.foreign_domain,
        )

    async def _run_probe(self, probe: Probe, context: ProbeContext) -> None:
        await self._checkpoint()
        self.emit(ProbeStarted(probe.name))
        token = self.confirmer.token_for(probe.name) if self.confirmer else None
        values = context.values(rcpt=canary.local_part(token) if token else "nobody")
        mail_from = render(probe.mail_from, values)
        rcpt_to = render(probe.rcpt_to, values)
        talk = self.talk
        lost = ""
        attempt = 1
        while attempt <= 2:
            if talk.session is not None and talk.budget.spent:
                talk.progress("Opening a fresh session before the server's error limit")
                await talk.quit()
            if talk.session is None:
                await self.opener.reopen()
            try:
                outcome, reply = await self._exchange(mail_from, rcpt_to)
            except TlsRequired as exc:
                # Refused for want of TLS is not refused: the probe runs again, over TLS.
                await self._require_tls(exc)
                continue
            except SessionLost as exc:
                talk.drop()
                lost = str(exc)
                then = "retrying on a fresh session" if attempt == 1 else "giving up on this probe"
                talk.progress(f"{lost} during {probe.name}; {then}")
                attempt += 1
                continue
            self._finish(probe, mail_from, rcpt_to, outcome, reply)
            await self._after_answer(probe.name, mail_from, rcpt_to, token, context, outcome)
            return
        self._finish(probe, mail_from, rcpt_to, Outcome.ERROR, lost)

    async def _exchange(self, mail_from: str, rcpt_to: str) -> tuple[Outcome, str]:
        reply = await self.talk.command(f"MAIL FROM:{mail_from}", lost_on_421=True)
        self._check_tls_demand(reply, in_transaction=False)
        if 200 <= reply.code < 300:
            reply = await self.talk.command(f"RCPT TO:{rcpt_to}", lost_on_421=True)
            self._check_tls_demand(reply, in_transaction=True)
        return classify(reply.code), sanitize_line(reply.line)

    def _check_tls_demand(self, reply: Reply, *, in_transaction: bool) -> None:
        if not self.opener.tls.over_tls and asks_for_tls(reply.code, reply.message):
            raise TlsRequired(reply, in_transaction=in_transaction)

    async def _require_tls(self, demand: TlsRequired) -> None:
        """The server wants STARTTLS before it takes mail: go on over TLS, or say why not."""
        tls = self.opener.tls
        if not tls.required:
            tls.required = True
            self.emit(TlsDemanded(demand.reply.code))
        why = f"the server requires STARTTLS ({demand.reply.code})"
        if self.options.starttls == "never":
            raise IncompleteTest(f"{why} and TLS is off (--starttls never)")
        if tls.failure is not None:
            raise IncompleteTest(f"{why}, but {tls.failure}")
        try:
            if demand.in_transaction:
                await self.talk.command("RSET")
            await self.opener.start_tls()
        except (TlsUnavailable, SessionLost) as exc:
            raise IncompleteTest(f"{why}, but {exc}") from None

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
            if outcome is Outcome.ACCEPTED and token is not None and self.confirmer is not None:
                message = await self.confirmer.message(
                    token, sender=mail_from, recipient=rcpt_to, tested_host=context.host
                )
                if message is not None and await self._send_message(message, token):
                    self.confirmer.taken(token)
            await self.talk.command("RSET")
        except SessionLost as exc:
            self.talk.drop()
            self.talk.progress(f"{exc} after the answer to {name}")

    async def _send_message(self, message: bytes, token: str) -> bool:
        """DATA and the test message; True when the server took it."""
        await self._checkpoint()
        talk = self.talk
        reply = await talk.command("DATA")
        if reply.code != 354:
            return False
        lines = message.count(b"\n")
        reply = await talk.message(
            message, description=f"(test message: {lines} lines, token {token})"
        )
        return 200 <= reply.code < 300

    def _finish(
        self, probe: Probe, mail_from: str, rcpt_to: str, outcome: Outcome, reply: str
    ) -> None:
        self.finished.add(probe.name)
        over_tls = self.opener.tls.over_tls
        self.emit(
            ProbeFinished(probe.name, mail_from, rcpt_to, outcome, reply, probe.form, over_tls)
        )

    def _give_up_on_untried_probes(self, incomplete: str | None) -> None:
        """When a test stops half-way, the probes it never got to count as errors."""
        if incomplete is None or self.context is None:
            return
        values = self.context.values(rcpt="nobody")
        for probe in self.options.suite:
            if probe.name not in self.finished:
                mail_from, rcpt_to = render(probe.mail_from, values), render(probe.rcpt_to, values)
                self._finish(probe, mail_from, rcpt_to, Outcome.ERROR, "not tried")

    async def _checkpoint(self) -> None:
        if self.checkpoint is not None:
            await self.checkpoint()


def run_relay_test(
    target: str,
    options: RelayTestOptions,
    emit: Emit,
    *,
    registry: CanaryRegistry | None = None,
    ptr_lookup: PtrLookup = lookup_ptr,
    checkpoint: Checkpoint | None = None,
) -> Coroutine[Any, Any, Summary]:
    """Test `target` (an IP address) and return the summary; every step is passed to `emit`.

    With a `registry` (whose canary sink receives mail for the test domain), accepted probes
    send a test message and the test waits for it to arrive. `checkpoint` is awaited before each
    probe and each test message: a front door holds the test there while it finds out whether
    its caller is still listening. The test's own coroutine, not one around it (each reply
    resumes every coroutine it is awaited through); a `target` that is no IP address raises
    ValueError here.
    """
    address = str(ipaddress.ip_address(target))
    return _RelayTest(address, options, emit, registry, checkpoint).run(ptr_lookup)
