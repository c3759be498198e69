"""`relayprobe demo`, the README's main job, end to end."""

from __future__ import annotations

from relayprobe.demo import run_demo
from relayprobe.operations.config import Settings


async def test_demo_shows_a_closed_server_an_open_relay_and_the_qmail_case() -> None:
    shown: list[str] = []
    await run_demo(Settings(), show=shown.append)
    callers = [index for index, line in enumerate(shown) if line.startswith("$ telnet -b ")]
    assert len(callers) == 3
    closed, open_relay, qmail = (
        shown[start:end] for start, end in zip(callers, [*callers[1:], len(shown)], strict=True)
    )
    assert "System appeared to reject relay attempts" in closed
    assert "Connecting to 127.0.0.2 ..." in closed
    assert "System appeared to accept 20 relay attempts" in open_relay
    assert any(
        line.startswith("Relay confirmed: 20 of 20 test messages arrived") for line in open_relay
    )
    assert "System appeared to accept 12 relay attempts" in qmail
    assert "Relay not confirmed: none of 12 test messages arrived within 3 s" in qmail
    assert qmail[-3].startswith("Note: the 12 accepted recipients use address forms (%-hack, ")
    for caller in (closed, open_relay, qmail):
        caption = caller[0].split("    # ", 1)[1]
        assert caption[0].isupper()
        assert caption.endswith(".")
    assert qmail[0].endswith(
        "# A qmail-like server, which says 250 at RCPT and never delivers, listens on "
        f"127.0.0.4:{qmail[0].rsplit(':', 1)[1]}"
    )
