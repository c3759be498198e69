"""Make bytes from the network harmless before they reach a terminal or a log.

Printable ASCII passes through unchanged; everything else a terminal could act on (C0 and C1
controls, DEL, bidi and other format characters, invalid UTF-8) is shown escaped.
"""

from __future__ import annotations

import re

_UNSAFE_ASCII = re.compile(rb"[^\x20-\x7e]")

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


def sanitize(data: bytes) -> str:
    """Return `data` as a single safe line of text."""
    if _UNSAFE_ASCII.search(data) is None:
        return data.decode("ascii")
    return "".join(_escape_char(char) for char in data.decode("utf-8", "surrogateescape"))


def sanitize_text(text: str) -> str:
    """Sanitise a string that may carry bytes smuggled in by surrogateescape."""
    return "".join(_escape_char(char) for char in text)


def sanitize_line(data: bytes, *, limit: int = MAX_DISPLAY_CHARS) -> str:
    """Sanitise one line for display, at most `limit` characters and a note saying it was cut."""
    # Escaping makes a byte up to four characters long: cut the bytes first to bound the work.
    text = sanitize(data[:limit])
    if len(data) <= limit and len(text) <= limit:
        return text
    return f"{text[:limit]}... [cut: {len(data)} bytes in all]"
