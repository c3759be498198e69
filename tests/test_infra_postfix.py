"""The real Postfix instances behave as the relay tests assume: closed defers, open relays."""

from __future__ import annotations

import asyncio

import pytest

from tests.infra.postfix import (
    CLOSED_HOST,
    CLOSED_HOSTNAME,
    NO_HITS,
    OPEN_HOST,
    SMTP_PORT,
    TEST_DOMAIN,
    ErrorLimitHits,
    SmtpdLogTally,
    error_limit_hits,
    log_marker,
    tally_smtpd_log,
)

_REPLY_TIMEOUT_S = 10.0
_MAX_REPLY_LINES = 50

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
    assert error_limit_hits(marker) == {"closed": NO_HITS, "open": NO_HITS}

    # The tenth error reaches the soft limit: Postfix delays the QUIT reply by a second.
    await smtp_reply_codes(CLOSED_HOST, [*relay_attempt(relay), *[relay] * 9, "QUIT"])
    assert error_limit_hits(marker) == {
        "closed": ErrorLimitHits(tarpitted=1, dropped=0),
        "open": NO_HITS,
    }


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
