"""The `relayprobe` command: check, serve, demo."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
from collections.abc import Sequence

from relayprobe import __version__, runtime
from relayprobe.config import ConfigError, Settings, add_options, load_settings
from relayprobe.engine import TestOptions, run_relay_test
from relayprobe.events import Event
from relayprobe.render import Transcript, json_result

EXIT_BY_VERDICT = {"rejected": 0, "accepted": 1, "relayed": 1, "incomplete": 3}
EXIT_USAGE = 2


class UsageError(ValueError):
    """A mistake on the command line or in the configuration: one line, exit 2."""


def test_options(settings: Settings) -> TestOptions:
    return TestOptions(
        port=settings.target_port,
        suite=settings.probe_suite,
        helo_name=settings.helo_name,
        test_domain=settings.test_domain,
        foreign_domain=settings.foreign_domain,
        connect_timeout=settings.connect_timeout,
        reply_timeout=settings.reply_timeout,
        deadline=settings.deadline,
        rdns_timeout=settings.rdns_timeout,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayprobe", description="Test a mail server for third-party relaying."
    )
    parser.add_argument("--version", action="version", version=f"relayprobe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="test one mail server now")
    check.add_argument(
        "target", metavar="TARGET", help="IP address or host name of the mail server"
    )
    check.add_argument("--json", action="store_true", help="print the JSON result instead")
    add_options(check, "check")
    return parser


async def _resolve(target: str, port: int) -> str:
    try:
        return str(ipaddress.ip_address(target))
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(target, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UsageError(f"cannot resolve {target}: {exc.strerror or exc}") from None
    return str(infos[0][4][0])


async def _check(target: str, settings: Settings, *, as_json: bool) -> int:
    address = await _resolve(target, settings.target_port)
    transcript = Transcript()

    def show(event: Event) -> None:
        for line in transcript.add(event):
            if not as_json:
                print(line, flush=True)

    summary = await run_relay_test(address, test_options(settings), show)
    if as_json:
        print(json.dumps(json_result(summary, transcript.lines), indent=2))
    return EXIT_BY_VERDICT[summary.verdict]


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    try:
        settings = load_settings(args)
        if command == "check":
            return runtime.run(_check(args["target"], settings, as_json=args["json"]))
    except (ConfigError, UsageError) as exc:
        print(f"relayprobe {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {command}")
