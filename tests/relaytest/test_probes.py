from __future__ import annotations

import pytest

from relayprobe.relaytest.probes import (
    CLASSIC,
    EXTENDED,
    PLACEHOLDERS,
    SUITES,
    Probe,
    ProbeContext,
    address_literal,
    build_suite,
    check_template,
    render,
)

V4_CONTEXT = ProbeContext(
    host="mail2.example.com", ip="[192.0.2.4]", dom="relaytest.invalid", foreign="example.net"
)
V6_CONTEXT = ProbeContext(
    host="mx6.example.org", ip="[IPv6:2001:db8::4]", dom="relaytest.invalid", foreign="example.net"
)

# The spec's classic table, written out by hand for each target: (probe, MAIL FROM, RCPT TO).
CLASSIC_V4 = [
    ("Quote test", "<spamtest@mail2.example.com>", '<"nobody@relaytest.invalid">'),
    ("Test 1", "<nobody@relaytest.invalid>", "<nobody@relaytest.invalid>"),
    ("Test 2", "<spamtest@example.net>", "<nobody@relaytest.invalid>"),
    ("Test 3", "<spamtest@localhost>", "<nobody@relaytest.invalid>"),
    ("Test 4", "<spamtest>", "<nobody@relaytest.invalid>"),
    ("Test 5", "<>", "<nobody@relaytest.invalid>"),
    ("Test 6", "<spamtest@mail2.example.com>", "<nobody@relaytest.invalid>"),
    ("Test 7", "<spamtest@[192.0.2.4]>", "<nobody@relaytest.invalid>"),
    ("Test 8", "<spamtest@mail2.example.com>", "<nobody%relaytest.invalid@mail2.example.com>"),
    ("Test 9", "<spamtest@mail2.example.com>", "<nobody%relaytest.invalid@[192.0.2.4]>"),
    ("Test 10", "<spamtest@mail2.example.com>", '<"nobody@relaytest.invalid">'),
    ("Test 11", "<spamtest@mail2.example.com>", '<"nobody%relaytest.invalid">'),
    ("Test 12", "<spamtest@[192.0.2.4]>", '<nobody@relaytest.invalid@mail2.example.com">'),
    ("Test 13", "<spamtest@mail2.example.com>", '<"nobody@relaytest.invalid"@[192.0.2.4]>'),
    ("Test 14", "<spamtest@mail2.example.com>", "<nobody@relaytest.invalid@[192.0.2.4]>"),
    ("Test 15", "<spamtest@[192.0.2.4]>", "<@mail2.example.com:nobody@relaytest.invalid>"),
    ("Test 16", "<spamtest@mail2.example.com>", "<@[192.0.2.4]:nobody@relaytest.invalid>"),
    ("Test 17", "<spamtest@[192.0.2.4]>", "<relaytest.invalid!nobody>"),
    ("Test 18", "<spamtest@mail2.example.com>", "<relaytest.invalid!nobody@[192.0.2.4]>"),
    ("Test 19", "<postmaster@mail2.example.com>", "<nobody@relaytest.invalid>"),
]

CLASSIC_V6 = [
    ("Quote test", "<spamtest@mx6.example.org>", '<"nobody@relaytest.invalid">'),
    ("Test 1", "<nobody@relaytest.invalid>", "<nobody@relaytest.invalid>"),
    ("Test 2", "<spamtest@example.net>", "<nobody@relaytest.invalid>"),
    ("Test 3", "<spamtest@localhost>", "<nobody@relaytest.invalid>"),
    ("Test 4", "<spamtest>", "<nobody@relaytest.invalid>"),
    ("Test 5", "<>", "<nobody@relaytest.invalid>"),
    ("Test 6", "<spamtest@mx6.example.org>", "<nobody@relaytest.invalid>"),
    ("Test 7", "<spamtest@[IPv6:2001:db8::4]>", "<nobody@relaytest.invalid>"),
    ("Test 8", "<spamtest@mx6.example.org>", "<nobody%relaytest.invalid@mx6.example.org>"),
    ("Test 9", "<spamtest@mx6.example.org>", "<nobody%relaytest.invalid@[IPv6:2001:db8::4]>"),
    ("Test 10", "<spamtest@mx6.example.org>", '<"nobody@relaytest.invalid">'),
    ("Test 11", "<spamtest@mx6.example.org>", '<"nobody%relaytest.invalid">'),
    ("Test 12", "<spamtest@[IPv6:2001:db8::4]>", '<nobody@relaytest.invalid@mx6.example.org">'),
    ("Test 13", "<spamtest@mx6.example.org>", '<"nobody@relaytest.invalid"@[IPv6:2001:db8::4]>'),
    ("Test 14", "<spamtest@mx6.example.org>", "<nobody@relaytest.invalid@[IPv6:2001:db8::4]>"),
    ("Test 15", "<spamtest@[IPv6:2001:db8::4]>", "<@mx6.example.org:nobody@relaytest.invalid>"),
    ("Test 16", "<spamtest@mx6.example.org>", "<@[IPv6:2001:db8::4]:nobody@relaytest.invalid>"),
    ("Test 17", "<spamtest@[IPv6:2001:db8::4]>", "<relaytest.invalid!nobody>"),
    ("Test 18", "<spamtest@mx6.example.org>", "<relaytest.invalid!nobody@[IPv6:2001:db8::4]>"),
    ("Test 19", "<postmaster@mx6.example.org>", "<nobody@relaytest.invalid>"),
]


def rendered(probes: tuple[Probe, ...], context: ProbeContext, rcpt: str) -> list[tuple[str, ...]]:
    values = context.values(rcpt)
    return [(p.name, render(p.mail_from, values), render(p.rcpt_to, values)) for p in probes]


@pytest.mark.parametrize(
    ("context", "expected"), [(V4_CONTEXT, CLASSIC_V4), (V6_CONTEXT, CLASSIC_V6)], ids=["v4", "v6"]
)
def test_classic_suite_renders_the_spec_table(
    context: ProbeContext, expected: list[tuple[str, str, str]]
) -> None:
    assert rendered(CLASSIC, context, "nobody") == expected


def test_classic_suite_names_and_order() -> None:
    assert [p.name for p in CLASSIC] == ["Quote test", *(f"Test {n}" for n in range(1, 20))]
    assert SUITES["classic"] is CLASSIC


def test_rendered_arguments_are_single_ascii_words() -> None:
    for _, mail_from, rcpt_to in rendered(CLASSIC, V6_CONTEXT, "nobody"):
        for argument in (mail_from, rcpt_to):
            assert argument.isascii()
            assert argument.isprintable()
            assert " " not in argument


def test_per_probe_token_goes_into_every_recipient() -> None:
    token_rcpt = "nobody-k3x9q2"
    rows = dict((name, rcpt_to) for name, _, rcpt_to in rendered(CLASSIC, V4_CONTEXT, token_rcpt))
    assert rows["Test 8"] == "<nobody-k3x9q2%relaytest.invalid@mail2.example.com>"
    assert rows["Test 17"] == "<relaytest.invalid!nobody-k3x9q2>"
    assert all(token_rcpt in rcpt_to for rcpt_to in rows.values())


def test_extended_suite_starts_with_the_classic_suite() -> None:
    assert EXTENDED[: len(CLASSIC)] == CLASSIC
    assert SUITES["extended"] is EXTENDED


def test_extended_suite_has_unique_names() -> None:
    names = [p.name for p in EXTENDED]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(
    ("mail_from", "rcpt_to"),
    [
        (None, "<nobody@relaytest.invalid@mail2.example.com>"),
        (None, "<relaytest.invalid!nobody@mail2.example.com>"),
        (None, "nobody@relaytest.invalid"),
        ("<relaytest.invalid!spamtest>", None),
    ],
    ids=["double-at-without-quote", "bang-path-at-host", "bracketless", "bang-path-sender"],
)
def test_extended_suite_adds_the_required_forms(mail_from: str | None, rcpt_to: str | None) -> None:
    extra = rendered(EXTENDED[len(CLASSIC) :], V4_CONTEXT, "nobody")
    assert any(
        (mail_from is None or row[1] == mail_from) and (rcpt_to is None or row[2] == rcpt_to)
        for row in extra
    )


def test_extended_forms_are_not_already_classic() -> None:
    classic = {(p.mail_from, p.rcpt_to) for p in CLASSIC}
    assert all((p.mail_from, p.rcpt_to) not in classic for p in EXTENDED[len(CLASSIC) :])


@pytest.mark.parametrize(
    ("ip", "literal"),
    [
        ("192.0.2.4", "[192.0.2.4]"),
        ("127.0.0.1", "[127.0.0.1]"),
        ("2001:db8::4", "[IPv6:2001:db8::4]"),
        ("::1", "[IPv6:::1]"),
        ("::ffff:192.0.2.4", "[IPv6:::ffff:192.0.2.4]"),
    ],
)
def test_address_literal(ip: str, literal: str) -> None:
    assert address_literal(ip) == literal


def test_every_placeholder_is_known() -> None:
    assert {"host", "ip", "dom", "foreign", "rcpt"} == PLACEHOLDERS
    assert set(V4_CONTEXT.values("nobody")) == PLACEHOLDERS


@pytest.mark.parametrize(
    "template",
    [
        "<{rcpt}@{domain}>",
        "<{}@{dom}>",
        "<{RCPT}@{dom}>",
        "<{ rcpt}@{dom}>",
        "<spamtest@{host}> SIZE=1",
        "<{rcpt}@{dom}>\r\nRCPT TO:<victim@example.net>",
        "<{rcpt}@{dom}>\n",
        "<{rcpt}@{dom}>\r",
        "<{rcpt}@{dom}>\t",
        "<{rcpt}@{dom}>\x00",
        "<{rcpt}@{dom}>\x7f",
        "<nöbody@{dom}>",
        "<{rcpt}@{dom}\u202e>",
        "",
    ],
)
def test_bad_template_raises_value_error(template: str) -> None:
    with pytest.raises(ValueError, match=r"placeholder|printable ASCII"):
        check_template(template)
    with pytest.raises(ValueError):
        Probe("Custom", template, "<{rcpt}@{dom}>")
    with pytest.raises(ValueError):
        Probe("Custom", "<spamtest@{host}>", template)


def test_unknown_placeholder_error_names_it() -> None:
    with pytest.raises(ValueError, match=r"\{domain\}"):
        check_template("<{rcpt}@{domain}>")


@pytest.mark.parametrize("template", ["<>", "{rcpt}@{dom}", "<{dom}!spamtest>", "<a{b>"])
def test_good_template_is_accepted(template: str) -> None:
    check_template(template)


def test_build_suite_appends_extra_probes() -> None:
    extra = [Probe("Percent hack", "<>", "<{rcpt}%{dom}@{ip}>")]
    suite = build_suite("classic", extra)
    assert suite[: len(CLASSIC)] == CLASSIC
    assert suite[len(CLASSIC) :] == (Probe("Percent hack", "<>", "<{rcpt}%{dom}@{ip}>"),)
    assert build_suite("extended") == EXTENDED


@pytest.mark.parametrize("base", ["classic", "extended"])
def test_build_suite_rejects_a_duplicate_of_a_suite_name(base: str) -> None:
    extra = [Probe("Test 8", "<>", "<{rcpt}@{dom}>")]
    with pytest.raises(ValueError, match="duplicate probe names: Test 8"):
        build_suite(base, extra)


def test_build_suite_rejects_duplicates_among_extra_probes() -> None:
    probe = Probe("Mine", "<>", "<{rcpt}@{dom}>")
    with pytest.raises(ValueError, match="duplicate probe names: Mine"):
        build_suite("classic", [probe, probe])


def test_build_suite_rejects_unknown_suite() -> None:
    with pytest.raises(ValueError, match="unknown suite 'huge'"):
        build_suite("huge")


def test_build_suite_rejects_bad_extra_template() -> None:
    with pytest.raises(ValueError, match="unknown placeholder"):
        build_suite("classic", [Probe("Bad", "<{me}>", "<{rcpt}>")])


@pytest.mark.parametrize(
    ("template", "shown"),
    [
        ("<{rcpt}@{dom}>", "<n@relaytest.invalid>"),
        ("<{{rcpt}}>", "<{n}>"),
        ("<a{b>", "<a{b>"),
        ("}{rcpt}{", "}n{"),
    ],
)
def test_a_brace_that_is_no_placeholder_is_kept(template: str, shown: str) -> None:
    assert render(template, {"rcpt": "n", "dom": "relaytest.invalid"}) == shown
