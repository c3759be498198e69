"""Settings from defaults, a TOML file, `RELAYPROBE_*` variables and options, in rising precedence.

Each setting is a field of `Settings`; its metadata says how to parse it and which commands take it
as an option, so the file keys, variables and options can't drift apart. Bad input raises
`ConfigError` naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relayprobe.frontdoors.addresses import parse_network
from relayprobe.relaytest.hostname import is_hostname
from relayprobe.relaytest.options import RelayTestOptions
from relayprobe.relaytest.probes import SUITES, AddressForm, Probe, build_suite

if TYPE_CHECKING:
    from relayprobe.confirmation.sinklimits import SinkLimits

ENV_PREFIX = "RELAYPROBE_"


class ConfigError(ValueError):
    """Bad configuration; the message names the key and says what is wrong."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {value!r}")
    return value


def parse_port(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a port number, got {value!r}")
    try:
        text = str(value) if isinstance(value, int) else _text(value)
        if not (text.isascii() and text.isdigit()):
            raise ValueError
        port = int(text)
    except ValueError:
        raise ValueError(f"expected a port number, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return port


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # a TOML integer beyond a float's range: out of every range
            return math.inf if value > 0 else -math.inf
    try:
        return float(_text(value))
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None


def _number_in(value: object, low: float, high: float, expected: str) -> float:
    """The number `value` from `low` to `high`; NaN and the infinities (TOML's 1e400) are not."""
    number = _number(value)
    if not low <= number <= high:
        raise ValueError(f"expected {expected}, got {value!r}")
    return number


# The smallest and largest values that mean something. Outside them a number is a slip, or a
# subnormal such as 1e-320, whose reciprocal (a rate's "try again in") overflows.
MIN_SECONDS, MAX_SECONDS = 0.001, 86400.0
# One test a day keeps a refusal's wait within a day; a million a second is no limit at all.
MIN_RATE, MAX_RATE = 1 / 86400, 1_000_000.0
# History is pruned hourly: a shorter retention would keep results just as long.
MIN_DAYS, MAX_DAYS = 1 / 24, 100_000.0
# A million sessions would need two million sockets, past Linux's default open-file ceiling.
MAX_COUNT = 1_000_000


def parse_seconds(value: object) -> float:
    return _number_in(
        value,
        MIN_SECONDS,
        MAX_SECONDS,
        f"a number of seconds above 0 (from {MIN_SECONDS:g} to {MAX_SECONDS:.0f})",
    )


def whole_number(low: int, high: int, expected: str) -> Callable[[object], int]:
    """A parser of whole numbers from `low` to `high`; `expected` describes them for errors."""

    def parse(value: object) -> int:
        number = _number_in(value, low, high, expected)
        if not number.is_integer():
            raise ValueError(f"expected {expected}, got {value!r}")
        return int(number)

    return parse


parse_count = whole_number(1, MAX_COUNT, f"a whole number of at least 1 and at most {MAX_COUNT}")


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_hostname(value: object) -> str:
    name = _text(value)
    if not is_hostname(name):
        raise ValueError(f"{name!r} is not a dotted host name")
    return name.lower()


def _service_url(schemes: tuple[str, ...]) -> Callable[[object], str]:
    """A parser for the URL of a shared server: one of `schemes`, a host, nothing else checked
    (the client library reads the rest); the password may be in it, so it is never echoed."""

    def parse(value: object) -> str:
        text = _text(value)
        url = urllib.parse.urlsplit(text)
        if url.scheme not in schemes or not url.hostname:
            raise ValueError(
                f"expected a {' or '.join(f'{s}://' for s in schemes)} URL with a host"
            )
        return text

    return parse


parse_redis_url = _service_url(("redis", "rediss"))
parse_database_url = _service_url(("postgresql", "postgres"))


def parse_public_url(value: object) -> str:
    """`https://relay-test.isp.example` (or with a path): where the web front door is reached,
    for the links to results; kept without a trailing slash."""
    text = _text(value)
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    if url.query or url.fragment or url.username or url.password:
        raise ValueError(f"expected a URL without query, fragment or user, got {text!r}")
    if not is_hostname(url.hostname) and not _is_ip(url.hostname):
        raise ValueError(f"{url.hostname!r} is not a host name")
    return text.rstrip("/")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_endpoint(value: object) -> Endpoint:
    """`ADDR:PORT`: `0.0.0.0:23`, `127.0.0.1:2323`, `[::]:23`, `[::1]:2323`."""
    text = _text(value)
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"expected ADDR:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not isinstance(_ip(host, text), ipaddress.IPv6Address):
            raise ValueError(f"only IPv6 addresses go in brackets: {text!r}")
    elif not isinstance(_ip(host, text), ipaddress.IPv4Address):
        raise ValueError(f"write IPv6 addresses in brackets, as [::1]:2323: {text!r}")
    return Endpoint(str(ipaddress.ip_address(host)), parse_port(port))


def _ip(host: str, text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} in {text!r} is not an IP address") from None


def parse_network_text(value: object) -> str:
    """A CIDR network, kept as text in its normal form; host bits set is an error."""
    return str(parse_network(_text(value)))


def parse_prefix_length(maximum: int) -> Callable[[object], int]:
    return whole_number(1, maximum, f"a prefix length from 1 to {maximum}")


def parse_rate(value: object) -> float:
    return _number_in(
        value,
        MIN_RATE,
        MAX_RATE,
        f"a rate per second from {MIN_RATE:.3g} (one a day) to {MAX_RATE:.0f}",
    )


def parse_days(value: object) -> float:
    return _number_in(
        value,
        MIN_DAYS,
        MAX_DAYS,
        f"a number of days from {MIN_DAYS:.3g} (an hour) to {MAX_DAYS:.0f}",
    )


def parse_path(value: object) -> str:
    text = _text(value)
    if not text:
        raise ValueError("expected a path")
    if "\0" in text:
        raise ValueError(f"a path cannot hold a NUL character: {text!r}")
    return text


def parse_suite(value: object) -> str:
    name = _text(value)
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r} (known: {', '.join(SUITES)})")
    return name


def one_of(*names: str) -> Callable[[object], str]:
    """A parser that takes exactly one of `names`."""
    expected = f"{', '.join(names[:-1])} or {names[-1]}"

    def parse(value: object) -> str:
        name = _text(value)
        if name not in names:
            raise ValueError(f"expected {expected}, got {name!r}")
        return name

    return parse


parse_log_format = one_of("json", "console", "auto")


def _option(
    parse: Callable[[object], Any],
    help: str,
    *,
    commands: frozenset[str] = frozenset({"check", "serve"}),
    metavar: str | None = None,
    many: bool = False,
    flag: bool = False,
    file_only: bool = False,
) -> dict[str, Any]:
    return {
        "parse": parse,
        "help": help,
        "commands": commands,
        "metavar": metavar,
        "many": many,
        "flag": flag,
        "file_only": file_only,
    }


_SERVE = frozenset({"serve"})
_STATE = frozenset({"serve", "history"})
_NOT_FOR_DEMO = frozenset(
    {"target_port", "sink_listen", "sink_tls_cert", "sink_tls_key", "confirm", "confirm_wait"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    listen: tuple[Endpoint, ...] = field(
        default=(Endpoint("0.0.0.0", 23), Endpoint("::", 23)),  # noqa: S104 - a public service
        metadata=_option(
            parse_endpoint,
            "address to accept telnet callers on (repeatable)",
            commands=_SERVE,
            metavar="ADDR:PORT",
            many=True,
        ),
    )
    test_domain: str = field(
        default="relaytest.invalid",
        metadata=_option(parse_hostname, "the test domain: recipients of the probes", metavar="D"),
    )
    helo_name: str = field(
        default="relayprobe.invalid",
        metadata=_option(parse_hostname, "name to give in EHLO/HELO", metavar="NAME"),
    )
    foreign_domain: str = field(
        default="example.net",
        metadata=_option(parse_hostname, "a third-party sender domain", metavar="D"),
    )
    target_port: int = field(
        default=25, metadata=_option(parse_port, "port to test on the mail server", metavar="N")
    )
    suite: str = field(
        default="classic",
        metadata=_option(parse_suite, f"probe suite: {' or '.join(SUITES)}", metavar="NAME"),
    )
    probes: tuple[Probe, ...] = field(
        default=(),
        metadata=_option(lambda value: value, "extra probes", file_only=True),
    )
    connect_timeout: float = field(
        default=10.0,
        metadata=_option(parse_seconds, "seconds to wait for the TCP connection", metavar="S"),
    )
    reply_timeout: float = field(
        default=30.0, metadata=_option(parse_seconds, "seconds to wait for each reply", metavar="S")
    )
    deadline: float = field(
        default=300.0, metadata=_option(parse_seconds, "seconds a whole test may take", metavar="S")
    )
    rdns_timeout: float = field(
        default=2.0, metadata=_option(parse_seconds, "seconds to wait for reverse DNS", metavar="S")
    )
    sink_listen: Endpoint | None = field(
        default=None,
        metadata=_option(
            parse_endpoint, "run the canary sink for the test domain here", metavar="ADDR:PORT"
        ),
    )
    sink_tls_cert: str | None = field(
        default=None,
        metadata=_option(
            parse_path,
            "PEM certificate chain the sink offers in STARTTLS (none: a throwaway self-signed one)",
            metavar="FILE",
        ),
    )
    sink_tls_key: str | None = field(
        default=None,
        metadata=_option(parse_path, "PEM private key of --sink-tls-cert", metavar="FILE"),
    )
    sink_max_connections: int = field(
        default=100,
        metadata=_option(
            parse_count, "canary sink connections at once", commands=_SERVE, metavar="N"
        ),
    )
    sink_reserved_connections: int = field(
        default=20,
        metadata=_option(
            parse_count,
            "of those, kept for networks holding no sink connection yet",
            commands=_SERVE,
            metavar="N",
        ),
    )
    sink_max_connections_per_address: int = field(
        default=10,
        metadata=_option(
            parse_count, "sink connections at once from one address", commands=_SERVE, metavar="N"
        ),
    )
    sink_max_connections_per_prefix: int = field(
        default=20,
        metadata=_option(
            parse_count, "sink connections at once from one prefix", commands=_SERVE, metavar="N"
        ),
    )
    sink_ipv4_prefix: int = field(
        default=24,
        metadata=_option(
            parse_prefix_length(32),
            "IPv4 prefix length the sink counts together",
            commands=_SERVE,
            metavar="N",
        ),
    )
    sink_ipv6_prefix: int = field(
        default=48,
        metadata=_option(
            parse_prefix_length(128),
            "IPv6 prefix length the sink counts together",
            commands=_SERVE,
            metavar="N",
        ),
    )
    sink_idle_timeout: float = field(
        default=10.0,
        metadata=_option(
            parse_seconds,
            "seconds a sink connection may wait between commands",
            commands=_SERVE,
            metavar="S",
        ),
    )
    sink_connection_timeout: float = field(
        default=60.0,
        metadata=_option(
            parse_seconds, "seconds a sink connection may last", commands=_SERVE, metavar="S"
        ),
    )
    sink_max_message_bytes: int = field(
        default=64 * 1024,
        metadata=_option(
            parse_count, "largest message the sink takes, in bytes", commands=_SERVE, metavar="N"
        ),
    )
    sink_max_unknown_recipients: int = field(
        default=3,
        metadata=_option(
            parse_count,
            "unknown recipients per sink connection before it is closed",
            commands=_SERVE,
            metavar="N",
        ),
    )
    sink_unknown_recipients_per_minute: int = field(
        default=30,
        metadata=_option(
            parse_count,
            "unknown recipients per prefix and minute before the sink refuses it",
            commands=_SERVE,
            metavar="N",
        ),
    )
    sink_replies_per_second: float = field(
        default=1000.0,
        metadata=_option(
            parse_rate,
            "sink replies per second, all clients together",
            commands=_SERVE,
            metavar="R",
        ),
    )
    sink_recipient_timeout: float = field(
        default=10.0,
        metadata=_option(
            parse_seconds,
            "seconds a sink connection has to name a recipient of a running test",
            commands=_SERVE,
            metavar="S",
        ),
    )
    sink_message_bytes_per_second: int = field(
        default=64 * 1024,
        metadata=_option(
            parse_count,
            "message bytes per second the sink reads from one prefix",
            commands=_SERVE,
            metavar="N",
        ),
    )
    confirm: bool = field(
        default=True,
        metadata=_option(parse_bool, "prove relaying by delivery to the canary sink", flag=True),
    )
    confirm_wait: float = field(
        default=30.0,
        metadata=_option(parse_seconds, "seconds to wait for relayed test messages", metavar="S"),
    )
    starttls: str = field(
        default="auto",
        metadata=_option(
            one_of("auto", "always", "never"),
            "auto: STARTTLS when the server requires it; always: whenever offered; never",
            metavar="WHEN",
        ),
    )
    allow: tuple[str, ...] = field(
        default=(),
        metadata=_option(
            parse_network_text,
            "networks that may test (repeatable; none: everyone)",
            commands=_SERVE,
            metavar="CIDR",
            many=True,
        ),
    )
    deny: tuple[str, ...] = field(
        default=(),
        metadata=_option(
            parse_network_text,
            "networks that may not test; wins over allow (repeatable)",
            commands=_SERVE,
            metavar="CIDR",
            many=True,
        ),
    )
    rate_limit: bool = field(
        default=True,
        metadata=_option(
            parse_bool, "limit how often callers may test", commands=_SERVE, flag=True
        ),
    )
    rate_address_interval: float = field(
        default=60.0,
        metadata=_option(
            parse_seconds, "seconds between two tests of one address", commands=_SERVE, metavar="S"
        ),
    )
    rate_prefix_tests: int = field(
        default=10,
        metadata=_option(
            parse_count, "tests per window from one network prefix", commands=_SERVE, metavar="N"
        ),
    )
    rate_prefix_window: float = field(
        default=60.0,
        metadata=_option(
            parse_seconds, "seconds of the per-prefix window", commands=_SERVE, metavar="S"
        ),
    )
    rate_ipv4_prefix: int = field(
        default=24,
        metadata=_option(
            parse_prefix_length(32),
            "IPv4 prefix length rate-limited together",
            commands=_SERVE,
            metavar="N",
        ),
    )
    rate_ipv6_prefix: int = field(
        default=56,
        metadata=_option(
            parse_prefix_length(128),
            "IPv6 prefix length rate-limited together",
            commands=_SERVE,
            metavar="N",
        ),
    )
    rate_global: float = field(
        default=5.0,
        metadata=_option(
            parse_rate,
            "new outbound tests per second, all callers together",
            commands=_SERVE,
            metavar="R",
        ),
    )
    proxy_protocol: bool = field(
        default=False,
        metadata=_option(
            parse_bool,
            "expect a PROXY protocol v1/v2 header on every connection",
            commands=_SERVE,
            flag=True,
        ),
    )
    trusted_proxy: tuple[str, ...] = field(
        default=(),
        metadata=_option(
            parse_network_text,
            "networks whose PROXY headers are believed (repeatable)",
            commands=_SERVE,
            metavar="CIDR",
            many=True,
        ),
    )
    proxy_timeout: float = field(
        default=5.0,
        metadata=_option(
            parse_seconds, "seconds to wait for the PROXY header", commands=_SERVE, metavar="S"
        ),
    )
    http_listen: Endpoint | None = field(
        default=None,
        metadata=_option(
            parse_endpoint,
            "serve /metrics, /healthz and /readyz here",
            commands=_SERVE,
            metavar="ADDR:PORT",
        ),
    )
    web_listen: tuple[Endpoint, ...] = field(
        default=(),
        metadata=_option(
            parse_endpoint,
            "address of the public web front door: curl and browsers (repeatable)",
            commands=_SERVE,
            metavar="ADDR:PORT",
            many=True,
        ),
    )
    public_url: str | None = field(
        default=None,
        metadata=_option(
            parse_public_url,
            "URL of the web front door, for links to stored results",
            commands=_SERVE,
            metavar="URL",
        ),
    )
    redis_url: str | None = field(
        default=None,
        metadata=_option(
            parse_redis_url,
            "Redis shared by replicas: tokens, arrivals, rate limits (give it by "
            "RELAYPROBE_REDIS_URL or the file when it holds a password)",
            commands=_SERVE,
            metavar="URL",
        ),
    )
    redis_timeout: float = field(
        default=0.2,
        metadata=_option(
            parse_seconds, "seconds each Redis call may take", commands=_SERVE, metavar="S"
        ),
    )
    database_url: str | None = field(
        default=None,
        metadata=_option(
            parse_database_url,
            "PostgreSQL for the history shared by replicas, instead of SQLite in state_dir "
            "(give it by RELAYPROBE_DATABASE_URL or the file when it holds a password)",
            commands=_STATE,
            metavar="URL",
        ),
    )
    state_dir: str = field(
        default="/var/lib/relayprobe",
        metadata=_option(
            parse_path, "directory of the result history", commands=_STATE, metavar="DIR"
        ),
    )
    history: bool = field(
        default=True,
        metadata=_option(
            parse_bool, "store every result in the history", commands=_SERVE, flag=True
        ),
    )
    retention_days: float = field(
        default=90.0,
        metadata=_option(
            parse_days, "days to keep results in the history", commands=_SERVE, metavar="D"
        ),
    )
    max_sessions: int = field(
        default=200,
        metadata=_option(parse_count, "tests running at once", commands=_SERVE, metavar="N"),
    )
    caller_input_bytes: int = field(
        default=16 * 1024,
        metadata=_option(
            parse_count,
            "bytes a caller may send at once; past that (or the rate) its input is ignored",
            commands=_SERVE,
            metavar="N",
        ),
    )
    caller_input_rate: float = field(
        default=1024.0,
        metadata=_option(
            parse_rate,
            "bytes per second a caller may send after that",
            commands=_SERVE,
            metavar="R",
        ),
    )
    caller_output_bytes: int = field(
        default=256 * 1024,
        metadata=_option(
            parse_count,
            "unsent output after which a caller counts as not reading and is cut off",
            commands=_SERVE,
            metavar="N",
        ),
    )
    caller_write_timeout: float = field(
        default=30.0,
        metadata=_option(
            parse_seconds,
            "seconds a caller may leave our output unread before it is cut off",
            commands=_SERVE,
            metavar="S",
        ),
    )
    motd: str = field(
        default="",
        metadata=_option(_text, "greeting shown to callers", commands=_SERVE, metavar="TEXT"),
    )
    log_format: str = field(
        default="auto",
        metadata=_option(
            parse_log_format,
            "json, console, or auto (console on a terminal)",
            commands=_SERVE,
            metavar="FORMAT",
        ),
    )

    def confirmation_off_reason(self) -> str | None:
        """Why delivery confirmation is off, and how to turn it on; None when it is on."""
        if not self.confirm:
            return "turned off by the operator (confirm = false)"
        if self.sink_listen is None:
            return (
                "no canary sink configured; to prove relaying, run one (--sink-listen ADDR:PORT) "
                f"and point the MX of {self.test_domain} at it"
            )
        return None

    def sink_limits(self) -> SinkLimits:
        """The canary sink's limits; `ValueError` when they contradict each other."""
        # Here, not at the top: only the service and `check` with a sink need them.
        from relayprobe.confirmation.sinklimits import SinkLimits

        return SinkLimits(
            max_connections=self.sink_max_connections,
            reserved_connections=self.sink_reserved_connections,
            max_connections_per_address=self.sink_max_connections_per_address,
            max_connections_per_prefix=self.sink_max_connections_per_prefix,
            ipv4_prefix=self.sink_ipv4_prefix,
            ipv6_prefix=self.sink_ipv6_prefix,
            idle_timeout=self.sink_idle_timeout,
            connection_timeout=self.sink_connection_timeout,
            max_message_bytes=self.sink_max_message_bytes,
            max_unknown_recipients=self.sink_max_unknown_recipients,
            unknown_recipients_per_minute=self.sink_unknown_recipients_per_minute,
            replies_per_second=self.sink_replies_per_second,
            recipient_timeout=self.sink_recipient_timeout,
            message_bytes_per_second=self.sink_message_bytes_per_second,
        )

    def test_options(self) -> RelayTestOptions:
        off = self.confirmation_off_reason()
        return RelayTestOptions(
            port=self.target_port,
            suite=build_suite(self.suite, self.probes),
            helo_name=self.helo_name,
            test_domain=self.test_domain,
            foreign_domain=self.foreign_domain,
            connect_timeout=self.connect_timeout,
            reply_timeout=self.reply_timeout,
            deadline=self.deadline,
            rdns_timeout=self.rdns_timeout,
            confirm_wait=self.confirm_wait,
            starttls=self.starttls,
            operator=self.helo_name,
            notes=(f"delivery confirmation is off: {off}",) if off else (),
        )


_PROBE_KEYS = frozenset({"name", "mail_from", "rcpt_to"})
_FORMS = {form.value: form for form in AddressForm}


def _parse_probes(value: object) -> tuple[Probe, ...]:
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise ValueError("expected [[probes]] tables with name, mail_from and rcpt_to")
    probes = []
    for entry in value:
        keys = set(entry)
        if not _PROBE_KEYS <= keys <= {*_PROBE_KEYS, "form"} or not all(
            isinstance(v, str) for v in entry.values()
        ):
            raise ValueError(
                f"each probe needs text name, mail_from and rcpt_to, and may have a form: {entry!r}"
            )
        form = entry.get("form", AddressForm.PLAIN.value)
        if form not in _FORMS:
            raise ValueError(f"unknown form {form!r} (known: {', '.join(_FORMS)})")
        probes.append(Probe(entry["name"], entry["mail_from"], entry["rcpt_to"], _FORMS[form]))
    return tuple(probes)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def option_flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Add an option for every setting `command` takes; unset options stay absent."""
    parser.add_argument(
        "--config", metavar="FILE", help="TOML config file", default=argparse.SUPPRESS
    )
    for key, f in _FIELDS.items():
        meta = f.metadata
        # The demo runs its own fake servers: it takes the test options, not where to test.
        demo_takes = command == "demo" and "check" in meta["commands"] and key not in _NOT_FOR_DEMO
        if meta["file_only"] or (command not in meta["commands"] and not demo_takes):
            continue
        names = [option_flag(key)]
        if key == "target_port" and command == "check":
            names.insert(0, "--port")
        described = f"{meta['help']} (default {_show_default(f.default)}; env {env_name(key)})"
        if meta["flag"]:
            parser.add_argument(
                *names,
                dest=key,
                help=described,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
            )
            continue
        parser.add_argument(
            *names,
            dest=key,
            metavar=meta["metavar"],
            help=described,
            action="append" if meta["many"] else "store",
            default=argparse.SUPPRESS,
        )


def _show_default(value: object) -> str:
    if isinstance(value, tuple):
        return " ".join(str(item) for item in value) or "none"
    return str(value) if value != "" else "none"


def _parse(key: str, raw: object, label: str) -> Any:
    meta = _FIELDS[key].metadata
    try:
        if key == "probes":
            return _parse_probes(raw)
        if meta["many"]:
            items: Sequence[object]
            if isinstance(raw, str):
                items = [item for item in raw.split(",") if item.strip()]
            elif isinstance(raw, list | tuple):
                items = raw
            else:
                raise ValueError(f"expected a list, got {raw!r}")
            return tuple(
                meta["parse"](item.strip() if isinstance(item, str) else item) for item in items
            )
        return meta["parse"](raw)
    except ValueError as exc:
        raise ConfigError(f"{label}: {exc}") from None


def read_file(path: str) -> dict[str, Any]:
    import tomllib  # here: most commands run without a config file

    try:
        with Path(path).open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None


def load_settings(
    options: Mapping[str, object], *, environ: Mapping[str, str] = os.environ
) -> Settings:
    """Settings from the parsed options (only those given), the environment and the config file."""
    values: dict[str, Any] = {}
    config_path = options.get("config") or environ.get(env_name("config"))
    if config_path:
        data = read_file(str(config_path))
        for key, raw in data.items():
            if key not in _FIELDS:
                raise ConfigError(f"config file {config_path}: unknown key {key!r}")
            values[key] = _parse(key, raw, f"config file {config_path}: {key}")
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == env_name("config"):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in _FIELDS or _FIELDS[key].metadata["file_only"]:
            raise ConfigError(f"environment: unknown variable {name}")
        values[key] = _parse(key, raw, name)
    for key, raw in options.items():
        if key in _FIELDS:
            values[key] = _parse(key, raw, option_flag(key))
    settings = Settings(**values)
    if settings.proxy_protocol and not settings.trusted_proxy:
        raise ConfigError("proxy_protocol: needs at least one trusted_proxy network")
    try:
        build_suite(settings.suite, settings.probes)
    except ValueError as exc:
        raise ConfigError(f"probes: {exc}") from None
    if not settings.listen:
        raise ConfigError("listen: give at least one ADDR:PORT")
    if settings.sink_listen is not None:
        try:
            settings.sink_limits()
        except ValueError as exc:
            raise ConfigError(f"sink limits: {exc}") from None
    if (settings.sink_tls_cert is None) != (settings.sink_tls_key is None):
        raise ConfigError(
            "sink_tls_cert and sink_tls_key: give both, or neither for a throwaway certificate"
        )
    return settings
