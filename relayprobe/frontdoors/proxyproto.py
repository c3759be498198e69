"""Parse the PROXY protocol header a trusted proxy sends before the client's bytes.

Sans-I/O: feed the first bytes of a connection to a `ProxyHeaderParser` until it returns a
`ProxyHeader`; the bytes after the header are in `remainder`. Both versions of HAProxy's
doc/proxy-protocol.txt are accepted: v1 (one text line) and v2 (binary). Anything that is not
exactly a header raises `ProxyHeaderError` as soon as the bytes seen so far cannot start one,
and no more than one maximal header is ever buffered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from relayprobe.frontdoors.addresses import unmap_ipv4

V1_PREFIX = b"PROXY "
# The spec's worst case: "PROXY UNKNOWN" + two full-length IPv6 addresses + ports + CRLF.
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
# Addresses take at most 216 bytes (AF_UNIX); the rest are TLVs, which we skip.
DEFAULT_MAX_V2_PAYLOAD = 1024

Endpoint = tuple[str, int]
_IPEndpoint = tuple[IPv4Address | IPv6Address, int]

_V1_UNKNOWN = b"UNKNOWN"
_V1_PROTOCOLS = (b"TCP4", b"TCP6", _V1_UNKNOWN)
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
# Characters (and the longest length) an address field can have, to reject a partial line early.
_V1_ADDRESS_PARTIAL = {
    b"TCP4": re.compile(rb"[0-9.]{0,15}"),
    b"TCP6": re.compile(rb"[0-9A-Fa-f:.]{0,45}"),
}
_V1_FIELDS = 5  # protocol, source, destination, source port, destination port

_V2_VERSION = 0x2
_V2_LOCAL = 0x0
_V2_PROXY = 0x1
_AF_UNSPEC = 0x0
_AF_INET = 0x1
_AF_INET6 = 0x2
_AF_UNIX = 0x3
_TRANSPORT_STREAM = 0x1
_TRANSPORT_MAX = 0x2  # DGRAM
_V2_ADDRESS_LENGTH = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_TLV_HEADER_LENGTH = 3


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the proxy says about the connection.

    `source` and `destination` are None when the proxy gives no address (v1 UNKNOWN, v2 LOCAL,
    v2 AF_UNSPEC or AF_UNIX): the caller then uses the TCP peer instead.
    """

    version: int
    source: Endpoint | None
    destination: Endpoint | None


class ProxyHeaderParser:
    """Incremental parser for one connection's PROXY header; single use."""

    def __init__(self, *, max_v2_payload: int = DEFAULT_MAX_V2_PAYLOAD) -> None:
        if not _V2_ADDRESS_LENGTH[_AF_UNIX] <= max_v2_payload <= 0xFFFF:
            raise ValueError(f"max_v2_payload must be in 216..65535, not {max_v2_payload}")
        self._max_v2_payload = max_v2_payload
        self._buffer = bytearray()
        self._remainder = b""
        self._finished = False

    @property
    def max_buffered(self) -> int:
        """The most bytes the parser holds while waiting for the rest of a header."""
        return max(V1_MAX_LENGTH - 1, V2_FIXED_LENGTH + self._max_v2_payload - 1)

    @property
    def buffered(self) -> int:
        """Bytes held so far of an incomplete header."""
        return len(self._buffer)

    @property
    def remainder(self) -> bytes:
        """The bytes that followed the header: the start of the application stream."""
        return self._remainder

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add bytes; return the header once complete, None while more bytes are needed."""
        if self._finished:
            raise RuntimeError("ProxyHeaderParser is single use and has already finished")
        self._buffer += data
        try:
            parsed = _parse(self._buffer, self._max_v2_payload)
        except ProxyHeaderError:
            self._finished = True
            self._buffer.clear()
            raise
        if parsed is None:
            return None
        header, length = parsed
        self._remainder = bytes(self._buffer[length:])
        self._buffer.clear()
        self._finished = True
        return header


def _parse(buffer: bytearray, max_v2_payload: int) -> tuple[ProxyHeader, int] | None:
    """The header and its length in bytes, or None if `buffer` is a valid beginning of one."""
    if not buffer:
        return None
    if buffer[0] == V1_PREFIX[0]:
        return _parse_v1(buffer)
    if buffer[0] == V2_SIGNATURE[0]:
        return _parse_v2(buffer, max_v2_payload)
    raise ProxyHeaderError("not a PROXY protocol header")


def _parse_v1(buffer: bytearray) -> tuple[ProxyHeader, int] | None:
    if not V1_PREFIX.startswith(buffer[: len(V1_PREFIX)]):
        raise ProxyHeaderError("not a PROXY protocol v1 header")
    newline = buffer.find(b"\n", 0, V1_MAX_LENGTH)
    if newline == -1:
        if len(buffer) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
        partial = bytes(buffer[len(V1_PREFIX) :])
        _check_v1_partial(partial.removesuffix(b"\r"))
        return None
    if buffer[newline - 1] != ord("\r"):
        raise ProxyHeaderError("PROXY v1 line not ended by CRLF")
    line = bytes(buffer[len(V1_PREFIX) : newline - 1])
    return _parse_v1_line(line), newline + 1


def _parse_v1_line(line: bytes) -> ProxyHeader:
    """Parse what follows "PROXY " up to the CRLF."""
    if b"\r" in line:
        raise ProxyHeaderError("bare CR in PROXY v1 line")
    fields = line.split(b" ")
    protocol = fields[0]
    if protocol == _V1_UNKNOWN:
        # The spec says the receiver must ignore whatever follows UNKNOWN.
        return ProxyHeader(version=1, source=None, destination=None)
    if protocol not in _V1_PROTOCOLS:
        raise ProxyHeaderError(f"unknown PROXY v1 protocol {protocol!r}")
    if len(fields) != _V1_FIELDS:
        raise ProxyHeaderError(
            f"PROXY v1 {protocol.decode()} needs 4 fields, got {len(fields) - 1}"
        )
    source = _v1_address(fields[1], protocol)
    destination = _v1_address(fields[2], protocol)
    return ProxyHeader(
        version=1,
        source=(source, _v1_port(fields[3])),
        destination=(destination, _v1_port(fields[4])),
    )


def _check_v1_partial(partial: bytes) -> None:
    """Raise unless `partial` (after "PROXY ", no CRLF yet) can still become a valid line."""
    if b"\r" in partial:
        raise ProxyHeaderError("bare CR in PROXY v1 line")
    *complete, last = partial.split(b" ")
    if not complete:
        if not any(protocol.startswith(last) for protocol in _V1_PROTOCOLS):
            raise ProxyHeaderError(f"unknown PROXY v1 protocol {last!r}")
        return
    protocol = complete[0]
    if protocol == _V1_UNKNOWN:
        return
    if protocol not in _V1_PROTOCOLS:
        raise ProxyHeaderError(f"unknown PROXY v1 protocol {protocol!r}")
    if len(complete) >= _V1_FIELDS:
        raise ProxyHeaderError(f"too many fields in PROXY v1 {protocol.decode()} line")
    for position, field in enumerate(complete[1:]):
        _check_v1_field(position, field, protocol)
    if not last:
        return
    position = len(complete) - 1
    if position < 2:
        if _V1_ADDRESS_PARTIAL[protocol].fullmatch(last) is None:
            raise ProxyHeaderError(f"invalid {protocol.decode()} address {last!r}")
    else:
        # Every prefix of a valid port is itself a valid port.
        _v1_port(last)


def _check_v1_field(position: int, field: bytes, protocol: bytes) -> None:
    """Validate field `position` of the four after the protocol: two addresses, two ports."""
    if position < 2:
        _v1_address(field, protocol)
    else:
        _v1_port(field)


def _v1_address(field: bytes, protocol: bytes) -> str:
    if _V1_ADDRESS_PARTIAL[protocol].fullmatch(field) is None:
        raise ProxyHeaderError(f"invalid {protocol.decode()} address {field!r}")
    parse = IPv4Address if protocol == b"TCP4" else IPv6Address
    try:
        return str(parse(field.decode("ascii")))
    except ValueError:
        raise ProxyHeaderError(f"invalid {protocol.decode()} address {field!r}") from None


def _v1_port(field: bytes) -> int:
    if _V1_PORT.fullmatch(field) is None or int(field) > 0xFFFF:
        raise ProxyHeaderError(f"invalid port {field!r}")
    return int(field)


def _parse_v2(buffer: bytearray, max_payload: int) -> tuple[ProxyHeader, int] | None:
    signature_length = len(V2_SIGNATURE)
    if not V2_SIGNATURE.startswith(buffer[:signature_length]):
        raise ProxyHeaderError("not a PROXY protocol v2 signature")
    if len(buffer) <= signature_length:
        return None
    version, command = divmod(buffer[12], 16)
    if version != _V2_VERSION:
        raise ProxyHeaderError(f"unsupported PROXY protocol version {version}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError(f"unknown PROXY v2 command {command:#x}")
    if len(buffer) <= 13:
        return None
    family, transport = divmod(buffer[13], 16)
    # With LOCAL the spec says the family byte is ignored.
    if command == _V2_PROXY:
        _check_v2_family(family, transport)
    if len(buffer) < V2_FIXED_LENGTH:
        return None
    payload_length = int.from_bytes(buffer[14:16], "big")
    if payload_length > max_payload:
        raise ProxyHeaderError(f"PROXY v2 length {payload_length} exceeds {max_payload}")
    if command == _V2_PROXY and payload_length < _V2_ADDRESS_LENGTH[family]:
        raise ProxyHeaderError(f"PROXY v2 length {payload_length} too short for its addresses")
    total_length = V2_FIXED_LENGTH + payload_length
    if len(buffer) < total_length:
        return None
    payload = bytes(buffer[V2_FIXED_LENGTH:total_length])
    if command == _V2_LOCAL or family == _AF_UNSPEC:
        return ProxyHeader(version=2, source=None, destination=None), total_length
    address_length = _V2_ADDRESS_LENGTH[family]
    _check_tlvs(payload[address_length:])
    if family == _AF_UNIX:
        return ProxyHeader(version=2, source=None, destination=None), total_length
    source, destination = _v2_endpoints(payload[:address_length])
    return ProxyHeader(version=2, source=source, destination=destination), total_length


def _check_v2_family(family: int, transport: int) -> None:
    if family not in _V2_ADDRESS_LENGTH:
        raise ProxyHeaderError(f"unknown PROXY v2 address family {family:#x}")
    if transport > _TRANSPORT_MAX:
        raise ProxyHeaderError(f"unknown PROXY v2 transport {transport:#x}")
    if family in (_AF_INET, _AF_INET6) and transport != _TRANSPORT_STREAM:
        raise ProxyHeaderError("PROXY v2 header is not for a TCP stream")


def _v2_endpoints(block: bytes) -> tuple[Endpoint, Endpoint]:
    size = (len(block) - 4) // 2
    source = str(ip_address(block[:size]))
    destination = str(ip_address(block[size : 2 * size]))
    source_port = int.from_bytes(block[2 * size : 2 * size + 2], "big")
    destination_port = int.from_bytes(block[2 * size + 2 :], "big")
    return (source, source_port), (destination, destination_port)


def _check_tlvs(data: bytes) -> None:
    """Raise unless `data` is a whole number of type-length-value records."""
    offset = 0
    while offset < len(data):
        if offset + _TLV_HEADER_LENGTH > len(data):
            raise ProxyHeaderError("truncated PROXY v2 TLV")
        offset += _TLV_HEADER_LENGTH + int.from_bytes(data[offset + 1 : offset + 3], "big")
        if offset > len(data):
            raise ProxyHeaderError("PROXY v2 TLV runs past the header")


def encode_v1(source: Endpoint | None, destination: Endpoint | None) -> bytes:
    """A v1 header line; both endpoints None gives "PROXY UNKNOWN"."""
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    (source_ip, source_port), (destination_ip, destination_port) = _endpoint_pair(
        source, destination
    )
    protocol = "TCP4" if source_ip.version == 4 else "TCP6"
    return (
        f"PROXY {protocol} {source_ip} {destination_ip} {source_port} {destination_port}\r\n"
    ).encode("ascii")


def encode_v2(
    source: Endpoint | None,
    destination: Endpoint | None,
    *,
    tlvs: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """A v2 header: PROXY over TCP, or LOCAL when both endpoints are None."""
    if source is None and destination is None:
        version_command, family, addresses = 0x20 | _V2_LOCAL, 0x00, b""
    else:
        (source_ip, source_port), (destination_ip, destination_port) = _endpoint_pair(
            source, destination
        )
        version_command = 0x20 | _V2_PROXY
        address_family = _AF_INET if source_ip.version == 4 else _AF_INET6
        family = address_family << 4 | _TRANSPORT_STREAM
        addresses = (
            source_ip.packed
            + destination_ip.packed
            + source_port.to_bytes(2, "big")
            + destination_port.to_bytes(2, "big")
        )
    payload = addresses + b"".join(
        bytes([kind]) + len(value).to_bytes(2, "big") + value for kind, value in tlvs
    )
    return (
        V2_SIGNATURE + bytes([version_command, family]) + len(payload).to_bytes(2, "big") + payload
    )


def _endpoint_pair(
    source: Endpoint | None, destination: Endpoint | None
) -> tuple[_IPEndpoint, _IPEndpoint]:
    if source is None or destination is None:
        raise ValueError("give both endpoints or neither")
    pair = _ip_endpoint(source), _ip_endpoint(destination)
    if pair[0][0].version != pair[1][0].version:
        raise ValueError("source and destination must be the same address family")
    return pair


def _ip_endpoint(endpoint: Endpoint) -> _IPEndpoint:
    host, port = endpoint
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    return ip_address(host), port


@dataclass(frozen=True, slots=True)
class ProxyRead:
    """What a front door learns from feeding a connection's first bytes to its PROXY parser."""

    complete: bool
    source: IPv4Address | IPv6Address | None = None
    """Whom the proxy speaks for (an IPv4-mapped address as IPv4); None for LOCAL or UNKNOWN,
    the proxy speaking for itself, as in HAProxy's health checks."""
    rest: bytes = b""
    """The bytes after the header: the start of the application stream."""
    error: str | None = None


_WAITING = ProxyRead(complete=False)


def read_proxy_header(parser: ProxyHeaderParser, data: bytes) -> ProxyRead:
    """Feed `data` to `parser`: waiting for more, a bad header, or who the connection is for."""
    try:
        header = parser.feed(data)
    except ProxyHeaderError as exc:
        return ProxyRead(complete=True, error=str(exc))
    if header is None:
        return _WAITING
    source = None if header.source is None else unmap_ipv4(ip_address(header.source[0]))
    return ProxyRead(complete=True, source=source, rest=parser.remainder)
