"""What the kernel knows about a caller's TCP connection, and the limits we set on it.

A caller that half-closes (sends FIN) may still be reading, or may be gone; the kernel can tell
the two apart once we have written something since: a present peer acknowledges it, a gone one
answers with a reset. Linux only; elsewhere the state is UNKNOWN and nothing is tuned.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import socket
import struct
import termios
from typing import Protocol

# Every listener's accept queue: asyncio's default (100) drops SYNs of a burst of 1,000 callers
# (or of relays delivering to the sink), who then wait seconds in retransmission.
LISTEN_BACKLOG = 4096

# tcp_states.h: after a reset or a full close the socket is in TCP_CLOSE.
_TCP_CLOSE = 7
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)


class SocketLike(Protocol):
    """What asyncio's and uvloop's transports hand out as their socket."""

    def fileno(self) -> int: ...

    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


class PeerState(enum.Enum):
    PRESENT = "present"
    """The peer has acknowledged everything written to it."""
    PENDING = "pending"
    """Data is in flight: neither acknowledged nor answered with a reset yet."""
    UNKNOWN = "unknown"
    """The platform can't say."""
    GONE = "gone"
    """The connection was reset or closed."""


def peer_state(sock: SocketLike | None) -> PeerState:
    """Whether the peer is still there, as far as the kernel knows now."""
    if _TCP_INFO is None or sock is None:
        return PeerState.UNKNOWN
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0]
        unacknowledged = struct.unpack(
            "i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        )[0]
    except (OSError, ValueError):  # ValueError: the socket is already closed (fileno -1)
        return PeerState.GONE
    if state == _TCP_CLOSE:
        return PeerState.GONE
    return PeerState.PRESENT if unacknowledged == 0 else PeerState.PENDING


def limit_send_queue(sock: SocketLike | None, *, buffer_bytes: int, stalled_after: float) -> None:
    """Bound what the kernel holds for a peer that does not read, in bytes and in time.

    Without SO_SNDBUF the kernel grows the buffer to megabytes, so a non-reading caller never
    reaches our own output cap; TCP_USER_TIMEOUT resets a connection whose data has gone
    unacknowledged (or whose window has stayed shut) that long, even after we have closed it.
    """
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        if _TCP_USER_TIMEOUT is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, round(stalled_after * 1000))
