from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayprobe.relaytest import verdict as verdict_module
from relayprobe.relaytest.events import Outcome, ProbeFinished
from relayprobe.relaytest.probes import CLASSIC, AddressForm
from relayprobe.relaytest.verdict import (
    Confirmation,
    asks_for_tls,
    classify,
    summary_lines,
    verdict,
)

BANNER = "220 mail2.example.com ESMTP Postfix"
REJECT = "554 5.7.1 <nobody@relaytest.invalid>: Relay access denied"


FORMS = {probe.name: probe.form for probe in CLASSIC}
OPEN_RELAY = (
    "Note: this is an open relay: it passed test messages on to a third party's domain; "
    "the user guide shows how to close it"
)


def probe(name: str, outcome: Outcome) -> ProbeFinished:
    replies = {
        Outcome.REJECTED: REJECT,
        Outcome.DEFERRED: "451 4.3.0 try again later",
        Outcome.ACCEPTED: "250 2.1.5 Ok",
        Outcome.RELAYED: "250 2.1.5 Ok",
        Outcome.ERROR: "",
    }
    return ProbeFinished(
        name,
        "<spamtest@mail2.example.com>",
        "<nobody@relaytest.invalid>",
        outcome,
        replies[outcome],
        FORMS.get(name, AddressForm.PLAIN),
    )


def suite(outcomes: dict[str, Outcome] | None = None) -> list[ProbeFinished]:
    """The twenty classic probes, all rejected except those given."""
    names = ["Quote test", *(f"Test {n}" for n in range(1, 20))]
    return [probe(name, (outcomes or {}).get(name, Outcome.REJECTED)) for name in names]


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (250, Outcome.ACCEPTED),
        (251, Outcome.ACCEPTED),
        (252, Outcome.ACCEPTED),
        (200, Outcome.ACCEPTED),
        (299, Outcome.ACCEPTED),
        (421, Outcome.DEFERRED),
        (450, Outcome.DEFERRED),
        (451, Outcome.DEFERRED),
        (452, Outcome.DEFERRED),
        (499, Outcome.DEFERRED),
        (500, Outcome.REJECTED),
        (501, Outcome.REJECTED),
        (550, Outcome.REJECTED),
        (553, Outcome.REJECTED),
        (554, Outcome.REJECTED),
    ],
)
def test_classify(code: int, outcome: Outcome) -> None:
    assert classify(code) is outcome


def test_all_rejected() -> None:
    probes = suite()
    assert verdict(probes, incomplete=None, confirmation=None) == "rejected"
    assert summary_lines(probes, banner=BANNER, incomplete=None, confirmation=None) == (
        "Tested host banner: 220 mail2.example.com ESMTP Postfix",
        "System appeared to reject relay attempts",
        "Note: every relay attempt was refused: not an open relay to these probes",
    )


def test_one_accepted_as_in_the_seed() -> None:
    probes = suite({"Test 8": Outcome.ACCEPTED})
    assert verdict(probes, incomplete=None, confirmation=None) == "accepted"
    assert summary_lines(
        probes, banner="220 example.com ESMTP", incomplete=None, confirmation=None
    ) == (
        "Tested host banner: 220 example.com ESMTP",
        "System appeared to accept 1 relay attempts",
        "Note: the 1 accepted recipients use address forms (%-hack) that qmail and some other "
        "servers accept and then bounce; only delivery proves relaying, and delivery "
        "confirmation is off",
    )


def test_several_accepted() -> None:
    probes = suite(
        {"Test 8": Outcome.ACCEPTED, "Test 9": Outcome.ACCEPTED, "Test 12": Outcome.ACCEPTED}
    )
    assert verdict(probes, incomplete=None, confirmation=None) == "accepted"
    lines = summary_lines(probes, banner=BANNER, incomplete=None, confirmation=None)
    assert lines[1] == "System appeared to accept 3 relay attempts"


def test_banner_line_comes_first() -> None:
    for probes in (
        suite(),
        suite({"Test 8": Outcome.ACCEPTED}),
        suite({"Test 3": Outcome.DEFERRED}),
    ):
        lines = summary_lines(probes, banner=BANNER, incomplete=None, confirmation=None)
        assert lines[0] == f"Tested host banner: {BANNER}"
        assert sum(line.startswith("Tested host banner:") for line in lines) == 1


def test_incomplete_without_banner() -> None:
    assert verdict([], incomplete="connection refused", confirmation=None) == "incomplete"
    assert summary_lines([], banner=None, incomplete="connection refused", confirmation=None) == (
        "Test incomplete: connection refused",
        "Note: the test did not finish, so it says nothing yet about relaying",
    )


def test_incomplete_after_banner_with_nothing_accepted() -> None:
    probes = suite()[:5]
    reason = "test deadline of 300 s reached"
    assert verdict(probes, incomplete=reason, confirmation=None) == "incomplete"
    assert summary_lines(probes, banner=BANNER, incomplete=reason, confirmation=None) == (
        f"Tested host banner: {BANNER}",
        "Test incomplete: test deadline of 300 s reached",
        "Note: the test did not finish, so it says nothing yet about relaying",
    )


def test_accepted_beats_incomplete_and_the_reason_becomes_a_note() -> None:
    probes = [probe("Quote test", Outcome.REJECTED), probe("Test 1", Outcome.ACCEPTED)]
    reason = "server refused the session: 421 too many connections"
    assert verdict(probes, incomplete=reason, confirmation=None) == "accepted"
    assert summary_lines(probes, banner=BANNER, incomplete=reason, confirmation=None) == (
        f"Tested host banner: {BANNER}",
        "System appeared to accept 1 relay attempts",
        "Note: test incomplete: server refused the session: 421 too many connections",
        "Note: the server accepted 1 relay attempts at RCPT; only delivery proves relaying, and "
        "delivery confirmation is off",
    )


def test_deferred_probes_get_a_note() -> None:
    probes = suite({"Test 2": Outcome.DEFERRED, "Test 7": Outcome.DEFERRED})
    assert verdict(probes, incomplete=None, confirmation=None) == "rejected"
    assert summary_lines(probes, banner=BANNER, incomplete=None, confirmation=None) == (
        f"Tested host banner: {BANNER}",
        "System appeared to reject relay attempts",
        "Note: 2 probes were deferred with a 4xx reply, a temporary refusal (Test 2, Test 7)",
        "Note: no relay attempt was accepted (2 refused only for now, with 4xx): "
        "not an open relay to these probes",
    )


def test_probes_in_error_make_the_test_incomplete() -> None:
    probes = suite({"Test 4": Outcome.ERROR, "Test 5": Outcome.ERROR})
    assert verdict(probes, incomplete=None, confirmation=None) == "incomplete"
    assert summary_lines(probes, banner=BANNER, incomplete=None, confirmation=None) == (
        f"Tested host banner: {BANNER}",
        "Test incomplete: 2 probes got no reply (Test 4, Test 5)",
        "Note: the test did not finish, so it says nothing yet about relaying",
    )


def test_errors_beside_an_accepted_probe_get_a_note() -> None:
    probes = suite({"Test 8": Outcome.ACCEPTED, "Test 19": Outcome.ERROR})
    assert verdict(probes, incomplete=None, confirmation=None) == "accepted"
    assert summary_lines(probes, banner=BANNER, incomplete=None, confirmation=None) == (
        f"Tested host banner: {BANNER}",
        "System appeared to accept 1 relay attempts",
        "Note: 1 probes got no reply (Test 19)",
        "Note: the 1 accepted recipients use address forms (%-hack) that qmail and some other "
        "servers accept and then bounce; only delivery proves relaying, and delivery "
        "confirmation is off",
    )


def test_extra_notes_come_last() -> None:
    lines = summary_lines(
        suite({"Test 1": Outcome.DEFERRED}),
        banner=BANNER,
        incomplete=None,
        confirmation=None,
        notes=("reconnected 2 times",),
    )
    assert lines[-3].startswith("Note: 1 probes were deferred")
    assert lines[-2] == "Note: reconnected 2 times"
    assert lines[-1].startswith("Note: no relay attempt was accepted")


def test_relay_confirmed() -> None:
    probes = suite(
        {"Test 8": Outcome.RELAYED, "Test 9": Outcome.RELAYED, "Test 13": Outcome.ACCEPTED}
    )
    confirmation = Confirmation(
        sent=("Test 8", "Test 9", "Test 13"), arrived=("Test 8", "Test 9"), wait_s=30.0
    )
    assert verdict(probes, incomplete=None, confirmation=confirmation) == "relayed"
    assert summary_lines(probes, banner=BANNER, incomplete=None, confirmation=confirmation) == (
        f"Tested host banner: {BANNER}",
        "System appeared to accept 3 relay attempts",
        "Relay confirmed: 2 of 3 test messages arrived (Test 8, Test 9)",
        OPEN_RELAY,
    )


@pytest.mark.parametrize(("wait_s", "shown"), [(30.0, "30"), (2.5, "2.5"), (120, "120")])
def test_relay_not_confirmed_as_in_the_seeds_qmail_case(wait_s: float, shown: str) -> None:
    probes = suite({"Test 8": Outcome.ACCEPTED})
    confirmation = Confirmation(sent=("Test 8",), arrived=(), wait_s=wait_s)
    assert verdict(probes, incomplete=None, confirmation=confirmation) == "accepted"
    assert summary_lines(probes, banner=BANNER, incomplete=None, confirmation=confirmation) == (
        f"Tested host banner: {BANNER}",
        "System appeared to accept 1 relay attempts",
        f"Relay not confirmed: none of 1 test messages arrived within {shown} s",
        "Note: the 1 accepted recipients use address forms (%-hack) that qmail and some other "
        "servers accept and then bounce; only delivery proves relaying, and no test message "
        "arrived",
    )


def test_no_confirmation_line_when_no_message_was_sent() -> None:
    confirmation = Confirmation(sent=(), arrived=(), wait_s=30.0)
    probes = suite()
    assert verdict(probes, incomplete=None, confirmation=confirmation) == "rejected"
    assert summary_lines(probes, banner=BANNER, incomplete=None, confirmation=confirmation) == (
        f"Tested host banner: {BANNER}",
        "System appeared to reject relay attempts",
        "Note: every relay attempt was refused: not an open relay to these probes",
    )


def test_deferred_only_is_rejected_not_incomplete() -> None:
    probes = [probe(name, Outcome.DEFERRED) for name in ("Quote test", "Test 1")]
    assert verdict(probes, incomplete=None, confirmation=None) == "rejected"


def test_qmail_case_in_plain_words_names_the_forms_accepted() -> None:
    """The seed's qmail: 250 to %-hacks, bang paths, quoted and routed recipients, no arrival."""
    accepted = ["Quote test", "Test 8", "Test 9", "Test 10", "Test 15", "Test 17", "Test 18"]
    probes = suite(dict.fromkeys(accepted, Outcome.ACCEPTED))
    confirmation = Confirmation(sent=tuple(accepted), arrived=(), wait_s=30.0)
    lines = summary_lines(probes, banner=BANNER, incomplete=None, confirmation=confirmation)
    assert lines[-1] == (
        "Note: the 7 accepted recipients use address forms (%-hack, bang path, quoted local part, "
        "source route) that qmail and some other servers accept and then bounce; only delivery "
        "proves relaying, and no test message arrived"
    )


def test_a_plain_recipient_accepted_is_not_put_down_to_qmail() -> None:
    probes = suite({"Test 8": Outcome.ACCEPTED, "Test 2": Outcome.ACCEPTED})
    confirmation = Confirmation(sent=("Test 2", "Test 8"), arrived=(), wait_s=30.0)
    lines = summary_lines(probes, banner=BANNER, incomplete=None, confirmation=confirmation)
    assert lines[-1] == (
        "Note: the server accepted 2 relay attempts at RCPT; only delivery proves relaying, and "
        "no test message arrived"
    )


def test_accepted_recipients_but_no_message_taken() -> None:
    probes = suite({"Test 2": Outcome.ACCEPTED})
    confirmation = Confirmation(sent=(), arrived=(), wait_s=30.0)
    lines = summary_lines(probes, banner=BANNER, incomplete=None, confirmation=confirmation)
    assert lines[-2] == "Note: the server refused every test message, so relaying was not proven"
    assert lines[-1].endswith("only delivery proves relaying, and the server took no test message")


@pytest.mark.parametrize(
    "outcomes",
    [
        {},
        {"Test 3": Outcome.DEFERRED},
        {"Test 8": Outcome.ACCEPTED},
        {"Test 2": Outcome.ACCEPTED},
        {"Test 8": Outcome.RELAYED},
        {"Test 4": Outcome.ERROR},
    ],
)
def test_every_verdict_ends_with_one_plain_line(outcomes: dict[str, Outcome]) -> None:
    probes = suite(outcomes)
    relayed = tuple(name for name, outcome in outcomes.items() if outcome is Outcome.RELAYED)
    for confirmation in (None, Confirmation(sent=relayed, arrived=relayed, wait_s=1.0)):
        lines = summary_lines(probes, banner=BANNER, incomplete=None, confirmation=confirmation)
        assert lines[-1].startswith("Note: ")
        assert sum(line.startswith(lines[-1]) for line in lines) == 1


@pytest.mark.parametrize(
    ("code", "text", "asks"),
    [
        (530, "5.7.0 Must issue a STARTTLS command first", True),
        (530, "Authentication required", True),
        (454, "4.7.0 TLS required for this recipient", True),
        (550, "5.7.1 Please use starttls", True),
        (454, "4.7.1 <nobody%relaytest.invalid@tls-closed.example>: Relay access denied", False),
        (554, "5.7.1 <nobody@relaytest.invalid>: rejected by mx.tls.example.net", False),
        (550, "5.7.1 <tls@example.net>: no TLS here? Relay access denied", True),
        (250, "2.1.0 TLS is nice", False),
    ],
)
def test_a_refusal_asks_for_tls_only_when_it_says_so(code: int, text: str, asks: bool) -> None:
    assert asks_for_tls(code, text) is asks


# Text made of the pieces the word rules turn on, and characters that change case oddly.
TLS_TEXT = st.lists(
    st.sampled_from(
        ["TLS", "tls", "StartTLS", "<", ">", ".", "-", "_", "@", " ", "x", "\u0130", "\u017f"]
    ),
    max_size=12,
).map("".join)


@given(code=st.sampled_from([250, 421, 450, 454, 530, 550, 554]), text=TLS_TEXT)
def test_the_quick_look_for_tls_changes_no_answer(code: int, text: str) -> None:
    """The look for the letters before the word rules is a shortcut, never a different rule."""
    without_addresses = verdict_module._ECHOED_ADDRESS.sub("", text)
    by_the_rules = code == 530 or (
        code >= 400 and verdict_module._TLS_WORD.search(without_addresses) is not None
    )
    assert asks_for_tls(code, text) is by_the_rules
