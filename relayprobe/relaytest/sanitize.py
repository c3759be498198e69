"""Make bytes from the network harmless before they reach a terminal or a log.

Text from the network arrives decoded as UTF-8 with `surrogateescape`, so that bytes which are not
UTF-8 survive as lone surrogates. Printable ASCII passes through unchanged; everything else a
terminal could act on (C0 and C1 controls, DEL, bidi and other format characters, invalid UTF-8)
is shown escaped.

The common cases run in C (`str.isprintable`, `str.translate`), not as a Python
call per character, so a reply full of control bytes costs a few times what plain text does, not
a hundred; unprintable characters beyond Latin-1 take the slow path, bounded by the line limit.
"""

from __future__ import annotations

import re

# After the table below, only characters beyond Latin-1 can still be unprintable.
_WIDE = re.compile("[^\x00-\xff]")

# A reply line longer than this is cut for display; the SMTP limit is 512 octets.
MAX_DISPLAY_CHARS = 1000


def _escape_char(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte of invalid UTF-8, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if char.isprintable():
        return char
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


# The unprintable Latin-1 characters (C0, DEL, C1, no-break space, soft hyphen) and the bytes
# of invalid UTF-8: what a hostile server sends most, escaped by str.translate in C.
_ESCAPES = {
    code: _escape_char(chr(code))
    for code in (*range(0x100), *range(0xDC80, 0xDD00))
    if _escape_char(chr(code)) != chr(code)
}


def _escape_wide(match: re.Match[str]) -> str:
    return _escape_char(match.group())


def sanitize_text(text: str) -> str:
    """Sanitise a string that may carry bytes smuggled in by surrogateescape."""
    text = text.translate(_ESCAPES)
    if text.isprintable():
        return text
    return _WIDE.sub(_escape_wide, text)


def sanitize_line(text: str, *, limit: int = MAX_DISPLAY_CHARS) -> str:
    """Sanitise one line from the network (decoded with `surrogateescape`) for display: at most
    `limit` characters, and a note saying it was cut."""
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text  # the common case, in C
    shown = _sanitized_prefix(text, limit)
    if len(text) <= limit and len(shown) <= limit:
        return shown
    return f"{shown[:limit]}... [cut: {len(text)} characters in all]"


# Escaping works a piece of this size at a time, so that it can stop early.
_PIECE = 256


def _sanitized_prefix(text: str, limit: int) -> str:
    """`sanitize_text(text[:limit])`, or as much of it as gets longer than `limit`.

    Escaping is done character by character and never shortens anything, so past `limit`
    characters of output nothing more is shown; a hostile line of characters that escape to ten
    each (some of them a Python call each) stops after a tenth of the line.
    """
    pieces: list[str] = []
    size = 0
    for start in range(0, min(len(text), limit), _PIECE):
        piece = sanitize_text(text[start : min(start + _PIECE, limit)])
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            break
    return "".join(pieces)
