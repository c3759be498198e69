"""Why the service cannot start, in one line an operator can act on."""

from __future__ import annotations

import errno

from relayprobe.operations.config import Endpoint


class StartupError(OSError):
    """The service cannot start; the message says why and how to fix it."""


def bind_advice(endpoint: Endpoint, exc: OSError, *, option: str = "--listen") -> str:
    """One line on why `endpoint` can't be bound and what to do about it."""
    if exc.errno == errno.EACCES:
        return (
            f"cannot listen on {endpoint}: permission denied; ports below 1024 need root or "
            "CAP_NET_BIND_SERVICE (e.g. AmbientCapabilities= in the systemd unit), "
            f"or give {option} a port above 1023"
        )
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {endpoint}: the address is already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {endpoint}: no such address on this machine"
    return f"cannot listen on {endpoint}: {exc.strerror or exc}"
