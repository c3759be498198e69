"""The yardstick of `benchmarks.load`: a bare-bones asyncio reflector, a floor for relayprobe.

Per caller it connects back to the caller's address on --target-port, reads the greeting, says
EHLO, runs the 20 probes of relayprobe's classic suite (MAIL FROM, RCPT TO, RSET, rendered as
relayprobe renders them for a host without a PTR name: {host} is the banner's name), says QUIT
and ends with a verdict, echoing every line it sends as `>>> ...` and every reply line as
`<<< ...`, one write per line, on uvloop.

Left out on purpose, so that it costs what the conversation itself costs: timeouts, bounds on
lines, replies and callers, sanitising of the server's replies, telnet, reconnects, STARTTLS,
delivery confirmation, logging. Never expose it. By default it makes one SMTP session a test,
as issue 13 describes it; with --same-sessions it opens a fresh one where relayprobe's error
budget would (against the benchmark's fake, three a test, as relayprobe does).

    python -m benchmarks.bare_reflector --listen 127.0.0.1:PORT --target-port N [--same-sessions]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from relayprobe.operations.runtime import run
from relayprobe.relaytest.budget import ErrorBudget
from relayprobe.relaytest.probes import CLASSIC, ProbeContext, address_literal, render

BACKLOG = 4096  # as relayprobe's front doors


async def reply(server: asyncio.StreamReader, caller: asyncio.StreamWriter) -> str:
    """Echo one reply, however many lines, to the caller; its last line."""
    while True:
        line = (await server.readline()).decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            raise ConnectionError("the server hung up")
        caller.write(f"<<< {line}\r\n".encode())
        if line[3:4] != "-":
            return line


async def relay_test(
    target: str, port: int, caller: asyncio.StreamWriter, *, same_sessions: bool = False
) -> str:
    """The conversation with `target`, echoed to the caller; what it appeared to do. With
    `same_sessions`, a fresh session before relayprobe's error budget runs out, as relayprobe
    opens one (QUIT, connect, greeting, EHLO)."""
    budget = ErrorBudget()
    reader, server = await asyncio.open_connection(target, port)

    async def command(line: str) -> str:
        caller.write(f">>> {line}\r\n".encode())
        server.write(f"{line}\r\n".encode())
        answer = await reply(reader, caller)
        if same_sessions and answer[:3].isdigit():
            budget.record(int(answer[:3]))
        return answer

    async def greet() -> str:
        """Read the greeting and say EHLO; the greeting's last line."""
        greeting = await reply(reader, caller)
        await command("EHLO relayprobe.invalid")
        return greeting

    try:
        banner = (await greet()).split()
        literal = address_literal(target)
        host = banner[1] if len(banner) > 1 else literal
        context = ProbeContext(
            host=host, ip=literal, dom="relaytest.invalid", foreign="example.net"
        )
        values = context.values(rcpt="nobody")
        accepted = 0
        for probe in CLASSIC:
            if same_sessions and budget.spent:
                await command("QUIT")
                server.close()
                reader, server = await asyncio.open_connection(target, port)
                budget.reset()
                await greet()
            caller.write(f":Relay test: #{probe.name}\r\n".encode())
            await command(f"MAIL FROM:{render(probe.mail_from, values)}")
            accepted += (await command(f"RCPT TO:{render(probe.rcpt_to, values)}")).startswith("2")
            await command("RSET")
        await command("QUIT")
    finally:
        server.close()
    return f"accept {accepted} relay attempts" if accepted else "reject relay attempts"


async def serve(listen: str, target_port: int, *, same_sessions: bool = False) -> None:
    async def on_caller(_: asyncio.StreamReader, caller: asyncio.StreamWriter) -> None:
        target = caller.get_extra_info("peername")[0]
        caller.write(f"Connecting to {target} ...\r\n".encode())
        try:
            outcome = await relay_test(target, target_port, caller, same_sessions=same_sessions)
            verdict = f"System appeared to {outcome}"
        except OSError as exc:
            verdict = f"Test incomplete: {exc}"
        caller.write(f"{verdict}\r\n".encode())
        caller.close()

    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(on_caller, host, int(port), backlog=BACKLOG)
    print(json.dumps({"event": "listening"}), file=sys.stderr, flush=True)
    await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--target-port", type=int, required=True, metavar="N")
    parser.add_argument(
        "--same-sessions",
        action="store_true",
        help="open a fresh session where relayprobe's error budget would",
    )
    args = parser.parse_args(argv)
    run(serve(args.listen, args.target_port, same_sessions=args.same_sessions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
