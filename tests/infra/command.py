"""Running the `relayprobe` command as a customer or operator would: a subprocess, bounded."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


def environment() -> dict[str, str]:
    """This process's environment without RELAYPROBE_* settings that would change the command."""
    return {name: value for name, value in os.environ.items() if not name.startswith("RELAYPROBE_")}


async def relayprobe(*args: str, timeout: float = 60) -> Completed:
    """Run `relayprobe ARGS...` with no input; kill it if it runs past `timeout` seconds."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayprobe",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment(),
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Completed(process.returncode, stdout.decode(), stderr.decode())
