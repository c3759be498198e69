"""The real Postfix instances behave as the relay tests assume: closed defers, open relays,
tls-open requires STARTTLS and then relays, tls-closed offers STARTTLS and defers."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.infra.postfix import (
    CERT_DAYS,
    CLOSED_HOST,
    CLOSED_HOSTNAME,
    HOSTS,
    NO_HITS,
    OPEN_HOST,
    SMTP_PORT,
    TEST_DOMAIN,
    TLS_CLOSED_CERT,
    TLS_CLOSED_HOST,
    TLS_CLOSED_HOSTNAME,
    TLS_OPEN_CERT,
    TLS_OPEN_HOST,
    TLS_OPEN_HOSTNAME,
    ErrorLimitHits,
    SmtpdLogTally,
    error_limit_hits,
    log_marker,
    tally_smtpd_log,
)

_REPLY_TIMEOUT_S = 10.0
_MAX_REPLY_LINES = 50
_EHLO_NAME = "tester.relayprobe.test"
_SENDER = "spamtest@relayprobe.test"
_RELAYED = f"nobody@{TEST_DOMAIN}"

# Real lines from the closed instance: one clean session, then one cut off at the hard limit.
_LOG_LINES = [
    "Nov 29 18:07:44 closed postfix/smtpd[10586]: connect from unknown[127.0.0.2]",
    "Nov 29 18:07:44 closed postfix/smtpd[10586]: disconnect from unknown[127.0.0.2]"
    " ehlo=1 mail=1 rcpt=1 rset=1 quit=1 commands=5",
    "Nov 29 18:07:45 closed postfix/smtpd[10586]: connect from unknown[127.0.0.2]",
    "Nov 29 18:07:47 closed postfix/smtpd[10586]: NOQUEUE: reject: RCPT from"
    " unknown[127.0.0.2]: 454 4.7.1 <n@relaytest.invalid>: Relay access denied;"
    " from=<a@b.test> to=<n@relaytest.invalid> proto=ESMTP helo=<t>",
    "Nov 29 18:07:55 closed postfix/smtpd[10586]: too many errors after RCPT from"
    " unknown[127.0.0.2]",
    "Nov 29 18:07:55 closed postfix/smtpd[10586]: disconnect from unknown[127.0.0.2]"
    " ehlo=1 mail=1 rcpt=0/20 commands=2/22",
]


async def smtp_reply_codes(host: str, commands: list[str]) -> list[int]:
    """The reply codes of the banner and of each command, in order."""
    async with asyncio.timeout(_REPLY_TIMEOUT_S * (len(commands) + 1)):
        reader, writer = await asyncio.open_connection(host, SMTP_PORT)
        try:
            codes = [await _read_reply_code(reader)]
            for command in commands:
                writer.write(command.encode("ascii") + b"\r\n")
                codes.append(await _read_reply_code(reader))
            return codes
        finally:
            writer.close()
            await writer.wait_closed()


async def _read_reply_code(reader: asyncio.StreamReader) -> int:
    for _ in range(_MAX_REPLY_LINES):
        line = await reader.readline()
        if len(line) < 4:
            raise ConnectionError(f"bad or missing reply line: {line!r}")
        if line[3:4] != b"-":
            return int(line[:3])
    raise ValueError(f"reply longer than {_MAX_REPLY_LINES} lines")


def relay_attempt(recipient: str) -> list[str]:
    return ["EHLO tester.relayprobe.test", "MAIL FROM:<spamtest@relayprobe.test>", recipient]


@contextmanager
def smtp_session(host: str) -> Iterator[smtplib.SMTP]:
    """An smtplib session to host:25 after EHLO, closed (QUIT) afterwards."""
    with smtplib.SMTP(host, SMTP_PORT, local_hostname=_EHLO_NAME, timeout=_REPLY_TIMEOUT_S) as smtp:
        smtp.ehlo()
        yield smtp


def starttls(smtp: smtplib.SMTP, context: ssl.SSLContext | None = None) -> None:
    """STARTTLS as a sending MTA does it (no verification unless a context says so), then EHLO."""
    if context is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    code, reply = smtp.starttls(context=context)
    assert code == 220, reply
    smtp.ehlo()


def trusting_only(cert: Path) -> ssl.SSLContext:
    """Verifies the peer against `cert` alone; smtplib would check the name against the IP."""
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    return context


def relay_codes(smtp: smtplib.SMTP, *recipients: str) -> list[int]:
    """The reply codes of MAIL and of a RCPT to each recipient."""
    codes = [smtp.mail(_SENDER)[0]]
    codes.extend(smtp.rcpt(recipient)[0] for recipient in recipients)
    return codes


@pytest.mark.postfix
async def test_closed_instance_defers_relaying_from_loopback(postfix_instances: None) -> None:
    codes = await smtp_reply_codes(
        CLOSED_HOST, [*relay_attempt(f"RCPT TO:<nobody@{TEST_DOMAIN}>"), "QUIT"]
    )
    assert codes == [220, 250, 250, 454, 221]


@pytest.mark.postfix
async def test_closed_instance_accepts_its_own_postmaster(postfix_instances: None) -> None:
    codes = await smtp_reply_codes(
        CLOSED_HOST, [*relay_attempt(f"RCPT TO:<postmaster@{CLOSED_HOSTNAME}>"), "QUIT"]
    )
    assert codes == [220, 250, 250, 250, 221]


@pytest.mark.postfix
async def test_open_instance_relays_only_to_the_test_domain(postfix_instances: None) -> None:
    codes = await smtp_reply_codes(
        OPEN_HOST,
        [
            *relay_attempt(f"RCPT TO:<nobody@{TEST_DOMAIN}>"),
            "RCPT TO:<nobody@example.com>",
            "QUIT",
        ],
    )
    assert codes == [220, 250, 250, 250, 550, 221]


@pytest.mark.postfix
async def test_error_limit_hits_counts_only_tarpitted_sessions(postfix_instances: None) -> None:
    marker = log_marker()
    relay = f"RCPT TO:<nobody@{TEST_DOMAIN}>"
    await smtp_reply_codes(CLOSED_HOST, [*relay_attempt(relay), *[relay] * 3, "QUIT"])
    assert error_limit_hits(marker) == dict.fromkeys(HOSTS, NO_HITS)

    # The tenth error reaches the soft limit: Postfix delays the QUIT reply by a second.
    await smtp_reply_codes(CLOSED_HOST, [*relay_attempt(relay), *[relay] * 9, "QUIT"])
    assert error_limit_hits(marker) == {
        **dict.fromkeys(HOSTS, NO_HITS),
        "closed": ErrorLimitHits(tarpitted=1, dropped=0),
    }


@pytest.mark.postfix
def test_error_limit_hits_counts_the_tls_instances_apart(postfix_instances: None) -> None:
    marker = log_marker()
    with smtp_session(TLS_OPEN_HOST) as smtp:
        # Each refusal before STARTTLS is an error; the tenth reaches the soft limit.
        for _ in range(10):
            assert smtp.mail(_SENDER)[0] == 530
    assert error_limit_hits(marker) == {
        **dict.fromkeys(HOSTS, NO_HITS),
        "tls-open": ErrorLimitHits(tarpitted=1, dropped=0),
    }


@pytest.mark.postfix
@pytest.mark.parametrize(
    ("host", "hostname"),
    [(TLS_OPEN_HOST, TLS_OPEN_HOSTNAME), (TLS_CLOSED_HOST, TLS_CLOSED_HOSTNAME)],
)
def test_tls_instance_greets_with_its_banner(
    postfix_instances: None, host: str, hostname: str
) -> None:
    with smtplib.SMTP(timeout=_REPLY_TIMEOUT_S) as smtp:
        code, banner = smtp.connect(host, SMTP_PORT)
    assert (code, banner) == (220, f"{hostname} ESMTP Postfix (Debian/GNU)".encode())


@pytest.mark.postfix
def test_tls_open_instance_refuses_mail_before_starttls(postfix_instances: None) -> None:
    with smtp_session(TLS_OPEN_HOST) as smtp:
        assert smtp.has_extn("starttls")
        code, reply = smtp.mail(_SENDER)
        assert (code, reply) == (530, b"5.7.0 Must issue a STARTTLS command first")
        assert smtp.rset()[0] == 530


@pytest.mark.postfix
def test_tls_open_instance_relays_to_the_test_domain_after_starttls(
    postfix_instances: None,
) -> None:
    with smtp_session(TLS_OPEN_HOST) as smtp:
        starttls(smtp)
        assert not smtp.has_extn("starttls")
        assert relay_codes(smtp, _RELAYED, "nobody@example.com") == [250, 250, 550]


@pytest.mark.postfix
def test_tls_closed_instance_defers_relaying_with_and_without_tls(
    postfix_instances: None,
) -> None:
    with smtp_session(TLS_CLOSED_HOST) as smtp:
        assert smtp.has_extn("starttls")
        assert relay_codes(smtp, _RELAYED) == [250, 454]
        assert smtp.rset()[0] == 250
        starttls(smtp)
        assert relay_codes(smtp, _RELAYED, f"postmaster@{TLS_CLOSED_HOSTNAME}") == [250, 454, 250]


@pytest.mark.postfix
@pytest.mark.parametrize(
    ("host", "hostname", "cert"),
    [
        (TLS_OPEN_HOST, TLS_OPEN_HOSTNAME, TLS_OPEN_CERT),
        (TLS_CLOSED_HOST, TLS_CLOSED_HOSTNAME, TLS_CLOSED_CERT),
    ],
)
def test_tls_instance_presents_its_own_self_signed_certificate(
    postfix_instances: None, host: str, hostname: str, cert: Path
) -> None:
    with smtp_session(host) as smtp:
        starttls(smtp, trusting_only(cert))
        assert isinstance(smtp.sock, ssl.SSLSocket)
        peer = smtp.sock.getpeercert()
    assert peer is not None
    assert peer["subject"] == ((("commonName", hostname),),)
    assert peer["issuer"] == peer["subject"]
    assert peer["subjectAltName"] == (("DNS", hostname),)
    not_before, not_after = peer["notBefore"], peer["notAfter"]
    assert isinstance(not_before, str) and isinstance(not_after, str)
    lifetime = ssl.cert_time_to_seconds(not_after) - ssl.cert_time_to_seconds(not_before)
    assert lifetime == CERT_DAYS * 86400


def test_tally_counts_a_dropped_session_once_per_limit() -> None:
    assert tally_smtpd_log(_LOG_LINES) == SmtpdLogTally(
        hits=ErrorLimitHits(tarpitted=1, dropped=1), unfinished_sessions=0
    )


def test_tally_reports_a_session_still_open() -> None:
    tally = tally_smtpd_log(_LOG_LINES[:3])
    assert tally == SmtpdLogTally(hits=NO_HITS, unfinished_sessions=1)


def test_tally_ignores_lines_of_other_daemons() -> None:
    lines = [
        "Nov 29 18:07:39 open postfix-open/qmgr[10338]: DA9811620FF: removed",
        "Nov 29 18:07:39 open postfix-open/smtp[10596]: connect from nowhere",
    ]
    assert tally_smtpd_log(lines) == SmtpdLogTally(hits=NO_HITS, unfinished_sessions=0)
