"""Addresses and networks as relayprobe reads them: an IPv4-mapped IPv6 address
(::ffff:192.0.2.1) is the IPv4 address it carries, everywhere. Pure, and light enough for the
settings to load.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

_MAPPED_IPV4 = IPv6Network("::ffff:0:0/96")


def unmap_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped IPv6 address stands for; any other address unchanged."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def peer_address(host: str) -> IPAddress:
    """The address of a peer; an IPv4-mapped IPv6 address is the IPv4 address it maps."""
    return unmap_ipv4(ip_address(host))


def parse_network(value: str | IPNetwork) -> IPNetwork:
    """A network from CIDR text; host bits set ("192.0.2.1/24") is an error, not rounded."""
    if isinstance(value, IPv4Network | IPv6Network):
        network = value
    else:
        try:
            network = ip_network(value, strict=True)
        except ValueError as exc:
            raise ValueError(f"invalid network {value!r}: {exc}") from None
    if isinstance(network, IPv6Network) and network.subnet_of(_MAPPED_IPV4):
        # Addresses are unmapped before matching, so rules must be too.
        return IPv4Network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
    return network
