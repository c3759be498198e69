"""The session opener's TLS decision, which is pure; sessions are tested in test_engine.py."""

from __future__ import annotations

import pytest

from relayprobe.relaytest.opener import TlsState, offers_starttls
from relayprobe.relaytest.smtpclient import Reply


@pytest.mark.parametrize(
    ("policy", "offered", "required", "wanted"),
    [
        ("auto", True, False, False),
        ("auto", False, True, True),
        ("always", True, False, True),
        ("always", False, False, False),
        ("never", True, False, False),
    ],
)
def test_starttls_is_wanted_when_required_or_always_and_offered(
    policy: str, offered: bool, required: bool, wanted: bool
) -> None:
    assert TlsState(required=required).wanted(policy, offered=offered) is wanted


def test_after_a_failure_no_session_tries_tls_again() -> None:
    state = TlsState(required=True, failure="handshake failed")
    assert not state.wanted("always", offered=True)


@pytest.mark.parametrize(
    ("message", "offered"),
    [
        ("mx.example.net\nPIPELINING\nSTARTTLS\n8BITMIME", True),
        ("mx.example.net\nstarttls", True),
        ("mx.example.net\nPIPELINING", False),
        ("mx.example.net\n\u017ftarttls", False),
        ("mx.example.net\n\ufb06arttls", False),
        ("mx.example.net\nX-STARTTLS", False),
    ],
)
def test_starttls_is_offered_by_its_own_line_in_ascii(message: str, offered: bool) -> None:
    assert offers_starttls(Reply(250, message)) is offered
