"""Delivery confirmation for one relay test: the proof that an accepted probe was relayed.

A token per probe goes into its recipient; an accepted probe's test message carries the token
and its secret; after the probes, the test waits (bounded) for the messages to reach the canary
sink and reports each arrival as it comes.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable

from relayprobe.confirmation import canary
from relayprobe.confirmation.canary import CanaryRegistry, RegistryFull, RegistryUnavailable
from relayprobe.relaytest.events import ConfirmationEnded, Event, Progress, Relayed


class Confirmer:
    """The tokens and test messages of one test, against one registry.

    A registry that cannot be reached turns confirmation off for the rest of the test
    (`registry_unavailable`): the probes go on without tokens, and nothing is waited for.
    """

    def __init__(
        self,
        registry: CanaryRegistry,
        *,
        token_ttl: float,
        wait_s: float,
        operator: str,
        emit: Callable[[Event], None],
    ) -> None:
        self._registry = registry
        self._token_ttl = token_ttl
        self._wait_s = wait_s
        self._operator = operator
        self._emit = emit
        self._probe_by_token: dict[str, str] = {}
        self._registered: list[str] = []
        self._sent: dict[str, str] = {}
        self.registry_full = False
        """Some probes ran without a token: too many tests were waiting for mail."""
        self.registry_unavailable = False
        """The registry could not be reached: confirmation stopped there."""

    def token_for(self, probe: str) -> str | None:
        """A fresh token for `probe`'s recipient, or None once the registry is unavailable.

        Nothing is registered yet: most servers refuse the recipient, and a token needs to be
        pending only once a test message can follow (`message`). A relay passes a message on
        only after its DATA, so registering between RCPT and DATA loses no arrival.
        """
        if self.registry_unavailable:
            return None
        token = canary.new_token()
        self._probe_by_token[token] = probe
        return token

    async def message(
        self, token: str, *, sender: str, recipient: str, tested_host: str
    ) -> bytes | None:
        """Register `token` and return the test message for its probe; None when the registry
        is full or cannot be reached, and no message could prove anything."""
        # Kept before registering, to be forgotten: a call that timed out may have registered.
        self._registered.append(token)
        try:
            secret = await self._registry.register(token, ttl=self._token_ttl)
        except RegistryFull:
            self.registry_full = True
            return None
        except RegistryUnavailable:
            self.registry_unavailable = True
            return None
        return canary.test_message(
            token=token,
            secret=secret,
            probe_name=self._probe_by_token[token],
            sender=sender,
            recipient=recipient,
            operator=self._operator,
            tested_host=tested_host,
            now=datetime.datetime.now(datetime.UTC),
        )

    def taken(self, token: str) -> None:
        """The tested server took the test message of `token` for delivery."""
        self._sent[token] = self._probe_by_token[token]

    async def wait(self) -> None:
        """Wait, at most the confirm wait, for the test messages the server took; each arrival
        is a `Relayed` event, and `ConfirmationEnded` says what was waited for.

        With the registry unavailable, nothing is waited for, and `ConfirmationEnded` comes
        only if a message arrived before the registry was lost: no summary may say that none
        arrived when nobody could look.
        """
        sent = self._sent
        arrived: set[str] = set()

        def relayed(token: str, after_s: float, source: str) -> None:
            arrived.add(token)
            self._emit(Relayed(sent[token], after_s, source))

        if sent and not self.registry_unavailable:
            self._emit(Progress(f"Waiting up to {self._wait_s:g} s for relayed test messages ..."))
            try:
                await self._registry.wait(sent, timeout=self._wait_s, on_arrival=relayed)
            except RegistryUnavailable:
                self.registry_unavailable = True
        if arrived or not self.registry_unavailable:
            self._emit(ConfirmationEnded(sent=tuple(sent.values()), wait_s=self._wait_s))

    async def forget(self) -> None:
        """Drop every token this test registered; a registry it cannot reach lets them expire."""
        if self._registered:
            with contextlib.suppress(RegistryUnavailable):
                await self._registry.forget(self._registered)
