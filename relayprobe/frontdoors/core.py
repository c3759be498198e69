"""The session core every front door calls: admit a caller, run its test, report the result.

A front door (telnet, HTTP, `check`) only reads its caller and renders events; admission
(access lists, the session cap, rate limits shared by every door), counting, the transcript kept
for the record, metrics, the `session_end` log line and the history are here, once.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from relayprobe.confirmation.canary import CanaryRegistry
from relayprobe.frontdoors.access import (
    ACCESS_REFUSAL,
    AccessPolicy,
    RateDecision,
    RateLimiter,
    Refusal,
    rate_refusal,
)
from relayprobe.frontdoors.addresses import IPAddress, parse_network
from relayprobe.operations.config import Settings
from relayprobe.relaytest.engine import Checkpoint
from relayprobe.relaytest.events import Outcome
from relayprobe.reports.result import TestResult, new_result_id
from relayprobe.testrun import OnLines, run_test

if TYPE_CHECKING:
    from relayprobe.operations.metrics import Metrics

log = structlog.get_logger("relayprobe.session")

OnResult = Callable[[TestResult], None]

BUSY = Refusal("busy", "Too many tests running, try again in a minute", retry_after_s=60)


class Limits(Protocol):
    """Rate limits as admission uses them: this process's own, or shared by replicas."""

    async def check(self, address: IPAddress) -> RateDecision: ...

    async def peek(self, address: IPAddress) -> RateDecision: ...

    async def refund_global(self) -> None: ...


class LocalLimits:
    """This process's `RateLimiter` behind the interface a shared limiter needs."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def check(self, address: IPAddress) -> RateDecision:
        return self.limiter.check(address)

    async def peek(self, address: IPAddress) -> RateDecision:
        return self.limiter.peek(address)

    async def refund_global(self) -> None:
        self.limiter.refund_global()


def rate_limits(settings: Settings) -> dict[str, Any]:
    """The rate limiter's keywords from the settings; the same for a shared limiter."""
    return {
        "per_address_interval": settings.rate_address_interval,
        "per_prefix": settings.rate_prefix_tests,
        "prefix_window": settings.rate_prefix_window,
        "ipv4_prefix": settings.rate_ipv4_prefix,
        "ipv6_prefix": settings.rate_ipv6_prefix,
        "global_per_second": settings.rate_global,
        "global_burst": max(1, round(settings.rate_global)),
    }


class EndReason(enum.StrEnum):
    """Why a session ended; the values are the `reason` of the `session_end` log line."""

    FINISHED = "finished"
    CLIENT_CLOSED = "client closed"
    INTERRUPTED = "interrupted"
    SLOW_CLIENT = "client stopped reading"
    SHUTDOWN = "service shutting down"
    INTERNAL_ERROR = "internal error"


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted caller: the core has counted it against the limits."""

    caller: IPAddress
    door: str
    session_id: int


class RunningTest:
    """One admitted caller's test, from `SessionCore.start` until its task is done."""

    def __init__(self, ticket: Ticket, log: Any) -> None:
        self.ticket = ticket
        self.log = log
        self.task: asyncio.Task[TestResult] | None = None
        self.end_reason: EndReason | None = None
        self.result: TestResult | None = None
        self.heard_server = False
        """Whether the tested server said anything: until then the test cost little."""

    def stop(self, reason: EndReason) -> None:
        """Stop the test (its SMTP session gets QUIT); the first reason given counts."""
        if self.end_reason is None:
            self.end_reason = reason
        if self.task is not None and not self.task.done():
            self.task.cancel()


class SessionCore:
    """Admission, running and reporting for every front door of one service."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CanaryRegistry | None = None,
        metrics: Metrics | None = None,
        on_result: OnResult | None = None,
        limits: Limits | None = None,
    ) -> None:
        """`limits` are the rate limits; by default (with `rate_limit` on) this process's own."""
        if metrics is None:
            # Here, not at the top: a core made without metrics (the demo, tests) still counts,
            # and only then is prometheus_client loaded.
            from relayprobe.operations.metrics import Metrics

            metrics = Metrics()
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.on_result = on_result
        self.options = settings.test_options()
        self.policy = AccessPolicy(allow=settings.allow, deny=settings.deny)
        if limits is None and settings.rate_limit:
            limits = LocalLimits(RateLimiter(**rate_limits(settings)))
        self.limits = limits if settings.rate_limit else None
        self.trusted_proxies = tuple(parse_network(cidr) for cidr in settings.trusted_proxy)
        self.running: dict[int, RunningTest] = {}
        self._admitting = 0
        """Callers between the session cap and their start: they hold a slot meanwhile."""
        self._refunds: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._shutting_down = False

    @property
    def keeps_results(self) -> bool:
        return self.on_result is not None

    def next_session_id(self) -> int:
        return next(self._ids)

    def is_trusted_proxy(self, peer: IPAddress) -> bool:
        return any(peer in network for network in self.trusted_proxies)

    async def admission(self, caller: IPAddress) -> Refusal | None:
        """Whether `caller` could test now, charging nothing: what a landing page tells."""
        return await self._refusal(caller, charge=False)

    async def admit(self, caller: IPAddress, *, door: str, session_id: int) -> Ticket | Refusal:
        """Whether `caller` may test now; a rate limit is charged only when the answer is yes.

        Start the test (`start`) right after a ticket, without awaiting anything in between. A
        refusal is logged and counted here; the front door only tells the caller.
        """
        refusal = await self._refusal(caller, charge=True)
        if refusal is None:
            return Ticket(caller, door, session_id)
        log.info(
            "session_refused",
            session=session_id,
            door=door,
            target=str(caller),
            reason=refusal.reason,
        )
        self.metrics.refused(refusal.reason)
        return refusal

    async def _refusal(self, caller: IPAddress, *, charge: bool) -> Refusal | None:
        if not self.policy.permits(caller):
            return ACCESS_REFUSAL
        if self._shutting_down or len(self.running) + self._admitting >= self.settings.max_sessions:
            return BUSY
        if self.limits is None:
            return None
        # A shared limiter answers after a round trip: hold a slot meanwhile, so that callers
        # admitted at once cannot pass the session cap together.
        self._admitting += 1
        try:
            decision = await (self.limits.check(caller) if charge else self.limits.peek(caller))
        finally:
            self._admitting -= 1
        return None if decision.allowed else rate_refusal(decision)

    def start(
        self,
        ticket: Ticket,
        *,
        on_lines: OnLines,
        checkpoint: Checkpoint | None = None,
        on_done: Callable[[RunningTest], None] | None = None,
    ) -> RunningTest:
        """Run the test of an admitted caller; `on_done` is called when it is over, whatever
        ended it.

        The session is counted from here to the task's done-callback, never from inside the
        task: a caller who hangs up at once gets the task cancelled before its first step, and
        a `finally` in it would never run.
        """
        running = RunningTest(
            ticket, log.bind(session=ticket.session_id, door=ticket.door, target=str(ticket.caller))
        )
        test = self._run(running, on_lines, checkpoint)  # before anything is counted
        self.running[ticket.session_id] = running
        self.metrics.session_opened()
        self.metrics.test_started()
        running.log.info("session_start")
        running.task = asyncio.create_task(test, name=f"session-{ticket.session_id}")
        running.task.add_done_callback(
            functools.partial(self._done, running, time.monotonic(), on_done)
        )
        return running

    def _run(
        self, running: RunningTest, on_lines: OnLines, checkpoint: Checkpoint | None
    ) -> Coroutine[Any, Any, TestResult]:
        def heard_server() -> None:
            running.heard_server = True

        return self.run(
            running.ticket.caller,
            on_lines,
            checkpoint=checkpoint,
            result_id=new_result_id() if self.keeps_results else None,
            on_first_reply=heard_server,
        )

    def result_url(self, result_id: str) -> str | None:
        """The link to a stored result, where the web front door has a public URL."""
        if self.settings.public_url is None:
            return None
        return f"{self.settings.public_url}/results/{result_id}"

    def run(
        self,
        target: IPAddress,
        on_lines: OnLines,
        *,
        checkpoint: Checkpoint | None = None,
        result_id: str | None = None,
        on_first_reply: Callable[[], None] | None = None,
    ) -> Coroutine[Any, Any, TestResult]:
        """Test `target` without admission, with this service's registry and links.

        The test's own coroutine, not one around it: every reply of a test resumes each
        coroutine it is awaited through.
        """
        return run_test(
            self.settings,
            target,
            on_lines,
            options=self.options,
            registry=self.registry,
            checkpoint=checkpoint,
            result_id=result_id,
            result_url=None if result_id is None else self.result_url(result_id),
            on_first_reply=on_first_reply,
        )

    def _done(
        self,
        running: RunningTest,
        started: float,
        on_done: Callable[[RunningTest], None] | None,
        task: asyncio.Task[TestResult],
    ) -> None:
        del self.running[running.ticket.session_id]
        self.metrics.session_closed()
        if task.cancelled():
            if not running.heard_server and self.limits is not None:
                refund = asyncio.create_task(self.limits.refund_global())
                self._refunds.add(refund)
                refund.add_done_callback(self._refunds.discard)
        elif (error := task.exception()) is not None:
            running.end_reason = EndReason.INTERNAL_ERROR
            running.log.error("session_failed", exc_info=error)
        else:
            running.result = task.result()
        reason = running.end_reason or EndReason.FINISHED
        running.end_reason = reason
        if reason is EndReason.SLOW_CLIENT:
            self.metrics.refused("slow_client")
        duration = round(time.monotonic() - started, 3)
        result = running.result
        if result is None:
            running.log.info("session_end", reason=reason.value, duration_s=duration)
        else:
            self.report(result, duration=duration, log=running.log)
        if on_done is not None:
            on_done(running)

    def report(self, result: TestResult, *, duration: float, log: Any) -> None:
        """Metrics, the `session_end` line and the history for a finished test."""
        summary = result.summary
        self.metrics.test_finished(
            summary.verdict, duration, [probe.outcome for probe in summary.probes]
        )
        log.info(
            "session_end",
            reason=EndReason.FINISHED.value,
            verdict=summary.verdict,
            banner=summary.banner,
            duration_s=duration,
            **outcome_counts(result),
        )
        if self.on_result is not None:
            self.on_result(result)

    def stop_all(self, reason: EndReason) -> Iterable[asyncio.Task[TestResult]]:
        """Refuse newcomers and stop every running test; the tasks to wait for."""
        self._shutting_down = True
        tasks = []
        for running in list(self.running.values()):
            running.stop(reason)
            if running.task is not None:
                tasks.append(running.task)
        return tasks


def outcome_counts(result: TestResult) -> dict[str, int]:
    """The counts of the JSON result, for the log line."""
    return {
        "accepted": result.count(Outcome.ACCEPTED, Outcome.RELAYED),
        "relayed": result.count(Outcome.RELAYED),
        "deferred": result.count(Outcome.DEFERRED),
        "rejected": result.count(Outcome.REJECTED),
        "errors": result.count(Outcome.ERROR),
    }
