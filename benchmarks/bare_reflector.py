"""The yardstick of `benchmarks.load`: a bare-bones asyncio reflector, a floor for relayprobe.

Per caller it connects back to the caller's address on --target-port, reads the greeting, says
EHLO, runs the 20 probes of relayprobe's classic suite (MAIL FROM, RCPT TO, RSET, rendered as
relayprobe renders them for a host without a PTR name: {host} is the banner's name), says QUIT
and ends with a verdict, echoing every line it sends as `>>> ...` and every reply line as
`<<< ...`, one write per line, on uvloop.

Left out on purpose, so that it costs what the conversation itself costs: timeouts, bounds on
lines, replies and callers, sanitising of the server's replies, telnet, a fresh session before
the server's error limit (against the benchmark's fake relayprobe opens three SMTP sessions per
test, this one), reconnects, STARTTLS, delivery confirmation, logging. Never expose it.

    python -m benchmarks.bare_reflector --listen 127.0.0.1:PORT --target-port N
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from relayprobe.operations.runtime import run
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


async def relay_test(target: str, port: int, caller: asyncio.StreamWriter) -> str:
    """The conversation with `target`, echoed to the caller; what it appeared to do."""
    reader, server = await asyncio.open_connection(target, port)

    async def command(line: str) -> str:
        caller.write(f">>> {line}\r\n".encode())
        server.write(f"{line}\r\n".encode())
        return await reply(reader, caller)

    try:
        banner = (await reply(reader, caller)).split()
        literal = address_literal(target)
        host = banner[1] if len(banner) > 1 else literal
        context = ProbeContext(
            host=host, ip=literal, dom="relaytest.invalid", foreign="example.net"
        )
        values = context.values(rcpt="nobody")
        await command("EHLO relayprobe.invalid")
        accepted = 0
        for probe in CLASSIC:
            caller.write(f":Relay test: #{probe.name}\r\n".encode())
            await command(f"MAIL FROM:{render(probe.mail_from, values)}")
            accepted += (await command(f"RCPT TO:{render(probe.rcpt_to, values)}")).startswith("2")
            await command("RSET")
        await command("QUIT")
    finally:
        server.close()
    return f"accept {accepted} relay attempts" if accepted else "reject relay attempts"


async def serve(listen: str, target_port: int) -> None:
    async def on_caller(_: asyncio.StreamReader, caller: asyncio.StreamWriter) -> None:
        target = caller.get_extra_info("peername")[0]
        caller.write(f"Connecting to {target} ...\r\n".encode())
        try:
            verdict = f"System appeared to {await relay_test(target, target_port, caller)}"
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
    args = parser.parse_args(argv)
    run(serve(args.listen, args.target_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
