"""The relay probes, as data.

A probe is a name and the two command arguments with placeholders; a suite is an ordered tuple of
probes. Operators can add probes in the config file, so templates are validated when loaded.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

PLACEHOLDERS = frozenset({"host", "ip", "dom", "foreign", "rcpt"})
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# Only printable ASCII may go into a command; CR or LF would smuggle in a second command.
_COMMAND_SAFE = re.compile(r"[\x21-\x7e]+")


class AddressForm(StrEnum):
    """The form of a probe's recipient.

    Every form but PLAIN is one that qmail and some other servers accept at RCPT when the part
    after the last `@` is their own, and then bounce: a 250 to it proves nothing until the test
    message arrives.
    """

    PLAIN = "plain"
    PERCENT_HACK = "%-hack"
    BANG_PATH = "bang path"
    QUOTED = "quoted local part"
    SOURCE_ROUTE = "source route"
    TWO_AT = "two @ signs"


@dataclass(frozen=True, slots=True)
class Probe:
    name: str
    mail_from: str
    rcpt_to: str
    form: AddressForm = AddressForm.PLAIN

    def __post_init__(self) -> None:
        # The name is shown in the transcript: keep it a short line of plain text.
        if not (0 < len(self.name) <= 60 and self.name.isascii() and self.name.isprintable()):
            raise ValueError(f"probe name {self.name!r} must be 1-60 printable ASCII characters")
        for template in (self.mail_from, self.rcpt_to):
            check_template(template)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeContext:
    """The values the placeholders stand for, for one tested host."""

    host: str
    ip: str
    dom: str
    foreign: str

    def values(self, rcpt: str) -> dict[str, str]:
        return {
            "host": self.host,
            "ip": self.ip,
            "dom": self.dom,
            "foreign": self.foreign,
            "rcpt": rcpt,
        }


def check_template(template: str) -> None:
    """Raise ValueError when a template names an unknown placeholder or holds unsafe bytes."""
    for match in _PLACEHOLDER.finditer(template):
        if match.group(1) not in PLACEHOLDERS:
            known = ", ".join(sorted(PLACEHOLDERS))
            raise ValueError(
                f"unknown placeholder {{{match.group(1)}}} in {template!r} (known: {known})"
            )
    if not _COMMAND_SAFE.fullmatch(_PLACEHOLDER.sub("x", template)):
        raise ValueError(f"probe argument {template!r} must be printable ASCII without spaces")


def render(template: str, values: Mapping[str, str]) -> str:
    return _format_string(template).format_map(values)


@functools.lru_cache(maxsize=256)
def _format_string(template: str) -> str:
    """`template` for `str.format_map`, which fills it in C: placeholders kept, other braces
    doubled."""
    parts = _PLACEHOLDER.split(template)  # text, name, text, name, ..., text
    return "".join(
        f"{{{part}}}" if index % 2 else part.replace("{", "{{").replace("}", "}}")
        for index, part in enumerate(parts)
    )


def address_literal(ip: str) -> str:
    """The RFC 5321 address literal of an IP address: `[192.0.2.4]` or `[IPv6:2001:db8::4]`."""
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


_PERCENT, _BANG, _QUOTED = AddressForm.PERCENT_HACK, AddressForm.BANG_PATH, AddressForm.QUOTED
_ROUTE, _TWO_AT = AddressForm.SOURCE_ROUTE, AddressForm.TWO_AT

CLASSIC: tuple[Probe, ...] = (
    Probe("Quote test", "<spamtest@{host}>", '<"{rcpt}@{dom}">', _QUOTED),
    Probe("Test 1", "<nobody@{dom}>", "<{rcpt}@{dom}>"),
    Probe("Test 2", "<spamtest@{foreign}>", "<{rcpt}@{dom}>"),
    Probe("Test 3", "<spamtest@localhost>", "<{rcpt}@{dom}>"),
    Probe("Test 4", "<spamtest>", "<{rcpt}@{dom}>"),
    Probe("Test 5", "<>", "<{rcpt}@{dom}>"),
    Probe("Test 6", "<spamtest@{host}>", "<{rcpt}@{dom}>"),
    Probe("Test 7", "<spamtest@{ip}>", "<{rcpt}@{dom}>"),
    Probe("Test 8", "<spamtest@{host}>", "<{rcpt}%{dom}@{host}>", _PERCENT),
    Probe("Test 9", "<spamtest@{host}>", "<{rcpt}%{dom}@{ip}>", _PERCENT),
    Probe("Test 10", "<spamtest@{host}>", '<"{rcpt}@{dom}">', _QUOTED),
    Probe("Test 11", "<spamtest@{host}>", '<"{rcpt}%{dom}">', _QUOTED),
    # The stray quote is in the original service's list; servers differ in how they parse it.
    Probe("Test 12", "<spamtest@{ip}>", '<{rcpt}@{dom}@{host}">', _TWO_AT),
    Probe("Test 13", "<spamtest@{host}>", '<"{rcpt}@{dom}"@{ip}>', _QUOTED),
    Probe("Test 14", "<spamtest@{host}>", "<{rcpt}@{dom}@{ip}>", _TWO_AT),
    Probe("Test 15", "<spamtest@{ip}>", "<@{host}:{rcpt}@{dom}>", _ROUTE),
    Probe("Test 16", "<spamtest@{host}>", "<@{ip}:{rcpt}@{dom}>", _ROUTE),
    Probe("Test 17", "<spamtest@{ip}>", "<{dom}!{rcpt}>", _BANG),
    Probe("Test 18", "<spamtest@{host}>", "<{dom}!{rcpt}@{ip}>", _BANG),
    Probe("Test 19", "<postmaster@{host}>", "<{rcpt}@{dom}>"),
)

# Forms that later testers (nmap's smtp-open-relay, abuse.net) try and the classic list lacks.
EXTENDED: tuple[Probe, ...] = (
    *CLASSIC,
    Probe("Test 20", "<spamtest@{host}>", "<{rcpt}@{dom}@{host}>", _TWO_AT),
    Probe("Test 21", "<spamtest@{host}>", "<{dom}!{rcpt}@{host}>", _BANG),
    Probe("Test 22", "<spamtest@{host}>", "{rcpt}@{dom}"),
    Probe("Test 23", "<{dom}!spamtest>", "<{rcpt}@{dom}>"),
    Probe("Test 24", "<spamtest@{host}>", '<"{rcpt}@{dom}"@{host}>', _QUOTED),
    Probe("Test 25", "<spamtest@{host}>", "<{rcpt}%{dom}>", _PERCENT),
    Probe("Test 26", "<spamtest@{host}>", "<@{host}:{rcpt}%{dom}>", _ROUTE),
    Probe("Test 27", "<spamtest@[127.0.0.1]>", "<{rcpt}@{dom}>"),
)

SUITES: dict[str, tuple[Probe, ...]] = {"classic": CLASSIC, "extended": EXTENDED}


def build_suite(base: str, added: Sequence[Probe] = ()) -> tuple[Probe, ...]:
    """A named suite plus operator-defined probes."""
    try:
        probes = SUITES[base]
    except KeyError:
        raise ValueError(f"unknown suite {base!r} (known: {', '.join(SUITES)})") from None
    names = [probe.name for probe in (*probes, *added)]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate probe names: {', '.join(duplicates)}")
    return (*probes, *added)
