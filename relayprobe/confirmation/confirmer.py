"""Delivery confirmation for one relay test: the proof that an accepted probe was relayed.

A token per probe goes into its recipient; an accepted probe's test message carries the token
and its secret; after the probes, the test waits (bounded) for the messages to reach the canary
sink and reports each arrival as it comes.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

from relayprobe.confirmation import canary
from relayprobe.confirmation.canary import CanaryRegistry, RegistryFull
from relayprobe.relaytest.events import ConfirmationEnded, Event, Progress, Relayed


class Confirmer:
    """The tokens and test messages of one test, against one registry."""

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
        self._sent: dict[str, str] = {}
        self.registry_full = False
        """Some probes ran without a token: too many tests were waiting for mail."""

    def token_for(self, probe: str) -> str | None:
        """A fresh token for `probe`'s recipient, or None when the registry is full."""
        token = canary.new_token()
        try:
            self._registry.register(token, ttl=self._token_ttl)
        except RegistryFull:
            self.registry_full = True
            return None
        self._probe_by_token[token] = probe
        return token

    def message(self, token: str, *, sender: str, recipient: str, tested_host: str) -> bytes:
        """The test message for the probe that `token` belongs to."""
        return canary.test_message(
            token=token,
            secret=self._registry.message_secret(token),
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
        is a `Relayed` event, and `ConfirmationEnded` says what was waited for."""
        sent = self._sent
        if sent:
            self._emit(Progress(f"Waiting up to {self._wait_s:g} s for relayed test messages ..."))
            await self._registry.wait(
                sent,
                timeout=self._wait_s,
                on_arrival=lambda token, after, source: self._emit(
                    Relayed(sent[token], after, source)
                ),
            )
        self._emit(ConfirmationEnded(sent=tuple(sent.values()), wait_s=self._wait_s))

    def forget(self) -> None:
        """Drop every token of this test from the registry."""
        if self._probe_by_token:
            self._registry.forget(self._probe_by_token)
