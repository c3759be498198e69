from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayprobe.frontdoors.proxyproto import (
    V1_MAX_LENGTH,
    V2_FIXED_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    encode_v1,
    encode_v2,
    read_proxy_header,
)

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")
V4_ADDRESSES = bytes.fromhex("c0000201 c6336402 dc04 01bb")  # 192.0.2.1:56324 -> 198.51.100.2:443
V4_HEADER = ProxyHeader(2, ("192.0.2.1", 56324), ("198.51.100.2", 443))
FFFF6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
NO_ADDRESS_V1 = ProxyHeader(1, None, None)
NO_ADDRESS_V2 = ProxyHeader(2, None, None)

Endpoint = tuple[str, int]
Encoder = Callable[[Endpoint | None, Endpoint | None], bytes]


def feed_whole(data: bytes) -> tuple[ProxyHeader | None, bytes]:
    parser = ProxyHeaderParser()
    return parser.feed(data), parser.remainder


def feed_bytewise(data: bytes) -> tuple[ProxyHeader | None, bytes]:
    parser = ProxyHeaderParser()
    for index in range(len(data)):
        header = parser.feed(data[index : index + 1])
        if header is not None:
            return header, parser.remainder + data[index + 1 :]
    return None, b""


def error_offset(data: bytes) -> int:
    """The index of the byte at which byte-by-byte feeding raises ProxyHeaderError."""
    parser = ProxyHeaderParser()
    for index in range(len(data)):
        try:
            assert parser.feed(data[index : index + 1]) is None
        except ProxyHeaderError:
            return index
    raise AssertionError(f"{data!r} was not rejected")


GOOD = [
    pytest.param(
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
        ProxyHeader(1, ("192.0.2.1", 56324), ("198.51.100.2", 443)),
        id="v1-tcp4",
    ),
    pytest.param(
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        ProxyHeader(1, ("0.0.0.0", 0), ("255.255.255.255", 65535)),
        id="v1-tcp4-extremes",
    ),
    pytest.param(
        b"PROXY TCP6 2001:DB8:0:0::1 2001:db8::2 50000 25\r\n",
        ProxyHeader(1, ("2001:db8::1", 50000), ("2001:db8::2", 25)),
        id="v1-tcp6-normalised",
    ),
    pytest.param(
        f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
        ProxyHeader(1, (FFFF6, 65535), (FFFF6, 65535)),
        id="v1-tcp6-longest",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", NO_ADDRESS_V1, id="v1-unknown"),
    pytest.param(
        f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
        NO_ADDRESS_V1,
        id="v1-unknown-107-bytes",
    ),
    pytest.param(b"PROXY UNKNOWN \xff anything\x00\r\n", NO_ADDRESS_V1, id="v1-unknown-junk"),
    pytest.param(SIG + bytes.fromhex("2111000c") + V4_ADDRESSES, V4_HEADER, id="v2-inet"),
    pytest.param(
        SIG
        + bytes.fromhex("21210024")
        + bytes.fromhex("20010db8000000000000000000000001")
        + bytes.fromhex("20010db8000000000000000000000002")
        + bytes.fromhex("c350 0019"),
        ProxyHeader(2, ("2001:db8::1", 50000), ("2001:db8::2", 25)),
        id="v2-inet6",
    ),
    pytest.param(
        SIG
        + bytes.fromhex("2111001a")
        + V4_ADDRESSES
        + bytes.fromhex("01 0002 6832")  # ALPN "h2"
        + bytes.fromhex("04 0003 000000")  # NOOP padding
        + bytes.fromhex("20 0000"),  # SSL, empty
        V4_HEADER,
        id="v2-inet-tlvs",
    ),
    pytest.param(SIG + bytes.fromhex("20000000"), NO_ADDRESS_V2, id="v2-local"),
    pytest.param(
        SIG + bytes.fromhex("20ff0005 0102030405"), NO_ADDRESS_V2, id="v2-local-ignores-family"
    ),
    pytest.param(SIG + bytes.fromhex("21000000"), NO_ADDRESS_V2, id="v2-unspec"),
    pytest.param(SIG + bytes.fromhex("213100d8") + bytes(216), NO_ADDRESS_V2, id="v2-unix"),
    pytest.param(
        SIG + bytes.fromhex("213200db") + bytes(216) + bytes.fromhex("04 0000"),
        NO_ADDRESS_V2,
        id="v2-unix-dgram-tlv",
    ),
]

TRAILERS = [b"", b"EHLO x\r\n", b"PROXY UNKNOWN\r\n", SIG + b"\x20\x00\x00\x00"]


@pytest.mark.parametrize("trailer", TRAILERS)
@pytest.mark.parametrize(("data", "expected"), GOOD)
def test_good_header_whole_and_bytewise(data: bytes, expected: ProxyHeader, trailer: bytes) -> None:
    assert feed_whole(data + trailer) == (expected, trailer)
    assert feed_bytewise(data + trailer) == (expected, trailer)


def test_v1_longest_unknown_line_is_the_spec_maximum() -> None:
    assert len(f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n") == V1_MAX_LENGTH


def test_needs_more_until_the_last_byte() -> None:
    data = SIG + bytes.fromhex("2111000c") + V4_ADDRESSES
    parser = ProxyHeaderParser()
    assert parser.feed(data[:-1]) is None
    assert parser.buffered == len(data) - 1
    assert parser.remainder == b""
    assert parser.feed(data[-1:]) == V4_HEADER
    assert parser.buffered == 0


BAD = [
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="not-proxy"),
    pytest.param(b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n", id="lowercase-proxy"),
    pytest.param(b"PROXY\r\n", id="no-space"),
    pytest.param(b"PROXY \r\n", id="no-protocol"),
    pytest.param(b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n", id="tcp5"),
    pytest.param(b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n", id="lowercase-tcp4"),
    pytest.param(b"PROXY UNKNOWNX\r\n", id="unknownx"),
    pytest.param(b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n", id="double-space-1"),
    pytest.param(b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n", id="double-space-2"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n", id="trailing-space"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n", id="missing-port"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n", id="extra-field"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", id="bare-lf"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\r\n", id="cr-cr-lf"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 22\n", id="bare-lf-valid-if-cut"),
    pytest.param(b"PROXY UNKNOWN x\n", id="bare-lf-unknown"),
    pytest.param(b"PROXY UNKNOWN\rx\r\n", id="bare-cr-unknown"),
    pytest.param(b"PROXY UNKNOWN \rx\r\n", id="bare-cr-unknown-junk"),
    pytest.param(b"PROXY TCP4 192.0.2.1\t192.0.2.2 1 2\r\n", id="tab"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n", id="port-65536"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 99999\r\n", id="port-99999"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 0443 2\r\n", id="port-leading-zero"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 00 2\r\n", id="port-00"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n", id="port-negative"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 +1 2\r\n", id="port-plus"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2a\r\n", id="port-hex"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 \xd9\xa1\r\n", id="port-arabic-digit"),
    pytest.param(b"PROXY TCP4 192.0.02.1 192.0.2.2 1 2\r\n", id="ipv4-leading-zero"),
    pytest.param(b"PROXY TCP4 256.0.2.1 192.0.2.2 1 2\r\n", id="ipv4-octet-256"),
    pytest.param(b"PROXY TCP4 192.0.2 192.0.2.2 1 2\r\n", id="ipv4-three-octets"),
    pytest.param(b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n", id="tcp4-with-ipv6"),
    pytest.param(b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n", id="tcp6-with-ipv4"),
    pytest.param(b"PROXY TCP6 2001:db8::1 192.0.2.2 1 2\r\n", id="tcp6-mixed"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n", id="ipv6-scope"),
    pytest.param(b"PROXY TCP6 2001:db8:::1 2001:db8::2 1 2\r\n", id="ipv6-triple-colon"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", id="v1-too-long"),
    pytest.param(SIG[:5] + b"\x01" + SIG[6:] + bytes.fromhex("21110000"), id="v2-bad-signature"),
    pytest.param(SIG + bytes.fromhex("1111000c") + V4_ADDRESSES, id="v2-version-1"),
    pytest.param(SIG + bytes.fromhex("3111000c") + V4_ADDRESSES, id="v2-version-3"),
    pytest.param(SIG + bytes.fromhex("2211000c") + V4_ADDRESSES, id="v2-command-2"),
    pytest.param(SIG + bytes.fromhex("2141000c") + V4_ADDRESSES, id="v2-family-4"),
    pytest.param(SIG + bytes.fromhex("2113000c") + V4_ADDRESSES, id="v2-transport-3"),
    pytest.param(SIG + bytes.fromhex("2112000c") + V4_ADDRESSES, id="v2-inet-dgram"),
    pytest.param(SIG + bytes.fromhex("2110000c") + V4_ADDRESSES, id="v2-inet-unspec-transport"),
    pytest.param(SIG + bytes.fromhex("2111000b") + V4_ADDRESSES[:11], id="v2-inet-too-short"),
    pytest.param(SIG + bytes.fromhex("21210023") + bytes(35), id="v2-inet6-too-short"),
    pytest.param(SIG + bytes.fromhex("213100d7") + bytes(215), id="v2-unix-too-short"),
    pytest.param(SIG + bytes.fromhex("20000401") + bytes(1025), id="v2-over-cap"),
    pytest.param(SIG + bytes.fromhex("2111000e") + V4_ADDRESSES + b"\x01\x00", id="v2-tlv-cut"),
    pytest.param(
        SIG + bytes.fromhex("21110010") + V4_ADDRESSES + bytes.fromhex("01 0002 68"),
        id="v2-tlv-overrun",
    ),
]


@pytest.mark.parametrize("data", BAD)
def test_malformed_header_rejected(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        feed_whole(data + b"trailing bytes\r\n")
    error_offset(data)


EARLY = [
    pytest.param(b"G", id="first-byte"),
    pytest.param(b"PROXX", id="v1-prefix"),
    pytest.param(b"PROXY TCP9", id="v1-protocol"),
    pytest.param(b"PROXY TCP4 192.0.2.1x", id="v1-address-char"),
    pytest.param(b"PROXY TCP4 192.0.2 ", id="v1-address-complete"),
    pytest.param(b"PROXY TCP4 192.0.2.10 192.0.2.2 99999", id="v1-port-range"),
    pytest.param(b"PROXY TCP4 192.0.2.10 192.0.2.2 01", id="v1-port-zero"),
    pytest.param(b"PROXY TCP4 192.0.2.10 192.0.2.2 1 2 ", id="v1-extra-field"),
    pytest.param(b"PROXY UNKNOWN\rx", id="v1-bare-cr"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 93, id="v1-length"),
    pytest.param(SIG[:6] + b"x", id="v2-signature"),
    pytest.param(SIG + b"\x31", id="v2-version"),
    pytest.param(SIG + b"\x21\x41", id="v2-family"),
    pytest.param(SIG + b"\x21\x11\x04\x01", id="v2-length-cap"),
    pytest.param(SIG + b"\x21\x11\x00\x08", id="v2-length-short"),
]


@pytest.mark.parametrize("data", EARLY)
def test_rejected_at_the_first_impossible_byte(data: bytes) -> None:
    assert error_offset(data) == len(data) - 1


def test_v1_buffer_never_exceeds_the_line_limit() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15)) is None
    assert parser.buffered == V1_MAX_LENGTH - 1
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        parser.feed(b"x")
    assert parser.buffered == 0


def test_max_v2_payload_option() -> None:
    big = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=[(0x04, bytes(1500))])
    with pytest.raises(ProxyHeaderError, match="exceeds 1024"):
        ProxyHeaderParser().feed(big)
    assert ProxyHeaderParser(max_v2_payload=2000).feed(big) == ProxyHeader(
        2, ("192.0.2.1", 1), ("192.0.2.2", 2)
    )
    for bad in (215, 65536):
        with pytest.raises(ValueError, match="max_v2_payload"):
            ProxyHeaderParser(max_v2_payload=bad)


def test_parser_is_single_use() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN\r\n") == NO_ADDRESS_V1
    with pytest.raises(RuntimeError):
        parser.feed(b"more")
    failed = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError):
        failed.feed(b"nope")
    with pytest.raises(RuntimeError):
        failed.feed(b"PROXY UNKNOWN\r\n")


def test_empty_feed_needs_more() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"") is None
    assert parser.feed(b"PROXY UNKNOWN\r\n") == NO_ADDRESS_V1


def test_encoders_match_known_vectors() -> None:
    assert encode_v1(("192.0.2.1", 56324), ("198.51.100.2", 443)) == (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    )
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(("192.0.2.1", 56324), ("198.51.100.2", 443)) == (
        SIG + bytes.fromhex("2111000c") + V4_ADDRESSES
    )
    assert encode_v2(None, None) == SIG + bytes.fromhex("20000000")
    assert V2_SIGNATURE == SIG


@pytest.mark.parametrize("encode", [encode_v1, encode_v2])
def test_encoders_reject_bad_endpoints(encode: Encoder) -> None:
    with pytest.raises(ValueError, match="same address family"):
        encode(("192.0.2.1", 1), ("2001:db8::1", 2))
    with pytest.raises(ValueError, match="both endpoints"):
        encode(("192.0.2.1", 1), None)
    with pytest.raises(ValueError, match="out of range"):
        encode(("192.0.2.1", 65536), ("192.0.2.2", 2))


ports = st.integers(0, 65535)


@st.composite
def tcp_endpoints(draw: st.DrawFn) -> tuple[tuple[str, int], tuple[str, int]]:
    addresses = draw(st.sampled_from([st.ip_addresses(v=4), st.ip_addresses(v=6)]))
    source, destination = draw(st.lists(addresses, min_size=2, max_size=2))
    return (str(source), draw(ports)), (str(destination), draw(ports))


tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5)


@st.composite
def v1_unknown_lines(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    junk = draw(st.binary(max_size=V1_MAX_LENGTH - 16)).replace(b"\r", b"").replace(b"\n", b"")
    rest = draw(st.sampled_from([b"", b" " + junk]))
    return b"PROXY UNKNOWN" + rest + b"\r\n", NO_ADDRESS_V1


@st.composite
def v1_tcp_lines(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    source, destination = draw(tcp_endpoints())
    return encode_v1(source, destination), ProxyHeader(1, source, destination)


@st.composite
def v2_proxy_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    source, destination = draw(tcp_endpoints())
    data = encode_v2(source, destination, tlvs=draw(tlv_lists))
    return data, ProxyHeader(2, source, destination)


@st.composite
def v2_local_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    return encode_v2(None, None, tlvs=draw(tlv_lists)), NO_ADDRESS_V2


valid_headers = st.one_of(
    v1_unknown_lines(), v1_tcp_lines(), v2_proxy_headers(), v2_local_headers()
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


@given(valid_headers, st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=12))
def test_any_valid_header_split_anywhere(
    header: tuple[bytes, ProxyHeader], trailer: bytes, cuts: list[int]
) -> None:
    data, expected = header
    parser = ProxyHeaderParser()
    chunks = split(data + trailer, cuts)
    for index, chunk in enumerate(chunks):
        result = parser.feed(chunk)
        if result is not None:
            assert result == expected
            assert parser.remainder + b"".join(chunks[index + 1 :]) == trailer
            return
        assert parser.buffered < len(data)
    raise AssertionError("the header was never returned")


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_headers)[0])
    position = draw(st.integers(0, len(data) - 1))
    mutation = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
    if mutation == "replace":
        data[position] = draw(st.integers(0, 255))
    elif mutation == "insert":
        data.insert(position, draw(st.integers(0, 255)))
    elif mutation == "delete":
        del data[position]
    else:
        del data[position:]
    return bytes(data)


arbitrary_input = st.one_of(
    st.binary(max_size=1200),
    st.builds(bytes.__add__, st.sampled_from([b"PROXY ", SIG, SIG + b"\x21"]), st.binary()),
    mutated_headers(),
)


@given(arbitrary_input, st.lists(st.integers(min_value=0), max_size=12))
def test_arbitrary_bytes_never_raise_anything_else(data: bytes, cuts: list[int]) -> None:
    parser = ProxyHeaderParser()
    fed = 0
    for chunk in split(data, cuts):
        try:
            result = parser.feed(chunk)
        except ProxyHeaderError:
            assert parser.buffered == 0
            return
        fed += len(chunk)
        if result is not None:
            assert data.endswith(parser.remainder)
            assert fed - len(parser.remainder) <= V2_FIXED_LENGTH + 1024
            return
        assert parser.buffered == fed
        assert parser.buffered <= parser.max_buffered


def test_read_proxy_header_says_what_a_front_door_does_next() -> None:
    parser = ProxyHeaderParser()
    header = encode_v1(("::ffff:192.0.2.7", 4000), ("::ffff:192.0.2.1", 23))
    waiting = read_proxy_header(parser, header[:10])
    assert not waiting.complete
    read = read_proxy_header(parser, header[10:] + b"GET /")
    assert (read.complete, str(read.source), read.rest, read.error) == (
        True,
        "192.0.2.7",
        b"GET /",
        None,
    )
    local = read_proxy_header(ProxyHeaderParser(), encode_v1(None, None))
    assert (local.complete, local.source, local.error) == (True, None, None)
    bad = read_proxy_header(ProxyHeaderParser(), b"HELO there\r\n")
    assert bad.complete and bad.error is not None
