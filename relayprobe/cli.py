"""The `relayprobe` command: check, serve, history, demo.

Each command imports what it needs when it runs, not before: `relayprobe --help` and `check`
start in about the time Python takes to load asyncio and aiosmtplib, without the service's
HTTP, metrics, sink, Redis or database modules (tests/test_cli.py keeps it so).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from relayprobe import __version__
from relayprobe.operations.config import ConfigError, Settings, add_options, load_settings
from relayprobe.operations.startup import StartupError

if TYPE_CHECKING:
    from relayprobe.relaytest.events import Event

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


COMMANDS = ("check", "serve", "history", "demo")


def _parser(command: str | None) -> argparse.ArgumentParser:
    """The command line's parser, with the settings' options on `command` alone: each command
    takes some ninety, and argparse would check every one of them for all four commands."""

    def options_for(subparser: argparse.ArgumentParser, name: str) -> None:
        if name == command:
            add_options(subparser, name)

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
    options_for(check, "check")
    serve = commands.add_parser("serve", help="run the telnet reflector service")
    serve.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    options_for(serve, "serve")
    history = commands.add_parser("history", help="list stored results, or show one")
    history.add_argument(
        "address", nargs="?", metavar="ADDRESS", help="only results for this address"
    )
    history.add_argument("--limit", type=int, default=20, metavar="N", help="at most N results")
    history.add_argument(
        "--show", metavar="ID", help="print one result in full, by its ID or public ID"
    )
    history.add_argument("--json", action="store_true", help="print JSON results")
    options_for(history, "history")
    demo = commands.add_parser("demo", help="show the service against two fake mail servers")
    options_for(demo, "demo")
    return parser


async def _resolve(target: str, port: int) -> str:
    import asyncio
    import ipaddress
    import socket

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
    import dataclasses
    import ipaddress
    import json

    from relayprobe.testrun import run_test

    address = ipaddress.ip_address(await _resolve(target, settings.target_port))

    def show(event: Event, lines: tuple[str, ...]) -> None:
        if not as_json:
            for line in lines:
                print(line, flush=True)

    settings = dataclasses.replace(settings, motd="")
    if settings.confirmation_off_reason() is not None:
        result = await run_test(settings, address, show)
    else:
        # The sink (aiosmtpd, the service's wiring and its logging) only when it is asked for.
        from relayprobe.app import canary_sink, local_registry
        from relayprobe.operations.logsetup import configure_logging

        configure_logging("console", level=logging.WARNING)
        registry = local_registry(settings)
        async with canary_sink(settings, registry):
            result = await run_test(settings, address, show, registry=registry)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    return EXIT_BY_VERDICT[result.verdict]


def _raise_open_file_limit() -> None:
    """Each session holds two sockets: allow as many open files as the system lets us."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(settings: Settings) -> int:
    import asyncio
    import signal

    import structlog

    from relayprobe.app import Application

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
    import datetime
    import json
    from pathlib import Path

    from relayprobe.relaytest.sanitize import sanitize_text
    from relayprobe.reports.historyformat import format_entry, format_table
    from relayprobe.storage.history import (
        error_line,
        history_errors,
        history_location,
        open_history,
    )
    from relayprobe.storage.store import DATABASE_NAME

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
    except history_errors() as exc:
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
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first word: the only options before it are --help and --version.
    args = vars(_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv))
    command = args.pop("command")
    try:
        settings = load_settings(args)
        if command == "history":
            return _history(settings, args)
        from relayprobe.operations import runtime

        if command == "check":
            return runtime.run(_check(args["target"], settings, as_json=args["json"]))
        from relayprobe.operations.logsetup import configure_logging

        if command == "serve":
            if args["check_config"]:
                if settings.sink_tls_cert is not None:
                    from relayprobe.app import sink_tls

                    sink_tls(settings)
                print("configuration OK")
                return 0
            configure_logging(settings.log_format)
            return runtime.run(_serve(settings))
        if command == "demo":
            from relayprobe.demo import run_demo

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
