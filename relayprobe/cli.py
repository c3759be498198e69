"""The `relayprobe` command: check, serve, demo."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import ipaddress
import json
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import structlog

from relayprobe import __version__
from relayprobe.app import Application, canary_sink, local_registry, sink_tls
from relayprobe.demo import run_demo
from relayprobe.frontdoors.core import SessionCore
from relayprobe.frontdoors.telnet import StartupError
from relayprobe.operations import runtime
from relayprobe.operations.config import ConfigError, Settings, add_options, load_settings
from relayprobe.operations.logsetup import configure_logging
from relayprobe.relaytest.events import Event
from relayprobe.relaytest.sanitize import sanitize_text
from relayprobe.reports.historyformat import format_entry, format_table
from relayprobe.storage.history import (
    HISTORY_ERRORS,
    error_line,
    history_location,
    open_history,
)
from relayprobe.storage.store import DATABASE_NAME

# An accepted probe is not an open relay until a test message arrives: "accepted" has a status
# of its own, so that a script never calls an unproven server open (the qmail case).
EXIT_BY_VERDICT = {"rejected": 0, "relayed": 1, "incomplete": 3, "accepted": 4}
EXIT_USAGE = 2


class UsageError(ValueError):
    """A mistake on the command line or in the configuration: one line, exit 2."""


class _ArgumentParser(argparse.ArgumentParser):
    """Usage mistakes get one line, not the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="relayprobe", description="Test a mail server for third-party relaying."
    )
    parser.add_argument("--version", action="version", version=f"relayprobe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check",
        help="test one mail server now",
        description="Test one mail server now. Exit status: 0 every relay attempt refused, "
        "1 relay proven by delivery, 2 usage error, 3 test incomplete, 4 relay attempts "
        "accepted but not proven (delivery confirmation off, or no test message arrived).",
    )
    check.add_argument(
        "target", metavar="TARGET", help="IP address or host name of the mail server"
    )
    check.add_argument("--json", action="store_true", help="print the JSON result instead")
    add_options(check, "check")
    serve = commands.add_parser("serve", help="run the telnet reflector service")
    serve.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    add_options(serve, "serve")
    history = commands.add_parser("history", help="list stored results, or show one")
    history.add_argument(
        "address", nargs="?", metavar="ADDRESS", help="only results for this address"
    )
    history.add_argument("--limit", type=int, default=20, metavar="N", help="at most N results")
    history.add_argument(
        "--show", metavar="ID", help="print one result in full, by its ID or public ID"
    )
    history.add_argument("--json", action="store_true", help="print JSON results")
    add_options(history, "history")
    demo = commands.add_parser("demo", help="show the service against two fake mail servers")
    add_options(demo, "demo")
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
    address = ipaddress.ip_address(await _resolve(target, settings.target_port))

    def show(event: Event, lines: tuple[str, ...]) -> None:
        if not as_json:
            for line in lines:
                print(line, flush=True)

    registry = local_registry(settings)
    async with canary_sink(settings, registry):
        core = SessionCore(dataclasses.replace(settings, motd=""), registry=registry)
        result = await core.run(address, show)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    return EXIT_BY_VERDICT[result.verdict]


def _raise_open_file_limit() -> None:
    """Each session holds two sockets: allow as many open files as the system lets us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(settings: Settings) -> int:
    log = structlog.get_logger("relayprobe")
    _raise_open_file_limit()
    app = Application(settings)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting_down", sessions=len(app.reflector.sessions))
    await app.shutdown()
    log.info("stopped")
    return 0


def _history(settings: Settings, args: dict[str, Any]) -> int:
    if args["limit"] < 1:
        raise UsageError("--limit must be at least 1")
    state_dir, database_url = settings.state_dir, settings.database_url
    try:
        if database_url is None and not Path(state_dir, DATABASE_NAME).exists():
            raise UsageError(f"no history in {state_dir} (see --state-dir)")
        with open_history(state_dir=state_dir, database_url=database_url) as store:
            show = args["show"]
            if show is not None:
                # No public ID is all digits (see schema._PUBLIC_ID): digits are a row number.
                entry = (
                    store.get(int(show))
                    if show.isascii() and show.isdigit()
                    else store.by_public_id(
                        show,
                        now=datetime.datetime.now(datetime.UTC),
                        retention_days=settings.retention_days,
                    )
                )
                if entry is None:
                    raise UsageError(f"no result with ID {sanitize_text(show)}")
                entries = [entry]
            else:
                entries = store.recent(address=args["address"], limit=args["limit"])
    except UsageError:
        raise
    except HISTORY_ERRORS as exc:
        where = history_location(state_dir=state_dir, database_url=database_url)
        raise UsageError(f"cannot read the history in {where}: {error_line(exc)}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args["json"]:
        lines = [json.dumps([entry.result for entry in entries], indent=2)]
    elif args["show"] is not None:
        lines = format_entry(entries[0])
    else:
        lines = format_table(entries) if entries else ["no results"]
    for line in lines:
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    try:
        settings = load_settings(args)
        if command == "check":
            configure_logging("console", level=logging.WARNING)
            return runtime.run(_check(args["target"], settings, as_json=args["json"]))
        if command == "serve":
            if args["check_config"]:
                if settings.sink_tls_cert is not None:
                    sink_tls(settings)
                print("configuration OK")
                return 0
            configure_logging(settings.log_format)
            return runtime.run(_serve(settings))
        if command == "history":
            return _history(settings, args)
        if command == "demo":
            configure_logging(settings.log_format, level=logging.WARNING)
            runtime.run(run_demo(settings))
            return 0
    except (ConfigError, UsageError) as exc:
        print(f"relayprobe {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        print(f"relayprobe {command}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (`| head`) has gone; say nothing more, not even at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    raise AssertionError(f"unhandled command {command}")
