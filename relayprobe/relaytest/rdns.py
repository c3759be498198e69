"""Reverse DNS (PTR) of the tested host, bounded in time."""

from __future__ import annotations

import ipaddress

from relayprobe.relaytest.hostname import is_hostname


async def lookup_ptr(address: str, *, timeout: float) -> str | None:
    """The host's PTR name, or None when there is none, it is no valid host name, or DNS is slow.

    Loopback addresses are not looked up: their PTR is never the mail server's name.
    """
    if ipaddress.ip_address(address).is_loopback:
        return None
    # Imported on first use: dnspython takes longer to load than a whole `check` of a closed
    # server on the local network, and a loopback target needs none of it.
    import dns.asyncresolver
    import dns.exception

    try:
        answer = await dns.asyncresolver.resolve_address(address, lifetime=timeout)
    except (dns.exception.DNSException, OSError):
        return None
    for record in answer:
        name = str(record).rstrip(".")
        if is_hostname(name):
            return name
    return None
