"""Flood the canary sink with unknown recipients and measure what it costs the event loop.

The sink runs in this process, as in `relayprobe serve`, next to a ticker that wakes every
10 ms and records how late it woke (the event-loop lag any telnet caller in the same process
would see) and a relay that delivers one proven test message every 0.2 s from 127.0.0.1 and
records how long each delivery takes. A second process runs N flooding connections, each from
its own /24 (127.100.N.1: the worst case for the per-source limits), or all from one address:
connect, EHLO, MAIL, then hundreds of pipelined RCPTs to unknown recipients, and again as soon
as the sink hangs up or refuses.

Run from the repository root (loopback only, bounded by --seconds):

    python -m benchmarks.sink_flood [--connections 50] [--seconds 5] [--spread prefixes|address]

(`python -m benchmarks.sink_flood flood ...` is the flooding process it starts.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from relayprobe.confirmation.canary import InMemoryRegistry, new_token
from relayprobe.confirmation.sink import CanarySink
from relayprobe.confirmation.sinklimits import SinkLimits

REPOSITORY = Path(__file__).resolve().parents[1]
DOMAIN = "relaytest.example"
FLOOD_COMMAND = "flood"
TICK_S = 0.01
RELAY_EVERY_S = 0.2
MAX_SECONDS = 60.0
MAX_CONNECTIONS = 250
RCPT_BATCH = 256
IO_TIMEOUT_S = 5.0


@dataclass
class Report:
    """What one flood cost: event-loop lag, relay delivery times, and what the sink did."""

    lags_s: list[float] = field(default_factory=list)
    deliveries_s: list[float] = field(default_factory=list)
    failed_deliveries: int = 0
    flood: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)

    @property
    def max_lag_s(self) -> float:
        return max(self.lags_s, default=0.0)

    @property
    def p99_lag_s(self) -> float:
        lags = sorted(self.lags_s)
        return lags[int(0.99 * (len(lags) - 1))] if lags else 0.0

    def lines(self) -> list[str]:
        delivered = sorted(self.deliveries_s)
        mean_lag_s = statistics.fmean(self.lags_s or [0.0])
        return [
            f"event-loop lag: max {self.max_lag_s * 1000:.1f} ms,"
            f" p99 {self.p99_lag_s * 1000:.1f} ms, mean {mean_lag_s * 1000:.2f} ms"
            f" over {len(self.lags_s)} ticks",
            f"relay deliveries: {len(delivered)} ok, {self.failed_deliveries} failed;"
            f" median {statistics.median(delivered or [0.0]) * 1000:.1f} ms,"
            f" max {max(delivered, default=0.0) * 1000:.1f} ms",
            f"flood: {json.dumps(self.flood, sort_keys=True)}",
            f"sink refusals: {json.dumps(self.refused, sort_keys=True)}",
        ]


async def _reply_code(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def _flood_one(port: int, source: str, deadline: float, counts: Counter[str]) -> None:
    rcpts = f"RCPT TO:<nobody-{new_token()}@{DOMAIN}>\r\n".encode() * RCPT_BATCH
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        counts["connects"] += 1
        try:
            async with asyncio.timeout(IO_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source, 0)
                )
        except (OSError, TimeoutError):
            counts["connect_errors"] += 1
            await asyncio.sleep(0.01)
            continue
        try:
            async with asyncio.timeout(max(0.01, deadline - loop.time())):
                if await _reply_code(reader) != 220:
                    counts["refused_at_connect"] += 1
                    continue
                writer.write(b"EHLO flood.test\r\nMAIL FROM:<a@flood.test>\r\n" + rcpts)
                while True:
                    code = await _reply_code(reader)
                    counts[f"reply_{code}"] += 1
                    if writer.transport.get_write_buffer_size() == 0:
                        writer.write(rcpts)
        except (OSError, ConnectionError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()


async def flood(port: int, *, connections: int, seconds: float, spread: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    deadline = asyncio.get_running_loop().time() + seconds
    sources = [
        f"127.100.{n}.1" if spread == "prefixes" else "127.100.0.1" for n in range(connections)
    ]
    await asyncio.gather(*(_flood_one(port, source, deadline, counts) for source in sources))
    return counts


async def _tick(lags: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(TICK_S)
        lags.append(loop.time() - started - TICK_S)


async def _relay(port: int, registry: InMemoryRegistry, report: Report) -> None:
    while True:
        await asyncio.sleep(RELAY_EVERY_S)
        token = new_token()
        secret = await registry.register(token, ttl=60)
        started = time.monotonic()
        try:
            async with asyncio.timeout(IO_TIMEOUT_S):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    body = f"Subject: t\r\n\r\nCheck: {secret}\r\n."
                    codes = [await _reply_code(reader)]
                    for line in (
                        "HELO relay.test",
                        "MAIL FROM:<>",
                        f"RCPT TO:<nobody-{token}@{DOMAIN}>",
                        "DATA",
                        body,
                    ):
                        writer.write(line.encode() + b"\r\n")
                        codes.append(await _reply_code(reader))
                finally:
                    writer.close()
        except (OSError, ConnectionError, TimeoutError):
            codes = []
        if codes[-1:] == [250] and not await registry.is_pending(token):
            report.deliveries_s.append(time.monotonic() - started)
        else:
            report.failed_deliveries += 1


async def measure(
    *,
    connections: int = 50,
    seconds: float = 5.0,
    spread: str = "prefixes",
    limits: SinkLimits | None = None,
) -> Report:
    """Run one flood against a fresh sink in this process; bounded by `seconds` plus a margin."""
    if not 0 < seconds <= MAX_SECONDS or not 0 < connections <= MAX_CONNECTIONS:
        raise ValueError(f"at most {MAX_SECONDS:g} s and {MAX_CONNECTIONS} connections")
    registry = InMemoryRegistry()
    sink = CanarySink(registry=registry, domain=DOMAIN, hostname="sink.test", limits=limits)
    _, port = await sink.start("127.0.0.1", 0)
    report = Report()
    tasks = [
        asyncio.create_task(_tick(report.lags_s)),
        asyncio.create_task(_relay(port, registry, report)),
    ]
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.sink_flood",
            FLOOD_COMMAND,
            f"--port={port}",
            f"--connections={connections}",
            f"--seconds={seconds}",
            f"--spread={spread}",
            cwd=REPOSITORY,
            stdout=subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(seconds + 30):
                output, _ = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        report.flood = json.loads(output)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await sink.stop()
    report.refused = {str(reason): count for reason, count in sink.refused.items()}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=[FLOOD_COMMAND])
    parser.add_argument("--port", type=int)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--spread", choices=["prefixes", "address"], default="prefixes")
    args = parser.parse_args()
    if args.command == FLOOD_COMMAND:
        counts = asyncio.run(
            flood(args.port, connections=args.connections, seconds=args.seconds, spread=args.spread)
        )
        print(json.dumps(dict(counts)))
        return
    # A line per dropped flooding connection would measure the terminal, not the sink.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    report = asyncio.run(
        measure(connections=args.connections, seconds=args.seconds, spread=args.spread)
    )
    print(f"{args.connections} flooding connections ({args.spread}), {args.seconds:g} s:")
    for line in report.lines():
        print(f"  {line}")


if __name__ == "__main__":
    main()
