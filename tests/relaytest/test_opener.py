"""The session opener's TLS decision, which is pure; sessions are tested in test_engine.py."""

from __future__ import annotations

import pytest

from relayprobe.relaytest.opener import TlsState


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
