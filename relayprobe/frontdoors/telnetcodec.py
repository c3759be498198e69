"""Sans-I/O telnet codec for the reflector service.

The service never uses what the client types. `TelnetInput` consumes the client's bytes, refuses
every option the client offers or requests, and reports when the user asked to stop (Ctrl-C and
its telnet forms, Ctrl-D, or a line saying `quit`). `encode_line` turns one transcript line into
bytes that are safe to send.

Nothing is ever buffered: the parser keeps a state, the last verb, at most 16 bytes of the line
being typed, and two fixed 256-entry tables of options already refused, so memory stays constant
however the input is split or how long a subnegotiation runs. Runs of plain text and of literal
0xFF bytes are skipped by C-level regex matches, not a Python step per byte.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

IAC = 0xFF
DONT = 0xFE
DO = 0xFD
WONT = 0xFC
WILL = 0xFB
SB = 0xFA
SE = 0xF0
NOP = 0xF1
IP = 0xF4
BRK = 0xF3
ABORT = 0xEE
EOF = 0xEC
TIMING_MARK = 0x06

CTRL_C = 0x03
CTRL_D = 0x04


class InterruptCause(enum.Enum):
    """What the client sent to ask the service to stop."""

    INTERRUPT_PROCESS = "IAC IP"
    BREAK = "IAC BRK"
    ABORT = "IAC ABORT"
    END_OF_FILE = "IAC EOF"
    CTRL_C = "^C"
    CTRL_D = "^D"
    QUIT = "quit"


@dataclass(frozen=True, slots=True)
class Interrupt:
    """The user pressed Ctrl-C (or an equivalent): the session should stop."""

    cause: InterruptCause


@dataclass(frozen=True, slots=True)
class TelnetFeedResult:
    """What one `TelnetInput.feed` call found.

    `interrupt` is the first interrupt in the fed bytes, if any; `reply` holds negotiation answers
    that must be written back to the client.
    """

    interrupt: Interrupt | None
    reply: bytes

    @property
    def interrupted(self) -> bool:
        return self.interrupt is not None


class _State(enum.Enum):
    DATA = enum.auto()
    COMMAND = enum.auto()  # after IAC
    OPTION = enum.auto()  # after IAC WILL/WONT/DO/DONT
    SUBNEGOTIATION_OPTION = enum.auto()  # after IAC SB
    SUBNEGOTIATION = enum.auto()
    SUBNEGOTIATION_IAC = enum.auto()  # after IAC inside a subnegotiation


_IAC_BYTE = bytes((IAC,))
_DATA_SPECIAL = re.compile(rb"[\x03\x04\r\n\xff]")  # CTRL_C, CTRL_D, line ends, IAC
_LINE_ENDS = frozenset(b"\r\n")
# A typed line is kept only while it could still be "quit" with some blanks around it.
_MAX_LINE = 16
_NOT_QUIT = b"\xff"
_QUIT = Interrupt(InterruptCause.QUIT)
# Literal 0xFF data bytes, skipped in one C-level match however many a client sends.
_ESCAPED_IACS = re.compile(rb"(?:\xff\xff)+")
# Answered by nothing and shown by no telnet client: a write that finds out whether the
# caller is still there after it has stopped sending.
NO_OPERATION = bytes((IAC, NOP))

_DATA_INTERRUPTS = {
    CTRL_C: Interrupt(InterruptCause.CTRL_C),
    CTRL_D: Interrupt(InterruptCause.CTRL_D),
}
# IP and BRK are what netkit and most clients send for Ctrl-C; ABORT and EOF are their RFC 1184
# forms of Ctrl-\ and Ctrl-D. AO (abort output, Ctrl-O) is deliberately not an interrupt.
_COMMAND_INTERRUPTS = {
    IP: Interrupt(InterruptCause.INTERRUPT_PROCESS),
    BRK: Interrupt(InterruptCause.BREAK),
    ABORT: Interrupt(InterruptCause.ABORT),
    EOF: Interrupt(InterruptCause.END_OF_FILE),
}
_VERBS = frozenset((WILL, WONT, DO, DONT))


class TelnetInput:
    """Parse and discard a telnet client's input; refuse options, report interrupts.

    Each WILL is answered with one DONT and each DO with one WONT, at most once per option and
    direction, so a misbehaving client cannot start a negotiation loop. DO TIMING-MARK is the
    exception: it is a request for a reply, not an option state (RFC 860), and netkit telnet
    discards all output after Ctrl-C until the WONT TIMING-MARK arrives. WONT and DONT need no
    answer because this side never enables anything.
    """

    __slots__ = ("_line", "_refused_do", "_refused_will", "_state", "_verb")

    def __init__(self) -> None:
        self._state = _State.DATA
        self._verb = 0
        self._line = b""
        self._refused_will = bytearray(256)
        self._refused_do = bytearray(256)

    def feed(self, data: bytes) -> TelnetFeedResult:
        interrupt: Interrupt | None = None
        reply = bytearray()
        state = self._state
        line = self._line
        position = 0
        end = len(data)
        while position < end:
            if state is _State.DATA:
                match = _DATA_SPECIAL.search(data, position)
                text_end = end if match is None else match.start()
                if text_end > position:
                    line += data[position:text_end]
                    if len(line) > _MAX_LINE:
                        line = _NOT_QUIT
                if match is None:
                    break
                position = match.end()
                byte = data[position - 1]
                if byte in _LINE_ENDS:
                    if line.strip(b" \t\0").lower() == b"quit":
                        interrupt = interrupt or _QUIT
                    line = b""
                elif byte != IAC:
                    interrupt = interrupt or _DATA_INTERRUPTS[byte]
                elif escaped := _ESCAPED_IACS.match(data, position - 1):
                    position = escaped.end()
                    line = _NOT_QUIT
                else:
                    state = _State.COMMAND
            elif state is _State.SUBNEGOTIATION:
                # Subnegotiation content is skipped, not stored: only IAC can end it.
                found = data.find(_IAC_BYTE, position)
                if found < 0:
                    break
                position = found + 1
                state = _State.SUBNEGOTIATION_IAC
            else:
                byte = data[position]
                position += 1
                if state is _State.OPTION:
                    self._answer(self._verb, byte, reply)
                    state = _State.DATA
                elif state is _State.SUBNEGOTIATION_OPTION:
                    state = _State.SUBNEGOTIATION
                elif state is _State.SUBNEGOTIATION_IAC and byte in (IAC, SE):
                    state = _State.SUBNEGOTIATION if byte == IAC else _State.DATA
                elif state is _State.COMMAND and byte == IAC:
                    state = _State.DATA  # IAC IAC: a literal 0xFF data byte
                    line = _NOT_QUIT
                else:
                    # A command after IAC; inside a subnegotiation any other command is a
                    # protocol error that ends it (as libtelnet does), so a client that never
                    # sends SE cannot hide a later IAC IP.
                    if byte in _VERBS:
                        self._verb = byte
                        state = _State.OPTION
                    elif byte == SB:
                        state = _State.SUBNEGOTIATION_OPTION
                    else:
                        if interrupt is None:
                            interrupt = _COMMAND_INTERRUPTS.get(byte)
                        state = _State.DATA
        self._state = state
        self._line = line
        return TelnetFeedResult(interrupt=interrupt, reply=bytes(reply))

    def _answer(self, verb: int, option: int, reply: bytearray) -> None:
        if verb == WILL:
            if not self._refused_will[option]:
                self._refused_will[option] = 1
                reply += bytes((IAC, DONT, option))
        elif verb == DO and (option == TIMING_MARK or not self._refused_do[option]):
            self._refused_do[option] = 1
            reply += bytes((IAC, WONT, option))


_LINE_BREAK_ESCAPES = str.maketrans({"\r": "\\r", "\n": "\\n"})


def encode_line(text: str) -> bytes:
    """Encode one transcript line for the telnet client: UTF-8, then CRLF.

    A CR or LF inside `text` is shown escaped (as `\\r`, `\\n`) so it can never split or overwrite
    the line; characters UTF-8 cannot encode (lone surrogates) become `\\udcxx` escapes. The output
    never contains 0xFF, so no telnet IAC escaping is needed. Other control characters are the
    caller's to sanitise.
    """
    if "\r" in text or "\n" in text:
        text = text.translate(_LINE_BREAK_ESCAPES)
    # "backslashreplace" keeps the output valid UTF-8; "surrogateescape" could emit a raw IAC.
    return text.encode("utf-8", "backslashreplace") + b"\r\n"


def encode_lines(lines: Sequence[str]) -> bytes:
    """`encode_line` of each line, joined, in one go: what comes out is the same bytes.

    When no line has a CR or LF of its own (the two counts below find only the joins), the
    whole text is encoded at once, in C; otherwise line by line.
    """
    text = "\r\n".join(lines) + "\r\n"
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        return b"".join(map(encode_line, lines))
    return text.encode("utf-8", "backslashreplace")
