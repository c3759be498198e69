from __future__ import annotations

import pytest

from relayprobe.relaytest.hostname import banner_hostname, is_hostname

LABEL_63 = "a" * 63


# Three full labels and one more, plus ".com": 253 and 254 characters.
NAME_253 = ".".join([LABEL_63] * 3 + ["a" * 57]) + ".com"
NAME_254 = ".".join([LABEL_63] * 3 + ["a" * 58]) + ".com"


@pytest.mark.parametrize(
    "name",
    [
        "mail2.example.com",
        "ns2.example.com",
        "MAIL.Example.COM",
        "a.b",
        "x1.example",
        "1.2.3.com",
        "123.example.com",
        "mx-1.example.co.uk",
        "xn--bcher-kva.example",
        "example.xn--p1ai",
        "e.1a",
        f"{LABEL_63}.example.com",
    ],
)
def test_valid_host_names(name: str) -> None:
    assert is_hostname(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "localhost",
        "mail",
        "192.0.2.4",
        "[192.0.2.4]",
        "2001:db8::4",
        "[IPv6:2001:db8::4]",
        "example.123",
        "mail.example.com.",
        ".example.com",
        "mail..example.com",
        "-mail.example.com",
        "mail-.example.com",
        "mail.-example.com",
        "mail_1.example.com",
        "mail example.com",
        "mail.example.com\r\n",
        "mail.example.com\x1b",
        "mäil.example.com",
        "mail.例え.jp",
        "mail.exam\u202eple.com",
        "mail.example.١٢٣",
        f"{LABEL_63}a.example.com",
        "*.example.com",
        "mail.example.com:25",
        "user@example.com",
    ],
)
def test_invalid_host_names(name: str) -> None:
    assert not is_hostname(name)


def test_length_limit_is_253() -> None:
    assert (len(NAME_253), len(NAME_254)) == (253, 254)
    assert is_hostname(NAME_253)
    assert not is_hostname(NAME_254)


def from_network(data: bytes) -> str:
    """A banner as the SMTP client hands it on: decoded, what is not UTF-8 kept as escapes."""
    return data.decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("banner", "name"),
    [
        (b"220 mail2.example.com ESMTP Postfix", "mail2.example.com"),
        (b"220 example.com ESMTP", "example.com"),
        (b"220-mx.example.org ESMTP multi-line greeting", "mx.example.org"),
        (b"220 mx.example.org", "mx.example.org"),
        (b"220 mx.example.org\tESMTP", "mx.example.org"),
        (b"220  mx.example.org ESMTP", "mx.example.org"),
        (b"220 Mail.Example.ORG ESMTP", "Mail.Example.ORG"),
    ],
)
def test_banner_hostname_takes_the_first_word(banner: bytes, name: str) -> None:
    assert banner_hostname(from_network(banner)) == name


@pytest.mark.parametrize(
    "banner",
    [
        b"",
        b"220",
        b"220 ",
        b"220 ESMTP ready",
        b"220 localhost ESMTP",
        b"220 [192.0.2.4] ESMTP",
        b"220 192.0.2.4 ESMTP",
        b"220 2001:db8::4 ESMTP",
        b"220 m\xc3\xa4il.example.com ESMTP",
        b"220 mail.example.com\x1b[2J ESMTP",
        b"220 mail.example.com\xc2\xa0ESMTP",
        b"220 mail.example.com\x1cESMTP",
        b"220 \xc2\xa0mail.example.com ESMTP",
        b"220 \xff\xfe.example.com ESMTP",
        b"220 mail.example.com. ESMTP",
        b"220 " + NAME_254.encode() + b" ESMTP",
    ],
)
def test_banner_without_a_host_name(banner: bytes) -> None:
    assert banner_hostname(from_network(banner)) is None
