"""What the kernel says about a caller's connection, on real loopback sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from relayprobe.frontdoors.tcpstate import PeerState, limit_send_queue, peer_state

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="needs Linux TCP_INFO")


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(ours, theirs): a connected pair on loopback, as the service and a caller."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    yield ours, theirs
    ours.close()
    theirs.close()


def settle(sock: socket.socket, wanted: PeerState) -> PeerState:
    """The peer state once it is `wanted`, or after a second."""
    deadline = time.monotonic() + 1
    while (state := peer_state(sock)) is not wanted and time.monotonic() < deadline:
        time.sleep(0.001)
    return state


def test_a_caller_that_acknowledged_everything_is_present(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = connection
    ours.sendall(b"hello")
    assert settle(ours, PeerState.PRESENT) is PeerState.PRESENT


def test_a_half_closed_caller_is_still_present(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = connection
    theirs.shutdown(socket.SHUT_WR)
    assert ours.recv(1) == b""
    ours.sendall(b"still there?")
    assert settle(ours, PeerState.PRESENT) is PeerState.PRESENT
    assert theirs.recv(100) == b"still there?"


def test_a_caller_that_hung_up_is_gone_after_one_write(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = connection
    theirs.close()
    assert ours.recv(1) == b""
    # A FIN alone can't be told from a half-close; the reset to our next write can.
    assert peer_state(ours) is PeerState.PRESENT
    ours.sendall(b"anyone?")
    assert settle(ours, PeerState.GONE) is PeerState.GONE


def test_a_closed_socket_is_gone(connection: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = connection
    ours.close()
    assert peer_state(ours) is PeerState.GONE


def test_no_socket_is_unknown() -> None:
    assert peer_state(None) is PeerState.UNKNOWN


def test_send_queue_is_bounded_in_bytes_and_time(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = connection
    limit_send_queue(ours, buffer_bytes=64 * 1024, stalled_after=7.5)
    # Linux doubles SO_SNDBUF for its bookkeeping.
    assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 2 * 64 * 1024
    assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7500
    limit_send_queue(None, buffer_bytes=1, stalled_after=1)  # no socket: nothing to tune
